"""Stored media → pixels in Python, and how a corrupt sample is recognised and counted.

The torch fallback decodes here; DALI decodes in its own graph but uses this module for the
structural check it needs before it sees any bytes, and to find the culprit when a batch fails
inside DALI anyway (dali_backend.py). Decoding here is the ground truth that tells a corrupt
sample from a bug. Frame storage (shards/media.py) is read here too: a window's frames alone
(`read_window`), whose structure the builder checked and the frame index records, so only
their JPEG markers are looked at again.

Corrupt samples: the builder only stores media that decoded, but bytes can still rot afterwards
(a truncated copy, a bad disk block). Such a sample is never allowed to stop or hang training:
the loaders skip it, fill its slot (plan.py: training with another sample, evaluation marked
invalid) and record it here. Rules of the house: skipped and counted, never silent. Two levels,
because DALI cannot skip (one undecodable sample fails a DALI pipeline as a whole):
- the structural check is cheap (JPEG start/end markers; for clips, the frame count and every
  MJPEG frame's markers from one demux): it catches truncation, the usual corruption, including
  a zeroed tail that a lenient JPEG decoder would turn into a grey image without complaint;
- full decoding is the rest: `decoded` (the torch fallback's load) runs the structural check on
  the same demux that feeds the decoder, so a clip is demuxed once.

MJPEG clips are demuxed with PyAV and their frames decoded with Pillow (libjpeg), like the
images: PyAV's own MJPEG path converts YUV to RGB through swscale, whose chroma upsampling
differs from libjpeg's by up to ~50 levels at colour edges, and DALI (both devices) decodes
MJPEG frames as libjpeg does. VP9 frames are decoded by PyAV from the same packets.
"""
from __future__ import annotations

import bisect
import contextlib
import io
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import reduce

import av
import numpy as np
import torch
from PIL import Image

from .catalog import Catalog, RawSample
from .recipes import SampleParams

MAX_EXAMPLES = 20
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_EOI_WINDOW = 4096  # encoders may pad after the end-of-image marker; truncation removes it


class CorruptSample(Exception):
    """A stored sample that cannot be decoded; the message is the reason."""


@dataclass(frozen=True)
class CorruptEvent:
    """One corrupt sample: where it is and why it was skipped."""

    index: int
    where: str
    reason: str


@dataclass
class CorruptionLog:
    """How many corrupt samples the loaders met (each sample counted once), grouped by
    reason, with the first few named. The trainer reads `count` / `summary()` to log them."""

    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list[CorruptEvent] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)

    def record(self, event: CorruptEvent) -> None:
        if event.index in self.seen:
            return
        self.seen.add(event.index)
        self.count += 1
        self.by_reason[event.reason.split(":")[0]] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(event)

    def summary(self) -> str:
        if not self.count:
            return "no corrupt samples"
        reasons = ", ".join(f"{n}× {reason}" for reason, n in self.by_reason.most_common())
        first = "; ".join(f"{e.where} ({e.reason})" for e in self.examples[:3])
        return f"{self.count} corrupt samples skipped: {reasons}; first: {first}"


# ---- checks ------------------------------------------------------------------------------

def check_jpeg(data: bytes) -> None:
    """Start-of-image marker first, end-of-image marker near the end."""
    if not data.startswith(_SOI):
        raise CorruptSample("bad JPEG: no start-of-image marker")
    if data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW)) < 0:
        raise CorruptSample("truncated JPEG: no end-of-image marker")


@dataclass
class Clip:
    """A demuxed clip: its codec, its video packets in order, and the stream's decoder."""

    codec: str
    packets: list[av.Packet]
    decoder: av.CodecContext


@contextlib.contextmanager
def demuxed(data: bytes) -> Iterator[Clip]:
    """The clip's packets (one per shown frame, as the shard builder encodes them), with its
    container open for decoding them."""
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # frame i out for packet i
            packets = [p for p in container.demux(stream) if p.size]
            yield Clip(stream.codec_context.name, packets, stream.codec_context)
    except (av.FFmpegError, IndexError) as err:  # IndexError: no video stream
        raise CorruptSample(f"unreadable clip: {err}") from None


