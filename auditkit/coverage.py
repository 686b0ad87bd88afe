"""Coverage is evidence: how many images each split listed, read and lost to quarantine.

A release gate must never pass on nothing. A wrong ``data.root``, Windows paths or files the
decoder cannot read would otherwise quarantine every image, leave every rule ``not_evaluated`` and
let the verdict pass. The engine therefore measures its own coverage on every run, whatever checks
are selected, and the packaged policies judge it (rules ``COV-*``): too few readable eval images or
too large a share quarantined fails the audit, and with no readable eval image at all the run stops
with a usage error (:func:`require_readable_eval`).

Coverage is not a plug-in check: it cannot be skipped or narrowed away, and it runs before the
others. Its record sits first in ``results.json``'s ``checks`` list with id ``coverage``, so
policies, exports, ``auditkit compare`` and the report treat its metrics like any other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, ClassVar

from auditkit.check import Check, CheckParams, CheckResult, Metric
from auditkit.data import Dataset
from auditkit.errors import InputError

SHOWN_ROWS = 10
"""Quarantined rows named per reason on the console and in findings (row numbers only)."""


class CoverageCheck(Check[CheckParams]):
    """Coverage: images listed, read and quarantined per split (the engine's own measurement).

    Method: every manifest row assigned to a split is decoded once; a row whose file is missing,
    unreadable, hostile or of the wrong shape is quarantined with its reason and left out of every
    measurement. Coverage counts, per split, the rows listed, the images read and the rows
    quarantined, by reason.

    Metrics:
        ``coverage.images_read`` {split}: images decoded and measured (``n`` = rows listed);
        ``coverage.quarantined_fraction`` {split}: share of the split's rows quarantined.

    Findings: ``quarantine_reason`` (split, reason, count and the first row numbers) - reasons
    name attributes and expectations, never header values.

    NIST AI RMF: MEASURE 2.1 (test sets and their coverage are documented), MEASURE 2.13 (the
    effectiveness of the evaluation itself is measured).

    Limitations: a census, not a sample, so no intervals. Rows excluded before decoding (a split
    value no role uses) are not counted.
    """

    id: ClassVar[str] = "coverage"
    family: ClassVar[str] = "data"
    emits: ClassVar[tuple[str, ...]] = ("coverage.images_read", "coverage.quarantined_fraction")


def split_coverage(dataset: Dataset) -> dict[str, dict[str, Any]]:
    """Per split: rows listed, images read, rows quarantined, their share and the reasons.

    Returns:
        ``{split: {listed, read, quarantined, quarantined_fraction, by_reason, first_rows}}``;
        ``by_reason`` maps each reason to its count, commonest first; ``first_rows`` maps each
        reason to its first :data:`SHOWN_ROWS` manifest rows.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, split in dataset.splits.items():
        entries = [q for q in dataset.quarantine if q.split == name]
        reasons = Counter(q.reason for q in entries)
        first_rows: dict[str, list[int]] = {}
        for entry in entries:
            rows = first_rows.setdefault(entry.reason, [])
            if len(rows) < SHOWN_ROWS:
                rows.append(entry.row)
        listed = split.n + len(entries)
        out[name] = {
            "listed": listed,
            "read": split.n,
            "quarantined": len(entries),
            "quarantined_fraction": len(entries) / listed if listed else 0.0,
            "by_reason": dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
            "first_rows": first_rows,
        }
    return out


def coverage_record(coverage: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``coverage`` entry of ``results.json``'s ``checks`` list."""
    result = CheckResult()
    for split, counts in coverage.items():
        labels = {"split": split}
        result.metrics.append(
            Metric("coverage.images_read", float(counts["read"]), "higher_is_better", labels, n=counts["listed"])
        )
        result.metrics.append(
            Metric(
                "coverage.quarantined_fraction",
                float(counts["quarantined_fraction"]),
                "lower_is_better",
                labels,
                n=counts["listed"],
            )
        )
        for reason, count in counts["by_reason"].items():
            result.findings.append(
                {
                    "kind": "quarantine_reason",
                    "split": split,
                    "reason": reason,
                    "count": count,
                    "rows": list(counts["first_rows"].get(reason, [])),
                }
            )
    return {
        "id": CoverageCheck.id,
        "family": CoverageCheck.family,
        "status": "ok",
        "reason": None,
        "params": {},
        "duration_s": 0.0,
        "metrics": [m.to_json() for m in result.metrics],
        "findings": result.findings,
        "artifacts": [],
        "error": None,
    }


def describe_reasons(counts: Mapping[str, Any], *, limit: int = 5) -> list[str]:
    """``"<count> x <reason> (rows 0, 1, 2, ...)"``, commonest first, for messages and the console."""
    lines = []
    for reason, count in list(counts["by_reason"].items())[:limit]:
        rows = counts["first_rows"].get(reason, [])
        more = ", ..." if count > len(rows) else ""
        lines.append(f"{count} x {reason} (rows {', '.join(str(r) for r in rows)}{more})")
    hidden = len(counts["by_reason"]) - limit
    if hidden > 0:
        lines.append(f"... and {hidden} other reason(s) (results.json: data.quarantine)")
    return lines


def require_readable_eval(coverage: Mapping[str, Mapping[str, Any]], *, data_root: str, manifest: str) -> None:
    """Stop the run when no eval image could be read: there is nothing to audit.

    Raises:
        InputError: with the commonest reasons and, when every file is missing, a hint about
            ``data.root`` and path separators.
    """
    counts = coverage.get("eval")
    if counts is None or counts["read"] > 0:
        return
    reasons = describe_reasons(counts)
    missing = sum(n for reason, n in counts["by_reason"].items() if "FileNotFoundError" in reason)
    hint = ""
    if missing == counts["listed"]:
        hint = (
            f"\n  none of the {missing} files exist: manifest paths are relative to data.root ({data_root});"
            " check data.root and the paths' separators and case"
        )
    raise InputError(
        f"no readable eval image: all {counts['listed']} rows of the eval split in {manifest} were"
        " quarantined, so there is nothing to audit. Commonest reasons:\n  " + "\n  ".join(reasons) + hint
    )
