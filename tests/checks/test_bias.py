"""Tests of the subgroup metrics, gap intervals, forest plot and :class:`BiasCheck`."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    equalized_odds_difference,
    selection_rate,
    true_negative_rate,
    true_positive_rate,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.special import softmax
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

from auditkit.check import CheckResult, Skip
from auditkit.checks.bias import (
    GAP_METRICS,
    GROUP_METRICS,
    INTERSECTION_SEPARATOR,
    BiasCheck,
    GroupingAnalysis,
    LabelOutcomes,
    Outcomes,
    TargetOutcomes,
    analyse_grouping,
    analyse_multilabel_grouping,
    analyse_regression_grouping,
    batched_group_metrics,
    bootstrap_group_metrics,
    count_text,
    forest_plot,
    gap_interval,
    intersect,
    metric_frame,
)
from auditkit.checks.bias.gaps import joint_gap_intervals
from auditkit.checks.bias.multilabel import batched_label_metrics
from auditkit.checks.bias.plots import _plain, label_heatmap
from auditkit.checks.bias.resample import GroupResampler
from auditkit.checks.calibration import expected_calibration_error
from auditkit.context import CheckView
from auditkit.errors import ConfigError
from auditkit.policy import evaluate
from auditkit.stats import stable_seed
from auditkit.testing import make_context, rules_for


def proposed_policy() -> Any:
    return rules_for("bias")


# --------------------------------------------------------------------------------------------
# Data


def random_case(seed: int, n: int = 240, k: int = 2, groups: str = "abc") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities informative of the labels, labels with every class, group labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    labels[:k] = np.arange(k)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    group = rng.choice(list(groups), size=n)
    return softmax(logits, axis=1), labels, group


def simulated_outcomes(
    rng: np.random.Generator,
    sensitivity: list[float],
    specificity: list[float],
    positives: int,
    negatives: int,
) -> tuple[Outcomes, np.ndarray]:
    """Binary outcomes with known per-group sensitivity and specificity (Bernoulli draws)."""
    labels, predicted, groups = [], [], []
    for g, (sens, spec) in enumerate(zip(sensitivity, specificity, strict=True)):
        labels += [1] * positives + [0] * negatives
        predicted += list(rng.random(positives) < sens) + list(rng.random(negatives) >= spec)
        groups += [f"g{g}"] * (positives + negatives)
    predicted_arr = np.asarray(predicted, dtype=float)
    p1 = np.where(predicted_arr == 1, 0.8, 0.2) + rng.uniform(-0.1, 0.1, size=len(labels))
    probs = np.stack([1.0 - p1, p1], axis=1)
    return Outcomes.from_probs(probs, np.asarray(labels), 1), np.asarray(groups)


# --------------------------------------------------------------------------------------------
# Per-group values: MetricFrame, scikit-learn, fairlearn's metrics and the batched twin agree


@pytest.mark.parametrize("k", [2, 3])
def test_group_values_equal_fairlearn_and_sklearn(k: int) -> None:
    probs, labels, groups = random_case(k, n=300, k=k)
    outcomes = Outcomes.from_probs(probs, labels, positive_index=k - 1, bins=10)
    ours = metric_frame(outcomes, groups, group_by="site").by_group
    y = (labels == k - 1).astype(int)
    predicted = probs.argmax(axis=1)
    y_hat = (predicted == k - 1).astype(int)
    reference = MetricFrame(
        metrics={
            "n": count,
            "selection_rate": selection_rate,
            "sensitivity": true_positive_rate,
            "specificity": true_negative_rate,
        },
        y_true=y,
        y_pred=y_hat,
        sensitive_features={"site": groups},
    ).by_group
    for group in "abc":
        rows = groups == group
        row = ours.loc[group]
        for metric in ("n", "selection_rate", "sensitivity", "specificity"):
            assert row[metric] == pytest.approx(reference.loc[group, metric], abs=1e-12)
        assert row["prevalence"] == pytest.approx(y[rows].mean())
        assert row["accuracy"] == pytest.approx(accuracy_score(labels[rows], predicted[rows]))
        assert row["sensitivity"] == pytest.approx(recall_score(y[rows], y_hat[rows]))
        assert row["ppv"] == pytest.approx(precision_score(y[rows], y_hat[rows]))
        assert row["npv"] == pytest.approx(precision_score(1 - y[rows], 1 - y_hat[rows]))
        assert row["auroc"] == pytest.approx(roc_auc_score(y[rows], probs[rows, k - 1]))
        assert row["ece"] == pytest.approx(expected_calibration_error(probs[rows], labels[rows], bins=10), abs=1e-12)
        batched = batched_group_metrics(outcomes, np.flatnonzero(rows)[None, :])
        for metric in GROUP_METRICS:
            assert batched[metric][0] == pytest.approx(row[metric], abs=1e-12), metric


def test_auroc_handles_tied_scores_like_sklearn() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    score = np.array([0.2, 0.5, 0.5, 0.9, 0.5, 0.2, 0.7, 0.1])
    probs = np.stack([1 - score, score], axis=1)
    outcomes = Outcomes.from_probs(probs, y, 1)
    value = batched_group_metrics(outcomes, np.arange(8)[None, :])["auroc"][0]
    assert value == pytest.approx(roc_auc_score(y, score))


def test_equalized_odds_and_parity_equal_fairlearn() -> None:
    probs, labels, groups = random_case(5, n=400, groups="abcd")
    outcomes = Outcomes.from_probs(probs, labels, 1)
    analysis = analyse_grouping(
        outcomes, groups, group_by="g", min_group_size=1, n_boot=0, rng=np.random.default_rng(0)
    )
    assert analysis.equalized_odds.value == pytest.approx(
        equalized_odds_difference(outcomes.y_true, outcomes.y_pred, sensitive_features=groups)
    )
    assert analysis.demographic_parity.value == pytest.approx(
        demographic_parity_difference(outcomes.y_true, outcomes.y_pred, sensitive_features=groups)
    )
    gaps = analysis.gaps
    assert analysis.equalized_odds.value == pytest.approx(
        max(gaps["sensitivity"].value or 0.0, gaps["specificity"].value or 0.0)
    )


def test_hand_computed_gaps() -> None:
    # Group a: 4 positives (3 found), 4 negatives (all right); group b: 4 positives (1 found),
    # 4 negatives (2 false alarms). Sensitivity 0.75 vs 0.25; specificity 1.0 vs 0.5.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2)
    y_hat = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0])
    groups = np.array(["a"] * 8 + ["b"] * 8)
    probs = np.stack([1.0 - (0.3 + 0.4 * y_hat), 0.3 + 0.4 * y_hat], axis=1)
    outcomes = Outcomes.from_probs(probs, y, 1)
    analysis = analyse_grouping(
        outcomes, groups, group_by="g", min_group_size=1, n_boot=0, rng=np.random.default_rng(0)
    )
    assert analysis.gaps["sensitivity"].value == pytest.approx(0.5)
    assert analysis.gaps["sensitivity"].worst == "b"
    assert analysis.gaps["specificity"].value == pytest.approx(0.5)
    assert analysis.gaps["accuracy"].value == pytest.approx(7 / 8 - 3 / 8)
    assert analysis.equalized_odds.value == pytest.approx(0.5)
    assert analysis.demographic_parity.value == pytest.approx(3 / 8 - 3 / 8)
    assert analysis.min_group_size == 8


def test_undefined_metrics_carry_reasons_and_leave_the_gap() -> None:
    probs, labels, groups = random_case(11, n=300)
    groups = groups.copy()
    groups[labels == 1] = np.where(groups[labels == 1] == "c", "a", groups[labels == 1])
    outcomes = Outcomes.from_probs(probs, labels, 1)
    analysis = analyse_grouping(
        outcomes,
        groups,
        group_by="g",
        min_group_size=10,
        n_boot=50,
        rng=np.random.default_rng(1),
        positive="nodule",
    )
    c = next(s for s in analysis.groups if s.group == "c")
    assert c.sufficient and c.values["prevalence"] == 0.0
    assert c.values["sensitivity"] is None and "no positive (nodule)" in c.reasons["sensitivity"]
    assert c.values["auroc"] is None and "both classes" in c.reasons["auroc"]
    assert c.values["specificity"] is not None
    sensitivity_gap = analysis.gaps["sensitivity"]
    assert sensitivity_gap.compared == ("a", "b") and "c" in sensitivity_gap.excluded
    assert analysis.gaps["specificity"].compared == ("a", "b", "c")
    assert analysis.equalized_odds.compared == ("a", "b")
    # fairlearn's own TPR reports 0 for the group without positives, which would fake a gap.
    assert true_positive_rate(outcomes.y_true[groups == "c"], outcomes.y_pred[groups == "c"]) == 0


def test_small_and_empty_groups_are_reported_never_dropped() -> None:
    probs, labels, groups = random_case(3, n=200, groups="ab")
    groups = groups.astype("U32")
    groups[:3] = "tiny"
    outcomes = Outcomes.from_probs(probs, labels, 1)
    analysis = analyse_grouping(
        outcomes,
        groups,
        group_by="site",
        min_group_size=30,
        n_boot=20,
        rng=np.random.default_rng(0),
        known_groups=["quarantined-only"],
    )
    by_group = {s.group: s for s in analysis.groups}
    assert set(by_group) == {"a", "b", "tiny", "quarantined-only"}
    tiny = by_group["tiny"]
    assert not tiny.sufficient and tiny.values["n"] == 3
    assert all(tiny.values[m] is None for m in GROUP_METRICS if m != "n")
    assert "<5 images" in tiny.reasons["sensitivity"] and "3 images" not in tiny.reasons["ppv"]
    empty = by_group["quarantined-only"]
    assert empty.n == 0 and "no images" in empty.reasons["accuracy"]
    assert analysis.min_group_size == 0
    assert set(analysis.gaps["sensitivity"].excluded) == {"tiny", "quarantined-only"}
    assert count_text(0) == "0" and count_text(4) == "<5" and count_text(5) == "5"


def test_a_gap_needs_two_comparable_groups() -> None:
    probs, labels, _ = random_case(8, n=100, groups="ab")
    groups = np.array(["b"] * 10 + ["a"] * 90)
    outcomes = Outcomes.from_probs(probs, labels, 1)
    analysis = analyse_grouping(
        outcomes, groups, group_by="g", min_group_size=30, n_boot=0, rng=np.random.default_rng(0)
    )
    gap = analysis.gaps["sensitivity"]
    assert gap.value is None and gap.reason is not None and "fewer than two groups" in gap.reason


def test_intersection_labels() -> None:
    labels = intersect(np.array(["F", "M"]), np.array(["A", "B"]))
    assert labels.tolist() == [f"F{INTERSECTION_SEPARATOR}A", f"M{INTERSECTION_SEPARATOR}B"]
    with pytest.raises(ValueError, match="same shape"):
        intersect(np.array(["F"]), np.array(["A", "B"]))


def test_outcomes_validate_their_inputs() -> None:
    probs = np.array([[0.3, 0.7], [0.6, 0.4]])
    with pytest.raises(ValueError, match="positive_index must be in"):
        Outcomes.from_probs(probs, np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="class indices in"):
        Outcomes.from_probs(probs, np.array([0, 2]), 1)
    with pytest.raises(ValueError, match="finite"):
        Outcomes.from_probs(np.array([[np.nan, 1.0], [0.5, 0.5]]), np.array([0, 1]), 1)


# --------------------------------------------------------------------------------------------
# Intervals with known truth (seeded, fixed number of draws)

DRAWS = 200
BOOT = 200


def test_gap_interval_covers_the_true_gap() -> None:
    sensitivity, specificity = [0.9, 0.75, 0.8], [0.95, 0.85, 0.9]
    truth_sens, truth_eo = 0.15, 0.15
    rng = np.random.default_rng(stable_seed("bias", "coverage"))
    covered_sens = covered_eo = 0
    for _ in range(DRAWS):
        outcomes, groups = simulated_outcomes(rng, sensitivity, specificity, 60, 60)
        point = {
            g: {
                k: float(v[0]) for k, v in batched_group_metrics(outcomes, np.flatnonzero(groups == g)[None, :]).items()
            }
            for g in ("g0", "g1", "g2")
        }
        reps = bootstrap_group_metrics(outcomes, groups, n_boot=BOOT, rng=rng)
        _, ci = gap_interval(point, reps, ["sensitivity"])
        _, ci_eo = gap_interval(point, reps, ["sensitivity", "specificity"])
        assert ci is not None and ci_eo is not None
        covered_sens += ci[0] <= truth_sens <= ci[1]
        covered_eo += ci_eo[0] <= truth_eo <= ci_eo[1]
    assert covered_sens / DRAWS >= 0.90
    assert covered_eo / DRAWS >= 0.90


def test_fair_groups_rarely_fail_where_a_percentile_interval_would() -> None:
    # Six groups of 30 positives with the same sensitivity: the true gap is 0.
    rng = np.random.default_rng(stable_seed("bias", "null"))
    draws, ours_above, percentile_above = 60, 0, 0
    for _ in range(draws):
        outcomes, groups = simulated_outcomes(rng, [0.8] * 6, [0.9] * 6, 30, 30)
        names = [f"g{i}" for i in range(6)]
        point = {
            g: {"sensitivity": float(outcomes.y_pred[(groups == g) & (outcomes.y_true == 1)].mean())} for g in names
        }
        reps = bootstrap_group_metrics(outcomes, groups, n_boot=BOOT, rng=rng)
        _, ci = gap_interval(point, reps, ["sensitivity"])
        assert ci is not None
        ours_above += ci[0] > 0.10
        replicated = np.stack([reps[g]["sensitivity"] for g in names], axis=1)
        spread = replicated.max(axis=1) - replicated.min(axis=1)
        percentile_above += np.quantile(spread, 0.025) > 0.10
    assert ours_above / draws <= 0.05
    assert percentile_above / draws >= 0.30  # why the naive interval is not used


def test_analysis_intervals_come_from_the_documented_construction() -> None:
    probs, labels, groups = random_case(21, n=300)
    outcomes = Outcomes.from_probs(probs, labels, 1)
    analysis = analyse_grouping(
        outcomes, groups, group_by="g", min_group_size=1, n_boot=100, rng=np.random.default_rng(4)
    )
    reps = bootstrap_group_metrics(outcomes, groups, n_boot=100, rng=np.random.default_rng(4))
    point = {s.group: {m: float(v) for m, v in s.values.items() if v is not None} for s in analysis.groups}
    value, ci = gap_interval(point, reps, ["auroc"])
    assert analysis.gaps["auroc"].value == pytest.approx(value)
    assert analysis.gaps["auroc"].ci == pytest.approx(ci)
    for summary in analysis.groups:
        value = summary.values["sensitivity"]
        assert value is not None
        lo, hi = summary.cis["sensitivity"] or (math.nan, math.nan)
        assert lo <= value <= hi
        # The percentile interval shifted by the bootstrap's median bias (auditkit.stats).
        low_q, median, high_q = np.quantile(reps[summary.group]["sensitivity"], [0.025, 0.5, 0.975])
        assert lo == pytest.approx(max(0.0, value - (median - low_q)))
        assert hi == pytest.approx(min(1.0, value + (high_q - median)))


# --------------------------------------------------------------------------------------------
# Properties

cases = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(8, 60),
    st.integers(2, 3),
    st.integers(1, 4),
    st.integers(1, 6),
)
PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def property_case(seed: int, n: int, k: int, n_groups: int) -> tuple[Outcomes, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    probs = softmax(rng.normal(scale=3.0, size=(n, k)), axis=1)
    groups = rng.choice([f"grp{i}" for i in range(n_groups)], size=n)
    return Outcomes.from_probs(probs, labels, k - 1, bins=5), groups, rng


def all_gaps(analysis: GroupingAnalysis) -> dict[str, Any]:
    gaps = {**analysis.gaps, "eo": analysis.equalized_odds, "dp": analysis.demographic_parity}
    return {name: (gap.value, gap.ci, gap.compared) for name, gap in gaps.items()}


@PROPERTY_SETTINGS
@given(cases)
def test_metrics_are_in_the_unit_interval(case: tuple[int, int, int, int, int]) -> None:
    seed, n, k, n_groups, min_size = case
    outcomes, groups, rng = property_case(seed, n, k, n_groups)
    analysis = analyse_grouping(outcomes, groups, group_by="g", min_group_size=min_size, n_boot=20, rng=rng)
    for summary in analysis.groups:
        for metric, value in summary.values.items():
            if metric != "n" and value is not None:
                assert 0.0 <= value <= 1.0, (metric, value)
        for ci in summary.cis.values():
            if ci is not None:
                assert 0.0 <= ci[0] <= ci[1] <= 1.0
    for value, ci, _ in all_gaps(analysis).values():
        if value is not None:
            assert 0.0 <= value <= 1.0
        if ci is not None:
            assert 0.0 <= ci[0] <= ci[1] <= 1.0


@PROPERTY_SETTINGS
@given(cases, st.randoms(use_true_random=False))
def test_relabelling_groups_does_not_change_the_gaps(case: tuple[int, int, int, int, int], shuffler: Any) -> None:
    seed, n, k, n_groups, min_size = case
    outcomes, groups, _ = property_case(seed, n, k, n_groups)
    names = sorted(set(groups.tolist()))
    new_names = [f"renamed-{i}" for i in range(len(names))]
    shuffler.shuffle(new_names)
    mapping = dict(zip(names, new_names, strict=True))
    relabelled = np.array([mapping[g] for g in groups])

    def run(labels: np.ndarray) -> GroupingAnalysis:
        return analyse_grouping(
            outcomes,
            labels,
            group_by="g",
            min_group_size=min_size,
            n_boot=20,
            rng=np.random.default_rng(seed),
        )

    before, after = run(groups), run(relabelled)
    for name, (value, ci, compared) in all_gaps(before).items():
        value_after, ci_after, compared_after = all_gaps(after)[name]
        assert value_after == value
        assert ci_after == ci
        assert sorted(compared_after) == sorted(mapping[g] for g in compared)
    assert before.min_group_size == after.min_group_size


@PROPERTY_SETTINGS
@given(cases)
def test_a_single_group_gives_zero_gaps(case: tuple[int, int, int, int, int]) -> None:
    seed, n, k, _, min_size = case
    outcomes, _, rng = property_case(seed, n, k, 1)
    analysis = analyse_grouping(
        outcomes, np.full(n, "everyone"), group_by="g", min_group_size=min_size, n_boot=10, rng=rng
    )
    for value, ci, _ in all_gaps(analysis).values():
        assert value == 0.0
        assert ci == (0.0, 0.0)


# --------------------------------------------------------------------------------------------
# Forest plot


def small_analyses() -> list[GroupingAnalysis]:
    probs, labels, groups = random_case(2, n=120, groups="ab")
    groups = groups.astype("U32")
    groups[:3] = "$\\frac{1}{0}$ <script>"
    outcomes = Outcomes.from_probs(probs, labels, 1)
    return [
        analyse_grouping(
            outcomes,
            groups,
            group_by="site $x$",
            min_group_size=10,
            n_boot=50,
            rng=np.random.default_rng(0),
        )
    ]


def test_forest_plot_is_byte_reproducible_and_escapes_labels(tmp_path: Path) -> None:
    analyses = small_analyses()
    first = forest_plot(analyses, tmp_path / "a.svg", overall={"sensitivity": 0.8})
    second = forest_plot(analyses, tmp_path / "b.svg", overall={"sensitivity": 0.8})
    assert first.read_bytes() == second.read_bytes()
    ET.parse(first)  # well-formed XML
    assert b"<script" not in first.read_bytes()
    assert _plain("$a$") == r"\$a\$"
    with pytest.raises(ValueError, match="unknown forest-plot metrics"):
        forest_plot(analyses, tmp_path / "c.svg", metrics=["nonsense"])
    with pytest.raises(ValueError, match="needs groupings"):
        forest_plot([], tmp_path / "d.svg")


# --------------------------------------------------------------------------------------------
# The check on a fake context


def fake_context(
    tmp_path: Path,
    seed: int = 0,
    n: int = 200,
    k: int = 2,
    classes: list[str] | None = None,
    positive_index: int | None = 1,
    quarantined: dict[str, dict[str, int]] | None = None,
    nan_rows: int = 0,
    with_groups: bool = True,
) -> CheckView:
    """A random case in the kit's in-memory context, held to the bias check's needs."""
    probs, labels, sex = random_case(seed, n=n, k=k, groups="FM")
    site = np.random.default_rng(seed + 1).choice(["A", "B"], size=n)
    names = classes or (["normal", "nodule"] if k == 2 else [f"class{i}" for i in range(k)])
    probs = probs.copy()
    probs[:nan_rows] = np.nan
    return make_context(
        labels,
        probs=probs,
        groups={"sex": sex, "site": site} if with_groups else {},
        classes=names,
        positive_class=names[positive_index] if positive_index is not None else None,
        quarantined_groups=quarantined,
        check=BiasCheck,
        out_dir=tmp_path,
    )


def run_check(ctx: CheckView, **params: Any) -> CheckResult:
    return BiasCheck().run(ctx, BiasCheck.Params(**params))


def test_check_emits_its_declared_metrics_with_labels(tmp_path: Path) -> None:
    result = run_check(fake_context(tmp_path), n_boot=50)
    names = {m.name for m in result.metrics}
    assert names == set(BiasCheck.emits) - {"bias.underdiagnosis_rate"}  # multi-label only
    groupings = {m.labels["group_by"] for m in result.metrics}
    assert groupings == {"sex", "site", f"sex{INTERSECTION_SEPARATOR}site"}
    for metric in result.metrics:
        keys = set(metric.labels)
        expected = {
            "bias.group_metric": {"metric", "group_by", "group"},
            "bias.max_gap": {"metric", "group_by"},
        }.get(metric.name, {"group_by"})
        assert keys == expected, metric
        assert metric.value is not None or metric.reason
    gap_metrics = {m.labels["metric"] for m in result.metrics if m.name == "bias.max_gap"}
    assert gap_metrics == set(GAP_METRICS)
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)
    (artifact,) = result.artifacts
    assert artifact.name == "forest_plot" and (tmp_path / artifact.path).is_file()
    kinds = [f["kind"] for f in result.findings]
    assert "subgroup_gap" in kinds


def test_check_reports_quarantine_per_group_and_small_groups(tmp_path: Path) -> None:
    ctx = fake_context(tmp_path, quarantined={"sex": {"F": 3}, "site": {"A": 1, "Z": 2}}, n=120)
    ctx.group_labels("eval")["site"][:4] = "C"
    result = run_check(ctx, n_boot=20, intersections=False)
    quarantine = {f["group_by"]: f for f in result.findings if f["kind"] == "quarantined_by_group"}
    assert quarantine["sex"]["quarantined"] == {"F": 3}
    assert quarantine["site"]["groups_without_images"] == ["Z"]
    assert 0 < quarantine["sex"]["share_of_group"]["F"] < 1
    small = {(f["group_by"], f["group"]): f for f in result.findings if f["kind"] == "insufficient_group"}
    assert small["site", "C"]["n"] == "<5"
    assert small["site", "Z"]["n"] == "0"
    group_z = [m for m in result.metrics if m.name == "bias.group_metric" and m.labels["group"] == "Z"]
    assert {m.labels["metric"] for m in group_z} == set(GROUP_METRICS)
    assert next(m for m in group_z if m.labels["metric"] == "n").value == 0
    min_size = next(m for m in result.metrics if m.name == "bias.min_group_size" and m.labels["group_by"] == "site")
    assert min_size.value == 0


def test_check_excludes_and_counts_non_finite_rows(tmp_path: Path) -> None:
    ctx = fake_context(tmp_path, nan_rows=5)
    result = run_check(ctx, n_boot=10, intersections=False)
    (finding,) = [f for f in result.findings if f["kind"] == "non_finite_logits"]
    assert finding["count"] == 5
    n_sex = sum(
        m.value or 0
        for m in result.metrics
        if m.name == "bias.group_metric" and m.labels["metric"] == "n" and m.labels["group_by"] == "sex"
    )
    assert n_sex == 195


def test_multiclass_is_one_vs_rest_or_skipped(tmp_path: Path) -> None:
    ctx = fake_context(tmp_path, k=3, classes=["a", "b", "c"], positive_index=None)
    with pytest.raises(Skip, match="positive_class"):
        run_check(ctx)
    ctx = fake_context(tmp_path, k=3, classes=["a", "b", "c"], positive_index=2)
    result = run_check(ctx, n_boot=10, intersections=False)
    sensitivity = [m for m in result.metrics if m.name == "bias.group_metric" and m.labels["metric"] == "sensitivity"]
    assert sensitivity and all(m.value is not None for m in sensitivity)


def test_check_skips_without_groups(tmp_path: Path) -> None:
    ctx = fake_context(tmp_path, with_groups=False)
    with pytest.raises(Skip, match=r"data\.groups"):
        run_check(ctx)


def test_params_defaults_and_validation() -> None:
    params = BiasCheck.Params()
    assert params.min_group_size == 30 and params.n_boot == 1000 and params.intersections
    with pytest.raises(ValidationError):
        BiasCheck.Params(min_group_size=0)
    with pytest.raises(ValidationError):
        BiasCheck.Params(n_boot=-1)
    with pytest.raises(ValidationError):
        BiasCheck.Params(unknown=1)


# --------------------------------------------------------------------------------------------
# The planted bias: the biased model fails the proposed rules on `site`, its fair twin passes


@pytest.fixture(scope="module")
def bias_runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, dict[str, Any]]:
    from auditkit.fixtures.bias import generate_bias_study, write_bias_spec
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    root = tmp_path_factory.mktemp("bias-study")
    generate_bias_study(root / "study")
    runs = {}
    for variant in ("biased", "fair"):
        spec = write_bias_spec(root / "study", variant, checks={"bias": {}})
        outcome = run_audit(
            load_spec(spec),
            RunOptions(out_dir=root / variant, pdf=False, report=False),
            checks={"bias": BiasCheck},
        )
        runs[variant] = {"results": outcome.results, "out_dir": root / variant}
    return runs


def rule(judged: dict[str, Any], rule_id: str) -> dict[str, Any]:
    return next(r for r in judged["rules"] if r["id"] == rule_id)


def test_the_biased_model_fails_on_the_planted_grouping(
    bias_runs: Mapping[str, dict[str, Any]],
) -> None:
    (check,) = [c for c in bias_runs["biased"]["results"]["checks"] if c["id"] == "bias"]
    assert check["status"] == "ok", check.get("error")
    judged = evaluate(proposed_policy(), [check])
    assert judged["verdict"] == "fail"
    failed = rule(judged, "BIAS-SENS-GAP")
    assert failed["status"] == "fail"
    assert failed["labels"] == {"metric": "sensitivity", "group_by": "site"}
    assert failed["ci"][0] > 0.10
    # Only groupings that contain the planted column fail.
    for metric in check["metrics"]:
        sensitivity_gap = metric["name"] == "bias.max_gap" and metric["labels"]["metric"] == "sensitivity"
        if sensitivity_gap and metric["ci"] and metric["ci"][0] > 0.10:
            assert "site" in metric["labels"]["group_by"].split(INTERSECTION_SEPARATOR)
    top = next(f for f in check["findings"] if f["kind"] == "subgroup_gap")
    assert (top["metric"], top["group_by"], top["worst_group"]) == ("sensitivity", "site", "C")
    site_c = next(
        m
        for m in check["metrics"]
        if m["name"] == "bias.group_metric"
        and m["labels"] == {"metric": "sensitivity", "group_by": "site", "group": "C"}
    )
    assert site_c["value"] < 0.7


def test_the_fair_twin_passes(bias_runs: Mapping[str, dict[str, Any]]) -> None:
    (check,) = [c for c in bias_runs["fair"]["results"]["checks"] if c["id"] == "bias"]
    assert check["status"] == "ok", check.get("error")
    judged = evaluate(proposed_policy(), [check])
    assert judged["verdict"] == "pass"
    assert rule(judged, "BIAS-SENS-GAP")["status"] == "pass"
    assert rule(judged, "BIAS-SPEC-GAP")["status"] == "pass"
    site = next(
        m
        for m in check["metrics"]
        if m["name"] == "bias.max_gap" and m["labels"] == {"metric": "sensitivity", "group_by": "site"}
    )
    assert site["value"] <= 0.10


def test_the_audit_bundle_holds_the_forest_plot(bias_runs: Mapping[str, dict[str, Any]]) -> None:
    run = bias_runs["biased"]
    (check,) = [c for c in run["results"]["checks"] if c["id"] == "bias"]
    (artifact,) = check["artifacts"]
    svg = run["out_dir"] / artifact["path"]
    assert svg.is_file() and svg.read_bytes().startswith(b"<?xml")
    json.dumps(run["results"], allow_nan=False)


# --------------------------------------------------------------------------------------------
# The engine's quarantine counts reach the findings


def test_quarantined_files_are_counted_per_group(study_factory: Any, tmp_path: Path) -> None:
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    spec_path = study_factory(
        spec_overrides={"checks": {"bias": {"min_group_size": 2, "n_boot": 20}}, "only": ["bias"]}
    )
    broken = spec_path.parent / "data" / "img" / "000.npy"  # row 0 is in the test split
    broken.write_bytes(b"not a numpy file")
    outcome = run_audit(
        load_spec(spec_path),
        RunOptions(out_dir=tmp_path / "out", pdf=False, report=False),
        checks={"bias": BiasCheck},
    )
    (check,) = [c for c in outcome.results["checks"] if c["id"] == "bias"]
    assert check["status"] == "ok", check.get("error")
    findings = [f for f in check["findings"] if f["kind"] == "quarantined_by_group"]
    assert {f["group_by"] for f in findings} == {"sex", "age"}
    assert next(f for f in findings if f["group_by"] == "sex")["quarantined"] == {"M": 1}


# --------------------------------------------------------------------------------------------
# Multi-label models: per label and group, underdiagnosis


def multilabel_case(
    seed: int, n: int = 400, k: int = 4, unknown: float = 0.08
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Sigmoid probabilities informative of 1/0/-1 labels, some images without any finding."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, k)) < 0.3).astype(np.int64)
    logits = rng.normal(size=(n, k)) + 2.5 * truth - 1.5
    labels = truth.copy()
    labels[rng.random((n, k)) < unknown] = -1
    groups = rng.choice(["a", "b", "c"], size=n)
    return 1.0 / (1.0 + np.exp(-logits)), labels, groups, [f"finding{i}" for i in range(k)]


def test_multilabel_group_values_equal_sklearn_and_netcal() -> None:
    from netcal.metrics import ECE
    from sklearn.metrics import confusion_matrix

    probs, labels, groups, names = multilabel_case(1)
    thresholds = {names[0]: 0.3, names[2]: 0.7}
    outcomes = LabelOutcomes.from_probs(probs, labels, names, thresholds, bins=10)
    analysis = analyse_multilabel_grouping(
        outcomes, groups, group_by="site", min_group_size=1, n_boot=0, rng=np.random.default_rng(0)
    )
    for k, name in enumerate(names):
        by_group = {s.group: s for s in analysis.labels[name].groups}
        threshold = thresholds.get(name, 0.5)
        for group in "abc":
            rows = (groups == group) & (labels[:, k] != -1)
            y, p = labels[rows, k], probs[rows, k]
            called = (p >= threshold).astype(int)
            tn, fp, fn, _ = confusion_matrix(y, called, labels=[0, 1]).ravel()
            values = by_group[group].values
            assert values["n"] == rows.sum() == by_group[group].n
            assert values["prevalence"] == pytest.approx(y.mean(), abs=1e-12)
            assert values["accuracy"] == pytest.approx(accuracy_score(y, called), abs=1e-12)
            assert values["sensitivity"] == pytest.approx(recall_score(y, called), abs=1e-12)
            assert values["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-12)
            assert values["ppv"] == pytest.approx(precision_score(y, called), abs=1e-12)
            assert values["npv"] == pytest.approx(tn / (tn + fn), abs=1e-12)
            assert values["selection_rate"] == pytest.approx(called.mean(), abs=1e-12)
            assert values["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
            assert values["ece"] == pytest.approx(ECE(bins=10).measure(p, y), abs=1e-12)
        # fairlearn's equalized-odds difference of the label, over the groups.
        known = labels[:, k] != -1
        reference = equalized_odds_difference(
            labels[known, k], (probs[known, k] >= threshold).astype(int), sensitive_features=groups[known]
        )
        assert analysis.labels[name].equalized_odds.value == pytest.approx(reference)


def test_resampled_label_metrics_equal_the_metrics_of_the_repeated_rows() -> None:
    probs, labels, groups, names = multilabel_case(2, n=120)
    outcomes = LabelOutcomes.from_probs(probs, labels, names, bins=5)
    rows = np.flatnonzero(groups == "a")
    draw = np.random.default_rng(0).integers(0, rows.size, size=rows.size)
    counts = np.bincount(draw, minlength=rows.size)[None, :]
    batched, rate = batched_label_metrics(outcomes, rows, counts)
    picked = rows[draw]
    for k in range(len(names)):
        known = labels[picked, k] != -1
        y, p = labels[picked, k][known], probs[picked, k][known]
        assert batched["sensitivity"][0, k] == pytest.approx(recall_score(y, (p >= 0.5).astype(int)))
        assert batched["auroc"][0, k] == pytest.approx(roc_auc_score(y, p))
    has = (labels[picked] == 1).any(axis=1)
    assert rate[0] == pytest.approx((has & (probs[picked] < 0.5).all(axis=1)).sum() / has.sum())


def direct_underdiagnosis(
    probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, no_finding: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image, by explicit loops: (has a finding, finding status known, called finding-free)."""
    has, known, free = [], [], []
    for p, y in zip(probs, labels, strict=True):
        if no_finding is None:
            positive = any(v == 1 for v in y)
            determined = positive or all(v == 0 for v in y)
            called_free = all(pv < t for pv, t in zip(p, thresholds, strict=True))
        else:
            determined = y[no_finding] != -1
            positive = y[no_finding] == 0
            called_free = p[no_finding] >= thresholds[no_finding]
        has.append(positive and determined)
        known.append(determined)
        free.append(called_free)
    return np.array(has), np.array(known), np.array(free)


