"""Performance of a segmentation model: Dice, HD95 and normalised surface Dice per class and case.

The per-case figures are MONAI's own (``compute_dice(include_background=False,
ignore_empty=True)``, ``compute_hausdorff_distance(percentile=95, spacing=...)``,
``compute_surface_dice(class_thresholds=..., spacing=...)``): distance metrics differ between
tools by large margins (surface extraction, percentile definition, empty masks), so the check
uses one named implementation and reports its name and version, and a reviewer's MONAI notebook
gives the same numbers. Distances are in millimetres on the model-input grid: each image's pixel
or voxel size (:attr:`auditkit.check.SplitRows.spacing`) is passed per case.

Empty cases, as MONAI handles them and counted, never silently averaged: a case whose reference
holds no pixel of a class has no Dice for it (NaN, left out of the mean; counted as
``empty_reference``, and among them those the model nevertheless segmented as
``false_positive_on_empty``); HD95 is undefined when either side is empty (a class the model
missed entirely on a case with a reference is counted as ``missed``, the worst error HD95 cannot
show, and its Dice of 0 is in the mean); NSD is 0 when exactly one side is empty and undefined
when both are.

A class's figure is the mean over its defined cases, with a median-centred percentile bootstrap
interval over patients (cases when patients are unknown), one matrix of resampled patients for
every class and figure; ``performance.mean_dice`` is the mean of the classes' mean Dice, from the
same replicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from auditkit.check import CheckResult, Metric
from auditkit.checks.performance.claims import ClaimTarget, judge_claims
from auditkit.checks.performance.metrics import cluster_weights
from auditkit.segmentation import case_figures, implementation
from auditkit.stats import median_centred_interval
from auditkit.tasks import mean_dice as task_mean_dice

if TYPE_CHECKING:
    from auditkit.check import CheckContext
    from auditkit.checks.performance.plots import OverlayPanel

__all__ = ["SEGMENTATION", "measure_segmentation"]

SEGMENTATION = ("dice", "hd95", "nsd", "mean_dice")
_DIRECTIONS: dict[str, Literal["higher_is_better", "lower_is_better"]] = {
    "dice": "higher_is_better",
    "hd95": "lower_is_better",
    "nsd": "higher_is_better",
}
WORST_CASES = 5


def _weighted_means(values: NDArray[np.float64], weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per replicate and class, the mean of the defined cases: ``(B, K - 1)``."""
    defined = np.isfinite(values)
    sums = weights @ np.where(defined, values, 0.0)
    counts = weights @ defined.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)


def _nanmean(values: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
    defined = np.isfinite(values)
    counts = defined.sum(axis=axis)
    sums = np.where(defined, values, 0.0).sum(axis=axis)
    return np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)


