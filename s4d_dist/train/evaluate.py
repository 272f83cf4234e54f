"""Multi-view evaluation, exact across ranks (docs/method.md §2.11 done right).

Each rank scores its share of (sample, view) rows; the rows of every rank are gathered, padding
rows (valid = False) dropped, duplicates removed, view probabilities averaged per sample, and
the metrics computed once from the whole set — not averaged per rank as in the official code.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from s4d_dist.train import distributed
from s4d_dist.train.metrics import classification_metrics, merge_views


@torch.no_grad()
def predict(model: nn.Module, loader, dtype: torch.dtype,
            on_batch: Callable[[dict], None] | None = None) -> dict[str, np.ndarray]:
    """This rank's valid rows: sample index, view, softmax probabilities, label. `on_batch(batch)`
    runs after each forward, while the model still holds that forward's state (analyses read
    the MoAE routing there)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: dict[str, list] = {"index": [], "view": [], "probs": [], "label": []}
    batches = tqdm(loader.batches(), total=len(loader), desc=f"eval {loader.modality}",
                   disable=None if distributed.is_main() else True,  # None: to a terminal only
                   leave=False, dynamic_ncols=True)
    for batch in batches:
        logits = model(batch["pixels"].to(device, dtype, non_blocking=True), loader.modality)
        if on_batch is not None:
            on_batch(batch)
        valid = batch["valid"].cpu().numpy().astype(bool)
        rows["probs"].append(logits.float().softmax(-1).cpu().numpy()[valid])
        for key in ("index", "view", "label"):
            rows[key].append(np.asarray(batch[key].cpu())[valid])
    model.train(was_training)
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in rows.items()}


def evaluate(model: nn.Module, loader, num_classes: int, dtype: torch.dtype,
             on_batch: Callable[[dict], None] | None = None) -> dict:
    """Metrics over the whole split, identical on every rank."""
    mine = predict(model, loader, dtype, on_batch)
    gathered = {k: distributed.gather_arrays(v) for k, v in mine.items()}
    probs = gathered["probs"].reshape(-1, num_classes)
    ids, mean_probs, labels = merge_views(gathered["index"], gathered["view"], probs,
                                          gathered["label"])
    # Each rank only met the corrupt samples of its own rows, and views of one sample can sit on
    # different ranks: gather their indices and count each once.
    corrupt = np.unique(distributed.gather_arrays(
        np.array(sorted(loader.corrupt.seen), dtype=np.int64))).size
    if len(ids) != loader.num_samples - corrupt:
        raise RuntimeError(f"evaluation saw {len(ids)} samples, the split has "
                           f"{loader.num_samples} ({corrupt} corrupt)")
    metrics = classification_metrics(labels, mean_probs.argmax(1), num_classes)
    metrics["samples"] = int(len(ids))  # the denominators: clips (however stored) or images
    if loader.modality == "video":
        metrics["clips"] = int(len(ids))
    return metrics
