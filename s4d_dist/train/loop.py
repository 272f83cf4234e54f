"""The training loop shared by pre-training and fine-tuning.

    run = Run(cfg)                         # run folder, resume decision, TensorBoard
    train(cfg, task)                       # task: PretrainTask | FinetuneTask

The loop owns what both stages share — DeepSpeed engine, per-iteration schedule, guarded steps,
checkpoints with the data position (so a crash resumes at the next unseen batch), throughput and
data-wait accounting, logging. A task owns what differs: the model, the loss of a batch, what
happens after an epoch (validation) and at the end (test, exports).

Faults stop the run with a typed exception (faults.py: what the entry point prints, the exit
code): data that cannot be read (DataError); a filesystem that cannot hold the checkpoints,
fails a save, or is not shared by every rank (StorageError); preemption — SIGTERM / SIGUSR1
make every rank save a checkpoint at the next step boundary they agree on and raise Preempted.
Exports are written whole or not at all (atomic.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from s4d_dist import atomic, seeds
from s4d_dist import config as config_module
from s4d_dist.data.catalog import Catalog
from s4d_dist.data.loaders import TrainLoader, train_loader
from s4d_dist.models import official
from s4d_dist.shards.layout import BuildError
from s4d_dist.train import distributed, exports, preflight
from s4d_dist.train.checkpoint import Checkpoints, export_fp32
from s4d_dist.train.engine import Stepper, build_engine, compile_enabled
from s4d_dist.train.faults import DataError, MainThread, Preempted, Preemption, on_this_thread
from s4d_dist.train.flops import peak_flops
from s4d_dist.train.logs import run_logs
from s4d_dist.train.run_folder import run_dir
from s4d_dist.train.schedule import Schedule
from s4d_dist.train.storage import check_shared, shard_files
from s4d_dist.train.tracking import RunLogger
from s4d_dist.tubelets import model_tokens

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    def inputs(self, run: Run, batch: dict, rng: np.random.Generator) -> tuple[torch.Tensor, ...]: ...
    def objective(self, run: Run) -> Callable[..., torch.Tensor]: ...
    def step_flops(self, batch: dict) -> float: ...
    def eval_catalogs(self) -> list[Catalog]: ...
    def on_log(self, run: Run, batch: dict, step: int) -> None: ...
    def after_epoch(self, run: Run, epoch: int) -> dict[str, float]: ...
    def finish(self, run: Run) -> dict[str, Any]: ...


class Meter:
    """Running sums between two log lines.

    Losses stay device tensors until `scalars()` reads them (one host read per log line).
    Steps are asynchronous, so time is the wall clock from one log line to the next, taken after
    that read: it covers the GPU work queued in the interval, not just the time to queue it
    (step checkpoints saved in the interval included; `paused()` leaves out the epoch's end).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: dict[str, list[torch.Tensor]] = {}
        self.samples = self.tokens = 0
        self.flops = self.wait_time = 0.0
        self.started = time.perf_counter()

    def add(self, modality: str, loss: torch.Tensor, samples: int, tokens: int, flops: float,
            wait_time: float) -> None:
        self.losses.setdefault(modality, []).append(loss)
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.wait_time += wait_time

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's time out of the interval. Enter it right after a host read, so no
        queued GPU work of the interval is left out with it."""
        began = time.perf_counter()
        yield
        self.started += time.perf_counter() - began

    def scalars(self, world: int, peak: float | None) -> dict[str, float]:
        means = mean_losses(self.losses)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {f"loss/{m}": v for m, v in means.items()}
        out.update({"perf/samples_per_s": world * self.samples / elapsed,
                    "perf/tokens_per_s": world * self.tokens / elapsed,
                    "perf/data_wait_fraction": self.wait_time / elapsed})
        if peak:
            out["perf/mfu"] = self.flops / elapsed / peak
        return out


def mean_losses(losses: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean of each non-empty list of 0-d loss tensors, in float64, read back in one transfer."""
    kept = {name: values for name, values in losses.items() if values}
    if not kept:
        return {}
    means = torch.stack([torch.stack(v).double().mean() for v in kept.values()]).tolist()
    return dict(zip(kept, means))


def finite_or_none(value: torch.Tensor | None) -> float | None:
    """A device scalar read back, or None if absent or not finite (a skipped step's norm)."""
    number = None if value is None else float(value)
    return number if number is not None and math.isfinite(number) else None


def _tokens(batch: dict, cfg: DictConfig) -> int:
    return len(batch["pixels"]) * model_tokens(cfg.model, batch["modality"])


def open_data(opener: Callable[[], T]) -> T:
    """`opener()`, which opens shards, on every rank. Shards that are missing, empty, truncated,
    badly indexed or from an unfinished build (on any rank) stop the run here, before step 0,
    as a DataError on every rank (one line: what and where)."""
    error = opened = None
    try:
        opened = opener()
    except (OSError, ValueError, BuildError) as caught:
        error = caught
    problem = distributed.first_problem(None if error is None else str(error))
    if problem is not None:
        raise DataError(problem) from error
    return opened


def open_train_data(cfg: DictConfig, rank: int, world: int) -> TrainLoader:
    """The training loader (open_data), saying which samples data.skip_truncated leaves out."""
    loader = open_data(lambda: train_loader(cfg, rank, world, device=distributed.device()))
    _say_truncated("training", truncated_samples(loader))
    return loader


def open_eval_data(task: Task) -> None:
    """Open the shards of every split the task will evaluate (open_data): a broken test split
    stops the run before training, not after it."""
    catalogs = open_data(task.eval_catalogs)
    _say_truncated("evaluating", {tar: n for catalog in catalogs
                                  for tar, n in catalog.truncated.items()})


def _say_truncated(doing: str, truncated: dict[str, int]) -> None:
    if truncated:
        log.info(f"data.skip_truncated: {doing} without {sum(truncated.values())} samples beyond "
                 f"the end of truncated shards: " + ", ".join(f"{t} ({n})" for t, n in truncated.items()))


def truncated_samples(loader: TrainLoader) -> dict[str, int]:
    """Samples left out of training per truncated shard (data.skip_truncated)."""
    return {tar: n for stream in loader.streams for tar, n in stream.plan.catalog.truncated.items()}


def last_epoch_loss(mine: dict[str, float]) -> dict[str, float]:
    """Collective: the last epoch's mean training loss — of all its steps ("all") and per
    modality — averaged over the ranks (each takes as many steps). A rank's share is the
    steps it ran itself (after a mid-epoch resume, those since the resume)."""
    gathered = distributed.host_gather(mine)
    return {name: float(np.mean([losses[name] for losses in gathered if name in losses]))
            for name in mine}


EpochHook = Callable[[int, dict[str, float]], None]


def train(cfg: DictConfig, task: Task, on_epoch_end: EpochHook | None = None,
          main_thread: MainThread = on_this_thread) -> dict[str, Any]:
    """Train `task` under `cfg` to the end (resuming when allowed) and return its final metrics.

    `on_epoch_end(epochs_done, metrics)` runs on every rank once each epoch's checkpoint is
    complete, with this rank's mean training loss (`train_loss`) and the task's validation
    metrics: the hook through which an orchestrator (Ray Tune's early stopping) follows a run
    without the loop knowing about it. `main_thread` installs the preemption signal handlers
    where the loop does not run on the process's main thread (faults.Preemption).
    """
    preflight.check(cfg)
    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    with (run_logs(run_dir(cfg) / "logs" / f"rank{rank}.log", rank),
          Preemption(cfg.checkpoint.signal_check_every, main_thread) as preemption):
        seeds.seed_process(cfg.seed, rank)
        folder = run_dir(cfg)
        checkpoints = Checkpoints(folder, cfg, keep=cfg.checkpoint.keep)
        resume_tag = checkpoints.check_resumable(folder)
        distributed.barrier()
        checkpoints.drop_incomplete(resume_tag)
        if distributed.is_main():
            config_module.save(cfg, folder / "config.yaml")
        open_eval_data(task)
        loader = open_train_data(cfg, rank, world)
        run = Run(cfg, folder, RunLogger(folder, cfg.logging.tensorboard), checkpoints)
        try:
            return _train(run, task, loader, resume_tag, preemption, on_epoch_end)
        finally:
            run.logger.close()
            loader.close()


def _train(run: Run, task: Task, loader: TrainLoader, resume_tag: str | None,
           preemption: Preemption, on_epoch_end: EpochHook | None) -> dict[str, Any]:
    cfg, folder, checkpoints = run.cfg, run.dir, run.checkpoints
    rank, world = distributed.rank(), distributed.world_size()
    check_shared(folder, shard_files(loader))
    run.engine = build_engine(cfg, task.build_model(run, resuming=resume_tag is not None))
    distributed.release_shared_memory()
    checkpoints.check_space(run.engine)
    stepper = Stepper(run.engine, cfg.optim.max_nonfinite_steps, compile=compile_enabled(cfg),
                      cuda_graphs=cfg.deepspeed.cuda_graphs)
    run.dtype = stepper.dtype
    schedule = Schedule(cfg, loader.steps_per_epoch, world)
    run.state = {"epoch": 0, "batches": None, "global_step": 0, "task": {}}
    if resume_tag:
        run.state = checkpoints.load(run.engine, resume_tag)
        log.info(f"resuming {folder} from checkpoint {resume_tag} "
                 f"(epoch {run.state['epoch']}, step {run.state['global_step']})")
    peak = peak_flops(run.device, cfg.logging.peak_tflops)
    meter = Meter()
    objective = task.objective(run)

    for epoch in range(run.state["epoch"], cfg.optim.epochs):
        batches = loader.epoch(epoch)
        if run.state["batches"] is not None:
            batches.load_state_dict(run.state["batches"])
        # `with`: a stop closes (clears) the bar, so its one line starts on a clean console line.
        # disable=None: rank 0's bar goes to a terminal only, never into a piped log.
        with tqdm(total=len(batches), initial=batches.step,
                  disable=None if distributed.is_main() else True,
                  desc=f"epoch {epoch}", leave=False, dynamic_ncols=True) as bar:
            epoch_losses: dict[str, list[torch.Tensor]] = {}  # per modality
            waited = time.perf_counter()
            for batch in batches:
                started = time.perf_counter()
                step = run.state["global_step"]
                lr = schedule(step)
                rng = seeds.step_rng(cfg.seed, step, rank)
                outcome = stepper.step(objective, task.inputs(run, batch, rng), lr)
                meter.add(batch["modality"], outcome.loss, len(batch["pixels"]), _tokens(batch, cfg),
                          task.step_flops(batch), started - waited)
                epoch_losses.setdefault(batch["modality"], []).append(outcome.loss)
                run.state["global_step"] = step = step + 1
                run.state["batches"] = batches.state_dict()
                bar.update(1)
                if step % cfg.logging.log_every == 0:  # the only steps that read the GPU's results
                    skipped = stepper.check()
                    scalars = meter.scalars(world, peak)
                    scalars.update({"lr": lr, "skipped/nonfinite_steps": skipped,
                                    "skipped/corrupt_samples": loader.corrupt.count})
                    grad_norm = finite_or_none(outcome.grad_norm)
                    if grad_norm is not None:
                        scalars["grad_norm"] = grad_norm
                    run.logger.scalars(scalars, step)
                    bar.set_postfix(loss=f"{float(outcome.loss):.4f}", lr=f"{lr:.2e}")
                    task.on_log(run, batch, step)
                    meter.reset()
                saved = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
                if saved:
                    checkpoints.save(run.engine, run.state)
                if preemption.requested(step):
                    tag = checkpoints.latest() if saved else checkpoints.save(run.engine, run.state)
                    raise Preempted(f"preempted ({preemption.signal}): checkpoint {tag} (step "
                                    f"{step}) saved in {checkpoints.dir}; run the same command "
                                    f"again to resume")
                waited = time.perf_counter()
        stepper.check()
        every = [loss for losses in epoch_losses.values() for loss in losses]
        epoch_loss = mean_losses({"epoch": every}).get("epoch", float("nan"))
        run.state["epoch_loss"] = {"all": epoch_loss, **mean_losses(epoch_losses)}
        with meter.paused():  # validation and checkpoints are not training throughput
            run.state.update(epoch=epoch + 1, batches=None)
            metrics = task.after_epoch(run, epoch)
            checkpoints.save(run.engine, run.state)
            if distributed.is_main():
                extra = " ".join(f"{k} {v:.2f}" for k, v in metrics.items())
                log.info(f"epoch {epoch + 1}/{cfg.optim.epochs} step {run.state['global_step']} "
                         f"loss {epoch_loss:.4f} "
                         f"lr {schedule(max(0, run.state['global_step'] - 1)):.2e} {extra}".rstrip())
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, {"train_loss": epoch_loss, **metrics})

    final = task.finish(run)
    final["train_loss"] = last_epoch_loss(run.state.get("epoch_loss", {}))
    tag = checkpoints.latest()
    weights = export_fp32(run.engine, checkpoints.dir, tag) if tag else None
    if distributed.is_main():
        if weights is not None:
            with atomic.replacing(folder / "weights_fp32.pt") as tmp:
                torch.save(weights, tmp)
            with atomic.replacing(folder / "weights_official.pth") as tmp:
                official.save(weights, tmp, epoch=cfg.optim.epochs)
            exports.write(folder, cfg, weights, final)
        final["corrupt_samples"] = loader.corrupt.count
        truncated = sum(truncated_samples(loader).values())
        if truncated:
            final["truncated_samples"] = truncated
        final["nonfinite_steps"] = stepper.check()
        atomic.write_text(folder / "metrics.json", json.dumps(final, indent=1))
        atomic.write_text(folder / "finished.json",
                          json.dumps({"global_step": run.state["global_step"]}))
        if loader.corrupt.count:
            log.info(f"skipped corrupt samples: {loader.corrupt.summary()}")
    distributed.barrier()
    return final
