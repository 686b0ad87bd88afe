"""Render ``results.json`` into ``report.html`` and ``report.pdf``.

Safety (docs/hardening.md): templates come only from this package and autoescape is on; no value
from the results ever lands in a ``src``, ``href`` or ``style`` attribute (anchors are numbered,
CSS classes pass through a whitelist, plots are embedded as ``data:`` URIs of the bundle's own
artifact files); WeasyPrint gets a URL fetcher that serves ``data:`` URIs only, so neither
``file://`` nor the network can be reached while rendering. In a browser, a Content-Security-Policy
meta tag forbids every fetch (``default-src 'none'``) and allows the one packaged inline script by
its hash.

One document, two layouts: the print stylesheet (WeasyPrint, A4) shows what a reviewer signs:
each check's pivot tables, plots, judged rules, findings by kind with a few examples and
limitations; what only the screen shows (``print-hide``: full methods, every finding, long
listings, every subcategory of the control matrix) sits in collapsible sections of the HTML and
in ``metrics.csv``/``findings.csv``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from auditkit.crosswalk import FRAMEWORKS, PREFILLED, is_measured, item_evidence, load_crosswalk, observed_text
from auditkit.policy import load_framework

log = logging.getLogger(__name__)

STATUS_CLASSES = {
    "pass",
    "warn",
    "fail",
    "not_evaluated",
    "met",
    "not_met",
    "attested",
    "not_assessed",
    "ok",
    "skipped",
    "error",
    "not_run",
}
STATUS_WORDS = {
    "pass": "pass",
    "warn": "warn",
    "fail": "FAIL",
    "not_evaluated": "not evaluated",
    "met": "met",
    "not_met": "NOT MET",
    "attested": "attested",
    "not_assessed": "not assessed",
    "ok": "ok",
    "skipped": "skipped",
    "error": "ERROR",
    "not_run": "not run",
}
ARTIFACT_TYPES = {".svg": "image/svg+xml", ".png": "image/png"}
MAX_ARTIFACT_BYTES = 8 * 2**20
MAX_FINDINGS_SHOWN = 25
_DOC_SECTIONS = (
    "Inputs:",
    "Metrics",
    "Findings:",
    "Artifacts:",
    "NIST AI RMF",
    "Args:",
    "Attributes:",
    "Limitations:",
    "Returns:",
    "Raises:",
)


# --------------------------------------------------------------------------- formatting filters
def fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != 0 and (abs(number) >= 1e5 or abs(number) < 1e-3):
        return f"{number:.{digits - 1}e}"
    text = f"{number:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_count(value: Any) -> str:
    """A sample count; counts below 5 print as ``<5`` so a tiny subgroup cannot single anyone out."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 5:
        return "<5"
    return fmt_number(value)


COUNT_METRICS = {"bias.min_group_size"}


def is_count(metric: Mapping[str, Any]) -> bool:
    """Metrics whose value is a subgroup's size, which the report must not print below 5."""
    name = metric.get("name") or metric.get("metric")
    labels = metric.get("labels") or {}
    return name in COUNT_METRICS or (name == "bias.group_metric" and labels.get("metric") == "n")


def fmt_ci(ci: Any) -> str:
    if not ci:
        return "—"
    return f"[{fmt_number(ci[0])}, {fmt_number(ci[1])}]"


def status_class(status: Any) -> str:
    """A CSS class from a fixed set; anything else (a tampered file) gets ``unknown``."""
    return f"st-{status}" if status in STATUS_CLASSES else "st-unknown"


def status_word(status: Any) -> str:
    return STATUS_WORDS.get(str(status), str(status))


def fmt_labels(labels: Mapping[str, Any] | None) -> str:
    if not labels:
        return "overall"
    return ", ".join(f"{k}={v}" for k, v in labels.items())


# --------------------------------------------------------------------------- check docs
@dataclass
class CheckDoc:
    summary: str = ""
    method: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    informs: str = ""


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("``", "").replace(":class:", "").replace("`", "")).strip()


_TASK_PARAGRAPHS = {  # how a check's docstring opens the paragraphs about one task
    "multilabel": ("Multi-label",),
    "regression": ("Regression", "Multi-label and regression"),
    "segmentation": ("Segmentation",),
}


def method_for_task(paragraphs: Sequence[str], task: str) -> list[str]:
    """The method paragraphs that concern ``task``: a paragraph opening with another task's name
    ("Regression models (...)", "Segmentation findings add ...") is left out of this report."""
    kept = []
    for paragraph in paragraphs:
        tasks = {t for t, openings in _TASK_PARAGRAPHS.items() if paragraph.startswith(openings)}
        if not tasks or task in tasks:
            kept.append(paragraph)
    return kept


def parse_docstring(doc: str | None) -> CheckDoc:
    """Summary, method paragraphs, limitations and the AI RMF line of a check's docstring."""
    if not doc:
        return CheckDoc()
    import inspect

    text = inspect.cleandoc(doc)
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    result = CheckDoc(summary=_clean(paragraphs[0]))
    for paragraph in paragraphs[1:]:
        stripped = paragraph.strip()
        if stripped.startswith("NIST AI RMF"):
            result.informs = _clean(stripped.split(":", 1)[1] if ":" in stripped else stripped)
        elif stripped.startswith("Limitations:"):
            body = stripped[len("Limitations:") :]
            items = [_clean(i) for i in re.split(r"\n\s*-\s+", "\n" + body) if _clean(i)]
            result.limitations.extend(items)
        elif not stripped.startswith(_DOC_SECTIONS):
            result.method.append(_clean(stripped))
    return result


def _check_docs(ids: Sequence[str]) -> dict[str, CheckDoc]:
    from auditkit.registry import discover, docstrings, source_docstring

    # Read from the checks' source: importing them would import torch and the attack libraries.
    docs = {"coverage": source_docstring("auditkit.coverage:CoverageCheck") or ""}  # the engine's own
    try:
        docs.update(docstrings([cid for cid in ids if cid not in docs]))
        if any(cid not in docs for cid in ids):
            classes, _ = discover()
            docs.update({cid: cls.__doc__ or "" for cid, cls in classes.items() if cid not in docs})
    except Exception:  # the report must render even when plugins are broken
        pass
    return {cid: parse_docstring(docs[cid]) if cid in docs else CheckDoc() for cid in ids}


