"""The official code's bugs as named switches (docs/method.md §3): each `official.*` key does
what its section says the official code does — checked against the official arithmetic where it
is numeric, and against the default, which must differ — and `recipe=official` sets them all
with fp16 and the official evaluation batches. One test per switch, each through the config."""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.data import plan
from s4d_dist.models.factory import build_classifier

OFFICIAL = tuple(config.OfficialConfig.__dataclass_fields__)


def finetune_cfg(*extra: str, shards: Path = Path("unused")):
    return config.load("demo_finetune", tiny_overrides(shards, shards, "finetune") + list(extra))


def classifier(*extra: str) -> nn.Module:
    torch.manual_seed(0)
    return build_classifier(finetune_cfg(*extra))


def clips(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))


def official_layer_loss(gate_logits: torch.Tensor, top_k: int, num_experts: int) -> torch.Tensor:
    """NoisyTopkRouter.get_layer_loss (S/videomae.py:125-135), transcribed: P is the mean of
    the noisy logits themselves."""
    _, selected = torch.topk(gate_logits, top_k, dim=-1)
    mask = torch.nn.functional.one_hot(selected, num_experts).max(dim=-2).values.float()
    return torch.mean(mask.mean(dim=-2) * gate_logits.mean(dim=-2)) * num_experts ** 2


# ---- one switch each -----------------------------------------------------------------------

def test_aux_loss_not_applied_leaves_the_cross_entropy_alone():
    """§3.1: the official loss is the cross-entropy alone; ours adds aux_loss_coeff · aux."""
    from s4d_dist.train.finetune import FinetuneTask, mix_batch, soft_target_cross_entropy

    batch = {"modality": "video", "pixels": clips(4), "label": torch.tensor([0, 1, 2, 3])}
    losses = {}
    for flag in (False, True):
        cfg = finetune_cfg(f"official.aux_loss_not_applied={flag}")
        model = classifier(f"official.aux_loss_not_applied={flag}").train()
        run = SimpleNamespace(engine=SimpleNamespace(module=model), device=torch.device("cpu"),
                              dtype=torch.float32)
        task = FinetuneTask(cfg)
        inputs = task.inputs(run, batch, np.random.default_rng(3))
        torch.manual_seed(2)
        losses[flag] = task.objective(run)(*inputs)
        torch.manual_seed(2)  # the same forward (router noise), by hand
        pixels, targets = mix_batch(batch["pixels"], batch["label"], 7, cfg.augment, np.random.default_rng(3))
        logits, aux = model(pixels, "video", with_aux=True)
        cross_entropy = soft_target_cross_entropy(logits, targets)
        expected = cross_entropy if flag else cross_entropy + cfg.model.moae.aux_loss_coeff * aux
        assert aux is not None and losses[flag].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses[False] != losses[True]


@pytest.mark.parametrize("flag", [False, True])
def test_aux_loss_on_logits_is_the_official_layer_loss(flag):
    """§3.2: the official P is the mean raw noisy logit (unbounded below); ours a probability."""
    model = classifier(f"official.aux_loss_on_logits={flag}").train()
    layer = next(iter(model.moae_layers().values()))
    layer.record_routing = True
    _, aux = model(clips().requires_grad_(), "video", with_aux=True)
    z = layer.routing.noisy_logits.detach().view(3, -1, layer.num_experts)
    official = official_layer_loss(z, layer.top_k, layer.num_experts)
    softmax = official_layer_loss(z.softmax(-1), layer.top_k, layer.num_experts)  # same top-k
    assert aux.item() == pytest.approx((official if flag else softmax).item(), rel=1e-5)
    assert official.item() != pytest.approx(softmax.item(), rel=1e-3)


