"""Pre-training data throughput at the preset's batch, per storage path, in one run.

The workload is `pretrain_vit_base`'s video loader: 48 videos per batch, each repeated with 4
augmented crops (192 masked clips), 16 frames at stride 4, 160 px, from synthetic face clips of
`--clip-frames` frames stored at 160 × 160 (what VoxCeleb2 pre-cut to the preset's source crop
stores). Each storage path is built from the same rendered clips:
  vp9     VP9 in WebM, a keyframe every 16 frames (the codec the shards had before frame
          storage; kept so that every run prints the ratio to it)
  frames  every frame an independent JPEG at a recorded byte offset (shards/media.py)
and read with the DALI CPU backend (`--device mixed` on a GPU machine) in three modes:
  feed    the feeder alone: order, rows, parameter draws, reading the bytes, DALI's inputs
          (no decoding); its time per video is `feeder_us_per_sample`
  decode  the decoder alone, over batches the feeder prepared beforehand
  full    the loader end to end (read, decode, augment, masks, onto the device), as training
          iterates it
Every mode runs `--warmup` batches first (every clip touched: first-touch costs excluded), then
times `--batches` batches, in `--rounds` interleaved rounds (medians: the machine is shared).

Per path, under these keys (any reader can compare two result files):
  masked_clips_per_s            full mode
  masked_clips_per_cpu_s        full mode, per second of CPU time (the process, its threads and
                                its feeder process): the figure the shared machine's load moves least
  decoded_per_used_frames       frames the decoder decodes / distinct frames the windows use
  host_bytes_per_masked_clip    pixel bytes the host hands to the device stage per masked clip
                                (the decoded uint8 frames, or the augmented float32 clips)
  encoded_bytes_per_masked_clip stored bytes read per masked clip
  feeder_us_per_sample          feed mode, µs of CPU time per video (of the thread feeding)
  decode_masked_clips_per_s     decode mode
and `stored_bytes_per_clip` per path.

    python benchmarks/data.py [--clips 96 --clip-frames 64 --batches 6 --rounds 2 --paths vp9,frames]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from s4d_dist import config
from s4d_dist.data.loaders import train_loader
from s4d_dist.shards.build import BuildOptions, build_dataset
from s4d_dist.shards.media import VIDEO_CODECS, EncodeOptions
from s4d_dist.shards.synthetic import read_synthetic

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 160
PATHS = tuple(codec for codec in ("vp9", "frames") if codec in VIDEO_CODECS)


# ------------------------------------------------------------------------------ the data
def prepare(root: Path, clips: int, clip_frames: int, workers: int, paths: tuple[str, ...],
            size: int = SIZE) -> dict[str, Path]:
    """Render the clips once and store them once per storage path, whole (no chunks)."""
    source = read_synthetic(str(root / "raw"), modality="video", splits={"train": -(-clips // 7)},
                            size=size, frames=clip_frames, seed=0, render_workers=workers,
                            framing="aligned")
    out = {}
    for codec in paths:
        options = BuildOptions(EncodeOptions(video_codec=codec, chunk_frames=0), 256 << 20, workers)
        build_dataset(source, root / codec, options, progress=False)
        out[codec] = root / codec / "train"
    return out


def make_cfg(shards: Path, videos: int, repeats: int, threads: int, device: str,
             backend: str = "dali", task: str = "pretrain", modality: str = "video",
             size: int = SIZE, extra: tuple[str, ...] = ()):
    """The paper preset's loader for one modality, at `videos` × `repeats` per batch."""
    other = "image" if modality == "video" else "video"
    preset = "pretrain_vit_base" if task == "pretrain" else "finetune_dfew"
    batch = videos * repeats if task == "pretrain" and modality == "video" else videos
    return config.load(preset, [
        f"task={task}", f"data.{modality}_shards={shards}", f"data.{other}_shards=''",
        f"data.video_batch_size={batch}", f"data.image_batch_size={batch}",
        f"data.video_repeats={repeats}", f"data.workers={threads}", f"data.backend={backend}",
        f"data.dali_device={device}", "data.video_rate=1.0", "data.image_rate=1.0",
        "data.fold=null", "data.val_fraction=0", "data.video_source_crop=[]",
        f"model.img_size={size}", *extra])


