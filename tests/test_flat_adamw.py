"""The flat AdamW (train/flat_adamw.py) against torch's AdamW with one group per lr scale, the
reference it replaces: the host step bit for bit, the device step to float rounding — with
layer-wise lr decay, a parameter left without a gradient (the other modality's head), a skipped
step, its state saved and refused, and its update traced by dynamo without a graph break."""
from __future__ import annotations

import copy

import pytest
import torch

from s4d_dist.models.classifier import S4DClassifier
from s4d_dist.models.param_groups import param_groups
from s4d_dist.train.flat_adamw import FlatAdamW, OptimizerStateError, flat_adamw

TINY = dict(img_size=32, patch=16, tubelet=2, num_frames=4, embed_dim=32, depth=2, num_heads=2,
            moae_layers=(1,), num_experts=3, top_k=2)
BETAS, EPS, WD = (0.9, 0.999), 1e-8, 0.05


def train(model, step_fn, steps: int = 6) -> None:
    """Steps alternating modalities (two clip steps, one image step): the head of the other
    modality gets no gradient in each, and the heads' step counts drift apart."""
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        shape = (2, 3, 4, 32, 32) if step % 3 else (2, 3, 32, 32)
        torch.manual_seed(step)  # the router noise
        model(torch.randn(shape, generator=g), with_aux=True)[0].logsumexp(-1).mean().backward()
        step_fn(1e-3 * (step + 1))


def reference(model, decay: float):
    optimizer = torch.optim.AdamW(param_groups(model, WD, decay, depth=2, by_layer=True),
                                  lr=0.0, betas=BETAS, eps=EPS)

    def step(lr):
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, step


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_host_step_is_torch_adamw_bit_for_bit(decay):
    torch.manual_seed(0)
    model = S4DClassifier(**TINY)
    ours = copy.deepcopy(model)
    groups = param_groups(ours, WD, decay, depth=2)
    assert len(groups) == 2  # decay / no decay, whatever the number of layers
    optimizer = FlatAdamW(groups, BETAS, EPS)

    def step(lr):
        optimizer.set_lr(lr)
        optimizer.step()
        optimizer.zero_grad()
    train(model, reference(model, decay)[1])
    train(ours, step)
    for (name, want), got in zip(model.named_parameters(), ours.parameters()):
        assert torch.equal(got, want), name
    # the image head stepped 2 times, the video head 4: each keeps its own count
    counts = dict(zip(optimizer.flat[1].names, optimizer.flat[1].steps))
    assert counts["head.image.bias"] == 2 and counts["head.video.bias"] == 4


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_device_step_is_torch_adamw_to_rounding(decay):
    torch.manual_seed(0)
    model = S4DClassifier(**TINY)
    ours = copy.deepcopy(model)
    optimizer = FlatAdamW(param_groups(ours, WD, decay, depth=2), BETAS, EPS)

    def step(lr):
        optimizer.set_lr(lr)
        optimizer.device_step(torch.zeros(()))
        optimizer.zero_grad()
    train(model, reference(model, decay)[1])
    train(ours, step)
    for (name, want), got in zip(model.named_parameters(), ours.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_parameters_step_fp32_masters():
    torch.manual_seed(0)
    model = S4DClassifier(**TINY)
    masters = copy.deepcopy(model)
    groups = param_groups(model, WD, 0.5, depth=2)
    fp32 = [torch.cat([p.detach().reshape(-1) for p in g["params"]]) for g in groups]
    model.bfloat16()
    optimizer = FlatAdamW(groups, BETAS, EPS, masters=fp32)
    ref_step = reference(masters, 0.5)[1]
    # the same gradients for both: the reference's fp32 ones, rounded to bf16 for ours
    for step in range(3):
        torch.manual_seed(step)
        masters(torch.randn(2, 3, 4, 32, 32), with_aux=True)[0].logsumexp(-1).mean().backward()
        pairs = [(p, q.grad) for p, q in zip(model.parameters(), masters.parameters())
                 if q.grad is not None]
        torch.autograd.backward([p for p, _ in pairs], [g.bfloat16() for _, g in pairs])
        for _, grad in pairs:
            grad.copy_(grad.bfloat16())
        optimizer.set_lr(1e-3)
        optimizer.device_step(torch.zeros(()))
        optimizer.zero_grad()
        ref_step(1e-3)
    weights = optimizer.master_weights()
    for (name, want), got in zip(masters.named_parameters(), model.parameters()):
        torch.testing.assert_close(weights[name], want, rtol=1e-5, atol=1e-7)  # fp32, not bf16
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())


def test_skipped_device_step_leaves_everything_untouched():
    torch.manual_seed(0)
    model = S4DClassifier(**TINY)
    optimizer = FlatAdamW(param_groups(model, WD, 0.5, depth=2), BETAS, EPS)
    train(model, lambda lr: (optimizer.set_lr(lr), optimizer.device_step(torch.zeros(())),
                             optimizer.zero_grad()), steps=2)

    def snapshot():
        return [t.clone() for g in optimizer.flat
                for t in (g.data, g.master, g.exp_avg, g.exp_avg_sq, g.steps_t)]
    before = snapshot()
    model(torch.randn(2, 3, 4, 32, 32), with_aux=True)[0].sum().backward()
    optimizer.flat[0].grad[0] = float("nan")  # a gradient gone bad
    optimizer.set_lr(1e-3)
    optimizer.device_step(torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))


def test_state_round_trip_and_refusals():
    torch.manual_seed(0)
    model = S4DClassifier(**TINY)
    optimizer = FlatAdamW(param_groups(model, WD, 0.5, depth=2), BETAS, EPS)
    train(model, lambda lr: (optimizer.set_lr(lr), optimizer.step(), optimizer.zero_grad()), 3)
    state = copy.deepcopy(optimizer.state_dict())
    other = S4DClassifier(**TINY)
    restored = FlatAdamW(param_groups(other, WD, 0.5, depth=2), BETAS, EPS)
    restored.load_state_dict(state)
    for a, b in zip(optimizer.flat, restored.flat):
        assert torch.equal(a.exp_avg_sq, b.exp_avg_sq) and a.steps == b.steps
    with pytest.raises(OptimizerStateError, match="another format"):
        restored.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    bigger = S4DClassifier(**dict(TINY, num_video_classes=9))
    with pytest.raises(OptimizerStateError, match=r"another parameter layout.*head.video"):
        FlatAdamW(param_groups(bigger, WD, 0.5, depth=2), BETAS, EPS).load_state_dict(state)


def test_at_most_four_groups():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(5)]
    groups = [{"params": [p], "names": [str(i)], "lr_scales": [1.0], "weight_decay": 0.0}
              for i, p in enumerate(params)]
    with pytest.raises(ValueError, match="at most 4"):
        FlatAdamW(groups)


def test_update_traces_without_graph_breaks():
    n, p = 10, 3
    args = (torch.zeros(n), torch.randn(n), torch.zeros(n), torch.zeros(n),
            torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2], dtype=torch.int32), torch.ones(p),
            torch.ones(p), torch.ones(p), torch.tensor(1e-3), 1.0, 0.9, 0.999, 1e-8, 0.05)
    explained = torch._dynamo.explain(flat_adamw)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
