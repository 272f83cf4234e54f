"""The fused Triton MoAE layer against the `torch` (and `loop`) backends of s4d_dist.models.moae.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before anything imports them), which computes fp32 only; bf16 runs on a GPU, and here every
kernel is compiled for sm_90 in fp32 and bf16 (test_kernels_compile_for_hopper).

The references get the router values the kernels computed (logits, noise scale, noise), so
routing — experts, kept pairs, noisy logits — must be exactly equal; outputs and gradients are
compared with the reference layer built from torch ops (router linears, softplus, the `torch`
backend, the load-balancing loss).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from s4d_dist.kernels import moae_fused, moae_triton  # noqa: E402
from s4d_dist.kernels.moae_triton import fused_moae, triton_available  # noqa: E402
from s4d_dist.models import moae  # noqa: E402
from s4d_dist.models.moae import load_balancing_loss, loop_backend, vectorised_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 3 samples of 50 tokens: two router blocks each on the interpreter's tiles (32), the second
# partial; D = 48 and H = 8 leave partial GEMM tiles.
B, L, D, H, E, K = 3, 50, 48, 8, 4, 2


def make_inputs(samples: int = B, tokens: int = L, num_experts: int = E, top_k: int = K,
                capacity_factor: float = 1.0, group: int = 0, starve_last: bool = False,
                dtype: torch.dtype = torch.float32, seed: int = 0, dim: int = D,
                hidden: int = H) -> dict:
    """fused_moae's arguments; capacity as MoAE.capacity computes it for groups of `group`."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    router = [randn(num_experts, dim, scale=0.3), randn(num_experts, scale=0.1),
              randn(num_experts, dim, scale=0.3), randn(num_experts, scale=0.1)]
    if starve_last:  # no noise overcomes this: the last expert never enters a top-k
        router[1][-1] -= 100.0
    layer = moae.MoAE(dim, num_experts, top_k, hidden, capacity_factor, capacity_group=group)
    return {"x": randn(samples * tokens, dim), "router": router,
            "experts": [randn(num_experts, hidden, dim, scale=0.3),
                        randn(num_experts, hidden, scale=0.1),
                        randn(num_experts, dim, hidden, scale=0.3),
                        randn(num_experts, dim, scale=0.1)],
            "top_k": top_k, "capacity": layer.capacity(samples, tokens), "samples": samples,
            "noise": torch.randn(samples * tokens, num_experts, generator=g).to(DEVICE)}


def leaves(inputs: dict) -> list[torch.Tensor]:
    """Fresh differentiable copies of x, the router and the experts, in that order."""
    return [t.detach().clone().requires_grad_() for t in
            (inputs["x"], *inputs["router"], *inputs["experts"])]


GRAD_NAMES = ("x", "w_r", "b_r", "w_n", "b_n", "w1", "b1", "w2", "b2")


