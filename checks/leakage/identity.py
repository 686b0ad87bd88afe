"""Identifiers shared by the train and eval splits (plain functions).

Patients and studies arrive as the run's surrogates (``P0001``, ``S0001``: :mod:`auditkit.data`);
series are read from the DICOM headers here and given surrogates of their own (``SE0001``) in
manifest row order. Raw identifiers stay in memory inside these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from auditkit.check import SplitRows
from auditkit.data import Surrogates

__all__ = ["HeaderTexts", "header_text", "overlap", "series_surrogates"]

HeaderTexts = Mapping[str, str | None] | None
"""One image's header values as text (:meth:`auditkit.check.CheckContext.header_texts`), or
``None`` for a file without a readable DICOM header."""


def overlap(first: Sequence[str | None], second: Sequence[str | None]) -> dict[str, tuple[list[int], list[int]]]:
    """Identifiers present in both sequences, with their positions in each.

    Args:
        first: one identifier (surrogate) per image of the first split; ``None`` is unknown.
        second: the same for the second split.

    Returns:
        identifier -> (positions in ``first``, positions in ``second``), in sorted order.
    """
    a: dict[str, list[int]] = {}
    b: dict[str, list[int]] = {}
    for table, values in ((a, first), (b, second)):
        for position, value in enumerate(values):
            if value is not None:
                table.setdefault(value, []).append(position)
    return {key: (a[key], b[key]) for key in sorted(a.keys() & b.keys())}


def header_text(header: HeaderTexts, keyword: str) -> str | None:
    """A header value as text, in memory only (``None`` when absent, empty or unreadable).

    Raises:
        KeyError: ``keyword`` was not among the keywords the texts were read for.
    """
    return None if header is None else header[keyword]


def series_surrogates(
    splits: Mapping[str, SplitRows], headers: Mapping[str, Sequence[HeaderTexts]]
) -> dict[str, list[str | None]]:
    """SeriesInstanceUID surrogates per split, numbered in manifest row order."""
    raw = {role: [header_text(h, "SeriesInstanceUID") for h in headers[role]] for role in splits}
    ordered = sorted((int(splits[role].rows[i]), uid) for role in splits for i, uid in enumerate(raw[role]))
    series = Surrogates("SE")
    for _, uid in ordered:
        series(uid)
    return {role: [series(uid) for uid in raw[role]] for role in splits}
