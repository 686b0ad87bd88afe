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

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import Field
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax

from auditkit.check import Artifact, Check, CheckParams, CheckResult, Metric, Needs
from auditkit.errors import InputError
from auditkit.stats import bootstrap_cis, stable_seed

if TYPE_CHECKING:
    from auditkit.context import AuditContext

__all__ = [
    "TEMPERATURE_BOUNDS",
    "CalibrationCheck",
    "adaptive_calibration_error",
    "brier_score",
    "calibration_metrics",
    "cross_fitted_temperature_probs",
    "expected_calibration_error",
    "fit_temperature",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
]

FloatArray = NDArray[np.float64]
IndexMatrix = NDArray[np.intp]

_EPS = float(np.finfo(np.float64).eps)

TEMPERATURE_BOUNDS: tuple[float, float] = (0.01, 100.0)
"""Search interval of the fitted temperature; a fit at a bound means the optimum lies beyond it."""

METRIC_NAMES: tuple[str, ...] = ("ece", "mce", "ace", "brier", "nll")
"""Per-scope metrics, in the order they are emitted (``calibration.<name>``)."""


# --------------------------------------------------------------------------------------------
# Input handling


def _to_numpy(values: Any) -> NDArray[Any]:
    """A NumPy view of an array or a (CPU or GPU) torch tensor, without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _check_probs_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, NDArray[np.intp]]:
    """Validate ``(N, K)`` probabilities and ``(N,)`` class indices; return float64/intp arrays."""
    p = np.asarray(_to_numpy(probs), dtype=np.float64)
    y = _to_numpy(labels)
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

    def _binned_gaps(
        self, bin_ids: IndexMatrix, idx: IndexMatrix, bins: int
    ) -> tuple[FloatArray, FloatArray]:
        """Per-bin counts and |sum(correct) - sum(confidence)| of each resample, shape (B, bins)."""
        n_rep = idx.shape[0]
        flat = (bin_ids + (np.arange(n_rep, dtype=np.intp) * bins)[:, None]).ravel()
        size = n_rep * bins
        counts = np.bincount(flat, minlength=size).reshape(n_rep, bins).astype(np.float64)
        gap = np.bincount(
            flat, weights=(self.correct[idx] - self.confidence[idx]).ravel(), minlength=size
        )
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
            bin_ids[start:stop] = (
                confidence[start:stop, :, None] >= interior[start:stop, None, :]
            ).sum(axis=2)
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


def _scalar(
    metric: str, probs: ArrayLike, labels: ArrayLike, bins: int = 15, adaptive_bins: int = 15
) -> float:
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


# --------------------------------------------------------------------------------------------
# Temperature scaling (Guo et al. 2017)


def _check_logits_labels(logits: Any, labels: Any) -> tuple[FloatArray, NDArray[np.intp]]:
    z = np.asarray(_to_numpy(logits), dtype=np.float64)
    y = _to_numpy(labels)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2, got {z.shape}")
    if z.shape[0] == 0:
        raise ValueError("cannot fit a temperature on an empty sample")
    if y.shape != (z.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices of shape ({z.shape[0]},)")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(
            f"labels must be class indices in [0, {z.shape[1]}), got {y.min()}..{y.max()}"
        )
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    return z, y.astype(np.intp, copy=False)


def _nll_at_temperature(z: FloatArray, y: NDArray[np.intp], temperature: float) -> float:
    scaled = z / temperature
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(z.shape[0]), y]))


def fit_temperature(logits: Any, labels: Any) -> float:
    """Fit the temperature ``T`` of temperature scaling by maximum likelihood (Guo et al. 2017).

    Minimises the mean NLL of ``softmax(logits / T)`` over ``log T`` with bounded Brent search on
    :data:`TEMPERATURE_BOUNDS`. The NLL is convex in ``1 / T``, hence unimodal in ``log T``, so
    the search finds the global optimum inside the bounds. ``T > 1`` means the model was
    overconfident. netcal's ``TemperatureScaling`` fits the same optimum (its ``temperature``
    attribute is the multiplicative weight ``1 / T``).

    Args:
        logits: pre-softmax scores, shape ``(N, K)``, finite (NumPy array or torch tensor).
        labels: true class indices, shape ``(N,)``.

    Returns:
        The fitted temperature, within :data:`TEMPERATURE_BOUNDS`.

    Raises:
        ValueError: invalid or non-finite input, or ``N == 0``.
    """
    z, y = _check_logits_labels(logits, labels)
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: _nll_at_temperature(z, y, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-7},
    )
    return float(math.exp(float(result.x)))


def _stratified_folds(
    labels: NDArray[np.intp], folds: int, rng: np.random.Generator
) -> NDArray[np.intp]:
    """Fold index of each row: shuffled within class, then dealt round-robin across folds."""
    permutation = rng.permutation(labels.shape[0])
    order = permutation[np.argsort(labels[permutation], kind="stable")]
    fold = np.empty(labels.shape[0], dtype=np.intp)
    fold[order] = np.arange(labels.shape[0]) % folds
    return fold


def cross_fitted_temperature_probs(
    logits: Any, labels: Any, folds: int = 5, *, rng: np.random.Generator
) -> tuple[FloatArray, list[float]]:
    """Temperature-scaled probabilities where no sample is scaled by a temperature fitted on it.

    Stratified K-fold cross-fitting on the evaluation split: rows are dealt into ``folds`` folds
    with the class proportions preserved; for each fold a temperature is fitted on the other
    ``folds - 1`` folds (:func:`fit_temperature`) and applied to the held-out fold. Calibration
    measured on the result estimates what temperature scaling would achieve on new data, rather
    than the optimistic in-sample value.

    Args:
        logits: pre-softmax scores, shape ``(N, K)``, finite.
        labels: true class indices, shape ``(N,)``.
        folds: number of folds, ``2 <= folds <= N``.
        rng: generator for the fold assignment.

    Returns:
        ``(probs_after, temperatures)``: float64 probabilities of shape ``(N, K)`` and the
        temperature of each fold, in fold order.

    Raises:
        ValueError: invalid input, ``folds < 2`` or ``N < folds``.
    """
    z, y = _check_logits_labels(logits, labels)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if z.shape[0] < folds:
        raise ValueError(f"{z.shape[0]} samples cannot be split into {folds} folds")
    fold = _stratified_folds(y, folds, rng)
    probs_after = np.empty_like(z)
    temperatures: list[float] = []
    for k in range(folds):
        held_out = fold == k
        temperature = fit_temperature(z[~held_out], y[~held_out])
        probs_after[held_out] = softmax(z[held_out] / temperature, axis=1)
        temperatures.append(temperature)
    return probs_after, temperatures


# --------------------------------------------------------------------------------------------
# Reliability diagram


def _bin_summary(
    probs: FloatArray, labels: NDArray[np.intp], bins: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per equal-width bin: sample count, mean accuracy and mean confidence (NaN when empty)."""
    confidence, correct = _top_label(probs, labels)
    ids = _equal_width_bins(confidence, bins)
    counts = np.bincount(ids, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(ids, weights=correct, minlength=bins) / counts
        mean_conf = np.bincount(ids, weights=confidence, minlength=bins) / counts
    return counts, accuracy, mean_conf


def reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    bins: int,
    path: str | Path,
    probs_after: ArrayLike | None = None,
) -> Path:
    """Write a reliability diagram (Guo et al. 2017, fig. 1) as a byte-reproducible SVG.

    Top panel: accuracy per equal-width confidence bin (bars), the gap to the bin's mean
    confidence (hatched), the diagonal of perfect calibration and, when ``probs_after`` is given,
    the accuracy-versus-confidence curve after temperature scaling. Bottom panel: the share of
    samples per confidence bin. The title gives the ECE before (and after) scaling.

    Args:
        probs: class probabilities, shape ``(N, K)``, ``N >= 1``.
        labels: true class indices, shape ``(N,)``.
        bins: number of equal-width bins.
        path: the SVG file to write (its folder must exist).
        probs_after: optional probabilities after temperature scaling, same shape as ``probs``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid input or ``N == 0``.
    """
    import matplotlib
    from matplotlib.figure import Figure

    _check_bins(bins)
    p, y = _check_probs_labels(probs, labels)
    if p.shape[0] == 0:
        raise ValueError("cannot draw a reliability diagram of an empty sample")
    after = None
    if probs_after is not None:
        after, _ = _check_probs_labels(probs_after, y)
        if after.shape != p.shape:
            raise ValueError(f"probs_after must have shape {p.shape}, got {after.shape}")

    edges = np.linspace(0.0, 1.0, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2.0
    width = 1.0 / bins
    counts, accuracy, mean_conf = _bin_summary(p, y, bins)
    filled = counts > 0
    title = f"ECE {expected_calibration_error(p, y, bins):.3f}"

    # A fixed hash salt and id make the SVG's internal ids, hence its bytes, reproducible.
    with matplotlib.rc_context(
        {
            "svg.hashsalt": "auditkit-reliability",
            "svg.id": "reliability-diagram",
            "svg.fonttype": "path",
            "font.family": "DejaVu Sans",
            "font.size": 9.0,
        }
    ):
        fig = Figure(figsize=(5.5, 6.0), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3.0, 1.0]})
        top.bar(
            centers[filled],
            accuracy[filled],
            width=width,
            color="#4c72b0",
            edgecolor="white",
            linewidth=0.5,
            label="accuracy",
        )
        top.bar(
            centers[filled],
            (mean_conf - accuracy)[filled],
            bottom=accuracy[filled],
            width=width,
            color="none",
            edgecolor="#c44e52",
            hatch="//",
            linewidth=0.5,
            label="gap to confidence",
        )
        top.plot(
            [0.0, 1.0],
            [0.0, 1.0],
            linestyle="--",
            color="0.4",
            linewidth=1.0,
            label="perfect calibration",
        )
        bottom.bar(
            centers,
            counts / counts.sum(),
            width=width,
            color="#4c72b0",
            edgecolor="white",
            linewidth=0.5,
            label="before",
        )
        if after is not None:
            counts_a, accuracy_a, conf_a = _bin_summary(after, y, bins)
            filled_a = counts_a > 0
            top.plot(
                conf_a[filled_a],
                accuracy_a[filled_a],
                marker="o",
                markersize=3.5,
                color="#dd8452",
                linewidth=1.2,
                label="after temperature scaling",
            )
            bottom.step(
                edges,
                np.r_[counts_a / counts_a.sum(), 0.0],
                where="post",
                color="#dd8452",
                linewidth=1.2,
                label="after",
            )
            title += (
                f" → {expected_calibration_error(after, y, bins):.3f} after temperature scaling"
            )
        top.set_xlim(0.0, 1.0)
        top.set_ylim(0.0, 1.0)
        top.set_ylabel("accuracy")
        top.set_title(f"Reliability diagram (n = {p.shape[0]}, {bins} bins)\n{title}")
        top.legend(loc="upper left", frameon=False)
        bottom.set_xlabel("top-label confidence")
        bottom.set_ylabel("share of images")
        if after is not None:
            bottom.legend(loc="upper left", frameon=False)
        out = Path(path)
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out


