"""Tiny fake datasets in exactly the real on-disk layouts and label formats (docs/method.md §4).

One function per dataset, `make_<name>(root, ...) -> dict` of expected facts, shared by the
reader tests, the shard builder's tests and the CLI tests. The files are real (Pillow images,
a PyAV mp4) so the builder can decode them, and each frame's grey level encodes its index
(`frame_value`) so a decoded clip can be checked for frame order.

Facts returned (keys present where they apply):
    root          the dataset root to hand to the reader
    class_names   class names in id order
    splits        {split: {key: label}} of the samples a reader must keep
    frames        {key: number of frames} for frame-folder datasets
    paths         {key: the media path (file or frame folder)}
    skipped       {input path: fragment of the skip reason} for the injected defects
    folds         {k: {"train": [parts], "test": [part]}} for k-fold datasets
    parts         {clip name: part number} for k-fold datasets (defective clips included)
    meta          {key: {speaker, video, utterance}} for VoxCeleb2
    label_files   {name: path} of the label files written (to corrupt them in tests)
Defects (`missing=`, `empty=`, `bad_label=`, ...) each add one extra listed sample that a
reader must skip, so the kept counts do not depend on which defects are switched on.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SIZE = 8

DFEW_CLASSES = ["Happiness", "Sadness", "Neutral", "Anger", "Surprise", "Disgust", "Fear"]
MAFW_CLASSES = ["Anger", "Anxiety", "Contempt", "Disappointment", "Disgust", "Fear", "Happiness",
                "Helplessness", "Neutral", "Sadness", "Surprise"]
FERV39K_CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
AFFECTNET_CLASSES = ["Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger",
                     "Contempt"]
RAFDB_CLASSES = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]


# --------------------------------------------------------------------------- media files

def frame_value(index: int) -> int:
    """Grey level of frame `index` (1-based): distinct for the first 12 frames, far enough
    apart to survive JPEG."""
    return (10 + 20 * index) % 256


def write_image(path: str, value: int = 128) -> None:
    """A solid IMAGE_SIZE² RGB image; the format follows the extension (JPEG/PNG/BMP)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (value, value, value)).save(path)


def write_frames(folder: str, count: int, pattern: str) -> None:
    """Frames 1..count named by `pattern` (e.g. "{}.jpg": unpadded, so lexicographic order
    would put 10 before 2)."""
    for index in range(1, count + 1):
        write_image(os.path.join(folder, pattern.format(index)), frame_value(index))


_MP4_CACHE: dict[int, bytes] = {}


def tiny_mp4(frames: int = 4) -> bytes:
    """A real 16×16 MPEG-4 clip (encoded once per length, then copied)."""
    if frames not in _MP4_CACHE:
        import av  # imported lazily: only video fixtures need it

        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width = stream.height = 16
            stream.pix_fmt = "yuv420p"
            for index in range(1, frames + 1):
                pixels = np.full((16, 16, 3), frame_value(index), np.uint8)
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        _MP4_CACHE[frames] = buffer.getvalue()
    return _MP4_CACHE[frames]


