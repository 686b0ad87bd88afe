"""Tests of the Table E.1-1 judgement (auditkit.checks.phi.profile) and PHICheck."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import pydicom
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pypdf import PdfReader

from auditkit.checks.leakage import LeakageCheck
from auditkit.checks.phi import PHICheck, judge_header
from auditkit.checks.phi.profile import (
    PRIVATE_KEYWORD,
    Declaration,
    TableRow,
    declaration,
    effective_action,
    judge,
    load_table,
    looks_real,
    parse_table,
)
from auditkit.fixtures.phi import CLEAN_PROFILE, PhiStudy, generate_phi_study
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec
from auditkit.testing import make_context

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference" / "dicom-ps3.15-annex-e-table-e1-1.json"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_phi_table", ROOT / "scripts" / "build_phi_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# The packaged table


@pytest.mark.skipif(not REFERENCE.is_file(), reason="reference copy of Table E.1-1 not present")
def test_packaged_table_is_generated_from_the_reference() -> None:
    script = _script()
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    packaged = json.loads((ROOT / "checks" / "phi" / "table.json").read_text(encoding="utf-8"))
    assert packaged == json.loads(script.render(script.build(reference)))
    assert len(packaged["attributes"]) + len(packaged["patterns"]) + 1 == len(reference["rows"])


def test_table_rows_as_in_the_standard() -> None:
    table = load_table()
    assert "Table E.1-1" in table.document
    name = table.row_for(0x00100010)
    assert name is not None and (name.keyword, name.basic, name.options) == ("PatientName", "Z", {})
    institution = table.row_for(0x00080080)
    assert institution is not None and institution.basic == "X/Z/D"
    assert institution.options == {"rtnInstIdOpt": "K"}
    assert institution.display_tag == "(0008,0080)"
    overlay = table.row_for(0x60023000)  # (60xx,3000) repeating group
    assert overlay is not None and overlay.keyword == "OverlayData"
    curve = table.row_for(0x50001234)
    assert curve is not None and curve.keyword == "CurveData"
    assert table.row_for(0x00280010) is None  # Rows: not in the table
    assert table.private.basic == "X" and table.private.options == {"rtnSafePrivOpt": "C"}
    assert table.option_codes["rtnSafePrivOpt"] == "113111"


def test_a_malformed_table_is_an_error_naming_the_expected_sections() -> None:
    with pytest.raises(ValueError, match="expected attributes, patterns, private, option_codes"):
        parse_table({"attributes": []})


# --------------------------------------------------------------------------------------------
# Judging values and elements


ROW = TableRow("00080080", "InstitutionName", "X/Z/D", {"rtnInstIdOpt": "K"})
DATES = TableRow("00080020", "StudyDate", "Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"})


def test_effective_action_prefers_an_options_k_then_its_c() -> None:
    assert effective_action(DATES, frozenset()) == "Z"
    assert effective_action(DATES, frozenset({"rtnLongModifDatesOpt"})) == "C"
    both = frozenset({"rtnLongModifDatesOpt", "rtnLongFullDatesOpt"})
    assert effective_action(DATES, both) == "K"
    assert effective_action(ROW, frozenset({"cleanDescOpt"})) == "X/Z/D"


@pytest.mark.parametrize(
    ("keyword", "vr", "value", "real"),
    [
        ("PatientName", "PN", "DOE^JANE", True),
        ("PatientName", "PN", "SYNTHETIC^P000123", False),  # a pseudonym: digits
        ("PatientName", "PN", "ANONYMOUS", False),
        ("PatientName", "PN", "ANONYMIZED^PATIENT", False),
        ("PatientName", "PN", "", False),
        ("ReferringPhysicianName", "PN", "Kildare^James^^Dr", True),
        ("PatientBirthDate", "DA", "19570314", True),
        ("PatientBirthDate", "DA", "19000101", False),  # the conventional dummy date
        ("PatientBirthDate", "DA", "20231301", False),  # not a date
        ("AcquisitionDateTime", "DT", "20200102083000", True),
        ("InstitutionName", "LO", "SAINT ELSEWHERE GENERAL HOSPITAL", True),
        ("StationName", "SH", "CT01", False),
        ("InstitutionName", "LO", "REMOVED", False),
        ("PatientAddress", "LO", "12 ELM STREET^SPRINGFIELD", True),
        ("PatientID", "LO", "MRN12345", False),  # identifiers are accepted in dummy slots
        ("AccessionNumber", "SH", "ACC987", False),
        ("StudyTime", "TM", "083512", False),
    ],
)
def test_looks_real(keyword: str, vr: str, value: str, real: bool) -> None:
    assert looks_real(keyword, vr, value) is real


def test_shifted_dates_in_a_clean_slot_are_expected() -> None:
    assert looks_real("StudyDate", "DA", "20190301", dates=False) is False


def _element(keyword: str, value: Any) -> pydicom.DataElement:
    ds = Dataset()
    setattr(ds, keyword, value)
    return ds[keyword]


@pytest.mark.parametrize(
    ("action", "keyword", "value", "declared", "reason"),
    [
        ("X", "PatientAddress", "", True, "present"),  # X: presence alone counts
        ("X", "PatientAddress", "SOMEWHERE", False, "present"),
        ("Z", "PatientName", "", False, None),  # Z: empty is compliant
        ("Z", "PatientName", "SYNTHETIC^P1", False, "value"),  # undeclared: any value counts
        ("Z", "PatientName", "SYNTHETIC^P1", True, None),  # declared: a dummy
        ("Z", "PatientName", "DOE^JANE", True, "real_looking"),
        ("X/Z/D", "InstitutionName", "ST ELSEWHERE", True, "real_looking"),
        ("K", "InstitutionName", "ST ELSEWHERE", True, None),
        ("U", "StudyInstanceUID", "1.2.3.4", False, None),
        ("C", "StudyDate", "20190301", True, None),  # modified dates are cleaned dates
        ("C", "StudyDate", "20190301", False, "value"),
        ("Z", "PatientBirthDate", "19570314", True, "real_looking"),
    ],
)
def test_judge(action: str, keyword: str, value: str, declared: bool, reason: str | None) -> None:
    row = TableRow("00000000", keyword, action, {})
    assert judge(row, action, _element(keyword, value), declared) == reason


def _header(*, declare: tuple[str, ...] | None = ("113100",), **values: Any) -> Dataset:
    ds = Dataset()
    ds.PatientIdentityRemoved = "YES" if declare is not None else "NO"
    if declare:
        items = []
        for code in declare:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator = code, "DCM"
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_declaration_reads_the_profile_codes() -> None:
    table = load_table()
    ds = _header(declare=("113100", "113108", "999999"))
    decl = declaration(ds, table)
    assert decl == Declaration(True, ("113100", "113108"))
    assert decl.options(table) == frozenset({"rtnPatCharsOpt"})
    assert not declaration(_header(declare=()), table).declared  # YES without codes
    assert not declaration(_header(declare=None), table).identity_removed


def test_judge_header_declared_undeclared_nested_and_private() -> None:
    table = load_table()
    undeclared = judge_header(_header(declare=None, PatientSex="F", PatientName="P^1"), table)
    assert {i.keyword for i in undeclared.identifiers} == {"PatientSex", "PatientName"}
    kept = judge_header(_header(declare=("113100", "113108"), PatientSex="F", PatientAge="045Y"))
    assert kept.identifiers == ()
    nested = _header(PatientName="P^1")
    item = Dataset()
    item.PatientName = "DOE^JOHN"
    nested.ReferencedPatientSequence = DicomSequence([item])  # X, and a real name inside
    found = {i.keyword: i for i in judge_header(nested, table).identifiers}
    assert set(found) == {"ReferencedPatientSequence", "PatientName"}
    assert found["PatientName"].reason == "real_looking"
    assert found["PatientName"].tag == "(0010,0010)"

    private = _header(BurnedInAnnotation="YES")
    private.private_block(0x0011, "VENDOR", create=True).add_new(0x01, "LO", "x")
    verdict = judge_header(private, table)
    assert verdict.burned_in_annotation
    assert [(i.keyword, i.tag) for i in verdict.identifiers] == [(PRIVATE_KEYWORD, "odd groups")]
    private.DeidentificationMethodCodeSequence[0].CodeValue = "113111"  # Retain Safe Private
    assert judge_header(private, table).identifiers == ()


@given(value=st.text(alphabet="QZXJ^ 0123456789", min_size=4, max_size=20).map(lambda s: "QQZJ" + s))
@settings(max_examples=40, deadline=None)
def test_verdicts_never_carry_a_value(value: str) -> None:
    ds = _header(
        declare=None, PatientName=value, PatientAddress=value, InstitutionName=value,
        OtherPatientIDs=value,
    )  # fmt: skip
    verdict = judge_header(ds)
    assert {i.keyword for i in verdict.identifiers} >= {"PatientAddress", "OtherPatientIDs"}
    assert "QQZJ" not in repr(verdict)


# --------------------------------------------------------------------------------------------
# The check on the PHI study and its clean twin


def _audited(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The check records of a run, less the engine's own coverage record."""
    return [c for c in results["checks"] if c["id"] != "coverage"]


