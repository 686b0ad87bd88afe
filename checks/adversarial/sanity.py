"""Gradient-masking sanity checks on robust-accuracy curves (plain functions).

Carlini et al. 2019, "On Evaluating Adversarial Robustness" (arXiv:1902.06705), section 5 lists
the symptoms of an evaluation fooled by masked or obfuscated gradients (Athalye et al. 2018,
"Obfuscated Gradients Give a False Sense of Security", ICML): a model that breaks the gradient
looks robust to gradient attacks without being robust. The tests here read the curves the check
measured; each one that fails names what it saw.

* ``accuracy_non_increasing_in_eps``: a larger budget contains the smaller one, so an iterative
  attack's robust accuracy must not rise with epsilon (FGSM is exempt: one step of length eps
  overshoots at large eps, which is expected of a single-step attack, not a sign of masking).
* ``iterative_beats_single_step``: PGD must do at least as well as FGSM at every epsilon.
* ``unbounded_attack_succeeds``: with a budget covering the whole intensity range, an iterative
  attack must reach (about) zero accuracy.
* ``white_box_beats_black_box``: the black-box Square attack, which needs no gradient, must not
  beat the best white-box attack at any epsilon.

A small slack absorbs sampling noise: a violation counts when it exceeds
``max(tolerance, 1 / n)``, the larger of the tolerance and one image of the sample.

Multi-label and regression models (:func:`loss_masking_tests`) have no accuracy to read; the
attacks maximise a loss (:mod:`.loss_attacks`), and the tests read what the attack optimises, the
mean loss on the attacked sample:

* ``loss_non_decreasing_in_eps``: an iterative attack's loss must not fall with epsilon by more
  than the slack, taken relative to the smaller budget's loss (FGSM is exempt, as above).
* ``iterative_beats_single_step``: PGD's loss must reach FGSM's at every epsilon, within the
  relative slack.
* ``unbounded_attack_succeeds``: PGD with a budget covering the whole intensity range must raise
  the loss of (almost) every image above the loss at its random starting point; the share of
  images where its gradient steps gained nothing must stay within the slack. This is Carlini et
  al.'s comparison of a gradient attack against random noise at the budget where the noise is
  largest: gradients that are zero or point nowhere (masking) leave the attack where it started,
  and no robustness can explain an unbounded attack that cannot raise the loss.
* ``white_box_beats_black_box`` does not run: the Square attack searches class margins and
  is run for classification only; the test says so, naming the task.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from auditkit.checks.adversarial.attacks import ATTACKS, eps_label

__all__ = ["MaskingTest", "gradient_masking_tests", "loss_masking_tests", "masking_suspected", "slack"]

Curves = Mapping[str, Mapping[float, float]]
"""attack -> {epsilon: robust accuracy}."""

_WHITE_BOX_LINF = ("fgsm", "pgd_linf")


@dataclass(frozen=True)
class MaskingTest:
    """The outcome of one sanity test.

    Attributes:
        name: the test's name (see the module docstring).
        passed: ``True``/``False``, or ``None`` when the attacks it compares were not run.
        detail: one sentence for the report.
        violations: the evidence of a failure, as plain records.
    """

    name: str
    passed: bool | None
    detail: str
    violations: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "violations": list(self.violations),
        }


def slack(n: int, tolerance: float) -> float:
    """The allowed violation: ``max(tolerance, 1 / n)`` (one image of a sample of ``n``)."""
    if n < 1:
        raise ValueError(f"the sample must hold at least one image, got n={n}")
    return max(float(tolerance), 1.0 / n)


def _monotone(curves: Curves, allowed: float) -> MaskingTest:
    name = "accuracy_non_increasing_in_eps"
    checked = [a for a in curves if a in ATTACKS and ATTACKS[a].iterative and len(curves[a]) > 1]
    if not checked:
        return MaskingTest(name, None, "no iterative attack ran at two or more budgets")
    violations = []
    for attack in checked:
        points = sorted(curves[attack].items())
        for (eps_a, acc_a), (eps_b, acc_b) in itertools.pairwise(points):
            if acc_b - acc_a > allowed:
                violations.append(
                    {
                        "attack": attack,
                        "eps": eps_label(eps_a),
                        "next_eps": eps_label(eps_b),
                        "robust_accuracy": acc_a,
                        "next_robust_accuracy": acc_b,
                    }
                )
    if violations:
        worst = max(violations, key=lambda v: v["next_robust_accuracy"] - v["robust_accuracy"])
        detail = (
            f"{worst['attack']} robust accuracy rises from {worst['robust_accuracy']:.3f} at eps "
            f"{worst['eps']} to {worst['next_robust_accuracy']:.3f} at eps {worst['next_eps']} "
            "(masked gradients, or an attack too weak for the larger budget: raise its steps)"
        )
        return MaskingTest(name, False, detail, violations)
    return MaskingTest(name, True, f"robust accuracy never rises with eps ({', '.join(checked)})")


def _iterative_vs_single(curves: Curves, allowed: float) -> MaskingTest:
    name = "iterative_beats_single_step"
    if "pgd_linf" not in curves or "fgsm" not in curves:
        return MaskingTest(name, None, "needs both fgsm and pgd_linf")
    shared = sorted(set(curves["pgd_linf"]) & set(curves["fgsm"]))
    if not shared:
        return MaskingTest(name, None, "fgsm and pgd_linf share no eps")
    violations = [
        {
            "eps": eps_label(eps),
            "pgd_linf": curves["pgd_linf"][eps],
            "fgsm": curves["fgsm"][eps],
        }
        for eps in shared
        if curves["pgd_linf"][eps] - curves["fgsm"][eps] > allowed
    ]
    if violations:
        v = violations[0]
        detail = (
            f"single-step FGSM beats iterative PGD at eps {v['eps']} "
            f"(robust accuracy {v['fgsm']:.3f} against {v['pgd_linf']:.3f}): the gradient misleads "
            "the iterative attack"
        )
        return MaskingTest(name, False, detail, violations)
    return MaskingTest(name, True, "PGD is at least as strong as FGSM at every eps")


def _unbounded(accuracy: float | None, eps: float, allowed: float) -> MaskingTest:
    name = "unbounded_attack_succeeds"
    if accuracy is None:
        return MaskingTest(name, None, "the unbounded attack was not run")
    if accuracy > allowed:
        detail = (
            f"PGD with eps {eps_label(eps)} (the whole intensity range) leaves robust accuracy "
            f"at {accuracy:.3f}; an attack that may change any pixel to any value should reach "
            "about zero (or the model ignores its input)"
        )
        return MaskingTest(name, False, detail, [{"eps": eps_label(eps), "robust_accuracy": accuracy}])
    return MaskingTest(name, True, f"PGD with eps {eps_label(eps)} brings robust accuracy to {accuracy:.3f}")


def _black_vs_white(curves: Curves, allowed: float) -> MaskingTest:
    name = "white_box_beats_black_box"
    white = [a for a in _WHITE_BOX_LINF if a in curves]
    if "square" not in curves or not white:
        return MaskingTest(name, None, "needs square and fgsm or pgd_linf")
    violations = []
    for eps, black_accuracy in sorted(curves["square"].items()):
        at_eps = {a: curves[a][eps] for a in white if eps in curves[a]}
        if not at_eps:
            continue
        best = min(at_eps.values())
        if best - black_accuracy > allowed:
            violations.append({"eps": eps_label(eps), "square": black_accuracy, **at_eps})
    if violations:
        v = violations[0]
        best_white = min(v[a] for a in white if a in v)
        detail = (
            f"black-box Square beats every white-box attack at eps {v['eps']} "
            f"(robust accuracy {v['square']:.3f} against {best_white:.3f}): the gradients do not "
            "show the way to the adversarial examples that exist"
        )
        return MaskingTest(name, False, detail, violations)
    return MaskingTest(name, True, "no black-box result beats the white-box attacks")


def gradient_masking_tests(
    curves: Curves,
    n: int,
    *,
    unbounded_accuracy: float | None,
    unbounded_eps: float = 1.0,
    tolerance: float = 0.02,
) -> list[MaskingTest]:
    """Run the four sanity tests of Carlini et al. (2019) on measured robust accuracies.

    Args:
        curves: attack -> {eps: robust accuracy}, over one sample of ``n`` images.
        n: the sample size.
        unbounded_accuracy: robust accuracy of PGD at ``unbounded_eps``, or ``None``.
        unbounded_eps: the budget of that run (1.0 covers the whole ``[0, 1]`` range).
        tolerance: absolute slack on accuracies (see :func:`slack`).

    Returns:
        One :class:`MaskingTest` per test, in the order of the module docstring.

    Example:
        >>> tests = gradient_masking_tests(
        ...     {"fgsm": {0.01: 0.5}, "pgd_linf": {0.01: 0.2}}, 100, unbounded_accuracy=0.6
        ... )
        >>> [t.name for t in tests if t.passed is False]
        ['unbounded_attack_succeeds']
    """
    allowed = slack(n, tolerance)
    return [
        _monotone(curves, allowed),
        _iterative_vs_single(curves, allowed),
        _unbounded(unbounded_accuracy, unbounded_eps, allowed),
        _black_vs_white(curves, allowed),
    ]


def _loss_monotone(curves: Curves, allowed: float) -> MaskingTest:
    name = "loss_non_decreasing_in_eps"
    checked = [a for a in curves if a in ATTACKS and ATTACKS[a].iterative and len(curves[a]) > 1]
    if not checked:
        return MaskingTest(name, None, "no iterative attack ran at two or more budgets")
    violations = []
    for attack in checked:
        points = sorted(curves[attack].items())
        for (eps_a, loss_a), (eps_b, loss_b) in itertools.pairwise(points):
            if loss_b < loss_a * (1.0 - allowed):
                violations.append(
                    {
                        "attack": attack,
                        "eps": eps_label(eps_a),
                        "next_eps": eps_label(eps_b),
                        "loss": loss_a,
                        "next_loss": loss_b,
                    }
                )
    if violations:
        worst = max(violations, key=lambda v: (v["loss"] - v["next_loss"]) / max(v["loss"], 1e-300))
        detail = (
            f"{worst['attack']} mean loss falls from {worst['loss']:.4g} at eps {worst['eps']} to "
            f"{worst['next_loss']:.4g} at eps {worst['next_eps']} (masked gradients, or an attack too weak "
            "for the larger budget: raise its steps)"
        )
        return MaskingTest(name, False, detail, violations)
    return MaskingTest(name, True, f"the attacked loss never falls with eps ({', '.join(checked)})")


def _loss_iterative_vs_single(curves: Curves, allowed: float) -> MaskingTest:
    name = "iterative_beats_single_step"
    if "pgd_linf" not in curves or "fgsm" not in curves:
        return MaskingTest(name, None, "needs both fgsm and pgd_linf")
    shared = sorted(set(curves["pgd_linf"]) & set(curves["fgsm"]))
    if not shared:
        return MaskingTest(name, None, "fgsm and pgd_linf share no eps")
    violations = [
        {"eps": eps_label(eps), "pgd_linf": curves["pgd_linf"][eps], "fgsm": curves["fgsm"][eps]}
        for eps in shared
        if curves["pgd_linf"][eps] < curves["fgsm"][eps] * (1.0 - allowed)
    ]
    if violations:
        v = violations[0]
        detail = (
            f"single-step FGSM beats iterative PGD at eps {v['eps']} (mean loss {v['fgsm']:.4g} against "
            f"{v['pgd_linf']:.4g}): the gradient misleads the iterative attack"
        )
        return MaskingTest(name, False, detail, violations)
    return MaskingTest(name, True, "PGD raises the loss at least as much as FGSM at every eps")


def _loss_unbounded(stalled: float | None, eps: float, allowed: float, outcome: Mapping[str, Any]) -> MaskingTest:
    name = "unbounded_attack_succeeds"
    if stalled is None:
        return MaskingTest(name, None, "the unbounded attack was not run")
    if stalled > allowed:
        detail = (
            f"PGD with eps {eps_label(eps)} (the whole intensity range) leaves the loss of {stalled:.1%} of the "
            "images at or below its random starting point: its gradient steps gain nothing over random noise "
            "(masked gradients, or a model that ignores its input)"
        )
        return MaskingTest(name, False, detail, [{"eps": eps_label(eps), "stalled_share": stalled, **outcome}])
    return MaskingTest(
        name,
        True,
        f"PGD with eps {eps_label(eps)} raises the loss above its random start on {1.0 - stalled:.1%} of the images",
    )


def loss_masking_tests(
    curves: Curves,
    n: int,
    *,
    task: str,
    unbounded_stalled: float | None,
    unbounded_eps: float = 1.0,
    unbounded_outcome: Mapping[str, Any] | None = None,
    tolerance: float = 0.02,
) -> list[MaskingTest]:
    """The sanity tests for an attack on a task loss (multilabel, regression): see the module docstring.

    Args:
        curves: attack -> {eps: mean loss on the attacked sample}, over one sample of ``n`` images.
        n: the sample size.
        task: ``model.task``, named where a test does not apply.
        unbounded_stalled: share of images whose loss the unbounded PGD did not raise above its
            random starting point, or ``None``.
        unbounded_eps: the budget of that run.
        unbounded_outcome: what the unbounded attack reached (recorded with a violation).
        tolerance: slack (see :func:`slack`), relative on losses, absolute on the share.

    Returns:
        One :class:`MaskingTest` per test, in the order of the module docstring.

    Example:
        >>> tests = loss_masking_tests(
        ...     {"fgsm": {0.01: 2.0}, "pgd_linf": {0.01: 3.0}}, 100, task="multilabel", unbounded_stalled=0.0
        ... )
        >>> [t.passed for t in tests]
        [None, True, True, None]
    """
    allowed = slack(n, tolerance)
    return [
        _loss_monotone(curves, allowed),
        _loss_iterative_vs_single(curves, allowed),
        _loss_unbounded(unbounded_stalled, unbounded_eps, allowed, dict(unbounded_outcome or {})),
        MaskingTest(
            "white_box_beats_black_box",
            None,
            f"not run for task: {task}: the black-box Square attack searches class margins and runs for "
            "classification only",
        ),
    ]


def masking_suspected(tests: list[MaskingTest]) -> bool | None:
    """``True`` if any test failed, ``False`` if some ran and all passed, ``None`` if none ran."""
    outcomes = [t.passed for t in tests if t.passed is not None]
    if not outcomes:
        return None
    return not all(outcomes)
