"""Metrics and findings of the multi-label, regression and segmentation analyses, as the check
emits them.

The classifier's records are built in :mod:`auditkit.checks.bias` itself and stay as they were;
these add the ``label`` (multi-label), ``output`` (regression) or ``class`` (segmentation) key to
the same metric names, the underdiagnosis rate, and findings that carry the label, the output and
its unit, or the class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from auditkit.check import Direction, Metric
from auditkit.checks.bias.gaps import Gap, GroupSummary
from auditkit.checks.bias.metrics import GAP_METRICS, GROUP_METRICS, LOWER_IS_BETTER, SMALL_COUNT, count_text
from auditkit.checks.bias.multilabel import UNDERDIAGNOSIS, LabelOutcomes, MultilabelAnalysis
from auditkit.checks.bias.regression import (
    REGRESSION_GAP_METRICS,
    REGRESSION_GROUP_METRICS,
    RegressionAnalysis,
    TargetOutcomes,
)
from auditkit.checks.bias.segmentation import (
    SEGMENTATION_METRICS,
    CaseOutcomes,
    SegmentationAnalysis,
    case_count_totals,
)

__all__ = [
    "multilabel_findings",
    "multilabel_metrics",
    "multilabel_preamble",
    "regression_findings",
    "regression_metrics",
    "regression_preamble",
    "segmentation_findings",
    "segmentation_metrics",
    "segmentation_preamble",
    "skipped_grouping_metrics",
]


def direction(metric: str) -> Direction:
    return "lower_is_better" if metric in LOWER_IS_BETTER else "higher_is_better"


def _metric(name: str, value: float | None, metric: str, labels: dict[str, str], **extra: Any) -> Metric:
    return Metric(name, value, direction(metric), labels=labels, **extra)


def _gap_metric(gap: Gap, labels: dict[str, str], name: str = "bias.max_gap") -> Metric:
    return Metric(name, gap.value, "lower_is_better", labels=labels, ci=gap.ci, n=gap.n, reason=gap.reason)


def _group_metrics(
    summaries: Sequence[GroupSummary], metrics: Sequence[str], group_by: str, key: str, name: str
) -> list[Metric]:
    return [
        _metric(
            "bias.group_metric",
            summary.values[metric],
            metric,
            {"metric": metric, "group_by": group_by, "group": summary.group, key: name},
            ci=summary.cis.get(metric),
            n=summary.n,
            reason=summary.reasons.get(metric),
        )
        for summary in summaries
        for metric in metrics
    ]


# --------------------------------------------------------------------------------------------
# Metrics


def multilabel_metrics(analysis: MultilabelAnalysis, total: int) -> list[Metric]:
    """Every metric of one multi-label grouping: per label, underdiagnosis, the smallest group."""
    group_by = analysis.group_by
    out: list[Metric] = []
    for label, per_label in analysis.labels.items():
        out += _group_metrics(per_label.groups, GROUP_METRICS, group_by, "label", label)
        for metric in GAP_METRICS:
            out.append(_gap_metric(per_label.gaps[metric], {"metric": metric, "group_by": group_by, "label": label}))
        out.append(
            _gap_metric(
                per_label.equalized_odds, {"group_by": group_by, "label": label}, "bias.equalized_odds_difference"
            )
        )
        out.append(
            _gap_metric(
                per_label.demographic_parity,
                {"group_by": group_by, "label": label},
                "bias.demographic_parity_difference",
            )
        )
    for summary in analysis.underdiagnosis.groups:
        out.append(
            _metric(
                "bias.underdiagnosis_rate",
                summary.values[UNDERDIAGNOSIS],
                UNDERDIAGNOSIS,
                {"group_by": group_by, "group": summary.group},
                ci=summary.cis.get(UNDERDIAGNOSIS),
                n=summary.n,
                reason=summary.reasons.get(UNDERDIAGNOSIS),
            )
        )
    out.append(
        _gap_metric(analysis.underdiagnosis.gaps[UNDERDIAGNOSIS], {"metric": UNDERDIAGNOSIS, "group_by": group_by})
    )
    out.append(_min_group_size(group_by, analysis.min_group_size, total))
    return out


def regression_metrics(analysis: RegressionAnalysis, total: int) -> list[Metric]:
    """Every metric of one regression grouping: per output the group errors and their gaps."""
    group_by = analysis.group_by
    out: list[Metric] = []
    for output, values in analysis.outputs.items():
        out += _group_metrics(values.groups, REGRESSION_GROUP_METRICS, group_by, "output", output)
        for metric in REGRESSION_GAP_METRICS:
            out.append(_gap_metric(values.gaps[metric], {"metric": metric, "group_by": group_by, "output": output}))
    out.append(_min_group_size(group_by, analysis.min_group_size, total))
    return out


def segmentation_metrics(analysis: SegmentationAnalysis, total: int) -> list[Metric]:
    """Every metric of one segmentation grouping: per class the group Dice and HD95 and their gaps."""
    group_by = analysis.group_by
    out: list[Metric] = []
    for name, figures in analysis.classes.items():
        for metric in SEGMENTATION_METRICS:
            out += _group_metrics(figures[metric].groups, (metric,), group_by, "class", name)
        for metric in SEGMENTATION_METRICS:
            out.append(
                _gap_metric(figures[metric].gaps[metric], {"metric": metric, "group_by": group_by, "class": name})
            )
    out.append(_min_group_size(group_by, analysis.min_group_size, total))
    return out


def _min_group_size(group_by: str, value: int, total: int) -> Metric:
    return Metric("bias.min_group_size", float(value), "higher_is_better", labels={"group_by": group_by}, n=total)


def skipped_grouping_metrics(
    task: str, group_by: str, names: Sequence[str], groups: int, max_groups: int
) -> list[Metric]:
    """The undefined gaps and smallest-group size of a grouping with too many groups."""
    reason = f"{groups} groups, more than max_groups={max_groups}: grouping not analysed"
    out: list[Metric] = []
    if task == "multilabel":
        for label in names:
            for metric in GAP_METRICS:
                labels = {"metric": metric, "group_by": group_by, "label": label}
                out.append(Metric("bias.max_gap", None, "lower_is_better", labels=labels, reason=reason))
            for name in ("bias.equalized_odds_difference", "bias.demographic_parity_difference"):
                out.append(
                    Metric(name, None, "lower_is_better", labels={"group_by": group_by, "label": label}, reason=reason)
                )
        labels = {"metric": UNDERDIAGNOSIS, "group_by": group_by}
        out.append(Metric("bias.max_gap", None, "lower_is_better", labels=labels, reason=reason))
    elif task == "segmentation":
        for name in names:
            for metric in SEGMENTATION_METRICS:
                labels = {"metric": metric, "group_by": group_by, "class": name}
                out.append(Metric("bias.max_gap", None, "lower_is_better", labels=labels, reason=reason))
    else:
        for output in names:
            for metric in REGRESSION_GAP_METRICS:
                labels = {"metric": metric, "group_by": group_by, "output": output}
                out.append(Metric("bias.max_gap", None, "lower_is_better", labels=labels, reason=reason))
    out.append(Metric("bias.min_group_size", None, "higher_is_better", labels={"group_by": group_by}, reason=reason))
    return out


# --------------------------------------------------------------------------------------------
# Findings


def multilabel_preamble(outcomes: LabelOutcomes) -> list[dict[str, Any]]:
    """Unknown entries per label, and the underdiagnosis definition with the whole split's counts."""
    findings: list[dict[str, Any]] = []
    unknown = {name: int((~outcomes.known[:, k]).sum()) for k, name in enumerate(outcomes.names)}
    if any(unknown.values()):
        findings.append(
            {
                "kind": "unknown_labels",
                "split": "eval",
                "left_out": {name: count for name, count in unknown.items() if count},
                "images": outcomes.n,
            }
        )
    with_finding = int(outcomes.has_finding.sum())
    missed = int((outcomes.has_finding & outcomes.called_finding_free).sum())
    if outcomes.no_finding is None:
        definition = (
            "images with a known positive entry, called finding-free when every label's probability is below its"
            " threshold; images with no known positive but unknown entries are left out"
        )
    else:
        definition = (
            f"images whose {outcomes.no_finding} entry is 0, called finding-free when the {outcomes.no_finding}"
            f" probability reaches its threshold; images with an unknown {outcomes.no_finding} entry are left out"
        )
    findings.append(
        {
            "kind": "underdiagnosis",
            "split": "eval",
            "no_finding": outcomes.no_finding,
            "definition": definition,
            "with_finding": with_finding,
            "called_finding_free": missed,
            "left_out": int((~outcomes.determined).sum()),
            "rate": missed / with_finding if with_finding else None,
        }
    )
    return findings