def measure_segmentation(
    ctx: CheckContext,
    n_boot: int,
    tolerances: Sequence[float],
    patients: NDArray[Any],
    result: CheckResult,
    overlay_cases: int = 0,
) -> None:
    """Score the eval split's arg-max maps against the reference maps and append the metrics; with
    ``overlay_cases``, draw that many worst cases of each class over their images."""
    preds = ctx.predictions("eval")
    split = ctx.split("eval")
    classes = list(ctx.classes)
    foreground = classes[1:]
    reference = np.asarray(preds.labels)
    predicted = preds.predicted
    spacing = split.spacing if split.spacing is not None else np.ones((preds.n, reference.ndim - 1))
    figures = case_figures(predicted, reference, spacing, len(classes), tolerances)
    dice = figures["dice"]
    means = {name: _nanmean(values, axis=0) for name, values in figures.items()}
    overall = task_mean_dice(dice)  # the mean of the classes' mean Dice, as every check computes it
    mean_dice = float("nan") if overall is None else overall

    replicates: dict[str, list[NDArray[np.float64]]] = {name: [] for name in figures}
    mean_dice_replicates: list[NDArray[np.float64]] = []
    if n_boot and preds.n >= 2:
        for weights in cluster_weights(patients, n_boot, ctx.rng()):
            for name, values in figures.items():
                block = _weighted_means(values, weights)
                replicates[name].append(block)
                if name == "dice":
                    mean_dice_replicates.append(_nanmean(block, axis=1))

    def interval(name: str, k: int, estimate: float) -> tuple[float, float] | None:
        if not replicates[name] or not np.isfinite(estimate):
            return None
        values = np.concatenate([block[:, k] for block in replicates[name]])
        return median_centred_interval(values, estimate, bounds=(0.0, 1.0) if name != "hd95" else None)

    reference_present = np.stack(
        [(reference == k).reshape(preds.n, -1).any(axis=1) for k in range(1, len(classes))], axis=1
    )
    predicted_present = np.stack(
        [(predicted == k).reshape(preds.n, -1).any(axis=1) for k in range(1, len(classes))], axis=1
    )
    estimates: dict[tuple[str, str], tuple[float, tuple[float, float] | None]] = {}
    for k, name in enumerate(foreground):
        n_reference = int(reference_present[:, k].sum())
        for figure in ("dice", "hd95", "nsd"):
            value = float(means[figure][k])
            ci = interval(figure, k, value)
            estimates[figure, name] = (value, ci)
            n_defined = int(np.isfinite(figures[figure][:, k]).sum())
            reason = None
            if not np.isfinite(value):
                reason = _undefined_reason(figure, name, n_reference, int(predicted_present[:, k].sum()))
            result.metrics.append(
                Metric(
                    f"performance.{figure}",
                    value if np.isfinite(value) else None,
                    _DIRECTIONS[figure],
                    labels={"class": name},
                    ci=ci,
                    n=n_defined,
                    reason=reason,
                )
            )
    mean_ci = None
    if mean_dice_replicates and np.isfinite(mean_dice):
        mean_ci = median_centred_interval(np.concatenate(mean_dice_replicates), mean_dice, bounds=(0.0, 1.0))
    result.metrics.append(
        Metric(
            "performance.mean_dice",
            mean_dice if np.isfinite(mean_dice) else None,
            "higher_is_better",
            ci=mean_ci,
            n=preds.n,
            reason=None if np.isfinite(mean_dice) else "no class has a reference in any eval case",
        )
    )
    estimates["mean_dice", ""] = (mean_dice, mean_ci)

    result.findings.append(_case_counts(foreground, reference_present, predicted_present, figures))
    result.findings += _worst_cases(foreground, dice, split.rows, np.asarray(split.patients, dtype=object))
    if overlay_cases:
        panels = _overlay_panels(ctx, foreground, dice, predicted, reference, split.rows, overlay_cases)
        if any(panels):
            from auditkit.checks.performance.plots import overlay_figure

            result.artifacts.append(
                ctx.write_artifact(
                    "worst_case_overlays",
                    "worst_case_overlays.svg",
                    lambda path: overlay_figure(panels, path),
                    description=(
                        f"The {overlay_cases} eval cases with the lowest Dice of each class (one row per class):"
                        " the image (a volume: its slice holding most of the class's reference), the reference"
                        " outlined solid green, the model's prediction dashed orange; titled by manifest row"
                        " and Dice, never by a patient identifier (overlay_cases: 0 leaves the images out)."
                    ),
                )
            )
    result.findings.append(
        {
            "kind": "segmentation_metrics",
            "implementation": implementation(),
            "nsd_tolerance_mm": {name: float(t) for name, t in zip(foreground, tolerances, strict=True)},
            "spacing": "per case, mm on the model-input grid" if split.spacing is not None else "1 per pixel",
            "mean_dice": "mean over the foreground classes of each class's mean Dice",
        }
    )
    result.metrics += judge_claims(_claim_targets(ctx.claims, estimates), result)


def _undefined_reason(figure: str, name: str, n_reference: int, n_predicted: int) -> str:
    if n_reference == 0 and figure in ("dice", "hd95"):
        return f"undefined for {name}: no eval case has it in its reference"
    if figure == "hd95":
        return f"undefined for {name}: the model segmented it in no case that has it in its reference"
    return f"undefined for {name}: neither the reference nor the model has it in any eval case"


