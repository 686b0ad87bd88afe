"""Auditing an ONNX artefact with ONNX Runtime: the same outputs as the PyTorch module it was
exported from, the checks that need gradients told why not, and hostile or mismatched files refused
with the spec field named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from auditkit.artefact import OnnxModule, inspect_onnx
from auditkit.cli import main
from auditkit.errors import ModelLoadError
from auditkit.fixtures.artefacts import export_onnx
from auditkit.model import ModelAdapter, build_module
from auditkit.spec import load_spec
from tests.conftest import make_tiny_study

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _onnx_study(root: Path, *, dynamic_batch: bool = True, **model: Any) -> Path:
    """The tiny study with its model exported to ONNX and a spec that audits the export."""
    torch_spec = make_tiny_study(root)
    spec = load_spec(torch_spec)
    module = build_module(spec.model, spec.base_dir, spec.weights_path)
    export_onnx(module, root / "model.onnx", (1, 16, 16), dynamic_batch=dynamic_batch)
    raw = yaml.safe_load(torch_spec.read_text())
    for key in ("factory", "factory_kwargs"):
        raw["model"].pop(key)
    raw["model"]["weights"] = "model.onnx"
    raw["model"].update(model)
    raw["output"] = "out-onnx"
    path = root / "audit-onnx.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _outputs(spec_path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adapter = ModelAdapter(load_spec(spec_path))
    return adapter.forward_pass(images)


def test_the_export_gives_the_modules_outputs_and_embeddings(tmp_path: Path) -> None:
    onnx_spec = _onnx_study(tmp_path)
    images = torch.rand(37, 1, 16, 16)
    logits, features = _outputs(onnx_spec, images)
    expected_logits, expected_features = _outputs(tmp_path / "audit.yaml", images)
    probs, expected = logits.softmax(dim=1), expected_logits.softmax(dim=1)
    assert float((probs - expected).abs().max()) < 1e-4
    assert bool((logits.argmax(dim=1) == expected_logits.argmax(dim=1)).all())
    # The embedding is the input of the last Gemm, as it is the input of the last nn.Linear.
    assert features.shape == expected_features.shape == (37, 8)
    torch.testing.assert_close(features, expected_features, atol=1e-4, rtol=1e-4)
    adapter = ModelAdapter(load_spec(onnx_spec))
    assert isinstance(adapter.user_module, OnnxModule) and not adapter.has_gradients
    assert adapter.feature_layer.startswith("input of Gemm node")


def test_a_graph_fixed_to_one_batch_size_is_run_in_chunks(tmp_path: Path) -> None:
    fixed = _onnx_study(tmp_path / "fixed", dynamic_batch=False)
    free = _onnx_study(tmp_path / "free")
    images = torch.rand(5, 1, 16, 16)  # 5 images through a graph fixed at 2: 2 + 2 + 1 padded
    torch.testing.assert_close(_outputs(fixed, images)[0], _outputs(free, images)[0], atol=1e-5, rtol=0)


def test_the_audit_runs_on_the_artefact_and_says_which_checks_need_gradients(tmp_path: Path) -> None:
    onnx_spec = _onnx_study(tmp_path)
    raw = yaml.safe_load(onnx_spec.read_text())
    raw["checks"] = {"ood": {"detectors": ["msp", "energy", "mahalanobis", "odin"]}}  # ODIN is not a default
    onnx_spec.write_text(yaml.safe_dump(raw))
    main(["run", str(onnx_spec), "--quiet", "--no-pdf"])
    main(["run", str(tmp_path / "audit.yaml"), "--quiet", "--no-pdf"])
    artefact = json.loads((tmp_path / "out-onnx" / "results.json").read_text())
    module = json.loads((tmp_path / "out" / "results.json").read_text())
    assert artefact["model"]["format"] == "onnx" and module["model"]["format"] == "torch"
    runtime = artefact["model"]["artefact"]
    assert runtime["runtime"].startswith("onnxruntime ") and runtime["provider"] == "CPUExecutionProvider"
    assert runtime["input"] == {"name": "image", "shape": ["batch", 1, 16, 16], "type": "float32"}
    checks = {c["id"]: c for c in artefact["checks"]}
    for check_id in ("performance", "calibration", "bias", "ood", "leakage", "corruption", "phi", "backdoor"):
        assert checks[check_id]["status"] == "ok", (check_id, checks[check_id].get("error"))
    # No gradient flows through ONNX Runtime: Square attacks the artefact itself, the trigger search
    # is left out while the backdoor check's data-level detectors run on the artefact's embeddings.
    assert checks["adversarial"]["status"] == "ok"
    mode = next(f for f in checks["adversarial"]["findings"] if f["kind"] == "attack_mode")
    assert mode["mode"] == "black-box"
    suspected = next(m for m in checks["backdoor"]["metrics"] if m["name"] == "backdoor.model_suspected")
    assert suspected["value"] is None and "ONNX Runtime artefact" in suspected["reason"]
    fractions = [m for m in checks["backdoor"]["metrics"] if m["name"] == "backdoor.suspicious_fraction"]
    assert any(m["value"] is not None for m in fractions)
    odin = [
        f for f in checks["ood"]["findings"] if f.get("detector") == "odin" and f["kind"] == "detector_not_applicable"
    ]
    assert odin and "gradient" in odin[0]["reason"]
    # Output-only checks measure the artefact as they measure the module.
    by_name = {
        c["id"]: {(m["name"], json.dumps(m["labels"], sort_keys=True)): m["value"] for m in c["metrics"]}
        for c in module["checks"]
    }
    for check_id in ("performance", "calibration"):
        for key, value in {
            (m["name"], json.dumps(m["labels"], sort_keys=True)): m["value"] for m in checks[check_id]["metrics"]
        }.items():
            if value is not None:
                assert value == pytest.approx(by_name[check_id][key], abs=1e-4), key


def _cli_error(spec: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["run", str(spec), "--quiet", "--no-pdf"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _write(model: Any, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())  # as an attacker would: no checks on the way out
    return path


def _truncated(spec: Path) -> None:
    path = spec.parent / "model.onnx"
    path.write_bytes(path.read_bytes()[:1500])


def _custom_domain(spec: Path) -> None:
    path = spec.parent / "model.onnx"
    model = onnx.load(str(path))
    model.graph.node[0].domain = "evil.ops"
    model.opset_import.append(onnx.helper.make_opsetid("evil.ops", 1))
    _write(model, path)


def _external(location: str, dims: list[int] | None = None) -> Any:
    def mutate(spec: Path) -> None:
        path = spec.parent / "model.onnx"
        model = onnx.load(str(path))
        tensor = model.graph.initializer[0]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        if dims is not None:
            del tensor.dims[:]
            tensor.dims.extend(dims)
        tensor.external_data.add(key="location", value=location)
        (spec.parent / "weights.bin").write_bytes(b"abc")
        _write(model, path)

    return mutate


def _spec_edit(**model: Any) -> Any:
    def mutate(spec: Path) -> None:
        raw = yaml.safe_load(spec.read_text())
        for key, value in model.items():
            node = raw["model"]
            *parents, last = key.split(".")
            for parent in parents:
                node = node[parent]
            node[last] = value
        spec.write_text(yaml.safe_dump(raw))

    return mutate


ONNX_CASES: dict[str, tuple[Any, str]] = {
    "truncated ONNX file": (_truncated, "is not a readable ONNX model"),
    "operator of a custom domain": (_custom_domain, "uses operators of custom domains ['evil.ops']"),
    "external data outside the model's folder": (_external("../../etc/passwd"), "outside the model's folder"),
    "external data file missing": (_external("missing.bin"), "external data file 'missing.bin' is missing"),
    "external tensor declaring 40 GB": (
        _external("weights.bin", [100_000, 100_000]),
        "declares 40000000104 bytes of tensors; the budget",  # 10^10 floats and the 104 bytes of the others
    ),
    "graph input of another height": (_spec_edit(**{"input.height": 32}), "model.input.height"),
    "a 2-D graph given input.depth": (_spec_edit(**{"input.depth": 4}), "remove input.depth"),
    "feature_layer naming no graph value": (
        _spec_edit(feature_layer="/no/such/value"),
        "model.feature_layer: the ONNX graph has no value named '/no/such/value'",
    ),
    "format: onnx with a factory": (_spec_edit(factory="tiny_model:build"), "model.factory does not apply"),
    "format: onnx with trust_code": (_spec_edit(trust_code=True), "an ONNX file is data, not code"),
    "an .onnx file under format: torch": (_spec_edit(format="torch"), "set format: onnx (or auto)"),
}
"""Hostile or mismatched ONNX artefacts and specs (counted in docs/hardening.md)."""


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_hostile_and_mismatched_artefacts_are_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    mutate, message = ONNX_CASES[case]
    spec = _onnx_study(tmp_path)
    mutate(spec)
    assert main(["run", str(spec), "--quiet", "--no-pdf"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err, err


def test_the_budget_is_checked_before_anything_is_read(tmp_path: Path) -> None:
    _onnx_study(tmp_path)
    with pytest.raises(ModelLoadError, match="the budget for an ONNX model is 1000 bytes"):
        inspect_onnx(tmp_path / "model.onnx", budget=1000)


def test_feature_layer_names_a_value_of_the_graph(tmp_path: Path) -> None:
    spec = _onnx_study(tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"))
    first_gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    raw = yaml.safe_load(spec.read_text())
    raw["model"]["feature_layer"] = first_gemm.output[0]  # the first Linear's output: 8 values
    spec.write_text(yaml.safe_dump(raw))
    _, features = _outputs(spec, torch.rand(3, 1, 16, 16))
    assert features.shape == (3, 8)
    assert np.isfinite(features.numpy()).all()


# --------------------------------------------------------------------------------------------- parity


def _with_reference(spec: Path, *, drift: float | None = None) -> Path:
    """The ONNX spec with model.reference (the tiny study's PyTorch model); with ``drift`` the graph
    is re-exported from a copy whose weights are perturbed by that relative scale."""
    from auditkit.fixtures.artefacts import drifted_module

    root = spec.parent
    if drift is not None:
        source = load_spec(root / "audit.yaml")
        module = build_module(source.model, source.base_dir, source.weights_path)
        export_onnx(drifted_module(module, scale=drift, seed=2), root / "model.onnx", (1, 16, 16))
    raw = yaml.safe_load(spec.read_text())
    raw["model"]["reference"] = {
        "factory": "tiny_model:build",
        "factory_kwargs": {"num_classes": 2},
        "weights": "weights.safetensors",
    }
    raw["only"] = ["parity", "performance"]
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


def _parity(spec: Path) -> dict[str, Any]:
    main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((spec.parent / "out-onnx" / "results.json").read_text())
    check = next(c for c in results["checks"] if c["id"] == "parity")
    assert check["status"] == "ok", check.get("error")
    return {"results": results, "check": check, "rules": {r["id"]: r for r in results["rules"]}}


def _direct(spec: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eval images' probabilities from onnxruntime and from torch, called directly, and rows."""
    import onnxruntime

    from auditkit.data import load_dataset

    audit = load_spec(spec)
    data = load_dataset(audit, roles=["eval"]).splits["eval"]
    images = (data.images.float() - 0.5) / 0.25
    session = onnxruntime.InferenceSession(str(spec.parent / "model.onnx"), providers=["CPUExecutionProvider"])
    artefact = session.run(["logits"], {"image": images.numpy()})[0]
    source = load_spec(spec.parent / "audit.yaml")
    with torch.no_grad():
        reference = build_module(source.model, source.base_dir, source.weights_path)(images).numpy()
    softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    return softmax(artefact), softmax(reference), np.asarray(data.rows)


def test_a_faithful_export_agrees_and_passes_the_parity_rules(tmp_path: Path) -> None:
    judged = _parity(_with_reference(_onnx_study(tmp_path)))
    metrics = {(m["name"], json.dumps(m["labels"], sort_keys=True)): m for m in judged["check"]["metrics"]}
    assert metrics["parity.agreement", "{}"]["value"] == 1.0
    assert metrics["parity.max_prob_diff", "{}"]["value"] < 1e-4
    for name in ("accuracy", "balanced_accuracy", "auroc"):
        assert abs(metrics["parity.metric_delta", json.dumps({"metric": name})]["value"]) < 1e-9
    assert {r: judged["rules"][r]["status"] for r in ("PARITY-AGREEMENT", "PARITY-PROB-DIFF")} == {
        "PARITY-AGREEMENT": "pass",
        "PARITY-PROB-DIFF": "pass",
    }
    # The reference's pass ran once over the eval split, counted apart from the artefact's.
    model = judged["results"]["model"]
    assert model["reference"]["images_forwarded_per_split"] == {
        "reference:eval": model["reference"]["images_forwarded"]
    }
    assert model["reference"]["factory"] == "tiny_model:build"


def test_a_drifted_export_is_caught_and_its_flips_are_those_of_a_direct_comparison(tmp_path: Path) -> None:
    spec = _with_reference(_onnx_study(tmp_path), drift=1.0)  # 1 of the 16 eval decisions flips
    judged = _parity(spec)
    artefact, reference, rows = _direct(spec)
    flipped = artefact.argmax(1) != reference.argmax(1)
    assert flipped.any(), "the drift must change some decisions for this test to mean anything"
    metrics = {(m["name"], json.dumps(m["labels"], sort_keys=True)): m for m in judged["check"]["metrics"]}
    assert metrics["parity.agreement", "{}"]["value"] == pytest.approx(1.0 - flipped.mean())
    assert metrics["parity.max_prob_diff", "{}"]["value"] == pytest.approx(
        float(np.abs(artefact - reference).max()), abs=1e-5
    )
    finding = next(f for f in judged["check"]["findings"] if f["kind"] == "flipped_rows")
    assert finding["count"] == int(flipped.sum())
    assert [r["row"] for r in finding["rows"]] == [int(r) for r in rows[flipped]]
    assert judged["rules"]["PARITY-AGREEMENT"]["status"] == "fail"
    for group in ("F", "M"):  # agreement per subgroup, labelled by the group column
        assert ("parity.agreement", json.dumps({"group": group, "group_by": "sex"})) in metrics


def test_without_a_reference_the_parity_check_and_rules_do_not_apply(tmp_path: Path) -> None:
    spec = _onnx_study(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["only"] = ["parity", "performance"]
    spec.write_text(yaml.safe_dump(raw))
    main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((tmp_path / "out-onnx" / "results.json").read_text())
    parity = next(c for c in results["checks"] if c["id"] == "parity")
    assert parity["status"] == "skipped" and "no model.reference" in parity["reason"]
    assert {"PARITY-AGREEMENT", "PARITY-METRIC-DELTA"} <= set(results["policy"]["not_applicable"]["rules"])


def test_a_reference_of_another_shape_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _with_reference(_onnx_study(tmp_path))
    raw = yaml.safe_load(spec.read_text())
    raw["model"]["reference"]["factory_kwargs"] = {"num_classes": 3}
    raw["model"]["reference"].pop("weights")
    spec.write_text(yaml.safe_dump(raw))
    err = _cli_error(spec, capsys)
    assert "model.reference: the model returns 3 logits per image but model.classes lists 2 classes" in err


# --------------------------------------------------------------------------------------------- attacks


def _adversarial(spec: Path, reference: bool) -> dict[str, Any]:
    if reference:
        _with_reference(spec)
    raw = yaml.safe_load(spec.read_text())
    raw["only"] = ["adversarial"]
    raw["checks"] = {"adversarial": {"n_samples": 8, "square_queries": 20, "n_boot": 0}}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((spec.parent / "out-onnx" / "results.json").read_text())
    check = next(c for c in results["checks"] if c["id"] == "adversarial")
    assert check["status"] == "ok", (check.get("reason"), check.get("error"))
    return check


def test_without_a_reference_the_artefact_is_attacked_black_box(tmp_path: Path) -> None:
    check = _adversarial(_onnx_study(tmp_path), reference=False)
    mode = next(f for f in check["findings"] if f["kind"] == "attack_mode")
    assert mode["mode"] == "black-box" and mode["attacks"] == ["square"] and "fgsm" in mode["not_run"]
    attacked = {m["labels"]["attack"] for m in check["metrics"] if m["name"] == "adversarial.robust_accuracy"}
    assert attacked == {"square"}
    masking = next(m for m in check["metrics"] if m["name"] == "adversarial.gradient_masking_suspected")
    assert masking["value"] is None and "black-box" in masking["reason"]


def test_with_a_reference_attacks_are_crafted_on_it_and_judged_on_the_artefact(tmp_path: Path) -> None:
    from auditkit.checks.adversarial.attacks import AttackConfig, still_correct

    spec = _onnx_study(tmp_path)
    check = _adversarial(spec, reference=True)
    mode = next(f for f in check["findings"] if f["kind"] == "attack_mode")
    assert mode["mode"] == "transfer" and "fgsm" in mode["transfer_attacks"]
    robust = {
        (m["labels"]["attack"], m["labels"]["eps"]): m["value"]
        for m in check["metrics"]
        if m["name"] == "adversarial.robust_accuracy"
    }
    assert ("fgsm", "0.0078") in robust
    # A faithful export judges what the reference would: the transfer attack equals the white-box one.
    source = load_spec(tmp_path / "audit.yaml")
    module = build_module(source.model, source.base_dir, source.weights_path)
    adapter = ModelAdapter.from_module(module, classes=["dark", "bright"], mean=[0.5], std=[0.25])
    onnx_adapter = ModelAdapter(load_spec(spec))
    images, labels = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 0, 1, 0, 1])
    config = AttackConfig()
    white = still_correct(adapter.module, images, labels, "fgsm", 8 / 255, config, seed=0, batch_size=8)
    transfer = still_correct(
        adapter.module, images, labels, "fgsm", 8 / 255, config, seed=0, batch_size=8, judge=onnx_adapter.module
    )
    assert torch.equal(white, transfer)


