"""What a finished run hands to someone else: safetensors weights and model cards.

    <run>/model.safetensors   the fp32 state dict (official key layout), no pickle: safe to load
                              from an untrusted source and readable outside PyTorch; its
                              metadata holds the task, the model config and the class names
    <run>/model.json          the model card for programs: resolved model config, the
                              evaluation recipe, class names per head, training data, metrics
    <run>/README.md           the model card for people (model_card.py): the same facts, the
                              data's sizes, and how to load the weights

Together they are a complete model: `python -m s4d_dist.predict --model <folder>` needs no
config file, shard folder or class list besides them (predict/model.py reads them back).
All are written all or nothing (atomic.py), like the run's other exports.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from s4d_dist import atomic
from s4d_dist.shards.layout import class_names
from s4d_dist.train import model_card

SAFETENSORS = "model.safetensors"
MODEL_CARD = "model.json"
README = "README.md"
CARD_FORMAT = 1
# The data keys that decide how an input is cut into views at evaluation (data/recipes.py).
RECIPE_KEYS = ("sampling_rate", "eval_short_side", "test_temporal_views", "test_spatial_crops")


def model_json(cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable card (model.json)."""
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


def safetensors_metadata(card: dict[str, Any]) -> dict[str, str]:
    """What model.safetensors carries about itself (string values, as the format requires):
    enough to rebuild the network and name its outputs without any other file."""
    return {"format": "pt", "task": card["task"], "model": json.dumps(card["model"]),
            "classes": json.dumps(card["classes"])}


def write(folder: Path, cfg: DictConfig, weights: dict[str, torch.Tensor],
          metrics: dict[str, Any]) -> None:
    """Write model.safetensors, model.json and README.md into the run folder."""
    card = model_json(cfg, metrics)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    with atomic.replacing(folder / SAFETENSORS) as tmp:
        save_file(tensors, str(tmp), metadata=safetensors_metadata(card))
    atomic.write_text(folder / MODEL_CARD, json.dumps(card, indent=1, default=str) + "\n")
    parameters = sum(t.numel() for t in tensors.values())
    readme = model_card.markdown(cfg, card, model_card.data_rows(cfg, metrics), parameters,
                                 str(folder))
    atomic.write_text(folder / README, readme)
