"""``auditkit compare BASE NEW``: what changed between two audits, and is it a regression?

First, whether the two audits can be compared at all. The data (the manifest's SHA-256, the
splits, the rows each split lists and the images it read), the classes (names, order and the
positive class), the model (factory, weights' SHA-256, input shape, normalisation), the policy
(name, version, SHA-256) and the checks run (ids, and the ``selection`` block of a narrowed run)
are compared and every difference is reported. Different data or different classes make the
audits *not comparable*: metrics are still listed, under a warning that says so, but with
different classes they are never judged (a class's metric may now mean another class), and with
different data a regression may be the data's doing.

Metrics are joined by check, name and labels. A change counts as a regression or an improvement
only when it is in the metric's bad (or good) direction and the two 95% intervals do not overlap;
a metric without intervals on both sides (a count, a flag, a group too small to bootstrap) that
moved beyond ``tolerance`` is reported as ``changed``, since noise cannot be told from signal
without an interval; the policy's rules judge such values. Metrics with no good direction
(:data:`UNDIRECTED`) are only ever ``changed``. Rule outcomes are compared too: pass → warn → fail
is worse, and a rule that newly fails is a regression whatever its metric's interval says. Check
statuses are compared: a check that ran in BASE and errored, was skipped or was not run in NEW is
reported, and a check that errored in NEW is a regression (its rules are not evaluated, so the
new audit measured less).

Exit codes (:class:`CompareExit`, :attr:`Comparison.exit_code`):

* 0: comparable and nothing regressed;
* 1: a rule, the verdict, a check or a metric regressed;
* 2: the audits are not comparable (different data or classes) and ``allow_different`` was not
  given — a usage error, as comparing two unrelated audits is: a release gate must not pass
  because the candidate was audited on other data. With ``allow_different`` the comparison
  exits 0 or 1 as above (metrics still unjudged across different classes). Unreadable inputs
  raise :class:`~auditkit.errors.InputError`, which the command line also turns into 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from auditkit.results import load_results

Judgement = Literal["regression", "improvement", "within_noise", "changed", "unchanged", "added", "removed"]
RULE_RANK = {"pass": 0, "not_evaluated": 1, "warn": 2, "fail": 3}

# A check's status in one audit; "not_run" when the audit has no record of it.
CheckStatus = Literal["ok", "skipped", "error", "not_run"]
# Worse is higher: a check that stopped measuring (skipped, not run) is worse than one that ran,
# and one that errored is worst (it fails the verdict and hides its rules).
CHECK_RANK: dict[str, int] = {"ok": 0, "skipped": 1, "not_run": 1, "error": 2}

Level = Literal["not_comparable", "warning", "info"]
Aspect = Literal["data", "classes", "model", "policy", "checks"]

# Metrics without a good direction. A check gives every metric a direction because the schema
# needs one; for these it is only descriptive, so a change is ``changed``, never a regression or an
# improvement (the policy's rules, if any, still judge the values). Metric name -> the labels that
# make it undirected (``None``: every value of the metric).
UNDIRECTED: Mapping[str, Mapping[str, frozenset[str]] | None] = {
    # A group's size, its base rate and how often the model calls it positive describe the group:
    # a higher selection rate is better only if the group is more often diseased (checks/bias).
    # A regressor's mean error (prediction minus target) is best at zero, not at either end.
    "bias.group_metric": {"metric": frozenset({"n", "prevalence", "selection_rate", "mean_error"})},
    "performance.mean_error": None,
    # The smallest group's size describes the data, not the model.
    "bias.min_group_size": None,
    # Follows prevalence: where base rates differ between groups, as disease often does, a good
    # diagnostic model should not have parity (checks/bias, Limitations).
    "bias.demographic_parity_difference": None,
    # Neural Cleanse's per-class mask norm and the found trigger's success rate describe the
    # search: lesion evidence is small and local too, and the search runs until it reaches its
    # success threshold. The judgement is the excursion, the anomaly index and model_suspected.
    "backdoor.trigger_norm": None,
    "backdoor.trigger_success_rate": None,
    # The share of in-distribution images the recommended detector accepts: >= 95% by
    # construction of its threshold; it moves with ties at the threshold, not with quality.
    "ood.coverage": None,
    # How many images were read describes the data; whether it is enough is the COV-* rules'
    # judgement and a different count is reported as a data difference.
    "coverage.images_read": None,
}


class CompareExit(IntEnum):
    """Exit codes of ``auditkit compare``."""

    #: comparable, and nothing got worse
    NO_REGRESSION = 0
    #: a rule, the verdict, a check or a metric regressed
    REGRESSED = 1
    #: not comparable (different data or classes) without ``allow_different``
    NOT_COMPARABLE = 2


def is_undirected(name: str, labels: Mapping[str, str]) -> bool:
    """Whether a metric has no good direction (see :data:`UNDIRECTED`)."""
    if name not in UNDIRECTED:
        return False
    constraint = UNDIRECTED[name]
    if constraint is None:
        return True
    return all(labels.get(key) in values for key, values in constraint.items())


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
    cause: str | None = None  # why NEW did not evaluate it (``not_selected``, ``errored``, ...)


@dataclass
class CheckChange:
    """A check whose status differs between the audits, or that errored in NEW."""

    id: str
    base: str
    new: str
    worse: bool
    regression: bool
    reason: str | None = None  # NEW's skip reason or error


@dataclass
class Difference:
    """Something other than the measurements that differs between the two audits."""

    aspect: Aspect
    field: str
    base: Any
    new: Any
    level: Level
    message: str


@dataclass
class Comparison:
    base: str
    new: str
    base_verdict: str
    new_verdict: str
    metrics: list[MetricDelta] = field(default_factory=list)
    rules: list[RuleChange] = field(default_factory=list)
    checks: list[CheckChange] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    allow_different: bool = False

    @property
    def not_comparable(self) -> list[Difference]:
        return [d for d in self.differences if d.level == "not_comparable"]

    @property
    def comparable(self) -> bool:
        return not self.not_comparable

    @property
    def same_classes(self) -> bool:
        return not any(d.aspect == "classes" and d.level == "not_comparable" for d in self.differences)

    @property
    def metrics_judged(self) -> bool:
        """Whether metric changes are judged as regressions or improvements (same classes)."""
        return self.same_classes

    @property
    def metric_regressions(self) -> list[MetricDelta]:
        return [m for m in self.metrics if m.judgement == "regression"]

    @property
    def rule_regressions(self) -> list[RuleChange]:
        return [r for r in self.rules if r.regression]

    @property
    def check_regressions(self) -> list[CheckChange]:
        return [c for c in self.checks if c.regression]

    @property
    def checks_lost(self) -> list[CheckChange]:
        """Checks that measured in BASE and do not in NEW (errored, skipped or not run)."""
        return [c for c in self.checks if c.worse]

    @property
    def new_failures(self) -> list[RuleChange]:
        return [r for r in self.rules if r.new == "fail" and r.base != "fail"]

    @property
    def regressed(self) -> bool:
        verdict_worse = self.base_verdict == "pass" and self.new_verdict == "fail"
        return bool(self.metric_regressions or self.rule_regressions or self.check_regressions or verdict_worse)

    @property
    def exit_code(self) -> CompareExit:
        if not self.comparable and not self.allow_different:
            return CompareExit.NOT_COMPARABLE
        return CompareExit.REGRESSED if self.regressed else CompareExit.NO_REGRESSION

    def warnings(self) -> list[str]:
        """The headline warnings, one sentence each, in the order every format prints them."""
        out: list[str] = []
        data = [d.message for d in self.not_comparable if d.aspect == "data"]
        if data:
            out.append("the two audits are not comparable: different data (" + "; ".join(data) + ")")
        classes = [d.message for d in self.not_comparable if d.aspect == "classes"]
        if classes:
            out.append(
                "the two audits are not comparable: different classes ("
                + "; ".join(classes)
                + "); metric changes are listed but not judged as regressions or improvements"
            )
        out += [d.message for d in self.differences if d.level == "warning"]
        lost = self.checks_lost
        if lost:
            out.append(
                "NEW measured less: "
                + ", ".join(f"{c.id} {c.base} -> {c.new}" for c in lost)
                + "; the rules of these checks are not evaluated in NEW"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "new": self.new,
            "verdict": {"base": self.base_verdict, "new": self.new_verdict},
            "comparable": self.comparable,
            "allow_different": self.allow_different,
            "metrics_judged": self.metrics_judged,
            "regressed": self.regressed,
            "exit_code": int(self.exit_code),
            "warnings": self.warnings(),
            "differences": [asdict(d) for d in self.differences],
            "new_failures": [r.id for r in self.new_failures],
            "check_regressions": [c.id for c in self.check_regressions],
            "checks": [asdict(c) for c in self.checks],
            "rules": [asdict(r) for r in self.rules],
            "metrics": [asdict(m) for m in self.metrics],
        }


def _key(check: str, metric: Mapping[str, Any]) -> tuple[str, str, str]:
    return check, metric["name"], json.dumps(metric.get("labels") or {}, sort_keys=True)


def _judge(base: Mapping[str, Any], new: Mapping[str, Any], tolerance: float, *, directed: bool) -> Judgement:
    b, n = base.get("value"), new.get("value")
    if b is None or n is None:
        return "unchanged" if b == n else "within_noise"
    if abs(n - b) <= tolerance:
        return "unchanged"
    if not directed:
        return "changed"
    worse = n < b if base.get("direction") == "higher_is_better" else n > b
    bci, nci = base.get("ci"), new.get("ci")
    if not (bci and nci):
        return "changed"
    if not (nci[1] < bci[0] or nci[0] > bci[1]):
        return "within_noise"
    return "regression" if worse else "improvement"


# ------------------------------------------------------------------------------ what was audited
def _section(results: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = results.get(key)
    if key == "selection" and not isinstance(value, Mapping):  # written under run.selection
        value = _section(results, "run").get("selection")
    return value if isinstance(value, Mapping) else {}


def _short(value: Any) -> str:
    """Hashes shortened to 12 hex digits, everything else as compact JSON."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _differ(base: Any, new: Any) -> bool:
    # A value an older results.json lacks is unknown, not different.
    return base is not None and new is not None and base != new


