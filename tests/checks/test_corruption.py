"""Tests of the acquisition-shift corruptions and :class:`CorruptionCheck`."""

from __future__ import annotations

import itertools
import json
import math
import typing
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError
from scipy.stats import poisson

from auditkit.check import CheckResult
from auditkit.checks.corruption import (
    CORRUPTION_NAMES,
    CORRUPTIONS,
    CorruptionCheck,
    apply_corruption,
    binning_factors,
    bootstrap_accuracies,
    draw_randomness,
    poisson_quantile,
    relative_drop,
    severity_plot,
)
from auditkit.checks.corruption.transforms import CorruptionName
from auditkit.testing import make_context

NOISE = ("gaussian_noise", "poisson_noise", "rician_noise")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def rms_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def jpeg_dc_step(quality: float) -> int:
    """libjpeg's quantisation step of the luminance DC coefficient (base table value 16)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return max(1, min(255, int((16 * scale + 50) // 100)))


def quantisation_slack(name: str, severity: int) -> float:
    """How far the change may fall from ``severity`` to ``severity + 1`` by quantisation alone.

    Poisson counts move in whole quanta: one quantum at the lower dose (1 / N). JPEG rounds a
    flat block's mean to a multiple of the DC step / 8 (DC = 8 x mean), so a flat image can land
    closer at a coarser quality: half a DC step in mean units plus half a grey level of the 8-bit
    rounding. Every other corruption is exact up to float rounding.
    """
    corruption = CORRUPTIONS[name]
    if name == "poisson_noise":
        return 1.0 / corruption.level(severity + 1)
    if name == "jpeg" and severity >= 1:
        return (jpeg_dc_step(corruption.level(severity)) / 16 + 0.5) / 255
    return 1e-6


# --------------------------------------------------------------------------------------------
# The catalogue and the properties of every corruption


def test_catalogue_documents_every_corruption() -> None:
    assert set(typing.get_args(CorruptionName)) == set(CORRUPTION_NAMES)
    assert len(CORRUPTION_NAMES) == 11
    for name, corruption in CORRUPTIONS.items():
        assert corruption.name == name
        assert len(corruption.levels) == 5
        assert len(corruption.physics) > 80
        assert corruption.parameter
        with pytest.raises(ValueError, match="severity"):
            corruption.level(6)
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        apply_corruption(torch.zeros(1, 1, 8, 8), "snow", 1)
    with pytest.raises(ValueError, match=r"severity must be in 0\.\.5, got 6"):
        apply_corruption(torch.zeros(1, 1, 8, 8), "blur", 6)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        apply_corruption(torch.zeros(8, 8), "blur", 1)


images_strategy = st.tuples(st.integers(1, 3), st.integers(8, 20), st.integers(8, 20)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(0.0, 1.0, width=32))
)


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=images_strategy, seed=st.integers(0, 2**32))
def test_severity_zero_is_identity_and_change_grows(name: str, image: np.ndarray, seed: int) -> None:
    x = torch.from_numpy(image)[None]
    draw = draw_randomness(name, tuple(x.shape), [seed])
    assert torch.equal(apply_corruption(x, name, 0, draw=draw), x)
    previous = 0.0
    for severity in range(1, 6):
        y = apply_corruption(x, name, severity, draw=draw)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        change = rms_change(y, x)
        assert change >= previous - quantisation_slack(name, severity - 1), (severity, change)
        previous = change


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_corruption_is_deterministic_per_image(name: str) -> None:
    x = torch.rand(3, 2, 12, 10, generator=torch.Generator().manual_seed(1))
    first = apply_corruption(x, name, 3, seeds=[7, 8, 9])
    assert torch.equal(first, apply_corruption(x, name, 3, seeds=[7, 8, 9]))
    alone = apply_corruption(x[2:], name, 3, seeds=[9])  # another batch: the same image result
    torch.testing.assert_close(alone, first[2:], atol=1e-6, rtol=0)
    if CORRUPTIONS[name].draw is not None:
        assert not torch.equal(first, apply_corruption(x, name, 3, seeds=[1, 2, 3]))
    assert torch.equal(apply_corruption(x[:0], name, 3, seeds=[]), x[:0])


# --------------------------------------------------------------------------------------------
# Hand-computed values


def test_poisson_quantile_hand_values_and_scipy() -> None:
    rate = torch.tensor([0.0, 1.0, 1.0, 4.0, 4.0])
    u = torch.tensor([0.5, 0.3, 0.5, 0.9, 0.0183])
    # Poisson(1): P(0) = e^-1 = 0.368 -> the 0.3-quantile is 0, the median 1.
    # Poisson(4): CDF(6) = 0.889 < 0.9 <= CDF(7) = 0.949; CDF(0) = 0.0183 -> 0.
    assert poisson_quantile(rate, u).tolist() == [0.0, 0.0, 1.0, 7.0, 0.0]
    rng = np.random.default_rng(0)
    rates = rng.uniform(0, 2000, size=400)
    uniforms = rng.uniform(1e-9, 1 - 1e-9, size=400)
    ours = poisson_quantile(torch.from_numpy(rates), torch.from_numpy(uniforms)).numpy()
    np.testing.assert_array_equal(ours, poisson.ppf(uniforms, rates))


def test_deterministic_corruptions_hand_values() -> None:
    stripes = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    # contrast 0.8 (severity 1) pulls every pixel towards the mean 0.5 by 20 %.
    torch.testing.assert_close(apply_corruption(stripes, "contrast", 1), torch.tensor([[[[0.1, 0.9], [0.1, 0.9]]]]))
    half = torch.full((1, 1, 4, 4), 0.5)
    torch.testing.assert_close(apply_corruption(half, "gamma", 3), torch.full_like(half, 0.25))
    # A flat image is a fixed point of blur (normalised kernel, replicated edges) and of Gibbs
    # truncation (all its energy sits in the DC term, which every mask keeps).
    for name in ("blur", "gibbs_ringing", "downsample"):
        torch.testing.assert_close(apply_corruption(half, name, 5), half)


def test_downsample_bins_nested_blocks() -> None:
    assert [binning_factors(a) for a in (1, 2, 4, 8, 16, 32)] == [
        (1, 1),
        (2, 1),
        (2, 2),
        (4, 2),
        (4, 4),
        (8, 4),
    ]
    with pytest.raises(ValueError, match="power of two, got 6"):
        binning_factors(6)
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 15.0
    two_by_one = apply_corruption(x, "downsample", 1) * 15.0
    expected = torch.tensor([[2.0, 3, 4, 5], [2, 3, 4, 5], [10, 11, 12, 13], [10, 11, 12, 13]])
    torch.testing.assert_close(two_by_one[0, 0], expected)
    two_by_two = apply_corruption(x, "downsample", 2) * 15.0
    torch.testing.assert_close(two_by_two[0, 0, :2, :2], torch.full((2, 2), 2.5))
    # Partial blocks at the far edge average only the pixels present (5 rows, blocks of 2).
    ones = torch.ones(1, 1, 5, 5)
    torch.testing.assert_close(apply_corruption(ones, "downsample", 2), ones)


def test_noise_models_hand_values() -> None:
    x = torch.full((1, 1, 6, 6), 0.5)
    draw = draw_randomness("gaussian_noise", tuple(x.shape), [3])
    assert draw is not None
    sigma = CORRUPTIONS["gaussian_noise"].level(2)
    y = apply_corruption(x, "gaussian_noise", 2, draw=draw)
    torch.testing.assert_close((y - x) / sigma, draw[:, 0])
    # Rician noise on a black image is Rayleigh: sigma * sqrt(z1^2 + z2^2).
    black = torch.zeros(1, 1, 6, 6)
    draw = draw_randomness("rician_noise", tuple(black.shape), [4])
    assert draw is not None
    sigma = CORRUPTIONS["rician_noise"].level(1)
    expected = (sigma * torch.sqrt(draw[:, 0] ** 2 + draw[:, 1] ** 2)).clamp(0, 1)
    torch.testing.assert_close(apply_corruption(black, "rician_noise", 1, draw=draw), expected)
    # Quantum noise: counts of N quanta per full scale, so values are multiples of 1 / N.
    n_quanta = CORRUPTIONS["poisson_noise"].level(5)
    y = apply_corruption(x, "poisson_noise", 5, seeds=[5]) * n_quanta
    torch.testing.assert_close(y, y.round(), atol=1e-4, rtol=0)


def test_bias_field_and_spike_amplitudes() -> None:
    x = torch.full((1, 1, 16, 16), 0.3)
    amplitude = CORRUPTIONS["bias_field"].level(3)
    y = apply_corruption(x, "bias_field", 3, seeds=[2])
    log_gain = torch.log(y / x)
    assert float(log_gain.abs().max()) == pytest.approx(amplitude, rel=1e-5)
    amplitude = CORRUPTIONS["kspace_spike"].level(4)
    y = apply_corruption(x, "kspace_spike", 4, seeds=[2])
    # A whole number of grating periods: the mean is kept; the swing is amplitude * mean.
    assert float(y.mean()) == pytest.approx(0.3, abs=1e-6)
    assert float((y - x).abs().max()) <= amplitude * 0.3 + 1e-6
    assert float((y - x).abs().max()) > 0.5 * amplitude * 0.3


def test_relative_drop_and_paired_bootstrap() -> None:
    assert relative_drop(0.8, 0.6) == pytest.approx(0.25)
    assert relative_drop(0.5, 0.75) == pytest.approx(-0.5)
    assert math.isnan(relative_drop(0.0, 0.0))
    rng = np.random.default_rng(0)
    clean = rng.random(50) < 0.8
    correct = np.vstack([clean, clean, clean & (rng.random(50) < 0.5)])
    replicates = bootstrap_accuracies(correct, n_boot=300, rng=np.random.default_rng(1), strata=clean.astype(int))
    assert replicates.shape == (300, 3)
    # Paired resamples: an unchanged condition has the clean accuracy in every replicate.
    np.testing.assert_array_equal(replicates[:, 0], replicates[:, 1])
    assert (replicates[:, 2] <= replicates[:, 0]).all()
    assert replicates[:, 0].mean() == pytest.approx(clean.mean(), abs=0.03)
    assert bootstrap_accuracies(correct, n_boot=0, rng=rng).shape == (0, 3)


def test_severity_plot_is_reproducible(tmp_path: Path) -> None:
    curves = {"blur": {1: 0.8, 2: 0.6}, "jpeg": {1: 0.9, 2: 0.85}}
    first = severity_plot(curves, 0.9, tmp_path / "a.svg", n=40)
    second = severity_plot(curves, 0.9, tmp_path / "b.svg", n=40)
    assert ET.parse(first).getroot().tag.endswith("svg")
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(ValueError, match="nothing to draw"):
        severity_plot({}, 0.9, tmp_path / "c.svg", n=40)


# --------------------------------------------------------------------------------------------
# The check


def test_check_declares_its_contract() -> None:
    assert CorruptionCheck.id == "corruption"
    assert CorruptionCheck.needs.predictions and CorruptionCheck.needs.images
    assert set(CorruptionCheck.emits) == {
        "corruption.accuracy",
        "corruption.macro_auroc",
        "corruption.mae",
        "corruption.mean_dice",
        "corruption.relative_drop",
        "corruption.mean_relative_drop",
    }
    assert CorruptionCheck.tasks == ("classification", "multilabel", "regression", "segmentation")
    doc = CorruptionCheck.__doc__ or ""
    for reference in ("Hendrycks & Dietterich 2019", "MONAI", "MEASURE 2.5", "MEASURE 2.6"):
        assert reference in doc
    params = CorruptionCheck.Params()
    assert params.corruptions is None  # every corruption for the input (2-D: CORRUPTION_NAMES)
    assert params.severities == [1, 2, 3, 4, 5]
    assert (params.n_samples, params.n_boot) == (1000, 1000)
    for bad, message in (
        ({"severities": [0, 1]}, "1..5"),
        ({"severities": [3, 2]}, "strictly increasing"),
        ({"corruptions": ["blur", "blur"]}, "must not repeat"),
        ({"corruptions": ["snow"]}, "gaussian_noise"),
        ({"n_samples": 0}, "greater than or equal to 1"),
    ):
        with pytest.raises(ValidationError, match=message):
            CorruptionCheck.Params(**bad)


@pytest.fixture(scope="module")
def demo_result(demo_context: Any) -> tuple[CheckResult, dict[str, int], dict[str, int]]:
    demo_context.predictions("eval")  # the shared pass, as the runner would plan it
    before = dict(demo_context.model.stats.per_split)
    params = CorruptionCheck.Params(n_boot=200)
    result = CorruptionCheck().run(demo_context.for_check(CorruptionCheck), params)
    return result, before, dict(demo_context.model.stats.per_split)


def metric_map(result: CheckResult) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    return {(m.name, tuple(sorted(m.labels.items()))): m for m in result.metrics}


def accuracy_at(metrics: dict[Any, Any], name: str, severity: int) -> float:
    value = metrics[("corruption.accuracy", (("corruption", name), ("severity", str(severity))))].value
    assert value is not None
    return float(value)


def test_check_on_demo_study_emits_every_metric(demo_result: Any, demo_context: Any) -> None:
    result, _, _ = demo_result
    metrics = metric_map(result)
    n = len(demo_context.labels("eval"))
    assert len(result.metrics) == 1 + 11 * 5 * 2 + 1
    clean = metrics[("corruption.accuracy", (("corruption", "none"), ("severity", "0")))]
    expected_clean = float((demo_context.predictions("eval").predicted == demo_context.labels("eval")).mean())
    assert clean.value == pytest.approx(expected_clean)
    for metric in result.metrics:
        assert metric.n == n
        assert metric.value is not None
        assert metric.ci is not None and metric.ci[0] <= metric.ci[1]
        if metric.name == "corruption.relative_drop":
            accuracy = accuracy_at(metrics, metric.labels["corruption"], int(metric.labels["severity"]))
            assert metric.value == pytest.approx(relative_drop(expected_clean, accuracy))
    drops = [m.value for m in result.metrics if m.name == "corruption.relative_drop"]
    mean_drop = metrics[("corruption.mean_relative_drop", ())]
    assert mean_drop.value == pytest.approx(float(np.mean(drops)))
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)

    sample, setup = result.findings
    assert sample["kind"] == "corruption_sample" and sample["n"] == n
    assert sample["rows"] == [int(r) for r in demo_context.split("eval").rows]
    assert setup["kind"] == "corruption_setup"
    assert setup["corruptions"]["poisson_noise"]["levels"]["5"] == 100.0
    (artifact,) = result.artifacts
    assert artifact.path == "artifacts/corruption/corruption_accuracy.svg"
    assert ET.parse(demo_context.out_dir / artifact.path).getroot().tag.endswith("svg")


def test_check_reuses_the_clean_pass(demo_result: Any, demo_context: Any) -> None:
    _, before, after = demo_result
    n = len(demo_context.labels("eval"))
    assert after.get("eval") == before.get("eval")  # no second clean pass
    assert after["corruption:gaussian_noise:1"] - before.get("corruption:gaussian_noise:1", 0) == n
    assert sum(1 for split in after if split.startswith("corruption:")) == 55


def test_fixture_model_accuracy_falls_with_noise(demo_result: Any, demo_context: Any) -> None:
    metrics = metric_map(demo_result[0])
    n = len(demo_context.labels("eval"))
    clean = metrics[("corruption.accuracy", (("corruption", "none"), ("severity", "0")))].value
    for name in NOISE:
        curve = [clean, *(accuracy_at(metrics, name, s) for s in range(1, 6))]
        # Non-increasing up to one image, and clearly lower at the highest severity.
        assert all(b <= a + 1.0 / n for a, b in itertools.pairwise(curve)), (name, curve)
        assert curve[-1] < curve[0] - 0.1, (name, curve)


def test_check_is_deterministic(demo_context: Any) -> None:
    params = CorruptionCheck.Params(
        corruptions=["poisson_noise", "kspace_spike"], severities=[2, 5], n_samples=20, n_boot=50
    )
    first = CorruptionCheck().run(demo_context.for_check(CorruptionCheck), params)
    second = CorruptionCheck().run(demo_context.for_check(CorruptionCheck), params)
    assert [m.to_json() for m in first.metrics] == [m.to_json() for m in second.metrics]
    assert first.findings == second.findings
    assert first.findings[0]["n"] == 20
    assert len(first.metrics) == 1 + 2 * 2 * 2 + 1


def test_check_on_empty_split(tmp_path: Path) -> None:
    ctx = make_context(np.zeros(0, dtype=np.int64), logits=np.zeros((0, 2)), check=CorruptionCheck, out_dir=tmp_path)
    params = CorruptionCheck.Params(corruptions=["blur"], severities=[1, 2])
    result = CorruptionCheck().run(ctx, params)
    assert len(result.metrics) == 1 + 2 * 2 + 1
    assert all(m.value is None and m.reason == "no eval images" for m in result.metrics)
    assert result.artifacts == []


@pytest.mark.slow
def test_conformance(tmp_path: Path) -> None:
    from auditkit.testing import check_check

    report = check_check(CorruptionCheck, workdir=tmp_path)
    assert report.status == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_corruptions_match_on_cuda(name: str) -> None:
    x = torch.rand(4, 2, 24, 20, generator=torch.Generator().manual_seed(0))
    for severity in (1, 5):
        on_cpu = apply_corruption(x, name, severity, seeds=[1, 2, 3, 4])
        on_gpu = apply_corruption(x.cuda(), name, severity, seeds=[1, 2, 3, 4])
        assert on_gpu.device.type == "cuda"
        # Same draws on every device; JPEG and Poisson counts may round one step apart.
        step = {"jpeg": 1 / 255, "poisson_noise": 1 / CORRUPTIONS["poisson_noise"].level(severity)}.get(name, 0.0)
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4 + step, rtol=1e-4)


class NanOnDarkImages(torch.nn.Module):
    """Logits (mean, 1 - mean), but NaN when the image is darker than 0.3 on average."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3))
        logits = torch.stack([mean, 1.0 - mean], dim=1)
        return torch.where((mean < 0.3)[:, None], torch.full_like(logits, float("nan")), logits)


