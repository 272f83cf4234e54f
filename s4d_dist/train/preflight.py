"""What a run can be refused for before it starts: checks of the resolved config against the
files and the machine, made before any rank builds anything.

    preflight.check(cfg)   # raises ConfigError (exit 2), DataError (65) or StorageError (73)

The command line (cli.py) calls it before it imports torch or DeepSpeed, `train()` again for
every other way in (the demo, Ray workers), the Ray driver before it starts Ray. It reads file
metadata and the shards' JSON (dataset.json, manifest.json) only, and each refusal is one line
that names the key, its value and what is wrong:

- files the config names: a fine-tuning run's `init_checkpoint` (unless the run folder holds a
  checkpoint to resume from, which replaces it); each `data.*_shards` location is a shard
  split folder or a built dataset;
- folds: `data.fold` is one of the video dataset's folds, and a k-fold dataset gets a fold;
- class counts: a fine-tuning run's `model.num_video_classes` / `num_image_classes` equal the
  number of classes its shards were built with;
- resources: `output_dir` can be written; `data.backend=dali` has DALI installed;
  `data.dali_device=mixed` has a GPU (torch is imported for that check only).

Shards that exist but cannot be used — an unfinished build, no samples — are data errors (exit
65), as when the loaders meet them later; a broken evaluation split is still found when the run
opens it, before step 0 (loop.open_eval_data).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from omegaconf import DictConfig

from s4d_dist.config import ConfigError
from s4d_dist.data.catalog import shard_paths
from s4d_dist.shards import layout
from s4d_dist.train.faults import DataError, StorageError
from s4d_dist.train.run_folder import has_checkpoint, run_dir

LOCATIONS = ("image_shards", "video_shards", "val_shards", "test_shards")
MODALITY_OF = {"image_shards": "image", "video_shards": "video"}


def check(cfg: DictConfig) -> None:
    """Refuse `cfg` (one of the errors above) if what it names cannot be trained as asked."""
    init_checkpoint(cfg)
    for key in LOCATIONS:
        location(cfg, key)
    for key in ("video_shards", "image_shards"):
        if cfg.data[key]:
            training_split(cfg, key)
    output_dir(cfg)
    devices(cfg)


def init_checkpoint(cfg: DictConfig) -> None:
    path = Path(cfg.init_checkpoint)
    if cfg.task != "finetune" or not cfg.init_checkpoint or path.is_file():
        return
    if has_checkpoint(run_dir(cfg)):  # a resume restores its own weights, not these
        return
    hint = ""
    if path.is_dir():
        inside = [name for name in ("weights_fp32.pt", "weights_official.pth")
                  if (path / name).is_file()]
        hint = f" (a folder; its weights are {path / inside[0]})" if inside else " (a folder)"
    raise ConfigError(f"init_checkpoint={cfg.init_checkpoint}: no such checkpoint file{hint}")


def location(cfg: DictConfig, key: str) -> None:
    """`data.<key>`, when set, is a split folder (manifest.json) or a built dataset."""
    value = cfg.data[key]
    path = Path(value)
    if not value or (path / layout.MANIFEST_JSON).is_file() or (path / layout.DATASET_JSON).is_file():
        return
    what = "no such folder" if not path.exists() else (
        f"neither a shard split folder ({layout.MANIFEST_JSON}) nor a built dataset "
        f"({layout.DATASET_JSON})")
    raise ConfigError(f"data.{key}={value}: {what}; shards are built with "
                      f"`python -m s4d_dist.shards`")


def training_split(cfg: DictConfig, key: str) -> None:
    """The training split the run reads from `data.<key>` (a fold's parts for videos with
    data.fold) resolves to finished shards, and its classes match the model's heads."""
    value, modality = cfg.data[key], MODALITY_OF[key]
    fold = cfg.data.fold if modality == "video" else None
    try:
        shard_paths(value, "train", fold)
    except layout.FoldError as error:  # the config asks for what the dataset does not have
        raise ConfigError(f"data.fold={fold}: {error}" if fold is not None else str(error)) from None
    except (OSError, ValueError, layout.BuildError) as error:
        raise DataError(str(error)) from None  # the message names the folder
    if cfg.task == "finetune":
        classes(cfg, key, modality)


def classes(cfg: DictConfig, key: str, modality: str) -> None:
    names = layout.class_names(cfg.data[key]) or []
    wanted = cfg.model[f"num_{modality}_classes"]
    if names and len(names) != wanted:
        raise ConfigError(f"model.num_{modality}_classes={wanted}, but data.{key}="
                          f"{cfg.data[key]} has {len(names)} classes ({', '.join(names)}); "
                          f"set model.num_{modality}_classes={len(names)}")


def output_dir(cfg: DictConfig) -> None:
    """The run folder exists and is writable, or can be made where the first existing folder
    above it is."""
    folder = run_dir(cfg).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise StorageError(f"output_dir={cfg.output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"output_dir={cfg.output_dir}: cannot write in {existing} "
                           f"(permission denied); pick another output_dir")


def devices(cfg: DictConfig) -> None:
    """DALI where the run must use it, and a GPU where DALI must decode on one."""
    d = cfg.data
    dali = importlib.util.find_spec("nvidia.dali") is not None
    if d.backend == "dali" and not dali:
        raise ConfigError("data.backend=dali, but NVIDIA DALI is not installed: install the "
                          "project with its DALI extra (README), or set data.backend=auto")
    if d.dali_device == "mixed" and dali and d.backend != "torch":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("data.dali_device=mixed decodes on a GPU, and this machine has "
                              "none; set data.dali_device=auto")
