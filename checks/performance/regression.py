"""Performance of a regression model: MAE, RMSE, mean error and R² per output, with Bland-Altman.

The estimates are scikit-learn's (``mean_absolute_error``, ``mean_squared_error`` and its root,
``r2_score``) and the mean error is the mean of prediction minus target (the model's bias, in the
output's units). The bootstrap replicates are the same figures on row multiplicities from one
matrix shared by every output
(:func:`~auditkit.checks.performance.metrics.cluster_weights`).

Labels: a model with one output reports its figures without labels (``performance.mae``); a model
with several reports each output's under ``{output: name}``. Claims follow the same convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from auditkit.check import CheckResult, Direction, Metric
from auditkit.checks.performance.claims import ClaimTarget, judge_claims
from auditkit.checks.performance.metrics import cluster_weights
from auditkit.stats import Bounds, median_centred_interval

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = [
    "REGRESSION",
    "BlandAltman",
    "bland_altman",
    "measure_regression",
    "regression_estimates",
    "regression_replicates",
]

REGRESSION = ("mae", "rmse", "mean_error", "r2")
LOA_Z = 1.96
"""Bland and Altman's (1986) 95% limits of agreement: the mean difference +- 1.96 SD of the differences."""

_DIRECTIONS: dict[str, Direction] = {
    "mae": "lower_is_better",
    "rmse": "lower_is_better",
    # The bias has no good direction (zero is best); the schema needs one, and it is descriptive.
    "mean_error": "lower_is_better",
    "r2": "higher_is_better",
}
_BOUNDS: dict[str, Bounds | None] = {
    "mae": (0.0, float("inf")),
    "rmse": (0.0, float("inf")),
    "mean_error": None,
    "r2": (float("-inf"), 1.0),
}


def regression_estimates(predicted: NDArray[np.float64], target: NDArray[np.float64]) -> dict[str, float]:
    """scikit-learn's MAE, RMSE and R², and the mean error; NaN where undefined.

    R² is undefined with fewer than two targets or when every target is the same (its
    denominator, the targets' spread, is zero; scikit-learn would report 0 or 1 by convention).
    """
    if target.size == 0:
        return dict.fromkeys(REGRESSION, float("nan"))
    out = {
        "mae": float(mean_absolute_error(target, predicted)),
        "rmse": float(np.sqrt(mean_squared_error(target, predicted))),
        "mean_error": float(np.mean(predicted - target)),
        "r2": float("nan"),
    }
    if target.size >= 2 and np.ptp(target) > 0:
        out["r2"] = float(r2_score(target, predicted))
    return out


