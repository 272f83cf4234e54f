"""Every sample of a set of shards, addressable by one global index, read by byte offset.

The shard builder writes a DALI index (`.idx`) beside each tar, listing for every sample the
byte offset and size of each member. The catalog parses those indices once, so a sample is
read with one `pread` per member instead of scanning tars: that is what lets the loaders draw
a global permutation each epoch (the official DistributedSampler semantics) rather than the
approximate shard-then-buffer shuffle of a streaming reader. Files are opened lazily per
process, so a catalog pickles cheaply into DataLoader workers.

Where the shards are: `shard_paths` resolves a split folder, a dataset root plus split, or a
k-fold dataset's fold (the union of its parts) through `s4d_dist.shards.layout`.

A tar shorter than its index says (a copy cut short) is found when the catalog opens, from the
file sizes alone: it stops the run before step 0 naming each shard and how many of its samples
are lost, or with `skip_truncated` those samples are left out and counted (`Catalog.truncated`).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s4d_dist.shards import layout


class TruncatedShardError(ValueError):
    """Shards whose tar ends before samples that their index lists."""


@dataclass(frozen=True)
class RawSample:
    """One stored sample: its member bytes, as the shard builder wrote them."""

    index: int
    key: str
    media: bytes
    label: int  # -1 when the dataset is unlabelled
    meta: dict[str, Any]


def shard_paths(location: str, split: str = "train", fold: int | None = None) -> list[str]:
    """The tars of a split folder (`<out>/<split>`, holding manifest.json), or of `split` of a
    built dataset (`<out>`, holding dataset.json) — for a k-fold dataset with `fold` set, the
    union of the parts that form that fold's `split`."""
    path = Path(location)
    if (path / layout.MANIFEST_JSON).is_file():
        if fold is not None:
            raise layout.FoldError(f"{path} is one split folder; data.fold needs the dataset "
                                   f"folder (the one holding {layout.DATASET_JSON})")
        return layout.split_shards(path.parent, path.name)
    if (path / layout.DATASET_JSON).is_file():
        if fold is not None:
            return layout.fold_shards(path, fold, split)
        dataset = layout.read_dataset(path)
        if dataset.get("folds") and split not in dataset["splits"]:
            raise layout.FoldError(f"{path} holds the k-fold dataset {dataset['dataset']}: set "
                                   f"data.fold to one of {', '.join(sorted(dataset['folds'], key=int))}")
        return layout.split_shards(path, split)
    raise FileNotFoundError(f"{path}: neither a shard split folder ({layout.MANIFEST_JSON}) nor a built "
                            f"dataset ({layout.DATASET_JSON}); build one with `python -m s4d_dist.shards`")


@dataclass
class _Members:
    """Per-sample (offset, size) of each member, for one catalog."""

    shard: np.ndarray  # (N,) int32, index into Catalog.tars
    media: np.ndarray  # (N, 2) int64
    meta: np.ndarray   # (N, 2) int64
    label: np.ndarray | None  # (N, 2) int64, None when unlabelled


