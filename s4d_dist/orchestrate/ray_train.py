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

Preemption works as under `deepspeed`: SIGTERM / SIGUSR1 sent to a worker process (SLURM's
`--signal`, a node being reclaimed, `kill`) no longer ends it at once (Ray's handler would exit
it, losing the steps since the last checkpoint): every rank saves a checkpoint at the next step
boundary and stops with Preempted, and Ray's restart resumes from that checkpoint. The loop runs
in a thread of the worker's actor, so the handlers are installed by its main thread
(`on_actor_main_thread`). Any stop of the loop is a failure to Ray Train and uses up one of
`ray.max_failures` — preemption too; a stop that would recur (bad data, a full disk:
s4d_dist.train.faults) simply uses them all, after which `fit` raises that stop, so the driver
exits with its code (75 preempted, 65 data, ...). Each worker, like each `deepspeed` rank, logs
to `<run>/logs/rank<k>.log` and says why it stopped in one line (s4d_dist.train.cli.report).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ray.train
from omegaconf import DictConfig
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.exceptions import WorkerGroupError
from ray.train.v2.api.report_config import CheckpointUploadMode

from s4d_dist import config
from s4d_dist.orchestrate import cluster, runs
from s4d_dist.train.checkpoint import Checkpoints
from s4d_dist.train.cli import make_task, report
from s4d_dist.train.logs import run_logs
from s4d_dist.train.faults import RunStopped
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


def on_actor_main_thread(call: Callable[[], None]) -> bool:
    """faults.MainThread in a Ray Train worker: `call` (a module-level function: it travels
    pickled) runs as a task of this worker's actor, which Ray runs on the process's main thread,
    the one place signal handlers can be set."""
    ray.get(ray.get_runtime_context().current_actor.execute.remote(call))
    return True


def worker_main(values: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the loop of `values` (a resolved config)."""
    cfg = config.from_values(("config from the Ray driver", values))
    rank = ray.train.get_context().get_world_rank()
    with run_logs(run_dir(cfg) / "logs" / f"rank{rank}.log", rank, console=False) as log_file:
        try:
            train(cfg, make_task(cfg), on_epoch_end=EpochReporter(cfg),
                  main_thread=on_actor_main_thread)
        except Exception as error:
            report(error, rank, log_file)
            raise  # a failure to Ray Train: it restarts the workers, which resume (or gives up)


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
    try:
        trainer(cfg).fit()
    except WorkerGroupError as error:
        stop = run_stopped(error)
        if stop is None:
            raise
        raise stop from error
    return json.loads((Path(run_dir(cfg)) / "metrics.json").read_text())


def run_stopped(error: WorkerGroupError) -> RunStopped | None:
    """The stop (faults.RunStopped) that ended the lowest rank stopped by one, in the last
    attempt Ray Train made; None if the workers failed otherwise. Ray hands each worker's
    exception back wrapped with its traceback text."""
    for _, failure in sorted(error.worker_failures.items()):
        cause = getattr(failure, "_base_exc", failure)
        if isinstance(cause, RunStopped):
            return cause
    return None
