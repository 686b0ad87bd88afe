"""The adversarial check: how small a change of the image flips the model's diagnosis?

The attacks live in :mod:`.attacks` (on torchattacks, for classifiers) and :mod:`.loss_attacks`
(FGSM and PGD on a task's loss, for multi-label models, regressors and segmentation models), the
gradient-masking sanity tests in :mod:`.sanity`, the plot in :mod:`.plots`, the samples and metrics
of the multi-label, regression and segmentation tasks in :mod:`auditkit.tasks` (the class-stratified
sample of classifiers is :mod:`auditkit.sampling`'s) and the per-case Dice in
:mod:`auditkit.segmentation`; :class:`AdversarialCheck` applies them to a sample
of the eval split.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field, field_validator, model_validator

from auditkit.check import (
    NO_GRADIENTS,
    Check,
    CheckParams,
    CheckResult,
    Direction,
    Metric,
    Needs,
    Resources,
    Skip,
)
from auditkit.checks.adversarial.attacks import (
    ATTACKS,
    L2_EPS,
    LINF_EPS,
    AttackConfig,
    AttackName,
    as_images,
    build_attack,
    eps_label,
    minimum_norm_perturbations,
    predict,
    seeded,
    still_correct,
)
from auditkit.checks.adversarial.loss_attacks import (
    LOSS_ATTACKS,
    AttackedOutputs,
    attacked_outputs,
    model_outputs,
    multilabel_loss,
    segmentation_loss,
    squared_error_loss,
)
from auditkit.checks.adversarial.plots import robust_accuracy_plot
from auditkit.checks.adversarial.sanity import (
    MaskingTest,
    gradient_masking_tests,
    loss_masking_tests,
    masking_suspected,
    slack,
)
from auditkit.sampling import stratified_allocation, stratified_sample
from auditkit.segmentation import case_figures
from auditkit.stats import bootstrap_cis, median_centred_interval, stable_seed
from auditkit.tasks import (
    absolute_errors,
    bootstrap_macro_aurocs,
    bootstrap_maes,
    bootstrap_mean_dice,
    label_aurocs,
    macro_auroc,
    mae_per_output,
    mean_dice,
    regression_units,
    sample_strata,
    sample_summary,
    task_sample,
    task_scores,
)

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = [
    "ATTACKS",
    "L2_EPS",
    "LINF_EPS",
    "LOSS_ATTACKS",
    "AdversarialCheck",
    "AttackConfig",
    "MaskingTest",
    "SamplePlan",
    "attack_seed",
    "build_attack",
    "eps_label",
    "gradient_masking_tests",
    "loss_masking_tests",
    "minimum_norm_perturbations",
    "plan_sample",
    "predict",
    "robust_accuracy_plot",
    "seeded",
    "still_correct",
    "stratified_allocation",
    "stratified_sample",
    "task_sample",
]

log = logging.getLogger(__name__)

CARLINI_2019 = "Carlini et al. 2019, 'On Evaluating Adversarial Robustness', arXiv:1902.06705"
DEFAULT_ATTACKS: tuple[str, ...] = ("fgsm", "pgd_linf", "pgd_l2", "cw_l2", "square")
CPU_BUDGETS: dict[str, int] = {"n_samples": 48, "cw_steps": 30, "square_queries": 100}
"""Budgets a spec leaves unset take these values on a CPU (the defaults are sized for a GPU)."""


@dataclass(frozen=True)
class SamplePlan:
    """The images the check attacks and the root of its attack seeds.

    Attributes:
        indices: sorted positions in the eval split.
        seed_root: every attack's seed derives from it (:func:`attack_seed`).
    """

    indices: NDArray[np.intp]
    seed_root: int


def plan_sample(
    labels: NDArray[Any], n_samples: int, rng: np.random.Generator, *, task: str = "classification"
) -> SamplePlan:
    """Draw the stratified sample, then the seed root, from the check's generator.

    Classification stratifies by class; multilabel, regression and segmentation samples are those
    of :func:`auditkit.tasks.task_sample` (every label's both classes, target quintiles, the number
    of foreground classes in the reference).
    """
    indices = task_sample(labels, task, n_samples, rng)
    return SamplePlan(indices, int(rng.integers(0, 2**62)))


def attack_seed(seed_root: int, attack: str, eps: float | None) -> int:
    """The seed of ``attack`` at ``eps``: batch ``b`` runs after ``torch.manual_seed(seed + b)``."""
    return stable_seed(seed_root, attack, "min-norm" if eps is None else eps_label(eps))


def _increasing(values: list[float], field: str, upper: float | None) -> list[float]:
    if any(not v > 0 for v in values) or (upper is not None and any(v > upper for v in values)):
        bound = f"in (0, {upper}]" if upper is not None else "positive"
        raise ValueError(f"{field} values must be {bound}, got {values}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{field} must be strictly increasing, got {values}")
    labels = [eps_label(v) for v in values]
    if len(set(labels)) != len(labels):
        raise ValueError(
            f"{field} values must differ in their first two significant digits (the metric "
            f"label), got {values} -> labels {labels}"
        )
    return values


class AdversarialParams(CheckParams):
    """Parameters of :class:`AdversarialCheck`.

    Attributes:
        attacks: attacks to run: ``fgsm``, ``pgd_linf``, ``square``, ``autoattack``
            (L-infinity budgets ``eps``), ``pgd_l2``, ``cw_l2`` (L2 budgets ``eps_l2``).
        eps: L-infinity budgets in [0, 1] intensity units, strictly increasing
            (default 0.5, 1, 2, 4, 8 grey levels of 8 bits).
        eps_l2: L2 budgets over the whole image, strictly increasing.
        n_samples: images attacked (class-stratified, seeded); all if the split is smaller.
        batch_size: images per attack call.
        pgd_steps: PGD iterations.
        pgd_step_size: PGD step as a multiple of ``eps / pgd_steps``.
        random_start: PGD starts from a random point of the budget.
        cw_c: Carlini-Wagner weight of the classification loss.
        cw_kappa: Carlini-Wagner confidence margin.
        cw_steps: Carlini-Wagner Adam steps.
        cw_lr: Carlini-Wagner learning rate.
        square_queries: Square attack queries per image.
        sanity_checks: run the gradient-masking tests.
        unbounded_eps: L-infinity budget of the unbounded-attack test (1.0: any image).
        unbounded_steps: PGD steps of the unbounded-attack test.
        masking_tolerance: slack of the sanity tests on accuracies (at least one image).
        n_boot: bootstrap resamples per interval; 0 disables intervals.

    Budgets scale with the data set and the device. ``n_samples`` is capped by the eval split's
    size. On a CPU, the budgets a spec leaves unset take the values of :data:`CPU_BUDGETS`
    (``n_samples`` 48, ``cw_steps`` 30, ``square_queries`` 100: about a minute on two cores for
    the tiny demo model) instead of the defaults above, which are sized for a GPU; every
    attack still runs. Values a spec sets are never changed, and the ``attack_setup`` finding
    records the budgets used.
    """

    attacks: list[AttackName] = Field(default_factory=lambda: list(DEFAULT_ATTACKS), min_length=1)
    eps: list[float] = Field(default_factory=lambda: list(LINF_EPS), min_length=1)
    eps_l2: list[float] = Field(default_factory=lambda: list(L2_EPS), min_length=1)
    n_samples: int = Field(default=256, ge=1)
    batch_size: int = Field(default=128, ge=1)
    pgd_steps: int = Field(default=20, ge=1, le=10_000)
    pgd_step_size: float = Field(default=2.5, gt=0.0)
    random_start: bool = True
    cw_c: float = Field(default=1.0, gt=0.0)
    cw_kappa: float = Field(default=0.0, ge=0.0)
    cw_steps: int = Field(default=100, ge=1, le=100_000)
    cw_lr: float = Field(default=0.01, gt=0.0)
    square_queries: int = Field(default=1000, ge=1, le=100_000)
    sanity_checks: bool = True
    unbounded_eps: float = Field(default=1.0, gt=0.0, le=1.0)
    unbounded_steps: int = Field(default=50, ge=1, le=10_000)
    masking_tolerance: float = Field(default=0.02, ge=0.0, lt=1.0)
    n_boot: int = Field(default=1000, ge=0, le=100_000)

    @field_validator("attacks")
    @classmethod
    def _unique_attacks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"attacks must not repeat, got {value}")
        return value

    @field_validator("eps")
    @classmethod
    def _linf_grid(cls, value: list[float]) -> list[float]:
        return _increasing(value, "eps", 1.0)

    @field_validator("eps_l2")
    @classmethod
    def _l2_grid(cls, value: list[float]) -> list[float]:
        return _increasing(value, "eps_l2", None)

    @model_validator(mode="after")
    def _unbounded_above_grid(self) -> AdversarialParams:
        if self.sanity_checks and self.unbounded_eps <= max(self.eps):
            raise ValueError(f"unbounded_eps must exceed the largest eps {max(self.eps)}, got {self.unbounded_eps}")
        return self

    def attack_config(self, n_classes: int) -> AttackConfig:
        return AttackConfig(
            pgd_steps=self.pgd_steps,
            pgd_step_size=self.pgd_step_size,
            random_start=self.random_start,
            cw_c=self.cw_c,
            cw_kappa=self.cw_kappa,
            cw_steps=self.cw_steps,
            cw_lr=self.cw_lr,
            square_queries=self.square_queries,
            n_classes=n_classes,
        )

    def for_device(self, device: torch.device) -> AdversarialParams:
        """These parameters with the unset budgets scaled to ``device`` (see the class docstring)."""
        if device.type != "cpu":
            return self
        scaled = {k: v for k, v in CPU_BUDGETS.items() if k not in self.model_fields_set}
        return self.model_copy(update=scaled) if scaled else self

    def scaled_fields(self, device: torch.device) -> list[str]:
        """The budgets :meth:`for_device` changes on ``device``."""
        return [] if device.type != "cpu" else sorted(set(CPU_BUDGETS) - self.model_fields_set)

    def grid(self, attack: str) -> list[float]:
        """The budgets of ``attack`` (its norm's grid)."""
        return list(self.eps if ATTACKS[attack].norm == "Linf" else self.eps_l2)


class AdversarialCheck(Check[AdversarialParams]):
    """Adversarial robustness: robust accuracy under FGSM, PGD, CW, Square and AutoAttack.

    Method: a class-stratified, seeded sample of the eval split (default 256 images) is attacked
    in the [0, 1] image domain (the model's normalisation stays inside the model, in eval mode,
    fp32) with torchattacks (Kim 2020, "Torchattacks: A PyTorch Repository for Adversarial
    Attacks", arXiv:2010.01950): FGSM (Goodfellow et al. 2015), PGD with L-infinity and L2
    projection (Madry et al. 2018, ICLR), Carlini-Wagner L2 (Carlini & Wagner 2017, IEEE S&P;
    a minimum-norm attack, thresholded at each L2 budget), the black-box Square attack
    (Andriushchenko et al. 2020, ECCV) and, opt-in because it is costly, AutoAttack (Croce &
    Hein 2020, ICML). Robust accuracy counts an image as robust when the model classifies it
    correctly both clean and after the attack (the zero perturbation is in every budget).
    The gradient-masking sanity tests of Carlini et al. 2019 ("On Evaluating Adversarial
    Robustness", arXiv:1902.06705) then read the curves: accuracy must not rise with epsilon,
    PGD must beat FGSM, an unbounded attack must reach about zero accuracy, and the black-box
    attack must not beat the white-box ones. Intervals are 95% bootstraps over the sample,
    stratified by class, all from one draw: the median-centred percentile interval of
    :mod:`auditkit.stats`, which always contains the value (the success rate is a ratio, biased
    under resampling) and is the percentile interval when the resampling is unbiased.

    Multi-label models (``task: multilabel``): torchattacks' attacks maximise the cross-entropy
    of a class index, which a multi-label model does not have, so FGSM, PGD-Linf and PGD-L2 run
    as in-house loops (:mod:`.loss_attacks`, torchattacks' step for step: same budgets, steps,
    step size and random start) on the sum over the known label entries of each image of the
    binary cross-entropy with logits (unknown entries masked): every label is pushed away from
    its truth. The sample holds a known positive and negative of every label that has them
    (:mod:`auditkit.tasks`); the metric is the macro AUROC, the mean over the labels with both
    classes in the sample of each label's AUROC (Mann-Whitney, as scikit-learn's
    ``roc_auc_score``) of the sigmoid scores on its known entries; a label with one class is
    left out and named with the reason (``label_aurocs`` finding). Regressors
    (``task: regression``): the same attacks maximise the squared error against the target
    (summed over outputs, each scaled by its target standard deviation when there are several);
    the metric is the mean absolute error per output in the output's unit (``model.units``,
    named in the findings). Carlini-Wagner, Square and AutoAttack are built on class margins
    and are not run for these tasks: their metrics are undefined with that reason and an
    ``attacks_not_run`` finding names the task. The sanity tests read the attacked loss (the
    quantity the attack maximises, :func:`.sanity.loss_masking_tests`): it must not fall with
    epsilon, PGD must reach FGSM's loss, and an unbounded PGD must raise the loss of almost every
    image above its random starting point (its gradient steps must beat random noise); the
    black-box comparison does not run (no Square) and says so, naming the task. Intervals are
    the same median-centred 95% bootstraps, every attack on the same resamples, stratified as
    the sample is (each image's rarest label class; the target's quintile).

    Segmentation models (``task: segmentation``, logits ``(N, K, *spatial)``): the same three
    attacks maximise the mean over the pixels (voxels) of each image of the cross-entropy of the
    per-pixel logits against the reference label map, pushing every pixel away from its reference
    class (:func:`.loss_attacks.segmentation_loss`; torchattacks' cross-entropy accepts per-pixel
    logits too, and the loops reproduce its PGD on them: the per-image mean only rescales the
    gradient, which the sign step and the L2 normalisation discard). The sample is stratified by
    the number of foreground classes in the reference (empty references included). The metric is
    the mean Dice of the arg-max maps: per foreground class, the mean over the sampled cases whose
    reference holds the class of MONAI's ``compute_dice(include_background=False,
    ignore_empty=True)`` (:func:`auditkit.segmentation.case_figures`), then the mean over the
    classes defined; clean and attacked outputs are both the model's fp32 outputs, so the robust
    Dice at a zero budget is the clean Dice. A case whose outputs are not finite is scored as all
    background. Unlike robust accuracy, the robust Dice is not capped by the clean one: the
    attack maximises the loss, not one figure, and a pixel it flips may land in the right class.
    Volumes (``spatial_dims`` 3) are attacked with their depth folded into the channels (the
    same voxels, norms and steps) and the output stays ``(N, K, D, H, W)``. The sanity tests are
    those on the attacked loss, above; the unbounded attack's mean Dice is recorded with them.
    Limitations: the budgets are those of whole images (an L2 budget is spread over every pixel of
    the image or volume), and the attack targets every pixel at once, not one structure.

    Inputs: eval-split images (any size, grayscale or multi-channel; volumes) and labels
    (multilabel: 1/0/-1 per label; regression: targets; segmentation: reference label maps); the
    model's input gradients (``Needs(gradients=True, images=True)``). Runs on the context's device.

    Metrics:
        classification: ``adversarial.clean_accuracy`` (``higher_is_better``) on the attacked
        sample; ``adversarial.robust_accuracy`` (``higher_is_better``) and
        ``adversarial.attack_success_rate`` (``lower_is_better``: the share of correctly
        classified images the attack flips) with labels ``{attack, eps}``, eps written with two
        significant digits (``2/255`` -> ``"0.0078"``);
        multilabel: ``adversarial.clean_macro_auroc`` and ``adversarial.robust_macro_auroc``
        ``{attack, eps}`` (``higher_is_better``);
        regression: ``adversarial.clean_mae`` and ``adversarial.robust_mae`` ``{attack, eps}``
        (``lower_is_better``, in the output's unit; with several outputs, one per output with
        an ``output`` label);
        segmentation: ``adversarial.clean_dice`` and ``adversarial.robust_dice`` ``{attack, eps}``
        (``higher_is_better``): the mean Dice over the foreground classes;
        every task: ``adversarial.gradient_masking_suspected`` (0/1, ``lower_is_better``).

    Findings: ``adversarial_sample`` (manifest rows; class counts, per-label counts of known
    positives, negatives and unknown entries, the targets' count, mean, SD and unit, or per
    foreground class the cases whose reference holds it), ``attack_setup``
    (exact budgets and hyper-parameters, device, seed; for the loss attacks the loss,
    the metric and the largest perturbation norm of each attack and budget),
    ``attacks_not_run`` (multilabel, regression, segmentation), ``label_aurocs`` (multilabel: every
    label's AUROC clean and attacked, undefined labels with the reason), ``class_dice``
    (segmentation: every foreground class's mean Dice clean and attacked, the cases it is defined
    on, and the cases with non-finite outputs), ``gradient_masking_tests``
    (every test's outcome; for the loss attacks the loss curves) and one
    ``gradient_masking_suspected`` per failed test, naming it.

    Artifacts: ``robust_accuracy`` (SVG): robust accuracy against epsilon per attack;
    multilabel ``robust_macro_auroc``, regression ``robust_mae`` (``robust_mae_<k>`` per output
    when there are several), segmentation ``robust_dice``: the task's metric against epsilon.

    NIST AI RMF 1.0: MEASURE 2.7 (security and resilience: robustness to adversarial input),
    MEASURE 2.5 (validity: a robustness number obtained through masked gradients is flagged).
    """

    id: ClassVar[str] = "adversarial"
    family: ClassVar[str] = "adversarial"

    Params = AdversarialParams

    needs: ClassVar[Needs] = Needs(gradients=True, images=True, reference=True)
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=1.0)  # on Ray: a GPU where there is one
    emits: ClassVar[tuple[str, ...]] = (
        "adversarial.clean_accuracy",
        "adversarial.robust_accuracy",
        "adversarial.attack_success_rate",
        "adversarial.clean_macro_auroc",
        "adversarial.robust_macro_auroc",
        "adversarial.clean_mae",
        "adversarial.robust_mae",
        "adversarial.clean_dice",
        "adversarial.robust_dice",
        "adversarial.gradient_masking_suspected",
    )
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)

    def run(self, ctx: CheckContext, params: AdversarialParams) -> CheckResult:
        """Attack a stratified sample of the eval split and test the results for masking."""
        if ctx.task != "classification":
            return _run_on_task_loss(ctx, params)
        scaled = params.scaled_fields(ctx.device)
        p: AdversarialParams = params.for_device(ctx.device)
        access = _model_access(ctx, p)
        p = access.params
        result = CheckResult()
        all_labels = np.asarray(ctx.labels("eval"), dtype=np.int64)
        if all_labels.shape[0] == 0:
            result.metrics += _undefined(p, "no eval images")
            return result

        plan = plan_sample(all_labels, p.n_samples, ctx.rng())
        labels_np = all_labels[plan.indices]
        labels = torch.as_tensor(labels_np, dtype=torch.long)
        # A volume's depth is folded into its channels for the attacks (a reshape: same norms).
        eval_images = ctx.images("eval", plan.indices)
        judge, images = as_images(access.judge, eval_images)
        model = as_images(access.source, eval_images)[0] if access.source is not None else judge
        n = int(labels.shape[0])
        config = p.attack_config(len(ctx.classes))
        log.info("adversarial: %d images, attacks %s, on %s (%s)", n, p.attacks, ctx.device, access.mode)

        # Clean predictions in the attacks' precision (fp32), so robust <= clean holds exactly.
        predicted = predict(judge, images, batch_size=p.batch_size)
        if bool((predicted < 0).all()):
            raise Skip(f"the logits of every one of the {n} sampled eval images are non-finite")
        clean = (predicted == labels).numpy()
        robust: dict[tuple[str, float], NDArray[np.bool_]] = {}
        for attack in p.attacks:
            grid = p.grid(attack)
            log.info("adversarial: %s at eps %s", attack, [eps_label(e) for e in grid])
            if ATTACKS[attack].minimum_norm:
                fooled, norms = minimum_norm_perturbations(
                    model,
                    images,
                    labels,
                    config,
                    seed=attack_seed(plan.seed_root, attack, None),
                    batch_size=p.batch_size,
                    judge=judge,
                )
                for eps in grid:
                    broken = (fooled & (norms <= eps)).numpy()
                    robust[(attack, eps)] = clean & ~broken
                continue
            # Square only queries the model: it runs on the judge itself, never through a proxy.
            crafted_on = judge if ATTACKS[attack].access == "black" else model
            for eps in grid:
                survived = still_correct(
                    crafted_on,
                    images,
                    labels,
                    attack,
                    eps,
                    config,
                    seed=attack_seed(plan.seed_root, attack, eps),
                    batch_size=p.batch_size,
                    judge=judge,
                ).numpy()
                robust[(attack, eps)] = clean & survived

        curves = {attack: {eps: float(robust[(attack, eps)].mean()) for eps in p.grid(attack)} for attack in p.attacks}
        tests: list[MaskingTest] = []
        unbounded_accuracy = None
        if p.sanity_checks:
            unbounded_config = AttackConfig(
                pgd_steps=p.unbounded_steps, pgd_step_size=p.pgd_step_size, random_start=True
            )
            survived = still_correct(
                model,
                images,
                labels,
                "pgd_linf",
                p.unbounded_eps,
                unbounded_config,
                seed=attack_seed(plan.seed_root, "unbounded", p.unbounded_eps),
                batch_size=p.batch_size,
            ).numpy()
            unbounded_accuracy = float((clean & survived).mean())
            tests = gradient_masking_tests(
                curves,
                n,
                unbounded_accuracy=unbounded_accuracy,
                unbounded_eps=p.unbounded_eps,
                tolerance=p.masking_tolerance,
            )

        cis = _intervals(clean, robust, labels_np, p.n_boot, plan.seed_root)
        result.metrics += _metrics(clean, robust, cis, p, tests, masking_reason=access.masking_reason)
        result.findings += _findings(ctx, plan, labels_np, p, config, tests, unbounded_accuracy)
        result.findings += access.findings
        for finding in result.findings:
            if finding["kind"] == "attack_setup":
                finding["scaled_for_device"] = {name: getattr(p, name) for name in scaled}

        result.artifacts.append(
            ctx.write_artifact(
                "robust_accuracy",
                "robust_accuracy.svg",
                lambda path: robust_accuracy_plot(
                    curves,
                    float(clean.mean()),
                    path,
                    n=n,
                    cis={key: cis[f"robust:{key[0]}:{key[1]!r}"] for key in robust},
                ),
                description=(
                    f"Robust accuracy against the perturbation budget on {n} eval images "
                    f"(attacks: {', '.join(p.attacks)}), with 95% bootstrap intervals; the dotted "
                    "line is the clean accuracy."
                ),
            )
        )
        return result