def test_a_torchscript_artefact_gets_the_same_parity_path(tmp_path: Path) -> None:
    torch_spec = make_tiny_study(tmp_path)
    source = load_spec(torch_spec)
    module = build_module(source.model, source.base_dir, source.weights_path).eval()
    torch.jit.trace(module, torch.rand(2, 1, 16, 16)).save(str(tmp_path / "model.pt"))  # type: ignore[no-untyped-call]
    raw = yaml.safe_load(torch_spec.read_text())
    reference = {"factory": raw["model"].pop("factory"), "factory_kwargs": raw["model"].pop("factory_kwargs")}
    reference["weights"] = raw["model"]["weights"]
    raw["model"].update({"weights": "model.pt", "trust_code": True, "reference": reference})
    raw["only"] = ["parity"]
    raw["output"] = "out-onnx"
    spec = tmp_path / "audit-script.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    judged = _parity(spec)
    metrics = {m["name"]: m for m in judged["check"]["metrics"] if not m["labels"]}
    assert metrics["parity.agreement"]["value"] == 1.0 and metrics["parity.max_prob_diff"]["value"] < 1e-6
    assert judged["results"]["model"]["reference"]["images_forwarded"] == judged["check"]["metrics"][0]["n"]


def test_the_artefact_demo_writes_a_faithful_and_a_drifted_export_with_their_specs(tmp_path: Path) -> None:
    from auditkit.fixtures.artefacts import write_artefact_demo

    specs = write_artefact_demo(tmp_path, n_patients=40)
    assert set(specs) == {"faithful", "drifted"}
    difference = {}
    for name, spec in specs.items():
        raw = yaml.safe_load(spec.read_text())
        assert raw["model"]["weights"] == f"{name}.onnx" and raw["model"]["reference"]["factory"]
        main(["run", str(spec), "--only", "parity", "--quiet", "--no-pdf"])
        results = json.loads((spec.parent / f"audit-{name}" / "results.json").read_text())
        check = next(c for c in results["checks"] if c["id"] == "parity")
        difference[name] = next(m["value"] for m in check["metrics"] if m["name"] == "parity.max_prob_diff")
    assert difference["faithful"] < 1e-4 < difference["drifted"]