@pytest.mark.parametrize("no_finding", [None, 3])
def test_underdiagnosis_rates_equal_a_direct_count(no_finding: int | None) -> None:
    probs, labels, groups, names = multilabel_case(3, n=500, unknown=0.15)
    if no_finding is not None:  # a "no finding" label: 1 exactly when no other known finding
        others = labels[:, :no_finding]
        labels[:, no_finding] = np.where((others == 1).any(axis=1), 0, np.where((others == 0).all(axis=1), 1, -1))
        labels[::17, no_finding] = -1
    thresholds = {names[1]: 0.35, names[3]: 0.6}
    t = np.array([thresholds.get(n, 0.5) for n in names])
    outcomes = LabelOutcomes.from_probs(
        probs, labels, names, thresholds, no_finding=None if no_finding is None else names[no_finding]
    )
    analysis = analyse_multilabel_grouping(
        outcomes, groups, group_by="site", min_group_size=1, n_boot=50, rng=np.random.default_rng(0)
    )
    has, known, free = direct_underdiagnosis(probs, labels, t, no_finding)
    assert (~known).sum() > 10  # images whose status is unknown exist, and are left out
    for summary in analysis.underdiagnosis.groups:
        members = groups == summary.group
        expected = (has & free & members).sum() / (has & members).sum()
        assert summary.values["underdiagnosis_rate"] == pytest.approx(expected, abs=1e-12)
        assert summary.n == (known & members).sum()
        assert analysis.status[summary.group] == {
            "with_finding": int((has & members).sum()),
            "called_finding_free": int((has & free & members).sum()),
            "undetermined": int((~known & members).sum()),
        }
        lo, hi = summary.cis["underdiagnosis_rate"] or (math.nan, math.nan)
        assert 0.0 <= lo <= expected <= hi <= 1.0
    gap = analysis.underdiagnosis.gaps["underdiagnosis_rate"]
    rates = [s.values["underdiagnosis_rate"] for s in analysis.underdiagnosis.groups]
    assert gap.value == pytest.approx(max(rates) - min(rates))