# --------------------------------------------------------------------------------------------
# Helpers of the check


@dataclass
class _ModelAccess:
    """How the attacks reach the model: crafted on ``source`` (``None``: only black-box attacks)
    and judged on ``judge``, with the parameters and findings that follow."""

    mode: str
    source: torch.nn.Module | None
    judge: torch.nn.Module
    params: AdversarialParams
    findings: list[dict[str, Any]]
    masking_reason: str | None = None


def _model_access(ctx: CheckContext, p: AdversarialParams, *, black_box: bool = True) -> _ModelAccess:
    """White-box attacks on the model itself when gradients flow through it; on an exported
    artefact (ONNX Runtime), transfer attacks crafted on ``model.reference`` and judged on the
    artefact, or - without a reference - Square, which only queries the artefact (``black_box``;
    the loss attacks of other tasks have no black-box variant: skipped with the reason)."""
    if ctx.model.has_gradients:
        model = ctx.model.differentiable()
        return _ModelAccess("white-box", model, model, p, [])
    judge = ctx.model.forward_module()
    white = [a for a in p.attacks if ATTACKS[a].access != "black" or not black_box]
    if ctx.has_reference:
        finding = {
            "kind": "attack_mode",
            "mode": "transfer",
            "crafted_on": "model.reference (the PyTorch model the artefact was exported from)",
            "judged_on": "the artefact (ONNX Runtime)",
            "transfer_attacks": white,
            "black_box_attacks": [a for a in p.attacks if a not in white],
            "note": "a transfer attack is weaker than a white-box attack on the artefact would be: the robust"
            " figures here are upper bounds; the gradient-masking tests, which read white-box curves, are"
            " not run",
        }
        reason = (
            "gradient-masking tests read white-box attack curves; these attacks were transferred from the reference"
        )
        source = ctx.reference_model()
        return _ModelAccess("transfer", source, judge, p.model_copy(update={"sanity_checks": False}), [finding], reason)
    if not black_box:
        raise Skip(
            f"{NO_GRADIENTS}; a {ctx.task} model's attacks (FGSM and PGD on its loss) are crafted on model.reference"
            " when the spec names one (Square, the black-box attack, decides by class margins)"
        )
    attacks = [a for a in p.attacks if ATTACKS[a].access == "black"] or ["square"]
    finding = {
        "kind": "attack_mode",
        "mode": "black-box",
        "judged_on": "the artefact (ONNX Runtime)",
        "attacks": attacks,
        "not_run": white,
        "reason": "no gradient flows through the artefact and the spec names no model.reference to craft"
        " transfer attacks on; Square (score-based, queries only) runs on the artefact instead",
    }
    reason = "gradient-masking tests read white-box attack curves; only Square, a black-box attack, ran"
    params = p.model_copy(update={"attacks": attacks, "sanity_checks": False})
    return _ModelAccess("black-box", None, judge, params, [finding], reason)


