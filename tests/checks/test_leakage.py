"""Tests of the leakage maths (hashing, duplicates, overlap, shortcut AUROC) and LeakageCheck."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from auditkit.checks.leakage import (
    LeakageCheck,
    cosine_rows,
    encode_levels,
    exact_groups_across,
    exact_groups_within,
    hamming_distance,
    hamming_pairs,
    hamming_pairs_within,
    metadata_auroc,
    near_pairs_across,
    near_pairs_within,
    overlap,
    pack_bits,
    perceptual_hash,
    pixel_digests,
    unpack_bits,
)
from auditkit.checks.leakage.hashing import low_frequencies
from auditkit.checks.leakage.identity import header_text
from auditkit.checks.leakage.shortcut import fold_plan, out_of_fold_scores
from auditkit.context import AuditContext
from auditkit.data import load_dataset
from auditkit.fixtures.leaky import LEAKY_SITES, LeakyStudy, generate_leaky_study
from auditkit.model import ModelAdapter
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec

SHORTCUT_AUC_BOUND = 0.75
"""The bound proposed for the policy's shortcut rule (warn above it)."""

FAST = {"n_boot": 50}


# --------------------------------------------------------------------------------------------
# Hashing and the Hamming search


def reference_pairs(a: np.ndarray, b: np.ndarray, radius: int) -> set[tuple[int, int, int]]:
    """Every pair within ``radius`` by unpacking bits and comparing them one by one."""
    bits_a, bits_b = unpack_bits(a), unpack_bits(b)
    distance = (bits_a[:, None, :] != bits_b[None, :, :]).sum(axis=2)
    i, j = np.nonzero(distance <= radius)
    return {(int(x), int(y), int(distance[x, y])) for x, y in zip(i, j, strict=True)}


def random_hashes(rng: np.random.Generator, n: int, words: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=(n, words), dtype=np.uint64, endpoint=False)


def flip(hashes: np.ndarray, rng: np.random.Generator, bits: int) -> np.ndarray:
    """A copy with ``bits`` distinct random bits flipped per row."""
    unpacked = unpack_bits(hashes)
    for row in unpacked:
        row[rng.choice(row.size, size=bits, replace=False)] ^= True
    return pack_bits(unpacked)


@given(
    words=st.integers(1, 4),
    n=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=30, deadline=None)
def test_pack_unpack_round_trip(words: int, n: int, seed: int) -> None:
    bits = np.random.default_rng(seed).random((n, 64 * words)) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == np.uint64 and packed.shape == (n, words)
    assert np.array_equal(unpack_bits(packed), bits)


def test_pack_bits_layout_and_distance_by_hand() -> None:
    bits = np.zeros((2, 64), dtype=bool)
    bits[0, [0, 3]] = True  # bit k is bit k of word 0
    bits[1, [0, 63]] = True
    packed = pack_bits(bits)
    assert packed[0, 0] == 0b1001 and packed[1, 0] == 1 + 2**63
    assert hamming_distance(packed[0], packed[1]) == 2
    assert hamming_pairs(packed, packed, 1)[0].tolist() == [0, 1]


def test_hamming_search_equals_reference_across_tile_edges() -> None:
    rng = np.random.default_rng(0)
    for words in (1, 4):
        train = random_hashes(rng, 4200, words)  # more than one 4096-wide tile
        queries = random_hashes(rng, 150, words)  # more than two 64-row tiles
        queries[::7] = flip(train[:150:7], rng, 3)
        queries[3] = train[4150]  # a match in the second reference tile
        radius = 6 * words
        i, j, d = hamming_pairs(queries, train, radius)
        found = set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
        assert found == reference_pairs(queries, train, radius)
        assert (3, 4150, 0) in found
        assert np.array_equal(np.lexsort((j, i)), np.arange(i.size))


def test_hamming_search_within_one_set_is_the_upper_triangle() -> None:
    rng = np.random.default_rng(1)
    hashes = random_hashes(rng, 200, 2)
    hashes[150:] = flip(hashes[:50], rng, 2)
    i, j, d = hamming_pairs_within(hashes, 4)
    expected = {(a, b, c) for a, b, c in reference_pairs(hashes, hashes, 4) if a < b}
    assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == expected
    assert len(expected) >= 50


