"""The adversarial check on segmentation models (``task: segmentation``): FGSM and PGD on the mean
pixel-wise cross-entropy, ``adversarial.clean_dice`` and ``adversarial.robust_dice`` ``{attack, eps}``.

The models are fixed-weight pixel-wise threshold networks (1x1 convolutions), whose worst case
within an L-infinity budget is known in closed form: every pixel pushed by ``eps`` toward the
class boundary. Dice values are cross-checked against MONAI's ``compute_dice`` on the same maps.
"""

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
from torch import nn

from auditkit.check import CheckResult, Skip
from auditkit.checks.adversarial import AdversarialCheck, AttackConfig, attack_seed, eps_label, plan_sample
from auditkit.checks.adversarial.loss_attacks import attack_with_loss, attacked_outputs, segmentation_loss
from auditkit.policy import evaluate
from auditkit.testing import make_context, rules_for

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIDE = 16
FAST = {"pgd_steps": 5, "unbounded_steps": 10, "n_boot": 200}
CLASSES3 = ["background", "rim", "core"]


# --------------------------------------------------------------------------------------------
# Models and data


def threshold_net(dims: int = 2) -> nn.Module:
    """Two classes: a pixel is foreground when brighter than 0.5 (logit gap ``20 x - 10``)."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-10.0, 10.0]).view(2, 1, *[1] * dims))
        conv.bias.copy_(torch.tensor([5.0, -5.0]))
    return nn.Sequential(conv).eval().requires_grad_(False)


def band_net() -> nn.Module:
    """Three classes by intensity band: background below 1/3, rim between, core above 2/3."""
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-20.0, 0.0, 20.0]).view(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([20.0 / 3.0, 0.0, -40.0 / 3.0]))
    return nn.Sequential(conv).eval().requires_grad_(False)


def disc(centre: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.mgrid[:SIDE, :SIDE]
    return ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) <= radius**2


def two_class_study(n: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright discs on a dark background, intensities spread so every budget flips some pixels;
    every fifth image has no disc (an empty reference)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, SIDE, SIDE), dtype=np.int64)
    images = np.zeros((n, 1, SIDE, SIDE), dtype=np.float32)
    for i in range(n):
        if i % 5 != 4:
            labels[i] = disc(tuple(rng.uniform(5, 11, 2)), rng.uniform(3, 5))
        bright = rng.uniform(0.51, 0.95, (SIDE, SIDE))
        dark = rng.uniform(0.05, 0.49, (SIDE, SIDE))
        images[i, 0] = np.where(labels[i] == 1, bright, dark)
    return images, labels


def three_class_study(n: int = 12, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A core disc inside a rim disc; some images have only a rim, some nothing."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, SIDE, SIDE), dtype=np.int64)
    images = np.zeros((n, 1, SIDE, SIDE), dtype=np.float32)
    bands = {0: (0.03, 0.32), 1: (0.345, 0.655), 2: (0.68, 0.97)}
    for i in range(n):
        centre = tuple(rng.uniform(6, 10, 2))
        if i % 6 != 5:
            labels[i][disc(centre, rng.uniform(4, 6))] = 1
        if i % 3 != 2 and i % 6 != 5:
            labels[i][disc(centre, rng.uniform(1.5, 3))] = 2
        for k, (low, high) in bands.items():
            images[i, 0][labels[i] == k] = rng.uniform(low, high, int((labels[i] == k).sum()))
        noisy = rng.random((SIDE, SIDE)) < 0.04  # a few pixels anywhere: the clean maps are imperfect
        images[i, 0][noisy] = rng.uniform(0, 1, int(noisy.sum()))
    return images, labels


def seg_context(model: nn.Module, images: np.ndarray, labels: np.ndarray, classes: list[str], out: Path) -> Any:
    return make_context(
        labels, images=images, model=model, classes=classes, task="segmentation", check=AdversarialCheck, out_dir=out
    )


def monai_mean_dice(predicted: np.ndarray, reference: np.ndarray, n_classes: int) -> float:
    """MONAI's per-case Dice, each class averaged over the cases whose reference holds it, then over
    the classes (the reference implementation of the check's mean Dice)."""
    from monai.metrics import compute_dice

    one_hot = [
        torch.nn.functional.one_hot(torch.as_tensor(m, dtype=torch.long), n_classes).movedim(-1, 1).float()
        for m in (predicted, reference)
    ]
    dice = compute_dice(*one_hot, include_background=False, ignore_empty=True).double().numpy()
    return float(np.nanmean(np.nanmean(dice, axis=0)))


def by_key(result: CheckResult) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    return {(m.name, tuple(sorted(m.labels.items()))): m for m in result.metrics}


def robust_dice(result: CheckResult, attack: str, eps: float) -> Any:
    return by_key(result)[("adversarial.robust_dice", (("attack", attack), ("eps", eps_label(eps))))]


# --------------------------------------------------------------------------------------------
# The loss and the loops


def test_segmentation_loss_hand_values() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    targets = torch.tensor([[[0, 0]]])
    # Pixel 1: -log softmax([2, 0])[0]; pixel 2: -log softmax([0, 1])[0]; their mean.
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))) / 2
    assert float(segmentation_loss(logits, targets)[0]) == pytest.approx(expected, rel=1e-6)
    volume = torch.randn(3, 4, 2, 5, 5)
    maps = torch.randint(0, 4, (3, 2, 5, 5))
    per_voxel = nn.functional.cross_entropy(volume, maps, reduction="none")
    torch.testing.assert_close(segmentation_loss(volume, maps), per_voxel.mean(dim=(1, 2, 3)))


