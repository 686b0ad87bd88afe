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
from auditkit.policy import evaluate
from auditkit.testing import make_context, rules_for

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


# --------------------------------------------------------------------------------------------
# Multi-label and regression models: attacks on the task's loss

LABELS = ["effusion", "nodule", "edema"]
TASK_FAST = {"pgd_steps": 10, "unbounded_steps": 20, "n_boot": 100, "batch_size": 64}


def multilabel_study(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """1x8x8 images; label k raises quadrant k by 0.12 (plus a per-image offset of sd 0.06, so
    labels overlap); about 10% of the entries are unknown (-1)."""
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(n, 3, generator=g) < 0.4
    x = 0.35 + 0.03 * torch.randn(n, 1, 8, 8, generator=g)
    for k in range(3):
        r, c = divmod(k, 2)
        offset = 0.12 * present[:, k].float() + 0.06 * torch.randn(n, generator=g)
        x[:, 0, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] += offset[:, None, None]
    labels = present.long()
    labels[torch.rand(n, 3, generator=g) < 0.1] = -1
    # Through float16, as the context stores images: the model sees what the check attacks.
    return x.clamp(0, 1).half().float(), labels.numpy()


def train(model: nn.Module, images: torch.Tensor, loss: Any, steps: int = 150) -> nn.Module:
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        value = loss(model(images)).mean()
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def multilabel_model() -> tuple[nn.Module, torch.Tensor, np.ndarray]:
    """A small CNN trained on a multi-label study (masked BCE), and a held-out study."""
    from auditkit.checks.adversarial.loss_attacks import multilabel_loss

    torch.manual_seed(0)
    images, labels = multilabel_study(128, seed=0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    targets = torch.as_tensor(labels)
    train(model, images, lambda out: multilabel_loss(out, targets))
    held_out, held_labels = multilabel_study(96, seed=1)
    return model, held_out, held_labels


@pytest.fixture(scope="module")
def regression_model() -> tuple[nn.Module, torch.Tensor, np.ndarray]:
    """A linear regressor of 'bone age' (months: 100 x the top-left quadrant's mean), held-out data."""
    torch.manual_seed(0)
    images, _ = multilabel_study(128, seed=2)
    target = images[:, 0, :4, :4].mean(dim=(1, 2)) * 100
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    train(model, images, lambda out: (out[:, 0] - target) ** 2, steps=300)
    held_out, _ = multilabel_study(64, seed=3)
    return model, held_out, (held_out[:, 0, :4, :4].mean(dim=(1, 2)) * 100).double().numpy()


def sklearn_macro_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    values = []
    for k in range(labels.shape[1]):
        known = labels[:, k] >= 0
        if len(set(labels[known, k].tolist())) == 2:
            values.append(roc_auc_score(labels[known, k], scores[known, k]))
    return float(np.mean(values))


def test_loss_attacks_are_torchattacks_with_cross_entropy() -> None:
    from auditkit.checks.adversarial.loss_attacks import attack_with_loss

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.eval().requires_grad_(False)
    images = torch.rand(6, 1, 12, 12)
    labels = predict(model, images)
    config = AttackConfig(pgd_steps=5)

    def mean_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none") / len(targets)

    for name, eps, reference in (
        ("fgsm", 0.03, lambda: torchattacks.FGSM(model, eps=0.03)),
        ("pgd_linf", 0.03, lambda: torchattacks.PGD(model, eps=0.03, alpha=2.5 * 0.03 / 5, steps=5)),
        ("pgd_l2", 0.5, lambda: torchattacks.PGDL2(model, eps=0.5, alpha=2.5 * 0.5 / 5, steps=5)),
    ):
        torch.manual_seed(7)
        ours, _ = attack_with_loss(model, images, labels, mean_cross_entropy, name, eps, config)
        torch.manual_seed(7)
        theirs = reference()(images, labels)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="does not run on a task loss"):
        attack_with_loss(model, images, labels, mean_cross_entropy, "square", 0.03, config)


def test_task_losses_hand_values() -> None:
    from auditkit.checks.adversarial.loss_attacks import multilabel_loss, squared_error_loss

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1, 0, -1], [-1, -1, 1]])
    bce = nn.functional.binary_cross_entropy_with_logits
    expected = [
        float(bce(logits[0, :2], torch.tensor([1.0, 0.0]), reduction="sum")),
        float(bce(logits[1, 2:], torch.tensor([1.0]), reduction="sum")),
    ]
    torch.testing.assert_close(multilabel_loss(logits, labels), torch.tensor(expected))
    predicted = torch.tensor([[10.0, 1.0], [4.0, 2.0]])
    targets = torch.tensor([[7.0, float("nan")], [5.0, 0.0]], dtype=torch.float64)
    assert squared_error_loss()(predicted, targets).tolist() == [9.0, 1.0 + 4.0]
    scaled = squared_error_loss(torch.tensor([3.0, 2.0]))(predicted, targets)
    torch.testing.assert_close(scaled, torch.tensor([1.0, 1.0 / 9.0 + 1.0]))


