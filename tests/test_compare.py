"""``auditkit compare``: a degraded copy of the fixture model regresses; the model against itself does not."""

from __future__ import annotations

import json
import shutil
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import prune

from auditkit.cli import main
from auditkit.compare import CompareExit, compare, format_markdown, format_text, is_undirected
from auditkit.fixtures.models import tiny_cnn
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec

OPTIONS = {"checks": {"calibration": {"n_boot": 300}}, "only": ["calibration"]}


def _audit(spec_path: Path, out: Path) -> Path:
    spec = load_spec(spec_path).model_copy(update=OPTIONS)
    run_audit(spec, RunOptions(out_dir=out, pdf=False, report=False))
    return out


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory, demo_spec: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    base = _audit(demo_spec, root / "base")
    # The degraded twin: the same study with the model's conv weights 80% magnitude-pruned.
    study = root / "pruned-study"
    shutil.copytree(demo_spec.parent, study)
    weights = study / "model" / "tiny_cnn.safetensors"
    model = tiny_cnn()
    model.load_state_dict(load_file(str(weights)))
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=0.8)
            prune.remove(module, "weight")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    degraded = _audit(study / "audit.yaml", root / "pruned")
    return base, degraded


def test_the_pruned_model_regresses_and_exits_1(audits: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, degraded = audits
    comparison = compare(base, degraded)
    assert comparison.regressed
    # the same data, classes and policy; only the weights differ
    assert comparison.comparable and [d.field for d in comparison.differences] == ["weights_sha256"]
    assert comparison.metric_regressions, "pruning 80% of the conv weights must move some metric beyond noise"
    assert all(m.judgement == "regression" for m in comparison.metric_regressions)
    for m in comparison.metric_regressions:
        assert m.base_ci and m.new_ci and (m.new_ci[0] > m.base_ci[1] or m.new_ci[1] < m.base_ci[0])
    assert main(["compare", str(base), str(degraded)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "REGRESSED" in out


def test_a_model_against_itself_has_no_regression(
    audits: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = audits
    comparison = compare(base, base)
    assert not comparison.regressed and not comparison.rules and not comparison.checks
    assert comparison.comparable and not comparison.differences
    assert {m.judgement for m in comparison.metrics} == {"unchanged"}
    assert main(["compare", str(base), str(base)]) == 0
    assert "no regression" in capsys.readouterr().out


def test_formats(audits: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, degraded = audits
    assert main(["compare", str(base), str(degraded), "--format", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["regressed"] is True and data["metrics"]
    markdown = format_markdown(compare(base, degraded))
    assert markdown.startswith("### ❌ auditkit: regression")
    assert "| Metric | Labels | Before (95% CI) | After (95% CI) | |" in markdown


def test_rule_that_newly_fails_is_a_regression(tmp_path: Path) -> None:
    def write(folder: Path, status: str, verdict: str) -> Path:
        folder.mkdir()
        (folder / "results.json").write_text(
            json.dumps(
                {
                    "schema": "auditkit.results/v1",
                    "verdict": verdict,
                    "checks": [],
                    "rules": [{"id": "R", "metric": "a.b", "status": status, "observed": 0.1}],
                }
            )
        )
        return folder

    comparison = compare(write(tmp_path / "a", "pass", "pass"), write(tmp_path / "b", "fail", "fail"))
    assert [r.id for r in comparison.new_failures] == ["R"] and comparison.regressed
    better = compare(tmp_path / "b", tmp_path / "a")
    assert not better.regressed and better.rules[0].regression is False


def test_bad_folder_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


# --------------------------------------------------------------------- hand-built results.json files
def _metric(name: str, value: float, ci: list[float] | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    direction = "lower_is_better" if name.endswith("ece") else "higher_is_better"
    return {"name": name, "labels": labels or {}, "value": value, "ci": ci, "n": 100, "direction": direction}


def _results(**changes: Any) -> dict[str, Any]:
    """A minimal results.json of two checks; ``changes`` replace top-level keys."""
    results: dict[str, Any] = {
        "schema": "auditkit.results/v1",
        "verdict": "pass",
        "run": {},
        "model": {
            "factory": "tiny_model:build",
            "factory_kwargs": {"num_classes": 2},
            "weights_sha256": "a" * 64,
            "classes": ["dark", "bright"],
            "positive_class": "bright",
            "input": {"channels": 1, "height": 16, "width": 16, "depth": None},
            "normalize": {"mean": [0.5], "std": [0.25]},
        },
        "data": {
            "manifest_sha256": "b" * 64,
            "splits": {"eval": {"split_value": "test", "n_images": 100, "n_quarantined": 0}},
        },
        "policy": {"name": "medical-imaging-default", "version": 1, "sha256": "c" * 64},
        "checks": [
            {
                "id": "calibration",
                "status": "ok",
                "reason": None,
                "error": None,
                "metrics": [_metric("calibration.ece", 0.02, [0.01, 0.03])],
            },
            {
                "id": "bias",
                "status": "ok",
                "reason": None,
                "error": None,
                "metrics": [
                    _metric(
                        "bias.group_metric", 0.8, [0.75, 0.85], {"metric": "accuracy", "group_by": "sex", "group": "F"}
                    ),
                    _metric(
                        "bias.group_metric",
                        0.3,
                        [0.25, 0.35],
                        {"metric": "selection_rate", "group_by": "sex", "group": "F"},
                    ),
                ],
            },
        ],
        "rules": [{"id": "CAL-ECE", "metric": "calibration.ece", "status": "pass", "observed": 0.02, "cause": None}],
    }
    results.update(changes)
    return results


def _write(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def _with(results: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``results`` with the dotted ``path`` set to ``value``."""
    copy = deepcopy(results)
    *parents, last = path.split(".")
    node = copy
    for key in parents:
        node = node[key]
    node[last] = value
    return copy


def _worse_bias(results: dict[str, Any]) -> dict[str, Any]:
    """Group accuracy and selection rate both move far beyond their intervals."""
    copy = deepcopy(results)
    accuracy, selection = copy["checks"][1]["metrics"]
    accuracy.update(value=0.5, ci=[0.45, 0.55])
    selection.update(value=0.6, ci=[0.55, 0.65])
    return copy


def test_identical_hand_built_audits_compare_clean(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", _results())
    comparison = compare(base, base)
    assert comparison.comparable and not comparison.differences and not comparison.checks
    assert comparison.exit_code == CompareExit.NO_REGRESSION


def test_different_data_manifest_is_not_comparable(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", _results())
    new = _write(tmp_path / "b", _worse_bias(_with(_results(), "data.manifest_sha256", "d" * 64)))
    comparison = compare(base, new)
    assert not comparison.comparable and comparison.metrics_judged
    assert [d.field for d in comparison.not_comparable] == ["manifest_sha256"]
    assert comparison.exit_code == CompareExit.NOT_COMPARABLE
    text = format_text(comparison)
    assert text.splitlines()[1].startswith(
        "WARNING: the two audits are not comparable: different data (data manifest bbbbbbbbbbbb… -> dddddddddddd…)"
    )
    assert "NOT COMPARABLE" in text and "--allow-different" in text
    markdown = format_markdown(comparison)
    assert markdown.startswith("### ⚠️ auditkit: not comparable")
    assert "> ⚠️ **Warning:** the two audits are not comparable: different data" in markdown
    data = comparison.to_json()
    assert data["comparable"] is False and data["exit_code"] == 2 and data["differences"][0]["aspect"] == "data"
    # Asked to compare anyway: the metrics are judged (the accuracy drop is a regression) and the
    # exit code says so; the warning stays.
    allowed = compare(base, new, allow_different=True)
    assert allowed.exit_code == CompareExit.REGRESSED and allowed.metric_regressions
    assert "not comparable" in format_text(allowed)


def test_split_sizes(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", _results())
    # Same manifest, fewer rows listed for eval (another split value): different data.
    listed = _with(_results(), "data.splits.eval", {"split_value": "test", "n_images": 80, "n_quarantined": 0})
    comparison = compare(base, _write(tmp_path / "b", listed))
    assert [d.field for d in comparison.not_comparable] == ["splits.eval.listed"]
    # Same rows, 20 more quarantined: comparable, but the warning says the subsets differ.
    read = _with(_results(), "data.splits.eval", {"split_value": "test", "n_images": 80, "n_quarantined": 20})
    comparison = compare(base, _write(tmp_path / "c", read))
    assert comparison.comparable
    assert any("read 100 images in BASE and 80 in NEW" in w for w in comparison.warnings())
    # The engine's coverage block is preferred when present.
    coverage = _with(read, "data.coverage", {"eval": {"listed": 100, "read": 80, "quarantined": 20}})
    assert compare(base, _write(tmp_path / "d", coverage)).comparable


def test_different_classes_are_listed_but_not_judged(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", _results())
    classes = _with(_worse_bias(_results()), "model.classes", ["bright", "dark"])
    comparison = compare(base, _write(tmp_path / "b", classes))
    assert not comparison.same_classes and not comparison.metrics_judged
    assert comparison.exit_code == CompareExit.NOT_COMPARABLE
    assert not comparison.metric_regressions and not comparison.regressed
    moved = [m for m in comparison.metrics if m.base != m.new]
    assert moved and {m.judgement for m in moved} == {"changed"}
    text = format_text(comparison)
    assert "different classes (classes" in text and "not judged as regressions or improvements" in text
    assert "metric changes (not judged: the classes differ):" in text
    assert "Metric changes are not judged: the classes differ." in format_markdown(comparison)
    assert compare(base, tmp_path / "b", allow_different=True).exit_code == CompareExit.NO_REGRESSION
    positive = _with(_results(), "model.positive_class", "dark")
    assert not compare(base, _write(tmp_path / "c", positive)).same_classes


def test_model_policy_and_checks_differences_are_reported(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", _results())
    new = _with(_results(), "model.weights_sha256", "e" * 64)
    new = _with(new, "model.input", {"channels": 1, "height": 32, "width": 32, "depth": None})
    new = _with(new, "policy.version", 2)
    new["checks"] = new["checks"][:1]  # bias not run
    new["run"]["selection"] = {
        "installed": ["bias", "calibration"],
        "run": ["calibration"],
        "not_run": ["bias"],
        "only": ["calibration"],
        "skip": [],
        "partial": True,
    }
    comparison = compare(base, _write(tmp_path / "b", new))
    fields = {(d.aspect, d.field, d.level) for d in comparison.differences}
    assert fields == {
        ("model", "weights_sha256", "info"),
        ("model", "input", "info"),
        ("policy", "version", "warning"),
        ("checks", "ids", "info"),
        ("checks", "selection.new", "warning"),
    }
    assert comparison.comparable  # a new model is what compare is for
    text = format_text(comparison)
    assert "model    model weights_sha256 aaaaaaaaaaaa… -> eeeeeeeeeeee…" in text
    assert "WARNING: policy version 1 -> 2: rule changes may be the policy's" in text
    assert "WARNING: NEW is a partial audit (only calibration; not run: bias)" in text
    # bias stopped measuring: reported, but not a regression on its own (its rules say more)
    assert [(c.id, c.base, c.new, c.worse, c.regression) for c in comparison.checks] == [
        ("bias", "ok", "not_run", True, False)
    ]
    assert "WORSE      bias: ok -> not_run (not selected (only calibration; not run: bias))" in text
    assert "NEW measured less: bias ok -> not_run" in text
    assert comparison.exit_code == CompareExit.NO_REGRESSION


def test_a_check_that_errors_in_new_is_a_regression(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", _results())
    new = _results(verdict="fail")
    new["checks"][1] = {
        "id": "bias",
        "status": "error",
        "reason": None,
        "error": {"type": "ValueError", "message": "boom"},
        "metrics": [],
    }
    new["rules"] = [{**new["rules"][0], "status": "not_evaluated", "observed": None, "cause": "errored"}]
    comparison = compare(base, _write(tmp_path / "b", new))
    assert [c.id for c in comparison.check_regressions] == ["bias"]
    assert comparison.regressed and comparison.exit_code == CompareExit.REGRESSED
    text = format_text(comparison)
    assert "REGRESSION bias: ok -> error (ValueError: boom)" in text
    assert "CAL-ECE: pass -> not_evaluated (errored)" in text
    assert "1 errored check(s)" in text
    assert compare(tmp_path / "b", tmp_path / "b").check_regressions, (
        "an errored check in NEW counts even if BASE errored"
    )
    markdown = format_markdown(comparison)
    assert "| `bias` ❌ | ok | error | ValueError: boom |" in markdown
    assert compare(tmp_path / "b", base).exit_code == CompareExit.NO_REGRESSION


def test_undirected_metrics_are_changed_never_judged(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", _results())
    comparison = compare(base, _write(tmp_path / "b", _worse_bias(_results())))
    judged = {m.labels.get("metric"): m.judgement for m in comparison.metrics if m.name == "bias.group_metric"}
    assert judged == {"accuracy": "regression", "selection_rate": "changed"}
    assert is_undirected("bias.group_metric", {"metric": "prevalence", "group_by": "sex", "group": "F"})
    assert not is_undirected("bias.group_metric", {"metric": "sensitivity", "group_by": "sex", "group": "F"})
    assert is_undirected("backdoor.trigger_norm", {"class": "bright"})
    assert not is_undirected("calibration.ece", {})


def test_results_without_the_new_blocks_compare(tmp_path: Path) -> None:
    """Older results.json files have no model, data, policy or selection blocks: nothing is 'different'."""
    old = _results()
    for key in ("model", "data", "policy"):
        del old[key]
    base = _write(tmp_path / "a", old)
    comparison = compare(base, _write(tmp_path / "b", _results()))
    assert comparison.comparable and not comparison.differences


def test_cli_exit_code_for_audits_of_different_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _write(tmp_path / "a", _results())
    new = _write(tmp_path / "b", _with(_results(), "data.manifest_sha256", "d" * 64))
    assert main(["compare", str(base), str(new)]) == 2
    assert "not comparable" in capsys.readouterr().out
    assert main(["compare", str(base), str(new), "--allow-different"]) == 0
