"""The parity check: does the artefact that ships behave like the model that was validated?

An exported artefact (an ONNX graph, a TorchScript file) is compared with ``model.reference``, the
PyTorch model it was exported from, on the same decoded images: the artefact's outputs come from
the shared pass, the reference's from one pass of its own over each split read (counted under
``reference:<split>`` in the run's statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs, Predictions
from auditkit.stats import median_centred_interval, stable_seed, wilson_interval
from auditkit.tasks import absolute_errors, label_aurocs, macro_auroc, mae_per_output, mean_dice

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = ["ParityCheck", "ParityParams", "decisions"]

FLIPPED_ROWS_SHOWN = 50


class ParityParams(CheckParams):
    n_boot: int = Field(default=1000, ge=0, le=100_000, description="paired bootstrap resamples of the metric deltas")
    flipped_rows: int = Field(
        default=FLIPPED_ROWS_SHOWN, ge=0, le=10_000, description="flipped rows listed in the finding (all are counted)"
    )


def decisions(
    probs: NDArray[Any], task: str, *, positive: int | None = None, thresholds: NDArray[np.float64] | None = None
) -> NDArray[Any]:
    """What the model decides from its scores: the class per image (a binary classifier's positive
    class at its operating point, else the argmax), each label's presence at its threshold
    (multilabel), the class of every voxel (segmentation). ``None`` for regression (no decision)."""
    if task == "multilabel":
        cut = np.full(probs.shape[1], 0.5) if thresholds is None else thresholds
        return np.asarray(probs >= cut[None, :])
    if task == "classification" and positive is not None and thresholds is not None:
        return np.where(probs[:, positive] >= thresholds[0], positive, 1 - positive)
    return np.asarray(probs.argmax(axis=1), dtype=np.int64)


class ParityCheck(Check[ParityParams]):
    """Parity of an exported artefact with the model it was exported from (``model.reference``).

    Method: both models see the same decoded, normalised images (the spec's normalisation; the
    reference may name its own). Per image the check compares what each model decides - the class
    (a binary classifier at its operating point), each label's presence at its threshold
    (multi-label), the class of every voxel (segmentation) - and the probabilities behind it.

    * ``parity.agreement``: the share of decisions the two models make alike (images; label
      decisions for multi-label models; voxels for segmentation), with a Wilson 95% interval over
      images for classification; per subgroup ``{group_by, group}`` (a quantised model that drifts
      on one site's images is a finding even when the overall agreement is high) and per
      out-of-distribution set ``{split}``.
    * ``parity.max_prob_diff``: the largest absolute difference of a probability (softmax,
      sigmoid, or per-voxel softmax) between the two, over every image and class; per OOD set.
    * ``parity.metric_delta`` ``{metric}``: the artefact's performance metric minus the
      reference's on the eval split, with a paired bootstrap 95% interval (the same resampled
      images for both, stratified by class; median-centred percentile, so the interval contains
      the delta): accuracy, balanced accuracy and AUROC (binary, or macro one-vs-rest) for a
      classifier, macro AUROC for a multi-label model, the mean Dice for segmentation, the MAE
      (in the output's unit; lower is better) for a regressor.

    A regressor makes no decision, so its agreement and probability difference are undefined
    with that reason; the ``output_difference`` finding gives the largest absolute difference of
    each output in its unit.

    Inputs: the eval split's (and OOD sets') predictions of the artefact (shared pass) and of the
    reference (``Needs(reference=True)``), labels and groups. Without ``model.reference`` the
    check is skipped with the reason.

    Findings: ``flipped_rows`` (the count of images whose decision differs, the first
    ``flipped_rows`` manifest rows with both decisions and the largest probability difference;
    segmentation: the cases with the most disagreeing voxels), ``flips_by_class`` (reference class
    -> artefact class counts), ``output_difference`` (regression), ``parity_bootstrap`` (resamples
    and strata).

    NIST AI RMF 1.0: MEASURE 2.5 (the deployed system is shown to be valid and reliable - the
    artefact is the system), MANAGE 4.1 (post-deployment monitoring needs the deployed artefact's
    behaviour tied to the validated one's). Packaged rules: PARITY-AGREEMENT, PARITY-GROUP-AGREEMENT,
    PARITY-PROB-DIFF, PARITY-METRIC-DELTA, applicable when the spec names ``model.reference``.
    """

    id: ClassVar[str] = "parity"
    family: ClassVar[str] = "parity"

    Params = ParityParams

    needs: ClassVar[Needs] = Needs(predictions=True, reference=True, ood=True)
    emits: ClassVar[tuple[str, ...]] = ("parity.agreement", "parity.max_prob_diff", "parity.metric_delta")
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)

    def run(self, ctx: CheckContext, params: ParityParams) -> CheckResult:
        """Compare the artefact's outputs with the reference's on every split read."""
        result = CheckResult()
        reference = ctx.reference_predictions("eval")
        artefact = ctx.predictions("eval")
        task = ctx.task
        positive, thresholds = _decision_rule(ctx)
        rows = np.asarray(ctx.split("eval").rows)
        if task == "regression":
            _regression(ctx, params, artefact, reference, result)
            return result
        a = decisions(artefact.probs, task, positive=positive, thresholds=thresholds)
        r = decisions(reference.probs, task, positive=positive, thresholds=thresholds)
        same = a == r
        result.metrics.append(_agreement(same, task))
        result.metrics.append(_max_prob_diff(artefact.probs, reference.probs))
        for column, groups in ctx.group_labels("eval").items():
            for group in sorted({str(g) for g in groups}):
                members = np.asarray([str(g) == group for g in groups])
                result.metrics.append(_agreement(same[members], task, {"group_by": column, "group": group}))
        for split in [s for s in ctx.split_names if s.startswith("ood:")]:
            other, other_reference = ctx.predictions(split), ctx.reference_predictions(split)
            agree = decisions(other.probs, task, positive=positive, thresholds=thresholds) == decisions(
                other_reference.probs, task, positive=positive, thresholds=thresholds
            )
            result.metrics.append(_agreement(agree, task, {"split": split}))
            result.metrics.append(_max_prob_diff(other.probs, other_reference.probs, {"split": split}))
        result.metrics += _metric_deltas(ctx, params, artefact, reference, a, r)
        result.findings += _flips(task, same, a, r, artefact.probs, reference.probs, rows, list(ctx.classes), params)
        return result


# --------------------------------------------------------------------------------------------
# Decisions and agreement


def _decision_rule(ctx: CheckContext) -> tuple[int | None, NDArray[np.float64] | None]:
    """The positive class and thresholds the spec's operating point sets (``None`` where absent)."""
    point = ctx.operating_point
    classes = list(ctx.classes)
    if ctx.task == "multilabel":
        return None, np.asarray([point.get(name, 0.5) for name in classes], dtype=np.float64)
    positive = ctx.positive_index
    if ctx.task == "classification" and positive is not None and classes[positive] in point:
        return positive, np.asarray([point[classes[positive]]], dtype=np.float64)
    return None, None


def _agreement(same: NDArray[np.bool_], task: str, labels: dict[str, str] | None = None) -> Metric:
    n = int(same.shape[0])
    if n == 0:
        return Metric("parity.agreement", None, "higher_is_better", labels=labels or {}, n=0, reason="no image")
    value = float(same.mean())
    # Images are the independent units: an interval for one decision per image only.
    ci = wilson_interval(int(same.sum()), n) if task == "classification" else None
    return Metric("parity.agreement", value, "higher_is_better", labels=labels or {}, ci=ci, n=n)


def _max_prob_diff(a: NDArray[Any], r: NDArray[Any], labels: dict[str, str] | None = None) -> Metric:
    n = int(a.shape[0])
    if n == 0:
        return Metric("parity.max_prob_diff", None, "lower_is_better", labels=labels or {}, n=0, reason="no image")
    # Per-image scores at once; a segmentation model's maps one case at a time (bounded memory).
    step = n if np.ndim(a) == 2 else 1
    largest = 0.0
    for i in range(0, n, step):
        difference = np.abs(
            np.asarray(a[i : i + step], dtype=np.float64) - np.asarray(r[i : i + step], dtype=np.float64)
        )
        largest = max(largest, float(np.nanmax(difference)) if np.isfinite(difference).any() else math.inf)
    return Metric("parity.max_prob_diff", largest, "lower_is_better", labels=labels or {}, n=n)


# --------------------------------------------------------------------------------------------
# Metric deltas with a paired bootstrap


def _weights(n: int, n_boot: int, rng: np.random.Generator, strata: NDArray[Any] | None) -> NDArray[np.float64]:
    """``(n_boot, n)`` resample counts, stratified (each stratum keeps its size)."""
    weights = np.zeros((n_boot, n))
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for members in groups:
        draws = rng.integers(0, members.size, size=(n_boot, members.size))
        np.add.at(weights, (np.arange(n_boot)[:, None], members[draws]), 1.0)
    return weights


def _metric_deltas(
    ctx: CheckContext,
    p: ParityParams,
    artefact: Predictions,
    reference: Predictions,
    a: NDArray[Any],
    r: NDArray[Any],
) -> list[Metric]:
    task = ctx.task
    labels = np.asarray(artefact.labels)
    known = _labelled(labels, task)
    if not known.any():
        reason = "the eval split has no labels to score either model against"
        return [Metric("parity.metric_delta", None, "higher_is_better", labels={"metric": "accuracy"}, reason=reason)]
    figures = _figures(ctx, artefact, reference, a, r)
    strata = labels if task == "classification" else None
    rng = np.random.default_rng(stable_seed(ctx.seed("parity"), "bootstrap"))
    weights = _weights(labels.shape[0], p.n_boot, rng, strata) if p.n_boot and labels.shape[0] > 1 else None
    metrics = []
    for name, score in figures.items():
        value_a, value_r = score(artefact, a, None), score(reference, r, None)
        if value_a is None or value_r is None:
            reason = f"{name} is undefined on the eval split (a class or label without images)"
            metrics.append(
                Metric("parity.metric_delta", None, "higher_is_better", labels={"metric": name}, reason=reason)
            )
            continue
        delta = value_a - value_r
        ci = None
        if weights is not None:
            replicates = []
            for w in weights:
                ra, rr = score(artefact, a, w), score(reference, r, w)
                if ra is not None and rr is not None:
                    replicates.append(ra - rr)
            if replicates:
                ci = median_centred_interval(np.asarray(replicates), delta)
        metrics.append(
            Metric("parity.metric_delta", delta, "higher_is_better", labels={"metric": name}, ci=ci, n=int(known.sum()))
        )
    return metrics


def _labelled(labels: NDArray[Any], task: str) -> NDArray[np.bool_]:
    if task == "multilabel":
        return np.asarray((labels >= 0).any(axis=1))
    if task == "segmentation":
        return np.asarray((labels.reshape(labels.shape[0], -1) >= 0).any(axis=1))
    return np.asarray(labels >= 0)


Score = Callable[[Predictions, NDArray[Any], "NDArray[np.float64] | None"], "float | None"]


def _figures(
    ctx: CheckContext, artefact: Predictions, reference: Predictions, a: NDArray[Any], r: NDArray[Any]
) -> dict[str, Score]:
    """The performance figures compared, each ``(predictions, decisions, resample weights) -> value``."""
    task = ctx.task
    labels = np.asarray(artefact.labels)
    if task == "classification":
        k = len(ctx.classes)
        known = labels >= 0

        def accuracy(pred: Predictions, d: NDArray[Any], w: NDArray[np.float64] | None) -> float | None:
            weight = (np.ones(labels.shape[0]) if w is None else w) * known
            return float((weight * (d == labels)).sum() / weight.sum()) if weight.sum() else None

        def balanced(pred: Predictions, d: NDArray[Any], w: NDArray[np.float64] | None) -> float | None:
            weight = (np.ones(labels.shape[0]) if w is None else w) * known
            recalls = []
            for c in range(k):
                mass = (weight * (labels == c)).sum()
                if mass:
                    recalls.append((weight * ((labels == c) & (d == c))).sum() / mass)
            return float(np.mean(recalls)) if recalls else None

        def auroc(pred: Predictions, d: NDArray[Any], w: NDArray[np.float64] | None) -> float | None:
            from sklearn.metrics import roc_auc_score

            weight = (np.ones(labels.shape[0]) if w is None else w)[known]
            truth, probs = labels[known], np.asarray(pred.probs)[known]
            present = np.unique(truth[weight > 0])
            if present.size < k:
                return None
            if k == 2:
                return float(roc_auc_score(truth, probs[:, 1], sample_weight=weight))
            return float(
                roc_auc_score(
                    truth, probs, sample_weight=weight, multi_class="ovr", average="macro", labels=list(range(k))
                )
            )

        return {"accuracy": accuracy, "balanced_accuracy": balanced, "auroc": auroc}
    if task == "multilabel":
        names = list(ctx.classes)

        def macro(pred: Predictions, d: NDArray[Any], w: NDArray[np.float64] | None) -> float | None:
            if w is None:
                value, _ = macro_auroc(label_aurocs(np.asarray(pred.probs), labels, names))
                return value
            rows = np.repeat(np.arange(labels.shape[0]), w.astype(np.int64))
            value, _ = macro_auroc(label_aurocs(np.asarray(pred.probs)[rows], labels[rows], names))
            return value

        return {"macro_auroc": macro}
    if task == "segmentation":
        from auditkit.segmentation import case_figures

        n_classes = len(ctx.classes)
        spacing = np.ones((labels.shape[0], labels.ndim - 1))
        dice_a = case_figures(a, labels, spacing, n_classes, figures=("dice",))["dice"]
        dice_r = case_figures(r, labels, spacing, n_classes, figures=("dice",))["dice"]

        def dice(pred: Predictions, d: NDArray[Any], w: NDArray[np.float64] | None) -> float | None:
            per_case = dice_a if pred is artefact else dice_r
            if w is None:
                return mean_dice(per_case)
            rows = np.repeat(np.arange(labels.shape[0]), w.astype(np.int64))
            return mean_dice(per_case[rows])

        return {"mean_dice": dice}
    return {}


# --------------------------------------------------------------------------------------------
# Regression and the findings


def _regression(
    ctx: CheckContext, p: ParityParams, artefact: Predictions, reference: Predictions, result: CheckResult
) -> None:
    reason = "a regressor makes no decision and has no probabilities; see the output_difference finding"
    result.metrics.append(Metric("parity.agreement", None, "higher_is_better", reason=reason))
    result.metrics.append(Metric("parity.max_prob_diff", None, "lower_is_better", reason=reason))
    names = list(ctx.classes)
    a, r = np.asarray(artefact.probs, dtype=np.float64), np.asarray(reference.probs, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        largest = np.nanmax(np.abs(a - r), axis=0) if a.size else np.zeros(len(names))
    result.findings.append(
        {
            "kind": "output_difference",
            "largest_absolute": {name: float(v) for name, v in zip(names, largest, strict=True)},
            "units": dict(ctx.units),
        }
    )
    targets = np.asarray(artefact.labels, dtype=np.float64)
    errors_a, errors_r = absolute_errors(a, targets), absolute_errors(r, targets)
    mae_a, mae_r = mae_per_output(errors_a), mae_per_output(errors_r)
    if not (np.isfinite(mae_a).all() and np.isfinite(mae_r).all()):
        reason = "the eval split has no known target to score the MAE against"
        result.metrics.append(
            Metric("parity.metric_delta", None, "lower_is_better", labels={"metric": "mae"}, reason=reason)
        )
        return
    delta = float(mae_a.mean() - mae_r.mean())
    ci = None
    n = targets.shape[0]
    if p.n_boot and n > 1:
        rng = np.random.default_rng(stable_seed(ctx.seed("parity"), "bootstrap"))
        weights = _weights(n, p.n_boot, rng, None)
        known_a, known_r = np.isfinite(errors_a), np.isfinite(errors_r)
        values_a = weights @ np.where(known_a, errors_a, 0.0) / np.maximum(weights @ known_a, 1e-12)
        values_r = weights @ np.where(known_r, errors_r, 0.0) / np.maximum(weights @ known_r, 1e-12)
        ci = median_centred_interval(values_a.mean(axis=1) - values_r.mean(axis=1), delta)
    result.metrics.append(Metric("parity.metric_delta", delta, "lower_is_better", labels={"metric": "mae"}, ci=ci, n=n))


def _flips(
    task: str,
    same: NDArray[np.bool_],
    a: NDArray[Any],
    r: NDArray[Any],
    probs_a: NDArray[Any],
    probs_r: NDArray[Any],
    rows: NDArray[np.int64],
    classes: list[str],
    p: ParityParams,
) -> list[dict[str, Any]]:
    n = same.shape[0]
    if task == "segmentation":
        share = 1.0 - same.reshape(n, -1).mean(axis=1)
        order = np.argsort(-share, kind="stable")
        cases = [
            {"row": int(rows[i]), "disagreeing_voxels": round(float(share[i]), 6)}
            for i in order[: p.flipped_rows]
            if share[i] > 0
        ]
        return [
            {
                "kind": "flipped_rows",
                "count": int((share > 0).sum()),
                "of": n,
                "unit": "cases with a voxel decided otherwise",
                "rows": cases,
            }
        ]
    flipped = ~same if task == "classification" else ~same.all(axis=1)
    listed = []
    for i in np.flatnonzero(flipped)[: p.flipped_rows]:
        entry: dict[str, Any] = {
            "row": int(rows[i]),
            "max_prob_diff": round(float(np.abs(np.asarray(probs_a[i]) - np.asarray(probs_r[i])).max()), 6),
        }
        if task == "classification":
            entry["reference"], entry["artefact"] = classes[int(r[i])], classes[int(a[i])]
        else:
            entry["labels"] = [classes[k] for k in np.flatnonzero(a[i] != r[i])]
        listed.append(entry)
    findings: list[dict[str, Any]] = [
        {"kind": "flipped_rows", "count": int(flipped.sum()), "of": n, "unit": "images", "rows": listed}
    ]
    if task == "classification":
        pairs: dict[str, int] = {}
        for i in np.flatnonzero(flipped):
            key = f"{classes[int(r[i])]} -> {classes[int(a[i])]}"
            pairs[key] = pairs.get(key, 0) + 1
        findings.append({"kind": "flips_by_class", "counts": pairs})
    return findings