def test_router_noise_at_eval_makes_test_predictions_random():
    """§3.3: the official adds z + ε·softplus(W_n h) in eval as in training."""
    x = clips()
    for flag in (False, True):
        model = classifier(f"official.router_noise_at_eval={flag}")
        with torch.no_grad():
            evals = []
            for seed in (5, 5, 6):
                torch.manual_seed(seed)
                evals.append(model.eval()(x, "video"))
            torch.manual_seed(5)
            trained = model.train()(x, "video")  # dropout and drop-path are 0: only the noise draws
        assert torch.equal(evals[0], evals[1])
        if flag:  # eval draws the training forward's noise: the same output, another seed another
            assert torch.equal(evals[0], trained) and not torch.equal(evals[0], evals[2])
        else:
            assert torch.equal(evals[0], evals[2]) and not torch.equal(evals[0], trained)


def test_stale_aux_loss_keeps_the_last_grad_batch():
    """§3.4: the official refreshes the layer loss only when the input requires grad."""
    x = clips()
    for flag in (False, True):
        model = classifier(f"official.stale_aux_loss={flag}").train()
        _, first = model(x.clone().requires_grad_(), "video", with_aux=True)
        with torch.no_grad():
            _, no_grad = model(x * 2, "video", with_aux=True)  # training mode, no grad
            _, in_eval = model.eval()(x * 3, "video", with_aux=True)
        if flag:
            assert torch.equal(no_grad, first) and torch.equal(in_eval, first)
        else:
            assert not torch.equal(no_grad, first) and in_eval is None


def test_select_on_test_trains_on_the_whole_split(synthetic_shards):
    """§3.8: no clips held out of train; the best epoch is chosen on the test split."""
    from s4d_dist.data.loaders import eval_catalog, train_catalog
    from s4d_dist.orchestrate.sweep import reported_metrics
    from s4d_dist.train.finetune import FinetuneTask

    for flag, split in ((False, "val"), (True, "test")):
        cfg = finetune_cfg(f"official.select_on_test={flag}", shards=synthetic_shards)
        whole = len(eval_catalog(cfg, "train", "video"))
        assert (len(train_catalog(cfg, "video")) == whole) is flag
        assert FinetuneTask(cfg).selection_split() == split
        assert reported_metrics(cfg) == {"train_loss", f"{split}_war", f"{split}_uar"}


def test_squash_test_frames_makes_the_crops_one_view():
    """§3.9: the official resizes test frames to S×S, so its crop step (max(H, W) − S)/(crops − 1)
    is 0 (kinetics.py:453-458): both spatial crops are the whole frame."""
    from s4d_dist.data.recipes import recipe_from_config

    meta = {"height": 48, "width": 80, "frames": 8}
    for flag in (False, True):
        cfg = finetune_cfg(f"official.squash_test_frames={flag}", "data.test_spatial_crops=2")
        recipe = recipe_from_config(cfg, "eval", "video")
        rois = [tuple(recipe.view_params(meta, view).rois[0]) for view in (0, 1)]
        if flag:
            step = (max(32, 32) - 32) / (recipe.spatial_crops - 1)
            assert step == 0 and rois == [(0.0, 0.0, 48.0, 80.0)] * 2
        else:  # short side to 32, 32-squares sliding along the long side: two different views
            assert rois[0] != rois[1] and all(r[2] - r[0] == pytest.approx(r[3] - r[1], rel=0.02) for r in rois)
    train = recipe_from_config(finetune_cfg("official.squash_test_frames=true"), "finetune", "video")
    assert not train.squash  # training frames keep their aspect ratio: that is §3.11's switch


def test_squash_train_frames_resizes_to_a_square_before_augmentation():
    """§3.11: official training frames are resized to (S, S) (kinetics.py:404), aspect lost."""
    from s4d_dist.data.recipes import recipe_from_config

    meta = {"height": 48, "width": 80, "frames": 8}
    for flag, size in ((False, (32, 53)), (True, (32, 32))):
        cfg = finetune_cfg(f"official.squash_train_frames={flag}")
        params = recipe_from_config(cfg, "finetune", "video").sample_params(meta, np.random.default_rng(0))
        assert tuple(params.pre_size) == size  # 80 / 48 · 32 = 53.3, floored
        assert recipe_from_config(cfg, "eval", "video").squash is False


