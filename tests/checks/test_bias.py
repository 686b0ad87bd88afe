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
    Outcomes,
    analyse_grouping,
    batched_group_metrics,
    bootstrap_group_metrics,
    count_text,
    forest_plot,
    gap_interval,
    intersect,
    metric_frame,
)
from auditkit.checks.bias.plots import _plain
from auditkit.checks.calibration import expected_calibration_error
from auditkit.context import CheckView
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
    assert names == set(BiasCheck.emits)
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
