"""Ray Train and Tune running the real loops on a simulated two-node cluster.

The cluster is `ray.cluster_utils.Cluster`: a head raylet and a second raylet on this machine,
1 CPU each, so a 2-worker run necessarily spans both nodes and talks gloo between them, and a
sweep runs two 1-worker trials at once. It is this module's own: its own temp folder, token and
environment (conftest.ray_cluster_environment), nothing shared with other Ray clusters on the
machine or left for later tests. Every test trains the tiny config of conftest with DeepSpeed
in each worker; they take tens of seconds each (marked slow, run by default).
"""
import functools
import json
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import ray._private.utils
from ray.cluster_utils import Cluster

from conftest import ray_cluster_environment, tiny_overrides
from s4d_dist import config
from s4d_dist.orchestrate import cluster as cluster_module
from s4d_dist.orchestrate import kfold_runs, ray_train, runs, sweep
from s4d_dist.shards.synthetic import build_synthetic
from s4d_dist.train.checkpoint import ResumeError
from test_resume_two_ranks import event_files, losses_by_step

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
    """The cluster, under a temp folder of its own (short: Ray's socket paths must fit in 107
    characters), with its own token. Cluster records its address for `ray.init("auto")` in the
    default temp folder, where other people's drivers look: that record goes to ours too."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    record = functools.partial(ray._private.utils.write_ray_address, temp_dir=temp)
    with ray_cluster_environment(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.utils, "write_ray_address", record)
        # With its dashboard: Ray Train releases finished trials' placement groups through it.
        nodes = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": True, "temp_dir": temp})
        nodes.add_node(num_cpus=1, temp_dir=temp)
        ray.init(address=nodes.address)
        try:
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def tiny(shards, out, *extra):
    return config.load("demo", tiny_overrides(shards, out, "finetune") + LEARNS + list(extra))


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


# The two-worker run of the tests below: 3 steps per epoch.
TWO_WORKERS = ["ray.num_workers=2", "deepspeed.zero_stage=1", "optim.epochs=4"]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory, two_nodes) -> Path:
    """The run folder of TWO_WORKERS trained without a fault."""
    out = tmp_path_factory.mktemp("uninterrupted")
    ray_train.fit(tiny(shards, out, *TWO_WORKERS))
    return out / "tiny"


def test_two_workers_on_two_nodes_finetune_with_deepspeed(uninterrupted):
    run = uninterrupted
    results = json.loads((run / "metrics.json").read_text())
    assert results["last"]["samples"] == 7  # every test clip once, across both ranks
    assert {"best", "best_epoch"} <= set(results)
    assert (run / "finished.json").is_file() and list((run / "tb").glob("events.*"))
    tag = (run / "checkpoints" / "latest_complete").read_text()
    assert {"trainer_rank0.pt", "trainer_rank1.pt"} <= {p.name for p in (run / "checkpoints" / tag).iterdir()}
    # Ray's record of the run lives in the run folder itself and points at our checkpoints.
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["checkpoint_results"][-1]["checkpoint_dir_name"] == f"checkpoints/{tag}"


def flat(tree, path=()) -> dict[tuple, object]:
    """The leaves of nested dicts and lists, by path."""
    if isinstance(tree, dict | list):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {leaf: value for key, child in items for leaf, value in flat(child, (*path, key)).items()}
    return {path: tree}


def test_preempted_then_killed_workers_end_as_the_uninterrupted_run(shards, tmp_path, two_nodes,
                                                                    uninterrupted):
    """A preemption, then a crash, in one run of TWO_WORKERS:

    - SIGTERM to one worker process (SLURM's --signal, a reclaimed node): every rank saves a
      checkpoint at the next step and stops; Ray Train restarts the workers (FailureConfig),
      which resume from that checkpoint — not from the last epoch's (before, Ray's own handler
      ended the process at once and the restart lost the steps since the epoch's checkpoint);
    - later SIGKILL to one of the new workers (the OOM killer, a lost node): Ray restarts them
      from the last complete checkpoint.
    The run then ends as the uninterrupted one: the loss of every step, logged by each attempt,
    and the final metrics are that run's. Checkpoints are saved at epoch ends only, so the
    preemption's is the only one in mid-epoch."""
    cfg = tiny(shards, tmp_path, *TWO_WORKERS, "checkpoint.every_steps=0")
    run = tmp_path / "tiny"
    latest = run / "checkpoints" / "latest_complete"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(results=ray_train.fit(cfg)), daemon=True)
    thread.start()

    def next_checkpoint(after: str) -> str:
        """The tag of the first complete checkpoint other than `after` (while the run lasts)."""
        while thread.is_alive() and (latest.read_text() if latest.is_file() else "") in ("", after):
            time.sleep(0.05)
        assert thread.is_alive(), "the run ended before the checkpoint this test waits for"
        return latest.read_text()

    epoch_1 = next_checkpoint("")
    first = train_workers(two_nodes)
    assert len(first) == 2
    first[-1].send_signal(signal.SIGTERM)
    preempted = next_checkpoint(epoch_1)
    later = next_checkpoint(preempted)  # saved by the restarted workers
    second = [w for w in train_workers(two_nodes) if w.pid not in {p.pid for p in first}]
    assert len(second) == 2 and not (run / "finished.json").exists()
    second[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and "results" in outcome, "the run did not recover"
    assert not psutil.pid_exists(second[-1].pid)

    rank0 = (run / "logs" / "rank0.log").read_text()
    said = set(re.findall(r"preempted \(SIGTERM\): checkpoint (step\d+) \(step", rank0))
    assert said == {preempted}, rank0[-3000:]
    assert preempted > epoch_1  # written at the signal, not the last epoch's
    resumed = re.findall(r"resuming \S+ from checkpoint (step\d+)", rank0)
    assert resumed[:1] == [preempted] and len(resumed) == 2 and resumed[1] >= later

    whole = losses_by_step(uninterrupted / "tb")
    attempts = [losses_by_step(f) for f in event_files(run)]
    assert len(attempts) == 3 and set().union(*attempts) == set(whole)
    assert min(attempts[1]) == int(preempted[4:]) + 1  # the first step after the preemption's
    for losses in attempts:
        assert [losses[s] for s in sorted(losses)] == pytest.approx([whole[s] for s in sorted(losses)],
                                                                    rel=1e-5)
    got, want = (flat(json.loads((r / "metrics.json").read_text())) for r in (run, uninterrupted))
    assert outcome["results"] == json.loads((run / "metrics.json").read_text())
    floats = sorted(k for k, v in want.items() if isinstance(v, float))
    assert got.keys() == want.keys() and got["best_epoch",] == want["best_epoch",]
    assert {k: v for k, v in got.items() if k not in floats} == \
        {k: v for k, v in want.items() if k not in floats}  # counts, confusion matrices, ...
    assert [got[k] for k in floats] == pytest.approx([want[k] for k in floats], rel=1e-6)


def test_asha_sweep_stops_the_bad_trials_and_writes_the_best_preset(shards, tmp_path, two_nodes):
    """Four 1-worker trials, two at a time, in grid order: two learning rates that learn, then
    two (1e-8, 1e-9) that cannot move the model within an epoch, so at ASHA's first rung (epoch
    1) their training loss is above the two recorded ones and they are stopped there.

    ASHA follows the epoch's mean training loss here, not validation WAR: on 11 validation
    clips a learning run and a frozen one may differ by one clip after an epoch, or tie, while
    the training loss of the same batches falls as soon as the weights move (measured: 1.935
    and 1.927 against 1.952 frozen). Between the two learning trials ASHA keeps the better half
    at each rung, among the trials recorded when one reports — which of them goes on depends on
    which reports first, so the test asks only that one of them trains to the end."""
    base = tiny(shards, tmp_path, "optim.epochs=3", "run_name=lr_sweep", "sweep.grace_period=1",
                "sweep.metric=train_loss", "sweep.mode=min")
    cfg = runs.with_values(base, "test", {"sweep": {"space": {
        "optim.base_lr": {"grid": [3e-3, 1e-2, 1e-8, 1e-9]}}}})
    rows = sweep.sweep(cfg)
    folder = tmp_path / "lr_sweep"
    by_lr = {row["optim.base_lr"]: row for row in rows}
    assert len(rows) == 4 and all(row["error"] is None for row in rows)
    learning = [by_lr[3e-3], by_lr[1e-2]]
    for bad in (1e-8, 1e-9):
        assert by_lr[bad]["status"] == "stopped early" and by_lr[bad]["epochs"] == 1
        assert by_lr[bad]["train_loss_best"] > max(row["train_loss_best"] for row in learning)
    assert [(row["status"], row["epochs"]) for row in learning].count(("finished", 3)) >= 1
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