def test_multilabel_inputs_are_validated() -> None:
    probs, labels, _, names = multilabel_case(4, n=20)
    with pytest.raises(ValueError, match="shape"):
        LabelOutcomes.from_probs(probs[:, :2], labels, names)
    with pytest.raises(ValueError, match="1, 0 or -1"):
        LabelOutcomes.from_probs(probs, labels + 1, names)
    with pytest.raises(ValueError, match="not one of the labels"):
        LabelOutcomes.from_probs(probs, labels, names, no_finding="No Finding")
    with pytest.raises(ValueError, match="not labels"):
        LabelOutcomes.from_probs(probs, labels, names, {"other": 0.4})


def test_patient_resampling_keeps_a_patients_images_together() -> None:
    groups = np.array(["a"] * 6 + ["b"] * 4)
    patients = ["p1", "p1", "p2", "p2", "p2", None, "p1", "q", "q", None]
    resampler = GroupResampler.of(groups, ["a", "b"], patients)
    assert resampler.unit == "patient" and resampler.units("a") == 3 and resampler.units("b") == 3
    (_, counts), *_ = resampler.blocks(200, np.random.default_rng(0))
    a, b = counts["a"], counts["b"]
    assert (a[:, 0] == a[:, 1]).all() and (a[:, 2] == a[:, 3]).all() and (a[:, 3] == a[:, 4]).all()
    assert (b[:, 1] == b[:, 2]).all()
    # Patient p1 in group b is a cluster of its own: its draws there are independent of group a's.
    assert not (a[:, 0] == b[:, 0]).all()
    # Each resample draws as many patients as the group has.
    assert (a[:, [0, 2, 5]].sum(axis=1) == 3).all()
    # Renaming groups and patients keeps every resample.
    renamed = GroupResampler.of(np.where(groups == "a", "z", "y"), ["z", "y"], [p and p + "!" for p in patients])
    (_, again), *_ = renamed.blocks(200, np.random.default_rng(0))
    assert (again["z"] == a).all() and (again["y"] == b).all()
    assert GroupResampler.of(groups, ["a"], None).unit == "image"


