"""MONAI bundles: read as data, the network built only from MONAI's own classes, metadata held
against the spec and eval_metrics turned into claims; hostile bundles refused without running code."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from auditkit.cli import main
from auditkit.errors import ModelLoadError
from auditkit.monai_bundle import read_bundle
from tests.conftest import make_tiny_study

BUNDLE_CASES = (
    "network_def naming os.system",
    "a $ expression among the network's arguments",
    "an @ reference among the network's arguments",
    "a target outside the allow-list that would write a marker on import",
    "a zip entry leaving the bundle",
    "control characters and 500 characters in metadata's name",
    "metadata.json that is not JSON",
    "declared input channels that differ from the spec",
)
"""The hostile or mismatched bundles tried below (counted in docs/hardening.md)."""

NETWORK = {"_target_": "Classifier", "in_shape": [1, 16, 16], "classes": 2, "channels": [4, 8], "strides": [2, 2]}


def _bundle(root: Path, *, network: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """A small bundle for the tiny study: MONAI's Classifier, metadata, weights."""
    from monai.networks.nets import Classifier

    bundle = root / "bundle"
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "models").mkdir(exist_ok=True)
    meta = {
        "name": "tiny_classifier",
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [16, 16], "modality": "XR"}},
            "outputs": {
                "pred": {"type": "probabilities", "num_channels": 2, "channel_def": {"0": "dark", "1": "bright"}}
            },
        },
        "eval_metrics": {"accuracy": 0.99, "mean_dice": 0.5},
    }
    meta.update(metadata or {})
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": network or NETWORK}))
    torch.manual_seed(0)
    model = Classifier(in_shape=(1, 16, 16), classes=2, channels=(4, 8), strides=(2, 2))
    torch.save(model.state_dict(), bundle / "models" / "model.pt")
    return bundle


def _spec(root: Path, weights: str, **model: Any) -> Path:
    torch_spec = make_tiny_study(root)
    raw = yaml.safe_load(torch_spec.read_text())
    for key in ("factory", "factory_kwargs"):
        raw["model"].pop(key)
    raw["model"].update({"format": "monai_bundle", "weights": weights, **model})
    raw["only"] = ["performance", "calibration"]
    raw["output"] = "out-bundle"
    path = root / "audit-bundle.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_bundle_is_audited_and_its_eval_metrics_become_claims(tmp_path: Path) -> None:
    _bundle(tmp_path)
    spec = _spec(tmp_path, "bundle")
    main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((tmp_path / "out-bundle" / "results.json").read_text())
    artefact = results["model"]["artefact"]
    assert artefact["format"] == "monai_bundle" and artefact["network"] == "Classifier"
    assert artefact["claims_from_eval_metrics"] == {"performance.accuracy": 0.99}  # mean_dice: not a classifier's
    assert any("modality XR" in d for d in artefact["differences"])
    checks = {c["id"]: c for c in results["checks"]}
    assert checks["performance"]["status"] == "ok"
    shortfall = next(m for m in checks["performance"]["metrics"] if m["name"] == "performance.claim_shortfall")
    assert shortfall["labels"] == {"metric": "performance.accuracy"}
    # The untrained network cannot support a claimed accuracy of 0.99.
    assert next(r for r in results["rules"] if r["id"] == "PERF-CLAIM")["status"] == "fail"
    # The evidence bundle records the bundle folder as the weights, one digest over its files.
    from auditkit.jsonio import sha256_path

    manifest = json.loads((tmp_path / "out-bundle" / "manifest.json").read_text())
    weights = next(e for e in manifest["inputs"] if e.get("role") == "weights")
    assert weights["path"] == "bundle" and weights["files"] == 3
    assert weights["sha256"] == sha256_path(tmp_path / "bundle") == results["model"]["weights_sha256"]


def test_a_zipped_bundle_reads_as_the_folder(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in bundle.rglob("*"):
            if file.is_file():
                handle.write(file, f"tiny_classifier/{file.relative_to(bundle)}")
    info, network, _ = read_bundle(archive)
    assert info.name == "tiny_classifier" and network["_target_"] == "Classifier"


def _marker_module(root: Path) -> Path:
    marker = root / "imported.marker"
    (root / "evil_net.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Net: pass\n")
    return marker


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (
            {"_target_": "os.system", "command": "touch pwned"},
            "'os.system', which is not one of MONAI's network classes",
        ),
        ({**NETWORK, "channels": "$__import__('os').system('touch pwned')"}, "a MONAI config expression or reference"),
        ({**NETWORK, "classes": "@num_classes"}, "network_def.classes"),
    ],
)
def test_a_config_naming_code_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], network: dict[str, Any], message: str
) -> None:
    _bundle(tmp_path, network=network)
    spec = _spec(tmp_path, "bundle")
    assert main(["run", str(spec), "--quiet", "--no-pdf"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def test_a_target_outside_the_allow_list_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = _marker_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = _bundle(tmp_path, network={"_target_": "evil_net.Net"})
    with pytest.raises(ModelLoadError, match=r"'evil_net\.Net', which is not one of MONAI's network classes"):
        read_bundle(bundle)
    assert not marker.exists()


def test_hostile_archives_and_metadata_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "escape.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("../../outside.json", "{}")
    with pytest.raises(ModelLoadError, match="a path that leaves the bundle"):
        read_bundle(archive)
    bundle = _bundle(tmp_path, metadata={"name": "\x1b[31mred\x00" + "x" * 500})
    info, _, _ = read_bundle(bundle)
    assert "\x1b" not in info.name and "\x00" not in info.name and len(info.name) <= 120
    (bundle / "configs" / "metadata.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"configs/metadata\.json is not valid"):
        read_bundle(bundle)


def test_declared_channels_against_the_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _bundle(tmp_path)
    spec = _spec(tmp_path, "bundle")
    meta = tmp_path / "bundle" / "configs" / "metadata.json"
    data = json.loads(meta.read_text())
    data["network_data_format"]["inputs"]["image"]["num_channels"] = 3
    meta.write_text(json.dumps(data))
    assert main(["run", str(spec), "--quiet", "--no-pdf"]) == 2
    assert (
        "model.input.channels: the bundle's network_data_format gives the input 3 channels" in capsys.readouterr().err
    )
