"""Writing samples into WebDataset tar shards, each with its DALI index.

Shards are reproducible: the same samples in the same order give byte-identical tars (fixed
mtime, owner, mode; USTAR headers; member order media, label, json), so a rebuild or a resumed
build can be checked by hash. A shard appears only complete: it is written as ``.tar.tmp``,
its indexes as ``.idx.tmp`` / ``.fidx.tmp``, and all are renamed (indexes first) once the tar is
closed, so a crash leaves at most ``.tmp`` files, which nothing reads.

Per sample the members are ``<key>.<media_ext>``, ``<key>.label`` (int32 little-endian, what
DALI's ``fn.readers.webdataset(..., dtypes=[..., types.INT32])`` reads without Python; left out
for unlabelled data) and ``<key>.json`` (metadata).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .layout import (INDEX_VERSION, LABEL_MEMBER, LABEL_STRUCT, META_MEMBER, SHARD_PATTERN,
                     encode_frame_index, frame_index_path, index_path, member_exts)
from .samples import Sample

_BLOCK = tarfile.BLOCKSIZE
_KEY = re.compile(r"[^\s./\\]+")


@dataclass
class ShardInfo:
    """A finished shard, as the manifest records it."""

    name: str
    samples: int
    bytes: int
    sha256: str
    labels: dict[int, int] = field(default_factory=dict)  # class id → sample count


def check_key(key: str, longest_ext: str) -> None:
    """Reject keys that would break sample grouping (dots, slashes), the index file format
    (whitespace) or a plain USTAR header (member names up to 100 bytes)."""
    if not _KEY.fullmatch(key) or key.startswith("-"):
        raise ValueError(f"sample key {key!r} must be non-empty, without whitespace, '.', '/', "
                         "'\\', and not start with '-'")
    if len(f"{key}.{longest_ext}".encode()) > 100:
        raise ValueError(f"sample key {key!r} is too long for a tar member name (100 bytes)")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tar_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes sample groups in order into ``shard-%06d.tar`` files of about ``max_bytes``.

    A group (the chunks of one clip) always lands in one shard, so a shard covers whole
    source records, which is what lets a build resume at a shard boundary. A shard is closed
    before a group that would take it past ``max_bytes`` (a group larger than that gets a
    shard of its own). ``on_close(info)`` runs after each shard is in place.
    """

    def __init__(self, folder: str | os.PathLike, media_ext: str, labelled: bool, max_bytes: int,
                 first_shard: int = 0, on_close: Callable[[ShardInfo], None] | None = None) -> None:
        self.folder = Path(folder)
        self.exts = tuple(member_exts(media_ext, labelled))
        self.labelled = labelled
        self.max_bytes = max_bytes
        self.next_shard = first_shard
        self.on_close = on_close
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._index_lines: list[str] = []
        self._frames: list[tuple[int, int, int, list[int]]] = []  # the frame index's rows
        self._labels: Counter[int] = Counter()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave the .tmp as a crash would; a resume discards it
            self._tar.close()
            self._tar = None

    def _members(self, sample: Sample) -> list[tuple[str, bytes]]:
        if (sample.label is not None) != self.labelled:
            raise ValueError(f"sample {sample.key}: label {sample.label!r} in a "
                             f"{'labelled' if self.labelled else 'unlabelled'} folder")
        check_key(sample.key, max(self.exts, key=len))
        data = {self.exts[0]: sample.media,
                META_MEMBER: json.dumps(sample.meta, sort_keys=True).encode()}
        if self.labelled:
            data[LABEL_MEMBER] = struct.pack(LABEL_STRUCT, sample.label)
        return [(f"{sample.key}.{ext}", data[ext]) for ext in self.exts]

    def write(self, group: Sequence[Sample]) -> None:
        """Append the samples of one source record (kept together in one shard)."""
        members = [self._members(sample) for sample in group]
        size = sum(_tar_bytes(len(data)) for one in members for _, data in one)
        if self._tar is not None and self._tar.offset + size > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        for sample, sample_members in zip(group, members):
            line = []
            for ext, (name, data) in zip(self.exts, sample_members):
                self._tar.addfile(_member(name, len(data)), io.BytesIO(data))
                data_offset = self._tar.offset - (_tar_bytes(len(data)) - _BLOCK)
                line.append(f"{ext} {data_offset} {len(data)} {name}")
            self._index_lines.append(" ".join(line))
            ends = list(sample.frame_ends) if sample.frame_ends is not None else [len(sample.media)]
            meta = sample.meta
            self._frames.append((int(meta.get("frames", 1)), int(meta.get("height", 0)), int(meta.get("width", 0)), ends))
            if sample.label is not None:
                self._labels[sample.label] += 1

    def close(self) -> None:
        """Finish the open shard, if any."""
        if self._tar is not None:
            self._finish()

    def _open(self) -> None:
        self._name = SHARD_PATTERN.format(self.next_shard)
        self.next_shard += 1
        self._tar = tarfile.open(self.folder / f"{self._name}.tmp", "w",
                                 format=tarfile.USTAR_FORMAT)
        self._index_lines, self._frames, self._labels = [], [], Counter()

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        tar_path = self.folder / self._name
        idx_path = Path(index_path(str(tar_path)))
        idx_tmp = idx_path.with_name(idx_path.name + ".tmp")
        lines = [f"{INDEX_VERSION} {len(self._index_lines)}", *self._index_lines]
        idx_tmp.write_text("\n".join(lines) + "\n")
        fidx_path = Path(frame_index_path(str(tar_path)))
        fidx_tmp = fidx_path.with_name(fidx_path.name + ".tmp")
        fidx_tmp.write_bytes(encode_frame_index(self._frames))
        os.replace(fidx_tmp, fidx_path)
        os.replace(idx_tmp, idx_path)
        tar_tmp = tar_path.with_name(tar_path.name + ".tmp")
        info = ShardInfo(self._name, len(self._index_lines), tar_tmp.stat().st_size,
                         file_sha256(tar_tmp), dict(sorted(self._labels.items())))
        os.replace(tar_tmp, tar_path)
        if self.on_close is not None:
            self.on_close(info)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
