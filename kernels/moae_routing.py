"""Triton kernels for MoAE token routing: router epilogue, expert queues, dispatch, combine.

The loop backend in `s4d_dist.models.moae` is the reference for every result here. The kernels
exist because on a GPU the routing glue (top-k, capacity bookkeeping, gathers) is a chain of
small launches and index tensors in torch; here it is four memory-bound kernels forward and
three backward, all deterministic: every output element is written by exactly one program and
no kernel uses atomics, so a layer's outputs and gradients are bitwise reproducible: dispatch
and combine give the same bits on every autotuned tile (each output is one copy, or a sum over
the k experts in a fixed order), and the one reduction whose order depends on the tile (the
gate gradient's sum over D) always runs on GATE_GRAD_TILE.

Index maps shared by the kernels (S = E · C slots, C = rows per expert in the padded layout):
  pair_slot (T, k) int32  slot of the pair (token t, its j-th expert), -1 when dropped
  slot_pair (S,)   int32  pair index t·k + j that fills the slot, -1 when the slot is empty
Dispatch and combine are gathers over these maps, so each writes its outputs once.

Under TRITON_INTERPRET=1 (CPU) the kernels run in Triton's interpreter, where bf16 arithmetic is
wrong; the kernels only load and store the input dtype and compute in fp32, which is also what
they do on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# Decided when this module is imported, because `triton.jit` picks the interpreter then.
INTERPRETED: bool = bool(knobs.runtime.interpret)

# Tokens per program in the router and queue kernels. Both must agree: the queue kernel reads the
# per-block expert counts that the router kernel wrote.
ROUTE_BLOCK_T = 64
# Per-block counts summed per step when a queue program adds up the blocks before its own.
COUNT_BLOCK = 64

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}


# (BLOCK_ROWS, BLOCK_D, num_warps) tried by the dispatch/combine autotuner on a GPU. The
# interpreter gets one tile, as it has no driver to time several with: many rows, since its
# cost is per program, and a narrow BLOCK_D, so that small test widths still loop over D.
GPU_GATHER_TILES = ((16, 128, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8))
INTERPRETER_GATHER_TILE = (64, 32, 4)
# combine_backward sums each gate gradient over D in BLOCK_D chunks, and a reduction's order
# (hence its last bits) depends on the tile; it therefore always runs on this one tile, so that
# its result does not depend on what an autotuner picked in this process.
GATE_GRAD_TILE = INTERPRETER_GATHER_TILE if INTERPRETED else (32, 128, 4)

Tile = tuple[int, int, int]


def _gather_configs() -> list[triton.Config]:
    tiles = (INTERPRETER_GATHER_TILE,) if INTERPRETED else GPU_GATHER_TILES
    return [triton.Config({"BLOCK_ROWS": rows, "BLOCK_D": cols}, num_warps=warps)
            for rows, cols, warps in tiles]


def _launch(kernel, rows: int, tile: Tile | None, *args, **constants) -> None:
    """Launch an autotuned gather kernel over `rows` rows: autotuned when `tile` is None, else
    the plain kernel on that (BLOCK_ROWS, BLOCK_D, num_warps) tile."""
    if tile is None:
        kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)](*args, **constants)
        return
    block_rows, block_d, warps = tile
    kernel.fn[(triton.cdiv(rows, block_rows),)](*args, **constants, BLOCK_ROWS=block_rows,
                                                  BLOCK_D=block_d, num_warps=warps)


@triton.jit
def _router_kernel(logits_ptr, noise_std_ptr, noise_ptr, noisy_ptr, topk_ptr, gates_ptr,
                   counts_ptr, T, E,
                   K: tl.constexpr, HAS_NOISE: tl.constexpr, PRODUCT_DTYPE: tl.constexpr,
                   E_P: tl.constexpr, K_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """Noisy logits, top-k experts, gates over the k, and this block's token count per expert."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_P)
    choices = tl.arange(0, K_P)
    row_ok = rows < T
    ok = row_ok[:, None] & (experts[None, :] < E)
    offs = rows[:, None].to(tl.int64) * E + experts[None, :]

    z = tl.load(logits_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_NOISE:
        std = tl.load(noise_std_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        eps = tl.load(noise_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # Rounded where torch rounds `logits + noise * noise_std` (product, then sum), so the
        # noisy logits and the experts chosen on them match the reference bit for bit.
        z = z + (eps * std).to(PRODUCT_DTYPE).to(tl.float32)
    # Select and softmax on the rounded values that are returned, so that the gates and their
    # gradient are functions of the returned noisy logits.
    z = z.to(noisy_ptr.dtype.element_ty)
    tl.store(noisy_ptr + offs, z, mask=ok)
    # Padding experts never win; padding rows stay finite (0), so no inf - inf below.
    z = tl.where(experts[None, :] < E, z.to(tl.float32), float("-inf"))

    # k rounds of argmax (ties to the lower expert id); values come out in descending order.
    top_val = tl.full([BLOCK_T, K_P], float("-inf"), tl.float32)
    top_idx = tl.zeros([BLOCK_T, K_P], tl.int32)
    member = tl.zeros([BLOCK_T, E_P], tl.int32)
    for j in tl.static_range(K):
        best, arg = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        hit = experts[None, :] == arg[:, None]
        z = tl.where(hit, float("-inf"), z)
        member += hit.to(tl.int32)
        top_val = tl.where(choices[None, :] == j, best[:, None], top_val)
        top_idx = tl.where(choices[None, :] == j, arg[:, None], top_idx)

    p = tl.exp(top_val - tl.max(top_val, axis=1)[:, None])  # padded slots: exp(-inf) = 0
    gates = p / tl.sum(p, axis=1)[:, None]
    pair_offs = rows[:, None].to(tl.int64) * K + choices[None, :]
    pair_ok = row_ok[:, None] & (choices[None, :] < K)
    tl.store(topk_ptr + pair_offs, top_idx, mask=pair_ok)
    tl.store(gates_ptr + pair_offs, gates, mask=pair_ok)

    member = tl.where(row_ok[:, None], member, 0)
    tl.store(counts_ptr + pid * E + experts, tl.sum(member, axis=0), mask=experts < E)


@triton.jit
def _queue_kernel(topk_ptr, counts_ptr, pair_slot_ptr, slot_pair_ptr, kept_ptr,
                  T, E, capacity, C,
                  K: tl.constexpr, E_P: tl.constexpr, BLOCK_T: tl.constexpr,
                  COUNT_BLOCK: tl.constexpr):
    """Each pair's place in its expert's queue (ascending flat token index), capacity, slots."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_P)
    row_ok = rows < T

    # Tokens that the blocks before this one sent to each expert (an exclusive prefix sum over
    # the router's per-block counts, recomputed per program: cheap, and no extra launch).
    before = tl.zeros([E_P], tl.int32)
    for start in range(0, pid, COUNT_BLOCK):
        blocks = start + tl.arange(0, COUNT_BLOCK)
        counts = tl.load(counts_ptr + blocks[:, None] * E + experts[None, :],
                         mask=(blocks[:, None] < pid) & (experts[None, :] < E), other=0)
        before += tl.sum(counts, axis=0)

    member = tl.zeros([BLOCK_T, E_P], tl.int32)
    for j in tl.static_range(K):
        expert = tl.load(topk_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
        member += (experts[None, :] == expert[:, None]).to(tl.int32)
    # A token picks an expert at most once, so its place in the queue is the number of earlier
    # tokens that picked it: an exclusive scan down the block plus the earlier blocks.
    place = tl.cumsum(member, axis=0) - member + before[None, :]

    for j in tl.static_range(K):
        pair = rows.to(tl.int64) * K + j
        expert = tl.load(topk_ptr + pair, mask=row_ok, other=-1).to(tl.int32)
        pos = tl.sum(tl.where(experts[None, :] == expert[:, None], place, 0), axis=1)
        kept = row_ok & (pos < capacity)
        slot = expert * C + pos
        tl.store(pair_slot_ptr + pair, tl.where(kept, slot, -1), mask=row_ok)
        tl.store(kept_ptr + pair, kept, mask=row_ok)
        tl.store(slot_pair_ptr + slot, pair.to(tl.int32), mask=kept)


@triton.autotune(configs=_gather_configs(), key=["D", "K", "COMBINE_GRAD"])
@triton.jit
def _dispatch_kernel(src_ptr, slot_pair_ptr, dst_ptr, gates_ptr, ye_ptr, grad_gates_ptr,
                     S, D, K: tl.constexpr, COMBINE_GRAD: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[s] = src[token of slot s] (0 for an empty slot), slot-major.

    With COMBINE_GRAD it is the backward of combine: src is the output gradient, each row is
    scaled by its pair's gate, and the gate gradient <grad_out[t], ye[s]> is written per pair.
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < S
    pair = tl.load(slot_pair_ptr + rows, mask=row_ok, other=-1)
    filled = pair >= 0
    token = tl.where(filled, pair // K, 0).to(tl.int64)
    if COMBINE_GRAD:
        gate = tl.load(gates_ptr + pair, mask=filled, other=0.0).to(tl.float32)
        gate_grad = tl.zeros([BLOCK_ROWS], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols[None, :] < D
        dst_offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        v = tl.load(src_ptr + token[:, None] * D + cols[None, :],
                    mask=filled[:, None] & col_ok, other=0.0).to(tl.float32)
        if COMBINE_GRAD:
            ye = tl.load(ye_ptr + dst_offs, mask=filled[:, None] & col_ok, other=0.0)
            gate_grad += tl.sum(v * ye.to(tl.float32), axis=1)
            v = v * gate[:, None]
        tl.store(dst_ptr + dst_offs, v.to(dst_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)
    if COMBINE_GRAD:
        tl.store(grad_gates_ptr + pair, gate_grad, mask=filled)


@triton.autotune(configs=_gather_configs(), key=["D", "K", "WEIGHTED"])
@triton.jit
def _combine_kernel(src_ptr, pair_slot_ptr, weights_ptr, dst_ptr, T, D,
                    K: tl.constexpr, WEIGHTED: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[t] = Σ_j w[t, j] · src[slot of pair (t, j)] over kept pairs, token-major.

    Each token gathers its ≤ k rows instead of experts scattering into tokens, so the sum needs
    no atomics and its order is fixed. Unweighted it is the backward of dispatch.
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < T
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols[None, :] < D
        acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
        for j in tl.static_range(K):
            pair = rows.to(tl.int64) * K + j
            slot = tl.load(pair_slot_ptr + pair, mask=row_ok, other=-1)
            kept = slot >= 0
            v = tl.load(src_ptr + slot.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=kept[:, None] & col_ok, other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * tl.load(weights_ptr + pair, mask=kept, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(dst_ptr + rows[:, None].to(tl.int64) * D + cols[None, :],
                 acc.to(dst_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


@triton.jit
def _router_backward_kernel(gates_ptr, grad_gates_ptr, topk_ptr, grad_noisy_ptr, noise_ptr,
                            grad_logits_ptr, grad_noise_std_ptr, T, E,
                            K: tl.constexpr, HAS_GRAD_NOISY: tl.constexpr,
                            HAS_NOISE: tl.constexpr, E_P: tl.constexpr, K_P: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    """Gradient of the noisy logits: softmax-over-k backward scattered to the chosen experts,
    plus any direct gradient of the noisy logits (the load-balancing loss reads them)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_P)
    choices = tl.arange(0, K_P)
    row_ok = rows < T
    pair_offs = rows[:, None].to(tl.int64) * K + choices[None, :]
    pair_ok = row_ok[:, None] & (choices[None, :] < K)
    g = tl.load(gates_ptr + pair_offs, mask=pair_ok, other=0.0).to(tl.float32)
    dg = tl.load(grad_gates_ptr + pair_offs, mask=pair_ok, other=0.0).to(tl.float32)
    dz_top = g * (dg - tl.sum(g * dg, axis=1)[:, None])

    ok = row_ok[:, None] & (experts[None, :] < E)
    offs = rows[:, None].to(tl.int64) * E + experts[None, :]
    if HAS_GRAD_NOISY:
        dz = tl.load(grad_noisy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        dz = tl.zeros([BLOCK_T, E_P], tl.float32)
    for j in tl.static_range(K):
        expert = tl.load(topk_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
        dz_j = tl.sum(tl.where(choices[None, :] == j, dz_top, 0.0), axis=1)
        dz += tl.where(experts[None, :] == expert[:, None], dz_j[:, None], 0.0)
    tl.store(grad_logits_ptr + offs, dz.to(grad_logits_ptr.dtype.element_ty), mask=ok)
    if HAS_NOISE:  # noisy = logits + noise · noise_std
        eps = tl.load(noise_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(grad_noise_std_ptr + offs, (dz * eps).to(grad_noise_std_ptr.dtype.element_ty),
                 mask=ok)


def route(logits: torch.Tensor, noise_std: torch.Tensor, noise: torch.Tensor | None,
          top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router epilogue → (noisy (T,E), topk_idx (T,k) long, gates (T,k), block_counts (NB,E))."""
    T, E = logits.shape
    # torch's type promotion, as in the reference's `logits + noise * noise_std` (under autocast
    # the logits come in bf16 and noise_std in fp32).
    dtype = logits.dtype if noise is None else torch.promote_types(
        logits.dtype, torch.promote_types(noise.dtype, noise_std.dtype))
    noisy = torch.empty(T, E, dtype=dtype, device=logits.device)
    topk_idx = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    gates = torch.empty(T, top_k, dtype=dtype, device=logits.device)
    blocks = triton.cdiv(T, ROUTE_BLOCK_T)
    block_counts = torch.empty(blocks, E, dtype=torch.int32, device=logits.device)
    product_dtype = noisy.dtype if noise is None else torch.promote_types(noise.dtype,
                                                                          noise_std.dtype)
    # No FMA contraction either: torch rounds the product before the sum.
    _router_kernel[(blocks,)](
        logits, noise_std, logits if noise is None else noise, noisy, topk_idx, gates,
        block_counts, T, E, K=top_k, HAS_NOISE=noise is not None,
        PRODUCT_DTYPE=_TL_DTYPES[product_dtype], E_P=triton.next_power_of_2(E),
        K_P=triton.next_power_of_2(top_k), BLOCK_T=ROUTE_BLOCK_T, enable_fp_fusion=False)
    return noisy, topk_idx, gates, block_counts


def queue(topk_idx: torch.Tensor, block_counts: torch.Tensor, capacity: int,
          slots_per_expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Capacity drops and slots → (pair_slot (T,k), slot_pair (E·C,), kept (T,k) bool)."""
    T, k = topk_idx.shape
    E = block_counts.shape[1]
    pair_slot = torch.empty(T, k, dtype=torch.int32, device=topk_idx.device)
    kept = torch.empty(T, k, dtype=torch.bool, device=topk_idx.device)
    slot_pair = torch.full((E * slots_per_expert,), -1, dtype=torch.int32, device=topk_idx.device)
    _queue_kernel[(block_counts.shape[0],)](
        topk_idx, block_counts, pair_slot, slot_pair, kept, T, E, capacity, slots_per_expert,
        K=k, E_P=triton.next_power_of_2(E), BLOCK_T=ROUTE_BLOCK_T, COUNT_BLOCK=COUNT_BLOCK)
    return pair_slot, slot_pair, kept


def dispatch(x: torch.Tensor, slot_pair: torch.Tensor, top_k: int, num_experts: int,
             slots: int, tile: Tile | None = None) -> torch.Tensor:
    """Gather tokens into the padded expert layout (E, C, D); empty slots are zero."""
    S, D = slot_pair.shape[0], x.shape[1]
    out = torch.empty(num_experts, slots, D, dtype=x.dtype, device=x.device)
    _launch(_dispatch_kernel, S, tile, x, slot_pair, out, x, x, x, S, D, K=top_k,
            COMBINE_GRAD=False)
    return out


def combine_backward(grad_out: torch.Tensor, expert_out: torch.Tensor, gates: torch.Tensor,
                     slot_pair: torch.Tensor, tile: Tile = GATE_GRAD_TILE,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of `combine` → (grad of expert outputs (E,C,D), grad of gates (T,k) fp32)."""
    S, D = slot_pair.shape[0], grad_out.shape[1]
    top_k = gates.shape[1]
    grad_expert_out = torch.empty_like(expert_out)
    grad_gates = torch.zeros(gates.shape, dtype=torch.float32, device=grad_out.device)  # dropped
    _launch(_dispatch_kernel, S, tile, grad_out, slot_pair, grad_expert_out, gates, expert_out,
            grad_gates, S, D, K=top_k, COMBINE_GRAD=True)
    return grad_expert_out, grad_gates


def combine(expert_out: torch.Tensor, pair_slot: torch.Tensor,
            weights: torch.Tensor | None, out_dtype: torch.dtype,
            tile: Tile | None = None) -> torch.Tensor:
    """Per token, Σ over kept pairs of weight · expert row (T, D); weights None means 1."""
    T, top_k = pair_slot.shape
    D = expert_out.shape[-1]
    out = torch.empty(T, D, dtype=out_dtype, device=expert_out.device)
    _launch(_combine_kernel, T, tile, expert_out, pair_slot,
            expert_out if weights is None else weights, out, T, D, K=top_k,
            WEIGHTED=weights is not None)
    return out


def router_backward(gates: torch.Tensor, grad_gates: torch.Tensor, topk_idx: torch.Tensor,
                    grad_noisy: torch.Tensor | None, noise: torch.Tensor | None,
                    num_experts: int, logits_dtype: torch.dtype, noise_std_dtype: torch.dtype,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad of logits (T,E), grad of noise_std (T,E) or None when there was no noise)."""
    T, top_k = gates.shape
    grad_logits = torch.empty(T, num_experts, dtype=logits_dtype, device=gates.device)
    grad_noise_std = None if noise is None else torch.empty(
        T, num_experts, dtype=noise_std_dtype, device=gates.device)
    _router_backward_kernel[(triton.cdiv(T, ROUTE_BLOCK_T),)](
        gates, grad_gates, topk_idx, grad_logits if grad_noisy is None else grad_noisy,
        grad_logits if noise is None else noise, grad_logits,
        grad_logits if grad_noise_std is None else grad_noise_std, T, num_experts,
        K=top_k, HAS_GRAD_NOISY=grad_noisy is not None, HAS_NOISE=noise is not None,
        E_P=triton.next_power_of_2(num_experts), K_P=triton.next_power_of_2(top_k),
        BLOCK_T=ROUTE_BLOCK_T)
    return grad_logits, grad_noise_std
