"""Dual-modal MAE pre-training (§1): one modality per step, the normalised-pixel MAE loss.

No validation (the official run has none); TensorBoard gets the loss per modality and, every
`logging.image_every` steps, input / masked / reconstruction grids of the current batch.
§ numbers refer to docs/method.md.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from s4d_dist.data.masking import num_masked
from s4d_dist.models.factory import build_mae
from s4d_dist.models.mae import mae_loss, mae_targets, pixel_mask, reconstruct_pixels
from s4d_dist.pixels import unnormalize
from s4d_dist.tubelets import as_clip
from s4d_dist.train.flops import mae_step_flops
from s4d_dist.train.loop import Run


class PretrainTask:
    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def build_model(self, run: Run, resuming: bool) -> nn.Module:
        return build_mae(self.cfg)

    def _ratio(self, modality: str) -> float:
        return self.cfg.mask.video_ratio if modality == "video" else self.cfg.mask.image_ratio

    def inputs(self, run: Run, batch: dict, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """The step's device tensors: pixels (as loaded, for the targets) and the mask."""
        return (batch["pixels"].to(run.device, non_blocking=True),
                batch["mask"].to(run.device, non_blocking=True))

    def objective(self, run: Run):
        """`loss(pixels, mask)`: the normalised-pixel MAE loss of the modality the pixels'
        shape says, with the visible count its mask ratio gives (static shapes: nothing read
        back); tensors in, a 0-d loss out (what a step compiles)."""
        model, dtype = run.engine.module, run.dtype
        tubelet, patch = self.cfg.model.tubelet, self.cfg.model.patch
        ratios = {ndim: self._ratio(modality) for ndim, modality in ((4, "image"), (5, "video"))}

        def loss(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            tokens = mask.shape[1]
            visible = tokens - num_masked(tokens, ratios[pixels.ndim])
            pred = model(pixels.to(dtype), mask, num_visible=visible)
            return mae_loss(pred, mae_targets(pixels, tubelet, patch), mask)
        return loss

    def step_flops(self, batch: dict) -> float:
        tokens = batch["mask"].shape[1]
        return mae_step_flops(self.cfg, tokens, self._ratio(batch["modality"]),
                              len(batch["pixels"]))

    @torch.no_grad()
    def on_log(self, run: Run, batch: dict, step: int) -> None:
        if step % self.cfg.logging.image_every:
            return
        m = self.cfg.model
        pixels = batch["pixels"][:4].to(run.device)
        mask = batch["mask"][:4].to(run.device)
        model = run.engine.module
        was_training = model.training
        model.eval()
        pred = model(pixels.to(run.dtype), mask)
        model.train(was_training)
        recon = reconstruct_pixels(pred, pixels, mask, m.tubelet, m.patch)
        shown = as_clip(unnormalize(pixels.float()).clamp(0, 1), m.tubelet)
        masked = shown.masked_fill(pixel_mask(mask, shown.shape, m.tubelet, m.patch), 0.5)
        run.logger.reconstruction(batch["modality"], shown, masked, recon, step)

    def eval_catalogs(self) -> list:
        return []  # nothing is evaluated

    def after_epoch(self, run: Run, epoch: int) -> dict[str, float]:
        return {}

    def finish(self, run: Run) -> dict[str, Any]:
        return {"task": "pretrain", "global_step": run.state["global_step"]}
