"""The conformance kit passes a well-behaved plugin check and names each flaw of broken ones."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs
from auditkit.testing import CheckConformanceError, check_check, check_property, parametrize_with_checks

sys.path.insert(0, str(Path(__file__).parent / "plugin_example"))
from auditkit_example import PredictionEntropyCheck


@pytest.mark.slow
def test_the_example_plugin_conforms(tmp_path: Path) -> None:
    report = check_check(PredictionEntropyCheck, workdir=tmp_path)
    assert report.status == "ok" and report.n_metrics > 1 and not report.problems


class Leaky(Check):
    """Copies header values into findings and draws unseeded randomness: everything wrong."""

    id: ClassVar[str] = "leaky"
    family: ClassVar[str] = "test"
    needs: ClassVar[Needs] = Needs(predictions=True, headers=True)
    emits: ClassVar[tuple[str, ...]] = ("leaky.value",)

    def run(self, ctx: Any, params: Any) -> CheckResult:
        headers = [h for h in ctx.headers("eval") if h is not None]
        noise = float(np.random.default_rng().random())  # not from ctx.rng: nondeterministic
        return CheckResult(
            metrics=[
                Metric(name="leaky.value", value=noise, direction="lower_is_better"),
                Metric(name="leaky.undeclared", value=1.0, direction="lower_is_better"),
            ],
            findings=[{"kind": "header", "patient": str(headers[0].PatientID)}],
        )


@pytest.mark.slow
def test_a_leaky_nondeterministic_check_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckConformanceError) as info:
        check_check(Leaky, workdir=tmp_path)
    message = str(info.value)
    assert "leaky.undeclared" in message and "not declared in emits" in message
    assert "two runs with the same seed gave different results" in message
    assert "identifying DICOM header value(s) appear in the results" in message


class BadMetadata(Check):
    """Bad."""

    id: ClassVar[str] = "Bad-Name"
    family: ClassVar[str] = ""
    emits: ClassVar[tuple[str, ...]] = ("other.metric",)

    class Params(CheckParams):
        threshold: float  # no default: Params() fails

    def run(self, ctx: Any, params: Any) -> CheckResult:
        return CheckResult()


def test_metadata_problems_are_listed_without_running() -> None:
    with pytest.raises(CheckConformanceError) as info:
        check_check(BadMetadata)
    message = str(info.value)
    assert "id must be a lowercase identifier, got 'Bad-Name'" in message
    assert "family must be a non-empty string" in message
    assert "Params() defaults are invalid" in message
    assert "metric names must be '<check id>.<metric>'" in message


@parametrize_with_checks([PredictionEntropyCheck])
def test_the_example_plugin_property_by_property(check: type[Check[Any]], prop: str) -> None:
    """One item per property of the contract; the check runs twice for all of them together."""
    check_property(check, prop)


def test_a_failing_property_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckConformanceError, match=r"leaky \[deterministic\]: two runs with the same seed"):
        check_property(Leaky, "deterministic", n_patients=8)
    with pytest.raises(CheckConformanceError, match=r"leaky \[declared_metrics\]: .*leaky.undeclared"):
        check_property(Leaky, "declared_metrics", n_patients=8)
    check_property(Leaky, "findings", n_patients=8)  # its findings do have a kind
    with pytest.raises(ValueError, match="unknown property 'speed'"):
        check_property(Leaky, "speed")