# --------------------------------------------------------------------------- view model
def _embed_artifacts(bundle: Path, artifacts: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Plots of a check as ``data:`` URIs, read only from inside ``bundle/artifacts``."""
    figures = []
    root = (bundle / "artifacts").resolve()
    for artifact in artifacts:
        rel = str(artifact.get("path", ""))
        target = (bundle / rel).resolve()
        media = ARTIFACT_TYPES.get(target.suffix.lower())
        if media is None or not target.is_relative_to(root) or not target.is_file():
            continue
        if target.stat().st_size > MAX_ARTIFACT_BYTES:
            continue
        payload = base64.b64encode(target.read_bytes()).decode("ascii")
        figures.append(
            {
                "uri": f"data:{media};base64,{payload}",
                "caption": str(artifact.get("description") or artifact.get("name") or ""),
            }
        )
    return figures


def _metric_tables(metrics: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metrics grouped by their label keys: one table for unlabelled ones, one per key set."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for metric in metrics:
        key = tuple((metric.get("labels") or {}).keys())
        groups.setdefault(key, []).append(metric)
    tables = []
    for keys, rows in groups.items():
        tables.append(
            {
                "label_keys": list(keys),
                "rows": rows,
                "title": "Overall" if not keys else "By " + ", ".join(keys),
            }
        )
    tables.sort(key=lambda t: len(t["label_keys"]))  # type: ignore[arg-type]
    return tables


MAX_LISTING_PRINTED = 12  # a listing of metrics no pivot shows: longer ones are on screen only
MAX_FINDINGS_PRINTED = 2  # per kind, in the PDF; the screen shows up to MAX_FINDINGS_SHOWN of each


def _findings_view(findings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A check's findings by kind, in the order the check emitted them: each kind's count and its
    first findings (the PDF prints the first :data:`MAX_FINDINGS_PRINTED`; the rest are on screen
    and in ``findings.csv``)."""
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for finding in findings:
        kinds.setdefault(str(finding.get("kind", "finding")), []).append(finding)
    view = []
    for kind, found in kinds.items():
        shown = [[(str(k), _short(v)) for k, v in f.items() if k != "kind"] for f in found[:MAX_FINDINGS_SHOWN]]
        view.append({"kind": kind, "count": len(found), "shown": shown, "more": len(found) - len(shown)})
    return {"kinds": view, "total": len(findings), "printed": MAX_FINDINGS_PRINTED}


def _short(value: Any, limit: int = 160) -> str:
    if isinstance(value, float):
        text = fmt_number(value)
    elif isinstance(value, list) and len(value) > 12:
        text = ", ".join(_short(v, 20) for v in value[:12]) + f", … ({len(value)} in all)"
    elif isinstance(value, list):
        text = ", ".join(_short(v, 40) for v in value)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _risks(results: Mapping[str, Any]) -> list[str]:
    """The top risks in plain words, most severe first."""
    risks = []
    for rule in results.get("rules", []):
        if rule.get("status") not in ("fail", "warn"):
            continue
        bound = "at most" if rule.get("bound") == "max" else "at least"
        judged = {
            "value": "",
            "ci_high": " (upper end of the 95% interval)",
            "ci_low": " (lower end of the 95% interval)",
        }.get(rule.get("use", "value"), "")
        where = fmt_labels(rule.get("labels"))
        risks.append(
            f"{'Failed' if rule['status'] == 'fail' else 'Warning'} {rule['id']}: {rule['metric']}"
            f" ({where}) is {fmt_number(rule.get('observed'))}{judged}; the policy asks for {bound}"
            f" {fmt_number(rule.get('threshold'))}. {rule.get('rationale', '')}".strip()
        )
    risks.sort(key=lambda r: not r.startswith("Failed"))
    for check in results.get("checks", []):
        if check.get("status") == "error":
            error = check.get("error") or {}
            risks.insert(
                0,
                f"Check {check['id']} could not run ({error.get('type')}): its rules are not evaluated.",
            )
    quarantine = results.get("data", {}).get("quarantine", [])
    if quarantine:
        risks.append(
            f"{len(quarantine)} image file(s) could not be decoded and were excluded from every"
            " measurement; see the appendix for the reasons."
        )
    return risks


# --------------------------------------------------------------------------- pivot tables
# Multi-label and regression audits measure each figure per label (or output) and per group, so a
# listing of one row per metric runs to dozens of pages. Their check sections lead instead with
# pivot tables built from the check's metrics in results.json: a metric's label keys pick its row
# and column, so every cell is one metric of that file, with its 95% interval beneath. Undefined
# values print as a dash and are counted in one line under the table (their reasons are in
# metrics.csv); a row with no defined value is left out and named in that line. Classification
# sections keep the listing.
PIVOT_TASKS = frozenset({"classification", "multilabel", "regression", "segmentation"})
_ABSENT = ""  # the key of a metric whose labels lack a pivot key (e.g. one output: no ``output``)
METRIC_WORDS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "aupr": "AUPR",
    "aupr_in": "AUPR-in",
    "fpr_at_95_tpr": "FPR at 95% TPR",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "macro_auroc": "Macro AUROC",
    "mae": "MAE",
    "rmse": "RMSE",
    "mean_error": "Mean error",
    "r2": "R²",
    "mae_ratio": "MAE ratio",
    "ece": "ECE",
    "mce": "MCE",
    "ace": "ACE",
    "brier": "Brier",
    "nll": "NLL",
    "ece_after_temperature": "ECE after temperature",
    "underdiagnosis_rate": "Underdiagnosis rate",
    "equalized_odds_difference": "Equalized odds difference",
    "demographic_parity_difference": "Demographic parity difference",
    "min_group_size": "Smallest group (n)",
    "metadata_auc": "AUROC",
    "metadata_r2": "R²",
    "recommended_auroc": "AUROC",
    "recommended_fpr_at_95_tpr": "FPR at 95% TPR",
    "n": "n",
    "images_read": "Images read",
    "quarantined_fraction": "Quarantined (share)",
    "patient_overlap": "Patients in both",
    "study_overlap": "Studies in both",
    "series_overlap": "Series in both",
    "exact_duplicates": "Exact duplicates",
    "near_duplicates": "Near duplicates",
    "trigger_norm": "Trigger norm",
    "trigger_success_rate": "Trigger success",
    "trigger_excursion": "Excursion",
    "anomaly_index": "Anomaly index",
    "activation_clustering": "Activation clustering",
    "spectral_signature": "Spectral signature",
    "neighbourhood": "Neighbourhood",
    "strip": "STRIP",
    "stamp": "Stamp",
}


def metric_word(measure: str) -> str:
    """A column or row heading for a metric (``auroc`` -> ``AUROC``); unknown names as written."""
    return METRIC_WORDS.get(measure, measure.replace("_", " "))


def label_key(metric: Mapping[str, Any], key: str) -> str:
    """The value of one pivot key of a metric.

    ``name`` is the metric's name; ``measure`` is what it measures: its ``metric`` label when it has
    one (``bias.max_gap {metric: sensitivity}`` -> ``sensitivity``), else the last part of its
    name (``performance.auroc`` -> ``auroc``); any other key is that label's value, or ``""`` when
    the metric has no such label.
    """
    labels = metric.get("labels") or {}
    name = str(metric.get("name", ""))
    if key == "name":
        return name
    if key == "measure":
        return str(labels.get("metric") or name.rsplit(".", 1)[-1])
    value = labels.get(key)
    return _ABSENT if value is None else str(value)


@dataclass(frozen=True)
class Select:
    """Metrics of one name whose label keys are exactly ``keys``, optionally with some label values."""

    name: str
    keys: frozenset[str] = frozenset()
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def matches(self, metric: Mapping[str, Any]) -> bool:
        labels = metric.get("labels") or {}
        if metric.get("name") != self.name or set(labels) != self.keys:
            return False
        return all(str(labels.get(key)) in allowed for key, allowed in self.where)


def describe_selects(selects: Sequence[Select]) -> str:
    """``a.x, a.y {label}; b.z {group, group_by}``: the metrics a table shows, by their label keys."""
    by_keys: dict[tuple[frozenset[str], tuple[tuple[str, tuple[str, ...]], ...]], list[str]] = {}
    for item in selects:
        by_keys.setdefault((item.keys, item.where), []).append(item.name)
    parts = []
    for (keys, where), names in by_keys.items():
        text = ", ".join(dict.fromkeys(names)) + (" {" + ", ".join(sorted(keys)) + "}" if keys else "")
        text += "".join(f" with {key} " + "/".join(allowed) for key, allowed in where)
        parts.append(text)
    return "; ".join(parts)


