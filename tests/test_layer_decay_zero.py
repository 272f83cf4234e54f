"""Layer-wise lr decay reaches the parameters under the flat AdamW (ZeRO-0: two groups, a scale
per parameter) and under ZeRO-1 and ZeRO-2 (one rank, DeepSpeed's CPU accelerator): the
optimizer's groups carry lr = base × scale after a step, and — an oracle that does not read the
groups — Adam's first step moves every weight by its own lr (m̂/√v̂ =
sign(g) on step 1 with eps ≈ 0 and no weight decay), so |Δw| read off the weights gives each layer's scale."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
from s4d_dist import config
from s4d_dist.models.factory import build_classifier
from s4d_dist.train import distributed
from s4d_dist.train.engine import Stepper, build_engine

DEPTH, DECAY, BASE = 2, 0.5, 1e-3


def expected_scale(name: str) -> float:
    """docs/method.md §2.9 by hand: patch embedding decay^(depth+1), block j decay^(depth-j),
    the rest 1."""
    if name.startswith("patch_embed"):
        return DECAY ** (DEPTH + 1)
    if name.startswith("blocks."):
        return DECAY ** (DEPTH - int(name.split(".")[1]))
    return 1.0


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_layer_decay_scales_every_group_under_zero(tmp_path, stage):
    distributed.init()
    cfg = config.load("demo", tiny_overrides(tmp_path, tmp_path, "finetune") + [
        f"optim.layer_decay={DECAY}", "optim.weight_decay=0", "optim.eps=1e-20", f"deepspeed.zero_stage={stage}",
        "deepspeed.precision=fp32"])
    assert cfg.model.depth == DEPTH
    torch.manual_seed(0)
    engine = build_engine(cfg, build_classifier(cfg))
    assert engine.zero_optimization_stage() == stage
    model = engine.module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pixels = torch.randn(2, 3, cfg.model.num_frames, 32, 32)
    Stepper(engine)(model(pixels, "video").float().logsumexp(-1).mean(), BASE)

    if stage == 0:  # the flat AdamW: ≤ 2 groups on the host, a scale per parameter
        optimizer = engine.flat_optimizer
        assert len(optimizer.param_groups) == 2
        for group in optimizer.flat:
            for name, scale in zip(group.names, group.scales):
                assert scale == pytest.approx(expected_scale(name)), name
    else:
        assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"  # its groups step
        groups = engine.optimizer.param_groups
        assert len(groups) >= 4
        for group in groups:
            lid = int(group["name"].split("_")[0].removeprefix("layer"))
            assert group["lr_scale"] == pytest.approx(DECAY ** (DEPTH + 1 - lid)), group["name"]
            assert group["lr"] == pytest.approx(BASE * DECAY ** (DEPTH + 1 - lid)), group["name"]

    moved = {}
    for name, param in model.named_parameters():
        step = (param.detach() - before[name]).abs()
        if step.max() > 0:  # the image head and unrouted experts get no gradient
            moved[name] = step.max().item() / BASE
            assert moved[name] == pytest.approx(expected_scale(name), rel=1e-3), name
    scales = {expected_scale(n) for n in moved}
    assert scales == {DECAY ** 3, DECAY ** 2, DECAY, 1.0}, moved  # every layer depth was checked
