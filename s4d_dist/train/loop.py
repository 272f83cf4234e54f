"""The training loop shared by pre-training and fine-tuning.

    run = Run(cfg)                         # run folder, resume decision, TensorBoard
    train(cfg, task)                       # task: PretrainTask | FinetuneTask

The loop owns what both stages share — DeepSpeed engine, per-iteration schedule, guarded steps,
checkpoints with the data position (so a crash resumes at the next unseen batch), throughput and
data-wait accounting, logging. A task owns what differs: the model, the loss of a batch, what
happens after an epoch (validation) and at the end (test, exports).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from s4d_dist import config as config_module
from s4d_dist.data.loaders import train_loader
from s4d_dist.models import official
from s4d_dist.train import distributed
from s4d_dist.train.checkpoint import Checkpoints, export_fp32
from s4d_dist.train.engine import Stepper, build_engine
from s4d_dist.train.flops import peak_flops
from s4d_dist.train.schedule import Schedule
from s4d_dist.train.tracking import RunLogger

log = logging.getLogger(__name__)


def run_dir(cfg: DictConfig) -> Path:
    """`<output_dir>/<run_name>`, plus `/fold<k>` for a k-fold fine-tuning run."""
    path = Path(cfg.output_dir) / cfg.run_name
    return path / f"fold{cfg.data.fold}" if cfg.task == "finetune" and cfg.data.fold else path


@dataclass
class Run:
    """What a task may use: config, folder, logger, checkpoints, engine and its input dtype."""

    cfg: DictConfig
    dir: Path
    logger: RunLogger
    checkpoints: Checkpoints
    engine: Any = None
    dtype: torch.dtype = torch.float32
    state: dict[str, Any] = field(default_factory=dict)  # trainer state (saved in checkpoints)

    @property
    def device(self) -> torch.device:
        return distributed.device()


class Task(Protocol):
    def build_model(self, run: Run, resuming: bool) -> nn.Module: ...
    def loss(self, run: Run, batch: dict, rng: np.random.Generator) -> torch.Tensor: ...
    def step_flops(self, batch: dict) -> float: ...
    def on_log(self, run: Run, batch: dict, step: int) -> None: ...
    def after_epoch(self, run: Run, epoch: int) -> dict[str, float]: ...
    def finish(self, run: Run) -> dict[str, Any]: ...


class Meter:
    """Running sums between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: dict[str, list[float]] = {}
        self.samples = self.tokens = 0
        self.flops = self.step_time = self.wait_time = 0.0
        self.steps = 0

    def add(self, modality: str, loss: float, samples: int, tokens: int, flops: float,
            step_time: float, wait_time: float) -> None:
        self.losses.setdefault(modality, []).append(loss)
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.step_time += step_time
        self.wait_time += wait_time
        self.steps += 1

    def scalars(self, world: int, peak: float | None) -> dict[str, float]:
        elapsed = max(self.step_time + self.wait_time, 1e-9)
        out = {f"loss/{m}": float(np.mean(v)) for m, v in self.losses.items()}
        out.update({"perf/samples_per_s": world * self.samples / elapsed,
                    "perf/tokens_per_s": world * self.tokens / elapsed,
                    "perf/data_wait_fraction": self.wait_time / elapsed})
        if peak:
            out["perf/mfu"] = self.flops / elapsed / peak
        return out


def step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """Per-step randomness (mixup) that a resumed run draws identically."""
    return np.random.default_rng([seed, step, rank])


