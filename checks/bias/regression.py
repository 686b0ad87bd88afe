"""Subgroup errors of a regression model: MAE and mean error per output and group, and their gaps.

Per output and group: ``n`` (images with a known target for the output; an image without one,
NaN in the manifest, is left out of that output's metrics and counted), ``mae`` (the mean
absolute error, ``mean |prediction - target|``, as ``sklearn.metrics.mean_absolute_error``;
tested) and ``mean_error`` (``mean (prediction - target)``: positive where the model
over-estimates the group, negative where it under-estimates it; a group whose errors cancel has
a mean error near 0 and a large MAE), both in the output's units.

Gaps per output and grouping, over the groups with at least ``min_group_size`` known targets:

* ``mae``: ``max_g MAE_g - min_g MAE_g`` in the output's units, and ``mean_error``: the range of
  the groups' mean errors in units (a model that over-estimates one group and under-estimates
  another shows here even when their MAEs agree). Intervals: the simultaneous max-type
  bootstrap interval of :mod:`.gaps`, clipped to ``[0, inf)``.
* ``mae_ratio``: ``max_g MAE_g / min_g MAE_g``, unit-free, so that one bound in a shipped policy
  means the same for bone age in months and ejection fraction in percent. Its interval is the
  same simultaneous interval computed on ``log MAE`` and mapped back by ``exp`` (the gap of the
  logs is the log of the ratio), clipped to ``[1, inf)``. A group whose MAE is 0 cannot be
  divided by and is left out of the ratio with that reason.

A regression model has no threshold, so there is no sensitivity, equalized odds or
underdiagnosis. Resampling, intervals and reproducibility are those of :mod:`.multilabel`: one
stratified bootstrap per grouping over patients when known (:mod:`.resample`), every statistic
for every output from one matrix product of the row multiplicities.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.checks.bias.gaps import (
    Bounds,
    Gap,
    GroupedValues,
    GroupSummary,
    gap_interval,
    summary_with_intervals,
    values_gap,
)
from auditkit.checks.bias.metrics import FloatArray, count_text
from auditkit.checks.bias.resample import GroupResampler

__all__ = [
    "REGRESSION_GAP_METRICS",
    "REGRESSION_GROUP_METRICS",
    "RegressionAnalysis",
    "TargetOutcomes",
    "analyse_regression_grouping",
    "batched_errors",
    "ratio_gap",
]

REGRESSION_GROUP_METRICS: tuple[str, ...] = ("n", "mae", "mean_error")
"""Per-group metrics of each output (label ``metric`` of ``bias.group_metric``)."""

REGRESSION_GAP_METRICS: tuple[str, ...] = ("mae", "mean_error", "mae_ratio")
"""Gaps of each output (label ``metric`` of ``bias.max_gap``)."""

UNBOUNDED_ABOVE: Bounds = (0.0, math.inf)
_BOUNDS: dict[str, Bounds | None] = {"mae": UNBOUNDED_ABOVE, "mean_error": None}
_LEVEL = 0.95


@dataclass(frozen=True)
class TargetOutcomes:
    """Predictions and targets of a regression model, ``(N, K)`` for ``K`` outputs.

    Build with :meth:`from_values`.

    Attributes:
        names: the output names.
        predicted: the model's values.
        target: the true values (NaN where unknown).
        known: the target is known.
        table: per-image sums behind every statistic, ``(N, 3K)``: known, ``|error|``, error
            (0 where the target is unknown).
    """

    names: tuple[str, ...]
    predicted: FloatArray
    target: FloatArray
    known: NDArray[np.bool_]
    table: FloatArray

    @classmethod
    def from_values(cls, predicted: ArrayLike, targets: ArrayLike, names: Sequence[str]) -> TargetOutcomes:
        """Outcomes of finite predictions and targets (NaN: unknown), each ``(N, K)`` or ``(N,)``.

        Raises:
            ValueError: the shapes disagree with each other or with ``names``, a prediction is
                not finite, or a target is infinite.
        """
        p = np.asarray(predicted, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64)
        p = p.reshape(-1, 1) if p.ndim == 1 else p
        y = y.reshape(-1, 1) if y.ndim == 1 else y
        k = len(names)
        if p.ndim != 2 or p.shape[1] != k or y.shape != p.shape:
            raise ValueError(
                f"predictions and targets must both have shape (N, {k}) for {k} outputs, got {p.shape} and {y.shape}"
            )
        if not np.isfinite(p).all():
            raise ValueError("predictions must be finite")
        if np.isinf(y).any():
            raise ValueError("targets must be finite or NaN (unknown)")
        known = np.isfinite(y)
        error = np.where(known, p - np.where(known, y, 0.0), 0.0)
        table = np.concatenate([known.astype(np.float64), np.abs(error), error], axis=1)
        return cls(tuple(names), p, y, known, np.ascontiguousarray(table))

    @property
    def n(self) -> int:
        return int(self.predicted.shape[0])

    @property
    def k(self) -> int:
        return len(self.names)


def batched_errors(outcomes: TargetOutcomes, rows: NDArray[np.intp], counts: NDArray[np.intp]) -> dict[str, FloatArray]:
    """``n``, ``mae`` and ``mean_error`` of every output of one group on ``B`` resamples.

    Args:
        outcomes: the predictions and targets.
        rows: the group's rows, ``(m,)``.
        counts: how many times each of them is in each resample, ``(B, m)``.

    Returns:
        metric -> ``(B, K)`` values, NaN where a resample has no known target.
    """
    k = outcomes.k
    sums = np.asarray(counts, dtype=np.float64) @ outcomes.table[rows]
    known, absolute, signed = sums[:, :k], sums[:, k : 2 * k], sums[:, 2 * k :]
    safe = np.where(known > 0, known, 1.0)
    return {
        "n": known,
        "mae": np.where(known > 0, absolute / safe, np.nan),
        "mean_error": np.where(known > 0, signed / safe, np.nan),
    }


def ratio_gap(summaries: Sequence[GroupSummary], replicates: Mapping[str, Mapping[str, FloatArray]] | None) -> Gap:
    """``max MAE / min MAE`` over the comparable groups, with the simultaneous interval on logs."""
    metric = "mae_ratio"
    if len(summaries) == 1:
        only = summaries[0]
        return Gap(
            metric,
            1.0,
            (1.0, 1.0) if replicates is not None else None,
            only.n,
            (only.group,),
            {},
            only.group,
            only.group,
        )
    point: dict[str, float] = {}
    excluded: dict[str, str] = {}
    for summary in summaries:
        value = summary.values.get("mae")
        if value is None:
            excluded[summary.group] = summary.reasons["mae"]
        elif value <= 0.0:
            excluded[summary.group] = "the group's MAE is 0: no ratio to it is defined"
        else:
            point[summary.group] = float(value)
    compared = tuple(sorted(point))
    n = sum(s.n for s in summaries if s.group in point)
    if len(compared) < 2:
        reason = (
            f"fewer than two groups to compare: {len(compared)} of {len(summaries)} groups have"
            " at least min_group_size images and a positive MAE"
        )
        return Gap(metric, None, None, n, compared, excluded, reason=reason)
    lowest = min(compared, key=point.__getitem__)
    highest = max(compared, key=point.__getitem__)
    value = point[highest] / point[lowest]
    logs = {g: {"mae": math.log(v)} for g, v in point.items()}
    log_replicates = None
    if replicates is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            log_replicates = {
                g: {"mae": np.where(replicates[g]["mae"] > 0, np.log(replicates[g]["mae"]), np.nan)} for g in compared
            }
    _, log_ci = gap_interval(logs, log_replicates, ("mae",), bounds=UNBOUNDED_ABOVE, level=_LEVEL)
    ci = None if log_ci is None else (min(math.exp(log_ci[0]), value), max(math.exp(log_ci[1]), value))
    return Gap(metric, value, ci, n, compared, excluded, lowest, highest)


@dataclass(frozen=True)
class RegressionAnalysis:
    """Everything measured for one grouping of a regression model.

    Attributes:
        group_by: the grouping's name.
        outputs: output -> its per-group ``n``, ``mae``, ``mean_error`` and the gaps of
            :data:`REGRESSION_GAP_METRICS`.
        images: group -> its images.
        min_group_size: images in the smallest group.
        unit: the bootstrap's resampling unit (``patient`` or ``image``).
    """

    group_by: str
    outputs: dict[str, GroupedValues]
    images: dict[str, int]
    min_group_size: int
    unit: str


def _summary(group: str, images: int, output: str, values: Mapping[str, float], min_group_size: int) -> GroupSummary:
    known = int(values.get("n", 0.0))
    reason = None
    if images == 0:
        reason = "no images in the group (none in the eval split, or all quarantined)"
    elif known == 0:
        reason = f"no image of the group has a known {output} target"
    elif known < min_group_size:
        reason = (
            f"insufficient: the group has {count_text(known)} images with a known {output} target,"
            f" fewer than min_group_size={min_group_size}"
        )
    if reason is not None:
        empty: dict[str, float | None] = {"n": float(known), "mae": None, "mean_error": None}
        return GroupSummary(group, known, False, empty, {"mae": reason, "mean_error": reason})
    return GroupSummary(
        group, known, True, {"n": float(known), "mae": float(values["mae"]), "mean_error": float(values["mean_error"])}
    )


def analyse_regression_grouping(
    outcomes: TargetOutcomes,
    groups: ArrayLike,
    *,
    group_by: str,
    min_group_size: int = 30,
    n_boot: int = 1000,
    rng: np.random.Generator,
    known_groups: Iterable[str] = (),
    patients: Sequence[str | None] | None = None,
) -> RegressionAnalysis:
    """Per-group errors of every output and their gaps, for one grouping.

    Args:
        outcomes: the predictions and targets, ``N`` images.
        groups: group label per image, ``(N,)``.
        group_by: the grouping's name.
        min_group_size: a group is measured on an output when it has at least this many images
            with a known target for it.
        n_boot: bootstrap resamples; 0 disables intervals.
        rng: the only source of randomness.
        known_groups: further groups, reported with ``n = 0`` when no image belongs to them.
        patients: surrogate patient id per image (``None`` where unknown), or ``None``.

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
        g: {m: v[0] for m, v in batched_errors(outcomes, rows, np.ones((1, rows.size), dtype=np.intp)).items()}
        for g, rows in members.items()
        if rows.size
    }
    summaries = {
        name: [
            _summary(g, int(rows.size), name, {m: float(v[k]) for m, v in point.get(g, {}).items()}, min_group_size)
            for g, rows in members.items()
        ]
        for k, name in enumerate(outcomes.names)
    }
    measured = [g for position, g in enumerate(known) if any(s[position].sufficient for s in summaries.values())]
    unit = "image"
    replicates: dict[str, dict[str, FloatArray]] | None = None
    if n_boot > 0 and measured:
        resampler = GroupResampler.of(labels, measured, patients)
        unit = resampler.unit
        replicates = {g: {m: np.empty((n_boot, outcomes.k)) for m in ("mae", "mean_error")} for g in measured}
        for block, counts in resampler.blocks(n_boot, rng):
            for group in measured:
                values = batched_errors(outcomes, resampler.members[group], counts[group])
                for metric in ("mae", "mean_error"):
                    replicates[group][metric][block] = values[metric]

    outputs: dict[str, GroupedValues] = {}
    for k, name in enumerate(outcomes.names):
        reps = (
            {g: {m: replicates[g][m][:, k] for m in ("mae", "mean_error")} for g in measured}
            if replicates is not None
            else None
        )
        rows = [
            summary_with_intervals(s, reps.get(s.group), metrics=("mae", "mean_error"), bounds=_BOUNDS)
            if reps is not None and s.sufficient
            else s
            for s in summaries[name]
        ]
        outputs[name] = GroupedValues(
            group_by,
            tuple(rows),
            {
                "mae": values_gap("mae", ("mae",), rows, reps, bounds=UNBOUNDED_ABOVE),
                "mean_error": values_gap("mean_error", ("mean_error",), rows, reps, bounds=UNBOUNDED_ABOVE),
                "mae_ratio": ratio_gap(rows, reps),
            },
        )
    images = {g: int(rows.size) for g, rows in members.items()}
    return RegressionAnalysis(group_by, outputs, images, min(images.values()), unit)