def _undefined(p: AdversarialParams, reason: str) -> list[Metric]:
    metrics = [Metric("adversarial.clean_accuracy", None, "higher_is_better", n=0, reason=reason)]
    for attack in p.attacks:
        for eps in p.grid(attack):
            labels = {"attack": attack, "eps": eps_label(eps)}
            metrics.append(
                Metric(
                    "adversarial.robust_accuracy",
                    None,
                    "higher_is_better",
                    labels=labels,
                    n=0,
                    reason=reason,
                )
            )
            metrics.append(
                Metric(
                    "adversarial.attack_success_rate",
                    None,
                    "lower_is_better",
                    labels=labels,
                    n=0,
                    reason=reason,
                )
            )
    metrics.append(Metric("adversarial.gradient_masking_suspected", None, "lower_is_better", n=0, reason=reason))
    return metrics


def _success_rate(clean: NDArray[np.bool_], robust: NDArray[np.bool_]) -> float:
    correct = int(clean.sum())
    return float((clean & ~robust).sum() / correct) if correct else float("nan")


def _intervals(
    clean: NDArray[np.bool_],
    robust: dict[tuple[str, float], NDArray[np.bool_]],
    labels: NDArray[np.int64],
    n_boot: int,
    seed_root: int,
) -> dict[str, tuple[float, float] | None]:
    """95% intervals of every accuracy and success rate, from one class-stratified draw.

    Each is centred on the value :func:`_metrics` reports (see :mod:`auditkit.stats`).
    """
    clean_f = clean.astype(np.float64)

    def accuracy(values: NDArray[np.float64]) -> Any:
        return lambda idx: values[idx].mean(axis=1)

    def success(fooled: NDArray[np.float64]) -> Any:
        def statistic(idx: NDArray[np.intp]) -> NDArray[np.float64]:
            correct = clean_f[idx].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.asarray(fooled[idx].sum(axis=1) / correct, dtype=np.float64)

        return statistic

    statistics: dict[str, Any] = {"clean": accuracy(clean_f)}
    estimates = {"clean": float(clean.mean())}
    for (attack, eps), survived in robust.items():
        statistics[f"robust:{attack}:{eps!r}"] = accuracy(survived.astype(np.float64))
        statistics[f"success:{attack}:{eps!r}"] = success((clean & ~survived).astype(np.float64))
        estimates[f"robust:{attack}:{eps!r}"] = float(survived.mean())
        estimates[f"success:{attack}:{eps!r}"] = _success_rate(clean, survived)
    return bootstrap_cis(
        statistics,
        len(clean),
        n_boot=n_boot,
        rng=np.random.default_rng(stable_seed(seed_root, "bootstrap")),
        strata=labels,
        estimates=estimates,
        bounds=(0.0, 1.0),
    )