def test_pretrain_decay_qv_bias_is_the_official_fnmatch_rule(tmp_path):
    """§3.17: the official rule (CFG:183-192) exempts parameters matching `*.bias` and those of
    a LayerNorm, so q_bias, v_bias and mask_token decay; ours exempts them too."""
    from s4d_dist.models.factory import build_mae
    from s4d_dist.train import distributed
    from s4d_dist.train.engine import build_engine

    distributed.init()
    for flag in (False, True):
        cfg = config.load("demo", tiny_overrides(tmp_path, tmp_path, "pretrain") + [
            f"official.pretrain_decay_qv_bias={flag}", "deepspeed.zero_stage=0",
            "deepspeed.precision=fp32"])
        model = build_mae(cfg)
        engine = build_engine(cfg, model)
        decays = {id(p): g.weight_decay for g in engine.flat_optimizer.flat for p in g.params}
        norms = {f"{m}.{n}" if m else n for m, module in model.named_modules()
                 if isinstance(module, nn.LayerNorm) for n, _ in module.named_parameters()}
        for name, param in model.named_parameters():
            official = 0.0 if fnmatch.fnmatch(name, "*.bias") or name in norms else 0.05
            ours = 0.0 if name.endswith(("bias", "mask_token")) or param.ndim == 1 else 0.05
            assert decays[id(param)] == (official if flag else ours), name
        assert any(fnmatch.fnmatch(n, "*q_bias") for n, _ in model.named_parameters())


def test_pretrain_global_cosine_starts_below_the_peak():
    """§3.24: fvcore's composite evaluates the cosine at the global progress `where`, so right
    after the 5 % warm-up it gives ½(1 + cos(0.05π))·lr ≈ 0.9938·lr."""
    from s4d_dist.train.schedule import Schedule

    for flag in (False, True):
        cfg = config.load("pretrain_vit_base", [f"official.pretrain_global_cosine={flag}"])
        schedule = Schedule(cfg, steps_per_epoch=10, world_size=2)
        after_warmup = schedule(50)  # step 50 of 1000: where = 0.05
        official = 0.5 * (1 + math.cos(math.pi * 0.05)) * schedule.peak
        assert after_warmup == pytest.approx(official if flag else schedule.peak, rel=1e-12)
    assert config.load("finetune_dfew", ["official.pretrain_global_cosine=true"]).task == "finetune"


# ---- the official evaluation batch ---------------------------------------------------------

def official_test_rows(num_clips: int, views: int, rank: int, world: int) -> list[tuple[int, int]]:
    """What the official final test hands one rank: its dataset lists every clip once per view,
    view-major (kinetics.py:370-379), read by DistributedSampler(shuffle=False)
    (run_class_finetuning.py:319-324) — torch's own sampler here."""
    rows = [(clip, view) for view in range(views) for clip in range(num_clips)]
    sampler = torch.utils.data.DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False)
    return [rows[i] for i in sampler]


