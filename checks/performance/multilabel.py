"""Performance of a multi-label model: per label on that label's known entries, at its threshold.

Each label is a binary problem of its own. An entry whose label is unknown (``-1``) is left out of
that label's figures, and counted. The estimates are scikit-learn's (``roc_auc_score``,
``average_precision_score``); the bootstrap replicates come from one matrix of row multiplicities
shared by every label (:func:`~auditkit.checks.performance.metrics.cluster_weights`), so the
intervals of all labels and of the macro AUROC come from the same resamples of patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import average_precision_score, roc_auc_score

from auditkit.check import CheckResult, Metric
from auditkit.checks.performance.claims import ClaimTarget, judge_claims
from auditkit.checks.performance.metrics import cluster_weights, rates, weighted_ranking, weighted_rates
from auditkit.stats import median_centred_interval

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = ["PER_LABEL", "LabelData", "label_estimates", "label_replicates", "measure_multilabel"]

PER_LABEL = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class LabelData:
    """One label's known entries: their rows, scores (sigmoid probabilities) and truth."""

    name: str
    rows: NDArray[np.intp]
    score: NDArray[np.float64]
    truth: NDArray[np.bool_]
    threshold: float
    unknown: int

    @property
    def called(self) -> NDArray[np.bool_]:
        """The decision per known entry: positive when the probability reaches the threshold."""
        return np.asarray(self.score >= self.threshold, dtype=np.bool_)

    @property
    def positives(self) -> int:
        return int(self.truth.sum())

    @property
    def negatives(self) -> int:
        return int(self.truth.size - self.truth.sum())

    def undefined_reason(self) -> str | None:
        """Why the label's ranking figures are undefined (no positive or no negative), else ``None``."""
        counted = f"{self.truth.size} known, {self.unknown} unknown"
        if self.truth.size == 0:
            return f"no known entry of {self.name} in the eval split ({self.unknown} unknown)"
        if self.positives == 0:
            return f"no positive known case of {self.name} in the eval split ({counted})"
        if self.negatives == 0:
            return f"no negative known case of {self.name} in the eval split ({counted})"
        return None


def label_data(
    names: Sequence[str], probs: NDArray[np.float64], labels: NDArray[np.int64], thresholds: Sequence[float]
) -> list[LabelData]:
    """Each label's known entries (label ``1`` or ``0``; ``-1`` is unknown)."""
    out = []
    for k, name in enumerate(names):
        known = labels[:, k] >= 0
        rows = np.flatnonzero(known).astype(np.intp)
        out.append(
            LabelData(
                name=name,
                rows=rows,
                score=np.asarray(probs[rows, k], dtype=np.float64),
                truth=np.asarray(labels[rows, k] == 1, dtype=np.bool_),
                threshold=float(thresholds[k]),
                unknown=int((~known).sum()),
            )
        )
    return out


def label_estimates(label: LabelData) -> dict[str, float]:
    """AUROC and AUPRC (scikit-learn's) and the rates at the threshold; NaN where undefined."""
    out: dict[str, float] = {"auroc": float("nan"), "auprc": float("nan")}
    if label.undefined_reason() is None:
        out = {
            "auroc": float(roc_auc_score(label.truth, label.score)),
            "auprc": float(average_precision_score(label.truth, label.score)),
        }
    out.update(rates(label.truth, label.called))
    return out


