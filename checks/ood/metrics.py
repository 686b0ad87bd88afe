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

The ``*_rows`` functions evaluate the same statistics on many resamples at once (one row each).
The bootstrap of :func:`separation_metrics` uses the ``*_from_counts`` functions instead: a
resample only repeats rows, so it is given by its row multiplicities
(:func:`auditkit.stats.resample_counts`) and the scores are sorted once for all resamples. AUROC
and FPR compare the two sets only, and a row's copies belong to one set, so for them a repeated
row may count as a tie of itself and the values equal the ``*_rows`` ones.

Average precision is different: it gives every member of a tie group the precision at the
group's end, so copies of one positive row, treated as a tie, all get the precision *after* the
last copy, which exceeds the precisions the copies would have at consecutive ranks. Every
resample repeats some rows, so the resampled AP was biased upwards by ties the data do not have:
a detector that ranks every OOD image as more in-distribution than every eval image has the
smallest AP-Out its set sizes allow (0.3190 for 32 + 32 images on the 60-patient demo), yet every
resample scored above it and the percentile interval [0.3204, 0.3381] excluded it. In the
bootstrap the copies of a row whose score no other row of the sample shares are therefore ranked
as consecutive, distinct observations (the limit of a smoothed bootstrap whose bandwidth tends to
zero; Silverman & Young 1987, "The bootstrap: to smooth or not to smooth?", Biometrika 74(3)),
while rows that share a score in the sample (a saturated softmax, ``-inf``, identical images)
stay one tie group, as in the point estimate. On the sample itself (every multiplicity 1) both
conventions give the same value, scikit-learn's.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

from auditkit.stats import auroc_from_counts, bootstrap_cis, resample_counts

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
# Weighted statistics: one row of multiplicities per resample, scores sorted once


class _SortedCounts:
    """Resample weights of the in- and out-of-distribution rows, each set sorted once by score.

    ``counts`` ``(B, n)`` are row multiplicities (:func:`auditkit.stats.resample_counts`). Every
    statistic below needs, for a score ``s``, the weight of one set at or above, at or below or
    strictly below ``s`` in each resample: a binary search of ``s`` in the set's sorted scores
    (which finds the bounds of its tie group, ``-inf`` included) indexes one cumulative sum of
    the set's weights per resample. Weights and sums are integers, so they are exact.
    """

    def __init__(self, scores: FloatArray, is_in: NDArray[np.bool_], counts: NDArray[np.intp]) -> None:
        in_rows, out_rows = np.flatnonzero(is_in), np.flatnonzero(~is_in)
        in_order = in_rows[np.argsort(scores[in_rows], kind="stable")]
        out_order = out_rows[np.argsort(scores[out_rows], kind="stable")]
        self.in_scores, self.out_scores = scores[in_order], scores[out_order]
        # Rows whose score no other row of the sample shares: their copies are not ties (see the
        # module docstring).
        _, inverse, multiplicity = np.unique(scores, return_inverse=True, return_counts=True)
        alone = multiplicity[inverse.ravel()] == 1
        self.in_alone, self.out_alone = alone[in_order], alone[out_order]
        self.in_weight, self.out_weight = counts[:, in_order], counts[:, out_order]
        # Column i: the weight of the set's i lowest-scoring rows.
        self.in_through = _cumulative(self.in_weight)
        self.out_through = _cumulative(self.out_weight)
        self.n_in, self.n_out = self.in_through[:, -1], self.out_through[:, -1]

    def average_precision_in(self) -> FloatArray:
        """AP with in-distribution images as positives, ranked by descending score."""
        in_at_least = self.n_in[:, None] - self.in_through[:, _search(self.in_scores, self.in_scores, "left")]
        out_at_least = self.n_out[:, None] - self.out_through[:, _search(self.out_scores, self.in_scores, "left")]
        return _mean_precision(self.in_weight, in_at_least, out_at_least, self.n_in, self.in_alone)

    def average_precision_out(self) -> FloatArray:
        """AP with out-of-distribution images as positives, ranked by ascending score."""
        out_at_most = self.out_through[:, _search(self.out_scores, self.out_scores, "right")]
        in_at_most = self.in_through[:, _search(self.in_scores, self.out_scores, "right")]
        return _mean_precision(self.out_weight, out_at_most, in_at_most, self.n_out, self.out_alone)

    def fpr_at_tpr(self, tpr: float) -> FloatArray:
        """FPR at the ``k``-th largest in-distribution score, ``k = accepted_count(n_in, tpr)``."""
        if self.in_scores.size == 0:
            return np.full(self.n_in.shape, np.nan)
        # Stratified resamples share one n_in: accepted_count runs once per distinct size.
        sizes, size_of_resample = np.unique(self.n_in, return_inverse=True)
        accepted = np.array([accepted_count(int(size), tpr) for size in sizes], dtype=np.intp)[size_of_resample]
        # The k-th largest is the sorted in-distribution row m with the most rows at or above
        # it still weighing >= k, i.e. the last m whose weight below it is <= n_in - k.
        at_threshold = (self.in_through[:, :-1] <= (self.n_in - accepted)[:, None]).sum(axis=1) - 1
        defined = (at_threshold >= 0) & (self.n_out > 0)
        threshold_row = np.maximum(at_threshold, 0)
        out_below = self.out_through[:, _search(self.out_scores, self.in_scores, "left")]
        out_accepted = self.n_out - np.take_along_axis(out_below, threshold_row[:, None], axis=1)[:, 0]
        return np.where(defined, out_accepted / np.where(defined, self.n_out, 1), np.nan)


