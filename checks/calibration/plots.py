"""The reliability diagram: accuracy against confidence per bin, as a reproducible SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from auditkit.checks.calibration.metrics import (
    _EPS,
    FloatArray,
    _check_bins,
    _check_probs_labels,
    _equal_width_bins,
    _top_label,
    expected_calibration_error,
)
from auditkit.plotting import figure_style, fixed_ticks, inch_margins, range_ticks, save_svg

_UNIT_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# --------------------------------------------------------------------------------------------
# Reliability diagram


def _bin_summary(probs: FloatArray, labels: NDArray[np.intp], bins: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per equal-width bin: sample count, mean accuracy and mean confidence (NaN when empty)."""
    confidence, correct = _top_label(probs, labels)
    ids = _equal_width_bins(confidence, bins)
    counts = np.bincount(ids, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(ids, weights=correct, minlength=bins) / counts
        mean_conf = np.bincount(ids, weights=confidence, minlength=bins) / counts
    return counts, accuracy, mean_conf


def reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    bins: int,
    path: str | Path,
    probs_after: ArrayLike | None = None,
) -> Path:
    """Write a reliability diagram (Guo et al. 2017, fig. 1) as a byte-reproducible SVG.

    Top panel: accuracy per equal-width confidence bin (bars), the gap to the bin's mean
    confidence (hatched), the diagonal of perfect calibration and, when ``probs_after`` is given,
    the accuracy-versus-confidence curve after temperature scaling. Bottom panel: the share of
    samples per confidence bin. The title gives the ECE before (and after) scaling.

    Args:
        probs: class probabilities, shape ``(N, K)``, ``N >= 1``.
        labels: true class indices, shape ``(N,)``.
        bins: number of equal-width bins.
        path: the SVG file to write (its folder must exist).
        probs_after: optional probabilities after temperature scaling, same shape as ``probs``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid input or ``N == 0``.
    """
    from matplotlib.figure import Figure

    _check_bins(bins)
    p, y = _check_probs_labels(probs, labels)
    if p.shape[0] == 0:
        raise ValueError("cannot draw a reliability diagram of an empty sample")
    after = None
    if probs_after is not None:
        after, _ = _check_probs_labels(probs_after, y)
        if after.shape != p.shape:
            raise ValueError(f"probs_after must have shape {p.shape}, got {after.shape}")

    edges = np.linspace(0.0, 1.0, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2.0
    width = 1.0 / bins
    counts, accuracy, mean_conf = _bin_summary(p, y, bins)
    filled = counts > 0
    title = f"ECE {expected_calibration_error(p, y, bins):.3f}"

    # A fixed hash salt and id make the SVG's internal ids, hence its bytes, reproducible.
    with figure_style("reliability-diagram", hashsalt="auditkit-reliability", font_size=9.0):
        # Fixed margins (the axes' tick labels are always 0.0-1.0-like), not constrained layout,
        # which measured every text artist again and took about half of the drawing time.
        fig = Figure(figsize=(5.5, 6.0))
        top, bottom = fig.subplots(
            2,
            1,
            sharex=True,
            gridspec_kw={
                "height_ratios": [3.0, 1.0],
                **inch_margins(5.5, 6.0, left=0.8, right=0.2, top=0.6, bottom=0.55),
                "hspace": 0.06,
            },
        )
        top.bar(
            centers[filled],
            accuracy[filled],
            width=width,
            color="#4c72b0",
            edgecolor="white",
            linewidth=0.5,
            label="accuracy",
        )
        top.bar(
            centers[filled],
            (mean_conf - accuracy)[filled],
            bottom=accuracy[filled],
            width=width,
            color="none",
            edgecolor="#c44e52",
            hatch="//",
            linewidth=0.5,
            label="gap to confidence",
        )
        top.plot(
            [0.0, 1.0],
            [0.0, 1.0],
            linestyle="--",
            color="0.4",
            linewidth=1.0,
            label="perfect calibration",
        )
        shares = counts / counts.sum()
        bottom.bar(
            centers,
            shares,
            width=width,
            color="#4c72b0",
            edgecolor="white",
            linewidth=0.5,
            label="before",
        )
        if after is not None:
            counts_a, accuracy_a, conf_a = _bin_summary(after, y, bins)
            filled_a = counts_a > 0
            top.plot(
                conf_a[filled_a],
                accuracy_a[filled_a],
                marker="o",
                markersize=3.5,
                color="#dd8452",
                linewidth=1.2,
                label="after temperature scaling",
            )
            shares_a = counts_a / counts_a.sum()
            shares = np.maximum(shares, shares_a)
            bottom.step(
                edges,
                np.r_[shares_a, 0.0],
                where="post",
                color="#dd8452",
                linewidth=1.2,
                label="after",
            )
            title += f" → {expected_calibration_error(after, y, bins):.3f} after temperature scaling"
        top.set_xlim(0.0, 1.0)
        top.set_ylim(0.0, 1.0)
        # Explicit ticks and limits: no locator runs, and no tick outside the axes is made.
        fixed_ticks(bottom.xaxis, _UNIT_TICKS)
        fixed_ticks(top.yaxis, _UNIT_TICKS)
        share_range = (0.0, 1.05 * float(shares.max()))  # what autoscaling gives: 5% above the top
        bottom.set_ylim(*share_range)
        range_ticks(bottom.yaxis, *share_range, nbins=4)
        top.set_ylabel("accuracy")
        top.set_title(f"Reliability diagram (n = {p.shape[0]}, {bins} bins)\n{title}")
        top.legend(loc="upper left", frameon=False)
        bottom.set_xlabel("top-label confidence")
        bottom.set_ylabel("share of images")
        if after is not None:
            bottom.legend(loc="upper left", frameon=False)
        return save_svg(fig, path)


# --------------------------------------------------------------------------------------------
# One reliability diagram per label (a multi-label model) or class (a segmentation model), as
# small multiples


LabelPanel = tuple[str, ArrayLike, ArrayLike, ArrayLike | None]
"""One label's panel: ``(name, probs (n,), outcomes (n,) of 0/1, probs after scaling or None)``."""


class BinnedPanel(NamedTuple):
    """One panel of a positive-class reliability grid, given by its bin sums (no per-row data).

    Attributes:
        name: the panel's name (a label or a class).
        counts: rows per equal-width bin of the clipped predicted probability, ``(bins,)``.
        observed: sum of the 0/1 outcomes per bin, ``(bins,)``.
        predicted: sum of the clipped predicted probabilities per bin, ``(bins,)``.
        after: the same three sums after temperature scaling, or ``None``.
    """

    name: str
    counts: FloatArray
    observed: FloatArray
    predicted: FloatArray
    after: tuple[FloatArray, FloatArray, FloatArray] | None = None


def binned_panel(
    name: str, probs: ArrayLike, outcomes: ArrayLike, bins: int, after: ArrayLike | None = None
) -> BinnedPanel:
    """The :class:`BinnedPanel` of one binary sample (``probs`` and 0/1 ``outcomes`` of shape ``(n,)``)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    sums = _positive_bin_sums(p, y, bins)
    sums_after = _positive_bin_sums(np.asarray(after, dtype=np.float64), y, bins) if after is not None else None
    return BinnedPanel(name, *sums, after=sums_after)


def _positive_bin_sums(probs: FloatArray, outcomes: FloatArray, bins: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    confidence = np.clip(probs, _EPS, 1.0 - _EPS)
    ids = _equal_width_bins(confidence, bins)
    counts = np.bincount(ids, minlength=bins).astype(np.float64)
    return (
        counts,
        np.bincount(ids, weights=outcomes, minlength=bins).astype(np.float64),
        np.bincount(ids, weights=confidence, minlength=bins).astype(np.float64),
    )


def _panel_summary(
    counts: FloatArray, observed: FloatArray, predicted: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, float]:
    """Per bin: count, observed frequency, mean prediction (NaN when empty); and the ECE."""
    with np.errstate(invalid="ignore", divide="ignore"):
        frequency = observed / counts
        mean_p = predicted / counts
    ece = float(np.abs(observed - predicted).sum() / counts.sum())
    return counts, frequency, mean_p, ece


def label_reliability_grid(panels: Sequence[LabelPanel], bins: int, path: str | Path, *, columns: int = 4) -> Path:
    """Write one reliability diagram per label, as small multiples in one byte-reproducible SVG.

    Each panel is the positive-class reliability diagram of one label (Guo et al. 2017, fig. 1,
    for a sigmoid output): the observed frequency of the finding per equal-width bin of the
    predicted probability (bars), the gap to the bin's mean prediction (hatched), the diagonal
    of perfect calibration, the curve after cross-fitted temperature scaling when given, and,
    in a strip below, the share of the label's known entries per bin. The title gives the
    label, its known entries and its ECE (before and after scaling).

    Args:
        panels: one :data:`LabelPanel` per label, in display order; a panel with no entries is
            drawn empty with "no known entries".
        bins: number of equal-width bins.
        path: the SVG file to write (its folder must exist).
        columns: panels per row (fewer when there are fewer labels).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no panels, invalid probabilities or outcomes.
    """
    from auditkit.checks.calibration.binary import binary_expected_calibration_error

    _check_bins(bins)
    if not panels:
        raise ValueError("cannot draw a reliability grid without a label")
    binned: list[tuple[BinnedPanel, str]] = []
    for name, probs, outcomes, after in panels:
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(outcomes, dtype=np.float64)
        title = f"{name} (n = {p.size})"
        if p.size:
            title += f"\nECE {binary_expected_calibration_error(p, y, bins):.3f}"
            if after is not None:
                title += (
                    f" → {binary_expected_calibration_error(np.asarray(after, dtype=np.float64), y, bins):.3f} scaled"
                )
        else:
            title += "\nno known entries"
        binned.append((binned_panel(name, p, y, bins, after), title))
    return _reliability_grid(
        binned,
        bins,
        path,
        columns=columns,
        svg_id="label-reliability-grid",
        hashsalt="auditkit-label-reliability",
        suptitle=(
            f"Reliability per label ({bins} bins): bars observed, hatched gap to predicted,"
            " orange after temperature scaling"
        ),
    )


def class_reliability_grid(
    panels: Sequence[BinnedPanel], bins: int, path: str | Path, *, what: str, columns: int = 4
) -> Path:
    """Write one positive-class reliability diagram per panel from its bin sums, as small multiples.

    The drawing of :func:`label_reliability_grid`, for samples too large to hold (a segmentation
    model's voxels): each panel is given by its per-bin counts and sums (:class:`BinnedPanel`),
    accumulated case by case. The title gives the panel's name, its rows and its ECE (from the
    sums: ``sum_b |observed_b - predicted_b| / n``); a panel without rows is drawn empty.

    Args:
        panels: one :class:`BinnedPanel` per class, in display order.
        bins: number of equal-width bins the sums were taken over.
        path: the SVG file to write (its folder must exist).
        what: a short second line of the figure's title saying what the rows are (e.g. "ROI:
            reference or prediction + 5 voxels"); the figure may be one panel (2.4 in) wide.
        columns: panels per row (fewer when there are fewer panels).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no panels, or sums whose shape is not ``(bins,)``.
    """
    _check_bins(bins)
    if not panels:
        raise ValueError("cannot draw a reliability grid without a panel")
    titled: list[tuple[BinnedPanel, str]] = []
    for panel in panels:
        for sums in (panel.counts, panel.observed, panel.predicted):
            if np.shape(sums) != (bins,):
                raise ValueError(f"panel {panel.name!r}: bin sums must have shape ({bins},), got {np.shape(sums)}")
        n = round(float(np.sum(panel.counts)))
        title = f"{panel.name} (n = {n})"
        if n:
            title += f"\nECE {_panel_summary(panel.counts, panel.observed, panel.predicted)[3]:.3f}"
        else:
            title += "\nno rows"
        titled.append((panel, title))
    return _reliability_grid(
        titled,
        bins,
        path,
        columns=columns,
        svg_id="class-reliability-grid",
        hashsalt="auditkit-class-reliability",
        suptitle=f"Reliability per class ({bins} bins)\n{what}",
        top_margin=0.95,
    )


def _reliability_grid(
    panels: Sequence[tuple[BinnedPanel, str]],
    bins: int,
    path: str | Path,
    *,
    columns: int,
    svg_id: str,
    hashsalt: str,
    suptitle: str,
    top_margin: float = 0.75,
) -> Path:
    """Draw titled :class:`BinnedPanel` s as small multiples (see :func:`label_reliability_grid`)."""
    from matplotlib.figure import Figure

    ncols = max(1, min(columns, len(panels)))
    nrows = -(-len(panels) // ncols)
    panel_w, panel_h = 2.4, 2.9
    width, height = ncols * panel_w, nrows * panel_h + top_margin - 0.75
    edges = np.linspace(0.0, 1.0, bins + 1)
    with figure_style(svg_id, hashsalt=hashsalt, font_size=7.0):
        fig = Figure(figsize=(width, height))
        outer = fig.add_gridspec(
            nrows,
            ncols,
            **inch_margins(width, height, left=0.5, right=0.15, top=top_margin, bottom=0.4),
            hspace=0.35,
            wspace=0.12,
        )
        for position, (panel, title) in enumerate(panels):
            row, column = divmod(position, ncols)
            cell = outer[row, column].subgridspec(2, 1, height_ratios=[3.0, 1.0], hspace=0.08)
            top = fig.add_subplot(cell[0])
            bottom = fig.add_subplot(cell[1])
            for axes in (top, bottom):
                # Limits fixed before drawing: no autoscaling pass over the artists.
                axes.set_autoscale_on(False)
                axes.set_xlim(0.0, 1.0)
                axes.set_ylim(0.0, 1.0)
            top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.4", linewidth=0.8)
            if panel.counts.sum() > 0:
                counts, frequency, mean_p, _ = _panel_summary(panel.counts, panel.observed, panel.predicted)
                filled = counts > 0
                observed = np.where(filled, frequency, 0.0)
                predicted = np.where(filled, mean_p, 0.0)
                # One patch per series (stairs), not one per bar.
                top.stairs(observed, edges, fill=True, color="#4c72b0")
                top.stairs(
                    predicted,
                    edges,
                    baseline=observed,
                    fill=True,
                    facecolor="none",
                    edgecolor="#c44e52",
                    hatch="//",
                    linewidth=0.4,
                )
                bottom.stairs(counts / counts.sum(), edges, fill=True, color="#4c72b0")
                if panel.after is not None:
                    counts_a, frequency_a, mean_a, _ = _panel_summary(*panel.after)
                    shown = counts_a > 0
                    top.plot(
                        mean_a[shown], frequency_a[shown], marker="o", markersize=2.5, color="#dd8452", linewidth=1.0
                    )
            fixed_ticks(top.xaxis, (0.0, 0.5, 1.0))
            fixed_ticks(top.yaxis, (0.0, 0.5, 1.0))
            fixed_ticks(bottom.xaxis, (0.0, 0.5, 1.0))
            fixed_ticks(bottom.yaxis, (0.0, 1.0))
            top.tick_params(labelbottom=False)
            top.set_title(title)
            if column == 0:
                top.set_ylabel("observed frequency")
                bottom.set_ylabel("share")
            else:
                top.tick_params(labelleft=False)
                bottom.tick_params(labelleft=False)
            if position + ncols >= len(panels):
                bottom.set_xlabel("predicted probability")
            else:
                bottom.tick_params(labelbottom=False)
        fig.suptitle(suptitle, y=1.0 - 0.1 / height)
        return save_svg(fig, path)
