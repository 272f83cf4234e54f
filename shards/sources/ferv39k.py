"""FERV39K (docs/method.md §4): train/test CSVs of clip paths + one JPEG frame folder per clip.

Layout under `root` (the official `data/FERV39K`):
    Annotation/{train,test}.csv        header `path,id`, path `<Scene>/<Emotion>/<4-digit id>`
    2_ClipsforFaceCrop/<path>/*.jpg
Labels are the alphabetical class ids. The path names the emotion too, so each row is checked
against its id: a disagreement means a bad row (skipped), and if every row disagreed the class
order assumed here would be wrong — which this check would make loud.
"""
from __future__ import annotations

import os

from .base import DatasetSource, SourceFormatError
from .collect import SourceCollector, where
from .files import JPEG_EXTENSIONS, Unusable, list_frames, relative, require_dir, resolve, safe_key
from .labelfiles import parse_label_id, read_csv_rows

CLASS_NAMES = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
SPLITS = ("train", "test")


def read_ferv39k(root: str, *, frames_dir: str = "2_ClipsforFaceCrop",
                 annotation_dir: str = "Annotation") -> DatasetSource:
    """Read FERV39K's `train` and `test` splits; keys are the clip path made safe
    (`Crime/Angry/0063` → `Crime_Angry_0063`).

    Options:
        frames_dir:     frame folders root, relative to `root` or absolute
                        (default `2_ClipsforFaceCrop`).
        annotation_dir: folder with train.csv/test.csv, relative to `root` or absolute
                        (default `Annotation`).
    """
    root = os.path.abspath(root)
    frames_root = resolve(root, frames_dir)
    require_dir(frames_root, "frames folder")
    out = SourceCollector("ferv39k", "video", CLASS_NAMES, splits=SPLITS)
    for split in SPLITS:
        csv_path = resolve(root, os.path.join(annotation_dir, f"{split}.csv"))
        for line, (clip_path, label_text) in read_csv_rows(csv_path, ("path", "id")):
            parts = clip_path.strip("/").split("/")
            if len(parts) != 3 or not all(parts) or ".." in parts:
                raise SourceFormatError(
                    csv_path, f"path {clip_path!r} is not <Scene>/<Emotion>/<id>", line)
            scene, emotion, clip_id = parts
            label = parse_label_id(label_text, csv_path, line)
            folder = os.path.join(frames_root, *parts)
            origin = where(csv_path, line)
            if not out.label_in_range(label, folder, origin):
                continue
            if emotion != CLASS_NAMES[label]:
                out.skip(folder, f"path says {emotion} but label {label} is "
                                 f"{CLASS_NAMES[label]} ({origin})")
                continue
            try:
                frames = list_frames(folder, JPEG_EXTENSIONS)
            except Unusable as reason:
                out.skip(folder, f"{reason} (listed at {origin})")
                continue
            out.record(split, safe_key(scene, emotion, clip_id), label, "frames", frames,
                       {"source": relative(root, folder), "scene": scene, "clip_id": clip_id},
                       csv_path, line)
    return out.finish(root)