def _check_clip(clip: Clip, frames_needed: int) -> None:
    if len(clip.packets) < frames_needed:
        raise CorruptSample(f"truncated clip: {len(clip.packets)} frames, needs {frames_needed}")
    if clip.codec == "mjpeg":
        for packet in clip.packets:
            check_jpeg(bytes(packet))


def check_sample(raw: RawSample, modality: str) -> None:
    """The structural check of one stored sample (a clip: one demux, no decoding, about a
    millisecond)."""
    if modality == "image":
        check_jpeg(raw.media)
    else:
        with demuxed(raw.media) as clip:
            _check_clip(clip, int(raw.meta["frames"]))


class MediaCheck:
    """`check_sample` run once per sample per process (a clip check demuxes; repeating it every
    epoch would be wasted): DALI's load before it sees the bytes."""

    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.passed: set[int] = set()

    def __call__(self, raw: RawSample) -> None:
        if raw.index not in self.passed:
            check_sample(raw, self.modality)
            self.passed.add(raw.index)


# ---- decoding ----------------------------------------------------------------------------

def decode_image(data: bytes) -> np.ndarray:
    """JPEG bytes → (H, W, 3) uint8, fully decoded (a lazy open would accept a truncated file)."""
    check_jpeg(data)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptSample(f"undecodable image: {err}") from None


def _decode_packets(clip: Clip, wanted: range) -> np.ndarray:
    """Frames `wanted` (an increasing progression) of a non-MJPEG clip: each reached from the
    last keyframe at or before it, or from the frame just decoded if that is closer, so a window
    costs at most a keyframe interval more per frame."""
    packets = clip.packets
    keyframes = [i for i, p in enumerate(packets) if p.is_keyframe or i == 0]
    frames, fed = [], -1
    try:
        for index in wanted:
            keyframe = keyframes[bisect.bisect_right(keyframes, index) - 1]
            for i in range(max(keyframe, fed + 1), index + 1):
                decoded = clip.decoder.decode(packets[i])
                if len(decoded) != 1:
                    raise CorruptSample(f"undecodable clip: packet {i} gave {len(decoded)} frames, expected 1")
                fed = i
            frames.append(decoded[0].to_ndarray(format="rgb24"))
    except av.FFmpegError as err:
        raise CorruptSample(f"undecodable clip: {err}") from None
    return np.stack(frames)


def decode_clip(data: bytes, start: int = 0, count: int | None = None, stride: int = 1) -> np.ndarray:
    """Frames ``start, start+stride, ...`` (at most ``count``) of a stored clip, every codec
    decoded by PyAV (MJPEG included: the codec benchmark and the shard tests read clips as a
    plain PyAV reader would)."""
    with demuxed(data) as clip:
        wanted = range(start, len(clip.packets), stride)[:count]
        if not wanted:
            raise CorruptSample(f"truncated clip: no frame {start} in a clip of {len(clip.packets)} frames")
        return _decode_packets(clip, wanted)


