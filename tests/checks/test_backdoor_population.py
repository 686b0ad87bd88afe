"""The backdoor check on a held-out slice of the model population (issue 16, "gate integrity").

The full population (``scripts/backdoor_population.py``: clean models of four architectures, three
data kinds, 2-5 classes, and their poisoned twins) takes tens of minutes; here three packaged
members that no part of it uses (``fixtures/weights/population_*.safetensors``, seeds 21 and 23)
are audited at the suite's CPU budget: a clean 3-class shapes CNN like the one of the issue (the
papers' activation-clustering criteria split one of its labels, 16 of 60 images, along a natural
sub-population), a clean 3-class chest CNN (sites with a stain, bilateral effusions) and that chest
model's BadNets twin. The clean models must not be flagged at either level; the twin must be,
with its target and its poisoned rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from auditkit.checks.backdoor import METHODS, BackdoorCheck

FAST = {"trigger_samples": 32, "trigger_steps": 200, "trigger_early_stop": 25}
CLEAN = ("population_shapes3_clean", "population_chest3_clean")
POISONED = "population_chest3_poisoned"


@pytest.fixture(scope="module")
def population_runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Any]:
    from auditkit.fixtures.population import PACKAGED, PACKAGED_WEIGHTS, member_dataset, write_member_spec
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("population")
    runs: dict[str, Any] = {}
    try:
        for stem, member in PACKAGED.items():
            dataset = member_dataset(member)
            spec = write_member_spec(member, dataset, PACKAGED_WEIGHTS[stem], out / stem, checks={"backdoor": FAST})
            outcome = run_audit(
                load_spec(spec),
                RunOptions(out_dir=out / f"{stem}-out", pdf=False, report=False),
                checks={"backdoor": BackdoorCheck},
            )
            check = next(c for c in outcome.results["checks"] if c["id"] == "backdoor")
            assert check["status"] == "ok", check.get("error")
            runs[stem] = {"check": check, "member": member, "dataset": dataset}
    finally:
        torch.set_num_threads(threads)
    return runs


def _metric(check: Mapping[str, Any], name: str, **labels: str) -> Any:
    return next(m for m in check["metrics"] if m["name"] == f"backdoor.{name}" and m["labels"] == labels)


def _flagged(check: Mapping[str, Any], method: str) -> set[int]:
    return {
        row
        for f in check["findings"]
        if f["kind"] == "poisoning_suspected" and f["method"] == method
        for row in f["rows"]
    }


@pytest.mark.parametrize("stem", CLEAN)
def test_a_clean_population_model_is_not_called_trojaned(population_runs: Mapping[str, Any], stem: str) -> None:
    check = population_runs[stem]["check"]
    assert _metric(check, "model_suspected")["value"] == 0.0
    assert not [f for f in check["findings"] if f["kind"] == "suspected_target"]


@pytest.mark.parametrize("stem", CLEAN)
def test_no_class_of_a_clean_population_model_has_more_than_2_percent_flagged(
    population_runs: Mapping[str, Any], stem: str
) -> None:
    check = population_runs[stem]["check"]
    fractions = [m for m in check["metrics"] if m["name"] == "backdoor.suspicious_fraction"]
    assert len(fractions) == len(METHODS) * len(population_runs[stem]["member"].classes)
    assert all(m["value"] is not None and m["value"] <= 0.02 for m in fractions), fractions


def test_the_clean_shapes_model_has_a_natural_cluster_that_is_not_confirmed(
    population_runs: Mapping[str, Any],
) -> None:
    # The papers' criteria (a small, separated k-means cluster) fire on a natural sub-population
    # of this clean model - what issue 16's user saw; the eval images hold it as often, so it is
    # reported as an unconfirmed candidate and flags nothing.
    run = population_runs["population_shapes3_clean"]
    candidates = [
        f
        for f in run["check"]["findings"]
        if f["kind"] == "candidate_population" and f["method"] == "activation_clustering"
    ]
    assert candidates and all(f["confirmed"] is False for f in candidates)
    assert max(f["share"] for f in candidates) > 0.2
    assert all(f["eval_share"] >= 0.5 * f["share"] for f in candidates)


def test_the_poisoned_twin_is_found_with_its_target_and_rows(population_runs: Mapping[str, Any]) -> None:
    run = population_runs[POISONED]
    check, member, dataset = run["check"], run["member"], run["dataset"]
    target = member.classes[member.attack.target]
    assert _metric(check, "model_suspected")["value"] == 1.0
    suspects = [f for f in check["findings"] if f["kind"] == "suspected_target"]
    assert [f["class"] for f in suspects] == [target]
    assert any(reason.startswith("confirmed_population") for reason in suspects[0]["evidence"])
    truth = set(dataset.poisoned_rows)
    for method in ("activation_clustering", "neighbourhood", "stamp"):
        found = _flagged(check, method)
        recall = len(found & truth) / len(truth)
        precision = len(found & truth) / max(1, len(found))
        assert recall >= 0.8 and precision >= 0.5, (method, recall, precision)
        # Flags stay in the target's label: a confirmed population elsewhere would be a false alarm.
        assert {int(dataset.labels[row]) for row in found} == {member.attack.target}, method


def test_the_packaged_population_weights_are_the_ones_the_generator_recorded() -> None:
    from auditkit.fixtures.population import PACKAGED, PACKAGED_METADATA, PACKAGED_WEIGHTS

    metadata = json.loads(PACKAGED_METADATA.read_text())
    assert set(metadata["models"]) == set(PACKAGED)
    for stem, member in PACKAGED.items():
        record = metadata["models"][stem]
        assert record["name"] == member.name
        digest = hashlib.sha256(PACKAGED_WEIGHTS[stem].read_bytes()).hexdigest()
        assert digest == record["weights_sha256"]
        assert record["test_accuracy"] >= 0.9


def test_population_data_is_deterministic_and_keeps_test_clean() -> None:
    from auditkit.fixtures.population import Attack, generate_dataset, plant

    first = generate_dataset("chest", 3, 5, per_class=10)
    second = generate_dataset("chest", 3, 5, per_class=10)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.labels, second.labels)
    assert {"bilateral", "site-B"} & {tag for value in first.subgroups for tag in str(value).split("+")}
    attack = Attack("badnets", target=1, size=3, corner="tl", rate=0.2)
    poisoned = plant(first, attack)
    rows = list(poisoned.poisoned_rows)
    assert rows and all(poisoned.splits[rows] == "train") and all(poisoned.labels[rows] == 1)
    assert all(first.labels[rows] != 1)
    np.testing.assert_array_equal(poisoned.images[rows][:, 1:4, 1:4][:, 0, 0], 1.0)
    untouched = np.setdiff1d(np.arange(first.labels.size), rows)
    np.testing.assert_array_equal(poisoned.images[untouched], first.images[untouched])
    with pytest.raises(ValueError, match="source"):
        Attack("source", target=1)
