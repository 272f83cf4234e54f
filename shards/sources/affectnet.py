"""AffectNet (docs/method.md §4): headerless `<relpath> <label>` list files + image folder.

The official fine-tuning lists (`{train,test}_affectnet7_2w.txt`, root `data/AffectNetdataset`)
use AffectNet's native ids with Contempt (7) removed; the 8-class variant keeps Contempt as 7.
Native ids beyond the variant (7 Contempt in the 7-class variant, 8 None, 9 Uncertain,
10 No-Face) are skipped with a reason rather than treated as a broken file, since real lists
derived from AffectNet's CSVs do carry them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from .base import DatasetSource
from .collect import SourceCollector
from .files import relative, resolve, safe_key, strip_extension
from .labelfiles import parse_label_id, read_list_rows
from .options import as_int, as_list

CLASS_NAMES_8 = ("Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger",
                 "Contempt")
SPLIT_NAMES = ("train", "val", "test")


def default_lists(classes: int) -> dict[str, list[str]]:
    """The official 7-class list names; the 8-class variant has none (the official branch
    points at missing files, §3.20), so its lists must be given."""
    if classes != 7:
        raise ValueError("affectnet classes=8 has no official list files: pass train=/test=")
    return {split: [f"{split}_affectnet7_2w.txt"] for split in ("train", "test")}


def read_affectnet(root: str, *, train: str | Sequence[str] | None = None,
                   val: str | Sequence[str] | None = None,
                   test: str | Sequence[str] | None = None,
                   image_root: str = "Manually_Annotated_Images",
                   classes: int | str = 7) -> DatasetSource:
    """Read AffectNet image lists into splits `train` / `val` / `test`.

    Options:
        train, val, test: list file path(s) for that split, relative to `root` or absolute; a
            list or a comma-separated string (several files are concatenated). Giving any of
            them replaces the defaults entirely; without any, the official 7-class
            `train_affectnet7_2w.txt` and `test_affectnet7_2w.txt` in `root` are required.
        image_root: folder the list paths are relative to, relative to `root` or absolute
            (default `Manually_Annotated_Images`).
        classes: 7 (Neutral..Anger, native ids 0-6) or 8 (adds Contempt as 7).
    Keys are the image path without extension, made safe (`680/cfa0…_aligned/face_det_000000`
    → `680_cfa0…_aligned_face_det_000000`), so they are unique across splits.
    """
    classes = as_int(classes, "classes", allowed=(7, 8))
    given = {split: as_list(value) for split, value in zip(SPLIT_NAMES, (train, val, test))}
    lists = {split: files for split, files in given.items() if files} or default_lists(classes)
    root = os.path.abspath(root)
    images = resolve(root, image_root)
    out = SourceCollector("affectnet", "image", CLASS_NAMES_8[:classes],
                          splits=list(lists))
    for split, files in lists.items():
        for list_file in files:
            list_path = resolve(root, list_file)
            for line, relpath, label_text in read_list_rows(list_path):
                label = parse_label_id(label_text, list_path, line)
                image = os.path.join(images, relpath)
                out.listed_image(split, safe_key(strip_extension(relpath)), label, image,
                                 relative(root, image), list_path, line)
    return out.finish(root)
