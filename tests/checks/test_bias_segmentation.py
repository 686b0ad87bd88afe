"""The bias check on segmentation models: Dice and HD95 per class and group, their gaps and intervals.

Planted faults of known truth (one site's predictions eroded) against clean twins of equal
quality; every group mean is cross-checked against MONAI's per-case ``compute_dice`` /
``compute_hausdorff_distance`` averaged by brute force; empty references and missed lesions are
counted per group; anisotropic spacing is honoured in 2-D and 3-D.
"""

from __future__ import annotations

import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.metrics.meandice import compute_dice

from auditkit.check import CheckResult, InputGeometry, Metric
from auditkit.checks.bias import (
    INTERSECTION_SEPARATOR,
    BiasCheck,
    CaseOutcomes,
    analyse_segmentation_grouping,
)
from auditkit.checks.bias.segmentation import batched_case_means
from auditkit.context import AuditContext, CheckView
from auditkit.data import Dataset, Manifest, SplitData
from auditkit.policy import Rule, evaluate_rule

SIDE = 24

# The rules proposed for policies/medical-imaging-default.yaml (judged here, as the policy would).
DICE_GAP = Rule(
    id="BIAS-DICE-GAP",
    metric="bias.max_gap",
    labels={"metric": "dice", "group_by": "*", "class": "*"},
    max=0.10,
    use="ci_low",
    severity="fail",
    tasks=["segmentation"],
    controls=["MEASURE 2.11"],
)
DICE_GAP_POINT = Rule(
    id="BIAS-DICE-GAP-POINT",
    metric="bias.max_gap",
    labels={"metric": "dice", "group_by": "*", "class": "*"},
    max=0.10,
    severity="warn",
    tasks=["segmentation"],
    controls=["MEASURE 2.11"],
)


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread: None) -> Iterator[None]:
    yield


# --------------------------------------------------------------------------------------------
# Synthetic studies