def label_replicates(label: LabelData, weights: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """The figures of :func:`label_estimates` on every resample given as row weights ``(B, N)``
    over all eval rows (the label's known rows are its columns ``label.rows``)."""
    if label.undefined_reason() is None:
        auroc, auprc = weighted_ranking(label.truth, label.score, weights, label.rows)
    else:
        auroc = auprc = np.full(weights.shape[0], np.nan)
    return {"auroc": auroc, "auprc": auprc, **weighted_rates(label.truth, label.called, weights, label.rows)}


_RATE_REASONS = {
    "sensitivity": "no positive known case of {name} in the eval split",
    "specificity": "no negative known case of {name} in the eval split",
    "ppv": "the model called no known case of {name} positive (threshold {threshold:g})",
    "npv": "the model called every known case of {name} positive (threshold {threshold:g})",
}


def _reason(metric: str, label: LabelData) -> str:
    if metric in ("auroc", "auprc") or label.truth.size == 0:
        return f"undefined for {label.name}: {label.undefined_reason()}"
    return f"undefined for {label.name}: " + _RATE_REASONS[metric].format(name=label.name, threshold=label.threshold)


def measure_multilabel(
    ctx: CheckContext,
    n_boot: int,
    probs: NDArray[np.float64],
    labels: NDArray[np.int64],
    patients: NDArray[Any],
    result: CheckResult,
) -> None:
    """Per-label metrics, the macro AUROC, the claims, the findings and the ROC figure into ``result``."""
    names = list(ctx.classes)
    thresholds = [float(ctx.operating_point.get(name, DEFAULT_THRESHOLD)) for name in names]
    data = label_data(names, probs, labels, thresholds)
    estimates = [label_estimates(label) for label in data]
    averaged = [k for k, e in enumerate(estimates) if np.isfinite(e["auroc"])]
    macro = float(np.mean([estimates[k]["auroc"] for k in averaged])) if averaged else float("nan")

    replicates: list[dict[str, list[NDArray[np.float64]]]] = [{m: [] for m in PER_LABEL} for _ in data]
    macro_replicates: list[NDArray[np.float64]] = []
    if n_boot and labels.shape[0] >= 2:
        for weights in cluster_weights(patients, n_boot, ctx.rng()):
            per_label = [label_replicates(label, weights) for label in data]
            for k, values in enumerate(per_label):
                for metric, array in values.items():
                    replicates[k][metric].append(array)
            if averaged:  # a resample where an averaged label is undefined has no macro value
                macro_replicates.append(np.mean([per_label[k]["auroc"] for k in averaged], axis=0))

    def interval(values: list[NDArray[np.float64]], estimate: float) -> tuple[float, float] | None:
        if not values:
            return None
        return median_centred_interval(np.concatenate(values), estimate, bounds=(0.0, 1.0))

    intervals = [{m: interval(replicates[k][m], estimates[k][m]) for m in PER_LABEL} for k in range(len(data))]
    for metric in PER_LABEL:
        for k, label in enumerate(data):
            value = estimates[k][metric]
            result.metrics.append(
                Metric(
                    f"performance.{metric}",
                    value if np.isfinite(value) else None,
                    "higher_is_better",
                    labels={"label": label.name},
                    ci=intervals[k][metric],
                    n=int(label.truth.size),
                    reason=None if np.isfinite(value) else _reason(metric, label),
                )
            )
    left_out = {data[k].name: data[k].undefined_reason() for k in range(len(data)) if k not in averaged}
    macro_interval = interval(macro_replicates, macro)
    result.metrics.append(
        Metric(
            "performance.macro_auroc",
            macro if averaged else None,
            "higher_is_better",
            ci=macro_interval,
            n=int(labels.shape[0]),
            reason=None if averaged else "no label has both a positive and a negative known case in the eval split",
        )
    )

    targets: list[ClaimTarget] = []
    for metric, claimed in sorted(ctx.claims.items()):
        key = metric.removeprefix("performance.")
        if metric == "performance.macro_auroc":
            targets.append(ClaimTarget(metric, float(claimed), macro, macro_interval))
            continue
        for name, number in claimed.items() if isinstance(claimed, dict) else ():
            k = names.index(name)
            targets.append(
                ClaimTarget(metric, float(number), estimates[k][key], intervals[k][key], subject={"label": name})
            )
    result.metrics += judge_claims(targets, result)

    result.findings += [
        {
            "kind": "operating_point",
            "decision": (
                "per label: positive when p(label) >= its threshold"
                f" (model.operating_point, else {DEFAULT_THRESHOLD:g})"
            ),
            "thresholds": dict(zip(names, thresholds, strict=True)),
            "from_spec": [name for name in names if name in ctx.operating_point],
        },
        {
            "kind": "label_counts",
            "note": "unknown entries (empty in the manifest) are left out of that label's figures",
            "labels": [_counts(label) for label in data],
        },
        {
            "kind": "undefined_labels",
            "count": len(left_out),
            "labels": left_out,
        },
        {
            "kind": "macro_auroc",
            "averaged": [data[k].name for k in averaged],
            "left_out": left_out,
            "note": (
                "the mean of the per-label AUROCs that are defined; "
                + (f"{len(left_out)} label(s) left out: {', '.join(left_out)}" if left_out else "no label left out")
                + "; its interval from the same resamples, a resample where an averaged label is undefined"
                " giving no value"
            ),
        },
    ]
    curves = [
        (label.name, label.truth, label.score, _point(estimates[k]))
        for k, label in enumerate(data)
        if label.undefined_reason() is None
    ]
    if curves:
        from auditkit.checks.performance.plots import MANY_STYLES, roc_pr_figure

        thresholds_text = ", ".join(f"{label.name} {label.threshold:g}" for label in data)
        result.artifacts.append(
            ctx.write_artifact(
                "roc_pr_curves",
                "roc_pr_curves.svg",
                lambda path: roc_pr_figure(curves, path, line_styles=MANY_STYLES),
                description=(
                    f"ROC and precision-recall curves per label on its known entries ({len(curves)} of"
                    f" {len(data)} labels; a label without both a positive and a negative known case is not"
                    f" drawn); the dot is each label's operating point (thresholds: {thresholds_text})."
                ),
            )
        )


def _point(estimate: dict[str, float]) -> tuple[float, float, float]:
    return (estimate["sensitivity"], estimate["specificity"], estimate["ppv"])


def _counts(label: LabelData) -> dict[str, Any]:
    called = label.called
    return {
        "label": label.name,
        "known": int(label.truth.size),
        "positives": label.positives,
        "negatives": label.negatives,
        "unknown": label.unknown,
        "threshold": label.threshold,
        "tp": int((label.truth & called).sum()),
        "fp": int((~label.truth & called).sum()),
        "fn": int((label.truth & ~called).sum()),
        "tn": int((~label.truth & ~called).sum()),
    }
