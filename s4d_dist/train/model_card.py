"""The run folder's README.md: a model card a person reads before using the weights.

What the model does and sees, its classes, the data it was trained and scored on (sizes as the
run counted them), its metrics with the split each was measured on, and how to load the
weights — with plain safetensors / torch and with s4d_dist. The facts come from model.json
(exports.py) and the run's config; nothing here is measured anew.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from s4d_dist.train.metrics import per_class_recall

PAPER = "S4D (\"Static for Dynamic\", arXiv 2409.06154)"


def data_rows(cfg: DictConfig, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """(split, modality, dataset, samples, where) of every split the run trained or scored on,
    counted as the run's loaders count them (a held-out validation split carved from train,
    a fold's parts)."""
    from s4d_dist.data.loaders import MODALITIES, eval_catalog, train_catalog

    d = cfg.data
    used = [m for m in MODALITIES[cfg.task] if (d.image_shards if m == "image" else d.video_shards)]
    splits = [("train", m) for m in used]
    if cfg.task == "finetune":
        if metrics.get("best_selected_on") == "val":
            splits.append(("val", "video"))
        splits += [("test", "video")] + ([("test", "image")] if "image" in metrics else [])
    rows = []
    for split, modality in splits:
        catalog = (train_catalog(cfg, modality) if split == "train"
                   else eval_catalog(cfg, split, modality))
        rows.append({"split": split, "modality": modality, "dataset": catalog.dataset,
                     "samples": len(catalog), "where": _folders(catalog.tars)})
    return rows


def _folders(tars: list[str]) -> str:
    """The split folder the tars are in, or their dataset folder and parts (a fold)."""
    folders = sorted({Path(tar).parent for tar in tars})
    if len(folders) == 1:
        return f"`{folders[0]}`"
    return f"`{folders[0].parent}` ({', '.join(f.name for f in folders)})"


def _split_name(row: dict[str, Any], cfg: DictConfig) -> str:
    if row["split"] == "val" and not cfg.data.val_shards:
        return f"val (held out from train, {cfg.data.val_fraction:.0%} of its clips)"
    return row["split"]


def _data_table(rows: list[dict[str, Any]], cfg: DictConfig) -> list[str]:
    lines = ["| split | modality | dataset | samples | shards |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {_split_name(row, cfg)} | {row['modality']} | {row['dataset']} | "
                     f"{row['samples']:,} | {row['where']} |")
    return lines


def _architecture(cfg: DictConfig, parameters: int) -> list[str]:
    m = cfg.model
    frames = f"{m.num_frames} frames at a stride of {cfg.data.sampling_rate}"
    lines = ["| | |", "|---|---|",
             f"| input | {m.img_size}×{m.img_size} RGB face crops, ImageNet mean/std normalised; "
             f"images, and clips of {frames} |",
             f"| encoder | ViT: {m.depth} block(s) of width {m.embed_dim}, {m.num_heads} heads, "
             f"{m.patch}×{m.patch} patches, tubelets of {m.tubelet} frames |"]
    if cfg.task == "finetune" and m.moae.enabled:
        lines.append(f"| MoAE | {m.moae.num_experts} adapter experts, top-{m.moae.top_k}, in "
                     f"block(s) {', '.join(str(i) for i in m.moae.layers)} |")
    if cfg.task == "pretrain":
        lines.append(f"| decoder | {m.decoder_depth} block(s) of width {m.decoder_dim}; masking "
                     f"{cfg.mask.image_ratio:.0%} of image and {cfg.mask.video_ratio:.0%} of clip "
                     f"tokens |")
    lines.append(f"| parameters | {parameters / 1e6:.2f} M (fp32) |")
    return lines


def _scores(card: dict[str, Any]) -> list[str]:
    metrics, classes = card["metrics"], card["classes"]
    heads = [("video", metrics)] + ([("image", metrics["image"])] if "image" in metrics else [])
    best = metrics.get("best_epoch")
    chosen = metrics.get("best_selected_on")
    lines = ["Scored on the test split, in %: WAR (accuracy), UAR (mean recall over classes), "
             "weighted and macro F1; clips with the multi-view protocol "
             f"({card['recipe']['test_temporal_views']} temporal × "
             f"{card['recipe']['test_spatial_crops']} spatial views), images in one view.", "",
             "| head | weights | WAR | UAR | F1 weighted | F1 macro | test samples |",
             "|---|---|---|---|---|---|---|"]
    for head, section in heads:
        for name in ("last", "best"):
            if name not in section:
                continue
            r = section[name]
            which = ("last epoch" if name == "last" else
                     f"best epoch ({best}, chosen on {chosen} video WAR)")
            lines.append(f"| {head} | {which} | {r['war']:.1f} | {r['uar']:.1f} | "
                         f"{r['f1_weighted']:.1f} | {r['f1_macro']:.1f} | {r['samples']:,} |")
    lines += ["", "Recall per class on the test split (last epoch), in %:", ""]
    for head, section in heads:
        names = classes.get(head) or [str(i) for i in range(len(section["last"]["confusion"]))]
        recall = per_class_recall(np.array(section["last"]["confusion"])) * 100
        lines += [f"| {head} | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names),
                  "| recall | " + " | ".join(f"{v:.1f}" for v in recall) + " |", ""]
    return lines


