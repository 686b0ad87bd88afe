"""Temperature scaling (Guo et al. 2017), fitted by maximum likelihood and cross-fitted."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax

from auditkit.checks.calibration.metrics import FloatArray, _to_numpy

TEMPERATURE_BOUNDS: tuple[float, float] = (0.01, 100.0)
"""Search interval of the fitted temperature; a fit at a bound means the optimum lies beyond it."""


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
        raise ValueError(f"labels must be class indices in [0, {z.shape[1]}), got {y.min()}..{y.max()}")
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


def _stratified_folds(labels: NDArray[np.intp], folds: int, rng: np.random.Generator) -> NDArray[np.intp]:
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
# One sigmoid output (a multi-label model's label)


def _two_class(logit: Any, outcomes: Any) -> tuple[FloatArray, NDArray[np.intp]]:
    """A sigmoid logit ``z`` as the two-class logits ``[0, z]``: ``softmax([0, z] / T)[1] = sigmoid(z / T)``."""
    z = np.asarray(_to_numpy(logit), dtype=np.float64)
    y = np.asarray(_to_numpy(outcomes))
    if z.ndim != 1:
        raise ValueError(f"logit must be one value per row, shape (N,), got {z.shape}")
    if y.shape != z.shape or (y.size and not np.isin(y, (0, 1)).all()):
        raise ValueError(f"outcomes must be 0 or 1 per row, shape {z.shape}")
    return np.stack([np.zeros_like(z), z], axis=1), y.astype(np.intp)


def fit_binary_temperature(logit: Any, outcomes: Any) -> float:
    """The temperature ``T`` of ``sigmoid(z / T)`` fitted by maximum likelihood (binary cross-entropy).

    A sigmoid logit is the two-class softmax of ``[0, z]``, so this is :func:`fit_temperature`
    on those logits: the same bounded search over ``log T``.

    Args:
        logit: pre-sigmoid scores, shape ``(N,)``, finite.
        outcomes: 0/1 outcome per row, shape ``(N,)``.
    """
    two, y = _two_class(logit, outcomes)
    return fit_temperature(two, y)


def cross_fitted_binary_temperature_probs(
    logit: Any, outcomes: Any, folds: int = 5, *, rng: np.random.Generator
) -> tuple[FloatArray, list[float]]:
    """``sigmoid(z / T)`` where no row is scaled by a temperature fitted on it.

    :func:`cross_fitted_temperature_probs` on the two-class logits ``[0, z]``: folds stratified by
    outcome, each fold scaled by the temperature fitted on the others.

    Returns:
        ``(probs_after, temperatures)``: float64 probabilities ``(N,)`` and the fold temperatures.
    """
    two, y = _two_class(logit, outcomes)
    probs_after, temperatures = cross_fitted_temperature_probs(two, y, folds, rng=rng)
    return np.asarray(probs_after[:, 1], dtype=np.float64), temperatures


# --------------------------------------------------------------------------------------------
# When scaling did not help

ALREADY_CALIBRATED = 1.1
"""A fitted temperature within a factor of this of 1 counts as "already calibrated"."""

FOLD_DISAGREEMENT = 1.1
"""Fold temperatures whose largest and smallest differ by more than this factor are noisy."""


def did_not_help_record(
    ece_before: float,
    ece_after: float,
    interval: tuple[float, float] | None,
    temperature: float,
    fold_temperatures: list[float],
    *,
    n: int,
    bins: int,
) -> dict[str, Any]:
    """The ``temperature_scaling_did_not_help`` finding from its numbers, with the likely causes.

    See :func:`temperature_did_not_help` for the causes; ``interval`` is the paired bootstrap
    interval of ``ece_after - ece_before`` (``None``: not bootstrapped).
    """
    increase = ece_after - ece_before
    causes: list[dict[str, str]] = []
    if abs(math.log(temperature)) < math.log(ALREADY_CALIBRATED):
        causes.append(
            {
                "cause": "already_calibrated",
                "detail": f"the temperature fitted on all {n} images is {temperature:.3g}, close to 1: the"
                " confidences are already right on average, so scaling has little to fix and adds the noise"
                " of fitting",
            }
        )
    spread = max(fold_temperatures) / min(fold_temperatures)
    if spread > FOLD_DISAGREEMENT:
        per_fold = round(n * (len(fold_temperatures) - 1) / len(fold_temperatures))
        causes.append(
            {
                "cause": "cross_fitting_noise",
                "detail": f"the {len(fold_temperatures)} fold temperatures range from {min(fold_temperatures):.3g} to"
                f" {max(fold_temperatures):.3g}, each fitted on about {per_fold} images: a small sample fits"
                " noisy temperatures",
            }
        )
    if interval is not None and interval[0] <= 0.0 <= interval[1]:
        causes.append(
            {
                "cause": "ece_binning_noise",
                "detail": f"the increase {increase:.4f} is within the resampling noise of the two ECEs"
                f" ({bins} equal-width bins, {n} images): its paired 95% interval"
                f" [{interval[0]:.4f}, {interval[1]:.4f}] contains 0",
            }
        )
    if not causes:
        causes.append(
            {
                "cause": "not_uniform_miscalibration",
                "detail": "one temperature, fitted to the NLL, cannot repair a miscalibration that differs"
                " between confidence levels or classes",
            }
        )
    return {
        "kind": "temperature_scaling_did_not_help",
        "ece": ece_before,
        "ece_after_temperature": ece_after,
        "increase": increase,
        "increase_ci": list(interval) if interval is not None else None,
        "temperature": temperature,
        "fold_temperatures": list(fold_temperatures),
        "n": n,
        "bins": bins,
        "likely_causes": causes,
        "detail": (
            f"The ECE after cross-fitted temperature scaling ({ece_after:.4f}) exceeds the ECE before it"
            f" ({ece_before:.4f}); likely: " + "; ".join(c["cause"].replace("_", " ") for c in causes) + "."
        ),
    }