def test_loss_loops_are_torchattacks_on_per_pixel_logits() -> None:
    """torchattacks' cross-entropy accepts ``(N, K, H, W)`` logits against ``(N, H, W)`` maps; the
    loops with the per-image mean (divided by N: torchattacks' mean over every pixel) take its steps."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    model.eval().requires_grad_(False)
    images = torch.rand(4, 1, 12, 12)
    maps = torch.randint(0, 3, (4, 12, 12))
    config = AttackConfig(pgd_steps=4)

    def batch_mean(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(outputs, targets) / len(targets)

    for name, eps, reference in (
        ("fgsm", 0.03, lambda: torchattacks.FGSM(model, eps=0.03)),
        ("pgd_linf", 0.03, lambda: torchattacks.PGD(model, eps=0.03, alpha=2.5 * 0.03 / 4, steps=4)),
        ("pgd_l2", 0.5, lambda: torchattacks.PGDL2(model, eps=0.5, alpha=2.5 * 0.5 / 4, steps=4)),
    ):
        torch.manual_seed(11)
        ours, _ = attack_with_loss(model, images, maps, batch_mean, name, eps, config)
        torch.manual_seed(11)
        theirs = reference()(images, maps)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
        assert float(segmentation_loss(model(ours), maps).mean()) > float(segmentation_loss(model(images), maps).mean())


def test_pgd_reaches_the_closed_form_worst_case_and_eps_zero_is_clean() -> None:
    """A 1x1 threshold model's worst case within ``eps``: each pixel pushed by ``eps`` toward the
    other class. PGD reaches it; its Dice (MONAI's) falls with eps down to 0; eps 0 changes nothing."""
    images_np, labels = two_class_study()
    images, targets = torch.as_tensor(images_np), torch.as_tensor(labels)
    model = threshold_net()
    clean = model(images)
    config = AttackConfig(pgd_steps=5)
    zero = attacked_outputs(model, images, targets, segmentation_loss, "pgd_linf", 0.0, config, seed=0, batch_size=4)
    assert torch.equal(zero.outputs, clean) and float(zero.norms.max()) == 0.0
    dice = [monai_mean_dice(clean.argmax(dim=1).numpy(), labels, 2)]
    assert monai_mean_dice(zero.outputs.argmax(dim=1).numpy(), labels, 2) == dice[0]
    assert dice[0] == pytest.approx(1.0)  # the threshold separates the two intensity ranges
    for eps in (0.02, 0.08, 0.2, 0.46):
        outcome = attacked_outputs(
            model, images, targets, segmentation_loss, "pgd_linf", eps, config, seed=5, batch_size=4
        )
        assert float(outcome.norms.max()) <= eps + 1e-6
        toward_other = torch.where(targets.unsqueeze(1) == 1, -eps, eps)
        worst = model(torch.clamp(images + toward_other, 0, 1)).argmax(dim=1)
        assert torch.equal(outcome.outputs.argmax(dim=1), worst), eps
        dice.append(monai_mean_dice(worst.numpy(), labels, 2))
        assert bool((outcome.losses > outcome.start_losses).all())
    assert all(b < a for a, b in itertools.pairwise(dice)), dice
    assert dice[-1] == 0.0  # past the widest margin (0.45) every pixel flips


# --------------------------------------------------------------------------------------------
# The check


def test_check_on_a_three_class_segmentation_model(tmp_path: Path) -> None:
    images, labels = three_class_study()
    model = band_net()
    ctx = seg_context(model, images, labels, CLASSES3, tmp_path)
    grid = [0.02, 0.06, 0.12]
    params = AdversarialCheck.Params(
        attacks=["fgsm", "pgd_linf", "pgd_l2", "cw_l2", "square"],
        eps=grid,
        eps_l2=[0.5, 2.0],
        n_samples=10,
        **FAST,
    )
    result = AdversarialCheck().run(ctx, params)
    metrics = by_key(result)
    assert "segmentation" in AdversarialCheck.tasks
    assert {m.name for m in result.metrics} <= set(AdversarialCheck.emits)

    plan = plan_sample(labels, 10, ctx.rng(), task="segmentation")
    sample, setup = result.findings[0], result.findings[1]
    assert sample["rows"] == plan.indices.tolist() and sample["n"] == 10
    chosen = labels[plan.indices]
    assert sample["cases_with_class"] == {
        "rim": int((chosen == 1).any(axis=(1, 2)).sum()),
        "core": int((chosen == 2).any(axis=(1, 2)).sum()),
    }
    assert sample["empty_reference"] == int((chosen == 0).all(axis=(1, 2)).sum()) >= 1
    pixels = ctx.images("eval", plan.indices)
    clean = metrics[("adversarial.clean_dice", ())]
    assert clean.direction == "higher_is_better" and clean.n == 10
    with torch.no_grad():
        clean_maps = model(pixels).argmax(dim=1).numpy()
    assert clean.value == pytest.approx(monai_mean_dice(clean_maps, chosen, 3), abs=1e-9)
    assert clean.ci is not None and clean.ci[0] <= clean.value <= clean.ci[1]

    # One robust value by hand: the same attack, seed and sample, scored by MONAI.
    eps = 0.06
    again = attacked_outputs(
        model,
        pixels,
        torch.as_tensor(chosen),
        segmentation_loss,
        "pgd_linf",
        eps,
        AttackConfig(pgd_steps=5),
        seed=attack_seed(plan.seed_root, "pgd_linf", eps),
        batch_size=128,
    )
    robust = robust_dice(result, "pgd_linf", eps)
    assert robust.value == pytest.approx(monai_mean_dice(again.outputs.argmax(dim=1).numpy(), chosen, 3), abs=1e-9)
    assert robust.ci is not None and robust.ci[0] <= robust.value <= robust.ci[1]
    pgd = [robust_dice(result, "pgd_linf", e).value for e in grid]
    assert clean.value > pgd[0] > pgd[1] > pgd[2], (clean.value, pgd)
    assert pgd[2] < 0.5 * clean.value  # bands 0.09 wide: most pixels within reach of a boundary
    for attack in ("fgsm", "pgd_l2"):
        assert all(robust_dice(result, attack, e).value < clean.value for e in params.grid(attack))

    # Every perturbation within its budget (L-infinity, or L2 over the whole image).
    for attack, norms in setup["attacks"].items():
        for label, largest in norms["max_perturbation_norm"].items():
            assert largest <= float(label) * (1 + 1e-3) + 1e-6, (attack, label, largest)
    assert set(setup["attacks"]) == {"fgsm", "pgd_linf", "pgd_l2"}
    assert "cross-entropy" in setup["loss"] and "compute_dice" in setup["metric"]

    # Classification attacks: not run, with the task named.
    for attack, budgets in (("cw_l2", [0.5, 2.0]), ("square", grid)):
        for e in budgets:
            metric = robust_dice(result, attack, e)
            assert metric.value is None and metric.reason and "task: segmentation" in metric.reason
    not_run = next(f for f in result.findings if f["kind"] == "attacks_not_run")
    assert not_run["attacks"] == ["cw_l2", "square"] and "task: segmentation" in not_run["reason"]

    kinds = [f["kind"] for f in result.findings]
    assert kinds == ["adversarial_sample", "attack_setup", "attacks_not_run", "gradient_masking_tests", "class_dice"]
    masking = next(f for f in result.findings if f["kind"] == "gradient_masking_tests")
    assert [t["passed"] for t in masking["tests"]] == [True, True, True, None]
    assert "task: segmentation" in masking["tests"][3]["detail"]
    assert metrics[("adversarial.gradient_masking_suspected", ())].value == 0.0
    assert masking["unbounded"]["mean_dice"] is not None and masking["unbounded"]["mean_dice"] < 0.1

    table = next(f for f in result.findings if f["kind"] == "class_dice")
    from monai.metrics import compute_dice

    one_hot = [torch.nn.functional.one_hot(torch.as_tensor(m), 3).movedim(-1, 1).float() for m in (clean_maps, chosen)]
    per_case = compute_dice(*one_hot, include_background=False, ignore_empty=True).double().numpy()
    for k, name in enumerate(["rim", "core"]):
        assert table["clean"][name]["dice"] == pytest.approx(float(np.nanmean(per_case[:, k])), abs=1e-9)
        assert table["clean"][name]["cases"] == int(np.isfinite(per_case[:, k]).sum())
    assert set(table["attacked"]) == {
        f"{a}@{eps_label(e)}" for a in ("fgsm", "pgd_linf", "pgd_l2") for e in params.grid(a)
    }
    assert table["undefined_classes"] == [] and table["non_finite_cases"] == {}

    judged = evaluate(
        rules_for("adversarial"),
        [{"id": "adversarial", "status": "ok", "metrics": jsonable(result)}],
        task="segmentation",
    )
    status = {r["id"]: r["status"] for r in judged["rules"]}
    assert status["ADV-GRADIENT-MASKING"] == "pass"
    assert "ADV-PGD-ONE-GREY-LEVEL" in judged["policy"]["not_applicable"]["rules"]
    (artifact,) = result.artifacts
    assert artifact.path == "artifacts/adversarial/robust_dice.svg"
    assert ET.parse(tmp_path / artifact.path).getroot().tag.endswith("svg")
    json.dumps(jsonable(result), allow_nan=False)
    json.dumps(result.findings, allow_nan=False)


def jsonable(result: CheckResult) -> list[dict[str, Any]]:
    return [m.to_json() for m in result.metrics]


def test_check_on_a_segmentation_volume(tmp_path: Path) -> None:
    """A 3-D model: the depth folded into the channels for the attacks, the output (N, K, D, H, W)."""
    rng = np.random.default_rng(2)
    labels = np.zeros((4, 3, 8, 8), dtype=np.int64)
    labels[:3, :, 2:6, 2:6] = 1
    labels[1, 0] = 0  # one slice without the structure
    images = np.where(labels == 1, rng.uniform(0.51, 0.95, labels.shape), rng.uniform(0.05, 0.49, labels.shape))
    images = images[:, None].astype(np.float32)
    model = threshold_net(dims=3)
    ctx = seg_context(model, images, labels, ["background", "organ"], tmp_path)
    grid = [0.05, 0.2]
    params = AdversarialCheck.Params(attacks=["fgsm", "pgd_linf", "pgd_l2"], eps=grid, eps_l2=[1.0], **FAST)
    result = AdversarialCheck().run(ctx, params)
    rows = np.asarray(result.findings[0]["rows"])
    assert result.findings[0]["spatial_shape"] == [3, 8, 8]
    with torch.no_grad():
        logits = model(ctx.images("eval", rows))
    assert logits.shape == (4, 2, 3, 8, 8)
    clean = by_key(result)[("adversarial.clean_dice", ())]
    assert clean.value == pytest.approx(monai_mean_dice(logits.argmax(dim=1).numpy(), labels[rows], 2), abs=1e-9)
    pgd = [robust_dice(result, "pgd_linf", e).value for e in grid]
    assert clean.value > pgd[0] > pgd[1], (clean.value, pgd)
    setup = result.findings[1]
    for attack, info in setup["attacks"].items():
        for label, largest in info["max_perturbation_norm"].items():
            assert largest <= float(label) * (1 + 1e-3) + 1e-6, (attack, label, largest)
    assert by_key(result)[("adversarial.gradient_masking_suspected", ())].value == 0.0


class RoundedInput(nn.Module):
    """A gradient-masking defence: the image is rounded to 9 grey levels before the network."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(images * 8.0) / 8.0)  # type: ignore[no-any-return]


def test_masked_gradients_of_a_segmentation_model_are_flagged(tmp_path: Path) -> None:
    images, labels = two_class_study()
    ctx = seg_context(RoundedInput(threshold_net()), images, labels, ["background", "lesion"], tmp_path)
    params = AdversarialCheck.Params(attacks=["fgsm", "pgd_linf"], eps=[0.02, 0.08], **{**FAST, "n_boot": 0})
    result = AdversarialCheck().run(ctx, params)
    assert by_key(result)[("adversarial.gradient_masking_suspected", ())].value == 1.0
    failed = [f["test"] for f in result.findings if f["kind"] == "gradient_masking_suspected"]
    assert "unbounded_attack_succeeds" in failed
    # Its clean twin: the same model without the rounding passes.
    twin = AdversarialCheck().run(
        seg_context(threshold_net(), images, labels, ["background", "lesion"], tmp_path), params
    )
    assert by_key(twin)[("adversarial.gradient_masking_suspected", ())].value == 0.0


class NaNOnDark(nn.Module):
    """The threshold model, with NaN outputs for every image whose mean intensity is below 0.15."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = threshold_net()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.inner(images)
        dark = images.flatten(1).mean(dim=1) < 0.15
        return torch.where(dark.view(-1, 1, 1, 1), torch.full_like(logits, float("nan")), logits)


def test_non_finite_outputs_score_as_background_and_are_counted(tmp_path: Path) -> None:
    images, labels = two_class_study()
    images[1] *= 0.3  # a dark image with a disc: NaN outputs, scored all background (Dice 0)
    params = AdversarialCheck.Params(attacks=["pgd_linf"], eps=[0.02], sanity_checks=False, n_boot=0, pgd_steps=3)
    result = AdversarialCheck().run(
        seg_context(NaNOnDark(), images, labels, ["background", "lesion"], tmp_path), params
    )
    table = next(f for f in result.findings if f["kind"] == "class_dice")
    assert table["non_finite_cases"] == {"clean": 1, "pgd_linf@0.02": 1}
    rows = np.asarray(result.findings[0]["rows"])
    maps = threshold_net()(torch.as_tensor(images[rows])).argmax(dim=1).numpy()
    maps[rows.tolist().index(1)] = 0
    clean = by_key(result)[("adversarial.clean_dice", ())]
    assert clean.value == pytest.approx(monai_mean_dice(maps, labels[rows], 2), abs=1e-9)
    json.dumps(jsonable(result), allow_nan=False)
    # Every image dark: nothing to measure.
    with pytest.raises(Skip, match="non-finite"):
        AdversarialCheck().run(
            seg_context(NaNOnDark(), images * 0.1, labels, ["background", "lesion"], tmp_path), params
        )


def test_undefined_dice_and_empty_split_have_reasons(tmp_path: Path) -> None:
    images, labels = two_class_study()
    params = AdversarialCheck.Params(
        attacks=["pgd_linf", "square"], eps=[0.02], n_boot=50, pgd_steps=2, unbounded_steps=2
    )
    empty = np.zeros_like(labels)  # no reference holds the lesion
    result = AdversarialCheck().run(
        seg_context(threshold_net(), images, empty, ["background", "lesion"], tmp_path), params
    )
    metrics = by_key(result)
    for key in (("adversarial.clean_dice", ()), ("adversarial.robust_dice", (("attack", "pgd_linf"), ("eps", "0.02")))):
        assert metrics[key].value is None and "no foreground class" in metrics[key].reason
    assert "task: segmentation" in metrics[("adversarial.robust_dice", (("attack", "square"), ("eps", "0.02")))].reason
    assert result.artifacts == []
    table = next(f for f in result.findings if f["kind"] == "class_dice")
    assert table["undefined_classes"] == [{"class": "lesion", "reason": "no sampled case's reference holds the class"}]
    json.dumps(jsonable(result), allow_nan=False)

    ctx = seg_context(threshold_net(), images[:0], labels[:0], ["background", "lesion"], tmp_path)
    result = AdversarialCheck().run(ctx, params)
    assert result.metrics and all(m.value is None and m.reason == "no eval images" for m in result.metrics)
    assert {m.name for m in result.metrics} == {
        "adversarial.clean_dice",
        "adversarial.robust_dice",
        "adversarial.gradient_masking_suspected",
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segmentation_attacks_run_on_cuda() -> None:
    import copy

    images_np, labels = two_class_study()
    images, targets = torch.as_tensor(images_np), torch.as_tensor(labels)
    model = threshold_net()
    on_gpu = copy.deepcopy(model).cuda()
    config = AttackConfig(pgd_steps=5)
    state = torch.cuda.get_rng_state()
    runs = [
        attacked_outputs(on_gpu, images, targets, segmentation_loss, "pgd_l2", 1.0, config, seed=3, batch_size=4)
        for _ in range(2)
    ]
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert torch.equal(runs[0].outputs, runs[1].outputs) and runs[0].outputs.device.type == "cpu"
    assert runs[0].outputs.shape == (10, 2, SIDE, SIDE)
    assert float(runs[0].norms.max()) <= 1.0 + 1e-5
    assert float(runs[0].losses.mean()) > float(segmentation_loss(model(images), targets).mean())
