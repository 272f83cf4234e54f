"""Training-step throughput and per-rank memory: ZeRO 0 / 1 / 2 and a plain DDP loop, side by side.

    python benchmarks/train_step.py                      # 2 ranks, CPU here, GPUs elsewhere
    python benchmarks/train_step.py --preset finetune_dfew --ranks 8 --steps 50   # on GPUs

Each configuration runs in its own `torchrun` job on identical random batches of the model a
preset describes (the fine-tuning classifier by default). Per rank it records samples/s and the
bytes of optimizer state + gradients the rank holds between backward and step — the memory
ZeRO partitions — counted as the unique tensor storages reachable from the optimizer object
and the parameters' .grad, minus the model weights themselves. On a GPU it also records peak
allocated memory, bf16 step time and MFU. The parent prints ratios against ZeRO-0 and writes
benchmarks/results/train_step_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("zero0", "zero1", "zero2", "ddp")


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


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration (run under torchrun)."""
    from s4d_dist import config
    from s4d_dist.models.build import build_classifier
    from s4d_dist.train import distributed
    from s4d_dist.train.engine import Stepper, build_engine
    from s4d_dist.train.flops import classifier_step_flops, peak_flops

    distributed.init()
    rank, device = distributed.rank(), distributed.device()
    stage = 0 if args.config == "ddp" else int(args.config[-1])
    overrides = ["task=finetune", f"deepspeed.zero_stage={stage}",
                 f"deepspeed.precision={args.precision}", *args.overrides]
    cfg = config.load(args.preset, overrides)
    m = cfg.model
    torch.manual_seed(0)
    model = build_classifier(cfg)
    batch = cfg.data.video_batch_size
    shape = (batch, 3, m.num_frames, m.img_size, m.img_size)
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(rank)).to(device)
    labels = torch.randint(0, m.num_video_classes, (batch,)).to(device)
    held: list[int] = []

    if args.config == "ddp":  # the official setup: DDP, fp16 autocast + GradScaler on a GPU
        model.to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        use_amp = device.type == "cuda"
        scaler = torch.amp.GradScaler(enabled=use_amp)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def step() -> None:
            with torch.autocast(device.type, torch.float16, enabled=use_amp):
                loss = torch.nn.functional.cross_entropy(ddp(pixels, "video").float(), labels)
            scaler.scale(loss).backward()
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

        engine.backward = backward_and_measure

        def step() -> None:
            stepper(lambda: torch.nn.functional.cross_entropy(
                engine(pixels.to(stepper.dtype), "video").float(), labels), 1e-5)

    for _ in range(args.warmup):
        step()
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
    tokens = (m.img_size // m.patch) ** 2 * m.num_frames // m.tubelet
    peak = peak_flops(device)
    result = {"rank": rank, "samples_per_s": args.steps * batch / elapsed,
              "step_s": elapsed / args.steps, "optimizer_and_grad_bytes": max(held),
              "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if peak:
            result["mfu"] = classifier_step_flops(cfg, tokens, batch) / result["step_s"] / peak
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    distributed.barrier()


def run_config(name: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    out = tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
           "--master_port", str(29650 + CONFIGS.index(name)), __file__, "--worker",
           "--config", name, "--out", str(out), "--preset", args.preset, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
           *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks))}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
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
    parser.add_argument("overrides", nargs="*", default=[
        "model.embed_dim=384", "model.depth=6", "model.num_heads=6", "model.img_size=64",
        "model.num_frames=8", "data.video_batch_size=4"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            results[name] = run_config(name, args, Path(tmp))
    base = max(r["optimizer_and_grad_bytes"] for r in results["zero0"])
    base_speed = sum(r["samples_per_s"] for r in results["zero0"])
    print(f"{args.preset} {' '.join(args.overrides)} | {args.ranks} ranks | {args.precision} | {device}")
    print(f"{'config':8s} {'samples/s':>10s} {'vs zero0':>9s} {'opt+grad MiB/rank':>18s} {'vs zero0':>9s}")
    summary = {}
    for name, ranks in results.items():
        speed = sum(r["samples_per_s"] for r in ranks)
        held = max(r["optimizer_and_grad_bytes"] for r in ranks)
        summary[name] = {"samples_per_s": speed, "speed_vs_zero0": speed / base_speed,
                         "optimizer_and_grad_mib_per_rank": held / 2**20,
                         "memory_vs_zero0": held / base, "ranks": ranks}
        print(f"{name:8s} {speed:10.2f} {speed / base_speed:9.2f} {held / 2**20:18.1f} "
              f"{held / base:9.2f}")
    RESULTS.mkdir(exist_ok=True)
    tag = "cpu" if device == "cpu" else device.replace(" ", "_")
    (RESULTS / f"train_step_{tag}.json").write_text(json.dumps({
        "device": device, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "preset": args.preset, "overrides": args.overrides,
        "ranks": args.ranks, "precision": args.precision, "steps": args.steps,
        "results": summary}, indent=1))


if __name__ == "__main__":
    main()
