"""Standalone performance of a classifier at its operating point, as plain functions.

Every figure is scikit-learn's own (``accuracy_score``, ``balanced_accuracy_score``,
``roc_auc_score``, ``average_precision_score``, ``confusion_matrix``), so the check and a reviewer's
notebook agree to the last digit; the bootstrap resamples patients, not images, when patients are
known, because images of one patient are not independent.

Every task bootstraps through :func:`cluster_weights`: the cluster resampling of
:func:`cluster_resamples` given as row multiplicities, one matrix for every label, output or
class, scored by the weighted twins of the figures (:func:`weighted_classification`,
:func:`weighted_rates`, :func:`weighted_ranking`), each equal to the figure on the resample it
stands for (:func:`binary_metrics` and :func:`multiclass_metrics` with ``fast=True`` on the
resampled rows, which the tests hold them to).
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

from auditkit.stats import resample_counts

__all__ = [
    "Decision",
    "binary_metrics",
    "cluster_members",
    "cluster_resamples",
    "cluster_weights",
    "decide",
    "fast_auroc",
    "fast_average_precision",
    "multiclass_metrics",
    "rates",
    "weighted_classification",
    "weighted_ranking",
    "weighted_rates",
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


def cluster_weights(
    clusters: ArrayLike, n_boot: int, rng: np.random.Generator, *, block_elements: int = 1 << 22
) -> Iterator[NDArray[np.float64]]:
    """The cluster bootstrap of :func:`cluster_resamples` as row multiplicities, in blocks.

    Resample ``b`` draws the clusters with replacement and weighs each row by how often its
    cluster was drawn, so one ``(B, N)`` matrix serves every label or output of a model: a
    statistic of the weighted rows equals the statistic of the resample itself (a row drawn twice
    counts twice), without materialising the resamples.

    Args:
        clusters: a cluster id per row (``None`` where unknown: the row is its own cluster).
        n_boot: how many resamples in all.
        rng: the only source of randomness.
        block_elements: at most this many matrix elements per block (memory stays bounded).

    Yields:
        Integer-valued float64 arrays ``(B_block, N)`` (float for the matrix products; counts are
        exact far beyond any split); the blocks' ``B_block`` sum to ``n_boot``.
    """
    members = cluster_members(clusters)
    n_clusters = len(members)
    n = sum(len(m) for m in members)
    if n_boot <= 0 or n_clusters == 0:
        return
    codes = np.empty(n, dtype=np.intp)
    codes[np.concatenate(members)] = np.repeat(np.arange(n_clusters), [len(m) for m in members])
    block = max(1, min(n_boot, block_elements // max(n, n_clusters)))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        draws = rng.integers(0, n_clusters, size=(size, n_clusters), dtype=np.intp)
        yield resample_counts(draws, n_clusters)[:, codes].astype(np.float64)


def rates(truth: NDArray[np.bool_], called: NDArray[np.bool_]) -> dict[str, float]:
    """Sensitivity, specificity, PPV and NPV of binary decisions (NaN where a denominator is 0)."""
    tp, fn = int((truth & called).sum()), int((truth & ~called).sum())
    fp, tn = int((~truth & called).sum()), int((~truth & ~called).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def _weighted_ratio(numerator: NDArray[np.float64], denominator: NDArray[np.float64]) -> NDArray[np.float64]:
    defined = denominator > 0
    return np.where(defined, numerator / np.where(defined, denominator, 1.0), np.nan)


def _rows_of(n: int, rows: NDArray[np.intp] | None) -> NDArray[np.intp]:
    return np.arange(n, dtype=np.intp) if rows is None else np.asarray(rows, dtype=np.intp)


def weighted_rates(
    truth: NDArray[np.bool_],
    called: NDArray[np.bool_],
    weights: NDArray[np.float64],
    rows: NDArray[np.intp] | None = None,
) -> dict[str, NDArray[np.float64]]:
    """:func:`rates` of every resample given as row multiplicities.

    Args:
        truth: the class of each scored row, shape ``(n,)``.
        called: the decision on each scored row, shape ``(n,)``.
        weights: integer-valued multiplicities ``(B, N)`` (float64: the sums are exact below
            2**53 and run as one matrix product).
        rows: the columns of ``weights`` the ``n`` scored rows are (default: ``0..n-1``, ``N == n``).
    """
    index = _rows_of(truth.size, rows)
    columns = np.zeros((weights.shape[1], 4), dtype=np.float64)
    columns[index] = np.stack([truth & called, truth, called, np.ones_like(truth)], axis=1)
    tp, positives, calls, total = (weights @ columns).T
    fn, fp = positives - tp, calls - tp
    tn = total - positives - fp
    return {
        "sensitivity": _weighted_ratio(tp, tp + fn),
        "specificity": _weighted_ratio(tn, tn + fp),
        "ppv": _weighted_ratio(tp, tp + fp),
        "npv": _weighted_ratio(tn, tn + fn),
    }


def weighted_ranking(
    truth: NDArray[np.bool_],
    score: NDArray[np.float64],
    weights: NDArray[np.float64],
    rows: NDArray[np.intp] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """AUROC and average precision of every resample given as row multiplicities, sorting once.

    With each class's rows sorted by score and the cumulative weights of each, a positive row of
    score ``s`` finds by binary search the negative weight below ``s`` and at ``s`` (AUROC, the
    Mann-Whitney statistic with ties counted half: :func:`fast_auroc`), and the positive and
    negative weight at or above ``s``, the precision of the threshold ``s`` (average precision,
    the sum over positives of their precision over the positive weight: :func:`fast_average_precision`;
    tied rows share their threshold's precision, as scikit-learn's). A row a resample did not draw
    weighs 0 and is absent from it. The sums are of integers held exactly in float64.

    Args:
        truth: the class of each scored row, shape ``(n,)``.
        score: its score, shape ``(n,)``, finite.
        weights: integer-valued multiplicities ``(B, N)``.
        rows: the columns of ``weights`` the ``n`` scored rows are (default: ``0..n-1``).

    Returns:
        ``(auroc, average_precision)``, each ``(B,)``; NaN for a resample without a positive or
        without a negative row.
    """
    index = _rows_of(truth.size, rows)
    positive_order = np.argsort(score[truth], kind="stable")
    negative_order = np.argsort(score[~truth], kind="stable")
    positive_scores = score[truth][positive_order]
    negative_scores = score[~truth][negative_order]
    positive_weight = weights[:, index[truth][positive_order]]
    n_boot = weights.shape[0]
    negative_through = np.zeros((n_boot, negative_scores.size + 1), dtype=np.float64)
    np.cumsum(weights[:, index[~truth][negative_order]], axis=1, out=negative_through[:, 1:])
    positive_through = np.zeros((n_boot, positive_scores.size + 1), dtype=np.float64)
    np.cumsum(positive_weight, axis=1, out=positive_through[:, 1:])
    n_positive, n_negative = positive_through[:, -1], negative_through[:, -1]
    negative_below = negative_through[:, np.searchsorted(negative_scores, positive_scores, side="left")]
    negative_at_most = negative_through[:, np.searchsorted(negative_scores, positive_scores, side="right")]
    positive_below = positive_through[:, np.searchsorted(positive_scores, positive_scores, side="left")]
    defined = (n_positive > 0) & (n_negative > 0)
    twice_u = (positive_weight * (negative_below + negative_at_most)).sum(axis=1)
    auroc = np.where(defined, twice_u / np.where(defined, 2.0 * n_positive * n_negative, 1.0), np.nan)
    true_at_or_above = n_positive[:, None] - positive_below
    called_at_or_above = true_at_or_above + n_negative[:, None] - negative_below
    precision = np.where(
        called_at_or_above > 0, true_at_or_above / np.where(called_at_or_above > 0, called_at_or_above, 1.0), 0.0
    )
    summed = (positive_weight * precision).sum(axis=1)
    average_precision = np.where(defined, summed / np.where(defined, n_positive, 1.0), np.nan)
    return auroc, average_precision


def weighted_classification(
    probs: NDArray[np.float64], labels: NDArray[np.int64], decision: Decision, weights: NDArray[np.float64]
) -> dict[str, NDArray[np.float64]]:
    """:func:`binary_metrics` (a positive class) or :func:`multiclass_metrics` (the argmax) of every
    resample given as row multiplicities, with the same keys.

    The decisions do not depend on the resample, so every figure is a ratio of weighted counts
    (one matrix product) or a weighted ranking sorted once; balanced accuracy is the mean recall
    of the classes a resample holds, as scikit-learn's.

    Args:
        probs: class probabilities ``(N, K)``.
        labels: class indices ``(N,)``.
        decision: the operating point.
        weights: integer-valued multiplicities ``(B, N)`` (:func:`cluster_weights`).

    Returns:
        Key -> ``(B,)`` values; NaN where a resample leaves a figure undefined.
    """
    predicted = decide(probs, decision)
    n_classes = probs.shape[1]
    member = labels[:, None] == np.arange(n_classes)[None, :]
    hit = member & (predicted == labels)[:, None]
    in_class = weights @ member.astype(np.float64)  # (B, K)
    recalled = weights @ hit.astype(np.float64)
    total = weights.sum(axis=1)
    present = in_class > 0
    recall = np.where(present, recalled / np.where(present, in_class, 1.0), 0.0)
    n_present = present.sum(axis=1)
    out: dict[str, NDArray[np.float64]] = {
        "accuracy": _weighted_ratio(recalled.sum(axis=1), total),
        "balanced_accuracy": _weighted_ratio(recall.sum(axis=1), n_present.astype(np.float64)),
    }
    classes = [decision.positive] if decision.positive is not None else list(range(n_classes))
    for k in classes:
        truth, called = labels == k, predicted == k
        if truth.all() or not truth.any():
            auroc = auprc = np.full(weights.shape[0], np.nan)
        else:
            auroc, auprc = weighted_ranking(truth, probs[:, k], weights)
        per_class = {"auroc": auroc, "auprc": auprc, **weighted_rates(truth, called, weights)}
        suffix = "" if decision.positive is not None else f":{k}"
        out.update({f"{name}{suffix}": values for name, values in per_class.items()})
    return out
