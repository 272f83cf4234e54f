"""The TensorBoard figures say what they should, readably: whole class names (upwards over the
confusion matrix's columns, one per column), the recall of each class by its name, the MAE
grid's rows named and its tiles enlarged, every MoAE layer's load by modality in one figure;
no label overlaps another or leaves the figure. Read from the labels each figure keeps, and the
event file's images compared with the figures that produced them; the HParams view has no
single-point charts of its own and no fold for a run without folds."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from s4d_dist.shards.synthetic_faces import AFFECTNET7
from s4d_dist.train import figures
from s4d_dist.train.metrics import per_class_recall
from s4d_dist.train.tracking import RunLogger

NAMES = list(AFFECTNET7)


def overlapping(labels: list[figures.Label]) -> list[tuple[str, str]]:
    return [(a.text, b.text) for a, b in itertools.combinations(labels, 2)
            if a.box[0] < b.box[2] and b.box[0] < a.box[2]
            and a.box[1] < b.box[3] and b.box[1] < a.box[3]]


def check_layout(canvas: figures.Canvas) -> None:
    """Every label inside the figure, none over another, none smaller than SMALL px; the figure
    is the size TensorBoard's card shows pixel for pixel (benchmarks/results/
    tensorboard_figures.json)."""
    width, height = canvas.image.size
    for label in canvas.labels:
        left, top, right, bottom = label.box
        assert 0 <= left and right <= width and 0 <= top and bottom <= height, label
        assert label.size >= figures.SMALL
    assert overlapping(canvas.labels) == []
    assert canvas.image.size == figures.CARD


def confusion_matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 12, (7, 7)) + np.diag(rng.integers(5, 125, 7))


def test_confusion_matrix_names_rows_and_columns_whole():
    cm = confusion_matrix()
    canvas = figures.confusion(cm, NAMES)
    check_layout(canvas)
    upward = [label for label in canvas.labels if label.vertical]
    across = {label.text: label for label in canvas.labels if not label.vertical}
    assert [label.text for label in upward] == NAMES  # whole names, one per column, in order
    assert all(name in across for name in NAMES)  # and one per row
    cells = [label for label in canvas.labels if label.text.isdigit()]
    assert [int(label.text) for label in cells] == cm.flatten().tolist()
    for j, column in enumerate(upward):  # each name stands over its column of counts
        below = cells[j::7]
        centres = [(c.box[0] + c.box[2]) / 2 for c in below]
        assert max(centres) - min(centres) <= 1
        assert abs((column.box[0] + column.box[2]) / 2 - centres[0]) <= 1
        assert column.box[3] < min(c.box[1] for c in below)
    for i, name in enumerate(NAMES):  # and each row's name is level with its counts
        row = cells[7 * i:7 * i + 7]
        assert across[name].box[2] < row[0].box[0]
        assert abs((across[name].box[1] + across[name].box[3]) / 2
                   - (row[0].box[1] + row[0].box[3]) / 2) <= 2


def test_recall_bars_name_every_class_with_its_value():
    cm = confusion_matrix()
    cm[3] = 0  # a class without samples
    recall = per_class_recall(cm).tolist()
    canvas = figures.recall_bars(recall, NAMES)
    check_layout(canvas)
    texts = [label.text for label in canvas.labels]
    assert texts[0] == "per-class recall"
    values = iter(texts[1:])
    for name, value in zip(NAMES, recall):
        assert next(values) == name
        assert next(values) == ("no samples" if np.isnan(value) else f"{value:.2f}")


def test_reconstruction_grid_names_its_rows_and_enlarges_tiles():
    """Three 30 px clips' frames: each row named on its left, each tile the picture enlarged
    to about 60 px (the card's height over three rows)."""
    rng = np.random.default_rng(1)
    rows = [rng.random((3, 3, 30, 30)).astype(np.float32) for _ in range(3)]
    canvas = figures.reconstruction_grid(rows, "middle frame of each clip")
    check_layout(canvas)
    assert [label.text for label in canvas.labels] == ["middle frame of each clip", "original",
                                                       "masked", "reconstruction"]
    left = canvas.labels[1].box[2] + 8  # names end 8 px left of the tiles
    pixels = np.asarray(canvas.image)
    for r, label in enumerate(canvas.labels[1:]):  # each name level with its row of tiles
        middle = round((label.box[1] + label.box[3]) / 2)
        rgb = Image.fromarray((rows[r][0].transpose(1, 2, 0) * 255).round().astype(np.uint8))
        found = [(side, y) for side in range(50, 70)
                 for y in range(middle - side // 2 - 6, middle - side // 2 + 6)
                 if np.array_equal(pixels[y:y + side, left:left + side],
                                   np.asarray(rgb.resize((side, side), Image.BILINEAR)))]
        assert len(found) == 1 and found[0][0] >= 55, (label.text, found)


def loads(experts: int = 4) -> dict[int, dict[str, figures.LayerLoad]]:
    rng = np.random.default_rng(2)
    return {layer: {m: figures.LayerLoad(rng.dirichlet(np.ones(experts)), step)
                    for m, step in (("image", 2), ("video", 4))} for layer in range(6, 12)}


def cell_texts(canvas: figures.Canvas, layer: int) -> list[str]:
    """The texts level with a layer's name, left to right."""
    name = next(label for label in canvas.labels if label.text == f"layer {layer}")
    middle = (name.box[1] + name.box[3]) / 2
    level = [label for label in canvas.labels if label is not name
             and label.box[1] <= middle <= label.box[3]]
    assert all(label.box[0] > name.box[2] for label in level)
    return [label.text for label in sorted(level, key=lambda label: label.box[0])]


def test_expert_load_shows_every_layer_by_modality_in_one_figure():
    """ViT-B's six MoAE layers (blocks 6-11) of four experts: a row per layer, each expert's
    share of the image and of the video tokens under its modality's name."""
    per_layer = loads()
    canvas = figures.expert_load(per_layer)
    check_layout(canvas)
    texts = [label.text for label in canvas.labels]
    image, video = (next(label for label in canvas.labels if label.text == m)
                    for m in ("image", "video"))
    assert image.box[2] < video.box[0]  # the modalities side by side, image first
    assert texts.count("e0") == texts.count("e3") == 2
    for layer, per in per_layer.items():
        assert cell_texts(canvas, layer) == [f"{per[m].share[e]:.2f}"
                                             for m in ("image", "video") for e in range(4)]
    assert texts[-1] == "last batch: image step 2, video step 4; even 0.25"
    # before any video batch is logged: its cells say so
    alone = figures.expert_load({6: {"image": per_layer[6]["image"]}})
    assert cell_texts(alone, 6)[4:] == ["n/a"] * 4


def event_images(folder) -> dict[str, np.ndarray]:
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return {tag: np.asarray(Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)))
            for tag in events.Tags()["images"]}