def _training_loss(card: dict[str, Any]) -> list[str]:
    loss = card["metrics"].get("train_loss") or {}
    if not loss:
        return []
    parts = ", ".join(f"{name} {value:.4f}" for name, value in loss.items())
    return [f"Training loss of the last epoch (mean over its steps and the ranks): {parts}."]


LOAD_FINETUNE = """```python
import torch
from s4d_dist.predict.model import load
model = load("{folder}")      # .network (eval mode, CPU), .classes per head, .cfg (views)
clips = torch.zeros(2, 3, {frames}, {size}, {size})   # (B, 3, frames, H, W) face crops, normalised
probs = model.network(clips, "video").softmax(-1)   # (B, classes), named by model.classes["video"]
```

Images are (B, 3, {size}, {size}) with `"image"`. From a shell, `s4d-predict --model {folder} photo.jpg
clip.mp4` cuts the views, crops and normalises as the tests did (one JSON line per input).
"""

LOAD_PRETRAIN = """```python
from s4d_dist.models import official
mae = official.load("{folder}/weights_official.pth", {options})  # PretrainMAE
```

or fine-tune from it: `s4d-finetune --config finetune_dfew init_checkpoint={folder}/weights_fp32.pt`.
"""

LOAD_PLAIN = """```python
import json
from safetensors import safe_open
from safetensors.torch import load_file
state = load_file("{folder}/model.safetensors")       # {{name: fp32 tensor}}, the official key layout
with safe_open("{folder}/model.safetensors", "pt") as f:
    meta = f.metadata()                                 # "task", "model" and "classes" (JSON)
classes = json.loads(meta["classes"])                   # {{"image": [...], "video": [...]}}
```

`weights_fp32.pt` holds the same state dict for `torch.load(..., weights_only=True)`, and
`weights_official.pth` the official code's checkpoint layout.
"""


def markdown(cfg: DictConfig, card: dict[str, Any], rows: list[dict[str, Any]],
             parameters: int, folder: str) -> str:
    """README.md of the finished run folder `folder` (as its load examples name it), from its
    model.json (`card`), config and data rows."""
    m = cfg.model
    fold = f", fold {cfg.data.fold}" if cfg.task == "finetune" and cfg.data.fold else ""
    if cfg.task == "finetune":
        title = f"# Facial expression recognition: {cfg.run_name}{fold}"
        about = (f"Classifies the facial expression of face crops, as in {PAPER}: one ViT "
                 f"encoder with a Mixture of Adapter Experts and two heads, `image` for photos "
                 f"(static FER) and `video` for clips (dynamic FER). Fine-tuned by s4d_dist"
                 + (f" from `{cfg.init_checkpoint}`." if cfg.init_checkpoint else " from scratch."))
        classes = ["## Classes", "", "| head | classes |", "|---|---|"]
        classes += [f"| {head} | {', '.join(names)} ({len(names)}) |"
                    for head, names in card["classes"].items() if names]
        results = ["## Metrics", "", *_scores(card), *_training_loss(card)]
        load = LOAD_FINETUNE.format(folder=folder, frames=m.num_frames, size=m.img_size)
    else:
        title = f"# Face encoder pre-trained as a masked autoencoder: {cfg.run_name}"
        about = (f"The dual-modal MAE pre-training of {PAPER}: a ViT that reconstructs the "
                 f"hidden patches of face images and clips (normalised-pixel loss). It has no "
                 f"classes; its encoder is the starting point of fine-tuning.")
        classes = []
        results = ["## Metrics", "", *_training_loss(card),
                   "(1.0 is what predicting each hidden patch's mean scores.)",
                   "", f"Optimizer steps: {card['metrics'].get('global_step', '?')}."]
        options = (f"img_size={m.img_size}, num_frames={m.num_frames}, "
                   f"num_heads={m.num_heads}, decoder_heads={m.decoder_heads}")
        load = LOAD_PRETRAIN.format(folder=folder, options=options)
    lines = [title, "", about, "", *_architecture(cfg, parameters), "", *classes,
             *([""] if classes else []), "## Data", "", *_data_table(rows, cfg), "", *results,
             "", "## Load the weights", "", "With s4d_dist:", "", load,
             "With safetensors and torch alone:", "", LOAD_PLAIN.format(folder=folder)]
    return "\n".join(lines).rstrip() + "\n"
