"""ROC and precision-recall curves with the operating point marked, Bland-Altman plots of a
regression model's outputs and overlays of a segmentation model's worst cases, as reproducible
SVGs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import precision_recall_curve, roc_curve

from auditkit.plotting import figure_style, fixed_ticks, inch_margins, range_ticks, save_svg

if TYPE_CHECKING:
    from auditkit.checks.performance.regression import BlandAltman

_UNIT_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
MANY_STYLES = ("-", "--", ":", "-.")
"""Line styles that tell apart more curves than there are colours (the i-th set of eight)."""


def roc_pr_figure(
    curves: Sequence[tuple[str, NDArray[np.bool_], NDArray[np.float64], tuple[float, float, float] | None]],
    path: str | Path,
    *,
    line_styles: Sequence[str] = ("-",),
) -> Path:
    """ROC (left) and precision-recall (right) curves, one line per class.

    Args:
        curves: per class ``(name, truth, score, point)``: whether each image is of the class, its
            score for it, and the operating point as ``(sensitivity, specificity, ppv)`` (``None``
            to leave it unmarked). Classes whose truth is all one value are left out.
        path: the SVG file to write (its folder must exist).
        line_styles: the line style of each successive set of as many curves as there are
            colours (cycled), so that more curves than colours stay told apart.
    """
    from matplotlib.figure import Figure

    drawable = [c for c in curves if c[1].any() and not c[1].all()]
    if not drawable:
        raise ValueError("no class has both positive and negative images: nothing to draw")
    with figure_style("roc-pr-curves", hashsalt="auditkit-performance", font_size=9.0):
        fig = Figure(figsize=(8.0, 4.0))
        roc, pr = fig.subplots(
            1, 2, gridspec_kw={**inch_margins(8.0, 4.0, left=0.7, right=0.2, top=0.4, bottom=0.9), "wspace": 0.3}
        )
        for i, (name, truth, score, point) in enumerate(drawable):
            colour = _COLOURS[i % len(_COLOURS)]
            style = line_styles[(i // len(_COLOURS)) % len(line_styles)]
            fpr, tpr, _ = roc_curve(truth, score)
            precision, recall, _ = precision_recall_curve(truth, score)
            roc.plot(fpr, tpr, color=colour, linewidth=1.2, linestyle=style, label=name)
            pr.step(recall, precision, where="post", color=colour, linewidth=1.2, linestyle=style, label=name)
            if point is not None and all(np.isfinite(point)):
                sensitivity, specificity, ppv = point
                roc.plot([1.0 - specificity], [sensitivity], marker="o", color=colour, markersize=5)
                pr.plot([sensitivity], [ppv], marker="o", color=colour, markersize=5)
        roc.plot([0.0, 1.0], [0.0, 1.0], color="#999999", linewidth=0.8, linestyle=":")
        roc.set_title("ROC (dot: operating point)")
        roc.set_xlabel("1 - specificity")
        roc.set_ylabel("sensitivity")
        pr.set_title("Precision-recall")
        pr.set_xlabel("recall (sensitivity)")
        pr.set_ylabel("precision (PPV)")
        for axes in (roc, pr):
            axes.set_xlim(0.0, 1.0)
            axes.set_ylim(0.0, 1.02)
            fixed_ticks(axes.xaxis, _UNIT_TICKS)
            fixed_ticks(axes.yaxis, _UNIT_TICKS)
        roc.legend(loc="lower right", frameon=False, fontsize=8)
        return save_svg(fig, path)


def bland_altman_figure(
    panels: Sequence[tuple[str, NDArray[np.float64], NDArray[np.float64], str | None, BlandAltman]],
    path: str | Path,
) -> Path:
    """Bland-Altman plots (Bland and Altman, Lancet 1986), one panel per output.

    Each image is a dot at (mean of prediction and target, prediction - target); the solid line is
    the mean difference (the bias), the dashed lines the 95% limits of agreement.

    Args:
        panels: per output ``(name, predicted, target, unit, agreement)``; ``unit`` labels the
            axes (``None``: no unit given).
        path: the SVG file to write (its folder must exist).
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("no output to draw")
    width, row = 6.0, 3.2
    height = row * len(panels)
    with figure_style("bland-altman", hashsalt="auditkit-performance", font_size=9.0):
        fig = Figure(figsize=(width, height))
        grid = inch_margins(width, height, left=0.9, right=1.9, top=0.4, bottom=0.6)
        axes_list = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={**grid, "hspace": 0.55})[:, 0]
        for axes, (name, predicted, target, unit, agreement) in zip(axes_list, panels, strict=True):
            suffix = f" ({unit})" if unit else ""
            mean = (predicted + target) / 2.0
            difference = predicted - target
            axes.scatter(mean, difference, s=6, color=_COLOURS[0], alpha=0.6, linewidths=0)
            lines = (
                (agreement.mean_difference, "-", f"mean difference: {agreement.mean_difference:.3g}"),
                (agreement.upper_limit, "--", f"mean + 1.96 SD: {agreement.upper_limit:.3g}"),
                (agreement.lower_limit, "--", f"mean - 1.96 SD: {agreement.lower_limit:.3g}"),
            )
            for level, style, text in lines:
                axes.axhline(level, color=_COLOURS[3], linestyle=style, linewidth=1.0, label=text)
            axes.axhline(0.0, color="#999999", linewidth=0.8, linestyle=":")
            x_low, x_high = _padded(float(mean.min()), float(mean.max()))
            levels = [agreement.lower_limit, agreement.upper_limit, 0.0]
            y_low, y_high = _padded(min(float(difference.min()), *levels), max(float(difference.max()), *levels))
            axes.set_xlim(x_low, x_high)
            axes.set_ylim(y_low, y_high)
            range_ticks(axes.xaxis, x_low, x_high)
            range_ticks(axes.yaxis, y_low, y_high)
            axes.set_title(f"{name}: Bland-Altman", loc="left")
            axes.set_xlabel(f"mean of prediction and target{suffix}")
            axes.set_ylabel(f"prediction - target{suffix}")
            axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
        return save_svg(fig, path)