def test_task_sample_holds_both_classes_of_every_label() -> None:
    from auditkit.tasks import sample_strata, task_sample

    rng = np.random.default_rng(0)
    labels = np.zeros((200, 4), dtype=np.int64)
    labels[:3, 0] = 1  # a rare finding
    labels[rng.random(200) < 0.3, 1] = 1
    labels[:, 2] = 1
    labels[5, 2] = 0  # a rare absence
    labels[rng.random(200) < 0.2, 3] = -1
    labels[[0, 1, 2], 3] = -1
    for seed in range(5):
        picked = task_sample(labels, "multilabel", 8, np.random.default_rng(seed))
        assert len(picked) == 8 and (np.diff(picked) > 0).all()
        chosen = labels[picked]
        for k in range(4):
            assert {0, 1} <= set(chosen[:, k].tolist()) or k == 3, (seed, k, chosen[:, k])
    np.testing.assert_array_equal(
        task_sample(labels, "multilabel", 8, np.random.default_rng(3)),
        task_sample(labels, "multilabel", 8, np.random.default_rng(3)),
    )
    assert task_sample(labels, "multilabel", None, rng).tolist() == list(range(200))
    # Classification: the class-stratified sample, unchanged.
    classes = np.array([0] * 60 + [1] * 30 + [2] * 10)
    np.testing.assert_array_equal(
        task_sample(classes, "classification", 20, np.random.default_rng(3)),
        stratified_sample(classes, 20, np.random.default_rng(3)),
    )
    # Regression: quintiles of the target; the sample spans them.
    targets = np.linspace(0.0, 100.0, 100)[:, None]
    strata = sample_strata(targets, "regression")
    assert np.bincount(strata).tolist() == [20] * 5
    assert np.bincount(strata[task_sample(targets, "regression", 10, np.random.default_rng(0))]).tolist() == [2] * 5


def test_macro_auroc_equals_sklearn_and_bootstrap_resamples() -> None:
    from sklearn.metrics import roc_auc_score

    from auditkit.stats import bootstrap_indices
    from auditkit.tasks import bootstrap_macro_aurocs, label_aurocs, macro_auroc

    rng = np.random.default_rng(0)
    labels = (rng.random((60, 3)) < 0.4).astype(np.int64)
    labels[rng.random((60, 3)) < 0.15] = -1
    labels[:, 2] = np.where(labels[:, 2] == 1, 0, labels[:, 2])  # no known positive of label 2
    scores = np.round(rng.random((60, 3)) + 0.3 * labels, 1)  # ties on purpose
    per_label = label_aurocs(scores, labels, LABELS)
    for k in range(2):
        known = labels[:, k] >= 0
        assert per_label[k].value == pytest.approx(roc_auc_score(labels[known, k], scores[known, k]), abs=1e-12)
        assert per_label[k].unknown == int((~known).sum())
    assert per_label[2].value is None and per_label[2].reason and "no known positive" in per_label[2].reason
    assert macro_auroc(per_label)[0] == pytest.approx(sklearn_macro_auroc(scores, labels), abs=1e-12)
    assert macro_auroc(per_label[2:]) == (None, macro_auroc([])[1])
    # A non-finite score ranks worst for its truth.
    broken = scores.copy()
    broken[labels[:, 0] == 1, 0] = np.nan
    assert label_aurocs(broken, labels, LABELS)[0].value == 0.0

    replicates = bootstrap_macro_aurocs([scores, scores[::-1]], labels, n_boot=40, rng=np.random.default_rng(5))
    idx = bootstrap_indices(60, n_boot=40, rng=np.random.default_rng(5))
    for b in (0, 17, 39):
        resampled = sklearn_macro_auroc(scores[idx[b]], labels[idx[b]])
        assert replicates[b, 0] == pytest.approx(resampled, abs=1e-12)
        assert replicates[b, 1] == pytest.approx(sklearn_macro_auroc(scores[::-1][idx[b]], labels[idx[b]]), abs=1e-12)


