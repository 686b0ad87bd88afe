"""Subgroup quality of a segmentation model: Dice and HD95 per class and group, and their gaps.

Per case and foreground class the figures are MONAI's, through :func:`auditkit.segmentation.case_figures`
(``compute_dice(include_background=False, ignore_empty=True)`` and
``compute_hausdorff_distance(percentile=95, spacing=...)`` on one-hot maps, each case's pixel or
voxel size in millimetres), the implementation every check that measures segmentation shares, so
the bias check's Dice of a group is the mean of exactly the per-case Dice the performance check
averages over the whole split.

Undefined figures are left out of a group's mean and counted, as MONAI's ``DiceMetric`` leaves
them out (its ``not_nans``): a case whose reference holds no pixel of a class has no Dice and no
HD95 for it (*empty reference*); a case with the class in its reference that the model did not
segment at all (*missed*) has a Dice of 0, which is in the Dice mean, and no HD95 (there is no
predicted surface to measure a distance from), so a group whose lesions the model misses would
look *better* on the HD95 mean: the ``segmentation_cases_by_group`` finding counts the missed
cases of every group and class beside the HD95 that leaves them out.

Per class and group: ``dice`` (higher is better), the mean over the group's cases with a defined
Dice, and ``hd95`` (mm, lower is better), the mean over its cases with a defined HD95; each is
measured when at least ``min_group_size`` of the group's cases define it, else undefined with
the reason. Per class and grouping, over the measured groups: the gap ``max - min`` of each
figure (HD95 in mm), named by its worst and best group.

Intervals: one seeded bootstrap per grouping, stratified by group, over patients when the
manifest names them (all of a patient's cases in a group drawn together, :mod:`.resample`); a
group's mean is a ratio of sums over its cases, so every resample of every class is one matrix
product of the row multiplicities with a per-case table. Per group the median-centred percentile
interval (:func:`.gaps.summary_with_intervals`); per gap the simultaneous max-type interval of
:mod:`.gaps`, made simultaneous over the foreground classes as well as the groups
(:func:`.gaps.joint_gap_intervals`, as the multi-label analysis does over labels; with one
foreground class it is :func:`.gaps.gap_interval`), clipped to ``[0, 1]`` for Dice and
``[0, inf)`` for HD95.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.checks.bias.gaps import (
    RATE_BOUNDS,
    Bounds,
    Gap,
    GroupedValues,
    GroupSummary,
    joint_gap_intervals,
    summary_with_intervals,
    values_gap,
)
from auditkit.checks.bias.metrics import FloatArray, count_text
from auditkit.checks.bias.resample import GroupResampler
from auditkit.segmentation import case_figures

__all__ = [
    "SEGMENTATION_METRICS",
    "CaseOutcomes",
    "SegmentationAnalysis",
    "analyse_segmentation_grouping",
    "batched_case_means",
    "case_count_totals",
    "whole_split_means",
]

SEGMENTATION_METRICS: tuple[str, ...] = ("dice", "hd95")
"""Per-group figures of each foreground class and their gaps (label ``metric`` of
``bias.group_metric`` and ``bias.max_gap``)."""

_BOUNDS: dict[str, Bounds] = {"dice": RATE_BOUNDS, "hd95": (0.0, float("inf"))}
_COUNTS = ("cases", "with_reference", "empty_reference", "missed", "false_positive_on_empty", "hd95_defined")

BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class CaseOutcomes:
    """Per-case figures of a segmentation model, ``(N, C)`` for ``C`` foreground classes.

    Build with :meth:`from_maps` (MONAI's figures of label maps) or :meth:`from_figures`.

    Attributes:
        names: the foreground class names (``model.classes`` without the background).
        figures: ``dice`` and ``hd95`` (mm) per case and class, NaN where undefined.
        reference_present: the case's reference holds the class.
        predicted_present: the model segmented the class somewhere in the case.
        table: per-case sums behind every group mean, ``(N, 4C)``: Dice defined, Dice (0 where
            undefined), HD95 defined, HD95 (0 where undefined).
    """

    names: tuple[str, ...]
    figures: dict[str, FloatArray]
    reference_present: BoolArray
    predicted_present: BoolArray
    table: FloatArray

    @classmethod
    def from_maps(
        cls, predicted: ArrayLike, reference: ArrayLike, spacing: ArrayLike, classes: Sequence[str]
    ) -> CaseOutcomes:
        """The figures of arg-max maps against reference maps, both ``(N, *spatial)``.

        Args:
            predicted: the model's label maps, values in ``0 .. K-1``.
            reference: the reference label maps, values in ``0 .. K-1``.
            spacing: pixel or voxel size per case in mm, ``(N, len(spatial))``.
            classes: every class name, the background (label 0) first.

        Raises:
            ValueError: the shapes disagree, or fewer than two classes.
        """
        pred = np.asarray(predicted)
        ref = np.asarray(reference)
        k = len(classes)
        if k < 2:
            raise ValueError(f"a segmentation model needs a background and a foreground class, got {list(classes)}")
        if pred.shape != ref.shape or pred.ndim < 3:
            raise ValueError(
                f"predicted and reference maps must both be (N, *spatial), got {pred.shape} and {ref.shape}"
            )
        n = pred.shape[0]
        if n == 0:
            raise ValueError("no cases to measure")
        space = np.asarray(spacing, dtype=np.float64)
        if space.shape != (n, pred.ndim - 1):
            raise ValueError(f"spacing must have shape ({n}, {pred.ndim - 1}), got {space.shape}")
        figures = case_figures(pred, ref, space, k, figures=("dice", "hd95"))
        flat_ref, flat_pred = ref.reshape(n, -1), pred.reshape(n, -1)
        reference_present = np.stack([(flat_ref == c).any(axis=1) for c in range(1, k)], axis=1)
        predicted_present = np.stack([(flat_pred == c).any(axis=1) for c in range(1, k)], axis=1)
        return cls.from_figures(figures["dice"], figures["hd95"], reference_present, predicted_present, classes[1:])

    @classmethod
    def from_figures(
        cls,
        dice: ArrayLike,
        hd95: ArrayLike,
        reference_present: ArrayLike,
        predicted_present: ArrayLike,
        names: Sequence[str],
    ) -> CaseOutcomes:
        """Outcomes of per-case figures already computed, each ``(N, C)`` (NaN: undefined)."""
        d = np.asarray(dice, dtype=np.float64)
        h = np.asarray(hd95, dtype=np.float64)
        ref = np.asarray(reference_present, dtype=bool)
        pred = np.asarray(predicted_present, dtype=bool)
        c = len(names)
        for name, array in (("dice", d), ("hd95", h), ("reference_present", ref), ("predicted_present", pred)):
            if array.ndim != 2 or array.shape[1] != c or array.shape[0] != d.shape[0]:
                raise ValueError(f"{name} must have shape (N, {c}) for {c} foreground classes, got {array.shape}")
        parts = []
        for values in (d, h):
            defined = np.isfinite(values)
            parts += [defined.astype(np.float64), np.where(defined, values, 0.0)]
        return cls(tuple(names), {"dice": d, "hd95": h}, ref, pred, np.ascontiguousarray(np.concatenate(parts, axis=1)))

    @property
    def n(self) -> int:
        return int(self.table.shape[0])

    @property
    def k(self) -> int:
        return len(self.names)


def batched_case_means(
    outcomes: CaseOutcomes, rows: NDArray[np.intp], counts: NDArray[np.intp]
) -> dict[str, FloatArray]:
    """Defined cases and mean Dice and HD95 of every class of one group, on ``B`` resamples.

    Args:
        outcomes: the per-case figures.
        rows: the group's rows, ``(m,)``.
        counts: how many times each of them is in each resample, ``(B, m)``.

    Returns:
        ``dice``, ``hd95``, ``n_dice``, ``n_hd95`` -> ``(B, C)``; a mean is NaN where a resample
        has no case defining it.
    """
    c = outcomes.k
    sums = np.asarray(counts, dtype=np.float64) @ outcomes.table[rows]
    out: dict[str, FloatArray] = {}
    for position, metric in enumerate(("dice", "hd95")):
        defined = sums[:, 2 * position * c : (2 * position + 1) * c]
        total = sums[:, (2 * position + 1) * c : (2 * position + 2) * c]
        out[f"n_{metric}"] = defined
        with np.errstate(invalid="ignore", divide="ignore"):
            out[metric] = np.where(defined > 0, total / np.where(defined > 0, defined, 1.0), np.nan)
    return out


@dataclass(frozen=True)
class SegmentationAnalysis:
    """Everything measured for one grouping of a segmentation model.

    Attributes:
        group_by: the grouping's name.
        classes: foreground class -> metric (``dice``, ``hd95``) -> its per-group values (``n``:
            the group's cases defining the figure) and its gap.
        images: group -> its cases.
        counts: group -> class -> cases, with_reference, empty_reference, missed,
            false_positive_on_empty, hd95_defined.
        min_group_size: cases in the smallest group.
        unit: the bootstrap's resampling unit (``patient`` or ``image``).
    """

    group_by: str
    classes: dict[str, dict[str, GroupedValues]]
    images: dict[str, int]
    counts: dict[str, dict[str, dict[str, int]]]
    min_group_size: int
    unit: str


def _summary(group: str, images: int, metric: str, name: str, defined: int, value: float, minimum: int) -> GroupSummary:
    reason = None
    if images == 0:
        reason = "no images in the group (none in the eval split, or all quarantined)"
    elif defined == 0:
        reason = (
            f"no case of the group has {name} in its reference"
            if metric == "dice"
            else f"no case of the group has {name} in both its reference and the model's segmentation"
        )
    elif defined < minimum:
        reason = (
            f"insufficient: the group has {count_text(defined)} cases with a defined {metric} for {name},"
            f" fewer than min_group_size={minimum}"
        )
    if reason is not None:
        return GroupSummary(group, defined, False, {metric: None}, {metric: reason})
    return GroupSummary(group, defined, True, {metric: float(value)})


def _joint_gaps(
    metric: str,
    summaries: Mapping[str, Sequence[GroupSummary]],
    replicates: Mapping[str, Mapping[str, Mapping[str, FloatArray]]] | None,
) -> dict[str, Gap]:
    """Class -> the gap of ``metric``, its interval simultaneous over classes and groups."""
    bounds = _BOUNDS[metric]
    gaps = {name: values_gap(metric, (metric,), rows, None, bounds=bounds) for name, rows in summaries.items()}
    if replicates is None:
        return gaps
    points: dict[str, dict[str, dict[str, float]]] = {}
    for name, gap in gaps.items():
        if gap.value is None:
            continue
        if len(gap.compared) < 2:  # a single group: no gap, exactly
            gaps[name] = dataclasses.replace(gap, ci=(0.0, 0.0))
            continue
        by_group = {s.group: s for s in summaries[name]}
        points[name] = {g: {metric: float(by_group[g].values[metric] or 0.0)} for g in gap.compared}
    if points:
        joint = joint_gap_intervals(points, {name: replicates[name] for name in points}, (metric,), bounds=bounds)
        for name, (_, ci) in joint.items():
            gaps[name] = dataclasses.replace(gaps[name], ci=ci)
    return gaps


def _case_counts(outcomes: CaseOutcomes, rows: NDArray[np.intp], k: int) -> dict[str, int]:
    ref, pred = outcomes.reference_present[rows, k], outcomes.predicted_present[rows, k]
    return dict(
        zip(
            _COUNTS,
            (
                int(rows.size),
                int(ref.sum()),
                int((~ref).sum()),
                int((ref & ~pred).sum()),
                int((~ref & pred).sum()),
                int(np.isfinite(outcomes.figures["hd95"][rows, k]).sum()),
            ),
            strict=True,
        )
    )


def analyse_segmentation_grouping(
    outcomes: CaseOutcomes,
    groups: ArrayLike,
    *,
    group_by: str,
    min_group_size: int = 30,
    n_boot: int = 1000,
    rng: np.random.Generator,
    known_groups: Iterable[str] = (),
    patients: Sequence[str | None] | None = None,
) -> SegmentationAnalysis:
    """Per-class Dice and HD95 of every group, and their gaps, for one grouping.

    Args:
        outcomes: the per-case figures, ``N`` cases.
        groups: group label per case, ``(N,)``.
        group_by: the grouping's name.
        min_group_size: a group is measured on a class's figure when at least this many of its
            cases define the figure.
        n_boot: bootstrap resamples; 0 disables intervals.
        rng: the only source of randomness.
        known_groups: further groups, reported with ``n = 0`` when no case belongs to them.
        patients: surrogate patient id per case (``None`` where unknown), or ``None``.

    Raises:
        ValueError: ``groups`` has the wrong shape, ``min_group_size < 1`` or ``n_boot < 0``.
    """
    labels = np.asarray(groups).astype(str)
    if labels.shape != (outcomes.n,):
        raise ValueError(f"groups must have shape ({outcomes.n},), got {labels.shape}")
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be at least 1, got {min_group_size}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be non-negative, got {n_boot}")
    known = sorted(set(labels.tolist()) | {str(g) for g in known_groups})
    if not known:
        raise ValueError("a grouping needs at least one group; got no images and no known groups")
    members = {g: np.flatnonzero(labels == g).astype(np.intp) for g in known}
    point = {
        g: {m: v[0] for m, v in batched_case_means(outcomes, rows, np.ones((1, rows.size), dtype=np.intp)).items()}
        for g, rows in members.items()
        if rows.size
    }

    def summary(group: str, metric: str, k: int, name: str) -> GroupSummary:
        values = point.get(group)
        defined = int(values[f"n_{metric}"][k]) if values is not None else 0
        value = float(values[metric][k]) if values is not None else float("nan")
        return _summary(group, int(members[group].size), metric, name, defined, value, min_group_size)

    summaries = {
        metric: {name: [summary(g, metric, k, name) for g in known] for k, name in enumerate(outcomes.names)}
        for metric in SEGMENTATION_METRICS
    }
    measured = [
        g
        for position, g in enumerate(known)
        if any(rows[position].sufficient for by_class in summaries.values() for rows in by_class.values())
    ]
    unit = "image"
    replicates: dict[str, dict[str, FloatArray]] | None = None
    if n_boot > 0 and measured:
        resampler = GroupResampler.of(labels, measured, patients)
        unit = resampler.unit
        replicates = {g: {m: np.empty((n_boot, outcomes.k)) for m in SEGMENTATION_METRICS} for g in measured}
        for block, counts in resampler.blocks(n_boot, rng):
            for group in measured:
                values = batched_case_means(outcomes, resampler.members[group], counts[group])
                for metric in SEGMENTATION_METRICS:
                    replicates[group][metric][block] = values[metric]

    by_class: dict[str, dict[str, GroupedValues]] = {name: {} for name in outcomes.names}
    for metric in SEGMENTATION_METRICS:
        reps = (
            {
                name: {g: {metric: replicates[g][metric][:, k]} for g in measured}
                for k, name in enumerate(outcomes.names)
            }
            if replicates is not None
            else None
        )
        rows = {
            name: [
                summary_with_intervals(s, reps[name].get(s.group), metrics=(metric,), bounds=_BOUNDS)
                if reps is not None and s.sufficient
                else s
                for s in summaries[metric][name]
            ]
            for name in outcomes.names
        }
        gaps = _joint_gaps(metric, rows, reps)
        for name in outcomes.names:
            by_class[name][metric] = GroupedValues(group_by, tuple(rows[name]), {metric: gaps[name]})
    counts_by_group = {
        g: {name: _case_counts(outcomes, rows, k) for k, name in enumerate(outcomes.names)}
        for g, rows in members.items()
    }
    images = {g: int(rows.size) for g, rows in members.items()}
    return SegmentationAnalysis(group_by, by_class, images, counts_by_group, min(images.values()), unit)


def whole_split_means(outcomes: CaseOutcomes) -> dict[str, list[float | None]]:
    """Mean Dice and HD95 of every class over the whole split (``None`` where no case defines it)."""
    rows = np.arange(outcomes.n, dtype=np.intp)
    values = batched_case_means(outcomes, rows, np.ones((1, rows.size), dtype=np.intp))
    return {
        metric: [float(v) if np.isfinite(v) else None for v in values[metric][0]] for metric in SEGMENTATION_METRICS
    }


def case_count_totals(outcomes: CaseOutcomes) -> dict[str, Any]:
    """The whole split's case counts per class (``_COUNTS``)."""
    rows = np.arange(outcomes.n, dtype=np.intp)
    return {name: _case_counts(outcomes, rows, k) for k, name in enumerate(outcomes.names)}
