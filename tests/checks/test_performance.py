"""The performance check: scikit-learn's figures at the operating point, patient-level intervals,
claims held against the interval, and bad claims or thresholds refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
)

from auditkit.check import CheckResult, Metric
from auditkit.checks.performance import PerformanceCheck
from auditkit.checks.performance.metrics import (
    Decision,
    binary_metrics,
    cluster_resamples,
    fast_auroc,
    fast_average_precision,
    multiclass_metrics,
)
from auditkit.policy import evaluate
from auditkit.testing import make_context, rules_for


def _metric(result: CheckResult, name: str, **labels: str) -> Metric:
    (found,) = [m for m in result.metrics if m.name == name and m.labels == labels]
    return found


def _binary_case(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    score = np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.2, n), 0.01, 0.99)
    probs = np.stack([1 - score, score], axis=1)
    patients = [f"P{i // 2}" for i in range(n)]  # two images per patient
    return probs, labels, patients


def test_the_figures_are_scikit_learns_on_the_demo(demo_context: Any) -> None:
    ctx = demo_context.for_check(PerformanceCheck)
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=200))
    preds = demo_context.predictions("eval")
    positive = demo_context.positive_index
    y, p = preds.labels, preds.probs
    called = p.argmax(axis=1)
    truth, call = y == positive, called == positive
    expected = {
        "accuracy": accuracy_score(y, called),
        "balanced_accuracy": balanced_accuracy_score(y, called),
        "auroc": roc_auc_score(truth, p[:, positive]),
        "auprc": average_precision_score(truth, p[:, positive]),
        "sensitivity": (truth & call).sum() / truth.sum(),
        "specificity": (~truth & ~call).sum() / (~truth).sum(),
    }
    for name, value in expected.items():
        metric = _metric(result, f"performance.{name}")
        assert metric.value == pytest.approx(value, abs=1e-12), name
        assert metric.ci is not None and metric.value is not None
        assert metric.ci[0] <= metric.value <= metric.ci[1]
    (unit,) = [f for f in result.findings if f["kind"] == "bootstrap"]
    assert unit["unit"] == "patient" and unit["resampled"] < preds.n  # patients, not images
    assert [a.name for a in result.artifacts] == ["roc_pr_curves"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=2, max_size=60),
)
def test_fast_ranking_metrics_equal_scikit_learns(rows: list[tuple[bool, int]]) -> None:
    truth = np.array([r[0] for r in rows])
    score = np.array([r[1] / 20 for r in rows], dtype=np.float64)  # many ties on purpose
    if truth.all() or not truth.any():
        assert np.isnan(fast_auroc(truth, score)) and np.isnan(fast_average_precision(truth, score))
        return
    assert fast_auroc(truth, score) == pytest.approx(roc_auc_score(truth, score), abs=1e-12)
    assert fast_average_precision(truth, score) == pytest.approx(average_precision_score(truth, score), abs=1e-12)


def test_fast_and_scikit_learn_paths_agree_on_every_figure() -> None:
    probs, labels, _ = _binary_case()
    decision = Decision(1, 0.4)
    slow, fast = binary_metrics(probs, labels, decision), binary_metrics(probs, labels, decision, fast=True)
    assert slow.keys() == fast.keys()
    for key in slow:
        assert fast[key] == pytest.approx(slow[key], abs=1e-12), key
    rng = np.random.default_rng(1)
    three = rng.dirichlet([1, 1, 1], size=90)
    y = rng.integers(0, 3, 90)
    slow, fast = (
        multiclass_metrics(three, y, Decision(None, None)),
        multiclass_metrics(three, y, Decision(None, None), fast=True),
    )
    for key in slow:
        assert fast[key] == pytest.approx(slow[key], abs=1e-12), key


def test_the_bootstrap_resamples_whole_patients() -> None:
    clusters = ["A", "A", "B", None, "C", "C", "C", None]
    for rows in cluster_resamples(clusters, 50, np.random.default_rng(0)):
        picked = [clusters[i] for i in rows]
        for patient, size in (("A", 2), ("C", 3)):
            assert picked.count(patient) % size == 0  # a patient comes with all of its images
        assert {int(i) for i in rows} <= set(range(8))


def test_the_operating_point_moves_the_decision(tmp_path: Path) -> None:
    probs, labels, patients = _binary_case()
    common = {"probs": probs, "patients": patients, "classes": ["normal", "nodule"], "check": PerformanceCheck}
    default = PerformanceCheck().run(make_context(labels, **common), PerformanceCheck.Params(n_boot=0))
    lenient = PerformanceCheck().run(
        make_context(labels, operating_point={"nodule": 0.3}, **common), PerformanceCheck.Params(n_boot=0)
    )
    assert _metric(lenient, "performance.sensitivity").value > _metric(default, "performance.sensitivity").value  # type: ignore[operator]
    assert _metric(lenient, "performance.specificity").value < _metric(default, "performance.specificity").value  # type: ignore[operator]
    assert _metric(lenient, "performance.auroc").value == _metric(default, "performance.auroc").value
    (point,) = [f for f in lenient.findings if f["kind"] == "operating_point"]
    assert point["threshold"] == 0.3 and "p(nodule) >= 0.3" in point["decision"]
    (matrix,) = [f for f in lenient.findings if f["kind"] == "confusion_matrix"]
    assert sum(map(sum, matrix["counts"])) == labels.size


def test_a_true_claim_passes_and_an_inflated_one_fails_with_its_shortfall(tmp_path: Path) -> None:
    probs, labels, patients = _binary_case()
    auroc = roc_auc_score(labels, probs[:, 1])
    claims = {"performance.auroc": round(auroc - 0.02, 3), "performance.sensitivity": 0.999}
    ctx = make_context(
        labels, probs=probs, patients=patients, classes=["normal", "nodule"], claims=claims, check=PerformanceCheck
    )
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=300))
    true_claim = _metric(result, "performance.claim_shortfall", metric="performance.auroc")
    inflated = _metric(result, "performance.claim_shortfall", metric="performance.sensitivity")
    sensitivity = _metric(result, "performance.sensitivity")
    assert sensitivity.ci is not None
    assert true_claim.value is not None and true_claim.value < 0
    assert inflated.value == pytest.approx(0.999 - sensitivity.ci[1])
    assert inflated.value is not None and inflated.value > 0
    judged = evaluate(
        rules_for("performance"), [{"id": "performance", "metrics": [m.to_json() for m in result.metrics]}]
    )
    outcome = {r["id"]: (r["status"], r.get("observed")) for r in judged["rules"]}
    assert outcome["PERF-AUROC"][0] == "pass"
    claims_judged = [r for r in judged["rules"] if r["id"] == "PERF-CLAIM"]
    assert [r["status"] for r in claims_judged] == ["fail"]
    supported = {f["metric"]: f["supported"] for f in result.findings if f["kind"] == "claim"}
    assert supported == {"performance.auroc": True, "performance.sensitivity": False}


def test_multiclass_is_one_vs_rest_and_a_missing_class_is_undefined_with_its_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)  # class 2 never occurs
    probs = rng.dirichlet([2, 2, 1], size=60)
    ctx = make_context(labels, probs=probs, classes=["a", "b", "c"], check=PerformanceCheck)
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=50))
    assert _metric(result, "performance.auroc", **{"class": "a"}).value == pytest.approx(
        roc_auc_score(labels == 0, probs[:, 0])
    )
    missing = _metric(result, "performance.auroc", **{"class": "c"})
    assert missing.value is None and "undefined for c" in (missing.reason or "")
    assert _metric(result, "performance.sensitivity", **{"class": "c"}).value is None
    assert _metric(result, "performance.accuracy").value == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    (unit,) = [f for f in result.findings if f["kind"] == "bootstrap"]
    assert unit["unit"] == "image"


def test_conformance(tmp_path: Path) -> None:
    from auditkit.testing import check_check

    report = check_check(PerformanceCheck, workdir=tmp_path, n_patients=12)
    assert report.status == "ok" and report.n_metrics == 8


# --------------------------------------------------------------------------- multilabel
def _multilabel_case(
    n: int = 240, seed: int = 3, *, prevalence: tuple[float, ...] = (0.3, 0.15, 0.5), unknown: float = 0.1
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels 1/0/-1 and sigmoid scores that separate them; three images per patient."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, len(prevalence))) < np.array(prevalence)).astype(np.int64)
    score = 1.0 / (1.0 + np.exp(-(1.6 * (2 * truth - 1) + rng.normal(0, 1.2, truth.shape))))
    labels = np.where(rng.random(truth.shape) < unknown, -1, truth)
    return labels, score, [f"P{i // 3}" for i in range(n)]


def test_multilabel_figures_are_scikit_learns_on_each_labels_known_entries() -> None:
    labels, probs, patients = _multilabel_case()
    names = ["effusion", "nodule", "edema"]
    ctx = make_context(
        labels,
        probs=probs,
        patients=patients,
        task="multilabel",
        classes=names,
        operating_point={"nodule": 0.3},
        check=PerformanceCheck,
    )
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=200))
    p = ctx.predictions("eval").probs  # the sigmoid of the stored float32 logits
    aurocs = []
    for k, name in enumerate(names):
        known = labels[:, k] >= 0
        truth, score = labels[known, k] == 1, p[known, k]
        called = score >= (0.3 if name == "nodule" else 0.5)
        auroc = _metric(result, "performance.auroc", label=name)
        assert auroc.value == pytest.approx(roc_auc_score(truth, score), abs=1e-9)
        assert auroc.n == known.sum() and auroc.ci is not None and auroc.value is not None
        assert auroc.ci[0] <= auroc.value <= auroc.ci[1]
        auprc = _metric(result, "performance.auprc", label=name)
        assert auprc.value == pytest.approx(average_precision_score(truth, score), abs=1e-9)
        assert _metric(result, "performance.sensitivity", label=name).value == pytest.approx(
            (truth & called).sum() / truth.sum()
        )
        assert _metric(result, "performance.specificity", label=name).value == pytest.approx(
            (~truth & ~called).sum() / (~truth).sum()
        )
        assert _metric(result, "performance.ppv", label=name).value == pytest.approx(
            (truth & called).sum() / called.sum()
        )
        aurocs.append(roc_auc_score(truth, score))
    macro = _metric(result, "performance.macro_auroc")
    assert macro.labels == {} and macro.value == pytest.approx(np.mean(aurocs), abs=1e-12)
    assert macro.ci is not None and macro.value is not None and macro.ci[0] <= macro.value <= macro.ci[1]
    (counts,) = [f for f in result.findings if f["kind"] == "label_counts"]
    for k, entry in enumerate(counts["labels"]):
        assert entry["unknown"] == int((labels[:, k] == -1).sum()) > 0
        assert entry["known"] + entry["unknown"] == labels.shape[0]
        assert entry["positives"] == int((labels[:, k] == 1).sum())
    (point,) = [f for f in result.findings if f["kind"] == "operating_point"]
    assert point["thresholds"] == {"effusion": 0.5, "nodule": 0.3, "edema": 0.5} and point["from_spec"] == ["nodule"]
    (unit,) = [f for f in result.findings if f["kind"] == "bootstrap"]
    assert unit["unit"] == "patient" and unit["resampled"] == 80
    assert [a.name for a in result.artifacts] == ["roc_pr_curves"]
    assert not any(m.name in ("performance.accuracy", "performance.balanced_accuracy") for m in result.metrics)


def test_a_label_without_a_positive_is_undefined_counted_and_left_out_of_the_macro() -> None:
    labels, probs, _ = _multilabel_case(prevalence=(0.3, 0.0, 0.5))
    ctx = make_context(labels, probs=probs, task="multilabel", classes=["a", "rare", "c"], check=PerformanceCheck)
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=100))
    for name in ("auroc", "auprc", "sensitivity"):
        metric = _metric(result, f"performance.{name}", label="rare")
        assert metric.value is None and "no positive known case of rare" in (metric.reason or "")
    assert _metric(result, "performance.specificity", label="rare").value is not None  # negatives exist
    (undefined,) = [f for f in result.findings if f["kind"] == "undefined_labels"]
    assert undefined["count"] == 1 and list(undefined["labels"]) == ["rare"]
    (macro_note,) = [f for f in result.findings if f["kind"] == "macro_auroc"]
    assert macro_note["averaged"] == ["a", "c"] and "rare" in macro_note["note"]
    defined = [_metric(result, "performance.auroc", label=k).value for k in ("a", "c")]
    assert _metric(result, "performance.macro_auroc").value == pytest.approx(np.mean(defined))  # type: ignore[arg-type]


def test_multilabel_claims_are_judged_per_label_by_perf_claim() -> None:
    labels, probs, patients = _multilabel_case()
    names = ["a", "b", "c"]
    known = labels[:, 0] >= 0
    auroc_a = roc_auc_score(labels[known, 0] == 1, probs[known, 0])

    def judged(claims: dict[str, Any]) -> tuple[CheckResult, dict[str, Any]]:
        ctx = make_context(
            labels,
            probs=probs,
            patients=patients,
            task="multilabel",
            classes=names,
            claims=claims,
            check=PerformanceCheck,
        )
        result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=300))
        records = evaluate(
            rules_for("performance"),
            [{"id": "performance", "metrics": [m.to_json() for m in result.metrics]}],
            task="multilabel",
        )
        return result, {r["id"]: r for r in records["rules"]}

    true_result, true_rules = judged(
        {"performance.auroc": {"a": round(auroc_a - 0.02, 3)}, "performance.macro_auroc": 0.8}
    )
    assert true_rules["PERF-CLAIM"]["status"] == "pass" and true_rules["PERF-CLAIM"]["matched"] == 2
    assert _metric(true_result, "performance.claim_shortfall", metric="performance.auroc", label="a").value < 0  # type: ignore[operator]

    inflated_result, inflated_rules = judged({"performance.auroc": {"a": 0.999, "c": 0.5}})
    shortfall = _metric(inflated_result, "performance.claim_shortfall", metric="performance.auroc", label="a")
    measured = _metric(inflated_result, "performance.auroc", label="a")
    assert measured.ci is not None and shortfall.value == pytest.approx(0.999 - measured.ci[1])
    rule = inflated_rules["PERF-CLAIM"]
    assert rule["status"] == "fail" and rule["labels"] == {"metric": "performance.auroc", "label": "a"}
    assert rule["observed"] == pytest.approx(shortfall.value)
    supported = {f["label"]: f["supported"] for f in inflated_result.findings if f["kind"] == "claim"}
    assert supported == {"a": False, "c": True}
    # PERF-AUROC judges a classifier's overall AUROC: not applicable here; PERF-MACRO-AUROC the macro.
    assert "PERF-AUROC" not in inflated_rules
    assert inflated_rules["PERF-MACRO-AUROC"]["status"] == "pass"


def test_perf_macro_auroc_warns_on_a_model_that_ranks_no_better_than_chance() -> None:
    labels, _, patients = _multilabel_case()
    noise = np.random.default_rng(9).random(labels.shape)
    ctx = make_context(labels, probs=noise, patients=patients, task="multilabel", check=PerformanceCheck)
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=200))
    records = evaluate(
        rules_for("performance"),
        [{"id": "performance", "metrics": [m.to_json() for m in result.metrics]}],
        task="multilabel",
    )
    (rule,) = [r for r in records["rules"] if r["id"] == "PERF-MACRO-AUROC"]
    assert rule["status"] == "warn" and rule["observed"] < 0.7


def test_the_shared_weighted_bootstrap_equals_scoring_each_resample() -> None:
    from auditkit.checks.performance.metrics import cluster_weights, rates, weighted_ranking, weighted_rates

    rng = np.random.default_rng(4)
    n = 40
    truth = rng.random(n) < 0.4
    score = np.round(rng.random(n), 1)  # ties on purpose, within and across the classes
    called = score >= 0.5
    patients = [f"P{i // 4}" if i < 32 else None for i in range(n)]
    blocks = list(cluster_weights(patients, 30, np.random.default_rng(0), block_elements=7 * n))
    weights = np.concatenate(blocks)
    assert len(blocks) > 1 and weights.shape == (30, n)
    scored = np.arange(3, n)  # the weights' columns 3.. are the scored rows (as a label's known rows)
    auroc, ap = weighted_ranking(truth[3:], score[3:], weights, scored)
    sensitivity = weighted_rates(truth[3:], called[3:], weights, scored)
    checked = 0
    for b in range(weights.shape[0]):
        for i in range(0, 32, 4):
            assert len(set(weights[b, i : i + 4].tolist())) == 1  # a patient comes with all of its images
        rows = np.repeat(scored, weights[b, 3:].astype(int))
        t, s = truth[rows], score[rows]
        expected = rates(t, called[rows])
        for name, values in sensitivity.items():
            assert values[b] == pytest.approx(expected[name], abs=1e-12, nan_ok=True), name
        if t.all() or not t.any():
            assert np.isnan(auroc[b]) and np.isnan(ap[b])
            continue
        assert auroc[b] == pytest.approx(roc_auc_score(t, s), abs=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(t, s), abs=1e-12)
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("case", ["binary", "binary_threshold", "three_classes"])
def test_the_classification_bootstrap_equals_each_resamples_own_figures(case: str) -> None:
    from auditkit.checks.performance.metrics import cluster_weights, weighted_classification

    rng = np.random.default_rng(7)
    n = 36
    if case == "three_classes":
        probs = np.round(rng.dirichlet([1, 1, 1], size=n), 1)  # ties on purpose
        labels = rng.integers(0, 3, n)
        labels[:2] = 2  # class 2 is rare: resamples without it leave its figures undefined
        labels[labels == 2] = np.where(np.arange((labels == 2).sum()) < 2, 2, 0)
        decision = Decision(None, None)
    else:
        positive = np.round(rng.random(n), 1)
        probs = np.stack([1 - positive, positive], axis=1)
        labels = (rng.random(n) < 0.3).astype(np.int64)
        decision = Decision(1, 0.35 if case == "binary_threshold" else None)
    patients = [f"P{i // 3}" if i < 30 else None for i in range(n)]
    weights = np.concatenate(list(cluster_weights(patients, 40, np.random.default_rng(1))))
    figures = weighted_classification(probs, labels, decision, weights)
    reference = binary_metrics if decision.positive is not None else multiclass_metrics
    assert set(figures) == set(reference(probs, labels, decision))
    undefined = 0
    for b in range(weights.shape[0]):
        rows = np.repeat(np.arange(n), weights[b].astype(int))
        expected = reference(probs[rows], labels[rows], decision, fast=True)
        for key, values in figures.items():
            assert values[b] == pytest.approx(expected[key], abs=1e-12, nan_ok=True), (b, key)
        undefined += sum(np.isnan(v) for v in expected.values())
    assert case != "three_classes" or undefined > 0  # the rare class's undefined figures were exercised


# --------------------------------------------------------------------------- regression
def _regression_case(n: int = 150, seed: int = 5, bias: float = 3.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    target = rng.normal(120.0, 30.0, n)  # bone age in months
    predicted = target + bias + rng.normal(0.0, 8.0, n)
    return target, predicted, [f"P{i // 2}" for i in range(n)]


def test_regression_figures_are_scikit_learns_with_units_and_bland_altman(tmp_path: Path) -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    target, predicted, patients = _regression_case()
    ctx = make_context(
        target,
        probs=predicted,
        patients=patients,
        task="regression",
        classes=["bone_age"],
        units={"bone_age": "months"},
        check=PerformanceCheck,
        out_dir=tmp_path,
    )
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=300))
    y, p = ctx.predictions("eval").labels[:, 0], ctx.predictions("eval").probs[:, 0]  # p: float32 outputs
    expected = {
        "mae": mean_absolute_error(y, p),
        "rmse": mean_squared_error(y, p) ** 0.5,
        "r2": r2_score(y, p),
        "mean_error": np.mean(p - y),
    }
    for name, value in expected.items():
        metric = _metric(result, f"performance.{name}")  # one output: no labels
        assert metric.value == pytest.approx(value, abs=1e-9), name
        assert metric.ci is not None and metric.value is not None, name
        assert metric.ci[0] <= metric.value <= metric.ci[1], name
    assert _metric(result, "performance.mae").direction == "lower_is_better"
    bias = _metric(result, "performance.mean_error")
    assert bias.ci is not None and bias.ci[0] > 0  # the planted +3 months: prediction minus target
    (outputs,) = [f for f in result.findings if f["kind"] == "outputs"]
    (entry,) = outputs["outputs"]
    agreement = entry["bland_altman"]
    sd = np.std(p - y, ddof=1)
    assert entry["unit"] == "months" and agreement["mean_difference"] == pytest.approx(expected["mean_error"])
    assert agreement["upper_limit"] == pytest.approx(expected["mean_error"] + 1.96 * sd)
    (artifact,) = result.artifacts
    assert artifact.name == "bland_altman" and "<svg" in (tmp_path / artifact.path).read_text(encoding="utf-8")


def test_several_outputs_are_labelled_and_a_constant_target_leaves_r2_undefined() -> None:
    from auditkit.checks.performance.regression import regression_estimates, regression_replicates

    target, predicted, _ = _regression_case(n=60)
    flat = np.full(60, 55.0)  # ejection fraction, all the same
    ctx = make_context(
        np.stack([target, flat], axis=1),
        probs=np.stack([predicted, flat + np.random.default_rng(1).normal(0, 2, 60)], axis=1),
        task="regression",
        classes=["bone_age", "ef"],
        units={"ef": "%"},
        check=PerformanceCheck,
    )
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=100))
    assert _metric(result, "performance.mae", output="bone_age").value is not None
    r2 = _metric(result, "performance.r2", output="ef")
    assert r2.value is None and "differ" in (r2.reason or "")
    assert _metric(result, "performance.mae", output="ef").value is not None
    # the weighted replicates equal the estimates on an explicit resample
    rng = np.random.default_rng(2)
    weights = rng.multinomial(60, np.full(60, 1 / 60), size=5)
    for b in range(5):
        rows = np.repeat(np.arange(60), weights[b])
        direct = regression_estimates(predicted[rows], target[rows])
        for name, values in regression_replicates(predicted, target, weights[b : b + 1]).items():
            assert values[0] == pytest.approx(direct[name], abs=1e-9), name


def test_regression_claims_lower_is_better_for_errors() -> None:
    target, predicted, patients = _regression_case()
    mae = float(np.mean(np.abs(predicted - target)))

    def run(claims: dict[str, Any]) -> tuple[CheckResult, dict[str, Any]]:
        ctx = make_context(
            target,
            probs=predicted,
            patients=patients,
            task="regression",
            classes=["bone_age"],
            claims=claims,
            check=PerformanceCheck,
        )
        result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=300))
        records = evaluate(
            rules_for("performance"),
            [{"id": "performance", "metrics": [m.to_json() for m in result.metrics]}],
            task="regression",
        )
        return result, {r["id"]: r for r in records["rules"]}

    honest, rules = run({"performance.mae": round(mae + 0.5, 2), "performance.r2": 0.8})
    assert rules["PERF-CLAIM"]["status"] == "pass" and rules["PERF-CLAIM"]["matched"] == 2
    assert rules["PERF-R2"]["status"] == "pass"
    assert [f["supported"] for f in honest.findings if f["kind"] == "claim"] == [True, True]
    inflated, rules = run({"performance.mae": round(mae / 2, 2)})
    shortfall = _metric(inflated, "performance.claim_shortfall", metric="performance.mae")
    measured = _metric(inflated, "performance.mae")
    assert measured.ci is not None and shortfall.value == pytest.approx(measured.ci[0] - round(mae / 2, 2))
    assert rules["PERF-CLAIM"]["status"] == "fail" and rules["PERF-CLAIM"]["observed"] > 0
    (finding,) = [f for f in inflated.findings if f["kind"] == "claim"]
    assert finding["judged_on"] == "lower end of the 95% interval" and not finding["supported"]


def test_perf_r2_warns_on_a_regressor_that_explains_little() -> None:
    target, _, patients = _regression_case()
    guess = np.full_like(target, target.mean()) + np.random.default_rng(3).normal(0, 25, target.size)
    ctx = make_context(target, probs=guess, patients=patients, task="regression", check=PerformanceCheck)
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=200))
    records = evaluate(
        rules_for("performance"),
        [{"id": "performance", "metrics": [m.to_json() for m in result.metrics]}],
        task="regression",
    )
    (rule,) = [r for r in records["rules"] if r["id"] == "PERF-R2"]
    assert rule["status"] == "warn" and rule["observed"] < 0.5
