"""Tests of the calibration metrics, temperature scaling and :class:`CalibrationCheck`."""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError
from scipy.special import softmax
from sklearn.metrics import brier_score_loss, log_loss

from auditkit import testing
from auditkit.check import CheckResult
from auditkit.checks.calibration import (
    CalibrationCheck,
    adaptive_calibration_error,
    binary_calibration_metrics,
    brier_score,
    calibration_metrics,
    cross_fitted_binary_temperature_probs,
    cross_fitted_temperature_probs,
    expected_calibration_error,
    fit_binary_temperature,
    fit_temperature,
    label_reliability_grid,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
    temperature_did_not_help,
)
from auditkit.checks.calibration.binary import BinaryStatistics, cluster_codes, resampled_counts
from auditkit.context import CheckView

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from netcal.metrics import ECE, MCE

METRICS = ("ece", "mce", "ace", "brier", "nll")


# --------------------------------------------------------------------------------------------
# Reference implementations and data


def loop_calibration_error(probs: np.ndarray, labels: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """Straightforward top-label ECE and MCE: bins [lo, hi), the last one closed at 1."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    ece, mce = 0.0, 0.0
    last = len(edges) - 2
    for b in range(len(edges) - 1):
        upper_ok = confidence < edges[b + 1] if b < last else confidence <= edges[b + 1]
        members = (confidence >= edges[b]) & upper_ok
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += members.mean() * gap
            mce = max(mce, gap)
    return ece, mce


def loop_ece_mce(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[float, float]:
    return loop_calibration_error(probs, labels, np.linspace(0.0, 1.0, bins + 1))


def loop_ace(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    edges = np.quantile(probs.max(axis=1), np.linspace(0.0, 1.0, bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return loop_calibration_error(probs, labels, edges)[0]


def random_probs(rng: np.random.Generator, n: int, k: int, scale: float = 2.0) -> np.ndarray:
    return softmax(rng.normal(scale=scale, size=(n, k)), axis=1)


def with_edge_rows(probs: np.ndarray, bins: int) -> np.ndarray:
    """Append rows whose top-label confidence is exactly a bin edge, or exactly 1.0."""
    k = probs.shape[1]
    edges = [e for e in np.linspace(0.0, 1.0, bins + 1) if e > 1.0 / k + 1e-9]
    rows = []
    for edge in [*edges, 1.0, 1.0]:
        row = np.full(k, (1.0 - edge) / (k - 1))
        row[len(rows) % k] = edge
        rows.append(row)
    return np.vstack([probs, np.asarray(rows)])


def netcal_top_label(metric: type, bins: int, probs: np.ndarray, labels: np.ndarray, **kw: Any) -> float:
    """netcal's value of the top-label metric.

    Multi-class: the (N, K) matrix is passed as is. Binary: netcal would measure the
    positive-class calibration of an (N, 2) matrix, so it gets the top-label confidence and the
    0/1 correctness instead (netcal's documented binary input).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if probs.shape[1] > 2:
            return float(metric(bins, **kw).measure(probs, labels))
        confidence = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(np.float64)
        return float(metric(bins, **kw).measure(confidence, correct))


# --------------------------------------------------------------------------------------------
# Cross-checks against netcal, scikit-learn and a loop


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("bins", [2, 5, 7, 10, 15, 20])
def test_ece_mce_equal_netcal_and_a_loop(k: int, bins: int) -> None:
    rng = np.random.default_rng(100 * k + bins)
    probs = with_edge_rows(random_probs(rng, 400, k), bins)
    labels = rng.integers(0, k, size=probs.shape[0])
    labels[:k] = np.arange(k)  # netcal treats a matrix as multi-class only if all labels occur

    ece = expected_calibration_error(probs, labels, bins)
    mce = maximum_calibration_error(probs, labels, bins)
    assert ece == pytest.approx(netcal_top_label(ECE, bins, probs, labels), abs=1e-6)
    assert mce == pytest.approx(netcal_top_label(MCE, bins, probs, labels), abs=1e-6)
    loop_ece, loop_mce = loop_ece_mce(probs, labels, bins)
    assert ece == pytest.approx(loop_ece, abs=1e-12)
    assert mce == pytest.approx(loop_mce, abs=1e-12)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("bins", [3, 10, 15])
def test_ace_equals_netcal_equal_mass_ece_and_a_loop(k: int, bins: int) -> None:
    rng = np.random.default_rng(7 * k + bins)
    probs = random_probs(rng, 300, k)  # continuous: no tied quantile edges, which netcal rejects
    labels = rng.integers(0, k, size=300)
    labels[:k] = np.arange(k)
    ace = adaptive_calibration_error(probs, labels, bins)
    reference = netcal_top_label(ECE, bins, probs, labels, equal_intervals=False)
    assert ace == pytest.approx(reference, abs=1e-6)
    assert ace == pytest.approx(loop_ace(probs, labels, bins), abs=1e-12)


def test_ace_tolerates_tied_confidences() -> None:
    probs = np.tile([[0.3, 0.7]], (8, 1))
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    # One occupied bin whatever the bin count: |5/8 - 0.7|.
    assert adaptive_calibration_error(probs, labels, 4) == pytest.approx(0.075)
    assert loop_ace(probs, labels, 4) == pytest.approx(0.075)


def test_brier_and_nll_equal_sklearn_binary() -> None:
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(200, 2)), axis=1)
    labels = rng.integers(0, 2, size=200)
    assert brier_score(probs, labels) == pytest.approx(brier_score_loss(labels, probs[:, 1]))
    assert negative_log_likelihood(probs, labels) == pytest.approx(log_loss(labels, probs))


