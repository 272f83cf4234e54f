"""The `triton` MoAE backend: the whole layer (router GEMM to combined output, and back) as one
autograd Function over the fused kernels of `moae_fused`.

`s4d_dist.models.moae` imports this module lazily and calls `triton_available()` before using
`fused_moae`, so a CPU install without the interpreter falls back to the `torch` backend.

A forward is 4 kernel launches, one seed draw when the noise is drawn here, two allocations
(routing results, which outlive the step for the statistics; the layer's buffers, which live
until backward) and the sum of the per-sample aux-loss terms. Backward is 5 launches, the
router's weight gradient (one GEMM and one column sum) and two allocations. Nothing reads a
value back to the host and every size follows from the shapes, so the layer can be captured
in a CUDA graph; the noise seed is drawn on the device from torch's generator, so
`torch.manual_seed`, checkpointed RNG state and graph replays all govern it as they govern
`torch.randn`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from s4d_dist.kernels.moae_contract import Capacity, RoutingResult

try:
    import triton
    import triton.language as tl

    from s4d_dist.kernels import moae_fused as fused
except ImportError as err:  # no triton in this install: triton_available() says why
    fused = None
    _IMPORT_ERROR: ImportError | None = err
else:
    _IMPORT_ERROR = None


def triton_available() -> tuple[bool, str]:
    """(whether the kernels can run here, why / how)."""
    if fused is None:
        return False, f"cannot import triton: {_IMPORT_ERROR}"
    if fused.INTERPRETED:
        return True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter"
    if torch.cuda.is_available():
        return True, f"compiled for {torch.cuda.get_device_name()}"
    return False, "no CUDA device and TRITON_INTERPRET was not set when triton was imported"


# Launch parameters per kernel. The router, queue and router-backward kernels share BLOCK_T
# (the queue reads the router's per-block counts). On a GPU every GEMM reduces in chunks of 64,
# whatever the other tile sizes. The interpreter gets small tiles, so that small test shapes
# still span several tiles (partial ones included); its cost is per program.
GPU_TILES: dict[str, dict[str, int]] = {
    "route": {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_Z": 128, "num_warps": 4},
    "queue": {"BLOCK_T": 64, "COUNT_BLOCK": 64, "num_warps": 4},
    "up": {"BLOCK_S": 64, "BLOCK_H": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    "down": {"BLOCK_S": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    "grad_hidden": {"BLOCK_S": 64, "BLOCK_H": 64, "BLOCK_K": 64, "BLOCK_Z": 128,
                    "num_warps": 4, "num_stages": 3},
    "grad_w2": {"BLOCK_D": 64, "BLOCK_H": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    "grad_w1": {"BLOCK_H": 64, "BLOCK_D": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    "grad_x": {"BLOCK_S": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    "route_backward": {"BLOCK_T": 64, "BLOCK_N": 64, "COUNT_BLOCK": 16, "num_warps": 4},
}
INTERPRETER_TILES: dict[str, dict[str, int]] = {
    "route": {"BLOCK_T": 32, "BLOCK_K": 16, "BLOCK_Z": 32},
    "queue": {"BLOCK_T": 32, "COUNT_BLOCK": 4},
    "up": {"BLOCK_S": 16, "BLOCK_H": 16, "BLOCK_K": 16},
    "down": {"BLOCK_S": 16, "BLOCK_N": 32, "BLOCK_K": 16},
    "grad_hidden": {"BLOCK_S": 16, "BLOCK_H": 16, "BLOCK_K": 16, "BLOCK_Z": 32},
    "grad_w2": {"BLOCK_D": 32, "BLOCK_H": 16, "BLOCK_K": 16},
    "grad_w1": {"BLOCK_H": 16, "BLOCK_D": 32, "BLOCK_K": 16},
    "grad_x": {"BLOCK_S": 16, "BLOCK_N": 32, "BLOCK_K": 16},
    "route_backward": {"BLOCK_T": 32, "BLOCK_N": 32, "COUNT_BLOCK": 4},
}


# Changes to GPU_TILES that the GPU kit (section B) checks and times against it, to choose
# the defaults on a GPU; each compiles for sm_90 without spills (tests/test_kernels_moae.py).
GPU_TILE_CANDIDATES: dict[str, dict[str, dict[str, int]]] = {
    "gemm_rows_128": {k: {"BLOCK_S": 128, "num_warps": 8}
                      for k in ("up", "down", "grad_hidden", "grad_x")},
    "gemm_rows_32": {k: {"BLOCK_S": 32} for k in ("up", "down", "grad_hidden", "grad_x")},
    "down_n_64": {"down": {"BLOCK_N": 64, "num_warps": 4},
                  "grad_x": {"BLOCK_N": 64, "num_warps": 4}},
    "weights_128": {"grad_w2": {"BLOCK_D": 128, "num_warps": 8},
                    "grad_w1": {"BLOCK_D": 128, "num_warps": 8}},
    "stages_4": {k: {"num_stages": 4} for k in ("up", "down", "grad_hidden", "grad_w2",
                                                 "grad_w1", "grad_x")},
}

# fp32 GEMMs run IEEE (FMA, no tensor cores) on a GPU: smaller tiles keep them in registers.
GPU_TILES_FP32 = GPU_TILES | {
    "route": GPU_TILES["route"] | {"BLOCK_K": 32},
    "grad_w2": GPU_TILES["grad_w2"] | {"BLOCK_D": 32, "BLOCK_H": 32, "BLOCK_K": 32},
}


def tiles(compute_dtype: torch.dtype) -> dict[str, dict[str, int]]:
    if fused.INTERPRETED:
        return INTERPRETER_TILES
    return GPU_TILES_FP32 if compute_dtype == torch.float32 else GPU_TILES


_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class FusedResult(NamedTuple):
    """The layer's routing, its load-balancing terms and the router values the kernels used."""

    routing: RoutingResult
    aux_terms: torch.Tensor | None  # (B,) per-sample terms; their sum is the layer's aux loss
    logits: torch.Tensor            # (T, E) fp32 router logits
    noise_std: torch.Tensor | None  # (T, E) fp32 softplus of the noise logits (when noisy)
    noise: torch.Tensor | None      # (T, E) fp32 standard-normal draw (when noisy)


