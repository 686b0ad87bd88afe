"""The pytest plugin: one item per rule, JUnit names and properties, the audit item, progress,
fixtures, xdist runs the audit once, a run that measured nothing fails."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest_plugins = ["pytester"]

FAILING_POLICY = {
    "name": "tiny-failing",
    "version": 1,
    "framework": "nist-ai-rmf-1.0",
    "rules": [
        {
            "id": "ECE-PLANTED",
            "metric": "calibration.ece",
            "labels": {},
            "min": 0.5,
            "severity": "fail",
            "controls": ["MEASURE 2.5"],
            "rationale": "Planted: a bound the tiny model cannot meet.",
        },
        {
            "id": "ECE-LOOSE",
            "metric": "calibration.ece",
            "labels": {},
            "max": 0.5,
            "severity": "fail",
            "controls": ["MEASURE 2.5"],
            "rationale": "Loose bound every sane model meets.",
        },
        {
            "id": "BRIER-WARN",
            "metric": "calibration.brier",
            "labels": {},
            "min": 0.5,
            "severity": "warn",
            "controls": ["MEASURE 2.5"],
            "rationale": "Planted warning.",
        },
        {
            "id": "OOD-ABSENT",
            "metric": "ood.auroc",
            "min": 0.9,
            "severity": "fail",
            "controls": ["MEASURE 2.6"],
            "rationale": "Its check is not selected.",
        },
    ],
}


@pytest.fixture(scope="module", autouse=True)
def _torch_imported_before_pytester() -> None:
    """Pytester restores ``sys.modules`` after each test, unloading what was imported meanwhile;
    torch's lazily imported optimiser internals cannot be imported twice, so import them first."""
    import torch

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.Adam([parameter])
    parameter.sum().backward()
    optimiser.step()


def test_plugin_module_imports_no_torch() -> None:
    code = "import sys, auditkit.pytest_plugin; print(sorted(m for m in ('torch', 'weasyprint', 'torchattacks', 'netcal') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def failing_policy(tmp_path: Path) -> Path:
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(FAILING_POLICY), encoding="utf-8")
    return path


def _junit(path: Path) -> dict[str, ET.Element]:
    return {str(case.get("name")): case for case in ET.parse(path).getroot().iter("testcase")}


def _properties(element: ET.Element) -> dict[str, str]:
    return {str(p.get("name")): str(p.get("value")) for p in element.iter("property")}


