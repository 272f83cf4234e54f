"""Mixup / CutMix, label smoothing and the soft-target cross-entropy (train/finetune.py) against
values worked out by hand. A scripted generator fixes λ and the CutMix centre, so every
expected number below follows from timm's formulas alone."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from s4d_dist.train.finetune import mix_batch, smooth_one_hot, soft_target_cross_entropy


class ScriptedRng:
    """Stands in for np.random.Generator: every uniform draw is `uniform`, every Beta draw is
    `lam`, and integer draws (the CutMix centre, y then x) come from `centre`."""

    def __init__(self, lam, centre=(), uniform=0.0):
        self.lam, self.centre, self.uniform = lam, list(centre), uniform

    def random(self):
        return self.uniform

    def beta(self, a, b):
        return self.lam

    def integers(self, low, high):
        value = self.centre.pop(0)
        assert low <= value < high
        return value


def aug(**kw):
    base = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1)
    return OmegaConf.create({**base, **kw})


def test_label_smoothing_spreads_the_smoothing_over_every_class():
    targets = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    # timm: off = 0.1 / 4 = 0.025 everywhere, on = 1 - 0.1 + 0.025 = 0.925.
    expected = torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(1), torch.ones(2))


def test_mixup_blends_pixels_and_targets_with_lambda():
    pixels = torch.stack([torch.full((3, 2, 4, 4), 1.0), torch.full((3, 2, 4, 4), 3.0)])  # clips
    labels = torch.tensor([0, 1])
    mixed, targets = mix_batch(pixels, labels, 3, aug(cutmix_alpha=0.0), ScriptedRng(lam=0.3))
    # Each sample with its mirror: 0.3·1 + 0.7·3 = 2.4 and 0.3·3 + 0.7·1 = 1.6.
    torch.testing.assert_close(mixed[0], torch.full((3, 2, 4, 4), 2.4))
    torch.testing.assert_close(mixed[1], torch.full((3, 2, 4, 4), 1.6))
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    expected = torch.tensor([[0.3 * on + 0.7 * off, 0.3 * off + 0.7 * on, off],
                             [0.7 * on + 0.3 * off, 0.7 * off + 0.3 * on, off]])
    torch.testing.assert_close(targets, expected)


def test_cutmix_pastes_one_box_on_every_frame_and_corrects_lambda_to_its_area():
    t, size = 3, 10
    pixels = torch.stack([torch.zeros(3, t, size, size), torch.ones(3, t, size, size)])
    labels = torch.tensor([1, 0])
    # λ = 0.64 → a 6 × 6 box (side 10·√0.36); centred at (1, 8) it is clipped to rows 0..3,
    # columns 5..10: 4 × 5 = 20 pixels, so the true λ is 1 - 20/100 = 0.8, not 0.64.
    mixed, targets = mix_batch(pixels, labels, 2, aug(mixup_alpha=0.0, label_smoothing=0.0),
                               ScriptedRng(lam=0.64, centre=(1, 8)))
    box = torch.zeros(size, size, dtype=torch.bool)
    box[0:4, 5:10] = True
    for frame in range(t):
        assert torch.equal(mixed[0, :, frame], box.float().expand(3, -1, -1))  # partner's ones
        assert torch.equal(mixed[1, :, frame], (~box).float().expand(3, -1, -1))
    torch.testing.assert_close(targets, torch.tensor([[0.2, 0.8], [0.8, 0.2]]))
    assert torch.equal(pixels[0], torch.zeros(3, t, size, size))  # the input is not modified


def test_cutmix_box_inside_the_image_keeps_lambda():
    pixels = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])  # images
    mixed, targets = mix_batch(pixels, torch.tensor([0, 1]), 2,
                               aug(mixup_alpha=0.0, label_smoothing=0.0),
                               ScriptedRng(lam=0.64, centre=(5, 5)))
    assert mixed[0].sum() == 36 and torch.equal(mixed[0, 0, 2:8, 2:8], torch.ones(6, 6))
    torch.testing.assert_close(targets, torch.tensor([[0.64, 0.36], [0.36, 0.64]]))


def test_switch_prob_chooses_cutmix_or_mixup_and_mix_prob_skips_mixing():
    pixels = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])
    labels = torch.tensor([0, 1])
    # Both enabled: a uniform draw below switch_prob picks CutMix (a hard-edged box), above it Mixup.
    cut, _ = mix_batch(pixels, labels, 2, aug(switch_prob=0.5), ScriptedRng(0.64, (5, 5), uniform=0.2))
    assert set(cut[0].unique().tolist()) == {0.0, 1.0}
    blend, _ = mix_batch(pixels, labels, 2, aug(switch_prob=0.5), ScriptedRng(0.64, uniform=0.7))
    torch.testing.assert_close(blend[0], torch.full((1, 10, 10), 0.36))
    # A draw at or above mix_prob leaves pixels alone; targets are only smoothed.
    same, targets = mix_batch(pixels, labels, 2, aug(mix_prob=0.5), ScriptedRng(0.64, uniform=0.5))
    assert torch.equal(same, pixels)
    torch.testing.assert_close(targets, torch.tensor([[0.95, 0.05], [0.05, 0.95]]))


def test_soft_target_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # softmax rows: (1/4, 3/4) and (1/2, 1/2).
    want = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) + math.log(2.0)) / 2
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(want, rel=1e-6)
    # One-hot targets: the ordinary cross-entropy; bf16 logits are computed in fp32.
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(5, 7)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 7, 5))
    one_hot = F.one_hot(labels, 7).float()
    assert soft_target_cross_entropy(logits, one_hot).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert soft_target_cross_entropy(logits.bfloat16(), one_hot).dtype == torch.float32
