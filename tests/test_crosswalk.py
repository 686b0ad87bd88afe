"""The packaged regulatory crosswalks: every item present, every reference real, tables honest."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest

from auditkit.coverage import CoverageCheck
from auditkit.crosswalk import (
    COLUMNS,
    FRAMEWORKS,
    PREFILLED_KEYS,
    Crosswalk,
    _parse,
    crosswalk_table,
    load_crosswalk,
    to_csv,
    to_markdown,
)
from auditkit.errors import ConfigError
from auditkit.policy import load_policy
from auditkit.registry import discover

ROOT = Path(__file__).resolve().parents[1]

# The items of each framework, as listed where the crosswalks were drawn from (kept here so that
# the repository stands alone): fill levels M (measured), P (prefilled), H (person).
EXPECTED: dict[str, dict[str, str]] = {
    "fda-ai-dsf-2025-draft": {
        "FDA-V": "P",
        "FDA-VI.B": "MP",
        "FDA-VII": "P",
        "FDA-VIII.col": "P",
        "FDA-VIII.ind": "M",
        "FDA-VIII.rep": "M",
        "FDA-VIII.ref": "PH",
        "FDA-IX": "P",
        "FDA-X.ver": "MP",  # hashes of the attestation: prefilled model.identity
        "FDA-X.A.sap": "P",
        "FDA-X.A.sub": "M",
        "FDA-X.A.rob": "M",
        "FDA-X.A.rr": "M",
        "FDA-X.A.hai": "H",
        "FDA-XI": "P",
        "FDA-XII": "MH",
        "FDA-XIII": "P",
        "FDA-App.C": "MP",  # quarantine counts: prefilled data.quarantine
    },
    "eu-ai-act-annex-iv": {
        "EU-IV-1": "PH",
        "EU-IV-2a": "P",
        "EU-IV-2b": "H",
        "EU-IV-2c": "P",
        "EU-IV-2d": "MP",
        "EU-IV-2e": "H",
        "EU-IV-2f": "P",
        "EU-IV-2g": "M",
        "EU-IV-2h": "MP",
        "EU-IV-3": "MP",
        "EU-IV-4": "P",
        "EU-IV-5": "P",
        "EU-IV-6": "P",
        "EU-IV-7": "H",
        "EU-IV-8": "H",
        "EU-IV-9": "P",
    },
    "imdrf-gmlp-2025": {
        "GMLP-1": "H",
        "GMLP-2": "P",
        "GMLP-3": "M",
        "GMLP-4": "M",
        "GMLP-5": "P",
        "GMLP-6": "P",
        "GMLP-7": "H",
        "GMLP-8": "M",
        "GMLP-9": "P",
        "GMLP-10": "P",
    },
    "iso-iec-42001-2023": {
        "A.4.3": "P",
        "A.4.4": "P",
        "A.5.4": "M",
        "A.6.2.4": "M",
        "A.6.2.6": "P",
        "A.6.2.7": "P",
        "A.6.2.8": "P",
        "A.7.4": "M",
        "A.7.5": "MP",  # provenance: prefilled data.* beside the measured checks
        "A.7.6": "P",
        "A.8.2": "P",
    },
}
LETTERS = {"measured": "M", "prefilled": "P", "person": "H"}


def _crosswalks() -> list[Crosswalk]:
    return [load_crosswalk(framework_id) for framework_id in FRAMEWORKS]


def _emitted() -> set[str]:
    checks, broken = discover()
    assert not broken
    return {name for cls in [*checks.values(), CoverageCheck] for name in cls.emits}


def _check_sources() -> str:
    # The packaged checks: the checks/ folder and the engine's own coverage record.
    paths = [*sorted((ROOT / "checks").rglob("*.py")), ROOT / "auditkit" / "coverage.py"]
    return "\n".join(path.read_text(encoding="utf-8") for path in paths)


# --------------------------------------------------------------------------------------------
# The packaged files


def test_every_framework_loads_with_its_source_and_date() -> None:
    assert set(FRAMEWORKS) == set(EXPECTED)
    for crosswalk in _crosswalks():
        assert crosswalk.id in FRAMEWORKS
        assert crosswalk.title and crosswalk.note
        assert re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", crosswalk.source.date)
        assert crosswalk.recorded == "2026-12-07"
        assert crosswalk.source.document and crosswalk.source.publisher and crosswalk.source.reference
    fda = load_crosswalk("fda-ai-dsf-2025-draft")
    assert (fda.source.status, fda.source.date, fda.source.reference) == ("draft", "2025-01-07", "GUI00007028")
    assert load_crosswalk("eu-ai-act-annex-iv").source.reference == "Regulation (EU) 2024/1689"
    assert load_crosswalk("iso-iec-42001-2023").source.status == "standard"
    assert "not listed item by item" in load_crosswalk("iso-iec-42001-2023").note


def test_an_unknown_framework_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"'nist-ai-rmf-1\.0' is not packaged"):
        load_crosswalk("nist-ai-rmf-1.0")


@pytest.mark.parametrize("framework_id", FRAMEWORKS)
def test_every_listed_item_is_present_with_its_fill(framework_id: str) -> None:
    crosswalk = load_crosswalk(framework_id)
    ours = {item.id: "".join(LETTERS[f] for f in item.fill) for item in crosswalk.items}
    assert list(ours) == list(EXPECTED[framework_id]), "items missing, extra or out of order"
    assert ours == EXPECTED[framework_id]


def test_fill_evidence_and_prefilled_agree() -> None:
    for crosswalk in _crosswalks():
        for item in crosswalk.items:
            where = f"{crosswalk.id} {item.id}"
            assert bool(item.rules) == ("measured" in item.fill), where
            assert bool(item.metrics) == ("measured" in item.fill), where
            assert not item.findings or "measured" in item.fill, where
            assert bool(item.prefilled) == ("prefilled" in item.fill), where
            assert set(item.prefilled) <= PREFILLED_KEYS, where
            if "person" in item.fill:
                assert item.person, where


def test_every_rule_named_exists_in_the_default_policy() -> None:
    policy, _ = load_policy("medical-imaging-default")
    known = {rule.id for rule in policy.rules}
    for crosswalk in _crosswalks():
        for item in crosswalk.items:
            unknown = sorted(set(item.rules) - known)
            assert not unknown, f"{crosswalk.id} {item.id} names rules the default policy lacks: {unknown}"


def test_every_metric_named_is_emitted_by_a_packaged_check() -> None:
    emitted = _emitted()
    for crosswalk in _crosswalks():
        for item in crosswalk.items:
            missing = sorted(set(item.metrics) - emitted)
            assert not missing, f"{crosswalk.id} {item.id} names metrics no packaged check emits: {missing}"


def test_an_items_rules_judge_metrics_it_names() -> None:
    # The evidence hangs together: every rule's metric is among the item's metrics.
    policy, _ = load_policy("medical-imaging-default")
    metric_of = {rule.id: rule.metric for rule in policy.rules}
    for crosswalk in _crosswalks():
        for item in crosswalk.items:
            judged = {metric_of[rule_id] for rule_id in item.rules}
            assert judged <= set(item.metrics), f"{crosswalk.id} {item.id}: {sorted(judged - set(item.metrics))}"


def test_every_finding_kind_named_appears_in_the_checks() -> None:
    sources = _check_sources()
    for crosswalk in _crosswalks():
        for item in crosswalk.items:
            for kind in item.findings:
                assert f'"kind": "{kind}"' in sources or f"'{kind}'" in sources, (
                    f"{crosswalk.id} {item.id}: no packaged check emits a {kind!r} finding"
                )


def test_the_measured_items_the_guidance_names_are_mapped_to_their_checks() -> None:
    def rules(framework_id: str, item_id: str) -> set[str]:
        return set(load_crosswalk(framework_id).item(item_id).rules)

    assert {"LEAK-PATIENT", "LEAK-STUDY", "LEAK-EXACT", "LEAK-NEAR"} <= rules("fda-ai-dsf-2025-draft", "FDA-VIII.ind")
    assert {"BD-MODEL", "ADV-PGD-ONE-GREY-LEVEL"} <= rules("fda-ai-dsf-2025-draft", "FDA-XII")
    assert {"PARITY-AGREEMENT"} <= rules("fda-ai-dsf-2025-draft", "FDA-X.ver")
    assert "model.identity" in load_crosswalk("fda-ai-dsf-2025-draft").item("FDA-X.ver").prefilled
    assert {r for r in rules("fda-ai-dsf-2025-draft", "FDA-App.C")} <= {
        "COV-EVAL-READ",
        "COV-EVAL-SIZE",
        "COV-EVAL-QUARANTINE",
        "COV-TRAIN-QUARANTINE",
    }
    families = {rule.split("-")[0] for rule in rules("eu-ai-act-annex-iv", "EU-IV-2g")}
    assert {"PERF", "BIAS", "COR", "ADV", "CAL"} <= families
    assert {"LEAK-PATIENT", "LEAK-NEAR"} <= rules("imdrf-gmlp-2025", "GMLP-4")
    assert "BIAS-MIN-GROUP" in rules("iso-iec-42001-2023", "A.5.4")


# --------------------------------------------------------------------------------------------
# Validation of a broken file

GOOD = """\
id: broken
title: A test framework
source: {document: A document, publisher: Someone, date: '2025-01', status: final, reference: N1}
recorded: '2026-12-07'
note: paraphrased
items:
  - id: T-1
    title: first item
    fill: [measured, prefilled]
    evidence: {rules: [LEAK-PATIENT], metrics: [leakage.patient_overlap], findings: [near_duplicate]}
    prefilled: [data.sites]
  - id: T-2
    title: second item
    fill: [person]
    person: Someone supplies it.
