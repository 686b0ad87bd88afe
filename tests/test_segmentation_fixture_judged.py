"""The segmentation fixture judged end to end: the U-Net that never saw site C's lesions fails the
Dice-gap rule naming the site, and its clean twin, trained on every site, passes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auditkit.cli import main


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from auditkit.fixtures.segmentation import generate_segmentation_study

    root = tmp_path_factory.mktemp("segmentation-fixture")
    generate_segmentation_study(root)
    return root


def _judged(root: Path, variant: str) -> dict[str, Any]:
    from auditkit.fixtures.segmentation import write_segmentation_spec

    spec = write_segmentation_spec(root, variant, checks={"performance": {"n_boot": 300}, "bias": {"n_boot": 300}})
    code = main(["run", str(spec), "--quiet", "--no-pdf"])
    results = json.loads((root / f"audit-{variant}" / "results.json").read_text())
    return {"code": code, "results": results, "checks": {c["id"]: c for c in results["checks"]}}


def _gap(check: dict[str, Any], group_by: str, cls: str) -> dict[str, Any]:
    return next(
        m
        for m in check["metrics"]
        if m["name"] == "bias.max_gap" and m["labels"] == {"metric": "dice", "group_by": group_by, "class": cls}
    )


def test_the_planted_site_fails_the_dice_gap_rule_and_the_clean_twin_passes(study: Path) -> None:
    biased, clean = _judged(study, "biased"), _judged(study, "clean")
    failed = {
        (r["id"], r["labels"].get("group_by"), r["labels"].get("class"))
        for r in biased["results"]["rules"]
        if r["status"] == "fail"
    }
    assert ("SEG-DICE-GAP", "site", "lesion") in failed
    assert biased["code"] == 1
    lesion = _gap(biased["checks"]["bias"], "site", "lesion")
    assert lesion["ci"][0] > 0.3  # the biased model outlines site C's lesions far worse
    worst = next(
        f
        for f in biased["checks"]["bias"]["findings"]
        if f.get("kind") == "subgroup_gap"
        and f.get("metric") == "dice"
        and f.get("group_by") == "site"
        and f.get("class") == "lesion"
    )
    assert worst["worst_group"] == "C"
    assert not [r for r in clean["results"]["rules"] if r["id"].startswith("SEG-DICE-GAP") and r["status"] == "fail"]
    assert _gap(clean["checks"]["bias"], "site", "lesion")["ci"][0] < 0.1
    # The sexes are balanced across sites: no planted sex gap in either model.
    for run in (biased, clean):
        assert _gap(run["checks"]["bias"], "sex", "lesion")["ci"][0] < 0.1
    # Performance: the per-class table's cases and the empty lesion references.
    counts = next(f for f in clean["checks"]["performance"]["findings"] if f["kind"] == "case_counts")
    assert counts["classes"]["lesion"]["empty_reference"] == 16