def test_multilabel_relabelling_groups_keeps_gaps_and_intervals() -> None:
    probs, labels, groups, names = multilabel_case(5, n=300)
    outcomes = LabelOutcomes.from_probs(probs, labels, names)
    patients = [f"p{i // 3}" for i in range(300)]

    def gaps(g: np.ndarray) -> list[Any]:
        analysis = analyse_multilabel_grouping(
            outcomes, g, group_by="g", min_group_size=5, n_boot=40, rng=np.random.default_rng(9), patients=patients
        )
        out = [(gap.value, gap.ci) for a in analysis.labels.values() for gap in a.gaps.values()]
        return [*out, (analysis.underdiagnosis.gaps["underdiagnosis_rate"].value,)]

    renamed = np.array([{"a": "zz", "b": "aa", "c": "mm"}[g] for g in groups])
    assert gaps(groups) == gaps(renamed)


def planted_multilabel_context(
    tmp_path: Path, suppressed: bool, seed: int = 7, **extra: Any
) -> tuple[CheckView, list[str]]:
    """A chest study of 4 findings; with ``suppressed`` the model's probabilities for site C are
    pulled down (its findings were under-labelled in training), so it calls them finding-free."""
    rng = np.random.default_rng(seed)
    n, names = 900, ["effusion", "edema", "nodule", "opacity"]
    patient = np.arange(n) // 2
    site = np.array(["A", "B", "C"])[patient % 3]
    sex = np.array(["F", "M"])[(patient // 3) % 2]
    truth = (rng.random((n, 4)) < 0.3).astype(np.int64)
    logits = rng.normal(size=(n, 4)) + 3.0 * truth - 1.5
    if suppressed:
        logits[site == "C"] -= 1.2
    labels = truth.copy()
    labels[rng.random((n, 4)) < 0.05] = -1
    ctx = make_context(
        labels,
        probs=1.0 / (1.0 + np.exp(-logits)),
        task="multilabel",
        classes=names,
        groups={"sex": sex, "site": site},
        patients=[f"P{p}" for p in patient],
        check=BiasCheck,
        out_dir=tmp_path,
        **extra,
    )
    return ctx, names


def check_record(result: CheckResult) -> dict[str, Any]:
    return {
        "id": "bias",
        "status": "ok",
        "metrics": [m.to_json() for m in result.metrics],
        "findings": result.findings,
    }


@pytest.fixture(scope="module")
def multilabel_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CheckResult]:
    runs = {}
    for variant in ("planted", "clean"):
        ctx, _ = planted_multilabel_context(tmp_path_factory.mktemp(variant), suppressed=variant == "planted")
        runs[variant] = run_check(ctx, n_boot=300)
    return runs


def test_multilabel_metrics_carry_the_label(multilabel_runs: dict[str, CheckResult]) -> None:
    result = multilabel_runs["clean"]
    assert {m.name for m in result.metrics} == set(BiasCheck.emits)
    expected = {
        "bias.group_metric": {"metric", "group_by", "group", "label"},
        "bias.equalized_odds_difference": {"group_by", "label"},
        "bias.demographic_parity_difference": {"group_by", "label"},
        "bias.underdiagnosis_rate": {"group_by", "group"},
        "bias.min_group_size": {"group_by"},
    }
    for metric in result.metrics:
        keys = set(metric.labels)
        if metric.name == "bias.max_gap":
            underdiagnosis = metric.labels["metric"] == "underdiagnosis_rate"
            assert keys == ({"metric", "group_by"} if underdiagnosis else {"metric", "group_by", "label"})
        else:
            assert keys == expected[metric.name], metric
        assert metric.value is not None or metric.reason
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)
    json.dumps(result.findings, allow_nan=False)
    labels = {m.labels.get("label") for m in result.metrics if m.name == "bias.group_metric"}
    assert labels == {"effusion", "edema", "nodule", "opacity"}
    kinds = [f["kind"] for f in result.findings]
    assert {"unknown_labels", "underdiagnosis", "underdiagnosis_by_group", "bootstrap", "subgroup_gap"} <= set(kinds)
    assert next(f for f in result.findings if f["kind"] == "bootstrap")["unit"] == "patient"
    assert [a.name for a in result.artifacts] == ["forest_plot", "label_heatmap"]


