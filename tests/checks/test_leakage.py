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
from sklearn.metrics import r2_score, roc_auc_score

from auditkit.checks.leakage import (
    LeakageCheck,
    cosine_rows,
    encode_levels,
    exact_groups_across,
    exact_groups_within,
    fingerprint,
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
from auditkit.checks.leakage.duplicates import duplicate_labels, hash_radius, near_duplicate_search
from auditkit.checks.leakage.fingerprint import (
    _gradients,
    calibrate,
    central_cdf,
    fingerprints,
    rank_normalise,
    register_to_template,
    sample_pairs,
    similar_pairs,
    warp_affine,
)
from auditkit.checks.leakage.hashing import low_frequencies
from auditkit.checks.leakage.identity import header_text
from auditkit.checks.leakage.shortcut import (
    fold_plan,
    group_fold_plan,
    metadata_r2,
    out_of_fold_means,
    out_of_fold_scores,
)
from auditkit.context import AuditContext
from auditkit.data import load_dataset
from auditkit.fixtures.leaky import LEAKY_SITES, LeakyStudy, generate_leaky_study
from auditkit.fixtures.lookalike import COPY_KINDS, LookalikeStudy, generate_lookalike_study
from auditkit.model import ModelAdapter
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec
from auditkit.testing import make_context

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
# Acquisition fingerprints


def test_rank_normalise_averages_ties_by_hand() -> None:
    ranks = rank_normalise(torch.tensor([[3.0, 1.0, 3.0, 2.0]]))
    # ranks from 0: 1.0 -> 0, 2.0 -> 1, the two 3.0 share (2 + 3) / 2; scaled (r + 0.5) / 4 - 0.5
    assert torch.allclose(ranks, torch.tensor([[0.25, -0.375, 0.25, -0.125]]))
    assert rank_normalise(torch.empty(2, 0)).shape == (2, 0)


@given(seed=st.integers(0, 2**32 - 1), gamma=st.floats(0.3, 3.0), gain=st.floats(0.1, 10.0))
@settings(max_examples=25, deadline=None)
def test_ranks_ignore_a_monotone_change_of_tone(seed: int, gamma: float, gain: float) -> None:
    values = torch.from_numpy(np.random.default_rng(seed).random((3, 1, 8, 8))).float() + 0.01
    toned = gain * values**gamma - 0.2  # window, level, gamma: increasing
    assert torch.allclose(rank_normalise(toned.reshape(3, -1)), rank_normalise(values.reshape(3, -1)))
    assert torch.allclose(central_cdf(toned), central_cdf(values))
    assert float(central_cdf(values).abs().max()) <= 0.5


def test_warp_affine_equals_torch_affine_grid() -> None:
    rng = np.random.default_rng(8)
    images = torch.from_numpy(rng.random((4, 1, 16, 16))).float()
    theta = torch.eye(2, 3).repeat(4, 1, 1) + torch.from_numpy(rng.normal(0, 0.05, (4, 2, 3))).float()
    grid = torch.nn.functional.affine_grid(theta, [4, 1, 16, 16], align_corners=False)
    reference = torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)
    assert torch.allclose(warp_affine(images, theta), reference, atol=1e-5)


def test_registration_undoes_a_known_shift_and_zoom() -> None:
    template = smooth_images(np.random.default_rng(9), 1, size=32)
    true = torch.tensor([[[1.06, 0.0, 0.08], [0.0, 0.97, -0.05]]])
    moving = warp_affine(template, true)  # moving(x) = template(true x)
    theta, improved = register_to_template(moving, template, iterations=20)
    inverse = torch.linalg.inv(torch.cat([true[0], torch.tensor([[0.0, 0.0, 1.0]])]))[:2]
    assert bool(improved[0])
    assert torch.allclose(theta[0], inverse, atol=0.01)


