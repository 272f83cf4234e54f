"""MAFW (docs/method.md §4): 5-fold single-label CSVs + one PNG frame folder per clip.

Layout under `root` (the official `data/MAFW`):
    anno/single/no_caption/set_{1..5}/{train,test}.csv   header `video_name,labels`
    frames_crop_align_224/<video_name>/*.png
`video_name` is a 5-digit zero-padded string; labels 0-based over 11 alphabetical classes. The
unused top-level `train.csv`/`test.csv` (§4) are deliberately not read.
"""
from __future__ import annotations

from .base import DatasetSource
from .files import PNG_EXTENSIONS
from .kfold_frames import KFoldLayout, read_kfold_frames

CLASS_NAMES = ("Anger", "Anxiety", "Contempt", "Disappointment", "Disgust", "Fear", "Happiness",
               "Helplessness", "Neutral", "Sadness", "Surprise")
FOLDS = range(1, 6)


def layout(anno_dir: str = "anno/single/no_caption") -> KFoldLayout:
    return KFoldLayout(
        name="mafw",
        class_names=CLASS_NAMES,
        header=("video_name", "labels"),
        test_files=tuple(f"{anno_dir}/set_{k}/test.csv" for k in FOLDS),
        train_files=tuple(f"{anno_dir}/set_{k}/train.csv" for k in FOLDS),
        frame_extensions=PNG_EXTENSIONS,
    )


def read_mafw(root: str, *, frames_dir: str = "frames_crop_align_224",
              anno_dir: str = "anno/single/no_caption") -> DatasetSource:
    """Read MAFW as five disjoint parts `part1..part5` (part k = set_k/test.csv) with folds
    {k: train = the other parts, test = part k}; the CSVs are verified to form that partition.

    Options:
        frames_dir: frame folders root, relative to `root` or absolute
                    (default `frames_crop_align_224`).
        anno_dir:   folder holding set_1..set_5, relative to `root` or absolute
                    (default `anno/single/no_caption`).
    """
    return read_kfold_frames(root, layout(anno_dir), frames_dir)
