"""The package-dir mapping: content folders become ``auditkit.*``, editable and as a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTENT = {
    "auditkit": "auditkit",
    "checks": "auditkit/checks",
    "policies": "auditkit/policies",
    "reports": "auditkit/reports",
    "fixtures": "auditkit/fixtures",
}


def test_editable_install_maps_the_content_folders() -> None:
    import auditkit.checks.calibration
    import auditkit.fixtures.models

    assert Path(auditkit.checks.calibration.__file__).resolve().is_relative_to(ROOT / "checks")
    assert (resources.files("auditkit.fixtures") / "weights" / "tiny_cnn.safetensors").is_file()
    assert (resources.files("auditkit.policies") / "frameworks" / "nist-ai-rmf-1.0.yaml").is_file()


def test_builtin_checks_are_entry_points() -> None:
    names = {ep.name for ep in metadata.entry_points(group="auditkit.checks")}
    assert "calibration" in names


@pytest.mark.slow
def test_wheel_holds_every_package_and_resource(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("auditkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, target in CONTENT.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            expected = f"{target}/{init.parent.relative_to(ROOT / folder).as_posix()}/__init__.py".replace("/./", "/")
            assert expected in names, f"{expected} missing from the wheel: list it in pyproject packages"
    assert "auditkit/fixtures/weights/tiny_cnn.safetensors" in names
    assert "auditkit/fixtures/weights/tiny_cnn.json" in names
    assert "auditkit/policies/frameworks/nist-ai-rmf-1.0.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "calibration = auditkit.checks.calibration:CalibrationCheck" in text
