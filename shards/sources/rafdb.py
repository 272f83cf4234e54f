"""RAF-DB basic: one list file for both splits + aligned face images.

Layout under `root` (RAF-DB `basic/`):
    EmoLabel/list_patition_label.txt   lines `train_00001.jpg 5` / `test_0001.jpg 3`
    Image/aligned/<stem>_aligned.jpg   (Image/original/<name> for the unaligned photos)
Labels are 1-based (1 Surprise … 7 Neutral) and become 0-based here; the split is the name's
prefix, since the file itself has no split column. (The file name's misspelling "patition" is
RAF-DB's own.)
"""
from __future__ import annotations

import os

from .base import DatasetSource, SourceFormatError
from .collect import SourceCollector
from .files import relative, resolve, safe_key, strip_extension
from .labelfiles import parse_label_id, read_list_rows
from .options import as_choice

CLASS_NAMES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
SPLITS = ("train", "test")


def image_path(image_dir: str, name: str, images: str) -> str:
    if images == "aligned":
        return os.path.join(image_dir, f"{strip_extension(name)}_aligned.jpg")
    return os.path.join(image_dir, name)


def read_rafdb(root: str, *, label_file: str = "EmoLabel/list_patition_label.txt",
               images: str = "aligned", image_dir: str | None = None) -> DatasetSource:
    """Read RAF-DB basic into splits `train` and `test`; keys are the image stems
    (`train_00001`), labels 0-based in the order Surprise, Fear, Disgust, Happiness, Sadness,
    Anger, Neutral.

    Options:
        label_file: relative to `root` or absolute (default `EmoLabel/list_patition_label.txt`).
        images:     `aligned` (default; `Image/aligned/<stem>_aligned.jpg`) or `original`
                    (`Image/original/<name>`).
        image_dir:  override the image folder (default `Image/<images>`).
    """
    images = as_choice(images, "images", ("aligned", "original"))
    root = os.path.abspath(root)
    list_path = resolve(root, label_file)
    folder = resolve(root, image_dir or f"Image/{images}")
    out = SourceCollector("rafdb", "image", CLASS_NAMES, splits=SPLITS)
    for line, name, label_text in read_list_rows(list_path):
        split = name.split("_", 1)[0]
        if split not in SPLITS:
            raise SourceFormatError(
                list_path, f"image name {name!r} starts with neither train_ nor test_", line)
        label = parse_label_id(label_text, list_path, line) - 1
        image = image_path(folder, name, images)
        out.listed_image(split, safe_key(strip_extension(name)), label, image,
                         relative(root, image), list_path, line,
                         as_written=f"{label_text} (1-based)")
    return out.finish(root)
