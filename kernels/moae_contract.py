"""The MoAE backend contract, shared by `s4d_dist.models.moae` and the Triton backend here.

A backend maps (tokens, router logits, noise std, noise, stacked expert weights, top_k,
capacity) to a `RoutingResult`; every backend runs the experts over an expert-contiguous layout
with the same batched GEMMs (`batched_experts`). This module depends on torch alone, so the
models import it and lazily load the kernels, and the kernels never import the models.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class RoutingResult(NamedTuple):
    """What a backend returns; everything after the expert sum (aux loss, stats) reads it."""

    out: torch.Tensor           # (T, D) gate-weighted sum of the kept experts' outputs
    noisy_logits: torch.Tensor  # (T, E) logits + noise · noise_std
    topk_idx: torch.Tensor      # (T, k) long, experts in descending noisy-logit order
    gates: torch.Tensor         # (T, k) softmax over the k selected logits, not renormalised
    kept: torch.Tensor          # (T, k) bool, False where capacity dropped the pair


Backend = Callable[..., RoutingResult]


def batched_experts(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor) -> torch.Tensor:
    """Every expert on its rows of an expert-contiguous (E, C, D) layout, as two batched GEMMs."""
    hidden = F.gelu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))
