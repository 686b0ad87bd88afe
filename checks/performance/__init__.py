"""The performance check: standalone performance at the device's operating point, with intervals,
and the manufacturer's claims held against them.

The figures come from plain functions (:mod:`.metrics`, scikit-learn's own metrics; per task
:mod:`.multilabel` and :mod:`.regression`), the claims are judged in :mod:`.claims` and the
figures drawn by :mod:`.plots`; :class:`PerformanceCheck` applies them to the eval split of the
shared pass.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, field_validator

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs, Skip, require_finite_logits
from auditkit.checks.performance.claims import ClaimTarget, judge_claims
from auditkit.checks.performance.metrics import (
    BINARY,
    Decision,
    binary_metrics,
    cluster_members,
    cluster_weights,
    counts,
    decide,
    multiclass_metrics,
    weighted_classification,
)
from auditkit.checks.performance.multilabel import measure_multilabel
from auditkit.checks.performance.regression import REGRESSION, measure_regression
from auditkit.checks.performance.segmentation import SEGMENTATION, measure_segmentation
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
    nsd_tolerance_mm: float | dict[str, float] = Field(
        default=2.0,
        description="segmentation: the normalised surface Dice's tolerance in mm, one for every class or"
        " {class: mm} (classes not named take 2.0)",
    )
    overlay_cases: int = Field(
        default=3,
        ge=0,
        le=10,
        description="segmentation: the lowest-Dice eval cases of each class drawn with their reference and"
        " prediction over the image (the artifact worst_case_overlays); 0: no image in the bundle",
    )

    @field_validator("nsd_tolerance_mm")
    @classmethod
    def _positive_tolerance(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        for tolerance in value.values() if isinstance(value, dict) else [value]:
            if not (math.isfinite(tolerance) and tolerance >= 0):
                raise ValueError(f"a tolerance is a distance in mm >= 0, got {tolerance}")
        return value

    def tolerances(self, classes: list[str]) -> list[float]:
        """The NSD tolerance of each foreground class (``classes[1:]``)."""
        per_class = self.nsd_tolerance_mm if isinstance(self.nsd_tolerance_mm, dict) else {}
        unknown = sorted(set(per_class) - set(classes[1:]))
        if unknown:
            raise Skip(f"nsd_tolerance_mm names {unknown}, which are not foreground classes {classes[1:]}")
        default = self.nsd_tolerance_mm if not isinstance(self.nsd_tolerance_mm, dict) else 2.0
        return [float(per_class.get(name, default)) for name in classes[1:]]


class PerformanceCheck(Check[PerformanceParams]):
    """Standalone performance at the operating point, with 95% intervals, and claimed figures held
    against them: a classifier's accuracy, balanced accuracy, AUROC, AUPRC, sensitivity,
    specificity, PPV and NPV; a multi-label model's per-label AUROC, AUPRC and rates at each
    label's threshold, and its macro AUROC; a regression model's MAE, RMSE, mean error and R²; a
    segmentation model's Dice, HD95 and normalised surface Dice per class and its mean Dice.

    Method. Classification: the eval split's probabilities from the shared pass are turned into
    decisions at the operating point - for a binary classifier, the positive class when its
    probability reaches ``model.operating_point`` (default 0.5, the argmax), for more classes the
    argmax - and scored with scikit-learn's metrics (AUROC as Hanley and McNeil 1982; AUPRC as
    average precision). Multilabel: each label is a binary problem scored on that label's known
    entries only (an unknown entry, empty in the manifest, is left out and counted), the decision
    positive when the label's sigmoid probability reaches its threshold
    (``model.operating_point[label]``, else 0.5); the macro AUROC is the mean of the per-label
    AUROCs that are defined. Regression: per output, scikit-learn's ``mean_absolute_error``, the
    root of ``mean_squared_error`` and ``r2_score``, and the mean error (prediction - target: the
    bias, in the output's units); agreement as Bland and Altman (Lancet 1986): mean difference and
    95% limits of agreement (mean +- 1.96 SD of the differences).
    Intervals are median-centred percentile bootstrap intervals over patients when the manifest
    names them (a patient's images are resampled together: they are not independent), else over
    images; for multilabel and regression one matrix of resampled patients serves every label or
    output, so the macro AUROC's interval comes from the same replicates as the per-label ones
    (a replicate where an averaged label is undefined gives no macro value). A claim in
    ``model.claims`` is judged on the interval's end that is best for it:
    ``performance.claim_shortfall`` = claimed - upper end (higher is better) or lower end -
    claimed (MAE, RMSE), positive when the data cannot support the claim at 95% (rule PERF-CLAIM).

    Inputs: the eval split's predictions and labels (multilabel 1/0/unknown, regression targets),
    its surrogate patient ids, and for regression the outputs' units (``model.units``);
    segmentation: the images of the worst cases it draws.

    Metrics. Classification: ``performance.accuracy``, ``performance.balanced_accuracy``;
    ``performance.auroc``, ``.auprc``, ``.sensitivity``, ``.specificity``, ``.ppv``, ``.npv``
    (binary: of the positive class, no labels; more classes: one-vs-rest at the argmax,
    ``{class}``). Multilabel: ``performance.auroc``, ``.auprc``, ``.sensitivity``,
    ``.specificity``, ``.ppv``, ``.npv`` ``{label}``; ``performance.macro_auroc`` (no labels).
    Regression: ``performance.mae``, ``.rmse``, ``.mean_error``, ``.r2`` - no labels for a model
    with one output, ``{output}`` for each output of a model with several. Every task:
    ``performance.claim_shortfall`` ``{metric}``, plus ``label`` or ``output`` when the claim names
    one (a single-output regressor's claims have none).

    Undefined (value ``None`` with the reason, never NaN): a classifier's figures of a class
    without images; a label's AUROC, AUPRC and sensitivity without a positive known case, its
    AUROC, AUPRC and specificity without a negative one (such a label is counted in the
    ``undefined_labels`` finding and left out of the macro AUROC, which its finding says); PPV
    when the model calls no case positive, NPV when it calls every case positive; R² when the
    targets do not vary; a claim on an undefined figure (it cannot be judged).

    Findings: ``operating_point`` (how scores became decisions; multilabel: the threshold of each
    label and which came from the spec), ``confusion_matrix`` (classification counts),
    ``label_counts`` (per label: known, positives, negatives, unknown, threshold, tp/fp/fn/tn),
    ``undefined_labels``, ``macro_auroc`` (the labels averaged and those left out, with why),
    ``outputs`` (regression, per output: unit, n, target mean and SD, Bland-Altman mean difference
    and limits), ``bootstrap`` (the resampling unit), ``claim`` (claimed, measured, interval,
    supported).

    Artifacts: ``roc_pr_curves`` (SVG; classification and multilabel, one curve per class or
    label with its operating point marked); ``bland_altman`` (SVG, regression, one panel per
    output, axes in the output's unit); ``worst_case_overlays`` (SVG, segmentation: the
    ``overlay_cases`` lowest-Dice cases of each class, reference and prediction outlined on the
    image - a volume's slice holding most of the reference - titled by manifest row and Dice).

    NIST AI RMF: MEASURE 2.3 (performance demonstrated for conditions similar to deployment),
    MEASURE 2.5 (validity and reliability demonstrated), MAP 2.3 (claims documented and tested).
    Packaged rules: PERF-CLAIM (every claim), PERF-AUROC (a binary classifier's AUROC, no labels),
    PERF-MACRO-AUROC (multilabel), PERF-R2 (regression, every output), SEG-MEAN-DICE and
    SEG-DICE-CLASS (segmentation).

    Segmentation (``model.task: segmentation``, :mod:`.segmentation`): per case and foreground
    class, MONAI's Dice (``include_background=False, ignore_empty=True``), HD95 in millimetres
    (each case's pixel or voxel spacing) and normalised surface Dice at ``nsd_tolerance_mm``
    (:mod:`auditkit.segmentation`, named in the ``segmentation_metrics`` finding); per class the
    mean over the cases where each is defined, ``performance.mean_dice`` the mean of the classes'
    mean Dice, intervals from one patient bootstrap. Cases with an empty reference, false positives
    on them and missed classes are counted (``case_counts``), the worst cases listed
    (``worst_cases``).

    Limitations: the intervals hold for the eval split as drawn; they say nothing of a population
    it does not represent. A multi-label model's figures for a label rest on the entries whose
    label is known; if the unknown entries are not missing at random (e.g. a finding left
    unlabelled when absent), they are biased. R² depends on the spread of the targets in the eval
    split as much as on the model; MAE and the limits of agreement do not.
    """

    id: ClassVar[str] = "performance"
    family: ClassVar[str] = "performance"
    Params = PerformanceParams
    needs: ClassVar[Needs] = Needs(predictions=True, images=True)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    emits: ClassVar[tuple[str, ...]] = (
        *(f"performance.{m}" for m in BINARY),
        "performance.claim_shortfall",
        "performance.macro_auroc",
        *(f"performance.{m}" for m in REGRESSION),
        *(f"performance.{m}" for m in SEGMENTATION),
    )

    def run(self, ctx: CheckContext, params: PerformanceParams) -> CheckResult:
        preds = ctx.predictions("eval")
        if preds.n == 0:
            raise Skip("no eval images")
        if ctx.task == "segmentation":
            return self._segmentation(ctx, params)
        finite = require_finite_logits(preds.logits)
        probs = np.asarray(preds.probs[finite], dtype=np.float64)
        patients = np.asarray(ctx.split("eval").patients, dtype=object)[finite]
        result = CheckResult()
        if not finite.all():
            result.findings.append({"kind": "non_finite_logits", "count": int((~finite).sum())})
        if ctx.task == "classification":
            labels = np.asarray(preds.labels[finite], dtype=np.int64)
            self._classification(ctx, params, probs, labels, patients, result)
            return result
        if ctx.task == "multilabel":
            labels = np.asarray(preds.labels[finite], dtype=np.int64)
            measure_multilabel(ctx, params.n_boot, probs, labels, patients, result)
        else:
            targets = np.asarray(preds.labels[finite], dtype=np.float64)
            measure_regression(ctx, params.n_boot, probs, targets, patients, result)
        result.findings.append(
            {
                "kind": "bootstrap",
                "unit": "patient" if any(p is not None for p in patients) else "image",
                "resampled": len(cluster_members(patients)),
                "n_boot": params.n_boot,
                "shared_by": "every label" if ctx.task == "multilabel" else "every output",
            }
        )
        return result

    def _segmentation(self, ctx: CheckContext, params: PerformanceParams) -> CheckResult:
        preds = ctx.predictions("eval")
        finite = np.isfinite(preds.logits.reshape(preds.n, -1).numpy()).all(axis=1)
        if not finite.any():
            raise Skip(f"the logits of every one of the {preds.n} eval images are non-finite")
        if not finite.all():
            raise Skip(
                f"{int((~finite).sum())} of {preds.n} eval images have non-finite logits; a segmentation's figures"
                " over the others would hide them"
            )
        result = CheckResult()
        patients = np.asarray(ctx.split("eval").patients, dtype=object)
        measure_segmentation(
            ctx, params.n_boot, params.tolerances(list(ctx.classes)), patients, result, params.overlay_cases
        )
        result.findings.append(
            {
                "kind": "bootstrap",
                "unit": "patient" if any(p is not None for p in patients) else "image",
                "resampled": len(cluster_members(patients)),
                "n_boot": params.n_boot,
                "shared_by": "every class and figure",
            }
        )
        return result

    def _classification(
        self,
        ctx: CheckContext,
        params: PerformanceParams,
        probs: NDArray[np.float64],
        labels: NDArray[np.int64],
        patients: NDArray[Any],
        result: CheckResult,
    ) -> None:
        classes = ctx.classes
        binary = len(classes) == 2 and ctx.positive_index is not None
        if binary:
            positive = ctx.positive_index
            assert positive is not None
            decision = Decision(positive, ctx.operating_point.get(classes[positive]))
        else:
            decision = Decision(None, None)

        # The estimate with scikit-learn's functions; the replicates with their weighted twins.
        estimates = dict(
            binary_metrics(probs, labels, decision) if binary else multiclass_metrics(probs, labels, decision)
        )
        unit = "patient" if any(p is not None for p in patients) else "image"
        replicates: dict[str, list[float]] = {key: [] for key in estimates}
        if params.n_boot and labels.size >= 2:
            for weights in cluster_weights(patients, params.n_boot, ctx.rng()):
                for key, values in weighted_classification(probs, labels, decision, weights).items():
                    replicates[key] += values.tolist()
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


def _claims(
    claims: dict[str, Any],
    estimates: dict[str, float],
    intervals: dict[str, tuple[float, float] | None],
    result: CheckResult,
) -> list[Metric]:
    """``performance.claim_shortfall`` per claim: claimed minus the upper end of the interval."""
    targets = [
        ClaimTarget(
            metric,
            float(claimed),
            estimates.get(metric.removeprefix("performance."), float("nan")),
            intervals.get(metric.removeprefix("performance.")),
        )
        for metric, claimed in sorted(claims.items())
    ]
    metrics: list[Metric] = judge_claims(targets, result)
    return metrics
