"""Per-group metrics of a classifier: fairlearn ``MetricFrame`` and a batched bootstrap twin.

Per-group values (:func:`metric_frame`) are computed by fairlearn's ``MetricFrame`` (Weerts et al.
2023, "Fairlearn: Assessing and Improving Fairness of AI Systems", JMLR 24(257)) over metric
functions defined here, so that an undefined value (the sensitivity of a group without positives)
is NaN instead of scikit-learn's silent 0 (fairlearn's own ``true_positive_rate`` also returns 0
there). :func:`batched_group_metrics` computes the same quantities on many bootstrap resamples at
once; the two agree exactly, and agree with scikit-learn and fairlearn's built-in metrics on
groups where those are defined (tested).

Binary view of a classifier: the positive class is ``positive_index``; an image is positive when
its label is that class and predicted positive when the arg-max of its probabilities is (for two
classes, ``p_positive > 0.5``; an exact tie goes to the lower class index). For more than two
classes this is one-vs-rest for the positive class; ``accuracy`` and ``ece`` stay top-1 and
top-label over all classes, as in the calibration check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.stats import check_probs_labels

if TYPE_CHECKING:
    from fairlearn.metrics import MetricFrame

__all__ = [
    "DESCRIPTIVE",
    "GAP_METRICS",
    "GROUP_METRICS",
    "INTERSECTION_SEPARATOR",
    "LOWER_IS_BETTER",
    "SMALL_COUNT",
    "Outcomes",
    "batched_group_metrics",
    "count_text",
    "intersect",
    "metric_frame",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
IndexMatrix = NDArray[np.intp]

GROUP_METRICS: tuple[str, ...] = (
    "n",
    "prevalence",
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "selection_rate",
    "auroc",
    "ece",
)
"""Per-group metrics, in the order they are emitted (label ``metric`` of ``bias.group_metric``)."""

GAP_METRICS: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "auroc",
    "ece",
)
"""Metrics whose largest between-group gap is emitted (``bias.max_gap``)."""

LOWER_IS_BETTER: frozenset[str] = frozenset({"ece", "underdiagnosis_rate", "mae", "mae_ratio", "hd95"})
"""Per-group metrics for which a lower value is better (the others: higher, or descriptive).

``underdiagnosis_rate`` is the multi-label analysis's (:mod:`.multilabel`), ``mae`` and
``mae_ratio`` the regression analysis's (:mod:`.regression`), ``hd95`` the segmentation
analysis's (:mod:`.segmentation`)."""

DESCRIPTIVE: frozenset[str] = frozenset({"n", "prevalence"})
"""Per-group quantities fixed by the stratified resampling: no interval."""

INTERSECTION_SEPARATOR = "×"
"""Joins two column names (``sex×site``) and their values (``F×A``) for an intersection."""

SMALL_COUNT = 5
"""Counts below this are written ``<5`` in reasons, findings and plots (never exactly)."""

_EPS = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------------------------
# Inputs


def count_text(n: int) -> str:
    """A count as shown to people: ``<5`` for 1 to 4 (a tiny group could single someone out)."""
    return f"<{SMALL_COUNT}" if 0 < n < SMALL_COUNT else str(n)


def intersect(first: ArrayLike, second: ArrayLike) -> NDArray[np.str_]:
    """Intersection labels ``"<a>×<b>"`` of two group-label arrays of equal length.

    Raises:
        ValueError: the arrays differ in shape.
    """
    a, b = np.asarray(first).astype(str), np.asarray(second).astype(str)
    if a.shape != b.shape:
        raise ValueError(f"group arrays must have the same shape, got {a.shape} and {b.shape}")
    return np.char.add(np.char.add(a, INTERSECTION_SEPARATOR), b)


