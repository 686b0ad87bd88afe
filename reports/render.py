"""Render ``results.json`` into ``report.html`` and ``report.pdf``.

Safety (docs/hardening.md): templates come only from this package and autoescape is on; no value
from the results ever lands in a ``src``, ``href`` or ``style`` attribute (anchors are numbered,
CSS classes pass through a whitelist, plots are embedded as ``data:`` URIs of the bundle's own
artifact files); WeasyPrint gets a URL fetcher that serves ``data:`` URIs only, so neither
``file://`` nor the network can be reached while rendering.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

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
    from auditkit.coverage import CoverageCheck

    try:
        from auditkit.registry import discover

        classes, _ = discover()
    except Exception:  # the report must render even when plugins are broken
        classes = {}
    classes = {**classes, CoverageCheck.id: CoverageCheck}  # the engine's own measurement
    return {cid: parse_docstring(classes[cid].__doc__) if cid in classes else CheckDoc() for cid in ids}


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


def _findings_view(findings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    counts = Counter(str(f.get("kind", "finding")) for f in findings)
    shown = []
    for finding in findings[:MAX_FINDINGS_SHOWN]:
        items = [(str(k), _short(v)) for k, v in finding.items() if k != "kind"]
        shown.append({"kind": str(finding.get("kind", "finding")), "fields": items})
    return {"counts": sorted(counts.items()), "shown": shown, "total": len(findings)}


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


def build_view(results: Mapping[str, Any], bundle: Path) -> dict[str, Any]:
    """Everything the template shows, derived from ``results.json`` and the bundle's artifacts."""
    framework = load_framework((results.get("policy") or {}).get("framework") or "nist-ai-rmf-1.0")
    controls = {c["id"]: c for c in results.get("controls", [])}
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
                    "attestation": control.get("attestation"),
                }
            )
        functions.append({"id": function_id, "text": function_text, "rows": rows})
    checks = results.get("checks", [])
    docs = _check_docs([c["id"] for c in checks])
    rules_by_metric: dict[str, list[Mapping[str, Any]]] = {}
    for rule in results.get("rules", []):
        rules_by_metric.setdefault(rule["metric"].split(".")[0], []).append(rule)
    check_views = []
    for index, check in enumerate(checks, start=1):
        check_views.append(
            {
                "anchor": f"check-{index}",
                "record": check,
                "doc": docs.get(check["id"], CheckDoc()),
                "tables": _metric_tables(check.get("metrics", [])),
                "figures": _embed_artifacts(bundle, check.get("artifacts", [])),
                "findings": _findings_view(check.get("findings", [])),
                "rules": rules_by_metric.get(check["id"], []),
            }
        )
    quarantine = results.get("data", {}).get("quarantine", [])
    reasons = Counter(str(q.get("reason", "")) for q in quarantine)
    model = results.get("model", {})
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


def render_html(results: Mapping[str, Any], bundle: Path) -> str:
    """The report as one self-contained HTML document (CSS inlined, plots as data: URIs)."""
    css = (resources.files("auditkit.reports") / "static" / "report.css").read_text(encoding="utf-8")
    template = _environment().get_template("report.html.j2")
    return template.render(css=css, **build_view(results, bundle))


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
