"""The benchmark harness's own logic (speed itself is measured in ``benchmarks/``, never asserted)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import BaseModel

from benchmarks import bench_shared_pass, gpu


class _TriggerToggle:
    class Params(BaseModel):
        trigger_search: bool = True
        n_boot: int = 100


class _MethodList:
    class Params(BaseModel):
        methods: list[str] = ["activation_clustering", "spectral_signatures", "strip", "neural_cleanse"]


class _NoToggle:
    Params: ClassVar[type[BaseModel]] = BaseModel


def test_backdoor_is_configured_without_its_trigger_search() -> None:
    assert bench_shared_pass.backdoor_params(_TriggerToggle)[0] == {"trigger_search": False}
    params, _note = bench_shared_pass.backdoor_params(_MethodList)
    assert params == {"methods": ["activation_clustering", "spectral_signatures", "strip"]}
    params, note = bench_shared_pass.backdoor_params(_NoToggle)
    assert params is None and "left out" in note


def test_prediction_based_checks_are_the_installed_ones() -> None:
    checks, notes = bench_shared_pass.prediction_checks()
    assert {"calibration", "ood", "bias", "leakage"} <= set(checks)
    assert not {"adversarial", "corruption", "phi"} & set(checks)
    assert ("backdoor" in checks) or any("backdoor" in note for note in notes)


def test_resnet_factory_takes_one_channel() -> None:
    model = bench_shared_pass.resnet18_gray().eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_says_its_figures_are_missing_without_cuda() -> None:
    assert gpu.main() == ["GPU figures missing: no CUDA GPU on this machine (run `python -m benchmarks.gpu` on one)"]


def test_gpu_script_times_the_fingerprint_search_and_finds_every_copy() -> None:
    (line,) = gpu.fingerprint_search_lines(torch.device("cpu"), 400)  # the device path, run on the CPU
    assert "400 pooled" in line and "1,600" in line and "recall 1.000" in line


class _TriggerAndStrip:
    class Params(BaseModel):
        trigger_search: bool = True
        strip: bool = True
        strip_blends: int = 16


def test_backdoor_strip_is_turned_off_with_the_trigger_search() -> None:
    params, note = bench_shared_pass.backdoor_params(_TriggerAndStrip)
    assert params == {"trigger_search": False, "strip": False}
    assert "strip=false" in note


def test_resnet_configuration_decodes_to_224(demo_spec: Path) -> None:
    spec = bench_shared_pass.bench_spec(demo_spec, "resnet18_224")
    assert (spec.model.input.height, spec.model.input.width) == (224, 224)
    assert spec.model.weights is None
    assert bench_shared_pass.bench_spec(demo_spec, "tiny_cnn").model.input.height == 64