def _tokens(batch: dict, cfg: DictConfig) -> int:
    m = cfg.model
    per_frame = (m.img_size // m.patch) ** 2
    slots = m.num_frames // m.tubelet if batch["modality"] == "video" else 1
    return len(batch["pixels"]) * per_frame * slots


def train(cfg: DictConfig, task: Task,
          on_epoch_end: Optional[Callable[[int, dict[str, float]], None]] = None) -> dict[str, Any]:
    """Train `task` under `cfg` to the end (resuming when allowed) and return its final metrics.

    `on_epoch_end(epochs_done, metrics)` runs on every rank once each epoch's checkpoint is
    complete, with this rank's mean training loss (`train_loss`) and the task's validation
    metrics: the hook through which an orchestrator (Ray Tune's early stopping) follows a run
    without the loop knowing about it.
    """
    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    folder = run_dir(cfg)
    checkpoints = Checkpoints(folder, cfg, keep=cfg.checkpoint.keep)
    resume_tag = checkpoints.check_resumable(folder)
    distributed.barrier()
    if distributed.is_main():
        config_module.save(cfg, folder / "config.yaml")
    loader = train_loader(cfg, rank, world)  # missing or empty shards fail here, before step 0
    run = Run(cfg, folder, RunLogger(folder, cfg.logging.tensorboard), checkpoints)
    run.engine = build_engine(cfg, task.build_model(run, resuming=resume_tag is not None))
    stepper = Stepper(run.engine, cfg.optim.max_nonfinite_steps)
    run.dtype = stepper.dtype
    schedule = Schedule(cfg, loader.steps_per_epoch, world)
    run.state = {"epoch": 0, "batches": None, "global_step": 0, "task": {}}
    if resume_tag:
        run.state = checkpoints.load(run.engine, resume_tag)
        print(f"[s4d] resuming {folder} from checkpoint {resume_tag} "
              f"(epoch {run.state['epoch']}, step {run.state['global_step']})", flush=True)
    peak = peak_flops(run.device)
    meter = Meter()

    for epoch in range(run.state["epoch"], cfg.optim.epochs):
        batches = loader.epoch(epoch)
        if run.state["batches"] is not None:
            batches.load_state_dict(run.state["batches"])
        bar = tqdm(total=len(batches), initial=batches.step, disable=not distributed.is_main(),
                   desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        epoch_losses: list[float] = []
        waited = time.perf_counter()
        for batch in batches:
            started = time.perf_counter()
            step = run.state["global_step"]
            lr = schedule(step)
            outcome = stepper(lambda: task.loss(run, batch, step_rng(cfg.seed, step, rank)), lr)
            done = time.perf_counter()
            meter.add(batch["modality"], outcome.loss, len(batch["pixels"]), _tokens(batch, cfg),
                      task.step_flops(batch), done - started, started - waited)
            epoch_losses.append(outcome.loss)
            run.state["global_step"] = step = step + 1
            run.state["batches"] = batches.state_dict()
            bar.update(1)
            bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}")
            if step % cfg.logging.log_every == 0:
                scalars = meter.scalars(world, peak)
                scalars.update({"lr": lr, "skipped/nonfinite_steps": stepper.skipped_total,
                                "skipped/corrupt_samples": loader.corrupt.count})
                if outcome.grad_norm is not None:
                    scalars["grad_norm"] = outcome.grad_norm
                run.logger.scalars(scalars, step)
                task.on_log(run, batch, step)
                meter.reset()
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                checkpoints.save(run.engine, run.state)
            waited = time.perf_counter()
        bar.close()
        run.state.update(epoch=epoch + 1, batches=None)
        metrics = task.after_epoch(run, epoch)
        checkpoints.save(run.engine, run.state)
        epoch_loss = float(np.mean(epoch_losses)) if epoch_losses else float("nan")
        if distributed.is_main():
            extra = " ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            print(f"[s4d] epoch {epoch + 1}/{cfg.optim.epochs} step {run.state['global_step']} "
                  f"loss {epoch_loss:.4f} "
                  f"lr {schedule(max(0, run.state['global_step'] - 1)):.2e} {extra}".rstrip(),
                  flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, {"train_loss": epoch_loss, **metrics})

    final = task.finish(run)
    tag = checkpoints.latest()
    weights = export_fp32(run.engine, checkpoints.dir, tag) if tag else None
    if distributed.is_main():
        if weights is not None:
            torch.save(weights, folder / "weights_fp32.pt")
            official.save(weights, folder / "weights_official.pth", epoch=cfg.optim.epochs)
        final["corrupt_samples"] = loader.corrupt.count
        final["nonfinite_steps"] = stepper.skipped_total
        (folder / "metrics.json").write_text(json.dumps(final, indent=1))
        (folder / "finished.json").write_text(json.dumps({"global_step": run.state["global_step"]}))
        if loader.corrupt.count:
            print(f"[s4d] skipped corrupt samples: {loader.corrupt.summary()}", flush=True)
    distributed.barrier()
    run.logger.close()
    loader.close()
    return final