def test_calibration_is_median_plus_z_robust_deviations_and_grows_with_pairs() -> None:
    rng = np.random.default_rng(10)
    vectors = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(300, 400))).float(), dim=1)
    pairs = sample_pairs(300, rng)  # 44,850 pairs > 20,000: a random sample
    assert pairs[0].numel() == 20_000 and bool((pairs[0] != pairs[1]).all())
    flat = calibrate(vectors, pairs, z=8.0, floor=0.1)
    values = (vectors[pairs[0]] * vectors[pairs[1]]).sum(dim=1).numpy()
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    assert flat.median == pytest.approx(median) and flat.scale == pytest.approx((q3 - q1) / 1.349)
    assert abs(flat.median) < 0.01 and flat.scale == pytest.approx(400**-0.5, rel=0.1)
    assert flat.z == 8.0 and flat.threshold == pytest.approx(flat.median + 8.0 * flat.scale)
    grown = calibrate(vectors, pairs, z=8.0, floor=0.1, z_per_decade=1.75, reference_pairs=4_485)
    assert grown.z == pytest.approx(8.0 + 1.75)  # 44,850 pairs compared: ten times the reference
    assert calibrate(vectors, pairs, z=8.0, floor=0.9).threshold == 0.9
    labels = np.array([0, 0, 0] + [-1] * 297)
    assert sample_pairs(300, rng, exclude=labels, max_pairs=10**6)[0].numel() == 300 * 299 // 2 - 3


def test_similar_pairs_equal_brute_force_and_skip_exact_duplicates() -> None:
    rng = np.random.default_rng(11)
    vectors = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(50, 8))).float(), dim=1)
    vectors[40:] = vectors[:10] + 0.05 * torch.from_numpy(rng.normal(size=(10, 8))).float()
    vectors = torch.nn.functional.normalize(vectors, dim=1)
    scores = (vectors @ vectors.T).numpy()
    expected = {(a, b) for a in range(50) for b in range(a + 1, 50) if scores[a, b] >= 0.8}
    i, j, s = similar_pairs(vectors, 0.8, block=7)  # blocks that do not divide 50
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected and len(expected) >= 10
    assert np.allclose(s, scores[i, j], atol=1e-5)
    labels = np.full(50, -1)
    labels[[0, 40]] = 3  # an exact pair: counted apart
    i, _, _ = similar_pairs(vectors, 0.8, exclude=labels)
    assert len(i) == len(expected) - 1
    # A large search runs on a random sketch first, then measures its candidates exactly.
    wide = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(300, 1000))).float(), dim=1)
    wide[200:] = torch.nn.functional.normalize(wide[:100] + 0.8 * torch.nn.functional.normalize(
        torch.from_numpy(rng.normal(size=(100, 1000))).float(), dim=1), dim=1)  # fmt: skip
    exact = similar_pairs(wide, 0.5)
    sketched = similar_pairs(wide, 0.5, exact_limit=100)
    assert len(exact[0]) >= 95 and all(np.array_equal(a, b) for a, b in zip(exact, sketched, strict=True))
    assert duplicate_labels(["a", "b", "a", "c"]).tolist() == [0, -1, 0, -1]


def _pairs_with_copies(rng: np.random.Generator, n: int, dimension: int, noise: float) -> torch.Tensor:
    vectors = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, dimension))).float(), dim=1)
    copies = n // 3
    vectors[n - copies :] = torch.nn.functional.normalize(
        vectors[:copies] + noise * torch.nn.functional.normalize(
            torch.from_numpy(rng.normal(size=(copies, dimension))).float(), dim=1), dim=1)  # fmt: skip
    return vectors


