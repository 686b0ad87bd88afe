"""Regulatory crosswalks as data: which items of a framework an audit answers, and how.

A crosswalk file (``policies/frameworks/<id>.yaml``) lists the items of one regulatory framework
that a submission pack answers: the FDA draft guidance on AI-enabled device software functions,
Annex IV of the EU AI Act, the IMDRF good machine learning practice principles and the Annex A
controls of ISO/IEC 42001. Each item says how much of it an automated audit can supply (``fill``,
one or more of, in this order):

- ``measured``: rules of the packaged policies judge it (``evidence``: rule ids, the metrics and
  finding kinds of the packaged checks behind them);
- ``prefilled``: facts the bundle records, from the vocabulary :data:`PREFILLED_KEYS`, which a
  person reviews or completes;
- ``person``: a person or the organisation must supply it (``person`` says what, in one sentence;
  an item filled otherwise may say too what a person adds).

``evidence`` is present exactly when ``fill`` has ``measured``, and ``prefilled`` exactly when it
has ``prefilled``. Titles are short paraphrases, never the source's text; each file records its
source and the date it was recorded. Like the policies, the mapping is data: no item is decided
in code. :func:`crosswalk_table` joins a crosswalk with a run's rule outcomes
(``results.json``'s ``rules``) into one row per item, which :func:`to_markdown` and
:func:`to_csv` write.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import PurePath
from typing import Any, Literal, cast

import yaml

from auditkit.errors import ConfigError
from auditkit.export import csv_text

__all__ = [
    "COLUMNS",
    "CONTROL_COLUMNS",
    "FILLS",
    "FRAMEWORKS",
    "PREFILLED",
    "PREFILLED_KEYS",
    "Crosswalk",
    "CrosswalkItem",
    "CrosswalkSource",
    "controls_table",
    "crosswalk_table",
    "evidence_text",
    "is_measured",
    "item_evidence",
    "load_crosswalk",
    "observed_text",
    "to_csv",
    "to_markdown",
]

FRAMEWORKS: tuple[str, ...] = (
    "fda-ai-dsf-2025-draft",
    "eu-ai-act-annex-iv",
    "imdrf-gmlp-2025",
    "iso-iec-42001-2023",
)
"""The packaged crosswalks, by id (the file stem under ``policies/frameworks/``)."""

Fill = Literal["measured", "prefilled", "person"]
FILLS: tuple[Fill, ...] = ("measured", "prefilled", "person")
"""How an item is filled, in the order a ``fill`` list names them."""

PREFILLED: Mapping[str, str] = {
    "model.identity": "model identity and SHA-256 (model card)",
    "model.task": "task (model card)",
    "model.classes": "classes (model card)",
    "model.input": "input shape, channels (model card)",
    "model.architecture": "architecture, parameter count (model card)",
    "model.preprocessing": "normalisation and resizing (model card)",
    "model.operating_point": "operating point (model card)",
    "intended_use": "intended use as the spec states it (model card)",
    "data.splits": "images per split (data card)",
    "data.sites": "sites (data card)",
    "data.devices": "acquisition devices (data card)",
    "data.date_range": "study dates by month (data card)",
    "data.sex": "counts by sex (data card)",
    "data.age_bands": "counts by age band (data card)",
    "data.prevalence": "label prevalence (data card)",
    "data.quarantine": "unreadable rows by reason (data card)",
    "policy.identity": "policy name and SHA-256 (manifest.json)",
    "run.environment": "auditkit version, device, seed (results.json run)",
    "audit.limitations": "known limitations from the findings (model card)",
    "monitoring.baselines": "OOD thresholds and reference distributions (results.json)",
}
"""The facts a bundle records that a crosswalk item may name under ``prefilled``, each with
what it is and where the pack holds it."""

PREFILLED_KEYS: frozenset[str] = frozenset(PREFILLED)


COLUMNS: tuple[str, ...] = ("id", "title", "fill", "evidence", "prefilled", "person", "status")
"""The columns of a crosswalk table row, in order."""

EVALUATED = ("pass", "warn", "fail")
"""Rule statuses that mean the rule's metric was measured and judged."""