def test_the_planted_underdiagnosis_fails_and_names_the_group(multilabel_runs: dict[str, CheckResult]) -> None:
    result = multilabel_runs["planted"]
    judged = evaluate(proposed_policy(), [check_record(result)], task="multilabel")
    assert judged["verdict"] == "fail"
    failed = rule(judged, "BIAS-UNDERDIAG-GAP")
    assert failed["status"] == "fail" and failed["ci"][0] > 0.10
    assert "site" in failed["labels"]["group_by"].split(INTERSECTION_SEPARATOR)
    top = next(f for f in result.findings if f["kind"] == "subgroup_gap" and f["metric"] == "underdiagnosis_rate")
    assert top["group_by"] == "site" and top["worst_group"] == "C"
    rates = {
        m.labels["group"]: float(m.value or 0.0)
        for m in result.metrics
        if m.name == "bias.underdiagnosis_rate" and m.labels["group_by"] == "site"
    }
    assert rates["C"] > 0.2 and max(rates["A"], rates["B"]) < 0.1
    # Per-label sensitivity is suppressed too, and judged per label.
    assert rule(judged, "BIAS-LABEL-SENS-GAP")["status"] == "fail"
    # The classifier's sensitivity-gap rules (and the regressor's) are for other tasks: not applicable.
    for rule_id in ("BIAS-SENS-GAP", "BIAS-SPEC-GAP", "BIAS-SENS-GAP-POINT", "BIAS-MAE-GAP"):
        assert rule_id in judged["policy"]["not_applicable"]["rules"]


