"""`python -m s4d_dist.shards inspect OUT` and `... verify OUT`: what a built dataset holds, and
whether every byte of it is still what the build wrote.

inspect: per split, samples and per-class counts (from the manifests), codec, frame counts and
sizes (from the frame index, or the samples' metadata for format 1 folders), the inputs
skipped — by the reader (dataset.json) and at build time (each split's manifest) —, and a
preview grid PNG — a row per class, named, of a few samples, clips as frames across their
length — to look at before training on it.
verify: every shard's size and sha256 against its manifest; every index against its tar
(entries inside the file, sample counts as the manifest says) and every frame index against
both (sample count, each sample's frames ending with its media member, the frame count its
metadata states); and every sample decoded (all frames of a clip), each frame of frame storage
checked for its JPEG markers first. A report of every problem found, where.
They read shards through the shard format alone (layout.py, media.py), as training does.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import layout
from .media import MediaError, decode_stored, frame_problem


def _splits(out: Path) -> list[str]:
    return list(layout.read_dataset(out)["splits"])


class _Split:
    """The samples of one split folder, read through its indexes."""

    def __init__(self, out: Path, split: str, tars: list[str] | None = None) -> None:
        self.manifest = layout.read_manifest(out, split)
        self.exts = list(self.manifest["extensions"])
        self.codec = self.manifest["media"]["codec"]
        self.entries: list[tuple[str, str, np.ndarray, np.ndarray | None]] = []  # tar, key, spans, frame ends
        self.problems: list[str] = []
        tars = tars if tars is not None else [str(out / split / s["name"]) for s in self.manifest["shards"]]
        for tar in tars:
            self._add(tar)

    def _add(self, tar: str) -> None:
        try:
            keys, spans = layout.read_index(layout.index_path(tar), self.exts)
        except (OSError, ValueError) as error:
            self.problems.append(f"{tar}: unreadable index: {error}")
            return
        size = os.path.getsize(tar)
        beyond = int(((spans[:, :, 0] + spans[:, :, 1]).max(axis=1) > size).sum())
        if beyond:
            self.problems.append(f"{tar}: truncated shards, {beyond} samples beyond the end of the tar")
        ends: list[np.ndarray | None] = [None] * len(keys)
        if self.manifest.get("format_version", 1) >= 2:
            try:
                table, part_ends = layout.read_frame_index(layout.frame_index_path(tar))
            except (OSError, ValueError) as error:
                self.problems.append(f"{tar}: frame index: {error}")
                table = None
            if table is not None and len(table) != len(keys):
                self.problems.append(f"{tar}: the frame index lists {len(table)} samples, the index {len(keys)}")
            elif table is not None:
                first = np.concatenate([[0], np.cumsum(table[:, 0])[:-1]])
                ends = [part_ends[a:a + n] for a, n in zip(first, table[:, 0])]
        self.entries += [(tar, key, span, end) for key, span, end in zip(keys, spans, ends)]

    def member(self, i: int, ext: str) -> bytes:
        tar, _, spans, _ = self.entries[i]
        offset, size = spans[self.exts.index(ext)]
        with open(tar, "rb") as f:
            f.seek(int(offset))
            return f.read(int(size))

    def meta(self, i: int) -> dict[str, Any]:
        return json.loads(self.member(i, layout.META_MEMBER))

    def label(self, i: int) -> int:
        return int(np.frombuffer(self.member(i, layout.LABEL_MEMBER), "<i4")[0])

    def where(self, i: int) -> str:
        return f"{self.entries[i][0]}:{self.entries[i][1]}"

    def decode(self, i: int) -> np.ndarray:
        """Every frame of sample i, after the frame index's checks (MediaError: what is wrong)."""
        media = self.member(i, self.manifest["media"]["ext"])
        ends = self.entries[i][3]
        if self.codec == "frames":
            if ends is None:
                raise MediaError("no frame index entry")
            problem = frame_problem(media, ends.tolist(), int(self.meta(i)["frames"]))
            if problem:
                raise MediaError(problem)
        elif ends is not None and (len(ends) != 1 or int(ends[0]) != len(media)):
            raise MediaError(f"frame index disagrees with the tar: {len(ends)} parts ending at "
                             f"{int(ends[-1]) if len(ends) else 0} of a {len(media)}-byte member")
        return decode_stored(media, self.codec, None if ends is None else ends.tolist())


def inspect_dataset(out: str | Path, meta_samples: int = 256) -> dict[str, Any]:
    """Counts, codec and clip statistics per split (metadata of at most `meta_samples` samples
    per split, evenly spaced, so that a large dataset is described in seconds)."""
    out = Path(out)
    dataset = layout.read_dataset(out)
    report: dict[str, Any] = {"dataset": dataset.get("dataset"), "modality": dataset["modality"],
                              "class_names": dataset["class_names"], "splits": {},
                              "reader_skipped": len(dataset.get("reader_skipped") or [])}
    for split in _splits(out):
        samples = _Split(out, split)
        manifest = samples.manifest
        picks = np.unique(np.linspace(0, len(samples.entries) - 1, min(meta_samples, len(samples.entries))).astype(int))
        metas = [samples.meta(int(i)) for i in picks]
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
    samples = _Split(out, split)
    labelled = layout.LABEL_MEMBER in samples.exts
    labels = np.array([samples.label(i) if labelled else 0 for i in range(len(samples.entries))])
    video = samples.manifest["modality"] == "video"
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
            pictures = samples.decode(int(sample))
            if video:
                pictures = pictures[np.linspace(0, len(pictures) - 1, frames).round().astype(int)]
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
        tars = [str(out / split / s["name"]) for s in manifest["shards"] if (out / split / s["name"]).is_file()]
        samples = _Split(out, split, tars)
        shard_problems += samples.problems
        if tars and len(samples.entries) != manifest["samples"]:
            shard_problems.append(f"{out / split}: the indexes list {len(samples.entries)} samples, the "
                                  f"manifest {manifest['samples']}")
        sample_problems: list[str] = []
        checked = 0
        if decode:
            size = {tar: os.path.getsize(tar) for tar in tars}
            for i in tqdm(range(len(samples.entries)), desc=f"verify {split}",
                          disable=None if progress else True, leave=False):  # None: terminal only
                tar, _, spans, _ = samples.entries[i]
                if int((spans[:, 0] + spans[:, 1]).max()) > size[tar]:
                    continue  # counted with its shard
                try:
                    samples.decode(i)
                except (MediaError, ValueError) as error:
                    sample_problems.append(f"{samples.where(i)}: {error}")
                checked += 1
        report["splits"][split] = {"shards": shard_problems, "samples": sample_problems,
                                   "shards_checked": len(manifest["shards"]),
                                   "samples_decoded": checked}
        report["ok"] &= not shard_problems and not sample_problems
    return report
