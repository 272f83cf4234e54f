"""Per-iteration learning-rate schedules of the two stages (docs/method.md §1.7, §2.9).

Both are a linear warm-up then a half cosine, stepped every iteration. They differ in details
the official code fixes, and which this module reproduces:
- pre-training warms up from `warmup_start_lr` (1e-6); the official fvcore composite evaluates
  its cosine at the *global* progress, so it starts at 0.9938·lr instead of lr (§3.24). We start
  the cosine at the peak; `official.pretrain_global_cosine` restores the global-progress cosine.
- fine-tuning warms up from 0 (the official ignores `--warmup_lr`, §3.12) with NumPy's
  `linspace` (both ends included, so the last warm-up step is already at the peak) and decays to
  `min_lr`, which the official scales by the global batch like the peak (`min_lr_batch_divisor`,
  256 in the paper presets); that is already the official behaviour.
"""
from __future__ import annotations

import math

from omegaconf import DictConfig


def global_batch(cfg: DictConfig, world_size: int) -> int:
    """Samples per optimizer step over every rank: pre-training counts the 192 samples of a
    step, fine-tuning the video batch, as the official rules do (§2.9). `world_size` includes
    every node (the official ignored nodes)."""
    per_rank = cfg.data.image_batch_size if cfg.task == "pretrain" else cfg.data.video_batch_size
    return per_rank * world_size * cfg.deepspeed.grad_accum


def peak_lr(cfg: DictConfig, world_size: int) -> float:
    """lr = base_lr · global batch / lr_batch_divisor."""
    return cfg.optim.base_lr * global_batch(cfg, world_size) / cfg.optim.lr_batch_divisor


def final_lr(cfg: DictConfig, world_size: int) -> float:
    """min_lr, scaled like the peak by the global batch when `min_lr_batch_divisor` is set (the
    official fine-tuning rule: 1e-6 · global batch / 256, §2.9), else as given."""
    divisor = cfg.optim.min_lr_batch_divisor
    scale = global_batch(cfg, world_size) / divisor if divisor else 1.0
    return cfg.optim.min_lr * scale


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start: float,
          final: float, global_cosine: bool = False, inclusive_warmup: bool = False) -> float:
    """The learning rate of iteration `step` (0-based) of `total_steps`.

    Linear from `start` to `peak` over `warmup_steps` (reaching `peak` on its last step when
    `inclusive_warmup`, like `np.linspace`), then a half cosine from `peak` to `final` over the
    remaining steps. `global_cosine` evaluates the cosine at step/total instead, as the official
    pre-training's fvcore CompositeParamScheduler does.
    """
    if step < warmup_steps:
        span = warmup_steps - 1 if inclusive_warmup else warmup_steps
        return start + (peak - start) * step / max(1, span)
    if global_cosine:
        progress = step / total_steps
    else:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(progress, 1.0)))


class Schedule:
    """The learning rate of every iteration of a run, from its config and its steps per epoch."""

    def __init__(self, cfg: DictConfig, steps_per_epoch: int, world_size: int) -> None:
        o = cfg.optim
        self.total = o.epochs * steps_per_epoch
        self.warmup = int(round(o.warmup_epochs * steps_per_epoch))
        self.peak = peak_lr(cfg, world_size)
        self.start, self.final = o.warmup_start_lr, final_lr(cfg, world_size)
        self.global_cosine = cfg.official.pretrain_global_cosine and cfg.task == "pretrain"
        self.inclusive_warmup = cfg.task == "finetune"

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.peak, self.start, self.final,
                     self.global_cosine, self.inclusive_warmup)
