"""TensorBoard on rank 0: scalars, reconstruction grids, expert load, confusion matrices, hparams.

Every rank may call these methods; only rank 0 writes, so the loops need no `if rank == 0`.
Figures are drawn with Pillow (figures.py, no plotting library needed); everything goes into
the one run folder, so a training run is one run in TensorBoard's list.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4d_dist.train import distributed, figures
from s4d_dist.train.metrics import per_class_recall


class RunLogger:
    """Writes `<run_dir>/tb` on rank 0; a no-op elsewhere or when disabled."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.writer = None
        if enabled and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
        self.dir = Path(run_dir) / "tb"
        self.loads: dict[int, dict[str, figures.LayerLoad]] = {}  # expert_load's figure

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def reconstruction(self, modality: str, pixels: torch.Tensor, masked: torch.Tensor,
                       recon: torch.Tensor, step: int, max_items: int = 3) -> None:
        """`mae/<modality>`: rows original / masked / reconstruction of (B, 3, T, H, W) [0, 1]
        clips (an image is a clip of repeated frames); each clip shows its middle frame."""
        if not self.writer:
            return
        rows = [t[:max_items, :, t.shape[2] // 2].float().cpu().numpy()
                for t in (pixels, masked, recon)]
        title = "middle frame of each clip" if modality == "video" else ""
        self.writer.add_image(f"mae/{modality}", figures.reconstruction_grid(rows, title).array(),
                              step)

    def expert_load(self, layers: dict[int, dict[str, torch.Tensor]], step: int,
                    modality: str, figure: bool = True) -> None:
        """The routing of the last batch of `modality` (its share of tokens per expert, drop
        fraction, router entropy per MoAE layer): drop fraction and entropy as scalars
        `moae/layer<i>/<modality>/...`, and, with `figure`, one figure `moae/expert_load` of
        every layer's load by modality, each modality as of its last logged batch."""
        if not self.writer or not any(layers.values()):  # no MoAE, or before its first forward
            return
        for i, stats in layers.items():
            load = stats["tokens_per_expert"].float()
            share = (load / load.sum().clamp(min=1)).cpu().numpy()
            drop = float(stats["drop_fraction"])
            self.loads.setdefault(i, {})[modality] = figures.LayerLoad(share, step)
            self.writer.add_scalar(f"moae/layer{i}/{modality}/drop_fraction", drop, step)
            self.writer.add_scalar(f"moae/layer{i}/{modality}/router_entropy",
                                   float(stats["router_entropy"]), step)
        if figure:
            self.writer.add_image("moae/expert_load", figures.expert_load(self.loads).array(),
                                  step)

    def confusion(self, tag: str, cm: np.ndarray, step: int,
                  names: list[str] | None = None) -> None:
        """The labelled confusion matrix under `tag`, and the per-class recall beside it."""
        if not self.writer:
            return
        cm = np.asarray(cm)
        self.writer.add_image(tag, figures.confusion(cm, names).array(), step)
        self.writer.add_image(tag.rsplit("/", 1)[0] + "/recall", figures.recall_bars(
            per_class_recall(cm).tolist(), names).array(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, Any], metrics: list[str]) -> None:
        """Hyper-parameters in this run (`add_hparams` would open another), with the scalar
        tags `metrics`, already logged, as their results: the HParams table reads those tags'
        values, so no chart of a single point is added to the scalars for it."""
        if self.writer:
            from torch.utils.tensorboard.summary import hparams

            # whole numbers as text: the table shows numbers as 2.0000
            clean = {k: v if isinstance(v, (float, str, bool)) else str(v)
                     for k, v in params.items()}
            for summary in hparams(clean, dict.fromkeys(metrics, 0.0)):
                self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
