"""Recipe fidelity switches: the official min_lr rule, and under official_quirks the official
best-epoch choice (whole train split, best epoch by test WAR, said as such)."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.data.loaders import eval_catalog, train_catalog
from s4d_dist.orchestrate.sweep import reported_metrics
from s4d_dist.train.schedule import Schedule, final_lr


@pytest.mark.parametrize("world, expected", [(2, 1.25e-7), (8, 5e-7)])
def test_min_lr_follows_the_global_batch(world, expected):
    """Official fine-tuning: min_lr = 1e-6 · (16 clips · ranks) / 256 (1.25e-7 on 2 GPUs)."""
    cfg = config.load("finetune_dfew")
    assert final_lr(cfg, world) == pytest.approx(expected)
    schedule = Schedule(cfg, steps_per_epoch=10, world_size=world)
    assert schedule(schedule.total - 1) == pytest.approx(expected, rel=1e-3)


def test_min_lr_without_divisor_is_as_given():
    assert final_lr(config.load("demo_finetune"), 8) == pytest.approx(1e-5)


def test_official_quirks_select_on_test(synthetic_shards, tmp_path):
    """No clips held out; the best epoch is the argmax of the per-epoch test WAR, labelled."""
    from s4d_dist.train.finetune import FinetuneTask
    from s4d_dist.train.loop import train

    overrides = tiny_overrides(synthetic_shards, tmp_path, "finetune") + [
        "official_quirks=true", "optim.epochs=3"]
    cfg = config.load("demo_finetune", overrides)
    held = config.load("demo_finetune", tiny_overrides(synthetic_shards, tmp_path, "finetune"))
    full = eval_catalog(cfg, "train", "video")
    assert len(train_catalog(cfg, "video").keys) == len(full.keys)
    assert len(train_catalog(held, "video").keys) < len(full.keys)
    assert reported_metrics(cfg) == {"train_loss", "test_war", "test_uar"}

    results = train(cfg, FinetuneTask(cfg))
    metrics = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    history = results["test_war_by_epoch"]
    assert len(history) == 3 and metrics["best_selected_on"] == "test"
    assert results["best_epoch"] == 1 + history.index(max(history))
    assert results["best_test_war"] == pytest.approx(max(history))
    assert results["best"]["war"] == pytest.approx(max(history))  # the same test split


def test_paper_preset_cuts_voxceleb2_frames_and_only_those():
    """pretrain_vit_base reproduces the official 224² → rows 0:160 × cols 32:192 cut, and a clip
    of another frame size is refused, not cut where the crop was not meant to go."""
    import numpy as np

    from s4d_dist.data.recipes import recipe_from_config

    cfg = config.load("pretrain_vit_base")
    assert list(cfg.data.video_source_crop) == [0, 32, 160, 192]
    recipe = recipe_from_config(cfg, "pretrain", "video")
    rng = np.random.default_rng(0)
    rois = recipe.sample_params({"height": 224, "width": 224, "frames": 80}, rng).rois
    assert (rois[:, 1] >= 32).all() and (rois[:, 3] <= 192 + 1e-4).all()
    with pytest.raises(ValueError, match=r"cut from 224×224 frames, but clip c7 is 256×256"):
        recipe.sample_params({"height": 256, "width": 256, "frames": 80, "clip": "c7"}, rng)
    with pytest.raises(config.ConfigError, match="needs data.video_source_frame"):
        config.load("pretrain_vit_base", ["data.video_source_frame=[]"])
    assert config.load("pretrain_vit_base", ["data.video_source_crop=[]",
                                             "data.video_source_frame=[]"])


def test_min_lr_divisor_must_be_positive():
    with pytest.raises(config.ConfigError, match="min_lr_batch_divisor must be > 0"):
        config.load("finetune_dfew", ["optim.min_lr_batch_divisor=0"])
