"""A model wrapped by DeepSpeed, and one optimisation step with the guards a long run needs.

The loops (pretrain.py, finetune.py) only compute losses; everything about applying them —
the learning rate of this iteration scaled per parameter group, precision, skipping a step whose
loss is not finite (on every rank at once, or the others would hang in the all-reduce), and
giving up after too many in a row — lives here. A step reads nothing back from the GPU: its
loss, gradient norm and skip counts stay device tensors until a log step reads them, so the
host keeps queueing work ahead of the GPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

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


def adamw(groups: list[dict], cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over our parameter groups (each keeps its `lr_scale`, which set_lr applies).

    Fused where the parameters are on CUDA: one kernel for every tensor instead of several per
    tensor, and the implementation that honours `found_inf`, through which Stepper skips a
    non-finite step without a host sync. Elsewhere torch's default implementation, so CPU runs
    reproduce earlier ones exactly.
    """
    on_cuda = any(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             **({"fused": True} if on_cuda else {}))


def build_engine(cfg: DictConfig, model: nn.Module):
    """DeepSpeed engine around `model` with AdamW over our parameter groups."""
    import deepspeed

    model.to(distributed.device())
    if cfg.deepspeed.activation_checkpointing:
        encoder = getattr(model, "encoder", model)
        encoder.grad_checkpointing = True
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay,
                          depth=cfg.model.depth,
                          official_pretrain_rule=cfg.official.pretrain_decay_qv_bias and cfg.task == "pretrain")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=adamw(groups, cfg),
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
    """One step's results, as device tensors: returning them costs no host sync. Read them
    (`float(...)`) only where they are reported."""

    loss: torch.Tensor  # 0-d fp32; not finite on a skipped step
    skipped: torch.Tensor  # 0-d bool: the ranks agreed to skip this step
    grad_norm: torch.Tensor | None  # 0-d; None where the step did not run (host-side skip)


class Stepper:
    """Runs guarded backward → step on a computed loss, counting skipped (non-finite) steps on the device.

    A step whose loss is not finite on any rank is skipped on every rank. The ranks agree through
    an all-reduce of a device flag (queued on the GPU, nothing waits for it), and the skip
    happens where the flag is:
    - on the device when the optimizer is the fused AdamW (CUDA, see `adamw`): the flag is its
      `found_inf`, with which the kernel leaves parameters, moments and step count untouched
      (the mechanism of torch's GradScaler). Backward and step run in full on every rank, so
      the ranks stay in lockstep without the host knowing the outcome;
    - on the host otherwise (CPU, where reading the flag costs nothing; with another optimizer
      on a GPU it is one 1-element read per step): backward and step are not run at all.
    With gradient accumulation a non-finite micro-step poisons the accumulated gradients, so the
    device-side skip covers the whole optimizer step it belongs to. (DeepSpeed's own fp16, bf16
    and ZeRO-1/2 optimizers also skip a step whose gradients are not finite; that check reads
    its flag on the host, inside DeepSpeed.)

    Counts stay on the device; `check()` reads them at log steps and raises NonFiniteLossError
    once `max_consecutive_skips` steps in a row were skipped — at the first check after it.
    """

    def __init__(self, engine, max_consecutive_skips: int = 20) -> None:
        self.engine = engine
        self.dtype = DTYPES[self._precision(engine)]
        self.max_consecutive = max_consecutive_skips
        client = getattr(engine, "client_optimizer", None)
        fused = isinstance(client, torch.optim.Optimizer) and all(
            group.get("fused") for group in client.param_groups)
        self.device_skip = client if fused else None
        self.unapplied: torch.Tensor | None = None  # any non-finite micro-step since the last step
        zero = torch.zeros((), device=distributed.device())
        self.skipped, self.streak, self.longest = zero, zero, zero  # total, current run, longest
        self.reported = 0
        self.lr = 0.0

    @staticmethod
    def _precision(engine) -> str:
        if engine.bfloat16_enabled():
            return "bf16"
        return "fp16" if engine.fp16_enabled() else "fp32"

    def __call__(self, loss: torch.Tensor, lr: float) -> StepOutcome:
        """Backward and step on `loss` (this micro-batch's, forward done) at learning rate `lr`."""
        value = loss.detach().float()
        flag = distributed.any_rank((~torch.isfinite(value)).float())
        self._count(flag)
        self.lr = lr
        skipped = flag > 0
        if self.device_skip is not None:
            self._skip_on_device(flag)
        elif bool(flag):  # one 1-element read, free on the CPU
            return StepOutcome(value, skipped, None)
        set_lr(self.engine, lr)
        self.engine.backward(loss)
        own_norm = self._grad_norm() if self._norm_not_tracked() else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        return StepOutcome(value, skipped, None if norm is None else torch.as_tensor(norm))

    def _skip_on_device(self, flag: torch.Tensor) -> None:
        """Arm the fused optimizer's `found_inf` with every flag since its last step."""
        self.unapplied = flag if self.unapplied is None else torch.maximum(self.unapplied, flag)
        self.device_skip.found_inf = self.unapplied
        if self.engine.is_gradient_accumulation_boundary():
            self.unapplied = None

    def _count(self, flag: torch.Tensor) -> None:
        self.skipped = self.skipped + flag
        self.streak = (self.streak + 1) * flag
        self.longest = torch.maximum(self.longest, self.streak)

    def check(self) -> int:
        """Steps skipped so far, read from the device (one read: call it where the loop logs);
        raises NonFiniteLossError if `max_consecutive_skips` steps in a row were skipped since
        the previous check."""
        skipped, longest = (int(v) for v in torch.stack([self.skipped, self.longest]).tolist())
        if skipped > self.reported:
            log.warning("%d step(s) with a non-finite loss on some rank skipped since the last "
                        "check (%d in all)", skipped - self.reported, skipped)
        self.reported = skipped
        if longest >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{longest} consecutive steps had a non-finite loss; the run is diverging "
                f"(last lr {self.lr:.3g}): lower optim.base_lr or check the data")
        self.longest = self.streak
        return skipped

    def _norm_not_tracked(self) -> bool:
        """DeepSpeed reports no gradient norm for a plain (ZeRO-0, fp32) optimizer."""
        return (self.engine.zero_optimization_stage() == 0 and self.dtype == torch.float32
                and self.engine.is_gradient_accumulation_boundary())

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads)
