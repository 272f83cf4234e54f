"""Joint SFER + DFER fine-tuning with MoAE (§2), and evaluation done right (§2.11, §3.8).

Each step is one modality: mixup/cutmix with label smoothing, soft-target cross-entropy on that
modality's head, plus the MoAE load-balancing loss (never applied under `official_quirks`, like
the official DDP-wrapped code). The best epoch is chosen on a held-out validation split carved
from train, not on the test set (official_quirks restores the official choice: the whole train
split, best epoch by test WAR, labelled `best_selected_on: test` in metrics.json); at the end
the test split is scored for both the last and the best epoch with the deterministic
multi-view protocol. § numbers refer to docs/method.md.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from s4d_dist.data.loaders import eval_loader
from s4d_dist.models import official
from s4d_dist.models.build import build_classifier
from s4d_dist.train import distributed
from s4d_dist.train.evaluate import evaluate
from s4d_dist.train.exports import class_names
from s4d_dist.train.flops import classifier_step_flops
from s4d_dist.train.loop import Run
from s4d_dist.train.mixup import mix_batch, soft_target_cross_entropy
from s4d_dist.tubelets import model_tokens


class FinetuneTask:
    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def build_model(self, run: Run, resuming: bool) -> nn.Module:
        model = build_classifier(self.cfg)
        if self.cfg.init_checkpoint and not resuming:  # resuming restores fine-tuned weights
            report = official.init_from_pretrained(model, self.cfg.init_checkpoint)
            if distributed.is_main():
                print(f"[s4d] initialised from {self.cfg.init_checkpoint}: {report['carried']} "
                      f"keys carried, {report['fresh']} fresh", flush=True)
        return model

    def class_names(self) -> Optional[list[str]]:
        """The video classes' names, as the shards were built with them (for the figures)."""
        return class_names(self.cfg.data.video_shards)

    def num_classes(self, modality: str) -> int:
        m = self.cfg.model
        return m.num_video_classes if modality == "video" else m.num_image_classes

    def loss(self, run: Run, batch: dict, rng: np.random.Generator) -> torch.Tensor:
        modality = batch["modality"]
        pixels = batch["pixels"].to(run.device, non_blocking=True)
        labels = batch["label"].to(run.device, non_blocking=True)
        pixels, targets = mix_batch(pixels, labels, self.num_classes(modality), self.cfg.augment,
                                    rng)
        logits = run.engine(pixels.to(run.dtype), modality)
        loss = soft_target_cross_entropy(logits, targets)
        aux = run.engine.module.aux_loss()
        if aux is not None and not self.cfg.official_quirks:
            loss = loss + self.cfg.model.moae.aux_loss_coeff * aux.float()
        return loss

    def step_flops(self, batch: dict) -> float:
        tokens = model_tokens(self.cfg.model, batch["modality"])
        return classifier_step_flops(self.cfg, tokens, len(batch["pixels"]))

    def on_log(self, run: Run, batch: dict, step: int) -> None:
        layers = {i: layer.stats for i, layer in run.engine.module.moae_layers().items()}
        run.logger.expert_load(layers, step)

    def _evaluate(self, run: Run, split: str) -> dict:
        loader = eval_loader(self.cfg, split, "video", distributed.rank(),
                             distributed.world_size())
        try:
            return evaluate(run.engine.module, loader, self.cfg.model.num_video_classes,
                            run.dtype)
        finally:
            loader.close()

    def selection_split(self) -> str | None:
        """Where the best epoch is chosen: "val" (held out from train, or data.val_shards),
        "test" under official_quirks without val_shards (the official code's choice, which
        reports a test score selected on test), or None (no selection)."""
        d = self.cfg.data
        if d.val_shards:
            return "val"
        if self.cfg.official_quirks:
            return "test"
        return "val" if d.val_fraction > 0 else None

    def after_epoch(self, run: Run, epoch: int) -> dict[str, float]:
        split = self.selection_split()
        if split is None:
            return {}
        metrics = self._evaluate(run, split)
        run.logger.scalars({f"{split}/{k}": v for k, v in metrics.items()
                            if isinstance(v, float)}, run.state["global_step"])
        run.logger.confusion(f"{split}/confusion", np.array(metrics["confusion"]),
                             run.state["global_step"], self.class_names())
        history = run.state["task"].setdefault(f"{split}_war_by_epoch", [])
        history.append(metrics["war"])
        best = run.state["task"].get(f"best_{split}_war", -1.0)
        if metrics["war"] > best:
            run.state["task"].update({f"best_{split}_war": metrics["war"], "best_epoch": epoch + 1})
            run.checkpoints.save(run.engine, run.state, tag="best")
        return {f"{split}_war": metrics["war"], f"{split}_uar": metrics["uar"]}

    def finish(self, run: Run) -> dict[str, Any]:
        step = run.state["global_step"]
        results: dict[str, Any] = {"task": "finetune", "fold": self.cfg.data.fold,
                                   "last": self._evaluate(run, "test")}
        best_epoch = run.state["task"].get("best_epoch")
        if best_epoch is not None:
            last_state = dict(run.state)
            run.checkpoints.load(run.engine, "best", module_only=True)
            results["best"] = self._evaluate(run, "test")
            results["best_epoch"] = best_epoch
            split = self.selection_split()
            results["best_selected_on"] = split
            results[f"best_{split}_war"] = run.state["task"][f"best_{split}_war"]
            results[f"{split}_war_by_epoch"] = run.state["task"][f"{split}_war_by_epoch"]
            run.state = last_state
            # Exports are of the last epoch: put its weights back.
            run.checkpoints.load(run.engine, run.checkpoints.latest(), module_only=True)
        for name in ("last", "best"):
            if name in results:
                metrics = results[name]
                run.logger.scalars({f"test_{name}/{k}": v for k, v in metrics.items()
                                    if isinstance(v, float)}, step)
                run.logger.confusion(f"test_{name}/confusion", np.array(metrics["confusion"]), step,
                                     self.class_names())
        headline = results.get("best", results["last"])
        run.logger.hparams(_hparams(self.cfg), {"war": headline["war"], "uar": headline["uar"]})
        return results


def _hparams(cfg) -> dict[str, Any]:
    o, m = cfg.optim, cfg.model.moae
    return {"base_lr": o.base_lr, "layer_decay": o.layer_decay, "epochs": o.epochs,
            "moae": m.enabled, "experts": m.num_experts, "top_k": m.top_k,
            "image_rate": cfg.data.image_rate, "fold": cfg.data.fold or 0,
            "official_quirks": cfg.official_quirks}