def test_hamming_search_rejects_bad_input_with_the_offending_value() -> None:
    good = np.zeros((3, 1), dtype=np.uint64)
    with pytest.raises(ValueError, match=r"queries must be a \(N, W\) uint64 array, got int64"):
        hamming_pairs(np.zeros((3, 1), dtype=np.int64), good, 1)
    with pytest.raises(ValueError, match="queries have 2 words per hash, references 1"):
        hamming_pairs(np.zeros((3, 2), dtype=np.uint64), good, 1)
    with pytest.raises(ValueError, match="radius must be >= 0, got -1"):
        hamming_pairs_within(good, -1)
    with pytest.raises(ValueError, match="B a multiple of 64, got"):
        pack_bits(np.zeros((2, 10), dtype=bool))
    with pytest.raises(ValueError, match="bits must be 64, 128 or 256, got 100"):
        perceptual_hash(torch.zeros(1, 1, 32, 32), bits=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\), got shape \(32, 32\)"):
        perceptual_hash(torch.zeros(32, 32))


def smooth_images(rng: np.random.Generator, n: int, size: int = 64) -> torch.Tensor:
    """Random smooth images (low-frequency content, like radiographs at the model input)."""
    coarse = torch.from_numpy(rng.random((n, 1, 16, 16))).float()
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


def test_low_frequencies_extend_the_classic_8x8_block() -> None:
    rows, cols = low_frequencies(64)
    block = {(u, v) for u in range(8) for v in range(8)} - {(0, 0)}
    assert set(zip(rows[:63].tolist(), cols[:63].tolist(), strict=True)) == block
    assert max(rows[63], cols[63]) == 8
    rows, cols = low_frequencies(256)
    assert {(u, v) for u in range(16) for v in range(16)} - {(0, 0)} <= set(
        zip(rows.tolist(), cols.tolist(), strict=True)
    )


@pytest.mark.parametrize("bits", [64, 128, 256])
def test_perceptual_hash_invariances(bits: int) -> None:
    rng = np.random.default_rng(2)
    images = smooth_images(rng, 40)
    base = perceptual_hash(images, bits=bits)
    assert base.shape == (40, bits // 64)
    # Window/level/gain changes leave the standardised image, hence the hash, unchanged.
    assert hamming_distance(perceptual_hash(0.2 + 0.6 * images, bits=bits), base).max() <= 1
    assert np.array_equal(perceptual_hash(images.repeat(1, 3, 1, 1), bits=bits), base)
    noisy = images + torch.from_numpy(rng.normal(0, 0.01, images.shape)).float()
    assert hamming_distance(perceptual_hash(noisy, bits=bits), base).max() <= 0.1 * bits
    # Unrelated images differ in about half the bits.
    unrelated = hamming_distance(base[:20], base[20:])
    assert 0.3 * bits < unrelated.mean() < 0.7 * bits


def test_pixel_digests_tell_bit_identical_images_apart() -> None:
    images = torch.zeros(3, 1, 4, 4, dtype=torch.float16)
    images[2, 0, 1, 1] = 0.001
    digests = pixel_digests(images)
    assert digests[0] == digests[1] != digests[2]
    assert len(digests[0]) == 32 and pixel_digests(images.numpy()) == digests


# --------------------------------------------------------------------------------------------
# Duplicate bookkeeping and identity overlap


def test_exact_groups_count_pairs() -> None:
    across = exact_groups_across(["a", "b", "a", "c"], ["a", "d", "c", "c"])
    by_digest = {(g.first, g.second): g.pairs for g in across}
    assert by_digest == {((0, 2), (0,)): 2, ((3,), (2, 3)): 2}
    within = exact_groups_within(["a", "b", "a", "a", "b", "c"])
    assert sorted((g.first, g.pairs) for g in within) == [((0, 2, 3), 3), ((1, 4), 1)]
    assert all(g.second == () for g in within)


def test_near_pairs_exclude_exact_and_need_the_embedding() -> None:
    rng = np.random.default_rng(3)
    train = random_hashes(rng, 6, 1)
    test = train.copy()
    test[1] = flip(train[1:2], rng, 2)[0]
    test[2] = flip(train[2:3], rng, 3)[0]
    test[3:] = random_hashes(rng, 3, 1)
    digests_train = [f"t{i}" for i in range(6)]
    digests_test = ["t0", "x1", "x2", "x3", "x4", "x5"]  # row 0 is an exact copy
    features_train = np.eye(6)
    features_test = np.eye(6)
    features_test[2] = [0, 0, 0.5, 0.5, 0, 0]  # cosine 0.707 with train row 2
    near = near_pairs_across(
        train, test, 4, first_digests=digests_train, second_digests=digests_test,
        features=(features_train, features_test), min_cosine=0.9,
    )  # fmt: skip
    assert list(zip(near.i.tolist(), near.j.tolist(), strict=True)) == [(1, 1)]
    assert near.hamming.tolist() == [2] and near.cosine.tolist() == [1.0] and near.rejected == 1
    unconfirmed = near_pairs_across(
        train, test, 4, first_digests=digests_train, second_digests=digests_test,
        features=None, min_cosine=0.9,
    )  # fmt: skip
    assert unconfirmed.count == 2 and np.isnan(unconfirmed.cosine).all()
    within = near_pairs_within(
        np.vstack([train[:3], test[1:2]]), 4, digests=["a", "b", "c", "d"], features=None,
        min_cosine=0.9,
    )  # fmt: skip
    assert list(zip(within.i.tolist(), within.j.tolist(), strict=True)) == [(1, 3)]


def test_cosine_rows_by_hand() -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[1.0, 1.0], [3.0, 4.0]])
    got = cosine_rows(a, b, np.array([0, 0, 1]), np.array([0, 1, 1]))
    assert np.allclose(got, [2**-0.5, 0.6, 0.0])


