"""Errors before the run starts (s4d_dist/train/preflight.py), as an operator meets them: the real
training command with a config the files contradict stops with one console line and its exit
code before torch is even imported — nothing built, no run folder made — within seconds."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# The training command as launch/finetune.py runs it, reporting afterwards which heavy modules
# it had imported by the time it stopped.
COMMAND = """
import sys
from s4d_dist.train import cli
try:
    cli.main(sys.argv[1], sys.argv[2:])
finally:
    print("imported:", sorted(m for m in ("torch", "deepspeed") if m in sys.modules))
"""


@pytest.fixture(scope="module")
def two_fold_videos(tmp_path_factory):
    """A k-fold video dataset of two parts (folds 1 and 2), as DFEW is stored."""
    from s4d_dist.shards.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("kfold") / "video"
    build_synthetic(root, "video", {"part1": 1, "part2": 1}, size=32, frames=8, seed=3,
                    folds=True, video_codec="mjpeg")
    return root


def stop(task: str, *args: str) -> tuple[int, list[str], str, float, str]:
    """(exit code, our console lines, stderr, seconds, heavy modules imported) of the training
    command."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", COMMAND, task, "--config", "demo", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.monotonic() - started
    lines = [line for line in done.stderr.splitlines() if line.startswith("[s4d]")]
    assert "Traceback" not in done.stderr, done.stderr
    imported = done.stdout.split("imported: ")[-1].strip()
    return done.returncode, lines, done.stderr, seconds, imported


def finetune_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(shards, out, "finetune")[1:], *extra]


@pytest.mark.parametrize("case", ["missing init_checkpoint", "fold 7 of a 2-fold set",
                                  "no fold of a k-fold set", "fold of a split folder",
                                  "class count", "no such shard folder", "not a shard folder",
                                  "mixed DALI without a GPU", "output_dir under a file",
                                  "unfinished build"])
def test_what_the_files_contradict_stops_the_run_before_it_starts(
        case, synthetic_shards, two_fold_videos, tmp_path):
    shards, out = synthetic_shards, tmp_path / "runs"
    video = f"data.video_shards={two_fold_videos}"
    cases = {
        "missing init_checkpoint": (
            finetune_args(shards, out, f"init_checkpoint={tmp_path / 'pre' / 'weights.pt'}"),
            2, f"init_checkpoint={tmp_path / 'pre' / 'weights.pt'}: no such checkpoint file"),
        "fold 7 of a 2-fold set": (
            finetune_args(shards, out, video, "data.fold=7"),
            2, f"data.fold=7: dataset synthetic-video ({two_fold_videos}) has no fold 7; its folds "
               f"are 1, 2"),
        "no fold of a k-fold set": (
            finetune_args(shards, out, video),
            2, f"{two_fold_videos} holds the k-fold dataset synthetic-video: set data.fold to "
               f"one of 1, 2"),
        "fold of a split folder": (
            finetune_args(shards, out, "data.fold=1"),
            2, f"data.fold=1: {shards / 'video' / 'train'} is one split folder; data.fold needs "
               f"the dataset folder"),
        "class count": (
            finetune_args(shards, out, "model.num_image_classes=8"),
            2, f"model.num_image_classes=8, but data.image_shards={shards / 'image' / 'train'} "
               f"has 7 classes (Neutral, Happiness, Sadness, Surprise, Fear, Disgust, Anger)"),
        "no such shard folder": (
            finetune_args(shards, out, f"data.video_shards={tmp_path / 'nowhere'}"),
            2, f"data.video_shards={tmp_path / 'nowhere'}: no such folder"),
        "not a shard folder": (
            finetune_args(shards, out, f"data.image_shards={tmp_path}"),
            2, f"data.image_shards={tmp_path}: neither a shard split folder"),
        "mixed DALI without a GPU": (
            finetune_args(shards, out, "data.backend=auto", "data.dali_device=mixed"),
            2, "data.dali_device=mixed decodes on a GPU, and this machine has none"),
        "output_dir under a file": (
            finetune_args(shards, tmp_path / "file" / "runs"),
            73, f"output_dir={tmp_path / 'file' / 'runs'}: {tmp_path / 'file'} is a file"),
        "unfinished build": (
            finetune_args(tmp_path / "shards", out),
            65, f"{tmp_path / 'shards' / 'image' / 'train'}: build not finished"),
    }
    args, code, said = cases[case]
    if case == "mixed DALI without a GPU":
        pytest.importorskip("nvidia.dali")
    if case == "output_dir under a file":
        (tmp_path / "file").write_text("")
    if case == "unfinished build":
        shutil.copytree(shards, tmp_path / "shards")
        manifest = tmp_path / "shards" / "image" / "train" / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))

    exit_code, lines, err, seconds, imported = stop("finetune", *args)
    assert exit_code == code, err
    # before DeepSpeed, and before torch but for the one check that asks torch for a GPU
    assert imported == ("['torch']" if case == "mixed DALI without a GPU" else "[]"), imported
    assert len(lines) == 1 and lines[0].startswith(f"[s4d] error: {said}"), err
    assert lines[0].endswith(f"(exit {code})"), lines  # nothing logged: no run folder to name
    assert not out.exists()  # no run folder made
    # About 1 s alone (2 s with torch), where a run stopped by its engine took 27 s; what proves
    # "before the start" is the absence of DeepSpeed above, this bound is room for a busy machine.
    assert seconds < 60, seconds


def test_a_resumed_run_needs_no_init_checkpoint(synthetic_shards, tmp_path):
    """A run folder with a checkpoint to resume from restores its own weights, so the file it
    was initialised from may be gone: not refused before the start (it then trains as usual,
    which test_train covers)."""
    from s4d_dist import config
    from s4d_dist.train import preflight

    cfg = config.load("demo", [*tiny_overrides(synthetic_shards, tmp_path, "finetune"),
                               f"init_checkpoint={tmp_path / 'gone.pt'}"])
    with pytest.raises(config.ConfigError, match="gone.pt: no such checkpoint file"):
        preflight.check(cfg)
    checkpoints = tmp_path / "tiny" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest_complete").write_text("step5")
    preflight.check(cfg)


def test_pretraining_ignores_init_checkpoint_and_takes_a_k_fold_set_with_a_fold(
        synthetic_shards, two_fold_videos, tmp_path):
    from s4d_dist import config
    from s4d_dist.train import preflight

    preflight.check(config.load("demo", [
        *tiny_overrides(synthetic_shards, tmp_path, "pretrain"), "init_checkpoint=nowhere.pt",
        f"data.video_shards={two_fold_videos}", "data.fold=2"]))
