"""`python -m s4d_dist.shards inspect OUT` and `... verify OUT`: what a built dataset holds, and
whether every byte of it is still what the build wrote.

inspect: per split, samples and per-class counts (from the manifests), codec, frame counts and
sizes (read from the samples' metadata), the inputs skipped — by the reader (dataset.json) and
at build time (each split's manifest) —, and a preview grid PNG — a row per class, named, of a
few samples, clips as frames across their length — to look at before training on it.
verify: every shard's size and sha256 against its manifest, every index against its tar
(entries inside the file, sample counts as the manifest says), and every sample decoded (all
frames of a clip) with the decoders training uses; a report of what is wrong, where.
They live here, not in shards/, because they read shards the way training does (catalog.py,
decode.py); the shard builders need none of that.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from s4d_dist.shards import layout

from .catalog import TruncatedShardError, open_catalog
from .decode import CorruptSample, decode_frames, decode_image


def _splits(out: Path) -> list[str]:
    return list(layout.read_dataset(out)["splits"])


def inspect_dataset(out: str | Path, meta_samples: int = 256) -> dict[str, Any]:
    """Counts, codec and clip statistics per split (metadata of at most `meta_samples` samples
    per split, evenly spaced, so that a large dataset is described in seconds)."""
    out = Path(out)
    dataset = layout.read_dataset(out)
    report: dict[str, Any] = {"dataset": dataset.get("dataset"), "modality": dataset["modality"],
                              "class_names": dataset["class_names"], "splits": {},
                              "reader_skipped": len(dataset.get("reader_skipped") or [])}
    for split in _splits(out):
        manifest = layout.read_manifest(out, split)
        catalog = open_catalog(layout.split_shards(out, split), skip_truncated=True)
        picks = np.unique(np.linspace(0, len(catalog) - 1, min(meta_samples, len(catalog))).astype(int))
        metas = [catalog.read_meta(int(i)) for i in picks]
        entry = {"samples": manifest["samples"], "per_class": manifest["per_class"],
                 "shards": len(manifest["shards"]), "bytes": manifest["bytes"],
                 "media": manifest["media"], "skipped_inputs": len(manifest["skipped"]),
                 "frame_sizes": sorted({f"{m['height']}x{m['width']}" for m in metas})}
        if dataset["modality"] == "video":
            frames = np.array([m["frames"] for m in metas])
            entry["frames"] = {"min": int(frames.min()), "median": float(np.median(frames)),
                               "max": int(frames.max()), "of_samples": len(metas)}
        report["splits"][split] = entry
    report["skipped_inputs"] = report["reader_skipped"] + sum(
        entry["skipped_inputs"] for entry in report["splits"].values())
    return report


def preview(out: str | Path, path: str | Path, per_class: int = 2, frames: int = 4,
            tile: int = 96, split: str | None = None) -> Path:
    """A grid PNG: a row per class, its name on the left, `per_class` samples each (clips:
    `frames` frames spread over the clip, side by side), every tile `tile` pixels square."""
    from PIL import Image, ImageDraw, ImageFont

    out = Path(out)
    split = split or _splits(out)[0]
    catalog = open_catalog(layout.split_shards(out, split), skip_truncated=True)
    labels = catalog.labels
    video = catalog.modality == "video"
    columns = per_class * (frames if video else 1)
    classes = sorted(set(labels.tolist()))
    names = layout.read_dataset(out)["class_names"] or []
    names = [names[c] if c < len(names) else str(c) for c in classes]
    font = ImageFont.load_default(size=14)
    margin = 12 + max(int(font.getlength(name)) for name in names) if names else 0
    grid = Image.new("RGB", (margin + columns * tile, len(classes) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(classes):
        draw.text((6, row * tile + tile // 2), names[row], fill="black", font=font, anchor="lm")
        for n, sample in enumerate(np.flatnonzero(labels == label)[:per_class]):
            raw = catalog.read(int(sample))
            if video:
                index = np.linspace(0, int(raw.meta["frames"]) - 1, frames).round().astype(int)
                pictures = decode_frames(raw.media, index)
            else:
                pictures = decode_image(raw.media)[None]
            for k, picture in enumerate(pictures):
                image = Image.fromarray(picture).resize((tile, tile))
                grid.paste(image, (margin + (n * len(pictures) + k) * tile, row * tile))
    path = Path(path)
    grid.save(path)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_dataset(out: str | Path, decode: bool = True, progress: bool = True) -> dict[str, Any]:
    """Problems found, per split: {"shards": [...], "samples": [...]} of one-line messages, and
    the numbers checked. Empty problem lists mean the dataset is as built."""
    out = Path(out)
    report: dict[str, Any] = {"splits": {}, "ok": True}
    for split in _splits(out):
        manifest = layout.read_manifest(out, split)
        shard_problems: list[str] = []
        for shard in manifest["shards"]:
            tar = out / split / shard["name"]
            if not tar.is_file():
                shard_problems.append(f"{tar}: missing")
            elif tar.stat().st_size != shard["bytes"]:
                shard_problems.append(f"{tar}: {tar.stat().st_size} bytes, the manifest says "
                                      f"{shard['bytes']}")
            elif _sha256(tar) != shard["sha256"]:
                shard_problems.append(f"{tar}: sha256 differs from the manifest's (bytes changed)")
        sample_problems: list[str] = []
        tars = [str(out / split / s["name"]) for s in manifest["shards"]
                if (out / split / s["name"]).is_file()]
        try:
            catalog = open_catalog(tars) if tars else None
        except (TruncatedShardError, ValueError) as error:
            shard_problems.append(str(error))
            catalog = open_catalog(tars, skip_truncated=True)
        if catalog is not None and len(catalog) != manifest["samples"]:
            shard_problems.append(f"{out / split}: the indexes list {len(catalog)} samples, the "
                                  f"manifest {manifest['samples']}")
        checked = 0
        if decode and catalog is not None:
            for sample in tqdm(range(len(catalog)), desc=f"verify {split}",
                               disable=None if progress else True,  # None: terminal only
                               leave=False):
                raw = catalog.read(sample)
                try:
                    if catalog.modality == "video":
                        decode_frames(raw.media, np.arange(int(raw.meta["frames"])))
                    else:
                        decode_image(raw.media)
                except CorruptSample as error:
                    sample_problems.append(f"{catalog.where(sample)}: {error}")
                checked += 1
        report["splits"][split] = {"shards": shard_problems, "samples": sample_problems,
                                   "shards_checked": len(manifest["shards"]),
                                   "samples_decoded": checked}
        report["ok"] &= not shard_problems and not sample_problems
    return report