def _disc(centre: Sequence[float], radius: float, shape: tuple[int, ...]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    offsets = grid - np.asarray(centre, dtype=np.float64).reshape(-1, *([1] * len(shape)))
    return np.asarray((offsets**2).sum(axis=0) <= radius**2)


def make_maps(
    sites: Sequence[str],
    *,
    erode: Mapping[str, float] | None = None,
    seed: int = 0,
    shape: tuple[int, ...] = (SIDE, SIDE),
    empty_every: int = 0,
    miss: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference and predicted label maps ``(N, *shape)`` of one disc (sphere) per case.

    Every prediction is the reference disc shifted by up to a pixel with its radius jittered;
    a site in ``erode`` has its predicted radius shrunk by that many pixels (lower Dice). With
    ``empty_every`` every such case has an empty reference (the model predicts nothing there);
    ``miss`` names, per site, how many of its first cases with a reference the model misses entirely.
    """
    rng = np.random.default_rng(seed)
    erode = dict(erode or {})
    miss = dict(miss or {})
    reference = np.zeros((len(sites), *shape), dtype=np.int16)
    predicted = np.zeros((len(sites), *shape), dtype=np.int64)
    seen: dict[str, int] = {}
    for i, site in enumerate(sites):
        if empty_every and i % empty_every == empty_every - 1:
            continue
        seen[site] = seen.get(site, 0) + 1
        centre = rng.uniform(0.35, 0.65, len(shape)) * np.asarray(shape)
        radius = rng.uniform(0.2, 0.3) * min(shape)
        reference[i] = _disc(centre, radius, shape)
        if seen[site] <= miss.get(site, 0):
            continue
        shift = rng.uniform(-1.0, 1.0, len(shape))
        jitter = rng.uniform(-0.7, 0.7) - erode.get(site, 0.0)
        predicted[i] = _disc(centre + shift, max(radius + jitter, 0.5), shape)
    return reference, predicted


def seg_context(
    reference: np.ndarray,
    predicted: np.ndarray,
    groups: Mapping[str, Sequence[str]],
    *,
    classes: Sequence[str] = ("background", "lesion"),
    patients: Sequence[str | None] | None = None,
    spacing: np.ndarray | None = None,
    logits: np.ndarray | None = None,
    quarantined_groups: Mapping[str, Mapping[str, int]] | None = None,
    seed: int = 0,
    out_dir: Path | None = None,
) -> CheckView:
    """The check's view of an in-memory segmentation eval split (as ``auditkit.testing`` builds one)."""
    n = reference.shape[0]
    k = len(classes)
    spatial = reference.shape[1:]
    if logits is None:
        logits = 8.0 * np.moveaxis(np.eye(k, dtype=np.float32)[predicted], -1, 1)
    data = SplitData(
        name="eval",
        manifest=Path("<memory>"),
        rows=np.arange(n, dtype=np.int64),
        labels=np.asarray(reference, dtype=np.int16),
        images=torch.zeros(n, 0, dtype=torch.float16),
        patients=list(patients) if patients is not None else [None] * n,
        studies=[None] * n,
        groups={key: np.asarray(values) for key, values in groups.items()},
        kinds=["npy"] * n,
        paths=[Path(f"<memory>/eval/{i}") for i in range(n)],
        spacing=spacing if spacing is not None else np.ones((n, len(spatial))),
        quarantined_groups={key: dict(v) for key, v in (quarantined_groups or {}).items()},
    )
    dataset = Dataset(
        splits={"eval": data}, quarantine=[], manifest=Manifest(source=Path("<memory>"), columns=[], rows=[])
    )
    geometry = InputGeometry(1, spatial[-2], spatial[-1], None, spatial[0] if len(spatial) == 3 else None)
    folder = out_dir if out_dir is not None else Path(tempfile.mkdtemp(prefix="auditkit-seg-bias-"))
    ctx = AuditContext(
        None,
        None,
        dataset,
        folder,
        seed=seed,
        classes=list(classes),
        group_columns=sorted(groups),
        geometry=geometry,
        task="segmentation",
    )
    ctx._outputs["eval"] = (torch.as_tensor(np.asarray(logits, dtype=np.float32)), torch.empty(n, 0))
    ctx._with_features["eval"] = False
    return ctx.for_check(BiasCheck)


def run(ctx: CheckView, **params: Any) -> CheckResult:
    return BiasCheck().run(ctx, BiasCheck.Params(**{"n_boot": 300, "min_group_size": 10, **params}))


def metric(result: CheckResult, name: str, **labels: str) -> Metric:
    found = [m for m in result.metrics if m.name == name and m.labels == labels]
    assert len(found) == 1, (name, labels, [m.labels for m in result.metrics if m.name == name][:5])
    return found[0]


def findings(result: CheckResult, kind: str) -> list[dict[str, Any]]:
    return [f for f in result.findings if f["kind"] == kind]


def monai_case_figures(
    reference: np.ndarray, predicted: np.ndarray, spacing: np.ndarray, k: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's Dice and HD95 case by case, one call per case (the brute-force reference)."""
    dice, hd95 = [], []
    for i in range(reference.shape[0]):
        ref = torch.nn.functional.one_hot(torch.as_tensor(reference[i : i + 1], dtype=torch.long), k)
        pred = torch.nn.functional.one_hot(torch.as_tensor(predicted[i : i + 1], dtype=torch.long), k)
        ref, pred = ref.movedim(-1, 1).float(), pred.movedim(-1, 1).float()
        with warnings.catch_warnings():  # MONAI warns on every empty mask
            warnings.simplefilter("ignore")
            dice.append(compute_dice(pred, ref, include_background=False, ignore_empty=True).numpy()[0])
            hd95.append(
                compute_hausdorff_distance(
                    pred, ref, include_background=False, percentile=95, spacing=[tuple(spacing[i])]
                ).numpy()[0]
            )
    return np.asarray(dice, dtype=np.float64), np.asarray(hd95, dtype=np.float64)


SITES = ["A"] * 40 + ["B"] * 40 + ["C"] * 40
SEX = (["F", "M"] * 60)[:120]
PATIENTS = [f"p{i // 2}" for i in range(120)]


@pytest.fixture(scope="module")
def planted() -> dict[str, Any]:
    reference, predicted = make_maps(SITES, erode={"B": 2.5}, seed=1)
    ctx = seg_context(reference, predicted, {"site": SITES, "sex": SEX}, patients=PATIENTS)
    return {"reference": reference, "predicted": predicted, "result": run(ctx)}


@pytest.fixture(scope="module")
def clean() -> dict[str, Any]:
    reference, predicted = make_maps(SITES, seed=2)
    ctx = seg_context(reference, predicted, {"site": SITES, "sex": SEX}, patients=PATIENTS)
    return {"reference": reference, "predicted": predicted, "result": run(ctx)}


# --------------------------------------------------------------------------------------------
# Planted fault and clean twin


def test_an_eroded_site_shows_a_dice_gap_whose_interval_excludes_zero(planted: dict[str, Any]) -> None:
    result = planted["result"]
    gap = metric(result, "bias.max_gap", metric="dice", group_by="site", **{"class": "lesion"})
    assert gap.value is not None and gap.ci is not None
    assert gap.ci[0] > 0.10, gap  # demonstrated, on the conservative end
    assert gap.direction == "lower_is_better"
    finding = next(f for f in findings(result, "subgroup_gap") if f["metric"] == "dice" and f["group_by"] == "site")
    assert finding["worst_group"] == "B"
    assert finding["class"] == "lesion"
    assert finding["gap"] == pytest.approx(finding["best_value"] - finding["worst_value"], abs=1e-12)
    # HD95 is lower-is-better: its worst group is the one with the largest distance.
    hd = next(f for f in findings(result, "subgroup_gap") if f["metric"] == "hd95" and f["group_by"] == "site")
    assert hd["unit"] == "mm" and hd["worst_value"] >= hd["best_value"]
    assert (
        metric(result, "bias.group_metric", metric="hd95", group_by="site", group="A", **{"class": "lesion"}).direction
        == "lower_is_better"
    )
    # The proposed rule fails the planted model, on the site grouping.
    record = evaluate_rule(DICE_GAP, [m.to_json() for m in result.metrics])
    assert record["status"] == "fail", record
    # Sex is balanced within every site: no demonstrated gap there.
    sex = metric(result, "bias.max_gap", metric="dice", group_by="sex", **{"class": "lesion"})
    assert sex.ci is not None and sex.ci[0] < 0.10


def test_the_clean_twin_passes_with_an_interval_reaching_small_gaps(clean: dict[str, Any]) -> None:
    result = clean["result"]
    for group_by in ("site", "sex", f"site{INTERSECTION_SEPARATOR}sex"):
        gap = metric(result, "bias.max_gap", metric="dice", group_by=group_by, **{"class": "lesion"})
        assert gap.value is not None and gap.ci is not None
        assert gap.ci[0] <= gap.value <= gap.ci[1]
        assert gap.ci[0] < 0.03, (group_by, gap)
    metrics = [m.to_json() for m in result.metrics]
    assert evaluate_rule(DICE_GAP, metrics)["status"] == "pass"
    assert evaluate_rule(DICE_GAP_POINT, metrics)["status"] == "pass"


def test_the_classifier_rules_do_not_judge_segmentation_gaps(planted: dict[str, Any]) -> None:
    sens = Rule(id="BIAS-SENS-GAP", metric="bias.max_gap", labels={"metric": "sensitivity", "group_by": "*"}, max=0.1)
    assert evaluate_rule(sens, [m.to_json() for m in planted["result"].metrics])["matched"] == 0


# --------------------------------------------------------------------------------------------
# Against MONAI, by brute force


def test_group_means_equal_monais_per_case_figures_averaged(planted: dict[str, Any]) -> None:
    reference, predicted = planted["reference"], planted["predicted"]
    dice, hd95 = monai_case_figures(reference, predicted, np.ones((len(SITES), 2)))
    sites = np.asarray(SITES)
    result = planted["result"]
    for site in "ABC":
        rows = sites == site
        got = metric(result, "bias.group_metric", metric="dice", group_by="site", group=site, **{"class": "lesion"})
        assert got.value == pytest.approx(float(np.nanmean(dice[rows])), abs=1e-9)
        assert got.n == int(np.isfinite(dice[rows]).sum())
        assert got.ci is not None and got.ci[0] <= got.value <= got.ci[1] <= 1.0
        got = metric(result, "bias.group_metric", metric="hd95", group_by="site", group=site, **{"class": "lesion"})
        assert got.value == pytest.approx(float(np.nanmean(hd95[rows])), abs=1e-9)
    # An intersection cell: site × sex.
    cell = (sites == "B") & (np.asarray(SEX) == "F")
    got = metric(
        result,
        "bias.group_metric",
        metric="dice",
        group_by=f"site{INTERSECTION_SEPARATOR}sex",
        group=f"B{INTERSECTION_SEPARATOR}F",
        **{"class": "lesion"},
    )
    assert got.value == pytest.approx(float(np.nanmean(dice[cell])), abs=1e-9)


def test_empty_references_are_left_out_and_missed_lesions_counted_per_group() -> None:
    sites = ["A"] * 30 + ["B"] * 30
    reference, predicted = make_maps(sites, seed=3, empty_every=5, miss={"B": 8})
    # A false positive on one empty case of site A: still no Dice (MONAI's ignore_empty).
    predicted[4, 2:6, 2:6] = 1
    ctx = seg_context(reference, predicted, {"site": sites})
    result = run(ctx, n_boot=50)
    dice, hd95 = monai_case_figures(reference, predicted, np.ones((60, 2)))
    site = np.asarray(sites)
    for group in "AB":
        rows = site == group
        got = metric(result, "bias.group_metric", metric="dice", group_by="site", group=group, **{"class": "lesion"})
        assert got.n == 24  # six of 30 cases have an empty reference
        assert got.value == pytest.approx(float(np.nanmean(dice[rows])), abs=1e-9)
        got_hd = metric(result, "bias.group_metric", metric="hd95", group_by="site", group=group, **{"class": "lesion"})
        assert got_hd.n == int(np.isfinite(hd95[rows]).sum())
    # Missed cases: Dice 0 in B's mean, no HD95; counted per group beside the HD95 that hides them.
    b_hd = metric(result, "bias.group_metric", metric="hd95", group_by="site", group="B", **{"class": "lesion"})
    assert b_hd.n == 24 - 8
    (counts,) = [f for f in findings(result, "segmentation_cases_by_group") if f["group_by"] == "site"]
    by_group = {g["group"]: g for g in counts["groups"]}
    assert by_group["A"]["empty_reference"] == "6" and by_group["B"]["empty_reference"] == "6"
    assert by_group["A"]["missed"] == "0" and by_group["B"]["missed"] == "8"
    assert by_group["B"]["missed_share"] == pytest.approx(8 / 24, abs=1e-4)
    assert by_group["A"]["false_positive_on_empty"] == "<5"
    assert by_group["B"]["hd95_defined"] == "16"
    gap = next(f for f in findings(result, "subgroup_gap") if f["metric"] == "dice")
    assert gap["worst_group"] == "B" and gap["worst_group_missed"] == "8" and gap["best_group_missed"] == "0"
    hd = next(f for f in findings(result, "subgroup_gap") if f["metric"] == "hd95")
    assert {hd["worst_group_missed"], hd["best_group_missed"]} == {"0", "8"}
    totals = findings(result, "case_counts")[0]["classes"]["lesion"]
    assert totals["empty_reference"] == 12 and totals["missed"] == 8


def test_hd95_per_group_honours_anisotropic_spacing() -> None:
    sites = ["A"] * 12 + ["B"] * 12
    reference, predicted = make_maps(sites, seed=4)
    spacing = np.tile([3.0, 0.5], (24, 1))
    result = run(seg_context(reference, predicted, {"site": sites}, spacing=spacing), n_boot=0, min_group_size=5)
    _, hd95 = monai_case_figures(reference, predicted, spacing)
    _, isotropic = monai_case_figures(reference, predicted, np.ones((24, 2)))
    rows = np.asarray(sites) == "A"
    got = metric(result, "bias.group_metric", metric="hd95", group_by="site", group="A", **{"class": "lesion"})
    assert got.value == pytest.approx(float(np.nanmean(hd95[rows])), abs=1e-9)
    assert abs(got.value - float(np.nanmean(isotropic[rows]))) > 0.1  # would fail if spacing were ignored
    assert got.ci is None  # n_boot=0: no intervals


def test_volumes_are_measured_with_their_voxel_spacing() -> None:
    sites = ["A"] * 10 + ["B"] * 10
    shape = (8, 14, 14)
    reference, predicted = make_maps(sites, seed=5, shape=shape, erode={"B": 1.5})
    spacing = np.tile([4.0, 0.8, 0.8], (20, 1))
    ctx = seg_context(reference, predicted, {"site": sites}, spacing=spacing)
    assert ctx.spatial_dims == 3 and 3 in BiasCheck.spatial_dims and "segmentation" in BiasCheck.tasks
    result = run(ctx, n_boot=100, min_group_size=5)
    dice, hd95 = monai_case_figures(reference, predicted, spacing)
    for group in "AB":
        rows = np.asarray(sites) == group
        got = metric(result, "bias.group_metric", metric="dice", group_by="site", group=group, **{"class": "lesion"})
        assert got.value == pytest.approx(float(np.nanmean(dice[rows])), abs=1e-9)
        got = metric(result, "bias.group_metric", metric="hd95", group_by="site", group=group, **{"class": "lesion"})
        assert got.value == pytest.approx(float(np.nanmean(hd95[rows])), abs=1e-9)
    assert metric(result, "bias.max_gap", metric="dice", group_by="site", **{"class": "lesion"}).ci is not None


# --------------------------------------------------------------------------------------------
# Several classes, small groups, skipped groupings, excluded cases, the plot


def test_every_foreground_class_is_measured_and_small_groups_are_undefined_with_the_reason(tmp_path: Path) -> None:
    sites = ["A"] * 20 + ["B"] * 20 + ["C"] * 3
    reference, predicted = make_maps(sites, seed=6)
    # A second class: a square in the corner of every other case (none in site B's cases).
    for i in range(0, 20, 2):
        reference[i, 18:22, 18:22] = 2
        predicted[i, 18:22, 18:21] = 2
    classes = ("background", "lesion", "vessel")
    ctx = seg_context(reference, predicted, {"site": sites}, classes=classes, out_dir=tmp_path)
    result = run(ctx, n_boot=100)
    dice, _ = monai_case_figures(reference, predicted, np.ones((43, 2)), k=3)
    a = metric(result, "bias.group_metric", metric="dice", group_by="site", group="A", **{"class": "vessel"})
    assert a.value == pytest.approx(float(np.nanmean(dice[:20, 1])), abs=1e-9) and a.n == 10
    b = metric(result, "bias.group_metric", metric="dice", group_by="site", group="B", **{"class": "vessel"})
    assert b.value is None and b.reason == "no case of the group has vessel in its reference"
    c = metric(result, "bias.group_metric", metric="dice", group_by="site", group="C", **{"class": "lesion"})
    assert c.value is None and "fewer than min_group_size=10" in (c.reason or "") and "<5" in (c.reason or "")
    vessel_gap = metric(result, "bias.max_gap", metric="dice", group_by="site", **{"class": "vessel"})
    assert vessel_gap.value is None and "fewer than two groups" in (vessel_gap.reason or "")
    lesion_gap = metric(result, "bias.max_gap", metric="dice", group_by="site", **{"class": "lesion"})
    assert lesion_gap.value is not None and lesion_gap.n == 40
    small = findings(result, "insufficient_group")
    assert {(f["group"], f.get("class")) for f in small} >= {("C", None), ("B", "vessel")}
    assert metric(result, "bias.min_group_size", group_by="site").value == 3.0
    # The forest plot: one Dice and one HD95 panel per foreground class.
    (artifact,) = result.artifacts
    assert artifact.name == "forest_plot"
    svg = (tmp_path / artifact.path).read_text()
    ET.fromstring(svg)
    for title in ("lesion: Dice", "lesion: HD95", "vessel: Dice", "vessel: HD95"):
        assert title in svg


def test_a_grouping_with_too_many_groups_is_skipped_per_class() -> None:
    sites = [f"s{i}" for i in range(12)] * 2
    reference, predicted = make_maps(sites, seed=7)
    result = run(seg_context(reference, predicted, {"site": sites}), n_boot=0, max_groups=5)
    gap = metric(result, "bias.max_gap", metric="dice", group_by="site", **{"class": "lesion"})
    assert gap.value is None and "more than max_groups=5" in (gap.reason or "")
    assert findings(result, "grouping_skipped")[0]["groups"] == 12


def test_cases_with_non_finite_logits_are_left_out_and_counted() -> None:
    sites = ["A"] * 12 + ["B"] * 12
    reference, predicted = make_maps(sites, seed=8)
    logits = 8.0 * np.moveaxis(np.eye(2, dtype=np.float32)[predicted], -1, 1)
    logits[0, 0, 3, 3] = -np.inf  # the softmax stays finite; the case is still left out
    logits[13, 1, 0, 0] = np.nan
    reference[14] = -1  # a case without a reference map
    ctx = seg_context(reference, predicted, {"site": sites}, logits=logits, quarantined_groups={"site": {"Z": 2}})
    result = run(ctx, n_boot=0, min_group_size=5)
    assert findings(result, "non_finite_logits")[0]["count"] == 2
    assert findings(result, "cases_left_out")[0]["without_reference"] == 1
    assert metric(result, "bias.group_metric", metric="dice", group_by="site", group="A", **{"class": "lesion"}).n == 11
    assert metric(result, "bias.group_metric", metric="dice", group_by="site", group="B", **{"class": "lesion"}).n == 10
    # A group known only from quarantined files: n = 0, undefined with the reason, reported.
    z = metric(result, "bias.group_metric", metric="dice", group_by="site", group="Z", **{"class": "lesion"})
    assert z.value is None and z.n == 0 and "no images in the group" in (z.reason or "")
    assert findings(result, "quarantined_by_group")[0]["groups_without_images"] == ["Z"]
    assert metric(result, "bias.min_group_size", group_by="site").value == 0.0


def test_the_same_seed_gives_the_same_intervals_and_patients_are_resampled_together() -> None:
    sites = ["A"] * 20 + ["B"] * 20
    reference, predicted = make_maps(sites, seed=9, erode={"B": 1.0})
    patients = [f"p{i // 4}" for i in range(40)]

    def gap() -> Metric:
        result = run(seg_context(reference, predicted, {"site": sites}, patients=patients), n_boot=200)
        assert findings(result, "bootstrap")[0]["unit"] == "patient"
        return metric(result, "bias.max_gap", metric="dice", group_by="site", **{"class": "lesion"})

    assert gap() == gap()


def test_batched_means_and_the_analysis_agree_with_a_direct_computation() -> None:
    rng = np.random.default_rng(10)
    dice = rng.uniform(0.3, 1.0, (30, 2))
    dice[rng.random((30, 2)) < 0.2] = np.nan
    hd95 = rng.uniform(0.0, 9.0, (30, 2))
    hd95[np.isnan(dice)] = np.nan
    outcomes = CaseOutcomes.from_figures(dice, hd95, ~np.isnan(dice), ~np.isnan(dice), ["x", "y"])
    counts = rng.integers(0, 3, (5, 30))
    means = batched_case_means(outcomes, np.arange(30, dtype=np.intp), counts)
    for b in range(5):
        weights = counts[b][:, None] * np.isfinite(dice)
        expected = (weights * np.nan_to_num(dice)).sum(axis=0) / weights.sum(axis=0)
        np.testing.assert_allclose(means["dice"][b], expected, rtol=1e-12)
    groups = np.asarray(["g"] * 15 + ["h"] * 15)
    analysis = analyse_segmentation_grouping(
        outcomes, groups, group_by="g", min_group_size=5, n_boot=0, rng=np.random.default_rng(0)
    )
    g = analysis.classes["y"]["dice"].groups[0]
    assert g.values["dice"] == pytest.approx(float(np.nanmean(dice[:15, 1])), abs=1e-12)
    with pytest.raises(ValueError, match="groups must have shape"):
        analyse_segmentation_grouping(outcomes, groups[:3], group_by="g", rng=np.random.default_rng(0))