@dataclass(frozen=True)
class Outcomes:
    """Per-image quantities the subgroup metrics are computed from (all of shape ``(N,)``).

    Build with :meth:`from_probs`.

    Attributes:
        labels: true class index.
        y_true: 1 where the label is the positive class, else 0.
        y_pred: 1 where the arg-max class is the positive class, else 0.
        score: probability of the positive class (ranks images for AUROC).
        correct: 1.0 where the arg-max class is the label (top-1 accuracy).
        confidence: top-label confidence, clipped to ``[eps, 1 - eps]`` as netcal does.
        ece_bin: equal-width confidence bin ``[lower, upper)`` of each image, of ``bins``.
        bins: number of ECE bins.
    """

    labels: IntArray
    y_true: IntArray
    y_pred: IntArray
    score: FloatArray
    correct: FloatArray
    confidence: FloatArray
    ece_bin: IntArray
    bins: int

    @classmethod
    def from_probs(cls, probs: ArrayLike, labels: ArrayLike, positive_index: int, *, bins: int = 15) -> Outcomes:
        """Outcomes of ``(N, K)`` class probabilities and ``(N,)`` labels.

        Args:
            probs: finite class probabilities, shape ``(N, K)``, ``K >= 2``.
            labels: true class indices in ``[0, K)``, shape ``(N,)``.
            positive_index: the positive class, in ``[0, K)``.
            bins: equal-width bins of the ECE, at least 1.

        Raises:
            ValueError: a shape, label, probability, class index or bin count is invalid.
        """
        p, checked = check_probs_labels(probs, labels)
        y = checked.astype(np.int64)
        k = p.shape[1]
        if not 0 <= positive_index < k:
            raise ValueError(f"positive_index must be in [0, {k}), got {positive_index}")
        if isinstance(bins, bool) or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins!r}")
        predicted = p.argmax(axis=1)
        confidence = np.clip(p.max(axis=1), _EPS, 1.0 - _EPS)
        edges = np.linspace(0.0, 1.0, bins + 1)
        ece_bin = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
        return cls(
            labels=y,
            y_true=(y == positive_index).astype(np.int64),
            y_pred=(predicted == positive_index).astype(np.int64),
            score=np.ascontiguousarray(p[:, positive_index]),
            correct=(predicted == y).astype(np.float64),
            confidence=confidence,
            ece_bin=ece_bin.astype(np.int64),
            bins=int(bins),
        )

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------------------------
# Point estimates: fairlearn MetricFrame over explicit metric functions


def _mean_or_nan(values: NDArray[Any]) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def _n(y_true: IntArray, y_pred: IntArray) -> float:
    return float(len(y_true))


def _prevalence(y_true: IntArray, y_pred: IntArray) -> float:
    return _mean_or_nan(np.asarray(y_true))


def _accuracy(y_true: IntArray, y_pred: IntArray, correct: FloatArray) -> float:
    return _mean_or_nan(np.asarray(correct))


def _sensitivity(y_true: IntArray, y_pred: IntArray) -> float:
    y, yhat = np.asarray(y_true), np.asarray(y_pred)
    return _mean_or_nan(yhat[y == 1])


def _specificity(y_true: IntArray, y_pred: IntArray) -> float:
    y, yhat = np.asarray(y_true), np.asarray(y_pred)
    return _mean_or_nan(1 - yhat[y == 0])


def _ppv(y_true: IntArray, y_pred: IntArray) -> float:
    y, yhat = np.asarray(y_true), np.asarray(y_pred)
    return _mean_or_nan(y[yhat == 1])


def _npv(y_true: IntArray, y_pred: IntArray) -> float:
    y, yhat = np.asarray(y_true), np.asarray(y_pred)
    return _mean_or_nan(1 - y[yhat == 0])


def _selection_rate(y_true: IntArray, y_pred: IntArray) -> float:
    return _mean_or_nan(np.asarray(y_pred))


def _auroc(y_true: IntArray, y_pred: IntArray, score: FloatArray) -> float:
    y = np.asarray(y_true)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(_auroc_from_ranks(np.asarray(score, dtype=np.float64)[None, :], y[None, :])[0])


def _ece(y_true: IntArray, y_pred: IntArray, correct: FloatArray, confidence: FloatArray, ece_bin: IntArray) -> float:
    n = len(y_true)
    if n == 0:
        return float("nan")
    gaps = np.bincount(np.asarray(ece_bin), weights=np.asarray(correct) - np.asarray(confidence))
    return float(np.abs(gaps).sum() / n)