_TOP_KEYS = ("id", "title", "source", "recorded", "note", "items")
_SOURCE_KEYS = ("document", "publisher", "date", "status", "reference")
_SOURCE_STATUSES = ("draft", "final", "in force", "standard")
_ITEM_KEYS = ("id", "title", "fill", "evidence", "prefilled", "person")
_EVIDENCE_KEYS = ("rules", "metrics", "findings")
_DATE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?$")
_DAY = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
# The same shapes the policies accept for rule ids and metric names.
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_METRIC = re.compile(r"^[a-z0-9_]+\.[a-z0-9_.]+$")
_FINDING = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class CrosswalkSource:
    """The document a crosswalk follows: title, publisher, date, status and its reference number."""

    document: str
    publisher: str
    date: str
    """``YYYY-MM`` or ``YYYY-MM-DD``."""
    status: Literal["draft", "final", "in force", "standard"]
    reference: str
    """Docket, regulation or standard number."""


@dataclass(frozen=True)
class CrosswalkItem:
    """One item of a framework and how an audit fills it.

    ``rules``, ``metrics`` and ``findings`` are the measured evidence (empty unless ``fill`` has
    ``measured``); ``prefilled`` the keys of :data:`PREFILLED_KEYS` (empty unless ``fill`` has
    ``prefilled``); ``person`` what a person or the organisation supplies (``None``: nothing).
    """

    id: str
    title: str
    fill: tuple[Fill, ...]
    rules: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()
    prefilled: tuple[str, ...] = ()
    person: str | None = None


@dataclass(frozen=True)
class Crosswalk:
    """A packaged crosswalk: the framework's source, when it was recorded, and its items in order."""

    id: str
    title: str
    source: CrosswalkSource
    recorded: str
    """``YYYY-MM-DD``: when the items were taken from the source."""
    note: str
    items: tuple[CrosswalkItem, ...]

    def item(self, item_id: str) -> CrosswalkItem:
        """The item with this id (``KeyError`` when there is none)."""
        for candidate in self.items:
            if candidate.id == item_id:
                return candidate
        raise KeyError(item_id)


# --------------------------------------------------------------------------------------------
# Loading and validation


@cache
def load_crosswalk(framework_id: str) -> Crosswalk:
    """A packaged crosswalk (``policies/frameworks/<framework_id>.yaml``), validated.

    Args:
        framework_id: One of :data:`FRAMEWORKS`.

    Returns:
        The crosswalk, its items in the file's order.

    Raises:
        ConfigError: The id is not a packaged crosswalk, or its file is invalid (the message
            names the file, the item id and the field).
    """
    if framework_id not in FRAMEWORKS:
        raise ConfigError(f"crosswalk {framework_id!r} is not packaged; expected one of {list(FRAMEWORKS)}")
    name = f"{framework_id}.yaml"
    ref = resources.files("auditkit.policies") / "frameworks" / name
    if not ref.is_file():
        raise ConfigError(f"crosswalk {framework_id!r}: {name} is missing from auditkit.policies/frameworks")
    return _parse(ref.read_text(encoding="utf-8"), name)


