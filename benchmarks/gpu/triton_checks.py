"""Section B of the GPU run: the Triton MoAE kernels compiled, held to the `loop` reference.

1. tests/test_kernels_moae.py compiled (no TRITON_INTERPRET): the interpreter suite on the GPU.
2. Stress: token counts {1, 63, 64, 65, 4097, 12800, 19200} (router blocks of 64: empty, partial,
   exact, one over; the ViT-B image and video batches), k in {1, 2}, capacity factor
   {0.5, 1, 5}, fp32 and bf16 — experts and kept pairs exactly equal to `loop`; output and
   gradients within 1e-5 (fp32) / 2e-2 (bf16) of the `torch` backend (same GEMMs); the error
   against `loop` (other GEMMs) reported.
3. Every autotune tile of the gather kernels at the ViT-B video shape, against the fixed tile.
4. compute-sanitizer memcheck over a small forward + backward.
The inputs are tests/test_kernels_moae.py's (make_inputs, run_with_grads, gather_results)
so that this file and the test suite cannot drift apart.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

TOKENS = (1, 63, 64, 65, 4097, 12800, 19200)
SMOKE_TOKENS = (1, 63, 64, 65, 130)
# The kernels' own error (against the `torch` backend's identical GEMMs), as the issue sets it.
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def compiled_test_suite(ctx) -> dict:
    """tests/test_kernels_moae.py without the interpreter (run from the scratch folder, see
    Context.run)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(REPO / "tests" / "test_kernels_moae.py")]
    result = subprocess.run(cmd, cwd=ctx.scratch, env=env, capture_output=True, text=True,
                            timeout=300)
    (ctx.out / "triton_tests.log").write_text(result.stdout + result.stderr)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return {"ok": result.returncode == 0, "summary": summary}


def distinct_bf16_logits(num_tokens: int, num_experts: int) -> torch.Tensor:
    """Logits with no ties in bf16 (each token ranks the experts at random, steps of 1/4): torch
    and the kernels break ties differently, which is not an error."""
    order = torch.rand(num_tokens, num_experts).argsort(dim=1)
    return order * 0.25 + torch.randint(0, 16, (num_tokens, 1)) / 64


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + |b|): absolute for small values, relative for large ones."""
    a, b = a.float(), b.float()
    return ((a - b).abs() / (1 + b.abs())).max().item() if a.numel() else 0.0


def worst(result, grads, ref, ref_grads) -> float:
    """The largest error over the output and every input gradient."""
    return max([error(result.out, ref.out)] +
               [error(grads[name], ref_grads[name]) for name in grads])


def stress(ctx) -> dict:
    """Routing (experts, kept pairs) must equal the loop reference exactly. The numbers are held
    to the `torch` backend, which runs the same expert GEMMs on the same padded layout, so the
    difference is the kernels' own; against `loop` (per-expert GEMMs, bf16 rounding of each
    expert's gated output before the sum) the GEMM order differs too, and the error is reported."""
    import test_kernels_moae as kt
    from s4d_dist.kernels.moae_triton import triton_backend
    from s4d_dist.models.moae import loop_backend, vectorised_backend

    dtypes = [torch.float32] if ctx.smoke else [torch.float32, torch.bfloat16]
    dim = 64 if ctx.smoke else 768
    failures, cases = [], 0
    largest: dict = {}
    for dtype in dtypes:
        tol = KERNEL_TOLERANCE[dtype]
        for tokens in SMOKE_TOKENS if ctx.smoke else TOKENS:
            for top_k in (1, 2):
                for factor in (0.5, 1.0, 5.0):
                    args = list(kt.make_inputs(tokens, num_experts=8, top_k=top_k,
                                               capacity_factor=factor, dtype=dtype, dim=dim))
                    if dtype == torch.bfloat16:  # as test_bf16_matches_loop_reference_on_gpu
                        args[1] = distinct_bf16_logits(tokens, 8).to(kt.DEVICE, dtype)
                        args[2] = torch.zeros_like(args[2])
                    cases += 1
                    runs = {name: kt.run_with_grads(backend, tuple(args)) for name, backend in
                            (("loop", loop_backend), ("torch", vectorised_backend),
                             ("triton", triton_backend))}
                    (ref, _), (got, got_grads) = runs["loop"], runs["triton"]
                    routing = (torch.equal(got.topk_idx, ref.topk_idx)
                               and torch.equal(got.kept, ref.kept))
                    vs_torch = worst(got, got_grads, *runs["torch"])
                    vs_loop = worst(got, got_grads, *runs["loop"])
                    key = str(dtype).removeprefix("torch.")
                    entry = largest.setdefault(key, {"vs_torch": 0.0, "vs_loop": 0.0})
                    entry["vs_torch"] = max(entry["vs_torch"], vs_torch)
                    entry["vs_loop"] = max(entry["vs_loop"], vs_loop)
                    if not routing or vs_torch > tol:
                        failures.append({"tokens": tokens, "k": top_k, "capacity_factor": factor,
                                         "dtype": key, "routing_equal": routing,
                                         "error_vs_torch": vs_torch, "error_vs_loop": vs_loop})
    return {"ok": not failures, "cases": cases, "failures": failures[:40],
            "largest_error": largest,
            "tolerance_vs_torch": {str(k).removeprefix("torch."): v
                                   for k, v in KERNEL_TOLERANCE.items()},
            "error": "max |a-b| / (1+|b|) over the output and every input gradient"}


