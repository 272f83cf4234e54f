"""Training-step throughput and per-rank memory: ZeRO 0 / 1 / 2 and a plain DDP loop, side by side.

    python benchmarks/train_step.py                      # 2 ranks, CPU here, GPUs elsewhere
    python benchmarks/train_step.py --preset finetune_dfew --ranks 8 --steps 50   # on GPUs
    python benchmarks/train_step.py --configs zero1,zero1+compile,ddp,ddp+compile --profile-steps 3

Each configuration runs in its own `torchrun` job on identical random batches of the model a
preset describes (the fine-tuning classifier by default), all at the same precision (`ddp` is
the official loop, DDP + autocast, at DeepSpeed's precision). Per rank it records samples/s and
the bytes of optimizer state + gradients the rank holds between backward and step — the memory
ZeRO partitions — counted as the unique tensor storages reachable from the optimizer object
and the parameters' .grad, minus the model weights themselves; that walk runs in the last
warm-up step, never in a timed one. On a GPU it also records peak allocated memory, MFU and the
host-synchronisation sites of a few extra steps under torch's sync debug mode.

A `+compile` configuration is the same one under torch.compile (`deepspeed.compile=true`, which
training takes too; DDP: the wrapped model compiled); its compilation happens in the warm-up
steps. `--profile-steps N` runs N more steps under torch.profiler and keeps, per configuration,
the device's busy fraction of the wall time (kernel time / step time: far below 1 means the
host cannot feed the GPU — launch- or Python-bound) and the operators that cost the most host
and device time, with the table in `<results>.<config>.profile.txt`.

The parent prints ratios against the first configuration and writes
benchmarks/results/train_step_<device>.json (or --results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("zero0", "zero1", "zero2", "ddp")  # each may take "+compile"


def parse_config(name: str) -> tuple[str, bool]:
    """'zero1+compile' → ('zero1', True)."""
    base, _, suffix = name.partition("+")
    if base not in CONFIGS or suffix not in ("", "compile"):
        raise SystemExit(f"unknown configuration {name!r}: one of {', '.join(CONFIGS)}, "
                         f"each optionally with +compile")
    return base, suffix == "compile"


def reachable_bytes(root, exclude: set[int]) -> int:
    """Bytes of unique tensor storages reachable from `root`'s attributes, minus `exclude`."""
    seen_objects, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, (torch.nn.Module, str, bytes, int, float)):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude and storage.data_ptr() != 0:
                storages[storage.data_ptr()] = storage.nbytes()
            if obj.grad is not None:
                stack.append(obj.grad)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def host_sync_sites(step: Callable[[], None], steps: int) -> dict[str, int]:
    """Where `steps` training steps block the host on the GPU, as "file:line (our file:line)"
    → count, from torch's sync debug mode. The first site is where torch saw the sync, the
    second the innermost frame of this repository on the stack, which is the line to change."""
    sites: dict[str, int] = {}
    repo = str(Path(__file__).resolve().parent.parent)  # frames resolved: installs may link here

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        files = [(os.path.realpath(f.filename), f.lineno) for f in traceback.extract_stack()[:-1]]
        ours = [(f, line) for f, line in files if f.startswith(repo) and "benchmarks" not in f]
        where = f"{Path(filename).name}:{lineno}"
        if ours:
            where += f" ({Path(ours[-1][0]).relative_to(repo)}:{ours[-1][1]})"
        sites[where] = sites.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def profile(step: Callable[[], None], steps: int, device: torch.device, table: Path) -> dict:
    """`steps` steps under torch.profiler: wall time, the device's busy time, and the operators
    that cost the most (host time; device time on a GPU). The full tables go to `table`."""
    from torch.profiler import ProfilerActivity

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    sorts = ["self_cpu_time_total"] + (["self_device_time_total"] if on_gpu else [])
    table.write_text("\n\n".join(f"sorted by {key}\n" + averages.table(sort_by=key, row_limit=40)
                                 for key in sorts))
    # aten calls as the profiler records them: nested calls too (aten::linear and its addmm)
    result: dict = {"steps": steps, "wall_s": wall, "aten_calls_per_step": sum(
        a.count for a in averages if a.key.startswith("aten::")) / steps,
        "top_host_ops_ms_per_step": {a.key: a.self_cpu_time_total / 1e3 / steps for a in sorted(
            averages, key=lambda a: -a.self_cpu_time_total)[:10]}}
    if on_gpu:
        busy = sum(a.self_device_time_total for a in averages) / 1e6
        result.update(device_busy_s=busy, device_busy_fraction=busy / wall,
                      top_device_ops_ms_per_step={a.key: a.self_device_time_total / 1e3 / steps
                                                  for a in sorted(averages, key=lambda a:
                                                                  -a.self_device_time_total)[:10]})
    return result


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration (run under torchrun)."""
    from s4d_dist import config
    from s4d_dist.models.factory import build_classifier
    from s4d_dist.train import distributed
    from s4d_dist.train.engine import DTYPES, Stepper, build_engine
    from s4d_dist.train.flops import classifier_step_flops, peak_flops
    from s4d_dist.tubelets import model_tokens

    distributed.init()
    rank, device = distributed.rank(), distributed.device()
    base, compiled = parse_config(args.config)
    stage = 0 if base == "ddp" else int(base[-1])
    overrides = ["task=finetune", f"deepspeed.zero_stage={stage}",
                 f"deepspeed.precision={args.precision}", f"deepspeed.compile={compiled}",
                 *args.overrides]
    cfg = config.load(args.preset, overrides)
    m = cfg.model
    torch.manual_seed(0)
    model = build_classifier(cfg)
    batch = cfg.data.video_batch_size
    shape = (batch, 3, m.num_frames, m.img_size, m.img_size)
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(rank)).to(device)
    labels = torch.randint(0, m.num_video_classes, (batch,)).to(device)
    held: list[int] = []  # optimizer state + gradients, measured in warm-up steps only

    if base == "ddp":
        # The official loop (DDP + autocast), at the precision DeepSpeed gets: bf16 autocast
        # needs no loss scaler, fp16 gets the GradScaler the official code uses.
        model.to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        if compiled:
            ddp = torch.compile(ddp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        amp = args.precision != "fp32"
        scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def step(measure: bool = False) -> None:
            with torch.autocast(device.type, DTYPES[args.precision], enabled=amp):
                loss = torch.nn.functional.cross_entropy(ddp(pixels, "video").float(), labels)
            scaler.scale(loss).backward()
            if measure:
                held.append(reachable_bytes(opt, weights))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    else:
        engine = build_engine(cfg, model)
        stepper = Stepper(engine)
        weights = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        backward = engine.backward

        def backward_and_measure(loss):
            out = backward(loss)
            held.append(reachable_bytes(engine.optimizer, weights) +
                        reachable_bytes(list(engine.module.parameters()), weights))
            return out

        def step(measure: bool = False) -> None:
            engine.backward = backward_and_measure if measure else backward
            stepper(torch.nn.functional.cross_entropy(
                engine(pixels.to(stepper.dtype), "video").float(), labels), 1e-5)

    for i in range(args.warmup):
        step(measure=i == args.warmup - 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = model_tokens(m, "video")
    peak = peak_flops(device, args.peak_tflops)
    result = {"rank": rank, "samples_per_s": args.steps * batch / elapsed,
              "step_s": elapsed / args.steps, "optimizer_and_grad_bytes": max(held),
              "parameters": sum(p.numel() for p in model.parameters()),
              "step_flops": classifier_step_flops(cfg, tokens, batch)}
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if peak:
            result["peak_flops"] = peak
            result["mfu"] = result["step_flops"] / result["step_s"] / peak
        if args.sync_steps:
            result["host_sync_sites"] = host_sync_sites(step, args.sync_steps)
    if args.profile_steps:
        table = Path(args.out).with_suffix(f".rank{rank}.profile.txt")
        result["profile"] = profile(step, args.profile_steps, device, table)
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    distributed.barrier()


def run_config(name: str, port: int, args: argparse.Namespace, tmp: Path,
               results: Path) -> list[dict]:
    """One configuration's torchrun job; its profile tables, if any, go beside `results`."""
    out = tmp / name.replace("+", "_")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
           "--master_port", str(port), __file__, "--worker",
           "--config", name, "--out", str(out), "--preset", args.preset, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
           "--sync-steps", str(args.sync_steps), "--peak-tflops", str(args.peak_tflops or 0),
           "--profile-steps", str(args.profile_steps), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks))}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    for table in tmp.glob(f"{out.name}.rank*.profile.txt"):
        shutil.move(table, results.with_name(f"{results.stem}.{name}{table.name[len(out.name):]}"))
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(args.ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="zero0", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                        help="bf16 on GPUs; fp32 on CPUs, whose bf16 matmuls are slow")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--sync-steps", type=int, default=3,
                        help="steps run under torch's sync debug mode after timing (GPU only)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="steps run under torch.profiler after timing (tables beside --results)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, where flops.py does not know it")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON to write (default benchmarks/results/train_step_<device>.json)")
    parser.add_argument("overrides", nargs="*", default=[
        "model.embed_dim=384", "model.depth=6", "model.num_heads=6", "model.img_size=64",
        "model.num_frames=8", "data.video_batch_size=4"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tag = "cpu" if device == "cpu" else device.replace(" ", "_")
    out = args.results or RESULTS / f"train_step_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = args.configs.split(",")
    for name in names:
        parse_config(name)  # refuse a typo before any job starts
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for port, name in enumerate(names, start=29650):
            results[name] = run_config(name, port, args, Path(tmp), out)
    first = names[0]  # the baseline of the ratios
    base = max(r["optimizer_and_grad_bytes"] for r in results[first])
    base_speed = sum(r["samples_per_s"] for r in results[first])
    print(f"{args.preset} {' '.join(args.overrides)} | {args.ranks} ranks | {args.precision} | {device}")
    print(f"{'config':13s} {'samples/s':>10s} {'vs ' + first:>9s} {'opt+grad MiB/rank':>18s} "
          f"{'vs ' + first:>9s} {'MFU':>6s} {'peak GiB':>9s} {'aten/step':>9s} {'GPU busy':>8s}")
    summary = {}
    for name, ranks in results.items():
        speed = sum(r["samples_per_s"] for r in ranks)
        held = max(r["optimizer_and_grad_bytes"] for r in ranks)
        summary[name] = {"samples_per_s": speed, f"speed_vs_{first}": speed / base_speed,
                         "optimizer_and_grad_mib_per_rank": held / 2**20,
                         f"memory_vs_{first}": held / base, "ranks": ranks}
        mfu = min((r["mfu"] for r in ranks if "mfu" in r), default=float("nan"))
        peak = max(r.get("peak_allocated_bytes", 0) for r in ranks) / 2**30
        prof = ranks[0].get("profile", {})
        print(f"{name:13s} {speed:10.2f} {speed / base_speed:9.2f} {held / 2**20:18.1f} "
              f"{held / base:9.2f} {mfu:6.1%} {peak:9.2f} {prof.get('aten_calls_per_step', 0):9.0f} "
              f"{prof.get('device_busy_fraction', float('nan')):8.1%}")
    out.write_text(json.dumps({
        "device": device, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "preset": args.preset, "overrides": args.overrides,
        "ranks": args.ranks, "precision": args.precision, "steps": args.steps,
        "results": summary}, indent=1))


if __name__ == "__main__":
    main()
