"""The prepared GPU run: every GPU path of s4d_dist validated and measured, one JSON at the end.

    bash benchmarks/gpu/run.sh --sections A,C,B,D   # on a GPU machine (benchmarks/gpu/README.md)
    bash benchmarks/gpu/run.sh --cpu-smoke          # the same code at toy sizes, on a CPU

Sections (each independent; a failing one is recorded and the next runs):
  A  environment: versions, device, NVDEC count
  B  compiled Triton MoAE: the kernel test file compiled, a stress against the `torch` and
     `loop` backends, candidate tiles, compute-sanitizer memcheck on a small case
                                                                            (triton_checks.py)
  C  the training step, one rank, bf16: fine-tune and pre-train, the flat AdamW captured as
     CUDA graphs first, then eager, ZeRO-1/2, DDP, batch 64, Triton MoAE: step time, MFU,
     host ms, host-sync census, GPU busy fraction, kernels per step, peak memory
                                                (step_checks.py, benchmarks/train_step.py)
  D  MoAE layer at the ViT-B fine-tune shape: backends eager, torch compiled, CUDA graph
     replay; the fused layer kernel by kernel (benchmarks/moae_backends.py, moae_glue.py)
  E  DALI "mixed" against "cpu": every recipe, corrupt samples, stream safety  (dali_checks.py)
  F  data throughput: DALI mixed, DALI CPU, torch fallback                     (dali_checks.py)
  G  end to end: `deepspeed launch/finetune.py` and `launch/pretrain.py` with DALI mixed, then
     `predict` on the fine-tuned run with `--decoder dali` against `--decoder python`

The JSON (`<out>/gpu_<device>.json`) holds, per section, `ok` (the checks passed), `targets`
(measured value, target, met) and every figure, and at the top `headline`: the figures the
issues ask for (`finetune_mfu`, `pretrain_mfu`, `moae_layer_ms`), gathered from the sections'
own `headline` entries; a section's entry is written as soon as it
ends, so a run cut short keeps what it measured, and a later call with other sections adds
to the same file. Under `--smoke` sizes are toy sizes and GPU-only parts say "skipped".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(Path(__file__).parent)]

# NVDEC engines per GPU, from NVIDIA's video codec support matrix (no API reports the count).
NVDEC_ENGINES = {"H100": 7, "H200": 7, "A100": 5, "L40S": 3, "A10": 1}


@dataclass
class Context:
    smoke: bool
    out: Path      # folder for the JSON and the benchmark scripts' own reports
    scratch: Path  # shards, run folders
    gpu: bool

    def run(self, cmd: list[str], timeout: float, env: dict | None = None,
            log: str | None = None) -> subprocess.CompletedProcess:
        """A subprocess in the scratch folder, never the repository root: there `python -m`
        would put the source folder s4d_dist/ first on sys.path, ahead of the installed package
        that maps s4d_dist.kernels and s4d_dist.shards (setup.py). Its output goes to
        `<out>/<log>` when named and is also returned."""
        result = subprocess.run(cmd, cwd=self.scratch, env={**os.environ, **(env or {})},
                                timeout=timeout, capture_output=True, text=True)
        if log:
            (self.out / log).write_text(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
        return result


def target(value: float | None, goal: float, higher_is_better: bool = True) -> dict:
    met = None if value is None else (value >= goal if higher_is_better else value <= goal)
    return {"value": value, "target": goal, "met": met}


def scrub(text: str, ctx: Context) -> str:
    """`text` without this machine's paths (results are committed): the repository, the scratch
    and output folders, the installed packages and the interpreter become placeholders."""
    import site
    import sysconfig
    places = {path: "<site-packages>" for path in site.getsitepackages()}
    places[sysconfig.get_paths()["stdlib"]] = "<stdlib>"
    places.update({str(REPO): "<repo>", str(ctx.scratch): "<scratch>", str(ctx.out): "<out>",
                   str(ctx.scratch.parent): "<stage>", sys.prefix: "<python>",
                   str(Path(sys.executable).resolve().parent.parent): "<python>"})
    for path, name in sorted(places.items(), key=lambda item: -len(item[0])):
        text = text.replace(path, name)
    return text


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------ A
def environment(ctx: Context) -> dict:
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for dist in ("triton", "deepspeed", "nvidia-dali-cuda130", "nvidia-dali-cuda120",
                 "nvidia-nvimgcodec-cu13", "omegaconf", "av", "webdataset", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info: dict = {"versions": versions, "gpu": ctx.gpu}
    if ctx.gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    nvdec_engines=next((n for k, n in NVDEC_ENGINES.items() if k in props.name), None),
                    nvdec_source="NVIDIA video codec support matrix, by device name")
        smi = ctx.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                       "--format=csv,noheader"], timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
        # NVDEC is reached through the driver's libnvcuvid, which containers mount only with
        # the "video" driver capability.
        libs = ctx.run(["ldconfig", "-p"], timeout=30).stdout
        info["libnvcuvid"] = "libnvcuvid" in libs
        from s4d_dist.train.flops import peak_flops
        info["peak_bf16_tflops"] = (peak_flops(torch.device("cuda", 0)) or 0) / 1e12 or None
    needed = ("triton", "deepspeed", "omegaconf")
    info["ok"] = all(name in versions for name in needed) and (ctx.gpu or ctx.smoke)
    return info


# ------------------------------------------------------------------------------------ C
def train_step(ctx: Context) -> dict:
    """The training step's configurations and the headline MFUs (step_checks.py)."""
    import step_checks
    return step_checks.run(ctx, BENCHMARKS, target)


