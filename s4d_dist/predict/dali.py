"""Decoding a chunk of inputs with NVIDIA DALI (`--decoder dali`), the Python decoder
(Pillow / PyAV, inputs.decode) standing in for whatever DALI cannot decode.

The encoded files of a chunk go through one pipeline per stream kind, a batch at a time: image
files and the frames of frame folders through `fn.decoders.image` (nvJPEG on a GPU, libjpeg-turbo
and friends on the CPU), video files through `fn.decoders.video` (NVDEC on a GPU, FFmpeg on the
CPU). The frames come back as uint8 (T, H, W, 3) host arrays, so cropping and views are the
same code for both decoders.

An input DALI cannot decode is handed back as None and decoded in Python, which scores it or
reports why it cannot: the output is then the Python decoder's, error message included. Known
in advance, without a DALI run: an unlistable or missing file (the Python decoder words the
error), and on the CPU a video codec other than VP8 / VP9 / MJPEG (DALI's CPU decoder has no
other). Found by running: one undecodable sample fails a DALI batch as a whole (and the
pipeline object with it, data/dali_backend.py), so a failed batch is rebuilt and decoded again
one input at a time, and only the inputs that fail alone go to Python — corrupt bytes, an
unsupported image format (GIF), a clip below NVDEC's minimum frame size. A video whose container
declares more frames than DALI decoded (a cut file, which FFmpeg decodes without an error) also
goes to Python, which scores the frames that decode and says how many in a warning.

`auto` picks DALI only when the model runs on a GPU: there nvJPEG and NVDEC take the decoding
off the CPU cores that feed the model. On the CPU, DALI's decoders are the libraries Pillow and
PyAV use (libjpeg-turbo, libpng, FFmpeg). Measured on this shared 2-core machine (one chunk,
median of 5; `DaliDecoder(cpu)` against `inputs.decode` on 2 threads): 32 JPEG faces at 224 px
14 vs 17 ms, 32 PNG 52 vs 61 ms, 8 VP9 clips of 64 frames at 160 px 283 vs 504 ms (PyAV's
swscale RGB conversion is the difference). That saves a few to 30 ms per input, where the
model (finetune_base, ViT-B) takes 4.2 s per 16-frame view of a clip on the same cores, and the
videos users bring are mostly H.264, which DALI's CPU decoder cannot read; so `auto` keeps
Python on the CPU, and `--decoder dali` is there for whoever wants the 1.2-1.8× on decoding.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types

from s4d_dist.shards.media import declared_frames, missing_frames, stack_frames
from s4d_dist.shards.sources.files import IMAGE_EXTENSIONS, Unusable, check_file, list_frames

from .inputs import Decoded, Input

CPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg")  # DALI's CPU video decoder; NVDEC decodes more
Stream = Literal["image", "video"]


@dataclass
class _Encoded:
    """An input's encoded files, all of one stream kind, and a video's declared frame count
    and rate."""

    stream: Stream
    files: list[np.ndarray]
    declared: int = 0
    fps: float | None = None


class DaliDecoder:
    """Decodes lists of inputs with DALI on the model's GPU ("mixed") or on the CPU."""

    def __init__(self, device: torch.device, batch_size: int, threads: int) -> None:
        gpu = device.type == "cuda"
        self.decode_device = "mixed" if gpu else "cpu"
        self.device_id = (device.index if device.index is not None
                          else torch.cuda.current_device()) if gpu else None
        self.batch_size, self.threads = batch_size, max(threads, 1)
        self.pipes: dict[Stream, Pipeline] = {}  # built on first use, in the decoding thread

    def __call__(self, items: list[Input]) -> list[Decoded | None]:
        """Each input decoded, or None where Python must decode it."""
        encoded = [self._encoded(item) for item in items]
        decoded: dict[Stream, Iterator[np.ndarray | None]] = {}
        for stream in ("image", "video"):
            files = [f for e in encoded if e is not None and e.stream == stream for f in e.files]
            decoded[stream] = iter(self._decode(stream, files))
        return [None if e is None else self._assemble(item, e, decoded[e.stream])
                for item, e in zip(items, encoded)]

    def _encoded(self, item: Input) -> _Encoded | None:
        """The bytes to decode; None for an input DALI will not be given (see the docstring)."""
        try:
            if item.kind == "frames":
                paths = list_frames(item.path, IMAGE_EXTENSIONS)
                return _Encoded("image", [np.fromfile(p, np.uint8) for p in paths])
            check_file(item.path)
            if item.kind == "image":
                return _Encoded("image", [np.fromfile(item.path, np.uint8)])
            with av.open(item.path) as container:  # the header only
                stream = container.streams.video[0]
                codec, declared = stream.codec_context.name, declared_frames(container, stream)
                fps = float(stream.average_rate) if stream.average_rate else None
        except (Unusable, OSError, av.FFmpegError, IndexError):
            return None
        if self.decode_device == "cpu" and codec not in CPU_VIDEO_CODECS:
            return None
        return _Encoded("video", [np.fromfile(item.path, np.uint8)], declared, fps)

    @staticmethod
    def _assemble(item: Input, encoded: _Encoded, decoded: Iterator[np.ndarray | None]
                  ) -> Decoded | None:
        frames = [next(decoded) for _ in encoded.files]
        if any(f is None for f in frames):
            return None
        if item.kind == "image":
            return Decoded(frames[0][None])
        if item.kind == "frames":
            return Decoded(stack_frames(frames, item.path)[0])
        if missing_frames(len(frames[0]), encoded.declared):
            return None
        return Decoded(frames[0], encoded.fps)

    def _decode(self, stream: Stream, files: list[np.ndarray]) -> list[np.ndarray | None]:
        return [frames for start in range(0, len(files), self.batch_size)
                for frames in self._run(stream, files[start:start + self.batch_size])]

    def _run(self, stream: Stream, batch: list[np.ndarray]) -> list[np.ndarray | None]:
        """One pipeline run; after a failure, each file alone (None: it fails alone too)."""
        if not batch:
            return []
        pipe = self.pipes.get(stream) or self._build(stream)
        try:
            pipe.feed_input("encoded", batch)
            (out,) = pipe.run()
        except RuntimeError:
            self.pipes.pop(stream, None)  # a pipeline that failed is no longer valid
            if len(batch) == 1:
                return [None]
            return [frames for file in batch for frames in self._run(stream, [file])]
        out = out.as_cpu() if self.decode_device == "mixed" else out
        return [np.array(out[i]) for i in range(len(batch))]

    def _build(self, stream: Stream) -> Pipeline:
        device = self.decode_device

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device_id, prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            if stream == "video":
                return fn.decoders.video(encoded, device=device)
            # EXIF orientation is ignored, as by Pillow in the Python decoder and the shards
            return fn.decoders.image(encoded, device=device, output_type=types.RGB,
                                     adjust_orientation=False)

        pipe = pipeline()
        pipe.build()
        self.pipes[stream] = pipe
        return pipe
