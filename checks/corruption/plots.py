"""Accuracy against corruption severity, as a byte-reproducible SVG."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from auditkit.plotting import figure_style, fixed_ticks, inch_margins, range_ticks, save_svg, text_width

__all__ = ["severity_plot"]

_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*")
# Tableau 10 and one more: fixed colours keep the SVG identical across matplotlib styles.
_COLOURS = (
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
    "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#2f4f4f",
)  # fmt: skip
_FONT_SIZE = 9.0
_ACCURACY_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Geometry in inches: the y tick labels and label on the left, the title on top, the x tick
# labels and label below; the legend's width is added on the right.
_WIDTH, _HEIGHT = 7.5, 4.5
_OUTER_INCHES = 0.08
_LEFT_INCHES = 0.62
_TOP_INCHES = 0.4
_BOTTOM_INCHES = 0.5


def severity_plot(
    curves: Mapping[str, Mapping[int, float]],
    clean_accuracy: float,
    path: str | Path,
    *,
    n: int,
    metric: str = "accuracy",
    bounded: bool = True,
) -> Path:
    """Draw accuracy against severity, one line per corruption, starting from the clean accuracy.

    Args:
        curves: corruption -> {severity (1..5): accuracy}.
        clean_accuracy: accuracy at severity 0 (the shared clean predictions).
        path: the SVG to write (its folder must exist).
        n: the sample size, for the title.
        metric: what the curves measure, for the axis and title (``macro AUROC`` for a
            multi-label model, ``MAE (unit)`` for a regressor).
        bounded: the metric lies in ``[0, 1]`` (fixed axis); ``False`` scales the axis from 0
            to the largest value drawn.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no curve to draw.
    """
    from matplotlib.figure import Figure

    if not curves or not any(curves.values()):
        raise ValueError("nothing to draw: no corruption has an accuracy")
    # Fixed margins in inches, the right one from the legend's widest name (constrained layout
    # measured every label again and was most of the drawing time).
    em = _FONT_SIZE / 72.0
    legend_width = max(text_width(name, _FONT_SIZE) for name in [*curves, "clean"]) + 2.0 * em + 0.8 * em + 0.8 * em
    right = _OUTER_INCHES + legend_width + 0.1
    with figure_style("corruption-accuracy", hashsalt="auditkit-corruption", font_size=_FONT_SIZE):
        fig = Figure(figsize=(_WIDTH, _HEIGHT))
        axis = fig.subplots(
            gridspec_kw=inch_margins(
                _WIDTH, _HEIGHT, left=_LEFT_INCHES, right=right, top=_TOP_INCHES, bottom=_BOTTOM_INCHES
            )
        )
        for i, (name, curve) in enumerate(curves.items()):
            severities = [0, *sorted(curve)]
            accuracy = [clean_accuracy, *(curve[s] for s in sorted(curve))]
            axis.plot(
                severities,
                accuracy,
                marker=_MARKERS[i % len(_MARKERS)],
                markersize=4.0,
                linewidth=1.2,
                color=_COLOURS[i % len(_COLOURS)],
                label=name,
            )
        axis.axhline(clean_accuracy, color="0.4", linestyle=":", linewidth=1.0, label="clean")
        fixed_ticks(axis.xaxis, range(0, 6), "{:d}")
        if bounded:
            fixed_ticks(axis.yaxis, _ACCURACY_TICKS)
            axis.set_xlim(-0.2, 5.2)
            axis.set_ylim(-0.02, 1.02)
        else:
            finite = [
                v for v in (clean_accuracy, *(v for c in curves.values() for v in c.values())) if math.isfinite(v)
            ]
            top = max([*finite, 0.0]) or 1.0
            axis.set_xlim(-0.2, 5.2)
            axis.set_ylim(-0.02 * top, 1.02 * top)
            range_ticks(axis.yaxis, 0.0, 1.02 * top)
        axis.set_xlabel("severity (0 = clean)")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric[:1].upper()}{metric[1:]} under acquisition shift (n = {n})")
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        return save_svg(fig, path)