def test_multilabel_pgd_raises_the_loss_and_lowers_macro_auroc(multilabel_model: Any) -> None:
    from auditkit.checks.adversarial.loss_attacks import attacked_outputs, model_outputs, multilabel_loss
    from auditkit.tasks import label_aurocs, macro_auroc, task_scores

    model, images, labels = multilabel_model
    targets = torch.as_tensor(labels)
    clean = model_outputs(model, images)
    clean_auroc = sklearn_macro_auroc(clean.numpy(), labels)
    assert 0.75 < clean_auroc < 1.0  # trained, and not perfect: the attack has room
    config = AttackConfig(pgd_steps=10)
    for name, grid in (("pgd_linf", [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255]), ("pgd_l2", [0.0, 0.05, 0.1, 0.2])):
        losses, aurocs = [], []
        for eps in grid:
            out = attacked_outputs(model, images, targets, multilabel_loss, name, eps, config, seed=3, batch_size=40)
            if eps == 0:
                assert torch.equal(out.outputs, clean)  # the zero budget is the clean image
            assert float(out.norms.max()) <= eps + 1e-6  # the budget holds (L-infinity or L2)
            scores = task_scores(out.outputs, "multilabel")
            value = macro_auroc(label_aurocs(scores, labels, LABELS))[0]
            assert value == pytest.approx(sklearn_macro_auroc(scores, labels), abs=1e-12)
            losses.append(float(out.losses.mean()))
            aurocs.append(value)
        assert aurocs[0] == pytest.approx(clean_auroc, abs=1e-12)
        assert all(b > a for a, b in itertools.pairwise(losses)), (name, losses)
        assert all(b < a for a, b in itertools.pairwise(aurocs)), (name, aurocs)
        assert aurocs[-1] < clean_auroc - 0.15, (name, aurocs)


def test_loss_attacks_keep_images_in_range_on_channels_last_rgb() -> None:
    from auditkit.checks.adversarial.loss_attacks import attack_with_loss, multilabel_loss

    channels_last, contiguous = rgb_models()
    images = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[1, 0], [0, -1], [1, 1], [0, 0]])
    config = AttackConfig(pgd_steps=3)
    for name, eps in (("fgsm", 8 / 255), ("pgd_linf", 8 / 255), ("pgd_l2", 1.0)):
        outcomes = []
        for model in (channels_last, contiguous):
            torch.manual_seed(0)
            wrapped = ContiguousGradients(model)
            adversarial, start = attack_with_loss(
                wrapped, images.contiguous(), targets, multilabel_loss, name, eps, config
            )
            assert adversarial.is_contiguous() and float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
            assert float(start.min()) >= 0 and float(start.max()) <= 1
            outcomes.append(adversarial)
        torch.testing.assert_close(outcomes[0], outcomes[1], rtol=0, atol=1e-5)


def test_loss_sanity_tests_on_hand_made_curves() -> None:
    from auditkit.checks.adversarial.sanity import loss_masking_tests

    healthy = {"fgsm": {0.01: 1.0, 0.02: 0.9}, "pgd_linf": {0.01: 1.2, 0.02: 2.0}}  # FGSM exempt
    tests = loss_masking_tests(healthy, 100, task="regression", unbounded_stalled=0.0)
    assert outcome(tests) == {
        "loss_non_decreasing_in_eps": True,
        "iterative_beats_single_step": True,
        "unbounded_attack_succeeds": True,
        "white_box_beats_black_box": None,
    }
    assert "task: regression" in tests[3].detail
    assert masking_suspected(tests) is False
    broken = {"fgsm": {0.01: 1.0, 0.02: 3.0}, "pgd_linf": {0.01: 1.2, 0.02: 1.1}}
    tests = loss_masking_tests(broken, 100, task="multilabel", unbounded_stalled=0.5)
    assert outcome(tests) == {
        "loss_non_decreasing_in_eps": False,
        "iterative_beats_single_step": False,
        "unbounded_attack_succeeds": False,
        "white_box_beats_black_box": None,
    }
    assert tests[0].violations[0]["next_loss"] == 1.1
    assert [v["eps"] for v in tests[1].violations] == ["0.02"]
    assert "50.0%" in tests[2].detail
    # Within the relative slack (2%): no violation.
    assert loss_masking_tests({"pgd_linf": {0.01: 1.0, 0.02: 0.99}}, 100, task="multilabel", unbounded_stalled=None)[
        0
    ].passed