def _metrics(
    clean: NDArray[np.bool_],
    robust: dict[tuple[str, float], NDArray[np.bool_]],
    cis: dict[str, tuple[float, float] | None],
    p: AdversarialParams,
    tests: list[MaskingTest],
    *,
    masking_reason: str | None = None,
) -> list[Metric]:
    n = len(clean)
    metrics = [Metric("adversarial.clean_accuracy", float(clean.mean()), "higher_is_better", ci=cis["clean"], n=n)]
    no_correct = "no image of the sample is classified correctly without attack"
    for (attack, eps), survived in robust.items():
        labels = {"attack": attack, "eps": eps_label(eps)}
        metrics.append(
            Metric(
                "adversarial.robust_accuracy",
                float(survived.mean()),
                "higher_is_better",
                labels=labels,
                ci=cis[f"robust:{attack}:{eps!r}"],
                n=n,
            )
        )
        rate = _success_rate(clean, survived)
        metrics.append(
            Metric(
                "adversarial.attack_success_rate",
                None if np.isnan(rate) else rate,
                "lower_is_better",
                labels=labels,
                ci=cis[f"success:{attack}:{eps!r}"],
                n=int(clean.sum()),
                reason=no_correct if np.isnan(rate) else None,
            )
        )
    suspected = masking_suspected(tests)
    reason = None
    if masking_reason is not None:
        reason = masking_reason
    elif not p.sanity_checks:
        reason = "gradient-masking sanity checks disabled (sanity_checks: false)"
    elif suspected is None:
        reason = "no gradient-masking test could run with the selected attacks"
    metrics.append(
        Metric(
            "adversarial.gradient_masking_suspected",
            None if suspected is None else float(suspected),
            "lower_is_better",
            n=n,
            reason=reason,
        )
    )
    return metrics


