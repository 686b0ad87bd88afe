"""The calibration check: does the model's confidence match how often it is right?

The numbers are computed by plain functions in :mod:`.metrics`, :mod:`.binary` (one sigmoid
output), :mod:`.temperature` and :mod:`.plots` (testable without the engine);
:class:`CalibrationCheck` applies them to the eval split, overall and per subgroup, and per label
for a multi-label model (:mod:`.multilabel`), per class within a region of interest for a
segmentation model (:mod:`.segmentation`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs
from auditkit.checks.calibration.binary import binary_calibration_metrics, binary_expected_calibration_error
from auditkit.checks.calibration.metrics import (
    METRIC_NAMES,
    FloatArray,
    _Statistics,
    _to_numpy,
    adaptive_calibration_error,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from auditkit.checks.calibration.multilabel import run_multilabel
from auditkit.checks.calibration.plots import class_reliability_grid, label_reliability_grid, reliability_diagram
from auditkit.checks.calibration.segmentation import region_of_interest, run_segmentation, segmentation_tables
from auditkit.checks.calibration.temperature import (
    ALREADY_CALIBRATED,
    FOLD_DISAGREEMENT,
    TEMPERATURE_BOUNDS,
    cross_fitted_binary_temperature_probs,
    cross_fitted_temperature_probs,
    did_not_help_record,
    fit_binary_temperature,
    fit_temperature,
)
from auditkit.errors import InputError
from auditkit.stats import bootstrap_cis, stable_seed

if TYPE_CHECKING:
    from auditkit.check import CheckContext


__all__ = [
    "ALREADY_CALIBRATED",
    "FOLD_DISAGREEMENT",
    "TEMPERATURE_BOUNDS",
    "CalibrationCheck",
    "adaptive_calibration_error",
    "binary_calibration_metrics",
    "binary_expected_calibration_error",
    "brier_score",
    "calibration_metrics",
    "class_reliability_grid",
    "cross_fitted_binary_temperature_probs",
    "cross_fitted_temperature_probs",
    "did_not_help_record",
    "expected_calibration_error",
    "fit_binary_temperature",
    "fit_temperature",
    "label_reliability_grid",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "region_of_interest",
    "reliability_diagram",
    "segmentation_tables",
    "temperature_did_not_help",
]

# --------------------------------------------------------------------------------------------
# The check

REGRESSION_REASON = (
    "calibration of a regressor is the coverage of its predictive intervals (the nominal 90% interval"
    " should hold the target 90% of the time), which needs a predicted variance per output; this spec"
    " version has no key naming a variance output, so the model's outputs are predicted values only"
)
"""Why :class:`CalibrationCheck` does not measure ``model.task: regression`` (the runner's skip reason)."""


class CalibrationParams(CheckParams):
    """Parameters of :class:`CalibrationCheck`.

    Attributes:
        bins: equal-width confidence bins of ECE, MCE and the reliability diagram.
        adaptive_bins: equal-mass bins of ACE; ``None`` uses ``bins``.
        n_boot: bootstrap resamples per interval; 0 disables intervals.
        temperature_folds: folds of the cross-fitted temperature scaling.
        min_group_size: subgroups with fewer images get values but no interval (segmentation:
            fewer cases).
        roi_margin_px: segmentation: the margin, in voxels (pixels) of the model grid, by which
            each class's region of interest extends beyond the union of the reference's and the
            prediction's voxels of the class (Euclidean distance between voxel centres; 0: the
            union itself).
        roi_margin_mm: segmentation: the margin in millimetres instead, with each case's voxel
            spacing (anisotropic volumes get a physically round region); replaces
            ``roi_margin_px`` when set.
    """

    bins: int = Field(default=15, ge=2, le=1000)
    adaptive_bins: int | None = Field(default=None, ge=2, le=1000)
    n_boot: int = Field(default=1000, ge=0, le=100_000)
    temperature_folds: int = Field(default=5, ge=2, le=20)
    min_group_size: int = Field(default=10, ge=2)
    roi_margin_px: int = Field(default=5, ge=0, le=1000)
    roi_margin_mm: float | None = Field(default=None, ge=0.0, le=1000.0)


class CalibrationCheck(Check[CalibrationParams]):
    """Calibration of predicted probabilities: ECE, MCE, ACE, Brier, NLL, temperature scaling.

    Method (classification; multi-label models below): the top-label confidence (largest
    softmax probability) is compared with accuracy in confidence bins. ECE (expected calibration
    error) and MCE (maximum calibration error) use equal-width bins (Naeini et al. 2015,
    "Obtaining Well Calibrated Probabilities Using Bayesian Binning", AAAI); ACE uses equal-mass
    bins (Nixon et al. 2019, "Measuring Calibration in Deep Learning", CVPR workshops); the Brier
    score and negative log-likelihood are proper scoring rules. Temperature scaling (Guo et al. 2017,
    "On Calibration of Modern Neural Networks", ICML) is fitted by maximum likelihood on the eval
    split; its effect is measured by stratified K-fold cross-fitting, so the after-scaling ECE is
    never measured on the data its temperature was fitted on. Intervals are 95% bootstraps
    stratified by class (the class counts of the split are kept in every resample): the
    median-centred percentile interval of :mod:`auditkit.stats`, because the calibration errors
    are biased under resampling (a resample's ECE exceeds the sample's, most of all near zero,
    where a plain percentile interval can lie entirely above the estimate); it always contains
    the value, and equals the percentile interval when the resampling is unbiased. The
    after-scaling interval holds the fold temperatures fixed.

    Inputs: eval-split logits and labels (``Needs(predictions=True)``); the spec's subgroup
    columns. Rows whose logits are not finite are excluded and counted.

    Metrics (all ``lower_is_better``, each with ``n`` and ``ci``):
        ``calibration.ece``, ``.mce``, ``.ace``, ``.brier``, ``.nll`` overall (``labels={}``) and
        per subgroup (``{"group_by": column, "group": value}``; groups smaller than
        ``min_group_size`` get no interval); ``calibration.ece_after_temperature`` overall.

    Findings: ``temperature_scaling`` (temperature fitted on the whole eval split, per-fold
    temperatures, folds); ``temperature_scaling_did_not_help`` when the cross-fitted
    ``ece_after_temperature`` exceeds ``ece`` (both values, the increase and its paired
    bootstrap interval, the temperatures, and the likely causes, see Limitations);
    ``non_finite_logits`` (count) when some logits are NaN or infinite.

    Artifacts: ``reliability_diagram`` (SVG).

    Multi-label models (``model.task: multilabel``, :mod:`.multilabel`): each label's sigmoid
    output is a binary classifier, measured on that label's known entries only (an unknown
    entry, empty in the manifest, is left out and counted in an ``unknown_entries`` finding).
    The convention is the positive-class one of :mod:`.binary` (within a bin of predicted
    probabilities, is the finding present as often as predicted? netcal's binary ECE), not the
    top-label one. Metrics, with ``labels={"label": name}``: ``calibration.ece``, ``.mce``,
    ``.ace``, ``.brier`` (scikit-learn's ``brier_score_loss``), ``.nll`` (its ``log_loss``) and
    ``.ece_after_temperature`` (one temperature per label, ``sigmoid(z / T)``, cross-fitted over
    folds stratified by the label's outcome, as above); per label and subgroup
    (``{"label", "group_by", "group"}``) ``calibration.ece`` and ``.brier`` only, to keep the
    table a reviewer reads at labels x groups. There is no unlabelled aggregate: a mean over
    labels would hide the one label that is off, so a policy judges each label (a rule with
    ``labels: {label: "*"}`` reads the worst one). Intervals resample patients when the manifest
    names them (a patient's images together; ``bootstrap`` finding), else images stratified by the
    label's outcome. A label whose entries are all unknown gets undefined metrics with that
    reason; a label without a positive (or negative) entry keeps its ECE, Brier and NLL (they
    measure how far its probabilities are from 0 or 1) but gets no temperature. Findings as
    above with a ``label`` key; the reliability diagram has one panel per label.

    Segmentation models (``model.task: segmentation``, 2-D and 3-D; :mod:`.segmentation`): most
    voxels are background called background with certainty, which would swamp any voxel-level
    error, so each foreground class is measured within its region of interest (ROI): per case,
    the union of the reference's and the prediction's voxels of the class grown by
    ``roi_margin_px`` voxels (or ``roi_margin_mm`` millimetres with the case's spacing),
    Euclidean distance. Within it the class's softmax probability is a binary forecast of
    ``reference == class`` (the positive-class convention above): ``calibration.ece``, ``.mce``,
    ``.brier``, ``.nll`` with ``labels={"class": name}`` (equal to netcal's binary ECE and MCE and
    scikit-learn's Brier score and log loss on the concatenated ROI voxels), ``n`` the ROI voxels;
    per class and subgroup (``{"class", "group_by", "group"}``) ``.ece`` and ``.brier``; and the
    class-agnostic top-label ``calibration.ece`` and ``.mce`` (``labels={}``, largest probability
    against ``argmax == reference``) within the union of every class's ROI. A case where a class is
    in neither map adds no ROI; a class without ROI voxels in any case is undefined with that
    reason. One streaming pass keeps per-case sums of each bin (an ``(N, bins)`` table per class),
    never an array of all voxels; intervals resample patients (cases when unknown) by weighting
    the per-case tables, an exact bootstrap of the voxel-level metrics. ACE and
    ``ece_after_temperature`` are not measured (``not_measured`` finding with the reasons).
    Findings: ``segmentation_calibration`` (ROI definition, margin, per class the cases with an
    ROI and its voxels), ``bootstrap``, ``non_finite_logits`` (cases left out). Artifact:
    ``reliability_diagram``, one panel per foreground class from the summed bin tables.
    Limitation: the ROI depends on the prediction, so two models are compared on different
    voxels; a model that over-segments widely widens its own ROI with confidently wrong voxels
    (which the ECE then sees), while one that misses a lesion entirely is measured around the
    reference only.

    Regression models are not measured (skipped by the runner with :data:`REGRESSION_REASON`):
    the calibration of a regressor is the coverage of its predictive intervals, which needs a
    predicted variance that this version's spec cannot name.

    Limitations: ``ece_after_temperature`` can exceed ``ece``. Temperature scaling minimises the
    NLL, not the ECE, and one temperature cannot repair a miscalibration that differs between
    confidence levels or classes. A model that is already calibrated (fitted temperature near 1)
    has nothing to gain, while cross-fitting still adds the noise of K temperatures, each fitted
    on (K - 1)/K of a small split; and the ECE of equal-width bins has a noise floor of its own
    (its value moves by about its interval's width between resamples). The
    ``temperature_scaling_did_not_help`` finding names which of these apply; read the two ECEs
    with their intervals, and the increase with its paired interval, before concluding that
    scaling would harm the model.

    NIST AI RMF 1.0: MEASURE 2.5 (validity and reliability: confidence that means what it says),
    MEASURE 2.6 (safe failure: overconfident errors are the unsafe ones), MEASURE 2.11 (fairness:
    calibration per subgroup).
    """

    id: ClassVar[str] = "calibration"
    family: ClassVar[str] = "calibration"

    Params = CalibrationParams

    needs: ClassVar[Needs] = Needs(predictions=True)
    emits: ClassVar[tuple[str, ...]] = (
        *(f"calibration.{name}" for name in METRIC_NAMES),
        "calibration.ece_after_temperature",
    )
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    task_reasons: ClassVar[dict[str, str]] = {"regression": REGRESSION_REASON}

    def run(self, ctx: CheckContext, params: CalibrationParams) -> CheckResult:
        """Measure calibration on the eval split, overall and per subgroup (per label: multilabel;
        per class within its region of interest: segmentation)."""
        if ctx.task == "multilabel":
            per_label: CheckResult = run_multilabel(ctx, params)
            return per_label
        if ctx.task == "segmentation":
            per_class: CheckResult = run_segmentation(ctx, params)
            return per_class
        p = params
        result = CheckResult()
        preds = ctx.predictions("eval")
        seed_root = int(ctx.rng().integers(0, 2**63 - 1))
        if preds.n == 0:
            result.metrics += _undefined_scope("no eval images", 0, {})
            result.metrics.append(_undefined_after("no eval images", 0))
            return result

        logits, probs, labels = _eval_arrays(preds)
        finite = np.asarray(np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1))
        n_finite = int(finite.sum())
        if n_finite < len(labels):
            result.findings.append({"kind": "non_finite_logits", "split": "eval", "count": len(labels) - n_finite})

        # Overall, then the eval split cut by every subgroup column.
        overall = _scope_metrics(
            probs,
            labels,
            finite,
            {},
            p,
            total=len(labels),
            min_size=2,
            seed=stable_seed(seed_root, "overall"),
        )
        result.metrics += overall
        after = _after_temperature(logits[finite], probs[finite], labels[finite], p, seed_root)
        result.metrics.append(after.metric)
        result.findings += after.findings
        for column, values in sorted(ctx.group_labels("eval").items()):
            values = np.asarray(values).astype(str)
            if values.shape != labels.shape:
                raise InputError(
                    f"group column {column!r} has {values.shape[0]} labels for {labels.shape[0]} eval images"
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
            result.artifacts.append(
                ctx.write_artifact(
                    "reliability_diagram",
                    "reliability.svg",
                    lambda path: reliability_diagram(
                        probs[finite], labels[finite], p.bins, path, probs_after=after.probs_after
                    ),
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
    findings: list[dict[str, Any]]
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
        raise InputError(f"eval labels must be {n} integer class indices, got {labels.dtype} {labels.shape}")
    n_classes = probs.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise InputError(
            f"eval labels must be class indices in [0, {n_classes}), got values from {labels.min()} to {labels.max()}"
        )
    return logits, probs, labels.astype(np.intp)


def _scope_metrics(
    probs: FloatArray,
    labels: NDArray[np.intp],
    mask: NDArray[np.bool_],
    scope: dict[str, str],
    p: CalibrationParams,
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
            estimates=values,
            bounds=_metric_bounds(probs.shape[1]),
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


def _metric_bounds(n_classes: int) -> dict[str, tuple[float, float]]:
    """The range of each metric, which cuts its interval (see :mod:`auditkit.stats`)."""
    return {
        "ece": (0.0, 1.0),
        "mce": (0.0, 1.0),
        "ace": (0.0, 1.0),
        "brier": (0.0, 1.0 if n_classes == 2 else 2.0),
        "nll": (0.0, math.inf),
    }


def _after_temperature(
    logits: FloatArray,
    probs: FloatArray,
    labels: NDArray[np.intp],
    p: CalibrationParams,
    seed_root: int,
) -> _AfterTemperature:
    """Cross-fitted ECE after temperature scaling and its ``temperature_scaling`` finding.

    ``probs`` are the same rows' probabilities before scaling (those of ``calibration.ece``);
    when the ECE after scaling exceeds theirs, a ``temperature_scaling_did_not_help`` finding
    follows.
    """
    n = logits.shape[0]
    if n == 0:
        return _AfterTemperature(_undefined_after("the logits of all eval images are non-finite", 0), [])
    if n < p.temperature_folds:
        reason = f"{n} images are too few for {p.temperature_folds}-fold cross-fitted temperature scaling"
        return _AfterTemperature(_undefined_after(reason, n), [])
    probs_after, fold_temperatures = cross_fitted_temperature_probs(
        logits,
        labels,
        p.temperature_folds,
        rng=np.random.default_rng(stable_seed(seed_root, "temperature_folds")),
    )
    temperature = fit_temperature(logits, labels)
    findings: list[dict[str, Any]] = [
        {
            "kind": "temperature_scaling",
            "temperature": temperature,
            "fold_temperatures": fold_temperatures,
            "folds": p.temperature_folds,
            "bounds": list(TEMPERATURE_BOUNDS),
        }
    ]
    after = _Statistics(probs_after, labels, p.bins, p.bins)
    value = float(after.ece(after.identity())[0])
    ci = bootstrap_cis(
        {"ece": after.ece},
        n,
        n_boot=p.n_boot,
        strata=labels,
        rng=np.random.default_rng(stable_seed(seed_root, "after_temperature")),
        estimates={"ece": value},
        bounds=(0.0, 1.0),
    )["ece"]
    metric = Metric("calibration.ece_after_temperature", value, "lower_is_better", ci=ci, n=n)
    if value > expected_calibration_error(probs, labels, p.bins):
        findings.append(
            temperature_did_not_help(
                probs,
                probs_after,
                labels,
                temperature,
                fold_temperatures,
                bins=p.bins,
                n_boot=p.n_boot,
                rng=np.random.default_rng(stable_seed(seed_root, "temperature_difference")),
            )
        )
    return _AfterTemperature(metric, findings, probs_after)


def temperature_did_not_help(
    probs_before: FloatArray,
    probs_after: FloatArray,
    labels: NDArray[np.intp],
    temperature: float,
    fold_temperatures: list[float],
    *,
    bins: int,
    n_boot: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The ``temperature_scaling_did_not_help`` finding: the ECE rose after temperature scaling.

    The increase ``ECE_after - ECE_before`` gets a paired bootstrap interval (both ECEs on the
    same resamples, stratified by class, fold temperatures fixed), and the finding names the
    likely causes that the numbers support:

    * ``already_calibrated``: the temperature fitted on the whole split is within a factor
      :data:`ALREADY_CALIBRATED` of 1, so scaling has little to fix;
    * ``cross_fitting_noise``: the fold temperatures differ by more than a factor
      :data:`FOLD_DISAGREEMENT` (each is fitted on ``(K - 1)/K`` of the split), so the held-out
      folds are scaled by temperatures that disagree;
    * ``ece_binning_noise``: the paired interval of the increase contains 0, so the rise is within
      the resampling noise of two binned ECEs;
    * ``not_uniform_miscalibration``: none of the above; one temperature, fitted to the NLL,
      cannot repair a miscalibration that differs between confidence levels or classes.

    Args:
        probs_before: the eval rows' probabilities before scaling, ``(N, K)``.
        probs_after: the same rows' cross-fitted, temperature-scaled probabilities.
        labels: the rows' classes, ``(N,)`` (also the resampling strata).
        temperature: the temperature fitted on the whole split.
        fold_temperatures: the temperature of each fold.
        bins: equal-width bins of the ECE.
        n_boot: resamples of the paired interval (0: none).
        rng: the generator of the resamples.

    Returns:
        The finding.
    """
    before = _Statistics(probs_before, labels, bins, bins)
    after = _Statistics(probs_after, labels, bins, bins)
    identity = before.identity()
    ece_before = float(before.ece(identity)[0])
    ece_after = float(after.ece(identity)[0])
    increase = ece_after - ece_before
    interval = bootstrap_cis(
        {"increase": lambda idx: after.ece(idx) - before.ece(idx)},
        before.n,
        n_boot=n_boot,
        rng=rng,
        strata=labels,
        estimates={"increase": increase},
        bounds=(-1.0, 1.0),
    )["increase"]
    finding: dict[str, Any] = did_not_help_record(
        ece_before,
        ece_after,
        interval,
        temperature,
        fold_temperatures,
        n=before.n,
        bins=before.bins,
    )
    return finding
