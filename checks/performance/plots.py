"""ROC and precision-recall curves with the operating point marked, as a reproducible SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import precision_recall_curve, roc_curve

from auditkit.plotting import figure_style, fixed_ticks, inch_margins, save_svg

_UNIT_TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def roc_pr_figure(
    curves: Sequence[tuple[str, NDArray[np.bool_], NDArray[np.float64], tuple[float, float, float] | None]],
    path: str | Path,
) -> Path:
    """ROC (left) and precision-recall (right) curves, one line per class.

    Args:
        curves: per class ``(name, truth, score, point)``: whether each image is of the class, its
            score for it, and the operating point as ``(sensitivity, specificity, ppv)`` (``None``
            to leave it unmarked). Classes whose truth is all one value are left out.
        path: the SVG file to write (its folder must exist).
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
            fpr, tpr, _ = roc_curve(truth, score)
            precision, recall, _ = precision_recall_curve(truth, score)
            roc.plot(fpr, tpr, color=colour, linewidth=1.2, label=name)
            pr.step(recall, precision, where="post", color=colour, linewidth=1.2, label=name)
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
