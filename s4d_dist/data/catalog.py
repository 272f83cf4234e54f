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

The frame index (`.fidx`, format 2 shards) gives every sample's frame count and size without
reading its JSON, and each frame's offset for frame storage, so a window's frames are read
alone. A frame index that does not match its tar's index (another sample count) is a broken
shard and stops the run naming it; a sample whose frame offsets do not fit its media member is
set aside as corrupt (`Catalog.bad`), skipped and counted like any corrupt sample.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s4d_dist.shards import layout


class ShardError(ValueError):
    """A shard that cannot be read as built (the message names it): the run stops."""


class TruncatedShardError(ShardError):
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
    """Per-sample (offset, size) of each member, for one catalog, and what the frame index
    says of each sample (-1 where the shards have no frame index: read from the JSON)."""

    shard: np.ndarray  # (N,) int32, index into Catalog.tars
    media: np.ndarray  # (N, 2) int64
    meta: np.ndarray   # (N, 2) int64
    label: np.ndarray | None  # (N, 2) int64, None when unlabelled
    table: np.ndarray  # (N, 3) int32: frames, height, width
    parts: np.ndarray  # (N,) int32: parts stored (frames in frame storage, else 1; 0: no frame index)
    first_part: np.ndarray  # (N,) int64: where the sample's part ends start in `ends`
    ends: np.ndarray  # (parts,) int64: each part's end offset within its media member

    def take(self, samples: np.ndarray) -> _Members:
        return _Members(self.shard[samples], self.media[samples], self.meta[samples],
                        None if self.label is None else self.label[samples], self.table[samples],
                        self.parts[samples], self.first_part[samples], self.ends)


