"""Existence checks and frame listing — the only file-system facts a reader establishes.

Readers never decode media; they only make sure that what a label file names is there, so
the builder's bad-media handling is left for genuinely corrupt files. Anything unusable raises
`Unusable` with a short reason that the reader records in `DatasetSource.skipped`.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable

from .base import SourceFormatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
PNG_EXTENSIONS = (".png",)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")

_DIGITS = re.compile(r"(\d+)")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def require_file(path: str, what: str) -> None:
    """A file the dataset cannot be read without (a label file): its absence is structural."""
    if not os.path.isfile(path):
        raise SourceFormatError(path, f"{what} not found")


def require_dir(path: str, what: str) -> None:
    """A folder the whole dataset lives in: if it is missing the root or a layout option is
    wrong, which must not show up as thousands of 'missing frame folder' skips."""
    if not os.path.isdir(path):
        raise SourceFormatError(path, f"{what} not found")


class Unusable(Exception):
    """A listed input that cannot become a sample; the message is the reason to record."""


def has_extension(name: str, extensions: Iterable[str]) -> bool:
    return name.lower().endswith(tuple(extensions))


def check_file(path: str) -> None:
    """A listed media file must exist and be non-empty (a zero-byte file is a failed copy)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise Unusable("missing file") from None
    if not stat.S_ISREG(info.st_mode):
        raise Unusable("not a regular file")
    if info.st_size == 0:
        raise Unusable("empty file (0 bytes)")


def frame_order_key(name: str) -> tuple:
    """Sort key that orders frames by the numbers in their names: 1, 2, 10 — not 1, 10, 2.

    The official code sorts frame paths lexicographically (docs/method.md §3.10), which scrambles
    clips whose frame names are not zero-padded. Splitting the name into text and digit runs and
    comparing the digit runs as integers is the frame's numeric index whenever names share a
    pattern (`1.jpg`, `frame_0010.png`, `img_3_crop.jpg`), and a sane natural sort otherwise.
    re.split with a capture group alternates text/digits starting with text, so position i has
    the same type in every key; the full name breaks ties (`1.jpg` vs `01.jpg`) deterministically.
    """
    runs = _DIGITS.split(name)
    return tuple(int(run) if i % 2 else run for i, run in enumerate(runs)), name


def list_frames(folder: str, extensions: Iterable[str]) -> tuple[str, ...]:
    """The frame files of a clip folder, in numeric frame order.

    Files with other extensions and hidden files (`.DS_Store`, `._1.jpg`) are not frames.
    """
    extensions = tuple(extensions)
    try:
        names = [entry.name for entry in os.scandir(folder)
                 if not entry.name.startswith(".") and has_extension(entry.name, extensions)
                 and entry.is_file()]
    except FileNotFoundError:
        raise Unusable("missing frame folder") from None
    except NotADirectoryError:
        raise Unusable("frame folder is a file, not a folder") from None
    if not names:
        raise Unusable(f"empty frame folder (no {'/'.join(extensions)} files)")
    return tuple(os.path.join(folder, name) for name in sorted(names, key=frame_order_key))


def safe_key(*parts: str) -> str:
    """A tar-member stem from source names: no dots, no slashes (WebDataset splits keys at the
    first dot). Unsafe characters become `_`; collisions this could cause are caught by the
    duplicate-key check rather than silently merged."""
    key = "_".join(_UNSAFE_KEY_CHARS.sub("_", part) for part in parts if part)
    if not key:
        raise ValueError(f"empty sample key from {parts!r}")
    return key


def strip_extension(relpath: str) -> str:
    return os.path.splitext(relpath)[0]


def resolve(root: str, path: str) -> str:
    """An option or list path: absolute paths stay, relative ones are under the dataset root."""
    return os.path.normpath(os.path.join(root, os.path.expanduser(path)))


def relative(root: str, path: str) -> str:
    """The source path kept in sample meta: relative to the dataset root so shards built on one
    machine do not carry that machine's mount points, with `/` separators everywhere."""
    return os.path.relpath(path, root).replace(os.sep, "/")
