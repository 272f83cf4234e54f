"""Where the `triton` MoAE backend spends its time: routing glue vs expert GEMMs.

    python benchmarks/moae_glue.py          # on a GPU: 16×800 tokens, D 768, E 8, k 2, H 192
    TRITON_INTERPRET=1 python benchmarks/moae_glue.py --batch 2 --tokens 50 --dim 64
                                            # CPU smoke run of the script, not a timing

benchmarks/moae_backends.py compares whole layers across backends (the `triton` one joins through the
backend registry). This script splits the triton backend itself: each routing kernel alone
(router epilogue, queue, dispatch, combine and their backwards), the expert GEMMs alone
(forward + backward on the same padded layout), and the backend's whole forward + backward.
The glue share is reported two ways: 1 − GEMMs / backend (everything that is not GEMM, launch
and autograd overhead included) and Σ kernels / (Σ kernels + GEMMs) (kernel time only).
On CUDA every time is triton.testing.do_bench's median (CUDA events, L2 flushed between runs).
Results go to benchmarks/results/moae_glue_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moae_backends import device_name  # next to this script
from s4d_dist.kernels import moae_routing as routing
from s4d_dist.kernels.moae_triton import batched_experts, triton_available, triton_backend


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of fn in ms: CUDA events on a GPU, perf_counter otherwise."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    fn()  # warm-up (the interpreter traces each kernel on first use)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_stages(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    """Median ms of every routing kernel, of the expert GEMMs and of the whole backend."""
    torch.manual_seed(0)
    T, D, E, H, k = args.batch * args.tokens, args.dim, args.experts, args.hidden, args.top_k
    capacity = int(T * k / E * args.capacity_factor)
    slots = min(capacity, T)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    x, logits = randn(T, D), randn(T, E)
    noise_std, noise = torch.nn.functional.softplus(randn(T, E)), randn(T, E)
    weights = [randn(E, H, D, scale=0.02), randn(E, H, scale=0.02),
               randn(E, D, H, scale=0.02), randn(E, D, scale=0.02)]

    noisy, topk_idx, gates, block_counts = routing.route(logits, noise_std, noise, k)
    pair_slot, slot_pair, kept = routing.queue(topk_idx, block_counts, capacity, slots)
    layout = routing.dispatch(x, slot_pair, k, E, slots)
    expert_out = batched_experts(layout, *weights)
    grad_out, grad_noisy = torch.randn_like(x), torch.randn_like(noisy)
    grad_gates = torch.randn(T, k, device=device)
    grad_layout = torch.randn_like(layout)

    kernels = {
        "route": lambda: routing.route(logits, noise_std, noise, k),
        "queue": lambda: routing.queue(topk_idx, block_counts, capacity, slots),
        "dispatch": lambda: routing.dispatch(x, slot_pair, k, E, slots),
        "combine": lambda: routing.combine(expert_out, pair_slot, gates, x.dtype),
        "combine_backward": lambda: routing.combine_backward(grad_out, expert_out, gates,
                                                             slot_pair),
        "dispatch_backward": lambda: routing.combine(grad_layout, pair_slot, None, x.dtype),
        "router_backward": lambda: routing.router_backward(gates, grad_gates, topk_idx,
                                                           grad_noisy, noise, E, logits.dtype,
                                                           noise_std.dtype),
    }

    gemm_inputs = [layout.clone().requires_grad_()] + [w.clone().requires_grad_()
                                                       for w in weights]
    grad_expert_out = torch.randn_like(layout)  # drawn once: a timed randn would count as GEMM

    def experts_step() -> None:
        for t in gemm_inputs:
            t.grad = None
        torch.autograd.backward(batched_experts(*gemm_inputs), grad_expert_out)

    backend_inputs = [t.clone().requires_grad_() for t in (x, logits, noise_std, *weights)]

    def backend_step() -> None:
        for t in backend_inputs:
            t.grad = None
        xx, ll, ss, w1, b1, w2, b2 = backend_inputs
        result = triton_backend(xx, ll, ss, noise, w1, b1, w2, b2, k, capacity)
        torch.autograd.backward([result.out, result.noisy_logits], [grad_out, grad_noisy])

    kernel_ms = {name: median_ms(fn, device, args.reps) for name, fn in kernels.items()}
    gemm_ms = median_ms(experts_step, device, args.reps)
    backend_ms = median_ms(backend_step, device, args.reps)
    glue_ms = sum(kernel_ms.values())
    return {
        "T": T, "dtype": str(dtype).removeprefix("torch."), "capacity": capacity,
        "drop_fraction": 1.0 - kept.float().mean().item(),
        "kernel_ms": kernel_ms, "kernels_total_ms": glue_ms,
        "expert_gemms_ms": gemm_ms, "backend_ms": backend_ms,
        "glue_share_of_backend": 1.0 - gemm_ms / backend_ms,
        "glue_share_kernels_only": glue_ms / (glue_ms + gemm_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=10, help="timed runs off CUDA")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/moae_glue_<dev>.json")
    args = parser.parse_args()

    available, reason = triton_available()
    if not available:
        raise SystemExit(f"triton backend unavailable: {reason}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    print(f"device: {device_name(device)} | {reason} | T={args.batch}x{args.tokens} "
          f"D={args.dim} E={args.experts} k={args.top_k} H={args.hidden}")
    rows = [time_stages(args, dtype, device) for dtype in dtypes]
    for row in rows:
        print(f"\n{row['dtype']}: capacity {row['capacity']}, drops {row['drop_fraction']:.3f}")
        for name, ms in row["kernel_ms"].items():
            print(f"  {name:<18} {ms:9.3f} ms")
        print(f"  {'kernels total':<18} {row['kernels_total_ms']:9.3f} ms\n"
              f"  {'expert GEMMs':<18} {row['expert_gemms_ms']:9.3f} ms (fwd+bwd)\n"
              f"  {'backend':<18} {row['backend_ms']:9.3f} ms (fwd+bwd)\n"
              f"  glue share: {row['glue_share_of_backend']:.1%} of the backend, "
              f"{row['glue_share_kernels_only']:.1%} counting kernels only")

    out = args.out or Path(__file__).parent / "results" / f"moae_glue_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "triton MoAE backend: routing kernels vs expert GEMMs, median ms",
        "device": device_name(device), "triton_mode": reason, "torch": torch.__version__,
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
