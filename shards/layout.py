"""Where a built dataset keeps what, and how training finds a split's or a fold's shards.

    <out>/dataset.json                dataset, modality, class names, splits, folds, reader skips
    <out>/<split>/manifest.json       counts, build options, skipped samples, finished shards
    <out>/<split>/shard-%06d.tar      WebDataset samples
    <out>/<split>/shard-%06d.idx      DALI index of that tar
    <out>/<split>/shard-%06d.fidx     frame index of that tar (format 2): per sample its frame
                                      count, height, width and each stored part's end offset

Each sample is stored as the tar members ``<key>.<media ext>``, ``<key>.label`` (labelled
datasets only: the class index, int32 little-endian) and ``<key>.json`` (its metadata), in that
order; the index lists every member's offset and size.

The frame index is what training reads instead of each sample's JSON, and what lets it read a
window's frames of frame storage (media.py) at their offsets; for other media a sample has one
part, its whole media member. Its entries passed the builder's structural checks (frame count,
JPEG markers), so training does not repeat them. Format 1 folders (no frame index) still read.

A k-fold dataset (DFEW, MAFW) is stored once, as its disjoint parts; a fold's train set is the
union of the parts ``dataset.json`` lists for it, so nothing is copied per fold.
This module is the shard format both sides share: the builders write it, the loaders
(s4d_dist.data) read it. It reads only JSON: training code imports it without the encoders.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: no frame index
DATASET_JSON = "dataset.json"
MANIFEST_JSON = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_VERSION = "v1.2"  # the format of DALI's wds2idx, the first line of each .idx
FRAME_INDEX_MAGIC = "s4d-fidx 1"
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


CHUNK_SUFFIX = re.compile(r"__c(\d{3})$")  # a chunk's key: the clip's key + __cNNN (samples.chunk_key)


def clip_key(key: str) -> tuple[str, int]:
    """The clip a sample key belongs to, and which chunk of it the sample is (0 for a whole clip)."""
    match = CHUNK_SUFFIX.search(key)
    return (key[:match.start()], int(match.group(1))) if match else (key, 0)


def read_index(idx_path: str, exts: list[str]) -> tuple[list[str], np.ndarray]:
    """Keys and an (n, len(exts), 2) array of (offset, size) from a DALI index (v1.2); ValueError
    naming the file and line where it is not one listing the members `exts`."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a {INDEX_VERSION} DALI index (header {header})")
        keys, spans = [], []
        for line_no, line in enumerate(f, start=2):
            tokens = line.split()
            if len(tokens) != 4 * len(exts):
                raise ValueError(f"{idx_path}:{line_no}: expected members {exts}, got {tokens[::4]}")
            found = {tokens[i]: (int(tokens[i + 1]), int(tokens[i + 2])) for i in range(0, len(tokens), 4)}
            if set(found) != set(exts):
                raise ValueError(f"{idx_path}:{line_no}: expected members {exts}, got {sorted(found)}")
            keys.append(tokens[3].rsplit(".", 1)[0])
            spans.append([found[ext] for ext in exts])
    if len(keys) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(keys)}")
    return keys, np.asarray(spans, np.int64).reshape(len(keys), len(exts), 2)


def frame_index_path(tar_path: str) -> str:
    """The frame index next to a shard: ``.../shard-000003.tar`` → ``.../shard-000003.fidx``."""
    return index_path(tar_path)[: -len(".idx")] + ".fidx"


def encode_frame_index(samples: list[tuple[int, int, int, list[int]]]) -> bytes:
    """(frames, height, width, part end offsets) per sample → the frame index's bytes: a text
    line `s4d-fidx 1 <samples> <parts>`, then int32 (parts, frames, height, width) per sample,
    then the int64 end offsets (little-endian). A part is a frame in frame storage, the whole
    media member otherwise."""
    table = np.array([(len(ends), f, h, w) for f, h, w, ends in samples], "<i4").reshape(-1, 4)
    ends = np.array([e for *_, sample_ends in samples for e in sample_ends], "<i8")
    header = f"{FRAME_INDEX_MAGIC} {len(samples)} {len(ends)}\n".encode()
    return header + table.tobytes() + ends.tobytes()


def read_frame_index(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(samples, 4) int32 (parts, frames, height, width) and the (parts,) int64 end offsets;
    ValueError naming the file when it is not a whole frame index."""
    with open(path, "rb") as f:
        data = f.read()
    line, _, body = data.partition(b"\n")
    words = line.decode(errors="replace").split()
    if " ".join(words[:2]) != FRAME_INDEX_MAGIC or len(words) != 4:
        raise ValueError(f"{path}: not a frame index (first line {line[:40]!r})")
    samples, parts = int(words[2]), int(words[3])
    if len(body) != 16 * samples + 8 * parts:
        raise ValueError(f"{path}: {len(body)} bytes after the header, {16 * samples + 8 * parts} expected "
                         "(a cut or rewritten file)")
    table = np.frombuffer(body, "<i4", 4 * samples).reshape(samples, 4).astype(np.int32)
    ends = np.frombuffer(body, "<i8", parts, 16 * samples).astype(np.int64)
    if int(table[:, 0].sum()) != parts:
        raise ValueError(f"{path}: its samples list {int(table[:, 0].sum())} frames, it holds {parts}")
    return table, ends


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
    if manifest["format_version"] not in READABLE_FORMATS:
        raise BuildError(f"{folder}: shard format {manifest['format_version']}, "
                         f"this code reads {list(READABLE_FORMATS)}")
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
