"""Figures of the bias check, as byte-reproducible SVGs.

:func:`forest_plot`: per-group values with their intervals, one panel per metric (every task:
the classifier's rates, the multi-label underdiagnosis rate, a regression model's errors in its
units). :func:`label_heatmap`: a multi-label model's per-label metric for every group, one cell
per label and group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from auditkit.checks.bias.gaps import GroupSummary
from auditkit.checks.bias.metrics import count_text
from auditkit.plotting import figure_style, fixed_ticks, inch_margins, range_ticks, save_svg, text_width

__all__ = ["FOREST_METRICS", "HEATMAP_METRICS", "Grouped", "forest_plot", "label_heatmap"]


class Grouped(Protocol):
    """What the figures read of a grouping's analysis: its name and its groups' summaries."""

    @property
    def group_by(self) -> str: ...

    @property
    def groups(self) -> Sequence[GroupSummary]: ...


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
    "underdiagnosis_rate": "underdiagnosis rate (lower is better)",
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
    analyses: Sequence[Grouped],
    path: str | Path,
    *,
    overall: Mapping[str, float | None] | None = None,
    metrics: Sequence[str] = FOREST_METRICS,
    titles: Mapping[str, str] | None = None,
    limits: Mapping[str, tuple[float, float]] | None = None,
    suptitle: str = _SUPTITLE,
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
        metrics: the metrics to draw, each a key of the groups' values.
        titles: metric -> panel title, for metrics beyond the classifier's rates.
        limits: metric -> the panel's x range (default ``[0, 1]``: a rate), for values in units.
        suptitle: the figure's title.

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
    panel_titles = {**_TITLES, **(titles or {})}
    ranges = dict(limits or {})
    unknown = [m for m in metrics if m not in panel_titles]
    if unknown:
        raise ValueError(f"unknown forest-plot metrics {unknown}; expected some of {list(_TITLES)}")

    # Rows from the top: a heading per grouping, then its groups.
    labels: list[tuple[str, str, bool]] = []  # (text as displayed, colour, heading)
    points: list[tuple[int, Grouped, int]] = []  # (row, analysis, group index)
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
    panels = max(_PANEL_INCHES * len(metrics), text_width(suptitle, _SUPTITLE_SIZE) + 0.3 - left - _RIGHT_INCHES - gaps)
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
            low, high = ranges.get(metric, (-0.03, 1.03))
            ax.hlines(headings, low, high, color="0.85", linewidth=0.6)
            if bars:
                ax.add_collection(LineCollection(bars, colors=_POINT, linewidths=1.2, capstyle="butt", zorder=2))
            if values:
                ax.plot(values, rows, marker="s", markersize=3.5, color=_POINT, linestyle="")
            reference = (overall or {}).get(metric)
            if reference is not None:
                ax.axvline(reference, color="0.4", linestyle="--", linewidth=0.8)
            ax.set_xlim(low, high)  # a rate: markers at exactly 0 or 1 stay visible
            ax.set_ylim(n_rows - 0.5, -0.7)
            if metric in ranges:
                range_ticks(ax.xaxis, low, high, nbins=4)
            else:
                fixed_ticks(ax.xaxis, _X_TICKS)
            ax.yaxis.set_major_locator(mticker.NullLocator())
            ax.set_title(panel_titles[metric])
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
        fig.suptitle(suptitle, fontsize=_SUPTITLE_SIZE, y=1.0 - _SUPTITLE_TOP_INCHES / height, va="top")
        return save_svg(fig, path)


HEATMAP_METRICS: tuple[str, ...] = ("sensitivity", "specificity")
"""Metrics drawn as panels of the label x group heat map, left to right."""

_CELL_INCHES = 0.42
_HEATMAP_SUPTITLE = "Per-label metrics by group (grey: group too small or metric undefined)"


def label_heatmap(
    groupings: Sequence[tuple[str, Mapping[str, Grouped], Mapping[str, int]]],
    path: str | Path,
    *,
    metrics: Sequence[str] = HEATMAP_METRICS,
) -> Path:
    """Write a heat map: one row per group, one column per label, one panel per metric.

    Groups are listed under their grouping; each row is labelled with the group and its image
    count (``<5`` below 5). A cell holds the label's value for the group (printed to two
    decimals, coloured on ``[0, 1]``); a cell whose group is insufficient for that label, or
    whose value is undefined, is grey with a dash. The intervals are in the metrics and in the
    forest plots; this figure is the overview across labels.

    Args:
        groupings: per grouping: its name, label -> the label's analysis (its ``groups`` in one
            order for every label), and group -> images.
        path: the SVG file to write (its folder must exist).
        metrics: the per-label metrics to draw (rates in ``[0, 1]``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no groupings, no labels or no metrics are given, or a metric is unknown.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.transforms import ScaledTranslation

    if not groupings or not metrics or not groupings[0][1]:
        raise ValueError(f"a heat map needs groupings, labels and metrics, got {len(groupings)} groupings")
    unknown = [m for m in metrics if m not in _TITLES]
    if unknown:
        raise ValueError(f"unknown heat-map metrics {unknown}; expected some of {list(_TITLES)}")
    names = list(groupings[0][1])

    rows: list[tuple[str, bool]] = []  # (text as displayed, heading)
    cells: list[tuple[int, Mapping[str, Grouped], int]] = []  # (row, analyses by label, group index)
    for group_by, by_label, images in groupings:
        rows.append((group_by, True))
        first = by_label[names[0]]
        for index, summary in enumerate(first.groups):
            cells.append((len(rows), by_label, index))
            rows.append((f"{summary.group}  (n={count_text(images.get(summary.group, 0))})", False))
    n_rows, n_cols = len(rows), len(names)

    label_width = max(text_width(t, _FONT_SIZE, weight="bold" if h else "normal") for t, h in rows)
    left = _OUTER_INCHES + label_width + _LABEL_PAD_POINTS / 72.0
    bottom = 0.15 + max(text_width(n, _FONT_SIZE) for n in names) * math.sin(math.radians(45)) + 0.1
    panel = _CELL_INCHES * n_cols
    gaps = _GAP_INCHES * (len(metrics) - 1)
    width = max(left + panel * len(metrics) + gaps + _RIGHT_INCHES, text_width(_HEATMAP_SUPTITLE, _SUPTITLE_SIZE) + 0.3)
    height = _ROW_INCHES * n_rows + _TOP_INCHES + bottom
    colours = ListedColormap(
        ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"]
    )

    with figure_style("bias-label-heatmap", hashsalt="auditkit-bias-heatmap", font_size=_FONT_SIZE):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(
            1,
            len(metrics),
            squeeze=False,
            gridspec_kw={
                **inch_margins(
                    width,
                    height,
                    left=left,
                    right=width - left - panel * len(metrics) - gaps,
                    top=_TOP_INCHES,
                    bottom=bottom,
                ),
                "wspace": _GAP_INCHES / panel,
            },
        )[0]
        for ax, metric in zip(axes, metrics, strict=True):
            grid = np.full((n_rows, n_cols), np.nan)
            for row, by_label, index in cells:
                for column, name in enumerate(names):
                    summary = by_label[name].groups[index]
                    value = summary.values.get(metric) if summary.sufficient else None
                    if value is not None:
                        grid[row, column] = value
            shown = np.ma.masked_invalid(grid)
            ax.set_facecolor("0.88")
            ax.imshow(shown, cmap=colours, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            for row, (_, heading) in enumerate(rows):
                if heading:
                    ax.axhspan(row - 0.5, row + 0.5, color="white", zorder=1)
            for row, _, _ in cells:
                for column in range(n_cols):
                    value = grid[row, column]
                    text = "–" if not math.isfinite(value) else f"{value:.2f}"
                    colour = "white" if math.isfinite(value) and value > 0.6 else "black"
                    ax.text(column, row, text, ha="center", va="center", color=colour, fontsize=_FONT_SIZE - 1)
            ax.set_xlim(-0.5, n_cols - 0.5)
            ax.set_ylim(n_rows - 0.5, -0.5)
            ax.set_xticks(range(n_cols), labels=[_plain(n) for n in names], rotation=45, ha="right")
            ax.set_yticks([])
            ax.set_title(_TITLES[metric])
        beside = axes[0].get_yaxis_transform() + ScaledTranslation(-_LABEL_PAD_POINTS / 72.0, 0.0, fig.dpi_scale_trans)
        for row, (text, heading) in enumerate(rows):
            axes[0].text(
                0.0,
                row,
                _plain(text),
                transform=beside,
                ha="right",
                va="center_baseline",
                fontweight="bold" if heading else "normal",
                clip_on=False,
            )
        fig.suptitle(_HEATMAP_SUPTITLE, fontsize=_SUPTITLE_SIZE, y=1.0 - _SUPTITLE_TOP_INCHES / height, va="top")
        return save_svg(fig, path)
