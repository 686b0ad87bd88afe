"""The corruption check: does the model hold up when acquisition changes the image?

The corruptions and their physics live in :mod:`.transforms` (plain functions), the plot in
:mod:`.plots`; :class:`CorruptionCheck` applies them to a sample of the eval split. Multi-label
and regression models are measured on their primary metric (macro AUROC, MAE) with the samples
and metrics of :mod:`auditkit.tasks`, shared with the adversarial check.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field, field_validator

from auditkit.check import (
    Check,
    CheckParams,
    CheckResult,
    Direction,
    Metric,
    Needs,
    Resources,
    require_finite_logits,
)
from auditkit.checks.corruption.plots import severity_plot
from auditkit.checks.corruption.transforms import (
    CORRUPTION_NAMES,
    CORRUPTIONS,
    MAX_SEVERITY,
    Corruption,
    CorruptionName,
    apply_corruption,
    binning_factors,
    draw_randomness,
    poisson_quantile,
)
from auditkit.checks.corruption.volumes import (
    VOLUME_CORRUPTION_NAMES,
    VOLUME_CORRUPTIONS,
    VolumeCorruptionName,
    apply_volume_corruption,
    default_volume_corruptions,
    draw_volume_randomness,
)
from auditkit.sampling import stratified_sample
from auditkit.segmentation import case_figures
from auditkit.stats import bootstrap_indices, median_centred_interval, stable_seed
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
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "MAX_SEVERITY",
    "Corruption",
    "CorruptionCheck",
    "apply_corruption",
    "binning_factors",
    "bootstrap_accuracies",
    "draw_randomness",
    "poisson_quantile",
    "relative_drop",
    "severity_plot",
]

log = logging.getLogger(__name__)

CLEAN_LABELS = {"corruption": "none", "severity": "0"}
"""Labels of the clean accuracy, reported as ``corruption.accuracy`` at severity 0."""


def relative_drop(clean_accuracy: float, accuracy: float) -> float:
    """``(clean - corrupted) / clean``: the share of clean accuracy lost (NaN if clean is 0).

    Example:
        >>> relative_drop(0.8, 0.6)
        0.25
    """
    if clean_accuracy == 0:
        return float("nan")
    return (clean_accuracy - accuracy) / clean_accuracy


def bootstrap_accuracies(
    correct: NDArray[np.bool_],
    *,
    n_boot: int,
    rng: np.random.Generator,
    strata: NDArray[Any] | None = None,
) -> NDArray[np.float64]:
    """Accuracies of several paired correctness vectors on the same bootstrap resamples.

    Every row of ``correct`` is evaluated on the same resampled images, so differences between
    rows (the relative drop of a corruption against clean) get paired intervals.

    Args:
        correct: bool ``(K, n)``: whether each of ``n`` images is classified correctly under
            each of ``K`` conditions.
        n_boot: number of resamples.
        rng: the generator to draw from.
        strata: optional class per image; resamples keep the class counts.

    Returns:
        float64 ``(n_boot, K)`` accuracies (empty when ``n_boot`` is 0 or ``n`` < 2).
    """
    k, n = correct.shape
    if n_boot <= 0 or n < 2:
        return np.empty((0, k), dtype=np.float64)
    values = correct.astype(np.float64)
    out = np.empty((n_boot, k), dtype=np.float64)
    block = max(1, min(n_boot, (1 << 22) // n))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        idx = bootstrap_indices(n, n_boot=size, rng=rng, strata=strata)
        # Resample weights (how often each image was drawn) turn K means into one product.
        weights = np.zeros((size, n), dtype=np.float64)
        np.add.at(weights, (np.arange(size)[:, None], idx), 1.0)
        out[start : start + size] = weights @ values.T / n
    return out


class CorruptionParams(CheckParams):
    """Parameters of :class:`CorruptionCheck`.

    Attributes:
        corruptions: corruptions to apply. Default: every one of :data:`CORRUPTION_NAMES` on
            2-D images; on volumes the artefacts of
            :data:`~auditkit.checks.corruption.volumes.VOLUME_CORRUPTION_NAMES` that belong to the
            sample's DICOM modality (:func:`~.volumes.default_volume_corruptions`).
        severities: severities to run, strictly increasing in 1..5 (0 is the clean image).
        n_samples: images corrupted (class-stratified, seeded); ``None`` takes the whole
            eval split.
        batch_size: images corrupted and forwarded together.
        n_boot: bootstrap resamples per interval; 0 disables intervals.
    """

    corruptions: list[CorruptionName | VolumeCorruptionName] | None = Field(default=None, min_length=1)
    severities: list[int] = Field(default_factory=lambda: list(range(1, MAX_SEVERITY + 1)), min_length=1)
    n_samples: int | None = Field(default=1000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    n_boot: int = Field(default=1000, ge=0, le=100_000)

    @field_validator("corruptions")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"corruptions must not repeat, got {value}")
        return value

    @field_validator("severities")
    @classmethod
    def _severity_grid(cls, value: list[int]) -> list[int]:
        if any(not 1 <= s <= MAX_SEVERITY for s in value):
            raise ValueError(f"severities must lie in 1..{MAX_SEVERITY} (0 is the clean image), got {value}")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"severities must be strictly increasing, got {value}")
        return value

    @property
    def names(self) -> list[str]:
        """The corruptions to run, once :func:`_resolved` has filled in the default."""
        if self.corruptions is None:
            raise RuntimeError("corruptions are resolved against the input before the check runs")
        return list(self.corruptions)


class CorruptionCheck(Check[CorruptionParams]):
    """Corruption robustness: accuracy under medical acquisition shifts at five severities.

    Method: in the spirit of ImageNet-C (Hendrycks & Dietterich 2019, "Benchmarking Neural
    Network Robustness to Common Corruptions and Perturbations", ICLR), a class-stratified,
    seeded sample of the eval split is corrupted with physically motivated acquisition shifts:
    Gaussian (electronic), Poisson (quantum, reduced dose) and Rician (MR magnitude) noise,
    Gaussian blur, contrast and gamma changes, an MR/X-ray bias field, Gibbs ringing, k-space
    spikes, detector binning and JPEG compression, each at severities 1 to 5 whose physical
    meaning :data:`CORRUPTIONS` documents. Gibbs ringing and the blur kernel come from MONAI
    (Cardoso et al. 2022, arXiv:2211.02701). Randomness is drawn per image from its seed and
    shared by all severities, so results are deterministic and severity only scales the same
    noise. Clean predictions come from the shared pass; each corrupted batch is one forward
    pass through the model adapter on the context's device (split ``corruption:<name>:<s>``).
    The relative drop is ``(clean - corrupted) / clean`` on the same images; intervals are
    paired 95% bootstraps stratified by class, all from one draw: the median-centred percentile
    interval of :mod:`auditkit.stats`, which always contains the value (a relative drop is a
    ratio, biased under resampling) and is the percentile interval when the resampling is
    unbiased (an accuracy's, as a rule).

    Other tasks measure their primary metric (docs/architecture.md, "Tasks") in place of accuracy, with the
    same corruptions, seeds, paired bootstrap and metric names, so ``corruption.relative_drop``
    is positive when the model gets worse, whatever the task:

    * ``task: multilabel``: the macro AUROC, the mean over the labels with a known positive and
      a known negative in the sample of each label's AUROC (Mann-Whitney, as scikit-learn's
      ``roc_auc_score``) of the sigmoid scores on its known entries (unknown entries, label -1,
      left out and counted; a label with one class is undefined with the reason, named in the
      ``label_aurocs`` finding). The sample holds a known positive and negative of every label
      that has them. ``relative_drop = (clean macro AUROC - corrupted) / clean``: the share of
      the clean macro AUROC lost (at most 1).
    * ``task: regression``: the mean absolute error per output over the known targets, in the
      output's unit (``model.units``). ``relative_drop = (corrupted MAE - clean MAE) / clean
      MAE``: the relative increase of the error (at least -1), the mean over the outputs when
      there are several (a unit-free number). A non-finite prediction leaves the MAE undefined,
      with the count as the reason. The sample is stratified by target quintile.
    * ``task: segmentation``: the mean Dice, the mean over foreground classes of each class's mean
      Dice over the sampled cases whose reference holds it (MONAI's ``compute_dice``,
      :mod:`auditkit.segmentation`; an empty reference is left out as MONAI's DiceMetric does; a
      case whose corrupted outputs are not finite is scored as all background). ``relative_drop =
      (clean mean Dice - corrupted) / clean``. The sample is stratified by how many foreground
      classes the reference holds, and the artifact is ``corruption_mean_dice``.

    ``corruption.mean_relative_drop`` is, for every task, the mean of the relative drops over
    every corruption and severity run.

    Volumes (``model.input.depth``) are corrupted by 3-D acquisition artefacts instead
    (:mod:`.volumes`): MR motion, ghosting, spike and bias field (TorchIO's deterministic
    transforms with parameters drawn per volume from its seed), CT noise at reduced dose and
    thicker slices, each at five severities documented physically (motion in millimetres at each
    volume's spacing). By default the artefacts of the sample's DICOM modality run (CT: noise and
    slice thickness; MR: the four MR artefacts and slice thickness); volumes without a header
    (NIfTI, ``.npy``) or of mixed modality get all six, and ``corruptions`` selects others. The
    metrics, intervals and rules are those of 2-D images, on the task's primary metric. A 2-D
    corruption named for volumes, or a volume artefact for images, is refused with the name of
    the parameter.

    Inputs: eval-split images or volumes (any size, grayscale or multi-channel), labels and
    predictions, the volumes' spacing and DICOM modality (``Needs(predictions=True,
    images=True, headers=True)``).

    Metrics:
        classification: ``corruption.accuracy`` (``higher_is_better``) with labels
        ``{corruption, severity}``, including the clean accuracy as ``{corruption: none,
        severity: 0}``; multilabel: ``corruption.macro_auroc`` (``higher_is_better``), same
        labels; regression: ``corruption.mae`` (``lower_is_better``), same labels (with an
        ``output`` label when the model has several outputs); segmentation:
        ``corruption.mean_dice`` (``higher_is_better``), same labels;
        every task: ``corruption.relative_drop`` (``lower_is_better``, see above) with labels
        ``{corruption, severity}``; ``corruption.mean_relative_drop`` (``lower_is_better``).

    Findings: ``corruption_sample`` (manifest rows; class counts, per-label counts of known
    positives, negatives and unknown entries, or the targets' count, mean, SD and unit),
    ``corruption_setup`` (each corruption's physics and its level at each severity, device,
    seed; for multilabel and regression the metric and what the relative drop is),
    ``label_aurocs`` (multilabel: every label's AUROC clean and per condition) and
    ``non_finite_logits`` (per corruption and severity, when the model returns NaN or infinity;
    those images count as misclassified, as the worst rank of each label, or leave the MAE
    undefined).

    Artifacts: ``corruption_accuracy`` (SVG): accuracy against severity per corruption;
    multilabel ``corruption_macro_auroc``, regression ``corruption_mae``
    (``corruption_mae_<k>`` per output when there are several).

    NIST AI RMF 1.0: MEASURE 2.5 (validity and reliability beyond the conditions of the
    validation data), MEASURE 2.6 (safe operation under foreseeable changes of acquisition).
    """

    id: ClassVar[str] = "corruption"
    family: ClassVar[str] = "corruption"

    Params = CorruptionParams

    needs: ClassVar[Needs] = Needs(predictions=True, images=True, headers=True)
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=1.0)  # on Ray: a GPU where there is one
    emits: ClassVar[tuple[str, ...]] = (
        "corruption.accuracy",
        "corruption.macro_auroc",
        "corruption.mae",
        "corruption.mean_dice",
        "corruption.relative_drop",
        "corruption.mean_relative_drop",
    )
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)

    def run(self, ctx: CheckContext, params: CorruptionParams) -> CheckResult:
        """Corrupt a stratified sample of the eval split and measure accuracy per severity."""
        p = _resolved(ctx, params)
        if ctx.task != "classification":
            return _run_on_task(ctx, p)
        result = CheckResult()
        preds = ctx.predictions("eval")
        all_labels = np.asarray(preds.labels, dtype=np.int64)
        if all_labels.shape[0] == 0:
            result.metrics += _undefined(p, "no eval images", 0)
            return result

        finite_clean = require_finite_logits(preds.logits)
        rng = ctx.rng()
        indices = stratified_sample(all_labels, p.n_samples, rng)
        seed_root = int(rng.integers(0, 2**62))
        labels = all_labels[indices]
        # A non-finite clean output is a wrong answer, never a lucky argmax.
        clean = (np.asarray(preds.predicted)[indices] == labels) & finite_clean[indices]
        manifest_rows = np.asarray(ctx.split("eval").rows)[indices]
        conditions = [(name, s) for name in p.names for s in p.severities]
        correct = np.zeros((len(conditions), len(indices)), dtype=bool)
        non_finite = np.zeros(len(conditions), dtype=np.int64)
        log.info(
            "corruption: %d images, %d corruptions x %d severities on %s",
            len(indices),
            len(p.names),
            len(p.severities),
            ctx.device,
        )

        for start, stop, row, logits in _corrupted_outputs(ctx, p, indices, manifest_rows, seed_root, conditions):
            # A non-finite output is a failure of the model, never a lucky argmax.
            finite = torch.isfinite(logits).all(dim=1).numpy()
            non_finite[row] += int((~finite).sum())
            correct[row, start:stop] = (logits.argmax(dim=1).numpy() == labels[start:stop]) & finite

        replicates = bootstrap_accuracies(
            np.vstack([clean[None, :], correct]),
            n_boot=p.n_boot,
            rng=np.random.default_rng(stable_seed(seed_root, "bootstrap")),
            strata=labels,
        )
        result.metrics += _metrics(clean, correct, conditions, replicates)
        result.findings += _findings(ctx, p, manifest_rows, labels, seed_root)
        result.findings += [
            {"kind": "non_finite_logits", "corruption": name, "severity": severity, "count": int(count)}
            for (name, severity), count in zip(conditions, non_finite, strict=True)
            if count
        ]

        curves = {
            name: {s: float(correct[conditions.index((name, s))].mean()) for s in p.severities} for name in p.names
        }
        result.artifacts.append(
            ctx.write_artifact(
                "corruption_accuracy",
                "corruption_accuracy.svg",
                lambda path: severity_plot(curves, float(clean.mean()), path, n=len(indices)),
                description=(
                    f"Accuracy against corruption severity on {len(indices)} eval images, one "
                    "line per acquisition shift; severity 0 is the clean accuracy."
                ),
            )
        )
        return result


# --------------------------------------------------------------------------------------------
# Helpers of the check


def _undefined(p: CorruptionParams, reason: str, n: int) -> list[Metric]:
    metrics = [Metric("corruption.accuracy", None, "higher_is_better", labels=CLEAN_LABELS, n=n, reason=reason)]
    for name in p.names:
        for severity in p.severities:
            labels = {"corruption": name, "severity": str(severity)}
            metrics.append(Metric("corruption.accuracy", None, "higher_is_better", labels=labels, n=n, reason=reason))
            metrics.append(
                Metric("corruption.relative_drop", None, "lower_is_better", labels=labels, n=n, reason=reason)
            )
    metrics.append(Metric("corruption.mean_relative_drop", None, "lower_is_better", n=n, reason=reason))
    return metrics


ACCURACY_RANGE = (0.0, 1.0)
DROP_RANGE = (-math.inf, 1.0)
"""A relative drop ``(clean - corrupted) / clean`` is at most 1 (accuracy 0 under corruption)."""


def _metrics(
    clean: NDArray[np.bool_],
    correct: NDArray[np.bool_],
    conditions: list[tuple[str, int]],
    replicates: NDArray[np.float64],
) -> list[Metric]:
    n = len(clean)
    clean_accuracy = float(clean.mean())
    accuracies = correct.mean(axis=1)
    boot_clean = replicates[:, 0]
    boot_corrupted = replicates[:, 1:]

    def interval(
        values: NDArray[np.float64], estimate: float, bounds: tuple[float, float]
    ) -> tuple[float, float] | None:
        # Centred on the reported value; a relative drop is a ratio, biased under resampling.
        return median_centred_interval(values, estimate, bounds=bounds) if values.size else None

    with np.errstate(invalid="ignore", divide="ignore"):
        boot_drops = (boot_clean[:, None] - boot_corrupted) / boot_clean[:, None]
    metrics = [
        Metric(
            "corruption.accuracy",
            clean_accuracy,
            "higher_is_better",
            labels=CLEAN_LABELS,
            ci=interval(boot_clean, clean_accuracy, ACCURACY_RANGE),
            n=n,
        )
    ]
    no_clean = "the clean accuracy of the sample is 0, so a relative drop is undefined"
    for k, (name, severity) in enumerate(conditions):
        labels = {"corruption": name, "severity": str(severity)}
        metrics.append(
            Metric(
                "corruption.accuracy",
                float(accuracies[k]),
                "higher_is_better",
                labels=labels,
                ci=interval(boot_corrupted[:, k], float(accuracies[k]), ACCURACY_RANGE),
                n=n,
            )
        )
        drop = relative_drop(clean_accuracy, float(accuracies[k]))
        metrics.append(
            Metric(
                "corruption.relative_drop",
                None if np.isnan(drop) else drop,
                "lower_is_better",
                labels=labels,
                ci=interval(boot_drops[:, k], drop, DROP_RANGE),
                n=n,
                reason=no_clean if np.isnan(drop) else None,
            )
        )
    mean_drop = relative_drop(clean_accuracy, float(accuracies.mean()))
    metrics.append(
        Metric(
            "corruption.mean_relative_drop",
            None if np.isnan(mean_drop) else mean_drop,
            "lower_is_better",
            ci=interval(boot_drops.mean(axis=1), mean_drop, DROP_RANGE) if boot_drops.size else None,
            n=n,
            reason=no_clean if np.isnan(mean_drop) else None,
        )
    )
    return metrics


def _findings(
    ctx: CheckContext,
    p: CorruptionParams,
    manifest_rows: NDArray[Any],
    labels: NDArray[np.int64],
    seed_root: int,
) -> list[dict[str, Any]]:
    classes = list(ctx.classes)
    counts = np.bincount(labels, minlength=len(classes))
    return [
        {
            "kind": "corruption_sample",
            "split": "eval",
            "rows": [int(r) for r in manifest_rows],
            "n": len(labels),
            "class_counts": {name: int(c) for name, c in zip(classes, counts, strict=False)},
        },
        {
            "kind": "corruption_setup",
            "device": str(ctx.device),
            "seed_root": seed_root,
            **_setup(ctx, p, manifest_rows),
        },
    ]


# --------------------------------------------------------------------------------------------
# Multi-label and regression models: the relative drop of macro AUROC, the relative MAE increase

TASK_METRIC: dict[str, tuple[str, Direction, str]] = {
    "multilabel": ("corruption.macro_auroc", "higher_is_better", "macro AUROC"),
    "regression": ("corruption.mae", "lower_is_better", "MAE"),
    "segmentation": ("corruption.mean_dice", "higher_is_better", "mean Dice"),
}
"""task -> (the primary metric's name, its direction, its name in text)."""

RELATIVE_DROP_TEXT = {
    "multilabel": (
        "(clean macro AUROC - corrupted macro AUROC) / clean macro AUROC on the same images: the share of"
        " the clean macro AUROC lost (positive = worse; at most 1)"
    ),
    "regression": (
        "(corrupted MAE - clean MAE) / clean MAE on the same images: the relative increase of the mean"
        " absolute error (positive = worse; at least -1), averaged over the outputs when there are several"
    ),
    "segmentation": (
        "(clean mean Dice - corrupted mean Dice) / clean mean Dice on the same images: the share of the clean"
        " mean Dice lost (positive = worse; at most 1)"
    ),
}
AUROC_DROP_RANGE = (-math.inf, 1.0)
MAE_INCREASE_RANGE = (-1.0, math.inf)


def _output_labels(names: list[str], k: int) -> dict[str, str]:
    """Regression MAEs carry an ``output`` label only when the model has several outputs."""
    return {"output": names[k]} if len(names) > 1 else {}


def _undefined_task(p: CorruptionParams, task: str, names: list[str], reason: str, n: int) -> list[Metric]:
    name, direction, _ = TASK_METRIC[task]
    extras = [_output_labels(names, k) for k in range(len(names))] if task == "regression" else [{}]
    metrics = [Metric(name, None, direction, labels={**CLEAN_LABELS, **e}, n=n, reason=reason) for e in extras]
    for corruption in p.names:
        for severity in p.severities:
            labels = {"corruption": corruption, "severity": str(severity)}
            metrics += [Metric(name, None, direction, labels={**labels, **e}, n=n, reason=reason) for e in extras]
            metrics.append(
                Metric("corruption.relative_drop", None, "lower_is_better", labels=labels, n=n, reason=reason)
            )
    metrics.append(Metric("corruption.mean_relative_drop", None, "lower_is_better", n=n, reason=reason))
    return metrics


def _modalities(ctx: CheckContext) -> list[str | None]:
    """Each eval image's DICOM Modality (the first slice's for a series), ``None`` without one."""
    out: list[str | None] = []
    for header in ctx.headers("eval"):
        value = None if header is None else getattr(header, "Modality", None)
        out.append(str(value).strip().upper() or None if value is not None else None)
    return out


def _resolved(ctx: CheckContext, params: CorruptionParams) -> CorruptionParams:
    """``params`` with the corruptions this input runs: the selected ones, checked against the
    input's dimensionality, or the defaults (every 2-D corruption; on volumes the artefacts of the
    eval split's modality)."""
    volumes = ctx.spatial_dims == 3
    names = params.corruptions
    if names is None:
        names = list(default_volume_corruptions(_modalities(ctx)) if volumes else CORRUPTION_NAMES)
    else:
        catalogue: tuple[str, ...] = VOLUME_CORRUPTION_NAMES if volumes else CORRUPTION_NAMES
        wrong = [name for name in names if name not in catalogue]
        if wrong:
            kind = "volumes (model.input.depth is set)" if volumes else "2-D images (model.input.depth is not set)"
            raise ValueError(
                f"checks.corruption.corruptions: {wrong} do not apply to {kind}; expected some of {list(catalogue)}"
            )
    return params.model_copy(update={"corruptions": list(names)})


def _setup(ctx: CheckContext, p: CorruptionParams, manifest_rows: NDArray[Any]) -> dict[str, Any]:
    """The ``corruption_setup`` finding's description of every corruption run (physics, parameter,
    levels); on volumes also the modalities seen and each slice thickness in millimetres."""
    volumes = ctx.spatial_dims == 3
    described: dict[str, Any] = {}
    for name in p.names:
        corruption = VOLUME_CORRUPTIONS[name] if volumes else CORRUPTIONS[name]
        described[name] = {
            "physics": corruption.physics,
            "parameter": corruption.parameter,
            "levels": {str(s): corruption.level(s) for s in p.severities},
        }
    out: dict[str, Any] = {"corruptions": described}
    if volumes:
        modalities = _modalities(ctx)
        out["modalities"] = {str(m or "unknown"): modalities.count(m) for m in dict.fromkeys(modalities)}
        spacing = ctx.split("eval").spacing
        if "slice_thickness" in described and spacing is not None and len(spacing):
            z = np.asarray(spacing, dtype=np.float64)[:, 0]
            described["slice_thickness"]["thickness_mm"] = {
                str(s): [round(float(z.min()) * level, 3), round(float(z.max()) * level, 3)]
                for s, level in described["slice_thickness"]["levels"].items()
            }
    return out


def _corrupted_outputs(
    ctx: CheckContext,
    p: CorruptionParams,
    indices: NDArray[np.intp],
    manifest_rows: NDArray[Any],
    seed_root: int,
    conditions: list[tuple[str, int]],
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """``(start, stop, condition, logits)`` for every batch of the sample under every condition:
    each image's corruption drawn from its manifest row, so a sample's images are corrupted the
    same whatever the batch size. Volumes get the 3-D artefacts at their spacing."""
    volumes = ctx.spatial_dims == 3
    spacing = ctx.split("eval").spacing if volumes else None
    for start in range(0, len(indices), p.batch_size):
        stop = min(start + p.batch_size, len(indices))
        images = ctx.images("eval", indices[start:stop]).to(ctx.device)
        grid = None if spacing is None else np.asarray(spacing)[indices[start:stop]]
        for name in p.names:
            seeds = [stable_seed(seed_root, name, int(r)) for r in manifest_rows[start:stop]]
            if volumes:
                draw = draw_volume_randomness(name, tuple(images.shape), seeds)
            else:
                draw = draw_randomness(name, tuple(images.shape), seeds)
            for severity in p.severities:
                if volumes:
                    corrupted = apply_volume_corruption(images, name, severity, spacing=grid, draw=draw)
                else:
                    corrupted = apply_corruption(images, name, severity, draw=draw)
                logits = ctx.model.predict(corrupted, label=f"corruption:{name}:{severity}")
                yield start, stop, conditions.index((name, severity)), logits


def _run_on_task(ctx: CheckContext, p: CorruptionParams) -> CheckResult:
    """The check for a multi-label model, a regressor or a segmentation model: the task's primary
    metric per severity."""
    task = ctx.task
    names = list(ctx.classes)
    result = CheckResult()
    preds = ctx.predictions("eval")
    all_labels = np.asarray(preds.labels)
    if all_labels.shape[0] == 0:
        result.metrics += _undefined_task(p, task, names, "no eval images", 0)
        return result

    require_finite_logits(preds.logits)
    rng = ctx.rng()
    indices = task_sample(all_labels, task, p.n_samples, rng)
    seed_root = int(rng.integers(0, 2**62))
    manifest_rows = np.asarray(ctx.split("eval").rows)[indices]
    conditions = [(name, s) for name in p.names for s in p.severities]
    if task == "segmentation":
        return _run_on_segmentation(ctx, p, indices, manifest_rows, seed_root, conditions)
    targets = all_labels[indices]
    clean = np.asarray(preds.probs, dtype=np.float64)[indices]
    scores = np.zeros((len(conditions), len(indices), len(names)), dtype=np.float64)
    non_finite = np.zeros(len(conditions), dtype=np.int64)
    log.info(
        "corruption: %d images (task: %s), %d corruptions x %d severities on %s",
        len(indices),
        task,
        len(p.names),
        len(p.severities),
        ctx.device,
    )
    for start, stop, row, logits in _corrupted_outputs(ctx, p, indices, manifest_rows, seed_root, conditions):
        # A non-finite output is a failure of the model: the worst rank, an undefined MAE.
        non_finite[row] += int((~torch.isfinite(logits).all(dim=1)).sum())
        scores[row, start:stop] = task_scores(logits, task)

    bootstrap_rng = np.random.default_rng(stable_seed(seed_root, "bootstrap"))
    strata = sample_strata(targets, task)
    if task == "multilabel":
        measured = _multilabel_measurements(clean, scores, targets, names, conditions, p.n_boot, bootstrap_rng, strata)
    else:
        measured = _regression_measurements(
            clean, scores, targets, names, dict(ctx.units), conditions, p.n_boot, bootstrap_rng, strata
        )
    result.metrics += measured.metrics
    result.findings += _task_findings(ctx, p, manifest_rows, targets, seed_root)
    result.findings += measured.findings
    result.findings += [
        {"kind": "non_finite_logits", "corruption": name, "severity": severity, "count": int(count)}
        for (name, severity), count in zip(conditions, non_finite, strict=True)
        if count
    ]
    for plot in measured.plots:
        result.artifacts.append(
            ctx.write_artifact(
                plot.name,
                f"{plot.name}.svg",
                plot.writer(p.severities, p.names, conditions, len(indices)),
                description=plot.description,
            )
        )
    return result


def _run_on_segmentation(
    ctx: CheckContext,
    p: CorruptionParams,
    indices: NDArray[np.intp],
    manifest_rows: NDArray[Any],
    seed_root: int,
    conditions: list[tuple[str, int]],
) -> CheckResult:
    """Mean Dice (MONAI's per-case Dice, :mod:`auditkit.segmentation`) clean and per condition."""
    preds = ctx.predictions("eval")
    n_classes = len(ctx.classes)
    reference = np.asarray(preds.labels)[indices]
    spacing = np.ones((len(indices), reference.ndim - 1))  # Dice needs no spacing
    clean = case_figures(preds.predicted[indices], reference, spacing, n_classes, figures=("dice",))["dice"]
    dice = np.full((len(conditions), len(indices), n_classes - 1), np.nan)
    non_finite = np.zeros(len(conditions), dtype=np.int64)
    log.info(
        "corruption: %d images (task: segmentation), %d conditions on %s", len(indices), len(conditions), ctx.device
    )
    for start, stop, row, logits in _corrupted_outputs(ctx, p, indices, manifest_rows, seed_root, conditions):
        finite = torch.isfinite(logits).flatten(1).all(dim=1)
        non_finite[row] += int((~finite).sum())
        # A case whose outputs are not finite is a failure of the model: scored as all background.
        predicted = torch.where(finite.view(-1, *[1] * (logits.ndim - 2)), logits.argmax(dim=1), 0).numpy()
        part = case_figures(predicted, reference[start:stop], spacing[start:stop], n_classes, figures=("dice",))
        dice[row, start:stop] = part["dice"]
    values = [mean_dice(clean), *(mean_dice(d) for d in dice)]
    strata = sample_strata(reference, "segmentation")
    rng = np.random.default_rng(stable_seed(seed_root, "bootstrap"))
    replicates = bootstrap_mean_dice([clean, *dice], n_boot=p.n_boot, rng=rng, strata=strata)
    n = len(indices)
    clean_value = values[0]
    corrupted = np.array([v if v is not None else math.nan for v in values[1:]], dtype=np.float64)
    undefined = (
        "no foreground class is in the reference of any sampled case, so the mean Dice is undefined"
        if clean_value is None
        else "the clean mean Dice of the sample is 0, so a relative drop is undefined"
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        drops = (clean_value - corrupted) / clean_value if clean_value else np.full(len(conditions), math.nan)
        boot_drops = (replicates[:, :1] - replicates[:, 1:]) / replicates[:, :1]
    drop_metrics, mean_metric = _drop_metrics(drops, boot_drops, conditions, n, AUROC_DROP_RANGE, undefined)
    metric_name, direction, _ = TASK_METRIC["segmentation"]
    no_reference = "no foreground class is in the reference of any sampled case"
    result = CheckResult()
    result.metrics.append(
        Metric(
            metric_name,
            clean_value,
            direction,
            labels=CLEAN_LABELS,
            ci=_interval(replicates[:, 0], clean_value, ACCURACY_RANGE),
            n=n,
            reason=None if clean_value is not None else no_reference,
        )
    )
    for c, (name, severity) in enumerate(conditions, start=1):
        result.metrics.append(
            Metric(
                metric_name,
                values[c],
                direction,
                labels={"corruption": name, "severity": str(severity)},
                ci=_interval(replicates[:, c], values[c], ACCURACY_RANGE),
                n=n,
                reason=None if values[c] is not None else no_reference,
            )
        )
        result.metrics.append(drop_metrics[c - 1])
    result.metrics.append(mean_metric)
    sampled = {"n_images": n, "rows": manifest_rows.tolist(), "strata": "foreground classes in the reference"}
    result.findings.append(
        {
            "kind": "corruption_sample",
            "task": "segmentation",
            **sampled,
            "seed_root": seed_root,
            "metric": "mean Dice: the mean over foreground classes of each class's mean Dice over the sampled"
            " cases whose reference holds it (MONAI's compute_dice, include_background=False, ignore_empty=True)",
            "relative_drop": RELATIVE_DROP_TEXT["segmentation"],
        }
    )
    result.findings.append(
        {"kind": "corruption_setup", "task": "segmentation", "device": str(ctx.device), **_setup(ctx, p, manifest_rows)}
    )
    result.findings += [
        {"kind": "non_finite_logits", "corruption": name, "severity": severity, "count": int(count)}
        for (name, severity), count in zip(conditions, non_finite, strict=True)
        if count
    ]
    if clean_value is not None and np.isfinite(corrupted).all():
        plot = _Plot(
            "corruption_mean_dice",
            corrupted,
            clean_value,
            "mean Dice",
            True,
            f"Mean Dice against corruption severity on {n} eval images, one line per acquisition shift;"
            " severity 0 is the clean mean Dice.",
        )
        result.artifacts.append(
            ctx.write_artifact(
                plot.name,
                f"{plot.name}.svg",
                plot.writer(p.severities, p.names, conditions, n),
                description=plot.description,
            )
        )
    return result


@dataclass(frozen=True)
class _Plot:
    name: str
    values: NDArray[np.float64]
    """The metric per condition (``C``)."""
    clean: float
    metric: str
    bounded: bool
    description: str

    def writer(
        self, severities: list[int], corruptions: list[str], conditions: list[tuple[str, int]], n: int
    ) -> Callable[[Path], Path]:
        curves = {
            name: {s: float(self.values[conditions.index((name, s))]) for s in severities} for name in corruptions
        }
        return lambda path: severity_plot(curves, self.clean, path, n=n, metric=self.metric, bounded=self.bounded)


@dataclass
class _Measured:
    metrics: list[Metric]
    findings: list[dict[str, Any]]
    plots: list[_Plot]


def _interval(
    replicates: NDArray[np.float64], estimate: float | None, bounds: tuple[float, float]
) -> tuple[float, float] | None:
    if estimate is None or replicates.size == 0 or not math.isfinite(estimate):
        return None
    return median_centred_interval(replicates, estimate, bounds=bounds)


def _drop_metrics(
    drops: NDArray[np.float64],
    boot_drops: NDArray[np.float64],
    conditions: list[tuple[str, int]],
    n: int,
    bounds: tuple[float, float],
    undefined: str,
) -> tuple[list[Metric], Metric]:
    """``corruption.relative_drop`` per condition and ``corruption.mean_relative_drop`` (the mean of
    the relative drops), each undefined with ``undefined`` as the reason when not finite."""
    per_condition = []
    for k, (name, severity) in enumerate(conditions):
        value = float(drops[k])
        defined = math.isfinite(value)
        per_condition.append(
            Metric(
                "corruption.relative_drop",
                value if defined else None,
                "lower_is_better",
                labels={"corruption": name, "severity": str(severity)},
                ci=_interval(boot_drops[:, k], value, bounds) if defined else None,
                n=n,
                reason=None if defined else undefined,
            )
        )
    mean = float(np.mean(drops)) if drops.size else math.nan
    defined = math.isfinite(mean)
    mean_metric = Metric(
        "corruption.mean_relative_drop",
        mean if defined else None,
        "lower_is_better",
        ci=_interval(boot_drops.mean(axis=1), mean, bounds) if defined and boot_drops.size else None,
        n=n,
        reason=None if defined else undefined,
    )
    return per_condition, mean_metric


def _multilabel_measurements(
    clean: NDArray[np.float64],
    scores: NDArray[np.float64],
    targets: NDArray[Any],
    names: list[str],
    conditions: list[tuple[str, int]],
    n_boot: int,
    rng: np.random.Generator,
    strata: NDArray[np.int64],
) -> _Measured:
    """Macro AUROC (known label entries) clean and per condition; its relative drop."""
    n = len(targets)
    labels = np.asarray(targets, dtype=np.int64)
    per_label = [label_aurocs(s, labels, names) for s in (clean, *scores)]
    values = [macro_auroc(entries) for entries in per_label]
    replicates = bootstrap_macro_aurocs([clean, *scores], labels, n_boot=n_boot, rng=rng, strata=strata)
    clean_value = values[0][0]
    corrupted = np.array([v if v is not None else math.nan for v, _ in values[1:]], dtype=np.float64)
    if clean_value is None:
        undefined = f"the clean macro AUROC is undefined ({values[0][1]}), so a relative drop is undefined"
    elif clean_value == 0:
        undefined = "the clean macro AUROC of the sample is 0, so a relative drop is undefined"
    else:
        undefined = "the corrupted macro AUROC is undefined"
    with np.errstate(invalid="ignore", divide="ignore"):
        drops = (clean_value - corrupted) / clean_value if clean_value else np.full(len(conditions), math.nan)
        boot_drops = (replicates[:, :1] - replicates[:, 1:]) / replicates[:, :1]
    drop_metrics, mean_metric = _drop_metrics(drops, boot_drops, conditions, n, AUROC_DROP_RANGE, undefined)
    metric_name, direction, _ = TASK_METRIC["multilabel"]
    metrics = [
        Metric(
            metric_name,
            clean_value,
            direction,
            labels=CLEAN_LABELS,
            ci=_interval(replicates[:, 0], clean_value, ACCURACY_RANGE),
            n=n,
            reason=values[0][1],
        )
    ]
    for c, (name, severity) in enumerate(conditions, start=1):
        value, reason = values[c]
        metrics.append(
            Metric(
                metric_name,
                value,
                direction,
                labels={"corruption": name, "severity": str(severity)},
                ci=_interval(replicates[:, c], value, ACCURACY_RANGE),
                n=n,
                reason=reason,
            )
        )
        metrics.append(drop_metrics[c - 1])
    metrics.append(mean_metric)
    findings: list[dict[str, Any]] = [
        {
            "kind": "label_aurocs",
            "definition": (
                "per-label AUROC of the sigmoid scores on the known entries (label -1 left out and counted);"
                " the macro AUROC is their mean over the labels with a known positive and a known negative"
                " in the sample"
            ),
            "clean": [entry.to_json() for entry in per_label[0]],
            "corrupted": {
                f"{name}:{severity}": {e.label: e.value for e in per_label[k + 1]}
                for k, (name, severity) in enumerate(conditions)
            },
            "undefined_labels": [e.to_json() for e in per_label[0] if e.value is None],
        }
    ]
    plots = []
    if clean_value is not None and np.isfinite(corrupted).all():
        plots.append(
            _Plot(
                "corruption_macro_auroc",
                corrupted,
                clean_value,
                "macro AUROC",
                True,
                f"Macro AUROC (known label entries) against corruption severity on {n} eval images, one line "
                "per acquisition shift; severity 0 is the clean macro AUROC.",
            )
        )
    return _Measured(metrics, findings, plots)


def _regression_measurements(
    clean: NDArray[np.float64],
    scores: NDArray[np.float64],
    targets: NDArray[Any],
    names: list[str],
    units: dict[str, str],
    conditions: list[tuple[str, int]],
    n_boot: int,
    rng: np.random.Generator,
    strata: NDArray[np.int64],
) -> _Measured:
    """MAE per output clean and per condition; the relative MAE increase (mean over outputs)."""
    n = len(targets)
    y = np.asarray(targets, dtype=np.float64).reshape(n, -1)
    error_sets = [absolute_errors(s, y) for s in (clean, *scores)]
    maes = np.stack([mae_per_output(e) for e in error_sets])  # (1 + C, K)
    replicates = bootstrap_maes(error_sets, n_boot=n_boot, rng=rng, strata=strata)  # (B, 1 + C, K)
    metric_name, direction, _ = TASK_METRIC["regression"]
    extras = [_output_labels(names, k) for k in range(len(names))]

    def mae_metric(c: int, k: int, labels: dict[str, str]) -> Metric:
        value = float(maes[c, k])
        reason = None
        if math.isnan(value):
            reason = f"output {names[k]!r}: no known target in the sample"
        elif not math.isfinite(value):
            bad = int(np.isinf(error_sets[c][:, k]).sum())
            reason = f"output {names[k]!r}: {bad} of {n} predictions are not finite"
        ci = None if reason else _interval(replicates[:, c, k], value, (0.0, math.inf))
        return Metric(metric_name, None if reason else value, direction, labels=labels, ci=ci, n=n, reason=reason)

    with np.errstate(invalid="ignore", divide="ignore"):
        increases = (maes[1:] - maes[:1]) / maes[:1]  # (C, K)
        drops = increases.mean(axis=1)
        boot_drops = ((replicates[:, 1:] - replicates[:, :1]) / replicates[:, :1]).mean(axis=2)
    clean_ok = bool(np.isfinite(maes[0]).all())
    if not clean_ok:
        undefined = "the clean MAE is undefined (a prediction is not finite, or no target is known)"
    elif (maes[0] == 0).any():
        undefined = "the clean MAE of the sample is 0, so a relative increase is undefined"
    else:
        undefined = "the corrupted MAE is undefined: a prediction under this corruption is not finite"
    drop_metrics, mean_metric = _drop_metrics(drops, boot_drops, conditions, n, MAE_INCREASE_RANGE, undefined)
    metrics = [mae_metric(0, k, {**CLEAN_LABELS, **extras[k]}) for k in range(len(names))]
    for c, (name, severity) in enumerate(conditions, start=1):
        labels = {"corruption": name, "severity": str(severity)}
        metrics += [mae_metric(c, k, {**labels, **extras[k]}) for k in range(len(names))]
        metrics.append(drop_metrics[c - 1])
    metrics.append(mean_metric)
    plots = []
    for k, output in enumerate(names):
        if not np.isfinite(maes[:, k]).all():
            continue
        unit = f" ({units[output]})" if units.get(output) else ""
        plots.append(
            _Plot(
                "corruption_mae" if len(names) == 1 else f"corruption_mae_{k}",
                maes[1:, k],
                float(maes[0, k]),
                f"MAE{unit}",
                False,
                f"MAE of output {output!r}{unit} against corruption severity on {n} eval images, "
                "one line per acquisition shift; severity 0 is the clean MAE.",
            )
        )
    return _Measured(metrics, [], plots)


def _task_findings(
    ctx: CheckContext,
    p: CorruptionParams,
    manifest_rows: NDArray[Any],
    targets: NDArray[Any],
    seed_root: int,
) -> list[dict[str, Any]]:
    task = ctx.task
    names = list(ctx.classes)
    sample: dict[str, Any] = {
        "kind": "corruption_sample",
        "split": "eval",
        "task": task,
        "rows": [int(r) for r in manifest_rows],
        "n": len(targets),
    }
    sample.update(sample_summary(targets, task, names, dict(ctx.units)))
    setup: dict[str, Any] = {
        "kind": "corruption_setup",
        "task": task,
        "metric": (
            "macro AUROC: the mean over the labels with a known positive and negative in the sample of each"
            " label's AUROC of the sigmoid scores on its known entries"
            if task == "multilabel"
            else "MAE: mean absolute error per output over the known targets, in the output's unit"
        ),
        "relative_drop": RELATIVE_DROP_TEXT[task],
        "device": str(ctx.device),
        "seed_root": seed_root,
        **_setup(ctx, p, manifest_rows),
    }
    if task == "regression":
        setup["units"] = regression_units(names, dict(ctx.units))
    return [sample, setup]
