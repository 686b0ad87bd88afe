"""The planted multi-label and regression fixtures judged by the packaged policy: the failing rule
names the planted group, and the clean twin passes it (issue 18's acceptance, end to end through
``auditkit run`` on the bias and performance checks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auditkit.cli import main
from auditkit.fixtures import multilabel, regression


def _audit(spec: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = main(["run", str(spec), "--only", "bias,performance", "--no-pdf", "--out", str(out), "--quiet"])
    output = capsys.readouterr()
    assert code in (0, 1), output.out + output.err
    return dict(json.loads((out / "results.json").read_text()))


def _rule(results: dict[str, Any], rule_id: str) -> dict[str, Any]:
    return next(r for r in results["rules"] if r["id"] == rule_id)


def _metric(results: dict[str, Any], name: str, **labels: str) -> dict[str, Any]:
    metrics = [m for c in results["checks"] for m in c.get("metrics", [])]
    return next(m for m in metrics if m["name"] == name and m["labels"] == labels)


@pytest.fixture(scope="module")
def multilabel_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multilabel-judged")
    multilabel.generate_multilabel_study(root)
    return root


@pytest.fixture(scope="module")
def regression_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("regression-judged")
    regression.generate_regression_study(root)
    return root


def test_underdiagnosis_of_women_is_named_and_the_clean_twin_passes(
    multilabel_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = _audit(multilabel.write_multilabel_spec(multilabel_study, "underlabelled"), tmp_path / "p", capsys)
    clean = _audit(multilabel.write_multilabel_spec(multilabel_study, "clean"), tmp_path / "c", capsys)
    rule = _rule(planted, "BIAS-UNDERDIAG-GAP")
    assert rule["status"] == "fail" and rule["labels"] == {"metric": "underdiagnosis_rate", "group_by": "sex"}
    women = _metric(planted, "bias.underdiagnosis_rate", group_by="sex", group="F")
    men = _metric(planted, "bias.underdiagnosis_rate", group_by="sex", group="M")
    assert women["value"] > men["value"] + 0.15 and women["ci"][0] > men["ci"][1]
    assert _rule(clean, "BIAS-UNDERDIAG-GAP")["status"] == "pass"
    assert _rule(clean, "BIAS-UNDERDIAG-GAP-POINT")["status"] == "pass"
    # The masked output never reaches a metric; the labels do.
    labels = {m["labels"].get("label") for c in clean["checks"] for m in c.get("metrics", [])}
    assert "fracture" not in labels and {"effusion", "nodule", "cardiomegaly"} <= labels
    assert _metric(clean, "performance.macro_auroc")["value"] > 0.9


def test_the_site_the_regressor_never_saw_is_named_and_the_fair_twin_passes(
    regression_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = _audit(regression.write_regression_spec(regression_study, "biased"), tmp_path / "p", capsys)
    fair = _audit(regression.write_regression_spec(regression_study, "fair"), tmp_path / "f", capsys)
    rule = _rule(planted, "BIAS-MAE-GAP")
    assert rule["status"] == "fail" and "site" in rule["labels"]["group_by"]
    site_c = _metric(planted, "bias.group_metric", metric="mae", group_by="site", group="C", output="ctr")
    site_a = _metric(planted, "bias.group_metric", metric="mae", group_by="site", group="A", output="ctr")
    assert site_c["value"] > 2 * site_a["value"]
    assert _rule(fair, "BIAS-MAE-GAP")["status"] == "pass"
    assert _metric(fair, "performance.r2")["ci"][0] > 0.5


def test_regression_performance_equals_scikit_learn_on_the_fixture(regression_study: Path, tmp_path: Path) -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from auditkit.checks.performance import PerformanceCheck
    from auditkit.context import AuditContext
    from auditkit.data import load_dataset
    from auditkit.model import ModelAdapter
    from auditkit.spec import load_spec

    spec = load_spec(regression.write_regression_spec(regression_study, "biased"))
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), load_dataset(spec, roles=("eval",)), tmp_path)
    view = ctx.for_check(PerformanceCheck)
    result = PerformanceCheck().run(view, PerformanceCheck.Params())
    predictions = view.predictions()
    y, p = predictions.labels[:, 0], predictions.probs[:, 0]
    values = {m.name: m.value for m in result.metrics if not m.labels}
    assert values["performance.mae"] == pytest.approx(mean_absolute_error(y, p), abs=1e-9)
    assert values["performance.rmse"] == pytest.approx(mean_squared_error(y, p) ** 0.5, abs=1e-9)
    assert values["performance.r2"] == pytest.approx(r2_score(y, p), abs=1e-9)
    assert values["performance.mean_error"] == pytest.approx(float((p - y).mean()), abs=1e-9)