def decode_frames(data: bytes, indices: np.ndarray, frames_needed: int = 0) -> np.ndarray:
    """Frames `indices` (any order, repeats allowed) of a stored clip → (T, H, W, 3) uint8,
    after the structural check against `frames_needed` (0: only the frames wanted), from one
    demux.

    MJPEG decodes exactly the distinct wanted frames. Other codecs decode the arithmetic
    progression that covers the wanted frames with the largest common step (exactly the wanted
    frames on the pre-training and test grids; the whole window for the fine-tuning linspace).
    """
    wanted = np.unique(indices)
    with demuxed(data) as clip:
        _check_clip(clip, frames_needed)
        if len(clip.packets) <= wanted[-1]:
            raise CorruptSample(f"truncated clip: {len(clip.packets)} frames, frame {int(wanted[-1])} wanted")
        if clip.codec == "mjpeg":
            decoded = {int(i): decode_image(bytes(clip.packets[i])) for i in wanted}
            return np.stack([decoded[int(i)] for i in indices])
        step = int(reduce(math.gcd, np.diff(wanted).tolist(), 0)) or 1
        start = int(wanted[0])
        frames = _decode_packets(clip, range(start, int(wanted[-1]) + 1, step))
    return frames[(np.asarray(indices) - start) // step]


def decoded(raw: RawSample, params: SampleParams) -> torch.Tensor:
    """The torch fallback's load: what the sample's parameters need, checked and decoded, as
    uint8 (F, H, W, 3), F = 1 for images."""
    if params.frames is None:
        return torch.from_numpy(decode_image(raw.media)[None].copy())
    return torch.from_numpy(decode_frames(raw.media, params.frames, int(raw.meta["frames"])).copy())


def read_raw(catalog: Catalog, index: int) -> RawSample:
    """All members of a sample; a JSON member that does not parse makes it corrupt."""
    try:
        return catalog.read(index)
    except ValueError as err:
        raise CorruptSample(f"unreadable metadata: {err}") from None


@dataclass(frozen=True)
class Window:
    """The frames a frame-storage sample's window uses: each distinct frame's JPEG bytes once,
    and for every frame of the window which of them it is."""

    jpegs: list  # bytes, or uint8 arrays viewing a shard
    order: np.ndarray  # (T,) int64 into jpegs


def read_window(catalog: Catalog, index: int, frames: np.ndarray) -> Window:
    """The window `frames` of a frame-storage sample, read frame by frame at the offsets of the
    frame index; a frame whose bytes lost a JPEG marker since the build (a truncated or
    overwritten copy) makes the sample corrupt."""
    distinct, order = np.unique(frames, return_inverse=True)
    if distinct[-1] >= catalog.members.table[index, 0]:
        raise CorruptSample(f"truncated clip: {int(catalog.members.table[index, 0])} frames, frame "
                            f"{int(distinct[-1])} wanted")
    try:
        jpegs = catalog.read_frames(index, distinct)
    except OSError as err:
        raise CorruptSample(f"unreadable frame: {err}") from None
    for i, jpeg in zip(distinct.tolist(), jpegs):
        if not jpeg.startswith(_SOI) or not jpeg.endswith(_EOI):
            raise CorruptSample(f"truncated JPEG: frame {i} lost its start / end marker")
    return Window(jpegs, order.reshape(-1))


def read_windows(catalog: Catalog, samples: np.ndarray, frames: np.ndarray) -> list[Window | CorruptSample]:
    """`read_window` for a batch at once: window `frames[i]` (non-decreasing, as every recipe
    draws them) of sample `samples[i]`, the frames' bytes as views of the shards (see
    Catalog.frame_bytes), the checks vectorised; a CorruptSample in place of a window that
    cannot be read."""
    count = catalog.members.table[samples, 0]
    keep = np.ones(frames.shape, bool)
    keep[:, 1:] = frames[:, 1:] != frames[:, :-1]
    order = np.cumsum(keep, axis=1) - 1
    beyond = frames[:, -1] >= count
    wanted = keep & ~beyond[:, None]
    row = np.broadcast_to(np.arange(len(samples))[:, None], frames.shape)[wanted]
    views, ok = catalog.frame_bytes(samples[row], frames[wanted])
    counts = np.where(beyond, 0, order[:, -1] + 1)
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    whole = np.logical_and.reduceat(ok, np.minimum(firsts, max(len(ok) - 1, 0))) if len(ok) else ok
    out: list[Window | CorruptSample] = []
    for i, (first, n) in enumerate(zip(firsts.tolist(), counts.tolist())):
        if beyond[i]:
            out.append(CorruptSample(f"truncated clip: {int(count[i])} frames, frame {int(frames[i, -1])} wanted"))
        elif n and not whole[i]:
            frame = int(frames[i][keep[i]][int(np.argmin(ok[first:first + n]))])
            out.append(CorruptSample(f"truncated JPEG: frame {frame} lost its start / end marker"))
        else:
            out.append(Window(views[first:first + n], order[i]))
    return out


def decode_window(window: Window) -> torch.Tensor:
    """A window's frames decoded with Pillow → uint8 (T, H, W, 3)."""
    frames = np.stack([decode_image(bytes(jpeg)) for jpeg in window.jpegs])
    return torch.from_numpy(frames[window.order])