def _findings(
    ctx: CheckContext,
    plan: SamplePlan,
    labels: NDArray[np.int64],
    p: AdversarialParams,
    config: AttackConfig,
    tests: list[MaskingTest],
    unbounded_accuracy: float | None,
) -> list[dict[str, Any]]:
    classes = list(ctx.classes)
    counts = np.bincount(labels, minlength=len(classes))
    manifest_rows = np.asarray(ctx.split("eval").rows)[plan.indices]
    findings: list[dict[str, Any]] = [
        {
            "kind": "adversarial_sample",
            "split": "eval",
            "rows": [int(r) for r in manifest_rows],
            "n": len(labels),
            "class_counts": {name: int(c) for name, c in zip(classes, counts, strict=False)},
        },
        {
            "kind": "attack_setup",
            "device": str(ctx.device),
            "precision": "fp32",
            "batch_size": p.batch_size,
            "seed_root": plan.seed_root,
            "attacks": {
                attack: {
                    "norm": ATTACKS[attack].norm,
                    "access": ATTACKS[attack].access,
                    "eps": p.grid(attack),
                    "reference": ATTACKS[attack].reference,
                }
                for attack in p.attacks
            },
            "pgd": {
                "steps": config.pgd_steps,
                "step_size": f"{config.pgd_step_size} * eps / steps",
                "random_start": config.random_start,
            },
            "cw": {
                "c": config.cw_c,
                "kappa": config.cw_kappa,
                "steps": config.cw_steps,
                "lr": config.cw_lr,
            },
            "square": {"queries": config.square_queries},
        },
    ]
    if not p.sanity_checks:
        return findings
    findings.append(
        {
            "kind": "gradient_masking_tests",
            "reference": CARLINI_2019,
            "slack": slack(len(labels), p.masking_tolerance),
            "unbounded_eps": p.unbounded_eps,
            "unbounded_robust_accuracy": unbounded_accuracy,
            "tests": [t.to_json() for t in tests],
        }
    )
    for test in tests:
        if test.passed is False:
            findings.append(
                {
                    "kind": "gradient_masking_suspected",
                    "test": test.name,
                    "detail": test.detail,
                    "violations": list(test.violations),
                    "reference": CARLINI_2019,
                }
            )
    return findings


# --------------------------------------------------------------------------------------------
# Multi-label, regression and segmentation models: attacks on the task's loss

TASK_METRICS: dict[str, tuple[str, str, Direction]] = {
    "multilabel": ("adversarial.clean_macro_auroc", "adversarial.robust_macro_auroc", "higher_is_better"),
    "regression": ("adversarial.clean_mae", "adversarial.robust_mae", "lower_is_better"),
    "segmentation": ("adversarial.clean_dice", "adversarial.robust_dice", "higher_is_better"),
}
"""task -> (clean metric, robust metric, direction)."""

TASK_LOSS_TEXT = {
    "multilabel": (
        "sum over the known label entries of each image of the binary cross-entropy with logits"
        " (unknown entries masked); maximised: every label pushed away from its truth"
    ),
    "regression": (
        "squared error against the target, summed over the outputs (each divided by its target"
        " standard deviation in the sample when there are several); maximised"
    ),
    "segmentation": (
        "mean over the pixels (voxels) of each image of the cross-entropy of the per-pixel logits against"
        " the reference label map; maximised: every pixel pushed away from its reference class"
    ),
}

TASK_METRIC_TEXT = {
    "multilabel": "macro AUROC of the sigmoid scores over the known label entries",
    "regression": "mean absolute error per output over the known targets, in the output's unit",
    "segmentation": (
        "mean Dice of the arg-max maps: the mean over foreground classes of each class's mean Dice over the"
        " sampled cases whose reference holds it (MONAI's compute_dice, include_background=False,"
        " ignore_empty=True); a case with non-finite outputs is scored as all background"
    ),
}

NO_REFERENCE = "no foreground class is in the reference of any sampled case, so the mean Dice is undefined"


def _not_run_reason(attack: str, task: str) -> str:
    return (
        f"{attack} is built on class margins (a classification attack) and is not run for task: {task};"
        f" the attacks on the task's loss are {', '.join(LOSS_ATTACKS)}"
    )


def _output_labels(names: list[str], k: int) -> dict[str, str]:
    """Regression metrics carry an ``output`` label only when the model has several outputs."""
    return {"output": names[k]} if len(names) > 1 else {}


def _undefined_task(p: AdversarialParams, task: str, names: list[str], reason: str) -> list[Metric]:
    clean_name, robust_name, direction = TASK_METRICS[task]
    per_output = [_output_labels(names, k) for k in range(len(names))] if task == "regression" else [{}]
    metrics = [Metric(clean_name, None, direction, labels=extra, n=0, reason=reason) for extra in per_output]
    for attack in p.attacks:
        for eps in p.grid(attack):
            labels = {"attack": attack, "eps": eps_label(eps)}
            metrics += [
                Metric(robust_name, None, direction, labels={**labels, **extra}, n=0, reason=reason)
                for extra in per_output
            ]
    metrics.append(Metric("adversarial.gradient_masking_suspected", None, "lower_is_better", n=0, reason=reason))
    return metrics


def _finite_mean(losses: torch.Tensor) -> float | None:
    """The mean of the finite per-image losses (a non-finite output has none), ``None`` if none is."""
    values = losses.double().numpy()
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _regression_scale(targets: NDArray[np.float64]) -> torch.Tensor | None:
    """Per-output divisor of the squared error: the target's standard deviation (one output: none)."""
    if targets.shape[1] < 2:
        return None
    with np.errstate(invalid="ignore"):
        spread = np.nanstd(targets, axis=0)
    spread = np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
    return torch.as_tensor(spread, dtype=torch.float32)


def _case_dice(outputs: torch.Tensor, reference: NDArray[Any], n_classes: int) -> tuple[NDArray[np.float64], int]:
    """Per-case Dice ``(N, K - 1)`` of the arg-max maps of ``outputs`` ``(N, K, *spatial)`` (MONAI's, NaN
    where the reference lacks the class) and the number of cases whose outputs are not all finite
    (scored as all background: a failure of the model, never a lucky arg-max over NaN)."""
    finite = torch.isfinite(outputs).flatten(1).all(dim=1)
    predicted = torch.where(finite.view(-1, *[1] * (outputs.ndim - 2)), outputs.argmax(dim=1), 0).numpy()
    spacing = np.ones((len(reference), reference.ndim - 1))  # Dice needs no spacing
    dice = case_figures(predicted, reference, spacing, n_classes, figures=("dice",))["dice"]
    return dice, int((~finite).sum())