def every_tile(ctx) -> dict:
    import test_kernels_moae as kt
    from s4d_dist.kernels import moae_routing

    tokens, dim = (130, 300) if ctx.smoke else (12800, 768)
    args = kt.make_inputs(tokens, num_experts=8, top_k=2, capacity_factor=1.0, dim=dim)
    reference = kt.gather_results(args, moae_routing.GATE_GRAD_TILE)
    tiles = kt.ALL_TILES
    mismatches = []
    max_gate_grad_diff = 0.0
    for tile in tiles:
        got = kt.gather_results(args, tile)
        for name in ("dispatch", "combine", "dispatch_backward", "combine_backward"):
            if not torch.equal(got[name], reference[name]):
                mismatches.append(f"{name} on tile {tile}")
        diff = (got["gate_grad"] - reference["gate_grad"]).abs().max().item()
        max_gate_grad_diff = max(max_gate_grad_diff, diff)
    repeat = kt.gather_results(args, moae_routing.GATE_GRAD_TILE)
    reproducible = all(torch.equal(repeat[k], reference[k]) for k in reference)
    return {"ok": not mismatches and reproducible and max_gate_grad_diff < 1e-3,
            "tiles": [list(t) for t in tiles], "bitwise_mismatches": mismatches,
            "gate_grad_max_diff_across_tiles": max_gate_grad_diff,
            "fixed_tile_bitwise_reproducible": reproducible}


def sanitize_case() -> int:
    """A small forward + backward of the triton backend (run under compute-sanitizer)."""
    import test_kernels_moae as kt
    from s4d_dist.kernels.moae_triton import triton_backend

    for top_k, factor in ((2, 0.5), (1, 5.0)):
        args = kt.make_inputs(150, num_experts=8, top_k=top_k, capacity_factor=factor, dim=96)
        kt.run_with_grads(triton_backend, args)
    torch.cuda.synchronize()
    print("sanitize case done")
    return 0


def memcheck(ctx) -> dict:
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if ctx.smoke or not Path(tool).exists():
        return {"ok": True, "skipped": "no compute-sanitizer (CPU smoke run)" if ctx.smoke
                else "compute-sanitizer not found"}
    check = str(Path(__file__).parent / "check.py")
    sanitize_case()  # compile outside the sanitizer: its run then loads the cached kernels
    result = ctx.run([tool, "--tool", "memcheck", "--error-exitcode", "9", sys.executable,
                      check, "--sanitize-case"], timeout=180, log="memcheck.log")
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", result.stdout + result.stderr)
    return {"ok": result.returncode == 0 and summary == ["0"],
            "errors": int(summary[-1]) if summary else None, "returncode": result.returncode}


def run(ctx) -> dict:
    from s4d_dist.kernels.moae_triton import triton_available

    available, reason = triton_available()
    out: dict = {"triton_mode": reason}
    if not available:
        return {**out, "ok": False, "error": reason}
    parts = {"stress": stress, "tiles": every_tile, "memcheck": memcheck}
    if not ctx.smoke:  # the CPU suite already runs this file under the interpreter
        parts = {"test_suite": compiled_test_suite, **parts}
    for name, part in parts.items():
        try:
            out[name] = part(ctx)
        except Exception as error:  # record and go on: each part is independent
            out[name] = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:500]}"}
    out["ok"] = all(out[name]["ok"] for name in parts)
    return out
