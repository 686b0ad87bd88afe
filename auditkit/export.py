"""CSV exports of the measurements for spreadsheets: ``metrics.csv`` and ``findings.csv``.

Reviewers open evidence in Excel or LibreOffice, which evaluate a cell that starts with ``=``,
``+``, ``-`` or ``@`` (and some also after a leading tab or carriage return) as a formula: a
metric label or a finding field that came from a third-party check, a file or a header could then
run ``=HYPERLINK(...)`` or a DDE command on the reviewer's machine (CSV injection). Following the
OWASP guidance, every text cell that starts with one of those characters gets a leading
apostrophe, every text cell is quoted, and numbers are written as numbers (a real negative number
stays ``-0.25``, not ``'-0.25``).

``metrics.csv`` has one row per metric (``check, name, labels, value, ci_low, ci_high, n,
direction, reason``; ``labels`` as compact JSON with sorted keys). ``findings.csv`` has one row per
finding (``check, index, kind`` and each field, nested mappings flattened to ``a.b`` columns, lists
as JSON). Both are written from ``results.json`` alone, so ``auditkit report`` rewrites them too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from auditkit.jsonio import write_text_atomic

__all__ = [
    "FINDINGS_CSV",
    "METRICS_COLUMNS",
    "METRICS_CSV",
    "findings_rows",
    "metrics_rows",
    "neutralise",
    "write_csv_exports",
]

METRICS_CSV = "metrics.csv"
FINDINGS_CSV = "findings.csv"
METRICS_COLUMNS: tuple[str, ...] = (
    "check",
    "name",
    "labels",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "direction",
    "reason",
)
_FINDINGS_LEADING: tuple[str, ...] = ("check", "index", "kind")

# Characters that make a spreadsheet read a cell as a formula (OWASP CSV injection), plus their
# full-width forms, which some spreadsheet applications normalise to the ASCII ones.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
# A plain decimal number: safe to leave as it is, even with a leading minus sign.
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

Cell = str | int | float


def neutralise(value: Any) -> Cell:
    """One spreadsheet-safe CSV cell.

    ``None`` becomes an empty cell, booleans ``true``/``false``, finite numbers stay numbers
    (non-finite ones become empty cells: results never hold NaN), mappings and lists become
    compact JSON. Text that starts with ``=``, ``+``, ``-``, ``@``, a tab, CR or LF (or a
    full-width ``=+-@``), also after leading spaces, gets a leading ``'`` unless it is a plain
    decimal number such as ``-0.25``.

    Args:
        value: A JSON value from ``results.json``.

    Returns:
        A ``str``, ``int`` or ``float`` for :mod:`csv` to write.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ""
    if isinstance(value, Mapping | list | tuple):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    else:
        text = str(value)
    if text.lstrip(" ").startswith(_FORMULA_STARTS) and not _NUMBER.match(text):
        return "'" + text
    return text


def _labels_text(labels: Any) -> str:
    if not labels:
        return ""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def metrics_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per metric of every check, in the order of ``results.json`` (not yet neutralised)."""
    rows: list[dict[str, Any]] = []
    for check in results.get("checks") or []:
        for metric in check.get("metrics") or []:
            ci = metric.get("ci") or (None, None)
            rows.append(
                {
                    "check": check.get("id"),
                    "name": metric.get("name"),
                    "labels": _labels_text(metric.get("labels")),
                    "value": metric.get("value"),
                    "ci_low": ci[0],
                    "ci_high": ci[1],
                    "n": metric.get("n"),
                    "direction": metric.get("direction"),
                    "reason": metric.get("reason"),
                }
            )
    return rows


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def findings_rows(results: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``findings.csv``: ``check, index, kind``, then every field, sorted.

    ``index`` is the finding's position in its check's ``findings`` list.
    """
    rows: list[dict[str, Any]] = []
    fields: set[str] = set()
    for check in results.get("checks") or []:
        for index, finding in enumerate(check.get("findings") or []):
            flat = _flatten(finding) if isinstance(finding, Mapping) else {"value": finding}
            row = {"check": check.get("id"), "index": index, "kind": flat.pop("kind", None)}
            # A field named like a leading column keeps its value under a distinct name.
            for name in ("check", "index"):
                if name in flat:
                    flat[f"finding.{name}"] = flat.pop(name)
            row.update(flat)
            fields.update(flat)
            rows.append(row)
    return [*_FINDINGS_LEADING, *sorted(fields)], rows


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """CSV of ``rows`` (mappings) under ``columns``: spreadsheet-safe (:func:`neutralise`), every
    text cell quoted, numbers bare, CRLF line ends."""
    buffer = io.StringIO()
    # Every text cell is quoted (OWASP); numbers are left bare so spreadsheets read them as numbers.
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
    writer.writerow([neutralise(column) for column in columns])
    for row in rows:
        writer.writerow([neutralise(row.get(column)) for column in columns])
    return buffer.getvalue()


def write_csv_exports(out_dir: Path, results: Mapping[str, Any]) -> list[Path]:
    """Write ``metrics.csv`` and ``findings.csv`` into ``out_dir`` (atomically, UTF-8).

    Args:
        out_dir: The evidence bundle folder.
        results: The contents of ``results.json``.

    Returns:
        The paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_CSV
    write_text_atomic(metrics_path, csv_text(METRICS_COLUMNS, metrics_rows(results)))
    columns, rows = findings_rows(results)
    findings_path = out_dir / FINDINGS_CSV
    write_text_atomic(findings_path, csv_text(columns, rows))
    return [metrics_path, findings_path]
