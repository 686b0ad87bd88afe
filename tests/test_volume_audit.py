"""3-D inputs (``model.input.depth``) through the spec, the loader, the model adapter, the runner
and every check: volumes decode to ``(N, C, D, H, W)`` with their spacing, each volume is
forwarded once, checks written for 2-D images are skipped with a reason naming 3-D volumes, and
the checks that measure volumes give numbers that hold up (attacks within their budget, a copied
volume found as a duplicate, an identifier in one slice of a series found)."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from auditkit.check import Check, Skip
from auditkit.checks.adversarial.attacks import AttackConfig, DepthAsChannels, as_images, build_attack
from auditkit.checks.ood.sets import synthetic_shift
from auditkit.cli import main
from auditkit.decode import decode_volume_image
from auditkit.errors import ConfigError
from auditkit.spec import parse_spec

DEPTH, SIDE = 8, 16
STORED = (12, 24, 24)
MODEL = textwrap.dedent(
    '''
    import torch
    from torch import nn


    def blob_net() -> nn.Module:
        """Calls a volume positive when its brightest 3x3x3 neighbourhood is bright (fixed weights)."""
        model = nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool3d(1),
            nn.Flatten(),
            nn.Linear(2, 2),
        )
        with torch.no_grad():
            model[0].weight.zero_()
            model[0].weight[0].fill_(1.0 / 27)
            model[0].weight[1].fill_(-1.0 / 27)
            model[0].bias.copy_(torch.tensor([0.0, 1.0]))
            model[4].weight.copy_(torch.tensor([[-20.0, 0.0], [20.0, 0.0]]))
            model[4].bias.copy_(torch.tensor([11.0, -11.0]))
        return model


    def flat_net() -> nn.Module:
        """A 2-D image model: Conv2d first."""
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    '''
)


def _volume(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """Noise over a patient's own smooth anatomy (a few broad bumps), and a bright box if positive."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in STORED], indexing="ij"), axis=-1).astype(np.float32)
    volume = rng.normal(0.3, 0.02, STORED).astype(np.float32)
    for _ in range(4):
        centre, width = rng.uniform(0, STORED), rng.uniform(3, 8)
        volume += rng.uniform(-0.15, 0.15) * np.exp(-(((grid - centre) / width) ** 2).sum(axis=-1))
    if positive:
        d, h, w = rng.integers(2, 8), rng.integers(4, 16), rng.integers(4, 16)
        volume[d : d + 4, h : h + 6, w : w + 6] = 0.85
    return np.clip(volume, 0.0, 1.0)


def write_study(root: Path, *, n: int = 24, spacing: tuple[float, float, float] | None = None) -> Path:
    """``n`` ``.npy`` volumes (half positive), patients, sex and site, a spec for :data:`MODEL`."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "volnets.py").write_text(MODEL)
    rows = []
    for i in range(n):
        np.save(root / f"v{i:02d}.npy", _volume(rng, positive=i % 2 == 1))
        rows.append(
            {
                "path": f"v{i:02d}.npy",
                "label": ["none", "nodule"][i % 2],
                "patient_id": f"patient-{i}",
                "sex": "F" if i % 3 else "M",
                "site": "A" if i % 4 < 2 else "B",
                "split": "test" if i < n * 2 // 3 else "train",
            }
        )
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = {
        "model": {
            "factory": "volnets:blob_net",
            "classes": ["none", "nodule"],
            "input": {"channels": 1, "depth": DEPTH, "height": SIDE, "width": SIDE},
        },
        "data": {
            "root": ".",
            "manifest": "manifest.csv",
            "splits": {"eval": "test", "train": "train"},
            "groups": {"sex": {}, "site": {}},
        },
        "seed": 0,
        "device": "cpu",
        "output": "out",
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def volume_audit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One audit of the 3-D study with every check (adversarial on a small sample)."""
    spec = write_study(tmp_path_factory.mktemp("volumes"))
    text = yaml.safe_load(spec.read_text())
    text["checks"] = {"adversarial": {"n_samples": 8, "sanity_checks": False}}
    spec.write_text(yaml.safe_dump(text))
    code = main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((spec.parent / "out" / "results.json").read_text())
    return {"code": code, "results": results, "checks": {c["id"]: c for c in results["checks"]}}


