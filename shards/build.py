"""Building a DatasetSource into shard folders: ``<out>/dataset.json`` and ``<out>/<split>/``.

Workers (a process pool) decode and encode records; the parent receives the results in
record order and alone writes the tars, so the output does not depend on the number of
workers or their timing. A record whose media cannot be decoded is skipped and listed in the
manifest with the reason; anything else (a missing file, a label out of range, a duplicate
key) stops the build before or when it is met, because it means the reader or the dataset
is wrong, not one file. An interrupted build resumes from its manifest (manifest.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import PIL
from tqdm import tqdm

from . import faces
from .layout import DATASET_JSON, FORMAT_VERSION, BuildError, member_exts, write_json_atomic
from .manifest import SplitManifest
from .media import IMAGE_EXT, VIDEO_CODECS, EncodeOptions, MediaError
from .samples import BUILDER_META, Sample, chunk_key, encode_record, record_path
from .sources.base import DatasetSource, SourceRecord
from .writer import ShardInfo, ShardWriter, check_key

DEFAULT_SHARD_MB = 128


@dataclass(frozen=True)
class BuildOptions:
    """``workers`` does not change the output; everything else does (and is fingerprinted)."""

    encode: EncodeOptions = field(default_factory=EncodeOptions)
    shard_bytes: int = DEFAULT_SHARD_MB * 2**20
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))  # usable cores


@dataclass
class SplitSummary:
    split: str
    samples: int
    shards: int
    bytes: int
    skipped: list[dict]
    seconds: float
    resumed_from: int  # source records already done by an earlier run
    records: int


def media_ext(source: DatasetSource, options: EncodeOptions) -> str:
    """The media member extension of this dataset's samples."""
    return IMAGE_EXT if source.modality == "image" else VIDEO_CODECS[options.video_codec].ext


def validate(source: DatasetSource) -> None:
    """Fail before any work on what would make the shards wrong rather than incomplete."""
    for fold, sets in (source.folds or {}).items():
        unknown = {part for parts in sets.values() for part in parts} - set(source.splits)
        if unknown:
            raise BuildError(f"{source.name} fold {fold} names parts {sorted(unknown)}, "
                             "which are not splits")
    labelled = bool(source.class_names)
    expected_media = {"image"} if source.modality == "image" else {"frames", "video"}
    for split, records in source.splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", split):
            raise BuildError(f"split name {split!r} is not a plain folder name")
        seen: set[str] = set()
        for record in records:
            where = f"{source.name}/{split} record {record.key!r}"
            try:
                check_key(record.key, "label")
                if source.modality == "video":  # a chunk's key is longer
                    check_key(chunk_key(record.key, 0, 2), "label")
            except ValueError as err:
                raise BuildError(f"{source.name}/{split}: {err}") from None
            if record.key in seen:
                raise BuildError(f"{where}: duplicate key")
            seen.add(record.key)
            if source.modality == "video" and re.search(r"__c\d{3}$", record.key):
                raise BuildError(f"{where}: keys ending in __cNNN are reserved for video chunks")
            if BUILDER_META & set(record.meta):
                raise BuildError(f"{where}: meta keys {sorted(BUILDER_META & set(record.meta))} "
                                 "are reserved for the builder")
            if record.media not in expected_media:
                raise BuildError(f"{where}: media {record.media!r} in a {source.modality} dataset")
            if record.media != "frames" and len(record.paths) != 1:
                raise BuildError(f"{where}: {record.media} needs exactly one path, "
                                 f"got {len(record.paths)}")
            if labelled != (record.label is not None):
                raise BuildError(f"{where}: label {record.label!r}, but the dataset has "
                                 f"{len(source.class_names)} classes")
            if labelled and not 0 <= record.label < len(source.class_names):
                raise BuildError(f"{where}: label {record.label} outside "
                                 f"0..{len(source.class_names) - 1}")


def _fingerprint(records: list[SourceRecord], build: dict) -> str:
    digest = hashlib.sha256(json.dumps(build, sort_keys=True).encode())
    for r in records:
        fields = [r.key, r.label, r.media, r.paths, r.meta]
        digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


def _split_header(source: DatasetSource, split: str, options: BuildOptions) -> dict:
    ext = media_ext(source, options.encode)
    build = {
        "encode": asdict(options.encode), "shard_bytes": options.shard_bytes,
        "software": {"av": av.__version__, "ffmpeg": av.ffmpeg_version_info,
                     "pillow": PIL.__version__},
    }
    if options.encode.face_crop:  # the detector decides what is stored
        build["software"]["opencv"] = faces.opencv_version()
    return {
        "dataset": source.name, "modality": source.modality, "split": split,
        "class_names": source.class_names,
        "extensions": member_exts(ext, bool(source.class_names)),
        "media": {"ext": ext, "codec": "jpeg" if ext == IMAGE_EXT else options.encode.video_codec},
        "build": build, "records": len(source.splits[split]),
        "fingerprint": _fingerprint(source.splits[split], build),
    }