def test_non_finite_logits_count_as_errors(tmp_path: Path) -> None:
    images = torch.full((6, 1, 8, 8), 0.6)  # class 0 wins (0.6 > 0.4) until contrast fades
    labels = np.zeros(6, dtype=np.int64)
    model = NanOnDarkImages()
    ctx = make_context(
        labels,
        logits=model(images),
        images=images,
        model=model,
        classes=["bright", "dark"],
        check=CorruptionCheck,
        out_dir=tmp_path,
    )
    params = CorruptionCheck.Params(corruptions=["gamma"], severities=[1, 5], n_boot=0)
    result = CorruptionCheck().run(ctx, params)
    metrics = metric_map(result)
    # gamma 1.25: 0.6 -> 0.53, still class 0; gamma 3: 0.6 -> 0.216 < 0.3, NaN logits.
    assert accuracy_at(metrics, "gamma", 1) == 1.0
    assert accuracy_at(metrics, "gamma", 5) == 0.0
    assert {"kind": "non_finite_logits", "corruption": "gamma", "severity": 5, "count": 6} in result.findings


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_rgb_channels_last_images_corrupt_as_contiguous_ones(name: str) -> None:
    # The engine runs convolutional models channels_last, so images may arrive in that layout;
    # for three channels it is not the contiguous one. No corruption may depend on it.
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    draw = draw_randomness(name, tuple(images.shape), [11, 12, 13])
    for severity in (1, 5):
        expected = apply_corruption(images, name, severity, draw=draw)
        got = apply_corruption(channels_last, name, severity, draw=draw)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Multi-label and regression models: macro AUROC and MAE

