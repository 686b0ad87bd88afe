"""Policies judge measurements (docs/architecture.md, "Policies and frameworks").

A policy is data: rules that bound a metric, each mapped to NIST AI RMF 1.0 subcategories. The
engine turns the checks' metrics into rule outcomes (``pass``, ``warn``, ``fail``,
``not_evaluated``), every subcategory of the framework into a status (``met``, ``not_met``,
``not_evaluated``, ``attested``, ``not_assessed``) and the run into a verdict.

Label matching: a rule's ``labels`` mapping matches metrics with exactly those label keys, each
value equal or ``"*"`` (any value); a rule without ``labels`` considers every metric of that name.
When several metrics match, the worst one decides (the highest for a ``max`` rule, the lowest for
a ``min`` rule) and is reported.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from auditkit.errors import ConfigError
from auditkit.spec import format_validation_error

RuleStatus = Literal["pass", "warn", "fail", "not_evaluated"]
NotEvaluatedCause = Literal["not_selected", "skipped", "errored", "undefined", "not_emitted"]
"""Why a rule is ``not_evaluated``: its check was not selected (``only``/``skip``), was skipped
with a reason, errored, emitted the metric without a value, or does not emit it at all."""
ControlStatus = Literal["met", "not_met", "not_evaluated", "attested", "not_assessed"]
RULE_STATUSES: tuple[RuleStatus, ...] = ("pass", "warn", "fail", "not_evaluated")
CONTROL_STATUSES: tuple[ControlStatus, ...] = (
    "met",
    "not_met",
    "not_evaluated",
    "attested",
    "not_assessed",
)


# --------------------------------------------------------------------------- the framework
@dataclass(frozen=True)
class Subcategory:
    id: str
    function: str
    category: str
    text: str


@dataclass(frozen=True)
class Framework:
    """A risk framework's core: functions, categories and subcategories with their text."""

    id: str
    title: str
    document: str
    functions: dict[str, str]
    categories: dict[str, str]
    subcategories: dict[str, Subcategory]
    characteristics: list[dict[str, str]] = field(default_factory=list)


@cache
def load_framework(framework_id: str = "nist-ai-rmf-1.0") -> Framework:
    """A packaged framework file (``policies/frameworks/<id>.yaml``)."""
    ref = resources.files("auditkit.policies") / "frameworks" / f"{framework_id}.yaml"
    if not ref.is_file():
        raise ConfigError(f"framework {framework_id!r} is not packaged; expected nist-ai-rmf-1.0")
    data = yaml.safe_load(ref.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "subcategories" not in data:  # a crosswalk (auditkit.crosswalk), not a control set
        raise ConfigError(
            f"framework {framework_id!r} is a crosswalk to another framework, not a control set a policy's rules map"
            " to; expected nist-ai-rmf-1.0"
        )
    return Framework(
        id=data["id"],
        title=data["title"],
        document=data["document"],
        functions={f["id"]: f["text"] for f in data["functions"]},
        categories={c["id"]: c["text"] for c in data["categories"]},
        subcategories={
            s["id"]: Subcategory(s["id"], s["function"], s["category"], s["text"]) for s in data["subcategories"]
        },
        characteristics=list(data.get("trustworthiness_characteristics", [])),
    )


# --------------------------------------------------------------------------- policies
class Rule(BaseModel):
    """One bound on one metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    metric: str = Field(pattern=r"^[a-z0-9_]+\.[a-z0-9_.]+$")
    labels: dict[str, str] | None = None
    max: float | None = None
    min: float | None = None
    use: Literal["value", "ci_low", "ci_high"] = "value"
    severity: Literal["fail", "warn"] = "fail"
    controls: list[str] = Field(default_factory=list)
    rationale: str = ""
    tasks: list[str] | None = None
    """The ``model.task`` values the rule applies to (``None``: every task). On another task the
    rule is not applicable: left out of the judgement and counted as such, not ``not_evaluated``."""
    inputs: list[Literal["images", "volumes"]] | None = Field(default=None, min_length=1)
    """The inputs the rule applies to: ``images`` (2-D) and/or ``volumes`` (``model.input.depth``
    set); ``None``: both. On the other input the rule is not applicable, as for ``tasks``."""
    needs_reference: bool = False
    """The rule judges the model against ``model.reference`` (parity); without a reference in the
    spec it is not applicable, as for ``tasks``."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        from auditkit.spec import TASKS

        if tasks is not None:
            unknown = [t for t in tasks if t not in TASKS]
            if unknown or not tasks:
                raise ValueError(f"tasks must be a non-empty list of {list(TASKS)}, got {tasks}")
        return tasks

    def applies_to(self, task: str, spatial_dims: int = 2, has_reference: bool = False) -> bool:
        inputs = "volumes" if spatial_dims == 3 else "images"
        return (
            (self.tasks is None or task in self.tasks)
            and (self.inputs is None or inputs in self.inputs)
            and (has_reference or not self.needs_reference)
        )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, labels: Any) -> Any:
        if isinstance(labels, dict):
            return {str(k): str(v) for k, v in labels.items()}
        return labels

    @model_validator(mode="after")
    def _one_bound(self) -> Rule:
        if (self.max is None) == (self.min is None):
            raise ValueError(f"rule {self.id}: give exactly one of max or min")
        return self

    @property
    def threshold(self) -> float:
        return self.max if self.max is not None else self.min  # type: ignore[return-value]

    @property
    def bound(self) -> Literal["max", "min"]:
        return "max" if self.max is not None else "min"