def write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_lines(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.writelines(f"{line}\n" for line in lines)


# --------------------------------------------------------------------------- k-fold datasets

def _kfold_clips(examples: Sequence[tuple[str, int, int]], n_clips: int, n_classes: int,
                 defects: Sequence[str]) -> list[tuple[str, int, int, str]]:
    """(name, label, part, defect) for n_clips good clips plus one clip per defect.

    The §4 example rows come first with their real labels and parts; the rest get 5-digit names
    spread over 00000-99999, labels cycling over the classes, parts round-robin.
    """
    clips = [(name, label, part, "") for name, label, part in examples[:n_clips]]
    for i in range(len(clips), n_clips):
        clips.append((f"{(i * 7919 + 4000) % 100000:05d}", i % n_classes, i % 5 + 1, ""))
    for j, defect in enumerate(defects):
        label = n_classes + 2 if defect == "bad_label" else j % n_classes
        clips.append((f"{90001 + j:05d}", label, j % 5 + 1, defect))
    assert len({name for name, *_ in clips}) == len(clips), "fixture clip names collide"
    return clips


def _write_kfold_csvs(test_paths: Sequence[str], train_paths: Sequence[str], header: Sequence[str],
                      clips: Sequence[tuple[str, int, int, str]]) -> None:
    """test set k = the part-k clips; train set k = all other clips, in reverse order (real
    files are not sorted, and readers must not depend on it)."""
    for k, (test_path, train_path) in enumerate(zip(test_paths, train_paths), start=1):
        write_csv(test_path, header, [(n, lab) for n, lab, part, _ in clips if part == k])
        write_csv(train_path, header, [(n, lab) for n, lab, part, _ in reversed(clips)
                                       if part != k])


def _make_kfold(root: str, clips: Sequence[tuple[str, int, int, str]], test_paths: list[str],
                train_paths: list[str], header: Sequence[str], frames_root: str, frames: int,
                pattern: str, class_names: list[str]) -> dict[str, Any]:
    _write_kfold_csvs(test_paths, train_paths, header, clips)
    facts: dict[str, Any] = {
        "root": root, "class_names": class_names,
        "splits": {f"part{k}": {} for k in range(1, 6)}, "frames": {}, "paths": {},
        "skipped": {}, "parts": {},
        "folds": {k: {"train": [f"part{j}" for j in range(1, 6) if j != k],
                      "test": [f"part{k}"]} for k in range(1, 6)},
        "label_files": {**{f"test_set_{k}": p for k, p in enumerate(test_paths, start=1)},
                        **{f"train_set_{k}": p for k, p in enumerate(train_paths, start=1)}},
    }
    reasons = {"missing": "missing frame folder", "empty": "empty frame folder",
               "bad_label": "out of range"}
    for name, label, part, defect in clips:
        folder = os.path.join(frames_root, name)
        facts["parts"][name] = part
        if defect:
            facts["skipped"][folder] = reasons[defect]
            if defect == "empty":
                os.makedirs(folder, exist_ok=True)
                write_bytes(os.path.join(folder, "notes.txt"), b"not a frame")
            elif defect == "bad_label":
                write_frames(folder, frames, pattern)
            continue
        write_frames(folder, frames, pattern)
        facts["splits"][f"part{part}"][name] = label
        facts["frames"][name] = frames
        facts["paths"][name] = folder
    return facts


def _defects(missing: bool, empty: bool, bad_label: bool) -> list[str]:
    return [name for name, on in (("missing", missing), ("empty", empty),
                                  ("bad_label", bad_label)) if on]


def make_dfew(root: str, n_clips: int = 10, frames: int = 6, *, missing: bool = False,
              empty: bool = False, bad_label: bool = False,
              frame_pattern: str = "{}.jpg") -> dict[str, Any]:
    """DFEW under root: EmoLabel_DataSplit/{train,test}(single-labeled)/{train,test}_set_k.csv
    (header `video_name,label`, 5-digit names, 0-based labels) and clip_jpg_256/<name>/*.jpg.
    Includes the §4 rows `00001,1` (test_set_1) and `02522,5`, `02536,5`, `02578,6`
    (train_set_1)."""
    examples = [("00001", 1, 1), ("02522", 5, 2), ("02536", 5, 3), ("02578", 6, 4)]
    clips = _kfold_clips(examples, n_clips, len(DFEW_CLASSES), _defects(missing, empty, bad_label))
    split_dir = os.path.join(root, "EmoLabel_DataSplit")
    return _make_kfold(
        root, clips,
        [os.path.join(split_dir, "test(single-labeled)", f"test_set_{k}.csv") for k in range(1, 6)],
        [os.path.join(split_dir, "train(single-labeled)", f"train_set_{k}.csv")
         for k in range(1, 6)],
        ("video_name", "label"), os.path.join(root, "clip_jpg_256"), frames, frame_pattern,
        DFEW_CLASSES)


def make_mafw(root: str, n_clips: int = 12, frames: int = 6, *, missing: bool = False,
              empty: bool = False, bad_label: bool = False,
              frame_pattern: str = "{}.png") -> dict[str, Any]:
    """MAFW under root: anno/single/no_caption/set_k/{train,test}.csv (header
    `video_name,labels`, 5-digit names, 11 classes) and frames_crop_align_224/<name>/*.png.
    Includes the §4 rows `00025,0` (set_1 test) and `03747,0`, `03785,0` (set_1 train)."""
    examples = [("00025", 0, 1), ("03747", 0, 2), ("03785", 0, 3)]
    clips = _kfold_clips(examples, n_clips, len(MAFW_CLASSES), _defects(missing, empty, bad_label))
    anno = os.path.join(root, "anno", "single", "no_caption")
    return _make_kfold(
        root, clips, [os.path.join(anno, f"set_{k}", "test.csv") for k in range(1, 6)],
        [os.path.join(anno, f"set_{k}", "train.csv") for k in range(1, 6)],
        ("video_name", "labels"), os.path.join(root, "frames_crop_align_224"), frames,
        frame_pattern, MAFW_CLASSES)


# --------------------------------------------------------------------------- FERV39K

def make_ferv39k(root: str, n_train: int = 8, n_test: int = 4, frames: int = 5, *,
                 missing: bool = False, empty: bool = False, bad_label: bool = False,
                 mismatch: bool = False, frame_pattern: str = "{}.jpg") -> dict[str, Any]:
    """FERV39K under root: Annotation/{train,test}.csv (header `path,id`, path
    `<Scene>/<Emotion>/<4-digit id>`, alphabetical ids) and 2_ClipsforFaceCrop/<path>/*.jpg.
    Includes the §4 rows `Crime/Angry/0063,0`, `DailyLife/Angry/0619,0`, `Argue/Surprise/0196,6`.
    Defects go to the test split; `mismatch` lists a Happy clip with the Sad id."""
    scenes = ["Crime", "DailyLife", "Argue", "Meeting"]
    rows: dict[str, list[tuple[str, int, str]]] = {
        "train": [("Crime/Angry/0063", 0, ""), ("DailyLife/Angry/0619", 0, "")],
        "test": [("Argue/Surprise/0196", 6, "")]}
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(len(rows[split]), count):
            label = (i + len(split)) % 7
            rows[split].append((f"{scenes[i % 4]}/{FERV39K_CLASSES[label]}/{1000 + i:04d}", label,
                                ""))
        rows[split] = rows[split][:count]
    defects = _defects(missing, empty, bad_label) + (["mismatch"] if mismatch else [])
    for j, defect in enumerate(defects):
        label = {"bad_label": 9, "mismatch": 5}.get(defect, 1)
        emotion = "Happy" if defect in ("bad_label", "mismatch") else FERV39K_CLASSES[label]
        rows["test"].append((f"Meeting/{emotion}/{9000 + j:04d}", label, defect))

    frames_root = os.path.join(root, "2_ClipsforFaceCrop")
    facts: dict[str, Any] = {"root": root, "class_names": FERV39K_CLASSES,
                             "splits": {"train": {}, "test": {}}, "frames": {}, "paths": {},
                             "skipped": {}, "label_files": {}}
    reasons = {"missing": "missing frame folder", "empty": "empty frame folder",
               "bad_label": "out of range", "mismatch": "path says Happy"}
    for split, split_rows in rows.items():
        csv_path = os.path.join(root, "Annotation", f"{split}.csv")
        write_csv(csv_path, ("path", "id"), [(path, label) for path, label, _ in split_rows])
        facts["label_files"][split] = csv_path
        for path, label, defect in split_rows:
            folder = os.path.join(frames_root, *path.split("/"))
            if defect != "missing":
                os.makedirs(folder, exist_ok=True)
            if defect != "empty" and defect != "missing":
                write_frames(folder, frames, frame_pattern)
            if defect:
                facts["skipped"][folder] = reasons[defect]
                continue
            key = path.replace("/", "_")
            facts["splits"][split][key] = label
            facts["frames"][key] = frames
            facts["paths"][key] = folder
    return facts


# --------------------------------------------------------------------------- image datasets

def affectnet_relpath(index: int) -> str:
    """`<dir>/<56-hex name>_aligned/face_det_000000.bmp`, the §4 naming."""
    digest = hashlib.sha224(str(index).encode()).hexdigest()
    return f"{100 + index * 37 % 900}/{digest}_aligned/face_det_000000.bmp"


def make_affectnet(root: str, n_train: int = 14, n_test: int = 7, *, classes: int = 7,
                   missing: bool = False, bad_label: bool = False) -> dict[str, Any]:
    """AffectNet under root: headerless space-separated `<relpath> <label>` lists and BMP
    images under Manually_Annotated_Images/. 7 classes: the official
    `{train,test}_affectnet7_2w.txt` (with the two §4 example rows in test); 8 classes:
    `{train,test}_affectnet8.txt` (no official names exist; pass them as options).
    `bad_label` adds a Contempt (7) row under 7 classes, a No-Face (10) row under 8."""
    class_names = AFFECTNET_CLASSES[:classes]
    examples = {"test": [
        ("680/cfa0c679da3dbe9f01e92cdeda2da1065aa50e7bf0b3990ec335f726_aligned/"
         "face_det_000000.bmp", 0),
        ("398/f48738940564b9e3b0a8133adedc06642d50fdf46cea97da20572185_aligned/"
         "face_det_000000.bmp", 2)]}
    images = os.path.join(root, "Manually_Annotated_Images")
    facts: dict[str, Any] = {"root": root, "class_names": class_names,
                             "splits": {"train": {}, "test": {}}, "paths": {}, "skipped": {},
                             "label_files": {}}
    index = 0
    for split, count in (("train", n_train), ("test", n_test)):
        rows: list[tuple[str, int, str]] = [(p, lab, "") for p, lab in examples.get(split, [])]
        while len(rows) < count:
            index += 1
            rows.append((affectnet_relpath(index), (index * 3) % classes, ""))
        rows = rows[:count]
        if split == "test":
            if bad_label:
                rows.insert(1, (affectnet_relpath(900), 7 if classes == 7 else 10, "out of range"))
            if missing:
                rows.insert(0, (affectnet_relpath(901), 1, "missing file"))
        name = f"{split}_affectnet7_2w.txt" if classes == 7 else f"{split}_affectnet8.txt"
        list_path = os.path.join(root, name)
        write_lines(list_path, [f"{rel} {label}" for rel, label, _ in rows])
        facts["label_files"][split] = list_path
        for rel, label, defect in rows:
            image = os.path.join(images, *rel.split("/"))
            if defect != "missing file":
                write_image(image, 40 + 20 * label)
            if defect:
                facts["skipped"][image] = defect
                continue
            key = rel[:-len(".bmp")].replace("/", "_")
            facts["splits"][split][key] = label
            facts["paths"][key] = image
    return facts


def make_rafdb(root: str, n_train: int = 10, n_test: int = 5, *, missing: bool = False,
               bad_label: bool = False) -> dict[str, Any]:
    """RAF-DB basic under root: EmoLabel/list_patition_label.txt (`train_00001.jpg 5`,
    `test_0001.jpg 3`; 1-based labels, 5-digit train / 4-digit test numbers) and
    Image/aligned/<stem>_aligned.jpg. Facts carry the 0-based labels."""
    lines: list[str] = []
    facts: dict[str, Any] = {"root": root, "class_names": RAFDB_CLASSES,
                             "splits": {"train": {}, "test": {}}, "paths": {}, "skipped": {}}
    entries: list[tuple[str, int, str]] = []
    for split, count, width in (("train", n_train, 5), ("test", n_test, 4)):
        for i in range(1, count + 1):
            label = {("train", 1): 5, ("test", 1): 3}.get((split, i), (i * 3) % 7 + 1)
            entries.append((f"{split}_{i:0{width}d}", label, ""))
    if missing:
        entries.append(("test_0999", 2, "missing file"))
    if bad_label:
        entries.append(("train_99999", 8, "out of range"))
    for stem, label, defect in entries:
        lines.append(f"{stem}.jpg {label}")
        image = os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg")
        if defect != "missing file":
            write_image(image, 30 * label)
        if defect:
            facts["skipped"][image] = defect
            continue
        facts["splits"][stem.split("_")[0]][stem] = label - 1
        facts["paths"][stem] = image
    list_path = os.path.join(root, "EmoLabel", "list_patition_label.txt")
    write_lines(list_path, lines)
    facts["label_files"] = {"list": list_path}
    return facts


# --------------------------------------------------------------------------- VoxCeleb2

def make_voxceleb2(root: str, speakers: int = 2, videos: int = 2, utterances: int = 2, *,
                   frames: int = 4, empty: bool = False, stray: bool = False) -> dict[str, Any]:
    """VoxCeleb2 dev under root: dev/mp4/idNNNNN/<11-char YouTube id>/NNNNN.mp4, real mp4s.
    YouTube ids include `-` and `_` as real ones do. `empty` adds a 0-byte clip, `stray` a
    non-clip file in a video folder."""
    facts: dict[str, Any] = {"root": root, "class_names": [], "splits": {"train": {}},
                             "paths": {}, "meta": {}, "skipped": {}}
    mp4_root = os.path.join(root, "dev", "mp4")
    for s in range(speakers):
        speaker = f"id{12 + s * 1000:05d}"
        for v in range(videos):
            video = f"{'21Uxsk56VDQ' if v == 0 else f'a-b_c{s}{v}xyzw'}"[:11]
            for u in range(1, utterances + 1):
                utterance = f"{u:05d}"
                path = os.path.join(mp4_root, speaker, video, f"{utterance}.mp4")
                write_bytes(path, tiny_mp4(frames))
                key = f"{speaker}_{video}_{utterance}"
                facts["splits"]["train"][key] = None
                facts["paths"][key] = path
                facts["meta"][key] = {"speaker": speaker, "video": video,
                                      "utterance": utterance}
    first_video = os.path.join(mp4_root, "id00012", "21Uxsk56VDQ")
    if empty:
        path = os.path.join(first_video, "00999.mp4")
        write_bytes(path, b"")
        facts["skipped"][path] = "empty file"
    if stray:
        path = os.path.join(first_video, "notes.txt")
        write_bytes(path, b"x")
        facts["skipped"][path] = "not an utterance clip"
    return facts


# --------------------------------------------------------------------------- generic readers

def make_image_folder(root: str, classes: Sequence[str] = ("angry", "happy", "sad"),
                      per_class: int = 2, *, splits: Sequence[str] | None = ("train", "test"),
                      media: str = "image", stray: bool = False) -> dict[str, Any]:
    """A class-per-folder dataset: root/<split>/<class>/<n>.jpg (or .mp4 with media="video"),
    or root/<class>/... with splits=None (one split, `train`). `stray` adds a .txt file."""
    class_names = sorted(classes)
    facts: dict[str, Any] = {"root": root, "class_names": class_names, "splits": {},
                             "paths": {}, "skipped": {}}
    for split in splits or ("train",):
        base = os.path.join(root, split) if splits else root
        facts["splits"][split] = {}
        for name in classes:
            for i in range(1, per_class + 1):
                stem = f"{i:03d}"
                if media == "image":
                    path = os.path.join(base, name, f"{stem}.jpg")
                    write_image(path, 50 * class_names.index(name))
                else:
                    path = os.path.join(base, name, f"{stem}.mp4")
                    write_bytes(path, tiny_mp4())
                key = "_".join(([split] if splits else []) + [name, stem])
                facts["splits"][split][key] = class_names.index(name)
                facts["paths"][key] = path
        if stray:
            path = os.path.join(base, classes[0], "readme.txt")
            write_bytes(path, b"x")
            facts["skipped"][path] = "not an image or video"
    return facts


def make_csv_dataset(root: str, classes: Sequence[str] = ("calm", "joy"), per_split: int = 4, *,
                     by_name: bool = True, missing: bool = False) -> dict[str, Any]:
    """A generic `path,label` dataset: images/<split>_<n>.png listed in root/train.csv and
    root/test.csv, labels as class names (by_name) or integer ids."""
    class_names = sorted(classes) if by_name else [str(i) for i in range(len(classes))]
    facts: dict[str, Any] = {"root": root, "class_names": class_names,
                             "splits": {}, "paths": {}, "skipped": {}, "label_files": {}}
    for split in ("train", "test"):
        rows = []
        facts["splits"][split] = {}
        for i in range(per_split):
            label = i % len(classes)
            rel = f"images/{split}_{i}.png"
            write_image(os.path.join(root, rel), 60 * label)
            rows.append((rel, sorted(classes)[label] if by_name else label))
            facts["splits"][split][f"images_{split}_{i}"] = label
            facts["paths"][f"images_{split}_{i}"] = os.path.join(root, *rel.split("/"))
        if missing and split == "test":
            rows.append(("images/gone.png", sorted(classes)[0] if by_name else 0))
            facts["skipped"][os.path.join(root, "images", "gone.png")] = "missing file"
        path = os.path.join(root, f"{split}.csv")
        write_csv(path, ("path", "label"), rows)
        facts["label_files"][split] = path
    return facts