def select(name: str, *keys: str, **where: Sequence[str]) -> Select:
    return Select(name, frozenset(keys), tuple((k, tuple(v)) for k, v in where.items()))


@dataclass
class PivotSpec:
    """One pivot table: which metrics, which of their keys make the rows and the columns."""

    title: str
    selects: tuple[Select, ...]
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    row_header: tuple[str, ...]
    absent: Mapping[str, str] = field(default_factory=dict)  # how a missing key reads, per key
    note: str = ""
    n_column: bool = False  # a column with the n of each row's first defined value
    label_counts: bool = False  # known/unknown entries per label from data.splits.eval.class_counts
    # rows, columns and row headings when the columns would not fit an A4 page (many labels or
    # outputs): the label moves from the columns into the rows
    narrow: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None
    printed: bool = True  # False: on screen only (the PDF has a shorter view of the same figures)


MAX_PIVOT_COLUMNS = 8  # value columns that fit the width of an A4 page with their intervals


def pivot(
    metrics: Sequence[Mapping[str, Any]], selects: Sequence[Select], rows: Sequence[str], cols: Sequence[str]
) -> tuple[
    list[tuple[str, ...]], list[tuple[str, ...]], dict[tuple[tuple[str, ...], tuple[str, ...]], Mapping[str, Any]]
]:
    """Pivot the metrics that ``selects`` matches by the keys ``rows`` x ``cols``.

    Returns the row keys and the column keys, each ordered by the first appearance of each key's
    values in ``metrics`` (the order the check emitted them), and the cell -> metric mapping. A
    second metric for a cell already taken is not placed (it stays with the check's listing).
    """
    order: dict[str, dict[str, int]] = {key: {} for key in (*rows, *cols)}
    cells: dict[tuple[tuple[str, ...], tuple[str, ...]], Mapping[str, Any]] = {}
    for metric in metrics:
        if not any(s.matches(metric) for s in selects):
            continue
        row = tuple(label_key(metric, key) for key in rows)
        col = tuple(label_key(metric, key) for key in cols)
        for key, value in zip((*rows, *cols), (*row, *col), strict=True):
            order[key].setdefault(value, len(order[key]))
        cells.setdefault((row, col), metric)

    def rank(keys: Sequence[str], value: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(order[k][v] for k, v in zip(keys, value, strict=True))

    row_keys = sorted({r for r, _ in cells}, key=lambda r: rank(rows, r))
    col_keys = sorted({c for _, c in cells}, key=lambda c: rank(cols, c))
    return row_keys, col_keys, cells


def _reason_key(reason: str) -> str:
    """Reasons that differ only in their numbers count as one (``group has 27 images`` / ``28``)."""
    return re.sub(r"\d+", "#", reason)


def undefined_summary(metrics: Sequence[Mapping[str, Any]], what: str = "value") -> str:
    """One line for undefined metrics: how many, and why, most frequent reason first."""
    if not metrics:
        return ""
    reasons: dict[str, list[str]] = {}
    for metric in metrics:
        reason = str(metric.get("reason") or "no reason given")
        reasons.setdefault(_reason_key(reason), []).append(reason)
    ranked = sorted(reasons.values(), key=lambda found: -len(found))
    parts = []
    for found in ranked[:4]:
        text = _short(found[0], 120) + (" (or a similar count)" if len(set(found)) > 1 else "")
        parts.append(f"{text} ({len(found)})" if len(ranked) > 1 else text)
    if len(ranked) > 4:
        parts.append(f"{len(ranked) - 4} other reasons ({sum(len(f) for f in ranked[4:])})")
    counted = f"{len(metrics)} {what}" + ("s" if len(metrics) != 1 else "")
    return f"{counted} undefined: " + "; ".join(parts) + "; listed with their reasons in metrics.csv."


def _rule_index(rules: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    index: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for rule in rules:
        if rule.get("status") in ("pass", "warn", "fail") and rule.get("labels") is not None:
            key = (str(rule.get("metric")), repr(sorted((rule.get("labels") or {}).items())))
            index.setdefault(key, []).append(rule)
    return index


def _judged(
    metric: Mapping[str, Any], rules: Mapping[tuple[str, str], list[Mapping[str, Any]]]
) -> list[Mapping[str, Any]]:
    key = (str(metric.get("name")), repr(sorted((metric.get("labels") or {}).items())))
    return list(rules.get(key, []))


def _as_int(value: Any) -> int:
    """A count from results.json; anything that is not a number (a tampered file) counts 0."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _cell(metric: Mapping[str, Any] | None, judged: list[Mapping[str, Any]]) -> dict[str, Any]:
    if metric is None:
        return {"text": "", "ci": "", "undefined": False, "judged": []}
    value = metric.get("value")
    if value is None:
        return {"text": "—", "ci": "", "undefined": True, "judged": judged}
    text = fmt_count(_as_int(value)) if is_count(metric) else fmt_number(value)
    ci = metric.get("ci")
    ci_text = fmt_ci(ci) if ci else ""
    return {"text": text, "ci": ci_text, "undefined": False, "judged": judged}


def build_pivot(
    spec: PivotSpec,
    metrics: Sequence[Mapping[str, Any]],
    rules: Mapping[tuple[str, str], list[Mapping[str, Any]]],
    *,
    words: Mapping[str, Mapping[str, str]],
    label_counts: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, set[int]]:
    """The view of one pivot table and the ids of the metrics it shows (None: nothing matched)."""
    row_keys, col_keys, cells = pivot(metrics, spec.selects, spec.rows, spec.cols)
    if not cells:
        return None, set()
    if spec.narrow is not None and len(col_keys) > MAX_PIVOT_COLUMNS:
        rows, cols, header = spec.narrow
        narrow = replace(spec, rows=rows, cols=cols, row_header=header, narrow=None)
        return build_pivot(narrow, metrics, rules, words=words, label_counts=label_counts)
    # A column none of whose values is defined (a grouping whose groups are all below the minimum
    # size) is left out, named in a note; its values are counted with the other undefined ones.
    empty_columns = [
        col
        for col in col_keys
        if all(cells[(row, col)].get("value") is None for row in row_keys if (row, col) in cells)
    ]
    if len(empty_columns) < len(col_keys):
        col_keys = [col for col in col_keys if col not in empty_columns]
    else:
        empty_columns = []
    used = {id(m) for m in cells.values()}

    def word(key: str, value: str) -> str:
        if value == _ABSENT:
            return spec.absent.get(key, "")
        if key in ("measure", "name"):
            return metric_word(value) if key in ("measure", "method") else value
        return words.get(key, {}).get(value, value)

    rows_view = []
    undefined: list[Mapping[str, Any]] = [
        metric for (_, col), metric in cells.items() if col in empty_columns and metric.get("value") is None
    ]
    dropped: list[str] = []
    judged_rules: list[Mapping[str, Any]] = []
    previous: tuple[str, ...] = ()
    for row in row_keys:
        row_metrics = [cells.get((row, col)) for col in col_keys]
        present = [m for m in row_metrics if m is not None]
        heads = [word(k, v) for k, v in zip(spec.rows, row, strict=True)]
        if all(m.get("value") is None for m in present):
            dropped.append(" · ".join(h for h in heads if h))
            undefined.extend(present)
            continue
        undefined.extend(m for m in present if m.get("value") is None)
        row_cells = []
        for metric in row_metrics:
            judged = _judged(metric, rules) if metric is not None else []
            judged_rules.extend(judged)
            row_cells.append(_cell(metric, judged))
        shown = [
            h if (i + 1 == len(heads) or tuple(row[: i + 1]) != previous[: i + 1]) else "" for i, h in enumerate(heads)
        ]
        extra = []
        if spec.n_column:
            first = next((m for m in present if m.get("value") is not None), None)
            extra.append(fmt_count(first.get("n")) if first is not None else "—")
        if spec.label_counts:
            counts = (label_counts or {}).get(row[-1])
            known = (
                _as_int(counts.get("positive")) + _as_int(counts.get("negative")) if isinstance(counts, Mapping) else 0
            )
            if isinstance(counts, Mapping) and "positive" in counts:
                # whole-split totals, as the data section prints them (not a subgroup's size)
                extra.append(f"{fmt_number(known)} ({fmt_number(_as_int(counts.get('positive')))} pos.)")
                extra.append(fmt_number(_as_int(counts.get("unknown"))))
            else:
                extra.extend(["—", "—"])
        block = bool(previous) and len(row) > 1 and row[0] != previous[0]
        rows_view.append({"heads": shown, "cells": row_cells, "extra": extra, "block": block})
        previous = row
    # column headings: with two column keys, the first spans its columns
    columns = [word(spec.cols[-1], col[-1]) for col in col_keys]
    groups: list[dict[str, Any]] = []
    if len(spec.cols) > 1:
        for col in col_keys:
            text = " · ".join(word(k, v) for k, v in zip(spec.cols[:-1], col[:-1], strict=True))
            if groups and groups[-1]["key"] == col[:-1]:
                groups[-1]["span"] += 1
            else:
                groups.append({"key": col[:-1], "text": text, "span": 1})
    extra_header = (["n"] if spec.n_column else []) + (["Known", "Unknown"] if spec.label_counts else [])
    notes = [spec.note] if spec.note else []
    if undefined:
        notes.append(undefined_summary(undefined))
    if dropped:
        names = ", ".join(dropped[:8]) + (f" and {len(dropped) - 8} more" if len(dropped) > 8 else "")
        notes.append(f"Rows left out because none of their values is defined: {names}.")
    if empty_columns:
        names = ", ".join(" · ".join(word(k, v) for k, v in zip(spec.cols, col, strict=True)) for col in empty_columns)
        notes.append(f"Columns left out because none of their values is defined: {names}.")
    if judged_rules:
        marks = [f"{r['id']} ({status_word(r.get('status'))})" for r in judged_rules]
        notes.append("Marked values are the ones a policy rule judged: " + ", ".join(dict.fromkeys(marks)) + ".")
    source = "From results.json: " + describe_selects(spec.selects) + "."
    view = {
        "title": spec.title,
        "printed": spec.printed,
        "row_header": list(spec.row_header),
        "groups": [{"text": g["text"], "span": g["span"]} for g in groups],
        "columns": columns,
        "extra_header": extra_header,
        "rows": rows_view,
        "notes": notes,
        "source": source,
    }
    return view, used


@dataclass
class CheckLayout:
    """How a check's section reads for one task: pivot tables, headline lines, summarised metrics."""

    pivots: list[PivotSpec] = field(default_factory=list)
    headline: list[Select] = field(default_factory=list)
    summarise: list[Select] = field(default_factory=list)  # counted in one line; rows in metrics.csv


_OOD = PivotSpec(
    "Detection of each out-of-distribution set",
    tuple(select(f"ood.{m}", "detector", "ood_set") for m in ("auroc", "aupr", "aupr_in", "fpr_at_95_tpr")),
    rows=("ood_set", "detector"),
    cols=("measure",),
    row_header=("Set", "Detector"),
)
_OOD_AUROC = PivotSpec(
    "AUROC of each detector on each set",
    (select("ood.auroc", "detector", "ood_set"),),
    rows=("detector",),
    cols=("ood_set",),
    row_header=("Detector",),
    note="AUPR, AUPR-in and the FPR at 95% TPR of every detector on every set are in report.html and metrics.csv.",
)
_OOD_RECOMMENDED = PivotSpec(
    "The recommended detector on each set",
    (
        select("ood.recommended_auroc", "detector", "ood_set"),
        select("ood.recommended_fpr_at_95_tpr", "detector", "ood_set"),
    ),
    rows=("ood_set", "detector"),
    cols=("measure",),
    row_header=("Set", "Detector"),
)


def _rule_measures(rules: Sequence[Mapping[str, Any]], check_id: str) -> list[str]:
    """The ``metric`` labels that this check's rules judge (``bias.max_gap {metric: sensitivity}``)."""
    measures = []
    for rule in rules:
        labels = rule.get("labels") or {}
        if str(rule.get("metric", "")).startswith(check_id + ".") and labels.get("metric"):
            measures.append(str(labels["metric"]))
    return list(dict.fromkeys(measures))


_FIGURES = {  # each task's figure under corruption and under attack: (metric word, what it is)
    "classification": ("accuracy", "accuracy"),
    "multilabel": ("macro_auroc", "macro AUROC"),
    "regression": ("mae", "MAE"),
    "segmentation": ("mean_dice", "mean Dice"),
}
_ADVERSARIAL_FIGURES = {
    "classification": "accuracy",
    "multilabel": "macro_auroc",
    "regression": "mae",
    "segmentation": "dice",
}


def _common_layouts(task: str) -> dict[str, CheckLayout]:
    """The checks whose tables have the same shape for every task: coverage, corruption x severity,
    attack x eps, the leakage overlaps, PHI counts and the backdoor's class x method."""
    corrupted, word = _FIGURES.get(task, _FIGURES["classification"])
    attacked = _ADVERSARIAL_FIGURES.get(task, "accuracy")
    attacked_word = "accuracy" if attacked == "accuracy" else METRIC_WORDS.get(attacked, attacked)
    return {
        "coverage": CheckLayout(
            pivots=[
                PivotSpec(
                    "Images read and quarantined per split",
                    (select("coverage.images_read", "split"), select("coverage.quarantined_fraction", "split")),
                    rows=("split",),
                    cols=("measure",),
                    row_header=("Split",),
                )
            ]
        ),
        "corruption": CheckLayout(
            pivots=[
                PivotSpec(
                    f"{word[0].upper()}{word[1:]} under each corruption, by severity",
                    (select(f"corruption.{corrupted}", "corruption", "severity"),),
                    rows=("corruption",),
                    cols=("severity",),
                    row_header=("Corruption",),
                    note=f"Severity 0 (corruption none) is the clean {word} on the same images.",
                ),
                PivotSpec(
                    f"Relative drop in {word}, by severity",
                    (select("corruption.relative_drop", "corruption", "severity"),),
                    rows=("corruption",),
                    cols=("severity",),
                    row_header=("Corruption",),
                    note=f"The change of {word} against the clean images, relative to it (worse is positive).",
                    printed=False,
                ),
            ],
            headline=[select("corruption.mean_relative_drop")],
        ),
        "adversarial": CheckLayout(
            pivots=[
                PivotSpec(
                    f"Robust {attacked_word}, by attack and budget (eps)",
                    (select(f"adversarial.robust_{attacked}", "attack", "eps"),),
                    rows=("attack",),
                    cols=("eps",),
                    row_header=("Attack",),
                    n_column=True,
                    note="eps of the L-infinity attacks is in image intensity ([0, 1]); of the L2 attacks (pgd_l2,"
                    " cw_l2) in L2 norm.",
                ),
                PivotSpec(
                    "Attack success rate, by attack and budget (eps)",
                    (select("adversarial.attack_success_rate", "attack", "eps"),),
                    rows=("attack",),
                    cols=("eps",),
                    row_header=("Attack",),
                    note="Of the images the model classified correctly, the share the attack flipped.",
                    printed=False,
                ),
            ],
            headline=[select(f"adversarial.clean_{attacked}"), select("adversarial.gradient_masking_suspected")],
        ),
        "leakage": CheckLayout(
            pivots=[
                PivotSpec(
                    "Overlap and duplicates",
                    tuple(
                        select(f"leakage.{m}")
                        for m in (
                            "patient_overlap",
                            "study_overlap",
                            "series_overlap",
                            "exact_duplicates",
                            "near_duplicates",
                        )
                    ),
                    rows=(),
                    cols=("measure",),
                    row_header=(),
                    note="Between the eval and the train split: patients, studies and series in both, and image"
                    " pairs that are identical or near-identical.",
                ),
                PivotSpec(
                    "Duplicates within a split",
                    (
                        select("leakage.exact_duplicates", "scope", "split"),
                        select("leakage.near_duplicates", "scope", "split"),
                    ),
                    rows=("split",),
                    cols=("measure",),
                    row_header=("Split",),
                ),
            ]
        ),
        "backdoor": CheckLayout(
            pivots=[
                PivotSpec(
                    "Share of each class's training images flagged, by method",
                    (select("backdoor.suspicious_fraction", "class", "method"),),
                    rows=("class",),
                    cols=("method",),
                    row_header=("Class",),
                ),
                PivotSpec(
                    "Trigger search per target class",
                    tuple(
                        select(f"backdoor.{m}", "class")
                        for m in ("trigger_norm", "trigger_success_rate", "trigger_excursion", "anomaly_index")
                    ),
                    rows=("class",),
                    cols=("measure",),
                    row_header=("Target class",),
                ),
            ],
            headline=[select("backdoor.model_suspected"), select("backdoor.strip_entropy_gap")],
        ),
        "phi": CheckLayout(
            headline=[
                select("phi.files_with_identifiers"),
                select("phi.burned_in_annotation_files"),
                select("phi.identity_not_removed_files"),
            ]
        ),
    }


def task_layouts(task: str, model: Mapping[str, Any], rules: Sequence[Mapping[str, Any]]) -> dict[str, CheckLayout]:
    """The pivot layout of each built-in check for one task: the task's own tables (per label,
    output or class; per group) after the ones every task shares (:func:`_common_layouts`); a
    check in both gets the shared pivots first."""
    layouts = _common_layouts(task)
    for check_id, own in _task_layouts(task, model, rules).items():
        shared = layouts.get(check_id)
        if shared is None:
            layouts[check_id] = own
        else:
            layouts[check_id] = CheckLayout(
                pivots=[*shared.pivots, *own.pivots],
                headline=[*shared.headline, *own.headline],
                summarise=[*shared.summarise, *own.summarise],
            )
    return layouts


def _task_layouts(task: str, model: Mapping[str, Any], rules: Sequence[Mapping[str, Any]]) -> dict[str, CheckLayout]:
    """The layouts of a task's own tables (:func:`task_layouts` adds the shared ones)."""
    if task == "multilabel":
        per_label = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")
        per_group = list(dict.fromkeys(["sensitivity", "specificity", *_rule_measures(rules, "bias")]))
        per_group = [m for m in per_group if m != "underdiagnosis_rate"]
        return {
            "performance": CheckLayout(
                pivots=[
                    PivotSpec(
                        "Performance per label",
                        tuple(select(f"performance.{m}", "label") for m in per_label),
                        rows=("label",),
                        cols=("measure",),
                        row_header=("Label",),
                        label_counts=True,
                        note="Sensitivity, specificity, PPV and NPV at each label's threshold (the operating"
                        " point finding); an unknown entry is left out of its label's figures. Known: the"
                        " eval images whose entry for the label is 1 or 0 (positives in brackets).",
                    )
                ],
                headline=[select("performance.macro_auroc")],
            ),
            "calibration": CheckLayout(
                pivots=[
                    PivotSpec(
                        "Calibration per label",
                        tuple(
                            select(f"calibration.{m}", "label")
                            for m in ("ece", "ace", "mce", "brier", "nll", "ece_after_temperature")
                        ),
                        rows=("label",),
                        cols=("measure",),
                        row_header=("Label",),
                        n_column=True,
                    ),
                    PivotSpec(
                        "Calibration per group and label",
                        (
                            select("calibration.ece", "group", "group_by", "label"),
                            select("calibration.brier", "group", "group_by", "label"),
                        ),
                        rows=("group_by", "group"),
                        cols=("measure", "label"),
                        row_header=("Grouping", "Group"),
                        narrow=(("group_by", "group", "label"), ("measure",), ("Grouping", "Group", "Label")),
                    ),
                ]
            ),
            "bias": CheckLayout(
                pivots=[
                    PivotSpec(
                        "Largest gap between the groups of each grouping, per label",
                        (
                            select("bias.max_gap", "group_by", "label", "metric"),
                            select("bias.equalized_odds_difference", "group_by", "label"),
                            select("bias.demographic_parity_difference", "group_by", "label"),
                            select("bias.max_gap", "group_by", "metric"),
                            select("bias.min_group_size", "group_by"),
                        ),
                        rows=("measure", "label"),
                        cols=("group_by",),
                        row_header=("Gap in", "Label"),
                        absent={"label": "all labels"},
                        note="Each value is the largest difference between two groups of the grouping, with"
                        " its simultaneous 95% interval; the underdiagnosis rate is per image (all labels).",
                    ),
                    PivotSpec(
                        "Per group and label: "
                        + ", ".join(metric_word(m) for m in per_group)
                        + ", underdiagnosis rate",
                        (
                            select("bias.underdiagnosis_rate", "group", "group_by"),
                            select("bias.group_metric", "group", "group_by", "label", "metric", metric=per_group),
                        ),
                        rows=("group_by", "group"),
                        cols=("measure", "label"),
                        row_header=("Grouping", "Group"),
                        absent={"label": "all labels"},
                        narrow=(("group_by", "group", "label"), ("measure",), ("Grouping", "Group", "Label")),
                        note="Underdiagnosis rate: the share of a group's images with at least one true"
                        " finding that the model calls finding-free.",
                    ),
                ],
                summarise=[select("bias.group_metric", "group", "group_by", "label", "metric")],
            ),
            "leakage": CheckLayout(
                pivots=[
                    PivotSpec(
                        "Metadata shortcuts: AUROC of each label from a metadata column",
                        (select("leakage.metadata_auc", "column", "label"), select("leakage.metadata_auc", "column")),
                        rows=("column",),
                        cols=("label",),
                        row_header=("Column",),
                        absent={"label": "largest"},
                        narrow=(("column", "label"), ("measure",), ("Column", "Label")),
                    )
                ]
            ),
            "ood": CheckLayout(pivots=[_OOD_RECOMMENDED, _OOD_AUROC, replace(_OOD, printed=False)]),
        }
    if task == "regression":
        outputs = [str(c) for c in model.get("classes") or []]
        units = model.get("units") or {}
        only = outputs[0] if len(outputs) == 1 else ""
        only_word = f"{only} ({units[only]})" if only and units.get(only) else only
        unit_note = (
            " MAE, RMSE, mean error and their gaps are in the output's unit (in brackets); R² and the MAE"
            " ratio have none. Mean error = prediction - target (positive: the model over-estimates)."
        )
        measures = ("mae", "rmse", "mean_error", "r2")
        return {
            "performance": CheckLayout(
                pivots=[
                    PivotSpec(
                        "Performance per output",
                        tuple(select(f"performance.{m}", "output") for m in measures)
                        + tuple(select(f"performance.{m}") for m in measures),
                        rows=("output",),
                        cols=("measure",),
                        row_header=("Output",),
                        absent={"output": only_word},
                        n_column=True,
                        note="MAE, RMSE and mean error are in the output's unit (in brackets); R² has none."
                        " Mean error = prediction - target (positive: the model over-estimates).",
                    )
                ]
            ),
            "bias": CheckLayout(
                pivots=[
                    PivotSpec(
                        "Error per group",
                        (
                            select(
                                "bias.group_metric",
                                "group",
                                "group_by",
                                "metric",
                                "output",
                                metric=("mae", "mean_error", "n"),
                            ),
                        ),
                        rows=("group_by", "group"),
                        cols=("output", "measure"),
                        row_header=("Grouping", "Group"),
                        narrow=(("group_by", "group", "output"), ("measure",), ("Grouping", "Group", "Output")),
                    ),
                    PivotSpec(
                        "Largest gap between the groups of each grouping",
                        (
                            select("bias.max_gap", "group_by", "metric", "output"),
                            select("bias.min_group_size", "group_by"),
                        ),
                        rows=("group_by",),
                        cols=("output", "measure"),
                        row_header=("Grouping",),
                        narrow=(("group_by", "output"), ("measure",), ("Grouping", "Output")),
                        note="Each gap is the largest difference between two groups (MAE ratio: the largest"
                        " MAE over the smallest), with its simultaneous 95% interval." + unit_note,
                    ),
                ],
                summarise=[select("bias.group_metric", "group", "group_by", "metric", "output")],
            ),
            "leakage": CheckLayout(
                pivots=[
                    PivotSpec(
                        "Metadata shortcuts: R² of each output from a metadata column",
                        (select("leakage.metadata_r2", "column", "output"), select("leakage.metadata_r2", "column")),
                        rows=("column",),
                        cols=("output",),
                        row_header=("Column",),
                        absent={"output": "largest"},
                        narrow=(("column", "output"), ("measure",), ("Column", "Output")),
                    )
                ]
            ),
            "ood": CheckLayout(pivots=[_OOD_RECOMMENDED, _OOD_AUROC, replace(_OOD, printed=False)]),
        }
    if task == "segmentation":
        return _segmentation_layouts()
    if task == "classification":
        return _classification_layouts(rules)
    return {}


_PERFORMANCE_MEASURES = ("accuracy", "balanced_accuracy", "auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")
_GROUP_MEASURES = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "auroc", "ece")
_CALIBRATION_MEASURES = ("ece", "ace", "mce", "brier", "nll")


def _classification_layouts(rules: Sequence[Mapping[str, Any]]) -> dict[str, CheckLayout]:
    """The pivot layout of each built-in check for a single-label classifier."""
    gap_measures = list(dict.fromkeys([*_rule_measures(rules, "bias"), *_GROUP_MEASURES]))
    return {
        "performance": CheckLayout(
            pivots=[
                PivotSpec(
                    "Performance on the eval split",
                    tuple(select(f"performance.{m}") for m in _PERFORMANCE_MEASURES),
                    rows=(),
                    cols=("measure",),
                    row_header=(),
                    n_column=True,
                    note="Binary figures are of the positive class at the operating point (the operating_point"
                    " finding); accuracy and balanced accuracy over every class.",
                ),
                PivotSpec(
                    "Per class (one-vs-rest)",
                    tuple(select(f"performance.{m}", "class") for m in _PERFORMANCE_MEASURES),
                    rows=("class",),
                    cols=("measure",),
                    row_header=("Class",),
                    n_column=True,
                ),
            ],
            headline=[select("performance.macro_auroc"), select("performance.claim_shortfall")],
        ),
        "calibration": CheckLayout(
            pivots=[
                PivotSpec(
                    "Calibration on the eval split",
                    tuple(select(f"calibration.{m}") for m in (*_CALIBRATION_MEASURES, "ece_after_temperature")),
                    rows=(),
                    cols=("measure",),
                    row_header=(),
                    n_column=True,
                    note="ECE after temperature: the same data after one temperature fitted by cross-validation"
                    " (the temperature_scaling finding), what recalibration could recover.",
                ),
                PivotSpec(
                    "Calibration per group",
                    tuple(select(f"calibration.{m}", "group", "group_by") for m in _CALIBRATION_MEASURES),
                    rows=("group_by", "group"),
                    cols=("measure",),
                    row_header=("Grouping", "Group"),
                    n_column=True,
                ),
            ]
        ),
        "bias": CheckLayout(
            pivots=[
                PivotSpec(
                    "Largest gap between the groups of each grouping",
                    (
                        *(select("bias.max_gap", "group_by", "metric", metric=[m]) for m in gap_measures),
                        select("bias.equalized_odds_difference", "group_by"),
                        select("bias.demographic_parity_difference", "group_by"),
                        select("bias.min_group_size", "group_by"),
                    ),
                    rows=("measure",),
                    cols=("group_by",),
                    row_header=("Gap in",),
                    note="Each gap is the largest difference between two groups of the grouping, with its"
                    " simultaneous 95% interval over the grouping's pairs; groups below the minimum size are"
                    " left out of the gaps.",
                ),
                PivotSpec(
                    "Per group",
                    tuple(
                        select("bias.group_metric", "group", "group_by", "metric", metric=[m]) for m in _GROUP_MEASURES
                    ),
                    rows=("group_by", "group"),
                    cols=("measure",),
                    row_header=("Grouping", "Group"),
                    n_column=True,
                    note="Figures of the positive class at the operating point; ECE top-label. n: the group's images.",
                ),
            ],
            summarise=[select("bias.group_metric", "group", "group_by", "metric")],
        ),
        "leakage": CheckLayout(
            pivots=[
                PivotSpec(
                    "Metadata shortcuts: AUROC of the label from a metadata column",
                    (select("leakage.metadata_auc", "column"),),
                    rows=("column",),
                    cols=("measure",),
                    row_header=("Column",),
                    n_column=True,
                ),
            ]
        ),
        "ood": CheckLayout(
            pivots=[_OOD_RECOMMENDED, _OOD_AUROC, replace(_OOD, printed=False)],
            headline=[select("ood.selective_accuracy", "detector"), select("ood.coverage", "detector")],
        ),
    }


def _segmentation_layouts() -> dict[str, CheckLayout]:
    """The pivot layout of each built-in check for a segmentation audit: class x figure."""
    return {
        "performance": CheckLayout(
            pivots=[
                PivotSpec(
                    "Performance per class",
                    tuple(select(f"performance.{m}", "class") for m in ("dice", "hd95", "nsd")),
                    rows=("class",),
                    cols=("measure",),
                    row_header=("Class",),
                    n_column=True,
                    note="Dice over the cases whose reference holds the class; HD95 in mm over the cases where"
                    " both the reference and the prediction hold it (a missed class has none: the case_counts"
                    " finding counts them); NSD at the tolerance in the segmentation_metrics finding. MONAI's"
                    " functions, named in that finding; n: the cases each first figure averages.",
                )
            ],
            headline=[select("performance.mean_dice")],
        ),
        "calibration": CheckLayout(
            pivots=[
                PivotSpec(
                    "Voxel calibration per class (within each case's region of interest)",
                    tuple(select(f"calibration.{m}", "class") for m in ("ece", "brier")),
                    rows=("class",),
                    cols=("measure",),
                    row_header=("Class",),
                    n_column=True,
                )
            ]
        ),
        "bias": CheckLayout(
            pivots=[
                PivotSpec(
                    "Largest gap between the groups of each grouping, per class",
                    (select("bias.max_gap", "group_by", "class", "metric"), select("bias.min_group_size", "group_by")),
                    rows=("measure", "class"),
                    cols=("group_by",),
                    row_header=("Gap in", "Class"),
                    absent={"class": "all classes"},
                    note="Each value is the largest difference between two groups of the grouping, with its"
                    " simultaneous 95% interval (HD95 in mm).",
                ),
                PivotSpec(
                    "Per group and class: Dice and HD95",
                    (select("bias.group_metric", "group", "group_by", "class", "metric"),),
                    rows=("group_by", "group"),
                    cols=("measure", "class"),
                    row_header=("Grouping", "Group"),
                    narrow=(("group_by", "group", "class"), ("measure",), ("Grouping", "Group", "Class")),
                ),
            ],
        ),
        "leakage": CheckLayout(
            pivots=[
                PivotSpec(
                    "Metadata shortcuts: AUROC of each class's presence from a metadata column",
                    (select("leakage.metadata_auc", "column", "label"), select("leakage.metadata_auc", "column")),
                    rows=("column",),
                    cols=("label",),
                    row_header=("Column",),
                    absent={"label": "largest"},
                    narrow=(("column", "label"), ("measure",), ("Column", "Class")),
                )
            ]
        ),
        "ood": CheckLayout(pivots=[_OOD_RECOMMENDED, _OOD_AUROC, replace(_OOD, printed=False)]),
    }


def _headline(metric: Mapping[str, Any], rules: Mapping[tuple[str, str], list[Mapping[str, Any]]]) -> dict[str, Any]:
    cell = _cell(metric, _judged(metric, rules))
    return {
        "name": metric_word(label_key(metric, "measure")),
        "metric": str(metric.get("name")),
        "n": fmt_count(metric.get("n")),
        "reason": str(metric.get("reason") or ""),
        **cell,
    }


def _bland_altman(findings: Sequence[Mapping[str, Any]], units: Mapping[str, Any]) -> list[str]:
    """The limits of agreement the performance check records for each regression output."""
    lines = []
    for finding in findings:
        if finding.get("kind") != "outputs" or not isinstance(finding.get("outputs"), list):
            continue
        for output in finding["outputs"]:
            agreement = output.get("bland_altman") if isinstance(output, Mapping) else None
            if not isinstance(agreement, Mapping) or agreement.get("mean_difference") is None:
                continue
            unit = f" {units[output['output']]}" if units.get(output.get("output")) else ""
            low, high = (fmt_number(agreement.get(k)) for k in ("lower_limit", "upper_limit"))
            lines.append(
                f"Bland-Altman, {output.get('output')}: mean difference (prediction - target)"
                f" {fmt_number(agreement.get('mean_difference'))}{unit}, 95% limits of agreement"
                f" {low} to {high}{unit}."
            )
    return lines


def pivot_sections(
    check: Mapping[str, Any],
    layout: CheckLayout,
    rules: Sequence[Mapping[str, Any]],
    model: Mapping[str, Any],
    label_counts: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A check's pivots, headline lines, the rest of its metrics and the line for its undefined ones."""
    metrics = list(check.get("metrics", []))
    index = _rule_index(rules)
    units = model.get("units") or {}
    words = {"output": {str(k): f"{k} ({v})" for k, v in units.items()}}
    used: set[int] = set()
    pivots = []
    for spec in layout.pivots:
        # A printed pivot takes metrics no earlier pivot showed; one on screen only may show again,
        # in full, what the PDF shows in short (so it comes after them).
        pool = [m for m in metrics if id(m) not in used] if spec.printed else metrics
        view, taken = build_pivot(spec, pool, index, words=words, label_counts=label_counts)
        if view is not None:
            pivots.append(view)
            used |= taken
    headline = []
    for metric in metrics:
        if id(metric) not in used and any(s.matches(metric) for s in layout.headline):
            headline.append(_headline(metric, index))
            used.add(id(metric))
    summarised = [m for m in metrics if id(m) not in used and any(s.matches(m) for s in layout.summarise)]
    used |= {id(m) for m in summarised}
    rest = [m for m in metrics if id(m) not in used]
    notes = []
    if summarised:
        names = sorted({label_key(m, "measure") for m in summarised})
        notes.append(
            f"{len(summarised)} further values ({describe_selects(layout.summarise)};"
            f" {', '.join(names)}) are not printed here; they are in metrics.csv and results.json."
        )
    if check.get("id") == "performance" and model.get("task") == "regression":
        notes.extend(_bland_altman(check.get("findings", []), units))
    undefined = [m for m in rest if m.get("value") is None]
    return {
        "pivots": pivots,
        "headline": headline,
        "pivot_notes": notes,
        "tables": _metric_tables([m for m in rest if m.get("value") is not None]),
        "undefined": undefined_summary(undefined, "further metric"),
    }


def _rules_in_short(rule_ids: Sequence[str], status: Mapping[str, str]) -> str:
    """``"CAL-ECE FAIL, BIAS-MIN-GROUP warn; 14 more pass"``: a control's rules as the PDF prints
    them, those that failed, warned or could not be evaluated by name and the passes counted."""
    flagged = ("fail", "warn", "not_evaluated")
    named = [f"{r} {status_word(status.get(r))}" for r in rule_ids if status.get(r) in flagged]
    passed = sum(status.get(r) == "pass" for r in rule_ids)
    other = len(rule_ids) - len(named) - passed  # not applicable to this task or these inputs
    parts = [", ".join(named)] if named else []
    if passed:
        parts.append(f"{passed} {'more ' if named else ''}pass")
    if other:
        parts.append(f"{other} not applicable")
    return "; ".join(parts)


def _crosswalk_views(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One view per crosswalk the spec selects (``run.frameworks``): each item with its rules'
    outcomes, or what is pre-filled and what a person must supply."""
    rules = results.get("rules", [])
    views = []
    for framework_id in (results.get("run") or {}).get("frameworks") or []:
        if framework_id not in FRAMEWORKS:  # not packaged in this version: nothing to join
            continue
        crosswalk = load_crosswalk(framework_id)
        items = []
        for item in crosswalk.items:
            evidence = item_evidence(item, rules)
            items.append(
                {
                    "id": item.id,
                    "title": item.title,
                    "evidence": [
                        {**e, "observed": None if e["observed"] is None else observed_text(e["observed"])}
                        for e in evidence
                    ],
                    "measured": is_measured(evidence),
                    "prefilled": [PREFILLED[key] for key in item.prefilled],
                    "person": item.person,
                }
            )
        views.append(
            {
                "anchor": f"crosswalk-{framework_id}",
                "crosswalk": crosswalk,
                "rows": items,
                "n_measured": sum(bool(i["measured"]) for i in items),
                "n_prefilled": sum(bool(i["prefilled"]) for i in items),
                "n_person": sum(i["person"] is not None for i in items),
            }
        )
    return views


def build_view(results: Mapping[str, Any], bundle: Path) -> dict[str, Any]:
    """Everything the template shows, derived from ``results.json`` and the bundle's artifacts."""
    framework = load_framework((results.get("policy") or {}).get("framework") or "nist-ai-rmf-1.0")
    controls = {c["id"]: c for c in results.get("controls", [])}
    rule_status = {str(r.get("id")): str(r.get("status")) for r in results.get("rules", [])}
    functions = []
    for function_id, function_text in framework.functions.items():
        rows = []
        for sub in framework.subcategories.values():
            if sub.function != function_id:
                continue
            control = controls.get(sub.id, {})
            rows.append(
                {
                    "id": sub.id,
                    "text": sub.text,
                    "status": control.get("status", "not_assessed"),
                    "rules": control.get("rules", []),
                    "rules_in_short": _rules_in_short(control.get("rules", []), rule_status),
                    "attestation": control.get("attestation"),
                }
            )
        functions.append({"id": function_id, "text": function_text, "rows": rows})
    checks = results.get("checks", [])
    docs = _check_docs([c["id"] for c in checks])
    rules_by_metric: dict[str, list[Mapping[str, Any]]] = {}
    for rule in results.get("rules", []):
        rules_by_metric.setdefault(rule["metric"].split(".")[0], []).append(rule)
    model = results.get("model", {})
    task = str(model.get("task") or "classification")
    layouts = task_layouts(task, model, results.get("rules", [])) if task in PIVOT_TASKS else {}
    eval_split = (results.get("data", {}).get("splits") or {}).get("eval") or {}
    check_views = []
    for index, check in enumerate(checks, start=1):
        view: dict[str, Any] = {
            "anchor": f"check-{index}",
            "record": check,
            "doc": docs.get(check["id"], CheckDoc()),
            "tables": _metric_tables(check.get("metrics", [])),
            "figures": _embed_artifacts(bundle, check.get("artifacts", [])),
            "findings": _findings_view(check.get("findings", [])),
            "rules": rules_by_metric.get(check["id"], []),
        }
        view["doc"] = replace(view["doc"], method=method_for_task(view["doc"].method, task))
        # Pivot tables lead; what no pivot or headline shows stays in the listing (``tables``).
        layout = layouts.get(check["id"], CheckLayout())
        view.update(pivot_sections(check, layout, results.get("rules", []), model, eval_split.get("class_counts")))
        check_views.append(view)
    quarantine = results.get("data", {}).get("quarantine", [])
    reasons = Counter(str(q.get("reason", "")) for q in quarantine)
    model_label = str(model.get("factory") or model.get("weights") or "model")
    status_counts = Counter(c.get("status") for c in results.get("controls", []))
    policy = results.get("policy") or {}
    return {
        "evaluated": policy.get("evaluated") or {},
        "selection": results.get("run", {}).get("selection") or {},
        "coverage": results.get("data", {}).get("coverage") or {},
        "results": results,
        "model": model,
        "model_label": model_label,
        "run": results.get("run", {}),
        "data": results.get("data", {}),
        "environment": results.get("environment", {}),
        "policy": results.get("policy") or {},
        "rules": results.get("rules", []),
        "verdict": str(results.get("verdict", "unknown")),
        "framework": framework,
        "functions": functions,
        "control_counts": status_counts,
        "n_controls": len(framework.subcategories),
        "checks": check_views,
        "risks": _risks(results),
        "crosswalks": _crosswalk_views(results),
        "listing_rows": MAX_LISTING_PRINTED,
        "quarantine_reasons": sorted(reasons.items(), key=lambda item: (-item[1], item[0])),
        "rendered_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------- rendering
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("auditkit.reports", "templates"),
        autoescape=True,  # every value is escaped; templates come from the package only
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        num=fmt_number,
        count=fmt_count,
        is_count=is_count,
        ci=fmt_ci,
        status_class=status_class,
        status_word=status_word,
        labels=fmt_labels,
    )
    return env


def content_security_policy(script: str) -> str:
    """The report's policy: nothing from the network or the file system, styles and the one
    inline script (by its SHA-256) only, plots only as ``data:`` images."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def render_html(results: Mapping[str, Any], bundle: Path) -> str:
    """The report as one self-contained HTML document (CSS and script inlined, plots as data:
    URIs): a print layout for the PDF, a screen layout with navigation, collapsible detail and
    sortable, filterable tables in a browser."""
    static = resources.files("auditkit.reports") / "static"
    css = (static / "report.css").read_text(encoding="utf-8")
    css += "\n" + (static / "pivot.css").read_text(encoding="utf-8")
    script = (static / "report.js").read_text(encoding="utf-8")
    view = build_view(results, bundle)
    template = _environment().get_template("report.html.j2")
    return template.render(css=css, script=script, csp=content_security_policy(script), **view)


def _fetcher() -> Any:
    from weasyprint.urls import URLFetcher

    class DataOnlyFetcher(URLFetcher):  # type: ignore[misc]
        """Serves ``data:`` URIs; refuses ``file://``, ``http(s)://`` and everything else."""

        blocked: list[str]

        def fetch(self, url: str, headers: Any = None) -> Any:
            if url.startswith("data:"):
                return super().fetch(url, headers)
            self.blocked.append(url[:80])
            raise ValueError("auditkit reports load no external resources")

    fetcher = DataOnlyFetcher(allowed_protocols=["data"], allow_redirects=False)
    fetcher.blocked = []
    return fetcher


def render_pdf(html: str, target: Path) -> list[str]:
    """Write ``target`` from ``html`` with WeasyPrint; returns the URLs it refused to fetch."""
    import weasyprint
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # WeasyPrint turns it on at import; our plots are whole
    fetcher = _fetcher()
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    document = weasyprint.HTML(string=html, base_url=None, url_fetcher=fetcher)
    document.write_pdf(target)
    if fetcher.blocked:
        log.warning("report: refused %d external resource(s)", len(fetcher.blocked))
    return list(fetcher.blocked)


@dataclass
class ReportFiles:
    html: Path
    pdf: Path | None
    pages: int | None = None
    seconds: float = 0.0


def write_report(bundle: Path, results: Mapping[str, Any], *, pdf: bool = True) -> ReportFiles:
    """Write ``report.html`` (and ``report.pdf``) into the bundle folder."""
    started = time.perf_counter()
    html = render_html(results, bundle)
    html_path = bundle / "report.html"
    html_path.write_text(html, encoding="utf-8")
    pdf_path = None
    if pdf:
        pdf_path = bundle / "report.pdf"
        render_pdf(html, pdf_path)
    return ReportFiles(html=html_path, pdf=pdf_path, seconds=time.perf_counter() - started)