def _artefact_spec(
    source: Path, onnx_file: str, *, reference: bool = True, output: str | None = "out-onnx", target: Path | None = None
) -> Path:
    """``source``'s spec auditing ``onnx_file`` instead of its PyTorch model, which becomes
    ``model.reference`` (the module-name ``feature_layer`` dropped: graph values are named otherwise)."""
    raw = yaml.safe_load(source.read_text())
    model = raw["model"]
    origin = {"factory": model.pop("factory"), "factory_kwargs": model.pop("factory_kwargs", {})}
    origin["weights"] = model["weights"]
    if reference:
        model["reference"] = origin
    model["weights"] = onnx_file
    model.pop("feature_layer", None)
    if output is not None:
        raw["output"] = output
    path = target or source
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_parity_of_a_segmentation_export_is_per_voxel(tmp_path: Path) -> None:
    from auditkit.fixtures.segmentation import generate_segmentation_study, write_segmentation_spec

    generate_segmentation_study(tmp_path, n_patients=24)
    source = write_segmentation_spec(tmp_path, "clean", checks={"parity": {"n_boot": 50}})
    spec = load_spec(source)
    module = build_module(spec.model, spec.base_dir, spec.weights_path)
    export_onnx(module, tmp_path / "unet.onnx", (1, spec.model.input.height, spec.model.input.width))
    judged = _parity(_artefact_spec(source, "unet.onnx", target=tmp_path / "audit-onnx.yaml"))
    metrics = {(m["name"], json.dumps(m["labels"], sort_keys=True)): m for m in judged["check"]["metrics"]}
    assert metrics["parity.agreement", "{}"]["value"] == 1.0  # every voxel decided alike
    assert metrics["parity.max_prob_diff", "{}"]["value"] < 1e-4
    assert abs(metrics["parity.metric_delta", json.dumps({"metric": "mean_dice"})]["value"]) < 1e-9
    finding = next(f for f in judged["check"]["findings"] if f["kind"] == "flipped_rows")
    assert finding["count"] == 0 and finding["unit"] == "cases with a voxel decided otherwise"