# --------------------------------------------------------------------------------------------
# The check


class CalibrationCheck(Check):
    """Calibration of predicted probabilities: ECE, MCE, ACE, Brier, NLL, temperature scaling.

    Method: the top-label confidence (largest softmax probability) is compared with accuracy in
    confidence bins. ECE (expected calibration error) and MCE (maximum calibration error) use
    equal-width bins (Naeini et al. 2015, "Obtaining Well Calibrated Probabilities Using Bayesian
    Binning", AAAI); ACE uses equal-mass bins (Nixon et al. 2019, "Measuring Calibration in Deep
    Learning", CVPR workshops); the Brier score and negative log-likelihood are proper scoring
    rules. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks",
    ICML) is fitted by maximum likelihood on the eval split; its effect is measured by stratified
    K-fold cross-fitting, so the after-scaling ECE is never measured on the data its temperature
    was fitted on. Intervals are 95% percentile bootstraps stratified by class (the class counts
    of the split are kept in every resample); the after-scaling interval holds the fold
    temperatures fixed.

    Inputs: eval-split logits and labels (``Needs(predictions=True)``); the spec's subgroup
    columns. Rows whose logits are not finite are excluded and counted.

    Metrics (all ``lower_is_better``, each with ``n`` and ``ci``):
        ``calibration.ece``, ``.mce``, ``.ace``, ``.brier``, ``.nll`` overall (``labels={}``) and
        per subgroup (``{"group_by": column, "group": value}``; groups smaller than
        ``min_group_size`` get no interval); ``calibration.ece_after_temperature`` overall.

    Findings: ``temperature_scaling`` (temperature fitted on the whole eval split, per-fold
    temperatures, folds); ``non_finite_logits`` (count) when some logits are NaN or infinite.

    Artifacts: ``reliability_diagram`` (SVG).

    NIST AI RMF 1.0: MEASURE 2.5 (validity and reliability: confidence that means what it says),
    MEASURE 2.6 (safe failure: overconfident errors are the unsafe ones), MEASURE 2.11 (fairness:
    calibration per subgroup).
    """

    id: ClassVar[str] = "calibration"
    family: ClassVar[str] = "calibration"

    class Params(CheckParams):
        """Parameters of :class:`CalibrationCheck`.

        Attributes:
            bins: equal-width confidence bins of ECE, MCE and the reliability diagram.
            adaptive_bins: equal-mass bins of ACE; ``None`` uses ``bins``.
            n_boot: bootstrap resamples per interval; 0 disables intervals.
            temperature_folds: folds of the cross-fitted temperature scaling.
            min_group_size: subgroups with fewer images get values but no interval.
        """

        bins: int = Field(default=15, ge=2, le=1000)
        adaptive_bins: int | None = Field(default=None, ge=2, le=1000)
        n_boot: int = Field(default=1000, ge=0, le=100_000)
        temperature_folds: int = Field(default=5, ge=2, le=20)
        min_group_size: int = Field(default=10, ge=2)

    needs: ClassVar[Needs] = Needs(predictions=True)

    def run(self, ctx: AuditContext, params: Any) -> CheckResult:
        """Measure calibration on the eval split, overall and per subgroup."""
        p: CalibrationCheck.Params = params
        result = CheckResult()
        preds = ctx.predictions("eval")
        seed_root = int(ctx.rng("calibration").integers(0, 2**63 - 1))
        if preds.n == 0:
            result.metrics += _undefined_scope("no eval images", 0, {})
            result.metrics.append(_undefined_after("no eval images", 0))
            return result

        logits, probs, labels = _eval_arrays(preds)
        finite = np.asarray(np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1))
        n_finite = int(finite.sum())
        if n_finite < len(labels):
            result.findings.append(
                {"kind": "non_finite_logits", "split": "eval", "count": len(labels) - n_finite}
            )

        # Overall, then the eval split cut by every subgroup column.
        result.metrics += _scope_metrics(
            probs,
            labels,
            finite,
            {},
            p,
            total=len(labels),
            min_size=2,
            seed=stable_seed(seed_root, "overall"),
        )
        after = _after_temperature(logits[finite], labels[finite], p, seed_root)
        result.metrics.append(after.metric)
        if after.finding is not None:
            result.findings.append(after.finding)
        for column, values in sorted(ctx.group_labels("eval").items()):
            values = np.asarray(values).astype(str)
            if values.shape != labels.shape:
                raise InputError(
                    f"group column {column!r} has {values.shape[0]} labels "
                    f"for {labels.shape[0]} eval images"
                )
            for group in sorted(set(values.tolist())):
                in_group = values == group
                result.metrics += _scope_metrics(
                    probs,
                    labels,
                    in_group & finite,
                    {"group_by": column, "group": group},
                    p,
                    total=int(in_group.sum()),
                    min_size=p.min_group_size,
                    seed=stable_seed(seed_root, "group", column, group),
                )

        if n_finite > 0:
            abs_path, rel_path = ctx.artifact_path("calibration", "reliability.svg")
            Path(abs_path).parent.mkdir(parents=True, exist_ok=True)
            reliability_diagram(
                probs[finite], labels[finite], p.bins, abs_path, probs_after=after.probs_after
            )
            result.artifacts.append(
                Artifact(
                    name="reliability_diagram",
                    path=Path(rel_path).as_posix(),
                    media_type="image/svg+xml",
                    description=(
                        f"Reliability diagram of the eval split ({n_finite} images, {p.bins} "
                        "equal-width bins): accuracy versus top-label confidence"
                        + (
                            ", before and after cross-fitted temperature scaling."
                            if after.probs_after is not None
                            else "."
                        )
                    ),
                )
            )
        return result