def regression_preamble(outcomes: TargetOutcomes, units: Mapping[str, str]) -> list[dict[str, Any]]:
    """The outputs' units, and unknown targets per output."""
    findings: list[dict[str, Any]] = [
        {"kind": "outputs", "units": {name: units.get(name) for name in outcomes.names}},
    ]
    unknown = {name: int((~outcomes.known[:, k]).sum()) for k, name in enumerate(outcomes.names)}
    if any(unknown.values()):
        findings.append(
            {
                "kind": "unknown_targets",
                "split": "eval",
                "left_out": {name: count for name, count in unknown.items() if count},
                "images": outcomes.n,
            }
        )
    return findings


def _gap_finding(
    metric: str, group_by: str, gap: Gap, by_group: Mapping[str, GroupSummary], value_of: str, **extra: Any
) -> dict[str, Any] | None:
    if gap.value is None or gap.worst is None or gap.best is None or len(gap.compared) < 2:
        return None
    return {
        "kind": "subgroup_gap",
        "metric": metric,
        "group_by": group_by,
        **extra,
        "gap": gap.value,
        "ci": list(gap.ci) if gap.ci is not None else None,
        "worst_group": gap.worst,
        "worst_value": by_group[gap.worst].values[value_of],
        "best_group": gap.best,
        "best_value": by_group[gap.best].values[value_of],
        "groups_compared": len(gap.compared),
        "groups_excluded": sorted(gap.excluded),
    }


