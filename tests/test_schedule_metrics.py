"""Learning-rate schedules against the official formulas; metrics against scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion

from s4d_dist.config import load
from s4d_dist.train.metrics import classification_metrics, mean_std, merge_views
from s4d_dist.train.schedule import Schedule, peak_lr


def official_finetune_schedule(base, final, epochs, niter, warmup_epochs, start=0.0):
    """utils.cosine_scheduler of the official fine-tuning code, transcribed."""
    warmup_iters = warmup_epochs * niter
    warmup = np.linspace(start, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    cosine = np.array([final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / len(iters))) for i in iters])
    return np.concatenate((warmup, cosine))


def test_finetune_schedule_matches_official():
    cfg = load("finetune_dfew", ["optim.epochs=10", "optim.warmup_epochs=2"])
    schedule = Schedule(cfg, steps_per_epoch=7, world_size=2)
    assert schedule.peak == pytest.approx(4e-5)
    want = official_finetune_schedule(4e-5, 1.25e-7, 10, 7, 2)
    np.testing.assert_allclose([schedule(i) for i in range(70)], want, rtol=1e-9, atol=1e-15)


def fvcore_pretrain(where, lr, warm=0.05, start=1e-6):
    """fvcore CompositeParamScheduler([Linear(start, lr), Cosine(lr, 0)], [rescaled, fixed])."""
    if where < warm:
        return start + (lr - start) * where / warm
    return 0.5 * lr * (1 + np.cos(np.pi * where))


def ours_pretrain(total, warmup, lr, start=1e-6):
    """Linear warm-up from `start` (excluding the peak), then cos(π·i/n) over the n steps after."""
    warm = start + (lr - start) * np.arange(warmup) / warmup
    after = np.arange(total - warmup)
    return np.concatenate((warm, 0.5 * lr * (1 + np.cos(np.pi * after / (total - warmup)))))


@pytest.mark.parametrize("quirks", [False, True])
def test_pretrain_schedule(quirks):
    cfg = load("pretrain_vit_base", [f"official.pretrain_global_cosine={quirks}"])
    schedule = Schedule(cfg, steps_per_epoch=10, world_size=2)
    assert schedule.peak == pytest.approx(1.2e-3)  # 1.6e-3 · 384 / 512
    lrs = [schedule(i) for i in range(1000)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[25] == pytest.approx(1e-6 + (1.2e-3 - 1e-6) / 2)
    if quirks:  # official: cosine at global progress, 0.9938·lr right after warm-up
        np.testing.assert_allclose(lrs, [fvcore_pretrain(i / 1000, 1.2e-3) for i in range(1000)], rtol=1e-9)
        assert lrs[50] == pytest.approx(0.99384 * 1.2e-3, rel=1e-4)
    else:  # ours: the half cosine starts at the peak right after warm-up and ends at min_lr 0
        assert lrs[50] == pytest.approx(1.2e-3) and lrs[-1] < 1e-8
        np.testing.assert_allclose(lrs, ours_pretrain(1000, 50, 1.2e-3), rtol=1e-9, atol=1e-15)


def test_peak_lr_counts_every_node_and_accumulation():
    cfg = load("pretrain_vit_base", ["deepspeed.grad_accum=2"])
    assert peak_lr(cfg, world_size=16) == pytest.approx(1.6e-3 * 192 * 16 * 2 / 512)


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)
    labels[labels == 5] = 6  # a class with no sample
    preds = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 7, 500))
    m = classification_metrics(labels, preds, 7)
    assert m["war"] == pytest.approx(100 * accuracy_score(labels, preds))
    assert m["uar"] == pytest.approx(100 * balanced_accuracy_score(labels, preds))
    assert m["f1_weighted"] == pytest.approx(100 * f1_score(labels, preds, average="weighted"))
    present = sorted(set(labels))
    assert m["f1_macro"] == pytest.approx(100 * f1_score(labels, preds, average="macro", labels=present))
    assert m["confusion"] == sk_confusion(labels, preds, labels=list(range(7))).tolist()


def test_merge_views_averages_and_drops_padding_duplicates():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    sample = np.array([4, 4, 2, 2, 4])  # last row: padding repeat of (4, view 0)
    view = np.array([0, 1, 0, 1, 0])
    labels = np.array([0, 0, 1, 1, 0])
    ids, mean, merged = merge_views(sample, view, probs, labels)
    assert ids.tolist() == [2, 4] and merged.tolist() == [1, 0]
    np.testing.assert_allclose(mean, [[0.45, 0.55], [0.55, 0.45]])
    with pytest.raises(ValueError, match="not unique"):
        merge_views(np.array([1, 1]), np.array([0, 1]), probs[:2], np.array([0, 1]))


def test_kfold_mean_std():
    summary = mean_std([{"war": 70.0, "uar": 60.0, "confusion": []}, {"war": 74.0, "uar": 62.0, "confusion": []}])
    assert summary == {"war": (72.0, 2.0), "uar": (61.0, 1.0)}