def test_each_rule_is_an_item_with_its_outcome(
    pytester: pytest.Pytester, tiny_study: Path, failing_policy: Path
) -> None:
    junit = pytester.path / "junit.xml"
    out = pytester.path / "out"
    # Subprocess runs: an in-process pytester run unloads the modules it imported (torch among
    # them), and torch cannot be imported twice into one process.
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--audit",
        str(tiny_study),
        "--audit-only",
        "calibration",
        "--audit-policy",
        str(failing_policy),
        "--audit-out",
        str(out),
        "--audit-no-pdf",
        f"--junitxml={junit}",
        "--durations=1",
        "-rs",
    )
    result.assert_outcomes(passed=3, failed=1, skipped=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            # progress while the audit runs, before collection
            f"auditkit [[]*s[]] auditing {tiny_study} -> {out}; only calibration",
            "auditkit [[]*s[]] running check calibration",
            "auditkit [[]*s[]] verdict FAIL*; results: *results.json",
            "collected *",
            "*ECE-PLANTED fail: calibration.ece [[]overall[]] = *the policy requires at least 0.5*MEASURE 2.5*",
            "*verdict: FAIL under tiny-failing v1*",
            "*NIST AI RMF 1.0 subcategories (72): 0 met, 1 not_met*",
            "*slowest 1 durations*",
            "*s call *auditkit::audit",
        ]
    )
    stdout = result.stdout.str()
    assert "OOD-ABSENT not evaluated" in stdout
    counts = re.search(
        r"subcategories \(72\): (\d+) met, (\d+) not_met, (\d+) not_evaluated, (\d+) attested, (\d+)", stdout
    )
    assert counts and sum(int(n) for n in counts.groups()) == 72
    cases = _junit(junit)
    assert set(cases) == {"audit", "ECE-PLANTED", "ECE-LOOSE", "BRIER-WARN", "OOD-ABSENT"}
    # The audit's own time is the audit item's, in JUnit and --durations, and inside pytest's total.
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    duration = results["run"]["duration_s"]
    assert float(str(cases["audit"].get("time"))) >= duration
    session = re.search(r"in ([0-9.]+)s", stdout.splitlines()[-1])
    assert session and float(session.group(1)) >= duration
    # A tripped warning passes, and JUnit shows it as a warning through its properties.
    warn = _properties(cases["BRIER-WARN"])
    assert warn["auditkit_status"] == "warn" and warn["auditkit_severity"] == "warn"
    assert warn["auditkit_metric"] == "calibration.brier" and warn["auditkit_threshold"] == "min 0.5"
    assert warn["auditkit_controls"] == "MEASURE 2.5"
    assert warn["auditkit_description"].startswith("BRIER-WARN warn: calibration.brier [overall] = ")
    assert _properties(cases["ECE-LOOSE"])["auditkit_status"] == "pass"
    assert not (out / "report.pdf").exists(), "--audit-no-pdf"
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_passing_audit_and_the_results_fixture(pytester: pytest.Pytester, tiny_study: Path) -> None:
    out = pytester.path / "out"
    pytester.makepyfile(
        test_custom="""
        def test_overall_and_group(audit_results):
            assert audit_results.verdict == "pass"
            assert audit_results.metric("calibration.ece").value <= 0.05
            assert audit_results.metric("calibration.ece", group="sex=F").n > 0
        """
    )
    first = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--audit",
        str(tiny_study),
        "--audit-only",
        "calibration,phi",
        "--audit-skip",
        "phi",
        "--audit-no-pdf",
        "--audit-out",
        str(out),
    )
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "phi" not in {c["id"] for c in results["checks"]}, "--audit-skip phi"
    assert "calibration" in {c["id"] for c in results["checks"]}
    assert not (out / "report.pdf").exists(), "--audit-no-pdf"
    # One item per rule with the rule's outcome (the packaged policy's coverage rules may warn on
    # this tiny study), plus the audit item and the team's own test.
    statuses = [r["status"] for r in results["rules"]]
    assert statuses.count("fail") == 0 and statuses.count("pass") > 0
    expected = {
        "passed": statuses.count("pass") + statuses.count("warn") + 2,
        "skipped": statuses.count("not_evaluated"),
        "warnings": statuses.count("warn"),
    }
    first.assert_outcomes(**expected)
    again = pytester.runpytest("-p", "no:cacheprovider", "--audit-results", str(out))  # no torch needed
    again.assert_outcomes(**expected)


def test_bad_results_folder_is_a_usage_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-results", str(tmp_path))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no results.json in*"])


@pytest.mark.slow
def test_under_xdist_the_audit_runs_once(
    pytester: pytest.Pytester,
    tiny_study: Path,
    failing_policy: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = pytester.path / "runs.log"
    monkeypatch.setenv("AUDITKIT_PYTEST_RUN_LOG", str(log))
    pytester.makepyfile(test_a="def test_a(audit_results):\n    assert audit_results.rules\n")
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={junit}",
        "--audit-no-pdf",
        "-n",
        "2",
        "--audit",
        str(tiny_study),
        "--audit-only",
        "calibration",
        "--audit-policy",
        str(failing_policy),
        "--audit-out",
        str(pytester.path / "out"),
    )
    result.assert_outcomes(passed=4, failed=1, skipped=1, warnings=1)
    assert len(log.read_text().splitlines()) == 1
    assert "auditkit [" not in result.stdout.str(), "-q: no progress lines"
    # The workers know the controller ran the audit: its item carries the audit's time.
    duration = json.loads((pytester.path / "out" / "results.json").read_text(encoding="utf-8"))["run"]["duration_s"]
    assert float(str(_junit(junit)["audit"].get("time"))) >= duration


# ---------------------------------------------------------------- hand-built results (no torch, fast)
def _rule(rule_id: str, status: str, **extra: Any) -> dict[str, Any]:
    observed = {"pass": 0.02, "warn": 0.3, "fail": 0.2}.get(status)
    return {
        "id": rule_id,
        "status": status,
        "metric": "calibration.ece",
        "labels": {},
        "observed": observed,
        "ci": [observed / 2, observed * 2] if observed else None,
        "use": "value",
        "bound": "max",
        "threshold": 0.1,
        "severity": "warn" if status == "warn" else "fail",
        "controls": ["MEASURE 2.5"],
        "rationale": f"{rule_id} rationale.",
        "note": None,
        "cause": None,
        **extra,
    }