def test_brier_and_nll_equal_sklearn_multiclass() -> None:
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=(200, 4)), axis=1)
    labels = rng.integers(0, 4, size=200)
    classes = [0, 1, 2, 3]
    expected_brier = np.mean(np.sum((probs - np.eye(4)[labels]) ** 2, axis=1))
    assert brier_score(probs, labels) == pytest.approx(expected_brier)
    assert brier_score(probs, labels) == pytest.approx(brier_score_loss(labels, probs, labels=classes))
    assert negative_log_likelihood(probs, labels) == pytest.approx(log_loss(labels, probs, labels=classes))


def test_nll_clips_a_zero_probability() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    labels = np.array([1, 0])
    expected = (-math.log(np.finfo(np.float64).eps) + math.log(2.0)) / 2.0
    assert negative_log_likelihood(probs, labels) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Hand-computed cases

# Top-label confidences 0.9 (right), 0.8 (wrong), 0.6 (right), 0.7 (wrong).
TINY_PROBS = np.array([[0.1, 0.9], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
TINY_LABELS = np.array([1, 0, 0, 0])


def test_tiny_case_by_hand() -> None:
    # 4 bins of width 0.25: bin [0.5, 0.75) holds 0.6 and 0.7 (acc 0.5, conf 0.65, gap 0.15);
    # bin [0.75, 1] holds 0.8 and 0.9 (acc 0.5, conf 0.85, gap 0.35).
    assert expected_calibration_error(TINY_PROBS, TINY_LABELS, 4) == pytest.approx(0.25)
    assert maximum_calibration_error(TINY_PROBS, TINY_LABELS, 4) == pytest.approx(0.35)
    # 2 equal-mass bins split at the median 0.75: the same two pairs.
    assert adaptive_calibration_error(TINY_PROBS, TINY_LABELS, 2) == pytest.approx(0.25)
    # 4 equal-mass bins, edges 0.675, 0.75, 0.825: one sample each, gaps 0.4, 0.7, 0.8, 0.1.
    assert adaptive_calibration_error(TINY_PROBS, TINY_LABELS, 4) == pytest.approx(0.5)
    # Positive-class Brier: (0.9-1)^2 + 0.8^2 + 0.4^2 + 0.7^2 = 1.30.
    assert brier_score(TINY_PROBS, TINY_LABELS) == pytest.approx(1.30 / 4)
    expected_nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.3)) / 4
    assert negative_log_likelihood(TINY_PROBS, TINY_LABELS) == pytest.approx(expected_nll)
    assert calibration_metrics(TINY_PROBS, TINY_LABELS, bins=4, adaptive_bins=2) == pytest.approx(
        {"ece": 0.25, "mce": 0.35, "ace": 0.25, "brier": 0.325, "nll": expected_nll}
    )


def test_confidence_on_an_edge_goes_to_the_bin_it_opens_as_in_netcal() -> None:
    # With 5 bins the edges are linspace(0, 1, 6): 0.4 exactly, but 0.6000000000000001. So 0.4 and
    # 0.6 share the bin [0.4, 0.6000000000000001): accuracy 0.5, confidence 0.5, ECE 0. Naive
    # edges (0.6 opening the next bin) would give 0.5 * 0.4 + 0.5 * 0.4 = 0.4.
    probs = np.array([[0.6, 0.2, 0.2], [0.4, 0.3, 0.3], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 2])
    assert expected_calibration_error(probs[:2], labels[:2], 5) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(probs, labels, 5) == pytest.approx(
        netcal_top_label(ECE, 5, probs, labels), abs=1e-12
    )


