"""DFEW (docs/method.md §4): 5-fold single-labelled split CSVs + one JPEG frame folder per clip.

Layout under `root` (the official `data/DFEW`):
    EmoLabel_DataSplit/train(single-labeled)/train_set_{1..5}.csv   header `video_name,label`
    EmoLabel_DataSplit/test(single-labeled)/test_set_{1..5}.csv
    clip_jpg_256/<video_name>/*.jpg
`video_name` is a 5-digit zero-padded string (`02522`) and stays one; labels are already 0-based
(official DFEW id − 1).
"""
from __future__ import annotations

from .base import DatasetSource
from .files import JPEG_EXTENSIONS
from .kfold_frames import KFoldLayout, read_kfold_frames

CLASS_NAMES = ("Happiness", "Sadness", "Neutral", "Anger", "Surprise", "Disgust", "Fear")
FOLDS = range(1, 6)


def layout(split_dir: str = "EmoLabel_DataSplit") -> KFoldLayout:
    return KFoldLayout(
        name="dfew",
        class_names=CLASS_NAMES,
        header=("video_name", "label"),
        test_files=tuple(f"{split_dir}/test(single-labeled)/test_set_{k}.csv" for k in FOLDS),
        train_files=tuple(f"{split_dir}/train(single-labeled)/train_set_{k}.csv" for k in FOLDS),
        frame_extensions=JPEG_EXTENSIONS,
    )


def read_dfew(root: str, *, frames_dir: str = "clip_jpg_256",
              split_dir: str = "EmoLabel_DataSplit") -> DatasetSource:
    """Read DFEW as five disjoint parts `part1..part5` (part k = test_set_k) with folds
    {k: train = the other parts, test = part k}; the CSVs are verified to form that partition.

    Options:
        frames_dir: frame folders root, relative to `root` or absolute (default `clip_jpg_256`).
        split_dir:  label CSV folder, relative to `root` or absolute (default `EmoLabel_DataSplit`).
    """
    return read_kfold_frames(root, layout(split_dir), frames_dir)
