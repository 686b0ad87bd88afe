"""The corruption check: does the model hold up when acquisition changes the image?

The corruptions and their physics live in :mod:`.transforms` (plain functions), the plot in
:mod:`.plots`; :class:`CorruptionCheck` applies them to a sample of the eval split.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field, field_validator

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs, require_finite_logits
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
from auditkit.sampling import stratified_sample
from auditkit.stats import bootstrap_indices, median_centred_interval, stable_seed

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
        corruptions: corruptions to apply (default: all of :data:`CORRUPTION_NAMES`).
        severities: severities to run, strictly increasing in 1..5 (0 is the clean image).
        n_samples: images corrupted (class-stratified, seeded); ``None`` takes the whole
            eval split.
        batch_size: images corrupted and forwarded together.
        n_boot: bootstrap resamples per interval; 0 disables intervals.
    """

    corruptions: list[CorruptionName] = Field(default_factory=lambda: list(CORRUPTION_NAMES), min_length=1)
    severities: list[int] = Field(default_factory=lambda: list(range(1, MAX_SEVERITY + 1)), min_length=1)
    n_samples: int | None = Field(default=1000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    n_boot: int = Field(default=1000, ge=0, le=100_000)

    @field_validator("corruptions")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
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

    Inputs: eval-split images (any size, grayscale or multi-channel), labels and predictions
    (``Needs(predictions=True, images=True)``).

    Metrics:
        ``corruption.accuracy`` (``higher_is_better``) with labels ``{corruption, severity}``,
        including the clean accuracy as ``{corruption: none, severity: 0}``;
        ``corruption.relative_drop`` (``lower_is_better``) with labels ``{corruption,
        severity}``; ``corruption.mean_relative_drop`` (``lower_is_better``): the mean relative
        drop over every corruption and severity run.

    Findings: ``corruption_sample`` (manifest rows, class counts), ``corruption_setup``
    (each corruption's physics and its level at each severity, device, seed) and
    ``non_finite_logits`` (per corruption and severity, when the model returns NaN or infinity;
    those images count as misclassified).

    Artifacts: ``corruption_accuracy`` (SVG): accuracy against severity per corruption.

    NIST AI RMF 1.0: MEASURE 2.5 (validity and reliability beyond the conditions of the
    validation data), MEASURE 2.6 (safe operation under foreseeable changes of acquisition).
    """

    id: ClassVar[str] = "corruption"
    family: ClassVar[str] = "corruption"

    Params = CorruptionParams

    needs: ClassVar[Needs] = Needs(predictions=True, images=True)
    emits: ClassVar[tuple[str, ...]] = (
        "corruption.accuracy",
        "corruption.relative_drop",
        "corruption.mean_relative_drop",
    )

    def run(self, ctx: CheckContext, params: CorruptionParams) -> CheckResult:
        """Corrupt a stratified sample of the eval split and measure accuracy per severity."""
        p = params
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
        conditions = [(name, s) for name in p.corruptions for s in p.severities]
        correct = np.zeros((len(conditions), len(indices)), dtype=bool)
        non_finite = np.zeros(len(conditions), dtype=np.int64)
        log.info(
            "corruption: %d images, %d corruptions x %d severities on %s",
            len(indices),
            len(p.corruptions),
            len(p.severities),
            ctx.device,
        )

        for start in range(0, len(indices), p.batch_size):
            stop = min(start + p.batch_size, len(indices))
            images = ctx.images("eval", indices[start:stop]).to(ctx.device)
            for name in p.corruptions:
                seeds = [stable_seed(seed_root, name, int(r)) for r in manifest_rows[start:stop]]
                draw = draw_randomness(name, tuple(images.shape), seeds)
                for severity in p.severities:
                    corrupted = apply_corruption(images, name, severity, draw=draw)
                    logits = ctx.model.predict(corrupted, label=f"corruption:{name}:{severity}")
                    row = conditions.index((name, severity))
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
            name: {s: float(correct[conditions.index((name, s))].mean()) for s in p.severities}
            for name in p.corruptions
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
    for name in p.corruptions:
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
            "corruptions": {
                name: {
                    "physics": CORRUPTIONS[name].physics,
                    "parameter": CORRUPTIONS[name].parameter,
                    "levels": {str(s): CORRUPTIONS[name].level(s) for s in p.severities},
                }
                for name in p.corruptions
            },
        },
    ]