def _class_dice(dice: NDArray[np.float64]) -> list[float | None]:
    """Each foreground class's mean Dice over the cases where it is defined (``None``: none is)."""
    defined = np.isfinite(dice)
    return [float(dice[defined[:, k], k].mean()) if defined[:, k].any() else None for k in range(dice.shape[1])]


def _run_on_task_loss(ctx: CheckContext, params: AdversarialParams) -> CheckResult:
    """The check for a multi-label, regression or segmentation model: FGSM and PGD on the task's loss."""
    task = ctx.task
    names = list(ctx.classes)
    scaled = params.scaled_fields(ctx.device)
    p: AdversarialParams = params.for_device(ctx.device)
    result = CheckResult()
    all_labels = np.asarray(ctx.labels("eval"))
    if all_labels.shape[0] == 0:
        result.metrics += _undefined_task(p, task, names, "no eval images")
        return result

    plan = plan_sample(all_labels, p.n_samples, ctx.rng(), task=task)
    if task == "regression":
        targets_np = np.asarray(all_labels[plan.indices], dtype=np.float64).reshape(len(plan.indices), -1)
        loss = squared_error_loss(_regression_scale(targets_np))
    elif task == "segmentation":
        targets_np = np.asarray(all_labels[plan.indices], dtype=np.int64)
        loss = segmentation_loss
    else:
        targets_np = np.asarray(all_labels[plan.indices], dtype=np.int64)
        loss = multilabel_loss
    targets = torch.as_tensor(targets_np)
    eval_images = ctx.images("eval", plan.indices)
    access = _model_access(ctx, p, black_box=False)
    p = access.params
    assert access.source is not None  # white-box or transfer: the loss attacks have no black-box variant
    model, images = as_images(access.source, eval_images)
    judge = as_images(access.judge, eval_images)[0]
    n = int(targets.shape[0])
    config = p.attack_config(len(names))
    run_attacks = [a for a in p.attacks if a in LOSS_ATTACKS]
    not_run = [a for a in p.attacks if a not in LOSS_ATTACKS]
    log.info("adversarial: %d images (task: %s), attacks %s, on %s", n, task, run_attacks, ctx.device)

    clean = model_outputs(judge, images, batch_size=p.batch_size)
    if not bool(torch.isfinite(clean).flatten(1).all(dim=1).any()):
        raise Skip(f"the outputs of every one of the {n} sampled eval images are non-finite")
    attacked: dict[tuple[str, float], AttackedOutputs] = {}
    for attack in run_attacks:
        for eps in p.grid(attack):
            attacked[(attack, eps)] = attacked_outputs(
                model,
                images,
                targets,
                loss,
                attack,
                eps,
                config,
                seed=attack_seed(plan.seed_root, attack, eps),
                batch_size=p.batch_size,
                judge=judge,
            )

    clean_loss = _finite_mean(loss(clean, targets))
    loss_curves: dict[str, dict[float, float]] = {}
    for (attack, eps), outcome in attacked.items():
        mean_loss = _finite_mean(outcome.losses)
        if mean_loss is not None:  # every output non-finite: no loss to compare
            loss_curves.setdefault(attack, {})[eps] = mean_loss
    tests: list[MaskingTest] = []
    unbounded: dict[str, Any] | None = None
    if p.sanity_checks:
        unbounded_config = AttackConfig(pgd_steps=p.unbounded_steps, pgd_step_size=p.pgd_step_size, random_start=True)
        outcome = attacked_outputs(
            model,
            images,
            targets,
            loss,
            "pgd_linf",
            p.unbounded_eps,
            unbounded_config,
            seed=attack_seed(plan.seed_root, "unbounded", p.unbounded_eps),
            batch_size=p.batch_size,
        )
        stalled = float((outcome.losses <= outcome.start_losses).double().mean())
        unbounded = {
            "stalled_share": stalled,
            "mean_loss": _finite_mean(outcome.losses),
            "mean_start_loss": _finite_mean(outcome.start_losses),
            **_unbounded_metric(task, outcome.outputs, targets_np, names),
        }
        tests = loss_masking_tests(
            loss_curves,
            n,
            task=task,
            unbounded_stalled=stalled,
            unbounded_eps=p.unbounded_eps,
            unbounded_outcome={k: v for k, v in unbounded.items() if k != "stalled_share"},
            tolerance=p.masking_tolerance,
        )

    strata = sample_strata(targets_np, task)
    rng = np.random.default_rng(stable_seed(plan.seed_root, "bootstrap"))
    if task == "multilabel":
        measured = _multilabel_metrics(clean, attacked, targets_np, names, p, rng, strata)
    elif task == "segmentation":
        measured = _segmentation_metrics(clean, attacked, targets_np, names, p, rng, strata)
    else:
        measured = _regression_metrics(clean, attacked, targets_np, names, dict(ctx.units), p, rng, strata)
    result.metrics += measured.metrics
    for attack in not_run:
        for eps in p.grid(attack):
            labels = {"attack": attack, "eps": eps_label(eps)}
            result.metrics += [
                Metric(
                    TASK_METRICS[task][1],
                    None,
                    TASK_METRICS[task][2],
                    labels={**labels, **extra},
                    n=n,
                    reason=_not_run_reason(attack, task),
                )
                for extra in measured.per_output
            ]
    result.metrics.append(_masking_metric(p, tests, n, reason=access.masking_reason))
    result.findings += _task_findings(
        ctx, plan, targets_np, p, config, run_attacks, not_run, tests, unbounded, clean_loss, loss_curves, attacked
    )
    result.findings += measured.findings
    result.findings += access.findings
    for finding in result.findings:
        if finding["kind"] == "attack_setup":
            finding["scaled_for_device"] = {name: getattr(p, name) for name in scaled}
    for plot in measured.plots:
        result.artifacts.append(
            ctx.write_artifact(plot.name, f"{plot.name}.svg", plot.writer(n), description=plot.description)
        )
    return result


def _unbounded_metric(task: str, outputs: torch.Tensor, targets: NDArray[Any], names: list[str]) -> dict[str, Any]:
    """What the unbounded attack did to the task's metric (recorded with the sanity tests)."""
    if task == "multilabel":
        value, _ = macro_auroc(label_aurocs(task_scores(outputs, task), targets, names))
        return {"macro_auroc": value}
    if task == "segmentation":
        dice, _ = _case_dice(outputs, targets, len(names))
        return {"mean_dice": mean_dice(dice)}
    maes = mae_per_output(absolute_errors(task_scores(outputs, task), targets))
    return {"mae": {name: float(v) if np.isfinite(v) else None for name, v in zip(names, maes, strict=True)}}


@dataclass(frozen=True)
class _Plot:
    name: str
    curves: dict[str, dict[float, float]]
    clean: float
    cis: dict[tuple[str, float], tuple[float, float] | None]
    metric: str
    bounded: bool
    description: str

    def writer(self, n: int) -> Callable[[Path], Path]:
        """Draw this plot at the path the artifact writer gives."""
        return lambda path: robust_accuracy_plot(
            self.curves, self.clean, path, n=n, cis=self.cis, metric=self.metric, bounded=self.bounded
        )


@dataclass
class _Measured:
    metrics: list[Metric]
    findings: list[dict[str, Any]]
    plots: list[_Plot]
    per_output: list[dict[str, str]]