@dataclass(frozen=True)
class Clips:
    """The clips of a catalog's samples: a long clip stored as chunks (shards/samples.py) is one
    clip, whose chunks cover its frames in order. Clip c's samples are
    `members[first[c]:first[c + 1]]`; a catalog without chunks has one clip per sample."""

    keys: list[str]
    of_sample: np.ndarray  # (N,) int64
    first: np.ndarray      # (C + 1,) int64
    members: np.ndarray    # (N,) int64
    start: np.ndarray      # (N,) int64: the clip frame each sample starts at
    frames: np.ndarray     # (C,) int64: frames of each clip (-1 where not read: no chunks)

    @property
    def chunked(self) -> bool:
        return len(self.keys) != len(self.of_sample)

    def samples(self, clip: int) -> np.ndarray:
        return self.members[self.first[clip]:self.first[clip + 1]]


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
    bad: dict[int, str] = field(default_factory=dict)  # sample → why it cannot be read (frame index)
    frame_storage: bool = False  # every frame an independent JPEG at its indexed offset
    stored_crop: list[int] | None = None  # the (y0, x0, y1, x1) cut of the source frames stored (build option)
    _files: dict[int, int] = field(default_factory=dict, repr=False)
    _maps: dict[int, tuple[mmap.mmap, np.ndarray]] = field(default_factory=dict, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)
    _clips: Clips | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_maps"] = {}, {}  # descriptors and maps do not cross processes
        return state

    def _fd(self, sample: int) -> int:
        shard = int(self.members.shard[sample])
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return fd

    def _pread(self, sample: int, span: np.ndarray) -> bytes:
        shard = int(self.members.shard[sample])
        fd = self._fd(sample)
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

    @property
    def clips(self) -> Clips:
        """Which clip each sample is (part of), from the keys; frames per clip read only where
        a clip has several chunks."""
        if self._clips is None:
            parsed = [layout.clip_key(k) for k in self.keys]
            if all(chunk == 0 for _, chunk in parsed) and len({k for k, _ in parsed}) == len(parsed):
                n = np.arange(len(self.keys), dtype=np.int64)
                self._clips = Clips(list(self.keys), n, np.arange(len(n) + 1, dtype=np.int64), n,
                                    np.zeros(len(n), np.int64), np.full(len(n), -1, np.int64))
            else:
                self._clips = self._chunked_clips(parsed)
        return self._clips

    def _chunked_clips(self, parsed: list[tuple[str, int]]) -> Clips:
        ids: dict[str, int] = {}
        of_sample = np.array([ids.setdefault(key, len(ids)) for key, _ in parsed], np.int64)
        chunk = np.array([c for _, c in parsed], np.int64)
        members = np.lexsort((chunk, of_sample)).astype(np.int64)  # by clip (first seen), then chunk
        first = np.searchsorted(of_sample[members], np.arange(len(ids) + 1)).astype(np.int64)
        lengths = self.table(members)[:, 0].astype(np.int64)
        ends = np.cumsum(lengths)
        clip_first = first[:-1]
        start = np.empty(len(members), np.int64)
        start[members] = ends - lengths - np.repeat(np.concatenate([[0], ends])[clip_first], np.diff(first))
        frames = np.add.reduceat(lengths, clip_first) if len(members) else np.zeros(0, np.int64)
        return Clips(list(ids), of_sample, first, members, start, frames)

    def table(self, samples: np.ndarray) -> np.ndarray:
        """(len(samples), 3) int32 frames, height, width: from the frame index, or read once
        from the samples' JSON where the shards have none (a sample whose JSON does not parse is
        set aside in `bad`, with a placeholder row)."""
        rows = self.members.table[samples]
        for i in np.flatnonzero(rows[:, 0] < 0):
            sample = int(samples[i])
            try:
                meta = self.read_meta(sample)
                row = (int(meta.get("frames", 1)), int(meta["height"]), int(meta["width"]))
            except (ValueError, KeyError) as err:
                self.bad[sample] = f"unreadable metadata: {err!r}"
                row = (1, 1, 1)
            self.members.table[sample] = rows[i] = row
        return rows

    def read_frames(self, sample: int, frames: np.ndarray) -> list[bytes]:
        """The JPEG bytes of frames `frames` (distinct, any order) of a frame-storage sample:
        one pread each, nothing else of the clip."""
        m = self.members
        first = int(m.first_part[sample])
        offset = int(m.media[sample, 0])
        ends = m.ends[first: first + int(m.parts[sample])]
        starts = np.concatenate([[0], ends[:-1]])
        fd = self._fd(sample)
        out = []
        for i in frames.tolist():
            size = int(ends[i] - starts[i])
            data = os.pread(fd, size, offset + int(starts[i]))
            if len(data) != size:
                raise OSError(f"{self.where(sample)}: short read of frame {i}; was the shard rewritten?")
            out.append(data)
        return out

    def _mapped(self, shard: int) -> np.ndarray:
        """The shard's bytes as a read-only array over a memory map, after checking the file
        still has the size it was mapped at (touching a map past a file's end kills the process
        with SIGBUS; a shard cut while training is named instead)."""
        if shard not in self._maps:
            fd = os.open(self.tars[shard], os.O_RDONLY)
            try:
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            self._maps[shard] = (mapped, np.frombuffer(mapped, np.uint8))
        mapped, array = self._maps[shard]
        if os.path.getsize(self.tars[shard]) < len(array):
            raise TruncatedShardError(f"{self.tars[shard]}: the shard shrank while training (a copy or "
                                      "rebuild under a running job); recopy it and resume")
        return array

    def frame_bytes(self, samples: np.ndarray, frames: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Frame `frames[i]` of frame-storage sample `samples[i]`, for every i: views of the
        shards' bytes (no copy, no system call per frame), and whether each still starts and
        ends with its JPEG markers (a frame damaged since the build)."""
        m = self.members
        part = m.first_part[samples] + frames
        ends = m.ends[part]
        starts = np.where(frames > 0, m.ends[np.maximum(part - 1, 0)], 0)
        base = m.media[samples, 0]
        starts, ends = starts + base, ends + base
        shards = m.shard[samples]
        ok = np.zeros(len(samples), bool)
        views: list[np.ndarray | None] = [None] * len(samples)
        for shard in np.unique(shards).tolist():
            mine = np.flatnonzero(shards == shard)
            data = self._mapped(shard)
            a, e = starts[mine], ends[mine]
            ok[mine] = (data[a] == 0xFF) & (data[a + 1] == 0xD8) & (data[e - 2] == 0xFF) & (data[e - 1] == 0xD9)
            for i, lo, hi in zip(mine.tolist(), a.tolist(), e.tolist()):
                views[i] = data[lo:hi]
        return views, ok

    def subset(self, samples: np.ndarray) -> Catalog:
        """A catalog of the given samples only, re-indexed 0..len-1 in the given order."""
        position = {int(old): new for new, old in enumerate(samples)}
        out = Catalog(self.tars, self.dataset, self.modality, self.media_ext, self.class_names,
                      [self.keys[i] for i in samples], self.members.take(samples), self.truncated,
                      {position[i]: why for i, why in self.bad.items() if i in position}, self.frame_storage,
                      self.stored_crop)
        if self._labels is not None:
            out._labels = self._labels[samples]
        return out


def _within_tar(tar: str, spans: np.ndarray) -> np.ndarray:
    """(n,) bool: the samples whose every member ends within the tar as it is on disk."""
    ends = (spans[:, :, 0] + spans[:, :, 1]).max(axis=1)
    return ends <= os.path.getsize(tar)


def _frame_index(tar: str, count: int, media_sizes: np.ndarray, framed: bool
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """The frame index of a tar whose index lists `count` samples: its table, its end offsets
    and the samples whose offsets do not fit their media member (with why). A frame index that
    is missing or lists another number of samples is a broken shard."""
    path = layout.frame_index_path(tar)
    try:
        table, ends = layout.read_frame_index(path)
    except FileNotFoundError:
        raise ShardError(f"{tar}: its frame index {os.path.basename(path)} is missing; recopy the "
                         "shard with it, or rebuild") from None
    except ValueError as error:
        raise ShardError(str(error)) from None
    if len(table) != count:
        raise ShardError(f"{path} lists {len(table)} samples, the tar's index {count}: the two files "
                         "are from different builds; recopy or rebuild the shard")
    first = np.concatenate([[0], np.cumsum(table[:, 0])[:-1]]).astype(np.int64)
    bad = {}
    parts = table[:, 0].astype(np.int64)
    last = ends[np.maximum(first + parts - 1, 0)] if len(ends) else np.zeros(count, np.int64)
    increasing = np.ones(count, bool)
    if len(ends):
        step = np.diff(np.concatenate([[0], ends]))
        starts_sample = np.zeros(len(ends), bool)
        starts_sample[first[parts > 0]] = True
        step = np.where(starts_sample, ends, step)  # a sample's first frame starts at 0
        increasing = np.minimum.reduceat(step, np.minimum(first, len(ends) - 1)) > 0
    wrong_count = (parts != table[:, 1]) if framed else np.zeros(count, bool)  # frame storage: a part per frame
    for i in np.flatnonzero((parts < 1) | wrong_count | ~increasing | (last != media_sizes)):
        bad[int(i)] = (f"frame index disagrees with the tar: {int(parts[i])} frames ending at byte "
                       f"{int(last[i])} of a {int(media_sizes[i])}-byte member")
    return table, ends, bad


def open_catalog(tars: list[str], skip_truncated: bool = False) -> Catalog:
    """Parse the index (and frame index) of every tar; all folders involved must agree on
    modality, media extension and class names (a fold's parts always do; anything else is a
    config error). A truncated tar raises TruncatedShardError, or with `skip_truncated` its
    samples beyond the end are left out."""
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
    frame_storage = first["media"].get("codec") == "frames"
    keys: list[str] = []
    shard_ids, spans, tables, all_parts, firsts, all_ends = [], [], [], [], [], []
    truncated: dict[str, int] = {}
    bad: dict[int, str] = {}
    parts_so_far = 0
    for shard, tar in enumerate(tars):
        shard_keys, shard_spans = layout.read_index(layout.index_path(tar), exts)
        media = shard_spans[:, exts.index(media_ext)]
        if manifests[Path(tar).parent].get("format_version", 1) >= 2:
            index, ends, shard_bad = _frame_index(tar, len(shard_keys), media[:, 1], frame_storage)
            parts, table = index[:, 0], index[:, 1:]
            first_part = np.concatenate([[0], np.cumsum(parts)[:-1]]).astype(np.int64) + parts_so_far
            parts_so_far += len(ends)
        else:
            table = np.full((len(shard_keys), 3), -1, np.int32)
            parts = np.zeros(len(shard_keys), np.int32)
            ends, shard_bad = np.zeros(0, np.int64), {}
            first_part = np.zeros(len(shard_keys), np.int64)
        readable = _within_tar(tar, shard_spans)
        if not readable.all():
            truncated[tar] = int((~readable).sum())
            if skip_truncated:
                kept = np.flatnonzero(readable)
                renumber = {int(old): new for new, old in enumerate(kept)}
                shard_keys = [shard_keys[i] for i in kept]
                shard_spans, table, parts, first_part = shard_spans[kept], table[kept], parts[kept], first_part[kept]
                shard_bad = {renumber[i]: why for i, why in shard_bad.items() if i in renumber}
        bad.update({len(keys) + i: why for i, why in shard_bad.items()})
        keys += shard_keys
        shard_ids.append(np.full(len(shard_keys), shard, np.int32))
        spans.append(shard_spans)
        tables.append(table)
        all_parts.append(parts)
        firsts.append(first_part)
        all_ends.append(ends)
    if truncated and not skip_truncated:
        lost = ", ".join(f"{tar} ({n} samples)" for tar, n in truncated.items())
        raise TruncatedShardError(f"truncated shards, samples beyond the end of the tar: {lost}; recopy "
                                  f"or rebuild them, or set data.skip_truncated=true to train on the rest")
    span = np.concatenate(spans) if spans else np.zeros((0, len(exts), 2), np.int64)
    members = _Members(np.concatenate(shard_ids), span[:, exts.index(media_ext)], span[:, exts.index(layout.META_MEMBER)],
                       span[:, exts.index(layout.LABEL_MEMBER)] if layout.LABEL_MEMBER in exts else None,
                       np.concatenate(tables), np.concatenate(all_parts), np.concatenate(firsts),
                       np.concatenate(all_ends))
    if not keys:
        raise ValueError(f"shards {tars[0]} ... hold no samples")
    crop = first.get("build", {}).get("encode", {}).get("video_crop")
    return Catalog(list(tars), first["dataset"], first["modality"], media_ext, list(first["class_names"]),
                   keys, members, truncated, bad, frame_storage, list(crop) if crop else None)