# --------------------------------------------------------------------------------------------- spec


def test_input_depth_makes_the_spec_3d(tmp_path: Path) -> None:
    spec = parse_spec(yaml.safe_load(write_study(tmp_path).read_text()), base_dir=tmp_path, source="audit.yaml")
    assert spec.spatial_dims == 3
    assert spec.model.input.shape == (1, DEPTH, SIDE, SIDE)
    raw = yaml.safe_load((tmp_path / "audit.yaml").read_text())
    raw["model"]["input"]["depth"] = 0
    with pytest.raises(ConfigError, match="depth"):
        parse_spec(raw, base_dir=tmp_path, source="audit.yaml")


def test_a_2d_model_given_volumes_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_study(tmp_path, n=6)
    raw = yaml.safe_load(spec.read_text())
    raw["model"]["factory"] = "volnets:flat_net"
    spec.write_text(yaml.safe_dump(raw))
    assert main(["run", str(spec), "--quiet", "--no-pdf"]) == 2
    err = capsys.readouterr().err
    assert "is 2-D: it expects images (N, C, H, W)" in err and "Remove model.input.depth" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------- loader


def test_volumes_are_resampled_to_the_input_with_their_spacing(tmp_path: Path) -> None:
    array = np.linspace(0.0, 1.0, np.prod(STORED), dtype=np.float32).reshape(STORED)
    np.save(tmp_path / "v.npy", array)
    decoded = decode_volume_image(tmp_path / "v.npy", channels=3, depth=DEPTH, height=SIDE, width=SIDE)
    assert decoded.pixels.shape == (3, DEPTH, SIDE, SIDE)
    assert decoded.pixels.dtype == np.float32
    np.testing.assert_array_equal(decoded.pixels[0], decoded.pixels[2])  # grey repeated to 3 channels
    # .npy carries no spacing: 1 mm voxels, scaled by stored / input size along each axis.
    assert decoded.spacing == pytest.approx((STORED[0] / DEPTH, STORED[1] / SIDE, STORED[2] / SIDE))
    assert float(decoded.pixels.min()) >= 0.0 and float(decoded.pixels.max()) <= 1.0


def test_the_audit_reads_volumes_once_and_records_their_spacing(volume_audit: dict[str, Any]) -> None:
    results = volume_audit["results"]
    assert results["model"]["input"]["depth"] == DEPTH
    assert results["model"]["preflight"]["input_shape"] == [2, 1, DEPTH, SIDE, SIDE]
    eval_split = results["data"]["splits"]["eval"]
    assert eval_split["n_images"] == 16 and eval_split["n_quarantined"] == 0
    assert eval_split["volumes"]["kinds"] == {"npy": 16}
    assert eval_split["volumes"]["spacing_mm"]["median"] == pytest.approx([1.5, 1.5, 1.5])
    per_split = results["run"]["images_forwarded_per_split"]
    assert per_split["eval"] == 16 and per_split["train"] == 8  # one forward pass per volume
    assert results["run"]["images_decoded"] == 24


# --------------------------------------------------------------------------------------------- checks


def test_checks_for_2d_images_are_skipped_with_a_reason_naming_volumes(volume_audit: dict[str, Any]) -> None:
    checks = volume_audit["checks"]
    assert checks["backdoor"]["status"] == "skipped"
    assert "check 'backdoor' does not measure 3-D volumes (model.input.depth)" in checks["backdoor"]["reason"]
    for check_id in ("performance", "calibration", "bias", "ood", "leakage", "adversarial", "phi", "corruption"):
        assert checks[check_id]["status"] == "ok", (check_id, checks[check_id]["error"])