def loss_of(result, aux: torch.Tensor | None, seed: int = 1) -> torch.Tensor:
    """Reads the output, noisy logits, gates and aux loss, so every backward path runs."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((t.float() * torch.randn(t.shape, generator=g).to(t.device)).sum()
               for t in (result.out, result.noisy_logits, result.gates))
    return loss if aux is None else loss + 3.0 * aux


def run_fused(inputs: dict, aux: str | None = "softmax", noise: str = "given"):
    """(FusedResult, aux loss, gradients of GRAD_NAMES)."""
    params = leaves(inputs)
    fused = fused_moae(params[0], params[1:5], params[5:], inputs["top_k"], inputs["capacity"],
                       inputs["samples"], noise=inputs["noise"] if noise == "given" else None,
                       draw_noise=noise == "philox", aux=aux)
    aux_loss = None if fused.aux_terms is None else fused.aux_terms.sum()
    grads = torch.autograd.grad(loss_of(fused.routing, aux_loss), params, allow_unused=True)
    return fused, aux_loss, [torch.zeros_like(p) if g is None else g
                             for p, g in zip(params, grads)]


def run_reference(inputs: dict, fused, aux: str | None, backend=vectorised_backend):
    """The same layer from torch ops: router linears and softplus, a dispatch backend, the
    load-balancing loss. Its router values are the kernels' (`fused`'s), with the gradient of
    the torch ops: routing must not hinge on how two GEMMs round a near tie."""
    params = leaves(inputs)
    x, (w_r, b_r, w_n, b_n), experts = params[0], params[1:5], params[5:]
    logits, std = F.linear(x, w_r, b_r).float(), F.softplus(F.linear(x, w_n, b_n).float())
    logits = fused.logits + (logits - logits.detach())  # the kernels' value, torch's gradient
    if fused.noise_std is not None:
        std = fused.noise_std + (std - std.detach())
    noise = fused.noise
    result = backend(x, logits, std, noise, *experts, inputs["top_k"], inputs["capacity"])
    samples = inputs["samples"]
    aux_loss = None if aux is None else load_balancing_loss(
        result.noisy_logits.view(samples, -1, w_r.shape[0]),
        result.topk_idx.view(samples, -1, inputs["top_k"]), use_softmax=aux == "softmax")
    grads = torch.autograd.grad(loss_of(result, aux_loss), params, allow_unused=True)
    return result, aux_loss, [torch.zeros_like(p) if g is None else g
                              for p, g in zip(params, grads)]


def assert_routing_equal(fused, inputs: dict) -> None:
    """Experts, kept pairs and noisy logits exactly as `torch` and `loop` route the kernels'
    router values; gates to an ulp (torch's softmax uses its own exp)."""
    args = (inputs["x"], fused.logits, fused.noise_std, fused.noise, *inputs["experts"],
            inputs["top_k"], inputs["capacity"])
    got = fused.routing
    for backend in (vectorised_backend, loop_backend):
        ref = backend(*args)
        assert torch.equal(got.noisy_logits, ref.noisy_logits), backend.__name__
        assert torch.equal(got.topk_idx, ref.topk_idx), backend.__name__
        assert torch.equal(got.kept, ref.kept), backend.__name__
        torch.testing.assert_close(got.gates, ref.gates, rtol=1e-6, atol=1e-7)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, name: str) -> None:
    """Elementwise within tol in fp32 on the CPU; on a GPU (cuBLAS against Triton) and in bf16
    within tol of the tensor's scale, since a sum rounded in another order than torch's
    differs by a share of its terms, not of itself."""
    got, want = got.float(), want.float()
    if tol < 1e-3 and DEVICE == "cpu":
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    else:
        error = (got - want).abs().max() / (1 + want.abs().max()) if got.numel() else 0.0
        assert error <= tol, f"{name}: {float(error):.3g} of its scale > {tol}"


def assert_matches_reference(inputs: dict, aux: str | None = "softmax", noise: str = "given",
                             tol: float = 1e-5):
    """Checks the fused layer against the references; returns its FusedResult."""
    fused, fused_aux, fused_grads = run_fused(inputs, aux, noise)
    assert_routing_equal(fused, inputs)
    ref, ref_aux, ref_grads = run_reference(inputs, fused, aux)
    # The router GEMM is the kernels' own: its logits agree with F.linear to rounding.
    x, (w_r, b_r, w_n, b_n) = inputs["x"], inputs["router"]
    assert_close(fused.logits, F.linear(x, w_r, b_r), tol, "logits")
    if fused.noise_std is not None:
        assert_close(fused.noise_std, F.softplus(F.linear(x, w_n, b_n).float()), tol,
                     "noise_std")
    assert_close(fused.routing.out, ref.out, tol, "out")
    if aux is not None:
        assert_close(fused_aux, ref_aux, tol, "aux")
    for name, got, want in zip(GRAD_NAMES, fused_grads, ref_grads):
        assert_close(got, want, tol, f"grad of {name}")
    return fused


CASES = {  # name: make_inputs keyword arguments
    "default": {},
    "heavy_drops": {"capacity_factor": 0.25},
    "top1": {"top_k": 1},
    "single_expert": {"num_experts": 1, "top_k": 1},
    "expert_without_tokens": {"starve_last": True},
    "k3_of_5_experts": {"num_experts": 5, "top_k": 3},  # neither a power of two; a row per pair
    "zero_capacity": {"capacity_factor": 0.01},
    "groups_of_2_of_5_samples": {"samples": 5, "group": 2, "capacity_factor": 0.5},
}


def test_triton_runs_here():
    available, reason = triton_available()
    assert available, reason


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    routing = assert_matches_reference(make_inputs(**CASES[case])).routing
    if case == "heavy_drops":
        assert 0 < routing.kept.sum() < 0.5 * routing.kept.numel()
    if case == "zero_capacity":
        assert not routing.kept.any()
    if case == "expert_without_tokens":
        assert not (routing.topk_idx == E - 1).any()


