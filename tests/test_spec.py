"""The audit spec: validation messages name the field, the value and the expectation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from auditkit.errors import ConfigError
from auditkit.spec import AuditSpec, load_spec, parse_spec

BASE: dict[str, Any] = {
    "model": {
        "factory": "my_models.chest:build",
        "factory_kwargs": {"num_classes": 2},
        "weights": "weights.safetensors",
        "classes": ["normal", "nodule"],
        "positive_class": "nodule",
        "input": {"channels": 1, "height": 128, "width": 128},
        "normalize": {"mean": [0.5], "std": [0.25]},
    },
    "data": {
        "root": "data/",
        "manifest": "manifest.csv",
        "splits": {"eval": "test", "train": "train"},
        "groups": {"sex": {}, "age": {"bins": [0, 40, 65, 120]}, "site": None},
        "ood": {"other_modality": {"manifest": "ood.csv"}},
        "dicom": {"window": "auto"},
    },
    "checks": {"calibration": {"bins": 15}},
    "policy": "medical-imaging-default",
    "device": "auto",
    "seed": 0,
    "output": "audit-out/",
}


def _with(path: str, value: Any) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


_DELETE = object()


def test_design_example_is_valid(tmp_path: Path) -> None:
    spec = parse_spec(BASE, base_dir=tmp_path)
    assert spec.model.positive_index == 1
    assert spec.data.groups["site"].bins is None
    assert spec.data_root == (tmp_path / "data").resolve()
    assert spec.manifest_path == (tmp_path / "manifest.csv").resolve()
    assert spec.weights_path == (tmp_path / "weights.safetensors").resolve()
    assert spec.output_dir == (tmp_path / "audit-out").resolve()


def test_load_spec_resolves_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "nested"
    folder.mkdir()
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    spec = load_spec(path)
    assert spec.base_dir == folder.resolve()
    assert spec.data_root == (folder / "data").resolve()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "data.groups.age.bins",
            [0, 65, 40],
            "data.groups.age.bins: bins must be increasing, got [0.0, 65.0, 40.0]",
        ),
        (
            "model.input.channels",
            0,
            "model.input.channels: Input should be greater than or equal to 1, got 0",
        ),
        (
            "model.positive_class",
            "cancer",
            "positive_class must be one of ['normal', 'nodule'], got 'cancer'",
        ),
        (
            "model.factory",
            "not a factory",
            "model.factory: expected 'package.module:callable', got 'not a factory'",
        ),
        ("device", "gpu", "device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("model.normalize.std", [0.0], "every std must be a positive finite number, got [0.0]"),
        ("model.classes", ["a", "a"], "class names must be unique"),
        ("data.dicom.window", {"center": 40}, "a fixed window is {center: C, width: W}"),
        ("seed", -1, "seed: Input should be greater than or equal to 0, got -1"),
    ],
)
def test_invalid_values_name_field_value_and_expectation(tmp_path: Path, path: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(_with(path, value), base_dir=tmp_path, source="audit.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("audit.yaml: ")


def test_unknown_key_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    data = _with("model.weigths", "w.pt")
    with pytest.raises(ConfigError, match=r"model\.weigths: unknown key"):
        parse_spec(data, base_dir=tmp_path)


def test_missing_required_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.classes: required but missing"):
        parse_spec(_with("model.classes", _DELETE), base_dir=tmp_path)


def test_config_error_is_also_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_spec(_with("device", "tpu"), base_dir=tmp_path)


def test_checks_as_a_list_is_refused_with_the_selection_keys_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checks: expected a mapping of check parameters.*only: \[calibration\]"):
        parse_spec(_with("checks", ["calibration"]), base_dir=tmp_path)


def test_only_and_skip_accept_lists_and_comma_strings(tmp_path: Path) -> None:
    spec = parse_spec({**BASE, "only": "calibration, ood", "skip": ["bias"]}, base_dir=tmp_path)
    assert spec.only == ["calibration", "ood"] and spec.skip == ["bias"]
    assert parse_spec(BASE, base_dir=tmp_path).only == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("modle", {}, "modle: unknown key; did you mean 'model'?"),
        ("model.weigths", "w.pt", "model.weigths: unknown key; did you mean 'weights'?"),
        ("model.input.chanels", 3, "model.input.chanels: unknown key; did you mean 'channels'?"),
        ("data.groups.age.binz", [0, 1], "data.groups.age.binz: unknown key; did you mean 'bins'?"),
        ("data.ood.other_modality.manifset", "x", "did you mean 'manifest'?"),
    ],
)
def test_unknown_keys_suggest_the_closest_known_key(tmp_path: Path, path: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(_with(path, value), base_dir=tmp_path, source="audit.yaml")
    assert expected in str(info.value)
    assert "DESIGN" not in str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("model.task", "detection", "model.task: expected one of ['classification', 'multilabel'"),
        (
            "model.reference",
            {"factory": "m:f", "weights": "m.onnx"},
            "model.reference: the reference is the PyTorch model",
        ),
    ],
)
def test_planned_keys_are_named_as_unsupported(tmp_path: Path, path: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(_with(path, value), base_dir=tmp_path, source="audit.yaml")
    assert expected in str(info.value)
    assert "unknown key" not in str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("model.claims", {"performance.f1": 0.9}, "model.claims: names 'performance.f1'; a claim is one of"),
        ("model.claims", {"performance.auroc": 91}, "claims['performance.auroc'] must be in [0, 1], got 91"),
        ("model.operating_point", {"nodule": 0.5}, "model.operating_point: names 'nodule', which is not one of"),
        ("model.operating_point", {"CLASS_B": 1.2}, "must be a probability in (0, 1), got 1.2"),
    ],
)
def test_claims_and_operating_points_are_checked(tmp_path: Path, path: str, value: Any, expected: str) -> None:
    data = _with(path, value)
    data["model"]["classes"], data["model"]["positive_class"] = ["CLASS_A", "CLASS_B"], "CLASS_B"
    with pytest.raises(ConfigError) as info:
        parse_spec(data, base_dir=tmp_path, source="audit.yaml")
    assert expected in str(info.value)


def test_a_claim_and_an_operating_point_are_accepted(tmp_path: Path) -> None:
    data = _with("model.claims", {"performance.auroc": 0.9, "performance.sensitivity": 0.85})
    data["model"]["classes"], data["model"]["positive_class"] = ["CLASS_A", "CLASS_B"], "CLASS_B"
    data["model"]["operating_point"] = {"CLASS_B": 0.3}
    spec = parse_spec(data, base_dir=tmp_path)
    assert spec.model.claims == {"performance.auroc": 0.9, "performance.sensitivity": 0.85}
    assert spec.model.operating_point == {"CLASS_B": 0.3}


def test_the_default_task_is_accepted_explicitly(tmp_path: Path) -> None:
    spec = parse_spec(_with("model.task", "classification"), base_dir=tmp_path)
    assert spec.model.task == "classification" and spec.model.format == "auto"


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_spec(scalar)


def test_trust_code_module_without_factory(tmp_path: Path) -> None:
    data = _with("model.factory", _DELETE)
    with pytest.raises(ConfigError, match="factory is required"):
        parse_spec(data, base_dir=tmp_path)
    data["model"]["trust_code"] = True
    assert parse_spec(data, base_dir=tmp_path).model.factory is None


names = st.text(alphabet=st.characters(categories=("L", "N")), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(
    classes=st.lists(names, min_size=2, max_size=5, unique=True),
    channels=st.integers(1, 4),
    size=st.integers(8, 512),
    bins=st.lists(st.integers(0, 200), min_size=2, max_size=6, unique=True).map(sorted),
    seed=st.integers(0, 2**32 - 1),
    window=st.one_of(
        st.sampled_from(["auto", "minmax"]),
        st.builds(lambda c, w: {"center": c, "width": w}, st.floats(-2000, 2000), st.floats(1, 4000)),
    ),
)
def test_spec_round_trips_through_yaml(
    classes: list[str], channels: int, size: int, bins: list[int], seed: int, window: Any
) -> None:
    data = {
        "model": {
            "factory": "pkg.mod:build",
            "classes": classes,
            "input": {"channels": channels, "height": size, "width": size},
        },
        "data": {
            "root": "data",
            "manifest": "m.csv",
            "groups": {"age": {"bins": bins}},
            "dicom": {"window": window},
        },
        "seed": seed,
    }
    base = Path("/tmp/auditkit-spec")
    spec = parse_spec(data, base_dir=base)
    dumped = yaml.safe_load(yaml.safe_dump(spec.to_yaml_dict()))
    again = parse_spec(dumped, base_dir=base)
    assert again == spec
    assert isinstance(again, AuditSpec)