def test_the_clean_multilabel_twin_passes(multilabel_runs: dict[str, CheckResult]) -> None:
    judged = evaluate(proposed_policy(), [check_record(multilabel_runs["clean"])], task="multilabel")
    assert judged["verdict"] == "pass"
    for rule_id in ("BIAS-UNDERDIAG-GAP", "BIAS-UNDERDIAG-GAP-POINT", "BIAS-LABEL-SENS-GAP", "BIAS-LABEL-SPEC-GAP"):
        assert rule(judged, rule_id)["status"] == "pass", rule_id


def test_classifier_runs_leave_the_per_label_rules_unjudged(tmp_path: Path) -> None:
    judged = evaluate(proposed_policy(), [check_record(run_check(fake_context(tmp_path), n_boot=20))])
    assert rule(judged, "BIAS-SENS-GAP")["status"] in ("pass", "fail")
    for rule_id in ("BIAS-LABEL-SENS-GAP", "BIAS-UNDERDIAG-GAP", "BIAS-MAE-GAP"):
        assert rule_id in judged["policy"]["not_applicable"]["rules"]  # rules of other tasks


def test_no_finding_names_a_label_of_a_multilabel_model(tmp_path: Path) -> None:
    ctx, _ = planted_multilabel_context(tmp_path, suppressed=False)
    with pytest.raises(ConfigError, match=r"not one of model\.classes"):
        run_check(ctx, no_finding="No Finding")
    with pytest.raises(ConfigError, match="multi-label"):
        run_check(fake_context(tmp_path), no_finding="nodule")
    result = run_check(ctx, no_finding="edema", n_boot=0, intersections=False)
    (finding,) = [f for f in result.findings if f["kind"] == "underdiagnosis"]
    assert finding["no_finding"] == "edema" and "edema entry is 0" in finding["definition"]