@pytest.mark.parametrize("exact_limit", [10_000, 100])  # on the fingerprints, and on the sketch
def test_similar_pairs_on_a_device_are_the_pairs_without_one(exact_limit: int) -> None:
    # The device path keeps candidates a margin below the bound and measures them again on the
    # CPU; run on the CPU as a device, it must give exactly what the default path gives.
    rng = np.random.default_rng(13)
    vectors = _pairs_with_copies(rng, 300, 1000, 0.8)
    labels = np.full(300, -1)
    labels[[0, 200]] = 5  # an exact pair: counted apart on both paths
    plain = similar_pairs(vectors, 0.5, exclude=labels, exact_limit=exact_limit, block=64)
    moved = similar_pairs(vectors, 0.5, exclude=labels, exact_limit=exact_limit, block=64, device="cpu")
    assert len(plain[0]) >= 95 and all(np.array_equal(a, b) for a, b in zip(plain, moved, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_similar_pairs_on_cuda_are_the_pairs_on_the_cpu() -> None:
    rng = np.random.default_rng(14)
    vectors = _pairs_with_copies(rng, 3000, 2304, 0.9)
    for exact_limit in (10_000, 1000):
        cpu = similar_pairs(vectors, 0.4, exact_limit=exact_limit)
        gpu = similar_pairs(vectors, 0.4, exact_limit=exact_limit, device="cuda")
        assert len(cpu[0]) >= 900 and all(np.array_equal(a, b) for a, b in zip(cpu, gpu, strict=True))


def test_hash_radius_is_off_in_a_homogeneous_study_and_full_in_a_heterogeneous_one() -> None:
    rng = np.random.default_rng(12)
    unrelated = random_hashes(rng, 200, 4)
    pairs = sample_pairs(200, rng)
    radius, median, _ = hash_radius(unrelated, pairs, max_radius=49, z=5.0)
    assert radius == 49 and 120 <= median <= 136
    # Look-alikes: each hash a few to 60 bits from a shared template, so pairs are 0-120 bits apart.
    bits = unpack_bits(np.repeat(unrelated[:1], 200, axis=0))
    for row in bits:
        row[rng.choice(256, size=int(rng.integers(2, 61)), replace=False)] ^= True
    radius, median, scale = hash_radius(pack_bits(bits), pairs, max_radius=49, z=5.0)
    assert radius == -1 and median - 5 * scale < 0
    assert hash_radius(pack_bits(bits), pairs, max_radius=49, z=0.5)[0] == int(np.floor(median - 0.5 * scale))


@dataclass
class Decoded:
    study: LookalikeStudy
    images: torch.Tensor
    rows: np.ndarray


def _decode_lookalike(root: Path, planted: bool) -> Decoded:
    study = generate_lookalike_study(root, planted=planted, n_patients=120, image_size=128, n_cross=2, n_within=1)
    splits = load_dataset(load_spec(study.spec_path), roles=("eval", "train")).splits
    images = torch.cat([splits["train"].images, splits["eval"].images])
    rows = np.concatenate([splits["train"].rows, splits["eval"].rows])
    return Decoded(study, images, rows)


@pytest.fixture(scope="module")
def lookalike(tmp_path_factory: pytest.TempPathFactory) -> Decoded:
    return _decode_lookalike(tmp_path_factory.mktemp("lookalike") / "study", planted=True)


@pytest.fixture(scope="module")
def lookalike_clean(tmp_path_factory: pytest.TempPathFactory) -> Decoded:
    return _decode_lookalike(tmp_path_factory.mktemp("lookalike_clean") / "study", planted=False)


def _near_rows(decoded: Decoded, images: torch.Tensor | None = None) -> set[tuple[int, int]]:
    """Near-duplicate row pairs the check's search finds (defaults, no embeddings)."""
    images = decoded.images if images is None else images
    defaults = LeakageCheck.Params()
    search = near_duplicate_search(
        images, perceptual_hash(images), pixel_digests(images), features=None, z=defaults.near_z,
        z_per_decade=defaults.near_z_per_decade, floor=defaults.near_min_similarity,
        components=defaults.near_components, max_radius=49, hash_z=defaults.near_hash_z, min_cosine=0.5,
        rng=np.random.default_rng(0),
    )  # fmt: skip
    assert search.confirmed.all()
    rows = np.concatenate([decoded.rows, np.arange(images.shape[0] - decoded.rows.size) + 10_000])
    return {(min(rows[a], rows[b]), max(rows[a], rows[b])) for a, b in zip(search.i, search.j, strict=True)}


def test_planted_copies_are_told_from_look_alike_patients(lookalike: Decoded) -> None:
    copies = lookalike.study.copies
    assert {c.kind for c in copies} == set(COPY_KINDS) and len(copies) == 30
    truth = {(min(c.original_row, c.copy_row), max(c.original_row, c.copy_row)): c.kind for c in copies}
    found = _near_rows(lookalike)
    precision, recall = precision_recall(found, set(truth))
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, found ^ set(truth))
    for kind in COPY_KINDS:  # every re-acquisition and re-processing step, alone and combined
        assert any(truth[pair] == kind for pair in found & set(truth)), kind


def test_look_alike_clean_twin_has_no_near_duplicate_though_its_hashes_are_close(lookalike_clean: Decoded) -> None:
    assert lookalike_clean.study.copies == ()
    assert _near_rows(lookalike_clean) == set()
    # What makes the study hard: different patients' global hashes lie within the old radius.
    hashes = perceptual_hash(lookalike_clean.images)
    assert hamming_pairs_within(hashes, 49)[0].size > 500


def test_a_group_of_copies_cannot_hide_in_the_principal_axes(lookalike_clean: Decoded) -> None:
    # Twelve re-noised copies of one image: unweighted, they would make themselves a principal
    # axis and project their shared detail away.
    rng = np.random.default_rng(13)
    group = lookalike_clean.images[:1].float().repeat(12, 1, 1, 1)
    group = (group + torch.from_numpy(rng.normal(0, 0.004, group.shape)).float()).clamp(0, 1)
    images = torch.cat([lookalike_clean.images.float(), group])
    found = _near_rows(lookalike_clean, images)
    members = [int(lookalike_clean.rows[0])] + [10_000 + k for k in range(12)]
    expected = {(a, b) for a in members for b in members if a < b}
    assert found == expected


def test_fingerprints_of_an_empty_or_tiny_set() -> None:
    assert fingerprints(torch.empty(0, 1, 64, 64)).vectors.shape == (0, 0)
    tiny = fingerprints(smooth_images(np.random.default_rng(14), 3, size=20))
    assert tiny.vectors.shape == (3, 48 * 48) and tiny.components == 0
    assert torch.allclose(tiny.vectors.norm(dim=1), torch.ones(3), atol=1e-4)


def test_warping_a_region_equals_slicing_the_whole_warped_frame() -> None:
    rng = np.random.default_rng(15)
    images = smooth_images(rng, 5, size=32)
    theta = torch.eye(2, 3).repeat(5, 1, 1) + torch.from_numpy(rng.normal(0, 0.05, (5, 2, 3))).float()
    whole = warp_affine(images, theta)
    assert torch.equal(warp_affine(images, theta, (2, 30)), whole[:, :, 2:30, 2:30])
    assert not torch.equal(warp_affine(images, theta, (2, 30)), whole[:, :, 3:31, 3:31])


def test_gradients_inside_a_margin_equal_those_of_the_whole_frame() -> None:
    images = smooth_images(np.random.default_rng(16), 3, size=32)
    whole_x, whole_y = _gradients(images)  # border replicated
    for margin in (1, 3):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[margin : 32 - margin, margin : 32 - margin] = True
        grad_x, grad_y = _gradients(images, margin)
        assert torch.equal(grad_x, whole_x[:, inside.reshape(-1)])
        assert torch.equal(grad_y, whole_y[:, inside.reshape(-1)])
    # A region of the frame (the centre and a one-pixel ring) keeps the frame's units.
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[3:29, 3:29] = True
    grad_x, _ = _gradients(images[:, :, 2:30, 2:30], 1, side=32)
    assert torch.equal(grad_x, whole_x[:, inside.reshape(-1)])
    assert not torch.equal(_gradients(images[:, :, 2:30, 2:30], 1)[0], grad_x)  # 28-pixel units


def test_fingerprints_do_not_depend_on_the_parts_threads_or_kept_registration_images(
    lookalike: Decoded, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = lookalike.images[:96]
    threads = torch.get_num_threads()
    monkeypatch.setattr(fingerprint, "_WORKERS", 1)  # one batch on the calling thread
    sequential = fingerprints(images)
    assert torch.get_num_threads() == threads  # registration and the fit ran on one thread
    monkeypatch.setattr(fingerprint, "_WORKERS", 4)
    monkeypatch.setattr(fingerprint, "_BATCH", 40)  # 13-image parts on three threads
    monkeypatch.setattr(fingerprint, "_KEEP_LIMIT", 0)  # fine-level images made again per part
    torch.set_num_threads(3)
    try:
        parallel = fingerprints(images)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert parallel.moved == sequential.moved == 96 and parallel.components == sequential.components
    assert torch.allclose(parallel.vectors, sequential.vectors, atol=1e-6)


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
    spec = load_spec(study.spec_path).model_copy(update={"checks": {"leakage": params or FAST}, "only": ["leakage"]})
    outcome = run_audit(spec, RunOptions(out_dir=out, report=False, pdf=False), checks={"leakage": LeakageCheck})
    (record,) = [r for r in outcome.results["checks"] if r["id"] == "leakage"]
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
    assert names == set(LeakageCheck.emits) - {"leakage.metadata_r2"}  # R^2: regression only
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

    findings = leaky.findings("near_duplicate", **match)
    for finding in findings:  # the evidence of each pair, strongest first
        assert finding["found_by"] and set(finding["found_by"]) <= {"fingerprint", "hash"}
        assert -1.0 <= finding["similarity"] <= 1.0 and 0 <= finding["hamming"] <= 256
    assert [f["similarity"] for f in findings] == sorted((f["similarity"] for f in findings), reverse=True)
    near = _near_pairs(findings, scope)
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
    assert search["hash_search"] == "exhaustive (every pair)"  # a small study: exact
    assert search["z"] == 8.0 and search["similarity_threshold"] >= 0.25 and search["pairs_measured"] > 1000


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
    result = LeakageCheck().run(ctx.for_check(LeakageCheck), LeakageCheck.Params(**params))
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
    spec = load_spec(spec_path).model_copy(update={"checks": {"leakage": {"n_boot": 0}}, "only": ["leakage"]})
    outcome = run_audit(spec, RunOptions(out_dir=tmp_path, report=False, pdf=False), checks={"leakage": LeakageCheck})
    (record,) = [r for r in outcome.results["checks"] if r["id"] == "leakage"]
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
    spec = load_spec(spec_path).model_copy(update={"checks": {"leakage": {"n_boot": 0}}, "only": ["leakage"]})
    outcome = run_audit(
        spec, RunOptions(out_dir=tmp_path / "out", report=False, pdf=False), checks={"leakage": LeakageCheck}
    )
    (record,) = [r for r in outcome.results["checks"] if r["id"] == "leakage"]
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
    assert (params.near_z, params.near_z_per_decade, params.near_min_similarity) == (8.0, 1.75, 0.25)
    assert (params.near_components, params.near_hash_z) == (64, 5.0)
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


# --------------------------------------------------------------------------------------------
# Other tasks: a continuous target's R^2, and multi-label studies


def test_out_of_fold_means_by_hand() -> None:
    codes = np.array([0, 0, 1, 1, 0, 1])
    targets = np.array([10.0, 14.0, 2.0, 4.0, 6.0, 0.0])
    folds = [(np.array([0, 1, 2, 3]), np.array([4, 5])), (np.array([2, 3, 4, 5]), np.array([0, 1]))]
    predictions = out_of_fold_means(codes, targets, folds, smoothing=1.0)
    # fold 1: fit mean 7.5; level 0 seen as (10, 14) -> (24 + 7.5) / 3, level 1 as (2, 4) -> (6 + 7.5) / 3.
    assert np.allclose(predictions[4:], [31.5 / 3, 13.5 / 3])
    # fold 2: fit mean 3; level 0 seen as (6,) -> (6 + 3) / 2.
    assert np.allclose(predictions[:2], [4.5, 4.5])
    assert np.isnan(predictions[[2, 3]]).all()  # in no test fold
    unseen = out_of_fold_means(np.array([0, 0, 1]), np.array([1.0, 3.0, 9.0]), [(np.array([0, 1]), np.array([2]))])
    assert unseen[2] == pytest.approx(2.0)  # a level the fit folds never saw: their mean


def test_group_fold_plan_keeps_patients_together_and_says_why_not() -> None:
    patients = [f"P{i // 3}" for i in range(60)]
    plan = group_fold_plan(60, groups=patients, folds=5, rng=np.random.default_rng(0))
    assert plan.k == 5 and plan.reason is None and plan.n == 60
    assert sorted(np.concatenate([t for _, t in plan.folds]).tolist()) == list(range(60))
    for fit, test in plan.folds:
        assert not {patients[i] for i in fit.tolist()} & {patients[i] for i in test.tolist()}
    assert group_fold_plan(6, groups=["A", "A", "B", "B", "C", "C"], folds=5, rng=np.random.default_rng(0)).k == 3
    single = group_fold_plan(4, groups=["A"] * 4, folds=5, rng=np.random.default_rng(0))
    assert single.folds == [] and single.reason == "fewer than 2 patients for 2 folds"
    assert group_fold_plan(8, groups=None, folds=5, rng=np.random.default_rng(0)).k == 5
    with pytest.raises(ValueError, match="3 patient surrogates for 4 images"):
        group_fold_plan(4, groups=["A", "B", "C"], folds=2, rng=np.random.default_rng(0))


def _r2(values: list[str | None], targets: np.ndarray, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"groups": None, "folds": 5, "n_boot": 0, "rng": np.random.default_rng(0)}
    options.update(kwargs)
    return metadata_r2(values, targets, **options)


def test_metadata_r2_equals_sklearn_on_level_means_computed_by_hand() -> None:
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(11)
    patients = [f"P{i // 2}" for i in range(300)]
    site = np.repeat(rng.integers(0, 4, 150), 2)
    targets = np.array([20.0, 35.0, 50.0, 80.0])[site] + rng.normal(0.0, 12.0, 300)
    values = [f"s{v}" for v in site]
    result = _r2(values, targets, groups=patients, n_boot=200)
    # The same folds by hand: GroupKFold with the seed metadata_r2 draws; level means by hand.
    seed = int(np.random.default_rng(0).integers(0, 2**31 - 1))
    folds = GroupKFold(5, shuffle=True, random_state=seed).split(np.zeros((300, 1)), groups=patients)
    predicted = np.empty(300)
    for fit, test in folds:
        mean = targets[fit].mean()
        for i in test:
            same = [j for j in fit if site[j] == site[i]]
            predicted[i] = (targets[same].sum() + mean) / (len(same) + 1.0)
    assert result.value == pytest.approx(r2_score(targets, predicted), abs=1e-12)
    assert 0.6 < result.value < 0.9 and result.folds == 5 and result.n == 300 and result.n_levels == 4
    assert result.ci is not None and result.ci[0] < result.value < result.ci[1] <= 1.0


def test_metadata_r2_extremes_and_undefined_cases() -> None:
    rng = np.random.default_rng(12)
    group = rng.integers(0, 3, 200)
    targets = group * 10.0
    assert _r2([f"g{v}" for v in group], targets).value > 0.999  # level means shrunk toward the fold mean
    noise = _r2([str(v) for v in rng.integers(0, 3, 200)], targets + rng.normal(0, 1, 200), n_boot=200)
    assert -0.1 < noise.value < 0.05 and noise.ci is not None and noise.ci[0] < 0.0
    assert _r2(["same"] * 200, targets).value == pytest.approx(0.0, abs=0.02)  # only the fold means
    constant = _r2(["a", "b"] * 5, np.full(10, 7.0))
    assert constant.value is None and constant.reason == "the target is constant (R^2 is undefined)"
    missing = _r2([None] * 10, np.arange(10.0))
    assert missing.value is None and missing.reason == "no image has a value"
    one_patient = _r2(["a", "b"] * 3, np.arange(6.0), groups=["P1"] * 6)
    assert one_patient.value is None and one_patient.reason == "fewer than 2 patients for 2 folds"
    with pytest.raises(ValueError, match="one finite number per image"):
        _r2(["a", "b"], np.array([1.0, np.nan]))
    # A patient ID predicts the target within a patient only: grouped folds give it nothing.
    patients = [f"P{i // 2}" for i in range(200)]
    per_patient = np.repeat(rng.normal(0, 1, 100), 2)
    assert _r2(patients, per_patient, groups=patients).value < 0.05
    assert _r2(patients, per_patient).value > 0.3


def _multilabel_split(rng: np.random.Generator, n: int, offset: int, planted: bool) -> dict[str, Any]:
    """Images of patients with two images each, three labels (label1 planted in 'site' when asked)
    and about 10% unknown entries."""
    labels = np.repeat((rng.random((n // 2, 3)) < 0.35).astype(np.int64), 2, axis=0)
    labels[rng.random((n, 3)) < 0.1] = -1
    agrees = rng.random(n) < 0.9
    site = np.where(agrees == (labels[:, 1] == 1), "A", "B") if planted else rng.choice(["A", "B"], n)
    return {
        "labels": labels,
        "probs": rng.uniform(0.05, 0.95, (n, 3)),
        "features": rng.normal(size=(n, 8)),
        "images": rng.random((n, 1, 32, 32)),
        "groups": {"site": site, "noise": rng.choice(["x", "y", "z"], n)},
        "patients": [f"P{offset + i // 2}" for i in range(n)],
    }


def _run_in_memory(task: str, eval_split: dict[str, Any], train: dict[str, Any], **kwargs: Any) -> Audited:
    split = dict(eval_split)
    ctx = make_context(split.pop("labels"), task=task, **split, train=train, check=LeakageCheck, **kwargs)
    params = LeakageCheck.Params(shortcut_columns=("site", "noise"), n_boot=100)
    result = LeakageCheck().run(ctx, params)
    return Audited(None, {"metrics": [m.to_json() for m in result.metrics], "findings": result.findings})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def multilabel_runs() -> dict[str, tuple[Audited, np.ndarray]]:
    runs = {}
    for planted in (True, False):
        rng = np.random.default_rng(21)
        train, test = _multilabel_split(rng, 120, 1000, planted), _multilabel_split(rng, 120, 0, planted)
        pooled = np.concatenate([train["labels"], test["labels"]])
        runs["planted" if planted else "clean"] = (_run_in_memory("multilabel", test, train), pooled)
    return runs


def test_multilabel_a_column_encoding_one_label_is_found_per_label(
    multilabel_runs: dict[str, tuple[Audited, np.ndarray]],
) -> None:
    audited, labels = multilabel_runs["planted"]
    assert "multilabel" in LeakageCheck.tasks
    per_label = {
        (m["labels"]["column"], m["labels"]["label"]): m
        for m in audited.record["metrics"]
        if m["name"] == "leakage.metadata_auc" and "label" in m["labels"]
    }
    assert set(per_label) == {(c, f"label{k}") for c in ("site", "noise") for k in range(3)}
    planted = per_label[("site", "label1")]
    assert planted["value"] > 0.85 and planted["ci"][0] > SHORTCUT_AUC_BOUND
    for (column, label), metric in per_label.items():
        known = int((labels[:, int(label[-1])] >= 0).sum())
        assert metric["n"] == known  # unknown entries are left out of their label
        if (column, label) != ("site", "label1"):
            assert 0.35 < metric["value"] < 0.65, (column, label)
    # The column-level value is the largest label's, with its interval: what LEAK-SHORTCUT judges.
    site = audited.metric("leakage.metadata_auc", column="site")
    assert (site["value"], site["ci"], site["n"]) == (planted["value"], planted["ci"], planted["n"])
    noise = audited.metric("leakage.metadata_auc", column="noise")
    assert noise["value"] == max(per_label[("noise", f"label{k}")]["value"] for k in range(3))
    (signal,) = audited.findings("metadata_signal", column="site")
    assert signal["label"] == "label1" and signal["auroc"] == planted["value"]
    (strongest,) = audited.findings("strongest_metadata_signal")
    assert (strongest["column"], strongest["label"]) == ("site", "label1")
    (unknown,) = audited.findings("unknown_label_entries")
    assert unknown["left_out"] == {f"label{k}": int((labels[:, k] < 0).sum()) for k in range(3)}
    assert {m["name"] for m in audited.record["metrics"]} == set(LeakageCheck.emits) - {"leakage.metadata_r2"}


def test_multilabel_shortcut_rule_warns_on_the_planted_column_only(
    multilabel_runs: dict[str, tuple[Audited, np.ndarray]],
) -> None:
    from auditkit.policy import evaluate
    from auditkit.testing import rules_for

    policy = rules_for("leakage")
    planted, _ = multilabel_runs["planted"]
    judged = evaluate(policy, [{"id": "leakage", "status": "ok", **planted.record}])
    (rule,) = [r for r in judged["rules"] if r["id"] == "LEAK-SHORTCUT"]
    assert rule["status"] == "warn" and rule["labels"] == {"column": "site"}
    clean, _ = multilabel_runs["clean"]
    assert all(m["value"] < SHORTCUT_AUC_BOUND for m in clean.record["metrics"] if m["name"] == "leakage.metadata_auc")
    judged = evaluate(policy, [{"id": "leakage", "status": "ok", **clean.record}])
    (rule,) = [r for r in judged["rules"] if r["id"] == "LEAK-SHORTCUT"]
    assert rule["status"] == "pass"


def test_multilabel_a_label_with_every_entry_unknown_is_undefined_with_the_reason() -> None:
    rng = np.random.default_rng(3)
    train, test = _multilabel_split(rng, 40, 1000, True), _multilabel_split(rng, 40, 0, True)
    for split in (train, test):
        split["labels"][:, 2] = -1
    audited = _run_in_memory("multilabel", test, train)
    metric = audited.metric("leakage.metadata_auc", column="site", label="label2")
    assert metric["value"] is None and metric["reason"] == "every entry of this label is unknown"
    assert audited.metric("leakage.metadata_auc", column="site")["value"] is not None


def _regression_split(rng: np.random.Generator, n: int, offset: int, planted: bool) -> dict[str, Any]:
    site = np.repeat(rng.choice(["A", "B", "C"], n // 2), 2)
    centre = np.array([{"A": 100.0, "B": 140.0, "C": 180.0}[s] for s in site]) if planted else 140.0
    age = centre + rng.normal(0.0, 25.0, n)
    size = rng.normal(50.0, 10.0, n)
    return {
        "labels": np.c_[age, size],
        "probs": np.c_[age + rng.normal(0, 5, n), size],
        "features": rng.normal(size=(n, 8)),
        "images": rng.random((n, 1, 32, 32)),
        "groups": {"site": site, "noise": rng.choice(["x", "y", "z"], n)},
        "patients": [f"P{offset + i // 2}" for i in range(n)],
    }


@pytest.mark.parametrize("planted", [True, False])
def test_regression_a_column_encoding_the_target_has_a_high_r2(planted: bool) -> None:
    assert "regression" in LeakageCheck.tasks
    rng = np.random.default_rng(31)
    train, test = _regression_split(rng, 120, 1000, planted), _regression_split(rng, 120, 0, planted)
    audited = _run_in_memory("regression", test, train, classes=["bone_age", "size"])
    names = {m["name"] for m in audited.record["metrics"]}
    assert names == set(LeakageCheck.emits) - {"leakage.metadata_auc"}
    r2 = {
        (m["labels"]["column"], m["labels"]["output"]): m
        for m in audited.record["metrics"]
        if m["name"] == "leakage.metadata_r2"
    }
    assert set(r2) == {(c, o) for c in ("site", "noise") for o in ("bone_age", "size")}
    assert all(m["n"] == 240 and m["direction"] == "lower_is_better" for m in r2.values())
    for key, metric in r2.items():
        if planted and key == ("site", "bone_age"):
            assert metric["value"] > 0.5 and metric["ci"][0] > 0.3
        else:
            assert metric["value"] < 0.1, key
    (strongest,) = audited.findings("strongest_metadata_signal")
    if planted:
        assert (strongest["column"], strongest["output"]) == ("site", "bone_age")
    (signal,) = audited.findings("metadata_signal", column="site")
    assert signal["r2"] == {"bone_age": r2[("site", "bone_age")]["value"], "size": r2[("site", "size")]["value"]}


def test_the_demo_study_passes_leak_near_unrelated_patients_are_not_near_duplicates(demo_context: AuditContext) -> None:
    """The packaged demo draws each patient's anatomy, positioning, exposure and scanner noise: no
    image pair across the splits is a near-duplicate (the leaky fixture above still fails LEAK-NEAR)."""
    from auditkit.policy import evaluate
    from auditkit.testing import rules_for

    audited = _run(demo_context, n_boot=20)
    assert audited.metric("leakage.near_duplicates")["value"] == 0
    assert audited.metric("leakage.patient_overlap")["value"] == 0
    judged = evaluate(rules_for("leakage"), [{"id": "leakage", "status": "ok", **audited.record}])
    status = {r["id"]: r["status"] for r in judged["rules"]}
    assert status["LEAK-NEAR"] == status["LEAK-PATIENT"] == status["LEAK-EXACT"] == "pass"
