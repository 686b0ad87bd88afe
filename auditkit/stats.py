"""Statistics shared by every check: bootstrap confidence intervals and stable seeds.

Checks measure on a finite evaluation split, so every headline number comes with a 95% bootstrap
interval (Efron & Tibshirani 1993, "An Introduction to the Bootstrap"). The bootstrap here is
vectorised: all resamples are drawn at once as a ``(n_boot, n)`` matrix of row indices, and a
*batched* statistic maps that matrix to ``n_boot`` values in one NumPy pass, so a check can
bootstrap several metrics per subgroup in milliseconds. Several statistics can share one draw
(:func:`bootstrap_cis`), which keeps their intervals consistent with one another.

Which interval. A reported interval describes the uncertainty of the reported number, so it must
contain it; the gates of a policy read its ends (``ci_low``, ``ci_high``). Two things make a
bootstrap interval miss its own estimate, and both are handled here:

* the interval and the estimate come from different computations (other rows, other weights,
  another implementation). :func:`bootstrap_cis` therefore evaluates every statistic on the
  sample itself (the identity resample) and centres its interval there; an estimate a check
  passes in must agree with that value, or it raises.
* the statistic is biased under resampling, so that most replicates fall on one side of the
  estimate. The calibration errors (ECE, MCE, ACE) sum or maximise absolute values of noisy bin
  gaps, so a resample's value exceeds the sample's, and near zero calibration error the
  bootstrap is inconsistent (the kink of ``|x|`` at 0; Andrews 2000, "Inconsistency of the
  bootstrap when a parameter is on the boundary of the parameter space", Econometrica 68(2)):
  on the demo, ``calibration.ece_after_temperature`` 0.0142 came with the percentile interval
  [0.0143, 0.0598]. Maxima, ratios and rank statistics with ties behave alike.

The plain percentile interval ``[Q(a/2), Q(1 - a/2)]`` of the replicates (Efron & Tibshirani
1993, ch. 13) excludes the estimate in the second case. Efron's bias-corrected percentile
interval, BC (Efron 1981, "Nonparametric standard errors and confidence intervals", Canadian
Journal of Statistics 9(2); Efron & Tibshirani 1993, sec. 14.3), does not repair it: it reads the
replicates at the levels ``Phi(2 z0 +- z)`` with ``z0 = Phi^-1(share of replicates below the
estimate)``, a reflection through the estimate, so (for a continuous bootstrap distribution) it
contains the estimate exactly when the percentile interval does, and when more than 97.5% of the
replicates lie above the estimate it lies entirely below it. Every interval here is therefore
the *median-centred percentile interval* (:func:`median_centred_interval`): the percentile
interval shifted by the bootstrap's median bias ``median(replicates) - estimate`` (the bootstrap
estimate of bias, Efron & Tibshirani 1993, sec. 10.2, with the median for the mean),

    ``[estimate - (Q(1/2) - Q(a/2)),  estimate + (Q(1 - a/2) - Q(1/2))]``,

cut to the statistic's range where one is known ([0, 1] for rates). It keeps the width and the
skew of the bootstrap distribution, always contains the estimate, and is the percentile interval
itself whenever the median of the replicates is the estimate (as it is, or nearly, for a mean or
a proportion). Like the estimate it surrounds, it keeps the estimator's own bias: an interval
for the ECE is an interval for what the ECE estimator measures with this many images and bins,
which is what a policy threshold on the ECE is set against (the ECE overestimates a small
calibration error: Kumar, Liang & Ma 2019, "Verified Uncertainty Calibration", NeurIPS).

:func:`percentile_interval` stays for quantiles of replicates that are not an estimate's interval
(the critical value of the bias check's simultaneous gap interval).

Example:
    >>> import numpy as np
    >>> x = np.arange(20.0)
    >>> lo, hi = bootstrap_ci(np.mean, x, rng=np.random.default_rng(0))
    >>> lo < float(x.mean()) < hi
    True
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MAX_UNDEFINED_FRACTION",
    "BatchedStatistic",
    "auroc_from_counts",
    "bootstrap_ci",
    "bootstrap_cis",
    "bootstrap_indices",
    "median_centred_interval",
    "percentile_interval",
    "resample_counts",
    "stable_seed",
    "wilson_interval",
]

IndexMatrix = NDArray[np.intp]
"""Row indices of bootstrap resamples, shape ``(n_boot, n)``."""

CountMatrix = NDArray[np.intp]
"""Multiplicities of rows in bootstrap resamples, shape ``(n_boot, n)`` (see :func:`resample_counts`)."""

BatchedStatistic = Callable[[IndexMatrix], ArrayLike]
"""A statistic evaluated on many resamples at once: ``(B, n)`` row indices -> ``(B,)`` values."""

Bounds = tuple[float, float]
"""The range ``(lowest, highest)`` of a statistic's values (``(0.0, 1.0)`` for a rate)."""

