"""The build driver and the CLI: counts, skips, determinism, resume, folds, error messages."""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import fixtures_datasets as fx
from s4d_dist.shards.__main__ import main
from s4d_dist.shards.build import BuildOptions, build_dataset
from s4d_dist.shards.layout import BuildError, fold_shards, read_dataset, read_manifest, split_shards
from s4d_dist.data.decode import decode_clip
from s4d_dist.shards.media import EncodeOptions
from s4d_dist.shards.sources.base import DatasetSource, SourceRecord

TINY = BuildOptions(EncodeOptions(video_codec="vp9", keyframe_interval=4, chunk_frames=6),
                    shard_bytes=8192, workers=1)


def frame(value: int, size: int = 32) -> np.ndarray:
    """A frame whose content (a bar's position and the grey level) encodes ``value``."""
    rgb = np.full((size, size, 3), 60 + 12 * value % 180, np.uint8)
    rgb[4:12, (3 * value) % (size - 8):(3 * value) % (size - 8) + 8] = 250
    return rgb


def write_frames(folder: Path, count: int) -> tuple[str, ...]:
    folder.mkdir(parents=True)
    for t in range(count):
        Image.fromarray(frame(t)).save(folder / f"{t:03d}.png")
    return tuple(str(folder / f"{t:03d}.png") for t in range(count))


