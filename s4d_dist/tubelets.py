"""How pixels become tokens, shared by the encoder, the MAE targets, the mask drawing and the
FLOP count (docs/method.md §1.1-1.2).

A clip (B, C, T, H, W) is cut into tubelets of (tubelet, patch, patch): (T / tubelet) temporal
slots of (H / patch)·(W / patch) tokens. An image (B, C, H, W) is repeated to one tubelet
(the official "PadIm2Video repeat"), so it is a single temporal slot.
"""
from __future__ import annotations

import torch


def num_tokens(img_size: int, patch: int, tubelet: int, num_frames: int, modality: str) -> int:
    """Tokens per sample: one temporal slot for an image, num_frames / tubelet for a video."""
    per_frame = (img_size // patch) ** 2
    return (num_frames // tubelet) * per_frame if modality == "video" else per_frame


def model_tokens(model_cfg, modality: str) -> int:
    """`num_tokens` for the `model` section of a run's config."""
    m = model_cfg
    return num_tokens(m.img_size, m.patch, m.tubelet, m.num_frames, modality)


def as_clip(pixels: torch.Tensor, tubelet: int) -> torch.Tensor:
    """An image (B, C, H, W) repeated to one tubelet (B, C, tubelet, H, W), as a view; a clip
    (B, C, T, H, W) is returned as it is."""
    if pixels.ndim == 4:
        return pixels.unsqueeze(2).expand(-1, -1, tubelet, -1, -1)
    return pixels
