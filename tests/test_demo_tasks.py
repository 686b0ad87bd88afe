"""``auditkit demo --task multilabel|regression|segmentation|volumes``: the planted fixtures audited end
to end, with the PDF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from auditkit.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("task", ["multilabel", "regression", "segmentation", "volumes"])
def test_demo_audits_the_planted_study_of_the_task(
    task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The attacks and corruptions are the slow part (minutes); they run on both tasks in
    # tests/test_tasks.py and in the checks' own tests.
    code = main(["demo", "--task", task, "--out", str(tmp_path), "--quiet", "--skip", "adversarial,corruption"])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    results = json.loads((tmp_path / "audit" / "results.json").read_text())
    model_task = "classification" if task == "volumes" else task
    assert results["model"]["task"] == model_task
    assert (tmp_path / "audit" / "report.pdf").stat().st_size > 0
    assert not [c["id"] for c in results["checks"] if c["status"] == "error"]
    spec = yaml.safe_load(next((tmp_path / "study").glob("audit-*.yaml")).read_text())
    assert spec["model"]["task"] == model_task and "checks" not in spec  # every installed check runs by default
    failed = {(r["id"], r["labels"].get("group_by")) for r in results["rules"] if r["status"] == "fail"}
    if task == "multilabel":
        assert results["model"]["output_names"] == ["effusion", "nodule", "cardiomegaly", "fracture"]
        assert results["model"]["classes"] == ["effusion", "nodule", "cardiomegaly"]
        eval_counts = results["data"]["splits"]["eval"]
        assert eval_counts["n_images"] > 300
    elif task == "regression":
        assert results["model"]["units"] == {"ctr": "%"}
    elif task == "segmentation":
        assert ("SEG-DICE-GAP", "site") in failed  # the planted site, and no other Dice gap
        assert not any(rule == "SEG-DICE-GAP" and by != "site" for rule, by in failed)
    else:
        assert results["model"]["input"]["depth"] == 16
        assert ("BIAS-SENS-GAP", "site") in failed
        assert set(results["data"]["splits"]["eval"]["volumes"]["kinds"]) == {"dicom-series", "nifti", "npy"}
    skipped = [c for c in results["checks"] if c["status"] == "skipped"]
    named = "3-D volumes" if task == "volumes" else f"task: {task}"
    assert all(named in c["reason"] for c in skipped if "does not measure" in c["reason"])


def test_patients_applies_to_the_classification_demo_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--task", "multilabel", "--patients", "30", "--out", str(tmp_path)]) == 2
    assert "--patients applies to --task classification" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_the_default_task_is_classification() -> None:
    from auditkit.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.task == "classification" and args.patients is None
