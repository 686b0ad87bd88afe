"""Accuracy against corruption severity, as a byte-reproducible SVG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["severity_plot"]

_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*")
# Tableau 10 and one more: fixed colours keep the SVG identical across matplotlib styles.
_COLOURS = (
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
    "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#2f4f4f",
)  # fmt: skip


def severity_plot(
    curves: Mapping[str, Mapping[int, float]],
    clean_accuracy: float,
    path: str | Path,
    *,
    n: int,
) -> Path:
    """Draw accuracy against severity, one line per corruption, starting from the clean accuracy.

    Args:
        curves: corruption -> {severity (1..5): accuracy}.
        clean_accuracy: accuracy at severity 0 (the shared clean predictions).
        path: the SVG to write (its folder must exist).
        n: the sample size, for the title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no curve to draw.
    """
    import matplotlib
    from matplotlib.figure import Figure

    if not curves or not any(curves.values()):
        raise ValueError("nothing to draw: no corruption has an accuracy")
    with matplotlib.rc_context(
        {
            "svg.hashsalt": "auditkit-corruption",
            "svg.id": "corruption-accuracy",
            "svg.fonttype": "path",
            "font.family": "DejaVu Sans",
            "font.size": 9.0,
        }
    ):
        fig = Figure(figsize=(7.5, 4.5), layout="constrained")
        axis = fig.subplots()
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
        axis.set_xticks(range(0, 6))
        axis.set_xlim(-0.2, 5.2)
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("severity (0 = clean)")
        axis.set_ylabel("accuracy")
        axis.set_title(f"Accuracy under acquisition shift (n = {n})")
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        out = Path(path)
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out
