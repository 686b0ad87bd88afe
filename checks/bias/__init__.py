"""The bias check: does the model perform equally well for every patient group?

The numbers come from plain functions in :mod:`.metrics` (per-group metrics through fairlearn's
``MetricFrame``), :mod:`.gaps` (gaps, equalized odds, demographic parity and their intervals),
:mod:`.multilabel` (per-label metrics and underdiagnosis of a multi-label model),
:mod:`.regression` (per-group errors of a regression model), :mod:`.segmentation` (per-group
Dice and HD95 of a segmentation model), :mod:`.resample` (their bootstrap over patients) and
:mod:`.plots` (the forest plot and the label x group heat map), testable without the engine;
:class:`BiasCheck` applies them to the eval split, for every group column of the spec and every
pairwise intersection of two; :mod:`.records` turns the multi-label, regression and segmentation
analyses into metrics and findings.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from auditkit.check import Artifact, Check, CheckParams, CheckResult, Direction, Metric, Needs, Skip
from auditkit.checks.bias import records
from auditkit.checks.bias.gaps import (
    Gap,
    GroupedValues,
    GroupingAnalysis,
    GroupSummary,
    analyse_grouping,
    bootstrap_group_metrics,
    gap_interval,
)
from auditkit.checks.bias.metrics import (
    GAP_METRICS,
    GROUP_METRICS,
    INTERSECTION_SEPARATOR,
    LOWER_IS_BETTER,
    Outcomes,
    batched_group_metrics,
    count_text,
    intersect,
    metric_frame,
)
from auditkit.checks.bias.multilabel import (
    UNDERDIAGNOSIS,
    LabelOutcomes,
    MultilabelAnalysis,
    analyse_multilabel_grouping,
)
from auditkit.checks.bias.plots import FOREST_METRICS, forest_plot, label_heatmap
from auditkit.checks.bias.regression import (
    REGRESSION_GAP_METRICS,
    REGRESSION_GROUP_METRICS,
    RegressionAnalysis,
    TargetOutcomes,
    analyse_regression_grouping,
    batched_errors,
)
from auditkit.checks.bias.segmentation import (
    SEGMENTATION_METRICS,
    CaseOutcomes,
    SegmentationAnalysis,
    analyse_segmentation_grouping,
    whole_split_means,
)
from auditkit.errors import ConfigError, InputError
from auditkit.segmentation import implementation
from auditkit.stats import stable_seed

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = [
    "FOREST_METRICS",
    "GAP_METRICS",
    "GROUP_METRICS",
    "INTERSECTION_SEPARATOR",
    "REGRESSION_GAP_METRICS",
    "REGRESSION_GROUP_METRICS",
    "SEGMENTATION_METRICS",
    "UNDERDIAGNOSIS",
    "BiasCheck",
    "CaseOutcomes",
    "Gap",
    "GroupSummary",
    "GroupingAnalysis",
    "LabelOutcomes",
    "MultilabelAnalysis",
    "Outcomes",
    "RegressionAnalysis",
    "SegmentationAnalysis",
    "TargetOutcomes",
    "analyse_grouping",
    "analyse_multilabel_grouping",
    "analyse_regression_grouping",
    "analyse_segmentation_grouping",
    "batched_group_metrics",
    "bootstrap_group_metrics",
    "count_text",
    "forest_plot",
    "gap_interval",
    "intersect",
    "metric_frame",
]


class BiasParams(CheckParams):
    """Parameters of :class:`BiasCheck`.

    Attributes:
        min_group_size: groups with fewer images are reported as insufficient, not measured.
        n_boot: bootstrap resamples per grouping; 0 disables intervals.
        intersections: also analyse every pairwise intersection of two group columns.
        bins: equal-width confidence bins of the per-group ECE.
        max_groups: a grouping with more groups than this is skipped with a finding (an
            unbanded numeric column would otherwise make one group per value).
        no_finding: multi-label models only: the label that means "no finding" (CheXpert's
            ``No Finding``), one of ``model.classes``. With it, underdiagnosis is that label's
            false-positive rate, as Seyyed-Kalantari et al. measure it; without it, an image
            is called finding-free when every label stays below its threshold.
    """

    min_group_size: int = Field(default=30, ge=1)
    n_boot: int = Field(default=1000, ge=0, le=100_000)
    intersections: bool = True
    bins: int = Field(default=15, ge=1, le=1000)
    max_groups: int = Field(default=64, ge=2, le=10_000)
    no_finding: str | None = Field(default=None, min_length=1)


class BiasCheck(Check[BiasParams]):
    """Subgroup performance and bias: per-group metrics, gaps with intervals, equalized odds.

    Method: the eval split is cut by every group column of the spec (``data.groups``: sex,
    banded age, site, scanner, ...) and, with ``intersections``, by every pair of columns
    (``group_by: "sex×site"``, groups such as ``"F×A"``; the separator is U+00D7 MULTIPLICATION
    SIGN). Per group, fairlearn's ``MetricFrame`` (Weerts et al. 2023, JMLR) gives n,
    prevalence, accuracy, sensitivity, specificity, PPV, NPV, selection rate, AUROC and the
    top-label ECE. Per grouping: the largest between-group gap of each metric; the
    equalized-odds difference (Hardt, Price & Srebro 2016, "Equality of Opportunity in
    Supervised Learning", NeurIPS: the larger of the TPR and FPR gaps) and the demographic-parity
    difference (selection-rate gap), as ``fairlearn.metrics`` defines them; the smallest group's
    size. Intervals come from one seeded bootstrap per grouping, stratified by group and class:
    per group the median-centred percentile interval of :mod:`auditkit.stats` (a group's ECE and
    ratios are biased under resampling; this interval always contains the value and is the
    percentile interval when the resampling is unbiased), and for gaps the simultaneous max-type
    interval of all pairwise differences (Beran 1988; Westfall & Young 1993), because the
    percentile interval of ``max - min`` is biased upwards and would fail fair models (see
    :mod:`.gaps`). Every interval contains its value.

    Binary view: the positive class is ``model.positive_class`` (the second class of a binary
    model without one); a prediction is its arg-max class. Multi-class models are measured
    one-vs-rest for the positive class (accuracy and ECE stay top-1 / top-label); a multi-class
    model without ``positive_class`` is skipped with that reason.

    Multi-label models (``model.task: multilabel``, :mod:`.multilabel`): every metric above, per
    label and group, as the binary metric of that label called at its threshold
    (``model.operating_point``, else 0.5; the label's ECE is its binary ECE over equal-width
    bins of its probability), over the images whose entry for the label is known (unknown
    entries are left out of that label only, and counted); a group is measured on a label when
    at least ``min_group_size`` of its images have a known entry for it. The per-label gap
    intervals are simultaneous over the labels as well as the groups (:func:`.gaps.joint_gap_intervals`):
    with one 95% interval per label, a fair model with many labels would show some label's gap
    "demonstrated" by chance. Plus **underdiagnosis**
    (Seyyed-Kalantari et al. 2021, "Underdiagnosis bias of artificial intelligence algorithms
    applied to chest radiographs in under-served patient populations", Nature Medicine 27): per
    group, the share of images with at least one true finding that the model calls
    finding-free, i.e. the false-positive rate of the ``no_finding`` label when the parameter
    names one, else the share with every label below its threshold; an image whose finding
    status is unknown (its ``no_finding`` entry unknown, or no known positive but some unknown
    entries) is left out and counted. Intervals and gaps as for a classifier, the bootstrap
    stratified by group and over patients when the manifest names them (:mod:`.resample`).

    Regression models (``model.task: regression``, :mod:`.regression`): per output and group the
    MAE and the mean error (prediction minus target: positive over-estimates) in the output's
    units (``model.units``), with intervals from the same bootstrap; per output and grouping the
    MAE gap and the mean-error range in units, and the unit-free ratio of the largest to the
    smallest group MAE (``mae_ratio``, its interval the simultaneous interval of the log MAEs),
    the quantity a shipped policy can bound for any output. Targets that are unknown (NaN) are
    left out of that output and counted.

    Segmentation models (``model.task: segmentation``, 2-D and 3-D, :mod:`.segmentation`): per
    case and foreground class the Dice and HD95 (mm, each case's pixel or voxel spacing) of
    :func:`auditkit.segmentation.case_figures`, MONAI's ``compute_dice(include_background=False,
    ignore_empty=True)`` and ``compute_hausdorff_distance(percentile=95, spacing=...)`` on the
    arg-max maps, the figures the performance check averages. Per class and group the mean Dice
    over the cases whose reference holds the class and the mean HD95 over the cases where
    reference and segmentation both hold it (``n`` = those cases; a group is measured on a
    figure when at least ``min_group_size`` of its cases define it); per class and grouping the
    gap of each (HD95 in mm, lower is better), its worst and best group named, with the
    simultaneous interval over groups and foreground classes, from one bootstrap per grouping
    stratified by group, over patients when known. Cases with an empty reference are left out
    of both means and counted; a *missed* case (the class in the reference, nothing segmented)
    has a Dice of 0, which is in the mean, and no HD95, so a group whose lesions the model
    misses can look best on HD95: missed cases are counted per group and class, and on both ends
    of every gap finding.

    Small groups: a group with fewer than ``min_group_size`` images is *insufficient*: it gets
    its ``n`` and, for every other metric, an undefined value with that reason, is named in an
    ``insufficient_group`` finding and is left out of the gaps (never silently). Groups known
    only from quarantined files, and empty intersection cells, appear with ``n = 0``. A group
    lacking positives (or negatives, predicted positives, ...) gets undefined values with the
    reason and is left out of that metric's gap. A grouping with a single group has zero gaps;
    one with fewer than two comparable groups has undefined gaps, with the reason.

    Inputs: eval-split probabilities and labels from the shared pass (``Needs(predictions=True)``),
    the spec's group columns, the per-group counts of quarantined eval files and (multi-label,
    regression, segmentation) the surrogate patient ids; segmentation: the arg-max and reference
    label maps ``(N, *spatial)`` and the per-case spacing (1 per pixel when unknown). Rows with
    non-finite logits (regression: outputs; segmentation: any logit of the case) are excluded
    and counted, as are segmentation cases without a reference map.

    Metrics (``n`` = images behind each value):
        ``bias.group_metric`` {metric, group_by, group}: metric one of n, prevalence, accuracy,
        sensitivity, specificity, ppv, npv, selection_rate, auroc, ece, with a bootstrap ``ci``
        (none for n and prevalence, which the stratified resampling holds fixed; ece is
        ``lower_is_better``, the rest ``higher_is_better``, which for n, prevalence and
        selection rate is only descriptive). ``bias.max_gap`` {metric, group_by}: metric one of
        accuracy, sensitivity, specificity, ppv, npv, auroc, ece (``lower_is_better``).
        ``bias.equalized_odds_difference`` {group_by} and ``bias.demographic_parity_difference``
        {group_by} (``lower_is_better``). ``bias.min_group_size`` {group_by} (the smallest
        group's image count, ``higher_is_better``, no interval).
        Multi-label: the same ``bias.group_metric``, ``bias.max_gap``,
        ``bias.equalized_odds_difference`` and ``bias.demographic_parity_difference`` with a
        ``label`` key (``n`` = images with a known entry for the label); ``bias.underdiagnosis_rate``
        {group_by, group} (``lower_is_better``; ``n`` = images whose finding status is known) and
        its gap ``bias.max_gap`` {metric: underdiagnosis_rate, group_by}; ``bias.min_group_size``.
        Regression: ``bias.group_metric`` {metric: n | mae | mean_error, group_by, group,
        output} (``mean_error`` is signed: its direction, ``lower_is_better``, is only nominal);
        ``bias.max_gap`` {metric: mae | mean_error | mae_ratio, group_by, output} (the first two
        in the output's units, the ratio unit-free, at least 1); ``bias.min_group_size``.
        Segmentation: ``bias.group_metric`` {metric: dice | hd95, class, group_by, group} (dice
        ``higher_is_better``, hd95 in mm ``lower_is_better``; ``n`` = the group's cases defining
        the figure), ``bias.max_gap`` {metric: dice | hd95, class, group_by} (``n`` = the
        compared groups' cases defining it) and ``bias.min_group_size`` (cases).
        Policy rules match label keys exactly, so the classifier's BIAS-SENS-GAP rules (no
        ``label`` key) never judge a multi-label model's per-label gaps; BIAS-LABEL-* rules do
        (and only rules with a ``class`` key judge a segmentation model's gaps).

    Findings: ``quarantined_by_group`` (per group column: eval files quarantined per group and
    their share of the group's files, so a missing decoder cannot silently bias the check);
    ``non_finite_logits`` (count); ``grouping_skipped`` (more than ``max_groups`` groups);
    ``subgroup_gap`` (per defined gap: the worst- and best-faring groups, their values, the gap
    and its interval; ordered by the interval's lower end, most evident first);
    ``insufficient_group`` (group, its size, the reason). Group sizes in findings, reasons and
    the plot are strings, ``<5`` for 1 to 4 images, so a report never prints a tiny group's
    size exactly (quarantine counts are files, given exactly).

    Multi-label and regression findings add ``bootstrap`` (the resampling unit), ``unknown_labels``
    / ``unknown_targets`` (entries left out, per label or output), ``underdiagnosis`` (the
    definition used and the whole split's counts and rate) and ``underdiagnosis_by_group`` (per
    grouping: images with a finding, called finding-free, left out); their ``subgroup_gap``
    findings carry the ``label`` or the ``output`` and its ``unit``. Segmentation findings add
    ``bootstrap``, ``segmentation_metrics`` (the implementation, the spacing used),
    ``cases_left_out`` (cases without a reference map), ``case_counts`` (per class over the
    split: cases with a reference, empty references, missed, false positives on empty, defined
    HD95) and ``segmentation_cases_by_group`` (the same per grouping, class and group, and the
    share of cases with a reference that were missed); their ``subgroup_gap`` findings carry the
    ``class`` (``unit: mm`` for HD95) and ``worst_group_missed`` / ``best_group_missed``, and
    ``insufficient_group`` findings the ``class`` and ``metric`` a group is too small for.

    Artifacts: ``forest_plot`` (SVG; multi-label: the underdiagnosis rate per group, with
    ``label_heatmap``, the per-label sensitivity and specificity of every group; regression: MAE
    and mean error per group and output, in units; segmentation: Dice and HD95 per group and
    foreground class).

    Limitations: ``min_group_size`` counts images, while a rate's denominator is smaller (a
    group of 40 images at 20% prevalence has 8 positives behind its sensitivity); the intervals
    carry that uncertainty, point estimates do not. A group whose rate is exactly 0 or 1 has a
    degenerate bootstrap distribution, so its interval is a single point and the upper end of a
    gap between such groups is too low. Gap intervals over many groups are conservative by
    construction. The demographic-parity difference follows prevalence: where base rates differ
    between groups (as disease often does), a good diagnostic model should not have parity.
    Intersections are pairwise only; a group value containing ``×`` makes intersection labels
    ambiguous. Multi-label: the many small label x group cells make rates of exactly 0 or 1
    common, whose degenerate intervals narrow the gap's; underdiagnosis leaves out images whose
    finding status is unknown, so where
    labelling was less complete for one group its rate rests on fewer images. The classifier
    analysis resamples images (stratified by group and class); the multi-label and regression
    analyses resample patients when known, within each group, not stratified by class.
    Segmentation: a group's mean Dice weighs every case alike, whatever its lesion volume (the
    per-case mean, as MONAI's ``DiceMetric``; a group with small lesions has lower Dice for the
    same boundary error); HD95 is undefined for missed cases, so its gap compares groups on the
    cases the model found (read it with the missed counts); the HD95 gap is in millimetres and
    has no unit-free form; cases with an empty reference (a false positive there is counted, not
    scored) and non-finite cases are left out; the bootstrap is not stratified by lesion
    presence.

    NIST AI RMF 1.0: MEASURE 2.11 (fairness and bias are evaluated and results documented),
    MEASURE 2.2 (evaluations are representative of the relevant population: group sizes,
    quarantine per group), MAP 2.3 (data representativeness and TEVV design are documented).
    """

    id: ClassVar[str] = "bias"
    family: ClassVar[str] = "bias"

    Params = BiasParams

    needs: ClassVar[Needs] = Needs(predictions=True)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    emits: ClassVar[tuple[str, ...]] = (
        "bias.group_metric",
        "bias.max_gap",
        "bias.equalized_odds_difference",
        "bias.demographic_parity_difference",
        "bias.min_group_size",
        "bias.underdiagnosis_rate",
    )

    def run(self, ctx: CheckContext, params: BiasParams) -> CheckResult:
        """Measure every grouping of the eval split and draw the forest plot."""
        p = params
        if p.no_finding is not None and ctx.task != "multilabel":
            raise ConfigError(
                f"checks.bias.no_finding: names a label of a multi-label model; this model's task is {ctx.task}"
            )
        if p.no_finding is not None and p.no_finding not in ctx.classes:
            raise ConfigError(
                f"checks.bias.no_finding: {p.no_finding!r} is not one of model.classes {list(ctx.classes)}"
            )
        preds = ctx.predictions("eval")
        if preds.n == 0:
            raise Skip("no eval images (every eval image was quarantined)")
        if ctx.task == "multilabel":
            return self._run_multilabel(ctx, p)
        if ctx.task == "regression":
            return self._run_regression(ctx, p)
        if ctx.task == "segmentation":
            return self._run_segmentation(ctx, p)
        positive_index = ctx.positive_index
        if positive_index is None:
            raise Skip(
                f"a {len(ctx.classes)}-class model without model.positive_class: sensitivity and"
                " specificity need a positive class (set model.positive_class to measure it"
                " one-vs-rest)"
            )
        columns = {str(k): np.asarray(v).astype(str) for k, v in ctx.group_labels("eval").items()}
        if not columns:
            raise Skip("no subgroup columns (data.groups in the spec is empty)")
        probs = np.asarray(preds.probs, dtype=np.float64)
        labels = np.asarray(preds.labels)
        for column, values in columns.items():
            if values.shape != labels.shape:
                raise InputError(
                    f"group column {column!r} has {values.shape[0]} labels for {labels.shape[0]} eval images"
                )

        result = CheckResult()
        quarantined = ctx.split("eval").quarantined_groups
        result.findings += _quarantine_findings(columns, quarantined)
        finite: NDArray[np.bool_] = np.asarray(np.isfinite(probs).all(axis=1), dtype=bool)
        if not finite.all():
            result.findings.append({"kind": "non_finite_logits", "split": "eval", "count": int((~finite).sum())})
        if not finite.any():
            raise Skip("the logits of every eval image are non-finite")
        outcomes = Outcomes.from_probs(probs[finite], labels[finite], positive_index, bins=p.bins)
        positive = ctx.classes[positive_index]
        seed_root = int(ctx.rng().integers(0, 2**63 - 1))

        analyses: list[GroupingAnalysis] = []
        for group_by, values, known in _groupings(columns, quarantined, finite, p):
            if len(known) > p.max_groups:
                result.metrics += _skipped_grouping_metrics(group_by, len(known), p.max_groups)
                result.findings.append(
                    {
                        "kind": "grouping_skipped",
                        "group_by": group_by,
                        "groups": len(known),
                        "max_groups": p.max_groups,
                    }
                )
                continue
            analysis = analyse_grouping(
                outcomes,
                values,
                group_by=group_by,
                min_group_size=p.min_group_size,
                n_boot=p.n_boot,
                rng=np.random.default_rng(stable_seed(seed_root, group_by)),
                known_groups=known,
                positive=positive,
            )
            analyses.append(analysis)
            result.metrics += _analysis_metrics(analysis, outcomes.n)

        result.findings += _gap_findings(analyses)
        result.findings += _insufficient_findings(analyses, p.min_group_size)
        if analyses:
            result.artifacts.append(_plot(ctx, analyses, outcomes))
        return result

    def _run_multilabel(self, ctx: CheckContext, p: BiasParams) -> CheckResult:
        """Per label and group, and underdiagnosis per group (:mod:`.multilabel`)."""
        inputs = _TaskInputs.read(ctx, non_finite_kind="non_finite_logits")
        names = list(ctx.classes)
        outcomes = LabelOutcomes.from_probs(
            inputs.probs, inputs.labels, names, ctx.operating_point, no_finding=p.no_finding, bins=p.bins
        )
        result = inputs.result
        result.findings += records.multilabel_preamble(outcomes)
        seed_root = int(ctx.rng().integers(0, 2**63 - 1))
        analyses: list[MultilabelAnalysis] = []
        for group_by, values, known in _groupings(inputs.columns, inputs.quarantined, inputs.finite, p):
            if len(known) > p.max_groups:
                result.metrics += records.skipped_grouping_metrics(
                    "multilabel", group_by, names, len(known), p.max_groups
                )
                result.findings.append(_skipped_finding(group_by, len(known), p.max_groups))
                continue
            analysis = analyse_multilabel_grouping(
                outcomes,
                values,
                group_by=group_by,
                min_group_size=p.min_group_size,
                n_boot=p.n_boot,
                rng=np.random.default_rng(stable_seed(seed_root, group_by)),
                known_groups=known,
                patients=inputs.patients,
            )
            analyses.append(analysis)
            result.metrics += records.multilabel_metrics(analysis, outcomes.n)
        result.findings += records.multilabel_findings(analyses, p.min_group_size, p.n_boot)
        if analyses:
            result.artifacts += _multilabel_plots(ctx, analyses, outcomes)
        return result

    def _run_regression(self, ctx: CheckContext, p: BiasParams) -> CheckResult:
        """MAE and mean error per output and group, and their gaps (:mod:`.regression`)."""
        inputs = _TaskInputs.read(ctx, non_finite_kind="non_finite_outputs")
        names = list(ctx.classes)
        outcomes = TargetOutcomes.from_values(inputs.probs, inputs.labels, names)
        units = dict(ctx.units)
        result = inputs.result
        result.findings += records.regression_preamble(outcomes, units)
        seed_root = int(ctx.rng().integers(0, 2**63 - 1))
        analyses: list[RegressionAnalysis] = []
        for group_by, values, known in _groupings(inputs.columns, inputs.quarantined, inputs.finite, p):
            if len(known) > p.max_groups:
                result.metrics += records.skipped_grouping_metrics(
                    "regression", group_by, names, len(known), p.max_groups
                )
                result.findings.append(_skipped_finding(group_by, len(known), p.max_groups))
                continue
            analysis = analyse_regression_grouping(
                outcomes,
                values,
                group_by=group_by,
                min_group_size=p.min_group_size,
                n_boot=p.n_boot,
                rng=np.random.default_rng(stable_seed(seed_root, group_by)),
                known_groups=known,
                patients=inputs.patients,
            )
            analyses.append(analysis)
            result.metrics += records.regression_metrics(analysis, outcomes.n)
        result.findings += records.regression_findings(analyses, units, p.min_group_size, p.n_boot)
        if analyses:
            result.artifacts.append(_regression_plot(ctx, analyses, outcomes, units))
        return result

    def _run_segmentation(self, ctx: CheckContext, p: BiasParams) -> CheckResult:
        """Dice and HD95 per foreground class and group, and their gaps (:mod:`.segmentation`)."""
        preds = ctx.predictions("eval")
        split = ctx.split("eval")
        n = preds.n
        columns = {str(k): np.asarray(v).astype(str) for k, v in ctx.group_labels("eval").items()}
        if not columns:
            raise Skip("no subgroup columns (data.groups in the spec is empty)")
        for column, values in columns.items():
            if values.shape != (n,):
                raise InputError(f"group column {column!r} has {values.shape[0]} labels for {n} eval images")
        result = CheckResult()
        quarantined = split.quarantined_groups
        result.findings += _quarantine_findings(columns, quarantined)
        # Per case: every logit finite (a -inf logit leaves the softmax finite), a reference map.
        finite = np.asarray(preds.logits.isfinite().reshape(n, -1).all(dim=1).cpu().numpy(), dtype=bool)
        reference = np.asarray(preds.labels)
        labelled = np.asarray((reference >= 0).reshape(n, -1).all(axis=1), dtype=bool)
        keep = finite & labelled
        if not finite.all():
            result.findings.append({"kind": "non_finite_logits", "split": "eval", "count": int((~finite).sum())})
        if not keep.any():
            raise Skip("no eval case has finite logits and a reference label map")
        spatial = reference.ndim - 1
        spacing = split.spacing if split.spacing is not None else np.ones((n, spatial))
        outcomes = CaseOutcomes.from_maps(
            preds.predicted[keep], reference[keep], np.asarray(spacing, dtype=np.float64)[keep], list(ctx.classes)
        )
        left_out = {"without_reference": int((finite & ~labelled).sum())}
        result.findings += records.segmentation_preamble(
            outcomes, implementation(), split.spacing is not None, left_out
        )
        patients = [patient for patient, k in zip(split.patients, keep.tolist(), strict=True) if k]
        seed_root = int(ctx.rng().integers(0, 2**63 - 1))
        analyses: list[SegmentationAnalysis] = []
        for group_by, values, known in _groupings(columns, quarantined, keep, p):
            if len(known) > p.max_groups:
                result.metrics += records.skipped_grouping_metrics(
                    "segmentation", group_by, outcomes.names, len(known), p.max_groups
                )
                result.findings.append(_skipped_finding(group_by, len(known), p.max_groups))
                continue
            analysis = analyse_segmentation_grouping(
                outcomes,
                values,
                group_by=group_by,
                min_group_size=p.min_group_size,
                n_boot=p.n_boot,
                rng=np.random.default_rng(stable_seed(seed_root, group_by)),
                known_groups=known,
                patients=patients,
            )
            analyses.append(analysis)
            result.metrics += records.segmentation_metrics(analysis, outcomes.n)
        result.findings += records.segmentation_findings(analyses, p.min_group_size, p.n_boot)
        if analyses:
            result.artifacts.append(_segmentation_plot(ctx, analyses, outcomes))
        return result


# --------------------------------------------------------------------------------------------
# Inputs of the multi-label and regression analyses


@dataclass(frozen=True)
class _TaskInputs:
    """The eval split as the multi-label and regression analyses read it (finite rows only)."""

    columns: dict[str, NDArray[np.str_]]
    quarantined: Mapping[str, Mapping[str, int]]
    finite: NDArray[np.bool_]
    probs: NDArray[np.float64]
    labels: NDArray[Any]
    patients: list[str | None]
    result: CheckResult

    @classmethod
    def read(cls, ctx: CheckContext, *, non_finite_kind: str) -> _TaskInputs:
        preds = ctx.predictions("eval")
        columns = {str(k): np.asarray(v).astype(str) for k, v in ctx.group_labels("eval").items()}
        if not columns:
            raise Skip("no subgroup columns (data.groups in the spec is empty)")
        probs = np.asarray(preds.probs, dtype=np.float64)
        labels = np.asarray(preds.labels)
        for column, values in columns.items():
            if values.shape != (labels.shape[0],):
                raise InputError(
                    f"group column {column!r} has {values.shape[0]} labels for {labels.shape[0]} eval images"
                )
        result = CheckResult()
        split = ctx.split("eval")
        quarantined = split.quarantined_groups
        result.findings += _quarantine_findings(columns, quarantined)
        logits = preds.logits.detach().cpu().double().numpy()
        finite: NDArray[np.bool_] = np.asarray(
            np.isfinite(probs).all(axis=1) & np.isfinite(logits).all(axis=1), dtype=bool
        )
        if not finite.all():
            result.findings.append({"kind": non_finite_kind, "split": "eval", "count": int((~finite).sum())})
        if not finite.any():
            what = "logits" if non_finite_kind == "non_finite_logits" else "outputs"
            raise Skip(f"the {what} of every eval image are non-finite")
        patients = [p for p, keep in zip(split.patients, finite.tolist(), strict=True) if keep]
        return cls(columns, quarantined, finite, probs[finite], labels[finite], patients, result)


# --------------------------------------------------------------------------------------------
# Helpers of the check


def _groupings(
    columns: Mapping[str, NDArray[np.str_]],
    quarantined: Mapping[str, Mapping[str, int]],
    finite: NDArray[np.bool_],
    p: BiasParams,
) -> list[tuple[str, NDArray[np.str_], list[str]]]:
    """(group_by, labels of the finite rows, every known group) per column, then per pair."""
    known = {
        column: sorted(set(values.tolist()) | set(quarantined.get(column, {}))) for column, values in columns.items()
    }
    out = [(column, values[finite], known[column]) for column, values in columns.items()]
    if p.intersections:
        for first, second in itertools.combinations(columns, 2):
            values = intersect(columns[first], columns[second])
            cells = len(known[first]) * len(known[second])
            # Empty cells are reported (n = 0) unless the cross product alone passes max_groups.
            groups = (
                [f"{a}{INTERSECTION_SEPARATOR}{b}" for a in known[first] for b in known[second]]
                if cells <= p.max_groups
                else sorted(set(values.tolist()))
            )
            out.append((f"{first}{INTERSECTION_SEPARATOR}{second}", values[finite], groups))
    return out


def _skipped_finding(group_by: str, groups: int, max_groups: int) -> dict[str, Any]:
    return {"kind": "grouping_skipped", "group_by": group_by, "groups": groups, "max_groups": max_groups}


def _direction(metric: str) -> Direction:
    return "lower_is_better" if metric in LOWER_IS_BETTER else "higher_is_better"


def _analysis_metrics(analysis: GroupingAnalysis, total: int) -> list[Metric]:
    group_by = analysis.group_by
    out = [
        Metric(
            "bias.group_metric",
            summary.values[metric],
            _direction(metric),
            labels={"metric": metric, "group_by": group_by, "group": summary.group},
            ci=summary.cis.get(metric),
            n=summary.n,
            reason=summary.reasons.get(metric),
        )
        for summary in analysis.groups
        for metric in GROUP_METRICS
    ]
    for metric in GAP_METRICS:
        out.append(_gap_metric("bias.max_gap", analysis.gaps[metric], {"metric": metric}, group_by))
    out.append(_gap_metric("bias.equalized_odds_difference", analysis.equalized_odds, {}, group_by))
    out.append(_gap_metric("bias.demographic_parity_difference", analysis.demographic_parity, {}, group_by))
    out.append(
        Metric(
            "bias.min_group_size",
            float(analysis.min_group_size),
            "higher_is_better",
            labels={"group_by": group_by},
            n=total,
        )
    )
    return out


def _gap_metric(name: str, gap: Gap, labels: dict[str, str], group_by: str) -> Metric:
    return Metric(
        name,
        gap.value,
        "lower_is_better",
        labels={**labels, "group_by": group_by},
        ci=gap.ci,
        n=gap.n,
        reason=gap.reason,
    )


def _skipped_grouping_metrics(group_by: str, groups: int, max_groups: int) -> list[Metric]:
    reason = f"{groups} groups, more than max_groups={max_groups}: grouping not analysed"
    out = [
        Metric(
            "bias.max_gap",
            None,
            "lower_is_better",
            labels={"metric": m, "group_by": group_by},
            reason=reason,
        )
        for m in GAP_METRICS
    ]
    for name in ("bias.equalized_odds_difference", "bias.demographic_parity_difference"):
        out.append(Metric(name, None, "lower_is_better", labels={"group_by": group_by}, reason=reason))
    out.append(
        Metric(
            "bias.min_group_size",
            None,
            "higher_is_better",
            labels={"group_by": group_by},
            reason=reason,
        )
    )
    return out


def _quarantine_findings(
    columns: Mapping[str, NDArray[np.str_]], quarantined: Mapping[str, Mapping[str, int]]
) -> list[dict[str, Any]]:
    """Per column: quarantined eval files per group and their share of the group's files."""
    findings: list[dict[str, Any]] = []
    for column, counts in quarantined.items():
        counts = {str(g): int(c) for g, c in counts.items() if int(c) > 0}
        if not counts:
            continue
        values = columns.get(column, np.array([], dtype=str))
        kept = {g: int((values == g).sum()) for g in counts}
        findings.append(
            {
                "kind": "quarantined_by_group",
                "split": "eval",
                "group_by": column,
                "quarantined": dict(sorted(counts.items())),
                "share_of_group": {g: round(counts[g] / (counts[g] + kept[g]), 4) for g in sorted(counts)},
                "groups_without_images": sorted(g for g in counts if kept[g] == 0),
            }
        )
    return findings


def _gap_findings(analyses: Sequence[GroupingAnalysis]) -> list[dict[str, Any]]:
    """One ``subgroup_gap`` per defined gap, the best-evidenced (highest interval end) first."""
    findings = []
    for analysis in analyses:
        by_group = {s.group: s for s in analysis.groups}
        for metric in GAP_METRICS:
            gap = analysis.gaps[metric]
            if gap.value is None or gap.worst is None or gap.best is None or len(gap.compared) < 2:
                continue
            findings.append(
                {
                    "kind": "subgroup_gap",
                    "metric": metric,
                    "group_by": analysis.group_by,
                    "gap": gap.value,
                    "ci": list(gap.ci) if gap.ci is not None else None,
                    "worst_group": gap.worst,
                    "worst_value": by_group[gap.worst].values[metric],
                    "best_group": gap.best,
                    "best_value": by_group[gap.best].values[metric],
                    "groups_compared": len(gap.compared),
                    "groups_excluded": sorted(gap.excluded),
                }
            )
    findings.sort(
        key=lambda f: (-(f["ci"][0] if f["ci"] else float("-inf")), -f["gap"]),
    )
    return findings


def _insufficient_findings(analyses: Sequence[GroupingAnalysis], min_group_size: int) -> list[dict[str, Any]]:
    return [
        {
            "kind": "insufficient_group",
            "group_by": analysis.group_by,
            "group": summary.group,
            "n": count_text(summary.n),
            "min_group_size": min_group_size,
            "reason": summary.reasons["sensitivity"],
        }
        for analysis in analyses
        for summary in analysis.groups
        if not summary.sufficient
    ]


def _plot(ctx: CheckContext, analyses: list[GroupingAnalysis], outcomes: Outcomes) -> Artifact:
    everyone = batched_group_metrics(outcomes, np.arange(outcomes.n, dtype=np.intp)[None, :])
    overall = {metric: float(values[0]) if np.isfinite(values[0]) else None for metric, values in everyone.items()}
    return ctx.write_artifact(
        "forest_plot",
        "forest.svg",
        lambda path: forest_plot(analyses, path, overall=overall),
        description=(
            f"Forest plot of {', '.join(FOREST_METRICS)} per group with 95% bootstrap intervals,"
            f" for {len(analyses)} groupings of the eval split ({outcomes.n} images); groups below"
            " min_group_size are marked insufficient and not drawn."
        ),
    )


def _multilabel_plots(ctx: CheckContext, analyses: list[MultilabelAnalysis], outcomes: LabelOutcomes) -> list[Artifact]:
    with_finding = int(outcomes.has_finding.sum())
    overall = (
        float((outcomes.has_finding & outcomes.called_finding_free).sum()) / with_finding if with_finding else None
    )
    rates = [a.underdiagnosis for a in analyses]
    # Rates of missed findings are mostly small: the axis ends just past the largest interval, not at 1.
    ends = [v for rate in rates for s in rate.groups for v in _ends(s, UNDERDIAGNOSIS)] + [overall or 0.0]
    top = min(1.0, max(0.05, 1.1 * max(ends)))
    heatmap_input = [(a.group_by, a.labels, a.images) for a in analyses]
    return [
        ctx.write_artifact(
            "forest_plot",
            "underdiagnosis.svg",
            lambda path: forest_plot(
                rates,
                path,
                overall={UNDERDIAGNOSIS: overall},
                metrics=(UNDERDIAGNOSIS,),
                limits={UNDERDIAGNOSIS: (-0.03 * top, 1.03 * top)},
                suptitle="Underdiagnosis rate per group with 95% bootstrap intervals (dashed: whole eval split)",
            ),
            description=(
                f"Underdiagnosis rate (images with a finding called finding-free) per group with 95% bootstrap"
                f" intervals, for {len(analyses)} groupings of the eval split ({outcomes.n} images); groups below"
                " min_group_size are marked insufficient and not drawn."
            ),
        ),
        ctx.write_artifact(
            "label_heatmap",
            "label_heatmap.svg",
            lambda path: label_heatmap(heatmap_input, path),
            description=(
                f"Sensitivity and specificity of each of {outcomes.k} labels per group at the labels' thresholds,"
                f" for {len(analyses)} groupings of the eval split; grey cells: group too small for the label or"
                " metric undefined (intervals in the metrics)."
            ),
        ),
    ]


def _regression_plot(
    ctx: CheckContext, analyses: list[RegressionAnalysis], outcomes: TargetOutcomes, units: Mapping[str, str]
) -> Artifact:
    rows, titles, limits, overall = [], {}, {}, {}
    everyone = np.arange(outcomes.n, dtype=np.intp)
    whole = _overall_errors(outcomes, everyone)
    for k, output in enumerate(outcomes.names):
        unit = f" ({units[output]})" if output in units else ""
        for metric, title in (("mae", "MAE"), ("mean_error", "mean error")):
            key = f"{metric}:{output}"
            titles[key] = f"{output}: {title}{unit}"
            overall[key] = whole[metric][k]
            ends = [abs(v) for a in analyses for s in a.outputs[output].groups for v in _ends(s, metric)]
            ends.append(abs(whole[metric][k] or 0.0))
            top = 1.08 * max(ends) if ends and max(ends) > 0 else 1.0
            limits[key] = (0.0, top) if metric == "mae" else (-top, top)
    for analysis in analyses:
        rows.append(_merged_rows(analysis))
    metrics = [f"{m}:{o}" for o in outcomes.names for m in ("mae", "mean_error")]
    return ctx.write_artifact(
        "forest_plot",
        "forest.svg",
        lambda path: forest_plot(
            rows,
            path,
            overall=overall,
            metrics=metrics,
            titles=titles,
            limits=limits,
            suptitle="Per-group errors with 95% bootstrap intervals, in the outputs' units (dashed: whole eval split)",
        ),
        description=(
            f"Forest plot of MAE and mean error (prediction minus target) per group and output with 95% bootstrap"
            f" intervals, for {len(analyses)} groupings of the eval split ({outcomes.n} images); groups below"
            " min_group_size are marked insufficient and not drawn."
        ),
    )


def _segmentation_plot(ctx: CheckContext, analyses: list[SegmentationAnalysis], outcomes: CaseOutcomes) -> Artifact:
    titles: dict[str, str] = {}
    limits: dict[str, tuple[float, float]] = {}
    overall: dict[str, float | None] = {}
    whole = whole_split_means(outcomes)
    for k, name in enumerate(outcomes.names):
        titles[f"dice:{name}"] = f"{name}: Dice"
        titles[f"hd95:{name}"] = f"{name}: HD95 (mm, lower is better)"
        overall[f"dice:{name}"] = whole["dice"][k]
        overall[f"hd95:{name}"] = whole["hd95"][k]
        ends = [v for a in analyses for s in a.classes[name]["hd95"].groups for v in _ends(s, "hd95")]
        ends.append(whole["hd95"][k] or 0.0)
        top = 1.08 * max(ends) if max(ends) > 0 else 1.0
        limits[f"hd95:{name}"] = (0.0, top)
    rows = [_segmentation_rows(analysis) for analysis in analyses]
    metrics = [f"{m}:{name}" for name in outcomes.names for m in SEGMENTATION_METRICS]
    return ctx.write_artifact(
        "forest_plot",
        "forest.svg",
        lambda path: forest_plot(
            rows,
            path,
            overall=overall,
            metrics=metrics,
            titles=titles,
            limits=limits,
            suptitle="Per-group Dice and HD95 with 95% bootstrap intervals (dashed: whole eval split)",
        ),
        description=(
            f"Forest plot of the mean Dice and HD95 (mm) per group and foreground class with 95% bootstrap"
            f" intervals, for {len(analyses)} groupings of the eval split ({outcomes.n} cases); groups with"
            " fewer than min_group_size cases defining a figure are marked insufficient and not drawn."
        ),
    )


def _segmentation_rows(analysis: SegmentationAnalysis) -> GroupedValues:
    """One row per group with every class's figures under ``<metric>:<class>`` keys."""
    merged = []
    for position, group in enumerate(analysis.images):
        values: dict[str, float | None] = {}
        cis: dict[str, tuple[float, float] | None] = {}
        sufficient = False
        for name, figures in analysis.classes.items():
            for metric in SEGMENTATION_METRICS:
                summary = figures[metric].groups[position]
                sufficient = sufficient or summary.sufficient
                values[f"{metric}:{name}"] = summary.values[metric] if summary.sufficient else None
                cis[f"{metric}:{name}"] = summary.cis.get(metric)
        merged.append(GroupSummary(group, analysis.images[group], sufficient, values, {}, cis))
    return GroupedValues(analysis.group_by, tuple(merged), {})


def _overall_errors(outcomes: TargetOutcomes, rows: NDArray[np.intp]) -> dict[str, list[float | None]]:
    """MAE and mean error of each output over ``rows`` (``None`` without a known target)."""
    values = batched_errors(outcomes, rows, np.ones((1, rows.size), dtype=np.intp))
    return {
        metric: [float(v) if math.isfinite(v) else None for v in values[metric][0]] for metric in ("mae", "mean_error")
    }


def _ends(summary: GroupSummary, metric: str) -> list[float]:
    ci = summary.cis.get(metric)
    value = summary.values.get(metric)
    return [v for v in (*(ci or ()), value) if v is not None and math.isfinite(v)]


def _merged_rows(analysis: RegressionAnalysis) -> GroupedValues:
    """One row per group with every output's values under ``<metric>:<output>`` keys."""
    outputs = list(analysis.outputs.items())
    merged = []
    for position, group in enumerate(analysis.images):
        values: dict[str, float | None] = {}
        cis: dict[str, tuple[float, float] | None] = {}
        sufficient = False
        for output, grouped in outputs:
            summary = grouped.groups[position]
            sufficient = sufficient or summary.sufficient
            for metric in ("mae", "mean_error"):
                values[f"{metric}:{output}"] = summary.values[metric] if summary.sufficient else None
                cis[f"{metric}:{output}"] = summary.cis.get(metric)
        merged.append(GroupSummary(group, analysis.images[group], sufficient, values, {}, cis))
    return GroupedValues(analysis.group_by, tuple(merged), {})
