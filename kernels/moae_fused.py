"""Triton kernels of the fused MoAE layer (the `triton` backend; kernels/moae_triton.py wraps
them in one autograd Function). docs/method.md §2.3-2.5 fix what they compute; the `torch`
backend of s4d_dist.models.moae is the reference they are tested against.

Forward, four launches:
  route        router GEMM x·[W_r | W_n]ᵀ (D → 2E) and its epilogue: softplus, noise (given, or
               Philox from a seed in device memory), top-k, gates, per-block expert counts and
               load-balancing partial sums; zeroes the output rows it will receive
  queue        each pair's place in its expert's queue within its capacity group, kept pairs,
               slot → pair map, slots filled per (group, expert), per-sample aux-loss terms
  expert_up    grouped GEMM 1: token rows gathered as they load, + b1 → pre-activation `a`
  expert_down  grouped GEMM 2: GELU(a) on load, + b2, × gate, added into the token's output row
Backward, five: expert_grad_hidden (gate gradients, dA; zeroes dx), expert_grad_w2,
expert_grad_w1, expert_grad_x (dx rows, added like the forward's combine), route_backward
(softmax-over-k, aux loss and softplus backward, router part of dx).

Slots: expert e owns SE = NG·C rows (NG capacity groups of C = min(capacity, group tokens)
slots); slot e·SE + g·C + p holds the p-th kept pair of group g, and a slot is filled when
p < filled[g, e]. Pair index t·K + j = token t's j-th expert.

Combining k ≤ 2 expert rows per token uses fp32 atomics into zeroed rows: 0 + a + b = 0 + b + a
exactly, so the sum does not depend on which program adds first and every result is bitwise
reproducible. k > 2 writes one row per pair (R = K) and the caller sums them in a fixed order.
Every other reduction runs in a fixed order inside one program.

GEMMs load any float dtype and run in CDT (the autocast dtype, else the input's; fp32 uses IEEE
dots, as torch does); accumulators and routing are fp32, results are rounded where torch
rounds them. Under TRITON_INTERPRET=1 only CDT = fp32 is right (the interpreter's bf16 is not).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

# Decided when this module is imported, because `triton.jit` picks the interpreter then.
INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def _softplus(v):
    """torch's softplus (threshold 20), with an accurate log1p of exp(-|v|)."""
    u = tl.exp(-tl.abs(v))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p)


@triton.jit
def _gelu(a):
    """Exact (erf) GELU, fp32."""
    return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
    return cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327


@triton.jit
def _slot_rows(slot_pair_ptr, filled_ptr, e, start, SE, C, E, K: tl.constexpr,
               BLOCK: tl.constexpr):
    """Slots start..start+BLOCK of expert e → (row in the expert's segment, filled, pair, token)."""
    rows = start + tl.arange(0, BLOCK)
    in_segment = rows < SE
    group = rows // C
    filled = tl.load(filled_ptr + group * E + e, mask=in_segment, other=0)
    valid = in_segment & (rows - group * C < filled)
    pair = tl.load(slot_pair_ptr + e.to(tl.int64) * SE + rows, mask=valid, other=0)
    return rows, valid, pair, (pair // K).to(tl.int64)


@triton.jit
def _slot_tile(slot_pair_ptr, filled_ptr, tile, TPE, SE, C, E, K: tl.constexpr,
               BLOCK_S: tl.constexpr):
    """Tile `tile` of the slot layout, TPE tiles per expert → (expert, _slot_rows' four)."""
    e = tile // TPE
    rows, valid, pair, token = _slot_rows(slot_pair_ptr, filled_ptr, e, (tile % TPE) * BLOCK_S,
                                          SE, C, E, K, BLOCK_S)
    return e, rows, valid, pair, token


@triton.jit
def _zero_rows(ptr, first_row, num_rows, D, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK_ROWS)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(ptr + rows[:, None].to(tl.int64) * D + cols[None, :],
                 tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32),
                 mask=(rows[:, None] < num_rows) & (cols[None, :] < D))


