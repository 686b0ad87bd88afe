"""Between-group gaps of one grouping and their simultaneous bootstrap intervals.

A *grouping* is one group column (``sex``) or the intersection of two (``sex×site``).
:func:`analyse_grouping` gives every group's metrics (:mod:`.metrics`), with 95% bootstrap
intervals (the median-centred percentile interval of :func:`auditkit.stats.median_centred_interval`,
which contains the group's value even where the resampled metric is biased, such as the ECE of a
small group), and per metric the largest gap between groups, with a 95% interval.

Which groups are compared: those with at least ``min_group_size`` images and a defined value of
the metric. Smaller groups are *insufficient*: their ``n`` is reported, every other value is
undefined with that reason and they are never compared. A grouping with a single group has zero
gaps; one with fewer than two comparable groups has undefined gaps, with the reason.

Resampling: one seeded bootstrap per grouping (Efron & Tibshirani 1993), stratified by group and
class, so every resample keeps each group's size and class counts (a group's sensitivity is
defined in every resample when it is in the data). Group strata are numbered by first occurrence,
not by name, so renaming groups leaves the resamples, hence every interval, unchanged.

Gap interval: the gap of a metric is ``max_g m_g - min_g m_g``. A plain percentile interval of
``max - min`` is biased upwards (the largest of several noisy values overshoots the largest true
value): in simulation, six equal groups of 30 positives give a percentile lower end above 0.10
in most draws although the true gap is 0, which would fail fair models. The interval here is the
simultaneous (max-type) bootstrap interval of all pairwise differences (Beran 1988, "Balanced
simultaneous confidence sets", JASA 83(403); Westfall & Young 1993, "Resampling-Based Multiple
Testing"): with ``c`` the 95th percentile of the bootstrap range of centred group deviations
``max_g (m*_g - m_g) - min_g (m*_g - m_g)``, every pairwise difference lies within ``c`` of its
estimate with 95% confidence, so the gap lies in ``[gap - c, gap + c]``, clipped to ``[0, 1]``.
For two groups this is the symmetric basic bootstrap interval of ``|m_1 - m_2|``; for more groups
it is conservative (coverage above 95%).

Equalized odds (Hardt, Price & Srebro 2016, "Equality of Opportunity in Supervised Learning",
NeurIPS): the larger of the between-group ranges of the true-positive rate (sensitivity) and the
false-positive rate (one minus specificity), over the groups that hold both classes. This is
``fairlearn.metrics.equalized_odds_difference`` (``method="between_groups"``) on those groups,
and the demographic-parity difference (range of the selection rate) is
``fairlearn.metrics.demographic_parity_difference`` (both tested); they are computed from the
MetricFrame's per-group values so that they share the groups and intervals of the other gaps.
The equalized-odds interval takes the larger range of the two rates in each resample.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.checks.bias.metrics import (
    DESCRIPTIVE,
    GAP_METRICS,
    GROUP_METRICS,
    LOWER_IS_BETTER,
    FloatArray,
    IntArray,
    Outcomes,
    batched_group_metrics,
    count_text,
    metric_frame,
)
from auditkit.stats import bootstrap_indices, median_centred_interval, percentile_interval

__all__ = [
    "EQUALIZED_ODDS_RATES",
    "RATE_BOUNDS",
    "Bounds",
    "Gap",
    "GroupSummary",
    "GroupedValues",
    "GroupingAnalysis",
    "Interval",
    "analyse_grouping",
    "bootstrap_group_metrics",
    "gap_interval",
    "joint_gap_intervals",
    "summary_with_intervals",
    "undefined_reason",
    "values_gap",
]

Interval = tuple[float, float] | None
Bounds = tuple[float, float]

RATE_BOUNDS: Bounds = (0.0, 1.0)
"""The range of a rate or an ECE, and of their gaps."""

EQUALIZED_ODDS_RATES: tuple[str, str] = ("sensitivity", "specificity")
"""Per-group rates whose ranges make the equalized-odds difference (range of FPR = of TNR)."""

_LEVEL = 0.95
# Bounds the elements of one bootstrap index block (as auditkit.stats does): ~128 MiB.
_MAX_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class GroupSummary:
    """The metrics of one group.

    Attributes:
        group: the group label.
        n: images in the group (0 for a group known only from quarantined files, or an empty
            intersection cell).
        sufficient: ``n >= min_group_size``; only sufficient groups get values and intervals.
        values: metric -> value, ``None`` where undefined (see ``reasons``); ``n`` is always set.
        reasons: metric -> why it is undefined.
        cis: metric -> 95% median-centred bootstrap interval (absent: not computed).
    """

    group: str
    n: int
    sufficient: bool
    values: dict[str, float | None]
    reasons: dict[str, str] = field(default_factory=dict)
    cis: dict[str, Interval] = field(default_factory=dict)


@dataclass(frozen=True)
class Gap:
    """The largest between-group difference of a metric, or an equalized-odds/parity value.

    Attributes:
        metric: a :data:`~.metrics.GAP_METRICS` name, ``equalized_odds_difference`` or
            ``demographic_parity_difference``.
        value: the gap, ``None`` when undefined (see ``reason``).
        ci: 95% simultaneous bootstrap interval, within ``[0, 1]`` for rates (within
            ``[0, inf)`` for a regression error gap in the output's units, ``[1, inf)`` for a
            ratio of errors).
        n: images in the compared groups.
        compared: the groups compared, in label order.
        excluded: group -> why it was not compared (too small, metric undefined).
        lowest: the compared group with the lowest value (single-metric gaps only).
        highest: the compared group with the highest value (single-metric gaps only).
        reason: why the gap is undefined.
    """

    metric: str
    value: float | None
    ci: Interval
    n: int
    compared: tuple[str, ...]
    excluded: dict[str, str]
    lowest: str | None = None
    highest: str | None = None
    reason: str | None = None

    @property
    def worst(self) -> str | None:
        """The compared group faring worst (the highest ECE, else the lowest value)."""
        return self.highest if self.metric in LOWER_IS_BETTER else self.lowest

    @property
    def best(self) -> str | None:
        """The compared group faring best."""
        return self.lowest if self.metric in LOWER_IS_BETTER else self.highest


@dataclass(frozen=True)
class GroupingAnalysis:
    """Everything measured for one grouping.

    Attributes:
        group_by: the grouping's name (``sex``, or ``sex×site``).
        groups: one summary per group, in label order.
        gaps: metric -> :class:`Gap`, for every metric of :data:`~.metrics.GAP_METRICS`.
        equalized_odds: the equalized-odds difference.
        demographic_parity: the demographic-parity difference.
        min_group_size: images in the smallest group (0 when a known group has none).
    """

    group_by: str
    groups: tuple[GroupSummary, ...]
    gaps: dict[str, Gap]
    equalized_odds: Gap
    demographic_parity: Gap
    min_group_size: int


@dataclass(frozen=True)
class GroupedValues:
    """Per-group values and their gaps for one grouping, outside the classifier's metric set.

    The underdiagnosis rate of a multi-label model and the errors of one regression output.

    Attributes:
        group_by: the grouping's name.
        groups: one summary per group, in label order.
        gaps: metric -> :class:`Gap`.
    """

    group_by: str
    groups: tuple[GroupSummary, ...]
    gaps: dict[str, Gap]


# --------------------------------------------------------------------------------------------
# Bootstrap and intervals


def _first_occurrence_codes(labels: NDArray[np.str_]) -> IntArray:
    """Integer codes numbering labels by first occurrence, so renaming groups keeps the codes."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return np.asarray(rank[inverse.ravel()], dtype=np.int64)