def _padded(low: float, high: float) -> tuple[float, float]:
    """A plot range around ``[low, high]`` with 5% room each side (a unit around a single value)."""
    span = high - low
    pad = 0.05 * span if span > 0 else max(abs(low), 1.0) * 0.5
    return low - pad, high + pad


@dataclass(frozen=True)
class OverlayPanel:
    """One case of :func:`overlay_figure`: a 2-D view with the class's reference and prediction.

    Attributes:
        class_name: the foreground class drawn.
        title: the panel's title (manifest row and figures; never a patient identifier).
        image: ``(H, W)`` grey or ``(H, W, 3)`` RGB in [0, 1].
        reference: ``(H, W)`` bool, the class in the reference.
        predicted: ``(H, W)`` bool, the class in the model's arg-max map.
    """

    class_name: str
    title: str
    image: NDArray[np.float32]
    reference: NDArray[np.bool_]
    predicted: NDArray[np.bool_]


_REFERENCE_COLOUR = "#1b9e77"
_PREDICTED_COLOUR = "#d95f02"


def overlay_figure(panels: Sequence[Sequence[OverlayPanel]], path: str | Path) -> Path:
    """A grid of cases, one row per class: the image with the reference outlined in green and the
    prediction in orange (colour-blind safe; a solid and a dashed line).

    Args:
        panels: per class, its cases left to right (rows may be of different lengths).
        path: the SVG file to write (its folder must exist).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [row for row in panels if row]
    if not rows:
        raise ValueError("no case to draw")
    columns = max(len(row) for row in rows)
    side = 2.1
    width, height = side * columns + 0.4, side * len(rows) + 0.9
    with figure_style("worst-case-overlays", hashsalt="auditkit-performance", font_size=8.0):
        fig = Figure(figsize=(width, height))
        grid = inch_margins(width, height, left=0.2, right=0.2, top=0.35, bottom=0.55)
        axes = fig.subplots(len(rows), columns, squeeze=False, gridspec_kw={**grid, "hspace": 0.35, "wspace": 0.08})
        for r, row in enumerate(rows):
            for c in range(columns):
                ax = axes[r, c]
                ax.set_axis_off()
                if c >= len(row):
                    continue
                panel = row[c]
                image = np.clip(panel.image, 0.0, 1.0)
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
                for mask, colour, style in (
                    (panel.reference, _REFERENCE_COLOUR, "solid"),
                    (panel.predicted, _PREDICTED_COLOUR, "dashed"),
                ):
                    if mask.any() and not mask.all():
                        ax.contour(
                            mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.1, linestyles=style
                        )
                ax.set_title(f"{panel.class_name}: {panel.title}", fontsize=7)
        handles = [
            Line2D([0], [0], color=_REFERENCE_COLOUR, linewidth=1.2, label="reference"),
            Line2D([0], [0], color=_PREDICTED_COLOUR, linewidth=1.2, linestyle="--", label="model"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
        return save_svg(fig, path)