def test_overlap_by_hand() -> None:
    shared = overlap(["P2", "P1", None, "P2"], ["P3", "P2", None, "P1", "P1"])
    assert shared == {"P1": ([1], [3, 4]), "P2": ([0, 3], [1])}
    assert overlap([None], [None]) == {}


# --------------------------------------------------------------------------------------------
# Shortcut AUROC


def test_encode_levels_bins_numeric_columns_and_keeps_missing_apart() -> None:
    codes = encode_levels(["b", "a", None, "b", " "])
    assert codes.tolist() == [0, 1, 2, 0, 2]
    numeric = encode_levels([str(v) for v in range(100)] + [None])
    assert len(set(numeric.tolist())) == 11  # deciles + missing
    assert len(set(encode_levels([str(v % 5) for v in range(100)]).tolist())) == 5


def test_out_of_fold_target_encoding_by_hand() -> None:
    codes = np.array([0, 0, 1, 1, 0, 1])
    labels = np.array([1, 1, 0, 1, 0, 0])
    folds = [(np.array([0, 1, 2, 3]), np.array([4, 5])), (np.array([2, 3, 4, 5]), np.array([0, 1]))]
    scores = out_of_fold_scores(codes, labels, folds, 2, smoothing=1.0)
    # fold 1: level 0 seen as labels (1, 1), prior 3/4 -> rate (2 + 0.75) / 3, minus 0.75;
    # level 1 seen as (0, 1) -> (1 + 0.75) / 3 - 0.75.
    assert np.allclose(scores[4:, 1], [2.75 / 3 - 0.75, 1.75 / 3 - 0.75])
    # fold 2: level 0 seen as (0,), prior 1/4 -> (0 + 0.25) / 2 - 0.25.
    assert np.allclose(scores[:2, 1], [0.125 - 0.25, 0.125 - 0.25])
    assert np.allclose(scores[[0, 1, 4, 5]].sum(axis=1), 0.0)  # excess rates cancel
    assert np.isnan(scores[[2, 3]]).all()  # in no test fold


def _auc(values: list[str | None], labels: np.ndarray, **kwargs: Any) -> Any:
    options = {
        "n_classes": 2, "positive_class": 1, "groups": None, "folds": 5, "n_boot": 0,
        "rng": np.random.default_rng(0),
    }  # fmt: skip
    options.update(kwargs)
    return metadata_auroc(values, labels, **options)


