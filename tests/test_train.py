"""The DeepSpeed training loops on CPU: both tasks, 1 and 2 ranks, ZeRO 0/1/2, crash and resume,
exports, refusals, the NaN guard and TensorBoard tags read back from the event files."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.data.loaders import eval_loader
from s4d_dist.models import official
from s4d_dist.models.factory import build_classifier, build_mae
from s4d_dist.train import distributed
from s4d_dist.train.checkpoint import ResumeError
from s4d_dist.train.engine import NonFiniteLossError
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.loop import Run, train
from s4d_dist.train.pretrain import PretrainTask
from s4d_dist.train.tracking import RunLogger

REPO = Path(__file__).resolve().parents[1]


def tiny(shards, out, task="pretrain", *extra):
    return config.load("demo", tiny_overrides(shards, out, task) + list(extra))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def relative_drop(losses: list[float]) -> float:
    """1 - (mean of the last 3 losses) / (mean of the first 3)."""
    return 1 - sum(losses[-3:]) / sum(losses[:3])


def test_pretrain_learns_beyond_a_no_learning_baseline(synthetic_shards, tmp_path):
    # 8 px patches give the tiny MAE something to learn in 4 epochs; 16 px ones barely move the
    # normalised-pixel loss (~0.4 % at any lr, as at lr 0). Both runs see the same batches and
    # masks (same seed), so the step-by-step comparison cancels the data noise.
    runs = {}
    for name, lr in (("learns", "1e-2"), ("frozen", "0")):
        cfg = tiny(synthetic_shards, tmp_path, "pretrain", "optim.epochs=4", "model.patch=8",
                   f"optim.base_lr={lr}", f"run_name={name}")
        train(cfg, PretrainTask(cfg))
        runs[name] = scalars(tmp_path / name)
    assert max(v for _, v in runs["frozen"]["lr"]) <= 1e-6  # warm-up starts at 1e-6
    for tag in ("loss/image", "loss/video"):
        learns, frozen = ([v for _, v in runs[name][tag]] for name in ("learns", "frozen"))
        assert len(learns) == len(frozen) >= 8, tag
        assert learns[0] == pytest.approx(frozen[0], rel=1e-6), tag  # same first batch, same init
        # Without learning the loss wanders by about ±1 %; learning takes it down by 3-5 %.
        assert abs(relative_drop(frozen)) < 0.02, (tag, frozen)
        assert relative_drop(learns) > relative_drop(frozen) + 0.02, (tag, learns, frozen)
        assert sum(learns[-3:]) < 0.97 * sum(frozen[-3:]), (tag, learns, frozen)


def test_pretrain_logs_and_exports(synthetic_shards, tmp_path):
    cfg = tiny(synthetic_shards, tmp_path, "pretrain", "optim.base_lr=4e-3")
    train(cfg, PretrainTask(cfg))
    run = tmp_path / "tiny"
    logged = scalars(run)
    for tag in ("loss/image", "loss/video", "lr", "grad_norm", "perf/samples_per_s",
                "perf/tokens_per_s", "perf/data_wait_fraction", "skipped/corrupt_samples"):
        assert tag in logged, tag
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


def test_finetune_from_pretrain_evaluates_last_and_best(synthetic_shards, tmp_path, capsys):
    pre = tiny(synthetic_shards, tmp_path, "pretrain", "optim.epochs=1", "run_name=pre")
    train(pre, PretrainTask(pre))
    capsys.readouterr()
    cfg = tiny(synthetic_shards, tmp_path, "finetune", "run_name=ft", "optim.epochs=3",
               f"init_checkpoint={tmp_path / 'pre' / 'weights_fp32.pt'}")
    # The carried keys: every encoder weight (patch embedding, both blocks), named without the
    # MAE's "encoder." prefix; the MoAE experts, router, fc_norm and heads stay fresh.
    pre_weights = torch.load(tmp_path / "pre" / "weights_fp32.pt", weights_only=True)
    fresh = build_classifier(cfg).state_dict()
    carried = {k for k in fresh if f"encoder.{k}" in pre_weights}
    assert len(carried) == 2 + 2 * 13  # patch_embed.proj.{weight,bias}; 13 tensors per block
    results = train(cfg, FinetuneTask(cfg))
    said = capsys.readouterr().out
    assert f"[s4d] initialised from {tmp_path / 'pre' / 'weights_fp32.pt'}: {len(carried)} keys carried" in said
    assert f"{len(fresh) - len(carried)} fine-tuning keys freshly initialised" in said
    initialised = FinetuneTask(cfg).build_model(None, resuming=False).state_dict()
    for key in fresh:
        if key in carried:
            assert torch.equal(initialised[key], pre_weights[f"encoder.{key}"]), key
        elif "norm" not in key and not key.endswith("bias"):  # random init, not the MAE's
            assert not any(v.shape == initialised[key].shape and torch.equal(v, initialised[key])
                           for v in pre_weights.values()), key
    assert {"last", "best", "best_epoch"} <= set(results)
    n_test = 7  # 1 clip per class in the test split
    assert results["last"]["samples"] == n_test
    assert sum(map(sum, results["last"]["confusion"])) == n_test
    logged = scalars(tmp_path / "ft")
    assert {"val/war", "test_last/war", "loss/image", "loss/video"} <= set(logged)
    assert {"moae/layer1/image/drop_fraction", "moae/layer1/video/drop_fraction"} & set(logged)
    # The best epoch is the first argmax of validation WAR (one value per epoch), not of test.
    val_war = [v for _, v in sorted(logged["val/war"])]
    assert len(val_war) == 3
    assert results["best_epoch"] == 1 + val_war.index(max(val_war))
    assert results["best_val_war"] == pytest.approx(max(val_war))
    model = build_classifier(cfg)
    model.load_state_dict(torch.load(tmp_path / "ft" / "weights_fp32.pt", weights_only=True))
    # Multi-task: the image head is scored on the image test split too, for the last epoch and
    # for the epoch chosen on the video metric; the last one matches an independent scoring of
    # the exported (last-epoch) weights with scikit-learn.
    image = json.loads((tmp_path / "ft" / "metrics.json").read_text())["image"]
    assert set(image) == {"last", "best"}
    assert results["image"] == image
    assert image["last"]["samples"] == image["best"]["samples"] == 7  # 1 image per class
    expected = sklearn_scores(model, cfg, "image")
    assert image["last"]["confusion"] == expected.pop("confusion")
    for key, value in expected.items():
        assert image["last"][key] == pytest.approx(value), key
    assert {f"image_test_{e}/{k}" for e in ("last", "best") for k in ("war", "uar", "f1_weighted")
            } <= set(logged)
    assert logged["image_test_best/war"][0][1] == pytest.approx(image["best"]["war"])
    assert not any(tag.startswith("hparam") for tag in logged)  # no single-point charts
    events = EventAccumulator(str(tmp_path / "ft" / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {f"{p}_{e}/{v}" for p in ("test", "image_test") for e in ("last", "best")
            for v in ("confusion", "recall")} | {"moae/expert_load"} <= set(events.Tags()["images"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == [  # the table reads these scalars
        "test_best/war", "test_best/uar", "image_test_best/war", "image_test_best/uar"]
    assert "fold" not in {h.name for h in experiment.hparam_infos}  # a run without folds


def sklearn_scores(model, cfg, modality: str) -> dict:
    """WAR, UAR, weighted F1 (in %), confusion matrix and count of `model` on the test split of
    `modality`, one view per sample, scored by scikit-learn instead of train/evaluate.py."""
    from sklearn import metrics as sk

    loader = eval_loader(cfg, "test", modality, backend="torch")
    labels, preds = [], []
    model.eval()
    with torch.no_grad():
        for batch in loader.batches():
            valid = batch["valid"].bool()
            assert not batch["view"][valid].any()  # one view per sample
            preds += model(batch["pixels"].float(), modality).argmax(1)[valid].tolist()
            labels += batch["label"][valid].tolist()
    loader.close()
    classes = list(range(FinetuneTask(cfg).num_classes(modality)))
    return {"war": 100 * sk.accuracy_score(labels, preds),
            "uar": 100 * sk.balanced_accuracy_score(labels, preds),
            "f1_weighted": 100 * sk.f1_score(labels, preds, average="weighted", zero_division=0),
            "confusion": sk.confusion_matrix(labels, preds, labels=classes).tolist(),
            "samples": len(labels)}


@pytest.mark.parametrize("images", ["none", "without test split"])
def test_finetune_without_image_test_data_scores_the_video_head_alone(synthetic_shards, tmp_path,
                                                                     caplog, images):
    """A DFER-only run, or one whose image dataset has no test split, ends as before: results
    and TensorBoard views of the video head only (the latter says why)."""
    if images == "none":
        image_shards = ""
    else:
        shutil.copytree(synthetic_shards / "image", tmp_path / "image",
                        ignore=shutil.ignore_patterns("test"))
        image_shards = tmp_path / "image" / "train"
    cfg = tiny(synthetic_shards, tmp_path, "finetune", f"data.image_shards={image_shards}")
    torch.manual_seed(0)
    run = Run(cfg, tmp_path, RunLogger(tmp_path), checkpoints=None,
              engine=SimpleNamespace(module=build_classifier(cfg)),
              state={"global_step": 0, "task": {}})
    with caplog.at_level(logging.INFO, logger="s4d_dist"):  # finish() alone: no run_logs
        results = FinetuneTask(cfg).finish(run)
    run.logger.close()
    assert set(results) == {"task", "fold", "last"}
    assert results["last"]["samples"] == 7
    tags = set(scalars(tmp_path))
    assert "test_last/war" in tags and not any(t.startswith("image") for t in tags)
    said = "image head not scored, no image test split" in caplog.text
    assert said == (images != "none")


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
    """Feeds NaN pixels (a NaN loss) from step `start` on: the guard must skip, count, then abort."""

    def __init__(self, cfg, start):
        super().__init__(cfg)
        self.start, self.calls = start, 0

    def inputs(self, run, batch, rng):
        self.calls += 1
        pixels, mask = super().inputs(run, batch, rng)
        return (pixels * float("nan") if self.calls > self.start else pixels), mask


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


def run_two_ranks(args: list[str], log_path: Path, tries: int = 3, expect_code: int = 0,
                  env: dict | None = None) -> None:
    """`deepspeed --num_gpus 2` on a port the OS just handed out; the port is chosen before the
    launcher binds it, so a run that lost it to another process is retried on a fresh one."""
    for _ in range(tries):
        port = distributed.free_port()
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                    "--master_port", str(port)]
        with open(log_path, "w") as log:
            code = _launch(launcher + args, env or {}, log).wait(timeout=600)
        text = log_path.read_text()
        if code == expect_code or "address already in use" not in text.lower():  # EADDRINUSE
            break
    assert code == expect_code, text[-3000:]
    # DeepSpeed's CPU shared-memory buffers (66 MB of RAM per rank) do not outlive the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_under_the_deepspeed_launcher(synthetic_shards, tmp_path, stage):
    args = ["launch/finetune.py", "--config", "demo",
            *tiny_overrides(synthetic_shards, tmp_path, "finetune")[1:],
            f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16", "optim.epochs=1"]
    run_two_ranks(args, tmp_path / "log.txt")
    results = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert results["last"]["samples"] == 7  # every test clip once across both ranks
    assert results["image"]["last"]["samples"] == 7  # and every test image
    ckpt = tmp_path / "tiny" / "checkpoints"
    tag = (ckpt / "latest_complete").read_text()
    assert {f"trainer_rank{r}.pt" for r in (0, 1)} <= {p.name for p in (ckpt / tag).iterdir()}


def _losses(run_dir):
    return [v for _, v in sorted(scalars(run_dir)["loss/video"] + scalars(run_dir)["loss/image"])]


@pytest.mark.slow
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
        while proc.poll() is None and not (ckpt.is_file() and ckpt.read_text() >= "step000000004"):
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the checkpoint this test waits for"
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
