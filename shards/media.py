"""Reading source media and encoding them the way the shards store them.

Images are stored as JPEG (``jpg``). A source that already is an RGB JPEG is stored as is: it
decodes fully (checked), and re-encoding it would only lose quality and time.

Videos (a clip: ``(T, H, W, 3)`` uint8, every frame at face-crop resolution) are stored in
one of three encodings:

``frames`` (default, ``.jpgs``)
    Every frame an independent baseline JPEG (the images' encoder and quality), the frames
    concatenated in order; the builder records each frame's end offset in the shard's frame
    index (``shard-%06d.fidx``, layout.py), after checking each frame's markers. A sample reads
    and decodes exactly the frames its window uses, with no container to demux, and a batch's
    frames decode in one batched JPEG decode (nvJPEG on a GPU).
``vp9`` (option, ``.webm``)
    libvpx VP9, constant quality (``crf``, default 30), a keyframe every ``keyframe_interval``
    frames (default 16), no alt-ref / look-ahead, so packets and frames correspond one to one
    and a window needs only the frames back to the keyframe before it.
``mjpeg`` (option, ``.mkv``)
    Every frame a JPEG muxed as an MJPEG stream in Matroska (DALI's GPU video decoder does not
    take it; its CPU decoder does).

Why ``frames`` is the default: a stride-4 window of 16 frames decodes 16 frames instead of the
~68 a VP9 window costs (back to the keyframe, every frame between), the decode is one batched
image decode rather than a decoder object per clip, and training needs no demux or structural
check (benchmarks/results/data_cpu.json: throughput, decoded/used frames, bytes per clip). The
price is storage: JPEG frames take many times VP9's bytes (the same file states how many);
build with ``--video-codec vp9`` where storage matters more than decoding.

VP9 against MJPEG (bytes, encode time, quality, window decode time) is measured by
benchmarks/codec.py (results/codec_cpu.json). VP9's keyframe interval stays 16: longer
intervals store smaller clips but raise the frames decoded before a window's first frame
(≤ 15 at 16), which short windows feel most (FERV39K reads 16 consecutive frames).

A long VP9 / MJPEG video is split into chunks (``chunk_bounds``; a sample is read whole, so a
long video as one sample would cost memory and I/O for one window's frames). Frame storage
reads only a window's frames, so its clips are stored whole unless ``chunk_frames`` says
otherwise.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image

IMAGE_EXT = "jpg"
DEFAULT_JPEG_QUALITY = 95
DEFAULT_VIDEO_CODEC = "frames"
DEFAULT_VP9_CRF = 30
DEFAULT_KEYFRAME_INTERVAL = 16
DEFAULT_CHUNK_FRAMES = 128  # VP9 / MJPEG; frame storage: no chunks unless asked
NOMINAL_FPS = 30.0  # container frame rate when the source (a frame folder) has none


class MediaError(Exception):
    """An input that cannot be decoded (unreadable, truncated, empty).

    The builder skips the sample and records this message as the reason; every other exception
    is a bug or a missing file and stops the build.
    """


@dataclass(frozen=True)
class VideoCodec:
    """A stored video encoding: its name on the command line and its tar member extension."""

    name: str
    ext: str


VIDEO_CODECS: dict[str, VideoCodec] = {
    "frames": VideoCodec("frames", "jpgs"),
    "mjpeg": VideoCodec("mjpeg", "mkv"),
    "vp9": VideoCodec("vp9", "webm"),
}


@dataclass(frozen=True)
class EncodeOptions:
    """Everything that decides the stored bytes (part of a build's fingerprint)."""

    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    video_codec: str = DEFAULT_VIDEO_CODEC
    vp9_crf: int = DEFAULT_VP9_CRF
    keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL
    chunk_frames: int | None = None  # None: DEFAULT_CHUNK_FRAMES for VP9 / MJPEG, whole clips for frames
    # Clips: the fixed (y0, x0, y1, x1) cut of every frame stored instead of the whole frame — the
    # pre-training preset's data.video_source_crop for VoxCeleb2, so its loader reads 160 × 160.
    video_crop: tuple[int, int, int, int] | None = None
    face_crop: bool = False  # store the square around the face found (faces.py), not the input

    def __post_init__(self) -> None:
        if self.video_codec not in VIDEO_CODECS:
            raise ValueError(f"unknown video codec {self.video_codec!r}; "
                             f"one of {sorted(VIDEO_CODECS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.vp9_crf <= 63:
            raise ValueError(f"vp9_crf must be in 0..63, got {self.vp9_crf}")
        if self.keyframe_interval < 1 or (self.chunk_frames is not None and self.chunk_frames < 0):
            raise ValueError("keyframe_interval must be ≥ 1, chunk_frames ≥ 0 (0: no chunks)")
        if self.video_crop is not None:
            y0, x0, y1, x1 = self.video_crop
            if not (len(self.video_crop) == 4 and 0 <= y0 < y1 and 0 <= x0 < x1):
                raise ValueError(f"video_crop must be y0,x0,y1,x1 with y0 < y1 and x0 < x1, got {self.video_crop}")
            if self.face_crop:
                raise ValueError("video_crop and face_crop each choose the stored cut: give one")

    @property
    def chunk_length(self) -> int:
        """Frames per chunk (0: none): `chunk_frames`, or the codec's default when unset."""
        if self.chunk_frames is not None:
            return self.chunk_frames
        return 0 if self.video_codec == "frames" else DEFAULT_CHUNK_FRAMES


# --------------------------------------------------------------------------------------- images
def _open_rgb(source: str | bytes) -> Image.Image:
    """Fully decode an image (a lazy open would accept a truncated file)."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        name = "image bytes" if isinstance(source, bytes) else source
        raise MediaError(f"unreadable image {name}: {err}") from err
    return image


def load_image(path: str) -> np.ndarray:
    """Decode an image file (jpg/png/bmp ...) to RGB ``(H, W, 3)`` uint8; MediaError if broken."""
    return np.asarray(_open_rgb(path).convert("RGB"))


def encode_jpeg(rgb: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """RGB ``(H, W, 3)`` uint8 → baseline 4:2:0 JPEG, the layout nvJPEG decodes fastest."""
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "JPEG", quality=quality, subsampling="4:2:0")
    return out.getvalue()


def image_file_to_jpeg(path: str, quality: int = DEFAULT_JPEG_QUALITY
                       ) -> tuple[bytes, tuple[int, int]]:
    """The JPEG bytes to store for an image file, and its ``(height, width)``.

    An RGB JPEG source is stored unchanged (after checking it decodes); anything else is
    decoded and encoded at ``quality``.
    """
    image = _open_rgb(path)
    size = (image.height, image.width)
    if image.format == "JPEG" and image.mode == "RGB":
        with open(path, "rb") as f:
            return f.read(), size
    return encode_jpeg(np.asarray(image.convert("RGB")), quality), size


# --------------------------------------------------------------------------------------- videos
def stack_frames(frames: list[np.ndarray], source: str) -> tuple[np.ndarray, int]:
    """One array from frames; frames of another size are resized to the first one's.

    Video encoders need a constant frame size, and a face-crop tool may emit a stray frame of
    another size; resizing it keeps the clip (the count is kept in the sample's metadata).
    """
    if not frames:
        raise MediaError(f"no frames in {source}")
    height, width = frames[0].shape[:2]
    resized = 0
    for i, frame in enumerate(frames):
        if frame.shape[:2] != (height, width):
            frames[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))
            resized += 1
    return np.stack(frames), resized


def load_frames(paths: Sequence[str]) -> tuple[np.ndarray, int]:
    """Decode an ordered frame folder → ``(T, H, W, 3)`` uint8, the number of resized frames."""
    source = f"the frame folder of {paths[0]}" if paths else "an empty frame folder"
    return stack_frames([load_image(p) for p in paths], source)


def load_video(path: str) -> tuple[np.ndarray, float | None, int]:
    """Decode a video file → ``(T, H, W, 3)`` uint8, its frame rate, the number of resized frames.

    FFmpeg decodes what it can of a cut file without an error, so the frame count is checked
    against the one the container declares (`check_frame_count`).
    """
    clip, fps, resized, declared = decode_video(path)
    check_frame_count(path, len(clip), declared)
    return clip, fps, resized


def decode_video(path: str) -> tuple[np.ndarray, float | None, int, int]:
    """`load_video`'s frames, frame rate and resized count, and the frame count the container
    declares, without holding the frames to it; MediaError if unreadable or no frame decodes."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            declared = declared_frames(container, stream)
    except FileNotFoundError:
        raise
    except (av.FFmpegError, IndexError, ValueError) as err:
        raise MediaError(f"unreadable video {path}: {err}") from err
    if not frames:
        check_frame_count(path, 0, declared)
    clip, resized = stack_frames(frames, path)
    return clip, fps, resized, declared


def declared_frames(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    """The frame count a video's container declares (MP4), or its duration × frame rate
    (Matroska); 0 when it says neither. Read from the header, nothing decoded."""
    fps = float(stream.average_rate) if stream.average_rate else 0
    return stream.frames or round((container.duration or 0) / av.time_base * fps)


def missing_frames(decoded: int, declared: int) -> str | None:
    """"95 of 98 frames decode" when fewer frames decoded than declared, else None: decoders
    return what they can of a cut file without an error. One frame short is rounding."""
    return f"{decoded} of {declared} frames decode" if decoded < declared - 1 else None


def check_frame_count(path: str, decoded: int, declared: int) -> None:
    """MediaError if fewer frames decoded than declared (`missing_frames`)."""
    if missing := missing_frames(decoded, declared):
        raise MediaError(f"truncated video {path}: {missing}")


def chunk_bounds(n_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """Split ``n_frames`` into the fewest chunks of at most ``chunk_frames`` (0: one chunk).

    Chunks are of (nearly) equal length rather than full chunks plus a short tail, so that no
    chunk is too short to hold a training window.
    """
    count = 1 if chunk_frames == 0 else -(-n_frames // chunk_frames)
    edges = [round(i * n_frames / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _frame_rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _mux_mjpeg(container: av.container.OutputContainer, clip: np.ndarray, rate: Fraction,
               quality: int) -> None:
    # JPEG frames come from Pillow (the image path) and are muxed as packets: no re-encode.
    stream = container.add_stream("mjpeg", rate=rate)
    stream.height, stream.width = clip.shape[1:3]
    stream.pix_fmt = "yuvj420p"
    for i, frame in enumerate(clip):
        packet = av.Packet(encode_jpeg(frame, quality))
        packet.stream, packet.pts, packet.dts = stream, i, i
        packet.time_base = 1 / rate
        packet.is_keyframe = True
        container.mux(packet)


def _encode_vp9(container: av.container.OutputContainer, clip: np.ndarray, rate: Fraction,
                options: EncodeOptions) -> None:
    # threads=1: libvpx output is then byte-identical run to run (parallelism is across samples).
    # No alt-ref / lag: each packet is exactly one shown frame, so frame i is packet i.
    stream = container.add_stream("libvpx-vp9", rate=rate, options={
        "crf": str(options.vp9_crf), "b": "0", "g": str(options.keyframe_interval),
        "keyint_min": str(options.keyframe_interval), "deadline": "realtime", "cpu-used": "8",
        "threads": "1", "row-mt": "0", "lag-in-frames": "0", "auto-alt-ref": "0",
    })
    stream.height, stream.width = clip.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for frame in clip:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def encode_frames(clip: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> tuple[bytes, list[int]]:
    """``(T, H, W, 3)`` uint8 → the frames as concatenated JPEGs, and each frame's end offset."""
    frames = [encode_jpeg(frame, quality) for frame in clip]
    return b"".join(frames), np.cumsum([len(f) for f in frames]).tolist()


def frame_problem(data: bytes, ends: Sequence[int], frames: int) -> str | None:
    """What is wrong with stored frames (`data`, frame end offsets `ends`, `frames` expected),
    or None: the frame count, the offsets within the data, each frame's JPEG markers."""
    if len(ends) != frames:
        return f"{len(ends)} frames indexed, {frames} expected"
    start = 0
    for i, end in enumerate(ends):
        if not start < end <= len(data):
            return f"frame {i} at bytes {start}..{end} outside the {len(data)} stored"
        if data[start:start + 2] != JPEG_SOI or data[end - 2:end] != JPEG_EOI:
            return f"frame {i}: no JPEG start / end marker"
        start = end
    if start != len(data):
        return f"{len(data) - start} bytes after the last frame"
    return None


def encode_clip(clip: np.ndarray, fps: float, options: EncodeOptions = EncodeOptions()) -> bytes:
    """``(T, H, W, 3)`` uint8 → bytes of the container of ``options.video_codec``.

    ``+bitexact`` keeps the muxer from writing random UIDs and version strings, so the same
    clip always gives the same bytes.
    """
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
        raise ValueError(f"expected a non-empty (T, H, W, 3) uint8 clip, got {clip.dtype} "
                         f"{clip.shape}")
    codec = VIDEO_CODECS[options.video_codec]
    if codec.name == "frames":
        return encode_frames(clip, options.jpeg_quality)[0]
    out = io.BytesIO()
    with av.open(out, "w", format="matroska" if codec.ext == "mkv" else "webm",
                 container_options={"fflags": "+bitexact"}) as container:
        if codec.name == "mjpeg":
            _mux_mjpeg(container, clip, _frame_rate(fps), options.jpeg_quality)
        else:
            _encode_vp9(container, clip, _frame_rate(fps), options)
    return out.getvalue()


def decode_stored(data: bytes, codec: str, frame_ends: Sequence[int] | None = None) -> np.ndarray:
    """Stored media bytes → every frame, ``(T, H, W, 3)`` uint8 (T = 1 for an image), decoded
    in full; MediaError saying what fails. `codec` is the manifest's (``jpeg`` for images);
    frame storage needs its frame end offsets."""
    if codec == "jpeg":
        return np.asarray(_open_rgb(data).convert("RGB"))[None]
    if codec == "frames":
        starts = [0, *frame_ends[:-1]]
        return np.stack([np.asarray(_open_rgb(data[a:b]).convert("RGB")) for a, b in zip(starts, frame_ends)])
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.FFmpegError, IndexError, ValueError) as err:
        raise MediaError(f"undecodable clip: {err}") from err
    if not frames:
        raise MediaError("undecodable clip: no frame decodes")
    return np.stack(frames)