def jsonable(result: CheckResult) -> list[dict[str, Any]]:
    return [m.to_json() for m in result.metrics]


def multilabel_context(model: nn.Module, images: torch.Tensor, labels: np.ndarray, out: Path) -> CheckView:
    return make_context(
        labels,
        images=images.numpy(),
        model=model,
        classes=LABELS,
        task="multilabel",
        check=AdversarialCheck,
        out_dir=out,
    )


def test_check_on_a_multilabel_model(multilabel_model: Any, tmp_path: Path) -> None:
    from auditkit.checks.adversarial.loss_attacks import attacked_outputs, multilabel_loss

    model, images, labels = multilabel_model
    ctx = multilabel_context(model, images, labels, tmp_path)
    params = AdversarialCheck.Params(eps=[1 / 255, 4 / 255], eps_l2=[0.1], n_samples=40, **TASK_FAST)
    result = AdversarialCheck().run(ctx, params)
    metrics = by_key(result)
    assert {m.name for m in result.metrics} <= set(AdversarialCheck.emits)
    assert "multilabel" in AdversarialCheck.tasks and "regression" in AdversarialCheck.tasks

    plan = plan_sample(labels, 40, ctx.rng(), task="multilabel")
    sample, setup = result.findings[0], result.findings[1]
    assert sample["rows"] == plan.indices.tolist() and sample["n"] == 40
    chosen = labels[plan.indices]
    assert all(c["positive"] > 0 and c["negative"] > 0 for c in sample["label_counts"].values())
    clean = metrics[("adversarial.clean_macro_auroc", ())]
    with torch.no_grad():
        clean_scores = torch.sigmoid(model(images[plan.indices]).double()).numpy()
    assert clean.value == pytest.approx(sklearn_macro_auroc(clean_scores, chosen), abs=1e-9)
    assert clean.ci is not None and clean.ci[0] <= clean.value <= clean.ci[1]

    # One robust value by hand: the same attack, seed and sample, scored with scikit-learn.
    eps = 4 / 255
    again = attacked_outputs(
        model,
        images[plan.indices],
        torch.as_tensor(chosen),
        multilabel_loss,
        "pgd_linf",
        eps,
        AttackConfig(pgd_steps=10),
        seed=attack_seed(plan.seed_root, "pgd_linf", eps),
        batch_size=64,
    )
    robust_value = metrics[("adversarial.robust_macro_auroc", (("attack", "pgd_linf"), ("eps", eps_label(eps))))]
    expected = sklearn_macro_auroc(torch.sigmoid(again.outputs.double()).numpy(), chosen)
    assert robust_value.value == pytest.approx(expected, abs=1e-9)
    assert robust_value.value < clean.value
    assert setup["attacks"]["pgd_linf"]["max_perturbation_norm"][eps_label(eps)] <= eps + 1e-6
    assert "binary cross-entropy" in setup["loss"]

    for attack, grid in (("cw_l2", [0.1]), ("square", [1 / 255, 4 / 255])):
        for e in grid:
            metric = metrics[("adversarial.robust_macro_auroc", (("attack", attack), ("eps", eps_label(e))))]
            assert metric.value is None and metric.reason and "task: multilabel" in metric.reason
    assert not any(m.name == "adversarial.robust_accuracy" for m in result.metrics)
    kinds = [f["kind"] for f in result.findings]
    assert kinds == ["adversarial_sample", "attack_setup", "attacks_not_run", "gradient_masking_tests", "label_aurocs"]
    masking = next(f for f in result.findings if f["kind"] == "gradient_masking_tests")
    assert [t["passed"] for t in masking["tests"]] == [True, True, True, None]
    assert metrics[("adversarial.gradient_masking_suspected", ())].value == 0.0
    assert masking["unbounded"]["macro_auroc"] < 0.2  # an unbounded attack breaks the ranking
    judged = evaluate(
        rules_for("adversarial"),
        [{"id": "adversarial", "status": "ok", "metrics": jsonable(result)}],
        task="multilabel",
    )
    status = {r["id"]: r["status"] for r in judged["rules"]}
    assert status["ADV-GRADIENT-MASKING"] == "pass" and status["ADV-PGD-ONE-GREY-LEVEL-MULTILABEL"] == "pass"
    assert "ADV-PGD-ONE-GREY-LEVEL" in judged["policy"]["not_applicable"]["rules"]  # a classification rule
    (artifact,) = result.artifacts
    assert artifact.path == "artifacts/adversarial/robust_macro_auroc.svg"
    assert ET.parse(tmp_path / artifact.path).getroot().tag.endswith("svg")
    json.dumps([m.to_json() for m in result.metrics], allow_nan=False)
    json.dumps(result.findings, allow_nan=False)


