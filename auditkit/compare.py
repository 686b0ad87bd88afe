"""``auditkit compare BASE NEW``: what changed between two audits, and is it a regression?

Metrics are joined by check, name and labels. A change counts as a regression or an improvement
only when it is in the metric's bad (or good) direction and the two 95% intervals do not overlap;
a metric without intervals on both sides (a count, a flag, a group too small to bootstrap) that
moved beyond ``tolerance`` is reported as ``changed``, since noise cannot be told from signal
without an interval; the policy's rules judge such values. Rule outcomes are compared too:
pass → warn → fail is worse, and a rule that newly fails is a regression whatever its metric's
interval says. The exit code is 1 when a rule or the verdict got worse or a metric regressed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from auditkit.errors import InputError

Judgement = Literal["regression", "improvement", "within_noise", "changed", "unchanged", "added", "removed"]
RULE_RANK = {"pass": 0, "not_evaluated": 1, "warn": 2, "fail": 3}


@dataclass
class MetricDelta:
    check: str
    name: str
    labels: dict[str, str]
    base: float | None
    new: float | None
    delta: float | None
    base_ci: list[float] | None
    new_ci: list[float] | None
    direction: str
    judgement: Judgement


@dataclass
class RuleChange:
    id: str
    metric: str
    base: str | None
    new: str | None
    observed_base: float | None
    observed_new: float | None
    regression: bool


@dataclass
class Comparison:
    base: str
    new: str
    base_verdict: str
    new_verdict: str
    metrics: list[MetricDelta] = field(default_factory=list)
    rules: list[RuleChange] = field(default_factory=list)

    @property
    def metric_regressions(self) -> list[MetricDelta]:
        return [m for m in self.metrics if m.judgement == "regression"]

    @property
    def rule_regressions(self) -> list[RuleChange]:
        return [r for r in self.rules if r.regression]

    @property
    def new_failures(self) -> list[RuleChange]:
        return [r for r in self.rules if r.new == "fail" and r.base != "fail"]

    @property
    def regressed(self) -> bool:
        verdict_worse = self.base_verdict == "pass" and self.new_verdict == "fail"
        return bool(self.metric_regressions or self.rule_regressions or verdict_worse)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "new": self.new,
            "verdict": {"base": self.base_verdict, "new": self.new_verdict},
            "regressed": self.regressed,
            "new_failures": [r.id for r in self.new_failures],
            "rules": [asdict(r) for r in self.rules],
            "metrics": [asdict(m) for m in self.metrics],
        }


def load_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json" if folder.is_dir() else folder
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{folder}: no results.json (pass an auditkit output folder)") from None
    except ValueError as error:
        raise InputError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("schema") != "auditkit.results/v1":
        raise InputError(f"{path}: expected schema 'auditkit.results/v1'")
    return data


def _key(check: str, metric: Mapping[str, Any]) -> tuple[str, str, str]:
    return check, metric["name"], json.dumps(metric.get("labels") or {}, sort_keys=True)


def _judge(base: Mapping[str, Any], new: Mapping[str, Any], tolerance: float) -> Judgement:
    b, n = base.get("value"), new.get("value")
    if b is None or n is None:
        return "unchanged" if b == n else "within_noise"
    if abs(n - b) <= tolerance:
        return "unchanged"
    worse = n < b if base.get("direction") == "higher_is_better" else n > b
    bci, nci = base.get("ci"), new.get("ci")
    if not (bci and nci):
        return "changed"
    if not (nci[1] < bci[0] or nci[0] > bci[1]):
        return "within_noise"
    return "regression" if worse else "improvement"


def compare(base_dir: Path, new_dir: Path, *, tolerance: float = 1e-9) -> Comparison:
    """Compare two audits' ``results.json``."""
    base, new = load_results(base_dir), load_results(new_dir)
    result = Comparison(
        base=str(base_dir),
        new=str(new_dir),
        base_verdict=str(base.get("verdict")),
        new_verdict=str(new.get("verdict")),
    )
    base_metrics = {_key(c["id"], m): m for c in base.get("checks", []) for m in c.get("metrics", [])}
    new_metrics = {_key(c["id"], m): m for c in new.get("checks", []) for m in c.get("metrics", [])}
    for key in sorted(set(base_metrics) | set(new_metrics)):
        b, n = base_metrics.get(key), new_metrics.get(key)
        judgement: Judgement
        if b is None:
            judgement = "added"
        elif n is None:
            judgement = "removed"
        else:
            judgement = _judge(b, n, tolerance)
        bv = b.get("value") if b else None
        nv = n.get("value") if n else None
        result.metrics.append(
            MetricDelta(
                check=key[0],
                name=key[1],
                labels=json.loads(key[2]),
                base=bv,
                new=nv,
                delta=(nv - bv) if bv is not None and nv is not None else None,
                base_ci=b.get("ci") if b else None,
                new_ci=n.get("ci") if n else None,
                direction=(b or n or {}).get("direction", ""),
                judgement=judgement,
            )
        )
    base_rules = {r["id"]: r for r in base.get("rules", [])}
    new_rules = {r["id"]: r for r in new.get("rules", [])}
    for rule_id in list(base_rules) + [r for r in new_rules if r not in base_rules]:
        b, n = base_rules.get(rule_id), new_rules.get(rule_id)
        bs, ns = (b or {}).get("status"), (n or {}).get("status")
        if bs == ns:
            continue
        # Worse means newly warning or failing; a rule that merely stops being evaluated shows
        # up as an errored or skipped check (and an errored check fails the verdict).
        worse = ns in ("warn", "fail") and RULE_RANK.get(ns, 0) > RULE_RANK.get(bs or "pass", 0)
        result.rules.append(
            RuleChange(
                id=rule_id,
                metric=(b or n or {}).get("metric", ""),
                base=bs,
                new=ns,
                observed_base=(b or {}).get("observed"),
                observed_new=(n or {}).get("observed"),
                regression=bool(worse),
            )
        )
    return result


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.4g}, {ci[1]:.4g}]"


