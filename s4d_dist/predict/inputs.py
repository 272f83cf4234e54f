"""What a user points `predict` at, turned into a list of media inputs, then into frames.

An argument is an image file, a video file, a CSV list, a glob, or a folder. A folder holds
any mix of images and videos (each one input) and frame folders (each subfolder of images is
one clip) — the layout of an image test set, a video folder or a DFEW-style frame-folder
dataset alike. A folder that is itself one clip's frames is named with `--clip-folders` (or
listed in a CSV, where a folder is always one clip). Nothing is decoded while listing, so a
bad file becomes a per-input error later instead of stopping the listing.
"""
from __future__ import annotations

import csv
import glob
import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from s4d_dist.shards.media import MediaError, load_frames, load_image, load_video
from s4d_dist.shards.sources.files import (IMAGE_EXTENSIONS, Unusable, check_file,
                                           has_extension, list_frames)
from s4d_dist.shards.sources.folder import media_of

Kind = Literal["image", "video", "frames"]
CSV_PATH_COLUMNS = ("path", "input", "file", "video", "image")  # else the first column


class InputError(Exception):
    """An input that cannot be scored; the message is the reason shown in the output."""


@dataclass(frozen=True)
class Input:
    path: str
    kind: Kind

    @property
    def modality(self) -> str:
        return "image" if self.kind == "image" else "video"


def _from_folder(folder: str) -> list[Input]:
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if any(has_extension(n, IMAGE_EXTENSIONS) for n in os.listdir(entry.path)):
                found.append(Input(entry.path, "frames"))
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


def expand(arguments: list[str], clip_folders: bool = False) -> list[Input]:
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
                found += [Input(path, "frames")] if clip_folders else _from_folder(path)
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


def decode(item: Input) -> np.ndarray:
    """An input's frames decoded by Pillow / PyAV, uint8 (T, H, W, 3) (T = 1 for an image);
    InputError if unusable."""
    try:
        if item.kind == "frames":
            return load_frames(list(list_frames(item.path, IMAGE_EXTENSIONS)))[0]
        check_file(item.path)
        if item.kind == "video":
            return load_video(item.path)[0]
        return load_image(item.path)[None]
    except (MediaError, Unusable) as error:
        raise InputError(str(error)) from None
    except OSError as error:  # permissions, a folder vanished mid-run
        raise InputError(f"unreadable: {error}") from None
