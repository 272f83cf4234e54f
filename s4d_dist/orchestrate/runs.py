"""A run's config made ready for Ray, and the checks a driver makes before launching it.

Configs cross process boundaries as plain dicts and are rebuilt with `config.from_values`, so a
worker validates exactly what the driver resolved.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from s4d_dist import config
from s4d_dist.data.loaders import MODALITIES, train_catalog
from s4d_dist.train import preflight
from s4d_dist.train.checkpoint import Checkpoints
from s4d_dist.train.cli import make_task
from s4d_dist.train.loop import run_dir

PATH_KEYS = ("output_dir", "init_checkpoint", "data.image_shards", "data.video_shards",
             "data.val_shards", "data.test_shards")


def as_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data: what Ray pickles to workers and trials."""
    return OmegaConf.to_container(cfg, resolve=True)


def with_values(cfg: DictConfig, source: str, values: dict[str, Any]) -> DictConfig:
    """`cfg` with nested `values` merged in and validated; errors name `source`."""
    return config.from_values(("resolved config", as_dict(cfg)), (source, values))


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} → {"a": {"b": 1}}: dotted keys as a config layer."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """Paths made absolute against the driver's working directory.

    Ray workers do not run in the driver's folder (a Tune trial runs in its own), so a relative
    data or output path would point somewhere else there; on several nodes the absolute paths
    must name shared storage. A driver joining a running cluster (`ray.address`) may itself run
    elsewhere than where the command was typed — `ray submit` starts it in the head node's home
    folder, `ray job submit` in a copy of its working dir — so there the relative paths it
    resolved are named in one line on stderr.
    """
    given = {key: os.path.expanduser(OmegaConf.select(cfg, key))
             for key in PATH_KEYS if OmegaConf.select(cfg, key)}
    relative = [key for key, path in given.items() if not os.path.isabs(path)]
    if cfg.ray.address and relative:
        print(f"[s4d] note: relative {', '.join(f'{k}={given[k]}' for k in relative)} resolved "
              f"against the driver's folder {os.getcwd()} (ray submit: the head's home; ray job "
              f"submit: a copy of --working-dir); give absolute paths on storage every node "
              f"shares", file=sys.stderr, flush=True)
    paths = {key: os.path.abspath(path) for key, path in given.items()}
    return with_values(cfg, "absolute paths", nested(paths))


def check_folder(cfg: DictConfig) -> None:
    """Refuse in the driver a finished or differently configured run folder, which every worker
    would refuse only after Ray had started it — and restarted it `ray.max_failures` times."""
    folder = run_dir(cfg)
    Checkpoints(folder, cfg).check_resumable(folder)


def check_data(cfg: DictConfig) -> None:
    """Refuse in the driver training or evaluation shards that cannot be opened (see
    check_folder for why), and whatever else preflight.py refuses. A modality without shards
    is left out, as the loop leaves it out."""
    preflight.check(cfg)
    for modality in MODALITIES[cfg.task]:
        if cfg.data.image_shards if modality == "image" else cfg.data.video_shards:
            train_catalog(cfg, modality)
    make_task(cfg).eval_catalogs()
