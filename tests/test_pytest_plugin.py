"""The pytest plugin: one item per rule, JUnit names, fixtures, xdist runs the audit once."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

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


def test_each_rule_is_an_item_with_its_outcome(
    pytester: pytest.Pytester, tiny_study: Path, failing_policy: Path
) -> None:
    junit = pytester.path / "junit.xml"
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
        str(pytester.path / "out"),
        f"--junitxml={junit}",
        "-rs",
    )
    result.assert_outcomes(passed=2, failed=1, skipped=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*ECE-PLANTED fail: calibration.ece [[]overall[]] = *the policy requires at least 0.5*MEASURE 2.5*",
            "*verdict: FAIL under tiny-failing v1*",
            "*NIST AI RMF 1.0 subcategories: 0 met, 1 not_met*",
        ]
    )
    assert "OOD-ABSENT not evaluated" in result.stdout.str()
    names = {case.get("name") for case in ET.parse(junit).getroot().iter("testcase")}
    assert names == {"ECE-PLANTED", "ECE-LOOSE", "BRIER-WARN", "OOD-ABSENT"}
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
        "calibration",
        "--audit-out",
        str(out),
    )
    from auditkit.policy import load_policy

    policy, _ = load_policy("medical-imaging-default")
    calibration_rules = sum(r.metric.startswith("calibration.") for r in policy.rules)
    others = len(policy.rules) - calibration_rules
    # the calibration rules pass, the other checks' rules are not evaluated, the team's own test passes
    first.assert_outcomes(passed=calibration_rules + 1, skipped=others)
    again = pytester.runpytest("-p", "no:cacheprovider", "--audit-results", str(out))  # no torch needed
    again.assert_outcomes(passed=calibration_rules + 1, skipped=others)


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
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
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
    result.assert_outcomes(passed=3, failed=1, skipped=1, warnings=1)
    assert len(log.read_text().splitlines()) == 1
