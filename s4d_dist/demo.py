"""The README's main job on a small built-in default: `python -m s4d_dist.demo`.

The whole S4D pipeline at toy scale, on a CPU in minutes:
1. render synthetic expressive faces as aligned face crops and build them into WebDataset
   shards, exactly like a real dataset (images for the static task, clips for the dynamic one);
2. dual-modal MAE pre-training of a tiny ViT on both (`demo` preset);
3. multi-task SFER + DFER fine-tuning with MoAE from that MAE (`demo_finetune` preset), best
   epoch chosen on a held-out validation split, then the test split scored with multi-view
   evaluation for the last and the best epoch.
Each stage uses the same code as the paper presets (DeepSpeed engine, data pipelines,
checkpoints, TensorBoard); a stage that already finished in the output folder with the same
config is reused.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from s4d_dist import config
from s4d_dist.shards.layout import DATASET_JSON, read_dataset
from s4d_dist.train import metrics
from s4d_dist.train.checkpoint import ResumeError, config_differences
from s4d_dist.train import preflight
from s4d_dist.train.cli import report as report_stop
from s4d_dist.train.faults import RunStopped
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.logs import run_logs
from s4d_dist.train.loop import run_dir, train
from s4d_dist.train.pretrain import PretrainTask

IMAGE_SPLITS = {"train": 300, "test": 20}  # samples per class (7 classes)
VIDEO_SPLITS = {"train": 100, "test": 20}


def build_data(root: Path, cfg) -> dict[str, Path]:
    """Synthetic image and video shard datasets (skipped when already complete)."""
    from s4d_dist.shards.synthetic import build_synthetic

    m = cfg.model
    paths = {"image": root / "image", "video": root / "video"}
    for modality, splits in (("image", IMAGE_SPLITS), ("video", VIDEO_SPLITS)):
        if not (paths[modality] / DATASET_JSON).is_file():
            print(f"[demo] building synthetic {modality} shards in {paths[modality]}", flush=True)
            build_synthetic(paths[modality], modality, splits, size=m.img_size,
                            frames=2 * m.num_frames, seed=cfg.seed + (modality == "video"),
                            workers=2, framing="aligned")
    return paths


# What does not change what a run computes: where it lives, how it checkpoints, logs and is
# orchestrated. A finished run that differs in anything else is another experiment.
NOT_RESULT = ("run_name", "output_dir", "resume", "checkpoint", "logging", "ray", "sweep")


def finished(folder: Path, cfg: DictConfig) -> bool:
    """Whether `folder` holds a finished run of `cfg`, to be reused instead of trained again.

    A finished run of another config stops with the differences (ResumeError): reusing it would
    report another experiment's scores as this one's.
    """
    if not (folder / "finished.json").is_file():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)
    differences = config_differences(saved, cfg, [k for k in cfg if k not in NOT_RESULT])
    if differences:
        raise ResumeError(f"{folder} holds a finished run of another config "
                          f"({'; '.join(differences)}); pick another output_dir or delete it")
    return True


def stage(preset: str, overrides: list[str], task_type) -> Path:
    """Train one stage into its run folder, or reuse the folder when that run has finished with
    the same config (a rerun of the demo, or of a benchmark built on it, continues where it
    stopped). A stop prints one line and exits with the code of the training commands."""
    cfg = config.load(preset, overrides)
    folder = run_dir(cfg)
    with run_logs(folder / "logs" / "rank0.log", 0) as log_file:
        try:
            if finished(folder, cfg):
                print(f"[demo] {cfg.task}: reusing the finished run in {folder}", flush=True)
                return folder
            print(f"[demo] {cfg.task}: {folder}", flush=True)
            started = time.time()
            train(cfg, task_type(cfg))
        except Exception as error:  # noqa: BLE001 - every stop becomes one line and an exit code
            raise SystemExit(report_stop(error, 0, log_file)) from None
    print(f"[demo] {cfg.task} took {time.time() - started:.0f}s", flush=True)
    return folder


def report(results: dict, names: list[str], out: Path) -> None:
    """The table a user reads first: each task's test scores for the last and the best epoch
    (chosen on the video validation split), per-class recall, and where the pictures are."""
    sections = [("DFER", "clips", results)]
    if "image" in results:
        sections.append(("SFER", "images", results["image"]))
    print(f"\n[demo] test scores in %, {len(names)} classes (chance {100 / len(names):.1f}); best = the "
          f"epoch with the best video validation WAR ({results.get('best_epoch', '-')})")
    print(f"[demo] {'task':5s} {'epoch':5s} {'WAR':>5s} {'UAR':>5s} {'F1':>5s}  recall: "
          + " ".join(f"{n[:5]:>5s}" for n in names))
    for task, unit, scores in sections:
        for name in ("last", "best"):
            if name in scores:
                r = scores[name]
                recall = metrics.per_class_recall(np.array(r["confusion"])) * 100
                print(f"[demo] {task:5s} {name:5s} {r['war']:5.1f} {r['uar']:5.1f} "
                      f"{r['f1_weighted']:5.1f}          " + " ".join(f"{v:5.1f}" for v in recall))
        print(f"[demo]   {task}: {scores['last']['samples']} test {unit}")
    print(f"[demo] computed with {torch.get_num_threads()} torch threads, "
          f"{torch.backends.cpu.get_cpu_capability()} kernels; another thread count or CPU gives "
          f"other numbers for the same seed (README: how much)")
    print(f"[demo] scores: {out / 'finetune' / 'metrics.json'}; TensorBoard (MAE reconstructions "
          f"of images and clips, confusion matrices, recall): tensorboard --logdir {out}")


# Keys the demo sets itself: each stage's run name, the shards it builds, the weights the second
# stage starts from.
DEMO_KEYS = ("task", "run_name", "init_checkpoint", "data.image_shards", "data.video_shards")
DEFAULT_OUTPUT = "runs/demo"


def _key(override: str) -> str:
    return override.partition("=")[0].strip()


def output_folder(parser: argparse.ArgumentParser, args) -> tuple[Path, list[str]]:
    """The folder for everything the demo writes — `--output`, or `output_dir=` as every other
    command takes it (the same thing), or runs/demo — and the overrides left for the stages.
    Overrides of what the demo sets itself are refused at once."""
    ours = [o for o in args.overrides if _key(o) in DEMO_KEYS]
    if ours:
        parser.error(f"{', '.join(ours)}: the demo sets {', '.join(DEMO_KEYS)} itself; choose "
                     f"its folder with output_dir=")
    given = [o.partition("=")[2].strip() for o in args.overrides if _key(o) == "output_dir"]
    if given and args.output and Path(given[-1]) != Path(args.output):
        parser.error(f"--output {args.output} and output_dir={given[-1]} name different "
                     f"folders; give one")
    out = Path(args.output or (given[-1] if given else DEFAULT_OUTPUT))
    return out, [o for o in args.overrides if _key(o) != "output_dir"]


def stage_overrides(out: Path, data: dict[str, Path], name: str, overrides: list[str]) -> list[str]:
    """A stage's overrides: the user's, then where the demo keeps its data and runs."""
    ours = [f"data.image_shards={data['image'] / 'train'}",
            f"data.video_shards={data['video'] / 'train'}", f"output_dir={out}",
            f"run_name={name}"]
    if name == "finetune":
        ours.append(f"init_checkpoint={out / 'pretrain' / 'weights_fp32.pt'}")
    return [*overrides, *ours]


def refuse_early(check, *args) -> None:
    """`check(*args)` (preflight), a refusal as one line and its exit code (as stage's)."""
    try:
        check(*args)
    except (config.ConfigError, RunStopped) as error:
        raise SystemExit(report_stop(error, 0, None)) from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m s4d_dist.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None,
                        help=f"folder for data, runs and logs, the same as output_dir= "
                             f"(default {DEFAULT_OUTPUT})")
    parser.add_argument("overrides", nargs="*", help="config overrides for both stages")
    args = parser.parse_args(argv)
    start = time.time()
    out, overrides = output_folder(parser, args)
    data = {modality: out / "data" / modality for modality in ("image", "video")}  # build_data's
    stages = {"pretrain": ("demo", PretrainTask), "finetune": ("demo_finetune", FinetuneTask)}
    try:
        cfgs = {name: config.load(preset, stage_overrides(out, data, name, overrides))
                for name, (preset, _) in stages.items()}
    except config.ConfigError as error:
        parser.error(str(error))
    refuse_early(preflight.output_dir, cfgs["pretrain"])  # before minutes of building data
    build_data(out / "data", cfgs["pretrain"])
    # Both stages checked before the first trains; the weights the second starts from are the
    # first's to write.
    refuse_early(preflight.check, cfgs["pretrain"])
    refuse_early(preflight.check, config.from_values(
        ("demo fine-tuning", OmegaConf.to_container(cfgs["finetune"])),
        ("not written yet", "init_checkpoint=")))
    for name, (preset, task_type) in stages.items():
        folder = stage(preset, stage_overrides(out, data, name, overrides), task_type)
    results = json.loads((folder / "metrics.json").read_text())
    report(results, read_dataset(data["video"])["class_names"], out)
    print(f"[demo] finished in {time.time() - start:.0f}s", flush=True)
    return results


if __name__ == "__main__":
    main()
