"""Files that are either complete or absent: written under a temporary name, then renamed.

A crash, a kill or a full disk while exporting must never leave a truncated file under a name
that looks finished (`weights_fp32.pt`, `metrics.json`, `finished.json`, ...). The temporary
file lies in the same folder, so `os.replace` is a rename within one filesystem (atomic on
POSIX); it is flushed to disk first, so the rename never publishes data still in the page cache.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on success it becomes `path`, on an
    exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, all or nothing."""
    with replacing(path) as tmp:
        tmp.write_text(text)
