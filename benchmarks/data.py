"""Pre-training input pipelines side by side: the official-style loader vs the shard loaders.

On the same synthetic faces at 160 px (clips of `--frames` frames, images), in one run:
  (a) official-style: per-clip folders of JPEG frames and JPEG image files, decoded with Pillow
      in DataLoader workers, transforms as the official code applies them (docs/method.md §1.8:
      the clip as a [0, 1] float tensor, per replica ShortSideScale(192) then
      RandomResizedCrop(160) on it, normalise; images RandomResizedCrop on the PIL image, flip,
      ToTensor, normalise);
  (b) shards + the torch fallback (data.backend=torch), same number of workers;
  (c) shards + DALI on the CPU (data.backend=dali, data.dali_device=cpu), as many threads;
  (d) shards + DALI "mixed" (nvJPEG / NVDEC) — only where a GPU exists.
(b)-(d) read the VP9 shards (the default codec) and, as a variant, MJPEG shards. Each workload
is the pre-training recipe: 16 frames at stride 4, `--repeats` augmented copies per video
(§1.6), or one crop + flip per image. Throughput = samples delivered per second of wall time,
the median of interleaved rounds; the ratios to (a) are the result (a shared 2-core machine
makes absolute numbers drift between runs), also as the median of per-round ratios.

    python benchmarks/data.py [--clips 28 --frames 64 --images 224 --seconds 8 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from s4d_dist import config
from s4d_dist.data import recipes
from s4d_dist.data.loaders import train_loader
from s4d_dist.pixels import normalize
from s4d_dist.shards.build import BuildOptions, build_dataset
from s4d_dist.shards.media import EncodeOptions
from s4d_dist.shards.synthetic import read_synthetic

RESULTS = Path(__file__).resolve().parent / "results"
SIZE, SHORT, NUM_FRAMES, STRIDE = 160, 192, 16, 4
CODECS = ("vp9", "mjpeg")


# ------------------------------------------------------------------------------ the data
def prepare(root: Path, clips: int, clip_frames: int, images: int, workers: int) -> dict[str, Path]:
    """Render once; store as shards (both codecs) and as the official layout (JPEG files)."""
    layout = {}
    for modality, count in (("video", clips), ("image", images)):
        raw = root / f"raw-{modality}"
        source = read_synthetic(str(raw), modality=modality, splits={"train": -(-count // 7)}, size=SIZE,
                                frames=clip_frames, render_workers=workers)
        for codec in CODECS if modality == "video" else ("jpeg",):
            out = root / f"shards-{modality}-{codec}"
            options = EncodeOptions(video_codec=codec) if modality == "video" else EncodeOptions()
            build_dataset(source, out, BuildOptions(options, 32 << 20, workers), progress=False)
            layout[f"{modality}-{codec}"] = out / "train"
        folder = root / f"official-{modality}"
        for record in source.splits["train"]:
            if modality == "image":
                folder.mkdir(parents=True, exist_ok=True)
                Image.open(record.paths[0]).save(folder / f"{record.key}.jpg", quality=95)
            else:
                (folder / record.key).mkdir(parents=True, exist_ok=True)
                for i, path in enumerate(record.paths):
                    Image.open(path).save(folder / record.key / f"img_{i + 1:05d}.jpg", quality=95)
        layout[f"official-{modality}"] = folder
    return layout


# ------------------------------------------------------------------ (a) the official style
class OfficialVideo(torch.utils.data.Dataset):
    """path_dataset.py + CFG transforms: decode the window's frames with Pillow, a float
    (C, T, H, W) clip in [0, 1], then per replica ShortSideScale → RandomResizedCrop → normalise."""

    def __init__(self, folder: Path, repeats: int) -> None:
        self.clips = sorted(p for p in folder.iterdir() if p.is_dir())
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng()
        paths = sorted(self.clips[i].glob("*.jpg"))
        index = recipes.pretrain_indices(len(paths), NUM_FRAMES, STRIDE, rng)
        clip = torch.stack([torch.from_numpy(np.array(Image.open(paths[j]).convert("RGB"))) for j in index])
        clip = clip.permute(3, 0, 1, 2).float().div(255)  # (C, T, H, W)
        height, width = recipes.short_side_size(clip.shape[2], clip.shape[3], SHORT)
        scaled = F.interpolate(clip, size=(height, width), mode="bilinear", align_corners=False)
        out = []
        for _ in range(self.repeats):
            y0, x0, y1, x1 = (int(v) for v in recipes.random_resized_crop(height, width, (0.08, 1.0), rng))
            crop = F.interpolate(scaled[:, :, y0:y1, x0:x1], size=(SIZE, SIZE), mode="bilinear",
                                 align_corners=False, antialias=True)
            out.append(normalize(crop.transpose(0, 1)).transpose(0, 1))
        return torch.stack(out)


class OfficialImage(torch.utils.data.Dataset):
    """CFG image transforms on PIL: RandomResizedCrop(160, .2–1, bicubic), flip, ToTensor, normalise."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.jpg"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng()
        image = Image.open(self.files[i]).convert("RGB")
        y0, x0, y1, x1 = (int(v) for v in recipes.random_resized_crop(image.height, image.width, (0.2, 1.0), rng))
        image = image.crop((x0, y0, x1, y1)).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        return normalize(x[None])[0]


def official_batches(dataset: torch.utils.data.Dataset, batch: int, workers: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=True)
    while True:
        yield from loader


