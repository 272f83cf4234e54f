"""Which encoding should the video shards use? MJPEG vs VP9, side by side in one run.

For clips shaped like the data (96 frames, 160×160 and 224×224 face-like content: a moving,
blinking, talking face over a textured background with mild sensor noise), it measures per
encoding: bytes per clip, encode time, PSNR against the source, and the CPU time to decode a
training window (16 frames at stride 4, at random starts) with PyAV (data.decode.decode_clip)
and with DALI's CPU backend (fn.decoders.video on the bytes, one thread). Timings are medians
of process CPU time over interleaved rounds on a shared machine; compare the ratios (against
the default, vp9 crf30 g16) within one run, not absolute numbers across runs.

GPU decoding (NVDEC for VP9, the mixed backend for MJPEG) is not measured: no GPU here.

    python benchmarks/codec.py [--clips 4 --frames 96 --repeats 9]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from s4d_dist.data.decode import decode_clip
from s4d_dist.shards.media import EncodeOptions, encode_clip

WINDOW, STRIDE = 16, 4
FPS = 25.0
RESULTS = Path(__file__).resolve().parent / "results" / "codec_cpu.json"
BASELINE = "vp9 crf30 g16"

VARIANTS: dict[str, EncodeOptions] = {
    "mjpeg q95": EncodeOptions(video_codec="mjpeg", jpeg_quality=95),
    "mjpeg q90": EncodeOptions(video_codec="mjpeg", jpeg_quality=90),
    "vp9 crf30 g16": EncodeOptions(video_codec="vp9", vp9_crf=30, keyframe_interval=16),
    "vp9 crf30 g32": EncodeOptions(video_codec="vp9", vp9_crf=30, keyframe_interval=32),
    "vp9 crf30 g64": EncodeOptions(video_codec="vp9", vp9_crf=30, keyframe_interval=64),
    "vp9 crf20 g16": EncodeOptions(video_codec="vp9", vp9_crf=20, keyframe_interval=16),
}


def _soft(inside: np.ndarray) -> np.ndarray:
    """Signed distance-like field → anti-aliased mask, so edges look like a camera's."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside * 4.0, -50, 50)))


def face_clip(frames: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic face video: smooth shapes in motion plus noise (not pure noise, which no
    codec compresses and no face video resembles). Returns (with noise, without noise): the
    codecs get the noisy one, PSNR is also taken against the clean one, because a codec that
    smooths the noise away loses nothing of the face."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = sum(np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
                  for fx, fy, ph in rng.uniform([-6, -6, 0], [6, 6, 6.28], (6, 3)))
    background = np.stack([0.35 + 0.2 * xx, 0.4 + 0.1 * yy, 0.5 - 0.1 * xx], -1) + 0.03 * texture[..., None]
    skin = rng.uniform([0.7, 0.5, 0.4], [0.85, 0.65, 0.55])
    noisy = np.empty((frames, size, size, 3), np.uint8)
    clean = np.empty_like(noisy)
    for t in range(frames):
        cx = 0.5 + 0.06 * np.sin(t / 11 + seed)
        cy = 0.5 + 0.03 * np.cos(t / 17)
        scale = 1 + 0.05 * np.sin(t / 23)
        face = _soft(size * 0.02 * (1 - ((xx - cx) / (0.3 * scale)) ** 2 - ((yy - cy) / (0.4 * scale)) ** 2))
        shade = 1 - 0.25 * np.clip((xx - cx) / 0.3, -1, 1)  # light from one side
        eye_open = 0.1 if t % 40 < 3 else 1.0
        eyes = sum(_soft(size * 0.01 * (1 - ((xx - cx - dx) / 0.05) ** 2
                                        - ((yy - cy + 0.1) / (0.025 * eye_open)) ** 2))
                   for dx in (-0.11, 0.11))
        mouth = _soft(size * 0.01 * (1 - ((xx - cx) / 0.1) ** 2
                                     - ((yy - cy - 0.18) / (0.01 + 0.03 * abs(np.sin(t / 3)))) ** 2))
        img = background * (1 - face[..., None]) + (skin * shade[..., None]) * face[..., None]
        img = img * (1 - 0.8 * eyes[..., None]) * (1 - 0.6 * mouth[..., None])
        clean[t] = np.clip(img * 255, 0, 255).astype(np.uint8)
        noisy[t] = np.clip(img * 255 + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)
    return noisy, clean


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / mse))


def _cpu_ms(fn) -> float:
    """CPU time of this process (all threads, DALI's included) for one call: on a machine
    shared with other jobs, wall time mostly measures the neighbours."""
    start = time.process_time()
    fn()
    return 1000 * (time.process_time() - start)


