"""The decision rule's corroboration of the train-only neighbourhood test (issue 16, round 5).

A train-only neighbourhood arises by chance in a small label: on the population's held-out parts
one clean model in 75 had a confirmed one (26.7% of a class, the model suspected) and no other
evidence. Round 5 counts it only with a second, independent line of evidence; these tests pin the
rule on hand-built inputs, where the population tests measure it on trained models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from auditkit.check import CheckResult
from auditkit.checks.backdoor import BackdoorParams, _DataLevel, _evidence, _settle
from auditkit.checks.backdoor.signatures import Detection
from auditkit.checks.backdoor.trigger import TriggerResult

CLASSES = ("a", "b", "c")


def _trigger(reached: bool = True) -> TriggerResult:
    mask = np.zeros((8, 8), dtype=np.float32)
    return TriggerResult(0, mask, np.zeros((1, 8, 8), dtype=np.float32), 4.0, 1.0, reached, 10, 0.1)


def _population(confirmed: bool = True, rows: int = 20, flagged: int = 6) -> tuple[np.ndarray, Detection]:
    members = np.arange(rows, dtype=np.int64)
    marks = np.zeros(rows, dtype=bool)
    marks[:flagged] = True
    detection = Detection(
        scores=marks.astype(np.float64),
        flagged=marks.copy() if confirmed else np.zeros(rows, dtype=bool),
        statistic=1.3,
        candidate=marks.copy(),
        reference_share=0.0,
        confirmation_p=0.001 if confirmed else 0.5,
        confirmed=confirmed,
    )
    return members, detection


def _data(confirmed: bool = True, others: list[str] | None = None) -> _DataLevel:
    members, detection = _population(confirmed)
    flags = np.zeros(60, dtype=bool)
    flags[members] = detection.flagged
    data = _DataLevel(flagged={"neighbourhood": flags}, scores={"neighbourhood": flags.astype(np.float64)})
    data.neighbourhood[0] = (members, detection)
    if others:
        data.confirmed[0] = list(others)
    return data


def _flagged(data: _DataLevel) -> int:
    return int(data.flagged["neighbourhood"].sum())


def _candidate(result: CheckResult) -> dict[str, Any]:
    (finding,) = [f for f in result.findings if f["kind"] == "candidate_population"]
    return finding


def test_a_neighbourhood_alone_suspects_nothing_and_flags_nothing() -> None:
    # The held-out false positive: a confirmed neighbourhood, no shortcut (excursion 0.38), an
    # anomaly index of 0.67 and no other population.
    data = _data()
    assert _evidence(_trigger(), 0.38, 0.40, 0.67, data, 0, BackdoorParams()) == []
    result = CheckResult()
    _settle(result, data, CLASSES, {})
    assert _flagged(data) == 0
    assert _candidate(result)["confirmed"] is True and _candidate(result)["corroborated"] is False
    (metric,) = [m for m in result.metrics if m.name == "backdoor.suspicious_fraction"]
    assert metric.value == 0.0 and metric.labels == {"method": "neighbourhood", "class": "a"}


@pytest.mark.parametrize(
    ("excursion", "train_excursion", "index", "others", "expected"),
    [
        # a shortcut (the poisoned images taught the trigger)
        (3.0, 0.9, 0.5, None, ["shortcut", "confirmed_population:neighbourhood"]),
        # another method's confirmed population in the label
        (0.5, 0.5, 0.5, ["stamp"], ["confirmed_population:stamp", "confirmed_population:neighbourhood"]),
        # the trigger search's outlying mask: no evidence alone, a corroboration here
        (0.7, 0.65, 6.35, None, ["confirmed_population:neighbourhood", "anomaly_index"]),
    ],
)
def test_a_corroborated_neighbourhood_counts_and_keeps_its_rows(
    excursion: float, train_excursion: float, index: float, others: list[str] | None, expected: list[str]
) -> None:
    data = _data(others=others)
    evidence = _evidence(_trigger(), excursion, train_excursion, index, data, 0, BackdoorParams())
    assert evidence == expected
    result = CheckResult()
    _settle(result, data, CLASSES, {0: evidence})
    assert _flagged(data) == 6
    assert _candidate(result)["corroborated"] is True


def test_an_outlying_mask_alone_is_still_no_evidence_with_a_train_split() -> None:
    data = _data(confirmed=False)
    assert _evidence(_trigger(), 0.7, 0.65, 6.35, data, 0, BackdoorParams()) == []
    result = CheckResult()
    _settle(result, data, CLASSES, {})
    assert _flagged(data) == 0
    assert "corroborated" not in _candidate(result)  # an unconfirmed candidate has nothing to corroborate


def test_without_the_trigger_search_another_population_corroborates() -> None:
    # An artefact without gradients: no trigger is judged, so only the data level can corroborate.
    alone, backed = _data(), _data(others=["activation_clustering"])
    for data in (alone, backed):
        _settle(CheckResult(), data, CLASSES, {})
    assert _flagged(alone) == 0 and _flagged(backed) == 6


def test_a_trigger_that_never_succeeded_corroborates_nothing() -> None:
    data = _data()
    assert _evidence(_trigger(reached=False), 3.0, 0.9, 6.35, data, 0, BackdoorParams()) == []
    _settle(CheckResult(), data, CLASSES, {})
    assert _flagged(data) == 0