# --------------------------------------------------------------------------------------------
# Helpers of the check


class _AfterTemperature(NamedTuple):
    metric: Metric
    finding: dict[str, Any] | None = None
    probs_after: FloatArray | None = None


def _undefined_scope(reason: str, n: int, labels: dict[str, str]) -> list[Metric]:
    return [
        Metric(f"calibration.{name}", None, "lower_is_better", labels=labels, n=n, reason=reason)
        for name in METRIC_NAMES
    ]


def _undefined_after(reason: str, n: int) -> Metric:
    return Metric("calibration.ece_after_temperature", None, "lower_is_better", n=n, reason=reason)


def _eval_arrays(preds: Any) -> tuple[FloatArray, FloatArray, NDArray[np.intp]]:
    """Validated float64 logits and probabilities and intp labels of the eval predictions."""
    logits = np.asarray(_to_numpy(preds.logits), dtype=np.float64)
    probs = np.asarray(_to_numpy(preds.probs), dtype=np.float64)
    labels = _to_numpy(preds.labels)
    n = int(preds.n)
    if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] < 2 or logits.shape != probs.shape:
        raise InputError(
            f"eval predictions must have shape (N, K) with N = {n} and K >= 2, "
            f"got logits {logits.shape} and probs {probs.shape}"
        )
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"eval labels must be {n} integer class indices, got {labels.dtype} {labels.shape}"
        )
    n_classes = probs.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise InputError(
            f"eval labels must be class indices in [0, {n_classes}), "
            f"got values from {labels.min()} to {labels.max()}"
        )
    return logits, probs, labels.astype(np.intp)


