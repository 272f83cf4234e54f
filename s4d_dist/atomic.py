"""Files that are either complete or absent: written under a temporary name, then renamed.

A crash, a kill or a full disk while exporting must never leave a truncated file under a name
that looks finished (`weights_fp32.pt`, `metrics.json`, `finished.json`, ...). The temporary
file lies in the same folder, so `os.replace` is a rename within one filesystem (atomic on
POSIX); it is flushed to disk first, so the rename never publishes data still in the page cache.
The published file has the mode a plain `open(path, "w")` would give it (0666 less the umask),
whatever mode the writer gave the temporary file (safetensors creates it private, 0600).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set
    and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file: 0666 less the umask."""
    return 0o666 & ~umask()


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on success it becomes `path` (with
    the umask's mode), on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
            os.fchmod(written.fileno(), file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, all or nothing."""
    with replacing(path) as tmp:
        tmp.write_text(text)
