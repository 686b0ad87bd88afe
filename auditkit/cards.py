"""Model card and data card of an audit, written from its ``results.json`` (surrogates and counts only).

The model card (after Mitchell et al., "Model Cards for Model Reporting", FAT* 2019) says what the
model is (task, classes, input, artefact and weights SHA-256, parameters, preprocessing), what it
was measured to do (every performance metric with its interval, the per-group results of the bias
check, the rules judged) and what the audit found it cannot do (failed and warned rules, checks
that could not run and why). The data card (after Gebru et al., "Datasheets for Datasets", 2021)
gives the audited data: images, patients and quarantined rows by split, label prevalence, counts by
group (site, sex, age band, any spec group), acquisition devices (DICOM Manufacturer and model) and
the StudyDate range by month.

Both are written from the results alone, so a pack can be made from any evidence bundle; nothing in
them is read from an image or a header that ``results.json`` does not already hold, and no value
in ``results.json`` is a patient identifier. Intended use is the spec's to state (its optional
``intended_use`` block); what it leaves out is marked to be supplied by the manufacturer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["data_card", "model_card"]

_INTENDED_USE_FIELDS = (  # the spec's intended_use keys, and what each says
    ("purpose", "intended purpose and clinical task"),
    ("users", "intended users and the setting of use"),
    ("population", "patient population (and who is out of scope)"),
    ("decision", "the decision the output informs, and the human oversight around it"),
    ("contraindications", "contraindications and known misuses"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _interval(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def _check(results: Mapping[str, Any], check_id: str) -> Mapping[str, Any] | None:
    return next((c for c in results.get("checks", []) if c.get("id") == check_id), None)


def model_card(results: Mapping[str, Any]) -> str:
    """The model card of an audit, as markdown."""
    model = results.get("model", {})
    lines = ["# Model card", ""]
    identity = [
        ("task", model.get("task")),
        ("classes", ", ".join(model.get("classes") or []) or None),
        ("format", model.get("format")),
        ("model", model.get("factory") or model.get("weights")),
        ("weights SHA-256", model.get("weights_sha256")),
        ("parameters", model.get("n_parameters")),
        ("input", ", ".join(f"{k} {v}" for k, v in (model.get("input") or {}).items() if v is not None)),
        ("normalisation", model.get("normalize")),
        ("positive class", model.get("positive_class")),
        ("operating point", model.get("operating_point")),
        ("embedding layer", model.get("feature_layer")),
    ]
    lines += ["## Model", "", *_table(("field", "value"), ((k, _fmt(v)) for k, v in identity if v is not None))]
    lines += ["", "## Intended use", ""]
    stated = model.get("intended_use") or {}
    for key, item in _INTENDED_USE_FIELDS:
        text = stated.get(key)
        lines.append(f"- {item}: {text}" if text else f"- {item}: to be supplied by the manufacturer")
    if not stated:
        lines += ["", "The spec states no intended use (`intended_use:` in the audit spec)."]
    performance = _check(results, "performance")
    lines += ["", "## Performance (eval split, 95% intervals)", ""]
    if performance and performance.get("metrics"):
        rows = [
            (
                m["name"],
                ", ".join(f"{k}={v}" for k, v in m.get("labels", {}).items()),
                _fmt(m.get("value")),
                _interval(m.get("ci")),
                m.get("n", ""),
            )
            for m in performance["metrics"]
        ]
        lines += _table(("metric", "labels", "value", "95% CI", "n"), rows)
    else:
        lines += ["The performance check did not run."]
    bias = _check(results, "bias")
    lines += ["", "## Results by group", ""]
    group_rows = [
        (
            m["labels"].get("group_by"),
            m["labels"].get("group"),
            m["labels"].get("metric"),
            _fmt(m.get("value")),
            _interval(m.get("ci")),
        )
        for m in (bias or {}).get("metrics", [])
        if m.get("name") == "bias.group_metric"
        and m.get("labels", {}).get("metric") not in ("n", "prevalence", "selection_rate")
    ]
    lines += (
        _table(("group by", "group", "metric", "value", "95% CI"), group_rows)
        if group_rows
        else ["The bias check did not run."]
    )
    lines += ["", "## Known limitations (from the audit)", ""]
    limits = [_limitation(r) for r in results.get("rules", []) if r.get("status") in ("fail", "warn")]
    limits += [
        f"- check **{c['id']}** did not run: {c.get('reason')}"
        for c in results.get("checks", [])
        if c.get("status") in ("skipped", "error")
    ]
    lines += limits or ["- none found by the rules judged"]
    verdict = results.get("verdict")
    policy = results.get("policy", {})
    run_id = results.get("run", {}).get("id")
    lines += ["", "## Audit", ""]
    lines += [
        f"Verdict **{verdict}** under policy {policy.get('name')} (SHA-256 {policy.get('sha256')}), run {run_id}.",
        "",
    ]
    return "\n".join(lines)


def _limitation(rule: Mapping[str, Any]) -> str:
    """A failed or warned rule as a limitation: what was observed against what was asked, and why it matters."""
    observed = f"{rule.get('metric')} observed {_fmt(rule.get('observed'))}"
    asked = f"threshold {rule.get('bound')} {rule.get('threshold')}"
    return f"- **{rule['id']}** ({rule['status']}): {observed}, {asked}. {rule.get('rationale') or ''}".rstrip()


def data_card(results: Mapping[str, Any]) -> str:
    """The data card of an audit, as markdown (counts and surrogates only)."""
    data = results.get("data", {})
    splits: Mapping[str, Any] = data.get("splits", {})
    coverage: Mapping[str, Any] = data.get("coverage", {})
    lines = ["# Data card", "", f"Manifest `{data.get('manifest')}` (SHA-256 {data.get('manifest_sha256')}).", ""]
    lines += ["## Splits", ""]
    lines += _table(
        ("split", "images read", "patients", "quarantined", "listed"),
        (
            (
                name,
                s.get("n_images"),
                s.get("n_patients"),
                s.get("n_quarantined"),
                coverage.get(name, {}).get("listed", ""),
            )
            for name, s in splits.items()
        ),
    )
    lines += ["", "## Labels", ""]
    label_rows = []
    for name, s in splits.items():
        counts = s.get("class_counts") or {}
        total = sum(v for v in counts.values() if isinstance(v, int | float)) or 0
        for label, count in counts.items():
            share = f"{count / total:.3f}" if total and isinstance(count, int | float) else ""
            label_rows.append((name, label, count, share))
    lines += (
        _table(("split", "label", "images", "prevalence"), label_rows)
        if label_rows
        else ["No labels (regression targets are summarised in results.json)."]
    )
    lines += ["", "## Groups", ""]
    group_rows = [
        (name, column, group, count)
        for name, s in splits.items()
        for column, counts in (s.get("group_counts") or {}).items()
        for group, count in counts.items()
    ]
    lines += (
        _table(("split", "group by", "group", "images"), group_rows)
        if group_rows
        else ["The spec names no group columns."]
    )
    lines += ["", "## Acquisition", ""]
    device_rows = [
        (name, device, count) for name, s in splits.items() for device, count in (s.get("devices") or {}).items()
    ]
    lines += (
        _table(("split", "device (Manufacturer, model)", "images"), device_rows)
        if device_rows
        else ["No DICOM images: devices are not recorded."]
    )
    months = [(name, " to ".join(s["study_months"])) for name, s in splits.items() if s.get("study_months")]
    lines += [""] + (_table(("split", "study dates (month)"), months) if months else ["No StudyDate recorded."])
    lines += ["", "## Quarantine", ""]
    reasons = [
        (name, reason, count) for name, c in coverage.items() for reason, count in (c.get("by_reason") or {}).items()
    ]
    lines += _table(("split", "reason", "rows"), reasons) if reasons else ["No row was quarantined."]
    lines.append("")
    return "\n".join(lines)