def _task_export(root: Path, task: str, *, reference: bool = True) -> Path:
    """A multi-label or regression fixture model exported to ONNX, with a spec auditing the export
    (and naming the PyTorch model as its reference)."""
    if task == "multilabel":
        from auditkit.fixtures.multilabel import generate_multilabel_study as generate
        from auditkit.fixtures.multilabel import write_multilabel_spec as write
    else:
        from auditkit.fixtures.regression import generate_regression_study as generate
        from auditkit.fixtures.regression import write_regression_spec as write
    generate(root, n_patients=30)
    source = write(root, "fair" if task == "regression" else "clean", checks={"parity": {"n_boot": 50}})
    spec = load_spec(source)
    module = build_module(spec.model, spec.base_dir, spec.weights_path)
    export_onnx(module, root / "model.onnx", (1, spec.model.input.height, spec.model.input.width))
    return _artefact_spec(source, "model.onnx", reference=reference, target=root / "audit-onnx.yaml")


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_parity_of_multilabel_and_regression_exports(tmp_path: Path, task: str) -> None:
    artefact = _task_export(tmp_path, task)
    judged = _parity(artefact)
    metrics = {(m["name"], json.dumps(m["labels"], sort_keys=True)): m for m in judged["check"]["metrics"]}
    if task == "multilabel":  # each label's decision at its threshold
        assert metrics["parity.agreement", "{}"]["value"] == 1.0
        assert abs(metrics["parity.metric_delta", json.dumps({"metric": "macro_auroc"})]["value"]) < 1e-6
    else:  # no decision to agree on: the difference is in the output's unit
        assert metrics["parity.agreement", "{}"]["value"] is None
        assert abs(metrics["parity.metric_delta", json.dumps({"metric": "mae"})]["value"]) < 1e-4
        difference = next(f for f in judged["check"]["findings"] if f["kind"] == "output_difference")
        assert max(difference["largest_absolute"].values()) < 1e-3