def regression_replicates(
    predicted: NDArray[np.float64], target: NDArray[np.float64], weights: NDArray[np.float64]
) -> dict[str, NDArray[np.float64]]:
    """The figures of :func:`regression_estimates` on every resample given as integer-valued row
    weights ``(B, n)``."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=1)
    drawn = total > 0
    safe = np.where(drawn, total, 1.0)
    error = predicted - target
    squared = w @ (error * error)
    mean_target = (w @ target) / safe
    spread = (w * (target[None, :] - mean_target[:, None]) ** 2).sum(axis=1)
    present = weights > 0
    constant = np.where(present, target, -np.inf).max(axis=1) <= np.where(present, target, np.inf).min(axis=1)
    varied = drawn & ~constant
    return {
        "mae": np.where(drawn, (w @ np.abs(error)) / safe, np.nan),
        "rmse": np.where(drawn, np.sqrt(squared / safe), np.nan),
        "mean_error": np.where(drawn, (w @ error) / safe, np.nan),
        "r2": np.where(varied, 1.0 - squared / np.where(varied, spread, 1.0), np.nan),
    }


@dataclass(frozen=True)
class BlandAltman:
    """Agreement of prediction and target (Bland and Altman, Lancet 1986): the mean difference
    (prediction - target) and its 95% limits of agreement."""

    mean_difference: float
    sd_difference: float
    lower_limit: float
    upper_limit: float

    def to_json(self) -> dict[str, float]:
        return {
            "mean_difference": self.mean_difference,
            "sd_difference": self.sd_difference,
            "lower_limit": self.lower_limit,
            "upper_limit": self.upper_limit,
        }


def bland_altman(predicted: NDArray[np.float64], target: NDArray[np.float64]) -> BlandAltman | None:
    """The mean difference and the limits ``mean +- 1.96 SD`` (SD with ``n - 1``); ``None`` below two rows."""
    if target.size < 2:
        return None
    difference = predicted - target
    mean, sd = float(difference.mean()), float(difference.std(ddof=1))
    return BlandAltman(mean, sd, mean - LOA_Z * sd, mean + LOA_Z * sd)


def _reason(metric: str, output: str, n: int) -> str:
    if n == 0:
        return f"undefined for {output}: no eval image with a finite target"
    return f"undefined for {output}: R² needs at least two targets that differ ({n} target(s), all equal)"


def measure_regression(
    ctx: CheckContext,
    n_boot: int,
    predicted: NDArray[np.float64],
    targets: NDArray[np.float64],
    patients: NDArray[Any],
    result: CheckResult,
) -> None:
    """Per-output metrics, claims, findings and the Bland-Altman figure into ``result``."""
    names = list(ctx.classes)
    units = ctx.units
    several = len(names) > 1
    known = [np.flatnonzero(np.isfinite(targets[:, k])) for k in range(len(names))]
    columns = [(predicted[rows, k], targets[rows, k]) for k, rows in enumerate(known)]
    estimates = [regression_estimates(p, t) for p, t in columns]

    replicates: list[dict[str, list[NDArray[np.float64]]]] = [{m: [] for m in REGRESSION} for _ in names]
    if n_boot and targets.shape[0] >= 2:
        for weights in cluster_weights(patients, n_boot, ctx.rng()):
            for k, (p, t) in enumerate(columns):
                for metric, values in regression_replicates(p, t, weights[:, known[k]]).items():
                    replicates[k][metric].append(values)
    intervals = [
        {
            m: median_centred_interval(np.concatenate(reps[m]), estimates[k][m], bounds=_BOUNDS[m]) if reps[m] else None
            for m in REGRESSION
        }
        for k, reps in enumerate(replicates)
    ]

    def subject(k: int) -> dict[str, str]:
        return {"output": names[k]} if several else {}

    for metric in REGRESSION:
        for k, name in enumerate(names):
            value = estimates[k][metric]
            result.metrics.append(
                Metric(
                    f"performance.{metric}",
                    value if np.isfinite(value) else None,
                    _DIRECTIONS[metric],
                    labels=subject(k),
                    ci=intervals[k][metric],
                    n=int(known[k].size),
                    reason=None if np.isfinite(value) else _reason(metric, name, int(known[k].size)),
                )
            )

    targets_claimed: list[ClaimTarget] = []
    for metric, claimed in sorted(ctx.claims.items()):
        key = metric.removeprefix("performance.")
        items = claimed.items() if isinstance(claimed, dict) else [(names[0], claimed)]
        for name, number in sorted(items, key=lambda item: names.index(item[0])):
            k = names.index(name)
            targets_claimed.append(
                ClaimTarget(
                    metric,
                    float(number),
                    estimates[k][key],
                    intervals[k][key],
                    subject=subject(k),
                    lower_is_better=_DIRECTIONS[key] == "lower_is_better",
                )
            )
    result.metrics += judge_claims(targets_claimed, result)

    agreement = [bland_altman(p, t) for p, t in columns]
    result.findings.append(
        {
            "kind": "outputs",
            "labels": "{output: name} on every figure" if several else "none: the model has one output",
            "outputs": [
                {
                    "output": name,
                    "unit": units.get(name),
                    "n": int(known[k].size),
                    "left_out": int(targets.shape[0] - known[k].size),
                    "target_mean": float(columns[k][1].mean()) if known[k].size else None,
                    "target_sd": float(columns[k][1].std(ddof=1)) if known[k].size >= 2 else None,
                    "mean_error": "prediction - target",
                    "bland_altman": limits.to_json() if limits is not None else None,
                }
                for k, (name, limits) in enumerate(zip(names, agreement, strict=True))
            ],
        }
    )
    panels = [
        (name, columns[k][0], columns[k][1], units.get(name), agreement[k])
        for k, name in enumerate(names)
        if agreement[k] is not None
    ]
    if panels:
        from auditkit.checks.performance.plots import bland_altman_figure

        result.artifacts.append(
            ctx.write_artifact(
                "bland_altman",
                "bland_altman.svg",
                lambda path: bland_altman_figure(panels, path),
                description=(
                    "Bland-Altman plot per output: the difference prediction - target against their mean;"
                    " solid line the mean difference (the bias), dashed lines its 95% limits of agreement"
                    f" (mean +- {LOA_Z} SD of the differences)."
                ),
            )
        )