def test_metadata_auroc_extremes_and_undefined_cases() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 200)
    perfect = _auc([f"site{y}" for y in labels], labels)
    assert perfect.value == 1.0 and perfect.n_levels == 2 and perfect.folds == 5
    assert _auc(["same"] * 200, labels).value == 0.5
    noise = _auc([str(v) for v in rng.integers(0, 3, 200)], labels, n_boot=200)
    assert 0.35 < noise.value < 0.65
    assert noise.ci is not None and noise.ci[0] < 0.5 < noise.ci[1]
    single = _auc(["a"] * 10, np.ones(10, dtype=np.int64))
    assert single.value is None and single.reason == "the labels hold a single class"
    missing = _auc([None] * 10, np.arange(10) % 2)
    assert missing.value is None and missing.reason == "no image has a value"
    few = _auc(["a", "b", "a"], np.array([0, 1, 0]))
    assert few.value is None and "fewer than 2 images of some class" in (few.reason or "")
    one_patient = _auc(["a", "b", "a", "b"], np.array([0, 1, 0, 1]), groups=["P1", "P2", "P1", "P2"])
    assert one_patient.value is None and "fewer than 2 patients of some class" in (one_patient.reason or "")
    grouped = _auc(["a", "b"] * 6, np.array([0, 1] * 6), groups=[f"P{i % 6}" for i in range(12)])
    assert grouped.folds == 3 and grouped.value == 1.0  # 3 patients per class: 3 folds


def test_metadata_auroc_equals_sklearn_on_the_out_of_fold_scores() -> None:
    rng = np.random.default_rng(5)
    site = rng.integers(0, 4, 300)
    labels = (rng.random(300) < np.array([0.1, 0.3, 0.6, 0.9])[site]).astype(np.int64)
    values = [f"s{v}" for v in site]
    result = _auc(values, labels)
    # The same folds, by hand: StratifiedKFold with the seed metadata_auroc draws.
    from sklearn.model_selection import StratifiedKFold

    seed = int(np.random.default_rng(0).integers(0, 2**31 - 1))
    folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(site, labels))
    scores = out_of_fold_scores(encode_levels(values), labels, folds, 2)
    assert result.value == pytest.approx(roc_auc_score(labels, scores[:, 1]))
    assert 0.75 < result.value < 0.95


def test_a_fold_plan_scores_every_column_on_the_same_folds() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 240)
    patients = [f"P{i // 2}" for i in range(240)]
    labels = np.repeat(labels[::2], 2)  # a patient's two images share the label
    plan = fold_plan(labels, groups=patients, folds=5, rng=np.random.default_rng(1))
    assert plan.k == 5 and plan.reason is None
    tested = np.concatenate([test for _, test in plan.folds])
    assert sorted(tested.tolist()) == list(range(240))  # every image scored once
    for _, test in plan.folds:  # a patient's images never straddle two folds
        inside = {patients[i] for i in test.tolist()}
        assert all(patients[j] not in inside for j in range(240) if j not in set(test.tolist()))
    # Without a plan the folds are drawn from rng: the same as a plan drawn from the same rng.
    site = [f"s{v}" for v in rng.integers(0, 3, 240)]
    by_plan = _auc(site, labels, groups=patients, plan=plan)
    by_rng = _auc(site, labels, groups=patients, rng=np.random.default_rng(1))
    assert by_plan == by_rng
    by_hand = out_of_fold_scores(encode_levels(site), labels, plan.folds, 2)
    assert by_plan.value == pytest.approx(roc_auc_score(labels, by_hand[:, 1]))
    single = fold_plan(np.ones(10, dtype=np.int64), groups=None, folds=5, rng=np.random.default_rng(0))
    assert single.reason == "the labels hold a single class" and single.folds == []
    assert _auc(["a", "b"] * 5, np.arange(10) % 2, plan=single).reason == "the labels hold a single class"
    with pytest.raises(ValueError, match="made for 240 images, but 100 labels are given"):
        _auc(site[:100], labels[:100], plan=plan)


def test_metadata_auroc_keeps_a_patient_in_one_fold() -> None:
    # A patient ID column predicts the label perfectly *within* a patient; grouped folds never
    # let a patient's other image score it, so the column carries no information.
    labels = np.repeat(np.arange(100) % 2, 2)
    patients = [f"P{i // 2}" for i in range(200)]
    grouped = _auc(patients, labels, groups=patients)
    assert grouped.value == 0.5
    ungrouped = _auc(patients, labels)
    assert ungrouped.value is not None and ungrouped.value > 0.9