def test_a_regression_artefact_is_attacked_through_its_reference_or_skipped_without_one(tmp_path: Path) -> None:
    for reference in (True, False):
        spec = _task_export(tmp_path / str(reference), "regression", reference=reference)
        raw = yaml.safe_load(spec.read_text())
        raw["checks"] = {"adversarial": {"n_samples": 6, "n_boot": 0}}
        raw["only"] = ["adversarial"]
        spec.write_text(yaml.safe_dump(raw, sort_keys=False))
        main(["run", str(spec), "--quiet", "--no-pdf"])
        results = json.loads((spec.parent / "out-onnx" / "results.json").read_text())
        check = next(c for c in results["checks"] if c["id"] == "adversarial")
        if reference:
            assert check["status"] == "ok", check.get("error")
            assert next(f for f in check["findings"] if f["kind"] == "attack_mode")["mode"] == "transfer"
            assert any(m["name"] == "adversarial.robust_mae" and m["value"] is not None for m in check["metrics"])
        else:
            assert check["status"] == "skipped" and "crafted on model.reference" in check["reason"]


def test_a_backdoored_artefact_is_found_through_its_reference(tmp_path: Path) -> None:
    from auditkit.fixtures.population import (
        PACKAGED,
        PACKAGED_WEIGHTS,
        load_member_model,
        member_dataset,
        write_member_spec,
    )

    member = PACKAGED["population_chest3_poisoned"]
    dataset = member_dataset(member)
    source = write_member_spec(member, dataset, PACKAGED_WEIGHTS["population_chest3_poisoned"], tmp_path)
    module = load_member_model(member, PACKAGED_WEIGHTS["population_chest3_poisoned"])
    export_onnx(module, tmp_path / "model.onnx", (1, 32, 32))
    main(["run", str(_artefact_spec(source, "model.onnx", output=None)), "--quiet", "--no-pdf"])
    results = json.loads((tmp_path / "audit-out" / "results.json").read_text())
    check = next(c for c in results["checks"] if c["id"] == "backdoor")
    assert check["status"] == "ok", check.get("error")
    suspected = next(m for m in check["metrics"] if m["name"] == "backdoor.model_suspected")
    assert suspected["value"] == 1.0
    targets = [f["class"] for f in check["findings"] if f["kind"] == "suspected_target"]
    assert targets == [member.classes[member.attack.target]]  # type: ignore[union-attr]
    searches = [f for f in check["findings"] if f["kind"] == "trigger_search" and f["searched"]]
    assert searches and all(f["searched_on"].startswith("model.reference") for f in searches)
