"""Tests of the OOD metrics, detectors, built-in sets, plots and :class:`OODCheck`."""

from __future__ import annotations

import json
import math
import shutil
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from scipy.special import softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from auditkit import testing
from auditkit.check import CheckResult, Skip
from auditkit.checks.ood import (
    OODCheck,
    aupr,
    auroc,
    builtin_size,
    energy_score,
    fit_class_gaussians,
    fpr_at_tpr,
    joint_energy_score,
    knn_score,
    load_other_modality,
    mahalanobis_score,
    max_logit_score,
    max_sigmoid_score,
    msp_score,
    odin_score,
    roc_curves,
    score_histograms,
    separation_metrics,
    synthetic_shift,
    threshold_at_tpr,
)
from auditkit.checks.ood import metrics as ood_metrics
from auditkit.checks.ood.metrics import (
    auroc_rows,
    average_precision_from_counts,
    average_precision_rows,
    fpr_at_tpr_from_counts,
    fpr_at_tpr_rows,
)
from auditkit.checks.ood.scoring import stratified_split
from auditkit.checks.ood.sets import SYNTHETIC_SHIFTS, find_other_modality_files, pydicom_test_files
from auditkit.context import AuditContext
from auditkit.data import load_dataset
from auditkit.model import ModelAdapter
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import AuditSpec, load_spec
from auditkit.stats import auroc_from_counts, bootstrap_cis, bootstrap_indices, resample_counts

FAST = {"n_boot": 50}
FAR_OOD = ("builtin:noise", "builtin:other_modality")


# --------------------------------------------------------------------------------------------
# Reference computations


def sklearn_fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float) -> float:
    """FPR at the first ROC point whose TPR reaches ``tpr`` (in-distribution = positive)."""
    y = np.r_[np.ones(in_scores.size), np.zeros(out_scores.size)]
    fpr, tprs, _ = roc_curve(y, np.r_[in_scores, out_scores], drop_intermediate=False)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def sklearn_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    y = np.r_[np.ones(in_scores.size), np.zeros(out_scores.size)]
    s = np.r_[in_scores, out_scores]
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr_at_tpr": sklearn_fpr_at_tpr(in_scores, out_scores, 0.95),
    }


# --------------------------------------------------------------------------------------------
# Metrics: hand-computed values, ties included


def test_metrics_hand_computed_with_ties() -> None:
    in_scores = [3.0, 2.0, 2.0, 1.0]
    out_scores = [2.0, 1.0, 0.0]
    # Pairs (in, out): 3 beats all three; each 2 beats two and ties one; 1 beats one, ties one.
    assert auroc(in_scores, out_scores) == pytest.approx(float(Fraction(19, 24)), abs=1e-15)
    # AUPR-In: tie groups {3: in}, {2: in, in, out}, {1: in, out}, {0: out}; 4 positives.
    # 1/4 * 1 + 2/4 * 3/4 + 1/4 * 4/6 = 19/24.
    assert aupr(in_scores, out_scores, positive="in") == pytest.approx(19 / 24, abs=1e-15)
    # AUPR-Out: ranked by -score: {0: out}, {1: in, out}, {2: in, in, out}, {3: in}; 3 positives.
    # 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/6 = 13/18.
    assert aupr(in_scores, out_scores) == pytest.approx(13 / 18, abs=1e-15)
    # 95% of 4 in-distribution images is all 4: the threshold is the lowest, 1, which accepts
    # the out-of-distribution 2 and 1.
    assert threshold_at_tpr(in_scores) == 1.0
    assert fpr_at_tpr(in_scores, out_scores) == pytest.approx(2 / 3)
    # 75%: the threshold 2 accepts the tied in-distribution pair (TPR 3/4) and the tied out 2.
    assert threshold_at_tpr(in_scores, 0.75) == 2.0
    assert fpr_at_tpr(in_scores, out_scores, 0.75) == pytest.approx(1 / 3)
    # 50% is reached at 2 too: ties are accepted together, never split.
    assert fpr_at_tpr(in_scores, out_scores, 0.5) == pytest.approx(1 / 3)


