"""Assembling a DatasetSource: unique keys, recorded skips, deterministic order.

Every reader funnels its samples through `SourceCollector`, so the guarantees the builder relies
on — keys unique across the whole dataset, records sorted by key within each split, nothing
dropped without a reason — are enforced once, not re-implemented per dataset.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from .base import DatasetSource, Media, SourceFormatError, SourceRecord
from .files import Unusable, check_file


def where(path: str, line: int | None = None) -> str:
    """`file:line`, the way SourceFormatError and skip reasons point at an input."""
    return f"{path}:{line}" if line is not None else path


class SourceCollector:
    """Collects records and skips for one dataset and hands back a DatasetSource."""

    def __init__(self, name: str, modality: Literal["image", "video"],
                 class_names: Sequence[str], splits: Sequence[str] = ()) -> None:
        self.name, self.modality, self.class_names = name, modality, list(class_names)
        self._splits: dict[str, list[SourceRecord]] = {split: [] for split in splits}
        self._first_seen: dict[str, str] = {}  # key -> where it came from
        self._skipped: list[tuple[str, str]] = []

    def label_in_range(self, label: int, input_path: str, origin: str,
                       as_written: str | None = None) -> bool:
        """False (and the sample skipped) for an id outside this dataset's classes.

        `as_written` describes the file's own value when the reader shifted it (RAF-DB's
        1-based ids), so the reason matches what the user sees in the file.
        """
        if 0 <= label < len(self.class_names):
            return True
        shown = as_written if as_written is not None else str(label)
        self.skip(input_path, f"label {shown} out of range for {len(self.class_names)} classes "
                              f"({origin})")
        return False

    def skip(self, input_path: str, reason: str) -> None:
        self._skipped.append((input_path, reason))

    def add(self, split: str, record: SourceRecord, origin_path: str,
            origin_line: int | None = None) -> None:
        """Add a record; a key seen before is a structural error (two inputs would overwrite
        each other in the shards), reported at the second occurrence with the first's origin."""
        first = self._first_seen.get(record.key)
        if first is not None:
            raise SourceFormatError(
                origin_path, f"duplicate sample key {record.key!r} (first from {first})",
                origin_line)
        self._first_seen[record.key] = where(origin_path, origin_line)
        self._splits.setdefault(split, []).append(record)

    def record(self, split: str, key: str, label: int | None, media: Media,
               paths: Sequence[str], meta: dict[str, Any], origin_path: str,
               origin_line: int | None = None) -> None:
        """Shorthand for add(SourceRecord(...))."""
        self.add(split, SourceRecord(key, label, media, tuple(paths), meta),
                 origin_path, origin_line)

    def listed_image(self, split: str, key: str, label: int, image: str, source: str,
                     list_path: str, line: int, as_written: str | None = None) -> None:
        """A labelled image named by a list file: label range checked, the file checked, then
        recorded — or skipped with a reason that points back at the list line."""
        origin = where(list_path, line)
        if not self.label_in_range(label, image, origin, as_written):
            return
        try:
            check_file(image)
        except Unusable as reason:
            self.skip(image, f"{reason} (listed at {origin})")
            return
        self.record(split, key, label, "image", (image,), {"source": source}, list_path, line)

    def finish(self, root: str, folds: dict[int, dict[str, list[str]]] | None = None
               ) -> DatasetSource:
        """The DatasetSource, splits in name order and records in key order.

        A dataset with no usable sample at all is a wrong root or layout option rather than a
        run of bad files, so it fails here with the first skip reasons instead of producing
        empty shards.
        """
        if not any(self._splits.values()):
            reasons = "; ".join(f"{path}: {reason}" for path, reason in self._skipped[:3])
            raise SourceFormatError(
                root, f"no usable {self.name} samples found"
                + (f" ({len(self._skipped)} skipped, e.g. {reasons})" if reasons else ""))
        splits = {split: sorted(records, key=lambda r: r.key)
                  for split, records in sorted(self._splits.items())}
        return DatasetSource(self.name, self.modality, self.class_names, splits, folds,
                             list(self._skipped))
