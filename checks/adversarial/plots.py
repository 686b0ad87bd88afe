"""Robust accuracy against the perturbation budget, as a byte-reproducible SVG."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auditkit.checks.adversarial.attacks import ATTACKS, eps_label
from auditkit.plotting import figure_style, fixed_ticks, inch_margins, legend_columns, save_svg, text_width

__all__ = ["robust_accuracy_plot"]

_COLOURS = {
    "fgsm": "#dd8452",
    "pgd_linf": "#4c72b0",
    "pgd_l2": "#4c72b0",
    "cw_l2": "#8172b3",
    "square": "#55a868",
    "autoattack": "#c44e52",
}
_FONT_SIZE = 9.0
_ACCURACY_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Geometry in inches, matplotlib's paddings in points.
_OUTER_INCHES = 0.08
_RIGHT_INCHES = 0.25
_GAP_INCHES = 0.3
_TITLE_LINE_INCHES = 1.2 * _FONT_SIZE * 1.25 / 72.0
"""A line of the suptitle or of a panel title (matplotlib draws both 1.2 times the font size)."""
_TICK_POINTS = 3.5
_TICK_PAD_POINTS = 3.5
_LABEL_PAD_POINTS = 4.0
_TITLE_PAD_POINTS = 6.0


def robust_accuracy_plot(
    curves: Mapping[str, Mapping[float, float]],
    clean_accuracy: float,
    path: str | Path,
    *,
    n: int,
    cis: Mapping[tuple[str, float], tuple[float, float] | None] | None = None,
    metric: str = "accuracy",
    bounded: bool = True,
) -> Path:
    """Draw robust accuracy against epsilon, one line per attack, one panel per norm.

    Args:
        curves: attack -> {eps: robust accuracy}; attacks named in :data:`ATTACKS`.
        clean_accuracy: accuracy without perturbation (a dashed line).
        path: the SVG to write (its folder must exist).
        n: the sample size, for the title.
        cis: optional (attack, eps) -> 95% interval, drawn as error bars.
        metric: what the curves measure, for the axis and title (``macro AUROC`` for a
            multi-label model, ``MAE (unit)`` for a regressor).
        bounded: the metric lies in ``[0, 1]`` (fixed axis); ``False`` scales the axis from 0
            to the largest value drawn.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no curve to draw, or an unknown attack.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    unknown = sorted(set(curves) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; expected names from {sorted(ATTACKS)}")
    norms = [norm for norm in ("Linf", "L2") if any(ATTACKS[a].norm == norm for a in curves)]
    if not norms or not any(curves.values()):
        raise ValueError("nothing to draw: no attack has a robust accuracy")
    grids = {norm: sorted({e for a, c in curves.items() if ATTACKS[a].norm == norm for e in c}) for norm in norms}
    title = f"Robust {metric} against perturbation budget (n = {n})"
    # Wide enough for the suptitle (drawn at 1.2 times the font size) when the metric's name is long.
    width = max(4.0 * len(norms) + 1.0, text_width(title, 1.2 * _FONT_SIZE) + 2 * _OUTER_INCHES + 0.2)
    # The legend's entries in drawing order: each panel's attacks, the clean line after the first.
    entries = [a for a, c in curves.items() if ATTACKS[a].norm == norms[0] and c]
    entries += ["clean", *(a for a, c in curves.items() if len(norms) > 1 and ATTACKS[a].norm == norms[1] and c)]
    legend_ncols = legend_columns(entries, _FONT_SIZE, width - 2 * _OUTER_INCHES)
    legend_height = (1.75 * math.ceil(len(entries) / legend_ncols) + 0.8) * _FONT_SIZE / 72.0

    # Fixed margins in inches from the labels known here (constrained layout measured every
    # tick label of both panels twice and was about half of the drawing time).
    line = _FONT_SIZE * 1.25 / 72.0  # one line of text, descent included
    widest_eps = max((text_width(eps_label(e), _FONT_SIZE) for grid in grids.values() for e in grid), default=0.0)
    tick_room = (_TICK_POINTS + _TICK_PAD_POINTS) / 72.0
    # Tick labels turned by 45 degrees: their height is (width + line) / sqrt(2).
    below_axes = tick_room + (widest_eps + line) / math.sqrt(2.0) + _LABEL_PAD_POINTS / 72.0 + line
    bottom = _OUTER_INCHES + legend_height + below_axes
    y_ticks, y_format, y_limits = _value_axis(curves, clean_accuracy, cis, bounded)
    widest_tick = max(text_width(y_format.format(v), _FONT_SIZE) for v in y_ticks)
    beside_axes = tick_room + widest_tick + _LABEL_PAD_POINTS / 72.0 + line
    left = _OUTER_INCHES + beside_axes
    top = _OUTER_INCHES + 2 * _TITLE_LINE_INCHES + _TITLE_PAD_POINTS / 72.0 + 0.1
    height = 3.7 + legend_height
    panel_width = (width - left - _RIGHT_INCHES - (len(norms) - 1) * (beside_axes + _GAP_INCHES)) / len(norms)

    with figure_style("robust-accuracy", hashsalt="auditkit-adversarial", font_size=_FONT_SIZE):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(
            1,
            len(norms),
            squeeze=False,
            gridspec_kw={
                **inch_margins(width, height, left=left, right=_RIGHT_INCHES, top=top, bottom=bottom),
                "wspace": (beside_axes + _GAP_INCHES) / panel_width,
            },
        )[0]
        handles: dict[str, Any] = {}
        for axis, norm in zip(axes, norms, strict=True):
            for attack, curve in curves.items():
                if ATTACKS[attack].norm != norm or not curve:
                    continue
                eps = sorted(curve)
                accuracy = [curve[e] for e in eps]
                colour = _COLOURS[attack]
                style = "--" if attack == "fgsm" else "-"
                (handles[attack],) = axis.plot(
                    eps,
                    accuracy,
                    marker="o",
                    markersize=3.5,
                    linestyle=style,
                    color=colour,
                    label=attack,
                )
                intervals = [(cis or {}).get((attack, e)) for e in eps]
                if all(ci is not None for ci in intervals):
                    lower = [a - ci[0] for a, ci in zip(accuracy, intervals, strict=True) if ci]
                    upper = [ci[1] - a for a, ci in zip(accuracy, intervals, strict=True) if ci]
                    axis.errorbar(
                        eps,
                        accuracy,
                        yerr=[[max(v, 0.0) for v in lower], [max(v, 0.0) for v in upper]],
                        fmt="none",
                        ecolor=colour,
                        elinewidth=0.8,
                        capsize=2.0,
                    )
            handles["clean"] = axis.axhline(clean_accuracy, color="0.4", linestyle=":", linewidth=1.0, label="clean")
            axis.set_xscale("log")
            # Ticks at the budgets measured, labelled as the metrics label them; no minor ticks
            # (unlabelled, and each one a tick's five artists).
            grid = grids[norm]
            axis.set_xticks(grid, [eps_label(e) for e in grid], rotation=45)
            axis.xaxis.set_minor_locator(NullLocator())
            if grid:  # the limits autoscaling would give: 5% margins in log space
                low, high = math.log10(grid[0]), math.log10(grid[-1])
                margin = 0.05 * (high - low) if high > low else 0.1
                axis.set_xlim(10 ** (low - margin), 10 ** (high + margin))
            axis.set_ylim(*y_limits)
            fixed_ticks(axis.yaxis, y_ticks, y_format)
            axis.set_xlabel(f"eps ({'L-infinity' if norm == 'Linf' else 'L2'}, [0, 1] units)")
            axis.set_ylabel(f"robust {metric}")
            axis.set_title(f"{'L-infinity' if norm == 'Linf' else 'L2'} attacks")
        # One legend below the panels, away from the curves (inside a panel it covered them).
        fig.legend(
            [handles[entry] for entry in entries],
            entries,
            loc="lower center",
            ncols=legend_ncols,
            frameon=False,
            borderaxespad=0.2,
        )
        fig.suptitle(title, y=1.0 - _OUTER_INCHES / height, va="top")
        return save_svg(fig, path)


def _value_axis(
    curves: Mapping[str, Mapping[float, float]],
    clean: float,
    cis: Mapping[tuple[str, float], tuple[float, float] | None] | None,
    bounded: bool,
) -> tuple[list[float], str, tuple[float, float]]:
    """Ticks, their format and the limits of the value axis: ``[0, 1]`` or ``[0, largest value]``."""
    if bounded:
        return list(_ACCURACY_TICKS), "{:.1f}", (-0.02, 1.02)
    from matplotlib.ticker import MaxNLocator

    values = [clean, *(v for c in curves.values() for v in c.values())]
    values += [ci[1] for ci in (cis or {}).values() if ci is not None]
    finite = [v for v in values if math.isfinite(v)]
    top = max([*finite, 0.0])
    top = top if top > 0 else 1.0
    ticks = [float(v) for v in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(0.0, top)]
    high = max(ticks[-1], top)
    return [t for t in ticks if 0.0 <= t <= high], "{:g}", (-0.02 * high, 1.02 * high)
