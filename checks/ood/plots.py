"""Plots of the OOD check: score histograms and ROC curves, as byte-reproducible SVGs."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from auditkit.plotting import figure_style, fixed_ticks, inch_margins, legend_columns, range_ticks, save_svg

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["roc_curves", "score_histograms"]

FloatArray = NDArray[np.float64]
ScoresByDetector = Mapping[str, FloatArray]
OutScores = Mapping[str, Mapping[str, FloatArray]]

_IN_COLOUR = "#4c72b0"
_PALETTE = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")


_FONT_SIZE = 8.0
_RATE_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_LEGEND_INCHES = 0.45
"""Height reserved below the panels for the shared legend, at least (two rows)."""


@contextmanager
def _figure(n_panels: int, salt: str, legend: list[str]) -> Iterator[tuple[Figure, list[Axes], int]]:
    """A figure of ``n_panels`` panels, three a row, and room below them for ``legend``'s entries.

    Yields the figure, its panels and the legend's number of columns (for :func:`_shared_legend`).
    """
    from matplotlib.figure import Figure

    columns = min(3, max(1, n_panels))
    rows = max(1, math.ceil(n_panels / columns))
    width = 4.0 * columns
    legend_columns_ = legend_columns(legend, _FONT_SIZE, width - 0.2, max_columns=4) if legend else 1
    legend_rows = math.ceil(len(legend) / legend_columns_)
    legend_inches = max(_LEGEND_INCHES, (1.75 * legend_rows + 0.8) * _FONT_SIZE / 72.0)
    height = 3.2 * rows + legend_inches
    # A fixed hash salt and id make the SVG's internal ids, hence its bytes, reproducible.
    with figure_style(salt, hashsalt=f"auditkit-{salt}", font_size=_FONT_SIZE):
        fig = Figure(figsize=(width, height))
        # Fixed margins in inches instead of constrained layout, which measured every tick label
        # of every panel and was about half of the drawing time.
        grid = fig.add_gridspec(
            rows,
            columns,
            **inch_margins(width, height, left=0.62, right=0.15, top=0.55, bottom=legend_inches + 0.45),
            wspace=0.3,
            hspace=0.55,
        )
        # Only the panels drawn: an empty last-row slot gets no (hidden) axes.
        yield fig, [fig.add_subplot(grid[i // columns, i % columns]) for i in range(n_panels)], legend_columns_


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


def _shared_legend(fig: Figure, axes: list[Axes], ncols: int) -> None:
    """One legend below the panels (every panel shows the same sets in the same colours)."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=ncols, frameon=False, borderaxespad=0.2)


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
    from matplotlib.patches import StepPatch

    first = detectors[0]  # the legend shows the first panel's entries
    legend = [
        "in-distribution" if i == 0 else f"{name} (n = {values.size})"
        for i, (name, values) in enumerate([("", in_scores[first]), *sorted(out_scores.get(first, {}).items())])
        if values.size
    ]
    legend += ["95% TPR threshold"] if first in thresholds else []
    with _figure(len(detectors), "ood-histograms", legend) as (fig, axes, legend_ncols):
        for ax, detector in zip(axes, detectors, strict=True):
            series = [("in-distribution", in_scores[detector], _IN_COLOUR)]
            for i, (name, values) in enumerate(sorted(out_scores.get(detector, {}).items())):
                series.append((name, values, _PALETTE[i % len(_PALETTE)]))
            finite = np.concatenate([v[np.isfinite(v)] for _, v, _ in series])
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if high <= low:
                low, high = low - 0.5, high + 0.5
            edges = np.linspace(low, high, bins + 1)
            top = 0.0
            for name, values, colour in series:
                if values.size == 0:
                    continue
                # One precomputed histogram drawn as a single step path per set (ax.hist makes
                # one patch per bin), added without autoscaling (which walked every segment of
                # every step path): the limits are known.
                density, _ = np.histogram(_finite_for_plot(values, low), bins=edges, density=True)
                top = max(top, float(density.max()))
                label = name if name == "in-distribution" else f"{name} (n = {values.size})"
                if name == "in-distribution":
                    step = StepPatch(density, edges, fill=True, alpha=0.35, color=colour, linewidth=1.2, label=label)
                else:
                    step = StepPatch(density, edges, fill=False, color=colour, linewidth=1.2, label=label)
                ax.add_artist(step)
            if detector in thresholds:
                threshold = thresholds[detector]
                ax.axvline(threshold, color="0.2", linestyle="--", linewidth=1.0, label="95% TPR threshold")
                if math.isfinite(threshold):
                    low, high = min(low, threshold), max(high, threshold)
            # The limits autoscaling would give: 5% margins, the density axis from 0.
            margin = 0.05 * (high - low)
            x_range = (low - margin, high + margin)
            y_range = (0.0, 1.05 * top if top > 0 else 1.0)
            ax.set_xlim(*x_range)
            ax.set_ylim(*y_range)
            range_ticks(ax.xaxis, *x_range, nbins=8)
            range_ticks(ax.yaxis, *y_range)
            ax.set_title(f"{detector} (in-distribution n = {in_scores[detector].size})")
            ax.set_xlabel("score (higher = more in-distribution)")
            ax.set_ylabel("density")
        _shared_legend(fig, axes, legend_ncols)
        fig.suptitle("Out-of-distribution scores")
        out = save_svg(fig, path)
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
    first = in_scores[detectors[0]]  # the legend shows the first panel's curves
    legend = [name for name, s_out in sorted(out_scores.get(detectors[0], {}).items()) if first.size and s_out.size]
    with _figure(len(detectors), "ood-roc", legend) as (fig, axes, legend_ncols):
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
            fixed_ticks(ax.xaxis, _RATE_TICKS)
            fixed_ticks(ax.yaxis, _RATE_TICKS)
            ax.set_title(detector)
            ax.set_xlabel("OOD images accepted (FPR)")
            ax.set_ylabel("in-distribution images accepted (TPR)")
        _shared_legend(fig, axes, legend_ncols)
        fig.suptitle("ROC curves: in-distribution against each OOD set")
        out = save_svg(fig, path)
    return out
