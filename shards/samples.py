"""Turning one SourceRecord into the samples stored for it (runs in the build's workers).

An image record gives one sample; a video record (a frame folder or a video file) gives one
sample per chunk. The sample's metadata is the record's own ``meta`` plus what the builder
knows (below); those keys are reserved (build.validate rejects records that use them).

Builder metadata: ``clip`` (the record key), ``path`` (the image / video file or the frame
folder), ``height``, ``width``; for videos also ``frames`` (in this chunk), ``chunk``,
``chunks``, ``frame_start``, ``frame_end`` (the chunk's range in the clip, end exclusive),
``clip_frames``, ``fps`` (the source's, null for frame folders), ``resized_frames`` and, for a
build with ``video_crop``, ``crop`` (the stored cut of the source frames).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .media import (NOMINAL_FPS, EncodeOptions, MediaError, chunk_bounds, encode_clip, encode_frames,
                    frame_problem, image_file_to_jpeg, load_frames, load_video)
from .sources.base import SourceRecord


@dataclass(frozen=True)
class Sample:
    """One tar sample: ``<key>.<ext>`` media bytes, ``<key>.label``, ``<key>.json``; for frame
    storage also each frame's end offset in `media` (the shard's frame index records them)."""

    key: str
    media: bytes
    label: int | None
    meta: dict[str, Any]
    frame_ends: tuple[int, ...] | None = None


def chunk_key(key: str, chunk: int, chunks: int) -> str:
    """The sample key of a chunk: the record key itself when the clip is not split."""
    return key if chunks == 1 else f"{key}__c{chunk:03d}"


BUILDER_META = frozenset({"clip", "path", "height", "width", "frames", "chunk", "chunks",
                          "frame_start", "frame_end", "clip_frames", "fps", "resized_frames", "crop"})


def record_path(record: SourceRecord) -> str:
    """The input a record stands for: its file, or its frame folder ("" for an empty one)."""
    if record.media == "frames":
        return os.path.dirname(record.paths[0]) if record.paths else ""
    return record.paths[0]


def encode_record(record: SourceRecord, options: EncodeOptions) -> list[Sample]:
    """Decode a record's media and encode the samples to store (MediaError if unreadable)."""
    if record.media == "image":
        jpeg, (height, width) = image_file_to_jpeg(record.paths[0], options.jpeg_quality)
        meta = {**record.meta, "clip": record.key, "path": record_path(record),
                "height": height, "width": width}
        return [Sample(record.key, jpeg, record.label, meta)]

    if record.media == "frames":
        clip, resized = load_frames(record.paths)
        fps = None
    else:
        clip, fps, resized = load_video(record.paths[0])
    if options.video_crop is not None:
        y0, x0, y1, x1 = options.video_crop
        if clip.shape[1] < y1 or clip.shape[2] < x1:
            raise MediaError(f"{record_path(record)}: {clip.shape[1]}×{clip.shape[2]} frames are smaller than "
                             f"the crop {list(options.video_crop)}")
        clip = clip[:, y0:y1, x0:x1]
    bounds = chunk_bounds(len(clip), options.chunk_length)
    samples = []
    for chunk, (start, end) in enumerate(bounds):
        meta = {
            **record.meta, "clip": record.key, "path": record_path(record),
            "height": clip.shape[1], "width": clip.shape[2],
            "frames": end - start, "chunk": chunk, "chunks": len(bounds), "frame_start": start,
            "frame_end": end, "clip_frames": len(clip), "fps": fps, "resized_frames": resized,
            **({"crop": list(options.video_crop)} if options.video_crop else {}),
        }
        key = chunk_key(record.key, chunk, len(bounds))
        if options.video_codec == "frames":
            media, ends = encode_frames(clip[start:end], options.jpeg_quality)
            problem = frame_problem(media, ends, end - start)
            if problem:  # the encoder's output is checked once, here, not in training
                raise RuntimeError(f"{key}: encoded frames fail their check: {problem}")
            samples.append(Sample(key, media, record.label, meta, tuple(ends)))
            continue
        media = encode_clip(clip[start:end], fps or NOMINAL_FPS, options)
        samples.append(Sample(key, media, record.label, meta))
    return samples
