"""The forest plot of per-group metrics with their intervals, as a byte-reproducible SVG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from auditkit.checks.bias.gaps import GroupingAnalysis
from auditkit.checks.bias.metrics import count_text
from auditkit.plotting import figure_style, fixed_ticks, inch_margins, save_svg, text_width

__all__ = ["FOREST_METRICS", "forest_plot"]

FOREST_METRICS: tuple[str, ...] = ("sensitivity", "specificity", "auroc", "ece")
"""Metrics drawn as panels of the forest plot, left to right."""

_TITLES = {
    "accuracy": "accuracy",
    "sensitivity": "sensitivity (TPR)",
    "specificity": "specificity (TNR)",
    "ppv": "PPV",
    "npv": "NPV",
    "selection_rate": "selection rate",
    "auroc": "AUROC",
    "ece": "ECE (lower is better)",
}
_POINT = "#4c72b0"
_MUTED = "0.55"
_FONT_SIZE = 8.0
_SUPTITLE = "Per-group metrics with 95% bootstrap intervals (dashed: whole eval split)"
_SUPTITLE_SIZE = 9.0
_X_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Geometry in inches (label pad in points, as matplotlib's tick pad).
_ROW_INCHES = 0.22
_PANEL_INCHES = 2.2
_GAP_INCHES = 0.15
_OUTER_INCHES = 0.1
_RIGHT_INCHES = 0.15
_SUPTITLE_TOP_INCHES = 0.08
_TOP_INCHES = 0.52
"""Room above the panels: the suptitle, then each panel's title."""
_BOTTOM_INCHES = 0.3
"""Room below the panels for the x tick labels."""
_LABEL_PAD_POINTS = 3.5


def _plain(text: str) -> str:
    """A label matplotlib draws literally: every ``$`` escaped, so no mathtext is parsed."""
    return text.replace("$", r"\$")


def forest_plot(
    analyses: Sequence[GroupingAnalysis],
    path: str | Path,
    *,
    overall: Mapping[str, float | None] | None = None,
    metrics: Sequence[str] = FOREST_METRICS,
) -> Path:
    """Write a forest plot: one row per group, one panel per metric, 95% intervals as bars.

    Groups are listed under their grouping (a column or an intersection). Each row is labelled
    with the group and its size (sizes below 5 print as ``<5``); groups below ``min_group_size``
    are labelled ``insufficient`` in grey and get no marker, as do undefined values. A dashed
    line marks the whole eval split's value (``overall``).

    Args:
        analyses: the groupings, in the order to draw them.
        path: the SVG file to write (its folder must exist).
        overall: metric -> value on the whole eval split (optional reference lines).
        metrics: the metrics to draw, each a per-group metric name.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no groupings or no metrics are given, or a metric is unknown.
    """
    import matplotlib.ticker as mticker
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.transforms import ScaledTranslation

    if not analyses or not metrics:
        raise ValueError(
            f"a forest plot needs groupings and metrics, got {len(analyses)} groupings and metrics {list(metrics)}"
        )
    unknown = [m for m in metrics if m not in _TITLES]
    if unknown:
        raise ValueError(f"unknown forest-plot metrics {unknown}; expected some of {list(_TITLES)}")

    # Rows from the top: a heading per grouping, then its groups.
    labels: list[tuple[str, str, bool]] = []  # (text as displayed, colour, heading)
    points: list[tuple[int, GroupingAnalysis, int]] = []  # (row, analysis, group index)
    for analysis in analyses:
        labels.append((analysis.group_by, "black", True))
        for index, summary in enumerate(analysis.groups):
            size = count_text(summary.n)
            text = f"{summary.group}  (n={size})"
            if not summary.sufficient:
                text += "  insufficient"
            points.append((len(labels), analysis, index))
            labels.append((text, "black" if summary.sufficient else _MUTED, False))
    n_rows = len(labels)

    # Fixed geometry in inches, the left margin from the widest row label: constrained layout
    # measured every tick label of every panel and was most of the drawing time.
    label_width = max(
        text_width(text, _FONT_SIZE, weight="bold" if heading else "normal") for text, _, heading in labels
    )
    left = _OUTER_INCHES + label_width + _LABEL_PAD_POINTS / 72.0
    gaps = _GAP_INCHES * (len(metrics) - 1)
    panels = max(
        _PANEL_INCHES * len(metrics), text_width(_SUPTITLE, _SUPTITLE_SIZE) + 0.3 - left - _RIGHT_INCHES - gaps
    )
    width = left + panels + gaps + _RIGHT_INCHES
    height = _ROW_INCHES * (n_rows + 0.2) + _TOP_INCHES + _BOTTOM_INCHES

    with figure_style("bias-forest-plot", hashsalt="auditkit-bias-forest", font_size=_FONT_SIZE):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(
            1,
            len(metrics),
            squeeze=False,
            gridspec_kw={
                **inch_margins(width, height, left=left, right=_RIGHT_INCHES, top=_TOP_INCHES, bottom=_BOTTOM_INCHES),
                "wspace": _GAP_INCHES / (panels / len(metrics)),
            },
        )[0]
        headings = [row for row, (_, _, heading) in enumerate(labels) if heading]
        for ax, metric in zip(axes, metrics, strict=True):
            # One collection of interval bars and one line of markers per panel, not two artists a group.
            bars: list[list[tuple[float, float]]] = []
            rows: list[int] = []
            values: list[float] = []
            for row, analysis, index in points:
                summary = analysis.groups[index]
                value = summary.values.get(metric)
                if not summary.sufficient or value is None:
                    continue
                ci = summary.cis.get(metric)
                if ci is not None and math.isfinite(ci[0]) and math.isfinite(ci[1]):
                    bars.append([(ci[0], row), (ci[1], row)])
                rows.append(row)
                values.append(value)
            ax.hlines(headings, -0.03, 1.03, color="0.85", linewidth=0.6)
            if bars:
                ax.add_collection(LineCollection(bars, colors=_POINT, linewidths=1.2, capstyle="butt", zorder=2))
            if values:
                ax.plot(values, rows, marker="s", markersize=3.5, color=_POINT, linestyle="")
            reference = (overall or {}).get(metric)
            if reference is not None:
                ax.axvline(reference, color="0.4", linestyle="--", linewidth=0.8)
            ax.set_xlim(-0.03, 1.03)  # markers at exactly 0 or 1 stay visible
            ax.set_ylim(n_rows - 0.5, -0.7)
            fixed_ticks(ax.xaxis, _X_TICKS)
            ax.yaxis.set_major_locator(mticker.NullLocator())
            ax.set_title(_TITLES[metric])
            ax.grid(axis="x", color="0.92", linewidth=0.5)
        # Row labels as plain text beside the first panel: a tick per row on every panel was
        # five artists a row.
        beside = axes[0].get_yaxis_transform() + ScaledTranslation(-_LABEL_PAD_POINTS / 72.0, 0.0, fig.dpi_scale_trans)
        for row, (text, colour, heading) in enumerate(labels):
            axes[0].text(
                0.0,
                row,
                _plain(text),
                transform=beside,
                ha="right",
                va="center_baseline",
                color=colour,
                fontweight="bold" if heading else "normal",
                clip_on=False,
            )
        fig.suptitle(_SUPTITLE, fontsize=_SUPTITLE_SIZE, y=1.0 - _SUPTITLE_TOP_INCHES / height, va="top")
        return save_svg(fig, path)