def _scope_metrics(
    probs: FloatArray,
    labels: NDArray[np.intp],
    mask: NDArray[np.bool_],
    scope: dict[str, str],
    p: CalibrationCheck.Params,
    *,
    total: int,
    min_size: int,
    seed: int,
) -> list[Metric]:
    """The five metrics of the finite rows selected by ``mask``, out of ``total`` images.

    Intervals are bootstrapped (stratified by class) when at least ``min_size`` rows remain.
    """
    n = int(mask.sum())
    if n == 0:
        return _undefined_scope(f"the logits of all {total} images are non-finite", 0, scope)
    adaptive_bins = p.adaptive_bins if p.adaptive_bins is not None else p.bins
    stats = _Statistics(probs[mask], labels[mask], p.bins, adaptive_bins)
    identity = stats.identity()
    values = {name: float(fn(identity)[0]) for name, fn in stats.batched().items()}
    cis: dict[str, tuple[float, float] | None] = dict.fromkeys(METRIC_NAMES)
    if n >= min_size:
        cis = bootstrap_cis(
            stats.batched(),
            n,
            n_boot=p.n_boot,
            rng=np.random.default_rng(seed),
            strata=labels[mask],
        )
    return [
        Metric(
            f"calibration.{name}",
            values[name],
            "lower_is_better",
            labels=scope,
            ci=cis[name],
            n=n,
        )
        for name in METRIC_NAMES
    ]