def _run(study: PhiStudy, out: Path) -> dict[str, Any]:
    outcome = run_audit(
        load_spec(study.spec_path),
        RunOptions(out_dir=out, report=False, pdf=False),
        checks={"phi": PHICheck},
    )
    (record,) = _audited(outcome.results)
    assert record["status"] == "ok", record["error"]
    return record


@pytest.fixture(scope="module")
def phi_study(tmp_path_factory: pytest.TempPathFactory) -> PhiStudy:
    return generate_phi_study(tmp_path_factory.mktemp("phi") / "study")


@pytest.fixture(scope="module")
def phi_record(phi_study: PhiStudy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(phi_study, tmp_path_factory.mktemp("phi-out"))


@pytest.fixture(scope="module")
def clean_study(tmp_path_factory: pytest.TempPathFactory) -> PhiStudy:
    return generate_phi_study(tmp_path_factory.mktemp("phi-clean") / "study", phi=False)


def _metric(record: dict[str, Any], name: str) -> dict[str, Any]:
    (metric,) = [m for m in record["metrics"] if m["name"] == name]
    return metric


def test_every_planted_attribute_is_reported_with_its_file_count(
    phi_study: PhiStudy, phi_record: dict[str, Any]
) -> None:
    record = phi_record
    truth = phi_study.truth
    reported = {f["keyword"]: f for f in record["findings"] if f["kind"] == "identifying_attribute"}
    assert set(reported) == set(truth.keyword_rows)
    for keyword, rows in truth.keyword_rows.items():
        finding = reported[keyword]
        assert finding["files"] == len(rows), keyword
        assert {r for listed in finding["rows"].values() for r in listed} == rows, keyword
        assert sum(finding["splits"].values()) == len(rows)
    assert set(reported["PatientName"]["splits"]) == {"train", "eval"}
    n = _metric(record, "phi.files_with_identifiers")["n"]
    assert n == len(phi_study.base.rows)  # the quarantined file is judged too
    assert _metric(record, "phi.files_with_identifiers")["value"] == len(truth.identifying_rows)
    assert _metric(record, "phi.burned_in_annotation_files")["value"] == len(truth.burned_in_rows)
    assert _metric(record, "phi.identity_not_removed_files")["value"] == len(truth.not_removed_rows)
    (scan,) = [f for f in record["findings"] if f["kind"] == "phi_scan"]
    assert scan["quarantined_files_judged"] == len(truth.quarantined_rows) == 1
    profiles = {tuple(f["codes"] or ()): f["files"] for f in record["findings"] if f["kind"] == "declared_profile"}
    assert profiles == {
        tuple(code for code, _ in CLEAN_PROFILE): n - len(truth.not_removed_rows),
        (): len(truth.not_removed_rows),
    }
    assert set(PHICheck.emits) == {m["name"] for m in record["metrics"]}


def test_quarantined_files_are_skipped_on_request(phi_study: PhiStudy, tmp_path: Path) -> None:
    spec = load_spec(phi_study.spec_path).model_copy(
        update={"checks": {"phi": {"include_quarantined": False}}, "only": ["phi"]}
    )
    outcome = run_audit(spec, RunOptions(out_dir=tmp_path, report=False, pdf=False), checks={"phi": PHICheck})
    (record,) = _audited(outcome.results)
    assert _metric(record, "phi.files_with_identifiers")["n"] == len(phi_study.base.rows) - 1


def test_clean_twin_reports_nothing(clean_study: PhiStudy, tmp_path: Path) -> None:
    study = clean_study
    record = _run(study, tmp_path)
    for metric in record["metrics"]:
        assert metric["value"] == 0.0 and metric["n"] == len(study.base.rows), metric
    kinds = {f["kind"] for f in record["findings"]}
    assert kinds == {"declared_profile", "phi_scan"}


def test_non_dicom_files_are_counted_not_judged(tmp_path: Path) -> None:
    from auditkit.fixtures.leaky import write_spec
    from auditkit.fixtures.synthetic import generate_study

    study = generate_study(tmp_path / "png", n_patients=6, image_size=32, fmt="png")
    outcome = run_audit(
        load_spec(write_spec(study.root)),
        RunOptions(out_dir=tmp_path / "out", report=False, pdf=False),
        checks={"phi": PHICheck},
    )
    (record,) = _audited(outcome.results)
    metric = _metric(record, "phi.files_with_identifiers")
    assert metric["value"] is None and "no readable DICOM header" in metric["reason"]
    (scan,) = [f for f in record["findings"] if f["kind"] == "phi_scan"]
    assert scan["non_dicom_files"] == study.n_images


def test_no_planted_value_reaches_any_output(
    phi_study: PhiStudy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = load_spec(phi_study.spec_path).model_copy(
        update={"checks": {"phi": {}, "leakage": {"n_boot": 0}}, "only": ["phi", "leakage"]}
    )
    outcome = run_audit(
        spec,
        RunOptions(out_dir=tmp_path, report=True, pdf=True),
        checks={"phi": PHICheck, "leakage": LeakageCheck},
    )
    assert [c["status"] for c in _audited(outcome.results)] == ["ok", "ok"]
    pdf = "\n".join(page.extract_text() or "" for page in PdfReader(tmp_path / "report.pdf").pages)
    assert "phi" in pdf.lower() and "leakage" in pdf.lower()
    outputs = {
        "results.json": (tmp_path / "results.json").read_text(encoding="utf-8"),
        "report.html": (tmp_path / "report.html").read_text(encoding="utf-8"),
        "report.pdf": pdf,
        "log": caplog.text,
    }
    outputs.update(
        {
            str(p.relative_to(tmp_path)): p.read_text(encoding="utf-8", errors="replace")
            for p in tmp_path.rglob("*")
            if p.is_file() and p.suffix in (".json", ".svg", ".csv", ".txt")
        }
    )
    assert caplog.records, "the audit logged nothing: the log scan would prove nothing"
    for value in phi_study.truth.planted_values:
        for where, text in outputs.items():
            assert value.upper() not in text.upper(), f"{value!r} found in {where}"


def test_check_contract() -> None:
    assert PHICheck.id == "phi" and PHICheck.family == "phi"
    assert PHICheck.needs.headers and PHICheck.needs.train_optional and not PHICheck.needs.train
    assert "MEASURE 2.10" in (PHICheck.__doc__ or "")
    assert PHICheck.Params().include_quarantined is True


def test_proposed_policy_rules_judge_both_twins(
    phi_record: dict[str, Any], clean_study: PhiStudy, tmp_path: Path
) -> None:
    from auditkit.policy import evaluate
    from auditkit.testing import rules_for

    policy = rules_for("phi")
    judged = evaluate(policy, [phi_record])
    assert {r["id"]: r["status"] for r in judged["rules"]} == {
        "PHI-IDENTIFIERS": "fail",
        "PHI-BURNED-IN": "fail",
        "PHI-NOT-DECLARED": "warn",
    }
    judged = evaluate(policy, [_run(clean_study, tmp_path)])
    assert judged["verdict"] == "pass"


def test_ood_sets_are_read_too(phi_study: PhiStudy, tmp_path: Path) -> None:
    rows = sorted(phi_study.truth.keyword_rows["PatientAddress"])
    paths = [phi_study.base.rows[r].path for r in rows]
    (phi_study.root / "ood.csv").write_text("path\n" + "\n".join(paths) + "\n", encoding="utf-8")
    data = yaml.safe_load(phi_study.spec_path.read_text(encoding="utf-8"))
    data["data"]["ood"] = {"extra": {"manifest": "ood.csv"}}
    spec_path = phi_study.spec_path.with_name("with_ood.yaml")
    spec_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    outcome = run_audit(
        load_spec(spec_path), RunOptions(out_dir=tmp_path, report=False, pdf=False), checks={"phi": PHICheck}
    )
    (record,) = _audited(outcome.results)
    (address,) = [f for f in record["findings"] if f.get("keyword") == "PatientAddress"]
    assert address["splits"]["ood:extra"] == len(rows)
    assert address["files"] == 2 * len(rows)  # each file once per manifest that lists it


def test_fixture_refuses_a_cohort_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"need 24 for per_fault=3"):
        generate_phi_study(tmp_path, n_patients=4)


# --------------------------------------------------------------------------------------------
# Every task: the check reads headers only


def _as_task(study: PhiStudy, task: str) -> Path:
    """The PHI study's spec and manifest rewritten for ``task`` (same images, same model outputs)."""
    import csv

    with (study.root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    data = yaml.safe_load(study.spec_path.read_text(encoding="utf-8"))
    model = data["model"]
    model.pop("positive_class", None)
    model["task"] = task
    if task == "multilabel":  # one 1/0 column per label, a few entries unknown
        names = ["normal", "nodule"]
        for i, row in enumerate(rows):
            label = row.pop("label")
            for name in names:
                row[name] = "" if i % 7 == 3 else str(int(label == name))
    else:  # two continuous outputs
        names = ["age_estimate", "size_mm"]
        for i, row in enumerate(rows):
            label = row.pop("label")
            row["age_estimate"], row["size_mm"] = row["age"], f"{(label == 'nodule') * 4.0 + i % 5:.1f}"
    model["classes"] = names
    manifest = study.root / f"manifest-{task}.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data["data"]["manifest"] = manifest.name
    spec_path = study.spec_path.with_name(f"audit-{task}.yaml")
    spec_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return spec_path


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_multilabel_and_regression_studies_are_judged_exactly_as_classification(
    phi_study: PhiStudy, phi_record: dict[str, Any], task: str, tmp_path: Path
) -> None:
    assert task in PHICheck.tasks and "classification" in PHICheck.tasks
    spec = load_spec(_as_task(phi_study, task))
    assert spec.model.task == task
    outcome = run_audit(spec, RunOptions(out_dir=tmp_path, report=False, pdf=False), checks={"phi": PHICheck})
    (record,) = _audited(outcome.results)
    assert record["status"] == "ok", record.get("skip_reason") or record.get("error")
    assert record["metrics"] == phi_record["metrics"]
    assert record["findings"] == phi_record["findings"]
    assert _metric(record, "phi.files_with_identifiers")["value"] == len(phi_study.truth.identifying_rows) > 0


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_an_in_memory_context_of_any_task_is_measured(task: str) -> None:
    # No DICOM file: counted, not judged - the same answer whatever the task.
    labels = [[1, 0], [0, -1], [0, 1]] if task == "multilabel" else [[3.0, 1.0], [5.0, 2.0], [4.0, 0.5]]
    probs = [[0.9, 0.2], [0.1, 0.3], [0.4, 0.8]] if task == "multilabel" else labels
    result = PHICheck().run(make_context(labels, probs=probs, task=task, check=PHICheck), PHICheck.Params())
    baseline = PHICheck().run(make_context([0, 1, 1], probs=[[0.9, 0.1]] * 3, check=PHICheck), PHICheck.Params())
    assert [m.to_json() for m in result.metrics] == [m.to_json() for m in baseline.metrics]
    assert result.findings == baseline.findings
    assert all(m.value is None and "no readable DICOM header" in (m.reason or "") for m in result.metrics)
    (scan,) = [f for f in result.findings if f["kind"] == "phi_scan"]
    assert scan["non_dicom_files"] == 3
