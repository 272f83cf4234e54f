"""Recipe fidelity: the official min_lr rule, VoxCeleb2 crop, test batch and mask-token init;
fp16 as DeepSpeed's dynamic loss scaling with the router in fp32; and under
official.select_on_test the official best-epoch choice (whole train split, best epoch by test WAR, said as such)."""
from __future__ import annotations

import json

import pytest
import torch

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


def test_official_select_on_test(synthetic_shards, tmp_path):
    """No clips held out; the best epoch is the argmax of the per-epoch test WAR, labelled."""
    from s4d_dist.train.finetune import FinetuneTask
    from s4d_dist.train.loop import train

    overrides = tiny_overrides(synthetic_shards, tmp_path, "finetune") + [
        "official.select_on_test=true", "optim.epochs=3"]
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
    params = recipe.sample_params({"height": 224, "width": 224, "frames": 80}, rng)
    assert params.region.tolist() == [0, 32, 160, 192]  # the cut, resized to pre_size first
    assert params.pre_size.tolist() == [192, 192]  # short side 1.2 · 160 (the official resize)
    assert (params.rois >= 0).all() and (params.rois[:, 2:] <= 192 + 1e-4).all()
    with pytest.raises(ValueError, match=r"cut from 224×224 frames, but clip c7 is 256×256"):
        recipe.sample_params({"height": 256, "width": 256, "frames": 80, "clip": "c7"}, rng)
    with pytest.raises(config.ConfigError, match="needs data.video_source_frame"):
        config.load("pretrain_vit_base", ["data.video_source_frame=[]"])
    assert config.load("pretrain_vit_base", ["data.video_source_crop=[]",
                                             "data.video_source_frame=[]"])


def test_min_lr_divisor_must_be_positive():
    with pytest.raises(config.ConfigError, match="min_lr_batch_divisor must be > 0"):
        config.load("finetune_dfew", ["optim.min_lr_batch_divisor=0"])


# DeepSpeed's CPU accelerator refuses fp16 where oneDNN has no fp16 kernels (it asks this very
# function); there the engine cannot run fp16, and what is tested everywhere is the rest.
FP16_ENGINE = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_fp16_supported()
needs_fp16_engine = pytest.mark.skipif(
    not FP16_ENGINE, reason="DeepSpeed's CPU accelerator refuses fp16 on this CPU: "
    "torch.ops.mkldnn._is_mkldnn_fp16_supported() is false (no AVX-512 FP16 / AMX-FP16)")


