"""Separation metrics of out-of-distribution detectors: AUROC, AUPR and FPR at 95% TPR.

Convention used throughout :mod:`auditkit.checks.ood`: a detector's *score* is higher for images
that look more in-distribution (maximum softmax probability, maximum logit, negative energy,
negative Mahalanobis or k-NN distance). In-distribution images are the positives of the
true-positive rate: a threshold ``t`` *accepts* an image when ``score >= t``, so

* TPR(t) is the share of in-distribution images accepted and
* FPR(t) the share of out-of-distribution images wrongly accepted.

Every function handles ties exactly, as the ROC curve of tied scores is defined (all images with
the same score are accepted or rejected together), and agrees with scikit-learn's
``roc_auc_score``, ``average_precision_score`` and ``roc_curve``:

* :func:`auroc` is the Mann-Whitney probability ``P(s_in > s_out) + P(s_in = s_out) / 2``;
* :func:`aupr` is the average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds,
  with in- (``positive="in"``) or out-of-distribution (``positive="out"``) images as positives;
* :func:`fpr_at_tpr` is the FPR at the highest threshold whose TPR reaches the target (the
  first point of the ROC curve with ``tpr >= 0.95``), as reported by Hendrycks & Gimpel (2017),
  Liang et al. (2018) and Liu et al. (2020).

The ``*_rows`` functions evaluate the same statistics on many resamples at once (one row each),
so bootstrap intervals cost one vectorised pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from auditkit.stats import bootstrap_cis

__all__ = [
    "TARGET_TPR",
    "aupr",
    "auroc",
    "fpr_at_tpr",
    "separation_metrics",
    "threshold_at_tpr",
]

FloatArray = NDArray[np.float64]
TARGET_TPR = 0.95
"""The in-distribution true-positive rate of the reported operating point."""

# Query blocks of the batched statistics stay below this many elements (bounded memory).
_MAX_BLOCK_ELEMENTS = 1 << 22


def _scores(values: ArrayLike, name: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; expected at least one score")
    if np.isnan(array).any():
        raise ValueError(
            f"{name} holds {int(np.isnan(array).sum())} NaN score(s); expected numbers"
            " (map an undefined score to -inf, the least in-distribution value)"
        )
    return array


def _check_tpr(tpr: float) -> None:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")


def accepted_count(n_in: int, tpr: float = TARGET_TPR) -> int:
    """The fewest in-distribution images ``k`` with ``k / n_in >= tpr`` (compared as floats,
    exactly as scikit-learn's ``tpr >= target`` on ``roc_curve`` output)."""
    _check_tpr(tpr)
    k = max(1, min(n_in, math.ceil(tpr * n_in)))
    while k > 1 and (k - 1) / n_in >= tpr:
        k -= 1
    while k < n_in and k / n_in < tpr:
        k += 1
    return k


# --------------------------------------------------------------------------------------------
# Batched statistics: one row per resample


def auroc_rows(scores: FloatArray, n_in: int) -> FloatArray:
    """AUROC per row of ``scores`` ``(B, n)`` whose first ``n_in`` columns are in-distribution."""
    n_out = scores.shape[1] - n_in
    ranks = rankdata(scores, axis=1, method="average")
    rank_sum = ranks[:, :n_in].sum(axis=1)
    return np.asarray((rank_sum - n_in * (n_in + 1) / 2.0) / (n_in * n_out), dtype=np.float64)


def threshold_rows(in_scores: FloatArray, tpr: float = TARGET_TPR) -> FloatArray:
    """Per row of ``in_scores`` ``(B, n_in)``: the highest threshold accepting ``>= tpr``."""
    k = accepted_count(in_scores.shape[1], tpr)
    return np.asarray(-np.partition(-in_scores, k - 1, axis=1)[:, k - 1], dtype=np.float64)


def fpr_at_tpr_rows(in_scores: FloatArray, out_scores: FloatArray, tpr: float = TARGET_TPR) -> FloatArray:
    """FPR at ``tpr`` per row of ``in_scores`` ``(B, n_in)`` and ``out_scores`` ``(B, n_out)``."""
    thresholds = threshold_rows(in_scores, tpr)
    return np.asarray((out_scores >= thresholds[:, None]).mean(axis=1), dtype=np.float64)


def average_precision_rows(scores: FloatArray, positive: NDArray[np.bool_]) -> FloatArray:
    """Average precision per row of ``scores`` ``(B, n)``; ``positive`` ``(n,)`` marks columns.

    Higher scores rank first. Tied scores form one threshold: every member of a tie group gets
    the precision at the group's end, so the result does not depend on the order within ties.
    """
    n = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    hits = positive[order]
    true_pos = np.cumsum(hits, axis=1)
    precision = true_pos / np.arange(1, n + 1)
    ends = np.ones_like(hits)
    ends[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    # For each position, the index of the last member of its tie group.
    group_end = np.where(ends, np.arange(n), n)
    group_end = np.minimum.accumulate(group_end[:, ::-1], axis=1)[:, ::-1]
    group_precision = np.take_along_axis(precision, group_end, axis=1)
    return np.asarray((hits * group_precision).sum(axis=1) / positive.sum(), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Plain functions


def auroc(in_scores: ArrayLike, out_scores: ArrayLike) -> float:
    """Area under the ROC curve of in- against out-of-distribution scores.

    Equals ``P(s_in > s_out) + P(s_in = s_out) / 2`` (ties count one half) and scikit-learn's
    ``roc_auc_score(y, s)`` with in-distribution images labelled 1. Swapping which set is the
    positive one (and negating the scores) gives the same value.

    Args:
        in_scores: detector scores of in-distribution images, shape ``(n_in,)``, higher = more
            in-distribution; ``-inf`` is allowed, NaN is not.
        out_scores: scores of out-of-distribution images, shape ``(n_out,)``.

    Returns:
        A value in ``[0, 1]``; 0.5 is chance, 1 a perfect separation.

    Raises:
        ValueError: an empty or non-1-D array, or a NaN score.
    """
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    return float(auroc_rows(np.r_[s_in, s_out][None, :], s_in.size)[0])


def aupr(in_scores: ArrayLike, out_scores: ArrayLike, *, positive: Literal["in", "out"] = "out") -> float:
    """Area under the precision-recall curve (average precision, no interpolation).

    ``positive="out"`` (AUPR-Out) treats out-of-distribution images as the positives to find,
    ranked by the negated score; ``positive="in"`` (AUPR-In) treats in-distribution images as
    positives, ranked by the score (Hendrycks & Gimpel 2017 report both). Equals scikit-learn's
    ``average_precision_score``; its baseline is the positives' share of all images.

    Args:
        in_scores: in-distribution scores ``(n_in,)``, higher = more in-distribution.
        out_scores: out-of-distribution scores ``(n_out,)``.
        positive: which set is the positive class.

    Returns:
        A value in ``(0, 1]``.

    Raises:
        ValueError: an empty or non-1-D array, a NaN score, or an unknown ``positive``.
    """
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    is_in = np.r_[np.ones(s_in.size, dtype=bool), np.zeros(s_out.size, dtype=bool)]
    combined = np.r_[s_in, s_out]
    if positive == "in":
        return float(average_precision_rows(combined[None, :], is_in)[0])
    if positive == "out":
        return float(average_precision_rows(-combined[None, :], ~is_in)[0])
    raise ValueError(f"positive must be 'in' or 'out', got {positive!r}")


def threshold_at_tpr(in_scores: ArrayLike, tpr: float = TARGET_TPR) -> float:
    """The highest threshold that accepts at least ``tpr`` of the in-distribution images.

    The rule ``accept when score >= threshold`` then keeps ``>= tpr`` of them (more when scores
    tie at the threshold). It depends on the in-distribution scores only: it is the
    ``ceil(tpr * n_in)``-th largest of them.

    Args:
        in_scores: in-distribution scores ``(n_in,)``.
        tpr: target true-positive rate in ``(0, 1]``.

    Raises:
        ValueError: empty scores, NaN, or ``tpr`` outside ``(0, 1]``.
    """
    s_in = _scores(in_scores, "in_scores")
    return float(threshold_rows(s_in[None, :], tpr)[0])


def fpr_at_tpr(in_scores: ArrayLike, out_scores: ArrayLike, tpr: float = TARGET_TPR) -> float:
    """False-positive rate at the threshold of :func:`threshold_at_tpr` (FPR at 95% TPR).

    The share of out-of-distribution images whose score reaches the threshold that keeps
    ``tpr`` of the in-distribution images; out-of-distribution images tied with the threshold
    are accepted. Equals ``fpr[np.searchsorted(tpr_curve, tpr)]`` on scikit-learn's
    ``roc_curve(y, s, drop_intermediate=False)``.

    Args:
        in_scores: in-distribution scores ``(n_in,)``, higher = more in-distribution.
        out_scores: out-of-distribution scores ``(n_out,)``.
        tpr: target true-positive rate in ``(0, 1]``.

    Returns:
        A value in ``[0, 1]``; lower is better.

    Raises:
        ValueError: empty or non-1-D arrays, NaN, or ``tpr`` outside ``(0, 1]``.
    """
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    return float(fpr_at_tpr_rows(s_in[None, :], s_out[None, :], tpr)[0])


Interval = tuple[float, float] | None


def separation_metrics(
    in_scores: ArrayLike,
    out_scores: ArrayLike,
    *,
    n_boot: int,
    rng: np.random.Generator,
    tpr: float = TARGET_TPR,
) -> dict[str, tuple[float, Interval]]:
    """AUROC, AUPR-Out, AUPR-In and FPR at ``tpr`` with 95% percentile bootstrap intervals.

    Resamples are stratified (in- and out-of-distribution images are resampled separately, so
    every resample keeps both set sizes) and shared by the four statistics; the threshold of the
    FPR is re-estimated in each resample.

    Args:
        in_scores: in-distribution scores ``(n_in,)``.
        out_scores: out-of-distribution scores ``(n_out,)``.
        n_boot: bootstrap resamples; 0 gives no intervals.
        rng: the generator of the resamples.
        tpr: target true-positive rate of the FPR.

    Returns:
        ``{"auroc", "aupr_out", "aupr_in", "fpr_at_tpr"}`` -> ``(value, interval or None)``.
    """
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    n_in = s_in.size
    combined = np.r_[s_in, s_out]
    is_in = np.r_[np.ones(n_in, dtype=bool), np.zeros(s_out.size, dtype=bool)]

    statistics: dict[str, Callable[[NDArray[np.intp]], FloatArray]] = {
        "auroc": lambda idx: _blocked(lambda rows: auroc_rows(combined[rows], n_in), idx),
        "aupr_out": lambda idx: _blocked(lambda rows: average_precision_rows(-combined[rows], ~is_in), idx),
        "aupr_in": lambda idx: _blocked(lambda rows: average_precision_rows(combined[rows], is_in), idx),
        "fpr_at_tpr": lambda idx: _blocked(
            lambda rows: fpr_at_tpr_rows(combined[rows[:, :n_in]], combined[rows[:, n_in:]], tpr),
            idx,
        ),
    }
    identity = np.arange(combined.size)[None, :]
    values = {name: float(statistic(identity)[0]) for name, statistic in statistics.items()}
    # Stratum codes: 0 for in-distribution rows, 1 for out-of-distribution rows, so column j of
    # every resample holds a row of the same set as row j (the first n_in columns stay "in").
    cis = bootstrap_cis(statistics, combined.size, n_boot=n_boot, rng=rng, strata=(~is_in).astype(np.int8))
    return {name: (values[name], cis[name]) for name in statistics}


def _blocked(statistic: Callable[[NDArray[np.intp]], FloatArray], idx: NDArray[np.intp]) -> FloatArray:
    """Evaluate a row statistic on blocks of resamples, so memory stays bounded."""
    rows_per_block = max(1, _MAX_BLOCK_ELEMENTS // max(1, idx.shape[1]))
    if idx.shape[0] <= rows_per_block:
        return statistic(idx)
    return np.concatenate([statistic(idx[i : i + rows_per_block]) for i in range(0, idx.shape[0], rows_per_block)])