def test_metadata_auroc_multiclass_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 300)
    result = _auc([f"c{y}" for y in labels], labels, n_classes=3, positive_class=None)
    assert result.value == 1.0 and result.ci is None


# --------------------------------------------------------------------------------------------
# The check on the leaky study and its clean twin


@dataclass
class Audited:
    study: LeakyStudy
    record: dict[str, Any]

    def metric(self, name: str, **labels: str) -> dict[str, Any]:
        (found,) = [m for m in self.record["metrics"] if m["name"] == name and m["labels"] == labels]
        return found

    def findings(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [
            f for f in self.record["findings"] if f["kind"] == kind and all(f.get(k) == v for k, v in match.items())
        ]


def _audit(study: LeakyStudy, out: Path, params: dict[str, Any] | None = None) -> Audited:
    spec = load_spec(study.spec_path).model_copy(update={"checks": {"leakage": params or FAST}})
    outcome = run_audit(spec, RunOptions(out_dir=out, report=False, pdf=False), checks={"leakage": LeakageCheck})
    (record,) = outcome.results["checks"]
    assert record["status"] == "ok", record["error"]
    json.dumps(record, allow_nan=False)
    return Audited(study, record)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Audited:
    root = tmp_path_factory.mktemp("leaky")
    return _audit(generate_leaky_study(root / "study"), root / "out")


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Audited:
    root = tmp_path_factory.mktemp("clean")
    return _audit(generate_leaky_study(root / "study", leaky=False), root / "out")


def _patient_of_row(study: LeakyStudy) -> dict[int, str]:
    return {row: record["patient_id"] for row, record in enumerate(study.rows)}


def precision_recall(found: set[Any], truth: set[Any]) -> tuple[float, float]:
    hits = len(found & truth)
    return (hits / len(found) if found else 1.0, hits / len(truth) if truth else 1.0)


def test_every_metric_is_declared_and_json_clean(leaky: Audited) -> None:
    names = {m["name"] for m in leaky.record["metrics"]}
    assert names == set(LeakageCheck.emits)
    assert all(m["direction"] == "lower_is_better" for m in leaky.record["metrics"])


def test_planted_patient_study_and_series_overlap_found_exactly(leaky: Audited) -> None:
    truth = leaky.study.truth
    patient_of = _patient_of_row(leaky.study)
    found = leaky.findings("patient_overlap")
    raw = {patient_of[r] for f in found for r in f["train_rows"] + f["eval_rows"]}
    assert precision_recall(raw, set(truth.overlapping_patients)) == (1.0, 1.0)
    for finding in found:  # one surrogate per finding, rows of that patient only
        assert finding["patient"].startswith("P")
        rows = finding["train_rows"] + finding["eval_rows"]
        assert len({patient_of[r] for r in rows}) == 1
        assert sorted(rows) == sorted(truth.overlapping_patients[patient_of[rows[0]]])
    assert leaky.metric("leakage.patient_overlap")["value"] == len(truth.overlapping_patients)

    for what, planted in (("study", truth.overlapping_studies), ("series", truth.overlapping_series)):
        found = leaky.findings(f"{what}_overlap")
        rows = {tuple(sorted(f["train_rows"] + f["eval_rows"])) for f in found}
        assert rows == {tuple(sorted(r)) for r in planted.values()}
        assert leaky.metric(f"leakage.{what}_overlap")["value"] == len(planted)
    assert all(f["series"].startswith("SE") for f in leaky.findings("series_overlap"))


def _exact_pairs(findings: list[dict[str, Any]], scope: str) -> set[tuple[int, int]]:
    if scope == "cross":
        return {(a, b) for f in findings for a in f["train_rows"] for b in f["eval_rows"]}
    return {(a, b) for f in findings for a in f["rows"] for b in f["rows"] if a < b}


def _near_pairs(findings: list[dict[str, Any]], scope: str) -> set[tuple[int, int]]:
    if scope == "cross":
        return {(f["train_row"], f["eval_row"]) for f in findings}
    return {tuple(sorted(f["rows"])) for f in findings}  # type: ignore[misc]


def _sorted_pairs(pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for a, b in pairs}


@pytest.mark.parametrize("scope", ["cross", "train", "eval"])
def test_planted_duplicates_found_with_precision_and_recall(leaky: Audited, scope: str) -> None:
    truth = leaky.study.truth
    labels = {} if scope == "cross" else {"scope": "within_split", "split": scope}
    match = {"scope": "train_eval"} if scope == "cross" else {"scope": "within_split", "split": scope}

    exact = _exact_pairs(leaky.findings("exact_duplicate", **match), scope)
    planted_exact = truth.pairs("exact", scope)
    if scope != "cross":
        exact, planted_exact = _sorted_pairs(exact), _sorted_pairs(planted_exact)
    assert precision_recall(exact, planted_exact) == (1.0, 1.0)
    assert leaky.metric("leakage.exact_duplicates", **labels)["value"] == len(planted_exact)

    near = _near_pairs(leaky.findings("near_duplicate", **match), scope)
    planted_near = truth.pairs("near", scope)
    if scope != "cross":
        near, planted_near = _sorted_pairs(near), _sorted_pairs(planted_near)
    precision, recall = precision_recall(near, planted_near)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, near ^ planted_near)
    assert leaky.metric("leakage.near_duplicates", **labels)["value"] == len(near)
    assert planted_near and planted_exact


