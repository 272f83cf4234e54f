"""`python -m s4d_dist.analyze` on a tiny fine-tuning run: the report's routing shares against an
independent count (each router's logits, top-k taken here, valid rows only), its recalls against
the confusion matrices of metrics, the comparison table against the runs' metrics.json."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from s4d_dist import config

pytest.importorskip("matplotlib")


def strict_json(path):
    """The file parsed as JSON is defined: NaN, Infinity and -Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def independent_shares(folder, modality: str) -> np.ndarray:
    """Share of (token, choice) pairs per expert in each MoAE layer from the routers' logits."""
    from s4d_dist.data.loaders import eval_loader
    from s4d_dist.predict.model import load

    cfg = config.load(str(folder / "config.yaml"))
    network = load(str(folder)).network
    layers = network.moae_layers()
    logits: dict[int, torch.Tensor] = {}
    for index, layer in layers.items():
        layer.router.register_forward_hook(
            lambda module, args, output, index=index: logits.__setitem__(index, output[0]))
    counts = {index: np.zeros(cfg.model.moae.num_experts) for index in layers}
    loader = eval_loader(cfg, "test", modality)
    with torch.no_grad():
        for batch in loader.batches():
            network(batch["pixels"].float(), modality)
            valid = batch["valid"].bool()
            for index, z in logits.items():
                z = z.view(len(valid), -1, z.shape[-1])[valid]
                top = z.topk(cfg.model.moae.top_k, dim=-1).indices
                counts[index] += np.bincount(top.flatten().numpy(), minlength=z.shape[-1])
    loader.close()
    return {index: c / c.sum() for index, c in counts.items()}


def test_report_of_one_run(finished_finetune_runs):
    from s4d_dist.analyze import main
    from s4d_dist.train.metrics import per_class_recall

    assert main([str(finished_finetune_runs[0])]) == 0
    out = finished_finetune_runs[0] / "analysis"
    report = strict_json(out / "report.json")["runs"][0]
    assert (out / "routing.png").stat().st_size > 0 and (out / "transfer.png").stat().st_size > 0
    assert "routing.png" in (out / "report.md").read_text()
    for modality in ("image", "video"):
        expected = independent_shares(finished_finetune_runs[0], modality)
        for index, shares in expected.items():
            entry = report["routing"][f"layer{index}"][modality]
            np.testing.assert_allclose(entry["share"], shares, atol=1e-9)
            assert 0.0 <= entry["drop_rate"] <= 1.0 and entry["router_entropy"] > 0
    video = report["metrics"]["video"]
    np.testing.assert_allclose(report["transfer"]["video_recall"],
                               per_class_recall(np.array(video["confusion"])), equal_nan=True)
    assert report["transfer"]["classes"] == [c.lower() for c in report["classes"]["video"]]


def test_comparison_of_runs(finished_finetune_runs, tmp_path):
    from s4d_dist.analyze import main

    assert main([str(f) for f in finished_finetune_runs] + ["--out", str(tmp_path)]) == 0
    table = strict_json(tmp_path / "report.json")["comparison"]
    wars = [json.loads((f / "metrics.json").read_text())["last"]["war"] for f in finished_finetune_runs]
    assert table["last"]["war"]["mean"] == pytest.approx(np.mean(wars))
    assert table["last"]["war"]["std"] == pytest.approx(np.std(wars))
    assert len(table["recall_vs_first_last"]) == 1


def test_a_class_without_samples_is_null_not_nan(finished_finetune_runs, tmp_path):
    """A class absent from a run's test split has no recall: report.json says null there (JSON
    has no NaN), and the comparison's other numbers stay as they are."""
    import shutil

    from s4d_dist.analyze import main

    runs = [tmp_path / "a", tmp_path / "b"]
    for source, run in zip(finished_finetune_runs, runs):
        shutil.copytree(source, run, ignore=shutil.ignore_patterns("analysis"))
    metrics = json.loads((runs[1] / "metrics.json").read_text())
    confusion = np.array(metrics["last"]["confusion"])
    confusion[0] = 0  # class 0 had no test sample in run b
    metrics["last"]["confusion"] = confusion.tolist()
    (runs[1] / "metrics.json").write_text(json.dumps(metrics))
    assert main([str(r) for r in runs] + ["--out", str(tmp_path / "out")]) == 0
    difference = strict_json(tmp_path / "out" / "report.json")["comparison"]["recall_vs_first_last"][0]
    assert difference[0] is None and all(isinstance(d, float) for d in difference[1:])


def test_refuses_what_is_not_a_run(tmp_path, capsys):
    from s4d_dist.analyze import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2 and "not a finished run folder" in capsys.readouterr().err


def test_tensorboard_is_one_run_with_labelled_figures(finished_finetune_runs):
    """What a person opening TensorBoard sees: one run per training run (no sub-runs for each
    expert or for hparams), confusion matrices and recall bars as images of the card's size,
    expert load by modality in one figure, drop fractions by modality as scalars, no
    single-point hparam charts (tests/test_tracking.py reads the figures' labels)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from s4d_dist.train import figures

    tb = finished_finetune_runs[0] / "tb"
    assert [p for p in tb.iterdir() if p.is_dir()] == []
    events = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0}).Reload()
    images = set(events.Tags()["images"])
    assert {"test_last/confusion", "test_last/recall", "val/confusion", "val/recall",
            "moae/expert_load"} <= images
    scalars = set(events.Tags()["scalars"])
    assert {"moae/layer1/image/drop_fraction", "moae/layer1/video/drop_fraction"} & scalars
    assert not any(tag.startswith("hparam") for tag in scalars)
    confusion = events.Images("test_last/confusion")[-1]
    assert (confusion.width, confusion.height) == figures.CARD
