"""TensorBoard on rank 0: scalars, reconstruction grids, expert load, confusion matrices, hparams.

Every rank may call these methods; only rank 0 writes, so the loops need no `if rank == 0`.
Figures are drawn with Pillow into image tensors (no plotting library needed); everything goes
into the one run folder, so a training run is one run in TensorBoard's list.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from s4d_dist.train import distributed
from s4d_dist.train.metrics import per_class_recall


def _grid(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """(3, H, W) image tiling rows of (N, 3, h, w) [0, 1] tensors."""
    n, c, h, w = rows[0].shape
    canvas = np.ones((c, len(rows) * (h + pad) + pad, n * (w + pad) + pad), dtype=np.float32)
    for r, row in enumerate(rows):
        for i, tile in enumerate(row.float().cpu().numpy()):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            canvas[:, y:y + h, x:x + w] = tile
    return canvas


def _text_canvas(width: int, height: int):
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    return image, ImageDraw.Draw(image), ImageFont.load_default()


def _chw(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def confusion_image(cm: np.ndarray, names: list[str] | None = None, cell: int = 34) -> np.ndarray:
    """The confusion matrix as a (3, H, W) image people read: rows are true classes, each cell
    its count on a blue scaled by the row-normalised fraction, class names on both axes."""
    cm = np.asarray(cm)
    k = len(cm)
    names = list(names) if names and len(names) == k else [str(i) for i in range(k)]
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    label = 7 * max(len(n) for n in names) + 8
    image, draw, font = _text_canvas(label + k * cell + 4, 14 + k * cell + 4 + label)
    draw.text((2, 0), "rows: true, columns: predicted",
              fill="black", font=font)
    for i in range(k):
        y = 14 + i * cell
        draw.text((2, y + cell // 2 - 5), names[i], fill="black", font=font)
        for j in range(k):
            x = label + j * cell
            shade = tuple(int(255 * c) for c in (1 - frac[i, j], 1 - 0.6 * frac[i, j],
                                                  1 - 0.2 * frac[i, j]))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade, outline="#cccccc")
            draw.text((x + 4, y + cell // 2 - 5), str(int(cm[i, j])),
                      fill="white" if frac[i, j] > 0.5 else "black", font=font)
    for j, name in enumerate(names):  # column names, written downwards one character a line
        for n, char in enumerate(name[:8]):
            draw.text((label + j * cell + cell // 2 - 3, 14 + k * cell + 4 + 10 * n), char,
                      fill="black", font=font)
    return _chw(image)


def bar_image(values: list[float], names: list[str], title: str, height: int = 120,
              bar: int = 28) -> np.ndarray:
    """Bars of values in [0, 1] with their names and values, as a (3, H, W) image."""
    image, draw, font = _text_canvas(len(values) * (bar + 8) + 16, height + 44)
    draw.text((4, 0), title, fill="black", font=font)
    for i, (value, name) in enumerate(zip(values, names)):
        x, top = 8 + i * (bar + 8), 14 + int(height * (1 - min(max(value, 0.0), 1.0)))
        draw.rectangle([x, top, x + bar, 14 + height], fill="#1f77b4")
        draw.text((x, 16 + height), name[:5], fill="black", font=font)
        draw.text((x, 28 + height), f"{value:.2f}", fill="black", font=font)
    return _chw(image)


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
        """Share of routed tokens per expert (scalars and one bar chart per layer), drop rate
        and router entropy per MoAE layer — all in this run: `add_scalars` would make a
        separate TensorBoard run of every expert of every layer."""
        if not self.writer:
            return
        for i, stats in layers.items():
            load = stats["tokens_per_expert"].float()
            share = (load / load.sum().clamp(min=1)).cpu().numpy()
            for e, value in enumerate(share):
                self.writer.add_scalar(f"moae/layer{i}/load_e{e}", float(value), step)
            self.writer.add_image(f"moae/layer{i}/load", bar_image(
                share.tolist(), [f"e{e}" for e in range(len(share))],
                f"layer {i}: share of routed tokens"), step)
            self.writer.add_scalar(f"moae/layer{i}/drop_fraction",
                                   float(stats["drop_fraction"]), step)
            self.writer.add_scalar(f"moae/layer{i}/router_entropy",
                                   float(stats["router_entropy"]), step)

    def confusion(self, tag: str, cm: np.ndarray, step: int,
                  names: list[str] | None = None) -> None:
        """The labelled confusion matrix under `tag`, and the per-class recall beside it."""
        if not self.writer:
            return
        cm = np.asarray(cm)
        self.writer.add_image(tag, confusion_image(cm, names), step)
        recall = np.nan_to_num(per_class_recall(cm))  # a class absent from the split: no bar
        labels = list(names) if names and len(names) == len(cm) else [str(i) for i in range(len(cm))]
        self.writer.add_image(tag.rsplit("/", 1)[0] + "/recall", bar_image(
            recall.tolist(), labels, "per-class recall"), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """Hyper-parameters and final metrics, in this run (`add_hparams` would open another)."""
        if self.writer:
            from torch.utils.tensorboard.summary import hparams

            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                     for k, v in params.items()}
            values = {f"hparam/{k}": v for k, v in metrics.items()}
            for summary in hparams(clean, values):
                self.writer.file_writer.add_summary(summary)
            for tag, value in values.items():
                self.writer.add_scalar(tag, value)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
