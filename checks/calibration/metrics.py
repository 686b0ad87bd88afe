"""Calibration: does the model's confidence match how often it is right?

Plain functions compute the numbers (testable without the engine); :class:`CalibrationCheck`
applies them to the eval split, overall and per subgroup, with bootstrap intervals, a cross-fitted
temperature-scaling estimate and a reliability diagram.

Binning follows netcal (``netcal.metrics.ECE``/``MCE``) exactly, so the values agree with it:

* confidences are first clipped to ``[eps, 1 - eps]`` with ``eps`` the float64 machine epsilon,
  so a confidence of exactly 1.0 lands in the last bin;
* equal-width edges are ``numpy.linspace(0, 1, bins + 1)`` (the very floats, e.g. the 4th edge of
  5 bins is ``0.6000000000000001``) and every bin is ``[lower, upper)``, lower edge inclusive: a
  confidence equal to an interior edge belongs to the bin that starts there;
* equal-mass edges are ``numpy.quantile(confidences, linspace(0, 1, bins + 1))`` (linear
  interpolation) with the outer edges then set to 0 and 1, binned the same way.

Top-label convention: the confidence of a sample is its largest class probability and it counts as
correct when the first class of largest probability (``argmax``) is its label. This holds for
binary models too (Guo et al. 2017). Note that netcal, given an ``(N, 2)`` matrix and binary labels,
measures something else: the calibration of the positive-class probability. For K = 2 the two
agree only after passing netcal the top-label confidences and the 0/1 correctness instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.stats import as_numpy, check_probs_labels

FloatArray = NDArray[np.float64]
IndexMatrix = NDArray[np.intp]

_EPS = float(np.finfo(np.float64).eps)

METRIC_NAMES: tuple[str, ...] = ("ece", "mce", "ace", "brier", "nll")
"""Per-scope metrics, in the order they are emitted (``calibration.<name>``)."""


# --------------------------------------------------------------------------------------------
# Input handling


# Shared with the other checks; the private names stay for the calibration modules that use them.
_to_numpy = as_numpy
_check_probs_labels = check_probs_labels


def _top_label(probs: FloatArray, labels: NDArray[np.intp]) -> tuple[FloatArray, FloatArray]:
    """Top-label confidence (clipped as netcal does) and 0/1 correctness of each sample."""
    confidence = np.clip(probs.max(axis=1), _EPS, 1.0 - _EPS)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    return confidence, correct


def _equal_width_bins(confidence: FloatArray, bins: int) -> NDArray[np.intp]:
    """Bin index of each confidence for ``bins`` equal-width bins ``[lower, upper)`` over [0, 1]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges, confidence, side="right") - 1
    return np.clip(ids, 0, bins - 1).astype(np.intp)


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")


# --------------------------------------------------------------------------------------------
# Batched statistics: one implementation serves the point estimate (a single "resample", the
# identity) and the bootstrap (many resamples), so the two can never disagree.