def metric_frame(outcomes: Outcomes, groups: ArrayLike, *, group_by: str = "group") -> MetricFrame:
    """fairlearn ``MetricFrame`` of every metric of :data:`GROUP_METRICS` by group.

    Undefined values are NaN: sensitivity without positives, specificity without negatives, PPV
    without predicted positives, NPV without predicted negatives, AUROC without both classes.
    ``ece`` is the top-label expected calibration error with ``outcomes.bins`` equal-width bins
    (Naeini et al. 2015; the binning of the calibration check and netcal).

    Args:
        outcomes: per-image outcomes, ``N`` images.
        groups: group label of each image, shape ``(N,)``.
        group_by: the name of the sensitive feature (the index name of ``by_group``).

    Returns:
        The MetricFrame; ``.by_group`` has one row per group and one column per metric.

    Raises:
        ValueError: ``groups`` does not have shape ``(N,)``.
    """
    from fairlearn.metrics import MetricFrame

    labels = np.asarray(groups).astype(str)
    if labels.shape != (outcomes.n,):
        raise ValueError(f"groups must have shape ({outcomes.n},), got {labels.shape}")
    functions = {
        "n": _n,
        "prevalence": _prevalence,
        "accuracy": _accuracy,
        "sensitivity": _sensitivity,
        "specificity": _specificity,
        "ppv": _ppv,
        "npv": _npv,
        "selection_rate": _selection_rate,
        "auroc": _auroc,
        "ece": _ece,
    }
    return MetricFrame(
        metrics=functions,
        y_true=outcomes.y_true,
        y_pred=outcomes.y_pred,
        sensitive_features={group_by: labels},
        sample_params={
            "accuracy": {"correct": outcomes.correct},
            "auroc": {"score": outcomes.score},
            "ece": {
                "correct": outcomes.correct,
                "confidence": outcomes.confidence,
                "ece_bin": outcomes.ece_bin,
            },
        },
    )


# --------------------------------------------------------------------------------------------
# Batched statistics: the same metrics on many resamples at once


def _auroc_from_ranks(scores: FloatArray, y: NDArray[np.int64]) -> FloatArray:
    """AUROC of each row: Mann-Whitney U / (P * N) from average ranks (a tie counts one half).

    Equals ``sklearn.metrics.roc_auc_score`` (tested); NaN where a row lacks either class.
    """
    from scipy.stats import rankdata

    ranks = np.asarray(rankdata(scores, axis=1, method="average"), dtype=np.float64)
    positives = y.sum(axis=1).astype(np.float64)
    negatives = y.shape[1] - positives
    u_statistic = (ranks * y).sum(axis=1) - positives * (positives + 1.0) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives * negatives > 0, u_statistic / (positives * negatives), np.nan)


def batched_group_metrics(outcomes: Outcomes, rows: IndexMatrix) -> dict[str, FloatArray]:
    """Every metric of :data:`GROUP_METRICS` on ``B`` resamples of one group at once.

    Args:
        outcomes: per-image outcomes.
        rows: ``(B, m)`` row indices into ``outcomes``, one resample per row (``m >= 1``).

    Returns:
        metric -> ``(B,)`` values, NaN where undefined on that resample. With ``rows`` the
        group's own rows (``rows[None, :]``) the values equal :func:`metric_frame`'s.
    """
    idx = np.asarray(rows, dtype=np.intp)
    n_rep, m = idx.shape
    y = outcomes.y_true[idx]
    yhat = outcomes.y_pred[idx]
    positives = y.sum(axis=1).astype(np.float64)
    negatives = m - positives
    predicted_positive = yhat.sum(axis=1).astype(np.float64)
    predicted_negative = m - predicted_positive
    true_positive = (y * yhat).sum(axis=1).astype(np.float64)
    true_negative = ((1 - y) * (1 - yhat)).sum(axis=1).astype(np.float64)

    def ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, numerator / denominator, np.nan)

    auroc = _auroc_from_ranks(outcomes.score[idx], y)

    # ECE: per-resample bin sums of (correct - confidence), offset so one bincount does all.
    flat = (outcomes.ece_bin[idx] + (np.arange(n_rep) * outcomes.bins)[:, None]).ravel()
    residual = (outcomes.correct[idx] - outcomes.confidence[idx]).ravel()
    bin_sums = np.bincount(flat, weights=residual, minlength=n_rep * outcomes.bins)
    ece = np.abs(bin_sums.reshape(n_rep, outcomes.bins)).sum(axis=1) / m

    return {
        "n": np.full(n_rep, float(m)),
        "prevalence": positives / m,
        "accuracy": outcomes.correct[idx].mean(axis=1),
        "sensitivity": ratio(true_positive, positives),
        "specificity": ratio(true_negative, negatives),
        "ppv": ratio(true_positive, predicted_positive),
        "npv": ratio(true_negative, predicted_negative),
        "selection_rate": predicted_positive / m,
        "auroc": auroc,
        "ece": ece,
    }