def _after_temperature(
    logits: FloatArray, labels: NDArray[np.intp], p: CalibrationCheck.Params, seed_root: int
) -> _AfterTemperature:
    """Cross-fitted ECE after temperature scaling and its ``temperature_scaling`` finding."""
    n = logits.shape[0]
    if n == 0:
        return _AfterTemperature(
            _undefined_after("the logits of all eval images are non-finite", 0)
        )
    if n < p.temperature_folds:
        reason = (
            f"{n} images are too few for {p.temperature_folds}-fold cross-fitted "
            "temperature scaling"
        )
        return _AfterTemperature(_undefined_after(reason, n))
    probs_after, fold_temperatures = cross_fitted_temperature_probs(
        logits,
        labels,
        p.temperature_folds,
        rng=np.random.default_rng(stable_seed(seed_root, "temperature_folds")),
    )
    finding = {
        "kind": "temperature_scaling",
        "temperature": fit_temperature(logits, labels),
        "fold_temperatures": fold_temperatures,
        "folds": p.temperature_folds,
        "bounds": list(TEMPERATURE_BOUNDS),
    }
    stats = _Statistics(probs_after, labels, p.bins, p.bins)
    ci = bootstrap_cis(
        {"ece": stats.ece},
        n,
        n_boot=p.n_boot,
        strata=labels,
        rng=np.random.default_rng(stable_seed(seed_root, "after_temperature")),
    )["ece"]
    value = float(stats.ece(stats.identity())[0])
    metric = Metric("calibration.ece_after_temperature", value, "lower_is_better", ci=ci, n=n)
    return _AfterTemperature(metric, finding, probs_after)
