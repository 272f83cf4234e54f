"""Where a built dataset keeps what, and how training finds a split's or a fold's shards.

    <out>/dataset.json                dataset, modality, class names, splits, folds, reader skips
    <out>/<split>/manifest.json       counts, build options, skipped samples, finished shards
    <out>/<split>/shard-%06d.tar      WebDataset samples
    <out>/<split>/shard-%06d.idx      DALI index of that tar

Each sample is stored as the tar members ``<key>.<media ext>``, ``<key>.label`` (labelled
datasets only: the class index, int32 little-endian) and ``<key>.json`` (its metadata), in that
order; the index lists every member's offset and size.

A k-fold dataset (DFEW, MAFW) is stored once, as its disjoint parts; a fold's train set is the
union of the parts ``dataset.json`` lists for it, so nothing is copied per fold.
This module is the shard format both sides share: the builders write it, the loaders
(s4d_dist.data) read it. It reads only JSON: training code imports it without the encoders.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
MANIFEST_JSON = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_VERSION = "v1.2"  # the format of DALI's wds2idx, the first line of each .idx
LABEL_MEMBER = "label"
META_MEMBER = "json"
LABEL_STRUCT = "<i"  # struct format of the label member


def member_exts(media_ext: str, labelled: bool) -> list[str]:
    """A sample's member extensions, in the order they are written and indexed."""
    return [media_ext, LABEL_MEMBER, META_MEMBER] if labelled else [media_ext, META_MEMBER]


class BuildError(Exception):
    """A dataset that cannot be built, or shards that cannot be used, as asked (bad records,
    a folder holding another build, an unfinished split). The message says what and where."""


class FoldError(BuildError):
    """A fold asked of a dataset that has no such fold, or a k-fold dataset asked for none."""


def index_path(tar_path: str) -> str:
    """The DALI index next to a shard: ``.../shard-000003.tar`` → ``.../shard-000003.idx``."""
    if not tar_path.endswith(".tar"):
        raise ValueError(f"not a shard: {tar_path}")
    return tar_path[: -len(".tar")] + ".idx"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {what}; was the dataset built with "
                                "`python -m s4d_dist.shards`?") from None


def read_dataset(out: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``dataset.json`` of a built dataset."""
    return _read_json(Path(out) / DATASET_JSON, "dataset.json")


def read_manifest(out: str | os.PathLike, split: str) -> dict[str, Any]:
    """The parsed manifest of one split."""
    return _read_json(Path(out) / split / MANIFEST_JSON, "manifest")


def class_names(location: str | os.PathLike) -> list[str] | None:
    """The class names a shard location (a split folder or a built dataset) was built with;
    None where it holds neither."""
    for name in (MANIFEST_JSON, DATASET_JSON):
        path = Path(location) / name
        if location and path.is_file():
            return list(json.loads(path.read_text())["class_names"])
    return None


def split_shards(out: str | os.PathLike, split: str) -> list[str]:
    """Tar paths of a split, in order; fails if the split's build did not finish or is empty."""
    manifest = read_manifest(out, split)
    folder = Path(out) / split
    if not manifest["complete"]:
        raise BuildError(f"{folder}: build not finished; re-run the build to complete it")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BuildError(f"{folder}: shard format {manifest['format_version']}, "
                         f"this code reads {FORMAT_VERSION}")
    if not manifest["shards"]:
        raise BuildError(f"{folder}: no samples (all {len(manifest['skipped'])} inputs skipped; "
                         f"reasons in {MANIFEST_JSON})")
    return [str(folder / shard["name"]) for shard in manifest["shards"]]


def fold_shards(out: str | os.PathLike, fold: int, split: str) -> list[str]:
    """Tar paths of fold ``fold``'s ``split`` ("train" or "test"): the union of its parts."""
    dataset = read_dataset(out)
    folds = dataset.get("folds")
    if not folds:
        raise FoldError(f"{Path(out) / DATASET_JSON}: dataset {dataset['dataset']} has no folds; "
                        f"its splits are {', '.join(dataset['splits'])}")
    if str(fold) not in folds:
        raise FoldError(f"dataset {dataset['dataset']} ({out}) has no fold {fold}; its folds are "
                        f"{', '.join(sorted(folds, key=int))}")
    if split not in folds[str(fold)]:
        raise BuildError(f"fold {fold} has no {split!r} set; it has {sorted(folds[str(fold)])}")
    return [tar for part in folds[str(fold)][split] for tar in split_shards(out, part)]
