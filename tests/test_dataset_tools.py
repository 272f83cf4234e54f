"""`python -m s4d_dist.shards inspect` / `verify` on small synthetic datasets: the counts are the
builder's (3 train and 1 test sample per class, 7 classes), a damaged byte and a truncated tar
are found and named, and the exit status says so."""
from __future__ import annotations

import shutil

from PIL import Image, ImageFont

import data_shards as ds
from s4d_dist.shards.tools import inspect_dataset, preview, verify_dataset
from s4d_dist.shards.__main__ import main


def test_inspect_counts_and_preview(synthetic_shards, tmp_path):
    report = inspect_dataset(synthetic_shards / "video")
    assert report["modality"] == "video" and len(report["class_names"]) == 7
    train = report["splits"]["train"]
    assert train["samples"] == 21 and set(train["per_class"].values()) == {3}
    assert train["frame_sizes"] == ["32x32"] and train["frames"]["min"] == 8
    assert report["splits"]["test"]["samples"] == 7
    png = preview(synthetic_shards / "video", tmp_path / "p.png", per_class=2, frames=4, tile=16)
    names = ImageFont.load_default(size=14)  # a column of class names on the left
    margin = 12 + max(int(names.getlength(name)) for name in report["class_names"])
    assert Image.open(png).size == (margin + 2 * 4 * 16, 7 * 16)
    image = preview(synthetic_shards / "image", tmp_path / "i.png", tile=16)
    assert Image.open(image).size == (margin + 32, 112)
    assert report["skipped_inputs"] == report["reader_skipped"] == 0


def test_verify_finds_damage(synthetic_shards, tmp_path, capsys):
    assert verify_dataset(synthetic_shards / "image", progress=False)["ok"]
    assert main(["verify", str(synthetic_shards / "image")]) == 0
    bad = ds.corrupt_copy(synthetic_shards / "image", tmp_path / "image", "train", {4: "header"})
    report = verify_dataset(tmp_path / "image", progress=False)["splits"]["train"]
    assert len(report["shards"]) == 1 and "sha256 differs" in report["shards"][0]
    assert len(report["samples"]) == 1 and bad[4] in report["samples"][0]
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "image")]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_finds_truncation_and_cli_errors(synthetic_shards, tmp_path, capsys):
    shutil.copytree(synthetic_shards / "video", tmp_path / "video")
    tar = sorted((tmp_path / "video" / "train").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    report = verify_dataset(tmp_path / "video", progress=False)["splits"]["train"]
    assert any("bytes, the manifest says" in p for p in report["shards"])
    assert any("truncated shards" in p for p in report["shards"])
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "dataset.json" in capsys.readouterr().err