def shard_batches(modality: str, shards: Path, batch: int, repeats: int, workers: int, backend: str,
                  device: str = "cpu", task: str = "pretrain", size: int = SIZE):
    """Endless batches of one modality from shards with the paper preset's recipe for `task`
    (`batch` videos or images; pre-training videos are repeated `repeats` times)."""
    cfg = make_cfg(shards, batch, repeats, workers, device, backend, task, modality, size)
    loader = train_loader(cfg)
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def samples_per_second(batches, seconds: float) -> float:
    """Delivered samples (rows of `pixels`) per wall second, after one warm-up batch."""
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["pixels"])
    return count / (time.perf_counter() - start)


def _cpu_seconds(runner=None) -> float:
    """CPU time of this process (all its threads), its finished children and the runner's
    feeder process, if it has one."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    feeder = getattr(getattr(runner, "feeder", None), "process", None)
    if feeder is not None:
        import psutil  # DeepSpeed's dependency, present wherever the project runs

        times = psutil.Process(feeder._process.pid).cpu_times()
        total += times.user + times.system
    return total


# ------------------------------------------------------------------------------ the modes
class PathBench:
    """One storage path's loader, and its three modes."""

    def __init__(self, codec: str, shards: Path, args) -> None:
        self.codec = codec
        self.cfg = make_cfg(shards, args.videos, args.repeats, args.threads, args.device, size=args.size)
        self.loader = train_loader(self.cfg)
        self.stream = self.loader.streams[0]
        self.runner = self.stream.runner
        self.plan = self.stream.plan
        self.epoch, self.batches = 0, self._epoch_batches()
        self.stored = int(sum(os.path.getsize(t) for t in self.plan.catalog.tars))
        self.clips = len(self.plan.catalog)
        self.prepared: list = []

    def _epoch_batches(self):
        while True:
            yield from self.loader.epoch(self.epoch)
            self.epoch += 1

    def requests(self, count: int):
        per_pass = self.plan.batches_per_pass
        return [(e, 0, k) for e in range(1000) for k in range(per_pass)][:count]

    def feed(self, warmup: int, count: int) -> dict:
        """The feeder alone: `count` batches after `warmup` — µs of CPU time of the thread
        running it per video (what it costs whatever else the shared machine runs), and of wall
        time."""
        requests = self.requests(warmup + count)
        for request in requests[:warmup]:
            self.prepared.append(self.runner.feed(request))
        start, cpu = time.perf_counter(), time.thread_time()
        for request in requests[warmup:]:
            self.prepared.append(self.runner.feed(request))
        seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
        self.prepared = self.prepared[-8:]
        videos = count * self.plan.batch_size
        return {"feeder_us_per_sample": 1e6 * cpu / videos, "feeder_wall_us_per_sample": 1e6 * seconds / videos}

    def decode(self, count: int) -> dict:
        """The decoder alone over the batches `feed` prepared."""
        frames_per_s = self.runner.decode_only(self.prepared, count)
        used = self.cfg.model.num_frames * self.plan.batch_size
        return {"decode_masked_clips_per_s": frames_per_s["batches_per_s"] * self.plan.batch_size
                * self.cfg.data.video_repeats, "decode_frames_per_s": frames_per_s["frames_per_s"],
                "decoded_per_used_frames": frames_per_s["decoded_frames"] / (used * frames_per_s["batches"])}

    def full(self, warmup: int, count: int) -> dict:
        for _ in range(warmup):
            next(self.batches)
        host_before = self.runner.host_bytes
        encoded_before = self.runner.encoded_bytes
        cpu, start, rows = _cpu_seconds(self.runner), time.perf_counter(), 0
        for _ in range(count):
            batch = next(self.batches)
            rows += len(batch["pixels"])
        seconds, cpu = time.perf_counter() - start, _cpu_seconds(self.runner) - cpu
        return {"masked_clips_per_s": rows / seconds, "masked_clips_per_cpu_s": rows / cpu,
                "host_bytes_per_masked_clip": (self.runner.host_bytes - host_before) / rows,
                "encoded_bytes_per_masked_clip": (self.runner.encoded_bytes - encoded_before) / rows,
                "pixels": f"{list(batch['pixels'].shape)} {batch['pixels'].dtype} on {batch['pixels'].device}"}

    def close(self) -> None:
        self.batches.close()
        self.loader.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96, help="clips stored (a few batches' worth)")
    parser.add_argument("--clip-frames", type=int, default=64)
    parser.add_argument("--videos", type=int, default=48, help="videos per batch (the preset's 192 / 4)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads (data.workers)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "mixed"))
    parser.add_argument("--size", type=int, default=SIZE, help="stored and model frame size")
    parser.add_argument("--build-workers", type=int, default=min(os.cpu_count() or 2, 8))
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing (every clip read)")
    parser.add_argument("--batches", type=int, default=6, help="batches timed per mode and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--modes", default="feed,decode,full")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/data_<device>.json")
    args = parser.parse_args(argv)
    paths = tuple(args.paths.split(","))
    modes = args.modes.split(",")
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; this code stores {list(PATHS)}")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = prepare(Path(tmp), args.clips, args.clip_frames, args.build_workers, paths, args.size)
        print(f"data ready in {time.perf_counter() - started:.0f}s", flush=True)
        benches = {codec: PathBench(codec, data[codec], args) for codec in paths}
        figures: dict[str, dict[str, list]] = {codec: {} for codec in paths}
        for round_ in range(args.rounds):
            for codec, bench in benches.items():
                found = {}
                if "feed" in modes:
                    found |= bench.feed(args.warmup if round_ == 0 else 0, args.batches)
                if "decode" in modes:
                    found |= bench.decode(args.batches)
                if "full" in modes:
                    found |= bench.full(args.warmup if round_ == 0 else 1, args.batches)
                for key, value in found.items():
                    figures[codec].setdefault(key, []).append(value)
                print(f"round {round_} {codec:7s} " + "  ".join(
                    f"{k} {v:.4g}" for k, v in found.items() if isinstance(v, float)), flush=True)
        for bench in benches.values():
            figures[bench.codec]["stored_bytes_per_clip"] = [bench.stored / bench.clips]
            bench.close()

    results = {codec: {k: (round(statistics.median(v), 4) if isinstance(v[0], float | int) else v[0])
                       for k, v in named.items()} for codec, named in figures.items()}
    base = "vp9" if "vp9" in results else None
    ratios = {}
    if base:
        for codec in results:
            if codec == base:
                continue
            ratio = {}
            for key in ("masked_clips_per_s", "masked_clips_per_cpu_s", "decode_masked_clips_per_s"):
                if key in results[codec] and key in results[base]:
                    ratio[key] = round(results[codec][key] / results[base][key], 2)
            for key in ("host_bytes_per_masked_clip", "feeder_us_per_sample", "decoded_per_used_frames",
                        "stored_bytes_per_clip"):
                if key in results[codec] and key in results[base]:
                    ratio[key] = round(results[codec][key] / results[base][key], 3)
            ratios[f"{codec}_vs_{base}"] = ratio
    gpu = args.device == "mixed"
    device = torch.cuda.get_device_name() if gpu else "cpu"
    report = {
        "benchmark": "benchmarks/data.py", "device": device, "dali_device": args.device,
        "machine": platform.platform(), "cpus": os.cpu_count(), "shared_machine": True,
        "python": sys.version.split()[0], "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "workload": f"pre-training video loader: {args.videos} videos x {args.repeats} repeats per batch, "
                    f"16 frames at stride 4, {args.size} px, from {args.clip_frames}-frame clips stored at "
                    f"{args.size} px",
        "results": results, "ratios": ratios,
    }
    tag = "cpu" if not gpu else "".join(c if c.isalnum() else "_" for c in device.lower())
    out = args.out or RESULTS / f"data_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for codec, entry in results.items():
        print(codec, json.dumps(entry))
    for name, ratio in ratios.items():
        print(name, json.dumps(ratio))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
