"""One training run as a Ray Train TorchTrainer: one Ray worker per rank.

Ray starts the workers, exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* and creates the torch
process group (gloo on CPU, NCCL on GPU); each worker then runs `s4d_dist.train.loop.train`
unchanged, where `distributed.init()` finds the group initialised and DeepSpeed joins it.

The run folder is Ray's storage for the run (storage_path = output_dir, name = the folder
relative to it). Each epoch is reported to Ray with that epoch's DeepSpeed checkpoint, which
already lies in the folder, so Ray records a pointer and copies nothing (NO_UPLOAD). When a
worker or its node dies, Ray restarts the worker group (`ray.max_failures` times) and the loop
continues from the folder's last complete checkpoint (`resume=auto`) — the path a crashed
`deepspeed` job takes when started again, so on several nodes `output_dir` must be shared.
Any stop of the loop in a worker (preemption included: a node taken back kills its workers, and
Ray's own SIGTERM never reaches the loop, which runs in a worker thread) is such a failure, and
the restart resumes from the last complete checkpoint; a stop that would recur (bad data, a full
disk: s4d_dist.train.faults) simply uses up `ray.max_failures`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ray.train
from omegaconf import DictConfig
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.report_config import CheckpointUploadMode

from s4d_dist import config
from s4d_dist.orchestrate import cluster, runs
from s4d_dist.train.checkpoint import Checkpoints
from s4d_dist.train.cli import make_task
from s4d_dist.train.loop import run_dir, train


class EpochReporter:
    """`train`'s on_epoch_end hook: every rank reports the epoch's metrics and checkpoint."""

    def __init__(self, cfg: DictConfig) -> None:
        self.checkpoints = Checkpoints(run_dir(cfg), cfg)

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        tag = self.checkpoints.latest()  # the loop saved it, every rank, before calling us
        checkpoint = Checkpoint(str(self.checkpoints.dir / tag)) if tag else None
        ray.train.report({"epoch": epoch, **metrics}, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def worker_main(values: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the loop of `values` (a resolved config)."""
    cfg = config.from_values(("config from the Ray driver", values))
    train(cfg, make_task(cfg), on_epoch_end=EpochReporter(cfg))


def trainer(cfg: DictConfig, callbacks: Iterable = ()) -> TorchTrainer:
    """The TorchTrainer of one run; `callbacks` are Ray Train callbacks (Tune's reporter)."""
    folder = run_dir(cfg)
    return TorchTrainer(
        worker_main,
        train_loop_config=runs.as_dict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers,
                                     use_gpu=cfg.ray.gpus_per_worker > 0,
                                     resources_per_worker=cluster.worker_bundle(cfg)),
        run_config=RunConfig(
            name=str(folder.relative_to(cfg.output_dir)),
            storage_path=str(cfg.output_dir),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            # The loop prunes its own checkpoints (checkpoint.keep); Ray only points at them.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=list(callbacks)))


def fit(cfg: DictConfig) -> dict[str, Any]:
    """Train one run on the cluster (connecting first) and return its final metrics."""
    cfg = runs.absolute_paths(cfg)
    runs.check_folder(cfg)
    runs.check_data(cfg)
    cfg = cluster.connect(cfg)
    cluster.runs_at_once(cfg)  # refuses a run the cluster can never hold
    trainer(cfg).fit()
    return json.loads((Path(run_dir(cfg)) / "metrics.json").read_text())