def _cumulative(weights: NDArray[np.intp]) -> NDArray[np.intp]:
    """Cumulative sums along each row with a leading zero column, shape ``(B, m + 1)``."""
    through = np.zeros((weights.shape[0], weights.shape[1] + 1), dtype=np.intp)
    np.cumsum(weights, axis=1, out=through[:, 1:])
    return through


def _search(sorted_scores: FloatArray, scores: FloatArray, side: Literal["left", "right"]) -> NDArray[np.intp]:
    """Positions of ``scores`` in ``sorted_scores``: before (``left``) or after (``right``) their ties."""
    return np.searchsorted(sorted_scores, scores, side=side)


def _mean_precision(
    weight: NDArray[np.intp],
    positives_reached: NDArray[np.intp],
    negatives_reached: NDArray[np.intp],
    n_positive: NDArray[np.intp],
    alone: NDArray[np.bool_],
) -> FloatArray:
    """Weighted mean over positive rows of their precision, as the AP of the resample.

    A row in a tie group of the sample gets, for each of its copies, the precision at the end
    of its group, exactly as in :func:`average_precision_rows`. The ``w`` copies of a row that is
    ``alone`` (no other row shares its score) rank consecutively instead: with ``P`` positives
    and ``A`` rows reached at the last copy, they get ``sum_{i < w} (P - i) / (A - i)``, which is
    ``P / A`` for ``w = 1`` (see the module docstring).
    """
    reached = positives_reached + negatives_reached
    # A row absent from a resample (weight 0) may reach no row at all; its precision is unused.
    precision = np.divide(positives_reached, reached, out=np.zeros(reached.shape), where=reached > 0)
    contribution = weight * precision
    copies = alone[None, :] & (weight > 1)
    if copies.any():
        # The i-th copy from the last ranks i rows earlier: i fewer positives and rows reached.
        spread = precision.copy()
        for i in range(1, int(weight[copies].max())):
            earlier = copies & (weight > i)
            spread += np.divide(positives_reached - i, reached - i, out=np.zeros(reached.shape), where=earlier)
        contribution = np.where(copies, spread, contribution)
    defined = n_positive > 0
    return np.where(defined, contribution.sum(axis=1) / np.where(defined, n_positive, 1), np.nan)


def average_precision_from_counts(
    scores: FloatArray, positive: NDArray[np.bool_], counts: NDArray[np.intp]
) -> FloatArray:
    """Average precision of every resample given as row multiplicities ``counts`` ``(B, n)``.

    Higher scores rank first and each tie group of the sample is one threshold, as in
    :func:`average_precision_rows`; the copies of a row whose score no other row shares rank as
    consecutive distinct observations (see the module docstring). So this equals
    :func:`average_precision_rows` on ``scores[idx]`` after breaking those copies apart, and on
    the sample itself (every count 1) it equals scikit-learn's ``average_precision_score``. The
    scores are sorted once. NaN for a resample without a positive row.
    """
    return _SortedCounts(scores, positive, counts).average_precision_in()


