"""The PHI check: do the DICOM headers of the audited data still identify patients?

The judgement of one header against DICOM PS3.15 Table E.1-1 is a set of plain functions in
:mod:`.profile` (testable without the engine); :class:`PHICheck` reads every DICOM file of the
audit header-only, judges it and counts files per attribute keyword.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs
from auditkit.checks.phi.profile import (
    BASIC_PROFILE,
    PRIVATE_KEYWORD,
    REASONS,
    ConfidentialityTable,
    Declaration,
    Identifier,
    declaration,
    effective_action,
    identifying_elements,
    judge,
    load_table,
    looks_real,
    parse_table,
)

if TYPE_CHECKING:
    import pydicom

    from auditkit.check import CheckContext

__all__ = [
    "BASIC_PROFILE",
    "PRIVATE_KEYWORD",
    "REASONS",
    "ConfidentialityTable",
    "Declaration",
    "FileVerdict",
    "Identifier",
    "PHICheck",
    "declaration",
    "effective_action",
    "identifying_elements",
    "judge",
    "judge_header",
    "load_table",
    "looks_real",
    "parse_table",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileVerdict:
    """The judgement of one header (keywords and flags only, no value).

    Attributes:
        declaration: PatientIdentityRemoved and the declared profile codes.
        identifiers: the identifying attributes found.
        burned_in_annotation: BurnedInAnnotation (0028,0301) is ``YES``.
    """

    declaration: Declaration
    identifiers: tuple[Identifier, ...]
    burned_in_annotation: bool

    @property
    def identity_removed(self) -> bool:
        return bool(self.declaration.identity_removed)


def judge_header(ds: pydicom.Dataset, table: ConfidentialityTable | None = None) -> FileVerdict:
    """Judge one DICOM header against Table E.1-1 (see :mod:`.profile` for the rules).

    Args:
        ds: a header (pixel data not needed) — patient data, read in memory only.
        table: the table; default the packaged one.
    """
    table = table or load_table()
    decl = declaration(ds, table)
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
    return FileVerdict(decl, tuple(identifying_elements(ds, table, decl)), burned)


@dataclass
class _File:
    split: str
    row: int
    quarantined: bool


@dataclass
class _Tally:
    """File counts per keyword, per split, with capped row lists."""

    max_rows: int
    files: int = 0
    by_split: Counter[str] = field(default_factory=Counter)
    rows: dict[str, list[int]] = field(default_factory=dict)
    truncated: bool = False

    def add(self, file: _File) -> None:
        self.files += 1
        self.by_split[file.split] += 1
        listed = self.rows.setdefault(file.split, [])
        if listed and listed[-1] == file.row:
            return  # another slice of the same series: one row
        if len(listed) < self.max_rows:
            listed.append(file.row)
        else:
            self.truncated = True

    def finding(self, kind: str, **extra: Any) -> dict[str, Any]:
        return {
            "kind": kind,
            **extra,
            "files": self.files,
            "splits": dict(sorted(self.by_split.items())),
            "rows": {s: sorted(r) for s, r in sorted(self.rows.items())},
            "rows_truncated": self.truncated,
        }


class PHIParams(CheckParams):
    """Parameters of :class:`PHICheck`.

    Attributes:
        include_quarantined: also read the headers of quarantined files.
        max_rows_listed: row numbers listed per finding and split.
    """

    include_quarantined: bool = True
    max_rows_listed: int = Field(default=100, ge=0)


class PHICheck(Check[PHIParams]):
    """Protected health information left in DICOM headers, judged against DICOM PS3.15 E.1-1.

    Method: every DICOM file of the audit (the eval and train splits, their quarantined files,
    whose images could not be decoded but whose headers may still be read, and the spec's OOD
    sets) is read header-only (:func:`auditkit.decode.read_dicom_header`: bounded, pixel data
    skipped, pydicom's value-quoting warnings silenced; a decoded image's header is kept from the
    decode pass with exactly the elements such a read gives) and each attribute, nested ones
    included, is judged against Table E.1-1 of DICOM PS3.15 Annex E (Application Level
    Confidentiality Profile Attributes, 2024b; packaged copy). An attribute the applicable
    action removes (X) that is present, or blanks or replaces (Z, D, C) that holds a value, is
    identifying. A file declaring PatientIdentityRemoved YES with a
    DeidentificationMethodCodeSequence is judged by the profile and options it declares: an
    option's K keeps an attribute, and where a dummy is expected only real-looking names, dates
    and addresses count. Private attributes count unless Retain Safe Private (113111) is
    declared. The rules are spelled out in :mod:`.profile`.

    Inputs: header-only reads (``Needs(headers=True)``) of every split the run loads
    (``train_optional``, ``ood``); no model output and no label, so every task
    (classification, multilabel, regression, segmentation) is measured the same way. Non-DICOM files are
    counted, not judged. A volume given as a DICOM series folder is as many files as it has
    slices, and every slice's header is judged (identifiers may sit in some slices only); its
    findings name the manifest row once. NIfTI and ``.npy`` volumes carry no DICOM header. The
    headers are read and judged through the context's ``map_headers`` (``map_series_headers``
    for a series' slices): on Ray, by Ray tasks of 512 files (8 series) side by side where the
    cluster has CPUs free, each returning only keywords and flags; the verdicts are folded as
    they come, so memory stays a chunk's.

    Metrics (``lower_is_better``, ``n`` = DICOM headers judged):
        ``phi.files_with_identifiers`` (files with at least one identifying attribute, private
        attributes included), ``phi.burned_in_annotation_files`` (BurnedInAnnotation YES: text
        burned into the pixels), ``phi.identity_not_removed_files`` (PatientIdentityRemoved
        absent or not YES).

    Findings: (keywords, tags, actions, file counts and row numbers, never a value)
    ``identifying_attribute`` per keyword (applicable action, reasons, files per split);
    ``burned_in_annotation``; ``identity_not_removed``; ``declared_profile`` per distinct set
    of declared codes; ``unreadable_header`` (headers that could not be parsed or judged);
    ``phi_scan`` (what was read).

    Limitations:
        - Whether a value in a dummy slot "looks real" is a heuristic (person names without
          digits, ``...Name`` and ``...Address`` text, dates after 1900-01-01); replaced
          identifiers and UIDs cannot be told from originals and are accepted.
        - Values a declared Clean option (C) leaves are trusted, except person names and
          addresses; free-text descriptions are not parsed for names.
        - Pixel data is not read: burned-in text is known only from BurnedInAnnotation.
        - Retain Safe Private is taken at its word for every private attribute; the safe
          private attributes of PS3.15 Table E.3.10-1 are not checked one by one.

    NIST AI RMF 1.0: MEASURE 2.10 (privacy risk of the AI system, here of its evaluation data
    and submission pack, is examined and documented).
    """

    id: ClassVar[str] = "phi"
    family: ClassVar[str] = "phi"

    Params = PHIParams

    needs: ClassVar[Needs] = Needs(headers=True, train_optional=True, ood=True)
    emits: ClassVar[tuple[str, ...]] = (
        "phi.files_with_identifiers",
        "phi.burned_in_annotation_files",
        "phi.identity_not_removed_files",
    )
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multilabel", "regression", "segmentation")
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)

    def run(self, ctx: CheckContext, params: PHIParams) -> CheckResult:
        """Read every DICOM header of the audit and count the identifying files."""
        p = params
        table = load_table()
        keywords: dict[str, _Tally] = {}
        meta: dict[str, tuple[str, str]] = {}
        reasons: dict[str, Counter[str]] = {}
        any_identifier = _Tally(p.max_rows_listed)
        burned = _Tally(p.max_rows_listed)
        not_removed = _Tally(p.max_rows_listed)
        unreadable = _Tally(p.max_rows_listed)
        profiles: Counter[tuple[str, ...] | None] = Counter()
        scanned: Counter[str] = Counter()
        non_dicom = 0
        quarantined = 0
        for file, verdict in _verdicts(ctx, p.include_quarantined):
            if isinstance(verdict, str):  # "non-dicom"
                non_dicom += 1
                continue
            if verdict is None:  # unreadable, or a header that could not be judged
                unreadable.add(file)
                continue
            scanned[file.split] += 1
            quarantined += file.quarantined
            profiles[verdict.declaration.codes if verdict.declaration.declared else None] += 1
            if verdict.identifiers:
                any_identifier.add(file)
            for found in verdict.identifiers:
                keywords.setdefault(found.keyword, _Tally(p.max_rows_listed)).add(file)
                meta.setdefault(found.keyword, (found.tag, found.action))
                reasons.setdefault(found.keyword, Counter())[found.reason] += 1
            if verdict.burned_in_annotation:
                burned.add(file)
            if not verdict.identity_removed:
                not_removed.add(file)

        n = sum(scanned.values())
        result = CheckResult()
        for name, tally in (
            ("phi.files_with_identifiers", any_identifier),
            ("phi.burned_in_annotation_files", burned),
            ("phi.identity_not_removed_files", not_removed),
        ):
            if n:
                result.metrics.append(Metric(name, float(tally.files), "lower_is_better", n=n))
            else:
                why = "no readable DICOM header among the audited files"
                result.metrics.append(Metric(name, None, "lower_is_better", n=0, reason=why))
        for keyword in sorted(keywords, key=lambda k: (-keywords[k].files, k)):
            tag, action = meta[keyword]
            result.findings.append(
                keywords[keyword].finding(
                    "identifying_attribute",
                    keyword=keyword,
                    tag=tag,
                    action=action,
                    reasons=dict(sorted(reasons[keyword].items())),
                )
            )
        if burned.files:
            result.findings.append(burned.finding("burned_in_annotation"))
        if not_removed.files:
            result.findings.append(not_removed.finding("identity_not_removed"))
        for codes, count in sorted(profiles.items(), key=lambda item: (item[0] is None, item[0])):
            result.findings.append(
                {
                    "kind": "declared_profile",
                    "codes": list(codes) if codes is not None else None,
                    "files": count,
                }
            )
        if unreadable.files:
            result.findings.append(unreadable.finding("unreadable_header"))
        result.findings.append(
            {
                "kind": "phi_scan",
                "table": table.document,
                "files_judged": n,
                "splits": dict(sorted(scanned.items())),
                "quarantined_files_judged": quarantined,
                "non_dicom_files": non_dicom,
                "reasons": REASONS,
            }
        )
        log.debug("phi: judged %d DICOM headers (%d quarantined)", n, quarantined)
        return result


def _judged(header: pydicom.Dataset | None) -> FileVerdict | None:
    """The verdict on one header; ``None`` for an unreadable one or one that cannot be judged.
    Module-level and returning keywords and flags only: on Ray it runs where the files are read."""
    if header is None:
        return None
    try:
        return judge_header(header)
    except Exception as error:  # a hostile header must not end the audit
        log.debug("phi: a header could not be judged (%s)", type(error).__name__)
        return None


def _verdicts(ctx: CheckContext, include_quarantined: bool) -> Iterator[tuple[_File, FileVerdict | str | None]]:
    """(file, verdict) for every audited file: a :class:`FileVerdict`, ``None`` (unreadable) or
    ``non-dicom``. Judged through :meth:`~auditkit.check.CheckContext.map_headers` (a series'
    slices: ``map_series_headers``), in Ray tasks side by side on Ray; quarantined files here."""
    roles = [name for name in ctx.split_names if not name.startswith("ood:builtin:")]
    for role in roles:
        split = ctx.split(role)
        if "dicom-series" in split.kinds:  # every slice of a series is a file of its own
            for position, verdicts in enumerate(ctx.map_series_headers(role, _judged)):
                file = _File(role, int(split.rows[position]), quarantined=False)
                if not verdicts:
                    yield file, "non-dicom"
                for verdict in verdicts:
                    yield file, verdict
            continue
        for position, verdict in enumerate(ctx.map_headers(role, _judged)):
            file = _File(role, int(split.rows[position]), quarantined=False)
            yield file, ("non-dicom" if split.kinds[position] != "dicom" else verdict)
    if not include_quarantined:
        return
    for entry, quarantined in ctx.quarantined_headers(roles):
        file = _File(entry.split, entry.row, quarantined=True)
        yield file, (quarantined if isinstance(quarantined, str) else _judged(quarantined))