@dataclass(frozen=True)
class _Plan:
    """Shapes and switches of one call, fixed by the shapes alone (no device values)."""

    samples: int        # B
    sample_tokens: int  # L
    top_k: int
    group_samples: int  # G, samples per capacity group
    groups: int         # NG
    slots: int          # C, slots per (expert, group)
    capacity: int       # per expert in a full group
    last_capacity: int  # per expert in the last group
    noise: int          # 0 none, 1 given, 2 Philox
    aux: int            # 0 none, 1 softmax probabilities, 2 raw noisy logits (official)
    compute_dtype: torch.dtype

    @property
    def rows_per_token(self) -> int:
        """1: k ≤ 2 expert rows added atomically (exact in any order); else one row per pair."""
        return 1 if self.top_k <= 2 else self.top_k


def _carve(device: torch.device, *specs: tuple[tuple[int, ...], torch.dtype]
           ) -> list[torch.Tensor]:
    """Typed tensors carved from one allocation (16-byte aligned): one allocator call for many
    buffers of the same lifetime."""
    offsets, total = [], 0
    for shape, dtype in specs:
        total = -(-total // 16) * 16
        offsets.append(total)
        total += math.prod(shape) * dtype.itemsize
    buffer = torch.empty(max(total, 16), dtype=torch.uint8, device=device)
    return [buffer[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for start, (shape, dtype) in zip(offsets, specs)]


def _constants(plan: _Plan, num_experts: int) -> dict:
    return {"CDT": getattr(tl, {torch.float32: "float32", torch.bfloat16: "bfloat16",
                                torch.float16: "float16"}[plan.compute_dtype]),
            "DOT_PRECISION": "ieee" if plan.compute_dtype == torch.float32 else "tf32",
            "E_P": max(triton.next_power_of_2(num_experts), 8)}


def _dims(plan: _Plan, x: torch.Tensor, w1: torch.Tensor) -> tuple[int, ...]:
    """(T, D, E, H, K, B, L, R, router blocks per sample, slots per expert)."""
    T, D = x.shape
    E, H = w1.shape[:2]
    nblk = triton.cdiv(plan.sample_tokens, tiles(plan.compute_dtype)["route"]["BLOCK_T"])
    return (T, D, E, H, plan.top_k, plan.samples, plan.sample_tokens, plan.rows_per_token,
            nblk, plan.groups * plan.slots)


class _FusedMoAE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, wr, br, wn, bn, w1, b1, w2, b2, noise, seed, plan: _Plan):
        T, D, E, H, K, B, L, R, nblk, SE = _dims(plan, x, w1)
        t = tiles(plan.compute_dtype)
        f32 = torch.float32
        (logits, std, eps, noisy, topk, gates, kept, counts, psum, filled,
         aux_terms) = _carve(x.device, ((T, E), f32), ((T, E), f32), ((T, E), f32),
                             ((T, E), f32), ((T, K), torch.long), ((T, K), f32),
                             ((T, K), torch.bool), ((B * nblk, E), torch.int32),
                             ((B * nblk, E), f32), ((plan.groups, E), torch.int32), ((B,), f32))
        out_rows, a, h, slot_pair = _carve(
            x.device, ((T * R, D), f32), ((E * SE, H), plan.compute_dtype),
            ((E * SE, H), plan.compute_dtype), ((E * SE,), torch.int32))
        const = _constants(plan, E)
        fused._route_kernel[(B * nblk,)](
            x, wr, br, wn, bn, x if noise is None else noise, x if seed is None else seed,
            logits, std, eps, noisy, topk, gates, counts, psum, out_rows, L, D, E, nblk,
            K=K, K_P=triton.next_power_of_2(K), NOISE=plan.noise, AUX=plan.aux, R=R,
            enable_fp_fusion=False, **const, **t["route"])
        fused._queue_kernel[(B * nblk,)](
            topk, counts, psum, kept, slot_pair, filled, aux_terms, B, L, E, nblk,
            plan.group_samples, plan.groups, plan.slots, SE, plan.capacity, plan.last_capacity,
            E / (B * L * L), K=K, E_P=const["E_P"], AUX=plan.aux,
            **(t["queue"] | {"BLOCK_T": t["route"]["BLOCK_T"]}))
        if SE:
            tile = t["up"]
            tiles_per_expert = triton.cdiv(SE, tile["BLOCK_S"])
            fused._expert_up_kernel[(E * tiles_per_expert, triton.cdiv(H, tile["BLOCK_H"]))](
                x, w1, b1, slot_pair, filled, a, h, D, H, E, SE, plan.slots, tiles_per_expert,
                K=K, CDT=const["CDT"], DOT_PRECISION=const["DOT_PRECISION"], **tile)
            tile = t["down"]
            tiles_per_expert = triton.cdiv(SE, tile["BLOCK_S"])
            fused._expert_down_kernel[(E * tiles_per_expert, triton.cdiv(D, tile["BLOCK_N"]))](
                h, w2, b2, gates, slot_pair, filled, out_rows, D, H, E, SE, plan.slots,
                tiles_per_expert, K=K, R=R, CDT=const["CDT"],
                DOT_PRECISION=const["DOT_PRECISION"], **tile)
        out = out_rows if R == 1 else out_rows.view(T, R, D).sum(dim=1)
        out = out.to(x.dtype)

        ctx.save_for_backward(x, wr, wn, w1, b1, w2, b2, gates, topk, kept, counts, noisy, std,
                              eps, slot_pair, filled, a, h)
        ctx.plan = plan
        ctx.mark_non_differentiable(topk, kept, logits, std, eps)
        ctx.set_materialize_grads(False)
        return out, noisy, gates, aux_terms, topk, kept, logits, std, eps

    @staticmethod
    def backward(ctx, grad_out, grad_noisy, grad_gates, grad_aux, *_):
        (x, wr, wn, w1, b1, w2, b2, gates, topk, kept, counts, noisy, std, eps, slot_pair,
         filled, a, h) = ctx.saved_tensors
        plan: _Plan = ctx.plan
        T, D, E, H, K, B, L, R, nblk, SE = _dims(plan, x, w1)
        t = tiles(plan.compute_dtype)
        const = _constants(plan, E)
        f32 = torch.float32
        if grad_out is None:
            grad_out = torch.zeros(T, D, dtype=x.dtype, device=x.device)
        grad_out = grad_out.contiguous()
        nhc = triton.cdiv(H, t["grad_hidden"]["BLOCK_H"])
        aliased = R == 1 and x.dtype == f32  # dx can be finished in place of the experts' rows
        dgate, da, dx_rows, dz, *dx = _carve(
            x.device, ((T * K, nhc), f32), ((E * SE, H), plan.compute_dtype), ((T * R, D), f32),
            ((T, 2 * E), x.dtype), *([] if aliased else [((T, D), x.dtype)]))
        dx = dx_rows if aliased else dx[0]
        dw1, db1, dw2, db2 = _carve(x.device, (w1.shape, w1.dtype), (b1.shape, b1.dtype),
                                    (w2.shape, w2.dtype), (b2.shape, b2.dtype))

        tile = t["grad_hidden"]
        tiles_per_expert = triton.cdiv(SE, tile["BLOCK_S"])
        work = E * tiles_per_expert * nhc
        zeroing = triton.cdiv(T * R, tile["BLOCK_S"])
        fused._expert_grad_hidden_kernel[(work + zeroing,)](
            grad_out, w2, b2, a, h, gates, slot_pair, filled, da, dgate, dx_rows, D, H, E, SE,
            max(plan.slots, 1), max(tiles_per_expert, 1), nhc, work, T * R, K=K,
            CDT=const["CDT"], DOT_PRECISION=const["DOT_PRECISION"], **tile)
        if SE:
            tile = t["grad_w2"]
            fused._expert_grad_w2_kernel[(E, triton.cdiv(D, tile["BLOCK_D"]),
                                          triton.cdiv(H, tile["BLOCK_H"]))](
                grad_out, h, gates, slot_pair, filled, dw2, db2, D, H, E, SE, plan.slots, K=K,
                CDT=const["CDT"], DOT_PRECISION=const["DOT_PRECISION"], **tile)
            tile = t["grad_w1"]
            fused._expert_grad_w1_kernel[(E, triton.cdiv(H, tile["BLOCK_H"]),
                                          triton.cdiv(D, tile["BLOCK_D"]))](
                x, da, slot_pair, filled, dw1, db1, D, H, E, SE, plan.slots, K=K,
                CDT=const["CDT"], DOT_PRECISION=const["DOT_PRECISION"], **tile)
            tile = t["grad_x"]
            tiles_per_expert = triton.cdiv(SE, tile["BLOCK_S"])
            fused._expert_grad_x_kernel[(E * tiles_per_expert, triton.cdiv(D, tile["BLOCK_N"]))](
                da, w1, slot_pair, filled, dx_rows, D, H, E, SE, plan.slots, tiles_per_expert,
                K=K, R=R, CDT=const["CDT"], DOT_PRECISION=const["DOT_PRECISION"], **tile)
        else:  # no expert holds a slot: nothing flows to the experts
            for grad in (dw1, db1, dw2, db2):
                grad.zero_()

        tile = t["route_backward"]
        fused._route_backward_kernel[(B * nblk,)](
            gates, topk, kept, dgate, gates if grad_gates is None else grad_gates.contiguous(),
            noisy if grad_noisy is None else grad_noisy.contiguous(),
            gates if grad_aux is None else grad_aux, 0 if grad_aux is None else grad_aux.stride(0),
            noisy, std, eps, counts, dx_rows, wr, wn, dz, dx, L, D, E, nblk, nhc,
            E / (B * L * L), K=K, K_P=triton.next_power_of_2(K), E_P=const["E_P"], R=R,
            NOISE=plan.noise, AUX=0 if grad_aux is None else plan.aux,
            HAS_GRAD_GATES=grad_gates is not None, HAS_GRAD_NOISY=grad_noisy is not None,
            CDT=const["CDT"], DOT_PRECISION=const["DOT_PRECISION"],
            **(tile | {"BLOCK_T": t["route"]["BLOCK_T"]}))
        # The router's weight gradient: one GEMM for both linears, one column sum.
        dw_router = torch.mm(dz.t(), x).to(wr.dtype)
        db_router = dz.sum(dim=0).to(wr.dtype)
        return (dx, dw_router[:E], db_router[:E], dw_router[E:], db_router[E:],
                dw1, db1, dw2, db2, None, None, None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: autocast's where it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fused_moae(x: torch.Tensor, router: tuple[torch.Tensor, ...],
               experts: tuple[torch.Tensor, ...], top_k: int, capacity: Capacity, samples: int,
               noise: torch.Tensor | None = None, draw_noise: bool = False,
               aux: str | None = None) -> FusedResult:
    """One MoAE layer over x (B·L, D) in flat token order.

    router: (W_r, b_r, W_n, b_n) of the gate and noise linears; experts: (w1, b1, w2, b2)
    stacked over experts. `noise` (T, E) is added as given; else `draw_noise` draws it with
    Philox from a seed taken from torch's generator on x's device; else none is added.
    `aux`: None, "softmax" (Switch/GShard) or "logits" (official, §3.2) selects the
    load-balancing terms returned. `capacity.group_tokens` must be a multiple of L."""
    T, D = x.shape
    E = experts[0].shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k {top_k} must be in [1, num_experts={E}]")
    L = T // samples
    if capacity.group_tokens % L or T != samples * L:
        raise ValueError(f"capacity groups of {capacity.group_tokens} tokens do not split "
                         f"{samples} samples of {L} tokens")
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"the Triton MoAE runs CUDA tensors (or any under TRITON_INTERPRET=1), "
                         f"not {x.device.type} ones: use the `auto` or `torch` backend")
    cdt = compute_dtype(x)
    if cdt not in _TL_DTYPES:
        raise ValueError(f"the Triton MoAE computes in fp32, bf16 or fp16, not {cdt}")
    if fused.INTERPRETED and cdt != torch.float32:
        raise ValueError(f"the Triton interpreter computes only fp32 correctly, not {cdt} "
                         "(run bf16 on a GPU, or the `torch` backend on this machine)")
    group_samples = capacity.group_tokens // L
    plan = _Plan(samples, L, top_k, group_samples, capacity.groups(T), capacity.slots(),
                 capacity.per_group, capacity.last_group,
                 noise=1 if noise is not None else 2 if draw_noise else 0,
                 aux={None: 0, "softmax": 1, "logits": 2}[aux], compute_dtype=cdt)
    seed = (torch.randint(0, 2 ** 31 - 1, (1,), device=x.device) if plan.noise == 2
            else None)
    out, noisy, gates, aux_terms, topk, kept, logits, std, eps = _FusedMoAE.apply(
        x.contiguous(), *(w.contiguous() for w in router), *(w.contiguous() for w in experts),
        None if noise is None else noise.contiguous(), seed, plan)
    noisy_run = plan.noise > 0
    return FusedResult(RoutingResult(out, noisy, topk, gates, kept),
                       aux_terms if plan.aux else None, logits,
                       std if noisy_run else None, eps if noisy_run else None)
