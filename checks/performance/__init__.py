"""The performance check: standalone performance at the device's operating point, with intervals,
and the manufacturer's claims held against them.

The figures come from plain functions (:mod:`.metrics`, scikit-learn's own metrics) and the curves
from :mod:`.plots`; :class:`PerformanceCheck` applies them to the eval split of the shared pass.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs, Skip, require_finite_logits
from auditkit.checks.performance.metrics import (
    BINARY,
    Decision,
    binary_metrics,
    cluster_members,
    cluster_resamples,
    counts,
    decide,
    multiclass_metrics,
)
from auditkit.stats import median_centred_interval

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = ["PerformanceCheck", "PerformanceParams"]

log = logging.getLogger(__name__)

_REASONS = {
    "auroc": "needs images of the class and of the others",
    "auprc": "needs images of the class and of the others",
    "sensitivity": "no image of the class in the eval split",
    "specificity": "no image of the other classes in the eval split",
    "ppv": "the model called no image this class",
    "npv": "the model called every image this class",
}


class PerformanceParams(CheckParams):
    n_boot: int = Field(default=1000, ge=0, description="bootstrap resamples (of patients when known); 0: no intervals")


class PerformanceCheck(Check[PerformanceParams]):
    """Standalone performance: accuracy, balanced accuracy, AUROC, AUPRC, sensitivity, specificity,
    PPV and NPV at the operating point, with 95% intervals, and claimed figures held against them.

    Method: the eval split's probabilities from the shared pass are turned into decisions at the
    operating point - for a binary classifier, the positive class when its probability reaches
    ``model.operating_point`` (default 0.5, the argmax), for more classes the argmax - and scored
    with scikit-learn's metrics (AUROC as Hanley and McNeil 1982; AUPRC as average precision).
    Intervals are median-centred percentile bootstrap intervals over patients when the manifest
    names them (a patient's images are resampled together: they are not independent), else over
    images. A claim in ``model.claims`` is judged on the upper end of its interval:
    ``performance.claim_shortfall`` = claimed - upper end, positive when the data cannot support
    the claim at 95% (rule PERF-CLAIM).

    Inputs: the eval split's predictions and labels, and its surrogate patient ids.

    Metrics: ``performance.accuracy``, ``performance.balanced_accuracy``; ``performance.auroc``,
    ``.auprc``, ``.sensitivity``, ``.specificity``, ``.ppv``, ``.npv`` (binary: of the positive
    class, no labels; more classes: one-vs-rest at the argmax, ``{class}``);
    ``performance.claim_shortfall`` ``{metric}``.

    Findings: ``operating_point`` (how scores became decisions), ``confusion_matrix`` (counts),
    ``bootstrap`` (the resampling unit), ``claim`` (claimed, measured, interval, supported).

    Artifacts: ``roc_pr_curves`` (SVG, the operating point marked).

    NIST AI RMF: MEASURE 2.3 (performance demonstrated for conditions similar to deployment),
    MEASURE 2.5 (validity and reliability demonstrated), MAP 2.3 (claims documented and tested).

    Limitations: the intervals hold for the eval split as drawn; they say nothing of a population
    it does not represent. A metric undefined on the sample (no positive image) is undefined with
    the reason, and a claim on it cannot be judged.
    """

    id: ClassVar[str] = "performance"
    family: ClassVar[str] = "performance"
    Params = PerformanceParams
    needs: ClassVar[Needs] = Needs(predictions=True)
    emits: ClassVar[tuple[str, ...]] = (*(f"performance.{m}" for m in BINARY), "performance.claim_shortfall")

    def run(self, ctx: CheckContext, params: PerformanceParams) -> CheckResult:
        classes = ctx.classes
        preds = ctx.predictions("eval")
        if preds.n == 0:
            raise Skip("no eval images")
        finite = require_finite_logits(preds.logits)
        probs = np.asarray(preds.probs[finite], dtype=np.float64)
        labels = np.asarray(preds.labels[finite], dtype=np.int64)
        patients = np.asarray(ctx.split("eval").patients, dtype=object)[finite]
        result = CheckResult()
        if not finite.all():
            result.findings.append({"kind": "non_finite_logits", "count": int((~finite).sum())})

        binary = len(classes) == 2 and ctx.positive_index is not None
        if binary:
            positive = ctx.positive_index
            assert positive is not None
            decision = Decision(positive, ctx.operating_point.get(classes[positive]))
        else:
            decision = Decision(None, None)

        def measure(rows: NDArray[np.intp] | None) -> dict[str, float]:
            # The estimate with scikit-learn's functions; the replicates with equal, faster ones.
            p, y, fast = (probs, labels, False) if rows is None else (probs[rows], labels[rows], True)
            return dict(
                binary_metrics(p, y, decision, fast=fast) if binary else multiclass_metrics(p, y, decision, fast=fast)
            )

        estimates = measure(None)
        unit = "patient" if any(p is not None for p in patients) else "image"
        replicates: dict[str, list[float]] = {key: [] for key in estimates}
        if params.n_boot and labels.size >= 2:
            for rows in cluster_resamples(patients, params.n_boot, ctx.rng()):
                for key, value in measure(rows).items():
                    replicates[key].append(value)
        intervals = {
            key: median_centred_interval(values, estimates[key], bounds=(0.0, 1.0)) if values else None
            for key, values in replicates.items()
        }

        n = int(labels.size)
        for key, value in estimates.items():
            name, _, index = key.partition(":")
            labels_of = {"class": classes[int(index)]} if index else {}
            reason = None
            if not np.isfinite(value):
                subject = (
                    classes[int(index)]
                    if index
                    else (classes[decision.positive] if decision.positive is not None else "")
                )
                reason = f"undefined for {subject}: {_REASONS.get(name, 'no images')}"
            result.metrics.append(
                Metric(
                    f"performance.{name}",
                    value if np.isfinite(value) else None,
                    "higher_is_better",
                    labels=labels_of,
                    ci=intervals.get(key),
                    n=n,
                    reason=reason,
                )
            )
        result.metrics += _claims(ctx.claims, estimates, intervals, result)

        predicted = decide(probs, decision)
        result.findings += [
            {
                "kind": "operating_point",
                "decision": decision.describe(classes),
                "threshold": decision.threshold,
                "positive_class": classes[decision.positive] if decision.positive is not None else None,
            },
            {"kind": "confusion_matrix", "classes": list(classes), "counts": counts(labels, predicted, len(classes))},
            {
                "kind": "bootstrap",
                "unit": unit,
                "resampled": len(cluster_members(patients)),
                "n_boot": params.n_boot,
            },
        ]
        curves = []
        for k, name in enumerate(classes):
            if binary and k != decision.positive:
                continue
            key = "" if binary else f":{k}"
            point = tuple(estimates.get(f"{m}{key}", float("nan")) for m in ("sensitivity", "specificity", "ppv"))
            curves.append((name, labels == k, probs[:, k], point))
        if any(t.any() and not t.all() for _, t, _, _ in curves):
            from auditkit.checks.performance.plots import roc_pr_figure

            result.artifacts.append(
                ctx.write_artifact(
                    "roc_pr_curves",
                    "roc_pr_curves.svg",
                    lambda path: roc_pr_figure(curves, path),
                    description=(
                        f"ROC and precision-recall curves of the eval split ({n} images)"
                        + (
                            f" for {classes[decision.positive]}"
                            if binary and decision.positive is not None
                            else ", one-vs-rest per class"
                        )
                        + f"; the dot is the operating point ({decision.describe(classes)})."
                    ),
                )
            )
        return result


def _claims(
    claims: dict[str, float],
    estimates: dict[str, float],
    intervals: dict[str, tuple[float, float] | None],
    result: CheckResult,
) -> list[Metric]:
    """``performance.claim_shortfall`` per claim: claimed minus the upper end of the interval."""
    metrics: list[Metric] = []
    if not claims:
        result.findings.append(
            {"kind": "claims", "count": 0, "note": "model.claims names no figure: rule PERF-CLAIM has nothing to judge"}
        )
    for metric, claimed in sorted(claims.items()):
        key = metric.removeprefix("performance.")
        measured = estimates.get(key, float("nan"))
        interval = intervals.get(key)
        labels = {"metric": metric}
        if not np.isfinite(measured):
            reason = f"{metric} is undefined on this eval split, so the claim cannot be judged"
            metrics.append(Metric("performance.claim_shortfall", None, "lower_is_better", labels=labels, reason=reason))
            continue
        upper = interval[1] if interval is not None else measured
        shortfall = claimed - upper
        metrics.append(Metric("performance.claim_shortfall", shortfall, "lower_is_better", labels=labels))
        result.findings.append(
            {
                "kind": "claim",
                "metric": metric,
                "claimed": claimed,
                "measured": measured,
                "interval": list(interval) if interval is not None else None,
                "supported": shortfall <= 0,
                "judged_on": "upper end of the 95% interval" if interval is not None else "the point estimate",
            }
        )
    return metrics
