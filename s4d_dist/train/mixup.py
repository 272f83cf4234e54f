"""Mixup / CutMix with label smoothing and the soft-target cross-entropy (docs/method.md §2.8).

timm's "batch" mode, as the official code uses it for both modalities: one λ per batch, each
sample mixed with its mirror in the batch (`x.flip(0)`), CutMix with prob `switch_prob`
(otherwise Mixup), the CutMix box the same on every frame of a clip, λ corrected to the box's
true area. The official code mixed images on the CPU in the collate function and clips on the
GPU; the arithmetic is identical, so both run here on the training device.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels.unsqueeze(1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float,
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box of area ≈ (1-λ)·H·W centred uniformly, clipped to the image."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def mix_batch(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, aug: DictConfig,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed pixels, soft targets) for (B, C, [T,] H, W) pixels and (B,) labels."""
    targets = smooth_one_hot(labels, num_classes, aug.label_smoothing)
    use_mixup, use_cutmix = aug.mixup_alpha > 0, aug.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= aug.mix_prob:
        return pixels, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < aug.switch_prob)
    lam = float(rng.beta(aug.cutmix_alpha, aug.cutmix_alpha) if cutmix
                else rng.beta(aug.mixup_alpha, aug.mixup_alpha))
    partner = pixels.flip(0)
    if cutmix:
        height, width = pixels.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
        pixels = pixels.clone()
        pixels[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]  # same box on every frame
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        pixels = pixels * lam + partner * (1.0 - lam)
    return pixels, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
