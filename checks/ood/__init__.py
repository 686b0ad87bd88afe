"""The out-of-distribution check: does the model know when an image is not what it was trained on?

The numbers come from plain functions in :mod:`.metrics` (AUROC, AUPR, FPR at 95% TPR),
:mod:`.detectors` (the scores), :mod:`.sets` (the built-in OOD sets) and :mod:`.plots`, all
testable without the engine; :class:`OODCheck` applies them to the shared pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field, field_validator
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from auditkit.check import (
    Check,
    CheckParams,
    CheckResult,
    Direction,
    Metric,
    Needs,
    Resources,
    Skip,
    require_finite_logits,
)
from auditkit.checks.ood.detectors import (
    DETECTORS,
    energy_score,
    fit_class_gaussians,
    joint_energy_score,
    knn_score,
    mahalanobis_score,
    max_logit_score,
    max_sigmoid_score,
    msp_score,
    odin_score,
)
from auditkit.checks.ood.metrics import (
    TARGET_TPR,
    Interval,
    aupr,
    auroc,
    fpr_at_tpr,
    separation_metrics,
    threshold_at_tpr,
    threshold_rows,
)
from auditkit.checks.ood.plots import roc_curves, score_histograms
from auditkit.checks.ood.scoring import ScoredSet, Scorer, score_builtin_sets, score_spec_sets
from auditkit.checks.ood.sets import BUILTIN_SETS, load_other_modality, synthetic_shift
from auditkit.context import serial_blas
from auditkit.segmentation import case_figures
from auditkit.stats import bootstrap_cis, stable_seed

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = [
    "OODCheck",
    "aupr",
    "auroc",
    "builtin_size",
    "energy_score",
    "fit_class_gaussians",
    "fpr_at_tpr",
    "joint_energy_score",
    "knn_score",
    "load_other_modality",
    "mahalanobis_score",
    "max_logit_score",
    "max_sigmoid_score",
    "msp_score",
    "odin_score",
    "roc_curves",
    "score_histograms",
    "separation_metrics",
    "synthetic_shift",
    "threshold_at_tpr",
]

FloatArray = NDArray[np.float64]
DetectorName = Literal["msp", "max_logit", "energy", "mahalanobis", "knn", "odin"]
BuiltinSetName = Literal["noise", "inverted", "blank", "corrupted", "other_modality"]
DEFAULT_DETECTORS: tuple[DetectorName, ...] = ("msp", "max_logit", "energy", "mahalanobis", "knn")


class OODParams(CheckParams):
    """Parameters of :class:`OODCheck`.

    Attributes:
        detectors: detectors to run, from msp, max_logit, energy, mahalanobis, knn, odin.
        builtin_sets: built-in OOD sets, from noise, inverted, blank, corrupted,
            other_modality (``[]``: the spec's sets only).
        builtin_fraction: share of the eval images each synthetic shift (noise, inverted,
            blank, corrupted) is made from, so the four together cost about one pass over
            eval whatever its size: ``ceil(builtin_fraction * n_eval)`` images per shift,
            at least ``min(n_eval, min_builtin_images)`` and at most ``max_builtin_images``.
            The shifts' images are the check's own inputs, each forwarded once. Smaller
            sets give wider (reported) AUROC and FPR intervals; at the default each set
            holds a quarter as many images as eval, and at least 32.
        min_builtin_images: floor of each synthetic shift's size (small eval splits).
        max_builtin_images: cap of each synthetic shift's size (large eval splits).
        knn_k: the neighbour rank of k-NN (capped at the fit set's size).
        fit_fraction: share of eval (stratified by class) fitting Mahalanobis and k-NN when
            the run has no train split.
        odin_temperature: ODIN's softmax temperature.
        odin_epsilon: ODIN's perturbation in [0, 1] image units.
        n_boot: bootstrap resamples per interval; 0 disables intervals.
    """

    detectors: tuple[DetectorName, ...] = DEFAULT_DETECTORS
    builtin_sets: tuple[BuiltinSetName, ...] = BUILTIN_SETS
    builtin_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    min_builtin_images: int = Field(default=32, ge=1, le=100_000)
    max_builtin_images: int = Field(default=256, ge=1, le=100_000)
    knn_k: int = Field(default=10, ge=1)
    fit_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    odin_temperature: float = Field(default=1000.0, gt=0.0)
    odin_epsilon: float = Field(default=0.0014, ge=0.0, le=1.0)
    n_boot: int = Field(default=1000, ge=0, le=100_000)

    @field_validator("detectors", "builtin_sets")
    @classmethod
    def _unique(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(values)) != len(values):
            raise ValueError(f"expected each name once, got {list(values)}")
        return values

    @field_validator("detectors")
    @classmethod
    def _not_empty(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError(f"expected at least one detector of {list(DETECTORS)}, got []")
        return values


class OODCheck(Check[OODParams]):
    """Out-of-distribution detection: AUROC, AUPR and FPR at 95% TPR of five detectors.

    Methods (each score is higher for more in-distribution images):
    maximum softmax probability, MSP (Hendrycks & Gimpel 2017, "A Baseline for Detecting
    Misclassified and Out-of-Distribution Examples in Neural Networks", ICLR); maximum logit
    (Hendrycks et al. 2022, ICML); energy (Liu et al. 2020, "Energy-based Out-of-distribution
    Detection", NeurIPS); Mahalanobis distance to the closest class mean under a shared,
    Ledoit-Wolf-shrunk covariance (Lee et al. 2018, "A Simple Unified Framework for Detecting
    Out-of-Distribution Samples and Adversarial Attacks", NeurIPS); k-th nearest-neighbour
    distance of L2-normalised embeddings (Sun et al. 2022, "Out-of-Distribution Detection with
    Deep Nearest Neighbors", ICML); and, opt-in, ODIN (Liang et al. 2018, "Enhancing The
    Reliability of Out-of-distribution Image Detection in Neural Networks", ICLR), which needs
    input gradients and so extra passes through the model. Mahalanobis and k-NN are fitted on
    the train split, or, without one, on a class-stratified ``fit_fraction`` of the eval split;
    their in-distribution scores then come from the rest of eval only.

    Inputs: eval logits and embeddings from the shared pass (never recomputed); the train
    split's embeddings when present; the spec's OOD sets (``data.ood``, split ``ood:<name>``,
    decoded once with quarantine like eval); built-in sets needing no user data, each scored by
    one pass of new images under split ``ood:builtin:<name>``: ``noise``, ``inverted``, ``blank``
    and ``corrupted`` shifts of up to ``max_builtin_images`` eval images, and
    ``other_modality``, the CT and MR slices in pydicom's package test data.

    Metrics (labels ``{detector, ood_set}``; ``ood_set`` is the spec's set name or
    ``builtin:<name>``; each with ``n`` = in + out images and a stratified bootstrap ``ci``,
    the median-centred percentile interval of :mod:`auditkit.stats`, which always contains the
    value; in the AUPRs' bootstrap a resampled row's copies are not ties, see :mod:`.metrics`):
        ``ood.auroc`` (higher is better), ``ood.aupr`` (AUPR-Out: OOD images are the
        positives), ``ood.aupr_in`` (AUPR-In), ``ood.fpr_at_95_tpr`` (share of OOD images
        accepted at the threshold keeping 95% of in-distribution images; lower is better).
        The recommended detector — highest worst-case AUROC over the OOD sets, ties broken by
        mean AUROC, then mean FPR, then the order of ``detectors`` — repeats its values as
        ``ood.recommended_auroc`` and ``ood.recommended_fpr_at_95_tpr`` {detector, ood_set} and
        gets ``ood.selective_accuracy`` {detector} (accuracy on the in-distribution images its
        95%-TPR threshold accepts, as in selective prediction, Geifman & El-Yaniv 2017,
        "Selective Classification for Deep Neural Networks", NeurIPS; the interval re-estimates
        the threshold) and ``ood.coverage`` {detector} (share accepted, >= 0.95). The detector
        is chosen on the data it is measured on, so its values are optimistic by the choice;
        judge them on the interval's conservative end where that matters.

    Findings: ``ood_reference`` (fit split and sizes; without a train split, ``split`` and
    ``rows`` name the eval rows fitted on); one ``ood_set`` per set (source, size,
    ``forward_split``, quarantined rows of a spec set, the eval ``rows`` a shift was made from,
    the files of ``other_modality``); ``recommended_detector`` (threshold and accept rule);
    ``non_finite_scores`` (images scored ``-inf``: always rejected); ``odin`` (passes used).

    Artifacts: ``score_histograms`` and ``roc_curves`` (SVG).

    Multi-label models (``model.task: multilabel``): the outputs are independent sigmoids, so
    ``msp`` is the largest sigmoid probability over labels, ``max_k sigmoid(z_k)``, and ``energy``
    the negative joint energy over the per-label two-class logits ``[0, z_k]``,
    ``sum_k log(1 + exp(z_k))`` (both after Wang et al. 2021, "Can multi-label classification
    networks know what they don't know?", NeurIPS); ``max_logit`` is the largest logit.
    Mahalanobis fits one Gaussian to every fit embedding (an image has no single class to
    condition on); its eval hold-out is stratified by "has any finding"; k-NN is unchanged. ODIN
    does not apply (it perturbs towards the top softmax class, which independent sigmoids do not
    have) and ``ood.selective_accuracy`` is undefined (one decision per label, no single accuracy).
    Regression models (``model.task: regression``): only the embedding detectors (one Gaussian,
    random hold-out); ``msp``, ``max_logit``, ``energy`` and ``odin`` score the outputs, and a
    regressor's outputs are predicted values that carry no confidence; ``ood.selective_accuracy``
    is undefined (a predicted value is never right or wrong). In both, a detector that does not
    apply gets undefined metrics with a reason naming the task and a ``detector_not_applicable``
    finding, ``ood.coverage`` is still reported, and an ``ood_scores`` finding says what each
    detector scores. The metric names and labels are those above.
    Segmentation models (``model.task: segmentation``): an image-level score from the pixel-wise
    outputs, ``msp``, ``max_logit`` and ``energy`` of each pixel averaged over the pixels the model
    calls foreground (every pixel when it calls none); Mahalanobis and k-NN on the
    ``feature_layer`` map averaged over space (one Gaussian); ODIN does not apply. The
    ``dice_association`` finding says how well each score predicts the segmentation's quality:
    Spearman's correlation with each eval case's mean Dice and the AUROC of flagging cases whose
    mean Dice is below 0.5 (a low score flagging a failure); ``ood.selective_accuracy`` is
    undefined (a Dice, not an accuracy). The built-in sets keep a volume's shape; the
    other-modality set (2-D slices) is undefined for a 3-D model.

    NIST AI RMF 1.0: MEASURE 2.6 (the system fails safely beyond its knowledge limits: can it
    flag such inputs?), MEASURE 2.5 (the limits of generalisation are documented).
    """

    id: ClassVar[str] = "ood"
    family: ClassVar[str] = "ood"

    Params = OODParams

    # Mahalanobis and k-NN fall back to a held-out part of eval without a train split, so the
    # train split is optional, not required (a required one would skip the check without it).
    needs: ClassVar[Needs] = Needs(
        predictions=True, features=True, images=True, gradients=True, ood=True, train_optional=True
    )
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=1.0)  # on Ray: a GPU where there is one (ODIN)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    emits: ClassVar[tuple[str, ...]] = (
        "ood.auroc",
        "ood.aupr",
        "ood.aupr_in",
        "ood.fpr_at_95_tpr",
        "ood.recommended_auroc",
        "ood.recommended_fpr_at_95_tpr",
        "ood.selective_accuracy",
        "ood.coverage",
    )

    @serial_blas
    def run(self, ctx: CheckContext, params: OODParams) -> CheckResult:
        """Score in- and out-of-distribution images with every detector and compare them."""
        p = params
        seed_root = int(ctx.rng().integers(0, 2**63 - 1))
        preds = ctx.predictions("eval")
        if preds.n == 0:
            raise Skip("no eval images (every eval image was quarantined)")
        require_finite_logits(preds.logits)
        if not p.builtin_sets and not any(s.startswith("ood:") for s in ctx.split_names):
            raise Skip("no out-of-distribution sets: data.ood is empty and builtin_sets is []")
        scorer = Scorer.fit(
            ctx,
            p.detectors,
            knn_k=p.knn_k,
            fit_fraction=p.fit_fraction,
            odin=(p.odin_temperature, p.odin_epsilon),
            rng=np.random.default_rng(stable_seed(seed_root, "fit_split")),
        )
        eval_scores = scorer.score("eval", preds.logits, _eval_features(ctx, scorer), ctx.images)
        in_scores = {d: eval_scores[d][scorer.in_rows[d]] for d in scorer.available}
        segmentation = ctx.task == "segmentation"
        result_findings = [_dice_association(ctx, eval_scores)] if segmentation else []
        sets = score_spec_sets(ctx, scorer) + score_builtin_sets(
            ctx,
            scorer,
            p.builtin_sets,
            n_images=builtin_size(preds.n, p.builtin_fraction, p.min_builtin_images, p.max_builtin_images),
            rng=np.random.default_rng(stable_seed(seed_root, "builtin_sets")),
        )

        result = CheckResult()
        measured: Measured = {}
        for detector in p.detectors:
            for ood in sets:
                reason = scorer.unavailable.get(detector) or ood.reason
                if reason is None:
                    measured[detector, ood.name] = separation_metrics(
                        in_scores[detector],
                        ood.scores[detector],
                        n_boot=p.n_boot,
                        rng=np.random.default_rng(stable_seed(seed_root, detector, ood.name)),
                    )
                n = len(scorer.in_rows[detector]) + ood.n
                values = measured.get((detector, ood.name))
                result.metrics += _separation(detector, ood.name, values, n, reason)
        result.findings += scorer.findings + [s.finding for s in sets] + result_findings
        _recommend(result, ctx, p, scorer, in_scores, sets, measured, seed_root)
        _plots(result, ctx, in_scores, sets)
        if scorer.odin_passes:
            result.findings.append(
                {
                    "kind": "odin",
                    "temperature": p.odin_temperature,
                    "epsilon": p.odin_epsilon,
                    "gradient_passes": scorer.odin_passes,
                }
            )
        return result


FAILED_DICE = 0.5
"""A case whose mean Dice is below this is a failed segmentation (the ``dice_association`` finding)."""


def _dice_association(ctx: CheckContext, eval_scores: dict[str, FloatArray]) -> dict[str, Any]:
    """How well each detector's eval score predicts the segmentation's quality: Spearman's rank
    correlation with each case's mean Dice (its classes' Dice over those in its reference), and
    the AUROC of telling failed cases (mean Dice below :data:`FAILED_DICE`) from the others, a low
    score flagging a failure."""
    preds = ctx.predictions("eval")
    dice = case_figures(
        preds.predicted,
        np.asarray(preds.labels),
        np.ones((preds.n, preds.predicted.ndim - 1)),
        len(ctx.classes),
        figures=("dice",),
    )["dice"]
    defined = np.isfinite(dice)
    counts = defined.sum(axis=1)
    case_dice = np.where(counts > 0, np.where(defined, dice, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
    has_reference = np.isfinite(case_dice)
    failed = case_dice < FAILED_DICE
    out: dict[str, Any] = {
        "kind": "dice_association",
        "cases": int(has_reference.sum()),
        "failed_cases": int(failed[has_reference].sum()),
        "failed_below": FAILED_DICE,
        "note": "cases whose reference holds no foreground class have no Dice and are left out",
        "detectors": {},
    }
    for detector, scores in eval_scores.items():
        keep = has_reference & np.isfinite(scores)
        entry: dict[str, Any] = {"n": int(keep.sum())}
        if keep.sum() >= 3 and np.ptp(scores[keep]) > 0 and np.ptp(case_dice[keep]) > 0:
            entry["spearman_rho"] = round(float(spearmanr(scores[keep], case_dice[keep]).statistic), 6)
        else:
            entry["spearman_rho"] = None
            entry["reason"] = "fewer than three cases, or no spread in the scores or the Dice"
        bad, good = failed[keep], ~failed[keep]
        if bad.any() and good.any():
            # A failure should score low: the AUROC of -score for the failed cases.
            entry["failure_auroc"] = round(float(roc_auc_score(bad, -scores[keep])), 6)
        else:
            entry["failure_auroc"] = None
            entry["failure_reason"] = "needs failed and successful cases"
        out["detectors"][detector] = entry
    return out


def builtin_size(n_eval: int, fraction: float, floor: int, cap: int) -> int:
    """Images per synthetic shift: ``ceil(fraction * n_eval)`` within ``[min(n_eval, floor), cap]``."""
    return max(0, min(n_eval, cap, max(floor, math.ceil(fraction * n_eval))))


def _eval_features(ctx: CheckContext, scorer: Scorer) -> torch.Tensor | None:
    return ctx.features("eval") if scorer.has_features else None


# --------------------------------------------------------------------------------------------
# Metrics, recommendation and plots

_METRIC_NAMES = {
    "auroc": "ood.auroc",
    "aupr_out": "ood.aupr",
    "aupr_in": "ood.aupr_in",
    "fpr_at_tpr": "ood.fpr_at_95_tpr",
}


Measured = dict[tuple[str, str], dict[str, tuple[float, Interval]]]
"""(detector, ood_set) -> the output of :func:`separation_metrics`."""


def _separation(
    detector: str,
    ood_set: str,
    values: dict[str, tuple[float, Interval]] | None,
    n: int,
    reason: str | None,
) -> list[Metric]:
    """The four metrics of one (detector, OOD set) pair; undefined ones carry ``reason``."""
    labels = {"detector": detector, "ood_set": ood_set}
    out = []
    for key, name in _METRIC_NAMES.items():
        value, ci = values[key] if values is not None else (None, None)
        out.append(Metric(name, value, _direction(key), labels=labels, ci=ci, n=n, reason=reason))
    return out


def _direction(key: str) -> Direction:
    return "lower_is_better" if key == "fpr_at_tpr" else "higher_is_better"


def _choose(detectors: tuple[str, ...], sets: list[ScoredSet], measured: Measured) -> str | None:
    """The detector with the highest worst-case AUROC over every OOD set.

    Ties go to the higher mean AUROC, then the lower mean FPR at 95% TPR, then the earlier
    detector in ``detectors``. Detectors not measured on every set are not candidates.
    """
    ranked = []
    for order, detector in enumerate(detectors):
        values = [measured.get((detector, s.name)) for s in sets]
        if not values or any(v is None for v in values):
            continue
        aurocs = [v["auroc"][0] for v in values if v is not None]
        fprs = [v["fpr_at_tpr"][0] for v in values if v is not None]
        key = (min(aurocs), float(np.mean(aurocs)), -float(np.mean(fprs)), -order)
        ranked.append((key, detector))
    return max(ranked)[1] if ranked else None


def _recommend(
    result: CheckResult,
    ctx: CheckContext,
    p: OODParams,
    scorer: Scorer,
    in_scores: dict[str, FloatArray],
    sets: list[ScoredSet],
    measured: Measured,
    seed_root: int,
) -> None:
    """The recommended detector's metrics, threshold and selective accuracy."""
    detector = _choose(p.detectors, sets, measured)
    if detector is None:
        why = "no detector could be measured on every OOD set"
        for name in ("ood.selective_accuracy", "ood.coverage"):
            labels = {"detector": "none"}
            result.metrics.append(Metric(name, None, "higher_is_better", labels, reason=why))
        return
    scores = in_scores[detector]
    for ood in sets:
        labels = {"detector": detector, "ood_set": ood.name}
        for key in ("auroc", "fpr_at_tpr"):
            value, ci = measured[detector, ood.name][key]
            name = f"ood.recommended_{_METRIC_NAMES[key].removeprefix('ood.')}"
            n = scores.size + ood.n
            result.metrics.append(Metric(name, value, _direction(key), labels, ci=ci, n=n))

    threshold = threshold_at_tpr(scores, TARGET_TPR)
    accepted = scores >= threshold
    labels = {"detector": detector}
    coverage = float(accepted.mean())
    if ctx.task != "classification":
        reason = SELECTIVE_ACCURACY_REASONS.get(ctx.task, f"task: {ctx.task}: no single decision per image")
        result.metrics.append(Metric("ood.selective_accuracy", None, "higher_is_better", labels, reason=reason))
        result.metrics.append(Metric("ood.coverage", coverage, "higher_is_better", labels, n=int(scores.size)))
        result.findings.append(
            _recommended_finding(detector, threshold, coverage, None, None, scores.size, sets, measured)
            | {"selective_accuracy_reason": reason}
        )
        return

    # Selective prediction (Geifman & El-Yaniv 2017): accuracy on the accepted eval images.
    preds = ctx.predictions("eval")
    rows = scorer.in_rows[detector]
    correct = (preds.predicted[rows] == preds.labels[rows]).astype(np.float64)

    def selective_accuracy(idx: NDArray[np.intp]) -> FloatArray:
        resampled = scores[idx]
        keep = resampled >= threshold_rows(resampled, TARGET_TPR)[:, None]
        return np.asarray((correct[idx] * keep).sum(axis=1) / keep.sum(axis=1))

    accuracy = float(correct[accepted].mean())
    ci = bootstrap_cis(
        {"selective_accuracy": selective_accuracy},
        scores.size,
        n_boot=p.n_boot,
        rng=np.random.default_rng(stable_seed(seed_root, "selective", detector)),
        estimates={"selective_accuracy": accuracy},
        bounds=(0.0, 1.0),
    )["selective_accuracy"]
    n_accepted = int(accepted.sum())
    result.metrics.append(Metric("ood.selective_accuracy", accuracy, "higher_is_better", labels, ci=ci, n=n_accepted))
    result.metrics.append(Metric("ood.coverage", coverage, "higher_is_better", labels, n=int(scores.size)))
    result.findings.append(
        _recommended_finding(
            detector, threshold, coverage, accuracy, float(correct.mean()), scores.size, sets, measured
        )
    )


SELECTIVE_ACCURACY_REASONS = {
    "multilabel": "task: multilabel: selective accuracy is the accuracy of one decision per image on the"
    " images the detector accepts; a multi-label model makes one decision per label, so there is no"
    " single accuracy to report (ood.coverage, the share accepted, is)",
    "segmentation": "task: segmentation: selective accuracy is the accuracy of one decision per image on the"
    " images the detector accepts; a segmentation model decides every pixel, so its quality is a Dice, not an"
    " accuracy (the dice_association finding says how well each score predicts the Dice; ood.coverage, the"
    " share accepted, is reported)",
    "regression": "task: regression: selective accuracy is the accuracy of one decision per image on the"
    " images the detector accepts; a regressor's prediction is a value, never right or wrong, so there"
    " is no accuracy to report (ood.coverage, the share accepted, is)",
}
"""Why ``ood.selective_accuracy`` is undefined for a task other than classification."""


def _recommended_finding(
    detector: str,
    threshold: float,
    coverage: float,
    accuracy: float | None,
    accuracy_all: float | None,
    n_in: int,
    sets: list[ScoredSet],
    measured: Measured,
) -> dict[str, Any]:
    worst = min(sets, key=lambda s: measured[detector, s.name]["auroc"][0])
    return {
        "kind": "recommended_detector",
        "detector": detector,
        "criterion": "highest worst-case AUROC over the OOD sets, then mean AUROC, mean FPR",
        "threshold": threshold,
        "accept_rule": f"accept an image when its {detector} score >= threshold",
        "target_tpr": TARGET_TPR,
        "coverage": coverage,
        "selective_accuracy": accuracy,
        "accuracy_all": accuracy_all,
        "n_in_distribution": int(n_in),
        "worst_ood_set": worst.name,
    }


def _plots(
    result: CheckResult,
    ctx: CheckContext,
    in_scores: dict[str, FloatArray],
    sets: list[ScoredSet],
) -> None:
    """Score histograms and ROC curves of every measured detector and set."""
    scored = [s for s in sets if s.reason is None]
    if not in_scores or not scored:
        return
    out_scores = {d: {s.name: s.scores[d] for s in scored} for d in in_scores}
    thresholds = {d: threshold_at_tpr(v) for d, v in in_scores.items()}
    result.artifacts.append(
        ctx.write_artifact(
            "score_histograms",
            "score_histograms.svg",
            lambda path: score_histograms(in_scores, out_scores, thresholds, path),
            description="Detector scores of the in-distribution images and of each OOD set, with each"
            " detector's threshold at 95% in-distribution TPR.",
        )
    )
    result.artifacts.append(
        ctx.write_artifact(
            "roc_curves",
            "roc_curves.svg",
            lambda path: roc_curves(in_scores, out_scores, path),
            description="ROC curves of every detector against each OOD set.",
        )
    )