def test_multilabel_thresholds_come_from_the_operating_point(tmp_path: Path) -> None:
    ctx, _ = planted_multilabel_context(tmp_path, suppressed=False, operating_point={"edema": 0.9})
    strict = run_check(ctx, n_boot=0, intersections=False)
    ctx, _ = planted_multilabel_context(tmp_path, suppressed=False)
    default = run_check(ctx, n_boot=0, intersections=False)

    def selection(result: CheckResult, label: str) -> float:
        return next(
            float(m.value or 0.0)
            for m in result.metrics
            if m.name == "bias.group_metric"
            and m.labels == {"metric": "selection_rate", "group_by": "site", "group": "A", "label": label}
        )

    assert selection(strict, "edema") < selection(default, "edema")
    assert selection(strict, "nodule") == selection(default, "nodule")


def test_label_heatmap_is_byte_reproducible_and_escapes_labels(tmp_path: Path) -> None:
    probs, labels, groups, names = multilabel_case(6, n=200)
    names = ["$x$ <b>", *names[1:]]
    outcomes = LabelOutcomes.from_probs(probs, labels, names)
    analysis = analyse_multilabel_grouping(
        outcomes, groups, group_by="site", min_group_size=60, n_boot=0, rng=np.random.default_rng(0)
    )
    grouping = [(analysis.group_by, analysis.labels, analysis.images)]
    first = label_heatmap(grouping, tmp_path / "a.svg")
    second = label_heatmap(grouping, tmp_path / "b.svg")
    assert first.read_bytes() == second.read_bytes()
    ET.parse(first)
    assert b"<b>" not in first.read_bytes()
    with pytest.raises(ValueError, match="unknown heat-map metrics"):
        label_heatmap(grouping, tmp_path / "c.svg", metrics=["nonsense"])


# --------------------------------------------------------------------------------------------
# Regression models: MAE and mean error per output and group


