"""A model wrapped by DeepSpeed, and one optimisation step with the guards a long run needs.

The loops (pretrain.py, finetune.py) only compute losses; everything about applying them —
the learning rate of this iteration scaled per parameter group, precision, skipping a step whose
loss is not finite (on every rank at once, or the others would hang in the all-reduce), and
giving up after too many in a row — lives here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from s4d_dist.models.param_groups import param_groups
from s4d_dist.train import distributed
from s4d_dist.train.ds_config import deepspeed_config

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss: the run is diverging, not unlucky."""


def build_engine(cfg: DictConfig, model: nn.Module):
    """DeepSpeed engine around `model` with AdamW over our parameter groups."""
    import deepspeed

    model.to(distributed.device())
    if cfg.deepspeed.activation_checkpointing:
        encoder = getattr(model, "encoder", model)
        encoder.grad_checkpointing = True
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay,
                          depth=cfg.model.depth,
                          official_pretrain_rule=cfg.official_quirks and cfg.task == "pretrain")
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        config=deepspeed_config(cfg, distributed.world_size()))
    if cfg.deepspeed.compile:
        engine.compile()
    return engine


def set_lr(engine, lr: float) -> None:
    """Apply this iteration's lr, scaled per group (layer-wise decay)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass
class StepOutcome:
    loss: float
    skipped: bool
    grad_norm: float | None


class Stepper:
    """Runs forward → guarded backward → step, counting skipped (non-finite) steps."""

    def __init__(self, engine, max_consecutive_skips: int = 20) -> None:
        self.engine = engine
        self.dtype = DTYPES[self._precision(engine)]
        self.max_consecutive = max_consecutive_skips
        self.consecutive = 0
        self.skipped_total = 0

    @staticmethod
    def _precision(engine) -> str:
        if engine.bfloat16_enabled():
            return "bf16"
        return "fp16" if engine.fp16_enabled() else "fp32"

    def __call__(self, compute_loss: Callable[[], torch.Tensor], lr: float) -> StepOutcome:
        loss = compute_loss()
        value = loss.detach().float().item()
        if distributed.any_true(not math.isfinite(value)):
            self.consecutive += 1
            self.skipped_total += 1
            log.warning("non-finite loss (%s) on some rank: step skipped (%d in a row)",
                        value, self.consecutive)
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteLossError(
                    f"{self.consecutive} consecutive steps had a non-finite loss; the run is "
                    f"diverging (last lr {lr:.3g}): lower optim.base_lr or check the data")
            return StepOutcome(value, True, None)
        self.consecutive = 0
        set_lr(self.engine, lr)
        self.engine.backward(loss)
        own_norm = self._grad_norm() if self._norm_not_tracked() else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        return StepOutcome(value, False, None if norm is None else float(norm))

    def _norm_not_tracked(self) -> bool:
        """DeepSpeed reports no gradient norm for a plain (ZeRO-0, fp32) optimizer."""
        return (self.engine.zero_optimization_stage() == 0 and self.dtype == torch.float32
                and self.engine.is_gradient_accumulation_boundary())

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
