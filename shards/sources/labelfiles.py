"""Reading label files: header-checked CSVs and space-separated list files.

Every structural problem raises `SourceFormatError` with the file and the physical line, so a
user with a 30k-line annotation file can jump straight to the fault. Values stay strings (the
official code reads column 0 as str, docs/method.md §4): `02522` must not become `2522`, because it
names a frame folder.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence

from .base import SourceFormatError
from .files import require_file


def read_csv_rows(path: str, header: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, cells) for each data row of a CSV whose first row must be `header`.

    The header is checked exactly (after trimming spaces and a UTF-8 BOM): a file written with a
    pandas index column, or another dataset's annotation file, is a wrong input, not a variant to
    guess around. Blank lines are ignored, as pandas does. Each row must have len(header) cells.
    """
    require_file(path, "label file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        found: list[str] | None = None
        for cells in reader:
            cells = [cell.strip() for cell in cells]
            if not any(cells):
                continue
            if found is None:
                found = cells
                if found != list(header):
                    raise SourceFormatError(
                        path, f"expected header {','.join(header)!r}, found {','.join(found)!r}",
                        reader.line_num)
                continue
            if len(cells) != len(header):
                raise SourceFormatError(
                    path, f"expected {len(header)} columns ({','.join(header)}), found "
                    f"{len(cells)}: {','.join(cells)!r}", reader.line_num)
            yield reader.line_num, cells
        if found is None:
            raise SourceFormatError(path, f"empty file; expected header {','.join(header)!r}")


def read_list_rows(path: str) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, name, label text) from a headerless `<name> <label>` list file.

    The label is the last whitespace-separated token, so a path containing spaces still parses.
    """
    require_file(path, "list file")
    with open(path, encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise SourceFormatError(path, f"expected '<path> <label>', found {text!r}", line_no)
            yield line_no, parts[0], parts[1]


def parse_label_id(text: str, path: str, line: int) -> int:
    """An integer class id as written in a label file.

    A non-integer is structural (wrong column, wrong file), so it raises; an integer that is
    merely out of range is the caller's to skip, because real label files do carry ids for
    classes a variant leaves out (AffectNet's Contempt / None / Uncertain).
    """
    try:
        return int(text)
    except ValueError:
        raise SourceFormatError(path, f"label {text!r} is not an integer class id", line) from None