def planted_regression_context(
    tmp_path: Path, noisy_site: bool, seed: int = 3
) -> tuple[CheckView, np.ndarray, np.ndarray, np.ndarray]:
    """Bone age and a second output; with ``noisy_site`` site C's bone-age error is 2.5x larger."""
    rng = np.random.default_rng(seed)
    n = 600
    patient = np.arange(n) // 2
    site = np.array(["A", "B", "C"])[patient % 3]
    sex = np.array(["F", "M"])[(patient // 3) % 2]
    target = np.stack([rng.normal(120, 30, n), rng.normal(55, 8, n)], axis=1)
    scale = np.where(noisy_site & (site == "C"), 2.5, 1.0)
    predicted = target + np.stack([rng.normal(0, 6, n) * scale, rng.normal(0, 3, n)], axis=1)
    target[::29, 1] = np.nan  # unknown targets of the second output
    ctx = make_context(
        target,
        probs=predicted,
        task="regression",
        classes=["bone_age", "ejection_fraction"],
        units={"bone_age": "months", "ejection_fraction": "%"},
        groups={"sex": sex, "site": site},
        patients=[f"P{p}" for p in patient],
        check=BiasCheck,
        out_dir=tmp_path,
    )
    return ctx, predicted, target, site


def test_regression_errors_per_group_equal_sklearn() -> None:
    from sklearn.metrics import mean_absolute_error

    rng = np.random.default_rng(0)
    target = rng.normal(size=(300, 2))
    target[::7, 0] = np.nan
    predicted = target + rng.normal(scale=[0.5, 1.0], size=(300, 2))
    predicted = np.where(np.isnan(predicted), 0.3, predicted)
    groups = rng.choice(["a", "b", "c"], size=300)
    outcomes = TargetOutcomes.from_values(predicted, target, ["x", "y"])
    analysis = analyse_regression_grouping(
        outcomes, groups, group_by="g", min_group_size=1, n_boot=100, rng=np.random.default_rng(1)
    )
    for k, name in enumerate(["x", "y"]):
        by_group = {s.group: s for s in analysis.outputs[name].groups}
        for group in "abc":
            rows = (groups == group) & np.isfinite(target[:, k])
            summary = by_group[group]
            assert summary.n == rows.sum()
            assert summary.values["mae"] == pytest.approx(mean_absolute_error(target[rows, k], predicted[rows, k]))
            assert summary.values["mean_error"] == pytest.approx(np.mean(predicted[rows, k] - target[rows, k]))
            for metric in ("mae", "mean_error"):
                lo, hi = summary.cis[metric] or (math.nan, math.nan)
                assert lo <= summary.values[metric] <= hi
        maes = {g: s.values["mae"] for g, s in by_group.items()}
        gaps = analysis.outputs[name].gaps
        assert gaps["mae"].value == pytest.approx(max(maes.values()) - min(maes.values()))
        assert gaps["mae_ratio"].value == pytest.approx(max(maes.values()) / min(maes.values()))
        lo, hi = gaps["mae_ratio"].ci or (math.nan, math.nan)
        assert 1.0 <= lo <= gaps["mae_ratio"].value <= hi
        assert gaps["mae_ratio"].worst == max(maes, key=maes.__getitem__)


def test_mae_ratio_leaves_out_a_group_without_error() -> None:
    target = np.arange(90, dtype=float)
    predicted = target + np.r_[np.zeros(30), np.ones(30), 2 * np.ones(30)]
    groups = np.repeat(["exact", "one", "two"], 30)
    analysis = analyse_regression_grouping(
        TargetOutcomes.from_values(predicted, target, ["y"]),
        groups,
        group_by="g",
        min_group_size=10,
        n_boot=50,
        rng=np.random.default_rng(0),
    )
    gaps = analysis.outputs["y"].gaps
    assert gaps["mae"].value == pytest.approx(2.0)
    assert gaps["mae_ratio"].value == pytest.approx(2.0) and "MAE is 0" in gaps["mae_ratio"].excluded["exact"]
    assert gaps["mean_error"].value == pytest.approx(2.0)


@pytest.fixture(scope="module")
def regression_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[CheckResult, Any]]:
    runs = {}
    for variant in ("planted", "clean"):
        ctx, predicted, target, site = planted_regression_context(
            tmp_path_factory.mktemp(variant), noisy_site=variant == "planted"
        )
        runs[variant] = (run_check(ctx, n_boot=300), (predicted, target, site))
    return runs


def test_regression_metrics_findings_and_units(regression_runs: dict[str, tuple[CheckResult, Any]]) -> None:
    from sklearn.metrics import mean_absolute_error

    result, (predicted, target, site) = regression_runs["clean"]
    assert {m.name for m in result.metrics} == {"bias.group_metric", "bias.max_gap", "bias.min_group_size"}
    for metric in result.metrics:
        if metric.name != "bias.min_group_size":
            assert set(metric.labels) >= {"metric", "group_by", "output"}
        assert metric.value is not None or metric.reason
    for group in "ABC":
        rows = (site == group) & np.isfinite(target[:, 1])
        mae = next(
            m
            for m in result.metrics
            if m.name == "bias.group_metric"
            and m.labels == {"metric": "mae", "group_by": "site", "group": group, "output": "ejection_fraction"}
        )
        assert mae.value == pytest.approx(mean_absolute_error(target[rows, 1], predicted[rows, 1]))
        assert mae.n == rows.sum()
    unknown = next(f for f in result.findings if f["kind"] == "unknown_targets")
    assert unknown["left_out"] == {"ejection_fraction": int(np.isnan(target[:, 1]).sum())}
    gap_findings = [f for f in result.findings if f["kind"] == "subgroup_gap"]
    assert {f["unit"] for f in gap_findings if f["output"] == "bone_age"} == {"months"}
    assert next(f for f in result.findings if f["kind"] == "outputs")["units"]["ejection_fraction"] == "%"
    json.dumps(result.findings, allow_nan=False)
    assert [a.name for a in result.artifacts] == ["forest_plot"]


def test_the_planted_regression_error_fails_and_names_the_group(
    regression_runs: dict[str, tuple[CheckResult, Any]],
) -> None:
    result, _ = regression_runs["planted"]
    judged = evaluate(proposed_policy(), [check_record(result)], task="regression")
    assert judged["verdict"] == "fail"
    failed = rule(judged, "BIAS-MAE-GAP")
    assert failed["status"] == "fail" and failed["ci"][0] > 1.25
    assert failed["labels"]["output"] == "bone_age"
    assert "site" in failed["labels"]["group_by"].split(INTERSECTION_SEPARATOR)
    top = next(f for f in result.findings if f["kind"] == "subgroup_gap")
    assert (top["metric"], top["output"], top["worst_group"]) == ("mae_ratio", "bone_age", "C")
    clean, _ = regression_runs["clean"]
    judged = evaluate(proposed_policy(), [check_record(clean)], task="regression")
    assert judged["verdict"] == "pass"
    assert rule(judged, "BIAS-MAE-GAP")["status"] == "pass"


def test_task_runs_count_non_finite_rows_and_skip_wide_groupings(tmp_path: Path) -> None:
    probs, labels, groups, names = multilabel_case(8, n=120)
    logits = np.log(probs) - np.log1p(-probs)
    logits[:3, 1] = np.nan
    many = np.array([f"id{i}" for i in range(120)])
    ctx = make_context(
        labels,
        logits=logits,
        task="multilabel",
        classes=names,
        groups={"site": groups, "scanner": many},
        check=BiasCheck,
        out_dir=tmp_path,
    )
    result = run_check(ctx, n_boot=20, max_groups=10)
    assert next(f for f in result.findings if f["kind"] == "non_finite_logits")["count"] == 3
    n_site = sum(
        m.value or 0
        for m in result.metrics
        if m.name == "bias.group_metric"
        and m.labels["metric"] == "n"
        and m.labels["label"] == names[0]
        and m.labels["group_by"] == "site"
    )
    assert n_site == (labels[3:, 0] != -1).sum()
    assert any(f["kind"] == "grouping_skipped" and f["group_by"] == "scanner" for f in result.findings)
    skipped = [m for m in result.metrics if m.labels.get("group_by") == "scanner"]
    assert skipped and all(m.value is None and "max_groups" in (m.reason or "") for m in skipped)
    assert {m.labels.get("label") for m in skipped if m.name == "bias.max_gap"} == {*names, None}

    target = np.linspace(0.0, 10.0, 120)
    predicted = target + np.random.default_rng(0).normal(size=120)
    predicted[:2] = np.inf
    ctx = make_context(
        target,
        probs=predicted,
        task="regression",
        classes=["y"],
        groups={"site": groups, "scanner": many},
        check=BiasCheck,
        out_dir=tmp_path,
    )
    result = run_check(ctx, n_boot=20, max_groups=10)
    assert next(f for f in result.findings if f["kind"] == "non_finite_outputs")["count"] == 2
    skipped = [m for m in result.metrics if m.labels.get("group_by") == "scanner" and m.name == "bias.max_gap"]
    assert {m.labels["metric"] for m in skipped} == {"mae", "mean_error", "mae_ratio"}


def test_per_label_gap_intervals_hold_for_all_labels_at_once() -> None:
    # A fair 14-label model, six groups of ~80 images: per-label 95% intervals put one label's
    # sensitivity gap demonstrably above ten points; intervals simultaneous over labels do not.
    rng = np.random.default_rng(0)
    n, k = 500, 14
    truth = (rng.random((n, k)) < 0.15).astype(np.int64)
    probs = 1.0 / (1.0 + np.exp(-(rng.normal(size=(n, k)) + 2.5 * truth - 2.0)))
    groups = rng.choice([f"g{i}" for i in range(6)], size=n)
    names = [f"L{i}" for i in range(k)]
    outcomes = LabelOutcomes.from_probs(probs, truth, names)
    analysis = analyse_multilabel_grouping(
        outcomes, groups, group_by="g", min_group_size=30, n_boot=300, rng=np.random.default_rng(0)
    )
    resampler = GroupResampler.of(groups, sorted(set(groups)), None)
    replicates = {g: np.empty((300, k)) for g in resampler.order}
    for block, counts in resampler.blocks(300, np.random.default_rng(0)):  # the analysis's own draw
        for g in resampler.order:
            replicates[g][block] = batched_label_metrics(outcomes, resampler.members[g], counts[g])[0]["sensitivity"]
    separate_low = []
    for index, name in enumerate(names):
        gap = analysis.labels[name].gaps["sensitivity"]
        point = {s.group: {"sensitivity": float(s.values["sensitivity"] or 0.0)} for s in analysis.labels[name].groups}
        reps = {g: {"sensitivity": replicates[g][:, index]} for g in point}
        value, separate = gap_interval(point, reps, ["sensitivity"])
        assert gap.value == pytest.approx(value) and gap.ci is not None and separate is not None
        assert gap.ci[0] <= separate[0] and gap.ci[1] >= separate[1]  # never narrower
        separate_low.append(separate[0])
    assert max(separate_low) > 0.10
    assert max((a.gaps["sensitivity"].ci or (0.0, 0.0))[0] for a in analysis.labels.values()) <= 0.10
    # One family: the joint interval is the per-family one.
    point = {s.group: {"sensitivity": float(s.values["sensitivity"] or 0.0)} for s in analysis.labels["L0"].groups}
    reps = {g: {"sensitivity": replicates[g][:, 0]} for g in point}
    ((_, (value, joint)),) = joint_gap_intervals({"L0": point}, {"L0": reps}, ["sensitivity"]).items()
    assert joint == pytest.approx(gap_interval(point, reps, ["sensitivity"])[1])