def _hand_built(**changes: Any) -> dict[str, Any]:
    """A partial audit as the engine writes it: calibration ran, ood was not selected."""
    results: dict[str, Any] = {
        "schema": "auditkit.results/v1",
        "run": {
            "duration_s": 61.5,
            "selection": {
                "installed": ["calibration", "ood"],
                "run": ["calibration"],
                "not_run": ["ood"],
                "only": ["calibration"],
                "skip": [],
                "partial": True,
            },
        },
        "data": {
            "splits": {"eval": {"n_images": 95, "n_quarantined": 5}},
            "coverage": {
                "eval": {
                    "listed": 100,
                    "read": 95,
                    "quarantined": 5,
                    "quarantined_fraction": 0.05,
                    "by_reason": {"cannot access the file (FileNotFoundError)": 5},
                }
            },
        },
        "checks": [
            {"id": "coverage", "status": "ok", "metrics": []},
            {"id": "calibration", "status": "ok", "metrics": []},
        ],
        "policy": {
            "name": "hand-built",
            "version": 3,
            "control_counts": {"met": 1, "not_met": 1, "not_evaluated": 2, "attested": 0, "not_assessed": 68},
            "evaluated": {
                "rules_evaluated": 3,
                "rules_total": 5,
                "partial": True,
                "not_run": ["ood"],
                "text": "partial: 3 of 5 rules evaluated; not run: ood",
            },
        },
        "rules": [
            _rule("R-PASS", "pass"),
            _rule("R-WARN", "warn"),
            _rule("R-FAIL", "fail"),
            _rule(
                "R-OOD",
                "not_evaluated",
                metric="ood.auroc",
                cause="not_selected",
                note="check ood not selected (only/skip)",
            ),
            _rule(
                "R-UNDEF",
                "not_evaluated",
                cause="undefined",
                note="metric undefined: no eval images of class bright",
            ),
        ],
        "verdict": "fail",
    }
    results.update(changes)
    return results


def _folder(root: Path, results: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return root


def test_warn_rules_partial_audits_and_the_audit_item_in_junit(pytester: pytest.Pytester) -> None:
    folder = _folder(pytester.path / "audit", _hand_built())
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--audit-results", str(folder), f"--junitxml={junit}",
        "-o", "junit_logging=system-out", "-rs",
    )  # fmt: skip
    result.assert_outcomes(passed=3, failed=1, skipped=2, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*R-WARN warn: calibration.ece [[]overall[]] = 0.3*",  # the warnings summary keeps it
            "*auditkit*",
            "verdict: FAIL under hand-built v3*",
            "partial: 3 of 5 rules evaluated; not run: ood",
            "data: eval 95 of 100 images read, 5 quarantined",
            "rules: 1 pass, 1 warn, 1 fail, 2 not_evaluated (1 not selected, 1 undefined)",
            "NIST AI RMF 1.0 subcategories (72): 1 met, 1 not_met, 2 not_evaluated, 0 attested, 68 not_assessed",
        ]
    )
    stdout = result.stdout.str()
    assert "R-OOD not evaluated: check ood not selected (only: calibration)" in stdout
    assert "R-UNDEF not evaluated: metric undefined: no eval images of class bright" in stdout
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    suite_properties = suite.find("properties")
    assert suite_properties is not None
    assert _properties(suite_properties) == {
        "auditkit_verdict": "fail",
        "auditkit_coverage": "partial: 3 of 5 rules evaluated; not run: ood",
        "auditkit_partial": "true",
        "auditkit_policy": "hand-built v3",
        "auditkit_results": str(folder / "results.json"),
    }
    cases = _junit(junit)
    assert list(cases) == ["audit", "R-PASS", "R-WARN", "R-FAIL", "R-OOD", "R-UNDEF"]
    warn = _properties(cases["R-WARN"])
    assert warn["auditkit_status"] == "warn" and warn["auditkit_observed"] == "0.3"
    assert warn["auditkit_threshold"] == "max 0.1" and warn["auditkit_ci"] == "[0.15, 0.6]"
    assert warn["auditkit_description"].startswith("R-WARN warn: calibration.ece [overall] = 0.3")
    system_out = cases["R-WARN"].find("system-out")
    assert system_out is not None and "auditkit warning: R-WARN warn:" in str(system_out.text)
    skipped = _properties(cases["R-OOD"])
    assert skipped["auditkit_cause"] == "not_selected"
    assert skipped["auditkit_description"] == "R-OOD not evaluated: check ood not selected (only: calibration)"
    audit = _properties(cases["audit"])
    assert audit["auditkit_verdict"] == "fail" and audit["auditkit_audit_duration_s"] == "61.5"
    # a reused audit cost this session nothing: its time is not charged to the item
    assert float(str(cases["audit"].get("time"))) < 61.5
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_results_written_before_the_coverage_change_still_work(pytester: pytest.Pytester) -> None:
    older = _hand_built()
    older["run"].pop("selection")
    older["data"].pop("coverage")
    older["policy"].pop("evaluated")
    for rule in older["rules"]:
        rule.pop("cause")
    folder = _folder(pytester.path / "audit", older)
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-results", str(folder), "-rs")
    result.assert_outcomes(passed=3, failed=1, skipped=2, warnings=1)
    result.stdout.fnmatch_lines(
        ["3 of 5 rules evaluated", "data: eval 95 of 100 images read, 5 quarantined", "rules: * 2 not_evaluated"]
    )
    assert "R-OOD not evaluated: check ood not selected (only/skip)" in result.stdout.str()