@pytest.mark.parametrize("aux", ["logits", None])
def test_official_aux_on_raw_logits_and_no_aux(aux):
    assert_matches_reference(make_inputs(capacity_factor=0.5), aux=aux)


def test_without_noise():
    """Evaluation in the correct mode: no noise, so the noisy logits are the logits."""
    inputs = make_inputs(capacity_factor=0.5)
    fused, *_ = run_fused(inputs, noise="none")
    assert fused.noise is None and fused.noise_std is None
    assert torch.equal(fused.routing.noisy_logits, fused.logits)
    assert_matches_reference(inputs, noise="none")


def test_philox_noise_is_seeded_by_torch_and_routes_like_the_reference():
    """Drawn in the kernel from a seed that torch's generator gives: the same torch seed gives
    the same noise (a resumed run, a replayed graph), the next draw another; standard normal."""
    inputs = make_inputs(samples=4, tokens=64, capacity_factor=0.5)
    torch.manual_seed(7)
    first = assert_matches_reference(inputs, noise="philox")
    second = run_fused(inputs, noise="philox")[0]
    torch.manual_seed(7)
    again = run_fused(inputs, noise="philox")[0]
    assert torch.equal(first.noise, again.noise) and torch.equal(first.routing.out,
                                                                 again.routing.out)
    assert not torch.equal(first.noise, second.noise)
    draws = torch.cat([first.noise, second.noise]).flatten()
    assert abs(draws.mean()) < 0.1 and abs(draws.std() - 1) < 0.1


def test_bitwise_reproducible():
    inputs = make_inputs(capacity_factor=0.5)
    first, first_aux, first_grads = run_fused(inputs)
    second, second_aux, second_grads = run_fused(inputs)
    for a, b in zip(first.routing, second.routing):
        assert torch.equal(a, b)
    assert torch.equal(first_aux, second_aux)
    for name, a, b in zip(GRAD_NAMES, first_grads, second_grads):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("samples, group, tokens", [(64, 16, 5), (7, 2, L)])
def test_micro_batch_drops_what_its_official_batches_would(samples, group, tokens):
    """Capacity per group: the kept pairs and outputs of a forward of 64 samples in groups of
    16 equal those of four forwards of 16; of 7 in groups of 2, those of 2, 2, 2 and 1."""
    inputs = make_inputs(samples=samples, tokens=tokens, group=group, capacity_factor=0.5,
                         dim=16)
    whole = run_fused(inputs, aux=None)[0].routing
    layer = moae.MoAE(16, E, K, H, 0.5)
    kept, outs = [], []
    for start in range(0, samples, group):
        n = min(group, samples - start)
        rows = slice(start * tokens, (start + n) * tokens)
        part = dict(inputs, x=inputs["x"][rows], noise=inputs["noise"][rows], samples=n,
                    capacity=layer.capacity(n, tokens))
        routing = run_fused(part, aux=None)[0].routing
        kept.append(routing.kept)
        outs.append(routing.out)
    assert torch.equal(whole.kept, torch.cat(kept))
    assert torch.equal(whole.out, torch.cat(outs))
    assert 0 < whole.kept.sum() < whole.kept.numel()


@pytest.mark.parametrize("official", [False, True])
def test_moae_layer_on_triton_equals_torch(official):
    """The module as training runs it (train mode, given noise, aux loss, statistics) on both
    backends; with the official behaviours too (aux loss on raw logits, §3.2)."""
    torch.manual_seed(0)
    reference = moae.MoAE(D, E, K, H, capacity_factor=0.5, backend="torch",
                          router_noise_at_eval=official, aux_loss_on_logits=official,
                          stale_aux_loss=official).to(DEVICE).train()
    kernels = copy.deepcopy(reference)
    kernels.backend = "triton"
    h = torch.randn(B, L, D, device=DEVICE)
    noise = torch.randn(B, L, E, device=DEVICE)
    grad_out = torch.randn(B, L, D, device=DEVICE)
    outs, grads, aux = [], [], []
    for m in (reference, kernels):
        hh = h.clone().requires_grad_()
        out = m(hh, noise)
        (out * grad_out).sum().add(m.aux_loss).backward()
        outs.append(out)
        aux.append(m.aux_loss)
        grads.append([hh.grad] + [p.grad for p in m.parameters()])
    assert_close(aux[1], aux[0], 1e-5, "aux loss")
    assert torch.equal(kernels.stats["tokens_per_expert"], reference.stats["tokens_per_expert"])
    assert kernels.stats["drop_fraction"] == reference.stats["drop_fraction"] > 0
    assert_close(outs[1], outs[0], 1e-5, "out")
    names = ["h"] + [n for n, _ in reference.named_parameters()]
    for name, ref, got in zip(names, *grads):
        assert_close(got, ref, 1e-5, f"grad of {name}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's limitation")
