"""The policy engine on hand-built results: every outcome, every `use` mode, label matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from auditkit.errors import ConfigError
from auditkit.policy import (
    Attestation,
    Policy,
    Rule,
    control_status,
    evaluate,
    evaluate_rule,
    labels_match,
    load_attestations,
    load_framework,
    parse_policy,
)


def metric(
    name: str,
    value: float | None,
    labels: dict[str, str] | None = None,
    ci: tuple[float, float] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "labels": labels or {},
        "value": value,
        "ci": list(ci) if ci else None,
        "n": 100,
        "direction": "lower_is_better",
    }
    if reason:
        out["reason"] = reason
    return out


METRICS = [
    metric("calibration.ece", 0.04, ci=(0.02, 0.07)),
    metric("calibration.ece", 0.03, {"group_by": "sex", "group": "F"}, ci=(0.01, 0.05)),
    metric("calibration.ece", 0.12, {"group_by": "sex", "group": "M"}, ci=(0.08, 0.16)),
    metric("calibration.ece", 0.09, {"group_by": "site", "group": "A"}, ci=(0.05, 0.13)),
    metric(
        "adversarial.robust_accuracy",
        0.61,
        {"attack": "pgd_linf", "eps": "0.0039"},
        ci=(0.55, 0.67),
    ),
    metric(
        "adversarial.robust_accuracy",
        0.42,
        {"attack": "pgd_linf", "eps": "0.0078"},
        ci=(0.36, 0.48),
    ),
    metric("adversarial.robust_accuracy", 0.70, {"attack": "fgsm", "eps": "0.0078"}, ci=None),
    metric(
        "bias.max_gap",
        None,
        {"metric": "sensitivity", "group_by": "sex"},
        reason="no positives in group M",
    ),
]


def rule(**kwargs: Any) -> Rule:
    base = {"id": "R1", "metric": "calibration.ece", "max": 0.05, "controls": ["MEASURE 2.5"]}
    return Rule(**{**base, **kwargs})


def test_labels_matching() -> None:
    assert labels_match(None, {"a": "1"})
    assert labels_match({}, {})
    assert not labels_match({}, {"group_by": "sex", "group": "F"})
    assert labels_match({"group_by": "*", "group": "*"}, {"group_by": "sex", "group": "F"})
    assert labels_match({"group_by": "sex", "group": "*"}, {"group_by": "sex", "group": "F"})
    assert not labels_match({"group_by": "site", "group": "*"}, {"group_by": "sex", "group": "F"})
    assert not labels_match({"group_by": "*"}, {"group_by": "sex", "group": "F"})  # key sets differ


def test_exact_empty_labels_judge_the_overall_value() -> None:
    out = evaluate_rule(rule(labels={}), METRICS)
    assert out["status"] == "pass" and out["observed"] == 0.04 and out["labels"] == {}


def test_wildcards_take_the_worst_match() -> None:
    out = evaluate_rule(rule(labels={"group_by": "*", "group": "*"}, max=0.10), METRICS)
    assert out["status"] == "fail"
    assert out["observed"] == 0.12 and out["labels"] == {"group_by": "sex", "group": "M"}
    assert out["matched"] == 3


def test_omitted_labels_take_the_worst_over_all() -> None:
    out = evaluate_rule(rule(labels=None, max=0.10), METRICS)
    assert out["observed"] == 0.12 and out["matched"] == 4


def test_min_rules_take_the_lowest() -> None:
    r = rule(
        metric="adversarial.robust_accuracy",
        max=None,
        min=0.5,
        labels={"attack": "pgd_linf", "eps": "*"},
    )
    out = evaluate_rule(r, METRICS)
    assert out["status"] == "fail" and out["observed"] == 0.42 and out["labels"]["eps"] == "0.0078"
    passing = evaluate_rule(rule(metric="adversarial.robust_accuracy", max=None, min=0.4, labels=None), METRICS)
    assert passing["status"] == "pass" and passing["observed"] == 0.42


@pytest.mark.parametrize(
    ("use", "observed", "status"),
    [("value", 0.04, "pass"), ("ci_high", 0.07, "fail"), ("ci_low", 0.02, "pass")],
)
def test_use_modes(use: str, observed: float, status: str) -> None:
    out = evaluate_rule(rule(labels={}, use=use), METRICS)
    assert out["observed"] == observed and out["status"] == status and out["use"] == use


def test_ci_low_for_a_min_rule_and_missing_interval_falls_back_with_a_note() -> None:
    r = rule(
        metric="adversarial.robust_accuracy",
        max=None,
        min=0.5,
        labels={"attack": "pgd_linf", "eps": "0.0039"},
        use="ci_low",
    )
    out = evaluate_rule(r, METRICS)
    assert out["observed"] == 0.55 and out["status"] == "pass"
    r = rule(
        metric="adversarial.robust_accuracy",
        max=None,
        min=0.5,
        labels={"attack": "fgsm", "eps": "*"},
        use="ci_low",
    )
    out = evaluate_rule(r, METRICS)
    assert out["observed"] == 0.70 and out["note"] == "no interval; judged on the value"


def test_warn_severity() -> None:
    out = evaluate_rule(rule(labels={"group_by": "*", "group": "*"}, max=0.10, severity="warn"), METRICS)
    assert out["status"] == "warn"


def test_not_evaluated_when_absent_or_undefined() -> None:
    absent = evaluate_rule(rule(metric="ood.auroc", max=None, min=0.9), METRICS)
    assert absent["status"] == "not_evaluated" and "not emitted" in absent["note"]
    undefined = evaluate_rule(rule(metric="bias.max_gap"), METRICS)
    assert undefined["status"] == "not_evaluated" and "no positives in group M" in undefined["note"]


def test_control_status_table() -> None:
    assert control_status([{"status": "fail"}, {"status": "pass"}], attested=True) == "not_met"
    assert control_status([{"status": "warn"}], attested=False) == "met"
    assert control_status([{"status": "pass"}, {"status": "not_evaluated"}], attested=False) == "met"
    assert control_status([{"status": "not_evaluated"}], attested=False) == "not_evaluated"
    assert control_status([{"status": "not_evaluated"}], attested=True) == "attested"
    assert control_status([], attested=True) == "attested"
    assert control_status([], attested=False) == "not_assessed"


def _policy(*rules: Rule) -> Policy:
    return Policy(name="t", version=1, rules=list(rules))


def test_evaluate_verdict_controls_and_attestations() -> None:
    checks = [{"id": "calibration", "status": "ok", "metrics": METRICS}]
    policy = _policy(
        rule(id="A", labels={}, controls=["MEASURE 2.5"]),
        rule(
            id="B",
            labels={"group_by": "*", "group": "*"},
            max=0.1,
            severity="warn",
            controls=["MEASURE 2.11"],
        ),
        rule(id="C", metric="ood.auroc", max=None, min=0.9, controls=["MEASURE 2.6"]),
    )
    attest = [Attestation(control="GOVERN 1.1", evidence="QMS-SOP-12", owner="Regulatory lead", date="2026-10-01")]
    judged = evaluate(policy, checks, attestations=attest)
    assert judged["verdict"] == "pass"  # B only warns; C is not evaluated
    statuses = {c["id"]: c["status"] for c in judged["controls"]}
    assert len(statuses) == 72
    assert statuses["MEASURE 2.5"] == "met" and statuses["MEASURE 2.11"] == "met"
    assert statuses["MEASURE 2.6"] == "not_evaluated" and statuses["GOVERN 1.1"] == "attested"
    assert statuses["MAP 1.1"] == "not_assessed"
    assert judged["policy"]["rule_counts"] == {"pass": 1, "warn": 1, "fail": 0, "not_evaluated": 1}
    failing = evaluate(_policy(rule(id="A", labels={"group_by": "*", "group": "*"})), checks)
    assert failing["verdict"] == "fail"
    assert {c["id"]: c["status"] for c in failing["controls"]}["MEASURE 2.5"] == "not_met"
    errored = evaluate(
        _policy(rule(id="A", labels={})),
        [*checks, {"id": "boom", "status": "error", "metrics": []}],
    )
    assert errored["verdict"] == "fail" and errored["policy"]["checks_errored"] == ["boom"]


def test_policy_validation_errors() -> None:
    with pytest.raises(ConfigError, match="give exactly one of max or min"):
        parse_policy(
            {
                "name": "p",
                "version": 1,
                "rules": [{"id": "X", "metric": "a.b", "max": 1, "min": 0}],
            },
            "p.yaml",
        )
    with pytest.raises(ConfigError, match=r"unknown nist-ai-rmf-1.0 subcategories \['MEASURE 9.9'\]"):
        parse_policy(
            {
                "name": "p",
                "version": 1,
                "rules": [{"id": "X", "metric": "a.b", "max": 1, "controls": ["MEASURE 9.9"]}],
            },
            "p.yaml",
        )
    with pytest.raises(ConfigError, match="rule ids must be unique"):
        parse_policy(
            {
                "name": "p",
                "version": 1,
                "rules": [
                    {"id": "X", "metric": "a.b", "max": 1},
                    {"id": "X", "metric": "a.c", "max": 1},
                ],
            },
            "p.yaml",
        )
    with pytest.raises(ConfigError, match=r"rules\.0\.use"):
        parse_policy(
            {
                "name": "p",
                "version": 1,
                "rules": [{"id": "X", "metric": "a.b", "max": 1, "use": "median"}],
            },
            "p.yaml",
        )


def test_attestations_file(tmp_path: Path) -> None:
    path = tmp_path / "attestations.yaml"
    path.write_text(
        "attestations:\n  - {control: GOVERN 1.1, evidence: QMS-SOP-12 rev C, owner: Head of Regulatory, date: 2026-10-01}\n"
    )
    items = load_attestations(path, load_framework())
    assert items[0].control == "GOVERN 1.1"
    path.write_text("attestations:\n  - {control: GOVERN 9.1, evidence: x, owner: y, date: 2026-10-01}\n")
    with pytest.raises(ConfigError, match=r"control 'GOVERN 9\.1' is not a nist-ai-rmf-1\.0 subcategory"):
        load_attestations(path, load_framework())
    path.write_text("attestations:\n  - {control: GOVERN 1.1, evidence: x, owner: y, date: someday}\n")
    with pytest.raises(ConfigError, match=r"attestations\.0\.date"):
        load_attestations(path, load_framework())


def test_a_rule_for_another_task_is_not_applicable_and_not_counted() -> None:
    checks = [{"id": "calibration", "status": "ok", "metrics": METRICS}]
    policy = _policy(
        rule(id="A", labels={}, controls=["MEASURE 2.5"]),
        rule(id="R", labels={}, tasks=["regression"], controls=["MEASURE 2.6"]),
    )
    judged = evaluate(policy, checks)
    assert [r["id"] for r in judged["rules"]] == ["A"]
    assert judged["policy"]["not_applicable"] == {
        "task": "classification",
        "inputs": "images",
        "reference": False,
        "rules": ["R"],
    }
    assert judged["policy"]["evaluated"]["text"].startswith("1 of 1 rules evaluated")
    assert (
        "1 rules do not apply (classification on images, no model.reference)" in judged["policy"]["evaluated"]["text"]
    )
    assert {c["id"]: c["status"] for c in judged["controls"]}["MEASURE 2.6"] == "not_assessed"
    on_regression = evaluate(policy, checks, task="regression")
    assert [r["id"] for r in on_regression["rules"]] == ["A", "R"]
    with pytest.raises(ConfigError, match=r"tasks must be a non-empty list of \['classification'"):
        parse_policy(
            {"name": "p", "version": 1, "rules": [{"id": "X", "metric": "a.b", "max": 1, "tasks": ["seg"]}]}, "p"
        )


def test_a_rule_for_the_other_input_is_not_applicable() -> None:
    checks = [{"id": "calibration", "status": "ok", "metrics": METRICS}]
    policy = _policy(
        rule(id="A", labels={}, controls=["MEASURE 2.5"]),
        rule(id="V", labels={}, inputs=["volumes"], controls=["MEASURE 2.6"]),
        rule(id="I", labels={}, inputs=["images"], controls=["MEASURE 2.6"]),
    )
    on_images = evaluate(policy, checks)
    assert [r["id"] for r in on_images["rules"]] == ["A", "I"]
    assert on_images["policy"]["not_applicable"]["rules"] == ["V"]
    on_volumes = evaluate(policy, checks, spatial_dims=3)
    assert [r["id"] for r in on_volumes["rules"]] == ["A", "V"]
    assert (
        "1 rules do not apply (classification on volumes, no model.reference)"
        in (on_volumes["policy"]["evaluated"]["text"])
    )
    with pytest.raises(ConfigError, match=r"inputs"):
        parse_policy(
            {"name": "p", "version": 1, "rules": [{"id": "X", "metric": "a.b", "max": 1, "inputs": ["3d"]}]}, "p"
        )


def test_every_check_skipped_is_not_a_pass() -> None:
    policy = _policy(rule(id="A", labels={}))
    judged = evaluate(
        policy, [{"id": "coverage", "status": "ok", "metrics": []}, {"id": "calibration", "status": "skipped"}]
    )
    assert judged["verdict"] == "fail"
    assert judged["policy"]["evaluated"]["nothing_measured"] is True
    assert judged["policy"]["evaluated"]["text"].startswith("no check measured the model")
