"""What a dataset reader hands to the shard builder.

A reader only parses label files and directory layouts; it never decodes media. It returns a
`DatasetSource`: records grouped into splits, plus the inputs it already had to skip. The
builder (shards/build.py) decodes, encodes and writes each split as its own shard folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Media = Literal["image", "frames", "video"]


class SourceFormatError(ValueError):
    """A structural problem (wrong header, unknown layout) that must stop the build.

    The message always names the file and, where there is one, the line.
    """

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line


@dataclass(frozen=True)
class SourceRecord:
    """One sample to convert.

    key:   unique within the dataset, usable as a tar member stem (no dots, no slashes).
    label: 0-based class id, or None for unlabelled data (VoxCeleb2).
    media: "image" (one file), "frames" (an ordered frame folder), "video" (one video file).
    paths: the files to read, frames already in numeric order (docs/method.md §3.10).
    meta:  JSON-serialisable facts kept with the sample (source path, fold part, ...).
    """

    key: str
    label: int | None
    media: Media
    paths: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSource:
    """A parsed dataset: its splits, and for k-fold datasets which parts form each fold.

    For DFEW / MAFW the splits are the five disjoint test parts ("part1".."part5"); fold k
    tests on part k and trains on the union of the others, so nothing is stored twice.
    """

    name: str
    modality: Literal["image", "video"]
    class_names: list[str]
    splits: dict[str, list[SourceRecord]]
    folds: dict[int, dict[str, list[str]]] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input path, reason)
