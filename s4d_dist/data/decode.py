"""Decoding stored media in Python: the torch fallback's decoder, and the ground truth that
tells a corrupt sample from a bug.

MJPEG clips are demuxed with PyAV and their frames decoded with Pillow (libjpeg), like the
images: PyAV's own MJPEG path converts YUV to RGB through swscale, whose chroma upsampling
differs from libjpeg's by up to ~50 levels at colour edges, and DALI (both backends) decodes
MJPEG frames as libjpeg does. VP9 clips go through shards.media.decode_clip.
"""
from __future__ import annotations

import io
import math
from functools import reduce

import av
import numpy as np

from s4d_dist.shards.media import MediaError, decode_clip, decode_jpeg


_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_EOI_WINDOW = 4096  # encoders may pad after the end-of-image marker; truncation removes it


class CorruptSample(Exception):
    """A stored sample that cannot be decoded; the message is the reason."""


def check_jpeg(data: bytes) -> None:
    """Start-of-image marker first, end-of-image marker near the end (corrupt.py says why)."""
    if not data.startswith(_SOI):
        raise CorruptSample("bad JPEG: no start-of-image marker")
    if data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW)) < 0:
        raise CorruptSample("truncated JPEG: no end-of-image marker")


def demux(data: bytes) -> tuple[str, list[bytes]]:
    """(codec name, the packets of the clip's video stream in order), without decoding."""
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            return stream.codec_context.name, [bytes(p) for p in container.demux(stream) if p.size]
    except (av.FFmpegError, IndexError) as err:  # IndexError: no video stream
        raise CorruptSample(f"unreadable clip: {err}") from None


def decode_image(data: bytes) -> np.ndarray:
    """JPEG bytes → (H, W, 3) uint8."""
    check_jpeg(data)
    try:
        return decode_jpeg(data)
    except MediaError as err:
        raise CorruptSample(f"undecodable image: {err}") from None


def decode_frames(data: bytes, indices: np.ndarray) -> np.ndarray:
    """Frames `indices` (any order, repeats allowed) of a stored clip → (T, H, W, 3) uint8.

    MJPEG decodes exactly the distinct wanted frames. Other codecs decode the arithmetic
    progression that covers the wanted frames with the largest common step (exactly the wanted
    frames on the pre-training and test grids; the whole window for the fine-tuning linspace).
    """
    wanted = np.unique(indices)
    codec, packets = demux(data)
    if len(packets) <= wanted[-1]:
        raise CorruptSample(f"truncated clip: {len(packets)} frames, frame {int(wanted[-1])} wanted")
    if codec == "mjpeg":
        decoded = {int(i): decode_image(packets[i]) for i in wanted}
        return np.stack([decoded[int(i)] for i in indices])
    step = int(reduce(math.gcd, np.diff(wanted).tolist(), 0)) or 1
    start = int(wanted[0])
    try:
        frames = decode_clip(data, start, (int(wanted[-1]) - start) // step + 1, step)
    except MediaError as err:
        raise CorruptSample(f"undecodable clip: {err}") from None
    return frames[(np.asarray(indices) - start) // step]