def _interval(
    replicates: NDArray[np.float64], estimate: float | None, bounds: tuple[float, float]
) -> tuple[float, float] | None:
    if estimate is None or replicates.size == 0 or not np.isfinite(estimate):
        return None
    return median_centred_interval(replicates, estimate, bounds=bounds)


def _multilabel_metrics(
    clean: torch.Tensor,
    attacked: dict[tuple[str, float], AttackedOutputs],
    targets: NDArray[Any],
    names: list[str],
    p: AdversarialParams,
    rng: np.random.Generator,
    strata: NDArray[np.int64],
) -> _Measured:
    """Macro AUROC (sigmoid scores, known entries) clean and under each attack, with intervals."""
    n = len(targets)
    keys = list(attacked)
    score_sets = [task_scores(clean, "multilabel"), *(task_scores(attacked[key].outputs, "multilabel") for key in keys)]
    per_label = [label_aurocs(scores, targets, names) for scores in score_sets]
    values = [macro_auroc(labels) for labels in per_label]
    replicates = bootstrap_macro_aurocs(score_sets, targets, n_boot=p.n_boot, rng=rng, strata=strata)
    cis = [_interval(replicates[:, c], values[c][0], (0.0, 1.0)) for c in range(len(score_sets))]
    clean_name, robust_name, direction = TASK_METRICS["multilabel"]
    metrics = [Metric(clean_name, values[0][0], direction, ci=cis[0], n=n, reason=values[0][1])]
    for c, (attack, eps) in enumerate(keys, start=1):
        labels = {"attack": attack, "eps": eps_label(eps)}
        metrics.append(Metric(robust_name, values[c][0], direction, labels=labels, ci=cis[c], n=n, reason=values[c][1]))
    findings: list[dict[str, Any]] = [
        {
            "kind": "label_aurocs",
            "definition": (
                "per-label AUROC of the sigmoid scores on the known entries (label -1 left out and counted);"
                " the macro AUROC is their mean over the labels with a known positive and a known negative"
                " in the sample"
            ),
            "clean": [entry.to_json() for entry in per_label[0]],
            "attacked": {
                f"{attack}@{eps_label(eps)}": {e.label: e.value for e in per_label[c]}
                for c, (attack, eps) in enumerate(keys, start=1)
            },
            "undefined_labels": [e.to_json() for e in per_label[0] if e.value is None],
        }
    ]
    plots = []
    clean_value = values[0][0]
    if clean_value is not None and keys:
        curves: dict[str, dict[float, float]] = {}
        plot_cis: dict[tuple[str, float], tuple[float, float] | None] = {}
        for c, (attack, eps) in enumerate(keys, start=1):
            attacked_value = values[c][0]
            if attacked_value is not None:
                curves.setdefault(attack, {})[eps] = float(attacked_value)
                plot_cis[(attack, eps)] = cis[c]
        plots.append(
            _Plot(
                "robust_macro_auroc",
                curves,
                float(clean_value),
                plot_cis,
                "macro AUROC",
                True,
                f"Macro AUROC (known label entries) against the perturbation budget on {n} eval images "
                f"(attacks on the summed binary cross-entropy: {', '.join(sorted({a for a, _ in keys}))}), with "
                "95% bootstrap intervals; the dotted line is the clean macro AUROC.",
            )
        )
    return _Measured(metrics, findings, plots, [{}])


def _regression_metrics(
    clean: torch.Tensor,
    attacked: dict[tuple[str, float], AttackedOutputs],
    targets: NDArray[Any],
    names: list[str],
    units: dict[str, str],
    p: AdversarialParams,
    rng: np.random.Generator,
    strata: NDArray[np.int64],
) -> _Measured:
    """MAE per output (known targets) clean and under each attack, with intervals."""
    n = len(targets)
    keys = list(attacked)
    error_sets = [absolute_errors(task_scores(clean, "regression"), targets)]
    error_sets += [absolute_errors(task_scores(attacked[key].outputs, "regression"), targets) for key in keys]
    maes = np.stack([mae_per_output(errors) for errors in error_sets])  # (C, K)
    replicates = bootstrap_maes(error_sets, n_boot=p.n_boot, rng=rng, strata=strata)
    clean_name, robust_name, direction = TASK_METRICS["regression"]
    per_output = [_output_labels(names, k) for k in range(len(names))]

    def metric(name: str, c: int, k: int, labels: dict[str, str]) -> Metric:
        value = float(maes[c, k])
        reason = None
        if np.isnan(value):
            reason = f"output {names[k]!r}: no known target in the sample"
        elif not np.isfinite(value):
            bad = int(np.isinf(error_sets[c][:, k]).sum())
            reason = f"output {names[k]!r}: {bad} of {n} predictions are not finite"
        defined = reason is None
        ci = _interval(replicates[:, c, k], value if defined else None, (0.0, math.inf)) if defined else None
        return Metric(name, value if defined else None, direction, labels=labels, ci=ci, n=n, reason=reason)

    metrics = [metric(clean_name, 0, k, per_output[k]) for k in range(len(names))]
    for c, (attack, eps) in enumerate(keys, start=1):
        labels = {"attack": attack, "eps": eps_label(eps)}
        metrics += [metric(robust_name, c, k, {**labels, **per_output[k]}) for k in range(len(names))]
    plots = []
    for k, name in enumerate(names):
        if not np.isfinite(maes[0, k]) or not keys:
            continue
        curves: dict[str, dict[float, float]] = {}
        plot_cis: dict[tuple[str, float], tuple[float, float] | None] = {}
        for c, (attack, eps) in enumerate(keys, start=1):
            if np.isfinite(maes[c, k]):
                curves.setdefault(attack, {})[eps] = float(maes[c, k])
                plot_cis[(attack, eps)] = _interval(replicates[:, c, k], float(maes[c, k]), (0.0, math.inf))
        unit = f" ({units[name]})" if units.get(name) else ""
        plots.append(
            _Plot(
                "robust_mae" if len(names) == 1 else f"robust_mae_{k}",
                curves,
                float(maes[0, k]),
                plot_cis,
                f"MAE{unit}",
                False,
                f"MAE of output {name!r}{unit} against the perturbation budget on {n} eval images (attacks "
                "maximising the squared error), with 95% bootstrap intervals; the dotted line is the clean MAE.",
            )
        )
    return _Measured(metrics, [], plots, per_output)


