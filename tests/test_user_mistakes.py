"""Every mistake a new user made in their first hour, run through the command line.

Each gives exit code 2 with a one-paragraph message that names the spec field, file or value and
what was expected, and no traceback; or, where the input is fine after all (Windows paths), the
audit runs. A release gate must never say PASS when it measured nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from auditkit.cli import main

MODELS = textwrap.dedent(
    '''
    """Models that do not fit a 1-channel 16x16 two-class spec, each in its own way."""
    import torch
    from torch import nn


    def rgb() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))


    def grey() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))


    def volume() -> nn.Module:
        return nn.Sequential(nn.Conv3d(1, 4, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))


    def sized_for_32() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 2))


    def sigmoid_head() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(256, 2), nn.Sigmoid())


    def softmax_head() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(256, 2), nn.Softmax(dim=1))


    class _FunctionalSoftmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(256, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.fc(x.flatten(1)), dim=1)


    def functional_softmax() -> nn.Module:
        return _FunctionalSoftmax()


    def segmenter() -> nn.Module:
        return nn.Conv2d(1, 2, 3, padding=1)


    def regressor() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(256, 1))


    def eighteen_outputs() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(256, 18))


    class _Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(256, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.fc(x.flatten(1))}


    def dict_output() -> nn.Module:
        return _Heads()


    class _Picky(nn.Module):
        """Fine on mid-grey images, fails on real ones (a model that validates its input)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(256, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x.amax(dim=(1, 2, 3)) > 0.5).any()):
                raise ValueError("intensity out of the expected range")
            return self.fc(x.flatten(1))


    def picky() -> nn.Module:
        return _Picky()
    '''
)


def _spec(study: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(study.read_text()))


def _write(study: Path, spec: dict[str, Any]) -> None:
    study.write_text(yaml.safe_dump(spec, sort_keys=False))


def _use_model(study: Path, factory: str, channels: int = 1) -> None:
    (study.parent / "mistake_models.py").write_text(MODELS)
    spec = _spec(study)
    spec["model"].update(
        {"factory": f"mistake_models:{factory}", "factory_kwargs": {}, "weights": None, "normalize": None}
    )
    spec["model"]["input"]["channels"] = channels
    _write(study, spec)


def _rewrite_manifest(study: Path, transform: Callable[[str], str]) -> None:
    manifest = study.parent / "data" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], *(transform(line) for line in lines[1:])]) + "\n")


def _dicom(path: Path, frames: int = 1, position: float | None = None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if position is not None:
        ds.ImagePositionPatient = [0.0, 0.0, position]
    ds.PixelData = (np.arange(16 * 16 * frames, dtype=np.uint16) % 4096).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _volumes_as(kind: str) -> Callable[[Path], None]:
    """Replace every image with a volume of the given kind (a 3-D model's data)."""

    def apply(study: Path) -> None:
        data = study.parent / "data"
        suffix = {"npy3d": ".npy", "nifti": ".nii.gz", "series": "", "multiframe": ".dcm"}[kind]

        def rename(line: str) -> str:
            path, rest = line.split(",", 1)
            stem = path.removesuffix(".npy")
            target = data / (stem + suffix)
            if kind == "npy3d":
                np.save(target, np.zeros((8, 16, 16), dtype=np.float32))
            elif kind == "nifti":
                target.write_bytes(b"\x1f\x8b not really a NIfTI volume")
            elif kind == "series":
                target.mkdir()
                for z in range(3):
                    _dicom(target / f"slice{z}.dcm", position=float(z))
            else:
                _dicom(target, frames=4)
            return f"{stem + suffix},{rest}"

        _rewrite_manifest(study, rename)

    return apply


def _wrong_root(study: Path) -> None:
    spec = _spec(study)
    spec["data"]["root"] = "."  # the images live under data/, the manifest says img/...
    _write(study, spec)


def _semicolons(study: Path) -> None:
    manifest = study.parent / "data" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",", ";"))


def _multilabel_csv(study: Path) -> None:
    manifest = study.parent / "data" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    rows = ["path,dark,bright,patient_id,split,sex,age"]
    for line in lines[1:]:
        path, label, rest = line.split(",", 2)
        rows.append(f"{path},{int(label == 'dark')},{int(label == 'bright')},{rest}")
    manifest.write_text("\n".join(rows) + "\n")


def _spec_key(path: str, value: Any) -> Callable[[Path], None]:
    def apply(study: Path) -> None:
        spec = _spec(study)
        node = spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        _write(study, spec)

    return apply


def _onnx_with_trust_code(study: Path) -> None:
    (study.parent / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX protobuf's first bytes
    spec = _spec(study)
    del spec["model"]["factory"]
    spec["model"].update({"weights": "model.onnx", "trust_code": True, "factory_kwargs": {}})
    _write(study, spec)


def _pickled_weights(study: Path) -> None:
    torch.save({"model": torch.nn.Linear(2, 2)}, study.parent / "weights.pt")
    spec = _spec(study)
    spec["model"]["weights"] = "weights.pt"
    _write(study, spec)


def _model(factory: str, channels: int = 1) -> Callable[[Path], None]:
    return lambda study: _use_model(study, factory, channels)


MISTAKES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "wrong data.root": (_wrong_root, ["no readable eval image", "16 x cannot access the file", "check data.root"]),
    "3-D .npy volumes": (_volumes_as("npy3d"), ["no readable eval image", "3-D array (8, 16, 16): a volume"]),
    "NIfTI volumes": (_volumes_as("nifti"), ["no readable eval image", "a volume file (.nii.gz)"]),
    "DICOM series folders": (_volumes_as("series"), ["no readable eval image", "a folder, not a file"]),
    "multi-frame DICOM": (_volumes_as("multiframe"), ["no readable eval image", "multi-frame image with 4 frames"]),
    "RGB model, grey spec": (_model("rgb", 1), ["model.input.channels is 1 but the model expects 3 input channels"]),
    "grey model, RGB spec": (_model("grey", 3), ["model.input.channels is 3 but the model expects 1 input channels"]),
    "3-D model fed 2-D slices": (_model("volume"), ["is 3-D: it expects volumes (N, C, D, H, W)"]),
    "model sized for another input": (_model("sized_for_32"), ["a linear layer expects 1024 input features"]),
    "sigmoid head": (_model("sigmoid_head"), ["ends in Sigmoid", "Set model.task: multilabel"]),
    "softmax head": (_model("softmax_head"), ["ends in Softmax: it returns probabilities, not logits"]),
    "softmax inside forward": (_model("functional_softmax"), ["probabilities that sum to 1"]),
    "segmentation output": (
        _model("segmenter"),
        ["returns (2, 2, 16, 16): a segmentation output", "set model.task: segmentation"],
    ),
    "regression, one output": (_model("regressor"), ["one value per image (2, 1): a regression model"]),
    "18 outputs for 2 classes": (_model("eighteen_outputs"), ["18 logits per image", "output_names"]),
    "dict of heads": (_model("dict_output"), ["the model returns a dict"]),
    "ONNX with trust_code": (_onnx_with_trust_code, ["trust_code does not apply to format: onnx"]),
    "pickled module as weights": (_pickled_weights, ["model.weights: weights.pt is not a plain state_dict"]),
    "task: segmentation on a classifier": (
        _spec_key("model.task", "segmentation"),
        ["model: positive_class applies to task: classification, not task: segmentation"],
    ),
    "input.depth for a 2-D model": (
        _spec_key("model.input.depth", 32),
        ["a linear layer expects 256 input features", "remove model.input.depth for a model of 2-D images"],
    ),
    "misspelt key": (_spec_key("model.wieghts", "w.pt"), ["model.wieghts: unknown key; did you mean 'weights'?"]),
    "checks as a list": (_spec_key("checks", ["calibration"]), ["write only: [calibration]"]),
    "claim of an unknown metric": (
        _spec_key("model.claims", {"performance.f1": 0.9}),
        ["model.claims: names 'performance.f1'; a claim is one of"],
    ),
    "threshold outside (0, 1)": (
        _spec_key("model.operating_point", {"bright": 1.5}),
        ["operating_point['bright'] must be a probability in (0, 1), got 1.5"],
    ),
    "semicolon CSV": (_semicolons, ["one column that holds semicolons"]),
    "multi-label CSV": (_multilabel_csv, ["one column per class: the layout of a multi-label study"]),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_is_exit_2_with_one_paragraph_and_no_traceback(
    mistake: str, study_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_factory()
    plant, expected = MISTAKES[mistake]
    plant(study)
    code = main(["run", str(study), "--quiet", "--no-pdf"])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("auditkit: error:")]
    assert len(errors) == 1, captured.err
    message = captured.err[captured.err.index("auditkit: error:") :]
    for text in expected:
        assert text in message, message
    assert "Traceback" not in captured.err + captured.out
    assert "\x1b[" not in captured.err  # no terminal colour codes from torch
    assert not (study.parent / "out" / "results.json").exists()  # nothing that could read as a PASS


def test_windows_separators_in_the_manifest_are_read(
    study_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_factory()
    _rewrite_manifest(study, lambda line: line.replace("/", "\\"))
    code = main(["run", str(study), "--only", "calibration", "--quiet", "--no-pdf"])
    assert code in (0, 1), capsys.readouterr().err
    results = json.loads((study.parent / "out" / "results.json").read_text())
    assert results["data"]["coverage"]["eval"]["read"] == results["data"]["coverage"]["eval"]["listed"] == 16


def test_a_narrowed_audit_says_so_and_what_did_not_run(
    study_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_factory()
    _spec_key("checks", {"calibration": {"bins": 15}})(study)
    _spec_key("only", ["calibration"])(study)
    code = main(["run", str(study), "--no-pdf"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    verdict = next(line for line in out.splitlines() if line.startswith("verdict:"))
    assert "(partial: " in verdict and "rules evaluated; not run: adversarial, backdoor, bias" in verdict
    assert (
        "[not run] adversarial, backdoor, bias, corruption, leakage, ood, parity, performance, phi (only"
        " ['calibration'], from the spec)" in out
    )
    results = json.loads((study.parent / "out" / "results.json").read_text())
    ood_rules = [r for r in results["rules"] if r["metric"].startswith("ood.")]
    assert ood_rules and all(r["cause"] == "not_selected" for r in ood_rules)
    assert all(r["note"] == "check ood not selected (only/skip)" for r in ood_rules)


def test_quarantine_is_on_the_console_by_reason_with_rows(
    study_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_factory()
    data = study.parent / "data"
    for name in ("003.npy", "006.npy"):  # eval rows 3 and 6 (every third row is eval)
        (data / "img" / name).unlink()
    (data / "img" / "009.npy").write_bytes(b"not an array")
    code = main(["run", str(study), "--only", "calibration", "--no-pdf"])
    out = capsys.readouterr().out
    assert code == 1  # 3 of 16 eval images lost is over the 5% the default policy allows
    assert "split eval: 13 of 16 images read, 3 quarantined (18.8%)" in out
    assert "2 x cannot access the file (FileNotFoundError) (rows 3, 6)" in out
    assert "FAIL COV-EVAL-QUARANTINE" in out


def test_a_model_that_fails_on_the_study_images_is_exit_2(
    study_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    study = study_factory()
    _use_model(study, "picky")
    assert main(["run", str(study), "--only", "calibration", "--quiet", "--no-pdf"]) == 2
    err = capsys.readouterr().err
    assert "the model failed in the shared pass over the study's images (ValueError: intensity out" in err
    assert "Traceback" not in err


def test_an_internal_error_is_exit_3_without_a_traceback(
    study_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import auditkit.runner

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(auditkit.runner, "write_bundle", broken)
    study = study_factory()
    assert main(["run", str(study), "--only", "calibration", "--quiet", "--no-pdf"]) == 3
    err = capsys.readouterr().err
    assert "auditkit: internal error: ZeroDivisionError: planted bug. This is a bug" in err
    assert "Traceback" not in err


def test_the_console_script_prints_no_traceback(study_factory: Callable[..., Path]) -> None:
    """One mistake through the installed entry point, in a fresh interpreter."""
    study = study_factory()
    _use_model(study, "rgb", 1)
    result = subprocess.run(
        [sys.executable, "-m", "auditkit", "run", str(study), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "model.input.channels is 1" in result.stderr
