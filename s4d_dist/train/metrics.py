"""Expression-recognition metrics, computed once on the gathered predictions of all ranks.

The official code averaged per-rank UAR / F1 (not exact) and kept sampler padding
(docs/method.md §3.8); here every rank's (sample id, view, probabilities) are gathered first,
duplicates from padding are dropped by sample id, views are merged by averaging softmax
probabilities, and the metrics are computed from one confusion matrix.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j] = samples of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def _f1_per_class(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2·tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each true class (rows of `cm`); NaN for a class absent from the labels."""
    cm = np.asarray(cm)
    support = cm.sum(1)
    return np.divide(np.diag(cm), support, out=np.full(len(cm), np.nan), where=support > 0)


def classification_metrics(labels: np.ndarray, preds: np.ndarray,
                           num_classes: int) -> dict[str, float | list]:
    """WAR (accuracy), UAR (mean recall over classes present), weighted and macro F1, in %.

    Macro F1 and UAR average over the classes that occur in `labels`, as scikit-learn does for
    recall with zero-support classes excluded; F1 of a class never predicted nor present is 0.
    """
    cm = confusion_matrix(labels, preds, num_classes)
    support = cm.sum(1)
    present = support > 0
    recall = per_class_recall(cm)
    f1 = _f1_per_class(cm)
    return {
        "war": 100.0 * np.trace(cm) / max(1, cm.sum()),
        "uar": 100.0 * recall[present].mean() if present.any() else 0.0,
        "f1_weighted": 100.0 * float((f1 * support).sum() / max(1, support.sum())),
        "f1_macro": 100.0 * float(f1[present].mean()) if present.any() else 0.0,
        "confusion": cm.tolist(),
    }


def merge_views(sample_ids: np.ndarray, view_ids: np.ndarray, probs: np.ndarray,
                labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average each sample's view probabilities; duplicated (sample, view) rows count once.

    Returns (sample ids sorted, mean probabilities, labels). A sample whose rows disagree on its
    label is an error: it means ids were not unique across the dataset.
    """
    order = np.lexsort((view_ids, sample_ids))
    sample_ids, view_ids, probs, labels = (a[order] for a in (sample_ids, view_ids, probs, labels))
    first = np.ones(len(sample_ids), dtype=bool)
    first[1:] = (sample_ids[1:] != sample_ids[:-1]) | (view_ids[1:] != view_ids[:-1])
    sample_ids, probs, labels = sample_ids[first], probs[first], labels[first]
    unique, start, counts = np.unique(sample_ids, return_index=True, return_counts=True)
    mean = np.add.reduceat(probs, start, axis=0) / counts[:, None]
    merged_labels = labels[start]
    if not np.array_equal(np.repeat(merged_labels, counts), labels):
        raise ValueError("views of one sample carry different labels: sample ids are not unique")
    return unique, mean, merged_labels


def mean_std(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """k-fold summary: mean and (population) standard deviation of each scalar metric."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
            for k in keys}
