"""Triton MoAE kernels against the `loop` reference backend of s4d_dist.models.moae.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before anything imports them). With a GPU the same tests run the compiled kernels on it.

The interpreter computes bf16 arithmetic wrongly and truncates fp32→bf16 casts (docs/design.md,
"Stack behaviour on CPU"), so on CPU the numerics are checked in fp32 and bf16 only where the
kernels move bf16 values without rounding them; the full bf16 comparison runs on a GPU only.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from s4d_dist.kernels import moae_routing  # noqa: E402
from s4d_dist.kernels.moae_triton import triton_available, triton_backend  # noqa: E402
from s4d_dist.models import moae  # noqa: E402
from s4d_dist.models.moae import loop_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 150 tokens: three router blocks of 64, the last one partial; D = 48: two column blocks of
# the interpreter's tile, the last one partial.
T, D, H, E, K = 150, 48, 8, 4, 2


def make_inputs(num_tokens: int = T, num_experts: int = E, top_k: int = K,
                capacity_factor: float = 1.0, noise: bool = True, starve_last: bool = False,
                dtype: torch.dtype = torch.float32, seed: int = 0, dim: int = D) -> tuple:
    """Backend arguments as MoAE.forward passes them (capacity as it computes it)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    logits = randn(num_tokens, num_experts)
    if starve_last:  # no noise overcomes this: the last expert never enters a top-k
        logits[:, -1] -= 100.0
    noise_std = torch.nn.functional.softplus(randn(num_tokens, num_experts))
    capacity = int(num_tokens * top_k / num_experts * capacity_factor)
    return (randn(num_tokens, dim), logits, noise_std,
            randn(num_tokens, num_experts) if noise else None,
            randn(num_experts, H, dim, scale=0.3), randn(num_experts, H, scale=0.1),
            randn(num_experts, dim, H, scale=0.3), randn(num_experts, dim, scale=0.1),
            top_k, capacity)


DIFFERENTIABLE = {"x": 0, "logits": 1, "noise_std": 2, "w1": 4, "b1": 5, "w2": 6, "b2": 7}


def run_with_grads(backend, args: tuple, seed: int = 1):
    """Result, then the gradient of every differentiable input (zeros where none flowed).

    The loss reads out, noisy logits (as the load-balancing loss does) and gates, so every
    backward path of the backend is exercised.
    """
    args = list(args)
    for i in DIFFERENTIABLE.values():
        args[i] = args[i].detach().clone().requires_grad_()
    result = backend(*args)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t.float() * torch.randn(t.shape, generator=g).to(t.device)).sum()
               for t in (result.out, result.noisy_logits, result.gates))
    loss.backward()
    grads = {name: torch.zeros_like(args[i]) if args[i].grad is None else args[i].grad
             for name, i in DIFFERENTIABLE.items()}
    return result, grads


def assert_matches_loop(args: tuple, out_tol: float = 1e-5, grad_tol: float = 1e-5,
                        gate_tol: float = 1e-6) -> None:
    ref, ref_grads = run_with_grads(loop_backend, args)
    got, got_grads = run_with_grads(triton_backend, args)
    assert torch.equal(got.noisy_logits, ref.noisy_logits)
    assert torch.equal(got.topk_idx, ref.topk_idx)
    assert torch.equal(got.kept, ref.kept)
    # Gates agree to an ulp, not bitwise: torch's softmax uses its own vectorised exp.
    torch.testing.assert_close(got.gates, ref.gates, rtol=gate_tol, atol=gate_tol / 10)
    torch.testing.assert_close(got.out, ref.out, rtol=out_tol, atol=out_tol)
    for name in DIFFERENTIABLE:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=grad_tol,
                                   atol=grad_tol, msg=lambda m: f"grad of {name}: {m}")  # noqa: B023


