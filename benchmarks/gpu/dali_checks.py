"""Sections E and F of the GPU run: DALI "mixed" (nvJPEG / NVDEC) against DALI "cpu", and the
data throughput of DALI mixed, DALI CPU and the torch fallback on the same box.

E builds small synthetic shard datasets at 160 px (VP9 and MJPEG clips, JPEG images) and, for
every recipe — pre-training image / video, fine-tuning image / video, evaluation image / video
— reads the same batches with both decode devices: the batch contract (keys, shapes, dtypes,
labels, indices) must be equal, the pixels close (decoders and resamplers differ by a few
levels; fine-tuning adds DALI's own erasing noise, so only most pixels are compared). Then a
dataset with a truncated clip and an undecodable image goes through the mixed pipeline (the
image fails inside nvJPEG: culprit found, pipeline rebuilt, batch count unchanged), and a long
matmul queued on torch's stream before each DALI → torch copy must change nothing.
Under --smoke both sides are DALI "cpu" at 32 px: the code paths run, the numbers mean nothing.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

MEAN_TOL = 0.03   # mean |mixed - cpu| after ImageNet normalisation (~1.5 uint8 levels)
CLOSE_FRACTION = 0.8  # fine-tuning: pixels within 0.1 of each other


def build_data(root: Path, size: int, frames: int, clips: int, images: int,
               codecs: tuple[str, ...] = ("vp9", "mjpeg")) -> dict[str, Path]:
    """Synthetic shard datasets (train: `clips` / `images` per class, test: 1 per class)."""
    from s4d_dist.shards.synthetic import build_synthetic

    paths = {name: root / name for name in ("image", *codecs)}
    for name, path in paths.items():
        if (path / "dataset.json").is_file():
            continue
        modality = "image" if name == "image" else "video"
        extra = {} if name == "image" else {"frames": frames, "video_codec": name}
        build_synthetic(path, modality, {"train": images if name == "image" else clips, "test": 1},
                        size=size, seed=0, workers=8, framing="aligned", **extra)
    return paths


def make_cfg(ctx, paths: dict[str, Path], task: str, codec: str, device: str, *extra: str):
    from s4d_dist import config

    size, frames = (32, 4) if ctx.smoke else (160, 16)
    return config.load("demo", [
        f"task={task}", f"data.image_shards={paths['image'] / 'train'}",
        f"data.video_shards={paths[codec] / 'train'}", f"model.img_size={size}",
        f"model.num_frames={frames}", "data.sampling_rate=2", "data.image_batch_size=8",
        "data.video_batch_size=4", "data.video_repeats=2", "data.eval_batch_size=4",
        "data.workers=4", "data.video_rate=1.0", "data.image_rate=1.0", "data.val_fraction=0",
        "data.backend=dali", f"data.dali_device={device}", *extra])


def devices(ctx) -> tuple[str, str]:
    return ("cpu", "cpu") if ctx.smoke else ("mixed", "cpu")


def train_batches(cfg, backend: str = "dali") -> tuple[list[dict], int]:
    from s4d_dist.data.loaders import train_loader

    loader = train_loader(cfg, backend=backend)
    batches = list(loader.epoch(1))
    loader.close()
    return batches, loader.corrupt.count


def eval_batches(ctx, paths: dict[str, Path], modality: str, codec: str,
                 device: str) -> tuple[list[dict], int]:
    """The test split, read from the dataset folder (evaluation picks its split by name)."""
    from s4d_dist.data.loaders import eval_loader

    root = paths["image"] if modality == "image" else paths[codec]
    cfg = make_cfg(ctx, paths, "finetune", codec, device, f"data.{modality}_shards={root}")
    loader = eval_loader(cfg, "test", modality)
    batches = list(loader.batches())
    loader.close()
    return batches, loader.corrupt.count


def first_line(error: Exception) -> str:
    """DALI's errors repeat the pipeline definition; the line that says what failed suffices."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    said = [ln for ln in lines if "failed" in ln or "Error" in ln]
    return " | ".join(said[-2:] or lines[:1])[:400]


