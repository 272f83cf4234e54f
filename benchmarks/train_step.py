"""Training-step throughput, host work and memory: every step configuration side by side.

    python benchmarks/train_step.py                                       # CPU: a small ViT, 2 ranks
    python benchmarks/train_step.py --ranks 1 --steps 20 --preset finetune_dfew \
        --configs "ft:zero0+graphs@16,pt:zero0+graphs,ft:zero1@16,ft:ddp@16"  # a GPU (the kit's C)

A configuration is `TASK:OPTIMIZER[+MODE][@BATCH][/MOAE]`:
- TASK: `ft` (fine-tuning step, clips), `ft-image` (its image step), `pt` (pre-training step,
  masked clips), `pt-image` (masked images);
- OPTIMIZER: `zero0` (the flat AdamW, train/flat_adamw.py), `zero1`, `zero2` (DeepSpeed's ZeRO
  with one group per layer), `ddp` (the official loop: DDP + autocast + torch AdamW; fine-tuning);
- MODE: `eager` (default), `compile` (torch.compile; for zero0 the objective and the update, for
  ZeRO the module, for DDP the wrapped model), `graphs` (zero0 on a GPU: compile, and the whole
  step replayed as a CUDA graph);
- BATCH: samples per rank (default: the preset's); MOAE: the MoAE backend (fine-tuning).
`zero0`, `zero1+compile` ... (no task) mean `ft:...`. Each configuration runs in its own
`torchrun` job on identical random batches built on the device (the data plane does not
count), at one precision, through the step training uses (`Stepper.step` with the task's own
objective). Per rank it records step time, samples/s, MFU, host ms per step (the time the host
spends issuing a step: far below the step time means the host runs ahead of the GPU), the bytes
of optimizer state + gradients the rank holds (the memory ZeRO partitions; walked in the last
warm-up step, never a timed one), the first 8 steps' losses (the same batch every step: two
modes of a configuration must agree), and on a GPU peak allocated memory and the host-synchronisation
sites of a few extra steps under torch's sync debug mode (the sync census: a step of the flat
AdamW, compiled or captured, must have none).

`--profile-steps N` runs N more steps under torch.profiler and keeps, per configuration, the
device's busy fraction of the wall time (kernel time / step time: far below 1 means the host
cannot feed the GPU), aten operators and device kernels per step, and the operators that cost
the most host and device time, with the table in `<results>.<config>.profile.txt`.

The parent prints ratios against the first configuration of each task and writes
benchmarks/results/train_step_<device>.json (or --results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TASKS = ("ft", "ft-image", "pt", "pt-image")
OPTIMIZERS = ("zero0", "zero1", "zero2", "ddp")
MODES = ("eager", "compile", "graphs")
CONFIG = re.compile(r"^(?:(?P<task>[a-z-]+):)?(?P<opt>[a-z0-9]+)(?:\+(?P<mode>[a-z]+))?"
                    r"(?:@(?P<batch>\d+))?(?:/(?P<moae>[a-z]+))?$")


@dataclass(frozen=True)
class Spec:
    task: str
    optimizer: str
    mode: str
    batch: int | None
    moae: str | None

    @property
    def pretrain(self) -> bool:
        return self.task.startswith("pt")

    @property
    def modality(self) -> str:
        return "image" if self.task.endswith("image") else "video"


def parse_config(name: str) -> Spec:
    """'ft:zero0+graphs@16/triton' → Spec('ft', 'zero0', 'graphs', 16, 'triton')."""
    match = CONFIG.match(name)
    spec = match and Spec(match["task"] or "ft", match["opt"], match["mode"] or "eager",
                          int(match["batch"]) if match["batch"] else None, match["moae"])
    if (not spec or spec.task not in TASKS or spec.optimizer not in OPTIMIZERS
            or spec.mode not in MODES or (spec.optimizer == "ddp" and spec.pretrain)
            or (spec.mode == "graphs" and spec.optimizer != "zero0")):
        raise SystemExit(f"unknown configuration {name!r}: TASK:OPTIMIZER[+MODE][@BATCH][/MOAE] "
                         f"with TASK in {TASKS}, OPTIMIZER in {OPTIMIZERS} (ddp: fine-tuning), "
                         f"MODE in {MODES} (graphs: zero0)")
    return spec


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
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        result.update(device_busy_s=busy, device_busy_fraction=busy / wall,
                      device_kernels_per_step=kernels / steps,
                      top_device_ops_ms_per_step={a.key: a.self_device_time_total / 1e3 / steps
                                                  for a in sorted(averages, key=lambda a:
                                                                  -a.self_device_time_total)[:10]})
    return result


def synthetic_batch(cfg, spec: Spec, device: torch.device, dtype: torch.dtype, seed: int):
    """The objective's inputs for one batch of the configuration, built on the device."""
    from s4d_dist.data.masking import num_masked
    from s4d_dist.tubelets import model_tokens

    m = cfg.model
    batch = spec.batch or (cfg.data.video_batch_size if spec.modality == "video"
                           else cfg.data.image_batch_size)
    g = torch.Generator(device=device).manual_seed(seed)
    frames = (m.num_frames,) if spec.modality == "video" else ()
    pixels = torch.randn((batch, 3, *frames, m.img_size, m.img_size), generator=g, device=device)
    if spec.pretrain:
        tokens = model_tokens(m, spec.modality)
        ratio = cfg.mask.video_ratio if spec.modality == "video" else cfg.mask.image_ratio
        order = torch.rand(batch, tokens, generator=g, device=device).argsort(1)
        mask = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
        mask.scatter_(1, order[:, :num_masked(tokens, ratio)], True)
        return (pixels, mask), batch
    classes = m.num_video_classes if spec.modality == "video" else m.num_image_classes
    targets = torch.softmax(torch.randn(batch, classes, generator=g, device=device), -1)
    return (pixels.to(dtype), targets), batch


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration (run under torchrun)."""
    from types import SimpleNamespace

    from s4d_dist import config
    from s4d_dist.models.factory import build_classifier, build_mae
    from s4d_dist.train import distributed
    from s4d_dist.train.engine import DTYPES, Stepper, build_engine, compile_enabled
    from s4d_dist.train.finetune import FinetuneTask
    from s4d_dist.train.flops import classifier_step_flops, mae_step_flops, peak_flops
    from s4d_dist.train.pretrain import PretrainTask
    from s4d_dist.tubelets import model_tokens

    distributed.init()
    rank, device = distributed.rank(), distributed.device()
    spec = parse_config(args.config)
    stage = 0 if spec.optimizer == "ddp" else int(spec.optimizer[-1])
    overrides = [f"task={'pretrain' if spec.pretrain else 'finetune'}",
                 f"deepspeed.zero_stage={stage}", f"deepspeed.precision={args.precision}",
                 f"deepspeed.compile={spec.mode != 'eager'}",
                 f"deepspeed.cuda_graphs={spec.mode == 'graphs'}", *args.overrides]
    if spec.moae:
        overrides.append(f"model.moae.backend={spec.moae}")
    cfg = config.load(args.pretrain_preset if spec.pretrain else args.preset, overrides)
    m = cfg.model
    torch.manual_seed(0)
    model = build_mae(cfg) if spec.pretrain else build_classifier(cfg)
    dtype = DTYPES[args.precision]
    inputs, batch = synthetic_batch(cfg, spec, device, dtype, seed=rank)
    held: list[int] = []  # optimizer state + gradients, measured in warm-up steps only
    losses: list[torch.Tensor] = []  # the first steps' losses, read at the end
    parameters = sum(p.numel() for p in model.parameters())

    if spec.optimizer == "ddp":
        # The official loop (DDP + autocast), at the precision DeepSpeed gets: bf16 autocast
        # needs no loss scaler, fp16 gets the GradScaler the official code uses.
        model.to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        if spec.mode == "compile":
            ddp = torch.compile(ddp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        amp = args.precision != "fp32"
        scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        objective = FinetuneTask(cfg).objective(SimpleNamespace(engine=SimpleNamespace(module=ddp)))
        inputs = (inputs[0].float(), inputs[1])

        def step(measure: bool = False) -> None:
            with torch.autocast(device.type, dtype, enabled=amp):
                loss = objective(*inputs)
            if len(losses) < 8:
                losses.append(loss.detach().float())
            scaler.scale(loss).backward()
            if measure:
                held.append(reachable_bytes(opt, weights))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    else:
        engine = build_engine(cfg, model)
        stepper = Stepper(engine, compile=compile_enabled(cfg), cuda_graphs=cfg.deepspeed.cuda_graphs)
        run = SimpleNamespace(engine=engine, dtype=stepper.dtype)
        task = PretrainTask(cfg) if spec.pretrain else FinetuneTask(cfg)
        objective = task.objective(run)
        flat = getattr(engine, "flat_optimizer", None)
        if flat is None:
            weights = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
            backward = engine.backward

            def backward_and_measure(loss):
                out = backward(loss)
                held.append(reachable_bytes(engine.optimizer, weights) +
                            reachable_bytes(list(engine.module.parameters()), weights))
                return out
        else:
            held.append(sum(t.numel() * t.element_size() for g in flat.flat
                            for t in {id(x): x for x in (g.grad, g.master, g.exp_avg,
                                                         g.exp_avg_sq)}.values()
                            if t is not g.data))

        def step(measure: bool = False) -> None:
            if flat is None:
                engine.backward = backward_and_measure if measure else backward
            outcome = stepper.step(objective, inputs, 1e-4)
            if len(losses) < 8:
                losses.append(outcome.loss)

    initial = [p.detach().clone() for p in model.parameters()]
    for i in range(args.warmup):
        step(measure=i == args.warmup - 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    distributed.barrier()
    host = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        issued = time.perf_counter()
        step()
        host += time.perf_counter() - issued
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if spec.pretrain:
        tokens = inputs[1].shape[1]
        ratio = cfg.mask.video_ratio if spec.modality == "video" else cfg.mask.image_ratio
        flops = mae_step_flops(cfg, tokens, ratio, batch)
    else:
        flops = classifier_step_flops(cfg, model_tokens(m, spec.modality), batch)
    peak = peak_flops(device, args.peak_tflops)
    result = {"rank": rank, "batch": batch, "samples_per_s": args.steps * batch / elapsed,
              "step_s": elapsed / args.steps, "host_ms_per_step": 1e3 * host / args.steps,
              "optimizer_and_grad_bytes": max(held), "parameters": parameters,
              "step_flops": flops, "first_losses": [float(x) for x in losses]}
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if peak:
            result["peak_flops"] = peak
            result["mfu"] = result["step_flops"] / result["step_s"] / peak
        if args.sync_steps:
            result["host_sync_sites"] = host_sync_sites(step, args.sync_steps)
            result["sync_steps"] = args.sync_steps
    if args.profile_steps:
        table = Path(args.out).with_suffix(f".rank{rank}.profile.txt")
        result["profile"] = profile(step, args.profile_steps, device, table)
    # How far the weights moved from their initial values over every step run (the same count
    # in every mode): an update the captured step missed or doubled shows here.
    result["weight_movement"] = float(sum((p.detach().float() - p0.float()).abs().sum()
                                          for p, p0 in zip(model.parameters(), initial)))
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    distributed.barrier()


def run_config(name: str, port: int, args: argparse.Namespace, tmp: Path,
               results: Path) -> list[dict]:
    """One configuration's torchrun job; its profile tables, if any, go beside `results`."""
    out = tmp / re.sub(r"[^A-Za-z0-9]+", "_", name)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
           "--master_port", str(port), __file__, "--worker",
           "--config", name, "--out", str(out), "--preset", args.preset,
           "--pretrain-preset", args.pretrain_preset, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
           "--sync-steps", str(args.sync_steps), "--peak-tflops", str(args.peak_tflops or 0),
           "--profile-steps", str(args.profile_steps), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks))}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    try:
        job = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {args.timeout} s"}]
    if job.returncode:
        return [{"error": "\n".join(job.stderr.strip().splitlines()[-12:])}]
    for table in tmp.glob(f"{out.name}.rank*.profile.txt"):
        shutil.move(table, results.with_name(f"{results.stem}.{out.name}{table.name[len(out.name):]}"))
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(args.ranks)]


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per configuration: throughput summed over ranks, the slowest rank's figures, and ratios
    against the first configuration of the same task."""
    firsts: dict[str, str] = {}
    summary = {}
    for name, ranks in results.items():
        if "error" in ranks[0]:
            summary[name] = {"error": ranks[0]["error"]}
            continue
        task = parse_config(name).task
        first = firsts.setdefault(task, name)
        speed = sum(r["samples_per_s"] for r in ranks)
        held = max(r["optimizer_and_grad_bytes"] for r in ranks)
        entry = {"samples_per_s": speed, "step_ms": 1e3 * max(r["step_s"] for r in ranks),
                 "host_ms_per_step": max(r["host_ms_per_step"] for r in ranks),
                 "batch": ranks[0]["batch"], "optimizer_and_grad_mib_per_rank": held / 2**20,
                 "mfu": min((r["mfu"] for r in ranks if "mfu" in r), default=None),
                 "peak_gib": max(r.get("peak_allocated_bytes", 0) for r in ranks) / 2**30 or None,
                 "host_syncs_per_step": None, "ranks": ranks}
        sites = ranks[0].get("host_sync_sites")
        if sites is not None:
            entry["host_syncs_per_step"] = sum(sites.values()) / ranks[0]["sync_steps"] \
                if "sync_steps" in ranks[0] else sum(sites.values())
        base = summary.get(first, entry)
        entry[f"speed_vs_{first}"] = speed / base["samples_per_s"]
        entry[f"memory_vs_{first}"] = held / 2**20 / base["optimizer_and_grad_mib_per_rank"]
        summary[name] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="zero0", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="demo", help="fine-tuning preset (model, batch)")
    parser.add_argument("--pretrain-preset", default="demo", help="pre-training preset")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (a captured step runs 2 for real, then captures)")
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                        help="bf16 on GPUs; fp32 on CPUs, whose bf16 matmuls are slow")
    parser.add_argument("--configs", default="ft:zero0,ft:zero1,ft:zero2,ft:ddp,pt:zero0")
    parser.add_argument("--sync-steps", type=int, default=3,
                        help="steps run under torch's sync debug mode after timing (GPU only)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="steps run under torch.profiler after timing (tables beside --results)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, where flops.py does not know it")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON to write (default benchmarks/results/train_step_<device>.json)")
    parser.add_argument("overrides", nargs="*", default=[
        "model.embed_dim=384", "model.depth=6", "model.num_heads=6", "model.img_size=64",
        "model.num_frames=8", "model.decoder_dim=192", "model.decoder_heads=6",
        "data.video_batch_size=4", "data.image_batch_size=4"])
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
    results: dict[str, list[dict]] = {}
    header = {"device": device, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "preset": args.preset,
              "pretrain_preset": args.pretrain_preset, "overrides": args.overrides,
              "ranks": args.ranks, "precision": args.precision, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for port, name in enumerate(names, start=29650):
            results[name] = run_config(name, port, args, Path(tmp), out)
            # written after every configuration: a run cut short keeps what it measured
            out.write_text(json.dumps({**header, "results": summarise(results)}, indent=1))
    summary = summarise(results)
    print(f"{args.preset} / {args.pretrain_preset} {' '.join(args.overrides)} | {args.ranks} "
          f"ranks | {args.precision} | {device}")
    print(f"{'config':26s} {'batch':>5s} {'step ms':>8s} {'host ms':>8s} {'samples/s':>10s} "
          f"{'vs first':>8s} {'opt+grad MiB':>12s} {'MFU':>6s} {'peak GiB':>8s} {'syncs':>5s} "
          f"{'aten/step':>9s} {'kernels':>7s} {'GPU busy':>8s}")
    for name, row in summary.items():
        if "error" in row:
            print(f"{name:26s} failed: {row['error'].splitlines()[-1] if row['error'] else ''}")
            continue
        prof = row["ranks"][0].get("profile", {})
        vs = next(v for k, v in row.items() if k.startswith("speed_vs_"))
        mfu = row["mfu"] if row["mfu"] is not None else float("nan")
        syncs = row["host_syncs_per_step"]
        print(f"{name:26s} {row['batch']:5d} {row['step_ms']:8.1f} {row['host_ms_per_step']:8.1f} "
              f"{row['samples_per_s']:10.2f} {vs:8.2f} {row['optimizer_and_grad_mib_per_rank']:12.1f} "
              f"{mfu:6.1%} {row['peak_gib'] or 0:8.2f} {'-' if syncs is None else f'{syncs:g}':>5s} "
              f"{prof.get('aten_calls_per_step', 0):9.0f} {prof.get('device_kernels_per_step', 0):7.0f} "
              f"{prof.get('device_busy_fraction', float('nan')):8.1%}")
    out.write_text(json.dumps({**header, "results": summary}, indent=1))


if __name__ == "__main__":
    main()
