"""Generic class-per-folder datasets (ImageFolder style), images or videos.

    root/<class>/<file>              one split (named by the `split` option)
    root/<split>/<class>/<file>      when the top-level folders are split names

Each file is one sample; images vs videos by extension. Class ids follow the sorted union of
class folder names over all splits (or an explicit `classes` list), so a class missing from one
split does not shift the ids of the others.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from .base import DatasetSource, Media, SourceFormatError
from .classes import class_list
from .collect import SourceCollector
from .files import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Unusable, check_file, has_extension,
                    relative, require_dir, safe_key, strip_extension)
from .options import as_choice

SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")


def subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def media_of(name: str) -> Media | None:
    if has_extension(name, IMAGE_EXTENSIONS):
        return "image"
    if has_extension(name, VIDEO_EXTENSIONS):
        return "video"
    return None


def split_folders(root: str, layout: str, split: str) -> dict[str, str]:
    """split name → folder holding that split's class folders."""
    top = subfolders(root)
    if not top:
        raise SourceFormatError(root, "unknown layout: no class or split folders")
    named_splits = [name for name in top if name in SPLIT_FOLDERS]
    if layout == "auto":
        layout = "splits" if named_splits else "classes"
    if layout == "classes":
        return {split: root}
    if sorted(named_splits) != top:
        others = [name for name in top if name not in SPLIT_FOLDERS]
        raise SourceFormatError(root, f"split folders {named_splits} next to other folders "
                                      f"{others}; expected only {list(SPLIT_FOLDERS)}")
    return {name: os.path.join(root, name) for name in named_splits}


def read_folder(root: str, *, layout: str = "auto", split: str = "train",
                classes: str | Sequence[str] | None = None, name: str = "folder"
                ) -> DatasetSource:
    """Read a class-per-folder dataset.

    Options:
        layout:  `auto` (default: split folders if the top level has train/val/valid/
                 validation/test folders, else class folders), `classes` or `splits`.
        split:   split name for the single-split layout (default `train`).
        classes: class names in id order (list or comma-separated); default: sorted folder
                 names over all splits. Folders not in an explicit list are skipped.
        name:    dataset name recorded in the source (default `folder`).
    Keys are the file path under root without extension, made safe (`train/cat/001.jpg` →
    `train_cat_001`). Files of other types and nested folders are skipped with a reason.
    """
    layout = as_choice(layout, "layout", ("auto", "classes", "splits"))
    root = os.path.abspath(root)
    require_dir(root, "dataset folder")
    splits = split_folders(root, layout, split)
    found = {name: subfolders(folder) for name, folder in splits.items()}
    names = class_list(classes, (c for per_split in found.values() for c in per_split))
    ids = {name: i for i, name in enumerate(names)}

    samples: list[tuple[str, str, int, Media]] = []  # split, path, label, media
    skipped: list[tuple[str, str]] = []
    for split_name, folder in splits.items():
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_dir() and not entry.name.startswith("."):
                skipped.append((entry.path, "file outside any class folder"))
        for class_name in found[split_name]:
            class_dir = os.path.join(folder, class_name)
            if class_name not in ids:
                skipped.append((class_dir, f"class {class_name!r} not in classes={names}"))
                continue
            for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                media = media_of(entry.name)
                if entry.is_dir():
                    skipped.append((entry.path, "nested folder (each sample is one file)"))
                elif media is None:
                    skipped.append((entry.path, "not an image or video file"))
                else:
                    samples.append((split_name, entry.path, ids[class_name], media))

    kinds = {media for *_, media in samples}
    if len(kinds) > 1:
        raise SourceFormatError(root, "mixes image and video files; one dataset is one modality")
    out = SourceCollector(name, "video" if kinds == {"video"} else "image", names,
                          splits=list(splits))
    for path, reason in skipped:
        out.skip(path, reason)
    for split_name, path, label, media in samples:
        try:
            check_file(path)
        except Unusable as reason:
            out.skip(path, str(reason))
            continue
        rel = relative(root, path)
        out.record(split_name, safe_key(strip_extension(rel)), label, media, (path,),
                   {"source": rel, "class": names[label]}, path)
    return out.finish(root)