Result = tuple[int, list[Sample] | None, str]  # record index, its samples or None, skip reason


def _encode_job(job: tuple[int, SourceRecord, EncodeOptions]) -> Result:
    index, record, options = job
    try:
        return index, encode_record(record, options), ""
    except MediaError as err:
        return index, None, str(err)


def _encoded(jobs: list, workers: int) -> Iterator[Result]:
    """Results in job order. Spawned workers: a forked child would inherit the parent's
    threads' locks (tqdm's monitor, DALI in a test process)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_encode_job, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_encode_job, jobs, chunksize=1)


def build_split(source: DatasetSource, split: str, out: str | os.PathLike, options: BuildOptions,
                progress: bool = True, on_shard: Callable[[ShardInfo], None] | None = None
                ) -> SplitSummary:
    """Build (or finish building) ``<out>/<split>/``. ``on_shard`` runs after each shard's
    checkpoint is saved (progress reporting; tests interrupt the build from it)."""
    started = time.monotonic()
    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    records = source.splits[split]
    manifest = SplitManifest.resume(folder, _split_header(source, split, options))
    resumed_from = manifest.next_record
    if not manifest.complete:
        position = {"shard_start": resumed_from, "record": resumed_from}

        def shard_closed(info: ShardInfo) -> None:
            manifest.add_shard(info, (position["shard_start"], position["record"]))
            position["shard_start"] = position["record"]
            manifest.save(folder)
            if on_shard is not None:
                on_shard(info)

        jobs = [(i, records[i], options.encode) for i in range(resumed_from, len(records))]
        bar = tqdm(total=len(records), initial=resumed_from, desc=f"{source.name}/{split}",
                   unit="rec", disable=None if progress else True)
        writer = ShardWriter(folder, manifest.header["media"]["ext"], bool(source.class_names),
                             options.shard_bytes, len(manifest.shards), shard_closed)
        with bar, writer, contextlib.closing(_encoded(jobs, options.workers)) as results:
            for index, samples, reason in results:
                position["record"] = index
                if samples is None:
                    manifest.skip(index, records[index].key, record_path(records[index]), reason)
                else:
                    writer.write(samples)
                bar.update()
            position["record"] = len(records)
        manifest.complete = True
        manifest.save(folder)
    result = manifest.to_json()
    return SplitSummary(split, result["samples"], len(result["shards"]), result["bytes"],
                        result["skipped"], time.monotonic() - started, resumed_from, len(records))


def write_dataset_json(source: DatasetSource, out: str | os.PathLike) -> None:
    """The dataset-level facts: splits, folds (train/test parts per fold), reader skips."""
    write_json_atomic(Path(out) / DATASET_JSON, {
        "format_version": FORMAT_VERSION, "dataset": source.name, "modality": source.modality,
        "class_names": source.class_names, "splits": list(source.splits),
        "folds": {str(k): v for k, v in source.folds.items()} if source.folds else None,
        "reader_skipped": [{"path": p, "reason": r} for p, r in source.skipped],
    })


def format_summary(source: DatasetSource, summaries: Iterable[SplitSummary],
                   shown_reasons: int = 5) -> str:
    """A human summary: one line per split, then the first skip reasons."""
    lines = [f"{source.name} ({source.modality})",
             f"  {'split':>10} {'samples':>9} {'shards':>6} {'MiB':>9} {'skipped':>7} {'s':>7}"]
    skips = []
    for s in summaries:
        note = ("  (already built)" if s.resumed_from == s.records
                else f"  (resumed after {s.resumed_from} records)" if s.resumed_from else "")
        lines.append(f"  {s.split:>10} {s.samples:>9} {s.shards:>6} {s.bytes / 2**20:>9.1f} "
                     f"{len(s.skipped):>7} {s.seconds:>7.1f}{note}")
        skips += [f"{s.split}/{k['key']}: {k['reason']}" for k in s.skipped]
    skips += [f"reader: {path}: {reason}" for path, reason in source.skipped]
    if skips:
        lines.append(f"skipped {len(skips)} inputs (all listed in the manifests / dataset.json):")
        lines += [f"  {line}" for line in skips[:shown_reasons]]
        if len(skips) > shown_reasons:
            lines.append(f"  ... {len(skips) - shown_reasons} more")
    return "\n".join(lines)


def build_dataset(source: DatasetSource, out: str | os.PathLike,
                  options: BuildOptions = BuildOptions(), progress: bool = True,
                  on_shard: Callable[[ShardInfo], None] | None = None) -> list[SplitSummary]:
    """Build every split of ``source`` under ``out`` and write ``dataset.json``.

    A split may come out empty (every input skipped): its manifest then says why, and reading
    it (layout.split_shards) fails; the CLI reports it as an error. With ``workers`` > 1 the
    workers are spawned, so a calling script needs the ``if __name__ == "__main__":`` guard.
    """
    validate(source)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_dataset_json(source, out)
    return [build_split(source, split, out, options, progress, on_shard) for split in source.splits]
