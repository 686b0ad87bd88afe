"""Plots of the OOD check: score histograms and ROC curves, as byte-reproducible SVGs."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["roc_curves", "score_histograms"]

FloatArray = NDArray[np.float64]
ScoresByDetector = Mapping[str, FloatArray]
OutScores = Mapping[str, Mapping[str, FloatArray]]

_IN_COLOUR = "#4c72b0"
_PALETTE = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")


_LEGEND_INCHES = 0.45
"""Height reserved below the panels for the shared legend."""


@contextmanager
def _figure(n_panels: int, salt: str) -> Iterator[tuple[Figure, list[Axes]]]:
    import matplotlib
    from matplotlib.figure import Figure

    columns = min(3, max(1, n_panels))
    rows = max(1, math.ceil(n_panels / columns))
    # A fixed hash salt and id make the SVG's internal ids, hence its bytes, reproducible.
    with matplotlib.rc_context(
        {
            "svg.hashsalt": f"auditkit-{salt}",
            "svg.id": salt,
            "svg.fonttype": "path",
            "font.family": "DejaVu Sans",
            "font.size": 8.0,
        }
    ):
        width, height = 4.0 * columns, 3.2 * rows + _LEGEND_INCHES
        fig = Figure(figsize=(width, height))
        # Fixed margins in inches instead of constrained layout, which measured every tick label
        # of every panel and was about half of the drawing time.
        grid = fig.subplots(
            rows,
            columns,
            squeeze=False,
            gridspec_kw={
                "left": 0.62 / width,
                "right": 1 - 0.15 / width,
                "top": 1 - 0.55 / height,
                "bottom": (_LEGEND_INCHES + 0.45) / height,
                "wspace": 0.3,
                "hspace": 0.55,
            },
        )
        axes = [ax for row in grid for ax in row]
        for ax in axes[n_panels:]:
            ax.set_visible(False)
        yield fig, axes[:n_panels]


def _finite_for_plot(values: FloatArray, low: float) -> FloatArray:
    """Scores with ``-inf`` (undefined inputs) drawn at the lowest finite value."""
    return np.where(np.isfinite(values), values, low)


MAX_CURVE_POINTS = 400
"""ROC curves with more corners are thinned to about this many points (below a plot's resolution)."""


def _thin_curve(fpr: FloatArray, tpr: FloatArray, max_points: int = MAX_CURVE_POINTS) -> tuple[FloatArray, FloatArray]:
    """Every ``k``-th point of a long curve, its first and last points always kept."""
    if fpr.size <= max_points:
        return fpr, tpr
    keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, max_points).round().astype(np.intp), fpr.size - 1])
    return fpr[keep], tpr[keep]


def _shared_legend(fig: Figure, axes: list[Axes]) -> None:
    """One legend below the panels (every panel shows the same sets in the same colours)."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=min(4, len(handles)), frameon=False, borderaxespad=0.2)


def score_histograms(
    in_scores: ScoresByDetector,
    out_scores: OutScores,
    thresholds: Mapping[str, float],
    path: str | Path,
    *,
    bins: int = 30,
) -> Path:
    """One panel per detector: score histograms of the in-distribution images and of each set.

    Histograms are normalised to unit area (sets differ in size); the dashed line is the
    detector's threshold at 95% in-distribution TPR (images to its right are accepted).

    Args:
        in_scores: detector -> in-distribution scores.
        out_scores: detector -> OOD set name -> scores.
        thresholds: detector -> threshold (detectors without one get no line).
        path: the SVG file to write (its folder must exist).
        bins: equal-width bins per panel.

    Raises:
        ValueError: no detectors.
    """
    detectors = list(in_scores)
    if not detectors:
        raise ValueError("score_histograms needs at least one detector")
    with _figure(len(detectors), "ood-histograms") as (fig, axes):
        for ax, detector in zip(axes, detectors, strict=True):
            series = [("in-distribution", in_scores[detector], _IN_COLOUR)]
            for i, (name, values) in enumerate(sorted(out_scores.get(detector, {}).items())):
                series.append((name, values, _PALETTE[i % len(_PALETTE)]))
            finite = np.concatenate([v[np.isfinite(v)] for _, v, _ in series])
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if high <= low:
                low, high = low - 0.5, high + 0.5
            edges = np.linspace(low, high, bins + 1)
            for name, values, colour in series:
                if values.size == 0:
                    continue
                # One precomputed histogram drawn as a single step path per set (ax.hist makes
                # one patch per bin, which is what made this figure slow to lay out and write).
                density, _ = np.histogram(_finite_for_plot(values, low), bins=edges, density=True)
                label = name if name == "in-distribution" else f"{name} (n = {values.size})"
                if name == "in-distribution":
                    ax.stairs(density, edges, fill=True, alpha=0.35, color=colour, linewidth=1.2, label=label)
                else:
                    ax.stairs(density, edges, color=colour, linewidth=1.2, label=label)
            if detector in thresholds:
                ax.axvline(
                    thresholds[detector],
                    color="0.2",
                    linestyle="--",
                    linewidth=1.0,
                    label="95% TPR threshold",
                )
            ax.set_title(f"{detector} (in-distribution n = {in_scores[detector].size})")
            ax.set_xlabel("score (higher = more in-distribution)")
            ax.set_ylabel("density")
        _shared_legend(fig, axes)
        fig.suptitle("Out-of-distribution scores")
        out = Path(path)
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out


def roc_curves(in_scores: ScoresByDetector, out_scores: OutScores, path: str | Path) -> Path:
    """One panel per detector: the ROC curve against each OOD set.

    The x axis is the share of OOD images accepted (FPR), the y axis the share of
    in-distribution images accepted (TPR); the dotted line marks 95% TPR. The AUROC values are
    the check's metrics, not repeated here.

    Args:
        in_scores: detector -> in-distribution scores.
        out_scores: detector -> OOD set name -> scores.
        path: the SVG file to write (its folder must exist).

    Raises:
        ValueError: no detectors.
    """
    from sklearn.metrics import roc_curve

    detectors = list(in_scores)
    if not detectors:
        raise ValueError("roc_curves needs at least one detector")
    with _figure(len(detectors), "ood-roc") as (fig, axes):
        for ax, detector in zip(axes, detectors, strict=True):
            s_in = in_scores[detector]
            for i, (name, s_out) in enumerate(sorted(out_scores.get(detector, {}).items())):
                if s_in.size == 0 or s_out.size == 0:
                    continue
                combined = np.r_[s_in, s_out]
                finite = combined[np.isfinite(combined)]
                floor = (float(finite.min()) if finite.size else 0.0) - 1.0
                y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
                scores = _finite_for_plot(combined, floor)
                # drop_intermediate keeps every corner of the curve (it removes collinear points only).
                fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=True)
                fpr, tpr = _thin_curve(fpr, tpr)
                ax.plot(fpr, tpr, color=_PALETTE[i % len(_PALETTE)], linewidth=1.2, label=name)
            ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=0.8)
            ax.axhline(0.95, linestyle=":", color="0.3", linewidth=0.8)
            ax.set_xlim(0.0, 1.0)
            ax.set_ylim(0.0, 1.01)
            ax.set_title(detector)
            ax.set_xlabel("OOD images accepted (FPR)")
            ax.set_ylabel("in-distribution images accepted (TPR)")
        _shared_legend(fig, axes)
        fig.suptitle("ROC curves: in-distribution against each OOD set")
        out = Path(path)
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out
