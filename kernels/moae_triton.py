"""The `triton` MoAE backend: routing, dispatch and combine in Triton kernels, experts as bmm.

`s4d_dist.models.moae.get_backend("triton")` imports this module lazily and calls
`triton_available()` before using `triton_backend`, so a CPU install without the interpreter
falls back to the `torch` backend instead of failing.

The layer is three autograd Functions around the expert GEMMs rather than one big Function:
each Function's backward is the mirror kernel of its forward (dispatch ↔ combine, router
epilogue ↔ softmax-over-k backward), and the GEMMs and GELU between them keep torch's own
autograd as batched cuBLAS GEMMs on the padded (E, C, D) layout. A Triton grouped GEMM would
pay only by fusing the dispatch gather into its loads and the combine into its epilogue,
saving the layout's round trip through memory; benchmarks/moae_glue.py measures what that
round trip costs.
"""
from __future__ import annotations

import torch

from s4d_dist.kernels.moae_contract import RoutingResult, batched_experts

try:
    from s4d_dist.kernels import moae_routing as routing
except ImportError as err:  # no triton in this install: triton_available() says why
    routing = None
    _IMPORT_ERROR: ImportError | None = err
else:
    _IMPORT_ERROR = None


def triton_available() -> tuple[bool, str]:
    """(whether the kernels can run here, why / how)."""
    if routing is None:
        return False, f"cannot import triton: {_IMPORT_ERROR}"
    if routing.INTERPRETED:
        return True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter"
    if torch.cuda.is_available():
        return True, f"compiled for {torch.cuda.get_device_name()}"
    return False, "no CUDA device and TRITON_INTERPRET was not set when triton was imported"


class _Route(torch.autograd.Function):
    """Router epilogue: (logits, noise_std, noise) → noisy logits, gates, top-k ids, counts."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, noise_std: torch.Tensor, noise: torch.Tensor | None,
                top_k: int):
        noisy, topk_idx, gates, block_counts = routing.route(logits, noise_std, noise, top_k)
        ctx.save_for_backward(gates, topk_idx, noise)
        ctx.num_experts = logits.shape[1]
        ctx.grad_dtypes = (logits.dtype, noise_std.dtype)
        ctx.mark_non_differentiable(topk_idx, block_counts)
        ctx.set_materialize_grads(False)
        return noisy, gates, topk_idx, block_counts

    @staticmethod
    def backward(ctx, grad_noisy, grad_gates, _grad_topk, _grad_counts):
        gates, topk_idx, noise = ctx.saved_tensors
        if grad_gates is None:  # only the noisy logits were used (e.g. by the aux loss alone)
            grad_gates = torch.zeros_like(gates)
        if grad_noisy is not None:
            grad_noisy = grad_noisy.contiguous()
        grad_logits, grad_noise_std = routing.router_backward(
            gates, grad_gates.contiguous(), topk_idx, grad_noisy, noise,
            ctx.num_experts, *ctx.grad_dtypes)
        return grad_logits, grad_noise_std, None, None


class _Dispatch(torch.autograd.Function):
    """Tokens → padded expert layout (E, C, D); backward gathers each token's ≤ k row grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot_pair: torch.Tensor, pair_slot: torch.Tensor,
                num_experts: int, slots: int) -> torch.Tensor:
        ctx.save_for_backward(pair_slot)
        ctx.x_dtype = x.dtype
        return routing.dispatch(x, slot_pair, pair_slot.shape[1], num_experts, slots)

    @staticmethod
    def backward(ctx, grad_layout):
        (pair_slot,) = ctx.saved_tensors
        grad_x = routing.combine(grad_layout.contiguous(), pair_slot, None, ctx.x_dtype)
        return grad_x, None, None, None, None


class _Combine(torch.autograd.Function):
    """Gate-weighted sum of each token's kept expert rows; backward is a gate-scaled dispatch."""

    @staticmethod
    def forward(ctx, expert_out: torch.Tensor, gates: torch.Tensor, pair_slot: torch.Tensor,
                slot_pair: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(expert_out, gates, slot_pair)
        return routing.combine(expert_out, pair_slot, gates, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, gates, slot_pair = ctx.saved_tensors
        grad_expert_out, grad_gates = routing.combine_backward(
            grad_out.contiguous(), expert_out, gates, slot_pair)
        return grad_expert_out, grad_gates, None, None, None


def triton_backend(x: torch.Tensor, logits: torch.Tensor, noise_std: torch.Tensor,
                   noise: torch.Tensor | None, w1: torch.Tensor, b1: torch.Tensor,
                   w2: torch.Tensor, b2: torch.Tensor, top_k: int,
                   capacity: int) -> RoutingResult:
    """The MoAE backend contract (`moae_contract`); the `loop` backend of
    `s4d_dist.models.moae` is the reference."""
    num_tokens = x.shape[0]
    num_experts = w1.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in [1, num_experts={num_experts}]")
    noise = None if noise is None else noise.contiguous()
    noisy, gates, topk_idx, block_counts = _Route.apply(
        logits.contiguous(), noise_std.contiguous(), noise, top_k)
    # An expert sees a token at most once, so rows beyond num_tokens would always stay empty.
    slots = min(capacity, num_tokens)
    pair_slot, slot_pair, kept = routing.queue(topk_idx, block_counts, capacity, slots)
    layout = _Dispatch.apply(x.contiguous(), slot_pair, pair_slot, num_experts, slots)
    expert_out = batched_experts(layout, w1, b1, w2, b2)
    out = _Combine.apply(expert_out, gates, pair_slot, slot_pair, x.dtype)
    return RoutingResult(out, noisy, topk_idx, gates, kept)
