"""The manifest of one split folder: what it holds, how it was built, what was left out.

It is also the build's checkpoint. It is rewritten (atomically) after every finished shard,
listing the shards done and the source records they cover, so a resumed build starts after
the last listed shard; anything in the folder that is not listed is discarded. A manifest
whose ``fingerprint`` (source records + options + encoder versions) differs from the current
build's is never resumed: mixing the two would silently break reproducibility.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layout import (FORMAT_VERSION, MANIFEST_JSON, BuildError, frame_index_path, index_path,
                     read_manifest, write_json_atomic)
from .writer import ShardInfo


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between a folder's build and the one asked for, in words."""
    flat = [({**m["build"]["encode"], "shard_bytes": m["build"]["shard_bytes"],
              **m["build"]["software"]} if "build" in m else {}) for m in (old, new)]
    changed = sorted(k for k in flat[0].keys() | flat[1].keys() if flat[0].get(k) != flat[1].get(k))
    if changed:
        return "other options (" + ", ".join(f"{k} {flat[0].get(k)} → {flat[1].get(k)}"
                                             for k in changed) + ")"
    return "other source records (the dataset or the reader's options changed)"


@dataclass
class SplitManifest:
    """``header`` is fixed for a build (dataset, modality, split, class names, extensions,
    build options, fingerprint, record count); ``shards`` and ``skipped`` grow as it runs."""

    header: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False

    @property
    def next_record(self) -> int:
        """The first source record not covered by a finished shard."""
        return self.shards[-1]["records"][1] if self.shards else 0

    def add_shard(self, info: ShardInfo, records: tuple[int, int]) -> None:
        names = self.header["class_names"]
        self.shards.append({
            "name": info.name, "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256,
            "records": list(records),
            "per_class": {names[label]: n for label, n in info.labels.items()},
        })

    def skip(self, record: int, key: str, path: str, reason: str) -> None:
        self.skipped.append({"record": record, "key": key, "path": path, "reason": reason})

    def to_json(self) -> dict[str, Any]:
        per_class: Counter[str] = Counter()
        for shard in self.shards:
            per_class.update(shard["per_class"])
        return {
            "format_version": FORMAT_VERSION, **self.header, "complete": self.complete,
            "samples": sum(s["samples"] for s in self.shards),
            "bytes": sum(s["bytes"] for s in self.shards),
            "per_class": {name: per_class[name] for name in self.header["class_names"]},
            "shards": self.shards, "skipped": self.skipped,
        }

    def save(self, folder: Path) -> None:
        write_json_atomic(folder / MANIFEST_JSON, self.to_json())

    @classmethod
    def resume(cls, folder: Path, header: dict[str, Any]) -> SplitManifest:
        """The state to continue from: the finished shards of a previous run of the same
        build that are still intact, or a fresh manifest. Removes every file of the folder
        that state does not list (``.tmp`` files, shards written after the last checkpoint);
        other files are not the builder's and stay."""
        manifest = cls(header)
        if (folder / MANIFEST_JSON).exists():
            old = read_manifest(folder.parent, folder.name)
            if old.get("fingerprint") != header["fingerprint"]:
                raise BuildError(f"{folder} holds a build of {_difference(old, header)}; delete "
                                 "the folder or choose another --out")
            for shard in old["shards"]:
                tar = folder / shard["name"]
                if not (tar.is_file() and tar.stat().st_size == shard["bytes"]
                        and os.path.isfile(index_path(str(tar)))
                        and os.path.isfile(frame_index_path(str(tar)))):
                    break
                manifest.shards.append(shard)
            manifest.skipped = [s for s in old["skipped"] if s["record"] < manifest.next_record]
            manifest.complete = old["complete"] and len(manifest.shards) == len(old["shards"])
        keep = {MANIFEST_JSON} | {name for s in manifest.shards
                                  for name in (s["name"], index_path(s["name"]), frame_index_path(s["name"]))}
        for path in folder.iterdir():
            ours = path.name.endswith(".tmp") or re.fullmatch(r"shard-\d{6}\.(tar|idx|fidx)", path.name)
            if ours and path.name not in keep and path.is_file():
                os.remove(path)
        return manifest
