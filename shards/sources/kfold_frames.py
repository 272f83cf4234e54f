"""K-fold frame-folder datasets (DFEW, MAFW): per-fold train/test CSVs → five disjoint parts.

Both datasets ship, for each fold k, a test CSV and a train CSV. The test CSVs partition the
clips, so storing each clip once under "part k" (its test fold) and describing fold k as
"test part k, train on the other parts" avoids writing every clip five times. That is only
valid if the files really form a partition, so it is verified here, and any violation fails
the build naming the file, the line and the clip — a silently leaking fold would invalidate
every number reported on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .base import DatasetSource, SourceFormatError
from .collect import SourceCollector, where
from .files import Unusable, list_frames, relative, require_dir, resolve, safe_key
from .labelfiles import parse_label_id, read_csv_rows


@dataclass(frozen=True)
class KFoldLayout:
    """Where a k-fold dataset keeps its label files and frames, relative to its root."""

    name: str
    class_names: tuple[str, ...]
    header: tuple[str, str]
    test_files: tuple[str, ...]   # index k-1 is fold k's test CSV
    train_files: tuple[str, ...]  # index k-1 is fold k's train CSV
    frame_extensions: tuple[str, ...]


@dataclass
class LabelTable:
    """One fold CSV: clip name → (label, line)."""

    path: str
    rows: dict[str, tuple[int, int]]


def read_label_table(path: str, header: tuple[str, str]) -> LabelTable:
    """Read a `<clip name>,<label>` CSV; a clip listed twice in one file is an error."""
    rows: dict[str, tuple[int, int]] = {}
    for line, (name, label_text) in read_csv_rows(path, header):
        if not name:
            raise SourceFormatError(path, "empty clip name", line)
        if name in rows:
            raise SourceFormatError(path, f"clip {name} listed twice (first at line "
                                          f"{rows[name][1]})", line)
        rows[name] = (parse_label_id(label_text, path, line), line)
    return LabelTable(path, rows)


def verify_partition(tests: list[LabelTable], trains: list[LabelTable]) -> None:
    """Check that the test tables are disjoint and that train table k is exactly the union of
    the other test tables, with the same labels."""
    owner: dict[str, tuple[int, LabelTable]] = {}  # clip -> (part index, its test table)
    for part, table in enumerate(tests):
        for name, (_, line) in table.rows.items():
            if name in owner:
                first = owner[name][1]
                raise SourceFormatError(
                    table.path, f"clip {name} is also in {first.path}:{first.rows[name][1]}; "
                                "the test sets must be disjoint", line)
            owner[name] = (part, table)
    for fold, train in enumerate(trains):
        for name, (label, line) in train.rows.items():
            if name not in owner:
                raise SourceFormatError(train.path, f"clip {name} is in no test set", line)
            part, test = owner[name]
            if part == fold:
                raise SourceFormatError(
                    train.path, f"clip {name} is also in this fold's test set "
                                f"{where(test.path, test.rows[name][1])} (train/test leak)", line)
            test_label, test_line = test.rows[name]
            if label != test_label:
                raise SourceFormatError(
                    train.path, f"clip {name} has label {label} here but {test_label} in "
                                f"{where(test.path, test_line)}", line)
        missing = sorted(name for part, test in enumerate(tests) if part != fold
                         for name in test.rows if name not in train.rows)
        if missing:
            raise SourceFormatError(
                train.path, f"{len(missing)} clip(s) of the other folds' test sets are missing "
                            f"from this train set, e.g. clip {missing[0]} "
                            f"(from {owner[missing[0]][1].path})")


def read_kfold_frames(root: str, layout: KFoldLayout, frames_dir: str) -> DatasetSource:
    """Parts part1..partK from the test CSVs, each clip a frame folder under `frames_dir`."""
    root = os.path.abspath(root)
    tests = [read_label_table(resolve(root, f), layout.header) for f in layout.test_files]
    trains = [read_label_table(resolve(root, f), layout.header) for f in layout.train_files]
    verify_partition(tests, trains)

    frames_root = resolve(root, frames_dir)
    require_dir(frames_root, "frames folder")
    parts = [f"part{k}" for k in range(1, len(tests) + 1)]
    out = SourceCollector(layout.name, "video", layout.class_names, splits=parts)
    for part_no, (split, table) in enumerate(zip(parts, tests), start=1):
        for name, (label, line) in table.rows.items():
            folder = os.path.join(frames_root, name)
            origin = where(table.path, line)
            if not out.label_in_range(label, folder, origin):
                continue
            try:
                frames = list_frames(folder, layout.frame_extensions)
            except Unusable as reason:
                out.skip(folder, f"{reason} (listed at {origin})")
                continue
            out.record(split, safe_key(name), label, "frames", frames,
                       {"source": relative(root, folder), "video_name": name, "part": part_no},
                       table.path, line)
    folds = {k: {"train": [p for p in parts if p != parts[k - 1]], "test": [parts[k - 1]]}
             for k in range(1, len(parts) + 1)}
    return out.finish(root, folds)
