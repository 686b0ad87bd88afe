"""Calibration of one binary output (a multi-label model's label), as plain functions.

Each label of a multi-label model is its own binary classifier with a sigmoid output ``p``, so
its calibration is that of ``p`` against the 0/1 outcome: within a bin of predicted
probabilities, does the finding occur as often as predicted? This is the *positive-class*
convention, which is netcal's for binary input (``netcal.metrics.ECE(bins).measure(p, y)`` with
a 1-D ``p``), and not the top-label convention of :mod:`.metrics` (which asks whether
``max(p, 1 - p)`` matches the accuracy of the decision). The two differ: a label predicted at
0.1 and present 10% of the time is calibrated here, whatever its decisions' accuracy.

Binning is the same as in :mod:`.metrics` (netcal's): ``p`` clipped to ``[eps, 1 - eps]``,
equal-width edges ``linspace(0, 1, bins + 1)`` with bins ``[lower, upper)``, equal-mass edges the
linear-interpolation quantiles (``numpy.quantile``'s default) of the sample's clipped ``p``.
The Brier score is scikit-learn's ``brier_score_loss(y, p)``; the NLL is its ``log_loss(y, p)``
(``p`` clipped to ``[eps, 1 - eps]``).

Resampling. The statistics are evaluated on *row multiplicities*: a ``(B, n)`` integer matrix
whose row ``b`` says how often each of the ``n`` rows occurs in resample ``b`` (the sample itself
is a row of ones). One implementation thereby serves the estimate and every bootstrap, the
image bootstrap (resampled rows, :func:`auditkit.stats.resample_counts`) and the patient
bootstrap (resampled patients, each bringing all its rows, whose resamples differ in size) alike
(:func:`resampled_counts`). Rows are sorted by ``p`` once; a bin's sums are differences of
cumulative sums at the bin's bounds, so a resample costs O(n) whatever the number of bins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.stats import bootstrap_indices, median_centred_interval, resample_counts

__all__ = [
    "BINARY_BOUNDS",
    "BinaryStatistics",
    "binary_calibration_metrics",
    "binary_expected_calibration_error",
    "binary_intervals",
    "cluster_codes",
    "resampled_counts",
]

FloatArray = NDArray[np.float64]
CountMatrix = NDArray[np.int64]
CountStatistic = Callable[[CountMatrix], FloatArray]
"""A statistic of many resamples given as row multiplicities: ``(B, n)`` -> ``(B,)``."""

_EPS = float(np.finfo(np.float64).eps)

# Bound on the elements of one block of resamples (memory stays bounded whatever n).
_MAX_BLOCK_ELEMENTS = 1 << 22

BINARY_BOUNDS: dict[str, tuple[float, float]] = {
    "ece": (0.0, 1.0),
    "mce": (0.0, 1.0),
    "ace": (0.0, 1.0),
    "brier": (0.0, 1.0),
    "nll": (0.0, float("inf")),
}
"""The range of each binary metric, which cuts its interval (see :mod:`auditkit.stats`)."""


def _check_binary(probs: ArrayLike, outcomes: ArrayLike) -> tuple[FloatArray, FloatArray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(outcomes)
    if p.ndim != 1:
        raise ValueError(f"probs must be one probability per row, shape (N,), got {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"outcomes must have shape {p.shape}, got {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = y[~np.isin(y, (0, 1))].flat[0]
        raise ValueError(f"outcomes must be 0 or 1 (leave unknown entries out first), got {bad!r}")
    if not np.isfinite(p).all() or (p.size and (p.min() < 0.0 or p.max() > 1.0)):
        raise ValueError("probs must be finite probabilities in [0, 1]")
    return p, y.astype(np.float64)


class BinaryStatistics:
    """Per-row quantities of one binary sample and its metrics over row multiplicities.

    Args:
        probs: predicted probability of the positive outcome per row, shape ``(n,)``.
        outcomes: 0/1 outcome per row, shape ``(n,)``.
        bins: equal-width bins of ECE and MCE.
        adaptive_bins: equal-mass bins of ACE.
    """

    def __init__(self, probs: ArrayLike, outcomes: ArrayLike, bins: int, adaptive_bins: int) -> None:
        p, y = _check_binary(probs, outcomes)
        if bins < 1 or adaptive_bins < 1:
            raise ValueError(f"bins must be positive integers, got {bins} and {adaptive_bins}")
        self.n = int(p.size)
        self.bins = bins
        self.adaptive_bins = adaptive_bins
        confidence = np.clip(p, _EPS, 1.0 - _EPS)
        self.order = np.argsort(confidence, kind="stable")
        self.sorted_confidence: FloatArray = confidence[self.order]
        self.sorted_residual: FloatArray = (y - confidence)[self.order]
        self.brier_terms: FloatArray = (p - y) ** 2
        likelihood = np.where(y == 1.0, confidence, 1.0 - confidence)
        self.nll_terms: FloatArray = -np.log(likelihood)
        interior = np.linspace(0.0, 1.0, bins + 1)[1:-1]
        # Row j of the sorted sample is in bin b when edge_b <= p_j < edge_{b+1}: the bounds
        # are the sorted positions of the first row at or above each interior edge.
        self.width_bounds = np.r_[0, np.searchsorted(self.sorted_confidence, interior, side="left"), self.n]
        self._cached: tuple[CountMatrix, NDArray[np.int64], FloatArray] | None = None

    def ones(self) -> CountMatrix:
        """The sample itself as multiplicities: one resample holding every row once."""
        return np.ones((1, self.n), dtype=np.int64)

    def batched(self) -> dict[str, CountStatistic]:
        return {"ece": self.ece, "mce": self.mce, "ace": self.ace, "brier": self.brier, "nll": self.nll}

    # -- cumulative sums in sorted order -------------------------------------------------------

    def _cumulative(self, counts: CountMatrix) -> tuple[NDArray[np.int64], FloatArray]:
        """Cumulative multiplicities and residuals ``y - p`` along the sorted rows, ``(B, n + 1)``.

        The binned metrics of one block of resamples share them: the last block's are kept.
        """
        if self._cached is not None and self._cached[0] is counts:
            return self._cached[1], self._cached[2]
        c = np.asarray(counts, dtype=np.int64)[:, self.order]
        weight = np.zeros((c.shape[0], self.n + 1), dtype=np.int64)
        np.cumsum(c, axis=1, out=weight[:, 1:])
        residual = np.zeros((c.shape[0], self.n + 1), dtype=np.float64)
        np.cumsum(c * self.sorted_residual, axis=1, out=residual[:, 1:])
        self._cached = (counts, weight, residual)
        return weight, residual

    @staticmethod
    def _binned(
        weight: NDArray[np.int64], residual: FloatArray, bounds: NDArray[np.intp]
    ) -> tuple[FloatArray, FloatArray]:
        """Per-bin multiplicity and ``|sum(y - p)|`` of each resample, ``(B, bins)``."""
        if bounds.ndim == 1:
            bounds = np.broadcast_to(bounds, (weight.shape[0], bounds.size))
        counts = np.diff(np.take_along_axis(weight, bounds, axis=1), axis=1).astype(np.float64)
        gaps = np.abs(np.diff(np.take_along_axis(residual, bounds, axis=1), axis=1))
        return counts, gaps

    @staticmethod
    def _per_total(sums: FloatArray, total: NDArray[np.int64]) -> FloatArray:
        out = np.full(sums.shape, np.nan)
        np.divide(sums, total, out=out, where=total > 0)
        return out

    # -- metrics -----------------------------------------------------------------------------

    def ece(self, counts: CountMatrix) -> FloatArray:
        weight, residual = self._cumulative(counts)
        _, gaps = self._binned(weight, residual, self.width_bounds)
        return self._per_total(gaps.sum(axis=1), weight[:, -1])

    def mce(self, counts: CountMatrix) -> FloatArray:
        weight, residual = self._cumulative(counts)
        per_bin_counts, gaps = self._binned(weight, residual, self.width_bounds)
        per_bin = np.divide(gaps, per_bin_counts, out=np.zeros_like(gaps), where=per_bin_counts > 0)
        return np.where(weight[:, -1] > 0, per_bin.max(axis=1), np.nan)

    def ace(self, counts: CountMatrix) -> FloatArray:
        weight, residual = self._cumulative(counts)
        bounds = self._equal_mass_bounds(weight)
        _, gaps = self._binned(weight, residual, bounds)
        return self._per_total(gaps.sum(axis=1), weight[:, -1])

    def brier(self, counts: CountMatrix) -> FloatArray:
        c = np.asarray(counts, dtype=np.float64)
        return self._per_total(c @ self.brier_terms, np.asarray(counts).sum(axis=1))

    def nll(self, counts: CountMatrix) -> FloatArray:
        c = np.asarray(counts, dtype=np.float64)
        return self._per_total(c @ self.nll_terms, np.asarray(counts).sum(axis=1))

    def _equal_mass_bounds(self, weight: NDArray[np.int64]) -> NDArray[np.intp]:
        """Sorted-row bounds of each resample's equal-mass bins, ``(B, adaptive_bins + 1)``.

        The interior edges are ``numpy.quantile(resample, linspace(0, 1, bins + 1))[1:-1]`` of the
        resample's (expanded) confidences, computed from the multiplicities as numpy does: the
        virtual index ``h = q (m - 1)`` of a resample of ``m`` rows, the rows at ``floor(h)`` and
        ``floor(h) + 1`` of the expanded sorted resample, and numpy's two-sided interpolation.
        """
        n_rep = weight.shape[0]
        total = weight[:, -1]
        cumulative = weight[:, 1:]
        q = np.linspace(0.0, 1.0, self.adaptive_bins + 1)[1:-1]
        virtual = q[None, :] * np.maximum(total - 1, 0)[:, None].astype(np.float64)
        below = np.floor(virtual)
        gamma = virtual - below
        low_index = below.astype(np.int64)
        high_index = np.minimum(low_index + 1, np.maximum(total - 1, 0)[:, None])
        low = self.sorted_confidence[self._expanded_rows(cumulative, low_index)]
        high = self.sorted_confidence[self._expanded_rows(cumulative, high_index)]
        difference = high - low
        interior = np.where(gamma >= 0.5, high - difference * (1.0 - gamma), low + difference * gamma)
        inner = np.searchsorted(self.sorted_confidence, interior.ravel(), side="left").reshape(interior.shape)
        return np.concatenate(
            [np.zeros((n_rep, 1), dtype=np.intp), inner.astype(np.intp), np.full((n_rep, 1), self.n, dtype=np.intp)],
            axis=1,
        )

    def _expanded_rows(self, cumulative: NDArray[np.int64], index: NDArray[np.int64]) -> NDArray[np.intp]:
        """Sorted row holding position ``index[b, j]`` of resample ``b`` expanded by its multiplicities.

        One search over all resamples: row ``b``'s cumulative multiplicities are shifted by ``b``
        times a stride above every total, which keeps the whole array sorted.
        """
        n_rep = cumulative.shape[0]
        if self.n == 0:
            return np.zeros(index.shape, dtype=np.intp)
        stride = int(cumulative[:, -1].max(initial=0)) + 1
        offsets = np.arange(n_rep, dtype=np.int64)[:, None] * stride
        found = np.searchsorted((cumulative + offsets).ravel(), (index + offsets).ravel(), side="right")
        rows = found.reshape(index.shape) - np.arange(n_rep, dtype=np.int64)[:, None] * self.n
        return np.asarray(np.clip(rows, 0, self.n - 1), dtype=np.intp)


def binary_calibration_metrics(
    probs: ArrayLike, outcomes: ArrayLike, bins: int = 15, adaptive_bins: int | None = None
) -> dict[str, float]:
    """The five calibration metrics of one binary output: ``ece, mce, ace, brier, nll``.

    Positive-class convention (see the module docstring): the ECE equals
    ``netcal.metrics.ECE(bins).measure(probs, outcomes)`` with 1-D ``probs``, the MCE netcal's
    ``MCE``, the ACE netcal's ``ECE(bins, equal_intervals=False)`` (where netcal defines it), the
    Brier score ``sklearn.metrics.brier_score_loss`` and the NLL ``sklearn.metrics.log_loss``.

    Args:
        probs: predicted probability of the positive outcome, shape ``(N,)``, ``N >= 1``.
        outcomes: 0/1 outcome per row, shape ``(N,)`` (unknown entries left out beforehand).
        bins: equal-width bins of ECE and MCE.
        adaptive_bins: equal-mass bins of ACE (default: ``bins``).

    Returns:
        Metric name -> value.

    Raises:
        ValueError: invalid input or ``N == 0``.
    """
    stats = BinaryStatistics(probs, outcomes, bins, bins if adaptive_bins is None else adaptive_bins)
    if stats.n == 0:
        raise ValueError("calibration metrics are undefined on an empty sample")
    ones = stats.ones()
    return {name: float(fn(ones)[0]) for name, fn in stats.batched().items()}


def binary_expected_calibration_error(probs: ArrayLike, outcomes: ArrayLike, bins: int = 15) -> float:
    """Positive-class ECE of one binary output (netcal's ``ECE(bins)`` on 1-D input)."""
    return binary_calibration_metrics(probs, outcomes, bins)["ece"]


# --------------------------------------------------------------------------------------------
# Resampling


def cluster_codes(clusters: Sequence[object | None]) -> tuple[NDArray[np.intp], int]:
    """A 0-based cluster index per row and the number of clusters; a row without one is its own."""
    ids = np.asarray([f"row:{i}" if c is None else f"id:{c}" for i, c in enumerate(clusters)], dtype=object)
    if ids.size == 0:
        return np.zeros(0, dtype=np.intp), 0
    uniques, codes = np.unique(ids, return_inverse=True)
    return codes.astype(np.intp), int(uniques.size)


def resampled_counts(
    n: int,
    n_boot: int,
    rng: np.random.Generator,
    *,
    strata: ArrayLike | None = None,
    clusters: tuple[NDArray[np.intp], int] | None = None,
) -> Iterator[CountMatrix]:
    """Row multiplicities of ``n_boot`` bootstrap resamples, in blocks of bounded size.

    Args:
        n: rows of the sample.
        n_boot: resamples in all.
        rng: the only source of randomness.
        strata: a stratum per row: rows are resampled within their stratum
            (:func:`auditkit.stats.bootstrap_indices`); ignored with ``clusters``.
        clusters: ``(code per row, number of clusters)`` (:func:`cluster_codes`): clusters are
            resampled with replacement, each bringing all of its rows, so resamples differ in size.

    Yields:
        int64 arrays ``(B, n)``, the ``B`` summing to ``n_boot``.
    """
    block = max(1, min(n_boot, _MAX_BLOCK_ELEMENTS // max(1, n)))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        if clusters is not None:
            codes, n_clusters = clusters
            picks = rng.integers(0, n_clusters, size=(size, n_clusters), dtype=np.intp)
            yield resample_counts(picks, n_clusters)[:, codes].astype(np.int64)
        else:
            idx = bootstrap_indices(n, n_boot=size, rng=rng, strata=strata)
            yield resample_counts(idx, n).astype(np.int64)


def binary_intervals(
    statistics: Mapping[str, CountStatistic],
    n: int,
    *,
    n_boot: int,
    rng: np.random.Generator,
    strata: ArrayLike | None = None,
    clusters: tuple[NDArray[np.intp], int] | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, tuple[float, float] | None]:
    """Median-centred bootstrap intervals of several count statistics on the same resamples.

    As :func:`auditkit.stats.bootstrap_cis`, for statistics of row multiplicities: each is
    evaluated on the sample itself (a row of ones) and its interval
    (:func:`auditkit.stats.median_centred_interval`) is centred there.

    Returns:
        name -> ``(lo, hi)``, or ``None`` when ``n_boot == 0``, there are fewer than two rows
        (or clusters), the estimate is undefined or too many resamples are.
    """
    units = clusters[1] if clusters is not None else n
    if n_boot <= 0 or n < 2 or units < 2 or not statistics:
        return dict.fromkeys(statistics)
    ones = np.ones((1, n), dtype=np.int64)
    estimates = {name: float(fn(ones)[0]) for name, fn in statistics.items()}
    replicates: dict[str, list[FloatArray]] = {name: [] for name in statistics}
    for counts in resampled_counts(n, n_boot, rng, strata=strata, clusters=clusters):
        for name, fn in statistics.items():
            replicates[name].append(np.asarray(fn(counts), dtype=np.float64))
    return {
        name: median_centred_interval(
            np.concatenate(values), estimates[name], bounds=bounds.get(name) if bounds else None
        )
        for name, values in replicates.items()
    }
