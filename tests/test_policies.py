"""The packaged framework file and policies: verbatim texts, known controls, emitted metrics."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from auditkit.policy import load_framework, load_policy, packaged_policies
from auditkit.registry import discover

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "nist-ai-rmf-1.0-core.json"


def test_framework_has_the_whole_core() -> None:
    framework = load_framework()
    assert list(framework.functions) == ["GOVERN", "MAP", "MEASURE", "MANAGE"]
    assert len(framework.categories) == 19
    assert len(framework.subcategories) == 72
    assert len(framework.characteristics) == 7


@pytest.mark.skipif(not REFERENCE.is_file(), reason="shared/reference is not beside this checkout")
def test_framework_texts_are_verbatim() -> None:
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    framework = load_framework()
    assert [s["id"] for s in reference["subcategories"]] == list(framework.subcategories)
    for item in reference["subcategories"]:
        ours = framework.subcategories[item["id"]]
        assert ours.text == item["text"], item["id"]
        assert (ours.function, ours.category) == (item["function"], item["category"])
    for item in reference["categories"]:
        assert framework.categories[item["id"]] == item["text"]


def test_packaged_policies_are_valid_and_name_known_controls() -> None:
    framework = load_framework()
    assert set(packaged_policies()) >= {"medical-imaging-default", "medical-imaging-strict"}
    for name in packaged_policies():
        policy, _ = load_policy(name)
        assert policy.rules, name
        for rule in policy.rules:
            assert rule.controls, f"{name}: {rule.id} maps to no subcategory"
            assert set(rule.controls) <= set(framework.subcategories)
            assert rule.rationale.strip(), f"{name}: {rule.id} has no rationale"


def test_every_metric_a_policy_names_is_emitted_by_an_installed_check() -> None:
    from auditkit.coverage import CoverageCheck

    checks, broken = discover()
    assert not broken
    emitted = {name for cls in [*checks.values(), CoverageCheck] for name in cls.emits}
    for name in packaged_policies():
        policy, _ = load_policy(name)
        missing = sorted({r.metric for r in policy.rules} - emitted)
        assert not missing, f"{name} names metrics no installed check emits: {missing}"


def test_default_covers_every_emitted_metric_family() -> None:
    checks, _ = discover()
    policy, _ = load_policy("medical-imaging-default")
    judged = {r.metric.split(".")[0] for r in policy.rules}
    assert set(checks) | {"coverage"} <= judged, f"checks without any rule: {sorted(set(checks) - judged)}"


def test_strict_is_the_default_judged_on_the_conservative_end() -> None:
    folder = resources.files("auditkit.policies")
    default = yaml.safe_load((folder / "medical-imaging-default.yaml").read_text(encoding="utf-8"))
    strict = yaml.safe_load((folder / "medical-imaging-strict.yaml").read_text(encoding="utf-8"))
    assert [r["id"] for r in strict["rules"]] == [r["id"] for r in default["rules"]]
    for ours, theirs in zip(strict["rules"], default["rules"], strict=True):
        assert ours["use"] == ("ci_high" if "max" in theirs else "ci_low"), ours["id"]
        assert {k: v for k, v in ours.items() if k != "use"} == {k: v for k, v in theirs.items() if k != "use"}