@triton.jit
def _route_kernel(x_ptr, wr_ptr, br_ptr, wn_ptr, bn_ptr, noise_ptr, seed_ptr,
                  logits_ptr, std_ptr, eps_ptr, noisy_ptr, topk_ptr, gates_ptr, counts_ptr,
                  psum_ptr, out_ptr, L, D, E, NBLK,
                  K: tl.constexpr, E_P: tl.constexpr, K_P: tl.constexpr, NOISE: tl.constexpr,
                  AUX: tl.constexpr, R: tl.constexpr, CDT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_Z: tl.constexpr):
    """One block of one sample's tokens: router GEMM, noise, top-k, gates, counts, aux sums.

    NOISE: 0 none, 1 given tensor, 2 Philox (seed at seed_ptr, offset t·E + e).
    AUX: 0 none, 1 sums of softmax probabilities, 2 sums of noisy logits (official, §3.2).
    R: output rows per token to zero (1: atomic combine, K: one row per pair).
    """
    pid = tl.program_id(0)
    b = pid // NBLK
    local = (pid % NBLK) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = local < L
    rows = b.to(tl.int64) * L + local

    # Router GEMM, both linears at once: column 2e is expert e's logit, 2e+1 its noise
    # pre-activation.
    cols = tl.arange(0, 2 * E_P)
    col_expert = cols // 2
    col_ok = col_expert < E
    is_gate = (cols % 2) == 0
    acc = tl.zeros([BLOCK_T, 2 * E_P], tl.float32)
    for d0 in range(0, D, BLOCK_K):
        ks = d0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        xt = tl.load(x_ptr + rows[:, None] * D + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_offs = col_expert[None, :] * D + ks[:, None]
        w_ok = k_ok[:, None] & col_ok[None, :]
        w = (tl.load(wr_ptr + w_offs, mask=w_ok & is_gate[None, :], other=0.0)
             + tl.load(wn_ptr + w_offs, mask=w_ok & ~is_gate[None, :], other=0.0))
        acc = tl.dot(xt.to(CDT), w.to(CDT), acc, input_precision=DOT_PRECISION)
    bias = (tl.load(br_ptr + col_expert, mask=col_ok & is_gate, other=0.0)
            + tl.load(bn_ptr + col_expert, mask=col_ok & ~is_gate, other=0.0))
    acc = (acc + bias.to(CDT).to(tl.float32)[None, :]).to(CDT).to(tl.float32)
    z, pre = tl.split(tl.reshape(acc, [BLOCK_T, E_P, 2]))

    experts = tl.arange(0, E_P)
    expert_ok = experts < E
    ok = row_ok[:, None] & expert_ok[None, :]
    offs = rows[:, None] * E + experts[None, :]
    tl.store(logits_ptr + offs, z, mask=ok)
    if NOISE > 0:
        std = _softplus(pre)
        if NOISE == 1:
            eps = tl.load(noise_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            eps = tl.randn(tl.load(seed_ptr), offs.to(tl.int32))
        tl.store(std_ptr + offs, std, mask=ok)
        tl.store(eps_ptr + offs, eps, mask=ok)
        # Product rounded before the sum (the launch turns FMA contraction off), as torch's
        # `logits + noise * noise_std`: the noisy logits match the reference bit for bit.
        z = z + eps * std
    tl.store(noisy_ptr + offs, z, mask=ok)
    # Padding experts never win; padding rows stay finite (0), so no inf - inf below.
    z = tl.where(expert_ok[None, :], z, float("-inf"))

    if AUX == 1:
        p = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        tl.store(psum_ptr + pid * E + experts, tl.sum(tl.where(ok, p, 0.0), axis=0),
                 mask=expert_ok)
    if AUX == 2:
        tl.store(psum_ptr + pid * E + experts, tl.sum(tl.where(ok, z, 0.0), axis=0),
                 mask=expert_ok)

    # k rounds of argmax (ties to the lower expert id); values come out in descending order.
    choices = tl.arange(0, K_P)
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
    p = tl.exp(top_val - tl.max(top_val, axis=1)[:, None])  # padded choices: exp(-inf) = 0
    gates = p / tl.sum(p, axis=1)[:, None]
    pair_offs = rows[:, None] * K + choices[None, :]
    pair_ok = row_ok[:, None] & (choices[None, :] < K)
    tl.store(topk_ptr + pair_offs, top_idx.to(tl.int64), mask=pair_ok)
    tl.store(gates_ptr + pair_offs, gates, mask=pair_ok)
    member = tl.where(row_ok[:, None], member, 0)
    tl.store(counts_ptr + pid * E + experts, tl.sum(member, axis=0), mask=expert_ok)

    # The rows expert_down adds into start at zero.
    for r in tl.static_range(R):
        for d0 in range(0, D, BLOCK_Z):
            zc = d0 + tl.arange(0, BLOCK_Z)
            tl.store(out_ptr + (rows[:, None] * R + r) * D + zc[None, :],
                     tl.zeros([BLOCK_T, BLOCK_Z], tl.float32),
                     mask=row_ok[:, None] & (zc[None, :] < D))


@triton.jit
def _queue_kernel(topk_ptr, counts_ptr, psum_ptr, kept_ptr, slot_pair_ptr, filled_ptr, aux_ptr,
                  B, L, E, NBLK, G, NG, C, SE, cap_full, cap_last, aux_scale,
                  K: tl.constexpr, E_P: tl.constexpr, AUX: tl.constexpr,
                  BLOCK_T: tl.constexpr, COUNT_BLOCK: tl.constexpr):
    """Each pair's place in its expert's queue: earlier tokens of its capacity group (G samples)
    that chose the same expert. Pairs past the group's capacity are dropped (§2.4)."""
    pid = tl.program_id(0)
    b = pid // NBLK
    blk = pid % NBLK
    group = b // G
    experts = tl.arange(0, E_P)
    expert_ok = experts < E

    # Tokens of the group's earlier blocks per expert (the router wrote one count per block).
    before = tl.zeros([E_P], tl.int32)
    for start in range(group * G * NBLK, pid, COUNT_BLOCK):
        blocks = start + tl.arange(0, COUNT_BLOCK)
        before += tl.sum(tl.load(counts_ptr + blocks[:, None] * E + experts[None, :],
                                 mask=(blocks[:, None] < pid) & expert_ok[None, :], other=0),
                         axis=0)

    local = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = local < L
    rows = b.to(tl.int64) * L + local
    member = tl.zeros([BLOCK_T, E_P], tl.int32)
    for j in tl.static_range(K):
        expert = tl.load(topk_ptr + rows * K + j, mask=row_ok, other=-1)
        member += (experts[None, :] == expert[:, None]).to(tl.int32)
    place = tl.cumsum(member, axis=0) - member + before[None, :]
    capacity = tl.where(group == NG - 1, cap_last, cap_full)
    for j in tl.static_range(K):
        pair = rows * K + j
        expert = tl.load(topk_ptr + pair, mask=row_ok, other=-1).to(tl.int32)
        pos = tl.sum(tl.where(experts[None, :] == expert[:, None], place, 0), axis=1)
        kept = row_ok & (pos < capacity)
        tl.store(kept_ptr + pair, kept, mask=row_ok)
        tl.store(slot_pair_ptr + expert.to(tl.int64) * SE + group * C + pos, pair.to(tl.int32),
                 mask=kept)

    # The group's last block knows its totals: how many slots of each expert are filled.
    if (b == tl.minimum(group * G + G, B) - 1) & (blk == NBLK - 1):
        total = before + tl.sum(member, axis=0)
        tl.store(filled_ptr + group * E + experts, tl.minimum(total, capacity), mask=expert_ok)

    # Load-balancing loss term of this sample: E/(B·L²) Σ_e count_e · Σ_t p_te (§2.5).
    if AUX > 0:
        if blk == 0:
            count = tl.zeros([E_P], tl.float32)
            psum = tl.zeros([E_P], tl.float32)
            for start in range(0, NBLK, COUNT_BLOCK):
                blocks = start + tl.arange(0, COUNT_BLOCK)
                offs = (b * NBLK + blocks[:, None]) * E + experts[None, :]
                m = (blocks[:, None] < NBLK) & expert_ok[None, :]
                count += tl.sum(tl.load(counts_ptr + offs, mask=m, other=0), axis=0).to(tl.float32)
                psum += tl.sum(tl.load(psum_ptr + offs, mask=m, other=0.0), axis=0)
            tl.store(aux_ptr + b, aux_scale * tl.sum(count * psum, axis=0))


@triton.jit
def _expert_up_kernel(x_ptr, w1_ptr, b1_ptr, slot_pair_ptr, filled_ptr, a_ptr, h_ptr,
                      D, H, E, SE, C, TPE,
                      K: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """a[slot] = x[token of slot] · W1[e]ᵀ + b1[e] and h = GELU(a), token rows gathered as they
    load; both stored (a for GELU' in backward, h for the second GEMM and dW2)."""
    e, rows, valid, pair, token = _slot_tile(slot_pair_ptr, filled_ptr, tl.program_id(0), TPE,
                                             SE, C, E, K, BLOCK_S)
    if tl.max(valid.to(tl.int32), axis=0) > 0:  # skip a tile of empty slots
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        w1 = w1_ptr + e.to(tl.int64) * H * D
        acc = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
        for d0 in range(0, D, BLOCK_K):
            ks = d0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            xt = tl.load(x_ptr + token[:, None] * D + ks[None, :],
                         mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w1 + hs[None, :] * D + ks[:, None], mask=k_ok[:, None] & h_ok[None, :],
                        other=0.0)
            acc = tl.dot(xt.to(CDT), w.to(CDT), acc, input_precision=DOT_PRECISION)
        bias = tl.load(b1_ptr + e * H + hs, mask=h_ok, other=0.0).to(CDT).to(tl.float32)
        a = (acc + bias[None, :]).to(CDT)
        offs = (e * SE + rows)[:, None].to(tl.int64) * H + hs[None, :]
        mask = valid[:, None] & h_ok[None, :]
        tl.store(a_ptr + offs, a, mask=mask)
        tl.store(h_ptr + offs, _gelu(a.to(tl.float32)).to(CDT), mask=mask)


@triton.jit
def _slot_tile_times_weight(src_ptr, w_ptr, slot_pair_ptr, filled_ptr, D, H, E, SE, C, TPE,
                            K: tl.constexpr, W_IS_W1: tl.constexpr, CDT: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's tile of slot rows of src (H wide) times W[e] on its D columns: W2[e]
    (D, H) read transposed, or W1[e] (H, D) as it is. A tile of empty slots skips the GEMM.
    Returns (fp32 accumulator, expert, valid rows, pairs, tokens, columns, valid columns)."""
    e, rows, valid, pair, token = _slot_tile(slot_pair_ptr, filled_ptr, tl.program_id(0), TPE,
                                             SE, C, E, K, BLOCK_S)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < D
    acc = tl.zeros([BLOCK_S, BLOCK_N], tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        w_e = w_ptr + e.to(tl.int64) * D * H
        src_rows = (e * SE + rows).to(tl.int64) * H
        for h0 in range(0, H, BLOCK_K):
            hs = h0 + tl.arange(0, BLOCK_K)
            h_ok = hs < H
            src = tl.load(src_ptr + src_rows[:, None] + hs[None, :],
                          mask=valid[:, None] & h_ok[None, :], other=0.0)
            if W_IS_W1:
                w_offs = hs[:, None] * D + ns[None, :]
            else:
                w_offs = ns[None, :] * H + hs[:, None]
            w = tl.load(w_e + w_offs, mask=h_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(src.to(CDT), w.to(CDT), acc, input_precision=DOT_PRECISION)
    return acc, e, valid, pair, token, ns, n_ok


@triton.jit
def _add_to_token_rows(out_ptr, values, token, pair, valid, ns, n_ok, D, R: tl.constexpr):
    """Each slot row's values into its token's output row: with R = 1 by fp32 atomics (k ≤ 2
    rows onto zero: the same sum in any order), else into the pair's own row."""
    mask = valid[:, None] & n_ok[None, :]
    if R == 1:
        tl.atomic_add(out_ptr + token[:, None] * D + ns[None, :], values, mask=mask,
                      sem="relaxed")
    else:
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * D + ns[None, :], values, mask=mask)


@triton.jit
def _expert_down_kernel(h_ptr, w2_ptr, b2_ptr, gates_ptr, slot_pair_ptr, filled_ptr, out_ptr,
                        D, H, E, SE, C, TPE, K: tl.constexpr, R: tl.constexpr,
                        CDT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[token] += gate · (h[slot] · W2[e]ᵀ + b2[e]): the combine in the epilogue."""
    acc, e, valid, pair, token, ns, n_ok = _slot_tile_times_weight(
        h_ptr, w2_ptr, slot_pair_ptr, filled_ptr, D, H, E, SE, C, TPE, K, False, CDT,
        DOT_PRECISION, BLOCK_S, BLOCK_N, BLOCK_K)
    bias = tl.load(b2_ptr + e * D + ns, mask=n_ok, other=0.0).to(CDT).to(tl.float32)
    y = (acc + bias[None, :]).to(CDT).to(tl.float32)
    gate = tl.load(gates_ptr + pair, mask=valid, other=0.0)
    _add_to_token_rows(out_ptr, y * gate[:, None], token, pair, valid, ns, n_ok, D, R)


@triton.jit
def _expert_grad_hidden_kernel(dout_ptr, w2_ptr, b2_ptr, a_ptr, h_ptr, gates_ptr, slot_pair_ptr,
                               filled_ptr, da_ptr, dgate_ptr, dx_ptr,
                               D, H, E, SE, C, TPE, NHC, WORK, DX_ROWS,
                               K: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                               BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_K: tl.constexpr, BLOCK_Z: tl.constexpr):
    """u = dout[token] · W2[e] on one H chunk: dA = gate · u · GELU'(a), and this chunk's part
    of the gate gradient <dout, y> = <u, h> (+ <dout, b2> on chunk 0). Programs past
    WORK zero the dx rows that expert_grad_x adds into."""
    pid = tl.program_id(0)
    if pid >= WORK:
        _zero_rows(dx_ptr, (pid - WORK) * BLOCK_S, DX_ROWS, D, BLOCK_S, BLOCK_Z)
    else:
        chunk = pid % NHC
        e, rows, valid, pair, token = _slot_tile(slot_pair_ptr, filled_ptr, pid // NHC, TPE, SE,
                                                 C, E, K, BLOCK_S)
        if tl.max(valid.to(tl.int32), axis=0) > 0:  # skip a tile of empty slots
            hs = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            w2 = w2_ptr + e.to(tl.int64) * D * H
            u = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
            bias_term = tl.zeros([BLOCK_S], tl.float32)
            for d0 in range(0, D, BLOCK_K):
                ks = d0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                dout = tl.load(dout_ptr + token[:, None] * D + ks[None, :],
                               mask=valid[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                b2 = tl.load(b2_ptr + e * D + ks, mask=k_ok, other=0.0).to(CDT).to(tl.float32)
                bias_term += tl.sum(dout * b2[None, :], axis=1)
                w = tl.load(w2 + ks[:, None] * H + hs[None, :], mask=k_ok[:, None] & h_ok[None, :],
                            other=0.0)
                u = tl.dot(dout.to(CDT), w.to(CDT), u, input_precision=DOT_PRECISION)
            a_offs = (e * SE + rows)[:, None].to(tl.int64) * H + hs[None, :]
            mask = valid[:, None] & h_ok[None, :]
            a = tl.load(a_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
            hidden = tl.load(h_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gates_ptr + pair, mask=valid, other=0.0)
            bias_term = tl.where(chunk == 0, bias_term, 0.0)
            tl.store(dgate_ptr + pair.to(tl.int64) * NHC + chunk,
                     tl.sum(u * hidden, axis=1) + bias_term, mask=valid)
            tl.store(da_ptr + a_offs, (gate[:, None] * u * _gelu_grad(a)).to(CDT), mask=mask)


@triton.jit
def _weight_grad(left_ptr, right_ptr, gates_ptr, slot_pair_ptr, filled_ptr, dw_ptr, db_ptr,
                 D, H, E, SE, C, K: tl.constexpr, LEFT_IS_TOKEN: tl.constexpr,
                 CDT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[e] = Σ over expert e's slots of leftᵀ · right, db[e] = Σ left, on the program's
    (left, right) tile. One side is the slot's token row (D wide, gathered; on the left scaled
    by the pair's gate), the other its own row (H wide); the slots are summed in order."""
    e = tl.program_id(0)
    L_SIZE = D if LEFT_IS_TOKEN else H
    R_SIZE = H if LEFT_IS_TOKEN else D
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    rs = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    l_ok = ls < L_SIZE
    r_ok = rs < R_SIZE
    acc = tl.zeros([BLOCK_L, BLOCK_R], tl.float32)
    bias_acc = tl.zeros([BLOCK_L], tl.float32)
    for s0 in range(0, SE, BLOCK_K):
        rows, valid, pair, token = _slot_rows(slot_pair_ptr, filled_ptr, e, s0, SE, C, E, K,
                                              BLOCK_K)
        if tl.max(valid.to(tl.int32), axis=0) > 0:  # skip a chunk of empty slots
            own = (e * SE + rows)[:, None].to(tl.int64) * H
            if LEFT_IS_TOKEN:
                gate = tl.load(gates_ptr + pair, mask=valid, other=0.0)
                left = tl.load(left_ptr + token[:, None] * D + ls[None, :],
                               mask=valid[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
                left = (left * gate[:, None]).to(CDT)
                right = tl.load(right_ptr + own + rs[None, :],
                                mask=valid[:, None] & r_ok[None, :], other=0.0)
            else:
                left = tl.load(left_ptr + own + ls[None, :], mask=valid[:, None] & l_ok[None, :],
                               other=0.0).to(CDT)
                right = tl.load(right_ptr + token[:, None] * D + rs[None, :],
                                mask=valid[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(left), right.to(CDT), acc, input_precision=DOT_PRECISION)
            bias_acc += tl.sum(left.to(tl.float32), axis=0)
    tl.store(dw_ptr + e.to(tl.int64) * D * H + ls[:, None] * R_SIZE + rs[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=l_ok[:, None] & r_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(db_ptr + e * L_SIZE + ls, bias_acc.to(db_ptr.dtype.element_ty), mask=l_ok)


@triton.jit
def _expert_grad_w2_kernel(dout_ptr, h_ptr, gates_ptr, slot_pair_ptr, filled_ptr, dw2_ptr,
                           db2_ptr, D, H, E, SE, C,
                           K: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW2[e] = Σ_slots (gate · dout[token])ᵀ h, db2[e] = Σ_slots gate · dout[token]."""
    _weight_grad(dout_ptr, h_ptr, gates_ptr, slot_pair_ptr, filled_ptr, dw2_ptr, db2_ptr,
                 D, H, E, SE, C, K, True, CDT, DOT_PRECISION, BLOCK_D, BLOCK_H, BLOCK_K)


@triton.jit
def _expert_grad_w1_kernel(x_ptr, da_ptr, slot_pair_ptr, filled_ptr, dw1_ptr, db1_ptr,
                           D, H, E, SE, C,
                           K: tl.constexpr, CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW1[e] = Σ_slots dAᵀ x[token], db1[e] = Σ_slots dA."""
    _weight_grad(da_ptr, x_ptr, da_ptr, slot_pair_ptr, filled_ptr, dw1_ptr, db1_ptr,
                 D, H, E, SE, C, K, False, CDT, DOT_PRECISION, BLOCK_H, BLOCK_D, BLOCK_K)


@triton.jit
def _expert_grad_x_kernel(da_ptr, w1_ptr, slot_pair_ptr, filled_ptr, dx_ptr, D, H, E, SE, C,
                          TPE, K: tl.constexpr, R: tl.constexpr, CDT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[token] += dA[slot] · W1[e], combined as expert_down combines."""
    acc, e, valid, pair, token, ns, n_ok = _slot_tile_times_weight(
        da_ptr, w1_ptr, slot_pair_ptr, filled_ptr, D, H, E, SE, C, TPE, K, True, CDT,
        DOT_PRECISION, BLOCK_S, BLOCK_N, BLOCK_K)
    _add_to_token_rows(dx_ptr, acc, token, pair, valid, ns, n_ok, D, R)


@triton.jit
def _route_backward_kernel(gates_ptr, topk_ptr, kept_ptr, dgate_ptr, grad_gates_ptr,
                           grad_noisy_ptr, grad_aux_ptr, grad_aux_stride, noisy_ptr, std_ptr,
                           eps_ptr, counts_ptr, dx_experts_ptr, wr_ptr, wn_ptr, dz_ptr, dx_ptr,
                           L, D, E, NBLK, NHC, aux_scale,
                           K: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr,
                           R: tl.constexpr, NOISE: tl.constexpr, AUX: tl.constexpr,
                           HAS_GRAD_GATES: tl.constexpr, HAS_GRAD_NOISY: tl.constexpr,
                           CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                           COUNT_BLOCK: tl.constexpr):
    """Gradient of the router pre-activations dz = [dlogits | dnoise_pre] (T, 2E) and the
    token's full dx = experts' part + dz · [W_r; W_n]."""
    pid = tl.program_id(0)
    b = pid // NBLK
    local = (pid % NBLK) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = local < L
    rows = b.to(tl.int64) * L + local
    experts = tl.arange(0, E_P)
    expert_ok = experts < E
    ok = row_ok[:, None] & expert_ok[None, :]
    offs = rows[:, None] * E + experts[None, :]

    # Gates: softmax over the k chosen logits; a dropped pair's gate got no gradient.
    choices = tl.arange(0, K_P)
    pair_offs = rows[:, None] * K + choices[None, :]
    pair_ok = row_ok[:, None] & (choices[None, :] < K)
    gates = tl.load(gates_ptr + pair_offs, mask=pair_ok, other=0.0)
    kept = tl.load(kept_ptr + pair_offs, mask=pair_ok, other=0) != 0
    dgate = tl.zeros([BLOCK_T, K_P], tl.float32)
    for chunk in range(0, NHC):
        dgate += tl.load(dgate_ptr + pair_offs * NHC + chunk, mask=pair_ok & kept, other=0.0)
    if HAS_GRAD_GATES:
        dgate += tl.load(grad_gates_ptr + pair_offs, mask=pair_ok, other=0.0).to(tl.float32)
    dz_top = gates * (dgate - tl.sum(gates * dgate, axis=1)[:, None])
    if HAS_GRAD_NOISY:
        dnoisy = tl.load(grad_noisy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        dnoisy = tl.zeros([BLOCK_T, E_P], tl.float32)
    for j in tl.static_range(K):
        expert = tl.load(topk_ptr + rows * K + j, mask=row_ok, other=-1)
        dz_j = tl.sum(tl.where(choices[None, :] == j, dz_top, 0.0), axis=1)
        dnoisy += tl.where(experts[None, :] == expert[:, None], dz_j[:, None], 0.0)

    if AUX > 0:  # this sample's term E/(B·L²) Σ_e count_e · Σ_t p_te
        count = tl.zeros([E_P], tl.float32)
        for start in range(0, NBLK, COUNT_BLOCK):
            blocks = start + tl.arange(0, COUNT_BLOCK)
            count += tl.sum(tl.load(counts_ptr + (b * NBLK + blocks[:, None]) * E
                                    + experts[None, :],
                                    mask=(blocks[:, None] < NBLK) & expert_ok[None, :],
                                    other=0), axis=0).to(tl.float32)
        c = aux_scale * tl.load(grad_aux_ptr + b * grad_aux_stride) * count
        if AUX == 1:
            z = tl.load(noisy_ptr + offs, mask=ok, other=0.0)
            z = tl.where(expert_ok[None, :], z, float("-inf"))
            p = tl.exp(z - tl.max(z, axis=1)[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            dnoisy += p * (c[None, :] - tl.sum(p * c[None, :], axis=1)[:, None])
        else:
            dnoisy += tl.where(row_ok[:, None], c[None, :], 0.0)

    if NOISE > 0:  # noisy = logits + eps · softplus(pre); softplus' = 1 - exp(-softplus)
        std = tl.load(std_ptr + offs, mask=ok, other=0.0)
        eps = tl.load(eps_ptr + offs, mask=ok, other=0.0)
        sigmoid = tl.where(std < 1e-4, std * (1.0 - 0.5 * std), 1.0 - tl.exp(-std))
        dpre = dnoisy * eps * sigmoid
    else:
        dpre = tl.zeros([BLOCK_T, E_P], tl.float32)
    dz_offs = rows[:, None] * (2 * E) + experts[None, :]
    tl.store(dz_ptr + dz_offs, dnoisy.to(dz_ptr.dtype.element_ty), mask=ok)
    tl.store(dz_ptr + dz_offs + E, dpre.to(dz_ptr.dtype.element_ty), mask=ok)

    # dx = experts' rows (summed in a fixed order) + dz · W, interleaved as in the forward.
    dz = tl.reshape(tl.join(dnoisy, dpre), [BLOCK_T, 2 * E_P]).to(CDT)
    cols = tl.arange(0, 2 * E_P)
    col_expert = cols // 2
    col_ok = col_expert < E
    is_gate = (cols % 2) == 0
    for n0 in range(0, D, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < D
        w_offs = col_expert[:, None] * D + ns[None, :]
        w_ok = col_ok[:, None] & n_ok[None, :]
        w = (tl.load(wr_ptr + w_offs, mask=w_ok & is_gate[:, None], other=0.0)
             + tl.load(wn_ptr + w_offs, mask=w_ok & ~is_gate[:, None], other=0.0))
        acc = tl.dot(dz, w.to(CDT), input_precision=DOT_PRECISION)
        mask = row_ok[:, None] & n_ok[None, :]
        for r in tl.static_range(R):
            acc += tl.load(dx_experts_ptr + (rows[:, None] * R + r) * D + ns[None, :], mask=mask,
                           other=0.0)
        tl.store(dx_ptr + rows[:, None] * D + ns[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=mask)