def bootstrap_group_metrics(
    outcomes: Outcomes,
    groups: ArrayLike,
    *,
    n_boot: int,
    rng: np.random.Generator,
    include: Iterable[str] | None = None,
) -> dict[str, dict[str, FloatArray]]:
    """Bootstrap replicates of every group metric, resampling within group and class.

    Args:
        outcomes: per-image outcomes, ``N`` images.
        groups: group label of each image, shape ``(N,)``.
        n_boot: number of resamples (at least 1).
        rng: the only source of randomness.
        include: the groups to compute (default: every group present).

    Returns:
        group -> metric -> ``(n_boot,)`` replicates (NaN where undefined on a resample).

    Raises:
        ValueError: ``groups`` has the wrong shape, ``n_boot < 1`` or an included group is
            absent.
    """
    labels = np.asarray(groups).astype(str)
    if labels.shape != (outcomes.n,):
        raise ValueError(f"groups must have shape ({outcomes.n},), got {labels.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    wanted = sorted(set(labels.tolist()) if include is None else set(include))
    members = {g: np.flatnonzero(labels == g) for g in wanted}
    empty = [g for g, rows in members.items() if rows.size == 0]
    if empty:
        raise ValueError(f"groups {empty} have no images; present are {sorted(set(labels))}")
    n_classes = int(outcomes.labels.max()) + 1 if outcomes.n else 1
    strata = _first_occurrence_codes(labels) * n_classes + outcomes.labels
    replicates = {g: {m: np.empty(n_boot) for m in GROUP_METRICS} for g in wanted}
    block = max(1, min(n_boot, _MAX_BLOCK_ELEMENTS // max(1, outcomes.n)))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        idx = bootstrap_indices(outcomes.n, n_boot=size, rng=rng, strata=strata)
        for group in wanted:
            for metric, values in batched_group_metrics(outcomes, idx[:, members[group]]).items():
                replicates[group][metric][start : start + size] = values
    return replicates


def gap_interval(
    point: Mapping[str, Mapping[str, float]],
    replicates: Mapping[str, Mapping[str, FloatArray]] | None,
    quantities: Sequence[str],
    *,
    level: float = _LEVEL,
    bounds: Bounds = RATE_BOUNDS,
) -> tuple[float, Interval]:
    """The gap of ``quantities`` over the groups of ``point`` and its simultaneous interval.

    The gap is the largest between-group range ``max_g m_g - min_g m_g`` over ``quantities``
    (one metric, or the two rates of equalized odds). The interval is ``[gap - c, gap + c]``
    clipped to ``bounds`` (``[0, 1]`` for rates), with ``c`` the ``level`` quantile over resamples of the largest range
    of the centred deviations ``m*_g - m_g`` (see the module docstring).

    Args:
        point: group -> quantity -> estimate, for the compared groups (at least one).
        replicates: group -> quantity -> bootstrap replicates; ``None``: no interval.
        quantities: the quantities whose ranges are compared.
        level: coverage of the interval.
        bounds: the range of the gap (``(0, inf)`` for a difference of errors in units).

    Returns:
        ``(gap, interval)``; the interval is ``None`` without replicates or when more than 10%
        of the resamples leave a quantity undefined.

    Raises:
        ValueError: ``point`` is empty, ``quantities`` is empty or ``level`` is not in (0, 1).
    """
    if not point or not quantities:
        raise ValueError(f"need groups and quantities, got {len(point)} groups and {list(quantities)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    groups = sorted(point)
    gap = max(max(point[g][q] for g in groups) - min(point[g][q] for g in groups) for q in quantities)
    if replicates is None:
        return gap, None
    largest = _centred_ranges(point, replicates, quantities)
    quantiles = percentile_interval(largest, alpha=2.0 * (1.0 - level))
    if quantiles is None:
        return gap, None
    critical = quantiles[1]
    return gap, (max(bounds[0], gap - critical), min(bounds[1], gap + critical))


def _centred_ranges(
    point: Mapping[str, Mapping[str, float]],
    replicates: Mapping[str, Mapping[str, FloatArray]],
    quantities: Sequence[str],
) -> FloatArray:
    """Per resample, the largest range over ``quantities`` of the centred group deviations."""
    groups = sorted(point)
    ranges = []
    for quantity in quantities:
        deviations = np.stack([replicates[g][quantity] - point[g][quantity] for g in groups], axis=1)
        ranges.append(deviations.max(axis=1) - deviations.min(axis=1))
    return np.asarray(np.max(np.stack(ranges, axis=1), axis=1), dtype=np.float64)


def joint_gap_intervals(
    points: Mapping[str, Mapping[str, Mapping[str, float]]],
    replicates: Mapping[str, Mapping[str, Mapping[str, FloatArray]]],
    quantities: Sequence[str],
    *,
    level: float = _LEVEL,
    bounds: Bounds = RATE_BOUNDS,
) -> dict[str, tuple[float, Interval]]:
    """Gaps of several families (the labels of a multi-label model) with intervals that hold for
    every family and every pair of groups at once.

    Per family ``f`` (its compared groups in ``points[f]``, at least two), :func:`gap_interval`
    would give ``gap_f +- c_f`` with ``c_f`` the ``level`` quantile of the family's bootstrap range
    ``R_f`` of centred deviations: each interval covers its own family at ``level``, so with many
    families one of them misses by chance far more often than ``1 - level`` (on simulated fair
    14-label models with eight intersection cells, a per-label ten-point rule on the intervals'
    lower ends failed 3 of 20). Here every family's range is scaled by its own critical value and
    the scaled ranges are maximised over families, ``T = max_f R_f / c_f``; with ``k`` the
    ``level`` quantile of ``T`` (at least 1), the interval is ``gap_f +- k c_f``: the max-type
    simultaneous interval of the module docstring, balanced across families by the scaling so
    that a rare label with a wide interval does not widen a common label's (in the spirit of
    Beran 1988's balanced simultaneous confidence sets). With one family ``k = 1`` and this is
    :func:`gap_interval`. A family whose critical value is 0 (every compared rate 0 or 1 in
    almost every resample) keeps its degenerate interval and does not enter ``T``; a family with
    more than 10% undefined resamples gets no interval.

    Args:
        points: family -> group -> quantity -> estimate, for the compared groups.
        replicates: family -> group -> quantity -> bootstrap replicates (one draw for all).
        quantities: the quantities whose ranges are compared.
        level: joint coverage.
        bounds: the range of a gap.

    Returns:
        family -> ``(gap, interval)``.
    """
    alpha = 2.0 * (1.0 - level)
    gaps: dict[str, float] = {}
    ranges: dict[str, FloatArray] = {}
    critical: dict[str, float | None] = {}
    for family, point in points.items():
        groups = sorted(point)
        gaps[family] = max(max(point[g][q] for g in groups) - min(point[g][q] for g in groups) for q in quantities)
        ranges[family] = _centred_ranges(point, replicates[family], quantities)
        quantiles = percentile_interval(ranges[family], alpha=alpha)
        critical[family] = None if quantiles is None else quantiles[1]
    scaled = [ranges[f] / c for f, c in critical.items() if c is not None and c > 0.0]
    factor = 1.0
    if scaled:
        with np.errstate(invalid="ignore"):
            stacked = np.stack(scaled, axis=1)
            defined = np.isfinite(stacked).any(axis=1)
            largest = np.where(defined, np.nanmax(np.where(np.isfinite(stacked), stacked, -np.inf), axis=1), np.nan)
        joint = percentile_interval(largest, alpha=alpha)
        factor = max(1.0, joint[1]) if joint is not None else math.inf
    out: dict[str, tuple[float, Interval]] = {}
    for family, gap in gaps.items():
        c = critical[family]
        if c is None or not math.isfinite(factor * c):
            out[family] = (gap, None)
        else:
            out[family] = (gap, (max(bounds[0], gap - factor * c), min(bounds[1], gap + factor * c)))
    return out


# --------------------------------------------------------------------------------------------
# One grouping


def undefined_reason(metric: str, positives: int, positive: str) -> str:
    """Why a metric of a group of sufficient size is undefined."""
    reasons = {
        "sensitivity": f"no positive ({positive}) images in the group",
        "specificity": f"no negative (not {positive}) images in the group",
        "ppv": f"no image of the group is predicted {positive}",
        "npv": f"every image of the group is predicted {positive}",
        "auroc": "AUROC needs both classes; the group has no "
        + ("positive" if positives == 0 else "negative")
        + " images",
    }
    return reasons.get(metric, f"{metric} is undefined on this group")


def _summaries(
    outcomes: Outcomes,
    labels: NDArray[np.str_],
    known: Sequence[str],
    *,
    group_by: str,
    min_group_size: int,
    positive: str,
) -> list[GroupSummary]:
    table: dict[str, dict[str, float]] = {}
    if labels.size:
        frame = metric_frame(outcomes, labels, group_by=group_by).by_group
        table = {str(g): {str(k): float(v) for k, v in row.items()} for g, row in frame.iterrows()}
    out: list[GroupSummary] = []
    for group in known:
        members = labels == group
        n = int(members.sum())
        if n < min_group_size or n == 0:
            reason = (
                "no images in the group (none in the eval split, or all quarantined)"
                if n == 0
                else f"insufficient: the group has {count_text(n)} images, fewer than min_group_size={min_group_size}"
            )
            values: dict[str, float | None] = dict.fromkeys(GROUP_METRICS)
            values["n"] = float(n)
            reasons = {m: reason for m in GROUP_METRICS if m != "n"}
            out.append(GroupSummary(group, n, False, values, reasons))
            continue
        positives = int(outcomes.y_true[members].sum())
        values, reasons = {}, {}
        for metric in GROUP_METRICS:
            value = table[group][metric]
            values[metric] = value if np.isfinite(value) else None
            if values[metric] is None:
                reasons[metric] = undefined_reason(metric, positives, positive)
        out.append(GroupSummary(group, n, True, values, reasons))
    return out


def summary_with_intervals(
    summary: GroupSummary,
    replicates: Mapping[str, FloatArray] | None,
    metrics: Iterable[str] = GROUP_METRICS,
    bounds: Mapping[str, Bounds | None] | None = None,
) -> GroupSummary:
    """The summary with 95% intervals of its defined, non-descriptive metrics, around their values.

    Args:
        summary: the group's values.
        replicates: metric -> bootstrap replicates; ``None``: no intervals.
        metrics: the metrics to give intervals (descriptive ones, ``n`` and ``prevalence``, never).
        bounds: metric -> its range (missing: ``[0, 1]``, a rate or an ECE; ``None``: unbounded).
    """
    if replicates is None:
        return summary
    ranges = bounds or {}
    cis = {
        metric: median_centred_interval(
            replicates[metric],
            float(summary.values[metric] or 0.0),
            alpha=1.0 - _LEVEL,
            bounds=ranges.get(metric, RATE_BOUNDS),
        )
        for metric in metrics
        if metric not in DESCRIPTIVE and summary.values[metric] is not None
    }
    return dataclasses.replace(summary, cis=cis)


def values_gap(
    metric: str,
    quantities: Sequence[str],
    summaries: Sequence[GroupSummary],
    replicates: Mapping[str, Mapping[str, FloatArray]] | None,
    *,
    bounds: Bounds = RATE_BOUNDS,
) -> Gap:
    """The gap of ``quantities`` over the sufficient groups where all of them are defined.

    ``bounds`` is the range of the gap (see :func:`gap_interval`)."""
    if len(summaries) == 1:
        only = summaries[0]
        ci: Interval = (0.0, 0.0) if replicates is not None else None
        return Gap(metric, 0.0, ci, only.n, (only.group,), {}, only.group, only.group)
    point: dict[str, dict[str, float]] = {}
    excluded: dict[str, str] = {}
    for summary in summaries:
        missing = [q for q in quantities if summary.values[q] is None]
        if missing:
            excluded[summary.group] = summary.reasons[missing[0]]
        else:
            point[summary.group] = {q: float(summary.values[q] or 0.0) for q in quantities}
    compared = tuple(sorted(point))
    n = sum(s.n for s in summaries if s.group in point)
    if len(compared) < 2:
        reason = (
            f"fewer than two groups to compare: {len(compared)} of {len(summaries)} groups have"
            f" at least min_group_size images and a defined {' and '.join(quantities)}"
        )
        return Gap(metric, None, None, n, compared, excluded, reason=reason)
    value, ci = gap_interval(point, replicates, quantities, bounds=bounds)
    lowest = highest = None
    if len(quantities) == 1:
        (quantity,) = quantities
        lowest = min(compared, key=lambda g: point[g][quantity])
        highest = max(compared, key=lambda g: point[g][quantity])
    return Gap(metric, value, ci, n, compared, excluded, lowest, highest)


def analyse_grouping(
    outcomes: Outcomes,
    groups: ArrayLike,
    *,
    group_by: str,
    min_group_size: int = 30,
    n_boot: int = 1000,
    rng: np.random.Generator,
    known_groups: Iterable[str] = (),
    positive: str = "positive",
) -> GroupingAnalysis:
    """Per-group metrics, gaps, equalized-odds and demographic-parity differences of a grouping.

    Args:
        outcomes: per-image outcomes, ``N`` images.
        groups: group label of each image, shape ``(N,)``.
        group_by: the grouping's name (a column, or two joined by ``×``).
        min_group_size: groups with fewer images are insufficient: ``n`` only, every other
            metric undefined with that reason, never compared.
        n_boot: bootstrap resamples (stratified by group and class); 0 disables intervals.
        rng: the only source of randomness; the same state gives the same intervals.
        known_groups: further groups, reported with ``n = 0`` when no image belongs to them
            (all their files quarantined, or an empty intersection cell).
        positive: the positive class's name, for the reasons of undefined values.

    Returns:
        The :class:`GroupingAnalysis`.

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
    summaries = _summaries(outcomes, labels, known, group_by=group_by, min_group_size=min_group_size, positive=positive)
    sufficient = [s for s in summaries if s.sufficient]
    replicates = None
    if n_boot > 0 and sufficient:
        replicates = bootstrap_group_metrics(
            outcomes, labels, n_boot=n_boot, rng=rng, include=[s.group for s in sufficient]
        )
        summaries = [summary_with_intervals(s, replicates.get(s.group)) for s in summaries]
    return GroupingAnalysis(
        group_by=group_by,
        groups=tuple(summaries),
        gaps={m: values_gap(m, (m,), summaries, replicates) for m in GAP_METRICS},
        equalized_odds=values_gap("equalized_odds_difference", EQUALIZED_ODDS_RATES, summaries, replicates),
        demographic_parity=values_gap("demographic_parity_difference", ("selection_rate",), summaries, replicates),
        min_group_size=min(s.n for s in summaries),
    )