def _segmentation_metrics(
    clean: torch.Tensor,
    attacked: dict[tuple[str, float], AttackedOutputs],
    reference: NDArray[Any],
    names: list[str],
    p: AdversarialParams,
    rng: np.random.Generator,
    strata: NDArray[np.int64],
) -> _Measured:
    """Mean Dice (MONAI's per-case Dice of the arg-max maps) clean and under each attack, with intervals."""
    n = len(reference)
    keys = list(attacked)
    scored = [_case_dice(clean, reference, len(names))]
    scored += [_case_dice(attacked[key].outputs, reference, len(names)) for key in keys]
    dice_sets = [dice for dice, _ in scored]
    values = [mean_dice(dice) for dice in dice_sets]
    replicates = bootstrap_mean_dice(dice_sets, n_boot=p.n_boot, rng=rng, strata=strata)
    cis = [_interval(replicates[:, c], values[c], (0.0, 1.0)) for c in range(len(dice_sets))]
    clean_name, robust_name, direction = TASK_METRICS["segmentation"]

    def metric(name: str, c: int, labels: dict[str, str]) -> Metric:
        reason = None if values[c] is not None else NO_REFERENCE
        return Metric(name, values[c], direction, labels=labels, ci=cis[c], n=n, reason=reason)

    metrics = [metric(clean_name, 0, {})]
    metrics += [
        metric(robust_name, c, {"attack": attack, "eps": eps_label(eps)})
        for c, (attack, eps) in enumerate(keys, start=1)
    ]
    foreground = names[1:]
    per_class = [_class_dice(dice) for dice in dice_sets]
    defined = np.isfinite(dice_sets[0]).sum(axis=0)
    conditions = ["clean", *(f"{attack}@{eps_label(eps)}" for attack, eps in keys)]
    findings: list[dict[str, Any]] = [
        {
            "kind": "class_dice",
            "definition": (
                "per foreground class, the mean over the sampled cases whose reference holds the class of"
                " MONAI's compute_dice (include_background=False, ignore_empty=True) of the arg-max map; the"
                " mean Dice is their mean over the classes held by some case"
            ),
            "clean": {name: {"dice": per_class[0][k], "cases": int(defined[k])} for k, name in enumerate(foreground)},
            "attacked": {
                condition: dict(zip(foreground, per_class[c], strict=True))
                for c, condition in enumerate(conditions[1:], start=1)
            },
            "undefined_classes": [
                {"class": name, "reason": "no sampled case's reference holds the class"}
                for k, name in enumerate(foreground)
                if defined[k] == 0
            ],
            "non_finite_cases": {
                condition: count for condition, (_, count) in zip(conditions, scored, strict=True) if count
            },
        }
    ]
    plots = []
    clean_value = values[0]
    if clean_value is not None and keys:
        curves: dict[str, dict[float, float]] = {}
        plot_cis: dict[tuple[str, float], tuple[float, float] | None] = {}
        for c, (attack, eps) in enumerate(keys, start=1):
            attacked_value = values[c]
            if attacked_value is not None:
                curves.setdefault(attack, {})[eps] = float(attacked_value)
                plot_cis[(attack, eps)] = cis[c]
        plots.append(
            _Plot(
                "robust_dice",
                curves,
                float(clean_value),
                plot_cis,
                "mean Dice",
                True,
                f"Mean Dice over the foreground classes against the perturbation budget on {n} eval images "
                f"(attacks on the mean pixel-wise cross-entropy: {', '.join(sorted({a for a, _ in keys}))}), with "
                "95% bootstrap intervals; the dotted line is the clean mean Dice.",
            )
        )
    return _Measured(metrics, findings, plots, [{}])


def _masking_metric(p: AdversarialParams, tests: list[MaskingTest], n: int, *, reason: str | None = None) -> Metric:
    suspected = masking_suspected(tests)
    if reason is None and not p.sanity_checks:
        reason = "gradient-masking sanity checks disabled (sanity_checks: false)"
    elif reason is None and suspected is None:
        reason = "no gradient-masking test could run with the selected attacks"
    return Metric(
        "adversarial.gradient_masking_suspected",
        None if suspected is None else float(suspected),
        "lower_is_better",
        n=n,
        reason=reason,
    )


def _reference_summary(reference: NDArray[Any], names: list[str]) -> dict[str, Any]:
    """What a segmentation sample holds: per foreground class the cases whose reference holds it, the
    cases with an empty reference, and the label maps' shape."""
    flat = np.asarray(reference).reshape(len(reference), -1)
    return {
        "spatial_shape": [int(v) for v in np.asarray(reference).shape[1:]],
        "cases_with_class": {name: int((flat == k).any(axis=1).sum()) for k, name in enumerate(names) if k > 0},
        "empty_reference": int((~(flat > 0).any(axis=1)).sum()),
        "strata": "foreground classes in the reference",
    }


def _task_findings(
    ctx: CheckContext,
    plan: SamplePlan,
    targets: NDArray[Any],
    p: AdversarialParams,
    config: AttackConfig,
    run_attacks: list[str],
    not_run: list[str],
    tests: list[MaskingTest],
    unbounded: dict[str, Any] | None,
    clean_loss: float | None,
    loss_curves: dict[str, dict[float, float]],
    attacked: dict[tuple[str, float], AttackedOutputs],
) -> list[dict[str, Any]]:
    task = ctx.task
    names = list(ctx.classes)
    manifest_rows = np.asarray(ctx.split("eval").rows)[plan.indices]
    sample: dict[str, Any] = {
        "kind": "adversarial_sample",
        "split": "eval",
        "task": task,
        "rows": [int(r) for r in manifest_rows],
        "n": len(targets),
    }
    sample.update(
        _reference_summary(targets, names)
        if task == "segmentation"
        else sample_summary(targets, task, names, dict(ctx.units))
    )
    setup: dict[str, Any] = {
        "kind": "attack_setup",
        "task": task,
        "loss": TASK_LOSS_TEXT[task],
        "implementation": (
            "in-house FGSM / PGD loops on the task loss, torchattacks' FGSM, PGD and PGDL2 step for step"
            + (
                " (one loop for every task's loss; on per-pixel logits they take torchattacks' steps, whose"
                " mean cross-entropy differs from the per-image mean by a factor the steps discard)"
                if task == "segmentation"
                else " (torchattacks hard-codes the cross-entropy of class indices)"
            )
        ),
        "metric": TASK_METRIC_TEXT[task],
        "device": str(ctx.device),
        "precision": "fp32",
        "batch_size": p.batch_size,
        "seed_root": plan.seed_root,
        "attacks": {
            attack: {
                "norm": ATTACKS[attack].norm,
                "access": ATTACKS[attack].access,
                "eps": p.grid(attack),
                "reference": ATTACKS[attack].reference,
                "max_perturbation_norm": {
                    eps_label(eps): float(attacked[(attack, eps)].norms.max()) if len(targets) else 0.0
                    for eps in p.grid(attack)
                },
            }
            for attack in run_attacks
        },
        "pgd": {
            "steps": config.pgd_steps,
            "step_size": f"{config.pgd_step_size} * eps / steps",
            "random_start": config.random_start,
        },
    }
    if task == "regression":
        setup["units"] = regression_units(names, dict(ctx.units))
    findings: list[dict[str, Any]] = [sample, setup]
    if not_run:
        findings.append(
            {
                "kind": "attacks_not_run",
                "task": task,
                "attacks": list(not_run),
                "reason": (
                    f"not run for task: {task}: Carlini-Wagner, Square and AutoAttack are built on class margins"
                    f" (classification); the attacks on the task's loss are {', '.join(LOSS_ATTACKS)}"
                ),
            }
        )
    if not p.sanity_checks:
        return findings
    findings.append(
        {
            "kind": "gradient_masking_tests",
            "task": task,
            "reference": CARLINI_2019,
            "slack": slack(len(targets), p.masking_tolerance),
            "unbounded_eps": p.unbounded_eps,
            "unbounded": unbounded,
            "clean_loss": clean_loss,
            "loss_curves": {a: {eps_label(e): v for e, v in c.items()} for a, c in loss_curves.items()},
            "tests": [t.to_json() for t in tests],
        }
    )
    for test in tests:
        if test.passed is False:
            findings.append(
                {
                    "kind": "gradient_masking_suspected",
                    "test": test.name,
                    "detail": test.detail,
                    "violations": list(test.violations),
                    "reference": CARLINI_2019,
                }
            )
    return findings