def test_volumes_are_corrupted_by_3d_acquisition_artefacts(volume_audit: dict[str, Any]) -> None:
    corruption = volume_audit["checks"]["corruption"]
    run = {m["labels"]["corruption"] for m in corruption["metrics"] if m["name"] == "corruption.accuracy"}
    # .npy volumes carry no modality: every artefact runs.
    assert run == {"none", "mr_motion", "mr_ghosting", "mr_spike", "mr_bias_field", "ct_noise", "slice_thickness"}
    setup = next(f for f in corruption["findings"] if f["kind"] == "corruption_setup")
    assert setup["modalities"] == {"unknown": 16}
    assert setup["corruptions"]["slice_thickness"]["thickness_mm"]["2"] == [3.0, 3.0]  # 2 x 1.5 mm
    rules = {r["id"]: r for r in volume_audit["results"]["rules"]}
    assert rules["COR-CT-LOW-DOSE"]["status"] in ("pass", "fail")  # judged on volumes
    assert "COR-LOW-DOSE" not in rules  # a 2-D rule: not applicable
    assert "COR-LOW-DOSE" in volume_audit["results"]["policy"]["not_applicable"]["rules"]


def test_the_volume_model_is_measured(volume_audit: dict[str, Any]) -> None:
    metrics = {m["name"]: m for m in volume_audit["checks"]["performance"]["metrics"] if not m["labels"]}
    assert metrics["performance.auroc"]["value"] == pytest.approx(1.0)  # the blobs are easy
    ood = volume_audit["checks"]["ood"]
    sets = {f["ood_set"]: f for f in ood["findings"] if f.get("kind") == "ood_set"}
    assert sets["builtin:noise"]["n_images"] > 0
    assert sets["builtin:other_modality"]["n_images"] == 0  # 2-D slices: not a volume model's input
    reasons = [m["reason"] for m in ood["metrics"] if m["labels"].get("ood_set") == "builtin:other_modality"]
    assert reasons and all("3-D" in r for r in reasons)


def test_a_2d_only_check_declares_why() -> None:
    class Flat(Check):  # type: ignore[type-arg]
        id = "flat"
        family = "test"
        tasks = ("classification",)

    assert Flat.refusal("flat", "classification", 2) is None
    refusal = Flat.refusal("flat", "classification", 3)
    assert refusal == "check 'flat' does not measure 3-D volumes (model.input.depth); it measures 2-D images"
    assert Flat.refusal("flat", "regression", 3) is not None and "task: regression" in str(
        Flat.refusal("flat", "regression", 3)
    )


def test_attacks_on_volumes_are_the_attacks_on_every_voxel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 2)).eval()
    volumes = torch.rand(4, 1, 6, 10, 10)
    labels = torch.tensor([0, 1, 0, 1])
    wrapped, images = as_images(model, volumes)
    assert isinstance(wrapped, DepthAsChannels) and images.shape == (4, 6, 10, 10)
    torch.testing.assert_close(wrapped(images), model(volumes))  # a reshape: the same logits
    config = AttackConfig(pgd_steps=5, pgd_step_size=2.5, random_start=False)
    for name, eps, norm in (("pgd_l2", 0.5, 2), ("pgd_linf", 4 / 255, float("inf")), ("fgsm", 4 / 255, float("inf"))):
        adversarial = build_attack(name, wrapped, eps, config)(images, labels)
        delta = (adversarial - images).reshape(4, -1)
        assert float(delta.norm(p=norm, dim=1).max()) <= eps + 1e-5, name
        assert float(delta.abs().max()) > 0, name
    # FGSM's step is eps times the sign of the volume's own input gradient.
    x = volumes.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), labels), x)
    fgsm = build_attack("fgsm", wrapped, 4 / 255, config)(images, labels).reshape(volumes.shape)
    expected = (volumes + 4 / 255 * gradient.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm, expected)


