"""Tiny synthetic shard datasets and configs for the data-plane tests (built once per module).

Images 32 px (21 train / 7 test); clips 32 px × 8 frames in a 3-part k-fold dataset (14 / 14 / 7
clips, MJPEG: DALI and Pillow both decode it with libjpeg, so the backends can be compared
pixel for pixel); clips of 12 frames stored in chunks of 6 (VP9, whose YUV→RGB conversion
differs by a few levels between DALI and PyAV); the k-fold clips again in frame storage (the
default), which both backends decode and augment with the same code. Small shard sizes, so every
split spans several tars, as real datasets do.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from s4d_dist import config
from s4d_dist.data.catalog import open_catalog, shard_paths
from s4d_dist.shards.synthetic import build_synthetic


def build_all(root: Path) -> dict[str, Path]:
    paths = {"image": root / "image", "video": root / "video", "chunked": root / "chunked", "frames": root / "frames"}
    build_synthetic(paths["image"], "image", {"train": 3, "test": 1}, size=32, shard_bytes=24_000)
    build_synthetic(paths["video"], "video", {"part1": 2, "part2": 2, "part3": 1}, size=32, frames=8,
                    folds=True, shard_bytes=60_000, video_codec="mjpeg")
    build_synthetic(paths["chunked"], "video", {"train": 1}, size=32, frames=12, chunk_frames=6, video_codec="vp9")
    build_synthetic(paths["frames"], "video", {"part1": 2, "part2": 2, "part3": 1}, size=32, frames=8,
                    folds=True, shard_bytes=60_000)
    return paths


def make_cfg(paths: dict[str, Path], task: str, *overrides: str):
    """The demo preset at test sizes: 32 px in 16 px patches, 4 frames at stride 2, the paper's
    mask ratios, tiny batches, no workers."""
    return config.load("demo", [
        f"task={task}", f"data.image_shards={paths['image'] / 'train'}", f"data.video_shards={paths['video']}",
        "data.fold=1", "model.img_size=32", "model.patch=16", "model.num_frames=4", "data.sampling_rate=2",
        "mask.image_ratio=0.9", "mask.video_ratio=0.95",
        "data.image_batch_size=4", "data.video_batch_size=4", "data.video_repeats=2", "data.eval_batch_size=6",
        "data.workers=0", "data.video_rate=1.0", "data.image_rate=1.0", "data.val_fraction=0", *overrides])


def corrupt_copy(src: Path, dst: Path, split: str, samples: dict[int, str]) -> dict[int, str]:
    """Copy a dataset and damage the media of some samples of `split` in place (sizes and
    indices unchanged): "truncate" zeroes the tail (no end marker), "header" zeroes the bytes
    after the JPEG start marker (passes the structural check, fails to decode). Returns the
    damaged samples' keys."""
    shutil.copytree(src, dst)
    catalog = open_catalog(shard_paths(str(dst), split))
    keys = {}
    for index, how in samples.items():
        offset, size = catalog.members.media[index]
        tar = catalog.tars[int(catalog.members.shard[index])]
        with open(tar, "r+b") as f:
            if how == "truncate":
                f.seek(int(offset + size) - size // 3)
                f.write(bytes(size // 3))
            else:
                f.seek(int(offset) + 2)
                f.write(bytes(64))
        keys[index] = catalog.keys[index]
    return keys


def builder_label(key: str) -> int:
    """The label the synthetic builder gave a sample, from its key alone (an oracle independent of
    the shards' label field): keys are "{modality}_{split}_{index:07d}" and labels cycle through
    the 7 AffectNet classes (s4d_dist.shards.synthetic_faces.render_sample)."""
    return int(key.rsplit("_", 1)[1]) % 7


def gather_indices(batches: list[dict]) -> np.ndarray:
    return np.concatenate([b["index"].numpy() for b in batches])


def resume_after(loader, epoch: int, consumed: int) -> tuple[dict, list[dict]]:
    """Take `consumed` batches of an epoch, abandon it (prefetched batches dropped), and return
    its state and every batch a fresh iterator resumed from that state yields."""
    first = loader.epoch(epoch)
    iterator = iter(first)
    for _ in range(consumed):
        next(iterator)
    state = first.state_dict()
    iterator.close()
    resumed = loader.epoch(epoch)
    resumed.load_state_dict(state)
    rest = list(resumed)
    loader.close()
    return state, rest
