"""Turning one SourceRecord into the samples stored for it (runs in the build's workers).

An image record gives one sample; a video record (a frame folder or a video file) gives one
sample per chunk. The sample's metadata is the record's own ``meta`` plus what the builder
knows (below); those keys are reserved (build.validate rejects records that use them).

Builder metadata: ``clip`` (the record key), ``path`` (the image / video file or the frame
folder), ``height``, ``width``; for videos also ``frames`` (in this chunk), ``chunk``,
``chunks``, ``frame_start``, ``frame_end`` (the chunk's range in the clip, end exclusive),
``clip_frames``, ``fps`` (the source's, null for frame folders), ``resized_frames``; for a
build with ``video_crop``, ``crop`` (the stored cut of the source frames); with
``--face-crop``, ``face_box`` (the square kept, [left, top, right, bottom] in the source's
pixels). ``height`` and ``width`` are those stored (after either cut).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import faces
from .media import (NOMINAL_FPS, EncodeOptions, MediaError, chunk_bounds, encode_clip, encode_frames,
                    encode_jpeg, frame_problem, image_file_to_jpeg, load_frames, load_image,
                    load_video)
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
                          "frame_start", "frame_end", "clip_frames", "fps", "resized_frames", "crop",
                          "face_box"})


def record_path(record: SourceRecord) -> str:
    """The input a record stands for: its file, or its frame folder ("" for an empty one)."""
    if record.media == "frames":
        return os.path.dirname(record.paths[0]) if record.paths else ""
    return record.paths[0]


def face_crop(clip: np.ndarray, source: str) -> tuple[np.ndarray, dict[str, list[int]]]:
    """The clip (T, H, W, 3) cut to the square around its face, and the builder meta saying
    where; MediaError (the input is skipped) when no frame shows a face."""
    box = faces.detector().box(clip)
    if box is None:
        raise MediaError(f"no face found in {source}")
    top, left, bottom, right = box
    return np.ascontiguousarray(clip[:, top:bottom, left:right]), {"face_box": faces.xyxy(box)}


def encode_record(record: SourceRecord, options: EncodeOptions) -> list[Sample]:
    """Decode a record's media and encode the samples to store (MediaError if unreadable, or
    without a face under `options.face_crop`)."""
    path = record_path(record)
    if record.media == "image":
        if options.face_crop:
            image, cropped = face_crop(load_image(path)[None], path)
            jpeg, (height, width) = encode_jpeg(image[0], options.jpeg_quality), image.shape[1:3]
        else:
            jpeg, (height, width) = image_file_to_jpeg(path, options.jpeg_quality)
            cropped = {}
        meta = {**record.meta, "clip": record.key, "path": path, "height": height,
                "width": width, **cropped}
        return [Sample(record.key, jpeg, record.label, meta)]

    if record.media == "frames":
        clip, resized = load_frames(record.paths)
        fps = None
    else:
        clip, fps, resized = load_video(record.paths[0])
    if options.video_crop is not None:
        y0, x0, y1, x1 = options.video_crop
        if clip.shape[1] < y1 or clip.shape[2] < x1:
            raise MediaError(f"{path}: {clip.shape[1]}×{clip.shape[2]} frames are smaller than "
                             f"the crop {list(options.video_crop)}")
        clip = clip[:, y0:y1, x0:x1]
    clip, cropped = face_crop(clip, path) if options.face_crop else (clip, {})
    bounds = chunk_bounds(len(clip), options.chunk_length)
    samples = []
    for chunk, (start, end) in enumerate(bounds):
        meta = {
            **record.meta, "clip": record.key, "path": path,
            "height": clip.shape[1], "width": clip.shape[2], **cropped,
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