MAX_UNDEFINED_FRACTION = 0.10
"""A bootstrap interval is reported only when at most this fraction of replicates is undefined."""

# Upper bound on the elements of one index block; larger bootstraps are drawn block by block so
# memory stays bounded (about 128 MiB of int64 indices) whatever the split size.
_MAX_BLOCK_ELEMENTS = 1 << 24


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (95% by default); ``None`` for ``n = 0``.

    Example:
        >>> [round(v, 4) for v in wilson_interval(0, 25)]
        [0.0, 0.1332]
    """
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def stable_seed(*parts: object) -> int:
    """Derive a seed from ``parts`` that is identical across processes, platforms and runs.

    Python's ``hash`` is salted per process; this uses BLAKE2b over the ``repr`` of the parts, so
    ``stable_seed(0, "calibration")`` is the same everywhere. Use it to give each unit of work
    (a check, a subgroup) its own independent stream:
    ``np.random.default_rng(stable_seed(spec_seed, "calibration", "sex", "F"))``.

    Args:
        *parts: strings, integers or other values with a stable ``repr``.

    Returns:
        A non-negative integer below ``2**63``.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def bootstrap_indices(
    n: int,
    *,
    n_boot: int,
    rng: np.random.Generator,
    strata: ArrayLike | None = None,
) -> IndexMatrix:
    """Draw ``n_boot`` bootstrap resamples of ``n`` rows as one index matrix.

    Args:
        n: number of rows in the sample.
        n_boot: number of resamples.
        rng: the generator to draw from (the only source of randomness).
        strata: optional label per row, shape ``(n,)``. When given, each row is resampled among
            rows of its own stratum, so every resample keeps exactly the stratum counts (column
            ``j`` of the result always holds a row of the same stratum as row ``j``).

    Returns:
        Integer array of shape ``(n_boot, n)`` with values in ``[0, n)``.

    Raises:
        ValueError: ``n`` or ``n_boot`` is negative, or ``strata`` has the wrong length.
    """
    if n < 0 or n_boot < 0:
        raise ValueError(f"n and n_boot must be non-negative, got n={n}, n_boot={n_boot}")
    if n == 0:
        return np.empty((n_boot, 0), dtype=np.intp)
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n), dtype=np.intp)
    labels = np.asarray(strata)
    if labels.shape != (n,):
        raise ValueError(f"strata must have shape ({n},), got {labels.shape}")
    _, codes = np.unique(labels, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    stops = np.r_[starts[1:], n]
    idx = np.empty((n_boot, n), dtype=np.intp)
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        members = order[start:stop]
        picks = rng.integers(0, stop - start, size=(n_boot, stop - start), dtype=np.intp)
        idx[:, members] = members[picks]
    return idx


def percentile_interval(replicates: ArrayLike, *, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile interval of bootstrap replicates, tolerating a few undefined ones.

    The ``alpha/2`` and ``1 - alpha/2`` quantiles of the replicates. It does not look at the
    estimate, so for a statistic that is biased under resampling it can exclude it: an
    estimate's interval is :func:`median_centred_interval`; this one serves quantiles that are
    not intervals of an estimate (a critical value).

    Args:
        replicates: statistic values, one per resample; NaN or infinite marks an undefined one.
        alpha: the interval covers ``1 - alpha`` (0.05 gives a 95% interval).

    Returns:
        ``(lo, hi)`` with ``lo <= hi``, or ``None`` when there are no replicates or more than
        :data:`MAX_UNDEFINED_FRACTION` of them are undefined (the rest are then ignored).
    """
    values = np.asarray(replicates, dtype=np.float64).ravel()
    if values.size == 0:
        return None
    finite = values[np.isfinite(values)]
    if values.size - finite.size > MAX_UNDEFINED_FRACTION * values.size or finite.size == 0:
        return None
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def median_centred_interval(
    replicates: ArrayLike,
    estimate: float,
    *,
    alpha: float = 0.05,
    bounds: Bounds | None = None,
) -> tuple[float, float] | None:
    """Percentile interval of bootstrap replicates, shifted so that its median is the estimate.

    With ``Q`` the quantile function of the defined replicates (linear interpolation, as
    :func:`percentile_interval`), the interval is::

        [estimate - (Q(1/2) - Q(alpha/2)),  estimate + (Q(1 - alpha/2) - Q(1/2))]

    that is, the percentile interval minus the bootstrap's median bias ``Q(1/2) - estimate``
    (see the module docstring for why this and not Efron's BC). Hence:

    * ``lo <= estimate <= hi`` always (``Q`` is non-decreasing; a final guard absorbs float
      rounding of the shift, at most a few units in the last place);
    * when ``Q(1/2) == estimate`` the result *is* :func:`percentile_interval` (no shift at all);
    * a bootstrap distribution that is a single point gives ``(estimate, estimate)``.

    ``bounds`` then cuts the interval to the statistic's range (an ECE is never negative, an
    accuracy never above 1); the estimate stays inside even if it lies outside ``bounds``.

    Args:
        replicates: the statistic on each resample; NaN or infinite marks an undefined one.
        estimate: the statistic on the sample itself (what the check reports).
        alpha: the interval covers ``1 - alpha`` (0.05 gives a 95% interval).
        bounds: the statistic's range ``(lowest, highest)``; ``None``: unbounded.

    Returns:
        ``(lo, hi)`` with ``lo <= estimate <= hi``, or ``None`` when the estimate is not finite,
        there are no replicates, or more than :data:`MAX_UNDEFINED_FRACTION` of them are
        undefined.

    Raises:
        ValueError: ``alpha`` is not in ``(0, 1)`` or ``bounds`` is not ordered.

    Example:
        >>> median_centred_interval([1.0, 2.0, 3.0, 4.0, 5.0], 1.5, alpha=0.5)  # Q: 2, 3, 4
        (0.5, 2.5)
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if bounds is not None and not bounds[0] <= bounds[1]:
        raise ValueError(f"bounds must be (lowest, highest) with lowest <= highest, got {bounds}")
    point = float(estimate)
    if not math.isfinite(point):
        return None
    values = np.asarray(replicates, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0 or values.size - finite.size > MAX_UNDEFINED_FRACTION * values.size:
        return None
    q_lo, q_mid, q_hi = (float(q) for q in np.quantile(finite, [alpha / 2.0, 0.5, 1.0 - alpha / 2.0]))
    shift = point - q_mid
    lo, hi = (q_lo, q_hi) if shift == 0.0 else (q_lo + shift, q_hi + shift)
    # Mathematically lo <= point <= hi already; this only absorbs rounding of the shift.
    lo, hi = min(lo, point), max(hi, point)
    if bounds is not None:
        lo, hi = max(lo, min(bounds[0], point)), min(hi, max(bounds[1], point))
    return lo, hi


def bootstrap_cis(
    statistics: Mapping[str, BatchedStatistic],
    n: int,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator,
    strata: ArrayLike | None = None,
    estimates: Mapping[str, float] | None = None,
    bounds: Bounds | Mapping[str, Bounds] | None = None,
) -> dict[str, tuple[float, float] | None]:
    """Median-centred bootstrap intervals of several batched statistics on the same resamples.

    Every statistic sees the same index matrices, so their intervals come from one draw and the
    cost of drawing is paid once. Large bootstraps are evaluated in blocks of resamples. Each
    statistic is also evaluated on the sample itself (the identity resample ``arange(n)``), and
    its interval (:func:`median_centred_interval`) is centred on that value, so the interval
    and the estimate are one computation on the same rows.

    Args:
        statistics: name -> batched statistic, called with a ``(B, n)`` index matrix and returning
            ``B`` values (NaN where the statistic is undefined on that resample).
        n: number of rows the indices refer to.
        n_boot: number of resamples; 0 disables the intervals (every value is ``None``).
        alpha: the intervals cover ``1 - alpha``.
        rng: the generator to draw from (the identity evaluation draws nothing).
        strata: optional stratum label per row (see :func:`bootstrap_indices`).
        estimates: name -> the value the check reports, when it computes it itself (another
            implementation, such as scikit-learn's). It must equal the statistic on the identity
            resample (to ``1e-9`` relative); the interval is then centred on it exactly.
        bounds: the statistics' range, one ``(lowest, highest)`` for all or name -> range
            (missing names: unbounded); see :func:`median_centred_interval`.

    Returns:
        name -> ``(lo, hi)`` containing the statistic's estimate, or ``None`` when ``n < 2``,
        ``n_boot == 0``, the estimate is undefined, or the statistic is undefined in more than
        :data:`MAX_UNDEFINED_FRACTION` of the resamples.

    Raises:
        ValueError: ``alpha`` is not in ``(0, 1)``, a statistic returns the wrong shape, or a
            given estimate differs from the statistic on the sample itself.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n < 2 or n_boot <= 0 or not statistics:
        return dict.fromkeys(statistics)
    block = max(1, min(n_boot, _MAX_BLOCK_ELEMENTS // n))
    values = {name: np.empty(n_boot, dtype=np.float64) for name in statistics}
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        idx = bootstrap_indices(n, n_boot=size, rng=rng, strata=strata)
        for name, statistic in statistics.items():
            values[name][start : start + size] = _evaluate(name, statistic, idx)
    points = _estimates(statistics, n, estimates or {})
    return {
        name: median_centred_interval(vals, points[name], alpha=alpha, bounds=_bounds_of(name, bounds))
        for name, vals in values.items()
    }


def _evaluate(name: str, statistic: BatchedStatistic, idx: IndexMatrix) -> NDArray[np.float64]:
    """``statistic(idx)`` as float64, checked to hold one value per resample."""
    out = np.asarray(statistic(idx), dtype=np.float64)
    if out.shape != (idx.shape[0],):
        raise ValueError(f"batched statistic {name!r} must return shape ({idx.shape[0]},), got {out.shape}")
    return out


def _estimates(statistics: Mapping[str, BatchedStatistic], n: int, given: Mapping[str, float]) -> dict[str, float]:
    """Each statistic on the identity resample; a given estimate must agree with it."""
    identity = np.arange(n, dtype=np.intp)[None, :]
    points: dict[str, float] = {}
    for name, statistic in statistics.items():
        itself = float(_evaluate(name, statistic, identity)[0])
        if name not in given:
            points[name] = itself
            continue
        reported = float(given[name])
        both_undefined = not math.isfinite(itself) and not math.isfinite(reported)
        if not both_undefined and not math.isclose(reported, itself, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"the estimate of {name!r} is {reported!r}, but the statistic on the sample itself gives"
                f" {itself!r}: the interval and the estimate would describe different numbers"
            )
        points[name] = reported
    return points


def _bounds_of(name: str, bounds: Bounds | Mapping[str, Bounds] | None) -> Bounds | None:
    if bounds is None or isinstance(bounds, tuple):
        return bounds
    return bounds.get(name)


def resample_counts(idx: IndexMatrix, n: int) -> CountMatrix:
    """How many times each row appears in each resample.

    A resample only repeats rows of the sample, so a statistic that depends on the multiset of
    rows (not their order) can be computed from these multiplicities with the rows sorted once,
    instead of re-sorting every resample (see :func:`auroc_from_counts`).

    Args:
        idx: row indices of ``B`` resamples, shape ``(B, m)``, values in ``[0, n)`` (the output of
            :func:`bootstrap_indices`, where ``m == n``).
        n: number of rows the indices refer to.

    Returns:
        Integer array ``counts`` of shape ``(B, n)``: ``counts[b, j]`` is the number of times row
        ``j`` occurs in ``idx[b]``; every row of ``counts`` sums to ``m``.

    Raises:
        ValueError: ``idx`` is not 2-D or not integer, ``n`` is negative, or an index is outside
            ``[0, n)``.
    """
    index = np.asarray(idx)
    if index.ndim != 2 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"idx must be a 2-D integer index matrix, got shape {index.shape}, dtype {index.dtype}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if index.size and (int(index.min()) < 0 or int(index.max()) >= n):
        bad = index[(index < 0) | (index >= n)].flat[0]
        raise ValueError(f"idx must hold row indices in [0, {n}), got {bad}")
    n_boot = index.shape[0]
    # One bincount over all resamples: resample b's rows are shifted into the bins [b * n, (b + 1) * n).
    offsets = n * np.arange(n_boot, dtype=np.intp)[:, None]
    counts = np.bincount((index.astype(np.intp, copy=False) + offsets).ravel(), minlength=n_boot * n)
    return counts.reshape(n_boot, n).astype(np.intp, copy=False)


def auroc_from_counts(scores: ArrayLike, positive: ArrayLike, counts: ArrayLike) -> NDArray[np.float64]:
    """AUROC of every resample given as row multiplicities, sorting the scores once.

    The Mann-Whitney statistic ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` (Hanley & McNeil
    1982), equal to scikit-learn's ``roc_auc_score(positive[idx[b]], scores[idx[b]])`` on the
    resample ``idx[b]`` whose multiplicities are ``counts[b]``. A resample repeats rows, and a
    repeated row is a tie of itself, so with rows of equal score forming one tie group ``g``::

        AUROC_b = sum_g pos_w[b, g] * (neg_below[b, g] + neg_w[b, g] / 2) / (n_pos[b] * n_neg[b])

    where ``pos_w`` and ``neg_w`` are a group's positive and negative weight in resample ``b``
    and ``neg_below`` the negative weight of the groups below it. The negative rows are sorted
    once and every positive row finds its group's bounds by binary search, so one cumulative
    sum of the negative weights per resample gives ``neg_below`` and ``neg_below + neg_w``;
    ``-inf`` ties with ``-inf``. The sums are carried in integers (twice the numerator), so the
    only rounding is the final division.

    Args:
        scores: one score per row, shape ``(n,)``, higher = more positive; ``±inf`` allowed,
            NaN is not.
        positive: boolean class of each row, shape ``(n,)``.
        counts: non-negative integer row multiplicities, shape ``(B, n)`` (see
            :func:`resample_counts`).

    Returns:
        Shape ``(B,)`` float64 values in ``[0, 1]``; NaN for a resample without a positive or
        without a negative row.

    Raises:
        ValueError: a shape mismatch, a NaN score, a non-boolean ``positive``, or non-integer
            or negative ``counts``.

    Example:
        >>> import numpy as np
        >>> scores = np.array([0.1, 0.4, 0.35, 0.8])
        >>> positive = np.array([False, False, True, True])
        >>> idx = np.array([[0, 1, 2, 3], [0, 0, 3, 3], [2, 1, 1, 3]])
        >>> auroc_from_counts(scores, positive, resample_counts(idx, 4)).tolist()
        [0.75, 1.0, 0.5]
    """
    values, is_positive, weights = _validate_weighted_sample(scores, positive, counts)
    positive_rows = np.flatnonzero(is_positive)
    negative_rows = np.flatnonzero(~is_positive)
    negative_order = negative_rows[np.argsort(values[negative_rows], kind="stable")]
    negative_scores = values[negative_order]
    # Column i of the cumulative matrix: negative weight of the i lowest negative rows.
    negative_through = np.zeros((weights.shape[0], negative_order.size + 1), dtype=np.intp)
    np.cumsum(weights[:, negative_order], axis=1, out=negative_through[:, 1:])
    positive_scores = values[positive_rows]
    below = negative_through[:, np.searchsorted(negative_scores, positive_scores, side="left")]
    at_most = negative_through[:, np.searchsorted(negative_scores, positive_scores, side="right")]
    positive_weight = weights[:, positive_rows]
    twice_u = (positive_weight * (below + at_most)).sum(axis=1)
    twice_pairs = 2 * positive_weight.sum(axis=1) * negative_through[:, -1]
    defined = twice_pairs > 0
    return np.where(defined, twice_u / np.where(defined, twice_pairs, 1), np.nan)


def _validate_weighted_sample(
    scores: ArrayLike, positive: ArrayLike, counts: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_], CountMatrix]:
    """Check and convert the inputs of the count-based rank statistics."""
    values = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(positive)
    weights = np.asarray(counts)
    if values.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError(f"scores hold {int(np.isnan(values).sum())} NaN value(s); expected numbers or ±inf")
    if is_positive.shape != values.shape or is_positive.dtype != np.bool_:
        raise ValueError(
            f"positive must be a boolean mask of shape {values.shape}, got shape {is_positive.shape},"
            f" dtype {is_positive.dtype}"
        )
    if weights.ndim != 2 or weights.shape[1] != values.size:
        raise ValueError(f"counts must have shape (B, {values.size}), got {weights.shape}")
    if not np.issubdtype(weights.dtype, np.integer) or (weights.size and int(weights.min()) < 0):
        raise ValueError(f"counts must be non-negative integers, got dtype {weights.dtype}")
    return values, is_positive, weights.astype(np.intp, copy=False)


def bootstrap_ci(
    statistic: Callable[..., Any],
    *arrays: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator,
    strata: ArrayLike | None = None,
    batched: bool = False,
    estimate: float | None = None,
    bounds: Bounds | None = None,
) -> tuple[float, float] | None:
    """Median-centred bootstrap interval of ``statistic(*arrays)``, resampling rows jointly.

    Two calling conventions:

    * plain (``batched=False``): ``statistic(*resampled_arrays) -> float`` is called once per
      resample with the arrays indexed by the same rows, e.g. ``bootstrap_ci(np.mean, x, rng=g)``;
    * batched (``batched=True``): ``statistic(idx) -> (B,)`` receives the whole ``(B, n)`` index
      matrix and indexes its own data (``arrays`` then only fix ``n``), e.g.
      ``bootstrap_ci(lambda idx: x[idx].mean(axis=1), x, rng=g, batched=True)``. This is the
      fast path; use :func:`bootstrap_cis` to share one draw among several statistics.

    A statistic that is undefined on a resample returns NaN (or, in plain mode, raises
    ``ZeroDivisionError``/``FloatingPointError``/``ValueError``, which counts as NaN).

    Args:
        statistic: the statistic, in the convention chosen by ``batched``.
        *arrays: one or more arrays with the same first dimension ``n`` (rows).
        n_boot: number of resamples; 0 disables the interval.
        alpha: the interval covers ``1 - alpha`` (default 95%).
        rng: the generator to draw from; the result is a function of its state.
        strata: optional stratum label per row; resamples keep the stratum counts.
        batched: select the batched calling convention.
        estimate: the reported value, if computed elsewhere; it must equal the statistic on the
            arrays themselves (see :func:`bootstrap_cis`).
        bounds: the statistic's range ``(lowest, highest)``.

    Returns:
        ``(lo, hi)`` containing the statistic on the arrays themselves (see
        :func:`median_centred_interval`), or ``None`` when ``n < 2``, ``n_boot == 0``, that
        value is undefined, or the statistic is undefined in more than 10% of the resamples (NaN
        replicates are otherwise ignored).

    Raises:
        ValueError: no arrays are given, they differ in length, or ``estimate`` disagrees.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    data = [np.asarray(a) for a in arrays]
    lengths = {len(a) if a.ndim else -1 for a in data}
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError(f"arrays must share their first dimension, got lengths {sorted(lengths)}")
    n = lengths.pop()

    if batched:
        batched_statistic: BatchedStatistic = statistic
    else:

        def batched_statistic(idx: IndexMatrix) -> NDArray[np.float64]:
            return np.array([_call_plain(statistic, [a[row] for a in data]) for row in idx])

    return bootstrap_cis(
        {"statistic": batched_statistic},
        n,
        n_boot=n_boot,
        alpha=alpha,
        rng=rng,
        strata=strata,
        estimates=None if estimate is None else {"statistic": estimate},
        bounds=bounds,
    )["statistic"]


def _call_plain(statistic: Callable[..., Any], arrays: list[NDArray[Any]]) -> float:
    """Evaluate a plain statistic on one resample, mapping arithmetic failures to NaN."""
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(statistic(*arrays))
    except (ZeroDivisionError, FloatingPointError, ValueError):
        return math.nan
    return value


def as_numpy(values: Any) -> NDArray[Any]:
    """A NumPy array of an array or a (CPU or GPU) torch tensor, without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def check_probs_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Validate finite ``(N, K)`` class probabilities and ``(N,)`` class indices.

    Returns float64 probabilities and intp labels. Raises ValueError naming the offending shape,
    dtype or value.
    """
    p = np.asarray(as_numpy(probs), dtype=np.float64)
    y = as_numpy(labels)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.intp, copy=False)
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        bad = y[(y < 0) | (y >= p.shape[1])][0]
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]}), got {bad}")
    if not np.isfinite(p).all():
        raise ValueError("probs must be finite; drop rows with non-finite logits first")
    return p, y