# -------------------------------------------------------------------------- (b)-(d) shards
def shard_batches(modality: str, shards: Path, batch: int, repeats: int, workers: int, backend: str,
                  device: str = "cpu", task: str = "pretrain", size: int = SIZE):
    """Endless batches of one modality from shards, with the paper preset's recipe for `task`
    (pre-training: masked clips, `repeats` copies per video; fine-tuning: augmented clips)."""
    other = "video" if modality == "image" else "image"
    preset = "pretrain_vit_base" if task == "pretrain" else "finetune_dfew"
    cfg = config.load(preset, [
        f"task={task}", f"data.{modality}_shards={shards}", f"data.{other}_shards=''",
        f"data.workers={workers}", f"data.image_batch_size={batch}",
        f"data.video_batch_size={batch * repeats if task == 'pretrain' else batch}",
        f"data.video_repeats={repeats}", "data.video_rate=1.0", "data.image_rate=1.0",
        "data.fold=null", "data.val_fraction=0", f"data.dali_device={device}",
        "data.video_source_crop=[]",  # synthetic clips are not VoxCeleb2's 224×224 frames
        f"model.img_size={size}"])
    loader = train_loader(cfg, backend=backend)
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def samples_per_second(batches, seconds: float) -> float:
    """Delivered samples (rows of `pixels`) per wall second, after one warm-up batch."""
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        count += len(batch["pixels"] if isinstance(batch, dict) else batch)
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=28)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--images", type=int, default=224)
    parser.add_argument("--video-batch", type=int, default=4, help="videos per batch")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default benchmarks/results/data_<device>.json")
    args = parser.parse_args(argv)
    if args.clips < args.video_batch or args.images < args.image_batch:
        parser.error("need at least one full batch of clips and of images")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = prepare(Path(tmp), args.clips, args.frames, args.images, args.workers)
        print(f"data ready in {time.perf_counter() - started:.0f}s", flush=True)
        w, vb, ib, r = args.workers, args.video_batch, args.image_batch, args.repeats
        pipelines = {
            "video": {"official": official_batches(OfficialVideo(data["official-video"], r), vb, w)},
            "image": {"official": official_batches(OfficialImage(data["official-image"]), ib, w),
                      "shards_torch": shard_batches("image", data["image-jpeg"], ib, r, w, "torch"),
                      "dali_cpu": shard_batches("image", data["image-jpeg"], ib, r, w, "dali")},
        }
        for codec in CODECS:
            pipelines["video"][f"shards_torch_{codec}"] = shard_batches("video", data[f"video-{codec}"], vb, r, w, "torch")
            pipelines["video"][f"dali_cpu_{codec}"] = shard_batches("video", data[f"video-{codec}"], vb, r, w, "dali")
        gpu = torch.cuda.is_available()
        if gpu:
            pipelines["image"]["dali_mixed"] = shard_batches("image", data["image-jpeg"], ib, r, w, "dali", "mixed")
            for codec in CODECS:
                pipelines["video"][f"dali_mixed_{codec}"] = shard_batches("video", data[f"video-{codec}"], vb, r, w,
                                                                          "dali", "mixed")
        # DataLoader workers fork: start every forking pipeline before any DALI pipeline runs
        # threads (forking a process with live DALI threads is unsafe).
        flat = [(name, batches) for named in pipelines.values() for name, batches in named.items()]
        for _name, batches in sorted(flat, key=lambda item: item[0].startswith("dali")):
            next(batches)
        rates: dict[str, dict[str, list[float]]] = {m: {k: [] for k in p} for m, p in pipelines.items()}
        for round_ in range(args.rounds):
            for modality, named in pipelines.items():
                for name, batches in named.items():
                    rates[modality][name].append(samples_per_second(batches, args.seconds))
                    print(f"round {round_}: {modality:5s} {name:18s} {rates[modality][name][-1]:8.1f}/s", flush=True)

    results = {}
    for modality, named in rates.items():
        unit = "clips_per_s" if modality == "video" else "images_per_s"
        base = statistics.median(named["official"])
        results[modality] = {name: {unit: round(statistics.median(v), 2),
                                    "ratio_vs_official": round(statistics.median(v) / base, 2),
                                    # the same round's official rate: cancels load drift between rounds
                                    "ratio_per_round_median": round(statistics.median(
                                        x / o for x, o in zip(v, named["official"])), 2),
                                    "rounds": [round(x, 2) for x in v]} for name, v in named.items()}
        if modality == "video":
            for entry in results[modality].values():
                entry["videos_per_s"] = round(entry[unit] / args.repeats, 2)
        if not gpu:
            results[modality]["dali_mixed"] = "skipped: no GPU on this machine (needs nvJPEG / NVDEC)"
    report = {
        "benchmark": "benchmarks/data.py", "machine": platform.platform(), "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "workload": f"pre-training recipe at {SIZE}px: clips {NUM_FRAMES} frames stride {STRIDE} from "
                    f"{args.frames}-frame clips, {args.repeats} augmented copies per video; images one crop + flip",
        "results": results,
    }
    tag = "cpu" if not gpu else "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name().lower())
    args.out = args.out or RESULTS / f"data_{tag}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for modality, named in results.items():
        for name, entry in named.items():
            if isinstance(entry, dict):
                unit = "clips_per_s" if modality == "video" else "images_per_s"
                print(f"{modality:5s} {name:18s} {entry[unit]:8.1f} {unit}  ×{entry['ratio_vs_official']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
