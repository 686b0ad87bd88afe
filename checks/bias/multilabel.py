"""Subgroup metrics of a multi-label model: per label and group, and underdiagnosis per group.

Per label (:class:`LabelOutcomes`): a multi-label model gives each label an independent sigmoid
probability; the label is *called* when its probability reaches the label's threshold
(``model.operating_point``, 0.5 for a label it does not name), as the performance check decides.
Every metric of :data:`~.metrics.GROUP_METRICS` is then the binary metric of that label, over
the images whose entry for it is known (an unknown entry, ``-1``, is left out of that label's
metrics only, and counted): ``n`` the images with a known entry, ``prevalence``, ``accuracy``
(of the call), ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``selection_rate`` (the share
called), ``auroc`` (of the probability) and ``ece``, the label's binary expected calibration
error: equal-width bins of the probability over ``[0, 1]`` (``bins`` of them), each weighted by
its share of images, ``sum_b |sum_{i in b} (y_i - p_i)| / n`` with ``p`` clipped to
``[eps, 1 - eps]`` as netcal does (netcal's ``ECE`` on the probabilities of one label; tested).

Underdiagnosis (Seyyed-Kalantari, Zhang, McDermott, Chen & Ghassemi 2021, "Underdiagnosis bias
of artificial intelligence algorithms applied to chest radiographs in under-served patient
populations", Nature Medicine 27): the share of the images *with at least one true finding* that
the model calls *finding-free*, i.e. would send home as normal. The paper measures it as the
false-positive rate of the "No Finding" label; both of its readings are supported:

* with ``no_finding`` naming one of the labels (CheXpert's and MIMIC-CXR's "No Finding"), an
  image has a finding when that label's truth is 0 and is called finding-free when that label's
  probability reaches its threshold: exactly the paper's FPR of No Finding. An image whose
  ``no_finding`` entry is unknown is left out (counted), whatever its other labels say: the
  paper's denominator is the images with a known No Finding label.
* without it, an image has a finding when any of its *known* entries is 1 and is called
  finding-free when *every* label's probability stays below its threshold (including labels
  whose truth is unknown: the call is the model's, the truth is not needed). An image with no
  known positive entry but some unknown ones is left out (counted): it may or may not have a
  finding, and counting it as finding-free would be a guess. Images whose entries are all known
  and all 0 are finding-free; they are outside the rate's denominator either way, but count
  towards the group's measured images.

Either way, the images behind the rate (``n``) are those whose finding status is known: the
denominator is the part of them with a finding, and the intervals carry its size. A group in
which findings were more often left unlabelled is measured on fewer images; the
``underdiagnosis`` finding says how many were left out per group.

Gaps: per label, as the classifier's (:mod:`.gaps`), but with intervals simultaneous over the
labels as well as the groups (:func:`~.gaps.joint_gap_intervals`): with one 95% interval per
label, a fair 14-label model shows some label's sensitivity gap "demonstrated" far more often
than 5% of the time (3 of 20 simulated fair models with eight intersection cells failed a
ten-point rule on the per-label intervals' lower ends; none with the joint intervals).

Every statistic is a sum over a group's rows, so one matrix product of the bootstrap's row
multiplicities (:mod:`.resample`) with a per-image table gives it for every resample and every
label at once; the AUROC is computed from the same multiplicities with each label's scores
sorted once (:func:`auditkit.stats.auroc_from_counts`). The point estimates are the same code on
the identity resample; they equal scikit-learn's, fairlearn's and netcal's (tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.checks.bias.gaps import (
    EQUALIZED_ODDS_RATES,
    Gap,
    GroupedValues,
    GroupingAnalysis,
    GroupSummary,
    joint_gap_intervals,
    summary_with_intervals,
    undefined_reason,
    values_gap,
)
from auditkit.checks.bias.metrics import GAP_METRICS, GROUP_METRICS, FloatArray, count_text
from auditkit.checks.bias.resample import GroupResampler
from auditkit.stats import auroc_from_counts

__all__ = [
    "UNDERDIAGNOSIS",
    "LabelOutcomes",
    "MultilabelAnalysis",
    "analyse_multilabel_grouping",
    "batched_label_metrics",
]

UNDERDIAGNOSIS = "underdiagnosis_rate"
"""The metric name of the underdiagnosis rate (``bias.underdiagnosis_rate``, and the ``metric``
label of its ``bias.max_gap``)."""

BoolArray = NDArray[np.bool_]

_EPS = float(np.finfo(np.float64).eps)
# Column blocks of LabelOutcomes.table, each K wide: known, positive, called, TP, TN.
_BLOCKS = 5


@dataclass(frozen=True)
class LabelOutcomes:
    """Per-image, per-label quantities of a multi-label model (arrays ``(N, K)`` or ``(N,)``).

    Build with :meth:`from_probs`.

    Attributes:
        names: the label names, ``K`` of them.
        thresholds: each label's decision threshold, ``(K,)``.
        score: the sigmoid probabilities.
        known: the entry's truth is known (1 or 0).
        positive: the entry's truth is 1.
        called: the probability reaches the label's threshold.
        has_finding: the image has a true finding (see the module docstring).
        determined: the image's finding status is known.
        called_finding_free: the model calls the image finding-free.
        table: per-image sums behind every statistic, ``(N, 5K + K * bins + 3)``.
        bins: ECE bins.
        no_finding: the label that means "no finding", if one is named.
    """

    names: tuple[str, ...]
    thresholds: FloatArray
    score: FloatArray
    known: BoolArray
    positive: BoolArray
    called: BoolArray
    has_finding: BoolArray
    determined: BoolArray
    called_finding_free: BoolArray
    table: FloatArray
    bins: int
    no_finding: str | None

    @classmethod
    def from_probs(
        cls,
        probs: ArrayLike,
        labels: ArrayLike,
        names: Sequence[str],
        thresholds: Mapping[str, float] | None = None,
        *,
        no_finding: str | None = None,
        bins: int = 15,
    ) -> LabelOutcomes:
        """Outcomes of ``(N, K)`` probabilities and ``(N, K)`` labels of 1, 0 and -1 (unknown).

        Args:
            probs: finite probabilities in ``[0, 1]``.
            labels: 1 (present), 0 (absent) or -1 (unknown) per image and label.
            names: the ``K`` label names.
            thresholds: label -> decision threshold; labels not named decide at 0.5.
            no_finding: the label meaning "no finding" (see the module docstring), or ``None``.
            bins: equal-width bins of the per-label ECE, at least 1.

        Raises:
            ValueError: a shape, value, name, threshold or bin count is invalid.
        """
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(labels)
        k = len(names)
        if p.ndim != 2 or p.shape[1] != k or y.shape != p.shape:
            raise ValueError(
                f"probs and labels must both have shape (N, {k}) for {k} labels, got {p.shape} and {y.shape}"
            )
        if not np.isfinite(p).all() or (p.size and (p.min() < 0.0 or p.max() > 1.0)):
            raise ValueError("probs must be finite probabilities in [0, 1]")
        if y.size and not np.isin(y, (-1, 0, 1)).all():
            raise ValueError(f"labels must be 1, 0 or -1 (unknown), got values {sorted(set(np.unique(y).tolist()))}")
        if isinstance(bins, bool) or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins!r}")
        given = dict(thresholds or {})
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"thresholds name {unknown}, which are not labels {list(names)}")
        if no_finding is not None and no_finding not in names:
            raise ValueError(f"no_finding {no_finding!r} is not one of the labels {list(names)}")
        t = np.array([float(given.get(name, 0.5)) for name in names], dtype=np.float64)
        if np.any((t <= 0.0) | (t >= 1.0)):
            raise ValueError(f"thresholds must be in (0, 1), got {dict(zip(names, t.tolist(), strict=True))}")

        known = y != -1
        positive = y == 1
        called = p >= t[None, :]
        if no_finding is None:
            has_finding = (positive & known).any(axis=1)
            determined = has_finding | known.all(axis=1)
            called_free = np.asarray(~called.any(axis=1), dtype=bool)
        else:
            j = list(names).index(no_finding)
            determined = known[:, j].copy()
            has_finding = determined & (y[:, j] == 0)
            called_free = called[:, j].copy()

        n = p.shape[0]
        clipped = np.clip(p, _EPS, 1.0 - _EPS)
        edges = np.linspace(0.0, 1.0, bins + 1)
        ece_bin = np.clip(np.searchsorted(edges, clipped, side="right") - 1, 0, bins - 1)
        residual = np.where(known, positive.astype(np.float64) - clipped, 0.0)
        ece_table = np.zeros((n, k * bins))
        rows = np.repeat(np.arange(n), k)
        ece_table[rows, (np.arange(k)[None, :] * bins + ece_bin).ravel()] = residual.ravel()
        blocks = [
            known,
            positive & known,
            called & known,
            positive & called & known,
            ~positive & ~called & known,
        ]
        status = np.stack([has_finding, has_finding & called_free, determined], axis=1)
        table = np.concatenate([*(b.astype(np.float64) for b in blocks), ece_table, status.astype(np.float64)], axis=1)
        return cls(
            names=tuple(names),
            thresholds=t,
            score=p,
            known=known,
            positive=positive,
            called=called,
            has_finding=has_finding,
            determined=determined,
            called_finding_free=called_free,
            table=np.ascontiguousarray(table),
            bins=int(bins),
            no_finding=no_finding,
        )

    @property
    def n(self) -> int:
        return int(self.score.shape[0])

    @property
    def k(self) -> int:
        return len(self.names)


def batched_label_metrics(
    outcomes: LabelOutcomes, rows: NDArray[np.intp], counts: NDArray[np.intp]
) -> tuple[dict[str, FloatArray], FloatArray]:
    """Every per-label metric and the underdiagnosis rate of one group on ``B`` resamples.

    Args:
        outcomes: the per-image quantities.
        rows: the group's rows, ``(m,)``.
        counts: how many times each of them is in each resample, ``(B, m)`` (the identity
            resample: ones).

    Returns:
        (metric -> ``(B, K)`` values, NaN where undefined; underdiagnosis rate ``(B,)``).
    """
    k, bins = outcomes.k, outcomes.bins
    weights = np.asarray(counts, dtype=np.float64)
    sums = weights @ outcomes.table[rows]
    known, positives, called, tp, tn = (sums[:, i * k : (i + 1) * k] for i in range(_BLOCKS))
    ece_sums = sums[:, _BLOCKS * k : _BLOCKS * k + k * bins].reshape(-1, k, bins)
    with_finding, missed, _ = (sums[:, -3 + i] for i in range(3))
    negatives = known - positives

    def ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)

    auroc = np.full_like(known, np.nan)
    group_counts = np.asarray(counts, dtype=np.intp)
    for label in range(k):
        mask = outcomes.known[rows, label]
        if not mask.any():
            continue
        truth = outcomes.positive[rows, label][mask]
        if truth.all() or not truth.any():
            continue
        auroc[:, label] = auroc_from_counts(outcomes.score[rows, label][mask], truth, group_counts[:, mask])
    metrics = {
        "n": known,
        "prevalence": ratio(positives, known),
        "accuracy": ratio(tp + tn, known),
        "sensitivity": ratio(tp, positives),
        "specificity": ratio(tn, negatives),
        "ppv": ratio(tp, called),
        "npv": ratio(tn, known - called),
        "selection_rate": ratio(called, known),
        "auroc": auroc,
        "ece": ratio(np.abs(ece_sums).sum(axis=2), known),
    }
    return metrics, ratio(missed, with_finding)


@dataclass(frozen=True)
class MultilabelAnalysis:
    """Everything measured for one grouping of a multi-label model.

    Attributes:
        group_by: the grouping's name.
        labels: label -> its per-group metrics and gaps (the classifier's analysis, per label).
        underdiagnosis: the underdiagnosis rate per group and its gap (metric
            :data:`UNDERDIAGNOSIS`).
        images: group -> its images.
        status: group -> ``with_finding``, ``called_finding_free`` (of those) and
            ``undetermined`` (left out: finding status unknown) image counts.
        min_group_size: images in the smallest group.
        unit: the bootstrap's resampling unit (``patient`` or ``image``).
    """

    group_by: str
    labels: dict[str, GroupingAnalysis]
    underdiagnosis: GroupedValues
    images: dict[str, int]
    status: dict[str, dict[str, int]]
    min_group_size: int
    unit: str


def _insufficient(metrics: Iterable[str], n: int, reason: str, group: str) -> GroupSummary:
    names = list(metrics)
    values: dict[str, float | None] = dict.fromkeys(names)
    values["n"] = float(n)
    return GroupSummary(group, n, False, values, {m: reason for m in names if m != "n"})


def _label_summary(
    group: str, images: int, label: str, values: Mapping[str, float], positives: int, min_group_size: int
) -> GroupSummary:
    known = int(values["n"])
    if images == 0:
        return _insufficient(
            GROUP_METRICS, 0, "no images in the group (none in the eval split, or all quarantined)", group
        )
    if known == 0:
        return _insufficient(GROUP_METRICS, 0, f"no image of the group has a known {label} entry", group)
    if known < min_group_size:
        reason = (
            f"insufficient: the group has {count_text(known)} images with a known {label} entry,"
            f" fewer than min_group_size={min_group_size}"
        )
        return _insufficient(GROUP_METRICS, known, reason, group)
    out: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for metric in GROUP_METRICS:
        value = float(values[metric])
        out[metric] = value if np.isfinite(value) else None
        if out[metric] is None:
            reasons[metric] = undefined_reason(metric, positives, label)
    return GroupSummary(group, known, True, out, reasons)


def _underdiagnosis_summary(group: str, images: int, determined: int, rate: float, min_group_size: int) -> GroupSummary:
    metrics = ("n", UNDERDIAGNOSIS)
    if images == 0:
        return _insufficient(metrics, 0, "no images in the group (none in the eval split, or all quarantined)", group)
    if determined < min_group_size:
        reason = (
            f"insufficient: the group has {count_text(determined)} images whose finding status is known,"
            f" fewer than min_group_size={min_group_size}"
        )
        return _insufficient(metrics, determined, reason, group)
    if not np.isfinite(rate):
        values: dict[str, float | None] = {"n": float(determined), UNDERDIAGNOSIS: None}
        return GroupSummary(group, determined, True, values, {UNDERDIAGNOSIS: "no image of the group has a finding"})
    return GroupSummary(group, determined, True, {"n": float(determined), UNDERDIAGNOSIS: float(rate)})


def _joint_gaps(
    metric: str,
    quantities: Sequence[str],
    summaries: Mapping[str, Sequence[GroupSummary]],
    replicates: Mapping[str, Mapping[str, Mapping[str, FloatArray]]] | None,
) -> dict[str, Gap]:
    """Label -> the gap of ``quantities``, with intervals simultaneous over labels and groups."""
    gaps = {label: values_gap(metric, quantities, rows, None) for label, rows in summaries.items()}
    if replicates is None:
        return gaps
    points: dict[str, dict[str, dict[str, float]]] = {}
    for label, gap in gaps.items():
        if gap.value is None:
            continue
        if len(gap.compared) < 2:  # a single group: no gap, exactly
            gaps[label] = dataclasses.replace(gap, ci=(0.0, 0.0))
            continue
        by_group = {s.group: s for s in summaries[label]}
        points[label] = {g: {q: float(by_group[g].values[q] or 0.0) for q in quantities} for g in gap.compared}
    joint = joint_gap_intervals(points, {label: replicates[label] for label in points}, quantities)
    for label, (_, ci) in joint.items():
        gaps[label] = dataclasses.replace(gaps[label], ci=ci)
    return gaps


def analyse_multilabel_grouping(
    outcomes: LabelOutcomes,
    groups: ArrayLike,
    *,
    group_by: str,
    min_group_size: int = 30,
    n_boot: int = 1000,
    rng: np.random.Generator,
    known_groups: Iterable[str] = (),
    patients: Sequence[str | None] | None = None,
) -> MultilabelAnalysis:
    """Per-label metrics and gaps, and the underdiagnosis rate and its gap, of one grouping.

    Sufficiency is per label: a group is measured on a label when at least ``min_group_size`` of
    its images have a known entry for it, and on underdiagnosis when at least that many have a
    known finding status. Intervals and gaps are those of the classifier's analysis
    (:mod:`.gaps`): median-centred percentile intervals per group, simultaneous max-type
    intervals for the gaps, from one seeded bootstrap per grouping, stratified by group and over
    patients when ``patients`` names them (:mod:`.resample`).

    Args:
        outcomes: the per-image quantities, ``N`` images.
        groups: group label per image, ``(N,)``.
        group_by: the grouping's name.
        min_group_size: see above.
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

    point: dict[str, dict[str, FloatArray]] = {}
    rates: dict[str, float] = {}
    for group, rows in members.items():
        if rows.size:
            values, rate = batched_label_metrics(outcomes, rows, np.ones((1, rows.size), dtype=np.intp))
            point[group] = {m: v[0] for m, v in values.items()}
            rates[group] = float(rate[0])

    per_label: dict[str, list[GroupSummary]] = {name: [] for name in outcomes.names}
    rate_summaries: list[GroupSummary] = []
    status: dict[str, dict[str, int]] = {}
    for group, rows in members.items():
        for index, name in enumerate(outcomes.names):
            values = {m: float(v[index]) for m, v in point[group].items()} if rows.size else {"n": 0.0}
            positives = int((outcomes.positive[rows, index] & outcomes.known[rows, index]).sum())
            per_label[name].append(_label_summary(group, int(rows.size), name, values, positives, min_group_size))
        determined = int(outcomes.determined[rows].sum())
        rate_summaries.append(
            _underdiagnosis_summary(group, int(rows.size), determined, rates.get(group, float("nan")), min_group_size)
        )
        status[group] = {
            "with_finding": int(outcomes.has_finding[rows].sum()),
            "called_finding_free": int((outcomes.has_finding & outcomes.called_finding_free)[rows].sum()),
            "undetermined": int(rows.size) - determined,
        }

    # Resample every group measured on some label or on underdiagnosis (summaries are in `known` order).
    measured = [
        group
        for position, group in enumerate(known)
        if rate_summaries[position].sufficient or any(per_label[name][position].sufficient for name in outcomes.names)
    ]
    unit = "image"
    label_reps: dict[str, dict[str, FloatArray]] | None = None
    rate_reps: dict[str, FloatArray] | None = None
    if n_boot > 0 and measured:
        resampler = GroupResampler.of(labels, measured, patients)
        unit = resampler.unit
        label_reps = {g: {m: np.empty((n_boot, outcomes.k)) for m in GROUP_METRICS} for g in measured}
        rate_reps = {g: np.empty(n_boot) for g in measured}
        for block, counts in resampler.blocks(n_boot, rng):
            for group in measured:
                values, rate = batched_label_metrics(outcomes, resampler.members[group], counts[group])
                for metric, array in values.items():
                    label_reps[group][metric][block] = array
                rate_reps[group][block] = rate

    replicates: dict[str, dict[str, dict[str, FloatArray]]] | None = None
    if label_reps is not None:
        replicates = {
            name: {g: {m: label_reps[g][m][:, index] for m in GROUP_METRICS} for g in measured}
            for index, name in enumerate(outcomes.names)
        }
    summaries = {
        name: [
            summary_with_intervals(s, replicates[name].get(s.group)) if replicates is not None and s.sufficient else s
            for s in per_label[name]
        ]
        for name in outcomes.names
    }
    gaps = {m: _joint_gaps(m, (m,), summaries, replicates) for m in GAP_METRICS}
    equalized_odds = _joint_gaps("equalized_odds_difference", EQUALIZED_ODDS_RATES, summaries, replicates)
    parity = _joint_gaps("demographic_parity_difference", ("selection_rate",), summaries, replicates)
    analyses = {
        name: GroupingAnalysis(
            group_by=group_by,
            groups=tuple(summaries[name]),
            gaps={m: gaps[m][name] for m in GAP_METRICS},
            equalized_odds=equalized_odds[name],
            demographic_parity=parity[name],
            min_group_size=min(s.n for s in summaries[name]),
        )
        for name in outcomes.names
    }
    rate_replicates = {g: {UNDERDIAGNOSIS: r} for g, r in rate_reps.items()} if rate_reps is not None else None
    rate_summaries = [
        summary_with_intervals(s, rate_replicates.get(s.group), metrics=(UNDERDIAGNOSIS,))
        if rate_replicates is not None and s.sufficient
        else s
        for s in rate_summaries
    ]
    underdiagnosis = GroupedValues(
        group_by,
        tuple(rate_summaries),
        {UNDERDIAGNOSIS: values_gap(UNDERDIAGNOSIS, (UNDERDIAGNOSIS,), rate_summaries, rate_replicates)},
    )
    images = {g: int(rows.size) for g, rows in members.items()}
    return MultilabelAnalysis(
        group_by=group_by,
        labels=analyses,
        underdiagnosis=underdiagnosis,
        images=images,
        status=status,
        min_group_size=min(images.values()),
        unit=unit,
    )
