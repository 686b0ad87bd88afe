"""The command line: exit codes, messages, DICOM and PNG specs with relative paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from auditkit.cli import main


def test_run_exit_0_and_results(tiny_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(tiny_study), "--only", "calibration", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tiny_study.parent / "out" / "results.json").read_text())
    assert [c["id"] for c in results["checks"]] == ["coverage", "calibration"]
    assert results["checks"][1]["status"] == "ok"
    assert "results.json" in out


def test_summary_lists_headline_metrics(tiny_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "run",
                str(tiny_study),
                "--only",
                "calibration",
                "--out",
                str(tiny_study.parent / "o2"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[     ok] calibration" in out
    assert "calibration.ece" in out
    assert "verdict: PASS" in out


def test_summary_counts_every_ai_rmf_status_and_says_when_the_audit_was_narrowed(
    tiny_study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    assert main(["run", str(tiny_study), "--only", "calibration", "--no-pdf"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "AI RMF subcategories:" in x)
    counts = dict(
        (name, int(n)) for n, name in re.findall(r"(\d+) (met|not met|not evaluated|attested|not assessed)", line)
    )
    assert set(counts) == {"met", "not met", "not evaluated", "attested", "not assessed"}
    assert counts["not evaluated"] > 0 and sum(counts.values()) == 72 and "(of 72)" in line
    assert re.search(r"^verdict: PASS \(partial: \d+ of \d+ rules evaluated; not run: adversarial, backdoor", out, re.M)
    assert (
        "[not run] adversarial, backdoor, bias, corruption, leakage, ood, parity, performance, phi (only ['calibration'],"
        " from the command line)" in out
    )


def test_broken_spec_is_exit_2_naming_the_field(tiny_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = yaml.safe_load(tiny_study.read_text())
    spec["data"]["groups"]["age"]["bins"] = [0, 65, 40]
    tiny_study.write_text(yaml.safe_dump(spec))
    assert main(["run", str(tiny_study)]) == 2
    err = capsys.readouterr().err
    assert "data.groups.age.bins: bins must be increasing, got [0.0, 65.0, 40.0]" in err


def test_broken_manifest_is_exit_2_naming_the_row(tiny_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tiny_study.parent / "data" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    lines[5] = lines[5].replace(",dark,", ",unknown,").replace(",bright,", ",unknown,")
    manifest.write_text("\n".join(lines) + "\n")
    assert main(["run", str(tiny_study)]) == 2
    err = capsys.readouterr().err
    assert "manifest.csv: row 4 (line 6): column 'label' value 'unknown' is not one of model.classes" in err


def test_unknown_check_is_exit_2(tiny_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tiny_study), "--only", "nope"]) == 2
    assert "unknown check(s) ['nope']" in capsys.readouterr().err


def test_bad_option_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2


def test_checks_lists_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checks"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines()}
    assert {"calibration", "ood", "bias", "adversarial", "corruption"} <= listed


def _write_synthetic_spec(folder: Path, fmt: str) -> Path:
    from auditkit.demo import prepare_demo

    spec_path = prepare_demo(folder, n_patients=30, fmt=fmt)
    return spec_path


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["dicom", "png"])
def test_console_script_on_dicom_and_png_studies_with_relative_paths(tmp_path: Path, fmt: str) -> None:
    spec_path = _write_synthetic_spec(tmp_path / fmt, fmt)
    spec = yaml.safe_load(spec_path.read_text())
    assert not Path(spec["data"]["manifest"]).is_absolute() and not Path(spec["model"]["weights"]).is_absolute()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "auditkit", "run", "audit.yaml", "--out", "../out", "--quiet", "--skip", "adversarial"],
        cwd=spec_path.parent,  # relative spec path, relative paths inside it
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    results = json.loads((tmp_path / fmt / "out" / "results.json").read_text())
    assert result.returncode == (1 if results["verdict"] == "fail" else 0), result.stderr
    assert results["data"]["splits"]["eval"]["n_images"] > 0
    assert results["data"]["quarantine"] == []
    calibration = {c["id"]: c for c in results["checks"]}["calibration"]
    assert calibration["status"] == "ok"
    ece = next(m for m in calibration["metrics"] if m["name"] == "calibration.ece" and not m["labels"])
    assert 0.0 <= ece["value"] <= 1.0
    suffixes = {
        Path(line.split(",")[0]).suffix for line in (spec_path.parent / "manifest.csv").read_text().splitlines()[1:]
    }
    assert suffixes == {".dcm" if fmt == "dicom" else ".png"}
