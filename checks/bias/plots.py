"""The forest plot of per-group metrics with their intervals, as a byte-reproducible SVG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from auditkit.checks.bias.gaps import GroupingAnalysis
from auditkit.checks.bias.metrics import count_text

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
_ROW_INCHES = 0.22


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
    import matplotlib
    from matplotlib.figure import Figure

    if not analyses or not metrics:
        raise ValueError(
            f"a forest plot needs groupings and metrics, got {len(analyses)} groupings and metrics {list(metrics)}"
        )
    unknown = [m for m in metrics if m not in _TITLES]
    if unknown:
        raise ValueError(f"unknown forest-plot metrics {unknown}; expected some of {list(_TITLES)}")

    # Rows from the top: a heading per grouping, then its groups.
    labels: list[tuple[str, str, bool]] = []  # (text, colour, heading)
    points: list[tuple[int, GroupingAnalysis, int]] = []  # (row, analysis, group index)
    for analysis in analyses:
        labels.append((_plain(analysis.group_by), "black", True))
        for index, summary in enumerate(analysis.groups):
            size = count_text(summary.n)
            text = f"{_plain(summary.group)}  (n={size})"
            if not summary.sufficient:
                text += "  insufficient"
            points.append((len(labels), analysis, index))
            labels.append((text, "black" if summary.sufficient else _MUTED, False))
    n_rows = len(labels)

    with matplotlib.rc_context(
        {
            "svg.hashsalt": "auditkit-bias-forest",
            "svg.id": "bias-forest-plot",
            "svg.fonttype": "path",
            "font.family": "DejaVu Sans",
            "font.size": 8.0,
        }
    ):
        fig = Figure(figsize=(2.3 * len(metrics) + 2.4, _ROW_INCHES * n_rows + 1.1), layout="constrained")
        axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
        for ax, metric in zip(axes, metrics, strict=True):
            for row, analysis, index in points:
                summary = analysis.groups[index]
                value = summary.values.get(metric)
                if not summary.sufficient or value is None:
                    continue
                ci = summary.cis.get(metric)
                if ci is not None:
                    ax.plot(ci, [row, row], color=_POINT, linewidth=1.2, solid_capstyle="butt")
                ax.plot([value], [row], marker="s", markersize=3.5, color=_POINT, linestyle="")
            reference = (overall or {}).get(metric)
            if reference is not None:
                ax.axvline(reference, color="0.4", linestyle="--", linewidth=0.8)
            for row, (_, _, heading) in enumerate(labels):
                if heading:
                    ax.axhline(row, color="0.85", linewidth=0.6)
            ax.set_xlim(-0.03, 1.03)  # markers at exactly 0 or 1 stay visible
            ax.set_ylim(n_rows - 0.5, -0.7)
            ax.set_title(_TITLES[metric])
            ax.grid(axis="x", color="0.92", linewidth=0.5)
        axes[0].set_yticks(range(n_rows))
        axes[0].set_yticklabels([text for text, _, _ in labels])
        for tick, (_, colour, heading) in zip(axes[0].get_yticklabels(), labels, strict=True):
            tick.set_color(colour)
            if heading:
                tick.set_fontweight("bold")
        for ax in axes:
            ax.tick_params(axis="y", length=0)
        fig.suptitle(
            "Per-group metrics with 95% bootstrap intervals (dashed: whole eval split)",
            fontsize=9.0,
        )
        out = Path(path)
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out