LABELS = ["effusion", "nodule", "edema"]


def quadrant_study(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """1x8x8 images; finding k raises quadrant k by 0.12 (plus a per-image offset of sd 0.06);
    about 10% of the entries unknown (-1). Stored through float16, as the context stores them."""
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(n, 3, generator=g) < 0.4
    x = 0.35 + 0.03 * torch.randn(n, 1, 8, 8, generator=g)
    for k in range(3):
        r, c = divmod(k, 2)
        offset = 0.12 * present[:, k].float() + 0.06 * torch.randn(n, generator=g)
        x[:, 0, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] += offset[:, None, None]
    labels = present.long()
    labels[torch.rand(n, 3, generator=g) < 0.1] = -1
    return x.clamp(0, 1).half().float(), labels.numpy()


class QuadrantMeans(torch.nn.Module):
    """Outputs ``scale * (mean of quadrant k) + shift``: a model whose answer is known in advance."""

    def __init__(self, k: int = 3, scale: float = 20.0, shift: float = -8.0) -> None:
        super().__init__()
        self.k, self.scale, self.shift = k, scale, shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        quadrants = [images[:, 0, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] for r, c in ((0, 0), (0, 1), (1, 0))]
        return self.scale * torch.stack([q.mean(dim=(1, 2)) for q in quadrants[: self.k]], dim=1) + self.shift


def sklearn_macro_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    values = []
    for k in range(labels.shape[1]):
        known = labels[:, k] >= 0
        if len(set(labels[known, k].tolist())) == 2:
            values.append(roc_auc_score(labels[known, k], scores[known, k]))
    return float(np.mean(values))


def corrupted_outputs(
    model: torch.nn.Module, images: torch.Tensor, result: CheckResult, name: str, severity: int
) -> torch.Tensor:
    """What the check computed for one condition, by hand: same sample, seeds and corruption."""
    from auditkit.stats import stable_seed

    rows = result.findings[0]["rows"]
    seed_root = result.findings[1]["seed_root"]
    corrupted = apply_corruption(images[rows], name, severity, seeds=[stable_seed(seed_root, name, r) for r in rows])
    with torch.no_grad():
        return model(corrupted)


def test_check_on_a_multilabel_model_by_hand(tmp_path: Path) -> None:
    images, labels = quadrant_study(60, seed=0)
    model = QuadrantMeans()
    ctx = make_context(
        labels, images=images.numpy(), model=model, classes=LABELS, task="multilabel", check=CorruptionCheck
    )
    params = CorruptionCheck.Params(
        corruptions=["gaussian_noise", "contrast"], severities=[2, 5], n_samples=48, n_boot=100
    )
    result = CorruptionCheck().run(ctx, params)
    metrics = metric_map(result)
    assert {m.name for m in result.metrics} <= set(CorruptionCheck.emits)
    assert "multilabel" in CorruptionCheck.tasks
    rows = result.findings[0]["rows"]
    assert len(rows) == 48 and result.findings[0]["task"] == "multilabel"
    chosen = labels[rows]
    with torch.no_grad():
        clean_auroc = sklearn_macro_auroc(model(images[rows]).numpy(), chosen)
    clean = metrics[("corruption.macro_auroc", (("corruption", "none"), ("severity", "0")))]
    assert clean.value == pytest.approx(clean_auroc, abs=1e-9) and clean.direction == "higher_is_better"
    assert 0.7 < clean_auroc < 1.0
    drops = []
    for name in ("gaussian_noise", "contrast"):
        for severity in (2, 5):
            key = (("corruption", name), ("severity", str(severity)))
            corrupted = sklearn_macro_auroc(corrupted_outputs(model, images, result, name, severity).numpy(), chosen)
            assert metrics[("corruption.macro_auroc", key)].value == pytest.approx(corrupted, abs=1e-9)
            drop = metrics[("corruption.relative_drop", key)]
            # The documented number: the share of the clean macro AUROC lost.
            assert drop.value == pytest.approx((clean_auroc - corrupted) / clean_auroc, abs=1e-9)
            assert drop.ci is not None and drop.ci[0] <= drop.value <= drop.ci[1] <= 1.0
            drops.append(drop.value)
    assert metrics[("corruption.mean_relative_drop", ())].value == pytest.approx(float(np.mean(drops)))
    # Noise at severity 5 blurs the findings into each other; at severity 2 it barely shows.
    assert drops[1] > max(drops[0], 0.01), drops
    assert not any(m.name == "corruption.accuracy" for m in result.metrics)
    assert [f["kind"] for f in result.findings] == ["corruption_sample", "corruption_setup", "label_aurocs"]
    assert "clean macro AUROC" in result.findings[1]["relative_drop"]
    (artifact,) = result.artifacts
    assert artifact.name == "corruption_macro_auroc"
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)
    json.dumps(result.findings, allow_nan=False)


