"""Pixel normalisation shared by the data pipelines (which apply it) and the MAE loss (which
undoes it to build reconstruction targets, docs/method.md §1.5)."""
from __future__ import annotations

import functools

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` on `device`, made once per process: copying a Python list to a GPU is a
    synchronous transfer, which the MAE loss would otherwise pay at every step. Made outside
    any inference mode, so autograd may save it whatever the first caller was in."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def channel_view(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """A (1, C, 1, ...) tensor broadcastable over (B, C, ...) images or clips."""
    shape = (1, len(values)) + (1,) * (like.ndim - 2)
    return _constant(values, like.dtype, like.device).view(shape)


def unnormalize(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, ...) pixels back to [0, 1]."""
    return pixels * channel_view(IMAGENET_STD, pixels) + channel_view(IMAGENET_MEAN, pixels)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] (B, 3, ...) pixels to ImageNet normalisation."""
    return (pixels - channel_view(IMAGENET_MEAN, pixels)) / channel_view(IMAGENET_STD, pixels)


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 channels-last (..., H, W, 3) → normalised float (3, ..., H, W).

    (H, W, 3) images become (3, H, W); (T, H, W, 3) clips become (3, T, H, W).
    """
    x = frames.float().div(255).movedim(-1, 0)
    return normalize(x.unsqueeze(0))[0]
