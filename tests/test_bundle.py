"""The evidence bundle: manifest.json hashes every input and output; verify names what changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from auditkit.bundle import verify_bundle
from auditkit.cli import main
from auditkit.errors import InputError
from auditkit.jsonio import sha256_file
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, demo_spec: Path) -> Path:
    out = tmp_path_factory.mktemp("pristine")
    run_audit(load_spec(demo_spec), RunOptions(out_dir=out, only=["calibration"], pdf=False))
    return out


@pytest.fixture
def bundle(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(pristine, copy)
    return copy


def test_manifest_lists_inputs_outputs_and_environment(bundle: Path, demo_spec: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    roles = {entry["role"]: entry for entry in manifest["inputs"]}
    assert set(roles) >= {"spec", "weights", "data_manifest", "policy"}
    assert roles["spec"]["sha256"] == sha256_file(demo_spec)
    outputs = {entry["path"] for entry in manifest["outputs"]}
    assert {"results.json", "report.html", "checkpoints/calibration.json", "metrics.csv", "findings.csv"} <= outputs
    assert any(name.startswith("artifacts/calibration/") for name in outputs)
    assert manifest["environment"]["torch"] and manifest["environment"]["python"]
    assert verify_bundle(bundle).ok


def test_one_changed_byte_in_any_file_is_named(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["outputs"]:
        target = bundle / entry["path"]
        original = target.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        target.write_bytes(bytes(flipped))
        report = verify_bundle(bundle)
        assert report.changed == [entry["path"]], entry["path"]
        target.write_bytes(original)
    assert verify_bundle(bundle).ok


def test_missing_and_unexpected_files(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bundle / "report.html").unlink()
    (bundle / "artifacts" / "extra.svg").write_text("<svg/>")
    assert main(["verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "MISSING     report.html" in out and "UNEXPECTED  artifacts/extra.svg" in out


def test_tampered_or_absent_manifest(bundle: Path, tmp_path: Path) -> None:
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest itself was altered"):
        verify_bundle(bundle)
    with pytest.raises(InputError, match="not an auditkit evidence bundle"):
        verify_bundle(tmp_path)


def test_report_command_rerenders_and_keeps_the_bundle_verifiable(bundle: Path) -> None:
    before = json.loads((bundle / "manifest.json").read_text())["inputs"]
    (bundle / "report.html").unlink()
    (bundle / "metrics.csv").unlink()
    assert main(["report", str(bundle), "--no-pdf"]) == 0
    assert (bundle / "report.html").is_file() and (bundle / "metrics.csv").is_file()  # rewritten too
    assert main(["verify", str(bundle)]) == 0
    after = json.loads((bundle / "manifest.json").read_text())["inputs"]
    assert sorted(after, key=lambda e: e["role"]) == sorted(before, key=lambda e: e["role"])