def test_confidence_one_falls_in_the_last_bin() -> None:
    probs = np.array([[1.0, 0.0], [0.05, 0.95]])
    labels = np.array([0, 1])
    # Both in [0.9, 1]: accuracy 1, confidence 0.975.
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(0.025)
    assert maximum_calibration_error(probs, labels, 10) == pytest.approx(0.025)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(np.ones(4), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        expected_calibration_error(TINY_PROBS, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="empty"):
        expected_calibration_error(np.empty((0, 2)), np.empty(0, dtype=int))
    with pytest.raises(ValueError, match="finite"):
        brier_score(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(TINY_PROBS, TINY_LABELS, 0)


# --------------------------------------------------------------------------------------------
# Properties

probability_rows = st.integers(min_value=2, max_value=4).flatmap(
    lambda k: st.tuples(
        hnp.arrays(
            np.float64,
            st.tuples(st.integers(min_value=1, max_value=40), st.just(k)),
            elements=st.floats(min_value=-8.0, max_value=8.0),
        ),
        st.integers(min_value=0, max_value=2**32 - 1),
    )
)


@settings(max_examples=60, deadline=None)
@given(data=probability_rows, bins=st.integers(min_value=1, max_value=25))
def test_bounds_ordering_and_permutation_invariance(data: tuple[np.ndarray, int], bins: int) -> None:
    logits, seed = data
    rng = np.random.default_rng(seed)
    probs = softmax(logits, axis=1)
    labels = rng.integers(0, probs.shape[1], size=probs.shape[0])
    values = calibration_metrics(probs, labels, bins=bins)
    for name in ("ece", "mce", "ace"):
        assert 0.0 <= values[name] <= 1.0
    assert values["mce"] >= values["ece"] - 1e-12
    assert values["brier"] >= 0.0
    assert values["nll"] >= 0.0
    order = rng.permutation(probs.shape[0])
    permuted = calibration_metrics(probs[order], labels[order], bins=bins)
    assert permuted == pytest.approx(values, abs=1e-12)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_perfectly_calibrated_model_has_near_zero_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.uniform(size=200_000)
    labels = (rng.uniform(size=positive.size) < positive).astype(np.int64)
    probs = np.stack([1.0 - positive, positive], axis=1)
    assert expected_calibration_error(probs, labels) < 0.01
    assert adaptive_calibration_error(probs, labels) < 0.01


# --------------------------------------------------------------------------------------------
# Temperature scaling


def calibrated_logits(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from the model's own softmax (calibrated by construction)."""
    logits = rng.normal(scale=1.5, size=(n, k))
    cumulative = softmax(logits, axis=1).cumsum(axis=1)
    labels = (rng.uniform(size=(n, 1)) > cumulative).sum(axis=1)
    return logits, np.minimum(labels, k - 1)


def test_overconfident_model_gets_temperature_three() -> None:
    logits, labels = calibrated_logits(np.random.default_rng(0), 4000, 3)
    overconfident = 3.0 * logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(softmax(overconfident, axis=1), labels)
    after = expected_calibration_error(softmax(overconfident / temperature, axis=1), labels)
    assert after < before / 3
    # A torch tensor is accepted as is.
    assert fit_temperature(torch.from_numpy(overconfident), labels) == pytest.approx(temperature)


def test_temperature_matches_netcal_temperature_scaling() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from netcal.scaling import TemperatureScaling

        logits, labels = calibrated_logits(np.random.default_rng(1), 1000, 3)
        logits = 2.5 * logits
        # netcal fits on probabilities: log-softmax differs from the logits by a per-row
        # constant, so its optimum is the same; its "temperature" is the weight 1 / T.
        netcal = TemperatureScaling().fit(softmax(logits, axis=1), labels)
        netcal_temperature = 1.0 / float(np.asarray(netcal.temperature).ravel()[0])
    assert fit_temperature(logits, labels) == pytest.approx(netcal_temperature, rel=1e-4)


def test_cross_fitted_temperature() -> None:
    logits, labels = calibrated_logits(np.random.default_rng(2), 1000, 2)
    overconfident = 3.0 * logits
    probs_after, temperatures = cross_fitted_temperature_probs(overconfident, labels, 5, rng=np.random.default_rng(0))
    assert probs_after.shape == logits.shape
    np.testing.assert_allclose(probs_after.sum(axis=1), 1.0)
    assert len(temperatures) == 5
    assert all(2.4 < t < 3.6 for t in temperatures)
    before = expected_calibration_error(softmax(overconfident, axis=1), labels)
    assert expected_calibration_error(probs_after, labels) < before / 2
    again, temperatures_again = cross_fitted_temperature_probs(overconfident, labels, 5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again, probs_after)
    assert temperatures_again == temperatures
    with pytest.raises(ValueError, match="folds"):
        cross_fitted_temperature_probs(logits[:3], labels[:3], 5, rng=np.random.default_rng(0))


def test_reliability_diagram_is_valid_and_reproducible(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    probs = random_probs(rng, 120, 3)
    labels = rng.integers(0, 3, size=120)
    softened = softmax(np.log(probs) / 2.0, axis=1)
    first = reliability_diagram(probs, labels, 10, tmp_path / "a.svg", probs_after=softened)
    second = reliability_diagram(probs, labels, 10, tmp_path / "b.svg", probs_after=softened)
    assert ET.parse(first).getroot().tag.endswith("svg")
    assert first.read_bytes() == second.read_bytes()
    alone = reliability_diagram(probs, labels, 10, tmp_path / "c.svg")
    assert ET.parse(alone).getroot().tag.endswith("svg")
    assert alone.read_bytes() != first.read_bytes()


# --------------------------------------------------------------------------------------------
# The check on a fake context


def make_context(tmp_path: Path, logits: np.ndarray, labels: np.ndarray, groups: dict[str, np.ndarray]) -> CheckView:
    """The kit's in-memory context, held to the calibration check's needs."""
    classes = [f"class{i}" for i in range(logits.shape[1])]
    return testing.make_context(
        labels, logits=logits, groups=groups, classes=classes, check=CalibrationCheck, out_dir=tmp_path
    )


def study(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    logits, labels = calibrated_logits(rng, n, 2)
    groups = {
        "sex": rng.choice(["F", "M"], size=n),
        "site": np.array(["A"] * (n // 2) + ["B"] * (n - n // 2 - 6) + ["C"] * 6),
    }
    return 3.0 * logits, labels, groups  # overconfident


def run_check(ctx: CheckView, **params: Any) -> CheckResult:
    check = CalibrationCheck()
    return check.run(ctx, CalibrationCheck.Params(**params))


def metrics_json(result: CheckResult) -> str:
    return json.dumps([m.to_json() for m in result.metrics], allow_nan=False, sort_keys=True)


def test_check_declares_its_contract() -> None:
    assert CalibrationCheck.id == "calibration"
    assert CalibrationCheck.family == "calibration"
    assert CalibrationCheck.needs.predictions
    assert CalibrationCheck.summary().startswith("Calibration")
    doc = CalibrationCheck.__doc__ or ""
    for reference in ("Guo et al. 2017", "Naeini et al. 2015", "Nixon et al. 2019", "MEASURE 2.5"):
        assert reference in doc
    params = CalibrationCheck.Params()
    assert (params.bins, params.adaptive_bins, params.n_boot) == (15, None, 1000)
    assert (params.temperature_folds, params.min_group_size) == (5, 10)
    for bad in ({"bins": 1}, {"temperature_folds": 1}, {"n_boot": -1}, {"unknown": 3}):
        with pytest.raises(ValidationError):
            CalibrationCheck.Params(**bad)


def test_check_run_emits_every_metric_with_intervals(tmp_path: Path) -> None:
    logits, labels, groups = study()
    result = run_check(make_context(tmp_path, logits, labels, groups), n_boot=200)
    by_key = {(m.name, tuple(sorted(m.labels.items()))): m for m in result.metrics}

    for name in METRICS:
        overall = by_key[(f"calibration.{name}", ())]
        assert overall.n == 300
        assert overall.direction == "lower_is_better"
        assert overall.value is not None
        assert overall.ci is not None
        for column, group in [("sex", "F"), ("sex", "M"), ("site", "A"), ("site", "B")]:
            metric = by_key[(f"calibration.{name}", (("group", group), ("group_by", column)))]
            assert metric.value is not None
            assert metric.ci is not None
        small = by_key[(f"calibration.{name}", (("group", "C"), ("group_by", "site")))]
        assert (small.n, small.ci) == (6, None)
        assert small.value is not None
    assert len(result.metrics) == 5 * (1 + 2 + 3) + 1

    after = by_key[("calibration.ece_after_temperature", ())]
    before = by_key[("calibration.ece", ())]
    assert after.value is not None
    assert before.value is not None
    assert after.value < before.value
    assert after.ci is not None

    for metric in result.metrics:
        if metric.ci is not None:
            assert metric.value is not None
            assert metric.ci[0] <= metric.value <= metric.ci[1], metric
    metrics_json(result)  # raises on NaN

    # Scaling an overconfident model helps: no finding says otherwise.
    assert not [f for f in result.findings if f["kind"] == "temperature_scaling_did_not_help"]
    (scaling,) = [f for f in result.findings if f["kind"] == "temperature_scaling"]
    assert scaling["folds"] == 5
    assert len(scaling["fold_temperatures"]) == 5
    assert 2.0 < scaling["temperature"] < 4.5
    json.dumps(result.findings, allow_nan=False)

    (artifact,) = result.artifacts
    assert artifact.name == "reliability_diagram"
    assert artifact.media_type == "image/svg+xml"
    assert artifact.path == "artifacts/calibration/reliability.svg"
    assert ET.parse(tmp_path / artifact.path).getroot().tag.endswith("svg")


def test_check_run_is_deterministic(tmp_path: Path) -> None:
    logits, labels, groups = study(n=120)
    first = run_check(make_context(tmp_path / "a", logits, labels, groups), n_boot=100)
    second = run_check(make_context(tmp_path / "b", logits, labels, groups), n_boot=100)
    assert metrics_json(first) == metrics_json(second)
    assert first.findings == second.findings
    path = first.artifacts[0].path
    assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


def test_check_excludes_non_finite_logits(tmp_path: Path) -> None:
    logits, labels, groups = study(n=100)
    logits[3] = np.nan
    logits[10, 0] = np.inf
    groups["scanner"] = np.array(["x"] * 2 + ["y"] * 98)
    logits[:2] = np.nan  # every image of scanner "x"
    result = run_check(make_context(tmp_path, logits, labels, groups), n_boot=50)
    assert {"kind": "non_finite_logits", "split": "eval", "count": 4} in result.findings
    ece = next(m for m in result.metrics if m.name == "calibration.ece" and not m.labels)
    assert ece.n == 96
    assert ece.value is not None
    scanner_x = [m for m in result.metrics if m.labels.get("group") == "x"]
    assert len(scanner_x) == 5
    assert all(m.value is None and m.reason and "non-finite" in m.reason for m in scanner_x)
    metrics_json(result)


def test_check_all_logits_non_finite(tmp_path: Path) -> None:
    logits, labels, groups = study(n=20)
    logits[:] = np.nan
    result = run_check(make_context(tmp_path, logits, labels, groups), n_boot=50)
    assert all(m.value is None and m.reason for m in result.metrics)
    overall = next(m for m in result.metrics if m.name == "calibration.ece" and not m.labels)
    assert overall.reason == "the logits of all 20 images are non-finite"
    assert {"kind": "non_finite_logits", "split": "eval", "count": 20} in result.findings
    assert result.artifacts == []
    metrics_json(result)


def test_check_empty_split(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, np.empty((0, 2)), np.empty(0, dtype=np.int64), {})
    result = run_check(ctx)
    assert {m.name for m in result.metrics} == {f"calibration.{n}" for n in METRICS} | {
        "calibration.ece_after_temperature"
    }
    assert all(m.value is None and m.reason == "no eval images" for m in result.metrics)
    assert result.artifacts == []
    metrics_json(result)


def test_check_too_few_images_for_folds(tmp_path: Path) -> None:
    logits, labels, _ = study(n=4)
    result = run_check(make_context(tmp_path, logits, labels, {}), n_boot=20)
    after = next(m for m in result.metrics if m.name == "calibration.ece_after_temperature")
    assert after.value is None
    assert after.reason is not None
    assert "too few" in after.reason
    ece = next(m for m in result.metrics if m.name == "calibration.ece")
    assert ece.value is not None
    assert ece.n == 4


def test_check_without_bootstrap(tmp_path: Path) -> None:
    logits, labels, groups = study(n=60)
    result = run_check(make_context(tmp_path, logits, labels, groups), n_boot=0)
    assert all(m.ci is None for m in result.metrics)
    assert all(m.value is not None for m in result.metrics)


# --------------------------------------------------------------------------------------------
# When temperature scaling does not help


def test_calibrated_model_cross_fitting_is_unbiased_on_average() -> None:
    # The cross-fitted estimate works as intended: on calibrated logits (nothing to fix) the
    # ECE after scaling is about as often above as below the ECE before, and not worse on
    # average; on overconfident ones it is always better.
    rises, changes = 0, []
    for seed in range(20):
        logits, labels = calibrated_logits(np.random.default_rng(seed), 300, 2)
        before = expected_calibration_error(softmax(logits, axis=1), labels)
        after, _ = cross_fitted_temperature_probs(logits, labels, 5, rng=np.random.default_rng(seed))
        changes.append(expected_calibration_error(after, labels) - before)
        rises += changes[-1] > 0
        scaled, _ = cross_fitted_temperature_probs(3.0 * logits, labels, 5, rng=np.random.default_rng(seed))
        assert expected_calibration_error(scaled, labels) < expected_calibration_error(
            softmax(3.0 * logits, axis=1), labels
        )
    assert 3 <= rises <= 17
    assert abs(float(np.mean(changes))) < 0.01


def test_a_calibrated_model_gets_a_finding_when_scaling_raises_the_ece(tmp_path: Path) -> None:
    # Logits drawn from their own softmax: calibrated by construction, so temperature scaling
    # cannot help; this seed is one where the cross-fitted ECE comes out higher.
    logits, labels = calibrated_logits(np.random.default_rng(1), 300, 2)
    result = run_check(make_context(tmp_path, logits, labels, {}), n_boot=200)
    overall = {m.name: m for m in result.metrics if not m.labels}
    before, after = overall["calibration.ece"].value, overall["calibration.ece_after_temperature"].value
    assert before is not None and after is not None and after > before

    (scaling,) = [f for f in result.findings if f["kind"] == "temperature_scaling"]
    (finding,) = [f for f in result.findings if f["kind"] == "temperature_scaling_did_not_help"]
    assert (finding["ece"], finding["ece_after_temperature"]) == (before, after)
    assert finding["increase"] == pytest.approx(after - before)
    assert finding["temperature"] == scaling["temperature"] == pytest.approx(1.0, abs=0.1)
    assert finding["fold_temperatures"] == scaling["fold_temperatures"]
    assert (finding["n"], finding["bins"]) == (300, 15)
    low, high = finding["increase_ci"]
    assert low <= 0.0 <= high and low <= finding["increase"] <= high
    causes = [c["cause"] for c in finding["likely_causes"]]
    assert "already_calibrated" in causes and "ece_binning_noise" in causes
    assert "not_uniform_miscalibration" not in causes
    assert all(c["detail"] for c in finding["likely_causes"])
    assert f"{after:.4f}" in finding["detail"] and f"{before:.4f}" in finding["detail"]
    json.dumps(result.findings, allow_nan=False)
    # The interval of the after-scaling ECE contains it, as every interval does.
    ci = overall["calibration.ece_after_temperature"].ci
    assert ci is not None and ci[0] <= after <= ci[1]


def test_a_real_rise_is_put_down_to_miscalibration_scaling_cannot_fix() -> None:
    # Before: calibrated. "After": every confidence pushed to 0.99, a rise far beyond the ECE's
    # noise, with a temperature far from 1 and folds that agree, so none of the benign causes
    # applies.
    logits, labels = calibrated_logits(np.random.default_rng(5), 400, 2)
    probs = softmax(logits, axis=1)
    pushed = np.where(probs.argmax(axis=1)[:, None] == np.arange(2), 0.99, 0.01)
    finding = temperature_did_not_help(
        probs, pushed, labels, 3.0, [3.0] * 5, bins=15, n_boot=200, rng=np.random.default_rng(0)
    )
    assert finding["increase"] > 0.1
    assert finding["increase_ci"][0] > 0.0
    assert [c["cause"] for c in finding["likely_causes"]] == ["not_uniform_miscalibration"]
    # Without a bootstrap the increase has no interval and binning noise cannot be judged.
    quiet = temperature_did_not_help(
        probs, pushed, labels, 1.0, [1.0] * 5, bins=15, n_boot=0, rng=np.random.default_rng(0)
    )
    assert quiet["increase_ci"] is None
    assert [c["cause"] for c in quiet["likely_causes"]] == ["already_calibrated"]


# --------------------------------------------------------------------------------------------
# Multi-label models: each label's sigmoid output calibrated as a binary classifier


def loop_binary_ece_mce(probs: np.ndarray, outcomes: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """Positive-class ECE and MCE by a plain loop over bins [lo, hi), the last one closed at 1."""
    confidence = np.clip(probs, np.finfo(np.float64).eps, 1.0 - np.finfo(np.float64).eps)
    ece, mce = 0.0, 0.0
    last = len(edges) - 2
    for b in range(len(edges) - 1):
        upper_ok = confidence < edges[b + 1] if b < last else confidence <= edges[b + 1]
        members = (confidence >= edges[b]) & upper_ok
        if members.any():
            gap = abs(outcomes[members].mean() - confidence[members].mean())
            ece += members.mean() * gap
            mce = max(mce, gap)
    return ece, mce


def netcal_binary(metric: type, bins: int, probs: np.ndarray, outcomes: np.ndarray, **kw: Any) -> float:
    """netcal's value on its binary input: 1-D probabilities of the positive outcome."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(metric(bins, **kw).measure(probs, outcomes))


@pytest.mark.parametrize("bins", [2, 5, 10, 15])
def test_binary_metrics_equal_netcal_sklearn_and_a_loop(bins: int) -> None:
    rng = np.random.default_rng(bins)
    probs = rng.beta(0.6, 2.0, size=500)
    # Probabilities exactly on every interior edge, and exactly 0 and 1.
    probs = np.r_[probs, np.linspace(0.0, 1.0, bins + 1)]
    outcomes = (rng.uniform(size=probs.size) < probs**1.3).astype(np.int64)
    values = binary_calibration_metrics(probs, outcomes, bins)
    assert values["ece"] == pytest.approx(netcal_binary(ECE, bins, probs, outcomes), abs=1e-6)
    assert values["mce"] == pytest.approx(netcal_binary(MCE, bins, probs, outcomes), abs=1e-6)
    loop_ece, loop_mce = loop_binary_ece_mce(probs, outcomes, np.linspace(0.0, 1.0, bins + 1))
    assert values["ece"] == pytest.approx(loop_ece, abs=1e-12)
    assert values["mce"] == pytest.approx(loop_mce, abs=1e-12)
    assert values["brier"] == pytest.approx(brier_score_loss(outcomes, probs), abs=1e-12)
    assert values["nll"] == pytest.approx(log_loss(outcomes, probs), abs=1e-9)
    continuous = probs[:500]  # no tied quantile edges, which netcal rejects
    assert binary_calibration_metrics(continuous, outcomes[:500], bins)["ace"] == pytest.approx(
        netcal_binary(ECE, bins, continuous, outcomes[:500], equal_intervals=False), abs=1e-6
    )


def test_binary_metrics_by_hand() -> None:
    # p = 0.1, 0.2 (bin [0, 0.5), outcomes 0, 1: frequency 0.5, mean p 0.15, gap 0.35) and
    # p = 0.7, 0.9 (bin [0.5, 1], outcomes 1, 1: frequency 1, mean p 0.8, gap 0.2).
    probs, outcomes = np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 1, 1, 1])
    values = binary_calibration_metrics(probs, outcomes, bins=2)
    assert values["ece"] == pytest.approx(0.5 * 0.35 + 0.5 * 0.2)
    assert values["mce"] == pytest.approx(0.35)
    assert values["brier"] == pytest.approx((0.01 + 0.64 + 0.09 + 0.01) / 4)
    assert values["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.9)) / 4)
    # The top-label convention would see confidences 0.9, 0.8, 0.7, 0.9: a different number.
    assert expected_calibration_error(np.c_[1 - probs, probs], outcomes, 2) != pytest.approx(values["ece"])
    with pytest.raises(ValueError, match="0 or 1"):
        binary_calibration_metrics(probs, np.array([0, 1, -1, 1]))


def test_binary_statistics_of_resamples_equal_the_expanded_resamples() -> None:
    # One implementation serves the estimate and both bootstraps: a resample given as row
    # multiplicities (image resamples, and patient resamples of varying size) gives what the
    # expanded resample gives.
    rng = np.random.default_rng(4)
    probs = rng.uniform(size=60)
    outcomes = (rng.uniform(size=60) < probs).astype(np.int64)
    stats = BinaryStatistics(probs, outcomes, bins=7, adaptive_bins=4)
    codes, n_clusters = cluster_codes([f"p{i // 3}" if i % 5 else None for i in range(60)])
    blocks = [
        *resampled_counts(60, 30, np.random.default_rng(0)),
        *resampled_counts(60, 30, np.random.default_rng(1), clusters=(codes, n_clusters)),
    ]
    sizes = set()
    for counts in blocks:
        for name, statistic in stats.batched().items():
            got = statistic(counts)
            for b, row in enumerate(counts):
                rows = np.repeat(np.arange(60), row)
                sizes.add(rows.size)
                expected = binary_calibration_metrics(probs[rows], outcomes[rows], 7, 4)[name]
                assert got[b] == pytest.approx(expected, abs=1e-12), (name, b)
    assert len(sizes) > 5  # the patient resamples differ in size


def overconfident_labels(n: int, seed: int, unknown: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, calibrated probabilities and 1/0/-1 labels of two labels drawn from their sigmoid."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-0.5, 1.5, size=(n, 2))
    truth = 1.0 / (1.0 + np.exp(-logits))
    labels = (rng.uniform(size=(n, 2)) < truth).astype(np.int64)
    labels[rng.uniform(size=(n, 2)) < unknown] = -1
    return logits, truth, labels


def multilabel_context(tmp_path: Path, probs: np.ndarray, labels: np.ndarray, **kw: Any) -> CheckView:
    return testing.make_context(
        labels, probs=probs, task="multilabel", classes=["effusion", "nodule"], check=CalibrationCheck,
        out_dir=tmp_path, **kw,
    )  # fmt: skip


def evaluate_calibration_rules(result: CheckResult) -> dict[str, dict[str, Any]]:
    from auditkit.policy import evaluate_rule

    metrics = [m.to_json() for m in result.metrics]
    return {rule.id: evaluate_rule(rule, metrics) for rule in testing.rules_for("calibration").rules}


def test_multilabel_calibrated_label_passes_and_overconfident_one_fails(tmp_path: Path) -> None:
    logits, truth, labels = overconfident_labels(3000, seed=0)
    probs = truth.copy()
    probs[:, 1] = 1.0 / (1.0 + np.exp(-3.0 * logits[:, 1]))  # nodule: overconfident
    groups = {"sex": np.random.default_rng(1).choice(["F", "M"], size=3000)}
    ctx = multilabel_context(tmp_path / "planted", probs, labels, groups=groups)
    result = run_check(ctx, n_boot=200)
    by_key = {(m.name, tuple(sorted(m.labels.items()))): m for m in result.metrics}
    probs = ctx.predictions("eval").probs  # what the check saw: sigmoid of the float32 logits

    for k, name in enumerate(["effusion", "nodule"]):
        known = labels[:, k] >= 0
        p, y = probs[known, k], labels[known, k]
        values = {metric: by_key[(f"calibration.{metric}", (("label", name),))] for metric in METRICS}
        for metric in values.values():
            assert metric.n == int(known.sum()) and metric.direction == "lower_is_better"
            assert metric.ci is not None and metric.value is not None
            assert metric.ci[0] <= metric.value <= metric.ci[1]
        # netcal's binary ECE and MCE on the label's known entries, scikit-learn's Brier and NLL.
        assert values["ece"].value == pytest.approx(netcal_binary(ECE, 15, p, y), abs=1e-6)
        assert values["mce"].value == pytest.approx(netcal_binary(MCE, 15, p, y), abs=1e-6)
        assert values["brier"].value == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        assert values["nll"].value == pytest.approx(log_loss(y, p), abs=1e-9)
        for group in ("F", "M"):
            scoped = known & (groups["sex"] == group)
            metric = by_key[("calibration.ece", (("group", group), ("group_by", "sex"), ("label", name)))]
            assert metric.value == pytest.approx(netcal_binary(ECE, 15, probs[scoped, k], labels[scoped, k]), abs=1e-6)
            assert metric.n == int(scoped.sum())
            assert ("calibration.mce", (("group", group), ("group_by", "sex"), ("label", name))) not in by_key
    calibrated = by_key[("calibration.ece", (("label", "effusion"),))]
    overconfident = by_key[("calibration.ece", (("label", "nodule"),))]
    assert calibrated.value is not None and calibrated.value < 0.05  # the noise floor of 15 bins, n = 2700
    assert overconfident.value is not None and overconfident.value > 0.1
    assert not any(m.labels == {} for m in result.metrics)  # no unlabelled aggregate

    # One temperature per label: about 3 for the overconfident one, and it helps.
    scaling = {f["label"]: f for f in result.findings if f["kind"] == "temperature_scaling"}
    assert scaling["nodule"]["temperature"] == pytest.approx(3.0, rel=0.15)
    assert scaling["effusion"]["temperature"] == pytest.approx(1.0, rel=0.15)
    after = by_key[("calibration.ece_after_temperature", (("label", "nodule"),))]
    assert after.value is not None and after.value < overconfident.value / 2
    unknown = next(f for f in result.findings if f["kind"] == "unknown_entries")
    assert unknown["counts"] == {"effusion": int((labels[:, 0] < 0).sum()), "nodule": int((labels[:, 1] < 0).sum())}
    assert next(f for f in result.findings if f["kind"] == "bootstrap")["unit"] == "image"
    metrics_json(result)
    json.dumps(result.findings, allow_nan=False)
    (artifact,) = result.artifacts
    assert ET.parse(tmp_path / "planted" / artifact.path).getroot().tag.endswith("svg")

    # The packaged policy judges every label: the overconfident one fails CAL-ECE-LABEL by name;
    # the classification rules (unlabelled) find nothing to judge.
    outcome = evaluate_calibration_rules(result)
    assert outcome["CAL-ECE-LABEL"]["status"] == "fail"
    assert outcome["CAL-ECE-LABEL"]["labels"] == {"label": "nodule"}
    assert outcome["CAL-ECE-LABEL-SUBGROUP"]["labels"]["label"] == "nodule"
    assert outcome["CAL-ECE"]["status"] == "not_evaluated"

    # The clean twin: both labels calibrated; the same rule passes.
    twin = run_check(multilabel_context(tmp_path / "twin", truth, labels, groups=groups), n_boot=0)
    assert evaluate_calibration_rules(twin)["CAL-ECE-LABEL"]["status"] == "pass"


def test_multilabel_intervals_resample_patients(tmp_path: Path) -> None:
    # Each patient's four images are the same image: a patient bootstrap sees 150 units, an image
    # bootstrap wrongly sees 600, and its intervals come out about half as wide.
    _, truth, labels = overconfident_labels(150, seed=2, unknown=0.0)
    probs, labels = np.repeat(truth, 4, axis=0), np.repeat(labels, 4, axis=0)
    patients = [f"patient{i // 4}" for i in range(600)]
    by_patient = run_check(multilabel_context(tmp_path / "p", probs, labels, patients=patients), n_boot=300)
    by_image = run_check(multilabel_context(tmp_path / "i", probs, labels), n_boot=300)
    assert next(f for f in by_patient.findings if f["kind"] == "bootstrap")["unit"] == "patient"

    def width(result: CheckResult, name: str) -> float:
        metric = next(m for m in result.metrics if m.name == name and m.labels == {"label": "effusion"})
        assert metric.ci is not None
        return metric.ci[1] - metric.ci[0]

    for name in ("calibration.brier", "calibration.nll", "calibration.ece"):
        assert width(by_patient, name) > 1.5 * width(by_image, name), name
    # Same values: only the intervals depend on the unit.
    values = {(m.name, tuple(m.labels.items())): m.value for m in by_image.metrics}
    assert all(values[(m.name, tuple(m.labels.items()))] == m.value for m in by_patient.metrics)


def test_multilabel_unknown_and_one_sided_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    probs = rng.uniform(0.01, 0.3, size=(40, 2))
    labels = np.zeros((40, 2), dtype=np.int64)
    labels[:, 0] = -1  # effusion: never recorded
    result = run_check(multilabel_context(tmp_path, probs, labels), n_boot=50)
    effusion = [m for m in result.metrics if m.labels.get("label") == "effusion"]
    assert effusion and all(m.value is None for m in effusion)
    assert all("no known entry" in (m.reason or "") and "effusion" in (m.reason or "") for m in effusion)
    # nodule: known everywhere but never present. Its probabilities can still be judged against
    # 0 (ECE = mean p), but no temperature can be fitted to one outcome.
    nodule = {m.name: m for m in result.metrics if m.labels == {"label": "nodule"}}
    assert nodule["calibration.ece"].value == pytest.approx(probs[:, 1].mean())
    assert nodule["calibration.ece_after_temperature"].value is None
    assert "no positive entry" in (nodule["calibration.ece_after_temperature"].reason or "")
    metrics_json(result)


def test_multilabel_reliability_grid_is_valid_and_reproducible(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    panels = [
        (f"finding{k}", p, (rng.uniform(size=80) < p).astype(int), p**0.8 if k % 2 else None)
        for k, p in enumerate(rng.uniform(size=(5, 80)))
    ]
    panels.append(("unrecorded", np.zeros(0), np.zeros(0), None))
    first = label_reliability_grid(panels, 10, tmp_path / "a.svg")
    second = label_reliability_grid(panels, 10, tmp_path / "b.svg")
    assert ET.parse(first).getroot().tag.endswith("svg")
    assert first.read_bytes() == second.read_bytes()


def test_binary_temperature_matches_netcal() -> None:
    rng = np.random.default_rng(6)
    logit = rng.normal(scale=1.5, size=2000)
    outcomes = (rng.uniform(size=2000) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from netcal.scaling import TemperatureScaling

        netcal = TemperatureScaling().fit(1.0 / (1.0 + np.exp(-3.0 * logit)), outcomes)
    netcal_temperature = 1.0 / float(np.asarray(netcal.temperature).ravel()[0])
    assert fit_binary_temperature(3.0 * logit, outcomes) == pytest.approx(netcal_temperature, rel=1e-4)
    after, temperatures = cross_fitted_binary_temperature_probs(3.0 * logit, outcomes, 5, rng=np.random.default_rng(0))
    assert after.shape == (2000,) and len(temperatures) == 5
    assert all(2.5 < t < 3.6 for t in temperatures)


def test_regression_is_skipped_naming_the_task() -> None:
    from auditkit.runner import SelectedCheck, execute_check

    ctx = testing.make_context([3.0, 4.5, 6.0], probs=[2.5, 5.0, 6.5], task="regression", check=CalibrationCheck)
    selected = SelectedCheck(id="calibration", cls=CalibrationCheck, params=CalibrationCheck.Params(), raw_params={})
    record = execute_check(selected, ctx._engine)
    assert record["status"] == "skipped"
    assert "task: regression" in record["reason"]
    assert "variance" in record["reason"] and "90%" in record["reason"]
    assert "regression" not in CalibrationCheck.tasks and "multilabel" in CalibrationCheck.tasks
