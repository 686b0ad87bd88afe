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

import csv
import datetime as dt
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import PurePath
from typing import Any, Literal, cast

import yaml

from auditkit.errors import ConfigError
from auditkit.export import neutralise

__all__ = [
    "COLUMNS",
    "FILLS",
    "FRAMEWORKS",
    "PREFILLED_KEYS",
    "Crosswalk",
    "CrosswalkItem",
    "CrosswalkSource",
    "crosswalk_table",
    "load_crosswalk",
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

PREFILLED_KEYS: frozenset[str] = frozenset(
    {
        "model.identity",  # name, format, artefact and weights SHA-256
        "model.task",
        "model.classes",
        "model.input",  # shape, channels, modality
        "model.architecture",  # module class, parameter count
        "model.preprocessing",  # normalisation, windowing, resizing
        "model.operating_point",
        "intended_use",  # the spec's intended-use block
        "data.splits",  # counts by split
        "data.sites",
        "data.devices",  # DICOM Manufacturer and model
        "data.date_range",  # month-coarsened
        "data.sex",
        "data.age_bands",
        "data.prevalence",  # label prevalence
        "data.quarantine",  # unreadable rows by reason
        "policy.identity",  # policy name and SHA-256, recorded before the run
        "run.environment",  # auditkit version, device, seed
        "audit.limitations",  # known limitations from the checks' findings
        "monitoring.baselines",  # OOD thresholds and reference distributions
    }
)
"""The facts a bundle records that a crosswalk item may name under ``prefilled``."""

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


def _observed(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return f"{number:.3g}"


def _evidence_text(item: CrosswalkItem, by_id: Mapping[str, Mapping[str, Any]]) -> tuple[str, bool]:
    parts: list[str] = []
    measured = False
    for rule_id in item.rules:
        record = by_id.get(rule_id)
        # A rule the run did not consider (another task, or not in the policy) is left out.
        if record is None or record.get("status") == "not_applicable":
            continue
        status = str(record.get("status"))
        observed = record.get("observed")
        if status in EVALUATED:
            measured = True
        parts.append(f"{rule_id} {status}" + (f" ({_observed(observed)})" if observed is not None else ""))
    return ", ".join(parts), measured


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
    by_id = {str(record.get("id")): record for record in rules}
    rows: list[dict[str, str]] = []
    for item in crosswalk.items:
        evidence, measured = _evidence_text(item, by_id)
        rows.append(
            {
                "id": item.id,
                "title": item.title,
                "fill": ", ".join(item.fill),
                "evidence": evidence,
                "prefilled": ", ".join(item.prefilled),
                "person": item.person or "",
                "status": "measured" if measured else "to be supplied",
            }
        )
    return rows


_HEADINGS = {
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


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`crosswalk_table` rows, one line per item, columns :data:`COLUMNS`."""
    lines = [
        "| " + " | ".join(_HEADINGS[column] for column in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of :func:`crosswalk_table` rows: a header of :data:`COLUMNS`, then one row per item.

    Cells are made spreadsheet-safe as in ``metrics.csv`` (:func:`auditkit.export.neutralise`:
    text starting with ``=``, ``+``, ``-`` or ``@`` gets a leading ``'``), every text cell is
    quoted and lines end with CRLF.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
    writer.writerow([neutralise(column) for column in COLUMNS])
    for row in rows:
        writer.writerow([neutralise(row.get(column)) for column in COLUMNS])
    return buffer.getvalue()