def test_metrics_extreme_cases() -> None:
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert fpr_at_tpr([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert aupr([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert fpr_at_tpr([0.0, 1.0], [2.0, 3.0]) == 1.0
    # Every score tied: chance AUROC, every OOD image accepted, precision = prevalence.
    assert auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    assert fpr_at_tpr([1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0
    assert aupr([1.0, 1.0], [1.0, 1.0, 1.0], positive="in") == pytest.approx(2 / 5)
    assert aupr([1.0, 1.0], [1.0, 1.0, 1.0], positive="out") == pytest.approx(3 / 5)
    # -inf marks an undefined score: the least in-distribution value, tied with other -infs.
    assert auroc([-np.inf, 1.0], [-np.inf, 0.0]) == pytest.approx(0.625)
    # 19 of 20 is exactly 95%: the threshold is the 19th largest, not the 20th.
    in_scores = np.arange(20.0)
    assert threshold_at_tpr(in_scores) == 1.0
    assert fpr_at_tpr(in_scores, [0.5, 1.0, 5.0]) == pytest.approx(2 / 3)


def test_metric_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="in_scores is empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match=r"out_scores holds 1 NaN"):
        fpr_at_tpr([1.0], [np.nan])
    with pytest.raises(ValueError, match=r"1-D .* got shape \(1, 2\)"):
        aupr([[1.0, 2.0]], [1.0])
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\], got 1.5"):
        threshold_at_tpr([1.0], 1.5)
    with pytest.raises(ValueError, match="positive must be 'in' or 'out', got 'both'"):
        aupr([1.0], [0.0], positive="both")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(8))
def test_metrics_equal_sklearn_on_random_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(1, 60, size=2)
    if seed % 2:  # heavy ties
        in_scores = rng.integers(0, 5, n_in).astype(float)
        out_scores = rng.integers(0, 5, n_out).astype(float)
    else:
        in_scores, out_scores = rng.normal(1.0, 1.0, n_in), rng.normal(0.0, 1.0, n_out)
    expected = sklearn_metrics(in_scores, out_scores)
    assert auroc(in_scores, out_scores) == pytest.approx(expected["auroc"], abs=1e-12)
    assert aupr(in_scores, out_scores, positive="in") == pytest.approx(expected["aupr_in"])
    assert aupr(in_scores, out_scores) == pytest.approx(expected["aupr_out"], abs=1e-12)
    assert fpr_at_tpr(in_scores, out_scores) == expected["fpr_at_tpr"]


small_scores = st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(small_scores, small_scores, st.sampled_from([0.5, 0.8, 0.95, 1.0]))
def test_metrics_property_equal_sklearn_with_ties(in_list: list[float], out_list: list[float], tpr: float) -> None:
    in_scores, out_scores = np.array(in_list), np.array(out_list)
    expected = sklearn_metrics(in_scores, out_scores)
    value = auroc(in_scores, out_scores)
    assert value == pytest.approx(expected["auroc"], abs=1e-12)
    assert auroc(-out_scores, -in_scores) == pytest.approx(value, abs=1e-12)  # symmetry
    assert aupr(in_scores, out_scores, positive="in") == pytest.approx(expected["aupr_in"])
    assert aupr(in_scores, out_scores, positive="out") == pytest.approx(expected["aupr_out"])
    assert fpr_at_tpr(in_scores, out_scores, tpr) == sklearn_fpr_at_tpr(in_scores, out_scores, tpr)
    accepted = (in_scores >= threshold_at_tpr(in_scores, tpr)).mean()
    assert accepted >= tpr


def test_separation_metrics_values_intervals_and_determinism() -> None:
    rng = np.random.default_rng(0)
    in_scores, out_scores = rng.normal(1.0, 1.0, 80), rng.normal(-0.5, 1.0, 60)
    first = separation_metrics(in_scores, out_scores, n_boot=200, rng=np.random.default_rng(1))
    again = separation_metrics(in_scores, out_scores, n_boot=200, rng=np.random.default_rng(1))
    assert first == again
    expected = sklearn_metrics(in_scores, out_scores)
    for key, (value, ci) in first.items():
        assert value == pytest.approx(expected[key], abs=1e-12)
        assert ci is not None
        assert ci[0] <= value <= ci[1]
    none = separation_metrics(in_scores, out_scores, n_boot=0, rng=np.random.default_rng(1))
    assert all(ci is None for _, ci in none.values())


# --------------------------------------------------------------------------------------------
# Detectors


def test_logit_detectors_hand_computed() -> None:
    logits = np.array([[0.0, np.log(3.0)], [2.0, 2.0], [np.nan, 1.0]])
    np.testing.assert_allclose(msp_score(logits)[:2], [0.75, 0.5])
    np.testing.assert_allclose(max_logit_score(logits)[:2], [np.log(3.0), 2.0])
    np.testing.assert_allclose(energy_score(logits)[:2], [np.log(4.0), 2.0 + np.log(2.0)])
    np.testing.assert_allclose(energy_score(logits, temperature=2.0)[:1], [2.0 * np.log(1.0 + np.sqrt(3.0))])
    for score in (msp_score, max_logit_score, energy_score):
        assert np.isnan(score(logits)[2])  # non-finite logits: undefined score
    huge = torch.tensor([[1000.0, 0.0]])  # no overflow
    assert msp_score(huge)[0] == 1.0
    assert energy_score(huge)[0] == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        energy_score(logits, temperature=0)


def test_mahalanobis_equals_sklearn_ledoit_wolf() -> None:
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0]])
    labels = rng.integers(0, 2, size=60)
    features = means[labels] + rng.normal(size=(60, 3)) @ np.diag([1.0, 0.5, 2.0])
    fit = fit_class_gaussians(features, labels)
    centred = features - np.stack([features[labels == k].mean(axis=0) for k in (0, 1)])[labels]
    reference = LedoitWolf(assume_centered=True).fit(centred)
    queries = rng.normal(size=(10, 3)) * 3.0
    expected = -np.min([reference.mahalanobis(queries - fit.means[k]) for k in range(2)], axis=0)
    np.testing.assert_allclose(mahalanobis_score(queries, fit), expected, rtol=1e-9)
    assert fit.shrinkage == pytest.approx(reference.shrinkage_)
    assert (fit.n_fit, fit.classes.tolist()) == (60, [0, 1])
    near, far = mahalanobis_score(np.array([[4.0, 0.0, 1.0], [40.0, 40.0, 40.0]]), fit)
    assert near > far
    with pytest.raises(ValueError, match="features have 2 columns, the fit expects 3"):
        mahalanobis_score(np.zeros((1, 2)), fit)
    with pytest.raises(ValueError, match="at least 2 finite embeddings"):
        fit_class_gaussians(np.array([[1.0, 2.0], [np.nan, 0.0]]), [0, 1])


def test_knn_hand_computed() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 5.0], [-2.0, 0.0], [np.nan, 1.0]])
    queries = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, np.inf]])
    np.testing.assert_allclose(knn_score(reference, queries, 1)[:2], [0.0, -1.0])
    np.testing.assert_allclose(knn_score(reference, queries, 2)[:2], [-np.sqrt(2.0), -1.0])
    np.testing.assert_allclose(knn_score(reference, queries, 3)[:2], [-2.0, -1.0])
    assert np.isnan(knn_score(reference, queries, 1)[2])
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        knn_score(reference, queries, 4)


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(16, 3)
        for parameter in self.parameters():
            parameter.requires_grad_(False)  # frozen, as in the model adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1))  # type: ignore[no-any-return]


