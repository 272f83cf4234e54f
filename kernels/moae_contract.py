"""The MoAE backend contract, shared by `s4d_dist.models.moae` and the Triton backend here.

A dispatch backend maps (tokens, router logits, noise std, noise, stacked expert weights, top_k,
capacity) to a `RoutingResult`; the `loop` and `torch` backends run the experts over an
expert-contiguous layout with the same batched GEMMs (`batched_experts`). The fused `triton`
backend takes the router's weights instead of its logits (it runs the router GEMM itself) and
returns the same `RoutingResult`. This module depends on torch alone, so the models import it
and lazily load the kernels, and the kernels never import the models.
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


class Capacity(NamedTuple):
    """Per-expert capacity, counted separately in each group of `group_tokens` consecutive
    tokens (flat order b·L + l): the queue positions restart in every group, and a pair is
    dropped when its position reaches its group's capacity. The last group may hold fewer
    tokens, and then has its own (smaller) capacity."""

    group_tokens: int
    per_group: int
    last_group: int

    @classmethod
    def of(cls, capacity: int | Capacity, num_tokens: int) -> Capacity:
        """A plain int means one group of every token (the capacity of the whole forward)."""
        if isinstance(capacity, Capacity):
            return capacity
        return cls(max(num_tokens, 1), capacity, capacity)

    def groups(self, num_tokens: int) -> int:
        return max(-(-num_tokens // self.group_tokens), 1)

    def slots(self) -> int:
        """Rows per (expert, group) in a padded layout: a token meets an expert at most once."""
        return min(self.per_group, self.group_tokens)


Backend = Callable[..., RoutingResult]


def batched_experts(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor) -> torch.Tensor:
    """Every expert on its rows of an expert-contiguous (E, C, D) layout, as two batched GEMMs."""
    hidden = F.gelu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))
