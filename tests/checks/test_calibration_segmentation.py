"""The calibration check on segmentation models (``task: segmentation``, 2-D and 3-D): voxel ECE
per class within a region of interest, against brute force, netcal and scikit-learn."""

from __future__ import annotations

import json
import tracemalloc
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage
from sklearn.metrics import brier_score_loss, log_loss

from auditkit.check import CheckResult, InputGeometry, Metric
from auditkit.checks.calibration import (
    CalibrationCheck,
    class_reliability_grid,
    expected_calibration_error,
    maximum_calibration_error,
    region_of_interest,
    segmentation_tables,
)
from auditkit.checks.calibration.segmentation import CaseTables
from auditkit.context import AuditContext, CheckView
from auditkit.data import Dataset, Manifest, SplitData
from auditkit.errors import InputError
from auditkit.policy import Rule, evaluate_rule

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from netcal.metrics import ECE, MCE

EPS = float(np.finfo(np.float64).eps)
CLASSES = ["background", "liver", "lesion"]

# The rule proposed for policies/medical-imaging-default.yaml (judged here on planted faults).
CAL_ECE_CLASS = Rule(
    id="CAL-ECE-CLASS",
    metric="calibration.ece",
    labels={"class": "*"},
    max=0.10,
    severity="warn",
    tasks=["segmentation"],
    controls=["MEASURE 2.5", "MEASURE 2.6"],
)


# --------------------------------------------------------------------------------------------
# Synthetic studies and the context


