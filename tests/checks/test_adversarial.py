"""Tests of the attacks, the gradient-masking sanity tests and :class:`AdversarialCheck`."""

from __future__ import annotations

import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchattacks
from pydantic import ValidationError
from torch import nn

from auditkit.check import CheckResult
from auditkit.checks.adversarial import (
    ATTACKS,
    AdversarialCheck,
    AttackConfig,
    attack_seed,
    eps_label,
    gradient_masking_tests,
    minimum_norm_perturbations,
    plan_sample,
    predict,
    robust_accuracy_plot,
    still_correct,
    stratified_allocation,
    stratified_sample,
)
from auditkit.checks.adversarial.attacks import ContiguousGradients
from auditkit.checks.adversarial.sanity import masking_suspected, slack
from auditkit.context import AuditContext, CheckView
from auditkit.model import ModelAdapter
from auditkit.testing import make_context

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# Small, fast settings for the demo study (32 eval images, 64x64, the packaged tiny CNN).
EPS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
FAST = {"pgd_steps": 10, "square_queries": 100, "unbounded_steps": 20, "n_boot": 200}


# --------------------------------------------------------------------------------------------
# Contexts


def swapped_context(base: AuditContext, module: nn.Module, out: Path) -> CheckView:
    """The demo context with another model and its own artifact folder."""
    adapter = ModelAdapter.from_module(module, classes=base.classes)
    return AuditContext(base.spec, adapter, base.dataset, out).for_check(AdversarialCheck)


def tensor_context(
    module: nn.Module, data: torch.Tensor, targets: np.ndarray, out: Path, classes: list[str] | None = None
) -> CheckView:
    """In-memory tensors (manifest rows from 100) through the kit's context."""
    return make_context(
        targets,
        images=data,
        rows=np.arange(len(targets)) + 100,
        classes=classes or ["a", "b"],
        model=module,
        check=AdversarialCheck,
        out_dir=out,
    )