def test_multilabel_label_without_positives_is_undefined_with_reason(multilabel_model: Any, tmp_path: Path) -> None:
    model, images, labels = multilabel_model
    labels = labels.copy()
    labels[labels[:, 2] == 1, 2] = 0  # no eval image has the third finding
    ctx = multilabel_context(model, images, labels, tmp_path)
    params = AdversarialCheck.Params(
        attacks=["pgd_linf"], eps=[2 / 255], n_samples=30, sanity_checks=False, **{**TASK_FAST, "n_boot": 0}
    )
    result = AdversarialCheck().run(ctx, params)
    table = next(f for f in result.findings if f["kind"] == "label_aurocs")
    (undefined,) = table["undefined_labels"]
    assert undefined["label"] == "edema" and "no known positive" in undefined["reason"]
    rows = np.asarray(result.findings[0]["rows"])
    with torch.no_grad():
        scores = torch.sigmoid(model(images[rows]).double()).numpy()
    clean = by_key(result)[("adversarial.clean_macro_auroc", ())]
    assert clean.value == pytest.approx(sklearn_macro_auroc(scores, labels[rows]), abs=1e-9)  # two labels


def test_masked_gradients_of_a_multilabel_model_are_flagged(multilabel_model: Any, tmp_path: Path) -> None:
    model, images, labels = multilabel_model
    ctx = multilabel_context(RoundedInput(model), images, labels, tmp_path)
    params = AdversarialCheck.Params(
        attacks=["fgsm", "pgd_linf"], eps=[2 / 255, 8 / 255], n_samples=40, **{**TASK_FAST, "n_boot": 0}
    )
    result = AdversarialCheck().run(ctx, params)
    assert by_key(result)[("adversarial.gradient_masking_suspected", ())].value == 1.0
    failed = [f["test"] for f in result.findings if f["kind"] == "gradient_masking_suspected"]
    assert "unbounded_attack_succeeds" in failed
    judged = evaluate(rules_for("adversarial"), [{"id": "adversarial", "status": "ok", "metrics": jsonable(result)}])
    assert {r["id"]: r["status"] for r in judged["rules"]}["ADV-GRADIENT-MASKING"] == "fail"


def test_check_on_a_regression_model(regression_model: Any, tmp_path: Path) -> None:
    from sklearn.metrics import mean_absolute_error

    model, images, targets = regression_model
    ctx = make_context(
        targets,
        images=images.numpy(),
        model=model,
        classes=["bone_age"],
        task="regression",
        units={"bone_age": "months"},
        check=AdversarialCheck,
        out_dir=tmp_path,
    )
    grid = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
    params = AdversarialCheck.Params(attacks=["fgsm", "pgd_linf", "cw_l2"], eps=grid, n_samples=30, **TASK_FAST)
    result = AdversarialCheck().run(ctx, params)
    metrics = by_key(result)
    rows = np.asarray(result.findings[0]["rows"])
    with torch.no_grad():
        predicted = model(images[rows])[:, 0].double().numpy()
    clean = metrics[("adversarial.clean_mae", ())]
    assert clean.direction == "lower_is_better"
    assert clean.value == pytest.approx(mean_absolute_error(targets[rows], predicted), abs=1e-9)
    robust_mae = [
        metrics[("adversarial.robust_mae", (("attack", "pgd_linf"), ("eps", eps_label(e))))].value for e in grid
    ]
    assert all(v is not None for v in robust_mae)
    assert clean.value < robust_mae[0] and all(b > a for a, b in itertools.pairwise(robust_mae)), robust_mae
    cw = metrics[("adversarial.robust_mae", (("attack", "cw_l2"), ("eps", "0.1")))]
    assert cw.value is None and cw.reason and "task: regression" in cw.reason
    setup = result.findings[1]
    assert setup["units"] == {"bone_age": "months"} and result.findings[0]["targets"]["bone_age"]["unit"] == "months"
    assert metrics[("adversarial.gradient_masking_suspected", ())].value == 0.0
    assert [a.path for a in result.artifacts] == ["artifacts/adversarial/robust_mae.svg"]


