"""What a user points `predict` at, turned into a list of media inputs, then into frames.

An argument is an image file, a video file, a CSV list, a glob, or a folder. A folder holds
any mix of images and videos (each one input) and subfolders: a subfolder whose images are
numbered frames (one name with a number that runs on by one: `00001.jpg`, `frame_0002.png`,
...) is one clip, any other (`happy/IMG_4411.jpg`, `happy/anna.png`) holds photos, each one
input, and its videos are inputs too — the layouts of a DFEW-style frame-folder dataset, of
photos or videos sorted into class folders, of an image test set or a video folder alike. `--photo-folders` takes every
subfolder's images as photos; a folder that is itself one clip's frames is named with
`--clip-folders` (or listed in a CSV, where a folder is always one clip). Nothing is decoded
while listing, so a bad file becomes a per-input error later instead of stopping the listing.
"""
from __future__ import annotations

import csv
import glob
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from s4d_dist.shards.media import (MediaError, decode_video, load_frames, load_image,
                                   missing_frames)
from s4d_dist.shards.sources.files import (IMAGE_EXTENSIONS, Unusable, check_file,
                                           frame_order_key, has_extension, list_frames)
from s4d_dist.shards.sources.folder import media_of

Kind = Literal["image", "video", "frames"]
CSV_PATH_COLUMNS = ("path", "input", "file", "video", "image")  # else the first column
_NUMBERS = re.compile(r"(\d+)")


class InputError(Exception):
    """An input that cannot be scored; the message is the reason shown in the output."""


@dataclass(frozen=True)
class Input:
    path: str
    kind: Kind

    @property
    def modality(self) -> str:
        return "image" if self.kind == "image" else "video"


@dataclass
class Decoded:
    """An input's frames, uint8 (T, H, W, 3) (T = 1 for an image), the frame rate its container
    declares (None for images and frame folders), and what to tell about them."""

    frames: np.ndarray
    fps: float | None = None
    warning: str | None = None


def numbered_frames(names: list[str]) -> bool:
    """Whether file names are one clip's numbered frames: at least two, the same name but for
    their last number, and those numbers consecutive (`1.jpg`, `2.jpg`; `f_009.png`, `f_010.png`)."""
    if len(names) < 2:
        return False
    patterns, numbers = set(), []
    for name in names:
        runs = _NUMBERS.split(name)
        if len(runs) < 3:  # no number
            return False
        patterns.add(tuple(runs[:-2]) + (runs[-1],))
        numbers.append(int(runs[-2]))
    return len(patterns) == 1 and sorted(numbers) == list(range(min(numbers),
                                                               min(numbers) + len(names)))


def _from_folder(folder: str, photo_folders: bool = False) -> list[Input]:
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            names = sorted(n for n in os.listdir(entry.path) if not n.startswith("."))
            images = [n for n in names if has_extension(n, IMAGE_EXTENSIONS)]
            if images and not photo_folders and numbered_frames(images):
                found.append(Input(entry.path, "frames"))
            else:
                found += [Input(os.path.join(entry.path, n), "image")
                          for n in sorted(images, key=frame_order_key)]
            found += [Input(os.path.join(entry.path, n), "video") for n in names
                      if media_of(n) == "video"]
        elif kind := media_of(entry.name):
            found.append(Input(entry.path, kind))
    return found


def _from_csv(path: str) -> list[Input]:
    """Rows of a CSV: the `path` (or input/file/video/image) column, else the first; relative
    paths are under the CSV's folder; a folder listed is one clip's frames."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and row[0].strip()]
    if not rows:
        return []
    header = [name.strip().lower() for name in rows[0]]
    column = next((header.index(c) for c in CSV_PATH_COLUMNS if c in header), None)
    rows = rows[1:] if column is not None else rows
    base = os.path.dirname(os.path.abspath(path))
    found = []
    for row in rows:
        entry = os.path.join(base, os.path.expanduser(row[column or 0].strip()))
        found.append(Input(entry, "frames" if os.path.isdir(entry) else media_of(entry) or "image"))
    return found


def expand(arguments: list[str], clip_folders: bool = False,
           photo_folders: bool = False) -> list[Input]:
    """Every input named by `arguments`, in the order given (folders and globs sorted).

    A path that does not exist and matches no glob is still returned (as an image or video
    by its extension) so that the output reports it instead of the listing failing.
    """
    found: list[Input] = []
    for argument in arguments:
        matches = [argument] if os.path.exists(argument) else sorted(glob.glob(argument))
        matches = matches or [argument]
        for path in matches:
            if os.path.isdir(path):
                found += ([Input(path, "frames")] if clip_folders
                          else _from_folder(path, photo_folders))
            elif has_extension(path, (".csv",)):
                found += _from_csv(path)
            else:
                found.append(Input(path, media_of(path) or "image"))
    return found


def choose_decoder(decoder: str, device: torch.device) -> str:
    """`--decoder`: auto = DALI (dali.py) when the model runs on a GPU and DALI imports, else
    python (this module's `decode`); dali.py says why."""
    if decoder != "auto":
        return decoder
    dali = importlib.util.find_spec("nvidia.dali") is not None
    return "dali" if dali and device.type == "cuda" else "python"


def decode(item: Input) -> Decoded:
    """An input decoded by Pillow / PyAV; InputError if unusable. A video that decodes to fewer
    frames than its container declares (a cut file, a broken tail) is scored on the frames that
    decode, with a warning saying how many."""
    try:
        if item.kind == "frames":
            return Decoded(load_frames(list(list_frames(item.path, IMAGE_EXTENSIONS)))[0])
        check_file(item.path)
        if item.kind == "video":
            frames, fps, _, declared = decode_video(item.path)
            return Decoded(frames, fps, missing_frames(len(frames), declared))
        return Decoded(load_image(item.path)[None])
    except (MediaError, Unusable) as error:
        raise InputError(str(error)) from None
    except OSError as error:  # permissions, a folder vanished mid-run
        raise InputError(f"unreadable: {error}") from None