def _case_counts(
    foreground: Sequence[str],
    reference_present: NDArray[np.bool_],
    predicted_present: NDArray[np.bool_],
    figures: dict[str, NDArray[np.float64]],
) -> dict[str, Any]:
    per_class = {}
    for k, name in enumerate(foreground):
        ref, pred = reference_present[:, k], predicted_present[:, k]
        per_class[name] = {
            "cases_with_reference": int(ref.sum()),
            "empty_reference": int((~ref).sum()),
            "false_positive_on_empty": int((~ref & pred).sum()),
            "missed": int((ref & ~pred).sum()),
            "dice_defined": int(np.isfinite(figures["dice"][:, k]).sum()),
            "hd95_defined": int(np.isfinite(figures["hd95"][:, k]).sum()),
            "nsd_defined": int(np.isfinite(figures["nsd"][:, k]).sum()),
        }
    return {
        "kind": "case_counts",
        "classes": per_class,
        "note": (
            "empty_reference: no Dice (left out of the mean, as MONAI's DiceMetric with ignore_empty);"
            " missed: no HD95 (nothing to measure a distance from), Dice 0 in the mean"
        ),
    }


def _worst_cases(
    foreground: Sequence[str], dice: NDArray[np.float64], rows: NDArray[np.int64], patients: NDArray[Any]
) -> list[dict[str, Any]]:
    out = []
    for k, name in enumerate(foreground):
        defined = np.flatnonzero(np.isfinite(dice[:, k]))
        worst = defined[np.argsort(dice[defined, k], kind="stable")[:WORST_CASES]]
        out.append(
            {
                "kind": "worst_cases",
                "class": name,
                "cases": [
                    {"row": int(rows[i]), "patient": patients[i], "dice": round(float(dice[i, k]), 6)} for i in worst
                ],
            }
        )
    return out


def _overlay_panels(
    ctx: CheckContext,
    foreground: Sequence[str],
    dice: NDArray[np.float64],
    predicted: NDArray[Any],
    reference: NDArray[Any],
    rows: NDArray[np.int64],
    count: int,
) -> list[list[OverlayPanel]]:
    """Per class, its ``count`` lowest-Dice cases as 2-D views (a volume's slice with most reference
    voxels of the class, where the Dice is decided)."""
    from auditkit.checks.performance.plots import OverlayPanel

    out: list[list[OverlayPanel]] = []
    for k, name in enumerate(foreground):
        defined = np.flatnonzero(np.isfinite(dice[:, k]))
        worst = defined[np.argsort(dice[defined, k], kind="stable")[:count]]
        images = ctx.images("eval", worst).numpy() if worst.size else None
        if images is not None and images.shape[2:] != reference.shape[1:]:
            return []  # no image on the maps' grid to draw on (an in-memory context without pixels)
        panels = []
        for j, i in enumerate(worst):
            assert images is not None
            image, ref, pred = images[j], reference[i] == k + 1, predicted[i] == k + 1
            where = ""
            if ref.ndim == 3:  # a volume: the slice with most reference voxels (Dice is defined: some)
                z = int(ref.reshape(ref.shape[0], -1).sum(axis=1).argmax())
                image, ref, pred, where = image[:, z], ref[z], pred[z], f", slice {z}"
            view = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image.mean(axis=0)
            panels.append(
                OverlayPanel(
                    name,
                    f"row {int(rows[i])}, Dice {float(dice[i, k]):.2f}{where}",
                    np.asarray(view, dtype=np.float32),
                    np.asarray(ref, dtype=bool),
                    np.asarray(pred, dtype=bool),
                )
            )
        out.append(panels)
    return out


def _claim_targets(
    claims: dict[str, Any], estimates: dict[tuple[str, str], tuple[float, tuple[float, float] | None]]
) -> list[ClaimTarget]:
    targets = []
    for metric, claimed in claims.items():
        figure = metric.removeprefix("performance.")
        items = claimed.items() if isinstance(claimed, dict) else [("", claimed)]
        for name, number in items:
            value, ci = estimates.get((figure, name), (float("nan"), None))
            targets.append(
                ClaimTarget(
                    metric,
                    float(number),
                    value,
                    ci,
                    subject={"class": name} if name else {},
                    lower_is_better=figure == "hd95",
                )
            )
    return targets
