"""Data plane, pure parts: frame indices, boxes, RandAugment draws, epoch plans, modality mixing,
masks — each against hand-computed values or the official / torch formula it reproduces."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from s4d_dist.data import plan, randaug, recipes
from s4d_dist.data.masking import random_masks


class FixedRng:
    """Stands in for np.random.Generator where a test fixes the draw."""

    def __init__(self, value: int) -> None:
        self.value = value

    def integers(self, low: int, high: int) -> int:
        assert low <= self.value < high, (low, self.value, high)
        return self.value


# ------------------------------------------------------------------------------------ frames
def test_pretrain_indices_long_clip_window_at_start():
    assert recipes.pretrain_indices(100, 16, 4, FixedRng(7)).tolist() == [7 + 4 * i for i in range(16)]


def test_pretrain_indices_start_range_is_official():
    rng = np.random.default_rng(0)
    starts = {int(recipes.pretrain_indices(70, 16, 4, rng)[0]) for _ in range(500)}
    assert starts == set(range(0, 70 - 64 + 1))  # U{0 .. N-64}


def test_pretrain_indices_short_clip_repeats_last_reachable():
    # 30 frames, stride 4: 0, 4, ..., 28 reachable; then 28 repeats.
    assert recipes.pretrain_indices(30, 16, 4, np.random.default_rng(0)).tolist() == \
        [0, 4, 8, 12, 16, 20, 24, 28] + [28] * 8
    # 10 frames: 0, 4, 8 (frame 9 is not on the grid).
    assert recipes.pretrain_indices(10, 4, 4, np.random.default_rng(0)).tolist() == [0, 4, 8, 8]


def test_finetune_indices_long_clip_linspace():
    # n=100, W=64, end=80: linspace(16, 80, 16) = 16 + 64k/15, truncated, clipped to 79.
    expected = [16, 20, 24, 28, 33, 37, 41, 45, 50, 54, 58, 62, 67, 71, 75, 79]
    assert recipes.finetune_indices(100, 16, 4, FixedRng(80)).tolist() == expected


def test_finetune_indices_short_clip_whole_clip_then_last():
    # n=40 ≤ 64: linspace(0, 40, 10) = 0, 4.44, ... 40 → ints, then padded with 40 → clipped to 39.
    expected = [0, 4, 8, 13, 17, 22, 26, 31, 35, 39] + [39] * 6
    assert recipes.finetune_indices(40, 16, 4, np.random.default_rng(0)).tolist() == expected
    assert recipes.finetune_indices(3, 4, 4, np.random.default_rng(0)).tolist() == [2, 2, 2, 2]


def test_eval_views_first_and_last_window():
    # n=100, stride 4: 25 strided frames; 2 views start at 0 and 25-16=9 (frames 0 and 36).
    views = recipes.eval_view_indices(100, 16, 4, 2)
    assert views[0].tolist() == [4 * i for i in range(16)]
    assert views[1].tolist() == [4 * (9 + i) for i in range(16)]
    # 3 views: starts int(v * 9 / 2) = 0, 4, 9; 1 view: the middle window (4).
    assert recipes.eval_view_indices(100, 16, 4, 3)[:, 0].tolist() == [0, 16, 36]
    assert recipes.eval_view_indices(100, 16, 4, 1)[:, 0].tolist() == [16]


def test_eval_views_short_clip_padded_with_last():
    views = recipes.eval_view_indices(10, 4, 2, 2)  # strided 0,2,4,6,8: starts 0 and 1
    assert views.tolist() == [[0, 2, 4, 6], [2, 4, 6, 8]]
    assert recipes.eval_view_indices(5, 4, 4, 2).tolist() == [[0, 4, 4, 4], [0, 4, 4, 4]]


# ------------------------------------------------------------------------------------- boxes
def test_random_resized_crop_in_bounds_and_scale():
    rng = np.random.default_rng(1)
    for _ in range(200):
        y0, x0, y1, x1 = recipes.random_resized_crop(120, 90, (0.2, 1.0), rng)
        assert 0 <= y0 < y1 <= 120 and 0 <= x0 < x1 <= 90
        assert (y1 - y0) * (x1 - x0) >= 0.2 * 120 * 90 * 0.9  # rounding slack
        assert all(v == int(v) for v in (y0, x0, y1, x1))


def test_random_resized_crop_fallback_is_central():
    # An area fraction above 1 never fits: after 10 tries, the largest central crop in ratio.
    assert recipes.random_resized_crop(100, 100, (5.0, 6.0), np.random.default_rng(0)) == (0.0, 0.0, 100.0, 100.0)
    assert recipes.random_resized_crop(100, 200, (5.0, 6.0), np.random.default_rng(0)) == (0.0, 33.0, 100.0, 166.0)


def test_mirrored_and_eval_crops():
    assert recipes.mirrored((1, 2, 3, 4), True) == (1, 4, 3, 2)
    assert recipes.mirrored((1, 2, 3, 4), False) == (1, 2, 3, 4)
    # Square frame at the official scale: every crop is the whole frame (docs/method.md §3.9).
    assert recipes.eval_crop(160, 160, 160, 160, 1, 2) == (0.0, 0.0, 160.0, 160.0)
    # Larger short side: the two crops are the diagonal corners, in source pixels.
    a, b = recipes.eval_crop(100, 100, 200, 160, 0, 2), recipes.eval_crop(100, 100, 200, 160, 1, 2)
    assert a == (0.0, 0.0, 80.0, 80.0) and b == (20.0, 20.0, 100.0, 100.0)
    # Wide frame: the official sliding crop along the long side only.
    left, right = recipes.eval_crop(160, 320, 160, 160, 0, 2), recipes.eval_crop(160, 320, 160, 160, 1, 2)
    assert left == (0.0, 0.0, 160.0, 160.0) and right == (0.0, 160.0, 160.0, 320.0)


def test_erase_box_fits():
    rng = np.random.default_rng(0)
    for _ in range(100):
        top, left, h, w = recipes.erase_box(40, 40, rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 40 and h < 40 and w < 40


# ------------------------------------------------------------------------------- RandAugment
def test_rand_augment_parse_and_draw():
    spec = randaug.parse("rand-m7-n4-mstd0.5-inc1")
    assert spec == randaug.RandAugmentSpec(7.0, 4, 0.5, 0.5)
    with pytest.raises(ValueError):
        randaug.parse("rand-m7-n4")  # not the increasing suite
    rows = np.concatenate([randaug.draw(spec, np.random.default_rng(i)) for i in range(2000)])
    skipped = (rows[:, 0] == randaug.IDENTITY).mean()
    assert 0.45 < skipped < 0.55  # each op applied with probability 0.5
    levels = rows[:, 1] / 10
    assert abs(levels.mean() - 7) < 0.05 and 0.4 < levels.std() < 0.6
    unsigned = [randaug.OPS.index(n) for n in ("posterize", "solarize", "equalize")]
    assert not rows[np.isin(rows[:, 0], unsigned), 2].any()


def test_rand_augment_arguments_are_timm_values():
    op = randaug.OPS.index
    rows = np.array([[op("rotate"), 100, 0], [op("posterize"), 70, 0], [op("solarize"), 50, 0],
                     [op("brightness"), 100, 1], [op("translate_x"), 100, 1]], np.int32)
    ops, values, matrices = randaug.arguments(rows, 40, 80)
    assert values[1] == 0b11000000  # 4 - int(2.8) = 2 bits kept
    assert values[2] == 256 - 128
    assert values[3] == pytest.approx(0.1)  # 1 - 0.9
    assert matrices[4][0, 2] == pytest.approx(-0.45 * 80)
    # Rotation by 30° about the centre keeps the centre.
    centre = matrices[0] @ np.array([40.0, 20.0, 1.0])
    assert centre == pytest.approx([40.0, 20.0])


# ------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("num_samples,world", [(23, 2), (23, 3), (30, 3), (5, 4)])
def test_shuffled_plan_is_distributed_sampler(num_samples, world):
    for rank in range(world):
        sampler = DistributedSampler(range(num_samples), num_replicas=world, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(3)
        ours = plan.rank_slice(plan.shuffled_order(num_samples, 5, 3), rank, world)
        assert ours.tolist() == list(sampler)


@pytest.mark.parametrize("world", [2, 3])
def test_train_batches_equal_count_and_disjoint(world):
    num_samples, batch = 47, 4  # uneven: 47 = 2·23+1 = 3·15+2
    order = plan.shuffled_order(num_samples, 0, 1)
    per_rank = [plan.train_batches(order, r, world, batch) for r in range(world)]
    expected = plan.train_batches_per_rank(num_samples, world, batch)
    assert [len(b) for b in per_rank] == [expected] * world
    flat = np.concatenate([b.ravel() for b in per_rank])
    padding = -(-num_samples // world) * world - num_samples  # DistributedSampler's wrap-around
    assert len(flat) - len(np.unique(flat)) <= padding  # ranks overlap only in the padding


def test_balanced_order_shared_and_balanced():
    labels = np.array([0] * 90 + [1] * 10)
    a, b = plan.balanced_order(labels, 0, 4), plan.balanced_order(labels, 0, 4)
    assert np.array_equal(a, b) and len(a) == 100
    draws = np.concatenate([plan.balanced_order(labels, 0, e) for e in range(40)])
    assert abs((labels[draws] == 1).mean() - 0.5) < 0.05
    assert not np.array_equal(plan.balanced_order(labels, 0, 5), a)


@pytest.mark.parametrize("world", [2, 3])
def test_eval_rows_cover_every_view_once(world):
    rows = [plan.eval_rows(11, 4, r, world, 5) for r in range(world)]
    assert len({len(r) for r in rows}) == 1  # same batch count everywhere
    flat = np.concatenate([r.reshape(-1, 2) for r in rows])
    real = flat[flat[:, 0] >= 0]
    assert sorted(map(tuple, real.tolist())) == [(s, v) for s in range(11) for v in range(4)]
    assert (flat[flat[:, 0] < 0] == -1).all()


# ------------------------------------------------------------------------------------ mixing
def official_order(lengths, rates, epoch):
    """concat_dataset.py ConcatIterator, use_one / sum, transcribed."""
    iterator_lens = [int(n * r) for n, r in zip(lengths, rates)]
    g = torch.Generator()
    g.manual_seed(epoch)
    indices = torch.cat([torch.ones(n, dtype=torch.int64) * i for i, n in enumerate(iterator_lens)])
    return indices[torch.randperm(len(indices), generator=g)]


def test_source_order_matches_official_and_ranks():
    for epoch in range(3):
        counts = plan.step_counts([37, 20], [1.0, 0.25])
        assert counts == [37, 5]
        order = plan.source_order(counts, epoch)
        assert torch.equal(order, official_order([37, 20], [1.0, 0.25], epoch))
        assert torch.equal(order, plan.source_order(counts, epoch))  # "another rank"
    assert not torch.equal(plan.source_order([37, 5], 0), plan.source_order([37, 5], 1))


def test_source_order_frozen_values():
    # Frozen outputs of the transcribed official ConcatIterator (6 video batches, 4 image
    # batches at rate 0.5): a change of the order — or of torch's seeded randperm that both the
    # official code and ours rely on — shows up here even if both implementations move together.
    frozen = {0: [0, 0, 1, 0, 0, 0, 0, 1], 1: [0, 0, 0, 1, 1, 0, 0, 0], 2: [0, 0, 1, 0, 1, 0, 0, 0]}
    counts = plan.step_counts([6, 4], [1.0, 0.5])
    assert counts == [6, 2]
    for epoch, order in frozen.items():
        assert plan.source_order(counts, epoch).tolist() == order


# ------------------------------------------------------------------------------------- masks
def test_masks_exact_counts():
    mask = random_masks(64, 800, 0.95, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and (mask.sum(1) == 760).all()
    assert (random_masks(8, 100, 0.9).sum(1) == 90).all()


def test_pretrain_source_crop_keeps_boxes_inside():
    from s4d_dist.data.recipes import Recipe

    recipe = Recipe("pretrain", "video", 160, num_frames=16, stride=4, repeats=4, source_crop=(0, 32, 160, 192))
    rng = np.random.default_rng(0)
    for _ in range(50):
        params = recipe.sample_params({"height": 224, "width": 224, "frames": 80}, rng)
        assert params.region.tolist() == [0, 32, 160, 192] and params.pre_size.tolist() == [192, 192]
        rois = params.rois  # whole pixels of the 192 × 192 resized crop
        assert (rois >= 0).all() and (rois[:, 2:] <= 192).all() and (rois == np.round(rois)).all()