def test_the_planted_shortcut_column_has_the_highest_auroc(leaky: Audited, clean: Audited) -> None:
    aucs = {m["labels"]["column"]: m["value"] for m in leaky.record["metrics"] if m["name"] == "leakage.metadata_auc"}
    assert set(aucs) == {
        "sex", "age", "site", "Manufacturer", "ManufacturerModelName", "StationName",
        "PhotometricInterpretation", "PixelSpacing", "image_size",
    }  # fmt: skip
    planted = leaky.study.truth.shortcut_column
    assert planted == "site"
    assert max(aucs, key=lambda c: aucs[c]) == planted
    assert aucs[planted] > SHORTCUT_AUC_BOUND
    site = leaky.metric("leakage.metadata_auc", column="site")
    assert site["ci"][0] < site["value"] < site["ci"][1]
    (strongest,) = leaky.findings("strongest_metadata_signal")
    assert strongest["column"] == "site"
    clean_aucs = [m["value"] for m in clean.record["metrics"] if m["name"] == "leakage.metadata_auc"]
    assert clean_aucs and max(clean_aucs) < SHORTCUT_AUC_BOUND


def test_clean_twin_reports_nothing(clean: Audited) -> None:
    assert clean.study.truth.copies == () and clean.study.truth.overlapping_patients == {}
    for metric in clean.record["metrics"]:
        if metric["name"] != "leakage.metadata_auc":
            assert metric["value"] == 0.0, metric
    kinds = {f["kind"] for f in clean.record["findings"]}
    assert not kinds & {
        "patient_overlap", "study_overlap", "series_overlap", "exact_duplicate",
        "near_duplicate", "findings_truncated",
    }  # fmt: skip
    (search,) = clean.findings("duplicate_search")
    assert search["embedding_confirmation"] is True and search["radius_bits"] == 49


def test_findings_carry_no_header_value(leaky: Audited) -> None:
    text = json.dumps(leaky.record).upper()
    for site in LEAKY_SITES:
        for value in (site.manufacturer, site.model_name, site.institution_name, site.station_name):
            assert value.upper() not in text
    for record in leaky.study.rows:  # raw pseudonymous IDs and UIDs stay out too
        assert record["patient_id"] not in text and record["study_id"] not in text


@pytest.fixture(scope="module")
def leaky_ctx(leaky: Audited, tmp_path_factory: pytest.TempPathFactory) -> AuditContext:
    """A context over the leaky study with the shared pass done (the check runs on it directly)."""
    spec = load_spec(leaky.study.spec_path)
    dataset = load_dataset(spec, roles=("eval", "train"))
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, tmp_path_factory.mktemp("ctx"))
    ctx.prepare(["eval", "train"])
    return ctx


def _run(ctx: AuditContext, **params: Any) -> Audited:
    result = LeakageCheck().run(ctx, LeakageCheck.Params(**params))
    record = {"metrics": [m.to_json() for m in result.metrics], "findings": result.findings}
    return Audited(None, record)  # type: ignore[arg-type]


