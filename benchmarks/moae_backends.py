"""Time one MoAE layer (forward + backward) per backend, side by side in one run.

    python benchmarks/moae_backends.py                       # ViT-B video and image shapes
    python benchmarks/moae_backends.py --reps 20 --shapes video

Backends run interleaved (one repetition of each in turn) after a warm-up, so drift in a
shared machine's load hits them alike; the median is reported with ratios against `loop`,
the official formulation. Every backend gets the same weights and router noise, hence the
same routing and drops. On CUDA bf16 (module and input cast, as under DeepSpeed bf16) is
timed too, and so are `torch` under torch.compile (`torch_compiled`) and every backend but
`loop` replayed from a CUDA graph of its forward + backward (`graph`: device time per pass,
CUDA events, no host in the way), which is how the captured training step runs the layer.
Results go to benchmarks/results/moae_<device>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from s4d_dist.models.moae import BACKEND_NAMES, MoAE, load_triton_backend

SHAPES = {"video": (16, 800), "image": (32, 100)}  # (B, L) at the ViT-B fine-tune batch size


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                  if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    return f"{cpu} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runnable_backends() -> tuple[list[str], dict[str, str]]:
    """Every dispatch backend that resolves to itself; a fallback would time `torch` twice."""
    names, skipped = [], {}
    for name in BACKEND_NAMES:
        if name == "auto":
            continue
        if name == "triton" and load_triton_backend()[0] is None:
            skipped[name] = load_triton_backend()[1]
        else:
            names.append(name)
    return names, skipped


def graph_replay_ms(step, reps: int) -> float:
    """Median device ms of one replay of a CUDA graph of `step` (after a warm-up on a side
    stream, as torch.cuda.graphs asks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def time_shape(args: argparse.Namespace, backends: list[str], batch: int, tokens: int,
               dtype: torch.dtype, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = MoAE(args.dim, args.experts, args.top_k, args.hidden, args.capacity_factor)
    modules = {}
    for name in backends:
        modules[name] = copy.deepcopy(base).to(device, dtype).train()
        modules[name].backend = name
    calls = {name: module for name, module in modules.items()}
    h = torch.randn(batch, tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    noise = torch.randn(batch, tokens, args.experts, device=device, dtype=dtype)
    grad_out = torch.randn_like(h)
    compile_errors = {}
    if device.type == "cuda" and not args.no_compile:
        # torch under torch.compile is the bar the fused layer has to clear; the fused layer
        # compiled says whether a compiled training step can keep it in one graph.
        for name in ("torch", "triton"):
            if name in modules:
                compiled = torch.compile(modules[name])
                try:
                    out = compiled(h, noise)
                    torch.autograd.backward([out, modules[name].aux_loss],
                                            [grad_out, torch.ones_like(modules[name].aux_loss)])
                except Exception as error:  # a finding for the report, not a crash
                    compile_errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
                    continue
                modules[f"{name}_compiled"] = modules[name]
                calls[f"{name}_compiled"] = compiled

    def step(name: str) -> None:
        m = modules[name]
        m.zero_grad(set_to_none=True)
        h.grad = None
        out = calls[name](h, noise)
        torch.autograd.backward([out, m.aux_loss], [grad_out, torch.ones_like(m.aux_loss)])

    def timed(name: str) -> float:
        sync(device)
        start = time.perf_counter()
        step(name)
        sync(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for name in calls:
            step(name)
    times = {name: [] for name in calls}
    for _ in range(args.reps):
        for name in calls:
            times[name].append(timed(name))
    medians = {name: statistics.median(t) for name, t in times.items()}
    stats = modules[backends[0]].stats
    row = {
        "B": batch, "L": tokens, "dtype": str(dtype).removeprefix("torch."),
        "capacity": int(batch * tokens * args.top_k / args.experts * args.capacity_factor),
        "drop_fraction": float(stats["drop_fraction"]),
        "median_s": medians,
        "min_s": {name: min(t) for name, t in times.items()},
        "ratio_vs_loop": {name: medians["loop"] / med for name, med in medians.items()},
    }
    if device.type == "cuda":
        row["compile_errors"] = compile_errors
        row["graph_ms"], row["graph_errors"] = {}, {}
        for name in calls:
            if name == "loop":  # its nonzero() syncs with the host: it cannot be captured
                continue
            try:
                row["graph_ms"][name] = graph_replay_ms(lambda n=name: step(n), args.reps)
            except Exception as error:
                row["graph_errors"][name] = f"{type(error).__name__}: {str(error)[:300]}"
        graph = row["graph_ms"]
        torch_graphs = [graph[n] for n in ("torch", "torch_compiled") if n in graph]
        if "triton" in graph and torch_graphs:
            row["triton_graph_vs_best_torch_graph"] = min(torch_graphs) / graph["triton"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch", type=int, help="override B of every shape")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per backend")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip torch_compiled")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/moae_<device>.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    backends, skipped = runnable_backends()
    print(f"device: {device_name(device)} | torch {torch.__version__} | "
          f"D={args.dim} E={args.experts} k={args.top_k} H={args.hidden} "
          f"capacity_factor={args.capacity_factor} | reps {args.reps}, warm-up {args.warmup}")
    for name, reason in skipped.items():
        print(f"skipped backend {name}: {reason}")

    load_before = os.getloadavg()  # on a shared machine, says how contended the timings were
    rows = []
    for shape in args.shapes:
        batch, tokens = SHAPES[shape]
        for dtype in dtypes:
            row = {"shape": shape, **time_shape(args, backends, args.batch or batch, tokens,
                                                dtype, device)}
            rows.append(row)

    names = list(rows[0]["median_s"])
    header = f"{'shape':<6} {'B':>3} {'L':>4} {'dtype':<8} {'drop':>5} " + " ".join(
        f"{name + ' ms':>10} {'x loop':>7}" for name in names)
    print(header)
    for row in rows:
        cells = " ".join(f"{row['median_s'][n] * 1e3:>10.2f} {row['ratio_vs_loop'][n]:>7.2f}"
                         for n in names)
        print(f"{row['shape']:<6} {row['B']:>3} {row['L']:>4} {row['dtype']:<8} "
              f"{row['drop_fraction']:>5.2f} {cells}")
        if "graph_ms" in row:
            print("       graph replay, device ms: " + ", ".join(
                f"{n} {ms:.3f}" for n, ms in row["graph_ms"].items()) +
                  (f"; triton {row['triton_graph_vs_best_torch_graph']:.2f}x the best torch"
                   if "triton_graph_vs_best_torch_graph" in row else ""))
    print("x loop = loop median / backend median (> 1: faster than loop)")

    out = args.out or Path(__file__).parent / "results" / f"moae_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "MoAE layer forward+backward (incl. aux loss), median seconds",
        "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__,
        "config": {"dim": args.dim, "experts": args.experts, "top_k": args.top_k,
                   "hidden": args.hidden, "capacity_factor": args.capacity_factor,
                   "reps": args.reps, "warmup": args.warmup},
        "timing": "median wall seconds per forward + backward (host and device); graph_ms: "
                  "median device ms of a CUDA graph replay of one forward + backward",
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "backends": backends, "skipped": skipped, "results": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