def test_ood_shifts_keep_the_volume_shape() -> None:
    volumes = torch.rand(3, 1, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    for name in ("noise", "inverted", "blank", "corrupted"):
        shifted = synthetic_shift(name, volumes, generator)
        assert shifted.shape == volumes.shape, name
    blank = synthetic_shift("blank", volumes, generator)
    assert [float(v.unique().numel()) for v in blank] == [1.0, 1.0, 1.0]


def test_a_copied_volume_is_an_exact_duplicate_and_a_re_toned_copy_a_near_duplicate(tmp_path: Path) -> None:
    spec = write_study(tmp_path, n=24)
    (tmp_path / "v16.npy").write_bytes((tmp_path / "v00.npy").read_bytes())  # a train copy of eval row 0
    np.save(tmp_path / "v17.npy", np.load(tmp_path / "v01.npy") ** 0.8)  # eval row 1 under a tone curve
    raw = yaml.safe_load(spec.read_text())
    raw["only"] = ["leakage"]
    spec.write_text(yaml.safe_dump(raw))
    main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    leakage = next(c for c in results["checks"] if c["id"] == "leakage")
    by_name = {(m["name"], m["labels"].get("split")): m for m in leakage["metrics"]}
    assert by_name["leakage.exact_duplicates", None]["value"] == 1.0
    exact = [f for f in leakage["findings"] if f["kind"] == "exact_duplicate"]
    assert exact and exact[0]["train_rows"] == [16] and exact[0]["eval_rows"] == [0]  # manifest rows
    assert by_name["leakage.near_duplicates", None]["value"] == 1.0
    near = [f for f in leakage["findings"] if f["kind"] == "near_duplicate"]
    assert [(f["train_row"], f["eval_row"]) for f in near] == [(17, 1)], near
    assert (
        by_name["leakage.near_duplicates", "train"]["value"] == by_name["leakage.near_duplicates", "eval"]["value"] == 0
    )
    search = next(f for f in leakage["findings"] if f["kind"] == "duplicate_search")
    assert "axial slices [0, 1, 2, 3, 4, 5, 6, 7] of 8" in search["fingerprint"], search
    assert search["slices_registered"] >= 0 and "images_registered" not in search


def test_skip_reasons_are_not_errors_for_a_third_party_check() -> None:
    class Flat(Check):  # type: ignore[type-arg]
        id = "third_party"
        family = "test"

        def run(self, ctx: Any, params: Any) -> Any:  # pragma: no cover - never run on volumes
            raise Skip("unreachable")

    assert Flat.spatial_dims == (2,)  # a check not written for volumes is never run on them


# --------------------------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from auditkit.fixtures.volumes import generate_volume_study

    root = tmp_path_factory.mktemp("ct")
    generate_volume_study(root, n_patients=72, seed=0)
    return root


def _judged(root: Path, variant: str) -> dict[str, Any]:
    from auditkit.fixtures.volumes import write_volume_spec

    checks = {"bias": {"min_group_size": 10}, "performance": {}, "phi": {}}
    spec = write_volume_spec(root, variant, checks=checks)
    code = main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((root / f"audit-{variant}" / "results.json").read_text())
    failed = {(r["id"], r["labels"].get("group_by")) for r in results["rules"] if r["status"] == "fail"}
    return {"code": code, "results": results, "failed": failed, "checks": {c["id"]: c for c in results["checks"]}}


def test_the_ct_fixture_planted_site_fails_the_bias_rule_and_its_fair_twin_passes(ct_study: Path) -> None:
    biased, fair = _judged(ct_study, "biased"), _judged(ct_study, "fair")
    assert ("BIAS-SENS-GAP", "site") in biased["failed"]
    assert not any(rule.startswith("BIAS-") for rule, _ in fair["failed"])
    eval_split = fair["results"]["data"]["splits"]["eval"]
    assert set(eval_split["volumes"]["kinds"]) == {"dicom-series", "nifti", "npy"}
    assert eval_split["n_quarantined"] == 0
    # DICOM series and NIfTI keep their anisotropic spacing (2.5 mm slices, 1.25 mm in plane,
    # resampled from 24 x 48 x 48 to 16 x 32 x 32); .npy volumes have none (1 mm stored voxels).
    assert eval_split["volumes"]["spacing_mm"]["median"] == pytest.approx([3.75, 1.875, 1.875])


def test_every_slice_of_every_series_is_judged_for_identifiers(ct_study: Path) -> None:
    phi = _judged(ct_study, "fair")["checks"]["phi"]
    slices = len(list(ct_study.rglob("*.dcm")))
    series = len({p.parent for p in ct_study.rglob("*.dcm")})
    metrics = {m["name"]: m for m in phi["metrics"]}
    assert metrics["phi.files_with_identifiers"]["n"] == slices and slices > series  # files, not volumes
    patient_id = next(f for f in phi["findings"] if f.get("keyword") == "PatientID")
    assert sum(len(rows) for rows in patient_id["rows"].values()) == series  # each series' row listed once
    assert patient_id["rows_truncated"] is False


def test_the_3d_segmentation_fixture_is_judged_on_dicom_series_with_nifti_masks(tmp_path: Path) -> None:
    from auditkit.fixtures.volumes import generate_volume_segmentation_study, write_volume_segmentation_spec

    generate_volume_segmentation_study(tmp_path)
    judged = {}
    for variant in ("biased", "clean"):
        spec = write_volume_segmentation_spec(
            tmp_path, variant, checks={"performance": {"n_boot": 200}, "bias": {"min_group_size": 5, "n_boot": 200}}
        )
        main(["run", str(spec), "--quiet", "--no-pdf"])
        judged[variant] = json.loads((tmp_path / f"audit-{variant}" / "results.json").read_text())
    biased, clean = judged["biased"], judged["clean"]
    assert biased["data"]["quarantine"] == [] and clean["data"]["quarantine"] == []  # every mask on its grid
    assert set(biased["data"]["splits"]["eval"]["volumes"]["kinds"]) == {"dicom-series", "nifti"}
    failed = {(r["id"], r["labels"].get("group_by")) for r in biased["rules"] if r["status"] == "fail"}
    assert ("SEG-DICE-GAP", "site") in failed  # the U-Net never saw site C
    assert not [r for r in clean["rules"] if r["id"].startswith("SEG-DICE-GAP") and r["status"] == "fail"]
    performance = next(c for c in clean["checks"] if c["id"] == "performance")
    hd95 = next(
        m for m in performance["metrics"] if m["name"] == "performance.hd95" and m["labels"] == {"class": "lung"}
    )
    # Distances in mm on the anisotropic grid (3.75 mm between model slices, 1.875 mm in plane).
    assert hd95["value"] is not None and hd95["value"] > 0
    spacing = clean["data"]["splits"]["eval"]["volumes"]["spacing_mm"]["median"]
    assert spacing == pytest.approx([3.75, 1.875, 1.875])
    # The worst cases are drawn on the slice holding most of each class's reference.
    overlay = next(a for a in performance["artifacts"] if a["name"] == "worst_case_overlays")
    svg = (tmp_path / "audit-clean" / overlay["path"]).read_text()
    assert svg.count("<image") == 6 and svg.count(", slice ") == 6  # 3 cases x (lung, nodule)


def test_map_series_headers_gives_every_slice_by_chunks_of_series_as_series_headers_does(ct_study: Path) -> None:
    """The PHI check's reads of a series split: every slice's header judged, in the series'
    order, the kept series here and the others by chunks of series through the mapper (Ray
    tasks on Ray), each series once; the same verdicts as reading them one after another."""
    import pickle

    from auditkit.checks.phi import _judged, judge_header
    from auditkit.context import AuditContext
    from auditkit.data import load_dataset
    from auditkit.fixtures.volumes import write_volume_spec
    from auditkit.model import ModelAdapter
    from auditkit.spec import load_spec

    spec = load_spec(write_volume_spec(ct_study, "fair", checks={"phi": {}}))
    dataset = load_dataset(spec, keep_headers=True)
    split = dataset.splits["eval"]
    assert split.slice_headers and "dicom-series" in split.kinds
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, ct_study / "out")
    expected = [tuple(None if h is None else judge_header(h) for h in slices) for slices in ctx.series_headers("eval")]
    sent: list[list[tuple[str, str]]] = []

    def elsewhere(work: Any, chunks: list[list[tuple[str, str]]]) -> Any:
        sent.extend(chunks)
        shipped = pickle.loads(pickle.dumps(work))
        return (pickle.loads(pickle.dumps(shipped(chunk))) for chunk in chunks)

    ctx.header_mapper, ctx.series_chunk = elsewhere, 3
    got = list(ctx.map_headers("eval", _judged, slices=True))
    assert got == expected
    assert sum(len(v) for v in got) > len(got)  # slices, not volumes
    series = [path for chunk in sent for path, kind in chunk if kind == "dicom-series"]
    unkept = [
        str(split.paths[i]) for i in range(split.n) if split.kinds[i] == "dicom-series" and i not in split.slice_headers
    ]
    assert sorted(series) == sorted(unkept) and len(set(series)) == len(series) and len(sent) > 1
    assert all(len(chunk) <= 3 for chunk in sent)
