"""The runner: one shared pass, error isolation, checkpoints and --resume, results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs
from auditkit.context import AuditContext
from auditkit.errors import ConfigError
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec


class MeanConfidence(Check):
    """Test-only: mean top-label confidence on eval and, when asked, train."""

    id = "mean_confidence"
    family = "test"
    needs = Needs(predictions=True, features=True, train=True)
    emits = ("mean_confidence.value",)
    calls: ClassVar[int] = 0

    def run(self, ctx: AuditContext, params: CheckParams) -> CheckResult:
        type(self).calls += 1
        metrics = []
        for split in ("eval", "train"):
            preds = ctx.predictions(split)
            assert ctx.features(split).shape[0] == preds.n
            metrics.append(
                Metric(
                    name="mean_confidence.value",
                    value=float(preds.probs.max(axis=1).mean()),
                    direction="higher_is_better",
                    labels={"split": split},
                    n=preds.n,
                )
            )
        return CheckResult(metrics=metrics)


class Accuracy(Check):
    """Test-only: eval accuracy from the shared predictions."""

    id = "accuracy"
    family = "test"
    needs = Needs(predictions=True)
    emits = ("accuracy.value",)

    class Params(CheckParams):
        scale: float = 1.0

    def run(self, ctx: AuditContext, params: Params) -> CheckResult:
        preds = ctx.predictions("eval")
        value = float((preds.predicted == preds.labels).mean()) * params.scale
        return CheckResult(
            metrics=[Metric(name="accuracy.value", value=value, direction="higher_is_better", n=preds.n)],
            findings=[{"kind": "note", "rows": ctx.split("eval").rows[:3]}],
        )


class Boom(Check):
    """Test-only: always raises."""

    id = "boom"
    family = "test"
    needs = Needs(predictions=True)

    def run(self, ctx: AuditContext, params: CheckParams) -> CheckResult:
        raise RuntimeError("planted failure")


class Dies(Check):
    """Test-only: the process 'dies' (an exception the runner must not swallow)."""

    id = "dies"
    family = "test"
    armed: ClassVar[bool] = True

    def run(self, ctx: AuditContext, params: CheckParams) -> CheckResult:
        if type(self).armed:
            raise KeyboardInterrupt
        return CheckResult(metrics=[Metric(name="dies.value", value=1.0, direction="higher_is_better")])


def _strict_load(path: Path) -> dict[str, Any]:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)  # type: ignore[no-any-return]


def test_one_forward_pass_per_image_however_many_checks(tiny_study: Path) -> None:
    from auditkit.checks.calibration import CalibrationCheck

    spec = load_spec(tiny_study)
    checks = {
        "mean_confidence": MeanConfidence,
        "accuracy": Accuracy,
        "calibration": CalibrationCheck,
    }
    outcome = run_audit(spec, RunOptions(batch_size=5), checks=checks)
    run = outcome.results["run"]
    assert run["images_forwarded_per_split"] == {"eval": 16, "train": 32}
    assert run["images_forwarded"] == 48
    assert run["forward_calls"] == 4 + 7  # ceil(16/5) + ceil(32/5)
    single = run_audit(
        spec,
        RunOptions(batch_size=5, out_dir=tiny_study.parent / "single"),
        checks={"accuracy": Accuracy},
    )
    assert single.results["run"]["images_forwarded_per_split"] == {"eval": 16}
    accuracy = next(c for c in outcome.results["checks"] if c["id"] == "accuracy")["metrics"][0]["value"]
    assert accuracy >= 0.8  # the tiny model learnt its task; predictions are aligned with labels
    assert all(c["status"] == "ok" for c in outcome.results["checks"])


def test_a_failing_check_is_isolated(tiny_study: Path) -> None:
    outcome = run_audit(load_spec(tiny_study), checks={"boom": Boom, "accuracy": Accuracy})
    by_id = {c["id"]: c for c in outcome.results["checks"]}
    assert by_id["boom"]["status"] == "error"
    assert by_id["boom"]["error"]["type"] == "RuntimeError"
    assert by_id["boom"]["error"]["message"] == "planted failure"
    assert by_id["accuracy"]["status"] == "ok"
    assert outcome.results["verdict"] == "fail"
    assert outcome.exit_code == 3


def test_results_json_schema_and_strictness(tiny_study: Path) -> None:
    outcome = run_audit(load_spec(tiny_study), checks={"accuracy": Accuracy})
    results = _strict_load(outcome.out_dir / "results.json")
    assert list(results) == [
        "schema",
        "run",
        "environment",
        "model",
        "data",
        "checks",
        "policy",
        "rules",
        "controls",
        "verdict",
    ]
    assert results["schema"] == "auditkit.results/v1"
    assert results["checks"][0]["id"] == "coverage"  # the engine's own measurement comes first
    check = results["checks"][1]
    assert set(check) >= {
        "id",
        "status",
        "params",
        "duration_s",
        "metrics",
        "findings",
        "artifacts",
        "error",
    }
    assert check["params"] == {"scale": 1.0}
    assert check["findings"] == [{"kind": "note", "rows": [0, 3, 6]}]
    metric = check["metrics"][0]
    assert set(metric) == {"name", "labels", "value", "ci", "n", "direction"}
    assert results["data"]["quarantine"] == []
    assert results["data"]["splits"]["eval"]["class_counts"]["bright"] >= 1
    assert results["model"]["weights_sha256"] and len(results["model"]["weights_sha256"]) == 64
    assert results["environment"]["torch"]
    text = (outcome.out_dir / "results.json").read_text()
    assert "pat1" not in text  # raw patient IDs never leave


def test_skipped_when_no_train_split(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    spec = spec.model_copy(
        update={"data": spec.data.model_copy(update={"splits": spec.data.splits.model_copy(update={"train": None})})}
    )
    outcome = run_audit(spec, checks={"mean_confidence": MeanConfidence, "accuracy": Accuracy})
    by_id = {c["id"]: c for c in outcome.results["checks"]}
    assert by_id["mean_confidence"]["status"] == "skipped"
    assert by_id["mean_confidence"]["reason"].startswith("no train split")
    assert outcome.exit_code == 0
    assert outcome.results["run"]["images_forwarded_per_split"] == {"eval": 16}


def test_a_run_that_dies_resumes_to_the_same_results(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    checks = {"accuracy": Accuracy, "mean_confidence": MeanConfidence, "dies": Dies}
    spec = spec.model_copy(update={"checks": {"mean_confidence": {}, "dies": {}, "accuracy": {}}})
    MeanConfidence.calls = 0
    Dies.armed = True
    with pytest.raises(KeyboardInterrupt):
        run_audit(spec, checks=checks)
    checkpoints = spec.output_dir / "checkpoints"
    assert (checkpoints / "mean_confidence.json").is_file()
    assert not (checkpoints / "accuracy.json").exists()
    Dies.armed = False
    resumed = run_audit(spec, RunOptions(resume=True), checks=checks)
    assert MeanConfidence.calls == 1  # the finished check was not recomputed
    assert resumed.results["run"]["resumed_checks"] == ["mean_confidence"]
    assert [c["id"] for c in resumed.results["checks"] if c.get("resumed")] == ["mean_confidence"]
    assert resumed.results["run"]["images_forwarded_per_split"] == {"eval": 16}  # no train pass needed
    peak = resumed.results["run"]["peak_rss_mib"]
    assert isinstance(peak, float) and 10 < peak < 100_000  # the audit's peak resident memory, MiB
    fresh = run_audit(spec, RunOptions(out_dir=tiny_study.parent / "fresh"), checks=checks)
    assert MeanConfidence.calls == 2

    def strip(results: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in c.items() if k not in ("duration_s", "resumed")} for c in results["checks"]]

    assert strip(resumed.results) == strip(fresh.results)


def test_resume_ignores_checkpoints_of_other_parameters(tiny_study: Path) -> None:
    spec = load_spec(tiny_study).model_copy(update={"checks": {"accuracy": {"scale": 1.0}}})
    run_audit(spec, checks={"accuracy": Accuracy})
    changed = spec.model_copy(update={"checks": {"accuracy": {"scale": 2.0}}})
    outcome = run_audit(changed, RunOptions(resume=True), checks={"accuracy": Accuracy})
    assert outcome.results["run"]["resumed_checks"] == []
    value = outcome.results["checks"][1]["metrics"][0]["value"]
    assert value > 1.0


def test_selection_errors_are_usage_errors(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    with pytest.raises(
        ConfigError,
        match=r"--only: unknown check\(s\) \['nope'\]; installed checks are \['accuracy'\]",
    ):
        run_audit(spec, RunOptions(only=["nope"]), checks={"accuracy": Accuracy})
    bad = spec.model_copy(update={"checks": {"accuracy": {"scale": "big"}}})
    with pytest.raises(ConfigError, match=r"checks.accuracy: scale: Input should be a valid number"):
        run_audit(bad, checks={"accuracy": Accuracy})
    with pytest.raises(ConfigError, match=r"checks.accuracy: colour: unknown key"):
        run_audit(
            spec.model_copy(update={"checks": {"accuracy": {"colour": 1}}}),
            checks={"accuracy": Accuracy},
        )


def _ran(outcome: Any) -> list[str]:
    return [c["id"] for c in outcome.results["checks"] if c["id"] != "coverage"]


def test_only_and_skip(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    checks = {"accuracy": Accuracy, "boom": Boom}
    skipped = run_audit(spec, RunOptions(skip=["boom"]), checks=checks)
    assert _ran(skipped) == ["accuracy"]
    assert skipped.results["run"]["selection"]["not_run"] == ["boom"]
    assert skipped.results["policy"]["evaluated"]["partial"] is True
    assert _ran(run_audit(spec, RunOptions(only=["boom,accuracy"]), checks=checks)) == ["boom", "accuracy"]


def test_checks_configures_parameters_and_never_selects(tiny_study: Path) -> None:
    """`checks: {accuracy: {...}}` tunes accuracy; every other check still runs (issue: the
    README's example silently narrowed an audit to one check)."""
    spec = load_spec(tiny_study).model_copy(update={"checks": {"accuracy": {"scale": 2.0}}})
    outcome = run_audit(spec, checks={"accuracy": Accuracy, "mean_confidence": MeanConfidence})
    assert _ran(outcome) == ["accuracy", "mean_confidence"]
    assert outcome.results["checks"][1]["params"] == {"scale": 2.0}
    selection = outcome.results["run"]["selection"]
    assert selection["not_run"] == [] and selection["partial"] is False
    assert outcome.results["policy"]["evaluated"]["partial"] is False


def test_spec_only_and_skip_and_the_command_line_wins(tiny_study: Path) -> None:
    checks = {"accuracy": Accuracy, "mean_confidence": MeanConfidence}
    spec = load_spec(tiny_study).model_copy(update={"only": ["accuracy"]})
    assert _ran(run_audit(spec, checks=checks)) == ["accuracy"]
    spec = load_spec(tiny_study).model_copy(update={"skip": ["accuracy"]})
    outcome = run_audit(spec, checks=checks)
    assert _ran(outcome) == ["mean_confidence"]
    assert outcome.results["run"]["selection"]["source"] == "spec"
    # the command line's --only replaces the spec's narrowing, skip included
    cli = run_audit(spec, RunOptions(only=["accuracy"]), checks=checks)
    assert _ran(cli) == ["accuracy"]
    assert cli.results["run"]["selection"]["source"] == "command line"
    with pytest.raises(ConfigError, match=r"no check left to run"):
        run_audit(spec, RunOptions(only=["accuracy"], skip=["accuracy"]), checks=checks)
    with pytest.raises(ConfigError, match=r"did you mean 'accuracy'"):
        run_audit(spec, RunOptions(only=["acuracy"]), checks=checks)


def test_seeded_generators_are_stable(tiny_study: Path) -> None:
    from auditkit.stats import stable_seed

    assert stable_seed(0, "calibration") == stable_seed(0, "calibration")
    assert stable_seed(0, "calibration") != stable_seed(1, "calibration")
    a = np.random.default_rng(stable_seed(0, "x")).random(3)
    b = np.random.default_rng(stable_seed(0, "x")).random(3)
    assert np.array_equal(a, b)