def test_odin_hand_computed_and_perturbation_helps() -> None:
    module = Linear().eval()
    images = torch.rand((5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    logits = module(images).double().numpy()
    plain = odin_score(module, images, temperature=10.0, epsilon=0.0, batch_size=2)
    np.testing.assert_allclose(plain, softmax(logits / 10.0, axis=1).max(axis=1), rtol=1e-6)
    x = images.clone().requires_grad_(True)
    loss = -torch.log_softmax(module(x) / 10.0, dim=1).max(dim=1).values.sum()
    (gradient,) = torch.autograd.grad(loss, x)
    moved = (images - 0.01 * gradient.sign()).clamp(0, 1)
    expected = softmax(module(moved).double().numpy() / 10.0, axis=1).max(axis=1)
    perturbed = odin_score(module, images, temperature=10.0, epsilon=0.01, batch_size=2)
    np.testing.assert_allclose(perturbed, expected, rtol=1e-6)
    assert (perturbed >= plain - 1e-12).all()
    with pytest.raises(ValueError, match="epsilon must be >= 0, got -1"):
        odin_score(module, images, epsilon=-1)


# --------------------------------------------------------------------------------------------
# Built-in sets


def test_synthetic_shifts() -> None:
    images = torch.rand((4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    made = {
        name: synthetic_shift(name, images, torch.Generator().manual_seed(2))
        for name in ("noise", "inverted", "blank", "corrupted")
    }
    for shifted in made.values():
        assert shifted.shape == images.shape
        assert shifted.dtype == torch.float32
        assert float(shifted.min()) >= 0.0
        assert float(shifted.max()) <= 1.0
    torch.testing.assert_close(made["inverted"], 1.0 - images)
    blank = made["blank"]
    assert blank.flatten(1).std(dim=1).max() == 0.0
    assert blank[:, 0, 0, 0].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    again = synthetic_shift("noise", images, torch.Generator().manual_seed(2))
    torch.testing.assert_close(made["noise"], again)
    assert not torch.equal(made["corrupted"], images)
    with pytest.raises(ValueError, match="unknown synthetic shift 'fog'"):
        synthetic_shift("fog", images, torch.Generator())


def test_other_modality_set_is_decoded_once_and_deduplicated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import auditkit.checks.ood.sets as sets_module

    decoded: list[Path] = []
    original = sets_module.decode_image

    def counting(path: Path, **kwargs: Any) -> Any:
        decoded.append(Path(path))
        return original(path, **kwargs)

    monkeypatch.setattr(sets_module, "decode_image", counting)
    sets_module.clear_caches()
    folder = pydicom_test_files()
    candidates = find_other_modality_files(folder)
    loaded = load_other_modality(channels=1, height=32, width=32)
    assert {m for _, m in candidates} == {"CT", "MR"}
    assert "CT_small.dcm" in loaded.files
    assert "MR_small.dcm" in loaded.files
    assert "MR_small_RLE.dcm" in loaded.duplicates  # same slice, another transfer syntax
    assert sorted(Counter(decoded).values()) == [1] * len(candidates)
    assert len(loaded.files) + len(loaded.duplicates) + len(loaded.skipped) == len(candidates)
    assert loaded.images.shape == (len(loaded.files), 1, 32, 32)
    assert set(loaded.modalities) == {"CT", "MR"}
    assert len(loaded.files) >= 20
    empty = load_other_modality(channels=3, height=8, width=8, folder=Path("/nonexistent"))
    assert empty.images.shape == (0, 3, 8, 8)
    # A second load in the same process decodes nothing and hands out its own copy.
    again = load_other_modality(channels=1, height=32, width=32)
    assert sorted(Counter(decoded).values()) == [1] * len(candidates)
    assert torch.equal(again.images, loaded.images) and again.files == loaded.files
    again.images.zero_()
    assert not torch.equal(again.images, load_other_modality(channels=1, height=32, width=32).images)
    sets_module.clear_caches()
    load_other_modality(channels=1, height=32, width=32)
    assert sorted(Counter(decoded).values()) == [2] * len(candidates)


@pytest.mark.parametrize(
    ("n_eval", "expected"),
    [(0, 0), (10, 10), (40, 32), (125, 32), (200, 50), (1000, 250), (5000, 256)],
)
def test_builtin_sets_scale_with_eval(n_eval: int, expected: int) -> None:
    assert builtin_size(n_eval, 0.25, 32, 256) == expected


# --------------------------------------------------------------------------------------------
# Plots


def test_plots_are_valid_and_reproducible(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    in_scores = {"msp": rng.normal(1, 1, 30), "knn": np.r_[rng.normal(0, 1, 29), -np.inf]}
    out_scores = {d: {"a": rng.normal(0, 1, 20), "b": rng.normal(-1, 1, 10)} for d in in_scores}
    thresholds = {"msp": 0.0}
    for name in ("one", "two"):
        score_histograms(in_scores, out_scores, thresholds, tmp_path / f"h-{name}.svg")
        roc_curves(in_scores, out_scores, tmp_path / f"r-{name}.svg")
    for kind in ("h", "r"):
        first = (tmp_path / f"{kind}-one.svg").read_bytes()
        assert first == (tmp_path / f"{kind}-two.svg").read_bytes()
        assert ET.fromstring(first).tag.endswith("svg")
    with pytest.raises(ValueError, match="at least one detector"):
        roc_curves({}, {}, tmp_path / "none.svg")


# --------------------------------------------------------------------------------------------
# The check: contract and parameters


def test_check_declares_its_contract() -> None:
    assert (OODCheck.id, OODCheck.family) == ("ood", "ood")
    needs = OODCheck.needs
    assert needs.predictions and needs.features and needs.ood
    assert not needs.train  # the runner would skip the check without a train split
    assert OODCheck.summary().startswith("Out-of-distribution detection")
    doc = OODCheck.__doc__ or ""
    for reference in (
        "Hendrycks & Gimpel 2017",
        "Liu et al. 2020",
        "Lee et al. 2018",
        "Sun et al. 2022",
        "Liang et al. 2018",
        "MEASURE 2.6",
        "MEASURE 2.5",
    ):
        assert reference in doc
    assert set(OODCheck.emits) >= {"ood.auroc", "ood.aupr", "ood.fpr_at_95_tpr"}
    params = OODCheck.Params()
    assert params.detectors == ("msp", "max_logit", "energy", "mahalanobis", "knn")
    assert params.builtin_sets == ("noise", "inverted", "blank", "corrupted", "other_modality")
    assert (params.knn_k, params.fit_fraction, params.n_boot) == (10, 0.5, 1000)
    assert OODCheck.Params(detectors=["odin", "msp"]).detectors == ("odin", "msp")
    for bad in (
        {"detectors": []},
        {"detectors": ["msp", "msp"]},
        {"detectors": ["gram"]},
        {"builtin_sets": ["fog"]},
        {"fit_fraction": 1.0},
        {"knn_k": 0},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            OODCheck.Params(**bad)


# --------------------------------------------------------------------------------------------
# The check on the demo study


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing (about a second per run); the plots have their own test."""
    import auditkit.checks.ood as ood_module

    monkeypatch.setattr(ood_module, "_plots", lambda *args: None)


def make_context(spec: AuditSpec, out: Path, roles: tuple[str, ...]) -> AuditContext:
    dataset = load_dataset(spec, roles=roles)
    return AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, out)


def run_check(ctx: AuditContext, **params: Any) -> CheckResult:
    return OODCheck().run(ctx.for_check(OODCheck), OODCheck.Params(**{**FAST, **params}))


def by_key(result: CheckResult, name: str) -> dict[tuple[str, str], Any]:
    return {(m.labels["detector"], m.labels["ood_set"]): m for m in result.metrics if m.name == name}


def finding(result: CheckResult, kind: str, **match: Any) -> dict[str, Any]:
    (found,) = [f for f in result.findings if f["kind"] == kind and all(f[k] == v for k, v in match.items())]
    return found


@pytest.fixture(scope="module")
def demo_results(demo_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One audit of the demo study with the OOD check (defaults, fast bootstrap) and the
    calibration check, which shares the eval pass."""
    from auditkit.checks.calibration import CalibrationCheck

    spec = load_spec(demo_spec).model_copy(
        update={"checks": {"ood": FAST, "calibration": {"n_boot": 20}}, "only": ["ood", "calibration"]}
    )
    out = tmp_path_factory.mktemp("ood-audit")
    outcome = run_audit(
        spec,
        RunOptions(out_dir=out, **_no_report()),
        checks={"ood": OODCheck, "calibration": CalibrationCheck},
    )
    return outcome.results


def _no_report() -> dict[str, bool]:
    """Skip the HTML/PDF report where the runner offers that (slow and not under test)."""
    fields = RunOptions.__dataclass_fields__
    return {k: False for k in ("report", "pdf") if k in fields}


def test_demo_far_ood_sets_are_detected(demo_results: dict[str, Any]) -> None:
    (record,) = [c for c in demo_results["checks"] if c["id"] == "ood"]
    assert record["status"] == "ok", record["error"]
    aurocs: dict[str, list[float]] = {}
    for metric in record["metrics"]:
        assert metric["name"] in OODCheck.emits
        if metric["name"] == "ood.auroc":
            aurocs.setdefault(metric["labels"]["ood_set"], []).append(metric["value"])
    assert set(aurocs) == {f"builtin:{s}" for s in OODCheck.Params().builtin_sets}
    for far in FAR_OOD:
        assert max(aurocs[far]) >= 0.95, (far, aurocs[far])
    recommended = [m for m in record["metrics"] if m["name"] == "ood.recommended_auroc"]
    assert {m["labels"]["ood_set"] for m in recommended} == set(aurocs)
    (choice,) = [f for f in record["findings"] if f["kind"] == "recommended_detector"]
    assert all(m["labels"]["detector"] == choice["detector"] for m in recommended)
    (accuracy,) = [m for m in record["metrics"] if m["name"] == "ood.selective_accuracy"]
    assert accuracy["value"] == choice["selective_accuracy"]
    (coverage,) = [m for m in record["metrics"] if m["name"] == "ood.coverage"]
    assert coverage["value"] >= 0.95
    json.dumps(record, allow_nan=False)


def test_demo_runs_no_extra_eval_pass(demo_results: dict[str, Any]) -> None:
    per_split = demo_results["run"]["images_forwarded_per_split"]
    n_eval = demo_results["data"]["splits"]["eval"]["n_images"]
    assert per_split["eval"] == n_eval  # the shared pass only, though two checks read it
    (record,) = [c for c in demo_results["checks"] if c["id"] == "ood"]
    sizes = {f["ood_set"]: f["n_images"] for f in record["findings"] if f["kind"] == "ood_set"}
    for name, size in sizes.items():
        assert per_split[f"ood:{name}"] == size  # one pass per built-in set
    params = OODCheck.Params()
    expected = builtin_size(n_eval, params.builtin_fraction, params.min_builtin_images, params.max_builtin_images)
    assert sizes["builtin:noise"] == expected
    assert sum(sizes[f"builtin:{s}"] for s in SYNTHETIC_SHIFTS) <= max(n_eval + 3, 4 * 32)
    for artifact in record["artifacts"]:
        assert artifact["media_type"] == "image/svg+xml"


@pytest.mark.usefixtures("no_plots")
def test_check_fits_on_train_when_present(demo_spec: Path, tmp_path: Path) -> None:
    spec = load_spec(demo_spec)
    ctx = make_context(spec, tmp_path, ("eval", "train"))
    result = run_check(ctx, builtin_sets=["noise"])
    reference = finding(result, "ood_reference")
    assert reference["fit_split"] == "train"
    assert reference["n_fit"] == ctx.split("train").n
    n_eval, n_noise = ctx.split("eval").n, finding(result, "ood_set")["n_images"]
    for metric in result.metrics:
        if metric.name == "ood.auroc":
            assert metric.n == n_eval + n_noise
    assert ctx.model.stats.per_split == {
        "ood:builtin:noise": n_noise,
        "eval": n_eval,
        "train": ctx.split("train").n,
    }


@pytest.mark.usefixtures("no_plots")
def test_check_falls_back_to_held_out_eval(demo_spec: Path, tmp_path: Path) -> None:
    ctx = make_context(load_spec(demo_spec), tmp_path / "a", ("eval",))
    result = run_check(ctx, builtin_sets=["noise"])
    reference = finding(result, "ood_reference")
    assert reference["fit_split"] == "eval"
    n_eval, n_held_out = ctx.split("eval").n, reference["n_held_out"]
    assert reference["n_fit"] + n_held_out == n_eval
    assert reference["split"] == "eval"
    assert set(reference["rows"]) <= set(ctx.split("eval").rows.tolist())
    assert len(reference["rows"]) == reference["n_fit"]
    aurocs = by_key(result, "ood.auroc")
    n_out = finding(result, "ood_set", ood_set="builtin:noise")["n_images"]
    assert aurocs["mahalanobis", "builtin:noise"].n == n_held_out + n_out
    assert aurocs["msp", "builtin:noise"].n == n_eval + n_out
    assert ctx.model.stats.per_split["eval"] == n_eval
    # Same seed, one more set: the noise images, the fit split and every noise metric repeat.
    again = run_check(
        make_context(load_spec(demo_spec), tmp_path / "b", ("eval",)),
        builtin_sets=["blank", "noise"],
    )
    assert finding(again, "ood_reference") == reference

    def noise_metrics(r: CheckResult) -> list[dict[str, Any]]:
        return [m.to_json() for m in r.metrics if m.labels.get("ood_set") == "builtin:noise"]

    assert noise_metrics(again)[: 4 * 5] == noise_metrics(result)[: 4 * 5]
    labels = ctx.labels("eval")
    fit_rows, held_out = stratified_split(labels, 0.5, np.random.default_rng(0))
    assert set(labels[fit_rows].tolist()) == set(labels.tolist()) == set(labels[held_out].tolist())
    assert sorted(np.r_[fit_rows, held_out].tolist()) == list(range(labels.size))


@pytest.mark.usefixtures("no_plots")
def test_odin_is_opt_in_and_counts_its_passes(demo_spec: Path, tmp_path: Path) -> None:
    ctx = make_context(load_spec(demo_spec), tmp_path, ("eval",))
    result = run_check(ctx, detectors=["msp", "odin"], builtin_sets=["noise"])
    n_eval = ctx.split("eval").n
    odin = finding(result, "odin")
    assert odin["gradient_passes"] == {"eval": n_eval, "ood:builtin:noise": n_eval}
    assert {m.labels["detector"] for m in result.metrics if m.name == "ood.auroc"} == {
        "msp",
        "odin",
    }
    assert all(m.value is not None for m in result.metrics)
    assert ctx.model.stats.per_split["eval"] == n_eval  # ODIN's passes are not the shared pass


@pytest.mark.usefixtures("no_plots")
def test_check_skips_without_any_ood_set(demo_spec: Path, tmp_path: Path) -> None:
    ctx = make_context(load_spec(demo_spec), tmp_path, ("eval",))
    with pytest.raises(Skip, match="no out-of-distribution sets"):
        run_check(ctx, builtin_sets=[])


def test_check_without_embeddings_and_with_non_finite_logits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    in_logits = torch.from_numpy(rng.normal(size=(40, 2)) * 3.0).float()
    in_logits[0] = float("nan")
    out_logits = torch.from_numpy(rng.normal(size=(20, 2))).float()
    ctx = testing.make_context(
        rng.integers(0, 2, 40),
        logits=in_logits,
        ood={"other_site": {"labels": np.full(20, -1), "logits": out_logits}},
        check=OODCheck,
        out_dir=tmp_path,
    )
    result = OODCheck().run(ctx, OODCheck.Params(builtin_sets=[], n_boot=20))
    metrics = by_key(result, "ood.auroc")
    assert set(metrics) == {(d, "other_site") for d in OODCheck.Params().detectors}
    for detector in ("mahalanobis", "knn"):
        assert metrics[detector, "other_site"].value is None
        assert "embeddings unavailable" in (metrics[detector, "other_site"].reason or "")
    msp = metrics["msp", "other_site"]
    assert msp.value is not None
    assert msp.n == 60
    assert finding(result, "non_finite_scores", detector="msp") == {
        "kind": "non_finite_scores",
        "detector": "msp",
        "split": "eval",
        "count": 1,
    }
    assert finding(result, "recommended_detector")["detector"] in ("msp", "max_logit", "energy")
    assert {a.name for a in result.artifacts} == {"score_histograms", "roc_curves"}
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)


# --------------------------------------------------------------------------------------------
# A user OOD manifest with broken rows


def write_ood_study(demo_spec: Path, root: Path) -> tuple[Path, list[str]]:
    """Copy the demo study and add an OOD manifest whose rows 1 and 3 are broken."""
    study = root / "study"
    shutil.copytree(demo_spec.parent, study)
    ood = study / "ood"
    ood.mkdir()
    pydicom_files = pydicom_test_files()
    shutil.copyfile(pydicom_files / "CT_small.dcm", ood / "ct.dcm")
    shutil.copyfile(pydicom_files / "MR_small.dcm", ood / "mr.dcm")
    first_image = sorted((study / "images").glob("*.dcm"))[0].read_bytes()
    (ood / "truncated.dcm").write_bytes(first_image[: len(first_image) // 3])
    (ood / "notes.dcm").write_text("not an image, just a note\n", encoding="utf-8")
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.uniform(size=(48, 48)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(ood / f"noise{i}.png")
    rows = [
        "ct.dcm",
        "truncated.dcm",
        "mr.dcm",
        "notes.dcm",
        "noise0.png",
        "noise1.png",
        "noise2.png",
    ]
    (study / "ood.csv").write_text("path\n" + "".join(f"ood/{r}\n" for r in rows), encoding="utf-8")
    spec = yaml.safe_load((study / "audit.yaml").read_text(encoding="utf-8"))
    spec["data"]["ood"] = {"scanner_b": {"manifest": "ood.csv"}}
    spec["checks"] = {"ood": {**FAST, "builtin_sets": ["other_modality"]}}
    (study / "audit.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return study / "audit.yaml", [str((ood / r).resolve()) for r in rows]


@pytest.mark.usefixtures("no_plots")
def test_user_ood_manifest_with_broken_rows(demo_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import auditkit.checks.ood.sets as sets_module
    import auditkit.data as data_module

    decoded: Counter[str] = Counter()
    lock = threading.Lock()

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def decode(path: Path, **kwargs: Any) -> Any:
            with lock:
                decoded[str(Path(path).resolve())] += 1
            return original(path, **kwargs)

        return decode

    monkeypatch.setattr(data_module, "decode_image", counting(data_module.decode_image))
    monkeypatch.setattr(sets_module, "decode_image", counting(sets_module.decode_image))
    spec_path, ood_paths = write_ood_study(demo_spec, tmp_path)
    outcome = run_audit(
        load_spec(spec_path),
        RunOptions(out_dir=tmp_path / "out", **_no_report()),
        checks={"ood": OODCheck},
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results == json.loads(json.dumps(outcome.results))

    quarantined = [q for q in results["data"]["quarantine"] if q["split"] == "ood:scanner_b"]
    assert sorted(q["row"] for q in quarantined) == [1, 3]
    assert all(q["reason"] for q in quarantined)
    assert results["data"]["splits"]["ood:scanner_b"]["n_images"] == 5

    assert all(decoded[p] == 1 for p in ood_paths), decoded  # broken rows too: decoded once
    assert max(decoded.values()) == 1  # eval and the other-modality files as well

    (record,) = [c for c in results["checks"] if c["id"] == "ood"]
    assert record["status"] == "ok", record["error"]
    (user_set,) = [f for f in record["findings"] if f.get("ood_set") == "scanner_b"]
    assert (user_set["n_images"], user_set["n_quarantined"]) == (5, 2)
    n_eval = results["data"]["splits"]["eval"]["n_images"]
    user_metrics = [m for m in record["metrics"] if m["labels"].get("ood_set") == "scanner_b"]
    assert len(user_metrics) == 4 * len(OODCheck.Params().detectors) + 2
    for metric in user_metrics:
        assert metric["value"] is not None
        if metric["name"] == "ood.auroc" and metric["labels"]["detector"] in ("msp", "max_logit"):
            assert metric["n"] == n_eval + 5
    per_split = results["run"]["images_forwarded_per_split"]
    assert per_split["eval"] == n_eval
    assert per_split["ood:scanner_b"] == 5


# --------------------------------------------------------------------------------------------
# Bootstrap from row multiplicities (scores sorted once) equals the per-resample row functions


def study_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """In- and out-of-distribution scores: continuous, or heavily tied; -inf in both kinds."""
    rng = np.random.default_rng(seed)
    n_in, n_out = (int(v) for v in rng.integers(1, 50, size=2))
    if seed % 2:
        in_scores = rng.integers(-1, 4, n_in).astype(float)
        out_scores = rng.integers(-1, 3, n_out).astype(float)
    else:
        in_scores, out_scores = rng.normal(1.0, 1.0, n_in), rng.normal(0.0, 1.0, n_out)
    in_scores[rng.random(n_in) < 0.1] = -np.inf
    out_scores[rng.random(n_out) < 0.2] = -np.inf
    return in_scores, out_scores


def copies_apart(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Sort keys of the resamples ``scores[idx]`` in which a lone row's copies are not ties.

    Dense ranks keep the order and the ties of the sample; the k-th copy of a row whose score no
    other row shares is moved up by ``k / (n + 1)`` of a rank, so its copies rank consecutively
    without crossing another score (the bootstrap convention of the AUPRs).
    """
    _, dense, multiplicity = np.unique(scores, return_inverse=True, return_counts=True)
    alone = multiplicity[dense] == 1
    copy_number = np.zeros(idx.shape)
    for b, row in enumerate(idx):
        seen: dict[int, int] = {}
        for j, r in enumerate(row.tolist()):
            copy_number[b, j] = seen.get(r, 0)
            seen[r] = seen.get(r, 0) + 1
    return dense[idx] + np.where(alone[idx], copy_number / (scores.size + 1), 0.0)


def old_separation_intervals(
    in_scores: np.ndarray, out_scores: np.ndarray, *, n_boot: int, seed: int, tpr: float = 0.95
) -> dict[str, tuple[float, float] | None]:
    """The intervals as computed before the sort-once bootstrap: every resample re-sorted."""
    n_in = in_scores.size
    combined = np.r_[in_scores, out_scores]
    is_in = np.arange(combined.size) < n_in
    statistics = {
        "auroc": lambda idx: auroc_rows(combined[idx], n_in),
        "aupr_out": lambda idx: average_precision_rows(-copies_apart(combined, idx), ~is_in),
        "aupr_in": lambda idx: average_precision_rows(copies_apart(combined, idx), is_in),
        "fpr_at_tpr": lambda idx: fpr_at_tpr_rows(combined[idx[:, :n_in]], combined[idx[:, n_in:]], tpr),
    }
    strata = (~is_in).astype(np.int8)
    return bootstrap_cis(
        statistics, combined.size, n_boot=n_boot, rng=np.random.default_rng(seed), strata=strata, bounds=(0.0, 1.0)
    )


def assert_intervals_equal(
    new: dict[str, tuple[float, tuple[float, float] | None]], old: dict[str, tuple[float, float] | None]
) -> None:
    assert new.keys() == old.keys()
    for name, (_, interval) in new.items():
        expected = old[name]
        assert (interval is None) == (expected is None), name
        if interval is not None and expected is not None:
            np.testing.assert_allclose(interval, expected, rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("tpr", [0.5, 0.95, 1.0])
def test_weighted_statistics_equal_the_row_functions(seed: int, tpr: float) -> None:
    in_scores, out_scores = study_scores(seed)
    n_in = in_scores.size
    combined = np.r_[in_scores, out_scores]
    is_in = np.arange(combined.size) < n_in
    idx = bootstrap_indices(combined.size, n_boot=100, rng=np.random.default_rng(seed), strata=(~is_in).astype(np.int8))
    counts = resample_counts(idx, combined.size)
    resampled = combined[idx]
    pairs = {
        "auroc": (auroc_from_counts(combined, is_in, counts), auroc_rows(resampled, n_in)),
        "aupr_in": (
            average_precision_from_counts(combined, is_in, counts),
            average_precision_rows(copies_apart(combined, idx), is_in),
        ),
        "aupr_out": (
            average_precision_from_counts(-combined, ~is_in, counts),
            average_precision_rows(-copies_apart(combined, idx), ~is_in),
        ),
        "fpr_at_tpr": (
            fpr_at_tpr_from_counts(combined, is_in, counts, tpr),
            fpr_at_tpr_rows(resampled[:, :n_in], resampled[:, n_in:], tpr),
        ),
    }
    for name, (weighted, per_row) in pairs.items():
        assert weighted.shape == (100,)
        np.testing.assert_allclose(weighted, per_row, rtol=0, atol=1e-12, err_msg=name)
    # The identity resample gives the point values.
    identity = np.ones((1, combined.size), dtype=np.intp)
    assert fpr_at_tpr_from_counts(combined, is_in, identity, tpr)[0] == fpr_at_tpr(in_scores, out_scores, tpr)
    assert average_precision_from_counts(combined, is_in, identity)[0] == pytest.approx(
        aupr(in_scores, out_scores, positive="in"), abs=1e-12
    )


def test_average_precision_of_a_resample_ranks_a_lone_rows_copies_apart() -> None:
    # In-distribution rows are the positives of AUPR-In, ranked by descending score.
    scores = np.array([0.9, 0.1, 0.5])
    is_in = np.array([True, True, False])
    # The sample: 0.9 (in), 0.5 (out), 0.1 (in): precisions 1 and 2/3.
    assert average_precision_from_counts(scores, is_in, np.ones((1, 3), dtype=np.intp))[0] == pytest.approx(5 / 6)
    # A resample without row 0 and with row 1 twice: 0.5 (out), 0.1, 0.1. The two copies of the
    # lone row 1 rank one after the other (precisions 1/2 and 2/3), not as a tie that gives both
    # the precision after the last copy (2/3 and 2/3).
    resample = np.array([[0, 2, 1]])
    assert average_precision_from_counts(scores, is_in, resample)[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Rows that share a score in the sample are one tie group, copies included, as in the
    # point estimate: 0.1 (in, twice) tied with 0.1 (out).
    tied = np.array([0.9, 0.1, 0.1])
    assert average_precision_from_counts(tied, is_in, np.ones((1, 3), dtype=np.intp))[0] == pytest.approx(
        aupr(tied[:2], tied[2:], positive="in")
    )
    assert average_precision_from_counts(tied, is_in, resample)[0] == pytest.approx(2 / 3)


def test_a_detector_that_ranks_every_ood_image_first_gets_an_interval_around_its_value() -> None:
    # The demo's ood.aupr of msp on builtin:inverted: every inverted image scored as more
    # in-distribution than every eval image, so AUPR-Out is the least its set sizes allow. Copies
    # treated as ties put every resample above it (percentile interval [0.3204, 0.3381] for
    # 0.3190). Ranked apart, every resample has the same order of classes, hence the same value
    # (up to the rounding of its sum).
    rng = np.random.default_rng(0)
    in_scores, out_scores = rng.normal(0.0, 1.0, 32), rng.normal(10.0, 1.0, 32)
    measured = separation_metrics(in_scores, out_scores, n_boot=300, rng=np.random.default_rng(1))
    for name in ("aupr_out", "aupr_in", "auroc", "fpr_at_tpr"):
        value, interval = measured[name]
        assert interval is not None and interval[0] <= value <= interval[1], name
        assert interval == pytest.approx((value, value), abs=1e-12), name
    assert measured["auroc"][0] == 0.0
    assert measured["aupr_out"][0] == pytest.approx(aupr(in_scores, out_scores, positive="out"))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_in=st.integers(1, 25),
    n_out=st.integers(1, 25),
    kind=st.sampled_from(["continuous", "tied", "separated"]),
)
def test_separation_intervals_contain_their_values(seed: int, n_in: int, n_out: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    if kind == "tied":
        in_scores, out_scores = rng.integers(0, 3, n_in).astype(float), rng.integers(0, 3, n_out).astype(float)
        in_scores[rng.random(n_in) < 0.2] = -np.inf
    else:
        shift = 20.0 if kind == "separated" else 0.5
        in_scores, out_scores = rng.normal(0.0, 1.0, n_in), rng.normal(shift, 1.0, n_out)
    for name, (value, interval) in separation_metrics(
        in_scores, out_scores, n_boot=40, rng=np.random.default_rng(seed)
    ).items():
        if interval is not None:
            assert 0.0 <= interval[0] <= value <= interval[1] <= 1.0, (name, value, interval)


def test_weighted_statistics_of_a_resample_without_a_class_are_undefined() -> None:
    scores = np.array([1.0, 2.0, 0.0, -np.inf])
    is_in = np.array([True, True, False, False])
    counts = np.array([[2, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(np.isnan(average_precision_from_counts(scores, is_in, counts)), [False, True, False])
    np.testing.assert_array_equal(np.isnan(fpr_at_tpr_from_counts(scores, is_in, counts)), [True, True, False])
    np.testing.assert_array_equal(np.isnan(auroc_from_counts(scores, is_in, counts)), [True, True, False])


@pytest.mark.parametrize("seed", range(6))
def test_separation_metrics_intervals_equal_the_old_bootstrap(seed: int) -> None:
    in_scores, out_scores = study_scores(seed)
    new = separation_metrics(in_scores, out_scores, n_boot=300, rng=np.random.default_rng(seed))
    assert_intervals_equal(new, old_separation_intervals(in_scores, out_scores, n_boot=300, seed=seed))
    expected_points = {
        "auroc": auroc(in_scores, out_scores),
        "aupr_out": aupr(in_scores, out_scores, positive="out"),
        "aupr_in": aupr(in_scores, out_scores, positive="in"),
        "fpr_at_tpr": fpr_at_tpr(in_scores, out_scores),
    }
    assert {name: value for name, (value, _) in new.items()} == expected_points


def test_separation_metrics_blocks_equal_the_old_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditkit import stats

    in_scores, out_scores = study_scores(3)
    n = in_scores.size + out_scores.size
    # Several index blocks from bootstrap_cis (the shared replicates must follow each one) and,
    # within each, several blocks of resamples.
    monkeypatch.setattr(stats, "_MAX_BLOCK_ELEMENTS", 40 * n)
    monkeypatch.setattr(ood_metrics, "_MAX_BLOCK_ELEMENTS", 7 * n)
    new = separation_metrics(in_scores, out_scores, n_boot=150, rng=np.random.default_rng(5), tpr=0.8)
    assert_intervals_equal(new, old_separation_intervals(in_scores, out_scores, n_boot=150, seed=5, tpr=0.8))


def test_rgb_channels_last_inputs_score_as_contiguous_ones() -> None:
    # The engine runs convolutional models channels_last; for three channels that layout is not
    # the contiguous one. The synthetic shifts and ODIN (which takes input gradients) must not
    # depend on it.
    from auditkit.fixtures.models import tiny_cnn

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    channels_last = images.contiguous(memory_format=torch.channels_last)
    for name in SYNTHETIC_SHIFTS:
        expected = synthetic_shift(name, images, torch.Generator().manual_seed(1))
        got = synthetic_shift(name, channels_last, torch.Generator().manual_seed(1))
        assert torch.equal(got, expected), name
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=2, in_channels=3).eval()
    expected_odin = odin_score(model, images, epsilon=0.01)
    model = model.to(memory_format=torch.channels_last)
    for batch in (images, channels_last):
        np.testing.assert_allclose(odin_score(model, batch, epsilon=0.01), expected_odin, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Multi-label and regression models


def test_multilabel_scores_hand_computed() -> None:
    logits = np.array([[0.0, 2.0, -1.0], [-3.0, -3.0, -3.0], [1000.0, -1000.0, 0.0], [np.nan, 0.0, 0.0]])
    sigmoid = 1.0 / (1.0 + np.exp(-np.array([2.0, -3.0])))
    np.testing.assert_allclose(max_sigmoid_score(logits)[:3], [sigmoid[0], sigmoid[1], 1.0])
    # -E(x) = sum_k log(1 + exp(z_k)): the free energies of the per-label two-class logits [0, z_k].
    expected = [
        math.log(2.0) + math.log1p(math.exp(2.0)) + math.log1p(math.exp(-1.0)),
        3 * math.log1p(math.exp(-3.0)),
        1000.0 + math.log(2.0),  # exact for large logits: no overflow
    ]
    np.testing.assert_allclose(joint_energy_score(logits)[:3], expected, rtol=1e-12)
    two_class = np.stack([np.zeros_like(logits[:3]), logits[:3]], axis=2)
    np.testing.assert_allclose(
        joint_energy_score(logits)[:3], [sum(energy_score(row)) for row in two_class], rtol=1e-12
    )
    assert np.isnan(max_sigmoid_score(logits)[3]) and np.isnan(joint_energy_score(logits)[3])


def multilabel_study(n: int, rng: np.random.Generator, *, shifted: bool = False) -> dict[str, Any]:
    """Images with one dominant finding of four: confident logits, embeddings near that finding's
    centre. ``shifted``: embeddings far from every centre and no confident logit (unknown labels)."""
    centres = 3.0 * np.eye(4, 16)
    finding_of = rng.integers(0, 4, size=n)
    if shifted:
        features = 4.0 + rng.normal(scale=0.5, size=(n, 16))
        logits = rng.normal(-0.5, 0.5, size=(n, 4))
        return {"labels": np.full((n, 4), -1), "logits": logits, "features": features}
    features = centres[finding_of] + rng.normal(scale=0.5, size=(n, 16))
    logits = np.where(np.eye(4, dtype=bool)[finding_of], 4.0, -3.0) + rng.normal(scale=0.5, size=(n, 4))
    labels = np.eye(4, dtype=np.int64)[finding_of]
    labels[rng.uniform(size=(n, 4)) < 0.1] = -1
    return {"labels": labels, "logits": logits, "features": features}


@pytest.mark.usefixtures("no_plots")
def test_multilabel_check_finds_a_planted_shift_and_passes_its_twin(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    study, train = multilabel_study(200, rng), multilabel_study(200, rng)
    twin = multilabel_study(80, rng)
    twin["labels"] = np.full((80, 4), -1)
    ctx = testing.make_context(
        study["labels"], logits=study["logits"], features=study["features"], task="multilabel",
        train=train, ood={"shifted": multilabel_study(80, rng, shifted=True), "twin": twin},
        check=OODCheck, out_dir=tmp_path,
    )  # fmt: skip
    detectors = ("msp", "max_logit", "energy", "mahalanobis", "knn", "odin")
    result = OODCheck().run(ctx, OODCheck.Params(builtin_sets=[], detectors=detectors, n_boot=100))
    aurocs = by_key(result, "ood.auroc")
    for detector in detectors[:5]:
        assert (aurocs[detector, "shifted"].value or 0.0) > 0.95, detector
        twin_auroc = aurocs[detector, "twin"]
        assert twin_auroc.value is not None and twin_auroc.ci is not None
        assert twin_auroc.ci[0] < 0.5 < twin_auroc.ci[1] and abs(twin_auroc.value - 0.5) < 0.12, detector

    # msp and energy are the multi-label scores: max sigmoid and the joint energy, as sklearn sees them.
    # On the twin too, where the ranking is not trivial (softmax and logsumexp would rank otherwise).
    in_logits = ctx.predictions("eval").logits.double().numpy()
    multilabel_scores = {
        "msp": lambda z: (1.0 / (1.0 + np.exp(-z))).max(axis=1),
        "energy": lambda z: np.log1p(np.exp(z)).sum(axis=1),
    }
    for detector, score in multilabel_scores.items():
        for ood_set in ("shifted", "twin"):
            out_logits = ctx.predictions(f"ood:{ood_set}").logits.double().numpy()
            y = np.r_[np.ones(len(in_logits)), np.zeros(len(out_logits))]
            expected = roc_auc_score(y, np.r_[score(in_logits), score(out_logits)])
            assert aurocs[detector, ood_set].value == pytest.approx(expected, abs=1e-12), (detector, ood_set)
    scores = finding(result, "ood_scores")
    assert scores["task"] == "multilabel"
    assert "sigmoid" in scores["scores"]["msp"] and "joint energy" in scores["scores"]["energy"]
    assert "one Gaussian" in scores["scores"]["mahalanobis"]

    # ODIN assumes a softmax: not applicable, said with the task; so is selective accuracy.
    odin = aurocs["odin", "shifted"]
    assert odin.value is None and "task: multilabel" in (odin.reason or "")
    assert finding(result, "detector_not_applicable", detector="odin")["task"] == "multilabel"
    assert not [f for f in result.findings if f["kind"] == "odin"]  # no ODIN pass was made
    (selective,) = [m for m in result.metrics if m.name == "ood.selective_accuracy"]
    assert selective.value is None and "task: multilabel" in (selective.reason or "")
    (coverage,) = [m for m in result.metrics if m.name == "ood.coverage"]
    assert coverage.value is not None and coverage.value >= 0.95
    recommended = finding(result, "recommended_detector")
    assert recommended["selective_accuracy"] is None and recommended["worst_ood_set"] == "twin"
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)
    json.dumps(result.findings, allow_nan=False)

    from auditkit.policy import evaluate_rule

    metrics = [m.to_json() for m in result.metrics]
    rules = {rule.id: evaluate_rule(rule, metrics) for rule in testing.rules_for("ood").rules}
    assert rules["OOD-SELECTIVE-ACCURACY"]["status"] == "not_evaluated"
    assert "task: multilabel" in rules["OOD-SELECTIVE-ACCURACY"]["note"]
    assert rules["OOD-ALL-SETS"]["status"] == "warn"  # the twin is no shift: nothing to detect
    assert rules["OOD-ALL-SETS"]["labels"]["ood_set"] == "twin"


@pytest.mark.usefixtures("no_plots")
def test_regression_check_uses_embeddings_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def images(n: int, *, shifted: bool) -> dict[str, Any]:
        # Embeddings around one direction (the eval scanner) or another (a scanner never seen).
        direction = np.r_[np.zeros(6), np.ones(6)] if shifted else np.r_[np.ones(6), np.zeros(6)]
        features = rng.normal(size=(n, 12)) + 3.0 * direction
        age = features[:, :1] * 10.0 + 100.0  # the predicted bone age, months
        return {"labels": age + rng.normal(size=(n, 1)), "probs": age, "features": features}

    study = images(240, shifted=False)
    ood = {"other_scanner": images(60, shifted=True) | {"labels": np.full((60, 1), np.nan)}}
    ood["twin"] = images(60, shifted=False) | {"labels": np.full((60, 1), np.nan)}
    ctx = testing.make_context(
        study["labels"], probs=study["probs"], features=study["features"], task="regression",
        classes=["bone_age"], ood=ood, check=OODCheck, out_dir=tmp_path,
    )  # fmt: skip
    result = OODCheck().run(ctx, OODCheck.Params(builtin_sets=[], n_boot=100))
    aurocs = by_key(result, "ood.auroc")
    for detector in ("msp", "max_logit", "energy"):
        for ood_set in ("other_scanner", "twin"):
            metric = aurocs[detector, ood_set]
            assert metric.value is None
            assert "task: regression" in (metric.reason or "") and "no confidence" in (metric.reason or "")
        assert finding(result, "detector_not_applicable", detector=detector)["task"] == "regression"
    for detector in ("mahalanobis", "knn"):
        assert (aurocs[detector, "other_scanner"].value or 0.0) > 0.95
        assert abs((aurocs[detector, "twin"].value or 0.0) - 0.5) < 0.15
    reference = finding(result, "ood_reference")
    assert reference["fit_split"] == "eval" and reference["n_held_out"] == 120  # a random half of eval
    assert set(finding(result, "ood_scores")["scores"]) == {"mahalanobis", "knn"}
    (selective,) = [m for m in result.metrics if m.name == "ood.selective_accuracy"]
    assert selective.value is None and "task: regression" in (selective.reason or "")
    assert finding(result, "recommended_detector")["detector"] in ("mahalanobis", "knn")
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)