def compare(a: list[dict], b: list[dict], finetune: bool, on_gpu: bool) -> dict:
    """The batch contract equal, pixels close; figures for the report."""
    problems = []
    if len(a) != len(b) or not a:
        return {"ok": False, "problems": [f"{len(a)} vs {len(b)} batches"]}
    means, close = [], []
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            problems.append(f"keys {sorted(x)} vs {sorted(y)}")
        for key, value in x.items():
            if isinstance(value, torch.Tensor) and key != "pixels":
                if not torch.equal(value.cpu(), y[key].cpu()):
                    problems.append(f"{key} differs")
        px, py = x["pixels"], y["pixels"]
        if px.shape != py.shape or px.dtype != py.dtype:
            problems.append(f"pixels {tuple(px.shape)} {px.dtype} vs {tuple(py.shape)} {py.dtype}")
            continue
        if on_gpu and not px.is_cuda:
            problems.append("mixed batch not on the GPU")
        diff = (px.float().cpu() - py.float().cpu()).abs()
        means.append(diff.mean().item())
        close.append((diff < 0.1).float().mean().item())
    result = {"batches": len(a), "shape": list(a[0]["pixels"].shape),
              "device": str(a[0]["pixels"].device), "mean_abs_diff": max(means, default=None),
              "fraction_within_0.1": min(close, default=None)}
    if finetune:
        ok_pixels = min(close, default=0) > CLOSE_FRACTION
    else:
        ok_pixels = max(means, default=1) < MEAN_TOL
    result["ok"] = not problems and ok_pixels
    result["problems"] = sorted(set(problems))[:10]
    return result


def corrupt_samples(ctx, paths: dict[str, Path]) -> dict:
    """One truncated clip (caught by the structural check) and one image whose JPEG header is
    zeroed (passes it, fails inside the decoder: the pipeline is rebuilt); both skipped and
    counted, the epoch keeps its number of batches."""
    import shutil

    import data_shards as ds

    mixed = devices(ctx)[0]
    bad = ctx.scratch / "corrupt"
    shutil.rmtree(bad, ignore_errors=True)
    ds.corrupt_copy(paths["image"], bad / "image", "train", {3: "header"})
    ds.corrupt_copy(paths["vp9"], bad / "vp9", "train", {1: "truncate"})
    broken = {**paths, "image": bad / "image", "vp9": bad / "vp9"}
    cfg = make_cfg(ctx, broken, "finetune", "vp9", mixed)
    clean = make_cfg(ctx, paths, "finetune", "vp9", mixed)
    got, count = train_batches(cfg)
    ref, _ = train_batches(clean)
    return {"ok": count == 2 and len(got) == len(ref), "corrupt_counted": count,
            "batches": len(got), "batches_clean": len(ref)}


def stream_safety(ctx, paths: dict[str, Path]) -> dict:
    """DALI's copy into torch runs on torch's current stream: queue ~20 ms of matmuls on it first
    and the batches must come out identical to an undisturbed run."""
    if ctx.smoke:
        return {"ok": True, "skipped": "no CUDA stream on a CPU"}
    from s4d_dist.data.loaders import eval_loader

    reference, _ = eval_batches(ctx, paths, "video", "vp9", "mixed")
    cfg = make_cfg(ctx, paths, "finetune", "vp9", "mixed", f"data.video_shards={paths['vp9']}")
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    loader = eval_loader(cfg, "test", "video")
    disturbed = []
    iterator = loader.batches()
    while True:
        for _ in range(20):
            big = (big @ big).clamp_(-1, 1)
        try:
            disturbed.append(next(iterator))
        except StopIteration:
            break
    loader.close()
    same = len(disturbed) == len(reference) and all(
        torch.equal(a["pixels"], b["pixels"]) for a, b in zip(disturbed, reference))
    return {"ok": same, "batches": len(disturbed)}


