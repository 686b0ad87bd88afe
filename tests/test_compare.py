"""``auditkit compare``: a degraded copy of the fixture model regresses; the model against itself does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import prune

from auditkit.cli import main
from auditkit.compare import compare, format_markdown
from auditkit.fixtures.models import tiny_cnn
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec

OPTIONS = {"checks": {"calibration": {"n_boot": 300}}}


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
    assert not comparison.regressed and not comparison.rules
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