CASES = {  # name: make_inputs keyword arguments
    "default": {},
    "heavy_drops": {"capacity_factor": 0.25},
    "top1": {"top_k": 1},
    "single_expert": {"num_experts": 1, "top_k": 1},
    "expert_without_tokens": {"starve_last": True},
    "no_noise": {"noise": False},
    "k3_of_5_experts": {"num_experts": 5, "top_k": 3},  # neither a power of two
    "zero_capacity": {"capacity_factor": 0.01},
}


def test_triton_runs_here():
    available, reason = triton_available()
    assert available, reason


@pytest.mark.parametrize("case", CASES)
def test_matches_loop_reference(case):
    args = make_inputs(**CASES[case])
    assert_matches_loop(args)
    kept = loop_backend(*args).kept
    if case == "heavy_drops":
        assert 0 < kept.sum() < 0.5 * kept.numel()
    if case == "zero_capacity":
        assert not kept.any()
    if case == "expert_without_tokens":
        assert not (loop_backend(*args).topk_idx == E - 1).any()


def test_queue_sums_earlier_blocks_in_several_steps(monkeypatch):
    """A queue program adds up the counts of the router blocks before its own COUNT_BLOCK at a
    time; with 2 per step, 6 blocks take up to 3 steps. Routing only: no expert math."""
    monkeypatch.setattr(moae_routing, "COUNT_BLOCK", 2)
    num_tokens = moae_routing.ROUTE_BLOCK_T * 5 + 5
    args = make_inputs(num_tokens, capacity_factor=0.9)
    _, logits, noise_std, noise, *_, top_k, capacity = args
    noisy, topk_idx, _, block_counts = moae_routing.route(logits, noise_std, noise, top_k)
    assert block_counts.shape[0] == 6
    slots = min(capacity, num_tokens)
    pair_slot, slot_pair, kept = moae_routing.queue(topk_idx, block_counts, capacity, slots)

    ref = loop_backend(*args)
    assert torch.equal(noisy, ref.noisy_logits) and torch.equal(topk_idx, ref.topk_idx)
    assert torch.equal(kept, ref.kept)
    assert 0 < (~kept).sum()  # the last tokens overflow somewhere
    # The layout: an expert's kept pairs fill its rows 0, 1, ... in flat token order.
    chosen = torch.zeros_like(noisy, dtype=torch.long).scatter_(1, topk_idx, 1)
    position = (chosen.cumsum(dim=0) - 1).gather(1, topk_idx)
    expected_slot = torch.where(kept, topk_idx * slots + position, -1)
    assert torch.equal(pair_slot.long(), expected_slot)
    pairs = torch.arange(num_tokens * top_k, device=DEVICE)
    assert torch.equal(slot_pair[expected_slot[kept]].long(), pairs[kept.flatten()])
    assert (slot_pair >= 0).sum() == kept.sum()  # every other slot is marked empty


