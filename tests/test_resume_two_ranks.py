"""kill -9 and resume under `deepspeed --num_gpus 2` (CPU, gloo): ZeRO-1 pre-training and ZeRO-2
fine-tuning. Each rank restores its optimizer shard, data position and RNG streams, so the loss
of every step (logged every step) equals that of an uninterrupted run, and a fine-tuning run
keeps its best-epoch choice and final metrics.

The crash is placed, not raced: tests/kill_at_step.py kills the launcher's whole process group
when rank 0 is about to take a chosen step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.loop import train
from test_train import run_two_ranks, scalars

KILL_AT = 6  # the run dies before step 6, after its last checkpoint (step 5 or 4: see below)


def event_files(run: Path) -> list[Path]:
    return sorted((run / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)


def losses_by_step(source: Path) -> dict[int, float]:
    """loss/image and loss/video of one event file (one process) or a whole run folder, by step."""
    events = EventAccumulator(str(source), size_guidance={"scalars": 0})
    events.Reload()
    out: dict[int, float] = {}
    for tag in ("loss/image", "loss/video"):
        for e in events.Scalars(tag) if tag in events.Tags()["scalars"] else []:
            assert e.step not in out, f"step {e.step} logged twice in {source}"
            out[e.step] = e.value
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task,stage,sizes", [
    # 2 steps per epoch and rank; the checkpoint of step 5 is mid-epoch 3, so each rank must
    # restore its position in the epoch (epoch ends are checkpointed too: steps 2, 4).
    ("pretrain", 1, ["optim.epochs=6", "checkpoint.every_steps=5"]),
    # 3 steps per epoch: the crash falls mid-epoch 2 (checkpoint of step 4), after epoch 1 was
    # chosen best so far.
    ("finetune", 2, ["optim.epochs=3", "data.video_batch_size=2", "data.image_batch_size=2",
                     "checkpoint.every_steps=2"]),
    # The flat AdamW (ZeRO-0): its gradients all-reduced by the step, its state in the
    # checkpoint's client state.
    ("finetune", 0, ["optim.epochs=3", "data.video_batch_size=2", "data.image_batch_size=2",
                     "checkpoint.every_steps=2"]),
])
def test_two_rank_kill_and_resume_equals_the_uninterrupted_run(synthetic_shards, tmp_path, task, stage, sizes):
    common = [f"launch/{task}.py", "--config", "demo",
              *tiny_overrides(synthetic_shards, tmp_path, task)[1:], *sizes,
              f"deepspeed.zero_stage={stage}"]
    run_two_ranks(common + ["run_name=whole"], tmp_path / "whole.txt")
    whole = losses_by_step(tmp_path / "whole" / "tb")
    assert len(whole) > KILL_AT + 2 and sorted(whole) == list(range(1, len(whole) + 1))

    crashed = common + ["run_name=crashed"]
    run_two_ranks(["tests/kill_at_step.py"] + crashed, tmp_path / "crashed.txt", expect_code=-9,
                  env={"S4D_TEST_KILL_AT_STEP": str(KILL_AT)})
    assert "kill -9 before step" in (tmp_path / "crashed.txt").read_text()
    run = tmp_path / "crashed"
    assert not (run / "finished.json").exists()
    tag = (run / "checkpoints" / "latest_complete").read_text()
    saved_step = int(tag.removeprefix("step"))
    assert 2 <= saved_step < KILL_AT
    assert {f"trainer_rank{r}.pt" for r in (0, 1)} <= {p.name for p in (run / "checkpoints" / tag).iterdir()}

    run_two_ranks(crashed, tmp_path / "resumed.txt")
    assert "resuming" in (tmp_path / "resumed.txt").read_text()
    before, after = (losses_by_step(f) for f in event_files(run))
    # The resumed process starts at the step after the checkpoint, and from there on every
    # loss is the uninterrupted run's: same batches, masks, mixing and optimizer state.
    assert min(after) == saved_step + 1 and max(after) == max(whole)
    assert sorted(after) == list(range(saved_step + 1, max(whole) + 1))
    assert [after[s] for s in sorted(after)] == pytest.approx([whole[s] for s in sorted(after)], rel=1e-5)
    assert [before[s] for s in sorted(before)] == pytest.approx([whole[s] for s in sorted(before)], rel=1e-5)

    # The exported fp32 weights (gathered from both ranks' ZeRO shards) are the uninterrupted run's.
    want = torch.load(tmp_path / "whole" / "weights_fp32.pt", weights_only=True)
    got = torch.load(run / "weights_fp32.pt", weights_only=True)
    assert set(got) == set(want) and len(want) > 10
    for key in want:
        assert torch.equal(got[key], want[key]), key

    if task == "finetune":
        # Best-epoch state (best val WAR, its checkpoint) survives the crash: same choice, same
        # test metrics, same validation curve.
        want = json.loads((tmp_path / "whole" / "metrics.json").read_text())
        got = json.loads((run / "metrics.json").read_text())
        assert got["best_epoch"] == want["best_epoch"] and got["best_val_war"] == want["best_val_war"]
        for name in ("last", "best"):  # the video test split, and the image one (multi-task)
            for mine, theirs in ((got, want), (got["image"], want["image"])):
                assert mine[name]["confusion"] == theirs[name]["confusion"], name
                assert mine[name]["war"] == pytest.approx(theirs[name]["war"]), name
        val = {s: v for s, v in scalars(run)["val/war"]}
        assert val == pytest.approx({s: v for s, v in scalars(tmp_path / "whole")["val/war"]})


class CrashingFinetune(FinetuneTask):
    """Raises before its `at`-th loss, as a crash between two checkpoints would stop the run
    (KeyboardInterrupt: an abrupt stop that no error handler of the loop turns into a clean exit)."""

    def __init__(self, cfg, at):
        super().__init__(cfg)
        self.at, self.calls = at, 0

    def inputs(self, run, batch, rng):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("crash")
        return super().inputs(run, batch, rng)


@pytest.mark.parametrize("stage", [2, 0])
def test_finetune_resume_with_moae_equals_the_uninterrupted_run(synthetic_shards, tmp_path, stage):
    """The MoAE router noise draws from the global torch RNG, which the checkpoint restores; it
    repeats only if nothing else draws from it at a point that moves with a resume (the torch
    loader's DataLoader did, once per epoch iterator, before it got a generator of its own).
    One rank in-process (ZeRO-2, and ZeRO-0's flat AdamW): the cheapest run that shows it; 3
    steps per epoch."""
    def cfg(name):
        return config.load("demo", tiny_overrides(synthetic_shards, tmp_path, "finetune") + [
            "optim.epochs=3", "data.video_batch_size=2", "data.image_batch_size=2",
            "checkpoint.every_steps=2", f"deepspeed.zero_stage={stage}", f"run_name={name}"])

    train(cfg("whole"), FinetuneTask(cfg("whole")))
    with pytest.raises(KeyboardInterrupt):
        train(cfg("crashed"), CrashingFinetune(cfg("crashed"), at=KILL_AT))
    train(cfg("crashed"), FinetuneTask(cfg("crashed")))
    whole = losses_by_step(tmp_path / "whole" / "tb")
    before, after = (losses_by_step(f) for f in event_files(tmp_path / "crashed"))
    assert min(after) < KILL_AT and max(after) == max(whole)
    assert [before[s] for s in sorted(before)] == [whole[s] for s in sorted(before)]
    assert [after[s] for s in sorted(after)] == [whole[s] for s in sorted(after)]
