"""The reverse-engineered triggers as a byte-reproducible SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from auditkit.checks.backdoor.trigger import TriggerResult
from auditkit.plotting import figure_style, inch_margins, save_svg, text_width

__all__ = ["trigger_figure"]

_FONT_SIZE = 8.0
_TITLE_SIZE = 1.2 * _FONT_SIZE
"""Matplotlib's axes titles are "large": 1.2 times the font size."""
_TOP_INCHES = 0.45
"""Room above each row of images for its titles (two lines)."""
_BOTTOM_INCHES = 0.1


def trigger_figure(
    triggers: Sequence[tuple[str, TriggerResult, float | None, bool]],
    path: str | Path,
) -> Path:
    """One row per class: the mask, and what the trigger paints (mask times pattern). A volume's
    trigger is shown as its maximum projection along the depth axis.

    Args:
        triggers: ``(class name, trigger, feature excursion or None, suspected)`` per class.
        path: The SVG to write (its folder must exist).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: Nothing to draw.
    """
    from matplotlib.figure import Figure

    if not triggers:
        raise ValueError("nothing to draw: no trigger")
    titles = [_titles(name, trigger, excursion, suspected) for name, trigger, excursion, suspected in triggers]
    # Fixed geometry in inches instead of constrained layout: each row's titles above its two
    # square images, every column wide enough for the widest title line.
    widest = max(text_width(line, _TITLE_SIZE) for pair in titles for title in pair for line in title.split("\n"))
    rows = len(triggers)
    width = max(5.0, 2.0 * (widest + 0.3))
    height = 1.9 * rows + 0.3
    with figure_style("backdoor-triggers", hashsalt="auditkit-backdoor", font_size=_FONT_SIZE):
        fig = Figure(figsize=(width, height))
        side = (height - _TOP_INCHES - _BOTTOM_INCHES - (rows - 1) * _TOP_INCHES) / rows
        axes = fig.subplots(
            rows,
            2,
            squeeze=False,
            gridspec_kw={
                **inch_margins(width, height, left=0.1, right=0.1, top=_TOP_INCHES, bottom=_BOTTOM_INCHES),
                "hspace": _TOP_INCHES / side,
                "wspace": 0.1,
            },
        )
        for (_, trigger, _, suspected), (left_title, right_title), (left, right) in zip(
            triggers, titles, axes, strict=True
        ):
            mask, painted = trigger.mask, trigger.mask[None] * trigger.pattern
            if mask.ndim == 3:  # a volume: what the trigger covers anywhere along the depth
                mask, painted = mask.max(axis=0), painted.max(axis=1)
            shown = painted.mean(axis=0) if painted.shape[0] != 3 else np.moveaxis(painted, 0, -1)
            left.imshow(mask, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            # Scaled to its own maximum: a faint trigger stays visible.
            right.imshow(shown, cmap="gray", vmin=0.0, vmax=max(float(shown.max()), 1e-6), interpolation="nearest")
            left.set_title(left_title, color="#c44e52" if suspected else "black")
            right.set_title(right_title)
            for axis in (left, right):
                axis.set_xticks([])
                axis.set_yticks([])
        return save_svg(fig, path, metadata={"Creator": None})


def _titles(name: str, trigger: TriggerResult, excursion: float | None, suspected: bool) -> tuple[str, str]:
    """The titles of a class's mask and of its painted trigger."""
    verdict = "SUSPECTED" if suspected else "not suspected"
    excursion_text = "n/a" if excursion is None else f"{excursion:.2f}"
    flips = f"painted (scaled); flips {trigger.success_rate:.0%}"
    unit = "voxels, max over depth" if trigger.mask.ndim == 3 else "px"
    return f"{name}: mask, L1 {trigger.norm:.1f} {unit}", f"{flips}\nexcursion {excursion_text}: {verdict}"