def synthetic_study(
    n: int, shape: tuple[int, ...], seed: int = 0, *, scale: float = 0.8, absent: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated logits ``(N, K, *shape)`` and reference maps drawn voxel by voxel from their softmax.

    Class ``k`` is a disc (ball in 3-D) per case whose logit falls off linearly with the distance
    from its centre; a class is absent (logit -20 everywhere) from about ``absent`` of the cases.
    Each reference voxel is drawn from the softmax of its logits, so the logits are calibrated.
    """
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float64)
    logits = np.zeros((n, len(CLASSES), *shape), dtype=np.float32)
    for i in range(n):
        for k in range(1, len(CLASSES)):
            if rng.uniform() < absent:
                logits[i, k] = -20.0
                continue
            centre = rng.uniform(0.3, 0.7, len(shape)) * np.asarray(shape)
            distance = np.sqrt(((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(axis=0))
            logits[i, k] = scale * (rng.uniform(3.0, 7.0) - distance)
    truth = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    draw = rng.uniform(size=(n, 1, *shape))
    reference = (np.cumsum(truth, axis=1) < draw).sum(axis=1).clip(0, len(CLASSES) - 1).astype(np.int16)
    return logits, reference


def seg_context(
    tmp_path: Path,
    logits: np.ndarray,
    reference: np.ndarray,
    *,
    patients: list[str | None] | None = None,
    groups: dict[str, np.ndarray] | None = None,
    spacing: np.ndarray | None = None,
    classes: list[str] | None = None,
) -> CheckView:
    """An in-memory segmentation context (2-D or 3-D from the maps' rank), held to the check's needs."""
    n, spatial = reference.shape[0], reference.shape[1:]
    data = SplitData(
        name="eval",
        manifest=Path("<memory>"),
        rows=np.arange(n, dtype=np.int64),
        labels=reference,
        images=torch.zeros(n, 0, dtype=torch.float16),
        patients=list(patients) if patients is not None else [None] * n,
        studies=[None] * n,
        groups={k: np.asarray(v) for k, v in (groups or {}).items()},
        kinds=["npy"] * n,
        paths=[Path(f"<memory>/eval/{i}") for i in range(n)],
        spacing=spacing if spacing is not None else np.ones((n, len(spatial))),
    )
    dataset = Dataset(
        splits={"eval": data}, quarantine=[], manifest=Manifest(source=Path("<memory>"), columns=[], rows=[])
    )
    depth = spatial[0] if len(spatial) == 3 else None
    ctx = AuditContext(
        None,
        None,
        dataset,
        tmp_path,
        seed=0,
        classes=list(classes or CLASSES),
        group_columns=sorted(groups or {}),
        geometry=InputGeometry(1, spatial[-2], spatial[-1], None, depth),
        task="segmentation",
    )
    ctx._outputs["eval"] = (torch.as_tensor(logits, dtype=torch.float32), torch.empty(n, 0))
    ctx._with_features["eval"] = False
    return ctx.for_check(CalibrationCheck)


def run_check(ctx: CheckView, **params: Any) -> CheckResult:
    return CalibrationCheck().run(ctx, CalibrationCheck.Params(**params))


def by_key(result: CheckResult) -> dict[tuple[str, tuple[tuple[str, str], ...]], Metric]:
    return {(m.name, tuple(sorted(m.labels.items()))): m for m in result.metrics}


def class_metric(result: CheckResult, name: str, cls: str) -> Metric:
    return by_key(result)[(f"calibration.{name}", (("class", cls),))]


def finding(result: CheckResult, kind: str) -> dict[str, Any]:
    return next(f for f in result.findings if f["kind"] == kind)


# --------------------------------------------------------------------------------------------
# Brute force: explicit dilation, every ROI voxel concatenated, a plain loop over bins


def ball(margin: float, steps: np.ndarray) -> np.ndarray:
    """The structuring element of all offsets within ``margin`` (Euclidean, voxel size ``steps``)."""
    reach = np.floor(margin / steps).astype(int)
    offsets = np.indices(tuple(2 * reach + 1)) - reach.reshape(-1, *[1] * len(steps))
    squared = ((offsets * steps.reshape(-1, *[1] * len(steps))) ** 2).sum(axis=0)
    return np.asarray(squared <= margin**2 * (1 + 1e-8))  # a tie at the margin is in


def brute_roi(union: np.ndarray, margin: float, steps: np.ndarray | None = None) -> np.ndarray:
    steps = np.ones(union.ndim) if steps is None else np.asarray(steps, dtype=np.float64)
    if margin == 0:
        return union.copy()
    return np.asarray(ndimage.binary_dilation(union, structure=ball(margin, steps)))


def roi_voxels(
    probs: np.ndarray, reference: np.ndarray, k: int, margin: float, spacing: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every case's ROI voxels of class ``k``, concatenated: float64 ``p_k`` and 0/1 outcomes."""
    ps, ys = [], []
    for i in range(probs.shape[0]):
        union = (reference[i] == k) | (probs[i].argmax(axis=0) == k)
        roi = brute_roi(union, margin, None if spacing is None else spacing[i])
        ps.append(probs[i, k][roi].astype(np.float64))
        ys.append((reference[i][roi] == k).astype(np.float64))
    return np.concatenate(ps), np.concatenate(ys)


def top_label_voxels(probs: np.ndarray, reference: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    ps, ys = [], []
    for i in range(probs.shape[0]):
        predicted = probs[i].argmax(axis=0)
        roi = np.zeros(reference.shape[1:], dtype=bool)
        for k in range(1, probs.shape[1]):
            union = (reference[i] == k) | (predicted == k)
            roi |= brute_roi(union, margin)
        ps.append(np.moveaxis(probs[i][:, roi], 0, 1).astype(np.float64))
        ys.append(reference[i][roi].astype(np.int64))
    return np.concatenate(ps), np.concatenate(ys)


def loop_binary_ece_mce(p: np.ndarray, y: np.ndarray, bins: int) -> tuple[float, float]:
    """Positive-class ECE and MCE: ``p`` clipped to [eps, 1 - eps], bins [lo, hi), the last closed."""
    q = np.clip(p, EPS, 1.0 - EPS)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, mce = 0.0, 0.0
    for b in range(bins):
        upper = q < edges[b + 1] if b < bins - 1 else q <= edges[b + 1]
        members = (q >= edges[b]) & upper
        if members.any():
            gap = abs(y[members].mean() - q[members].mean())
            ece += members.mean() * gap
            mce = max(mce, gap)
    return ece, mce


def netcal(metric: type, bins: int, p: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(metric(bins).measure(p, y))


# --------------------------------------------------------------------------------------------
# The region of interest


@pytest.mark.parametrize("margin", [0, 1, 2, 5])
def test_roi_is_the_dilation_by_a_ball_in_2d_and_3d(margin: int) -> None:
    rng = np.random.default_rng(margin)
    for shape in ((30, 40), (12, 20, 18)):
        union = np.zeros(shape, dtype=bool)
        union[tuple(rng.integers(3, s - 3, 4) for s in shape)] = True
        box, roi = region_of_interest(union, margin)
        full = np.zeros(shape, dtype=bool)
        full[box] = roi
        np.testing.assert_array_equal(full, brute_roi(union, margin))
        assert (~union[box] | roi).all()  # the union itself is inside


def test_roi_in_millimetres_honours_anisotropic_spacing() -> None:
    union = np.zeros((11, 21, 21), dtype=bool)
    union[5, 10, 10] = True
    steps = np.array([3.0, 0.8, 0.8])
    box, roi = region_of_interest(union, 4.0, steps)
    full = np.zeros(union.shape, dtype=bool)
    full[box] = roi
    np.testing.assert_array_equal(full, brute_roi(union, 4.0, steps))
    # 4 mm reach one slice (3 mm) but five columns (0.8 mm each) from the seed.
    assert full[4, 10, 10] and full[6, 10, 10] and not full[3, 10, 10]
    assert full[5, 10, 15] and not full[5, 10, 16]
    with pytest.raises(ValueError, match="empty union"):
        region_of_interest(np.zeros((4, 4), dtype=bool), 1)
    with pytest.raises(ValueError, match="positive voxel sizes"):
        region_of_interest(union, 1.0, [1.0, 0.0, 1.0])


# --------------------------------------------------------------------------------------------
# Values against brute force, netcal and scikit-learn


def test_per_class_metrics_equal_brute_force_netcal_and_sklearn_2d(tmp_path: Path) -> None:
    logits, reference = synthetic_study(24, (40, 40), seed=1)
    groups = {"site": np.array(["A", "B"] * 12)}
    ctx = seg_context(tmp_path, logits, reference, groups=groups)
    result = run_check(ctx, n_boot=200, bins=15, roi_margin_px=3)
    probs = ctx.predictions("eval").probs  # what the check saw: float32 softmax of the logits
    assert probs.dtype == np.float32

    summary = finding(result, "segmentation_calibration")
    for k, name in enumerate(CLASSES[1:], start=1):
        p, y = roi_voxels(probs, reference, k, 3)
        values = {metric: class_metric(result, metric, name) for metric in ("ece", "mce", "brier", "nll")}
        ece, mce = loop_binary_ece_mce(p, y, 15)
        assert values["ece"].value == pytest.approx(ece, abs=1e-9)
        assert values["ece"].value == pytest.approx(netcal(ECE, 15, p, y), abs=1e-9)
        assert values["mce"].value == pytest.approx(mce, abs=1e-9)
        assert values["mce"].value == pytest.approx(netcal(MCE, 15, p, y), abs=1e-9)
        assert values["brier"].value == pytest.approx(brier_score_loss(y, p), abs=1e-9)
        assert values["nll"].value == pytest.approx(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]), abs=1e-9)
        for metric in values.values():
            assert metric.n == p.size and metric.ci is not None and metric.value is not None
            assert metric.ci[0] <= metric.value <= metric.ci[1]
        # Cases where the class is in neither map contribute no region of interest.
        present = [
            bool(((reference[i] == k) | (probs[i].argmax(axis=0) == k)).any()) for i in range(reference.shape[0])
        ]
        assert 0 < sum(present) < reference.shape[0]
        assert summary["classes"][name] == {
            "cases_with_roi": sum(present),
            "roi_voxels": p.size,
            "reference_voxels": int((reference == k).sum()),
        }
        for group in ("A", "B"):
            cases = np.flatnonzero(groups["site"] == group)
            pg, yg = roi_voxels(probs[cases], reference[cases], k, 3)
            metric = by_key(result)[("calibration.ece", (("class", name), ("group", group), ("group_by", "site")))]
            assert metric.value == pytest.approx(netcal(ECE, 15, pg, yg), abs=1e-9)
            assert metric.n == pg.size

    # The class-agnostic top-label ECE and MCE within the union of the classes' ROIs.
    pt, yt = top_label_voxels(probs, reference, 3)
    top = by_key(result)
    assert top[("calibration.ece", ())].value == pytest.approx(expected_calibration_error(pt, yt, 15), abs=1e-9)
    assert top[("calibration.mce", ())].value == pytest.approx(maximum_calibration_error(pt, yt, 15), abs=1e-9)
    assert top[("calibration.ece", ())].n == len(yt)

    # Nothing else is emitted, nothing is NaN; ACE and temperature scaling are skipped with reasons.
    names = {m.name for m in result.metrics}
    assert names == {"calibration.ece", "calibration.mce", "calibration.brier", "calibration.nll"}
    assert names <= set(CalibrationCheck.emits)
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)
    json.dumps(result.findings, allow_nan=False)
    skipped = finding(result, "not_measured")["metrics"]
    assert set(skipped) == {"calibration.ace", "calibration.ece_after_temperature"}
    assert all(skipped.values())
    assert finding(result, "bootstrap")["unit"] == "case"
    (artifact,) = result.artifacts
    svg = ET.parse(tmp_path / artifact.path).getroot()
    assert svg.tag.endswith("svg")


def test_3d_volumes_with_a_margin_in_millimetres(tmp_path: Path) -> None:
    logits, reference = synthetic_study(10, (10, 20, 20), seed=2)
    spacing = np.tile([2.5, 0.9, 0.9], (10, 1))
    spacing[::2] = [1.5, 1.2, 1.2]
    ctx = seg_context(tmp_path, logits, reference, spacing=spacing)
    assert ctx.spatial_dims == 3 and 3 in CalibrationCheck.spatial_dims
    probs = ctx.predictions("eval").probs
    for params, margin, steps in (({"roi_margin_px": 2}, 2.0, None), ({"roi_margin_mm": 3.0}, 3.0, spacing)):
        result = run_check(ctx, n_boot=50, bins=10, **params)
        for k, name in enumerate(CLASSES[1:], start=1):
            p, y = roi_voxels(probs, reference, k, margin, steps)
            ece = class_metric(result, "ece", name)
            assert ece.value == pytest.approx(netcal(ECE, 10, p, y), abs=1e-9)
            assert ece.n == p.size
        info = finding(result, "segmentation_calibration")
        assert (info["margin"], info["margin_unit"]) == (margin, "mm" if steps is not None else "voxels")
    # The margin in mm differs from the same number of voxels on this anisotropic grid.
    p_mm, _ = roi_voxels(probs, reference, 1, 3.0, spacing)
    p_px, _ = roi_voxels(probs, reference, 1, 3.0)
    assert p_mm.size != p_px.size


def test_per_case_tables_weighted_equal_the_expanded_resample() -> None:
    """A bootstrap resample (case multiplicities) of the tables is the metric of the repeated voxels."""
    logits, reference = synthetic_study(8, (24, 24), seed=3)
    probs = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    tables = segmentation_tables(probs, reference, 15, 2.0)
    weights = np.array([[0, 3, 1, 0, 2, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.float64)
    got = tables.classes[0].metrics(weights)
    for b, row in enumerate(weights):
        cases = np.repeat(np.arange(8), row.astype(int))
        p, y = roi_voxels(probs[cases], reference[cases], 1, 2.0)
        assert got["ece"][b] == pytest.approx(netcal(ECE, 15, p, y), abs=1e-9)
        assert got["brier"][b] == pytest.approx(brier_score_loss(y, p), abs=1e-9)
    # A resample without any ROI voxel is undefined, never 0.
    empty = CaseTables.zeros(3, 15).metrics(np.ones((1, 3)))
    assert np.isnan(empty["ece"]).all()


def test_reliability_grid_from_the_tables(tmp_path: Path) -> None:
    """The panels are the bin sums of the concatenated ROI voxels; the SVG repeats byte for byte."""
    logits, reference = synthetic_study(6, (24, 24), seed=11)
    probs = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    tables = segmentation_tables(probs, reference, 10, 2.0)
    panels = [table.panel(name) for table, name in zip(tables.classes, CLASSES[1:], strict=True)]
    for k, panel in enumerate(panels, start=1):
        p, y = roi_voxels(probs, reference, k, 2.0)
        ids = np.clip(np.searchsorted(np.linspace(0, 1, 11), np.clip(p, EPS, 1 - EPS), side="right") - 1, 0, 9)
        np.testing.assert_array_equal(panel.counts, np.bincount(ids, minlength=10))
        np.testing.assert_allclose(panel.observed, np.bincount(ids, weights=y, minlength=10), atol=1e-9)
    first = class_reliability_grid(panels, 10, tmp_path / "a.svg", what="ROI: reference or prediction + 2 voxels")
    second = class_reliability_grid(panels, 10, tmp_path / "b.svg", what="ROI: reference or prediction + 2 voxels")
    assert first.read_bytes() == second.read_bytes()
    assert ET.parse(first).getroot().tag.endswith("svg")
    with pytest.raises(ValueError, match="without a panel"):
        class_reliability_grid([], 10, tmp_path / "c.svg", what="")


# --------------------------------------------------------------------------------------------
# Planted faults and clean twins


def test_planted_miscalibration_is_found_and_the_calibrated_twin_passes(tmp_path: Path) -> None:
    logits, reference = synthetic_study(30, (40, 40), seed=4)
    results = {}
    for label, factor in (("calibrated", 1.0), ("sharpened", 4.0), ("softened", 1.0 / 3.0)):
        ctx = seg_context(tmp_path / label, logits * factor, reference)
        results[label] = run_check(ctx, n_boot=100)
    for name in CLASSES[1:]:
        calibrated = class_metric(results["calibrated"], "ece", name).value
        sharpened = class_metric(results["sharpened"], "ece", name).value
        softened = class_metric(results["softened"], "ece", name).value
        assert calibrated is not None and sharpened is not None and softened is not None
        assert calibrated < 0.02  # the noise floor of 15 bins on ~15,000 voxels
        assert sharpened > 3 * calibrated and sharpened > 0.05
        assert softened > 0.1
    metrics = {label: [m.to_json() for m in result.metrics] for label, result in results.items()}
    assert evaluate_rule(CAL_ECE_CLASS, metrics["calibrated"])["status"] == "pass"
    judged = evaluate_rule(CAL_ECE_CLASS, metrics["softened"])
    assert judged["status"] == "warn"  # a warn-severity rule that is exceeded
    assert judged["labels"]["class"] in CLASSES[1:]


def test_far_background_does_not_change_the_ece(tmp_path: Path) -> None:
    """Padding every case with a wide border of confidently right background leaves the ROI and its
    ECE as they were; the ECE of all voxels, which that background swamps, falls."""
    logits, reference = synthetic_study(12, (32, 32), seed=5)
    logits = logits / 3.0  # underconfident: a clear ECE within the ROI

    def bordered(width: int) -> tuple[np.ndarray, np.ndarray]:
        """The study within a border of background that the model calls background (p ~ 1 - 4e-9)."""
        pad = ((0, 0), (0, 0), (width, width), (width, width))
        wider = np.pad(logits, pad, constant_values=-20.0)
        wider[:, 0] = np.pad(logits[:, 0], pad[1:], constant_values=0.0)
        return wider, np.pad(reference, pad[1:], constant_values=0)

    # A border of 8 pixels (more than the 5-pixel margin) holds every ROI; then 60 more each side.
    plain = run_check(seg_context(tmp_path / "plain", *bordered(8)), n_boot=0)
    padded_logits, padded_reference = bordered(68)
    wide = run_check(seg_context(tmp_path / "wide", padded_logits, padded_reference), n_boot=0)
    for name in CLASSES[1:]:
        before, after = class_metric(plain, "ece", name), class_metric(wide, "ece", name)
        assert before.value is not None and before.value > 0.1
        assert after.value == pytest.approx(before.value, abs=1e-12)
        assert after.n == before.n
    # The test can fail: over every voxel the same model looks far better calibrated.
    probs = torch.softmax(torch.as_tensor(padded_logits), dim=1).numpy()
    every = netcal(ECE, 15, probs[:, 1].ravel().astype(np.float64), (padded_reference == 1).ravel().astype(float))
    assert every < class_metric(plain, "ece", "liver").value / 5  # type: ignore[operator]


# --------------------------------------------------------------------------------------------
# Undefined, non-finite, patients, contract


def test_absent_class_is_undefined_with_its_reason(tmp_path: Path) -> None:
    logits, reference = synthetic_study(6, (24, 24), seed=6)
    logits[:, 2] = -30.0  # the model never predicts the lesion ...
    reference[reference == 2] = 0  # ... and no reference holds it
    result = run_check(seg_context(tmp_path, logits, reference), n_boot=20)
    for metric in ("ece", "mce", "brier", "nll"):
        lesion = class_metric(result, metric, "lesion")
        assert lesion.value is None and lesion.n == 0
        assert "neither the reference nor the prediction" in (lesion.reason or "")
        assert class_metric(result, metric, "liver").value is not None
    assert finding(result, "segmentation_calibration")["classes"]["lesion"]["cases_with_roi"] == 0
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)


def test_non_finite_cases_are_left_out_and_counted(tmp_path: Path) -> None:
    logits, reference = synthetic_study(8, (24, 24), seed=7)
    broken = logits.copy()
    broken[3, 1, 5, 5] = np.nan
    broken[5, 2, 0, 0] = -np.inf  # a finite softmax (0 for the lesion there), but not a finite logit
    result = run_check(seg_context(tmp_path / "broken", broken, reference), n_boot=0)
    assert finding(result, "non_finite_logits")["count"] == 2
    keep = (np.arange(8) != 3) & (np.arange(8) != 5)
    twin = run_check(seg_context(tmp_path / "twin", logits[keep], reference[keep]), n_boot=0)
    for name in CLASSES[1:]:
        assert class_metric(result, "ece", name).value == pytest.approx(class_metric(twin, "ece", name).value)
    everything = np.full_like(logits, np.nan)
    none_left = run_check(seg_context(tmp_path / "none", everything, reference), n_boot=0)
    assert class_metric(none_left, "ece", "liver").value is None
    assert "non-finite" in (class_metric(none_left, "ece", "liver").reason or "")


def test_intervals_resample_patients(tmp_path: Path) -> None:
    logits, reference = synthetic_study(20, (28, 28), seed=8)
    # Each patient's two cases are the same case: resampled together, the interval widens.
    logits, reference = np.repeat(logits[:10], 2, axis=0), np.repeat(reference[:10], 2, axis=0)
    patients = [f"p{i // 2}" for i in range(20)]

    def width(result: CheckResult) -> float:
        ci = class_metric(result, "ece", "liver").ci
        assert ci is not None
        return ci[1] - ci[0]

    by_patient = run_check(seg_context(tmp_path / "patient", logits, reference, patients=patients), n_boot=400)
    by_case = run_check(seg_context(tmp_path / "case", logits, reference), n_boot=400)
    assert finding(by_patient, "bootstrap")["unit"] == "patient"
    assert class_metric(by_patient, "ece", "liver").value == class_metric(by_case, "ece", "liver").value
    assert width(by_patient) > 1.15 * width(by_case)
    again = run_check(seg_context(tmp_path / "again", logits, reference, patients=patients), n_boot=400)
    assert [m.to_json() for m in again.metrics] == [m.to_json() for m in by_patient.metrics]


def test_contract_params_and_bad_input(tmp_path: Path) -> None:
    assert "segmentation" in CalibrationCheck.tasks
    doc = CalibrationCheck.__doc__ or ""
    assert "region of interest" in doc and "roi_margin_px" in doc
    params = CalibrationCheck.Params()
    assert (params.roi_margin_px, params.roi_margin_mm) == (5, None)
    for bad in ({"roi_margin_px": -1}, {"roi_margin_mm": -0.5}):
        with pytest.raises(ValidationError):
            CalibrationCheck.Params(**bad)
    logits, reference = synthetic_study(3, (16, 16), seed=9)
    reference[0, 0, 0] = 7
    with pytest.raises(InputError, match=r"class indices in \[0, 3\)"):
        run_check(seg_context(tmp_path, logits, reference), n_boot=0)
    empty = run_check(seg_context(tmp_path / "empty", logits[:0], reference[:0]), n_boot=0)
    assert all(m.value is None and m.reason == "no eval cases" for m in empty.metrics)


def test_memory_stays_at_one_case_not_a_float64_copy_of_all_voxels(tmp_path: Path) -> None:
    """No float64 array of all voxels: the check's peak allocation stays well below 8 bytes per voxel
    of the split (a float64 copy of the probabilities would be 8 x N x K x voxels)."""
    logits, reference = synthetic_study(12, (20, 48, 48), seed=10, absent=0.0)
    ctx = seg_context(tmp_path, logits, reference)
    probs = ctx.predictions("eval").probs  # the shared pass's float32 maps are not the check's
    run_check(ctx, n_boot=200)  # warm up: imports, fonts, caches
    tracemalloc.start()
    try:
        result = run_check(ctx, n_boot=200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert class_metric(result, "ece", "liver").value is not None
    all_voxels = reference.size  # N x spatial
    assert probs.size == 3 * all_voxels
    assert peak < 8 * all_voxels / 2, (peak, 8 * probs.size)