def test_run_logger_writes_the_figures_and_a_clean_hparams_view(tmp_path):
    logger = RunLogger(tmp_path)
    cm = confusion_matrix()
    logger.confusion("test_last/confusion", cm, 10, NAMES)
    per_layer = loads()
    for step, modality in ((2, "image"), (4, "video")):  # one modality per logged step
        stats = {layer: {"tokens_per_expert": torch.tensor(per[modality].share * 1000),
                         "drop_fraction": torch.tensor(0.01 * layer),
                         "router_entropy": torch.tensor(1.0)} for layer, per in per_layer.items()}
        logger.expert_load(stats, step, modality)
    rng = np.random.default_rng(3)
    clips = [torch.from_numpy(rng.random((4, 3, 4, 32, 32)).astype(np.float32)) for _ in range(3)]
    logger.reconstruction("video", *clips, step=4)
    logger.scalars({"test_last/war": 50.0, "test_last/uar": 40.0}, 10)
    logger.hparams({"base_lr": 1e-3, "experts": 4, "moae": True},
                   ["test_last/war", "test_last/uar"])
    logger.close()

    images = event_images(tmp_path / "tb")
    assert set(images) == {"test_last/confusion", "test_last/recall", "moae/expert_load",
                           "mae/video"}
    np.testing.assert_array_equal(images["test_last/confusion"],
                                  np.asarray(figures.confusion(cm, NAMES).image))
    np.testing.assert_array_equal(images["test_last/recall"], np.asarray(
        figures.recall_bars(per_class_recall(cm).tolist(), NAMES).image))
    shares = {layer: {m: figures.LayerLoad(
        (torch.tensor(per[m].share * 1000) / torch.tensor(per[m].share * 1000).sum()).numpy(),
        per[m].step) for m in ("image", "video")} for layer, per in per_layer.items()}
    np.testing.assert_array_equal(images["moae/expert_load"],
                                  np.asarray(figures.expert_load(shares).image))
    middle = [c[:3, :, 2].numpy() for c in clips]  # 3 clips shown
    np.testing.assert_array_equal(images["mae/video"], np.asarray(
        figures.reconstruction_grid(middle, "middle frame of each clip").image))

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert not any(tag.startswith("hparam") for tag in scalars)
    assert {f"moae/layer{layer}/{m}/drop_fraction" for layer in per_layer
            for m in ("image", "video")} <= scalars
    drops = events.Scalars("moae/layer7/video/drop_fraction")
    assert [(e.step, round(e.value, 6)) for e in drops] == [(4, 0.07)]
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert [h.name for h in experiment.hparam_infos] == ["base_lr", "experts", "moae"]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["experts"].string_value == "4"  # shown as 4, not 4.0000
    assert start.hparams["base_lr"].number_value == 1e-3
    assert [m.name.tag for m in experiment.metric_infos] == ["test_last/war", "test_last/uar"]
    assert {m.name.tag for m in experiment.metric_infos} <= scalars  # the table's values


@pytest.mark.parametrize("fold", [None, 3])
def test_hparams_name_a_fold_only_for_a_kfold_run(fold):
    from s4d_dist import config
    from s4d_dist.train.finetune import _hparams

    cfg = config.load("demo_finetune", [f"data.fold={'null' if fold is None else fold}"])
    params = _hparams(cfg)
    assert ("fold" in params) == (fold is not None) and params.get("fold") == fold
    off = _hparams(config.load("demo_finetune", ["model.moae.enabled=false"]))
    assert "experts" not in off and "top_k" not in off