def _parse(text: str, name: str) -> Crosswalk:
    """Parse and validate one crosswalk file's text.

    Args:
        text: The YAML text.
        name: The file name, for messages; its stem must equal the file's ``id``.

    Raises:
        ConfigError: ``<name>: <field>: <problem>, got <value>``, or
            ``<name>: item <id>: <field>: ...`` for a problem inside an item.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{name}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping with keys {list(_TOP_KEYS)}, got {type(data).__name__}")
    _keys(data, _TOP_KEYS, _TOP_KEYS, name)
    framework_id = _text(data["id"], f"{name}: id")
    stem = PurePath(name).stem
    if framework_id != stem:
        raise ConfigError(f"{name}: id: must equal the file stem {stem!r}, got {framework_id!r}")
    items = data["items"]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{name}: items: expected a non-empty list, got {items!r}")
    parsed: list[CrosswalkItem] = []
    seen: set[str] = set()
    for index, raw in enumerate(items):
        item = _item(raw, f"{name}: items[{index}]", name)
        if item.id in seen:
            raise ConfigError(f"{name}: item {item.id}: id: appears twice")
        seen.add(item.id)
        parsed.append(item)
    return Crosswalk(
        id=framework_id,
        title=_text(data["title"], f"{name}: title"),
        source=_source(data["source"], f"{name}: source"),
        recorded=_date(data["recorded"], f"{name}: recorded", _DAY, "YYYY-MM-DD"),
        note=_text(data["note"], f"{name}: note"),
        items=tuple(parsed),
    )


def _source(raw: Any, where: str) -> CrosswalkSource:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(_SOURCE_KEYS)}, got {raw!r}")
    _keys(raw, _SOURCE_KEYS, _SOURCE_KEYS, where)
    status = _text(raw["status"], f"{where}.status")
    if status not in _SOURCE_STATUSES:
        raise ConfigError(f"{where}.status: expected one of {list(_SOURCE_STATUSES)}, got {status!r}")
    return CrosswalkSource(
        document=_text(raw["document"], f"{where}.document"),
        publisher=_text(raw["publisher"], f"{where}.publisher"),
        date=_date(raw["date"], f"{where}.date", _DATE, "YYYY-MM or YYYY-MM-DD"),
        status=cast(Literal["draft", "final", "in force", "standard"], status),
        reference=_text(raw["reference"], f"{where}.reference"),
    )


def _item(raw: Any, where: str, name: str) -> CrosswalkItem:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(_ITEM_KEYS)}, got {raw!r}")
    if isinstance(raw.get("id"), str) and raw["id"].strip():
        # Name the item by its id in every message once it has one.
        where = f"{name}: item {raw['id'].strip()}"
    _keys(raw, _ITEM_KEYS, ("id", "title", "fill"), where)
    item_id = _text(raw["id"], f"{where}: id")
    fill = _fill(raw["fill"], f"{where}: fill")
    evidence: dict[str, tuple[str, ...]] = {key: () for key in _EVIDENCE_KEYS}
    if ("measured" in fill) != ("evidence" in raw):
        raise ConfigError(
            f"{where}: evidence: present exactly when fill has 'measured'; fill is {list(fill)},"
            f" evidence {'given' if 'evidence' in raw else 'missing'}"
        )
    if "evidence" in raw:
        evidence = _evidence(raw["evidence"], f"{where}: evidence")
    if ("prefilled" in fill) != ("prefilled" in raw):
        raise ConfigError(
            f"{where}: prefilled: present exactly when fill has 'prefilled'; fill is {list(fill)},"
            f" prefilled {'given' if 'prefilled' in raw else 'missing'}"
        )
    prefilled: tuple[str, ...] = ()
    if "prefilled" in raw:
        prefilled = _names(raw["prefilled"], f"{where}: prefilled", None, "a fact key")
        unknown = sorted(set(prefilled) - PREFILLED_KEYS)
        if unknown:
            raise ConfigError(f"{where}: prefilled: unknown keys {unknown}; expected keys of {sorted(PREFILLED_KEYS)}")
    person = _text(raw["person"], f"{where}: person") if "person" in raw else None
    if "person" in fill and person is None:
        raise ConfigError(f"{where}: person: required when fill has 'person' (say what a person supplies)")
    return CrosswalkItem(
        id=item_id,
        title=_text(raw["title"], f"{where}: title"),
        fill=fill,
        rules=evidence["rules"],
        metrics=evidence["metrics"],
        findings=evidence["findings"],
        prefilled=prefilled,
        person=person,
    )


def _fill(raw: Any, where: str) -> tuple[Fill, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty list of {list(FILLS)}, got {raw!r}")
    unknown = [value for value in raw if value not in FILLS]
    if unknown:
        raise ConfigError(f"{where}: expected values of {list(FILLS)}, got {unknown}")
    ordered = [value for value in FILLS if value in raw]
    if list(raw) != ordered:
        raise ConfigError(f"{where}: expected each value once, in the order {list(FILLS)}, got {raw}")
    return tuple(ordered)


def _evidence(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {list(_EVIDENCE_KEYS)}, got {raw!r}")
    _keys(raw, _EVIDENCE_KEYS, ("rules", "metrics"), where)
    return {
        "rules": _names(raw["rules"], f"{where}.rules", _RULE_ID, "a rule id"),
        "metrics": _names(raw["metrics"], f"{where}.metrics", _METRIC, "a metric name such as 'performance.auroc'"),
        "findings": _names(raw["findings"], f"{where}.findings", _FINDING, "a finding kind such as 'near_duplicate'")
        if "findings" in raw
        else (),
    }


def _keys(raw: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str], where: str) -> None:
    unknown = sorted(str(key) for key in raw if key not in allowed)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key; expected keys of {list(allowed)}")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ConfigError(f"{where}: {missing[0]}: required key missing")


def _text(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}: expected non-empty text, got {raw!r}")
    return raw.strip()


def _date(raw: Any, where: str, pattern: re.Pattern[str], expected: str) -> str:
    # An unquoted YAML date arrives as a date; both spellings are accepted.
    text = raw.isoformat() if isinstance(raw, dt.date) and not isinstance(raw, dt.datetime) else raw
    if not isinstance(text, str) or not pattern.match(text):
        raise ConfigError(f"{where}: expected a date {expected}, got {raw!r}")
    return text


def _names(raw: Any, where: str, pattern: re.Pattern[str] | None, expected: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty list, each {expected}, got {raw!r}")
    for value in raw:
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if len(set(raw)) != len(raw):
        twice = sorted({value for value in raw if raw.count(value) > 1})
        raise ConfigError(f"{where}: each value once, got {twice} more than once")
    return tuple(raw)


# --------------------------------------------------------------------------------------------
# Tables


def observed_text(value: Any) -> str:
    """An observed value as a table shows it: integers whole, others to three significant figures."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return f"{number:.3g}"


