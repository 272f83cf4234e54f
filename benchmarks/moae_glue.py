"""Where the fused `triton` MoAE layer spends its device time, kernel by kernel.

    python benchmarks/moae_glue.py          # on a GPU: 16×800 tokens, D 768, E 8, k 2, H 192
    TRITON_INTERPRET=1 python benchmarks/moae_glue.py --batch 2 --tokens 50 --dim 64 --hidden 16
                                            # CPU smoke run of the script, not a timing

Profiles `--reps` training forward + backward passes of one layer (torch.profiler) and reports
each kernel's device time per pass, grouped: routing (route, queue, route_backward), the expert
GEMMs (expert_*) and torch's own (seed draw, allocations, aux sum, the router's weight
gradient). benchmarks/moae_backends.py times whole layers across backends; this script says
which of the layer's kernels to work on. On CPU the profile is of the interpreter and means
nothing. Results go to benchmarks/results/moae_glue_<device>.json.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moae_backends import device_name  # next to this script
from s4d_dist.kernels.moae_triton import triton_available
from s4d_dist.models.moae import MoAE


def kind(kernel: str) -> str:
    if "_expert_" in kernel:
        return "expert_gemms"
    if "_route" in kernel or "_queue" in kernel:
        return "routing"
    return "torch"


def profile_layer(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    torch.manual_seed(0)
    layer = MoAE(args.dim, args.experts, args.top_k, args.hidden, args.capacity_factor,
                 backend="triton").to(device, dtype).train()
    h = torch.randn(args.batch, args.tokens, args.dim, device=device, dtype=dtype,
                    requires_grad=True)
    grad_out = torch.randn_like(h)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        h.grad = None
        out = layer(h)  # noise drawn by the kernel, as in training
        torch.autograd.backward([out, layer.aux_loss], [grad_out, torch.ones_like(layer.aux_loss)])

    for _ in range(min(args.reps, 3)):  # compiles the kernels, fills the caching allocator
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(args.reps):
            step()
        if cuda:
            torch.cuda.synchronize()
    per_kernel = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            per_kernel[event.key] = us / args.reps / 1e3
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind(name)] += ms
    return {"T": args.batch * args.tokens, "dtype": str(dtype).removeprefix("torch."),
            "time": "device" if cuda else "cpu (interpreter)",
            "ms_per_pass": dict(sorted(per_kernel.items(), key=lambda item: -item[1])),
            "ms_by_kind": dict(by_kind), "total_ms": sum(per_kernel.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=20, help="profiled passes")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/moae_glue_<dev>.json")
    args = parser.parse_args()

    available, reason = triton_available()
    if not available:
        raise SystemExit(f"triton backend unavailable: {reason}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    print(f"device: {device_name(device)} | {reason} | T={args.batch}x{args.tokens} "
          f"D={args.dim} E={args.experts} k={args.top_k} H={args.hidden}")
    rows = [profile_layer(args, dtype, device) for dtype in dtypes]
    for row in rows:
        print(f"\n{row['dtype']}: {row['total_ms']:.3f} ms {row['time']} per forward + backward")
        for name, ms in list(row["ms_per_pass"].items())[:15]:
            print(f"  {ms:9.4f} ms  {name[:90]}")
        print("  " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms_by_kind"].items()))

    out = args.out or Path(__file__).parent / "results" / f"moae_glue_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "fused triton MoAE layer: time per kernel per forward + backward",
        "device": device_name(device), "triton_mode": reason, "torch": torch.__version__,
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
