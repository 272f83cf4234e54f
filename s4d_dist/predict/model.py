"""The model `predict` scores with, from a run folder or an official S4D checkpoint.

A run folder carries everything: the model card and safetensors weights that every finished
fine-tuning run exports (train/exports.py), or, in a folder from before those exports, the
resolved config.yaml and weights_fp32.pt (class names then come from the shards the config
names, when they are still there). An official checkpoint stores neither the architecture's
unshaped settings nor the evaluation recipe nor class names: those come from a preset
(`finetune_base` unless told) and `--classes`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from s4d_dist import config
from s4d_dist.models import official
from s4d_dist.models.factory import build_classifier, moae_options
from s4d_dist.models.classifier import S4DClassifier
from s4d_dist.train.exports import MODEL_CARD, class_names

HEADS = ("image", "video")
DEFAULT_PRESET = "finetune_base"


class ModelError(ValueError):
    """A model that cannot be loaded for prediction; the message names the file and why."""


@dataclass
class Model:
    network: S4DClassifier
    cfg: DictConfig                 # model sizes and the evaluation recipe (data.*) to cut views
    classes: dict[str, list[str]]   # per head
    source: str


def _card_config(card: dict, where: Path) -> DictConfig:
    if card.get("task") != "finetune":
        raise ModelError(f"{where}: a {card.get('task')} model; predict needs a fine-tuned one")
    official = {key: card[key] for key in ("official", "official_quirks") if key in card}
    return config.from_values((str(where), {"task": "finetune", "model": card["model"],
                                            "data": card["recipe"], **official}))


def _from_folder(folder: Path) -> tuple[DictConfig, dict[str, torch.Tensor], dict]:
    """(config, state dict, class names per head as stored) of a run folder."""
    card_path = folder / MODEL_CARD
    if card_path.is_file():
        from safetensors.torch import load_file

        card = json.loads(card_path.read_text())
        return _card_config(card, card_path), load_file(folder / card["weights"]), card["classes"]
    cfg_path, weights = folder / "config.yaml", folder / "weights_fp32.pt"
    if not (cfg_path.is_file() and weights.is_file()):
        raise ModelError(f"{folder}: not a finished run folder (no {MODEL_CARD}, nor config.yaml "
                         "with weights_fp32.pt)")
    cfg = config.load(str(cfg_path))
    if cfg.task != "finetune":
        raise ModelError(f"{folder}: a {cfg.task} run; predict needs a fine-tuned model")
    stored = {"image": class_names(cfg.data.image_shards),
              "video": class_names(cfg.data.video_shards)}
    return cfg, torch.load(weights, map_location="cpu", weights_only=True), stored


def _names(stored: list[str] | None, given: list[str] | None, count: int, head: str,
           source: str) -> list[str]:
    names = given or stored or [str(i) for i in range(count)]
    if len(names) != count:
        raise ModelError(f"{source}: the {head} head has {count} classes, {len(names)} names "
                         f"given ({', '.join(names)})")
    return list(names)


def load(source: str, classes: list[str] | None = None,
         image_classes: list[str] | None = None, preset: str | None = None,
         overrides: tuple[str, ...] = ()) -> Model:
    """The model at `source` (a run folder or an official checkpoint file), in eval mode on the
    CPU. `classes` / `image_classes` name the video / image head's classes (image_classes
    defaults to `classes` when the heads are the same size); `preset` and `overrides` set what
    a checkpoint file does not store, or change a folder's evaluation recipe (views)."""
    path = Path(source)
    stored: dict = {}
    if path.is_dir():
        cfg, state, stored = _from_folder(path)
        if overrides:
            cfg = config.from_values(("run folder", OmegaConf.to_container(cfg)),
                                     *[(f"override '{o}'", o) for o in overrides])
        network = build_classifier(cfg)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise ModelError(f"{path}: weights do not fit its config: "
                             f"{str(error).splitlines()[0]}") from None
    elif path.is_file():
        cfg = config.load(preset or DEFAULT_PRESET, ["task=finetune", *overrides])
        m = cfg.model
        try:
            network = official.load(path, img_size=m.img_size, num_frames=m.num_frames,
                                    num_heads=m.num_heads, top_k=m.moae.top_k,
                                    **moae_options(cfg))
        except official.CheckpointError as error:
            raise ModelError(str(error)) from None
        if not isinstance(network, S4DClassifier):
            raise ModelError(f"{path}: a pre-training checkpoint; predict needs a fine-tuned one")
        if not classes:
            raise ModelError(f"{path}: an official checkpoint stores no class names; "
                             "give them with --classes")
    else:
        raise ModelError(f"{path}: no such run folder or checkpoint file")
    counts = {head: network.head[head].out_features for head in HEADS}
    if image_classes is None and classes and len(classes) == counts["image"]:
        image_classes = classes
    names = {"video": _names(stored.get("video"), classes, counts["video"], "video", source),
             "image": _names(stored.get("image"), image_classes, counts["image"], "image", source)}
    return Model(network.eval(), cfg, names, str(path))