def item_evidence(item: CrosswalkItem, rules: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The outcomes of an item's rules in a run: ``{id, status, observed}`` per rule, in the
    item's order.

    A rule the run did not consider (absent from ``rules``: another task, or not in the policy)
    or that does not apply is left out; one whose check did not run is kept as
    ``not_evaluated``. ``rules`` is ``results.json``'s ``rules``.
    """
    return _outcomes(item.rules, {str(record.get("id")): record for record in rules})


def _outcomes(rule_ids: Sequence[str], by_id: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{id, status, observed}`` of each rule the run judged or could not evaluate, in order."""
    out: list[dict[str, Any]] = []
    for rule_id in rule_ids:
        record = by_id.get(rule_id)
        if record is None or record.get("status") == "not_applicable":
            continue
        out.append({"id": rule_id, "status": str(record.get("status")), "observed": record.get("observed")})
    return out


def is_measured(evidence: Sequence[Mapping[str, Any]]) -> bool:
    """Whether at least one rule of :func:`item_evidence`'s list was measured and judged."""
    return any(record["status"] in EVALUATED for record in evidence)


def evidence_text(evidence: Sequence[Mapping[str, Any]]) -> str:
    """``"RULE-A pass (0.93), RULE-B not_evaluated"`` for :func:`item_evidence`'s list."""
    return ", ".join(
        f"{record['id']} {record['status']}"
        + (f" ({observed_text(record['observed'])})" if record.get("observed") is not None else "")
        for record in evidence
    )


def crosswalk_table(crosswalk: Crosswalk, rules: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One row per item of the crosswalk, joined with a run's rule outcomes.

    Args:
        crosswalk: From :func:`load_crosswalk`.
        rules: ``results.json``'s ``rules``: each with ``id``, ``status`` (``pass``, ``warn``,
            ``fail``, ``not_evaluated`` or ``not_applicable``) and ``observed``.

    Returns:
        Rows with the keys of :data:`COLUMNS`, every value text: ``fill`` and ``prefilled`` joined
        with ``", "``; ``evidence`` the item's rules that the run judged or could not evaluate, as
        ``"RULE-A pass (0.93), RULE-B not_evaluated"`` (rules absent from ``rules`` or not
        applicable are left out; empty for an item without measured evidence); ``person`` the
        sentence or ``""``; ``status`` ``"measured"`` when at least one of the item's rules was
        evaluated (``pass``, ``warn`` or ``fail``), otherwise ``"to be supplied"``. A measured item
        may still need a person: the ``person`` column says what.
    """
    rows: list[dict[str, str]] = []
    for item in crosswalk.items:
        evidence = item_evidence(item, rules)
        rows.append(
            {
                "id": item.id,
                "title": item.title,
                "fill": ", ".join(item.fill),
                "evidence": evidence_text(evidence),
                "prefilled": ", ".join(item.prefilled),
                "person": item.person or "",
                "status": "measured" if is_measured(evidence) else "to be supplied",
            }
        )
    return rows


CONTROL_COLUMNS: tuple[str, ...] = ("id", "text", "status", "evidence", "attestation")
"""The columns of an AI RMF control table row (:func:`controls_table`), in order."""


def controls_table(framework: Any, results: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per subcategory of the AI RMF Core, with the status a run gives it.

    Args:
        framework: The policy's framework (:func:`auditkit.policy.load_framework`): its
            ``subcategories`` in order, each with ``id`` and ``text``.
        results: ``results.json``: its ``controls`` (``{id, status, rules, attestation}``) and
            ``rules``.

    Returns:
        Rows with the keys of :data:`CONTROL_COLUMNS`: ``status`` ``met``, ``not_met``,
        ``not_evaluated``, ``attested`` or ``not_assessed``; ``evidence`` the mapped rules'
        outcomes as in :func:`evidence_text`; ``attestation`` the organisation's evidence, owner and
        date, or ``""``.
    """
    controls = {str(c.get("id")): c for c in results.get("controls", [])}
    by_id = {str(r.get("id")): r for r in results.get("rules", [])}
    rows: list[dict[str, str]] = []
    for sub in framework.subcategories.values():
        control = controls.get(sub.id, {})
        evidence = _outcomes(control.get("rules", []), by_id)
        attestation = control.get("attestation") or {}
        rows.append(
            {
                "id": sub.id,
                "text": sub.text,
                "status": str(control.get("status", "not_assessed")),
                "evidence": evidence_text(evidence),
                "attestation": (
                    f"{attestation.get('evidence')} ({attestation.get('owner')}, {attestation.get('date')})"
                    if attestation
                    else ""
                ),
            }
        )
    return rows


_HEADINGS = {
    "text": "Subcategory (verbatim)",
    "attestation": "Attestation (evidence, owner, date)",
    "id": "Item",
    "title": "Title",
    "fill": "Fill",
    "evidence": "Evidence (rule, status, observed)",
    "prefilled": "Prefilled facts",
    "person": "To be supplied by a person",
    "status": "Status",
}


def _cell(value: Any) -> str:
    """Table-cell safe: a pipe or line break in a value must not break the table."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table of :func:`crosswalk_table` rows (or, with :data:`CONTROL_COLUMNS`,
    :func:`controls_table` rows), one line per item."""
    lines = [
        "| " + " | ".join(_HEADINGS[column] for column in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """CSV of :func:`crosswalk_table` rows (or :func:`controls_table` rows with
    :data:`CONTROL_COLUMNS`): a header of the columns, then one row per item.

    Cells are made spreadsheet-safe as in ``metrics.csv`` (:func:`auditkit.export.neutralise`:
    text starting with ``=``, ``+``, ``-`` or ``@`` gets a leading ``'``), every text cell is
    quoted and lines end with CRLF.
    """
    return csv_text(columns, rows)
