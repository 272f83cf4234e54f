"""Ray Train and Tune running the real loops on a simulated two-node cluster.

The cluster is `ray.cluster_utils.Cluster`: a head raylet and a second raylet on this machine,
1 CPU each, so a 2-worker run necessarily spans both nodes and talks gloo between them, and a
sweep runs two 1-worker trials at once. Every test trains the tiny config of conftest with
DeepSpeed in each worker; they take tens of seconds each (marked slow, run by default).
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.orchestrate import cluster as cluster_module
from s4d_dist.orchestrate import kfold_runs, ray_train, runs, sweep
from s4d_dist.shards.synthetic import build_synthetic
from s4d_dist.train.checkpoint import ResumeError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# A tiny fine-tuning run that learns within one epoch of 6 steps, so that a learning rate of
# ~1e-8 is clearly worse than 3e-3 on validation (the sweep test relies on it).
LEARNS = ["augment.mix_prob=0", "augment.label_smoothing=0", "data.video_rate=1.0",
          "data.video_batch_size=8", "optim.warmup_epochs=0", "optim.base_lr=3e-3",
          "ray.max_failures=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("orchestrate_shards")
    build_synthetic(root / "image", "image", {"train": 3, "test": 1}, size=32, seed=0)
    build_synthetic(root / "video", "video", {"train": 6, "test": 1}, size=32, frames=8, seed=1)
    build_synthetic(root / "folds", "video", {"part1": 3, "part2": 3, "part3": 3}, size=32,
                    frames=8, seed=2, folds=True)
    return root


@pytest.fixture(scope="module")
def two_nodes():
    # With its dashboard: Ray Train releases finished trials' placement groups through it.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def tiny(shards, out, *extra):
    return config.load("demo", tiny_overrides(shards, out, "finetune") + LEARNS + list(extra))


def worker_logs(nodes) -> str:
    logs = Path(nodes.head_node.get_session_dir_path()) / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.out"))


def train_workers(nodes) -> list[psutil.Process]:
    """The RayTrainWorker processes of this cluster (children of its raylets, nobody else's)."""
    raylets = [node.all_processes["raylet"][0].process.pid
               for node in [nodes.head_node, *nodes.worker_nodes]]
    found = []
    for pid in raylets:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
    return found


def test_runs_the_cluster_cannot_hold_are_refused_up_front(shards, tmp_path, two_nodes):
    with pytest.raises(cluster_module.ClusterError,
                       match=r"ray.num_workers=4 workers × \{'CPU': 1.0\}.*2 node\(s\) hold 2 such"):
        ray_train.fit(tiny(shards, tmp_path, "ray.num_workers=4"))
    with pytest.raises(cluster_module.ClusterError, match="the cluster has no GPU"):
        ray_train.fit(tiny(shards, tmp_path, "ray.gpus_per_worker=1"))
    with pytest.raises(cluster_module.ClusterError, match="2 node\\(s\\) hold 0 such"):
        ray_train.fit(tiny(shards, tmp_path, "ray.cpus_per_worker=2"))
    # Refused, not queued (a queued run would wait for resources until the test's timeout):
    # nothing was asked of the cluster.
    from ray.util import placement_group_table

    assert not [pg for pg in placement_group_table().values() if pg["state"] == "PENDING"]
    assert not train_workers(two_nodes)
    assert not (tmp_path / "tiny" / "checkpoints").exists()


def test_two_workers_on_two_nodes_finetune_with_deepspeed(shards, tmp_path, two_nodes):
    cfg = tiny(shards, tmp_path, "ray.num_workers=2", "deepspeed.zero_stage=1", "optim.epochs=2")
    results = ray_train.fit(cfg)
    run = tmp_path / "tiny"
    assert results["last"]["samples"] == 7  # every test clip once, across both ranks
    assert {"best", "best_epoch"} <= set(results)
    assert (run / "finished.json").is_file() and list((run / "tb").glob("events.*"))
    tag = (run / "checkpoints" / "latest_complete").read_text()
    assert {"trainer_rank0.pt", "trainer_rank1.pt"} <= {p.name for p in (run / "checkpoints" / tag).iterdir()}
    # Ray's record of the run lives in the run folder itself and points at our checkpoints.
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["checkpoint_results"][-1]["checkpoint_dir_name"] == f"checkpoints/{tag}"


def test_killed_worker_is_replaced_and_resumes_from_the_last_checkpoint(shards, tmp_path, two_nodes):
    """Simulated: the OS kills one of the two training worker processes (SIGKILL, as the OOM
    killer or a lost node would) once the run's first checkpoint is complete. Ray Train sees
    the dead actor, replaces the worker group (FailureConfig), and the loop in the new workers
    resumes from the run folder's latest complete checkpoint (resume=auto)."""
    cfg = tiny(shards, tmp_path, "ray.num_workers=2", "optim.epochs=4", "checkpoint.every_steps=2")
    run = tmp_path / "tiny"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(results=ray_train.fit(cfg)), daemon=True)
    thread.start()
    latest = run / "checkpoints" / "latest_complete"
    deadline = time.time() + 400
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.1)
    assert latest.is_file(), "no checkpoint appeared"
    killed_at = latest.read_text()
    victims = train_workers(two_nodes)
    assert len(victims) == 2 and not (run / "finished.json").exists()
    os.kill(victims[-1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and "results" in outcome, "the run did not recover"
    assert outcome["results"]["last"]["samples"] == 7
    assert not psutil.pid_exists(victims[-1].pid)
    logs = worker_logs(two_nodes)
    resumed = [line for line in logs.splitlines() if f"resuming {run}" in line]
    assert resumed, "the restarted workers did not resume from the checkpoint"
    assert int(resumed[0].split("checkpoint step")[1].split()[0]) >= int(killed_at[len("step"):])


def test_asha_sweep_stops_the_bad_trials_and_writes_the_best_preset(shards, tmp_path, two_nodes):
    """Four 1-worker trials, two at a time, in grid order: two learning rates that learn, then
    two (1e-8, 1e-9) that cannot move the model within an epoch, so their validation WAR at
    ASHA's first rung (epoch 1) is below the recorded ones and they are stopped there."""
    base = tiny(shards, tmp_path, "optim.epochs=3", "run_name=lr_sweep", "sweep.grace_period=1")
    cfg = runs.with_values(base, "test", {"sweep": {"space": {
        "optim.base_lr": {"grid": [3e-3, 1e-2, 1e-8, 1e-9]}}}})
    rows = sweep.sweep(cfg)
    folder = tmp_path / "lr_sweep"
    by_lr = {row["optim.base_lr"]: row for row in rows}
    assert len(rows) == 4 and all(row["error"] is None for row in rows)
    for bad in (1e-8, 1e-9):
        assert by_lr[bad]["status"] == "stopped early" and by_lr[bad]["epochs"] == 1
        assert by_lr[bad]["val_war_best"] < by_lr[3e-3]["val_war_best"]
    assert by_lr[3e-3]["status"] == "finished" and by_lr[3e-3]["epochs"] == 3
    assert rows[0]["optim.base_lr"] in (3e-3, 1e-2)  # best first
    table = json.loads((folder / "sweep_results.json").read_text())
    assert [r["trial_id"] for r in table["trials"]] == [r["trial_id"] for r in rows]
    assert (folder / "sweep_results.csv").read_text().splitlines()[0].startswith("trial_id,status,epochs")
    for row in rows:  # each trial trained in its own run folder, with its own TensorBoard logs
        assert Path(row["run_dir"]).parent == folder and list(Path(row["run_dir"], "tb").glob("events.*"))
    best = config.load(str(folder / "best.yaml"))
    assert best.optim.base_lr == rows[0]["optim.base_lr"] and best.run_name == "lr_sweep_best"
    assert not best.sweep.space


def test_kfold_runs_every_fold_and_summarizes_mean_and_std(shards, tmp_path, two_nodes, capsys):
    cfg = tiny(shards, tmp_path, f"data.video_shards={shards / 'folds'}", "run_name=kf",
               "optim.epochs=1", "sweep.folds=[1,3]")
    summary = kfold_runs.kfold(cfg)
    per_fold = [json.loads((tmp_path / "kf" / f"fold{k}" / "metrics.json").read_text()) for k in (1, 3)]
    assert [m["fold"] for m in per_fold] == [1, 3]
    wars = [m["last"]["war"] for m in per_fold]
    assert summary["last"]["war"]["mean"] == pytest.approx(np.mean(wars))
    assert summary["last"]["war"]["std"] == pytest.approx(np.std(wars))
    assert json.loads((tmp_path / "kf" / "kfold_summary.json").read_text())["last"] == summary["last"]
    assert "k-fold summary over folds [1, 3]" in capsys.readouterr().out
    with pytest.raises(ResumeError, match="fold1 holds a finished run"):  # before any trial
        kfold_runs.kfold(cfg)
