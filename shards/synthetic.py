"""Synthetic shard datasets (the faces of `synthetic_faces.py`) built exactly like real ones.

The tests, the demo and the benchmarks need shards, and no face dataset can be downloaded
here. Rather than writing tars by a second route, the faces are rendered to an ordinary raw
dataset on disk — PNG images, or one folder of PNG frames per clip (lossless, so the only
encoding is the builder's) — and `build_dataset` converts it like any reader's output: same
writer, layout, manifests, DALI indices, chunking, resumption and fingerprints.

`read_synthetic` is also a dataset reader, so that once it is registered as
`READERS["synthetic"]` (shards/sources/registry.py),
`python -m s4d_dist.shards synthetic --root RAW --out O --modality video --splits train=8,test=2`
works (RAW receives the rendered raw files); `build_synthetic` is the one-call Python API.
Everything is deterministic: sample i of a split is a pure function of (seed, split, modality,
i), whatever the number of workers.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

from PIL import Image

from .build import BuildOptions, SplitSummary, build_dataset
from .synthetic_faces import AFFECTNET7, SyntheticSpec, render_sample
from .media import DEFAULT_VIDEO_CODEC, EncodeOptions
from .sources.base import DatasetSource, SourceRecord
from .sources.options import as_choice, as_int

RAW_FOLDER = ".raw"  # under `out` while build_synthetic runs; removed after a successful build
_META_DROPPED = ("frames", "fps")  # the builder records these itself (frames per chunk, fps)


def parse_splits(text: str) -> dict[str, int]:
    """"train=8,test=2" → {"train": 8, "test": 2} (samples per class)."""
    splits = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        if not name or not count.isdigit():
            raise ValueError(f"splits must look like train=8,test=2; got {text!r}")
        splits[name.strip()] = int(count)
    return splits


def _render(job: tuple[SyntheticSpec, str, str, int, str]) -> SourceRecord:
    """Render one sample into `folder` and describe it as a source record."""
    spec, modality, split, index, folder = job
    key, label, array, meta = render_sample(spec, modality, split, index)
    meta = {k: v for k, v in meta.items() if k not in _META_DROPPED}
    if modality == "video":
        meta["clip_fps"] = spec.fps
    if modality == "image":
        path = os.path.join(folder, f"{key}.png")
        Image.fromarray(array).save(path, compress_level=1)
        return SourceRecord(key, label, "image", (path,), meta)
    clip_dir = os.path.join(folder, key)
    os.makedirs(clip_dir, exist_ok=True)
    paths = []
    for t, frame in enumerate(array):
        paths.append(os.path.join(clip_dir, f"{t:05d}.png"))
        Image.fromarray(frame).save(paths[-1], compress_level=1)
    return SourceRecord(key, label, "frames", tuple(paths), meta)


def read_synthetic(root: str, *, modality: str = "image", splits: str | dict[str, int] = "train=8,test=2",
                   folds: bool | str = False, size: int | str = 64, frames: int | str = 16, seed: int | str = 0,
                   render_workers: int | str = 1, framing: str = "scene") -> DatasetSource:
    """Render a synthetic dataset under `root` and return it as a DatasetSource.

    Options:
        modality: image | video.
        splits:   "name=samples_per_class,..." (default train=8,test=2).
        folds:    true: the splits are the disjoint parts of a k-fold dataset (DFEW-style), fold k
                  tests on the k-th split and trains on the others.
    Options arrive as strings from the command line and are coerced here.
        size, frames, seed: image side, frames per clip, base seed.
        render_workers: rendering processes (the CLI's --workers are the encoders).
        framing: scene (a face anywhere in a picture) | aligned (face crops, like real datasets).
    """
    framing = as_choice(framing, "framing", ("scene", "aligned"))
    modality = as_choice(modality, "modality", ("image", "video"))
    size, frames, seed = as_int(size, "size"), as_int(frames, "frames"), as_int(seed, "seed")
    render_workers = as_int(render_workers, "render_workers")
    if isinstance(folds, str):  # from the command line
        folds = as_choice(folds.lower(), "folds", ("true", "false", "1", "0")) in ("true", "1")
    counts = parse_splits(splits) if isinstance(splits, str) else dict(splits)
    jobs = []
    for split, per_class in counts.items():
        spec = SyntheticSpec(samples_per_class=per_class, size=size, frames=frames, seed=seed,
                             framing=framing)
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        jobs += [(spec, modality, split, i, folder) for i in range(spec.num_samples)]
    if render_workers > 1:
        with multiprocessing.get_context("spawn").Pool(render_workers) as pool:
            records = pool.map(_render, jobs, chunksize=4)
    else:
        records = [_render(job) for job in jobs]
    by_split: dict[str, list[SourceRecord]] = {split: [] for split in counts}
    for job, record in zip(jobs, records):
        by_split[job[2]].append(record)
    names = list(counts)
    fold_map = None
    if folds:
        fold_map = {k + 1: {"train": [n for n in names if n != part], "test": [part]} for k, part in enumerate(names)}
    return DatasetSource(f"synthetic-{modality}", modality, list(AFFECTNET7), by_split, fold_map)


def build_synthetic(out: str | os.PathLike, modality: str, splits: dict[str, int] | None = None, size: int = 64,
                    frames: int = 16, seed: int = 0, workers: int = 1, folds: bool = False,
                    video_codec: str = DEFAULT_VIDEO_CODEC, chunk_frames: int | None = None,
                    shard_bytes: int = 1 << 20, framing: str = "scene") -> list[SplitSummary]:
    """Render and build a synthetic dataset into `out` (dataset.json, one folder per split).

    `splits` maps split names to samples per class (default {"train": 8, "test": 2}); small
    `shard_bytes` (1 MiB) gives tiny datasets several shards, as real ones have.
    """
    raw = Path(out) / RAW_FOLDER
    source = read_synthetic(str(raw), modality=modality, splits=splits or {"train": 8, "test": 2}, folds=folds,
                            size=size, frames=frames, seed=seed, render_workers=workers,
                            framing=framing)
    options = BuildOptions(EncodeOptions(video_codec=video_codec, chunk_frames=chunk_frames), shard_bytes, workers)
    summaries = build_dataset(source, out, options, progress=False)
    shutil.rmtree(raw)
    return summaries
