"""Spatial augmentation parameters as boxes in source pixels, drawn with numpy.

Every crop / resize / flip of a recipe becomes one region of interest (ROI) of the decoded
frame that is resampled to the output size in a single step: `(y0, x0, y1, x1)` in source
pixel coordinates (edges, not centres), mirrored horizontally when x0 > x1 — the convention of
DALI's `fn.resize(roi_start, roi_end)`, which the torch fallback (torch_ops.resample) follows.
Drawing the boxes here, not inside DALI, gives both backends the same random crops for the
same seed and makes them a pure function of (seed, epoch, rank, batch), so a resumed epoch
repeats them exactly.

The random draws follow torchvision / timm step by step (same loops, bounds and rounding);
only the random number stream differs (numpy instead of Python's `random` / torch).
"""
from __future__ import annotations

import math

import numpy as np

Roi = tuple[float, float, float, float]  # y0, x0, y1, x1


def full_frame(height: int, width: int) -> Roi:
    return (0.0, 0.0, float(height), float(width))


def mirrored(roi: Roi, flip: bool) -> Roi:
    """The same box read right to left when `flip` (a horizontal flip folded into the ROI)."""
    y0, x0, y1, x1 = roi
    return (y0, x1, y1, x0) if flip else roi


def random_resized_crop(height: int, width: int, scale: tuple[float, float],
                        rng: np.random.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Roi:
    """torchvision RandomResizedCrop.get_params: up to 10 tries of an area fraction in `scale`
    and a log-uniform aspect ratio, else the largest central crop within `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (float(top), float(left), float(top + h), float(left + w))
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (float(top), float(left), float(top + h), float(left + w))


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) after scaling the short side to `short` (pytorchvideo ShortSideScale: floor)."""
    if width < height:
        return int(math.floor(height / width * short)), short
    return short, int(math.floor(width / height * short))


def scaled(roi: Roi, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Roi:
    """A box drawn on a resized frame, mapped back onto the frame before that resize."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    y0, x0, y1, x1 = roi
    return (y0 * sy, x0 * sx, y1 * sy, x1 * sx)


def shifted(roi: Roi, top: float, left: float) -> Roi:
    """A box within a sub-region, in the coordinates of the whole frame."""
    y0, x0, y1, x1 = roi
    return (y0 + top, x0 + left, y1 + top, x1 + left)


def random_crop(height: int, width: int, size: int, rng: np.random.Generator) -> Roi:
    """torchvision RandomCrop(size) without padding."""
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return (float(top), float(left), float(top + size), float(left + size))


def erase_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float] = (0.02, 1 / 3),
              ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> tuple[int, int, int, int] | None:
    """timm / torchvision RandomErasing box (probability applied by the caller): up to 10 tries
    of an area fraction in `scale` and a log-uniform aspect ratio; (top, left, h, w) or None
    when no try fits."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def eval_crop(height: int, width: int, short: int, crop: int, index: int, crops: int) -> Roi:
    """Spatial test view `index` of `crops`: the frame scaled so its short side is `short`,
    then a `crop`-square at int(index · (L − crop) / (crops − 1)) along each axis (kinetics.py
    test mode), mapped back to source pixels.

    On a non-square frame this is the official sliding crop along the long side. The official
    code squashes frames to 160×160 first, so its crops are all the same frame
    (docs/method.md §3.9); here the aspect ratio is kept, and with short > crop the views differ
    even on square frames (corners along the diagonal). One crop is the centre crop.
    """
    h, w = (short, int(round(width * short / height))) if height <= width else \
        (int(round(height * short / width)), short)
    if crops == 1:
        top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    else:
        top, left = int(index * (h - crop) / (crops - 1)), int(index * (w - crop) / (crops - 1))
    return scaled((float(top), float(left), float(top + crop), float(left + crop)), (h, w), (height, width))