def test_header_texts_equal_the_fully_converted_headers(leaky_ctx: AuditContext) -> None:
    keywords = ["SeriesInstanceUID", "Rows", "Columns", "Manufacturer", "StationName", "InstitutionName"]
    texts = leaky_ctx.header_texts("eval", keywords)
    full = leaky_ctx.headers("eval")
    assert len(texts) == len(full) == leaky_ctx.split("eval").n
    for text, header in zip(texts, full, strict=True):
        assert header is not None and text is not None
        for keyword in keywords:
            value = header.get(keyword)
            expected = None if value is None else (str(value).strip() or None)
            assert text[keyword] == expected
    assert leaky_ctx.header_texts("eval", keywords) == texts  # the same after full conversion
    with pytest.raises(KeyError):
        header_text(texts[0], "PatientName")  # not read: an error, not a silent None


def test_findings_are_capped(leaky_ctx: AuditContext) -> None:
    capped = _run(leaky_ctx, n_boot=0, max_findings=1)
    near = capped.findings("near_duplicate", scope="train_eval")
    assert len(near) == 1
    (truncated,) = capped.findings("findings_truncated")
    assert truncated["not_listed"]["near_duplicate:train_eval"] == (
        capped.metric("leakage.near_duplicates")["value"] - 1
    )
    assert capped.metric("leakage.metadata_auc", column="site")["ci"] is None


def test_identifiers_read_from_headers_when_the_manifest_has_none(tmp_path: Path, leaky: Audited) -> None:
    study = generate_leaky_study(tmp_path / "study", ids_in_manifest=False)
    with study.manifest_path.open(newline="", encoding="utf-8") as handle:
        assert "patient_id" not in (csv.DictReader(handle).fieldnames or [])
    audited = _audit(study, tmp_path / "out", {"n_boot": 0, "shortcut_columns": ["site"]})
    for name in ("patient_overlap", "study_overlap", "series_overlap", "exact_duplicates"):
        assert audited.metric(f"leakage.{name}")["value"] == leaky.metric(f"leakage.{name}")["value"]
    assert [m["labels"] for m in audited.record["metrics"] if "metadata" in m["name"]] == [{"column": "site"}]


def test_without_a_train_split_cross_metrics_are_undefined(leaky: Audited, tmp_path: Path) -> None:
    spec_path = leaky.study.spec_path.with_name("eval_only.yaml")
    data = yaml.safe_load(leaky.study.spec_path.read_text(encoding="utf-8"))
    data["data"]["splits"] = {"eval": "test"}
    spec_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    spec = load_spec(spec_path).model_copy(update={"checks": {"leakage": {"n_boot": 0}}})
    outcome = run_audit(spec, RunOptions(out_dir=tmp_path, report=False, pdf=False), checks={"leakage": LeakageCheck})
    (record,) = outcome.results["checks"]
    assert record["status"] == "ok", record["error"]
    audited = Audited(leaky.study, record)
    for name in ("patient", "study", "series"):
        metric = audited.metric(f"leakage.{name}_overlap")
        assert metric["value"] is None and "no train split" in metric["reason"]
    assert audited.metric("leakage.exact_duplicates")["value"] is None
    within = audited.metric("leakage.exact_duplicates", scope="within_split", split="eval")
    assert within["value"] == len(leaky.study.truth.pairs("exact", "eval"))
    assert not [m for m in record["metrics"] if m["labels"].get("split") == "train"]


def png_study(root: Path) -> tuple[Path, int]:
    """A PNG study (no DICOM header) with one patient moved into both splits; (spec, row moved)."""
    from auditkit.fixtures.leaky import write_spec
    from auditkit.fixtures.synthetic import generate_study

    study = generate_study(root, n_patients=12, image_size=64, fmt="png", seed=1)
    rows = [r.manifest_record() for r in study.rows]
    by_patient: dict[str, list[int]] = {}
    for i, record in enumerate(rows):
        by_patient.setdefault(record["patient_id"], []).append(i)
    moved = next(r[1] for r in by_patient.values() if len(r) == 2)
    rows[moved]["split"] = "test" if rows[moved]["split"] == "train" else "train"
    with study.manifest_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return write_spec(root), moved


