"""MAE masks (docs/method.md §1.4): an exact number of masked tokens per sample, uniformly random
over all tokens — space-time for clips (not tube masking), so every row has the same visible
count, which the encoder's gather of visible tokens relies on."""
from __future__ import annotations

import torch


def num_masked(num_tokens: int, ratio: float) -> int:
    """int(ratio · N): 90 of 100 image tokens, 760 of 800 clip tokens at ViT-B sizes."""
    return int(ratio * num_tokens)


def random_masks(batch: int, num_tokens: int, ratio: float,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, num_tokens) bool, True = masked, drawn for the whole batch without a Python loop."""
    scores = torch.rand(batch, num_tokens, generator=generator, device=device)
    masked_ids = scores.argsort(dim=1)[:, : num_masked(num_tokens, ratio)]
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    return mask.scatter(1, masked_ids, True)