class RoundedInput(nn.Module):
    """A gradient-masking defence: the image is rounded to 9 grey levels before the network."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(images * 8.0) / 8.0)  # type: ignore[no-any-return]


def by_key(result: CheckResult) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    return {(m.name, tuple(sorted(m.labels.items()))): m for m in result.metrics}


def robust(result: CheckResult, attack: str, eps: float) -> float:
    metric = by_key(result)[("adversarial.robust_accuracy", (("attack", attack), ("eps", eps_label(eps))))]
    assert metric.value is not None
    return float(metric.value)


# --------------------------------------------------------------------------------------------
# Sampling, labels, parameters


def test_stratified_allocation_hand_values() -> None:
    # Quotas 3, 1.5, 0.5 -> floors 3, 1, 0; the left-over draw goes to class 1 (tie, lower
    # index); the empty class 2 then takes one from the largest allocation.
    assert stratified_allocation([6, 3, 1], 5).tolist() == [2, 2, 1]
    assert stratified_allocation([10, 10], 5).tolist() == [3, 2]
    assert stratified_allocation([4, 0, 2], 6).tolist() == [4, 0, 2]
    assert stratified_allocation([4, 2], 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"in \[0, 6\].*got 7"):
        stratified_allocation([4, 2], 7)


def test_stratified_sample_is_seeded_sorted_and_stratified() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    first = stratified_sample(labels, 20, np.random.default_rng(3))
    again = stratified_sample(labels, 20, np.random.default_rng(3))
    np.testing.assert_array_equal(first, again)
    assert (np.diff(first) > 0).all()
    assert np.bincount(labels[first]).tolist() == [12, 6, 2]
    assert not np.array_equal(first, stratified_sample(labels, 20, np.random.default_rng(4)))
    np.testing.assert_array_equal(stratified_sample(labels, 500, np.random.default_rng(0)), np.arange(100))
    np.testing.assert_array_equal(stratified_sample(labels, None, np.random.default_rng(0)), np.arange(100))
    with pytest.raises(ValueError, match="got -1"):
        stratified_sample(labels, -1, np.random.default_rng(0))


def test_eps_labels() -> None:
    assert [eps_label(e) for e in EPS] == ["0.0039", "0.0078", "0.016", "0.031"]
    assert eps_label(0.5 / 255) == "0.002"
    assert eps_label(1.0) == "1"


def test_check_declares_its_contract() -> None:
    assert AdversarialCheck.id == "adversarial"
    assert AdversarialCheck.needs.gradients and AdversarialCheck.needs.images
    assert AdversarialCheck.summary().startswith("Adversarial robustness")
    doc = AdversarialCheck.__doc__ or ""
    for reference in ("Madry et al. 2018", "Carlini et al. 2019", "Croce &", "MEASURE 2.7"):
        assert reference in doc
    params = AdversarialCheck.Params()
    assert params.attacks == ["fgsm", "pgd_linf", "pgd_l2", "cw_l2", "square"]
    assert params.eps == [0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255]
    assert params.eps_l2 == [0.1, 0.25, 0.5, 1.0]
    assert (params.n_samples, params.pgd_steps, params.n_boot) == (256, 20, 1000)
    assert set(ATTACKS) == {"fgsm", "pgd_linf", "pgd_l2", "cw_l2", "square", "autoattack"}
    for bad, message in (
        ({"eps": [0.02, 0.01]}, "strictly increasing"),
        ({"eps": [0.0, 0.01]}, r"in \(0, 1.0\]"),
        ({"eps": [0.5, 2.0]}, r"in \(0, 1.0\]"),
        ({"eps": [0.0039, 0.00392]}, "two significant digits"),
        ({"eps_l2": [-1.0]}, "positive"),
        ({"attacks": ["fgsm", "fgsm"]}, "must not repeat"),
        ({"attacks": ["deepfool"]}, "pgd_linf"),
        ({"eps": [0.5, 0.9], "unbounded_eps": 0.8}, "must exceed the largest eps 0.9"),
        ({"n_samples": 0}, "greater than or equal to 1"),
    ):
        with pytest.raises(ValidationError, match=message):
            AdversarialCheck.Params(**bad)


# --------------------------------------------------------------------------------------------
# Sanity tests on hand-made curves


def outcome(tests: list[Any]) -> dict[str, bool | None]:
    return {t.name: t.passed for t in tests}


def test_sanity_tests_pass_on_consistent_curves() -> None:
    curves = {
        "fgsm": {0.01: 0.6, 0.02: 0.7},  # FGSM may rise with eps: exempt
        "pgd_linf": {0.01: 0.4, 0.02: 0.1},
        "square": {0.01: 0.5, 0.02: 0.3},
    }
    tests = gradient_masking_tests(curves, 100, unbounded_accuracy=0.0)
    assert outcome(tests) == {
        "accuracy_non_increasing_in_eps": True,
        "iterative_beats_single_step": True,
        "unbounded_attack_succeeds": True,
        "white_box_beats_black_box": True,
    }
    assert masking_suspected(tests) is False


def test_sanity_tests_name_each_violation() -> None:
    curves = {
        "fgsm": {0.01: 0.34, 0.02: 0.2},
        "pgd_linf": {0.01: 0.35, 0.02: 0.45},  # rises by 0.10; loses to FGSM beyond the slack
        "square": {0.01: 0.1, 0.02: 0.1},  # black-box beats both white-box attacks
    }
    tests = gradient_masking_tests(curves, 100, unbounded_accuracy=0.5, tolerance=0.02)
    assert outcome(tests) == dict.fromkeys(
        [
            "accuracy_non_increasing_in_eps",
            "iterative_beats_single_step",
            "unbounded_attack_succeeds",
            "white_box_beats_black_box",
        ],
        False,
    )
    monotone, iterative, unbounded, black = tests
    assert monotone.violations == [
        {
            "attack": "pgd_linf",
            "eps": "0.01",
            "next_eps": "0.02",
            "robust_accuracy": 0.35,
            "next_robust_accuracy": 0.45,
        }
    ]
    assert [v["eps"] for v in iterative.violations] == ["0.02"]  # 0.35 - 0.34 is within slack
    assert "0.500" in unbounded.detail
    assert [v["eps"] for v in black.violations] == ["0.01", "0.02"]
    assert masking_suspected(tests) is True


def test_sanity_slack_is_one_image_or_the_tolerance() -> None:
    assert slack(10, 0.02) == pytest.approx(0.1)
    assert slack(200, 0.02) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="n=0"):
        slack(0, 0.02)
    # A rise of one image in ten is within the slack; two images are not.
    assert gradient_masking_tests({"pgd_linf": {0.1: 0.2, 0.2: 0.3}}, 10, unbounded_accuracy=None)[0].passed
    assert not gradient_masking_tests({"pgd_linf": {0.1: 0.2, 0.2: 0.4}}, 10, unbounded_accuracy=None)[0].passed
    nothing = gradient_masking_tests({"fgsm": {0.1: 0.2}}, 10, unbounded_accuracy=None)
    assert all(t.passed is None for t in nothing)
    assert masking_suspected(nothing) is None


def test_robust_accuracy_plot_is_reproducible(tmp_path: Path) -> None:
    curves = {"pgd_linf": {0.01: 0.5, 0.02: 0.2}, "cw_l2": {0.1: 0.7, 0.5: 0.1}}
    cis = {("pgd_linf", 0.01): (0.4, 0.6), ("pgd_linf", 0.02): (0.1, 0.3)}
    first = robust_accuracy_plot(curves, 0.9, tmp_path / "a.svg", n=50, cis=cis)
    second = robust_accuracy_plot(curves, 0.9, tmp_path / "b.svg", n=50, cis=cis)
    assert ET.parse(first).getroot().tag.endswith("svg")
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(ValueError, match="unknown attacks"):
        robust_accuracy_plot({"bim": {0.1: 0.5}}, 0.9, tmp_path / "c.svg", n=50)


# --------------------------------------------------------------------------------------------
# Attacks on tiny models with known answers


def linear_mean_model(k: float = 20.0, threshold: float = 0.45) -> nn.Module:
    """Logits (-s, s) with s = k * (mean(x) - threshold), for 1x4x4 images."""
    linear = nn.Linear(16, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([-torch.full((16,), k / 16), torch.full((16,), k / 16)]))
        linear.bias.copy_(torch.tensor([k * threshold, -k * threshold]))
    model = nn.Sequential(nn.Flatten(), linear).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def test_carlini_wagner_norm_respects_the_analytic_minimum() -> None:
    model = linear_mean_model()
    images = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 0.4)])
    labels = torch.tensor([1, 1])  # the second image is already misclassified
    config = AttackConfig(cw_steps=200, cw_lr=0.01)
    fooled, norms = minimum_norm_perturbations(model, images, labels, config, seed=0, batch_size=2)
    # Crossing mean(x) = 0.45 from 0.5 needs every one of 16 pixels to drop by 0.05 at best:
    # an L2 norm of at least 0.05 * 4 = 0.2 (Cauchy-Schwarz), whatever the attack.
    assert fooled.tolist() == [True, True]
    assert 0.2 - 1e-4 <= float(norms[0]) <= 0.3
    assert float(norms[1]) < 1e-3  # misclassified without attack: no perturbation needed


def test_pgd_batches_match_direct_torchattacks_calls_and_keep_rng_state() -> None:
    torch.manual_seed(123)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.eval().requires_grad_(False)
    images = torch.rand(10, 1, 12, 12)
    labels = predict(model, images)
    config = AttackConfig(pgd_steps=5)
    state = torch.get_rng_state()
    ours = still_correct(model, images, labels, "pgd_linf", 0.05, config, seed=11, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    direct = []
    for batch, start in enumerate(range(0, 10, 4)):
        torch.manual_seed(11 + batch)
        attack = torchattacks.PGD(model, eps=0.05, alpha=2.5 * 0.05 / 5, steps=5, random_start=True)
        adversarial = attack(images[start : start + 4], labels[start : start + 4])
        direct.append(model(adversarial).argmax(1) == labels[start : start + 4])
    assert torch.equal(ours, torch.cat(direct))
    with pytest.raises(ValueError, match="bounded attack"):
        still_correct(model, images, labels, "cw_l2", 0.1, config, seed=0, batch_size=4)


def test_every_attack_on_multichannel_non_square_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # A sensitive model (every pixel moves the logits), so every attack succeeds quickly and
    # AutoAttack's ensemble stops after its first member.
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 20 * 28, 3))
    model.eval().requires_grad_(False)
    images = torch.rand(9, 3, 20, 28)
    targets = predict(model, images).numpy()
    ctx = tensor_context(model, images, targets, tmp_path, classes=["a", "b", "c"])
    params = AdversarialCheck.Params(
        attacks=list(ATTACKS),
        eps=[0.3],
        eps_l2=[1.0, 5.0],
        pgd_steps=5,
        cw_steps=20,
        square_queries=20,
        unbounded_steps=5,
        n_boot=50,
        batch_size=4,
    )
    result = AdversarialCheck().run(ctx, params)
    metrics = by_key(result)
    assert metrics[("adversarial.clean_accuracy", ())].value == 1.0
    for attack in ATTACKS:
        grid = [0.3] if ATTACKS[attack].norm == "Linf" else [1.0, 5.0]
        for eps in grid:
            value = robust(result, attack, eps)
            assert 0.0 <= value <= 1.0
            rate = metrics[("adversarial.attack_success_rate", (("attack", attack), ("eps", eps_label(eps))))]
            assert rate.value == pytest.approx(1.0 - value)
    assert result.findings[0]["rows"] == list(range(100, 109))
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)


def test_empty_eval_split(tmp_path: Path) -> None:
    model = linear_mean_model()
    ctx = tensor_context(model, torch.zeros(0, 1, 4, 4), np.zeros(0, dtype=np.int64), tmp_path)
    params = AdversarialCheck.Params(attacks=["fgsm", "cw_l2"], eps=[0.01], eps_l2=[0.5])
    result = AdversarialCheck().run(ctx, params)
    assert len(result.metrics) == 1 + 2 * 2 + 1
    assert all(m.value is None and m.reason == "no eval images" for m in result.metrics)


# --------------------------------------------------------------------------------------------
# The check on the demo study


@pytest.fixture(scope="module")
def plain_result(demo_context: Any) -> CheckResult:
    params = AdversarialCheck.Params(attacks=["fgsm", "pgd_linf", "square"], eps=EPS, n_samples=24, **FAST)
    return AdversarialCheck().run(demo_context.for_check(AdversarialCheck), params)


def test_check_pgd_equals_a_direct_torchattacks_call(plain_result: CheckResult, demo_context: Any) -> None:
    plan = plan_sample(demo_context.labels("eval"), 24, demo_context.rng("adversarial"))
    images = demo_context.images("eval", plan.indices)
    labels = torch.as_tensor(demo_context.labels("eval")[plan.indices])
    model = demo_context.model.module
    eps = 2 / 255
    torch.manual_seed(attack_seed(plan.seed_root, "pgd_linf", eps))
    attack = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True)
    adversarial = attack(images, labels)
    with torch.no_grad():
        clean = model(images).argmax(1) == labels
        survived = model(adversarial).argmax(1) == labels
    # float64, as the check counts: a float32 mean of 2/24 is not the float64 one.
    assert robust(plain_result, "pgd_linf", eps) == float((clean & survived).double().mean())


def test_check_on_demo_study(plain_result: CheckResult, demo_context: Any) -> None:
    metrics = by_key(plain_result)
    clean = metrics[("adversarial.clean_accuracy", ())]
    assert clean.n == 24 and clean.value is not None and clean.ci is not None
    assert len(plain_result.metrics) == 1 + 3 * 4 * 2 + 1
    for metric in plain_result.metrics:
        if metric.name == "adversarial.robust_accuracy":
            assert metric.value is not None and metric.value <= clean.value
            assert metric.ci is not None and metric.ci[0] <= metric.value <= metric.ci[1]
    json.dumps([m.to_json() for m in plain_result.metrics], allow_nan=False)

    kinds = [f["kind"] for f in plain_result.findings]
    assert kinds == ["adversarial_sample", "attack_setup", "gradient_masking_tests"]
    sample = plain_result.findings[0]
    assert sample["n"] == 24 and sum(sample["class_counts"].values()) == 24
    assert set(sample["rows"]) <= {int(r) for r in demo_context.split("eval").rows}
    (artifact,) = plain_result.artifacts
    assert artifact.path == "artifacts/adversarial/robust_accuracy.svg"
    assert ET.parse(demo_context.out_dir / artifact.path).getroot().tag.endswith("svg")


def test_pgd_beats_fgsm_and_never_rises_with_eps(plain_result: CheckResult) -> None:
    pgd = [robust(plain_result, "pgd_linf", eps) for eps in EPS]
    fgsm = [robust(plain_result, "fgsm", eps) for eps in EPS]
    assert all(p <= f for p, f in zip(pgd, fgsm, strict=True)), (pgd, fgsm)
    assert any(p < f for p, f in zip(pgd, fgsm, strict=True)), (pgd, fgsm)
    assert all(b <= a for a, b in itertools.pairwise(pgd)), pgd


def test_plain_model_is_not_flagged(plain_result: CheckResult) -> None:
    metric = by_key(plain_result)[("adversarial.gradient_masking_suspected", ())]
    assert metric.value == 0.0
    tests = plain_result.findings[-1]["tests"]
    assert [t["passed"] for t in tests] == [True, True, True, True]


def test_masked_gradients_are_flagged(demo_context: Any, tmp_path: Path) -> None:
    ctx = swapped_context(demo_context, RoundedInput(demo_context.model.module), tmp_path)
    params = AdversarialCheck.Params(
        attacks=["fgsm", "pgd_linf"], eps=[2 / 255, 8 / 255], n_samples=24, **{**FAST, "n_boot": 0}
    )
    result = AdversarialCheck().run(ctx, params)
    assert by_key(result)[("adversarial.gradient_masking_suspected", ())].value == 1.0
    failed = [f for f in result.findings if f["kind"] == "gradient_masking_suspected"]
    assert "unbounded_attack_succeeds" in [f["test"] for f in failed]
    assert all(f["detail"] and "Carlini" in f["reference"] for f in failed)
    assert all(m.ci is None for m in result.metrics)  # n_boot 0


def test_check_without_sanity_checks(demo_context: Any) -> None:
    params = AdversarialCheck.Params(attacks=["fgsm"], eps=[4 / 255], n_samples=8, sanity_checks=False, n_boot=0)
    result = AdversarialCheck().run(demo_context.for_check(AdversarialCheck), params)
    masking = by_key(result)[("adversarial.gradient_masking_suspected", ())]
    assert masking.value is None and masking.reason is not None and "disabled" in masking.reason
    assert [f["kind"] for f in result.findings] == ["adversarial_sample", "attack_setup"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_run_on_cuda_and_keep_rng_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model = model.eval().requires_grad_(False).cuda()
    images = torch.rand(16, 1, 12, 12)
    labels = predict(model, images)
    assert labels.device.type == "cpu"
    cuda_state = torch.cuda.get_rng_state()
    config = AttackConfig(pgd_steps=5, square_queries=50, cw_steps=20)
    first = still_correct(model, images, labels, "pgd_linf", 0.05, config, seed=3, batch_size=8)
    again = still_correct(model, images, labels, "pgd_linf", 0.05, config, seed=3, batch_size=8)
    assert torch.equal(first, again)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    still_correct(model, images, labels, "square", 0.05, config, seed=3, batch_size=8)
    fooled, norms = minimum_norm_perturbations(model, images, labels, config, seed=3, batch_size=8)
    assert fooled.device.type == norms.device.type == "cpu"


# --------------------------------------------------------------------------------------------
# Memory layout: RGB models run channels_last


def rgb_models() -> tuple[nn.Module, nn.Module]:
    """The same 3-channel tiny CNN, once channels_last (as the engine runs it) and once not."""
    from auditkit.fixtures.models import tiny_cnn

    torch.manual_seed(0)
    contiguous = tiny_cnn(num_classes=2, in_channels=3).eval()
    channels_last = tiny_cnn(num_classes=2, in_channels=3).eval()
    channels_last.load_state_dict(contiguous.state_dict())
    return channels_last.to(memory_format=torch.channels_last), contiguous


def test_contiguous_gradients_of_a_channels_last_rgb_model() -> None:
    channels_last, _ = rgb_models()
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    # The problem: the input gradient of a channels_last model is channels_last (with the
    # PyTorch of this writing), and for three channels that layout cannot be viewed flat.
    (gradient,) = torch.autograd.grad(channels_last(images).sum(), images)
    if not gradient.is_contiguous():
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            gradient.view(2, -1)
    # The wrapper: same logits, same gradient values, contiguous layout.
    wrapped = ContiguousGradients(channels_last)
    logits = wrapped(images)
    assert torch.equal(logits, channels_last(images))
    (wrapped_gradient,) = torch.autograd.grad(logits.sum(), images)
    assert wrapped_gradient.is_contiguous()
    assert torch.equal(wrapped_gradient, gradient)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_runs_on_a_channels_last_rgb_model(attack: str) -> None:
    channels_last, contiguous = rgb_models()
    # Inputs in either layout: the attacks get contiguous copies.
    images = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 0, 1])
    config = AttackConfig(pgd_steps=3, cw_steps=3, square_queries=5, random_start=False)
    outcomes = []
    for model in (channels_last, contiguous):
        if ATTACKS[attack].minimum_norm:
            fooled, norms = minimum_norm_perturbations(model, images, labels, config, seed=0, batch_size=4)
            outcomes.append((fooled, norms))
            continue
        # AutoAttack at an unbounded budget: its first attack fools every image, so the 5000
        # queries of its Square stage are never spent.
        eps = 1.0 if attack == "autoattack" else 4 / 255
        outcomes.append((still_correct(model, images, labels, attack, eps, config, seed=0, batch_size=4),))
    # The layout does not change what the attack finds.
    assert torch.equal(outcomes[0][0], outcomes[1][0])
    if ATTACKS[attack].minimum_norm:
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1], rtol=1e-4, atol=1e-5)