def fpr_at_tpr_from_counts(
    scores: FloatArray, is_in: NDArray[np.bool_], counts: NDArray[np.intp], tpr: float = TARGET_TPR
) -> FloatArray:
    """FPR at ``tpr`` of every resample given as row multiplicities ``counts`` ``(B, n)``.

    Equals :func:`fpr_at_tpr_rows` on the in- and out-of-distribution rows of ``scores[idx]``
    when ``counts`` are the multiplicities of ``idx``, with the scores sorted once. NaN for a
    resample without an in- or without an out-of-distribution row.
    """
    _check_tpr(tpr)
    return _SortedCounts(scores, is_in, counts).fpr_at_tpr(tpr)


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
    """AUROC, AUPR-Out, AUPR-In and FPR at ``tpr`` with 95% bootstrap intervals.

    Resamples are stratified (in- and out-of-distribution images are resampled separately, so
    every resample keeps both set sizes) and shared by the four statistics; the threshold of the
    FPR is re-estimated in each resample, and the copies of a row are not ties in the AUPRs
    (module docstring). Each interval is the median-centred percentile interval of
    :func:`auditkit.stats.median_centred_interval` around the value (the AUPRs and the FPR are
    biased under resampling, and a plain percentile interval could exclude them), within [0, 1].

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

    # Point values: the plain row functions on the sample itself.
    point = combined[None, :]
    values = {
        "auroc": float(auroc_rows(point, n_in)[0]),
        "aupr_out": float(average_precision_rows(-point, ~is_in)[0]),
        "aupr_in": float(average_precision_rows(point, is_in)[0]),
        "fpr_at_tpr": float(fpr_at_tpr_rows(point[:, :n_in], point[:, n_in:], tpr)[0]),
    }

    def replicates(rows: NDArray[np.intp]) -> dict[str, FloatArray]:
        counts = resample_counts(rows, combined.size)
        sorted_counts = _SortedCounts(combined, is_in, counts)
        return {
            "auroc": auroc_from_counts(combined, is_in, counts),
            "aupr_out": sorted_counts.average_precision_out(),
            "aupr_in": sorted_counts.average_precision_in(),
            "fpr_at_tpr": sorted_counts.fpr_at_tpr(tpr),
        }

    shared = _SharedReplicates(replicates)
    statistics = {name: shared.statistic(name) for name in values}
    # Stratum codes: 0 for in-distribution rows, 1 for out-of-distribution rows, so column j of
    # every resample holds a row of the same set as row j (every resample keeps n_in and n_out).
    cis = bootstrap_cis(
        statistics,
        combined.size,
        n_boot=n_boot,
        rng=rng,
        strata=(~is_in).astype(np.int8),
        estimates=values,
        bounds=(0.0, 1.0),
    )
    return {name: (values[name], cis[name]) for name in values}


class _SharedReplicates:
    """The four bootstrap statistics of one index matrix, computed together in one pass.

    :func:`~auditkit.stats.bootstrap_cis` calls each named statistic with the same index matrix
    in turn; the first call computes all of them (sharing the counts and the sorted cumulative
    weights), block by block so memory stays bounded, and the others read the result. The matrix is held by a weak
    reference, so a finished block is freed as before.
    """

    def __init__(self, compute: Callable[[NDArray[np.intp]], dict[str, FloatArray]]) -> None:
        self._compute = compute
        self._idx: weakref.ref[NDArray[np.intp]] | None = None
        self._values: dict[str, FloatArray] = {}

    def statistic(self, name: str) -> Callable[[NDArray[np.intp]], FloatArray]:
        def evaluate(idx: NDArray[np.intp]) -> FloatArray:
            if self._idx is None or self._idx() is not idx:
                self._values = _blocked_replicates(self._compute, idx)
                self._idx = weakref.ref(idx)
            return self._values[name]

        return evaluate


def _blocked_replicates(
    compute: Callable[[NDArray[np.intp]], dict[str, FloatArray]], idx: NDArray[np.intp]
) -> dict[str, FloatArray]:
    """Evaluate several statistics on blocks of resamples, so memory stays bounded."""
    rows_per_block = max(1, _MAX_BLOCK_ELEMENTS // max(1, idx.shape[1]))
    if idx.shape[0] <= rows_per_block:
        return compute(idx)
    blocks = [compute(idx[i : i + rows_per_block]) for i in range(0, idx.shape[0], rows_per_block)]
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
