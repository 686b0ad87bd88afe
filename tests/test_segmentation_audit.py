"""Segmentation models (``task: segmentation``) through the spec, the manifest's ``mask`` column,
the loader, the model adapter and the performance check: Dice, HD95 and NSD equal MONAI's on the
same maps, spacing is honoured, empty references are counted as MONAI's DiceMetric treats them,
a bad mask is quarantined with its reason, and checks that do not measure segmentation say so."""

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
from PIL import Image

from auditkit.cli import main
from auditkit.decode import decode_image
from auditkit.decode.labels import decode_label_image, resize_labels
from auditkit.errors import ConfigError, UnreadableImage
from auditkit.segmentation import case_figures
from auditkit.spec import parse_spec

SIDE = 32
MODEL = textwrap.dedent(
    '''
    import torch
    from torch import nn


    def threshold_net() -> nn.Module:
        """Calls a pixel foreground when it is brighter than mid-grey (fixed weights)."""
        model = nn.Sequential(nn.Conv2d(1, 2, 1))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1))
            model[0].bias.copy_(torch.tensor([10.0, -10.0]))
        return model
    '''
)


def _disc(centre: tuple[float, float], radius: float, size: int = SIDE) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) <= radius**2


def write_study(root: Path, *, n: int = 16) -> Path:
    """``n`` 8-bit PNG images of a bright disc (none in every fifth) with their label maps."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "segnets.py").write_text(MODEL)
    rows = []
    for i in range(n):
        mask = (
            np.zeros((SIDE, SIDE), dtype=bool) if i % 5 == 4 else _disc(tuple(rng.uniform(8, 24, 2)), rng.uniform(3, 7))
        )
        image = np.where(mask, 0.8, 0.2) + rng.normal(0, 0.05, mask.shape)
        if i % 2:  # the model undersegments these: a dim rim the threshold misses
            image[mask & ~_disc((SIDE / 2, SIDE / 2), 40)] = 0.8
            edge = mask & ~np.roll(mask, 1, axis=0)
            image[edge] = 0.45
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(root / f"img{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / f"mask{i:02d}.png")
        rows.append(
            {
                "path": f"img{i:02d}.png",
                "mask": f"mask{i:02d}.png",
                "patient_id": f"patient-{i // 2}",
                "site": "A" if i < n // 2 else "B",
                "split": "test" if i < n * 3 // 4 else "train",
            }
        )
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = {
        "model": {
            "task": "segmentation",
            "factory": "segnets:threshold_net",
            "classes": ["background", "lesion"],
            "input": {"channels": 1, "height": SIDE, "width": SIDE},
        },
        "data": {
            "root": ".",
            "manifest": "manifest.csv",
            "splits": {"eval": "test", "train": "train"},
            "groups": {"site": {}},
        },
        "seed": 0,
        "device": "cpu",
        "output": "out",
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, **update: Any) -> dict[str, Any]:
    raw = yaml.safe_load(spec.read_text())
    raw.update(update)
    spec.write_text(yaml.safe_dump(raw))
    code = main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((spec.parent / "out" / "results.json").read_text())
    return {"code": code, "results": results, "checks": {c["id"]: c for c in results["checks"]}}


@pytest.fixture(scope="module")
def segmentation_audit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("segmentation")
    checks = {
        "adversarial": {"n_samples": 8, "sanity_checks": False},
        "corruption": {"corruptions": ["gaussian_noise", "blur"], "severities": [1, 5]},
    }
    return {**_run(write_study(root), checks=checks), "root": root}


# ----------------------------------------------------------------------------------------- spec


def test_the_spec_accepts_segmentation_and_refuses_what_does_not_apply(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_study(tmp_path, n=2).read_text())
    spec = parse_spec(raw, base_dir=tmp_path, source="audit.yaml")
    assert spec.model.task == "segmentation"
    for key, value, expected in (
        ("classes", ["lesion"], "names its label values 0..K-1, background first"),
        ("operating_point", {"lesion": 0.5}, "decides each pixel by argmax"),
        ("claims", {"performance.auroc": 0.9}, "a claim is one of"),
        ("claims", {"performance.dice": 0.9}, "is per class: write {class: value}"),
        ("claims", {"performance.hd95": {"lesion": -1.0}}, "a distance in mm and cannot be negative"),
    ):
        bad = json.loads(json.dumps(raw))
        bad["model"][key] = value
        with pytest.raises(ConfigError) as info:
            parse_spec(bad, base_dir=tmp_path, source="audit.yaml")
        assert expected in str(info.value), (key, str(info.value))


# ----------------------------------------------------------------------------------------- masks

_LABELS = np.zeros((6, 8), dtype=np.uint8)
_LABELS[2:4, 2:6] = 2
LABEL_MAP_CASES: dict[str, tuple[Any, str]] = {
    "outside.png": (lambda p: Image.fromarray(_LABELS).save(p), "holds the value 2, outside the classes 0..1"),
    "colour.png": (lambda p: Image.new("RGB", (8, 6)).save(p), "colour"),
    "mask.jpg": (lambda p: Image.fromarray(_LABELS).save(p), "JPEG's lossy compression"),
    "half.npy": (lambda p: np.save(p, np.full((6, 8), 0.5)), "not integers"),
    "volume.npy": (lambda p: np.save(p, np.zeros((2, 6, 8), np.uint8)), "expected a 2-D (H, W) array"),
}
"""Crafted 2-D label maps, each refused with its reason (counted in docs/hardening.md)."""
AUDIT_MASK_CASES = 3
"""Label maps quarantined in a whole audit: of another size, holding an unknown class (2-D), and a
3-D map on another grid than its volume (counted in docs/hardening.md)."""


def test_label_maps_are_read_resized_by_nearest_neighbour_and_bad_ones_refused(tmp_path: Path) -> None:
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[2:4, 2:6] = 2
    Image.fromarray(labels).save(tmp_path / "ok.png")
    decoded = decode_label_image(tmp_path / "ok.png", num_classes=3)
    np.testing.assert_array_equal(decoded.labels, labels)
    resized = resize_labels(decoded.labels, 12, 16)
    assert set(np.unique(resized).tolist()) == {0, 2}  # copied, never interpolated
    np.testing.assert_array_equal(resized[::2, ::2], labels)
    for name, (write, expected) in LABEL_MAP_CASES.items():
        write(tmp_path / name)
        with pytest.raises(UnreadableImage) as info:
            decode_label_image(tmp_path / name, num_classes=2)
        assert expected in str(info.value), name
        assert str(tmp_path) not in str(info.value)


def test_a_bad_mask_quarantines_its_row_and_the_audit_goes_on(tmp_path: Path) -> None:
    spec = write_study(tmp_path)
    Image.fromarray(np.zeros((SIDE, SIDE + 4), dtype=np.uint8)).save(tmp_path / "mask00.png")  # wrong size
    Image.fromarray(np.full((SIDE, SIDE), 3, dtype=np.uint8)).save(tmp_path / "mask01.png")  # unknown class
    run = _run(spec, only=["performance"])
    reasons = {q["row"]: q["reason"] for q in run["results"]["data"]["quarantine"]}
    assert "mask: label map of size (32, 36) on an image of (32, 32)" in reasons[0]
    assert "mask: label map holds the value 3, outside the classes 0..1" in reasons[1]
    assert run["checks"]["performance"]["status"] == "ok"


# ----------------------------------------------------------------------------------------- metrics


def test_case_figures_are_monais_and_honour_anisotropic_spacing() -> None:
    from monai.metrics import compute_hausdorff_distance

    reference = np.zeros((3, 20, 20), dtype=np.int64)
    predicted = np.zeros_like(reference)
    reference[0, 5:10, 5:10] = 1
    predicted[0, 7:12, 5:10] = 1  # shifted two rows down
    reference[1, 4:8, 4:8] = 1  # the model misses it
    predicted[2, 2:4, 2:4] = 1  # an empty reference, segmented anyway
    iso = case_figures(predicted, reference, np.ones((3, 2)), 2, [1.0])
    aniso = case_figures(predicted, reference, np.tile([3.0, 0.5], (3, 1)), 2, [1.0])
    assert iso["dice"][:, 0] == pytest.approx([0.6, 0.0, np.nan], nan_ok=True)
    # The shift is along the rows: 2 px, which are 2 mm isotropic and 6 mm at 3 mm per row.
    assert iso["hd95"][0, 0] == pytest.approx(2.0) and aniso["hd95"][0, 0] == pytest.approx(6.0)
    assert np.isnan(iso["hd95"][1:, 0]).all()  # missed and empty-reference cases have no distance
    assert iso["nsd"][1:, 0] == pytest.approx([0.0, 0.0])  # one side empty: 0, as MONAI's NSD
    one_hot = [
        torch.nn.functional.one_hot(torch.as_tensor(m), 2).movedim(-1, 1).float() for m in (predicted, reference)
    ]
    monai_hd = compute_hausdorff_distance(*one_hot, include_background=False, percentile=95, spacing=(3.0, 0.5))
    assert aniso["hd95"][0, 0] == pytest.approx(float(monai_hd[0, 0]), abs=1e-6)


def test_the_audit_scores_segmentation_as_monai_does(segmentation_audit: dict[str, Any]) -> None:
    from monai.metrics import compute_dice

    performance = segmentation_audit["checks"]["performance"]
    assert performance["status"] == "ok"
    metrics = {m["name"]: m for m in performance["metrics"]}
    dice = metrics["performance.dice"]
    assert dice["labels"] == {"class": "lesion"} and dice["ci"][0] <= dice["value"] <= dice["ci"][1]
    assert metrics["performance.mean_dice"]["value"] == pytest.approx(dice["value"])
    assert metrics["performance.hd95"]["value"] > 0
    counts = next(f for f in performance["findings"] if f["kind"] == "case_counts")["classes"]["lesion"]
    assert counts["empty_reference"] == 2 and counts["cases_with_reference"] == 10  # rows 4 and 9 of 12 eval
    assert dice["n"] == counts["dice_defined"] == 10
    implementation = next(f for f in performance["findings"] if f["kind"] == "segmentation_metrics")
    assert implementation["implementation"].startswith("MONAI ")
    # The same figures from MONAI on the files themselves: decode, threshold (the model), score.
    root = segmentation_audit["root"]
    rows = list(csv.DictReader((root / "manifest.csv").read_text().splitlines()))[:12]
    pred = np.stack([decode_image(root / r["path"], channels=1, height=SIDE, width=SIDE).pixels[0] > 0.5 for r in rows])
    ref = np.stack([np.asarray(Image.open(root / r["mask"])) for r in rows])
    one_hot = [
        torch.nn.functional.one_hot(torch.as_tensor(m.astype(np.int64)), 2).movedim(-1, 1).float() for m in (pred, ref)
    ]
    expected = compute_dice(*one_hot, include_background=False, ignore_empty=True)[:, 0].numpy()
    assert dice["value"] == pytest.approx(float(np.nanmean(expected)), abs=1e-6)
    assert float(np.nanmin(expected)) < 0.9  # the dim rims make some cases imperfect: the mean is not trivial
    worst = next(f for f in performance["findings"] if f["kind"] == "worst_cases")["cases"]
    assert worst[0]["dice"] == pytest.approx(float(np.nanmin(expected)), abs=1e-6)


def test_the_worst_cases_are_drawn_by_row_never_by_patient(segmentation_audit: dict[str, Any]) -> None:
    performance = segmentation_audit["checks"]["performance"]
    artifact = next(a for a in performance["artifacts"] if a["name"] == "worst_case_overlays")
    svg = (segmentation_audit["root"] / "out" / artifact["path"]).read_text()
    worst = next(f for f in performance["findings"] if f["kind"] == "worst_cases")["cases"]
    for case in worst[:3]:  # the three lowest-Dice cases, titled by manifest row and Dice
        assert f"lesion: row {case['row']}, Dice {case['dice']:.2f}" in svg
    assert "patient-" not in svg  # the manifest's patient ids never reach the image
    assert svg.count("<image") == 3  # one image per drawn case


def test_checks_that_do_not_measure_segmentation_are_skipped_naming_the_task(
    segmentation_audit: dict[str, Any],
) -> None:
    from auditkit.registry import discover

    installed, _ = discover()
    measuring = {cid for cid, cls in installed.items() if "segmentation" in cls.tasks}
    assert {"performance", "corruption", "ood", "leakage", "phi"} <= measuring
    for check_id, check in segmentation_audit["checks"].items():
        if check_id == "parity":  # measures an exported artefact against model.reference; none here
            assert check["status"] == "skipped" and "no model.reference" in check["reason"]
            continue
        if check_id == "coverage" or check_id in measuring:
            assert check["status"] == "ok", (check_id, check["reason"], check["error"])
            continue
        assert check["status"] == "skipped", check_id
        assert "does not measure a segmentation model (task: segmentation)" in check["reason"], check_id
    data = segmentation_audit["results"]["data"]["splits"]["eval"]
    assert data["class_counts"]["lesion"]["images"] == 10


def test_corruption_measures_the_mean_dice_and_its_drop(segmentation_audit: dict[str, Any]) -> None:
    corruption = segmentation_audit["checks"]["corruption"]
    assert corruption["status"] == "ok"
    by_condition = {
        (m["labels"]["corruption"], m["labels"]["severity"]): m
        for m in corruption["metrics"]
        if m["name"] == "corruption.mean_dice"
    }
    performance = {m["name"]: m for m in segmentation_audit["checks"]["performance"]["metrics"]}
    # Every eval case is sampled, so the clean mean Dice is the performance check's.
    assert by_condition["none", "0"]["value"] == pytest.approx(performance["performance.mean_dice"]["value"], abs=1e-12)
    drops = {
        (m["labels"]["corruption"], m["labels"]["severity"]): m
        for m in corruption["metrics"]
        if m["name"] == "corruption.relative_drop"
    }
    worst = drops["gaussian_noise", "5"]  # a threshold at mid-grey flips noisy pixels
    assert worst["value"] > 0 and worst["ci"][0] > 0
    assert by_condition["gaussian_noise", "5"]["value"] < by_condition["gaussian_noise", "1"]["value"]


def test_pixel_pooled_ood_scores_average_over_the_predicted_foreground() -> None:
    from auditkit.checks.ood.detectors import pixel_pooled_score

    rng = np.random.default_rng(3)
    logits = torch.as_tensor(rng.normal(0, 2, (3, 3, 5, 6)))
    logits[1, 0] += 50  # background everywhere: pooled over every pixel
    logits[2, 1, 0, 0] = float("nan")
    z = logits.numpy().astype(np.float64)
    for detector in ("msp", "max_logit", "energy"):
        scores = pixel_pooled_score(detector, logits)
        for i in range(2):
            lse = np.log(np.exp(z[i]).sum(axis=0))
            pixel = {"msp": np.exp(z[i].max(axis=0) - lse), "max_logit": z[i].max(axis=0), "energy": lse}[detector]
            foreground = z[i].argmax(axis=0) != 0
            expected = pixel[foreground].mean() if foreground.any() else pixel.mean()
            assert scores[i] == pytest.approx(expected, rel=1e-9), (detector, i)
        assert np.isnan(scores[2])


def test_ood_scores_a_segmentation_model_and_says_how_its_scores_track_the_dice(
    segmentation_audit: dict[str, Any],
) -> None:
    ood = segmentation_audit["checks"]["ood"]
    assert ood["status"] == "ok"
    auroc = {(m["labels"]["detector"], m["labels"]["ood_set"]): m for m in ood["metrics"] if m["name"] == "ood.auroc"}
    assert auroc["msp", "builtin:noise"]["value"] > 0.9  # noise makes the threshold model unsure of its foreground
    association = next(f for f in ood["findings"] if f["kind"] == "dice_association")
    assert association["cases"] == 10 and set(association["detectors"]) >= {"msp", "max_logit", "energy"}
    selective = next(m for m in ood["metrics"] if m["name"] == "ood.selective_accuracy")
    assert selective["value"] is None and "task: segmentation" in selective["reason"]
    scores = next(f for f in ood["findings"] if f["kind"] == "ood_scores")
    assert "foreground" in scores["scores"]["msp"]


# ----------------------------------------------------------------------------------------- volumes

MODEL_3D = textwrap.dedent(
    """
    import torch
    from torch import nn


    def threshold_net_3d() -> nn.Module:
        model = nn.Sequential(nn.Conv3d(1, 2, 1))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1, 1))
            model[0].bias.copy_(torch.tensor([10.0, -10.0]))
        return model
    """
)
VOLUME = (16, 24, 24)


def write_volume_study(root: Path, *, n: int = 6) -> Path:
    """``n`` NIfTI volumes of a bright ball (2 mm slices, 1 mm in plane) with NIfTI label maps."""
    import nibabel as nib

    rng = np.random.default_rng(5)
    root.mkdir(parents=True, exist_ok=True)
    (root / "segnets3d.py").write_text(MODEL_3D)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # (i, j, k) = (W, H, D) as stored: 1 mm, 1 mm, 2 mm
    rows = []
    for i in range(n):
        d, h, w = np.mgrid[: VOLUME[0], : VOLUME[1], : VOLUME[2]]
        centre = rng.uniform([5, 8, 8], [11, 16, 16])
        mask = ((d - centre[0]) * 2) ** 2 + (h - centre[1]) ** 2 + (w - centre[2]) ** 2 <= rng.uniform(16, 36)
        image = np.where(mask, 0.8, 0.2) + rng.normal(0, 0.03, VOLUME)
        # NIfTI stores (i, j, k) = (W, H, D).
        nib.save(nib.Nifti1Image(np.transpose(image, (2, 1, 0)).astype(np.float32), affine), root / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(np.transpose(mask, (2, 1, 0)).astype(np.uint8), affine), root / f"m{i}.nii.gz")
        rows.append({"path": f"v{i}.nii.gz", "mask": f"m{i}.nii.gz", "patient_id": f"p{i}", "split": "test"})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = {
        "model": {
            "task": "segmentation",
            "factory": "segnets3d:threshold_net_3d",
            "classes": ["background", "ball"],
            "input": {"channels": 1, "depth": VOLUME[0], "height": VOLUME[1], "width": VOLUME[2]},
            "sliding_window": {"roi": [8, 16, 16], "overlap": 0.5, "mode": "gaussian"},
        },
        "data": {"root": ".", "manifest": "manifest.csv", "splits": {"eval": "test"}, "dicom": {"window": "minmax"}},
        "only": ["performance"],
        "seed": 0,
        "device": "cpu",
        "output": "out",
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_3d_segmentation_runs_by_sliding_window_once_per_volume_in_millimetres(tmp_path: Path) -> None:
    import nibabel as nib

    spec = write_volume_study(tmp_path)
    # One label map on another grid (shifted by 5 mm): quarantined, the audit goes on.
    shifted = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(np.zeros(VOLUME[::-1], np.uint8), shifted), tmp_path / "m5.nii.gz")
    run = _run(spec)
    results = run["results"]
    assert results["model"]["sliding_window"]["roi"] == [8, 16, 16]
    assert results["model"]["sliding_window"]["implementation"].startswith("MONAI ")
    assert results["run"]["images_forwarded_per_split"]["eval"] == 5  # one pass per volume, windows inside
    quarantine = results["data"]["quarantine"]
    assert len(quarantine) == 1 and "mask: geometry differs from the image's" in quarantine[0]["reason"]
    metrics = {m["name"]: m for m in run["checks"]["performance"]["metrics"]}
    assert metrics["performance.dice"]["value"] > 0.9
    assert results["data"]["splits"]["eval"]["volumes"]["spacing_mm"]["median"] == pytest.approx([2.0, 1.0, 1.0])
    # The clean balls are segmented exactly: no boundary error (spacing is held to in the case tests).
    assert metrics["performance.hd95"]["value"] == pytest.approx(0.0)


def test_sliding_window_needs_a_segmentation_model_and_a_roi_that_fits(tmp_path: Path) -> None:
    raw = yaml.safe_load(write_volume_study(tmp_path, n=1).read_text())
    for update, expected in (
        ({"roi": [8, 16]}, "one size per spatial axis"),
        ({"roi": [32, 16, 16]}, "each at most the input's"),
    ):
        bad = json.loads(json.dumps(raw))
        bad["model"]["sliding_window"].update(update)
        with pytest.raises(ConfigError) as info:
            parse_spec(bad, base_dir=tmp_path, source="audit.yaml")
        assert expected in str(info.value)
    bad = json.loads(json.dumps(raw))
    bad["model"]["task"] = "classification"
    with pytest.raises(ConfigError) as info:
        parse_spec(bad, base_dir=tmp_path, source="audit.yaml")
    assert "sliding_window applies to task: segmentation" in str(info.value)


def test_the_testing_kit_builds_a_segmentation_context() -> None:
    from monai.metrics import compute_dice

    from auditkit.checks.performance import PerformanceCheck
    from auditkit.testing import make_context

    rng = np.random.default_rng(0)
    reference = (rng.random((6, 12, 12)) < 0.3).astype(np.int16)
    predicted = np.where(rng.random(reference.shape) < 0.1, 1 - reference, reference)
    probs = np.stack([1.0 - predicted * 0.8 - 0.1, predicted * 0.8 + 0.1], axis=1)
    ctx = make_context(reference, probs=probs, task="segmentation", check=PerformanceCheck, spacing=[2.0, 0.5])
    assert ctx.split("eval").spacing is not None and ctx.split("eval").spacing.tolist()[0] == [2.0, 0.5]
    result = PerformanceCheck().run(ctx, PerformanceCheck.Params(n_boot=0))
    dice = next(m for m in result.metrics if m.name == "performance.dice")
    assert dice.labels == {"class": "class1"}
    one_hot = [
        torch.nn.functional.one_hot(torch.as_tensor(m.astype(np.int64)), 2).movedim(-1, 1).float()
        for m in (predicted, reference)
    ]
    expected = compute_dice(*one_hot, include_background=False, ignore_empty=True)[:, 0].numpy()
    assert dice.value == pytest.approx(float(np.nanmean(expected.astype(np.float64))), abs=1e-6)