def test_bitwise_reproducible():
    args = make_inputs(capacity_factor=0.5)
    first, first_grads = run_with_grads(triton_backend, args)
    second, second_grads = run_with_grads(triton_backend, args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for name in DIFFERENTIABLE:
        assert torch.equal(first_grads[name], second_grads[name]), name


ALL_TILES = sorted({*moae_routing.GPU_GATHER_TILES, moae_routing.INTERPRETER_GATHER_TILE,
                    moae_routing.GATE_GRAD_TILE})


def gather_results(args: tuple, tile) -> dict[str, torch.Tensor]:
    """Every gather kernel's outputs on one (BLOCK_ROWS, BLOCK_D, num_warps) tile."""
    x, logits, noise_std, noise, w1, b1, w2, b2, top_k, capacity = args
    num_experts = w1.shape[0]
    _, topk_idx, gates, block_counts = moae_routing.route(logits, noise_std, noise, top_k)
    slots = min(capacity, x.shape[0])
    pair_slot, slot_pair, _ = moae_routing.queue(topk_idx, block_counts, capacity, slots)
    layout = moae_routing.dispatch(x, slot_pair, top_k, num_experts, slots, tile=tile)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(x.shape, generator=g).to(x.device)
    grad_expert, grad_gates = moae_routing.combine_backward(grad_out, layout, gates, slot_pair,
                                                            tile=tile)
    return {"dispatch": layout,
            "combine": moae_routing.combine(layout, pair_slot, gates, x.dtype, tile=tile),
            "dispatch_backward": moae_routing.combine(layout, pair_slot, None, x.dtype,
                                                      tile=tile),
            "combine_backward": grad_expert, "gate_grad": grad_gates}


def test_every_autotune_tile_gives_the_same_result():
    """The autotuner may pick any GPU tile, in any process: the gathers must not depend on it.
    Copies and the fixed-order k-sum are bitwise equal on every tile; the gate gradient's sum
    over D is reordered by BLOCK_D, so it is only close across tiles, and production runs it
    on GATE_GRAD_TILE alone (bitwise equal to itself, checked by test_bitwise_reproducible).
    D = 300 spans 2-19 column blocks of the tiles, the last one partial."""
    args = make_inputs(num_tokens=200, capacity_factor=0.75, dim=300)
    reference = gather_results(args, moae_routing.GATE_GRAD_TILE)
    for tile in ALL_TILES:
        got = gather_results(args, tile)
        for name in ("dispatch", "combine", "dispatch_backward", "combine_backward"):
            assert torch.equal(got[name], reference[name]), (tile, name)
        torch.testing.assert_close(got["gate_grad"], reference["gate_grad"], rtol=1e-5,
                                   atol=1e-5)


def test_bf16_tokens_move_through_dispatch_and_combine_unrounded():
    """bf16 loads and stores (what the interpreter gets right): dispatch copies bf16 rows into
    their slots bit for bit, and combining them back with unit weights restores the tokens."""
    x, logits, noise_std, noise, *_, top_k, capacity = make_inputs(capacity_factor=0.5)
    x = x.bfloat16()
    _, topk_idx, _, block_counts = moae_routing.route(logits, noise_std, noise, top_k)
    slots = min(capacity, T)
    pair_slot, slot_pair, kept = moae_routing.queue(topk_idx, block_counts, capacity, slots)
    layout = moae_routing.dispatch(x, slot_pair, top_k, E, slots)
    assert layout.dtype == torch.bfloat16 and layout.shape == (E, slots, D)

    flat = layout.view(-1, D)
    filled = slot_pair >= 0
    assert torch.equal(flat[filled], x[slot_pair[filled].long() // top_k])
    assert not flat[~filled].any()
    one_kept = kept.sum(dim=1) == 1  # a unit-weight sum of one row is that row, exactly
    back = moae_routing.combine(layout, pair_slot, None, torch.bfloat16)
    assert torch.equal(back[one_kept], x[one_kept])
    assert not back[~kept.any(dim=1)].any()


def test_moae_under_autocast_matches_loop():
    """The layer as training runs it under bf16 autocast: router logits and expert GEMMs in
    bf16, routing in fp32 (the noise is fp32). The kernels load those bf16 values exactly and
    store fp32 forward; backward stores the expert-output gradient in bf16, which the
    interpreter truncates instead of rounding, hence the bf16 tolerance."""
    torch.manual_seed(0)
    reference = moae.MoAE(D, E, K, H, capacity_factor=0.5, backend="loop").to(DEVICE).train()
    kernels = copy.deepcopy(reference)
    kernels.backend = "triton"
    h = torch.randn(3, 50, D, device=DEVICE)
    noise = torch.randn(3, 50, E, device=DEVICE)
    grad_out = torch.randn(3, 50, D, device=DEVICE)
    outs, grads = [], []
    for m in (reference, kernels):
        hh = h.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = m(hh, noise)
        (out * grad_out).sum().add(m.aux_loss).backward()
        outs.append(out)
        grads.append([hh.grad] + [p.grad for p in m.parameters()])
    assert torch.equal(kernels.stats["tokens_per_expert"], reference.stats["tokens_per_expert"])
    assert kernels.stats["drop_fraction"] == reference.stats["drop_fraction"] > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-2)
    names = ["h"] + [n for n, _ in reference.named_parameters()]
    for name, ref, got in zip(names, *grads):
        torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 arithmetic is only right on a GPU (wrong in the interpreter)")
def test_bf16_matches_loop_reference_on_gpu():
    """bf16 end to end. Ties between bf16 logits are common and torch.topk breaks them its own
    way, so here the logits are distinct by construction and the noise scale is zero: the noisy
    logits equal the logits, and the noise still enters noise_std's gradient. The output is held
    to 5e-2, as the gradients: `loop` rounds each expert's gated output to bf16 before summing
    them, the kernels sum in fp32 and round once; on an H200 one element in 7,200 differed by
    0.035 (5% relative), benchmarks/results/gpu_nvidia_h200.json."""
    args = list(make_inputs(capacity_factor=0.5, dtype=torch.bfloat16))
    order = torch.rand(T, E).argsort(dim=1)  # each token ranks the experts at random
    logits = order * 0.25 + torch.randint(0, 16, (T, 1)) / 64  # exact in bf16
    args[1] = logits.to(DEVICE, torch.bfloat16)
    args[2] = torch.zeros_like(args[2])
    assert_matches_loop(tuple(args), out_tol=5e-2, grad_tol=5e-2, gate_tol=1e-2)


# Compiles recorded launches {name, signature, constexprs, options} (JSON on stdin) for sm_90,
# in a fresh interpreter-free process: the interpreter leaves triton.language patched after a
# run, which breaks compiling in the process that ran it.
COMPILE_FOR_HOPPER = """
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from s4d_dist.kernels import moae_routing
for name, signature, constexprs, options in json.load(sys.stdin):
    kernel = getattr(moae_routing, name)
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    constexprs = {k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v
                  for k, v in constexprs.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], name
    print("compiled", name)
"""


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with a GPU the tests above run the compiled kernels themselves")
def test_kernels_compile_for_hopper(monkeypatch):
    """The interpreter runs code that the compiler rejects. Record every kernel launch of a bf16
    forward + backward (the dtype trained in on GPUs) and compile each for sm_90 down to a
    cubin: no GPU needed, only the ptxas that ships with triton."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, mangle_type

    rows, cols, warps = max(moae_routing.GPU_GATHER_TILES, key=lambda tile: tile[0] * tile[1])
    launches = {}
    interpret = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        params = JITFunction(self.fn).params
        values = dict(zip([p.name for p in params], args)) | kwargs
        if "BLOCK_ROWS" in values:  # autotuned: compile the GPU's largest tile instead
            values |= {"BLOCK_ROWS": rows, "BLOCK_D": cols, "num_warps": warps}
        signature = {p.name: "constexpr" if p.is_constexpr else mangle_type(values[p.name])
                     for p in params}
        constexprs = {p.name: {"dtype": str(values[p.name])}
                      if isinstance(values[p.name], tl.dtype) else values[p.name]
                      for p in params if p.is_constexpr}
        options = {k: v for k, v in values.items() if k not in signature}
        launch = [self.fn.__name__, signature, constexprs, options]
        launches[json.dumps(launch, sort_keys=True)] = launch
        return interpret(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    run_with_grads(triton_backend, make_inputs(num_tokens=20, dtype=torch.bfloat16))
    monkeypatch.undo()
    assert {name for name, *_ in launches.values()} == {
        "_router_kernel", "_queue_kernel", "_dispatch_kernel", "_combine_kernel",
        "_router_backward_kernel"}

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, text=True,
                          input=json.dumps(list(launches.values())), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == len(launches)


def test_get_backend_returns_triton_when_available():
    moae.load_triton_backend.cache_clear()  # a cached fallback from another test must not leak
    try:
        assert moae.get_backend("triton") is triton_backend
    finally:
        moae.load_triton_backend.cache_clear()