def _split_counts(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per split: rows listed and images read (the ``coverage`` block, else the split summary)."""
    coverage: Mapping[str, Any] = data["coverage"] if isinstance(data.get("coverage"), Mapping) else {}
    out: dict[str, dict[str, Any]] = {}
    for name, split in (data.get("splits") or {}).items():
        counts = coverage.get(name) or {}
        read = counts.get("read", split.get("n_images"))
        quarantined = split.get("n_quarantined")
        listed = counts.get("listed")
        if listed is None and read is not None and quarantined is not None:
            listed = read + quarantined
        out[name] = {"split_value": split.get("split_value"), "listed": listed, "read": read}
    return out


def _data_differences(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[Difference]:
    out: list[Difference] = []
    b, n = _section(base, "data"), _section(new, "data")
    if _differ(b.get("manifest_sha256"), n.get("manifest_sha256")):
        out.append(
            Difference(
                "data",
                "manifest_sha256",
                b["manifest_sha256"],
                n["manifest_sha256"],
                "not_comparable",
                f"data manifest {_short(b['manifest_sha256'])} -> {_short(n['manifest_sha256'])}",
            )
        )
    bs, ns = _split_counts(b), _split_counts(n)
    if bs and ns and set(bs) != set(ns):
        out.append(
            Difference(
                "data", "splits", sorted(bs), sorted(ns), "not_comparable", f"splits {sorted(bs)} -> {sorted(ns)}"
            )
        )
    for name in [s for s in bs if s in ns]:
        levels: tuple[tuple[str, Level], ...] = (
            ("split_value", "not_comparable"),
            ("listed", "not_comparable"),
            ("read", "warning"),
        )
        for key, level in levels:
            bv, nv = bs[name][key], ns[name][key]
            if not _differ(bv, nv):
                continue
            if key == "read":
                message = (
                    f"the {name} split read {bv} images in BASE and {nv} in NEW from the same rows:"
                    " metrics are measured on different subsets (see the quarantine)"
                )
            elif key == "listed":
                message = f"{name} split: {bv} -> {nv} rows listed"
            else:
                message = f"{name} split value {bv!r} -> {nv!r}"
            out.append(Difference("data", f"splits.{name}.{key}", bv, nv, level, message))
    return out


def _class_differences(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[Difference]:
    b, n = _section(base, "model"), _section(new, "model")
    out: list[Difference] = []
    keys = (("task", "task"), ("classes", "classes"), ("positive_class", "positive class"), ("units", "units"))
    for key, what in keys:
        if key in b and key in n and b[key] != n[key]:
            out.append(
                Difference(
                    "classes", key, b[key], n[key], "not_comparable", f"{what} {_short(b[key])} -> {_short(n[key])}"
                )
            )
    return out


def _plain_differences(
    base: Mapping[str, Any], new: Mapping[str, Any], aspect: Aspect, keys: Sequence[str], level: Level
) -> list[Difference]:
    """Differences of ``keys`` in the results' section named ``aspect`` (``model``, ``policy``)."""
    b, n = _section(base, aspect), _section(new, aspect)
    out = []
    for key in keys:
        if _differ(b.get(key), n.get(key)):
            out.append(
                Difference(aspect, key, b[key], n[key], level, f"{aspect} {key} {_short(b[key])} -> {_short(n[key])}")
            )
    return out


def _check_ids(results: Mapping[str, Any]) -> list[str]:
    return [str(c.get("id")) for c in results.get("checks") or []]


def _selection_text(selection: Mapping[str, Any]) -> str:
    parts = []
    if selection.get("only"):
        parts.append(f"only {', '.join(selection['only'])}")
    if selection.get("skip"):
        parts.append(f"skip {', '.join(selection['skip'])}")
    if selection.get("not_run"):
        parts.append(f"not run: {', '.join(selection['not_run'])}")
    return "; ".join(parts) or "every installed check"


def _check_differences(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[Difference]:
    out: list[Difference] = []
    bids, nids = _check_ids(base), _check_ids(new)
    if set(bids) != set(nids):
        only_base = [c for c in bids if c not in nids]
        only_new = [c for c in nids if c not in bids]
        parts = ([f"only in BASE: {', '.join(only_base)}"] if only_base else []) + (
            [f"only in NEW: {', '.join(only_new)}"] if only_new else []
        )
        out.append(Difference("checks", "ids", bids, nids, "info", "checks run differ (" + "; ".join(parts) + ")"))
    b, n = _section(base, "selection"), _section(new, "selection")
    for name, this, other in (("BASE", b, n), ("NEW", n, b)):
        if this.get("partial") and (
            not other.get("partial") or (this.get("only"), this.get("skip")) != (other.get("only"), other.get("skip"))
        ):
            out.append(
                Difference(
                    "checks",
                    f"selection.{name.lower()}",
                    _selection_text(b) if b else None,
                    _selection_text(n) if n else None,
                    "warning",
                    f"{name} is a partial audit ({_selection_text(this)})",
                )
            )
    return out


def audited_differences(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[Difference]:
    """What differs between the two audits apart from the measurements."""
    model_keys = ("factory", "factory_kwargs", "weights_sha256", "input", "normalize")
    return [
        *_data_differences(base, new),
        *_class_differences(base, new),
        *_plain_differences(base, new, "model", model_keys, "info"),
        # Rule outcomes under two different policies may differ because the rules did.
        *[
            Difference(d.aspect, d.field, d.base, d.new, "warning", d.message + ": rule changes may be the policy's")
            for d in _plain_differences(base, new, "policy", ("name", "version", "sha256"), "info")
        ],
        *_check_differences(base, new),
    ]


def _check_status(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "not_run"
    status = str(record.get("status"))
    return status if status in CHECK_RANK else "error"


def _check_reason(record: Mapping[str, Any] | None, selection: Mapping[str, Any]) -> str | None:
    if record is None:
        return f"not selected ({_selection_text(selection)})" if selection else "no record in NEW"
    if record.get("status") == "error":
        error = record.get("error") or {}
        return f"{error.get('type')}: {error.get('message')}"
    reason = record.get("reason")
    return str(reason) if reason else None


def compare_checks(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[CheckChange]:
    """Checks whose status changed, and every check that errored in NEW."""
    b = {str(c.get("id")): c for c in base.get("checks") or []}
    n = {str(c.get("id")): c for c in new.get("checks") or []}
    out = []
    for cid in list(b) + [c for c in n if c not in b]:
        bs, ns = _check_status(b.get(cid)), _check_status(n.get(cid))
        errored = ns == "error"
        if bs == ns and not errored:
            continue
        if cid not in b and ns != "error":
            continue  # a check only NEW ran is a difference of the checks, not a change of status
        out.append(
            CheckChange(
                id=cid,
                base=bs,
                new=ns,
                worse=CHECK_RANK[ns] > CHECK_RANK[bs],
                regression=errored,
                reason=_check_reason(n.get(cid), _section(new, "selection")),
            )
        )
    return out


def compare(base_dir: Path, new_dir: Path, *, tolerance: float = 1e-9, allow_different: bool = False) -> Comparison:
    """Compare two audits' ``results.json``.

    Args:
        base_dir: the reference audit's folder (or its ``results.json``).
        new_dir: the candidate audit's.
        tolerance: metric changes at most this large are ``unchanged``.
        allow_different: compare audits of different data or classes without the exit code 2
            (:attr:`Comparison.exit_code`); the warnings are reported either way.
    """
    base, new = load_results(base_dir), load_results(new_dir)
    result = Comparison(
        base=str(base_dir),
        new=str(new_dir),
        base_verdict=str(base.get("verdict")),
        new_verdict=str(new.get("verdict")),
        differences=audited_differences(base, new),
        allow_different=allow_different,
    )
    result.checks = compare_checks(base, new)
    judge = result.metrics_judged
    base_metrics = {_key(c["id"], m): m for c in base.get("checks", []) for m in c.get("metrics", [])}
    new_metrics = {_key(c["id"], m): m for c in new.get("checks", []) for m in c.get("metrics", [])}
    for key in sorted(set(base_metrics) | set(new_metrics)):
        b, n = base_metrics.get(key), new_metrics.get(key)
        labels = json.loads(key[2])
        judgement: Judgement
        if b is None:
            judgement = "added"
        elif n is None:
            judgement = "removed"
        else:
            judgement = _judge(b, n, tolerance, directed=judge and not is_undirected(key[1], labels))
        bv = b.get("value") if b else None
        nv = n.get("value") if n else None
        result.metrics.append(
            MetricDelta(
                check=key[0],
                name=key[1],
                labels=labels,
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
        # up as an errored, skipped or not-run check (and an errored check is a regression).
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
                cause=(n or {}).get("cause") if ns == "not_evaluated" else None,
            )
        )
    return result


# ------------------------------------------------------------------------------------ formatting
def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.4g}, {ci[1]:.4g}]"


def _labels(labels: Mapping[str, str]) -> str:
    return "overall" if not labels else ", ".join(f"{k}={v}" for k, v in labels.items())


def _rule_status(status: str | None, cause: str | None) -> str:
    return f"{status} ({cause.replace('_', ' ')})" if cause else str(status)


def _outcome_line(comparison: Comparison) -> str:
    if comparison.exit_code == CompareExit.NOT_COMPARABLE:
        return "NOT COMPARABLE: different data or classes (exit 2; --allow-different compares anyway)" + (
            "; and REGRESSED" if comparison.regressed else ""
        )
    suffix = " (audits not comparable; compared as asked)" if not comparison.comparable else ""
    return ("REGRESSED" if comparison.regressed else "no regression") + suffix


def format_text(comparison: Comparison, *, all_metrics: bool = False) -> str:
    lines = [f"auditkit compare: {comparison.base} -> {comparison.new}"]
    lines += [f"WARNING: {w}" for w in comparison.warnings()]
    shown_differences = [d for d in comparison.differences if d.level == "info"]
    if shown_differences:
        lines.append("differences:")
        lines += [f"  {d.aspect:<8} {d.message}" for d in shown_differences]
    lines.append(f"verdict: {comparison.base_verdict} -> {comparison.new_verdict}")
    if comparison.checks:
        lines.append("check changes:")
        for c in comparison.checks:
            flag = "REGRESSION" if c.regression else "WORSE" if c.worse else "changed"
            lines.append(f"  {flag:<10} {c.id}: {c.base} -> {c.new}" + (f" ({c.reason})" if c.reason else ""))
    if comparison.rules:
        lines.append("rule changes:")
        for r in comparison.rules:
            flag = "REGRESSION" if r.regression else "changed"
            lines.append(
                f"  {flag:<10} {r.id}: {r.base} -> {_rule_status(r.new, r.cause)}"
                f" ({r.metric} {_num(r.observed_base)} -> {_num(r.observed_new)})"
            )
    judged = ("regression", "improvement") if comparison.metrics_judged else ("changed",)
    shown = [m for m in comparison.metrics if all_metrics or m.judgement in judged]
    if shown:
        if all_metrics:
            heading = "metrics:"
        elif comparison.metrics_judged:
            heading = "metric changes (intervals do not overlap):"
        else:
            heading = "metric changes (not judged: the classes differ):"
        lines.append(heading)
        for m in shown:
            lines.append(
                f"  {m.judgement.upper():<12} {m.name} [{_labels(m.labels)}]: {_num(m.base)}{_ci(m.base_ci)}"
                f" -> {_num(m.new)}{_ci(m.new_ci)}"
            )
    noise = sum(m.judgement == "within_noise" for m in comparison.metrics)
    no_interval = sum(m.judgement == "changed" for m in comparison.metrics)
    lines.append(
        f"{len(comparison.metric_regressions)} metric regression(s), {len(comparison.rule_regressions)} rule"
        f" regression(s), {len(comparison.check_regressions)} errored check(s), {len(comparison.new_failures)}"
        f" new failure(s); {noise} change(s) within noise, {no_interval} changed without a direction or"
        " intervals to judge"
    )
    lines.append(_outcome_line(comparison))
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Table-cell safe: a pipe or newline in a value must not break the table."""
    return text.replace("|", "\\|").replace("\n", " ")


def format_markdown(comparison: Comparison) -> str:
    """A pull-request comment or CI job summary."""
    if comparison.exit_code == CompareExit.NOT_COMPARABLE:
        icon, title = "⚠️", "not comparable"
    else:
        icon, title = ("❌", "regression") if comparison.regressed else ("✅", "no regression")
    lines = [
        f"### {icon} auditkit: {title}",
        "",
    ]
    for warning in comparison.warnings():
        lines += [f"> ⚠️ **Warning:** {_md(warning)}", ""]
    lines += [
        f"Verdict **{comparison.base_verdict}** → **{comparison.new_verdict}**;"
        f" {len(comparison.new_failures)} new failure(s), {len(comparison.metric_regressions)} metric regression(s),"
        f" {len(comparison.check_regressions)} errored check(s).",
        "",
    ]
    if comparison.differences:
        lines += ["| Differs | What | Before | After |", "|---|---|---|---|"]
        for d in comparison.differences:
            level = " ⚠️" if d.level != "info" else ""
            lines.append(f"| {d.aspect}{level} | `{d.field}` | {_md(_short(d.base))} | {_md(_short(d.new))} |")
        lines.append("")
    if comparison.checks:
        lines += ["| Check | Before | After | Why |", "|---|---|---|---|"]
        for c in comparison.checks:
            mark = " ❌" if c.regression else " ⚠️" if c.worse else ""
            lines.append(f"| `{c.id}`{mark} | {c.base} | {c.new} | {_md(c.reason or '')} |")
        lines.append("")
    if comparison.rules:
        lines += ["| Rule | Metric | Before | After | Observed |", "|---|---|---|---|---|"]
        for r in comparison.rules:
            mark = " ❌" if r.regression else ""
            lines.append(
                f"| `{r.id}`{mark} | `{r.metric}` | {r.base} | {_rule_status(r.new, r.cause)} |"
                f" {_num(r.observed_base)} → {_num(r.observed_new)} |"
            )
        lines.append("")
    if comparison.metrics_judged:
        changed = [m for m in comparison.metrics if m.judgement in ("regression", "improvement")]
    else:
        changed = [m for m in comparison.metrics if m.judgement == "changed"]
        if changed:
            lines += ["Metric changes are not judged: the classes differ.", ""]
    if changed:
        lines += [
            "| Metric | Labels | Before (95% CI) | After (95% CI) | |",
            "|---|---|---|---|---|",
        ]
        for m in changed:
            lines.append(
                f"| `{m.name}` | {_md(_labels(m.labels))} | {_num(m.base)}{_ci(m.base_ci)} |"
                f" {_num(m.new)}{_ci(m.new_ci)} | {m.judgement} |"
            )
    return "\n".join(lines) + "\n"