"""


def test_the_good_text_parses() -> None:
    crosswalk = _parse(GOOD, "broken.yaml")
    assert [item.id for item in crosswalk.items] == ["T-1", "T-2"]
    assert crosswalk.items[0].fill == ("measured", "prefilled")
    assert crosswalk.items[1].person == "Someone supplies it."


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("fill: [measured, prefilled]", "fill: [measured, guessed]", r"item T-1: fill: .*'guessed'"),
        ("fill: [measured, prefilled]", "fill: [prefilled, measured]", r"item T-1: fill: .*order"),
        ("fill: [measured, prefilled]", "fill: [prefilled]", r"item T-1: evidence: present exactly when"),
        ("    prefilled: [data.sites]\n", "", r"item T-1: prefilled: present exactly when"),
        (
            "prefilled: [data.sites]",
            "prefilled: [data.ethnicity]",
            r"item T-1: prefilled: unknown keys \['data.ethnicity'\]",
        ),
        (
            "metrics: [leakage.patient_overlap]",
            "metrics: [PatientOverlap]",
            r"item T-1: evidence.metrics: .*'PatientOverlap'",
        ),
        ("rules: [LEAK-PATIENT], ", "", r"item T-1: evidence: rules: required key missing"),
        ("    person: Someone supplies it.\n", "", r"item T-2: person: required when fill has 'person'"),
        ("title: second item", "titel: second item", r"item T-2: titel: unknown key"),
        ("status: final", "status: rumoured", r"source.status: expected one of"),
        ("date: '2025-01'", "date: 'January 2025'", r"source.date: expected a date"),
        ("id: T-2", "id: T-1", r"item T-1: id: appears twice"),
        ("id: broken", "id: other", r"id: must equal the file stem 'broken'"),
    ],
)
def test_a_broken_file_names_the_file_item_and_field(old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError, match=r"^broken\.yaml: " + ".*" + message):
        _parse(GOOD.replace(old, new, 1), "broken.yaml")


def test_a_file_on_disk_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(GOOD.replace("fill: [person]", "fill: []"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^broken\.yaml: item T-2: fill: expected a non-empty list"):
        _parse(path.read_text(encoding="utf-8"), path.name)
    with pytest.raises(ConfigError, match=r"^broken\.yaml: not valid YAML"):
        _parse("items: [unclosed", "broken.yaml")


def test_an_unquoted_yaml_date_is_accepted() -> None:
    crosswalk = _parse(GOOD.replace("recorded: '2026-12-07'", "recorded: 2026-12-07"), "broken.yaml")
    assert crosswalk.recorded == "2026-12-07"


# --------------------------------------------------------------------------------------------
# Tables


def _rules() -> list[dict[str, object]]:
    return [
        {"id": "LEAK-PATIENT", "status": "pass", "observed": 0.0},
        {"id": "LEAK-STUDY", "status": "fail", "observed": 2.0},
        {"id": "LEAK-EXACT", "status": "not_evaluated", "observed": None},
        {"id": "LEAK-NEAR", "status": "not_applicable", "observed": None},
        {"id": "BIAS-SENS-GAP", "status": "not_evaluated", "observed": None},
        {"id": "PERF-AUROC", "status": "warn", "observed": 0.93125},
    ]


def test_the_table_marks_measured_and_to_be_supplied() -> None:
    rows = {row["id"]: row for row in crosswalk_table(load_crosswalk("fda-ai-dsf-2025-draft"), _rules())}
    assert list(rows) == list(EXPECTED["fda-ai-dsf-2025-draft"])
    assert all(set(row) == set(COLUMNS) for row in rows.values())
    independence = rows["FDA-VIII.ind"]
    assert independence["status"] == "measured"
    assert independence["evidence"] == "LEAK-PATIENT pass (0), LEAK-STUDY fail (2), LEAK-EXACT not_evaluated"
    assert independence["fill"] == "measured"
    labeling = rows["FDA-VI.B"]
    assert labeling["status"] == "measured"
    assert labeling["evidence"].startswith("PERF-AUROC warn (0.931)")
    assert labeling["prefilled"] == "intended_use, model.operating_point, audit.limitations"
    # Rules named but only not evaluated: nothing measured.
    subgroups = rows["FDA-X.A.sub"]
    assert (subgroups["status"], subgroups["evidence"]) == ("to be supplied", "BIAS-SENS-GAP not_evaluated")
    # No rule of the item in the run at all.
    assert (rows["FDA-XII"]["status"], rows["FDA-XII"]["evidence"]) == ("to be supplied", "")
    # Prefilled and person-only items are never "measured".
    assert rows["FDA-V"]["status"] == "to be supplied"
    human = rows["FDA-X.A.hai"]
    assert (human["status"], human["fill"], human["evidence"], human["prefilled"]) == (
        "to be supplied",
        "person",
        "",
        "",
    )
    assert human["person"]


def test_an_empty_run_supplies_nothing() -> None:
    for crosswalk in _crosswalks():
        assert {row["status"] for row in crosswalk_table(crosswalk, [])} == {"to be supplied"}


def test_markdown_has_one_line_per_item_and_survives_pipes() -> None:
    rows = crosswalk_table(load_crosswalk("imdrf-gmlp-2025"), _rules())
    rows[0]["person"] = "a | b\nc"
    text = to_markdown(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[1] == "|" + "---|" * len(COLUMNS)
    for line in [lines[0], *lines[2:]]:
        # Every line has exactly the table's cells: an escaped pipe stays inside its cell.
        assert len(re.findall(r"(?<!\\)\|", line)) == len(COLUMNS) + 1, line
    assert "a \\| b c" in lines[2]


def test_csv_has_a_header_and_neutralises_formulas() -> None:
    rows = crosswalk_table(load_crosswalk("iso-iec-42001-2023"), _rules())
    rows[0]["person"] = '=HYPERLINK("http://example.invalid","x")'
    rows[1]["title"] = "@SUM(A1)"
    text = to_csv(rows)
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == list(COLUMNS)
    assert len(parsed) == 1 + len(rows)
    assert parsed[1][COLUMNS.index("person")] == '\'=HYPERLINK("http://example.invalid","x")'
    assert parsed[2][COLUMNS.index("title")] == "'@SUM(A1)"
    assert parsed[1][COLUMNS.index("id")] == "A.4.3"


def test_a_policy_cannot_name_a_crosswalk_as_its_framework() -> None:
    from auditkit.errors import ConfigError
    from auditkit.policy import load_framework

    with pytest.raises(ConfigError, match="is a crosswalk to another framework"):
        load_framework("imdrf-gmlp-2025")


def test_the_ai_rmf_table_gives_every_subcategory_its_status_and_evidence() -> None:
    from auditkit.crosswalk import CONTROL_COLUMNS, controls_table
    from auditkit.policy import load_framework

    core = load_framework()
    results = {
        "rules": _rules(),
        "controls": [
            {"id": "MEASURE 2.7", "status": "not_met", "rules": ["LEAK-STUDY", "LEAK-NEAR"], "attestation": None},
            {
                "id": "GOVERN 1.1",
                "status": "attested",
                "rules": [],
                "attestation": {"evidence": "Policy QM-7", "owner": "QA lead", "date": "2026-11-02"},
            },
        ],
    }
    rows = {row["id"]: row for row in controls_table(core, results)}
    assert len(rows) == len(core.subcategories) == 72
    assert all(list(row) == list(CONTROL_COLUMNS) for row in rows.values())
    # A rule that does not apply to the run is left out of the evidence.
    assert (rows["MEASURE 2.7"]["status"], rows["MEASURE 2.7"]["evidence"]) == ("not_met", "LEAK-STUDY fail (2)")
    assert rows["GOVERN 1.1"]["attestation"] == "Policy QM-7 (QA lead, 2026-11-02)"
    assert (rows["MAP 1.1"]["status"], rows["MAP 1.1"]["evidence"]) == ("not_assessed", "")
    assert rows["GOVERN 1.1"]["text"] == core.subcategories["GOVERN 1.1"].text
    text = to_markdown(list(rows.values()), CONTROL_COLUMNS)
    assert len(text.splitlines()) == 2 + 72 and "Subcategory (verbatim)" in text.splitlines()[0]
    header = next(csv.reader(io.StringIO(to_csv(list(rows.values()), CONTROL_COLUMNS))))
    assert header == list(CONTROL_COLUMNS)


def test_every_prefilled_key_says_where_the_pack_holds_it() -> None:
    from auditkit.crosswalk import PREFILLED

    for key, where in PREFILLED.items():
        assert re.search(r"\((model card|data card|manifest\.json|results\.json[^)]*)\)$", where), key