def write_mp4(path: Path, count: int) -> str:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=25, options={"qscale": "2"})
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for t in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def image_source(root: Path) -> DatasetSource:
    """9 images over 3 classes in two splits, plus a truncated JPEG and a junk PNG."""
    root.mkdir()
    records = []
    for i in range(9):
        path = root / f"im{i}.{['jpg', 'png', 'bmp'][i % 3]}"
        Image.fromarray(frame(i)).save(path)
        records.append(SourceRecord(f"im{i}", i % 3, "image", (str(path),), {"source": path.name}))
    full = (root / "im0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(full[: len(full) // 2])
    (root / "junk.png").write_bytes(b"\x89PNG not really")
    records.insert(4, SourceRecord("cut", 0, "image", (str(root / "cut.jpg"),)))
    records.append(SourceRecord("junk", 2, "image", (str(root / "junk.png"),)))
    return DatasetSource("toyimg", "image", ["a", "b", "c"], {"train": records[:7], "test": records[7:]},
                         skipped=[("labels.txt", "line 4: no such image")])


def video_source(root: Path) -> DatasetSource:
    """Frame folders (odd i) and mp4 files (even i) of 4 or 12 frames (→ 2 chunks at
    chunk_frames 6), in three parts with folds; defects: a corrupt frame, an empty folder, a
    truncated mp4."""
    parts: dict[str, list[SourceRecord]] = {"part1": [], "part2": [], "part3": []}
    for i, count in enumerate([4, 12, 12, 4, 4, 12]):
        media = "frames" if i % 2 else "video"
        paths = (write_frames(root / f"v{i}", count) if media == "frames"
                 else (write_mp4(root / f"v{i}.mp4", count),))
        parts[f"part{i % 3 + 1}"].append(SourceRecord(f"v{i}", i % 2, media, paths, {"part": i % 3 + 1}))
    bad_frames = write_frames(root / "badframe", 4)
    Path(bad_frames[2]).write_bytes(b"broken")
    full = Path(root / "v0.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(full[: len(full) // 2])
    parts["part1"].append(SourceRecord("badframe", 0, "frames", bad_frames))
    parts["part2"].append(SourceRecord("empty", 1, "frames", ()))
    parts["part3"].append(SourceRecord("cut", 1, "video", (str(root / "cut.mp4"),)))
    folds = {k: {"train": [f"part{j}" for j in (1, 2, 3) if j != k], "test": [f"part{k}"]} for k in (1, 2, 3)}
    return DatasetSource("toyvid", "video", ["calm", "joy"], parts, folds=folds)


def read_samples(tars: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(tars, shardshuffle=False))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> DatasetSource:
    return video_source(tmp_path_factory.mktemp("videos"))


def test_image_build_counts_and_skips(tmp_path) -> None:
    source = image_source(tmp_path / "src")
    summaries = build_dataset(source, tmp_path / "out", TINY, progress=False)
    assert [(s.split, s.samples) for s in summaries] == [("train", 6), ("test", 3)]

    train = read_manifest(tmp_path / "out", "train")
    assert train["complete"] and train["samples"] == 6 and train["extensions"] == ["jpg", "label", "json"]
    assert train["per_class"] == {"a": 2, "b": 2, "c": 2}
    assert len(train["shards"]) > 1
    assert sum(s["samples"] for s in train["shards"]) == 6
    assert [(s["key"], s["record"]) for s in train["skipped"]] == [("cut", 4)]
    assert "cut.jpg" in train["skipped"][0]["reason"]
    test = read_manifest(tmp_path / "out", "test")
    assert test["per_class"] == {"a": 1, "b": 1, "c": 1} and test["skipped"][0]["key"] == "junk"
    assert read_dataset(tmp_path / "out")["reader_skipped"] == [
        {"path": "labels.txt", "reason": "line 4: no such image"}]

    samples = read_samples(split_shards(tmp_path / "out", "train"))
    assert [s["__key__"] for s in samples] == ["im0", "im1", "im2", "im3", "im4", "im5"]
    assert [struct.unpack("<i", s["label"])[0] for s in samples] == [0, 1, 2, 0, 1, 2]
    assert samples[0]["jpg"] == (tmp_path / "src" / "im0.jpg").read_bytes()  # JPEG kept as is
    assert json.loads(samples[1]["json"]) == {"source": "im1.png", "clip": "im1", "height": 32, "width": 32,
                                              "path": str(tmp_path / "src" / "im1.png")}


def test_video_build_chunks_frames_and_files(videos, tmp_path) -> None:
    build_dataset(videos, tmp_path, TINY, progress=False)
    part2 = read_samples(split_shards(tmp_path, "part2"))
    assert [s["__key__"] for s in part2] == ["v1__c000", "v1__c001", "v4"]
    meta = json.loads(part2[1]["json"])
    assert meta == {"part": 2, "clip": "v1", "path": str(Path(videos.splits["part2"][0].paths[0]).parent),
                    "height": 32, "width": 32, "frames": 6, "chunk": 1, "chunks": 2, "frame_start": 6,
                    "frame_end": 12, "clip_frames": 12, "fps": None, "resized_frames": 0}
    clip = decode_clip(part2[1]["webm"])
    expected = np.stack([frame(t) for t in range(6, 12)])
    assert np.abs(clip.astype(int) - expected).mean() < 6
    mp4 = json.loads(read_samples(split_shards(tmp_path, "part3"))[0]["json"])
    assert mp4["fps"] == 25.0 and mp4["clip_frames"] == 12

    reasons = {s["key"]: s["reason"] for p in ("part1", "part2", "part3")
               for s in read_manifest(tmp_path, p)["skipped"]}
    assert set(reasons) == {"badframe", "empty", "cut"}
    assert "002.png" in reasons["badframe"] and "empty frame folder" in reasons["empty"]
    assert "cut.mp4" in reasons["cut"]
    assert read_manifest(tmp_path, "part2")["per_class"] == {"calm": 1, "joy": 2}


def test_fold_shards_resolve_the_union_of_parts(videos, tmp_path) -> None:
    build_dataset(videos, tmp_path, TINY, progress=False)
    assert fold_shards(tmp_path, 2, "train") == (split_shards(tmp_path, "part1")
                                                 + split_shards(tmp_path, "part3"))
    assert fold_shards(tmp_path, 2, "test") == split_shards(tmp_path, "part2")
    assert read_dataset(tmp_path)["folds"]["1"] == {"train": ["part2", "part3"], "test": ["part1"]}
    with pytest.raises(BuildError, match="no fold 7"):
        fold_shards(tmp_path, 7, "train")
    manifest = read_manifest(tmp_path, "part3")
    (tmp_path / "part3" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(BuildError, match="part3: build not finished"):
        fold_shards(tmp_path, 1, "train")


def test_rebuild_is_byte_identical_for_any_worker_count(videos, tmp_path) -> None:
    build_dataset(videos, tmp_path / "one", TINY, progress=False)
    two_workers = BuildOptions(TINY.encode, TINY.shard_bytes, workers=2)
    build_dataset(videos, tmp_path / "two", two_workers, progress=False)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def test_resume_after_interruption(tmp_path) -> None:
    source = image_source(tmp_path / "src")
    build_dataset(source, tmp_path / "clean", TINY, progress=False)

    def crash_after_first_shard(info) -> None:
        raise KeyboardInterrupt(f"killed after {info.name}")

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_dataset(source, out, TINY, progress=False, on_shard=crash_after_first_shard)
    manifest = read_manifest(out, "train")
    assert not manifest["complete"] and [s["name"] for s in manifest["shards"]] == ["shard-000000.tar"]
    with pytest.raises(BuildError, match="not finished"):
        split_shards(out, "train")
    # what a kill can leave: a half-written tar, and a renamed shard the manifest never listed
    (out / "train" / "shard-000001.tar.tmp").write_bytes(b"half a tar")
    (out / "train" / "shard-000001.tar").write_bytes(b"renamed, not recorded")

    resumed = build_dataset(source, out, TINY, progress=False)
    assert resumed[0].resumed_from == manifest["shards"][0]["records"][1] > 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")

    mtime = (out / "train" / "manifest.json").stat().st_mtime_ns
    assert build_dataset(source, out, TINY, progress=False)[0].samples == 6  # finished: nothing redone
    assert (out / "train" / "manifest.json").stat().st_mtime_ns == mtime


def test_other_options_never_resume_into_a_folder(tmp_path) -> None:
    source = image_source(tmp_path / "src")
    build_dataset(source, tmp_path / "out", TINY, progress=False)
    other = BuildOptions(dataclasses.replace(TINY.encode, jpeg_quality=80), TINY.shard_bytes, workers=1)
    with pytest.raises(BuildError, match="other options \\(jpeg_quality 95 → 80\\)"):
        build_dataset(source, tmp_path / "out", other, progress=False)
    source.splits["test"] = source.splits["test"][:1]
    with pytest.raises(BuildError, match="test holds a build of other source records"):
        build_dataset(source, tmp_path / "out", TINY, progress=False)


@pytest.mark.parametrize("change, message", [
    (lambda r: [r[0], SourceRecord("im0", 1, "image", r[1].paths)], "duplicate key"),
    (lambda r: [SourceRecord("x", 3, "image", r[0].paths)], "label 3 outside 0..2"),
    (lambda r: [SourceRecord("x", None, "image", r[0].paths)], "label None"),
    (lambda r: [SourceRecord("x.y", 0, "image", r[0].paths)], "'x.y'"),
    (lambda r: [SourceRecord("x", 0, "video", r[0].paths)], "media 'video' in a image dataset"),
    (lambda r: [SourceRecord("x", 0, "image", r[0].paths, {"clip": "y"})], "reserved"),
])
def test_bad_records_fail_before_any_work(change, message, tmp_path) -> None:
    source = image_source(tmp_path / "src")
    source.splits["train"] = change(source.splits["train"])
    with pytest.raises(BuildError, match=message):
        build_dataset(source, tmp_path / "out", TINY, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- CLI
def test_cli_builds_dfew_folds(tmp_path, capsys) -> None:
    facts = fx.make_dfew(str(tmp_path / "dfew"), n_clips=6, frames=3, empty=True)
    out = tmp_path / "out"
    status = main(["dfew", "--root", facts["root"], "--out", str(out), "--workers", "1", "--no-progress",
                   "--frames-dir", "clip_jpg_256", "split_dir=EmoLabel_DataSplit"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "dfew (video)" in printed and "empty frame folder" in printed  # the reader's skip, summarised
    for k in range(1, 6):
        keys = [s["__key__"] for s in read_samples(fold_shards(out, k, "test"))]
        assert keys == sorted(facts["splits"][f"part{k}"])
    train_1 = read_samples(fold_shards(out, 1, "train"))
    assert len(train_1) == sum(len(facts["splits"][f"part{k}"]) for k in range(2, 6))
    assert read_manifest(out, "part1")["extensions"] == ["jpgs", "label", "json"]  # frame storage, the default


def test_cli_reports_source_format_error_with_file_and_line(tmp_path, capsys) -> None:
    facts = fx.make_dfew(str(tmp_path / "dfew"), n_clips=5, frames=2)
    path = facts["label_files"]["test_set_2"]
    rows = open(path).read().splitlines()
    Path(path).write_text("\n".join(["name,label"] + rows[1:]) + "\n")
    status = main(["dfew", "--root", facts["root"], "--out", str(tmp_path / "out"), "--no-progress"])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{path}:1: expected header" in err
    assert not (tmp_path / "out").exists()


def test_cli_names_unknown_dataset_options(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["dfew", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--frame-dir", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dataset dfew has no option --frame-dir" in err and "--frames-dir" in err