def bone_age_study(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images of the quadrant study; 'bone age' in months = 20 x quadrant-0 mean + 40 + N(0, 1)."""
    images, _ = quadrant_study(n, seed)
    noise = np.random.default_rng(seed).normal(0.0, 1.0, n)
    return images, QuadrantMeans(1, 20.0, 40.0)(images)[:, 0].double().numpy() + noise


def test_check_on_a_regression_model_by_hand(tmp_path: Path) -> None:
    from sklearn.metrics import mean_absolute_error

    images, targets = bone_age_study(50, seed=1)
    model = QuadrantMeans(1, 20.0, 40.0)
    ctx = make_context(
        targets,
        images=images.numpy(),
        model=model,
        classes=["bone_age"],
        task="regression",
        units={"bone_age": "months"},
        check=CorruptionCheck,
    )
    params = CorruptionCheck.Params(
        corruptions=["contrast", "gaussian_noise"], severities=[1, 5], n_samples=40, n_boot=100
    )
    result = CorruptionCheck().run(ctx, params)
    metrics = metric_map(result)
    rows = result.findings[0]["rows"]
    with torch.no_grad():
        clean_mae = mean_absolute_error(targets[rows], model(images[rows])[:, 0].double().numpy())
    clean = metrics[("corruption.mae", (("corruption", "none"), ("severity", "0")))]
    assert clean.value == pytest.approx(clean_mae, abs=1e-9) and clean.direction == "lower_is_better"
    for name in ("contrast", "gaussian_noise"):
        for severity in (1, 5):
            key = (("corruption", name), ("severity", str(severity)))
            predicted = corrupted_outputs(model, images, result, name, severity)[:, 0].double().numpy()
            mae = mean_absolute_error(targets[rows], predicted)
            assert metrics[("corruption.mae", key)].value == pytest.approx(mae, abs=1e-9)
            # The documented number: the relative increase of the MAE (positive = worse).
            increase = metrics[("corruption.relative_drop", key)]
            assert increase.value == pytest.approx((mae - clean_mae) / clean_mae, abs=1e-9)
            assert increase.direction == "lower_is_better" and increase.ci is not None
    # Lower contrast pulls every image toward mid-grey: the model under-reads bone age.
    contrast = metrics[("corruption.relative_drop", (("corruption", "contrast"), ("severity", "5")))].value
    assert contrast is not None and contrast > 0.5
    setup = result.findings[1]
    assert setup["units"] == {"bone_age": "months"} and "relative increase" in setup["relative_drop"]
    assert result.findings[0]["targets"]["bone_age"]["unit"] == "months"
    assert [a.name for a in result.artifacts] == ["corruption_mae"]


def test_relative_mae_increase_of_two_outputs_is_their_mean(tmp_path: Path) -> None:
    from sklearn.metrics import mean_absolute_error

    images, _ = quadrant_study(40, seed=2)
    model = QuadrantMeans(2, 20.0, 40.0)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        targets = model(images).double().numpy() + rng.normal(0.0, [1.0, 3.0], (40, 2))
    ctx = make_context(
        targets, images=images.numpy(), model=model, classes=["a", "b"], task="regression", check=CorruptionCheck
    )
    params = CorruptionCheck.Params(corruptions=["gamma"], severities=[4], n_boot=0)
    result = CorruptionCheck().run(ctx, params)
    metrics = metric_map(result)
    with torch.no_grad():
        clean = model(images).double().numpy()
    corrupted = corrupted_outputs(model, images, result, "gamma", 4).double().numpy()
    increases = []
    for k, output in enumerate(("a", "b")):
        before = mean_absolute_error(targets[:, k], clean[:, k])
        after = mean_absolute_error(targets[:, k], corrupted[:, k])
        key = (("corruption", "gamma"), ("output", output), ("severity", "4"))
        assert metrics[("corruption.mae", key)].value == pytest.approx(after, abs=1e-9)
        increases.append((after - before) / before)
    drop = metrics[("corruption.relative_drop", (("corruption", "gamma"), ("severity", "4")))]
    assert drop.value == pytest.approx(float(np.mean(increases)), abs=1e-9)
    assert drop.ci is None  # n_boot 0


class NanOnDarkRegressor(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3))
        return torch.where(mean < 0.3, torch.full_like(mean, float("nan")), 100 * mean)


def test_non_finite_regression_outputs_leave_the_mae_undefined(tmp_path: Path) -> None:
    images = torch.full((6, 1, 8, 8), 0.6)
    targets = np.array([58.0, 59.0, 60.0, 61.0, 62.0, 63.0])
    ctx = make_context(targets, images=images, model=NanOnDarkRegressor(), task="regression", check=CorruptionCheck)
    result = CorruptionCheck().run(ctx, CorruptionCheck.Params(corruptions=["gamma"], severities=[1, 5], n_boot=0))
    metrics = metric_map(result)
    at_5 = (("corruption", "gamma"), ("severity", "5"))
    assert metrics[("corruption.mae", at_5)].value is None
    assert "6 of 6 predictions are not finite" in (metrics[("corruption.mae", at_5)].reason or "")
    assert metrics[("corruption.relative_drop", at_5)].value is None
    assert metrics[("corruption.relative_drop", at_5)].reason
    assert metrics[("corruption.mean_relative_drop", ())].value is None
    assert metrics[("corruption.relative_drop", (("corruption", "gamma"), ("severity", "1")))].value is not None
    assert {"kind": "non_finite_logits", "corruption": "gamma", "severity": 5, "count": 6} in result.findings


def test_empty_eval_split_of_other_tasks(tmp_path: Path) -> None:
    for task, labels in (("multilabel", np.zeros((0, 2), dtype=np.int64)), ("regression", np.zeros((0, 1)))):
        ctx = make_context(labels, logits=np.zeros((0, labels.shape[1])), task=task, check=CorruptionCheck)
        result = CorruptionCheck().run(ctx, CorruptionCheck.Params(corruptions=["blur"], severities=[1, 2]))
        assert len(result.metrics) == 1 + 2 * 2 + 1
        assert all(m.value is None and m.reason == "no eval images" for m in result.metrics)
        assert {m.name for m in result.metrics} <= set(CorruptionCheck.emits)


def test_policy_judges_the_relative_mae_increase(tmp_path: Path) -> None:
    from auditkit.policy import evaluate
    from auditkit.testing import rules_for

    images, targets = bone_age_study(50, seed=1)
    params = CorruptionCheck.Params(corruptions=["contrast", "gaussian_noise"], severities=[1, 2], n_boot=0)
    status = {}
    for twin, model in (("fragile", QuadrantMeans(1, 20.0, 40.0)), ("robust", QuadrantMeans(1, 20.0, 40.0))):
        if twin == "robust":  # a model that reads the quadrant against the image mean: contrast-invariant
            model = ContrastInvariant(model)
        ctx = make_context(targets, images=images.numpy(), model=model, task="regression", check=CorruptionCheck)
        result = CorruptionCheck().run(ctx, params)
        record = {"id": "corruption", "status": "ok", "metrics": [m.to_json() for m in result.metrics]}
        judged = evaluate(rules_for("corruption"), [record])
        status[twin] = {r["id"]: r["status"] for r in judged["rules"]}
    # Contrast 0.85 scales every deviation from mid-grey: the fragile model's error grows by more
    # than 10% at the mildest severity; the robust twin's does not.
    assert status["fragile"]["COR-MILD-SHIFT"] == "warn"
    assert status["robust"]["COR-MILD-SHIFT"] == "pass"


class ContrastInvariant(torch.nn.Module):
    """The quadrant model on images whose contrast is restored around their mean."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        spread = images.std(dim=(1, 2, 3), keepdim=True)
        restored = 0.35 + 0.06 * (images - mean) / spread
        return self.inner(restored)  # type: ignore[no-any-return]
