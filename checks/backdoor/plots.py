"""The reverse-engineered triggers as a byte-reproducible SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from auditkit.checks.backdoor.trigger import TriggerResult

__all__ = ["trigger_figure"]


def trigger_figure(
    triggers: Sequence[tuple[str, TriggerResult, float | None, bool]],
    path: str | Path,
) -> Path:
    """One row per class: the mask, and what the trigger paints (mask times pattern).

    Args:
        triggers: ``(class name, trigger, feature excursion or None, suspected)`` per class.
        path: The SVG to write (its folder must exist).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: Nothing to draw.
    """
    import matplotlib
    from matplotlib.figure import Figure

    if not triggers:
        raise ValueError("nothing to draw: no trigger")
    with matplotlib.rc_context(
        {
            "svg.hashsalt": "auditkit-backdoor",
            "svg.id": "backdoor-triggers",
            "svg.fonttype": "path",
            "font.family": "DejaVu Sans",
            "font.size": 8.0,
        }
    ):
        rows = len(triggers)
        fig = Figure(figsize=(5.0, 1.9 * rows + 0.3), layout="constrained")
        axes = np.atleast_2d(fig.subplots(rows, 2, squeeze=False))
        for (name, trigger, excursion, suspected), (left, right) in zip(triggers, axes, strict=True):
            painted = trigger.mask[None] * trigger.pattern
            shown = painted.mean(axis=0) if painted.shape[0] != 3 else np.moveaxis(painted, 0, -1)
            left.imshow(trigger.mask, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            # Scaled to its own maximum: a faint trigger stays visible.
            right.imshow(shown, cmap="gray", vmin=0.0, vmax=max(float(shown.max()), 1e-6), interpolation="nearest")
            verdict = "SUSPECTED" if suspected else "not suspected"
            excursion_text = "n/a" if excursion is None else f"{excursion:.2f}"
            colour = "#c44e52" if suspected else "black"
            left.set_title(f"{name}: mask, L1 {trigger.norm:.1f} px", color=colour)
            flips = f"painted (scaled); flips {trigger.success_rate:.0%}"
            right.set_title(f"{flips}\nexcursion {excursion_text}: {verdict}")
            for axis in (left, right):
                axis.set_xticks([])
                axis.set_yticks([])
        fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
    return Path(path)
