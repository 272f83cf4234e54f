"""Generic CSV-listed datasets: one `path,label` CSV per split.

A path (relative to the dataset root, or absolute) is an image file, a video file, or a folder
of frames; the label is an integer class id or a class name. Without an explicit class list,
names are inferred sorted over all splits, and integer ids imply classes `0..max` — never a
mix, because guessing how ids and names line up would silently mislabel data.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .base import DatasetSource, Media, SourceFormatError
from .classes import class_list
from .collect import SourceCollector, where
from .files import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Unusable, check_file, has_extension,
                    list_frames, relative, resolve, safe_key, strip_extension)
from .labelfiles import read_csv_rows
from .options import as_list

SPLIT_NAMES = ("train", "val", "test")
HEADER = ("path", "label")


@dataclass(frozen=True)
class Row:
    split: str
    csv_path: str
    line: int
    path: str
    label: str


def is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def split_files(root: str, given: dict[str, list[str]]) -> dict[str, list[str]]:
    """The CSVs per split: the given ones, else whichever of train/val/test.csv exist in root."""
    chosen = {split: [resolve(root, f) for f in files] for split, files in given.items() if files}
    if chosen:
        return chosen
    found = {split: [os.path.join(root, f"{split}.csv")] for split in SPLIT_NAMES
             if os.path.isfile(os.path.join(root, f"{split}.csv"))}
    if not found:
        raise SourceFormatError(root, "no train.csv/val.csv/test.csv here; pass train=/val=/test=")
    return found


def infer_classes(rows: list[Row], explicit: str | Sequence[str] | None) -> list[str]:
    if as_list(explicit):
        return class_list(explicit, ())
    named = [row for row in rows if not is_int(row.label)]
    if not named:
        top = max((int(row.label) for row in rows), default=-1)
        return [str(i) for i in range(top + 1)]
    numbered = [row for row in rows if is_int(row.label)]
    if numbered:
        row = numbered[0]
        raise SourceFormatError(row.csv_path, f"integer label {row.label!r} in a file that "
                                              "also uses class names; pass classes=", row.line)
    return class_list(None, (row.label for row in named))


def media_of(path: str) -> tuple[Media, tuple[str, ...]]:
    """What a listed path is: a frame folder, an image or a video (raises Unusable)."""
    if os.path.isdir(path):
        return "frames", list_frames(path, IMAGE_EXTENSIONS)
    if has_extension(path, IMAGE_EXTENSIONS):
        kind: Media = "image"
    elif has_extension(path, VIDEO_EXTENSIONS):
        kind = "video"
    elif not os.path.exists(path):
        raise Unusable("missing file or folder")
    else:
        raise Unusable("not an image, video or frame folder")
    check_file(path)
    return kind, (path,)


def read_csv(root: str, *, train: str | Sequence[str] | None = None,
             val: str | Sequence[str] | None = None, test: str | Sequence[str] | None = None,
             classes: str | Sequence[str] | None = None, name: str = "csv") -> DatasetSource:
    """Read `path,label` CSVs (exact header) into splits `train` / `val` / `test`.

    Options:
        train, val, test: CSV path(s) for that split, relative to `root` or absolute (list or
            comma-separated). Default: whichever of root/train.csv, val.csv, test.csv exist.
        classes: class names in id order (list or comma-separated). With it, a label may be an
            id or one of the names; without it, all labels must be names (classes = sorted
            names) or all ids (classes `"0".."max"`).
        name: dataset name recorded in the source (default `csv`).
    Keys are the listed path without extension, made safe. Paths must not repeat.
    """
    root = os.path.abspath(root)
    given = {split: as_list(value) for split, value in zip(SPLIT_NAMES, (train, val, test))}
    rows = [Row(split, csv_path, line, path, label)
            for split, files in split_files(root, given).items() for csv_path in files
            for line, (path, label) in read_csv_rows(csv_path, HEADER)]
    names = infer_classes(rows, classes)
    ids = {class_name: i for i, class_name in enumerate(names)}

    resolved: list[tuple[Row, int, Media, tuple[str, ...]]] = []
    collector_skips: list[tuple[str, str]] = []
    for row in rows:
        path = resolve(root, row.path)
        origin = where(row.csv_path, row.line)
        label = int(row.label) if is_int(row.label) else ids.get(row.label)
        if label is None:
            collector_skips.append((path, f"unknown class {row.label!r} ({origin})"))
            continue
        if not 0 <= label < len(names):
            collector_skips.append((path, f"label {label} out of range for {len(names)} "
                                          f"classes ({origin})"))
            continue
        try:
            kind, paths = media_of(path)
        except Unusable as reason:
            collector_skips.append((path, f"{reason} (listed at {origin})"))
            continue
        resolved.append((row, label, kind, paths))

    kinds = {"image" if kind == "image" else "video" for _, _, kind, _ in resolved}
    if len(kinds) > 1:
        raise SourceFormatError(root, "lists both images and videos; one dataset is one modality")
    out = SourceCollector(name, "image" if kinds == {"image"} else "video", names,
                          splits=list(dict.fromkeys(row.split for row in rows)))
    for path, reason in collector_skips:
        out.skip(path, reason)
    for row, label, kind, paths in resolved:
        source = resolve(root, row.path)
        out.record(row.split, safe_key(strip_extension(relative(root, source))), label, kind,
                   paths, {"source": relative(root, source)}, row.csv_path, row.line)
    return out.finish(root)