def test_non_dicom_study_uses_the_manifest_and_explains_missing_headers(tmp_path: Path) -> None:
    spec_path, moved = png_study(tmp_path / "png")
    spec = load_spec(spec_path).model_copy(update={"checks": {"leakage": {"n_boot": 0}}})
    outcome = run_audit(
        spec, RunOptions(out_dir=tmp_path / "out", report=False, pdf=False), checks={"leakage": LeakageCheck}
    )
    (record,) = outcome.results["checks"]
    assert record["status"] == "ok", record["error"]
    audited = Audited(None, record)  # type: ignore[arg-type]
    (finding,) = audited.findings("patient_overlap")
    assert moved in finding["train_rows"] + finding["eval_rows"]
    assert audited.metric("leakage.patient_overlap")["value"] == 1
    assert audited.metric("leakage.study_overlap")["value"] == 0  # a follow-up is another study
    series = audited.metric("leakage.series_overlap")
    assert series["value"] is None and series["reason"].startswith("no series identifiers")
    station = audited.metric("leakage.metadata_auc", column="StationName")
    assert station["value"] is None and station["reason"] == "no image has a value"
    assert audited.metric("leakage.metadata_auc", column="site")["value"] is not None


def test_unknown_shortcut_column_is_an_error_naming_it(leaky_ctx: AuditContext) -> None:
    with pytest.raises(ValueError, match=r"'scanner_room' is neither a data\.groups column"):
        _run(leaky_ctx, shortcut_columns=("scanner_room",))


def test_check_contract_and_params() -> None:
    assert LeakageCheck.id == "leakage" and LeakageCheck.family == "leakage"
    needs = LeakageCheck.needs
    assert needs.features and needs.train_optional and needs.headers and not needs.train
    assert "MAP 2.3" in (LeakageCheck.__doc__ or "") and "MEASURE 2.1" in (LeakageCheck.__doc__ or "")
    params = LeakageCheck.Params()
    assert (params.hash_bits, params.near_max_distance, params.near_min_cosine) == (256, 0.195, 0.5)
    with pytest.raises(ValidationError, match="expected each column once"):
        LeakageCheck.Params(shortcut_columns=("site", "site"))
    with pytest.raises(ValidationError):
        LeakageCheck.Params(hash_bits=100)
    with pytest.raises(ValidationError):
        LeakageCheck.Params(unknown=1)


def test_run_is_deterministic_on_one_context(leaky_ctx: AuditContext) -> None:
    first, second = _run(leaky_ctx, n_boot=20), _run(leaky_ctx, n_boot=20)
    assert first.record == second.record


def test_a_complementary_hash_is_256_bits_away_not_zero() -> None:
    # 256 does not fit the uint8 accumulator of the search: it must not wrap into a match.
    rng = np.random.default_rng(7)
    hashes = random_hashes(rng, 3, 4)
    complement = ~hashes[:1]
    assert hamming_distance(hashes[0], complement[0]) == 256
    assert hamming_pairs(complement, hashes, 10)[0].size == 0
    others = hamming_distance(complement, hashes[1:]).tolist()
    assert hamming_pairs(complement, hashes, 256)[2].tolist() == [256, *others]
    both = np.vstack([hashes[:1], complement])
    assert hamming_pairs_within(both, 255)[0].size == 0


def test_proposed_policy_rules_fail_the_leaky_study_and_pass_the_clean_twin(leaky: Audited, clean: Audited) -> None:
    from auditkit.policy import evaluate
    from auditkit.testing import rules_for

    policy = rules_for("leakage")
    judged = evaluate(policy, [{"id": "leakage", "status": "ok", **leaky.record}])
    status = {r["id"]: r["status"] for r in judged["rules"]}
    assert status == {
        "LEAK-PATIENT": "fail",
        "LEAK-STUDY": "fail",
        "LEAK-EXACT": "fail",
        "LEAK-NEAR": "fail",
        "LEAK-DUPLICATES-WITHIN": "warn",
        "LEAK-NEAR-WITHIN": "warn",
        "LEAK-SHORTCUT": "warn",
    }
    assert {r["labels"]["column"] for r in judged["rules"] if r["id"] == "LEAK-SHORTCUT"} == {"site"}
    judged = evaluate(policy, [{"id": "leakage", "status": "ok", **clean.record}])
    assert {r["status"] for r in judged["rules"]} == {"pass"} and judged["verdict"] == "pass"


def test_fixture_refuses_a_cohort_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected at least 5 \(n_moved_follow_ups \+ 2\)"):
        generate_leaky_study(tmp_path, n_patients=6)