def correctness(ctx) -> dict:
    size, frames, per_class = (32, 8, 2) if ctx.smoke else (160, 32, 3)
    paths = build_data(ctx.scratch / "dali", size, frames, per_class, per_class)
    mixed, cpu = devices(ctx)
    out: dict = {"mean_tolerance": MEAN_TOL, "finetune_close_fraction": CLOSE_FRACTION,
                 "recipes": {}}
    cases = [(task, codec) for task in ("pretrain", "finetune") for codec in ("vp9", "mjpeg")]
    for task, codec in cases:  # each recipe on its own: one failing decoder hides no other
        try:
            a, _ = train_batches(make_cfg(ctx, paths, task, codec, mixed))
            b, _ = train_batches(make_cfg(ctx, paths, task, codec, cpu))
        except RuntimeError as error:
            out["recipes"][f"{task}_{codec}"] = {"ok": False, "error": first_line(error)}
            continue
        for modality in ("image", "video"):
            pick = [i for i, x in enumerate(a) if x["modality"] == modality]
            if modality == "image" and codec == "mjpeg":
                continue  # the images are the same JPEG shards under both codecs
            name = f"{task}_{modality}" + (f"_{codec}" if modality == "video" else "")
            out["recipes"][name] = compare([a[i] for i in pick], [b[i] for i in pick],
                                           task == "finetune", not ctx.smoke)
    for modality, codec in (("image", "vp9"), ("video", "vp9"), ("video", "mjpeg")):
        name = f"eval_{modality}" + (f"_{codec}" if modality == "video" else "")
        try:
            a, _ = eval_batches(ctx, paths, modality, codec, mixed)
            b, _ = eval_batches(ctx, paths, modality, codec, cpu)
        except RuntimeError as error:
            out["recipes"][name] = {"ok": False, "error": first_line(error)}
            continue
        out["recipes"][name] = compare(a, b, False, not ctx.smoke)
    for name, part in (("corrupt", corrupt_samples), ("stream_safety", stream_safety)):
        try:
            out[name] = part(ctx, paths)
        except RuntimeError as error:
            out[name] = {"ok": False, "error": first_line(error)}
    out["ok"] = (all(r["ok"] for r in out["recipes"].values()) and out["corrupt"]["ok"]
                 and out["stream_safety"]["ok"])
    return out


def throughput(ctx) -> dict:
    """Pre-training (masked clips/s, images/s) and fine-tuning clips/s at 160 px from VP9 shards,
    per backend, in interleaved rounds (medians). The torch fallback's DataLoader workers start
    before any DALI pipeline exists: forking a process that runs DALI threads is unsafe."""
    from check import target
    from data import samples_per_second, shard_batches  # benchmarks/data.py

    size, frames, clips, images, image_batch = (32, 8, 2, 2, 4) if ctx.smoke else (160, 64, 10, 40, 64)
    paths = build_data(ctx.scratch / "throughput", size, frames, clips, images, codecs=("vp9",))
    workers = 2 if ctx.smoke else 8
    seconds, rounds = (1.0, 1) if ctx.smoke else (4.0, 2)
    backends = [("torch", "cpu"), ("dali", "cpu")] + ([] if ctx.smoke else [("dali", "mixed")])
    workloads = {"pretrain_video": ("pretrain", "video", paths["vp9"] / "train", 4),
                 "pretrain_image": ("pretrain", "image", paths["image"] / "train", image_batch),
                 "finetune_video": ("finetune", "video", paths["vp9"] / "train", 8)}
    pipelines = {}
    for backend, device in backends:  # torch first: its workers fork before DALI starts
        for name, (task, modality, shards, batch) in workloads.items():
            gen = shard_batches(modality, shards, batch, 4, workers, backend, device, task=task,
                                size=size)
            next(gen)
            pipelines[(name, f"{backend}_{device}")] = gen
    rates: dict = {}
    for _ in range(rounds):
        for key, gen in pipelines.items():
            rates.setdefault(key, []).append(samples_per_second(gen, seconds))
    table: dict = {}
    for (name, backend), values in rates.items():
        table.setdefault(name, {})[backend] = round(statistics.median(values), 1)
    out: dict = {"ok": True, "unit": "samples (clips or images) per second", "rates": table,
                 "workers": workers, "seconds_per_round": seconds, "rounds": rounds}
    if not ctx.smoke:
        video = table["pretrain_video"]
        best_cpu = max(video["torch_cpu"], video["dali_cpu"])
        out["targets"] = {"dali_mixed_vs_best_cpu_pretrain_video":
                          target(video["dali_mixed"] / best_cpu, 5.0),
                          "masked_clips_per_s_dali_mixed": target(video["dali_mixed"], 4000.0)}
    return out