def _labels(labels: Mapping[str, str]) -> str:
    return "overall" if not labels else ", ".join(f"{k}={v}" for k, v in labels.items())


def format_text(comparison: Comparison, *, all_metrics: bool = False) -> str:
    lines = [
        f"auditkit compare: {comparison.base} -> {comparison.new}",
        f"verdict: {comparison.base_verdict} -> {comparison.new_verdict}",
    ]
    if comparison.rules:
        lines.append("rule changes:")
        for r in comparison.rules:
            flag = "REGRESSION" if r.regression else "changed"
            lines.append(
                f"  {flag:<10} {r.id}: {r.base} -> {r.new}"
                f" ({r.metric} {_num(r.observed_base)} -> {_num(r.observed_new)})"
            )
    shown = [m for m in comparison.metrics if all_metrics or m.judgement in ("regression", "improvement")]
    if shown:
        lines.append("metric changes (intervals do not overlap):" if not all_metrics else "metrics:")
        for m in shown:
            lines.append(
                f"  {m.judgement.upper():<12} {m.name} [{_labels(m.labels)}]: {_num(m.base)}{_ci(m.base_ci)}"
                f" -> {_num(m.new)}{_ci(m.new_ci)}"
            )
    noise = sum(m.judgement == "within_noise" for m in comparison.metrics)
    no_interval = sum(m.judgement == "changed" for m in comparison.metrics)
    lines.append(
        f"{len(comparison.metric_regressions)} metric regression(s), {len(comparison.rule_regressions)} rule"
        f" regression(s), {len(comparison.new_failures)} new failure(s); {noise} change(s) within noise,"
        f" {no_interval} without intervals to judge"
    )
    lines.append("REGRESSED" if comparison.regressed else "no regression")
    return "\n".join(lines) + "\n"


def format_markdown(comparison: Comparison) -> str:
    """A pull-request comment or CI job summary."""
    icon = "❌" if comparison.regressed else "✅"
    lines = [
        f"### {icon} auditkit: {'regression' if comparison.regressed else 'no regression'}",
        "",
        f"Verdict **{comparison.base_verdict}** → **{comparison.new_verdict}**;"
        f" {len(comparison.new_failures)} new failure(s), {len(comparison.metric_regressions)} metric regression(s).",
        "",
    ]
    if comparison.rules:
        lines += ["| Rule | Metric | Before | After | Observed |", "|---|---|---|---|---|"]
        for r in comparison.rules:
            mark = " ❌" if r.regression else ""
            lines.append(
                f"| `{r.id}`{mark} | `{r.metric}` | {r.base} | {r.new} |"
                f" {_num(r.observed_base)} → {_num(r.observed_new)} |"
            )
        lines.append("")
    changed = [m for m in comparison.metrics if m.judgement in ("regression", "improvement")]
    if changed:
        lines += [
            "| Metric | Labels | Before (95% CI) | After (95% CI) | |",
            "|---|---|---|---|---|",
        ]
        for m in changed:
            lines.append(
                f"| `{m.name}` | {_labels(m.labels)} | {_num(m.base)}{_ci(m.base_ci)} | {_num(m.new)}{_ci(m.new_ci)}"
                f" | {'regression' if m.judgement == 'regression' else 'improvement'} |"
            )
    return "\n".join(lines) + "\n"