@pytest.mark.parametrize("clips_, views, world, batch", [(37, 4, 2, 16), (10, 4, 3, 5), (7, 4, 1, 4)])
def test_view_order_is_the_official_test_order(clips_, views, world, batch):
    """data.eval_order=view: each rank's forwards hold the official rows in the official order;
    the sampler's wrap-around duplicates are padding rows here (dropped from the metrics as the
    official merge drops duplicates)."""
    total = clips_ * views
    for rank in range(world):
        ours = plan.eval_rows(clips_, views, rank, world, batch, order="view").reshape(-1, 2)
        official = official_test_rows(clips_, views, rank, world)
        duplicate = [rank + k * world >= total for k in range(len(official))]
        assert len(ours) == -(-len(official) // batch) * batch
        for k, (row, dup) in enumerate(zip(official, duplicate)):
            assert tuple(ours[k]) == ((-1, -1) if dup else row)
        assert (ours[len(official):] == -1).all()


def test_sample_order_is_unchanged():
    """The default keeps a sample's views side by side, one contiguous block per rank."""
    rows = plan.eval_rows(5, 2, 1, 2, 3)
    assert rows.tolist() == [[[2, 1], [3, 0], [3, 1]], [[4, 0], [4, 1], [-1, -1]]]
    assert np.array_equal(rows, plan.eval_rows(5, 2, 1, 2, 3, order="sample"))


def test_official_recipe_tests_one_view_of_many_clips_a_forward(synthetic_shards):
    """Under recipe=official every evaluation forward is `video_batch_size` rows of one view
    (two where the list passes from one view to the next), each row another clip."""
    from s4d_dist.data.loaders import eval_loader

    cfg = finetune_cfg("recipe=official", shards=synthetic_shards)
    assert cfg.data.eval_batch_size == cfg.data.video_batch_size == 4
    loader = eval_loader(cfg, "test", "video")
    try:
        batches = list(loader.batches())
    finally:
        loader.close()
    num_clips = loader.num_samples
    seen = []
    for batch in batches:
        valid = batch["valid"]
        index, view = batch["index"][valid], batch["view"][valid]
        assert len(set(index.tolist())) == len(index) and len(set(view.tolist())) <= 2
        seen += list(zip(view.tolist(), index.tolist()))
    assert seen == [(v, c) for v in range(loader.recipe.views) for c in range(num_clips)]


# ---- the profile ---------------------------------------------------------------------------

def test_official_recipe_sets_every_behaviour_fp16_and_the_test_batches(capsys):
    from s4d_dist.train import cli
    from s4d_dist.train.ds_config import deepspeed_config

    default = config.load("finetune_dfew")
    assert default.recipe == "default" and not any(default.official[k] for k in OFFICIAL)
    assert (default.deepspeed.precision, default.data.eval_order) == ("bf16", "sample")

    cfg = config.load("finetune_dfew", ["recipe=official"])
    assert all(cfg.official[k] for k in OFFICIAL)
    assert (cfg.deepspeed.precision, cfg.data.eval_batch_size, cfg.data.eval_order) == ("fp16", 16, "view")
    fp16 = deepspeed_config(cfg, 2)["fp16"]  # the official GradScaler: 2^16, halve at once, ×2 / 2000
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                    "loss_scale_window": 2000, "hysteresis": 1}

    with pytest.raises(SystemExit):
        cli.parse("finetune", ["--config", "finetune_dfew", "recipe=official", "--print-config"])
    printed = capsys.readouterr().out
    header = [line for line in printed.splitlines() if line.startswith("# recipe=official sets ")]
    assert len(header) == len(OFFICIAL) + 3
    assert "# recipe=official sets deepspeed.precision=fp16" in header
    assert "# recipe=official sets data.eval_order=view" in header
    assert config.from_values(("printed", yaml.safe_load(printed))) == cfg

    # Later layers still change what the recipe set; pre-training gets its own switches too.
    mixed = config.load("finetune_dfew", ["recipe=official", "official.select_on_test=false",
                                          "data.video_batch_size=8"])
    assert not mixed.official.select_on_test and mixed.data.eval_batch_size == 8
    pretrain = config.load("pretrain_vit_base", ["recipe=official"])
    assert pretrain.official.pretrain_global_cosine and pretrain.deepspeed.precision == "fp16"


def test_official_quirks_is_refused_on_the_command_line_and_mapped_in_saved_configs():
    with pytest.raises(config.ConfigError, match=r"'official_quirks' is replaced by .*recipe=official"):
        config.load("finetune_dfew", ["official_quirks=true"])
    old = {"task": "finetune", "official_quirks": True}  # a config.yaml or model card from before
    assert all(config.from_values(("old run", old)).official[k] for k in OFFICIAL)
    assert not any(config.from_values(("old run", {**old, "official_quirks": False})).official[k]
                   for k in OFFICIAL)