def _parse_index(idx_path: str, exts: list[str]) -> tuple[list[str], np.ndarray]:
    """Keys and an (n, len(exts), 2) array of (offset, size) from a DALI index (v1.2)."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != layout.INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a {layout.INDEX_VERSION} DALI index (header {header})")
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


@dataclass
class Catalog:
    """The samples of `tars` (all from folders of one modality, media type and class list)."""

    tars: list[str]
    dataset: str
    modality: str
    media_ext: str
    class_names: list[str]
    keys: list[str]
    members: _Members
    truncated: dict[str, int] = field(default_factory=dict)  # tar → samples left out (beyond its end)
    _files: dict[int, int] = field(default_factory=dict, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # descriptors do not cross processes
        return state

    def _pread(self, sample: int, span: np.ndarray) -> bytes:
        shard = int(self.members.shard[sample])
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.tars[shard], os.O_RDONLY)
        offset, size = int(span[0]), int(span[1])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.tars[shard]}: short read of sample {self.keys[sample]} "
                          f"({len(data)} of {size} bytes at {offset}); was the shard rewritten?")
        return data

    @property
    def labelled(self) -> bool:
        return self.members.label is not None

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class ids, read once (4 bytes per sample), -1 for unlabelled data."""
        if self._labels is None:
            if not self.labelled:
                self._labels = np.full(len(self), -1, np.int64)
            else:
                self._labels = np.array([self._label(i) for i in range(len(self))], np.int64)
                bad = np.flatnonzero((self._labels < 0) | (self._labels >= len(self.class_names)))
                if len(bad):
                    i = int(bad[0])
                    raise ValueError(f"{self.where(i)}: label {self._labels[i]} outside "
                                     f"0..{len(self.class_names) - 1}")
        return self._labels

    def _label(self, sample: int) -> int:
        return struct.unpack(layout.LABEL_STRUCT, self._pread(sample, self.members.label[sample]))[0]

    def where(self, sample: int) -> str:
        """`<tar>:<key>`, for messages."""
        return f"{self.tars[int(self.members.shard[sample])]}:{self.keys[sample]}"

    def read(self, sample: int) -> RawSample:
        """Media bytes, label and metadata of one sample."""
        meta = json.loads(self._pread(sample, self.members.meta[sample]))
        if self._labels is not None:
            label = int(self._labels[sample])
        else:
            label = self._label(sample) if self.labelled else -1
        return RawSample(sample, self.keys[sample], self._pread(sample, self.members.media[sample]), label, meta)

    def read_meta(self, sample: int) -> dict[str, Any]:
        return json.loads(self._pread(sample, self.members.meta[sample]))

    def subset(self, samples: np.ndarray) -> Catalog:
        """A catalog of the given samples only, re-indexed 0..len-1 in the given order."""
        m = self.members
        members = _Members(m.shard[samples], m.media[samples], m.meta[samples],
                           None if m.label is None else m.label[samples])
        out = Catalog(self.tars, self.dataset, self.modality, self.media_ext, self.class_names,
                      [self.keys[i] for i in samples], members, self.truncated)
        if self._labels is not None:
            out._labels = self._labels[samples]
        return out


def _within_tar(tar: str, spans: np.ndarray) -> np.ndarray:
    """(n,) bool: the samples whose every member ends within the tar as it is on disk."""
    ends = (spans[:, :, 0] + spans[:, :, 1]).max(axis=1)
    return ends <= os.path.getsize(tar)


def open_catalog(tars: list[str], skip_truncated: bool = False) -> Catalog:
    """Parse the index of every tar; all folders involved must agree on modality, media
    extension and class names (a fold's parts always do; anything else is a config error).
    A truncated tar raises TruncatedShardError, or with `skip_truncated` its samples beyond the
    end are left out."""
    if not tars:
        raise ValueError("no shards given")
    manifests: dict[Path, dict] = {}
    for tar in tars:
        folder = Path(tar).parent
        if folder not in manifests:
            manifests[folder] = layout.read_manifest(folder.parent, folder.name)
    first_folder, first = next(iter(manifests.items()))
    for folder, manifest in manifests.items():
        for name in ("modality", "class_names", "extensions"):
            if manifest[name] != first[name]:
                raise ValueError(f"{folder} and {first_folder} differ in {name}: "
                                 f"{manifest[name]} vs {first[name]}")
    exts = list(first["extensions"])
    media_ext = first["media"]["ext"]
    keys: list[str] = []
    shard_ids, spans = [], []
    truncated: dict[str, int] = {}
    for shard, tar in enumerate(tars):
        shard_keys, shard_spans = _parse_index(layout.index_path(tar), exts)
        readable = _within_tar(tar, shard_spans)
        if not readable.all():
            truncated[tar] = int((~readable).sum())
            if skip_truncated:
                shard_keys = [k for k, ok in zip(shard_keys, readable) if ok]
                shard_spans = shard_spans[readable]
        keys += shard_keys
        shard_ids.append(np.full(len(shard_keys), shard, np.int32))
        spans.append(shard_spans)
    if truncated and not skip_truncated:
        lost = ", ".join(f"{tar} ({n} samples)" for tar, n in truncated.items())
        raise TruncatedShardError(f"truncated shards, samples beyond the end of the tar: {lost}; recopy "
                                  f"or rebuild them, or set data.skip_truncated=true to train on the rest")
    span = np.concatenate(spans) if spans else np.zeros((0, len(exts), 2), np.int64)
    members = _Members(np.concatenate(shard_ids), span[:, exts.index(media_ext)], span[:, exts.index(layout.META_MEMBER)],
                       span[:, exts.index(layout.LABEL_MEMBER)] if layout.LABEL_MEMBER in exts else None)
    if not keys:
        raise ValueError(f"shards {tars[0]} ... hold no samples")
    return Catalog(list(tars), first["dataset"], first["modality"], media_ext, list(first["class_names"]),
                   keys, members, truncated)