def test_interpreter_refuses_bf16():
    inputs = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="fp32"):
        run_fused(inputs)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 arithmetic is only right on a GPU (wrong in the interpreter)")
def test_bf16_matches_reference_on_gpu():
    """bf16 end to end (a DeepSpeed bf16 model); routing equal given the kernels' router
    values, numbers to bf16 precision of their scale."""
    inputs = make_inputs(capacity_factor=0.5, dtype=torch.bfloat16, dim=256, hidden=64)
    assert_matches_reference(inputs, tol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast of a GPU")
def test_autocast_matches_reference_on_gpu():
    """fp32 weights and tokens under bf16 autocast (DDP with autocast): GEMMs in bf16, routing
    and outputs fp32, gradients of the fp32 weights in fp32."""
    inputs = make_inputs(capacity_factor=0.5, dim=256, hidden=64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused, _, grads = run_fused(inputs)
        ref, _, ref_grads = run_reference(inputs, fused, "softmax")
    assert fused.routing.out.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)
    assert_close(fused.routing.out, ref.out, 2e-2, "out")
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(got, want, 2e-2, f"grad of {name}")


# Compiles recorded launches [name, signature, constexprs, options] (JSON on stdin) for sm_90,
# in a fresh interpreter-free process (the interpreter leaves triton.language patched), and
# prints each kernel's spills from ptxas's report.
COMPILE_FOR_HOPPER = r"""
import contextlib, io, json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from s4d_dist.kernels import moae_fused
for name, signature, constexprs, options, divisible in json.load(sys.stdin):
    kernel = getattr(moae_fused, name)
    constexprs = {k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v
                  for k, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas's report (TRITON_DUMP_PTXAS_LOG=1)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())]
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log.getvalue())]
    print(json.dumps({"kernel": name, "cubin": bool(compiled.asm["cubin"]), "spills": spills,
                      "registers": registers, "constexprs": {k: str(v) for k, v in
                                                            constexprs.items()}}), flush=True)
"""


def record_launches(monkeypatch, calls) -> list:
    """Every kernel launch of `calls()` as [name, signature, constexprs, options, divisible
    argument indices], recorded without running: kernels see the GPU's tiles and dtypes, and no
    value is read back on the host, so nothing needs the (unrun) results."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, mangle_type

    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        params = JITFunction(self.fn).params
        values = dict(zip([p.name for p in params], args)) | kwargs
        signature = {p.name: "constexpr" if p.is_constexpr else mangle_type(values[p.name])
                     for p in params}
        constexprs = {p.name: {"dtype": values[p.name].name}
                      if isinstance(values[p.name], tl.dtype) else values[p.name]
                      for p in params if p.is_constexpr}
        options = {k: v for k, v in values.items() if k not in signature}
        # What the runtime specialises: 16-byte aligned pointers (every buffer here is) and
        # integers divisible by 16.
        divisible = [i for i, p in enumerate(params) if not p.is_constexpr and (
            isinstance(values[p.name], torch.Tensor) or
            (isinstance(values[p.name], int) and values[p.name] % 16 == 0))]
        launch = [self.fn.__name__, signature, constexprs, options, divisible]
        launches[json.dumps(launch, sort_keys=True)] = launch

    monkeypatch.setattr(InterpretedFunction, "run", record)
    monkeypatch.setattr(moae_fused, "INTERPRETED", False)  # the GPU's tiles, bf16 allowed
    calls()
    monkeypatch.undo()
    return list(launches.values())


def compile_for_hopper(launches: list, cache) -> list[dict]:
    """Each recorded launch compiled for sm_90 in a subprocess: ptxas's reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": str(cache)}  # ptxas runs
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, text=True,
                          input=json.dumps(launches), capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(reports) == len(launches) and all(r["cubin"] for r in reports)
    return reports


def assert_no_spills(reports: list[dict]) -> None:
    spilling = [r for r in reports if len(r["spills"]) != 2 or any(r["spills"])]
    assert not spilling, [(r["kernel"], r["spills"], r["registers"], r["constexprs"])
                          for r in spilling]


def vit_b_layer(dtype: torch.dtype, top_k: int, noise: str, aux: str | None,
                autocast: bool = False) -> None:
    """Forward + backward of a ViT-B-sized layer (D 768, H 192, E 8), 2 clips of 800 tokens."""
    inputs = make_inputs(samples=2, tokens=800, num_experts=8, top_k=top_k, dim=768,
                         hidden=192, dtype=dtype, group=16)
    params = leaves(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = fused_moae(params[0], params[1:5], params[5:], top_k, inputs["capacity"], 2,
                           noise=inputs["noise"] if noise == "given" else None,
                           draw_noise=noise == "philox", aux=aux)
    outputs = [fused.routing.out] + ([] if aux is None else [fused.aux_terms.sum()])
    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with a GPU the tests above run the compiled kernels themselves")
def test_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """The interpreter runs code that the compiler rejects. Every kernel of a forward + backward
    at the ViT-B layer's sizes, with the GPU's tiles, compiled for sm_90 down to a cubin with
    no register spills (ptxas's report): a bf16 model (DeepSpeed bf16) with Philox noise and
    the aux loss, fp32 weights under bf16 autocast with given noise and the official aux, and
    fp32 with k = 3 (one output row per pair) without noise (evaluation)."""
    def calls():
        vit_b_layer(torch.bfloat16, 2, "philox", "softmax")
        vit_b_layer(torch.float32, 2, "given", "logits", autocast=True)
        vit_b_layer(torch.float32, 3, "none", None)

    launches = record_launches(monkeypatch, calls)
    kernels = {name for name, *_ in launches}
    assert kernels == {name for name in dir(moae_fused) if name.endswith("_kernel")}
    assert {c["CDT"]["dtype"] for _, _, c, *_ in launches if "CDT" in c} == {"fp32", "bf16"}
    assert_no_spills(compile_for_hopper(launches, tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU kit builds them there")
def test_tile_candidates_compile_for_hopper(monkeypatch, tmp_path):
    """Every tile table the GPU kit tries (GPU_TILE_CANDIDATES) builds for sm_90 without
    spills, for the bf16 model, so that trying one on a GPU never meets a kernel that fails."""
    default = moae_triton.GPU_TILES
    launches = {}
    for changes in moae_triton.GPU_TILE_CANDIDATES.values():
        table = {kernel: default[kernel] | changes.get(kernel, {}) for kernel in default}
        monkeypatch.setattr(moae_triton, "GPU_TILES", table)
        for launch in record_launches(monkeypatch, lambda: vit_b_layer(torch.bfloat16, 2,
                                                                        "philox", "softmax")):
            launches[json.dumps(launch, sort_keys=True)] = launch
    monkeypatch.setattr(moae_triton, "GPU_TILES", default)
    for launch in record_launches(monkeypatch, lambda: vit_b_layer(torch.bfloat16, 2, "philox",
                                                                   "softmax")):
        launches.pop(json.dumps(launch, sort_keys=True), None)  # compiled by the test above
    assert_no_spills(compile_for_hopper(list(launches.values()), tmp_path))


def test_launches_per_layer():
    """A training forward is 4 kernel launches and backward 5, whatever the sizes."""
    inputs = make_inputs()
    launches = []
    launcher = type(moae_fused._route_kernel)  # the interpreter's, or the compiled JITFunction
    run = launcher.run

    def count(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "run", count)
        run_fused(inputs, noise="philox")
    assert launches == ["_route_kernel", "_queue_kernel", "_expert_up_kernel",
                        "_expert_down_kernel", "_expert_grad_hidden_kernel",
                        "_expert_grad_w2_kernel", "_expert_grad_w1_kernel",
                        "_expert_grad_x_kernel", "_route_backward_kernel"]


def test_get_backend_loads_the_fused_layer():
    moae.load_triton_backend.cache_clear()  # a cached fallback from another test must not leak
    try:
        assert moae.load_triton_backend()[0] is moae_triton.fused_moae
        assert moae.resolve_backend("triton", torch.device(DEVICE)) == "triton"
    finally:
        moae.load_triton_backend.cache_clear()
