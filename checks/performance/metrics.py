"""Standalone performance of a classifier at its operating point, as plain functions.

Every figure is scikit-learn's own (``accuracy_score``, ``balanced_accuracy_score``,
``roc_auc_score``, ``average_precision_score``, ``confusion_matrix``), so the check and a reviewer's
notebook agree to the last digit; the bootstrap (:func:`cluster_resamples`) resamples patients,
not images, when patients are known, because images of one patient are not independent.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    roc_auc_score,
)

__all__ = [
    "Decision",
    "binary_metrics",
    "cluster_members",
    "cluster_resamples",
    "decide",
    "fast_auroc",
    "fast_average_precision",
    "multiclass_metrics",
]

BINARY = ("accuracy", "balanced_accuracy", "auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")
PER_CLASS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")


@dataclass(frozen=True)
class Decision:
    """How scores become decisions: a threshold on the positive class, or the argmax."""

    positive: int | None
    threshold: float | None

    def describe(self, classes: Sequence[str]) -> str:
        if self.positive is None:
            return "argmax of the class probabilities"
        name = classes[self.positive]
        if self.threshold is None:
            return f"argmax (p({name}) >= 0.5 for two classes)"
        return f"p({name}) >= {self.threshold:g} (model.operating_point)"


def decide(probs: NDArray[np.float64], decision: Decision) -> NDArray[np.int64]:
    """Predicted class per row: positive when its probability reaches the threshold, else argmax."""
    if decision.positive is None or decision.threshold is None:
        return np.asarray(probs.argmax(axis=1), dtype=np.int64)
    negative = 1 - decision.positive
    chosen = np.where(probs[:, decision.positive] >= decision.threshold, decision.positive, negative)
    return np.asarray(chosen, dtype=np.int64)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def _one_vs_rest(labels: NDArray[np.int64], predicted: NDArray[np.int64], k: int) -> dict[str, float]:
    truth, called = labels == k, predicted == k
    tp, fn = int((truth & called).sum()), int((truth & ~called).sum())
    fp, tn = int((~truth & called).sum()), int((~truth & ~called).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def fast_auroc(truth: NDArray[np.bool_], score: NDArray[np.float64]) -> float:
    """AUROC as the Mann-Whitney statistic on mid-ranks: scikit-learn's ``roc_auc_score`` to
    rounding, without its input validation (the bootstrap calls it thousands of times)."""
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def fast_average_precision(truth: NDArray[np.bool_], score: NDArray[np.float64]) -> float:
    """Average precision, sum over distinct thresholds of (recall step) x precision: scikit-learn's
    ``average_precision_score`` to rounding, without its input validation."""
    positives = int(truth.sum())
    if positives == 0 or positives == truth.size:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    tps = np.cumsum(hits)[last]
    precision = tps / (last + 1.0)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _ranking(truth: NDArray[np.bool_], score: NDArray[np.float64], *, fast: bool = False) -> dict[str, float]:
    if truth.all() or not truth.any():
        return {"auroc": float("nan"), "auprc": float("nan")}
    if fast:
        return {"auroc": fast_auroc(truth, score), "auprc": fast_average_precision(truth, score)}
    return {
        "auroc": float(roc_auc_score(truth, score)),
        "auprc": float(average_precision_score(truth, score)),
    }


def binary_metrics(
    probs: NDArray[np.float64], labels: NDArray[np.int64], decision: Decision, *, fast: bool = False
) -> dict[str, float]:
    """The eight figures of a binary classifier (NaN where undefined: no positive, no call).

    ``fast``: the ranking metrics by :func:`fast_auroc` and :func:`fast_average_precision` and the
    accuracies by counting (the bootstrap's replicates); else scikit-learn's own functions.
    """
    assert decision.positive is not None
    predicted = decide(probs, decision)
    out = {
        "accuracy": _accuracy(labels, predicted, fast=fast),
        "balanced_accuracy": _balanced(labels, predicted, fast=fast),
    }
    out.update(_ranking(labels == decision.positive, probs[:, decision.positive], fast=fast))
    out.update(_one_vs_rest(labels, predicted, decision.positive))
    return out


def _accuracy(labels: NDArray[np.int64], predicted: NDArray[np.int64], *, fast: bool) -> float:
    if labels.size == 0:
        return float("nan")
    return float((labels == predicted).mean()) if fast else float(accuracy_score(labels, predicted))


def _balanced(labels: NDArray[np.int64], predicted: NDArray[np.int64], *, fast: bool = False) -> float:
    if labels.size == 0:
        return float("nan")
    if fast:  # the mean recall of the classes present in the labels, as scikit-learn's
        present = np.unique(labels)
        return float(np.mean([(predicted[labels == k] == k).mean() for k in present]))
    with warnings.catch_warnings():  # a decision no label has is expected of a poor model, not news
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, predicted))


def multiclass_metrics(
    probs: NDArray[np.float64], labels: NDArray[np.int64], decision: Decision, *, fast: bool = False
) -> dict[str, float]:
    """Accuracy, balanced accuracy, and per class (one-vs-rest, at the argmax) ``<metric>:<k>``."""
    predicted = decide(probs, decision)
    out = {
        "accuracy": _accuracy(labels, predicted, fast=fast),
        "balanced_accuracy": _balanced(labels, predicted, fast=fast),
    }
    for k in range(probs.shape[1]):
        per_class = {**_ranking(labels == k, probs[:, k], fast=fast), **_one_vs_rest(labels, predicted, k)}
        out.update({f"{name}:{k}": value for name, value in per_class.items()})
    return out


def counts(labels: NDArray[np.int64], predicted: NDArray[np.int64], n_classes: int) -> list[list[int]]:
    """The confusion matrix, rows the true class, columns the decision."""
    matrix = confusion_matrix(labels, predicted, labels=list(range(n_classes)))
    return [[int(v) for v in row] for row in matrix]


def cluster_members(clusters: ArrayLike) -> list[NDArray[np.intp]]:
    """Row indices of each cluster, in order of first id (an image without a cluster is its own)."""
    ids = [f"row:{i}" if c is None else f"id:{c}" for i, c in enumerate(np.asarray(clusters, dtype=object))]
    if not ids:
        return []
    _, codes = np.unique(np.asarray(ids, dtype=object), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    return np.split(order, starts[1:])


def cluster_resamples(clusters: ArrayLike, n_boot: int, rng: np.random.Generator) -> Iterator[NDArray[np.intp]]:
    """Row indices of ``n_boot`` cluster-bootstrap resamples: clusters drawn with replacement, each
    bringing all of its rows (:func:`cluster_members`).

    Args:
        clusters: a cluster id per row (``None`` where unknown), shape ``(N,)``.
        n_boot: how many resamples.
        rng: the only source of randomness.
    """
    members = cluster_members(clusters)
    for _ in range(n_boot):
        chosen = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[c] for c in chosen]) if members else np.zeros(0, dtype=np.intp)