# ------------------------------------------------------------------------------------ D
def moae_backends(ctx: Context) -> dict:
    """Whole MoAE layers per backend, eager, compiled and replayed from a CUDA graph
    (moae_backends.py), then the fused layer kernel by kernel (moae_glue.py). Headline:
    `moae_layer_ms`, the fused layer's bf16 forward + backward at 16×800 tokens under graph
    replay."""
    layer, glue = ctx.out / "moae.json", ctx.out / "moae_glue.json"
    size = ["--shapes", "image", "--batch", "1", "--dim", "64", "--hidden", "16"] if ctx.smoke \
        else ["--shapes", "video"]
    first = ctx.run([sys.executable, str(BENCHMARKS / "moae_backends.py"),
                     "--reps", "1" if ctx.smoke else "20", "--warmup", "1" if ctx.smoke else "2",
                     "--out", str(layer), *size],
                    timeout=300 if ctx.smoke else 480, log="moae.log")
    glue_size = ["--batch", "1", "--tokens", "100", "--dim", "64", "--hidden", "16",
                 "--reps", "1"] if ctx.smoke else []
    second = ctx.run([sys.executable, str(BENCHMARKS / "moae_glue.py"), "--out", str(glue),
                      *glue_size], timeout=300, log="moae_glue.log")
    if first.returncode or second.returncode:
        return {"ok": False, "error": tail(first.stderr + second.stderr)}
    rows = json.loads(layer.read_text())["results"]
    splits = json.loads(glue.read_text())["results"]
    out: dict = {"ok": True, "layer_ms": {}, "graph_ms": {}, "glue": {}, "targets": {}}
    for row in rows:
        out["layer_ms"][row["dtype"]] = {n: s * 1e3 for n, s in row["median_s"].items()}
        if "graph_ms" in row:
            out["graph_ms"][row["dtype"]] = row["graph_ms"]
            # torch.compile / CUDA graph capture that failed for a backend (a finding)
            out.setdefault("errors", {})[row["dtype"]] = {
                "compile": row["compile_errors"], "graph": row["graph_errors"]}
    for row in splits:
        out["glue"][row["dtype"]] = {k: row[k] for k in ("total_ms", "ms_by_kind",
                                                        "ms_per_pass")}
    bf16 = next((row for row in rows if row["dtype"] == "bfloat16"), None)
    if bf16 is not None and "triton" in bf16.get("graph_ms", {}):  # a GPU run
        ms = bf16["graph_ms"]["triton"]
        out["targets"] = {
            "moae_layer_ms": target(ms, 0.4, higher_is_better=False),
            "triton_vs_compiled_torch": target(bf16.get("triton_graph_vs_best_torch_graph"),
                                               3.0)}
        out["headline"] = {"moae_layer_ms": ms}
    return out


