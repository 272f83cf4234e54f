"""The DeepSpeed training loops on CPU: both tasks, 1 and 2 ranks, ZeRO 0/1/2, crash and resume,
exports, refusals, the NaN guard and TensorBoard tags read back from the event files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.models import official
from s4d_dist.models.build import build_classifier, build_mae
from s4d_dist.train.checkpoint import ResumeError
from s4d_dist.train.engine import NonFiniteLossError
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.loop import train
from s4d_dist.train.pretrain import PretrainTask

REPO = Path(__file__).resolve().parents[1]


def tiny(shards, out, task="pretrain", *extra):
    return config.load("demo", tiny_overrides(shards, out, task) + list(extra))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_pretrain_learns_logs_and_exports(synthetic_shards, tmp_path):
    cfg = tiny(synthetic_shards, tmp_path, "pretrain", "optim.epochs=4", "optim.base_lr=4e-3")
    train(cfg, PretrainTask(cfg))
    run = tmp_path / "tiny"
    logged = scalars(run)
    for tag in ("loss/image", "loss/video", "lr", "grad_norm", "perf/samples_per_s",
                "perf/tokens_per_s", "perf/data_wait_fraction", "skipped/corrupt_samples"):
        assert tag in logged, tag
    losses = [v for _, v in logged["loss/video"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"mae/image", "mae/video"} & set(events.Tags()["images"])
    weights = torch.load(run / "weights_fp32.pt", weights_only=True)
    model = build_mae(cfg)
    model.load_state_dict(weights)  # the fp32 export is a complete state dict
    assert isinstance(official.load(run / "weights_official.pth", img_size=32, num_frames=4,
                                    num_heads=2, decoder_heads=2),
                      type(model))
    assert json.loads((run / "finished.json").read_text())["global_step"] > 0


def test_finetune_from_pretrain_evaluates_last_and_best(synthetic_shards, tmp_path):
    pre = tiny(synthetic_shards, tmp_path, "pretrain", "optim.epochs=1", "run_name=pre")
    train(pre, PretrainTask(pre))
    cfg = tiny(synthetic_shards, tmp_path, "finetune", "run_name=ft",
               f"init_checkpoint={tmp_path / 'pre' / 'weights_fp32.pt'}")
    results = train(cfg, FinetuneTask(cfg))
    assert {"last", "best", "best_epoch"} <= set(results)
    n_test = 7  # 1 clip per class in the test split
    assert results["last"]["samples"] == n_test
    assert sum(map(sum, results["last"]["confusion"])) == n_test
    logged = scalars(tmp_path / "ft")
    assert {"val/war", "test_last/war", "moae/layer1/drop_fraction", "loss/image",
            "loss/video"} <= set(logged)
    model = build_classifier(cfg)
    model.load_state_dict(torch.load(tmp_path / "ft" / "weights_fp32.pt", weights_only=True))


def test_resume_rules(synthetic_shards, tmp_path):
    cfg = tiny(synthetic_shards, tmp_path, "pretrain", "optim.epochs=1")
    train(cfg, PretrainTask(cfg))
    with pytest.raises(ResumeError, match="finished run"):
        train(cfg, PretrainTask(cfg))
    (tmp_path / "tiny" / "finished.json").unlink()  # as if it had crashed after the last save
    bigger = tiny(synthetic_shards, tmp_path, "pretrain", "optim.epochs=1", "model.depth=3")
    with pytest.raises(ResumeError, match=r"model.depth: 2 → 3"):
        train(bigger, PretrainTask(bigger))
    never = tiny(synthetic_shards, tmp_path, "pretrain", "resume=never")
    with pytest.raises(ResumeError, match="resume=never"):
        train(never, PretrainTask(never))


class ExplodingTask(PretrainTask):
    """Returns NaN from step `start` on: the guard must skip, count, then abort."""

    def __init__(self, cfg, start):
        super().__init__(cfg)
        self.start, self.calls = start, 0

    def loss(self, run, batch, rng):
        self.calls += 1
        loss = super().loss(run, batch, rng)
        return loss * float("nan") if self.calls > self.start else loss


def test_nonfinite_losses_are_skipped_then_abort(synthetic_shards, tmp_path):
    cfg = tiny(synthetic_shards, tmp_path, "pretrain", "optim.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(cfg, ExplodingTask(cfg, start=2))
    logged = scalars(tmp_path / "tiny")
    assert max(v for _, v in logged["skipped/nonfinite_steps"]) == 2  # the 3rd aborts


def _launch(args, env_extra, log):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_under_the_deepspeed_launcher(synthetic_shards, tmp_path, stage):
    args = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(29700 + stage), "launch/finetune.py", "--config", "demo",
            *tiny_overrides(synthetic_shards, tmp_path, "finetune")[1:],
            f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16", "optim.epochs=1"]
    with open(tmp_path / "log.txt", "w") as log:
        assert _launch(args, {}, log).wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    results = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert results["last"]["samples"] == 7  # every test clip once across both ranks
    ckpt = tmp_path / "tiny" / "checkpoints"
    tag = (ckpt / "latest_complete").read_text()
    assert {f"trainer_rank{r}.pt" for r in (0, 1)} <= {p.name for p in (ckpt / tag).iterdir()}


def _losses(run_dir):
    return [v for _, v in sorted(scalars(run_dir)["loss/video"] + scalars(run_dir)["loss/image"])]


def test_kill_and_resume_reproduces_the_uninterrupted_run(synthetic_shards, tmp_path):
    common = [*tiny_overrides(synthetic_shards, tmp_path, "pretrain")[1:], "optim.epochs=3",
              "checkpoint.every_steps=2", "deepspeed.zero_stage=1"]
    whole = [sys.executable, "launch/pretrain.py", "--config", "demo", *common]
    with open(tmp_path / "whole.txt", "w") as log:
        assert _launch(whole + ["run_name=whole"], {}, log).wait(timeout=600) == 0
    crashed = whole + ["run_name=crashed"]
    ckpt = tmp_path / "crashed" / "checkpoints" / "latest_complete"
    with open(tmp_path / "crashed.txt", "w") as log:
        proc = _launch(crashed, {}, log)
        deadline = time.time() + 300
        while time.time() < deadline and not (ckpt.is_file() and ckpt.read_text() >= "step000000004"):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 mid-run
        proc.wait()
    assert not (tmp_path / "crashed" / "finished.json").exists()
    with open(tmp_path / "resumed.txt", "w") as log:
        assert _launch(crashed, {}, log).wait(timeout=600) == 0
    assert "resuming" in (tmp_path / "resumed.txt").read_text()
    whole_losses = _losses(tmp_path / "whole")
    resumed = dict(sorted(scalars(tmp_path / "crashed")["loss/video"] +
                          scalars(tmp_path / "crashed")["loss/image"]))
    assert len(resumed) == len(whole_losses)
    assert list(resumed.values()) == pytest.approx(whole_losses, rel=1e-5)