class Policy(BaseModel):
    """A named, versioned set of rules against a framework."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    framework: str = "nist-ai-rmf-1.0"
    description: str = ""
    rules: list[Rule]

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.id in seen:
                raise ValueError(f"rule ids must be unique, {rule.id!r} appears twice")
            seen.add(rule.id)
        return rules


def packaged_policies() -> list[str]:
    """Names of the policies shipped in ``auditkit.policies``."""
    folder = resources.files("auditkit.policies")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _validate_controls(policy: Policy, source: str) -> Policy:
    framework = load_framework(policy.framework)
    for rule in policy.rules:
        unknown = [c for c in rule.controls if c not in framework.subcategories]
        if unknown:
            raise ConfigError(
                f"{source}: rule {rule.id}: unknown {policy.framework} subcategories {unknown}"
                " (expected ids such as 'MEASURE 2.5')"
            )
    return policy


def parse_policy(data: Any, source: str) -> Policy:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with name, version, framework and rules")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source, Policy)) from None
    return _validate_controls(policy, source)


def load_policy(name_or_path: str, *, base_dir: Path | None = None) -> tuple[Policy, str]:
    """A packaged policy by name, or a YAML file (relative to ``base_dir``).

    Returns the policy and the text it was read from (for hashing into the bundle manifest).
    """
    if name_or_path in packaged_policies():
        ref = resources.files("auditkit.policies") / f"{name_or_path}.yaml"
        text = ref.read_text(encoding="utf-8")
        source = f"policy {name_or_path}"
    else:
        path = Path(name_or_path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"policy: {name_or_path!r} is neither a packaged policy {packaged_policies()} nor a file")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    return parse_policy(data, source), text


# --------------------------------------------------------------------------- attestations
class Attestation(BaseModel):
    """Evidence for a subcategory no automated test can measure (e.g. GOVERN 1.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    control: str
    evidence: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    date: dt.date


class Attestations(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attestations: list[Attestation]


def load_attestations(path: Path, framework: Framework) -> list[Attestation]:
    """Read ``attestations.yaml``; every control must be a subcategory of the framework."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"attestations file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        parsed = Attestations.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path), Attestations)) from None
    for item in parsed.attestations:
        if item.control not in framework.subcategories:
            raise ConfigError(f"{path}: attestations: control {item.control!r} is not a {framework.id} subcategory")
    return list(parsed.attestations)


# --------------------------------------------------------------------------- evaluation
def labels_match(rule_labels: Mapping[str, str] | None, metric_labels: Mapping[str, str]) -> bool:
    """Exact key set; each value equal or ``*``. ``None`` (labels omitted) matches everything."""
    if rule_labels is None:
        return True
    if set(rule_labels) != set(metric_labels):
        return False
    return all(v == "*" or metric_labels[k] == v for k, v in rule_labels.items())


def _judged_value(metric: Mapping[str, Any], use: str) -> tuple[float | None, str | None]:
    value = metric.get("value")
    if value is None:
        return None, metric.get("reason") or "undefined"
    if use == "value":
        return float(value), None
    ci = metric.get("ci")
    if not ci:
        return float(value), "no interval; judged on the value"
    return float(ci[0] if use == "ci_low" else ci[1]), None


def evaluate_rule(rule: Rule, metrics: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The outcome of one rule over all metrics of a run (``metrics`` from every check)."""
    candidates = [m for m in metrics if m["name"] == rule.metric and labels_match(rule.labels, m.get("labels", {}))]
    record: dict[str, Any] = {
        "id": rule.id,
        "status": "not_evaluated",
        "metric": rule.metric,
        "labels": dict(rule.labels) if rule.labels is not None else None,
        "observed": None,
        "ci": None,
        "use": rule.use,
        "bound": rule.bound,
        "threshold": rule.threshold,
        "severity": rule.severity,
        "controls": list(rule.controls),
        "rationale": rule.rationale,
        "matched": len(candidates),
        "note": None,
        "cause": None,
    }
    if not candidates:
        record["note"] = "metric not emitted (check skipped, errored or not selected)"
        record["cause"] = "not_emitted"
        return record
    judged = [(m, *_judged_value(m, rule.use)) for m in candidates]
    defined = [(m, v, note) for m, v, note in judged if v is not None]
    if not defined:
        record["note"] = f"metric undefined: {judged[0][2]}"
        record["labels"] = dict(candidates[0].get("labels", {}))
        record["cause"] = "undefined"
        return record
    pick = max if rule.bound == "max" else min
    metric, value, note = pick(defined, key=lambda item: item[1])
    assert value is not None
    violated = value > rule.threshold if rule.bound == "max" else value < rule.threshold
    record.update(
        status=rule.severity if violated else "pass",
        labels=dict(metric.get("labels", {})),
        observed=value,
        ci=metric.get("ci"),
        note=note,
    )
    if len(defined) < len(candidates):
        undefined = len(candidates) - len(defined)
        record["note"] = ((note + "; ") if note else "") + f"{undefined} matching value(s) undefined"
    return record


def control_status(rule_records: Sequence[Mapping[str, Any]], attested: bool) -> ControlStatus:
    """A subcategory's status from the rules mapped to it and any attestation."""
    statuses = {r["status"] for r in rule_records}
    if "fail" in statuses:
        return "not_met"
    if statuses & {"pass", "warn"}:
        return "met"
    if attested:
        return "attested"
    return "not_evaluated" if statuses else "not_assessed"


def explain_absence(
    record: dict[str, Any],
    checks: Sequence[Mapping[str, Any]],
    emitters: Mapping[str, str],
    not_run: Iterable[str],
) -> None:
    """Say why an unmatched rule's metric is absent: which check emits it and what became of it."""
    check_id = emitters.get(record["metric"])
    if check_id is None:
        record["note"] = "no installed check emits this metric"
        return
    by_id = {c.get("id"): c for c in checks}
    check = by_id.get(check_id)
    if check_id in set(not_run) or check is None:
        record["cause"] = "not_selected"
        record["note"] = f"check {check_id} not selected (only/skip)"
    elif check.get("status") == "skipped":
        record["cause"] = "skipped"
        record["note"] = f"check {check_id} skipped: {check.get('reason')}"
    elif check.get("status") == "error":
        record["cause"] = "errored"
        error = check.get("error") or {}
        record["note"] = f"check {check_id} errored: {error.get('type')}"
    else:
        record["note"] = f"check {check_id} ran but emitted no {record['metric']} with these labels"


def evaluated_summary(rules: Sequence[Mapping[str, Any]], not_run: Sequence[str]) -> dict[str, Any]:
    """How much of the policy this run judged, and the one-line statement of it.

    A narrowed audit (``not_run`` non-empty) is ``partial``: its verdict covers only the rules of
    the checks that ran, and every report of the verdict says so.
    """
    evaluated = sum(r["status"] in ("pass", "warn", "fail") for r in rules)
    total = len(rules)
    partial = bool(not_run)
    text = f"{evaluated} of {total} rules evaluated"
    if partial:
        text = f"partial: {text}; not run: {', '.join(not_run)}"
    else:
        causes: dict[str, int] = {}
        for rule in rules:
            if rule["status"] == "not_evaluated":
                cause = str(rule.get("cause") or "not_emitted")
                causes[cause] = causes.get(cause, 0) + 1
        if causes:
            text += " (not evaluated: " + ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in causes.items()) + ")"
    return {
        "rules_evaluated": evaluated,
        "rules_total": total,
        "partial": partial,
        "not_run": list(not_run),
        "text": text,
    }


def evaluate(
    policy: Policy,
    checks: Sequence[Mapping[str, Any]],
    *,
    attestations: Sequence[Attestation] = (),
    emitters: Mapping[str, str] | None = None,
    not_run: Sequence[str] = (),
    task: str = "classification",
    spatial_dims: int = 2,
    has_reference: bool = False,
) -> dict[str, Any]:
    """Judge a run's check records: rule outcomes, subcategory statuses and the verdict.

    Args:
        policy: the rules.
        checks: the run's check records.
        attestations: evidence for controls no test measures.
        emitters: metric name -> id of the check that emits it (from the checks' ``emits``), to
            say why a rule's metric is absent.
        not_run: installed checks this run did not select; rules of theirs are ``not_selected``
            and the verdict is partial.
        task: the model's task; a rule whose ``tasks`` exclude it is not applicable (listed
            under ``policy.not_applicable``, neither judged nor counted).
        spatial_dims: 3 for volumes (``model.input.depth``), else 2; a rule whose ``inputs``
            exclude them is not applicable, as for ``task``.
        has_reference: the spec names ``model.reference``; without it a rule that
            ``needs_reference`` is not applicable.
    """
    framework = load_framework(policy.framework)
    metrics = [m for check in checks for m in check.get("metrics", [])]
    applicable = [rule for rule in policy.rules if rule.applies_to(task, spatial_dims, has_reference)]
    not_applicable = [rule.id for rule in policy.rules if not rule.applies_to(task, spatial_dims, has_reference)]
    inputs = "volumes" if spatial_dims == 3 else "images"
    rules = [evaluate_rule(rule, metrics) for rule in applicable]
    for record in rules:
        if record["cause"] == "not_emitted" and emitters is not None:
            explain_absence(record, checks, emitters, not_run)
    attested = {a.control: a for a in attestations}
    controls = []
    for sub in framework.subcategories.values():
        mapped = [r for r in rules if sub.id in r["controls"]]
        attestation = attested.get(sub.id)
        controls.append(
            {
                "id": sub.id,
                "function": sub.function,
                "category": sub.category,
                "status": control_status(mapped, attestation is not None),
                "rules": [r["id"] for r in mapped],
                "attestation": attestation.model_dump(mode="json") if attestation else None,
            }
        )
    errored = [c["id"] for c in checks if c.get("status") == "error"]
    failed = [r["id"] for r in rules if r["status"] == "fail"]
    evaluated = evaluated_summary(rules, not_run)
    if not_applicable:
        why = f"{task} on {inputs}" + ("" if has_reference else ", no model.reference")
        evaluated["text"] += f"; {len(not_applicable)} rules do not apply ({why})"
    # A gate never passes on nothing: when every selected check was skipped, nothing about the
    # model was measured (the coverage record measures the data, not the model).
    model_checks = [c for c in checks if c.get("id") != "coverage"]
    nothing_measured = bool(model_checks) and not any(c.get("status") == "ok" for c in model_checks)
    if nothing_measured:
        evaluated["nothing_measured"] = True
        evaluated["text"] = "no check measured the model (every selected check was skipped); " + evaluated["text"]
    return {
        "policy": {
            "name": policy.name,
            "version": policy.version,
            "framework": policy.framework,
            "description": policy.description,
            "rule_counts": {s: sum(r["status"] == s for r in rules) for s in RULE_STATUSES},
            "control_counts": {s: sum(c["status"] == s for c in controls) for s in CONTROL_STATUSES},
            "checks_errored": errored,
            "evaluated": evaluated,
            "not_applicable": {"task": task, "inputs": inputs, "reference": has_reference, "rules": not_applicable},
        },
        "rules": rules,
        "controls": controls,
        "verdict": "fail" if failed or errored or nothing_measured else "pass",
    }
