"""Joint SFER + DFER fine-tuning with MoAE (§2), and evaluation done right (§2.11, §3.8).

Each step is one modality: mixup/cutmix with label smoothing, soft-target cross-entropy on that
modality's head, plus the MoAE load-balancing loss (not applied under
`official.aux_loss_not_applied`, like the official DDP-wrapped code, §3.1). The best epoch is
chosen on a held-out validation split carved from train, not on the test set
(`official.select_on_test` restores the official choice, §3.8: the whole train split, best epoch
by test WAR, labelled `best_selected_on: test` in metrics.json); at the end
the test split is scored for both the last and the best epoch with the deterministic
multi-view protocol. § numbers refer to docs/method.md.

A multi-task run (data.image_shards set) also scores the image (SFER) head on the image
dataset's test split, one view per image, with the same metrics and the same gathering across
ranks, for the last epoch and for the best one — the epoch chosen on the video (DFER) metric as
in a DFER-only run. metrics.json keeps the video results where they always were and adds a
sibling section:

    {"task": "finetune", "fold": ..., "last": {war, uar, f1_weighted, f1_macro, confusion,
     samples}, "best": {...}, "best_epoch": ..., "best_selected_on": ..., ...,  # video (DFER)
     "image": {"last": {war, uar, f1_weighted, f1_macro, confusion, samples}, "best": {...}}}

TensorBoard: the video test views under test_last/ and test_best/ (war, uar, ..., confusion,
recall), the image ones under image_test_last/ and image_test_best/. A DFER-only run — or one
whose image dataset has no test split (said on the console) — has no "image" section and no
image_test_* tags.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from s4d_dist.data.catalog import Catalog
from s4d_dist.data.loaders import eval_catalog, eval_loader
from s4d_dist.models import official
from s4d_dist.models.factory import build_classifier
from s4d_dist.train import distributed
from s4d_dist.train.evaluate import evaluate
from s4d_dist.train.exports import class_names
from s4d_dist.train.flops import classifier_step_flops
from s4d_dist.train.loop import Run
from s4d_dist.tubelets import model_tokens

log = logging.getLogger(__name__)


# ---- mixup / cutmix and the soft-target loss ----------------------------------------------
#
# Mixup / CutMix with label smoothing and the soft-target cross-entropy (docs/method.md §2.8).
#
# timm's "batch" mode, as the official code uses it for both modalities: one λ per batch, each
# sample mixed with its mirror in the batch (`x.flip(0)`), CutMix with prob `switch_prob`
# (otherwise Mixup), the CutMix box the same on every frame of a clip, λ corrected to the box's
# true area. The official code mixed images on the CPU in the collate function and clips on the
# GPU; the arithmetic is identical, so both run here on the training device.

def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels.unsqueeze(1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float,
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box of area ≈ (1-λ)·H·W centred uniformly, clipped to the image."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def mix_batch(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, aug: DictConfig,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed pixels, soft targets) for (B, C, [T,] H, W) pixels and (B,) labels."""
    targets = smooth_one_hot(labels, num_classes, aug.label_smoothing)
    use_mixup, use_cutmix = aug.mixup_alpha > 0, aug.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= aug.mix_prob:
        return pixels, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < aug.switch_prob)
    lam = float(rng.beta(aug.cutmix_alpha, aug.cutmix_alpha) if cutmix
                else rng.beta(aug.mixup_alpha, aug.mixup_alpha))
    partner = pixels.flip(0)
    if cutmix:
        height, width = pixels.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
        pixels = pixels.clone()
        pixels[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]  # same box on every frame
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        pixels = pixels * lam + partner * (1.0 - lam)
    return pixels, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class FinetuneTask:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._image_test: bool | None = None  # decided at the first test (_scores_images)

    def build_model(self, run: Run, resuming: bool) -> nn.Module:
        model = build_classifier(self.cfg)
        if self.cfg.init_checkpoint and not resuming:  # resuming restores fine-tuned weights
            official.init_from_pretrained(model, self.cfg.init_checkpoint)  # logs what it carried
        return model

    def class_names(self) -> list[str] | None:
        """The video classes' names, as the shards were built with them (for the figures)."""
        return class_names(self.cfg.data.video_shards)

    def num_classes(self, modality: str) -> int:
        m = self.cfg.model
        return m.num_video_classes if modality == "video" else m.num_image_classes

    def inputs(self, run: Run, batch: dict, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """The step's device tensors: mixed pixels in the model's dtype, soft targets."""
        pixels = batch["pixels"].to(run.device, non_blocking=True)
        labels = batch["label"].to(run.device, non_blocking=True)
        pixels, targets = mix_batch(pixels, labels, self.num_classes(batch["modality"]),
                                    self.cfg.augment, rng)
        return pixels.to(run.dtype), targets

    def objective(self, run: Run):
        """`loss(pixels, targets)`: soft-target cross-entropy (+ the MoAE aux loss) of the
        modality the pixels' shape says; tensors in, a 0-d loss out (what a step compiles)."""
        model, coeff = run.engine.module, self.cfg.model.moae.aux_loss_coeff
        with_aux = not self.cfg.official.aux_loss_not_applied

        def loss(pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits, aux = model(pixels, with_aux=True)
            value = soft_target_cross_entropy(logits, targets)
            if aux is not None and with_aux:
                value = value + coeff * aux.float()
            return value
        return loss

    def step_flops(self, batch: dict) -> float:
        tokens = model_tokens(self.cfg.model, batch["modality"])
        return classifier_step_flops(self.cfg, tokens, len(batch["pixels"]))

    def on_log(self, run: Run, batch: dict, step: int) -> None:
        layers = {i: layer.stats for i, layer in run.engine.module.moae_layers().items()}
        run.logger.expert_load(layers, step, batch["modality"],
                               figure=step % self.cfg.logging.image_every == 0)

    def eval_catalogs(self) -> list[Catalog]:
        """Every split this run will evaluate — the selection split each epoch, the test splits
        at the end — opened, so that the loop can stop on shards it cannot read before step 0
        rather than after training (loop.open_eval_data)."""
        catalogs = [eval_catalog(self.cfg, "test", "video")]
        split = self.selection_split()
        if split is not None:
            catalogs.append(eval_catalog(self.cfg, split, "video"))
        if self._scores_images():
            catalogs.append(eval_catalog(self.cfg, "test", "image"))
        return catalogs

    def _evaluate(self, run: Run, split: str, modality: str = "video") -> dict:
        loader = eval_loader(self.cfg, split, modality, distributed.rank(),
                             distributed.world_size(), device=distributed.device())
        try:
            return evaluate(run.engine.module, loader, self.num_classes(modality), run.dtype)
        finally:
            loader.close()

    def _test(self, run: Run) -> dict[str, dict]:
        """Test metrics of the weights the engine holds now: the video head's, and in a
        multi-task run the image head's."""
        scores = {"video": self._evaluate(run, "test")}
        if self._scores_images():
            scores["image"] = self._evaluate(run, "test", "image")
        return scores

    def _scores_images(self) -> bool:
        """Whether the image head is scored: a multi-task run whose image dataset has a test
        split. Without one the run ends as before, scoring the video head only, and says so."""
        if self._image_test is None:
            self._image_test = bool(self.cfg.data.image_shards)
            if self._image_test:
                try:
                    eval_catalog(self.cfg, "test", "image")
                except FileNotFoundError as missing:
                    log.info(f"image head not scored, no image test split: {missing}")
                    self._image_test = False
        return self._image_test

    def _log_scores(self, run: Run, prefix: str, metrics: dict, names: list[str] | None) -> None:
        """The scalar metrics as `<prefix>/<name>`, the confusion matrix and per-class recall as
        `<prefix>/confusion` and `<prefix>/recall`."""
        step = run.state["global_step"]
        run.logger.scalars({f"{prefix}/{k}": v for k, v in metrics.items()
                            if isinstance(v, float)}, step)
        run.logger.confusion(f"{prefix}/confusion", np.array(metrics["confusion"]), step, names)

    def selection_split(self) -> str | None:
        """Where the best epoch is chosen: "val" (held out from train, or data.val_shards),
        "test" under official.select_on_test without val_shards (the official code's choice, which
        reports a test score selected on test), or None (no selection)."""
        d = self.cfg.data
        if d.val_shards:
            return "val"
        if self.cfg.official.select_on_test:
            return "test"
        return "val" if d.val_fraction > 0 else None

    def after_epoch(self, run: Run, epoch: int) -> dict[str, float]:
        split = self.selection_split()
        if split is None:
            return {}
        metrics = self._evaluate(run, split)
        self._log_scores(run, split, metrics, self.class_names())
        history = run.state["task"].setdefault(f"{split}_war_by_epoch", [])
        history.append(metrics["war"])
        best = run.state["task"].get(f"best_{split}_war", -1.0)
        if metrics["war"] > best:
            run.state["task"].update({f"best_{split}_war": metrics["war"], "best_epoch": epoch + 1})
            run.checkpoints.save(run.engine, run.state, tag="best")
        return {f"{split}_war": metrics["war"], f"{split}_uar": metrics["uar"]}

    def finish(self, run: Run) -> dict[str, Any]:
        last = self._test(run)
        results: dict[str, Any] = {"task": "finetune", "fold": self.cfg.data.fold,
                                   "last": last["video"]}
        image = {"last": last["image"]} if "image" in last else None
        best_epoch = run.state["task"].get("best_epoch")
        if best_epoch is not None:
            last_state = dict(run.state)
            run.checkpoints.load(run.engine, "best", module_only=True)
            best = self._test(run)
            results["best"] = best["video"]
            if image is not None:
                image["best"] = best["image"]  # the epoch chosen on the video metric
            results["best_epoch"] = best_epoch
            split = self.selection_split()
            results["best_selected_on"] = split
            results[f"best_{split}_war"] = run.state["task"][f"best_{split}_war"]
            results[f"{split}_war_by_epoch"] = run.state["task"][f"{split}_war_by_epoch"]
            run.state = last_state
            # Exports are of the last epoch: put its weights back.
            run.checkpoints.load(run.engine, run.checkpoints.latest(), module_only=True)
        views = [("test", results, self.class_names())]
        if image is not None:
            results["image"] = image
            views.append(("image_test", image, class_names(self.cfg.data.image_shards)))
        for prefix, section, names in views:
            for name in ("last", "best"):
                if name in section:
                    self._log_scores(run, f"{prefix}_{name}", section[name], names)
        run.logger.hparams(_hparams(self.cfg), [
            f"{prefix}_{'best' if 'best' in section else 'last'}/{metric}"
            for prefix, section, _ in views for metric in ("war", "uar")])
        return results


def _hparams(cfg) -> dict[str, Any]:
    """What the HParams table compares runs by: a fold only for a k-fold run, the experts only
    with MoAE."""
    o, m = cfg.optim, cfg.model.moae
    params = {"base_lr": o.base_lr, "layer_decay": o.layer_decay, "epochs": o.epochs,
              "moae": m.enabled, "image_rate": cfg.data.image_rate, "recipe": cfg.recipe}
    if m.enabled:
        params.update(experts=m.num_experts, top_k=m.top_k)
    if cfg.data.fold is not None:
        params["fold"] = cfg.data.fold
    return params
