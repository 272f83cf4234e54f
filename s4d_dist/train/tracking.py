"""TensorBoard on rank 0: scalars, reconstruction grids, expert load, confusion matrices, hparams.

Every rank may call these methods; only rank 0 writes, so the loops need no `if rank == 0`.
Figures are drawn with NumPy into image tensors (no plotting library needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4d_dist.train import distributed


def _grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """(3, H, W) image tiling rows of (N, 3, h, w) [0, 1] tensors."""
    n, c, h, w = rows[0].shape
    canvas = np.ones((c, len(rows) * (h + pad) + pad, n * (w + pad) + pad), dtype=np.float32)
    for r, row in enumerate(rows):
        for i, tile in enumerate(row.float().cpu().numpy()):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            canvas[:, y:y + h, x:x + w] = tile
    return canvas


def confusion_image(cm: np.ndarray, cell: int = 24) -> np.ndarray:
    """Row-normalised confusion matrix as a (3, H, W) heat map: white = 0, dark blue = 1."""
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    colour = np.stack([1 - frac, 1 - 0.6 * frac, 1 - 0.2 * frac]).astype(np.float32)
    return colour.repeat(cell, axis=1).repeat(cell, axis=2)


class RunLogger:
    """Writes `<run_dir>/tb` on rank 0; a no-op elsewhere or when disabled."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.writer = None
        if enabled and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
        self.dir = Path(run_dir) / "tb"

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def reconstruction(self, tag: str, pixels: torch.Tensor, masked: torch.Tensor,
                       recon: torch.Tensor, step: int, max_items: int = 4) -> None:
        """Rows input / masked input / reconstruction, middle frame of each clip, [0, 1]."""
        if not self.writer:
            return
        frame = pixels.shape[2] // 2
        rows = [t[:max_items, :, frame] for t in (pixels, masked, recon)]
        self.writer.add_image(tag, _grid(rows), step)

    def expert_load(self, layers: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        """Share of routed tokens per expert, drop rate and router entropy per MoAE layer."""
        if not self.writer:
            return
        for i, stats in layers.items():
            load = stats["tokens_per_expert"].float()
            share = (load / load.sum().clamp(min=1)).cpu().numpy()
            self.writer.add_scalars(f"moae/layer{i}/load", {f"e{e}": float(s) for e, s in
                                                             enumerate(share)}, step)
            self.writer.add_scalar(f"moae/layer{i}/drop_fraction",
                                   float(stats["drop_fraction"]), step)
            self.writer.add_scalar(f"moae/layer{i}/router_entropy",
                                   float(stats["router_entropy"]), step)

    def confusion(self, tag: str, cm: np.ndarray, step: int) -> None:
        if self.writer:
            self.writer.add_image(tag, confusion_image(np.asarray(cm)), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                     for k, v in params.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()},
                                    run_name="hparams")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
