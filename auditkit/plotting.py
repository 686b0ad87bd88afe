"""Shared mechanics of the checks' SVG figures: one reproducible style, fixed layouts, cheap text sizes.

The checks draw with matplotlib's object API (:class:`~matplotlib.figure.Figure`, no pyplot
state) and write SVG with text as text in DejaVu Sans, the report's own font (drawn as glyph
paths, one ``<use>`` per character, the figures took half of the PDF's rendering time), with a
fixed hash salt and id and no date, so the same numbers give the same bytes.

Most of a figure's drawing time went into measuring text: constrained layout and matplotlib's
automatic title placement measure every tick label of every panel, and each tick is five
artists. So the figures here place titles at a fixed height (``axes.titley``), take their
margins in inches from :func:`text_width` of the labels they know in advance, and set their
ticks explicitly (:func:`fixed_ticks`) where the axis range is known.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

__all__ = [
    "FONT_FAMILY",
    "figure_style",
    "fixed_ticks",
    "inch_margins",
    "legend_columns",
    "range_ticks",
    "save_svg",
    "text_width",
]

FONT_FAMILY = "DejaVu Sans"
"""The one font of every figure and of the report (bundled with matplotlib, so text sizes are
measured with the same metrics everywhere)."""

FontWeight = Literal["normal", "bold"]


@contextmanager
def figure_style(svg_id: str, *, hashsalt: str, font_size: float) -> Iterator[None]:
    """Matplotlib settings for one reproducible SVG figure; create and save the figure inside.

    Args:
        svg_id: the SVG's id attribute (``svg.id``).
        hashsalt: the salt of the SVG's internal ids (``svg.hashsalt``), so its bytes repeat.
        font_size: the base font size in points.
    """
    import matplotlib

    with matplotlib.rc_context(
        {
            "svg.hashsalt": hashsalt,
            "svg.id": svg_id,
            "svg.fonttype": "none",
            "font.family": FONT_FAMILY,
            "font.size": font_size,
            # Titles at a fixed height above their axes (every axis has its ticks at the bottom,
            # so there is nothing to dodge): automatic placement measured every tick label of the
            # panel, for every title, and was a quarter of the drawing time.
            "axes.titley": 1.0,
        }
    ):
        yield


@lru_cache(maxsize=4096)
def text_width(text: str, size: float, *, weight: FontWeight = "normal") -> float:
    """Width in inches of one line of ``text`` as the figures draw it (no mathtext).

    Measured with the glyph metrics the SVG backend itself uses, without drawing anything.

    Args:
        text: the text as displayed (``$`` unescaped).
        size: font size in points.
        weight: font weight.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    prop = FontProperties(family=FONT_FAMILY, size=size, weight=weight)
    width, _, _ = text_to_path.get_text_width_height_descent(text, prop, ismath=False)
    return float(width) / 72.0


def inch_margins(
    width: float, height: float, *, left: float, right: float, top: float, bottom: float
) -> dict[str, float]:
    """``gridspec_kw`` placing a figure's panels with margins given in inches.

    Args:
        width: the figure's width in inches.
        height: the figure's height in inches.
        left: the left margin in inches (also ``right``, ``top``, ``bottom``).
        right: the right margin.
        top: the top margin.
        bottom: the bottom margin.

    Raises:
        ValueError: the margins leave no room for the panels.
    """
    if left + right >= width or top + bottom >= height:
        raise ValueError(
            f"margins of {left + right:.2f} x {top + bottom:.2f} in leave no room in a"
            f" {width:.2f} x {height:.2f} in figure"
        )
    return {"left": left / width, "right": 1 - right / width, "top": 1 - top / height, "bottom": bottom / height}


def legend_columns(labels: Sequence[str], font_size: float, width: float, *, max_columns: int | None = None) -> int:
    """The most columns (up to ``max_columns``) a frameless legend of ``labels`` takes in ``width`` inches.

    As matplotlib draws a legend with ``ncols``: the entries split into that many consecutive
    runs (``numpy.array_split``), a column as wide as its widest entry (handle, padding, text),
    columns two font sizes apart. One column when even two do not fit.
    """
    em = font_size / 72.0
    entries = [2.0 * em + 0.8 * em + text_width(label, font_size) for label in labels]  # handle, pad, text
    for columns in range(min(len(entries), max_columns or len(entries)), 1, -1):
        rows, extra = divmod(len(entries), columns)
        spans, start = [], 0
        for column in range(columns):
            stop = start + rows + (column < extra)
            spans.append(max(entries[start:stop]))
            start = stop
        if sum(spans) + 2.0 * em * (columns - 1) + 0.8 * em <= width:
            return columns
    return 1


def fixed_ticks(axis: Axis, values: Sequence[float], fmt: str = "{:.1f}") -> None:
    """Major ticks at ``values``, labelled with ``fmt``: no locator or formatter runs at draw time."""
    axis.set_ticks(list(values), labels=[fmt.format(v) for v in values])


def range_ticks(axis: Axis, low: float, high: float, *, nbins: int = 6) -> None:
    """Major ticks at round numbers within ``[low, high]`` (matplotlib's choice of values).

    The values are fixed before drawing, so no tick outside the range is created at draw time
    (each tick is five artists); the labels stay matplotlib's default formatting.

    Args:
        axis: the axis, its limits ``(low, high)``.
        low: the lower limit.
        high: the upper limit.
        nbins: at most this many intervals between ticks.
    """
    from matplotlib.ticker import MaxNLocator

    values = MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
    slack = 1e-9 * (high - low)
    axis.set_ticks([float(v) for v in values if low - slack <= v <= high + slack])


def save_svg(fig: Figure, path: str | Path, *, metadata: Mapping[str, str | None] | None = None) -> Path:
    """Write ``fig`` as an SVG without a date (the same figure gives the same bytes).

    Args:
        fig: the figure, drawn inside :func:`figure_style`.
        path: the SVG file to write (its folder must exist).
        metadata: SVG metadata on top of ``{"Date": None}``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    out = Path(path)
    fig.savefig(out, format="svg", metadata={"Date": None, **(metadata or {})})
    return out