def _by_evidence(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most evident first: the highest lower end of the interval, then the largest gap."""
    return sorted(findings, key=lambda f: (-(f["ci"][0] if f["ci"] else float("-inf")), -f["gap"]))


def multilabel_findings(
    analyses: Sequence[MultilabelAnalysis], min_group_size: int, n_boot: int
) -> list[dict[str, Any]]:
    """Bootstrap unit, underdiagnosis per group, the gaps (most evident first), small groups."""
    findings: list[dict[str, Any]] = []
    if analyses:
        findings.append({"kind": "bootstrap", "unit": analyses[0].unit, "n_boot": n_boot, "strata": "group"})
    for analysis in analyses:
        findings.append(
            {
                "kind": "underdiagnosis_by_group",
                "group_by": analysis.group_by,
                "groups": [
                    {
                        "group": summary.group,
                        "rate": summary.values[UNDERDIAGNOSIS],
                        "ci": list(summary.cis[UNDERDIAGNOSIS]) if summary.cis.get(UNDERDIAGNOSIS) else None,
                        "with_finding": count_text(analysis.status[summary.group]["with_finding"]),
                        "called_finding_free": count_text(analysis.status[summary.group]["called_finding_free"]),
                        "left_out": count_text(analysis.status[summary.group]["undetermined"]),
                        "reason": summary.reasons.get(UNDERDIAGNOSIS),
                    }
                    for summary in analysis.underdiagnosis.groups
                ],
            }
        )
    gaps: list[dict[str, Any]] = []
    for analysis in analyses:
        rates = {s.group: s for s in analysis.underdiagnosis.groups}
        found = _gap_finding(
            UNDERDIAGNOSIS, analysis.group_by, analysis.underdiagnosis.gaps[UNDERDIAGNOSIS], rates, UNDERDIAGNOSIS
        )
        if found is not None:
            gaps.append(found)
        for label, per_label in analysis.labels.items():
            by_group = {s.group: s for s in per_label.groups}
            for metric in GAP_METRICS:
                found = _gap_finding(metric, analysis.group_by, per_label.gaps[metric], by_group, metric, label=label)
                if found is not None:
                    gaps.append(found)
    findings += _by_evidence(gaps)
    findings += _multilabel_insufficient(analyses, min_group_size)
    return findings


def _multilabel_insufficient(analyses: Sequence[MultilabelAnalysis], min_group_size: int) -> list[dict[str, Any]]:
    """A small group once (all its labels); else each label (or underdiagnosis) it is too small for."""
    findings: list[dict[str, Any]] = []
    for analysis in analyses:
        for position, (group, images) in enumerate(analysis.images.items()):
            if images < min_group_size:
                findings.append(_small_group(analysis.group_by, group, images, min_group_size))
                continue
            cells = [(label, a.groups[position]) for label, a in analysis.labels.items()]
            cells.append((None, analysis.underdiagnosis.groups[position]))
            for label, summary in cells:
                if summary.sufficient:
                    continue
                reason = next(iter(summary.reasons.values()))
                finding = _small_group(analysis.group_by, group, summary.n, min_group_size, reason)
                finding.update({"label": label} if label is not None else {"metric": UNDERDIAGNOSIS})
                findings.append(finding)
    return findings


def _small_group(group_by: str, group: str, n: int, min_group_size: int, reason: str | None = None) -> dict[str, Any]:
    """An ``insufficient_group`` finding; without ``reason``, the group's images are too few."""
    if reason is None:
        reason = (
            "no images in the group (none in the eval split, or all quarantined)"
            if n == 0
            else f"insufficient: the group has {count_text(n)} images, fewer than min_group_size={min_group_size}"
        )
    return {
        "kind": "insufficient_group",
        "group_by": group_by,
        "group": group,
        "n": count_text(n),
        "min_group_size": min_group_size,
        "reason": reason,
    }


_REGRESSION_ORDER = {metric: i for i, metric in enumerate(("mae_ratio", "mae", "mean_error"))}


def regression_findings(
    analyses: Sequence[RegressionAnalysis], units: Mapping[str, str], min_group_size: int, n_boot: int
) -> list[dict[str, Any]]:
    """Bootstrap unit, the gaps per output (ratios first, each most evident first), small groups."""
    findings: list[dict[str, Any]] = []
    if analyses:
        findings.append({"kind": "bootstrap", "unit": analyses[0].unit, "n_boot": n_boot, "strata": "group"})
    gaps: list[dict[str, Any]] = []
    for analysis in analyses:
        for output, values in analysis.outputs.items():
            by_group = {s.group: s for s in values.groups}
            unit = units.get(output)
            for metric in ("mae_ratio", "mae"):
                found = _gap_finding(
                    metric, analysis.group_by, values.gaps[metric], by_group, "mae", output=output, unit=unit
                )
                if found is not None:
                    gaps.append(found)
            spread = values.gaps["mean_error"]
            if (
                spread.value is not None
                and spread.lowest is not None
                and spread.highest is not None
                and len(spread.compared) > 1
            ):
                gaps.append(
                    {
                        "kind": "subgroup_gap",
                        "metric": "mean_error",
                        "group_by": analysis.group_by,
                        "output": output,
                        "unit": unit,
                        "gap": spread.value,
                        "ci": list(spread.ci) if spread.ci is not None else None,
                        "lowest_group": spread.lowest,
                        "lowest_value": by_group[spread.lowest].values["mean_error"],
                        "highest_group": spread.highest,
                        "highest_value": by_group[spread.highest].values["mean_error"],
                        "groups_compared": len(spread.compared),
                        "groups_excluded": sorted(spread.excluded),
                    }
                )
    gaps.sort(key=lambda f: (_REGRESSION_ORDER[f["metric"]], -(f["ci"][0] if f["ci"] else float("-inf")), -f["gap"]))
    findings += gaps
    for analysis in analyses:
        for position, (group, images) in enumerate(analysis.images.items()):
            if images < min_group_size:
                findings.append(_small_group(analysis.group_by, group, images, min_group_size))
                continue
            for output, values in analysis.outputs.items():
                summary = values.groups[position]
                if not summary.sufficient:
                    finding = _small_group(analysis.group_by, group, summary.n, min_group_size, summary.reasons["mae"])
                    findings.append({**finding, "output": output})
    return findings


# --------------------------------------------------------------------------------------------
# Segmentation


def segmentation_preamble(
    outcomes: CaseOutcomes, implementation: str, spacing_known: bool, left_out: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The implementation of the figures and the whole split's case counts per class."""
    findings: list[dict[str, Any]] = [
        {
            "kind": "segmentation_metrics",
            "implementation": implementation,
            "figures": list(SEGMENTATION_METRICS),
            "spacing": "per case, mm on the model-input grid" if spacing_known else "1 per pixel",
            "group_means": (
                "per class and group, the mean Dice over the cases whose reference holds the class and the mean"
                " HD95 over the cases where reference and segmentation both hold it"
            ),
        }
    ]
    if any(left_out.values()):
        findings.append({"kind": "cases_left_out", "split": "eval", **{k: v for k, v in left_out.items() if v}})
    findings.append(
        {
            "kind": "case_counts",
            "split": "eval",
            "classes": case_count_totals(outcomes),
            "note": _CASE_NOTE,
        }
    )
    return findings


_CASE_NOTE = (
    "empty_reference: no Dice and no HD95 (left out of the group's means, as MONAI's DiceMetric with ignore_empty);"
    " missed (class in the reference, not segmented): Dice 0 in the mean, no HD95, so a group's HD95 mean does"
    " not show its missed cases"
)


def segmentation_findings(
    analyses: Sequence[SegmentationAnalysis], min_group_size: int, n_boot: int
) -> list[dict[str, Any]]:
    """Bootstrap unit, case counts per group, the gaps (Dice first, most evident first), small groups."""
    findings: list[dict[str, Any]] = []
    if analyses:
        findings.append({"kind": "bootstrap", "unit": analyses[0].unit, "n_boot": n_boot, "strata": "group"})
    for analysis in analyses:
        for name in analysis.classes:
            findings.append(
                {
                    "kind": "segmentation_cases_by_group",
                    "group_by": analysis.group_by,
                    "class": name,
                    "groups": [
                        {
                            "group": group,
                            **{key: count_text(value) for key, value in counts[name].items()},
                            "missed_share": _share(counts[name]["missed"], counts[name]["with_reference"]),
                        }
                        for group, counts in analysis.counts.items()
                    ],
                }
            )
    gaps: list[dict[str, Any]] = []
    for analysis in analyses:
        for name, figures in analysis.classes.items():
            for metric in SEGMENTATION_METRICS:
                values = figures[metric]
                by_group = {s.group: s for s in values.groups}
                extra: dict[str, Any] = {"class": name, **({"unit": "mm"} if metric == "hd95" else {})}
                found = _gap_finding(metric, analysis.group_by, values.gaps[metric], by_group, metric, **extra)
                if found is not None:
                    # Missed cases are in a group's Dice (as 0) but not in its HD95: both ends name theirs.
                    for end in ("worst", "best"):
                        found[f"{end}_group_missed"] = count_text(
                            analysis.counts[found[f"{end}_group"]][name]["missed"]
                        )
                    gaps.append(found)
    order = {metric: i for i, metric in enumerate(SEGMENTATION_METRICS)}
    gaps.sort(key=lambda f: (order[f["metric"]], -(f["ci"][0] if f["ci"] else float("-inf")), -f["gap"]))
    findings += gaps
    for analysis in analyses:
        for group, images in analysis.images.items():
            if images < min_group_size:
                findings.append(_small_group(analysis.group_by, group, images, min_group_size))
                continue
            for name, figures in analysis.classes.items():
                for metric in SEGMENTATION_METRICS:
                    summary = next(s for s in figures[metric].groups if s.group == group)
                    if not summary.sufficient:
                        finding = _small_group(
                            analysis.group_by, group, summary.n, min_group_size, summary.reasons[metric]
                        )
                        findings.append({**finding, "class": name, "metric": metric})
    return findings


def _share(part: int, whole: int) -> float | None:
    """``part / whole`` rounded, withheld (``None``) where either count is below the small-count limit."""
    if whole == 0 or 0 < part < SMALL_COUNT or whole < SMALL_COUNT:
        return None
    return round(part / whole, 4)