def test_fp16_loss_scaling_is_the_official_grad_scalers():
    """The generated fp16 section gives DeepSpeed the official GradScaler's rule (§1.10): from
    2^16, halved at every overflow (that step skipped), doubled after 2000 clean steps —
    against torch's own GradScaler update (`_amp_update_scale_`). DeepSpeed counts a window
    from the step after the last overflow or growth, so each doubling lands one step after
    GradScaler's; every backoff lands on the same step."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    from s4d_dist.train import distributed
    from s4d_dist.train.ds_config import deepspeed_config

    distributed.init()  # the scaler logs an overflow from rank 0
    cfg = config.load("finetune_dfew", ["deepspeed.precision=fp16"])
    section = deepspeed_config(cfg, 2)["fp16"]
    assert section["enabled"] and section["loss_scale"] == 0  # 0: dynamic
    scaler = CreateLossScaler(torch.half, 0, True, DeepSpeedFP16Config(**section).dynamic_loss_scale_args())
    scale, tracker = torch.tensor(2.0 ** 16), torch.tensor(0, dtype=torch.int32)
    overflows = [False] * 2001 + [True] + [False] * 2001 + [True, True] + [False] * 4005
    late = []
    for step, overflow in enumerate(overflows):
        if scaler.cur_scale != scale.item():
            late.append(step)
            assert scaler.cur_scale * 2 == scale.item()  # the doubling not yet taken
        scaler.update_scale(overflow)
        torch._amp_update_scale_(scale, tracker, torch.tensor(float(overflow)), 2.0, 0.5, 2000)
    assert scaler.cur_scale == scale.item() == 2.0 ** 17  # up, down, up, down twice, up twice
    assert late == [2000, 4002, 6005, 8005]  # the steps right after each of GradScaler's doublings


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_routing_stays_fp32_in_a_half_model(tmp_path, dtype):
    """What DeepSpeed's fp16 / bf16 do to the module — every weight cast to half — leaves the
    router in fp32 (noisy logits, top-k, gates), as the official autocast has it (§1.10);
    the expert outputs, and gradients, are half."""
    from s4d_dist.models.factory import build_classifier

    cfg = config.load("demo_finetune", tiny_overrides(tmp_path, tmp_path, "finetune"))
    torch.manual_seed(0)
    model = build_classifier(cfg).to(dtype).train()
    layer = next(iter(model.moae_layers().values()))
    layer.record_routing = True
    logits = model(torch.randn(4, 3, 4, 32, 32).to(dtype), "video")
    logits.float().logsumexp(-1).mean().backward()
    routing = layer.routing
    assert routing.noisy_logits.dtype == routing.gates.dtype == torch.float32
    assert routing.out.dtype == logits.dtype == dtype
    assert layer.router.topkroute_linear.weight.grad.dtype == dtype


@needs_fp16_engine
def test_fp16_engine_skips_an_overflowing_step_and_halves_the_scale(tmp_path):
    """`deepspeed.precision=fp16` through DeepSpeed (ZeRO-1, as the presets): a step whose
    gradients overflow leaves the weights alone and halves the loss scale at once, and the next
    finite step trains; the router is fp32 inside the fp16 engine."""
    from s4d_dist.models.factory import build_classifier
    from s4d_dist.train import distributed
    from s4d_dist.train.engine import Stepper, build_engine

    cfg = config.load("demo_finetune", tiny_overrides(tmp_path, tmp_path, "finetune") + [
        "deepspeed.precision=fp16", "deepspeed.zero_stage=1"])
    distributed.init()
    torch.manual_seed(0)
    engine = build_engine(cfg, build_classifier(cfg))
    stepper = Stepper(engine)
    assert engine.fp16_enabled() and engine.dynamic_loss_scale() and stepper.dtype == torch.float16
    layer = next(iter(engine.module.moae_layers().values()))
    layer.record_routing = True
    pixels = torch.randn(4, 3, 4, 32, 32)

    def loss(factor: float = 1.0) -> torch.Tensor:
        logits = engine(pixels.to(stepper.dtype), "video")
        return logits.float().logsumexp(-1).mean() * factor

    stepper(loss(), 1e-3)
    assert layer.routing.noisy_logits.dtype == layer.routing.gates.dtype == torch.float32
    assert layer.routing.out.dtype == torch.float16
    scale, before = engine.optimizer.cur_scale, [p.detach().clone() for p in engine.module.parameters()]
    stepper(loss(1e6), 1e-3)  # finite loss, gradients past fp16's range once scaled
    assert engine.optimizer.cur_scale == scale / 2
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    stepper(loss(), 1e-3)
    assert not all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))


@needs_fp16_engine
def test_fp16_fine_tuning_runs_end_to_end(synthetic_shards, tmp_path):
    """Train, choose the best epoch, test, export: the whole fine-tuning run in fp16 on the CPU."""
    from s4d_dist.train.finetune import FinetuneTask
    from s4d_dist.train.loop import train

    cfg = config.load("demo_finetune", tiny_overrides(synthetic_shards, tmp_path, "finetune") + [
        "deepspeed.precision=fp16", "deepspeed.zero_stage=1", "optim.epochs=1"])
    results = train(cfg, FinetuneTask(cfg))
    assert results["last"]["samples"] == results["best"]["samples"] == 7
    assert results["nonfinite_steps"] == 0
    assert (tmp_path / "tiny" / "weights_fp32.pt").is_file()


def test_mask_token_is_cut_at_one_sigma():
    """The official pre-training model truncates its trunc-normal init at ±std (§1.1): at
    std .02 the 384 values of the ViT-B mask token lie within ±.02, with std 0.54 · .02."""
    from s4d_dist.models.mae import PretrainMAE

    token = PretrainMAE(img_size=32, num_frames=2, embed_dim=32, depth=1, num_heads=2,
                        decoder_dim=384, decoder_depth=1, decoder_heads=2).mask_token.detach()
    assert token.abs().max() <= 0.02
    assert token.std() == pytest.approx(0.02 * 0.5396, rel=0.15)


@pytest.mark.parametrize("preset", ["finetune_dfew", "finetune_ferv39k", "finetune_mafw"])
def test_paper_presets_test_16_views_a_forward(preset, synthetic_shards):
    """MoAE capacity is per forward, so the test batch decides which tokens are dropped: the
    paper presets test at the official 16 rows (views) a forward, the training clip batch."""
    from s4d_dist.data.loaders import eval_loader

    cfg = config.load(preset, ["data.fold=null", "data.test_shards=", "data.backend=torch",
                               "data.workers=0", "model.img_size=32", "model.num_frames=4",
                               f"data.video_shards={synthetic_shards / 'video' / 'train'}"])
    loader = eval_loader(cfg, "test", "video")
    try:
        rows = next(iter(loader.batches()))["pixels"]
    finally:
        loader.close()
    assert len(rows) == cfg.data.video_batch_size == 16
