"""Regenerate checks/phi/table.json, the packaged copy of DICOM PS3.15 Table E.1-1.

The reference file (``../shared/reference/dicom-ps3.15-annex-e-table-e1-1.json``: one object per
row with the basic profile's action and each option's action) is reduced to what the ``phi``
check reads: per attribute its tag, keyword, basic action and the options that change it. Rows
without a keyword get one from their name (``Curve Data`` -> ``CurveData``); the repeating groups
``(50xx,xxxx)`` and ``(60xx,eeee)`` become tag patterns; the private-attribute row becomes its own
entry. Run after updating the reference; tests/checks/test_phi.py fails while the two disagree.

Usage::

    python scripts/build_phi_table.py [--reference PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "dicom-ps3.15-annex-e-table-e1-1.json"
OUT = ROOT / "checks" / "phi" / "table.json"

# Option column -> the DICOM code (CID 7050) a de-identifier records for it (PS3.16).
OPTION_CODES = {
    "rtnSafePrivOpt": "113111",
    "rtnUIDsOpt": "113110",
    "rtnDevIdOpt": "113109",
    "rtnInstIdOpt": "113112",
    "rtnPatCharsOpt": "113108",
    "rtnLongFullDatesOpt": "113106",
    "rtnLongModifDatesOpt": "113107",
    "cleanDescOpt": "113105",
    "cleanStructContOpt": "113104",
    "cleanGraphOpt": "113103",
}
BASIC_PROFILE_CODE = "113100"
OTHER_CODES = {
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
}
_TAG = re.compile(r"^\(([0-9A-FX]{4}),([0-9A-FX]{4})\)$")


def _keyword(row: dict[str, str]) -> str:
    if row["keyword"]:
        return row["keyword"]
    return "".join(word[:1].upper() + word[1:] for word in re.split(r"[^A-Za-z0-9]+", row["name"]))


def build(reference: dict[str, Any]) -> dict[str, Any]:
    """The compact table from the parsed reference file.

    Raises:
        ValueError: a row's tag is neither ``(gggg,eeee)``, a repeating-group pattern nor the
            private-attribute row, or an action is outside D, Z, X, K, C, U and their combinations.
    """
    attributes: list[list[Any]] = []
    patterns: list[list[Any]] = []
    private: list[Any] | None = None
    for row in reference["rows"]:
        basic = row["basicProfile"]
        options = {column: row[column] for column in OPTION_CODES if row.get(column)}
        for action in [basic, *options.values()]:
            if not re.fullmatch(r"[DZXKCU](/[DZXKCU]\*?)*\*?", action):
                raise ValueError(f"row {row['tag']}: unexpected action {action!r}")
        tag = row["tag"].upper()
        if tag.startswith("(GGGG,EEEE)"):
            private = [basic, options]
            continue
        match = _TAG.match(tag)
        if match is None:
            raise ValueError(f"unexpected tag {row['tag']!r}; expected (gggg,eeee)")
        hex_tag = (match.group(1) + match.group(2)).lower()
        entry = [hex_tag, _keyword(row), basic, options]
        (patterns if "x" in hex_tag else attributes).append(entry)
    if private is None:
        raise ValueError("the reference has no private-attribute row (GGGG,EEEE)")
    attributes.sort()
    patterns.sort()
    return {
        "document": reference["document"],
        "source": reference["source"],
        "generated_by": "scripts/build_phi_table.py",
        "basic_profile_code": BASIC_PROFILE_CODE,
        "option_codes": OPTION_CODES,
        "other_codes": OTHER_CODES,
        "columns": "tag (8 hex digits, x = any), keyword, basic action, {option: action}",
        "attributes": attributes,
        "patterns": patterns,
        "private": private,
    }


def render(table: dict[str, Any]) -> str:
    """JSON text with one attribute per line (small diffs when the standard changes)."""
    head = {k: v for k, v in table.items() if k not in ("attributes", "patterns")}
    lines = json.dumps(head, indent=1, sort_keys=False)[:-2].splitlines()
    for key in ("attributes", "patterns"):
        rows = [json.dumps(entry, separators=(",", ":")) for entry in table[key]]
        lines[-1] += ","
        lines.append(f' "{key}": [')
        lines.extend(f"  {row}," for row in rows[:-1])
        lines.append(f"  {rows[-1]}")
        lines.append(" ]")
    return "\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    reference = json.loads(args.reference.read_text(encoding="utf-8"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(build(reference)), encoding="utf-8")


if __name__ == "__main__":
    main()
