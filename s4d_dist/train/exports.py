"""What a finished run hands to someone else: safetensors weights and a model card.

    <run>/model.safetensors   the fp32 state dict (official key layout), no pickle: safe to load
                              from an untrusted source and readable outside PyTorch
    <run>/model.json          the model card: resolved model config, the evaluation recipe,
                              class names per head, training data, metrics

Together they are a complete model: `python -m s4d_dist.predict --model <folder>` needs no
config file, shard folder or class list besides them (predict/model.py reads them back).
Both are written all or nothing (atomic.py), like the run's other exports.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from s4d_dist import atomic
from s4d_dist.shards import layout

SAFETENSORS = "model.safetensors"
MODEL_CARD = "model.json"
CARD_FORMAT = 1
# The data keys that decide how an input is cut into views at evaluation (data/recipes.py).
RECIPE_KEYS = ("sampling_rate", "eval_short_side", "test_temporal_views", "test_spatial_crops")


def class_names(location: str) -> list[str] | None:
    """The class names a shard location (a split folder or a built dataset) was built with."""
    for name in (layout.MANIFEST_JSON, layout.DATASET_JSON):
        path = Path(location) / name
        if location and path.is_file():
            return list(json.loads(path.read_text())["class_names"])
    return None


def model_card(cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    d = cfg.data
    return {
        "format": CARD_FORMAT,
        "task": cfg.task,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "official": OmegaConf.to_container(cfg.official),
        "recipe": {key: d[key] for key in RECIPE_KEYS},
        "classes": {"image": class_names(d.image_shards), "video": class_names(d.video_shards)},
        "training_data": {"image_shards": d.image_shards, "video_shards": d.video_shards,
                          "val_shards": d.val_shards, "test_shards": d.test_shards,
                          "fold": d.fold, "init_checkpoint": cfg.init_checkpoint},
        "metrics": metrics,
        "weights": SAFETENSORS,
    }


def write(folder: Path, cfg: DictConfig, weights: dict[str, torch.Tensor],
          metrics: dict[str, Any]) -> None:
    """Write model.safetensors and model.json into the run folder."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    with atomic.replacing(folder / SAFETENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    card = json.dumps(model_card(cfg, metrics), indent=1, default=str)
    atomic.write_text(folder / MODEL_CARD, card + "\n")