def dali_window_decoder(batch: int):
    """A DALI CPU pipeline decoding one window per encoded clip; returns run(blobs, starts)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        start = fn.external_source(name="start", dtype=types.INT32)
        return fn.decoders.video(encoded, device="cpu", start_frame=start,
                                 sequence_length=WINDOW, stride=STRIDE)

    pipe = pipeline()
    pipe.build()

    def run(blobs: list[np.ndarray], starts: list[int]) -> np.ndarray:
        pipe.feed_input("encoded", blobs)
        pipe.feed_input("start", [np.array(s, np.int32) for s in starts])
        (frames,) = pipe.run()
        return np.stack([np.asarray(frames[i]) for i in range(len(blobs))])

    return run


class Variant:
    """One encoding of a set of clips: its static measures, and the timed decode jobs."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], options: EncodeOptions,
                 starts: list[int]) -> None:
        clips = [noisy for noisy, _ in pairs]
        encode_ms = []
        self.encoded: list[bytes] = []
        for clip in clips:
            encode_ms.append(_cpu_ms(lambda: self.encoded.append(encode_clip(clip, FPS, options))))  # noqa: B023
        decoded = [decode_clip(b) for b in self.encoded]
        self.starts = starts
        self.blobs = [np.frombuffer(b, np.uint8) for b in self.encoded]
        self.dali = dali_window_decoder(len(self.blobs))
        windows = self.dali(self.blobs, starts)  # the first run builds the decoders
        expected = np.stack([d[s:s + (WINDOW - 1) * STRIDE + 1:STRIDE] for d, s in zip(decoded, starts)])
        sizes = [len(b) for b in self.encoded]
        self.static = {
            "bytes_per_clip": int(np.mean(sizes)),
            "bytes_per_frame": int(np.mean(sizes) / len(clips[0])),
            "encode_ms_per_clip": statistics.median(encode_ms),
            "psnr_db": float(np.mean([psnr(c, d) for c, d in zip(clips, decoded)])),
            "psnr_clean_db": float(np.mean([psnr(clean, d) for (_, clean), d in zip(pairs, decoded)])),
            "dali_vs_pyav_mean_abs_diff": float(np.abs(windows.astype(int) - expected).mean()),
        }
        self.times: dict[str, list[float]] = {"pyav_window_ms": [], "pyav_full_clip_ms": [],
                                              "dali_cpu_window_ms": []}

    def time_once(self) -> None:
        n = len(self.encoded)
        self.times["pyav_window_ms"].append(_cpu_ms(lambda: [
            decode_clip(b, s, WINDOW, STRIDE) for b, s in zip(self.encoded, self.starts)]) / n)
        self.times["pyav_full_clip_ms"].append(_cpu_ms(lambda: [decode_clip(b) for b in self.encoded]) / n)
        self.times["dali_cpu_window_ms"].append(_cpu_ms(lambda: self.dali(self.blobs, self.starts)) / n)

    def result(self) -> dict:
        return {**self.static, **{k: statistics.median(v) for k, v in self.times.items()}}


def measure(pairs: list[tuple[np.ndarray, np.ndarray]], repeats: int, rng: np.random.Generator
            ) -> dict[str, dict]:
    """Every variant on the same clips and window starts; decode timings interleaved round by
    round, so a neighbour's burst of load hits all variants alike."""
    frames = len(pairs[0][0])
    starts = [int(s) for s in rng.integers(0, frames - (WINDOW - 1) * STRIDE, len(pairs))]
    variants = {name: Variant(pairs, options, starts) for name, options in VARIANTS.items()}
    for _ in range(repeats):
        for variant in variants.values():
            variant.time_once()
    results = {name: variant.result() for name, variant in variants.items()}
    base = results[BASELINE]
    for result in results.values():
        result["vs_" + BASELINE.replace(" ", "_")] = {
            key: result[key] / base[key] for key in ("bytes_per_clip", "encode_ms_per_clip",
                                                     "pyav_window_ms", "dali_cpu_window_ms")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        pairs = [face_clip(args.frames, size, seed) for seed in range(args.clips)]
        for name, result in measure(pairs, args.repeats, rng).items():
            rows.append({"encoding": name, "size": size, **result})

    header = ("encoding", "size", "KB/clip", "encode ms", "PSNR clean", "PyAV win ms", "PyAV full ms",
              "DALI win ms", "DALI ×")
    print(" | ".join(f"{h:>13}" for h in header))
    for r in rows:
        cells = (r["encoding"], r["size"], r["bytes_per_clip"] / 1024, r["encode_ms_per_clip"],
                 r["psnr_clean_db"], r["pyav_window_ms"], r["pyav_full_clip_ms"], r["dali_cpu_window_ms"],
                 r["vs_" + BASELINE.replace(" ", "_")]["dali_cpu_window_ms"])
        print(" | ".join(f"{c:>13.2f}" if isinstance(c, float) else f"{c:>13}" for c in cells))

    import av
    import nvidia.dali

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": f"{args.clips} clips × {args.frames} frames per size; window {WINDOW} frames at stride "
                f"{STRIDE}; CPU ms per clip, median of {args.repeats} interleaved rounds; DALI with one "
                f"thread; ratios against {BASELINE!r} (the default)",
        "gpu": "not measured (no GPU on this machine): NVDEC / nvJPEG numbers are open",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "av": av.__version__, "dali": nvidia.dali.__version__},
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