class _Statistics:
    """Per-sample quantities of one scope and batched metrics over ``(B, n)`` row indices."""

    def __init__(self, probs: FloatArray, labels: NDArray[np.intp], bins: int, adaptive_bins: int):
        self.n = probs.shape[0]
        self.bins = bins
        self.adaptive_bins = adaptive_bins
        self.confidence, self.correct = _top_label(probs, labels)
        self.bin_ids = _equal_width_bins(self.confidence, bins)
        rows = np.arange(self.n)
        onehot = np.zeros_like(probs)
        onehot[rows, labels] = 1.0
        if probs.shape[1] == 2:
            # Positive-class Brier score (sklearn's brier_score_loss); symmetric in the two classes.
            self.brier_terms: FloatArray = (probs[:, 1] - onehot[:, 1]) ** 2
        else:
            self.brier_terms = ((probs - onehot) ** 2).sum(axis=1)
        self.nll_terms: FloatArray = -np.log(np.clip(probs[rows, labels], _EPS, 1.0))

    def identity(self) -> IndexMatrix:
        return np.arange(self.n, dtype=np.intp)[None, :]

    def batched(self) -> dict[str, Callable[[IndexMatrix], FloatArray]]:
        return {
            "ece": self.ece,
            "mce": self.mce,
            "ace": self.ace,
            "brier": self.brier,
            "nll": self.nll,
        }

    def _binned_gaps(self, bin_ids: IndexMatrix, idx: IndexMatrix, bins: int) -> tuple[FloatArray, FloatArray]:
        """Per-bin counts and |sum(correct) - sum(confidence)| of each resample, shape (B, bins)."""
        n_rep = idx.shape[0]
        flat = (bin_ids + (np.arange(n_rep, dtype=np.intp) * bins)[:, None]).ravel()
        size = n_rep * bins
        counts = np.bincount(flat, minlength=size).reshape(n_rep, bins).astype(np.float64)
        gap = np.bincount(flat, weights=(self.correct[idx] - self.confidence[idx]).ravel(), minlength=size)
        return counts, np.abs(gap.reshape(n_rep, bins))

    def ece(self, idx: IndexMatrix) -> FloatArray:
        if idx.shape[1] == 0:
            return np.full(idx.shape[0], np.nan)
        _, gaps = self._binned_gaps(self.bin_ids[idx], idx, self.bins)
        return np.asarray(gaps.sum(axis=1) / idx.shape[1], dtype=np.float64)

    def mce(self, idx: IndexMatrix) -> FloatArray:
        if idx.shape[1] == 0:
            return np.full(idx.shape[0], np.nan)
        counts, gaps = self._binned_gaps(self.bin_ids[idx], idx, self.bins)
        per_bin = np.divide(gaps, counts, out=np.zeros_like(gaps), where=counts > 0)
        return np.asarray(per_bin.max(axis=1), dtype=np.float64)

    def ace(self, idx: IndexMatrix) -> FloatArray:
        n_rep, n = idx.shape
        if n == 0:
            return np.full(n_rep, np.nan)
        bins = self.adaptive_bins
        confidence = self.confidence[idx]
        quantiles = np.linspace(0.0, 1.0, bins + 1)
        # Interior equal-mass edges of each resample, (B, bins - 1); the outer edges are 0 and 1.
        interior = np.quantile(confidence, quantiles, axis=1).T[:, 1:-1]
        bin_ids = np.empty((n_rep, n), dtype=np.intp)
        # bin = number of interior edges <= confidence (searchsorted "right"), in memory-bounded
        # blocks of resamples.
        block = max(1, (1 << 22) // max(1, n * (bins - 1)))
        for start in range(0, n_rep, block):
            stop = min(n_rep, start + block)
            bin_ids[start:stop] = (confidence[start:stop, :, None] >= interior[start:stop, None, :]).sum(axis=2)
        _, gaps = self._binned_gaps(bin_ids, idx, bins)
        return np.asarray(gaps.sum(axis=1) / n, dtype=np.float64)

    def brier(self, idx: IndexMatrix) -> FloatArray:
        if idx.shape[1] == 0:
            return np.full(idx.shape[0], np.nan)
        return np.asarray(self.brier_terms[idx].mean(axis=1), dtype=np.float64)

    def nll(self, idx: IndexMatrix) -> FloatArray:
        if idx.shape[1] == 0:
            return np.full(idx.shape[0], np.nan)
        return np.asarray(self.nll_terms[idx].mean(axis=1), dtype=np.float64)


def _scalar(metric: str, probs: ArrayLike, labels: ArrayLike, bins: int = 15, adaptive_bins: int = 15) -> float:
    p, y = _check_probs_labels(probs, labels)
    if p.shape[0] == 0:
        raise ValueError(f"{metric} is undefined on an empty sample")
    stats = _Statistics(p, y, bins, adaptive_bins)
    return float(stats.batched()[metric](stats.identity())[0])


# --------------------------------------------------------------------------------------------
# Metrics


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins (Naeini et al. 2015).

    ``ECE = sum_b (n_b / N) * |acc(b) - conf(b)|`` over ``bins`` equal-width bins of the top-label
    confidence on [0, 1]; bins are ``[lower, upper)`` exactly as in netcal (see the module
    docstring), and the value equals ``netcal.metrics.ECE(bins)`` on the top-label input.

    Args:
        probs: class probabilities, shape ``(N, K)``, ``K >= 2``, rows summing to 1.
        labels: true class index of each sample, shape ``(N,)``, integers in ``[0, K)``.
        bins: number of equal-width bins.

    Returns:
        The ECE, in ``[0, 1]``.

    Raises:
        ValueError: shapes or labels are invalid, probabilities are not finite, or ``N == 0``.
    """
    _check_bins(bins)
    return _scalar("ece", probs, labels, bins=bins)


def maximum_calibration_error(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Top-label maximum calibration error: the largest ``|acc(b) - conf(b)|`` over non-empty bins.

    Same equal-width binning as :func:`expected_calibration_error` (Naeini et al. 2015); equals
    ``netcal.metrics.MCE(bins)``. Sensitive to sparsely populated bins: read it with the bin counts
    of the reliability diagram.

    Args:
        probs: class probabilities, shape ``(N, K)``.
        labels: true class indices, shape ``(N,)``.
        bins: number of equal-width bins.

    Returns:
        The MCE, in ``[0, 1]``; always at least the ECE.

    Raises:
        ValueError: invalid input or ``N == 0``.
    """
    _check_bins(bins)
    return _scalar("mce", probs, labels, bins=bins)


def adaptive_calibration_error(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Top-label calibration error with equal-mass (adaptive) bins, after Nixon et al. 2019.

    Nixon et al. 2019 ("Measuring Calibration in Deep Learning") show that equal-width bins put
    most samples of a confident model into the last bin, and propose adaptive bins that each hold
    the same number of samples. This is the top-label ECE computed with such bins: edges are the
    ``linspace(0, 1, bins + 1)`` quantiles of the confidences (outer edges 0 and 1), weighted by
    bin counts. Because the bins hold (nearly) equal counts, this is (nearly) the unweighted bin
    average of Nixon et al.'s ACE restricted to the top label; their ACE additionally averages
    over all K classes. It equals ``netcal.metrics.ECE(bins, equal_intervals=False)`` where that is
    defined (netcal raises when tied confidences make two quantile edges coincide; here such
    empty bins are simply skipped).

    ``netcal.metrics.ACE`` is a different quantity: the *average* calibration error, the
    unweighted mean gap over non-empty equal-width bins.

    Args:
        probs: class probabilities, shape ``(N, K)``.
        labels: true class indices, shape ``(N,)``.
        bins: number of equal-mass bins.

    Returns:
        The adaptive calibration error, in ``[0, 1]``.

    Raises:
        ValueError: invalid input or ``N == 0``.
    """
    _check_bins(bins)
    return _scalar("ace", probs, labels, adaptive_bins=bins)


def brier_score(probs: ArrayLike, labels: ArrayLike) -> float:
    """Brier score (Brier 1950), a proper scoring rule: mean squared error of the probabilities.

    For ``K == 2`` this is the positive-class score ``mean((p_1 - [y == 1])^2)``, identical to
    ``sklearn.metrics.brier_score_loss`` (and, the score being symmetric, to the score of class
    0), in ``[0, 1]``. For ``K > 2`` it is the multi-class sum over classes
    ``mean(sum_k (p_k - [y == k])^2)``, in ``[0, 2]``; note the binary value is half of the
    multi-class formula applied to two classes.

    Args:
        probs: class probabilities, shape ``(N, K)``.
        labels: true class indices, shape ``(N,)``.

    Returns:
        The Brier score.

    Raises:
        ValueError: invalid input or ``N == 0``.
    """
    return _scalar("brier", probs, labels)


def negative_log_likelihood(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the true class, ``mean(-log p_y)`` (cross-entropy).

    Probabilities of the true class are clipped below at the float64 machine epsilon
    (``2.22e-16``), as ``sklearn.metrics.log_loss`` does, so a confidently wrong prediction
    contributes at most ``-log(2.22e-16) = 36.04`` instead of infinity.

    Args:
        probs: class probabilities, shape ``(N, K)``.
        labels: true class indices, shape ``(N,)``.

    Returns:
        The NLL in nats, ``>= 0``.

    Raises:
        ValueError: invalid input or ``N == 0``.
    """
    return _scalar("nll", probs, labels)


def calibration_metrics(
    probs: ArrayLike, labels: ArrayLike, bins: int = 15, adaptive_bins: int | None = None
) -> dict[str, float]:
    """All five calibration metrics of one sample: ``ece, mce, ace, brier, nll``.

    Args:
        probs: class probabilities, shape ``(N, K)``, ``N >= 1``.
        labels: true class indices, shape ``(N,)``.
        bins: equal-width bins of ECE and MCE.
        adaptive_bins: equal-mass bins of ACE (default: ``bins``).

    Returns:
        Metric name -> value.
    """
    _check_bins(bins)
    adaptive = bins if adaptive_bins is None else adaptive_bins
    _check_bins(adaptive)
    p, y = _check_probs_labels(probs, labels)
    if p.shape[0] == 0:
        raise ValueError("calibration metrics are undefined on an empty sample")
    stats = _Statistics(p, y, bins, adaptive)
    identity = stats.identity()
    return {name: float(fn(identity)[0]) for name, fn in stats.batched().items()}