def test_regression_with_two_outputs_labels_each_output(regression_model: Any, tmp_path: Path) -> None:
    model, images, targets = regression_model
    two = nn.Sequential(model[0], nn.Linear(64, 2)).eval().requires_grad_(False)
    with torch.no_grad():
        two[1].weight.copy_(torch.cat([model[1].weight, 0.5 * model[1].weight]))
        two[1].bias.copy_(torch.cat([model[1].bias, 0.5 * model[1].bias]))
    both = np.stack([targets, 0.5 * targets], axis=1)
    ctx = make_context(
        both, images=images.numpy(), model=two, classes=["age", "half_age"], task="regression", check=AdversarialCheck
    )
    params = AdversarialCheck.Params(attacks=["pgd_linf"], eps=[4 / 255], n_samples=20, sanity_checks=False, n_boot=0)
    result = AdversarialCheck().run(ctx, params)
    metrics = by_key(result)
    age = metrics[("adversarial.robust_mae", (("attack", "pgd_linf"), ("eps", "0.016"), ("output", "age")))].value
    half = metrics[("adversarial.robust_mae", (("attack", "pgd_linf"), ("eps", "0.016"), ("output", "half_age")))]
    # Proportional outputs, one metric each: the attack moves them together, the second half as far.
    assert age is not None and half.value == pytest.approx(age / 2, rel=1e-4)
    assert len(result.artifacts) == 2


def test_empty_eval_split_of_other_tasks(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    for task, labels in (("multilabel", np.zeros((0, 2), dtype=np.int64)), ("regression", np.zeros((0, 2)))):
        ctx = make_context(labels, images=np.zeros((0, 1, 4, 4)), model=model, task=task, check=AdversarialCheck)
        params = AdversarialCheck.Params(attacks=["pgd_linf", "cw_l2"], eps=[0.01], eps_l2=[0.5])
        result = AdversarialCheck().run(ctx, params)
        assert result.metrics and all(m.value is None and m.reason == "no eval images" for m in result.metrics)
        assert {m.name for m in result.metrics} <= set(AdversarialCheck.emits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_attacks_run_on_cuda(multilabel_model: Any, regression_model: Any) -> None:
    import copy

    from auditkit.checks.adversarial.loss_attacks import (
        attacked_outputs,
        model_outputs,
        multilabel_loss,
        squared_error_loss,
    )

    config = AttackConfig(pgd_steps=5)
    for (model, images, labels), loss in (
        (multilabel_model, multilabel_loss),
        (regression_model, squared_error_loss()),
    ):
        on_gpu = copy.deepcopy(model).cuda()
        targets = torch.as_tensor(labels).reshape(len(labels), -1)
        clean_loss = float(loss(model_outputs(model, images), targets).mean())
        state = torch.cuda.get_rng_state()
        runs = [
            attacked_outputs(on_gpu, images, targets, loss, "pgd_l2", 0.2, config, seed=3, batch_size=32)
            for _ in range(2)
        ]
        assert torch.equal(torch.cuda.get_rng_state(), state)
        assert torch.equal(runs[0].outputs, runs[1].outputs) and runs[0].outputs.device.type == "cpu"
        assert float(runs[0].norms.max()) <= 0.2 + 1e-5
        assert float(runs[0].losses.mean()) > clean_loss


@pytest.mark.parametrize("attack", ["fgsm", "pgd_linf", "pgd_l2", "square", "cw_l2"])
def test_an_attack_leaves_the_model_in_eval_mode_with_its_statistics(attack: str) -> None:
    """torchattacks restores the training mode of the module it is handed; the wrappers must carry
    the model's, or the audited model is left training (batch norm, dropout) for later checks."""
    from auditkit.checks.adversarial.attacks import minimum_norm_perturbations

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    ).eval()
    statistics = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    config = AttackConfig(pgd_steps=2, square_queries=5, cw_steps=2)
    if attack == "cw_l2":
        minimum_norm_perturbations(model, images, labels, config, seed=0, batch_size=4)
    else:
        still_correct(model, images, labels, attack, 8 / 255, config, seed=0, batch_size=4)
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, statistics[key]), key