# ------------------------------------------------------------------------------------ G
def end_to_end(ctx: Context) -> dict:
    """`deepspeed launch/finetune.py` (bf16, ZeRO-1) and `launch/pretrain.py` with DALI mixed, on
    small demo-sized shards; the run folders must hold what the README promises."""
    import shutil

    from s4d_dist.shards.synthetic import build_synthetic
    from s4d_dist.train import distributed
    root = ctx.scratch / "e2e"
    shutil.rmtree(root / "runs", ignore_errors=True)  # a finished run folder is refused
    data = {m: root / m for m in ("image", "video")}
    for modality, path in data.items():
        if not (path / "dataset.json").is_file():
            build_synthetic(path, modality, {"train": 6, "test": 2}, size=64, frames=16, seed=0,
                            workers=4, framing="aligned")
    dali = "cpu" if ctx.smoke else "mixed"
    precision = "fp32" if ctx.smoke else "bf16"
    common = [f"data.image_shards={data['image'] / 'train'}",
              f"data.video_shards={data['video'] / 'train'}", f"output_dir={root / 'runs'}",
              "optim.epochs=1", "logging.log_every=1", "data.backend=dali",
              f"data.dali_device={dali}", f"deepspeed.precision={precision}"]
    env = {"DS_ACCELERATOR": "cpu"} if ctx.smoke else {}
    # The `deepspeed` command is DeepSpeed's runner module; called as a module it needs no
    # console script on PATH (pip --target installs none where run.sh can see it).
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                 "--master_port", str(distributed.free_port())]  # 29500 may be taken
    runs = {
        "pretrain": [sys.executable, str(REPO / "launch/pretrain.py"), "--config", "demo",
                     "run_name=pretrain", *common],
        "finetune": [*deepspeed, str(REPO / "launch/finetune.py"), "--config", "demo_finetune",
                     "run_name=finetune", "deepspeed.zero_stage=1", "data.val_fraction=0.2",
                     *common],
    }
    out: dict = {"ok": True}
    for name, cmd in runs.items():
        started = time.perf_counter()
        try:
            result = ctx.run(cmd, timeout=300, env=env, log=f"e2e_{name}.log")
        except (OSError, subprocess.TimeoutExpired) as error:
            out[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            out["ok"] = False
            continue
        folder = root / "runs" / name
        present = {f: (folder / f).is_file() for f in
                   ("config.yaml", "metrics.json", "finished.json", "weights_fp32.pt",
                    "weights_official.pth")}
        present["tensorboard"] = any((folder / "tb").glob("**/events.out.tfevents.*"))
        entry = {"returncode": result.returncode, "seconds": round(time.perf_counter() - started, 1),
                 "files": present}
        if (folder / "metrics.json").is_file():
            entry["metrics"] = json.loads((folder / "metrics.json").read_text())
        if result.returncode:
            entry["error"] = tail(result.stderr)
        entry["ok"] = result.returncode == 0 and all(present.values())
        out[name] = entry
        out["ok"] &= entry["ok"]
    if out["finetune"]["ok"]:
        out["predict"] = predict_decoders(ctx, root / "runs" / "finetune", root / "predict")
        out["ok"] &= out["predict"]["ok"]
    return out


def predict_media(folder: Path) -> list[str]:
    """JPEG faces (nvJPEG on a GPU), VP9 and H.264 clips at 160 px (NVDEC; its minimum is
    128 px) and at 64 px (below it: decoded in Python instead)."""
    import av
    import numpy as np
    from PIL import Image

    from s4d_dist.shards.media import EncodeOptions, encode_clip
    from s4d_dist.shards.synthetic_faces import render_clip, render_image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for label in range(4):
        Image.fromarray(render_image(rng, label, 112)).save(folder / f"face{label}.jpg", quality=90)
    for size in (160, 64):
        clip = render_clip(rng, 5, 16, size)
        (folder / f"clip{size}.webm").write_bytes(encode_clip(clip, 25.0, EncodeOptions()))
        with av.open(str(folder / f"clip{size}.mp4"), "w") as mp4:  # H.264: what users bring
            stream = mp4.add_stream("libx264", rate=25)
            stream.height = stream.width = size
            stream.pix_fmt = "yuv420p"
            for image in [*clip, None]:  # None flushes the encoder
                frame = None if image is None else av.VideoFrame.from_ndarray(image, format="rgb24")
                mp4.mux(stream.encode(frame))
    return sorted(str(p) for p in folder.iterdir())


def predict_decoders(ctx: Context, run: Path, folder: Path) -> dict:
    """The same inputs through `python -m s4d_dist.predict` with each decoder: every input
    scored by both, images decoded by DALI, and the probabilities agreeing (decoders differ by
    a grey level on JPEG and by YUV→RGB rounding on video, nothing more)."""
    inputs = predict_media(folder)
    lines = {}
    for decoder in ("python", "dali"):
        report = folder.parent / f"predict_{decoder}.jsonl"
        cmd = [sys.executable, "-m", "s4d_dist.predict", "--model", str(run), "--decoder",
               decoder, "--out", str(report), *inputs]
        result = ctx.run(cmd, timeout=300, log=f"predict_{decoder}.log")
        if result.returncode:
            return {"ok": False, "decoder": decoder, "error": tail(result.stderr)}
        lines[decoder] = [json.loads(line) for line in report.read_text().splitlines()]
    names = [Path(line["input"]).name for line in lines["dali"]]
    gaps = {name: max(abs(a - b) for a, b in zip(d["probs"].values(), p["probs"].values()))
            for name, d, p in zip(names, lines["dali"], lines["python"])}
    used = {name: line["decoder"] for name, line in zip(names, lines["dali"])}
    images_by_dali = all(used[n] == "dali" for n in names if n.endswith(".jpg"))
    return {"ok": images_by_dali and max(gaps.values()) < 0.02, "decoder_used": used,
            "max_prob_gap": {n: round(g, 6) for n, g in gaps.items()}}


# ------------------------------------------------------------------------------ driver
def sections() -> dict[str, tuple[str, Callable[[Context], dict]]]:
    import dali_checks
    import triton_checks
    return {"A": ("environment", environment), "B": ("triton_moae", triton_checks.run),
            "C": ("finetune_step", train_step), "D": ("moae_backends", moae_backends),
            "E": ("dali_mixed_vs_cpu", dali_checks.correctness),
            "F": ("data_throughput", lambda ctx: dali_checks.throughput(ctx, target)), "G": ("end_to_end", end_to_end)}


def device_tag(gpu: bool, smoke: bool) -> str:
    if smoke:
        return "cpu_smoke"
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="A,B,C,D,E,F,G")
    parser.add_argument("--smoke", action="store_true", help="toy sizes; GPU-only parts skipped")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "s4d_gpu_check")
    parser.add_argument("--sanitize-case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sanitize_case:
        import triton_checks
        return triton_checks.sanitize_case()
    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        parser.error("no CUDA device: run with --smoke (run.sh --cpu-smoke) on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.smoke, args.out, args.scratch, gpu)
    path = args.out / f"gpu_{device_tag(gpu, args.smoke)}.json"
    report = json.loads(path.read_text()) if path.is_file() else {"sections": {}}
    report.update(device=torch.cuda.get_device_name(0) if gpu else "cpu", smoke=args.smoke)
    table = sections()
    failed = False
    for key in args.sections.split(","):
        name, check = table[key]
        started = time.perf_counter()
        print(f"[gpu-check] {key} {name} ...", flush=True)
        try:
            entry = check(ctx)
        except Exception as error:  # one broken section must not cost the others' figures
            entry = {"ok": False, "error": f"{type(error).__name__}: {error}",
                     "traceback": tail(traceback.format_exc(), 25)}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report["sections"][f"{key}_{name}"] = entry
        report.setdefault("headline", {}).update(entry.get("headline", {}))
        path.write_text(scrub(json.dumps(report, indent=1, default=str), ctx) + "\n")
        failed |= not entry["ok"]
        met = {k: t["met"] for k, t in entry.get("targets", {}).items()}
        print(f"[gpu-check] {key} {name}: {'ok' if entry['ok'] else 'FAILED'} in "
              f"{entry['seconds']}s {met or ''} {entry.get('error', '')}", flush=True)
    print(f"[gpu-check] wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