def _no_eval_image(results: dict[str, Any]) -> None:
    results["data"]["coverage"]["eval"].update(
        read=0,
        quarantined=100,
        quarantined_fraction=1.0,
        by_reason={"cannot access the file (FileNotFoundError)": 100},
    )


def _coverage_rule_failed(results: dict[str, Any]) -> None:
    results["rules"].append(
        _rule("COV-EVAL-QUARANTINE", "fail", metric="coverage.quarantined_fraction", observed=0.4, threshold=0.05)
    )


def _nothing_evaluated(results: dict[str, Any]) -> None:
    results["rules"] = [r for r in results["rules"] if r["status"] == "not_evaluated"]
    results["verdict"] = "pass"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_no_eval_image, "no eval image was read: all 100 listed rows were quarantined (100 x cannot access*"),
        (_coverage_rule_failed, "COV-EVAL-QUARANTINE fail: coverage.quarantined_fraction [[]overall[]] = 0.4*"),
        (_nothing_evaluated, "no rule of the policy was evaluated (partial: 3 of 5 rules evaluated; not run: ood)"),
    ],
)
def test_coverage_problems(damage: Any, message: str) -> None:
    from auditkit.pytest_plugin import AuditResults, coverage_problems

    assert coverage_problems(AuditResults(_hand_built(), Path("."))) == []
    results = _hand_built()
    damage(results)
    problems = coverage_problems(AuditResults(results, Path(".")))
    assert len(problems) == 1 and fnmatch.fnmatch(problems[0], message)


def test_the_audit_item_fails_when_coverage_failed(pytester: pytest.Pytester) -> None:
    results = _hand_built()
    _no_eval_image(results)
    folder = _folder(pytester.path / "audit", results)
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-results", str(folder))
    result.stdout.fnmatch_lines(
        ["*_ auditkit::audit _*", "the audit's coverage failed: no eval image was read: all 100 listed rows*"]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_run_that_measured_nothing_fails_the_session(
    pytester: pytest.Pytester, study_factory: Callable[..., Path]
) -> None:
    """A manifest whose files are all missing: the session must not go green, and must say why."""
    spec = study_factory(n=12)
    for image in (spec.parent / "data" / "img").iterdir():
        image.unlink()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--audit", str(spec), "--audit-only", "calibration", "--audit-no-pdf",
        "--audit-out", str(pytester.path / "out"),
    )  # fmt: skip
    output = result.stdout.str() + result.stderr.str()
    assert result.ret != pytest.ExitCode.OK
    assert "no readable" in output or "quarantined" in output
    assert "FileNotFoundError" in output, "the engine's reasons reach the user"
