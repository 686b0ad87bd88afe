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
        assert metric.ci is not None and metric.ci[0] <= metric.value <= metric.ci[1]
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
    assert inflated.value > 0
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
