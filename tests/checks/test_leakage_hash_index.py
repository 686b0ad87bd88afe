"""The bit-sampling index of the perceptual-hash search, held to the exhaustive search."""

from __future__ import annotations

import numpy as np
import pytest

from auditkit.checks.leakage.hash_index import (
    AUTO_MIN_PAIRS,
    IndexPlan,
    hamming_search,
    hamming_search_within,
    index_pairs,
    index_pairs_within,
    plan_index,
)
from auditkit.checks.leakage.hashing import hamming_pairs, hamming_pairs_within, pack_bits, unpack_bits

RADIUS = 49


def random_hashes(rng: np.random.Generator, n: int, words: int = 4) -> np.ndarray:
    return rng.integers(0, 2**64, size=(n, words), dtype=np.uint64, endpoint=False)


def flipped(rng: np.random.Generator, hashes: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Copies of ``hashes`` with ``flips[i]`` distinct bits of row ``i`` flipped."""
    bits = unpack_bits(hashes)
    for row, count in zip(bits, flips, strict=True):
        row[rng.choice(bits.shape[1], size=int(count), replace=False)] ^= True
    return pack_bits(bits)


def as_set(i: np.ndarray, j: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(i.tolist(), j.tolist(), strict=True))


def test_the_index_finds_the_exhaustive_pairs_and_nothing_outside_the_radius() -> None:
    rng = np.random.default_rng(0)
    train, test = random_hashes(rng, 3000), random_hashes(rng, 3000)
    test[:300] = flipped(rng, train[:300], rng.integers(0, RADIUS + 1, 300))
    (i, j, d), plan = index_pairs(test, train, RADIUS, rng=np.random.default_rng(1))
    ei, ej, _ = hamming_pairs(test, train, RADIUS)
    truth, found = as_set(ei, ej), as_set(i, j)
    assert found <= truth and (d <= RADIUS).all()
    assert len(found & truth) / len(truth) >= 0.99
    assert plan.recall_at_radius >= 0.995 and plan.tables > 1
    assert list(zip(i, j, strict=True)) == sorted(zip(i, j, strict=True))  # sorted by i, then j
    np.testing.assert_array_equal(d, np.bitwise_count(test[i] ^ train[j]).sum(axis=1))


def test_pairs_exactly_at_the_radius_are_found_as_often_as_planned() -> None:
    rng = np.random.default_rng(2)
    train = random_hashes(rng, 2000)
    test = flipped(rng, train[:500], np.full(500, RADIUS))
    (i, j, _), plan = index_pairs(test, train, RADIUS, rng=np.random.default_rng(3))
    found = int(np.count_nonzero(i == j))
    # each pair at the radius is found with probability plan.recall_at_radius (0.995): 2.5 misses
    # expected of 500; 10 or more has probability below 1e-4
    assert found >= 490, (found, plan)


def test_the_index_within_one_set_matches_the_exhaustive_search() -> None:
    rng = np.random.default_rng(4)
    base = random_hashes(rng, 2500)
    pooled = np.concatenate([base, flipped(rng, base[:250], rng.integers(0, RADIUS + 1, 250))])
    (i, j, d), _ = index_pairs_within(pooled, RADIUS, rng=np.random.default_rng(5))
    ei, ej, _ = hamming_pairs_within(pooled, RADIUS)
    truth, found = as_set(ei, ej), as_set(i, j)
    assert (i < j).all() and len(found) == i.size  # each pair once, first index lower
    assert found <= truth and len(found & truth) / len(truth) >= 0.99
    assert (d <= RADIUS).all()


@pytest.mark.parametrize(("bits_per_key", "probes"), [(12, 0), (16, 1), (18, 2)])
def test_every_probe_depth_matches_the_exhaustive_search(bits_per_key: int, probes: int) -> None:
    from scipy.stats import hypergeom

    rng = np.random.default_rng(12)
    base = random_hashes(rng, 1500)
    pooled = np.concatenate([base, flipped(rng, base[:150], rng.integers(0, RADIUS + 1, 150))])
    hit = float(hypergeom.cdf(probes, 256, RADIUS, bits_per_key))
    tables = int(np.ceil(np.log(0.005) / np.log1p(-hit)))
    plan = IndexPlan(bits_per_key, tables, probes, 0.995, 0.0, 1.0)
    ei, ej, _ = hamming_pairs_within(pooled, RADIUS)
    (i, j, _), _ = index_pairs_within(pooled, RADIUS, rng=np.random.default_rng(13), plan=plan)
    truth, found = as_set(ei, ej), as_set(i, j)
    assert found <= truth and len(found) == i.size and len(found & truth) / len(truth) >= 0.99
    (a, b, _), _ = index_pairs(pooled[1500:], pooled[:1500], RADIUS, rng=np.random.default_rng(14), plan=plan)
    across = as_set(*hamming_pairs(pooled[1500:], pooled[:1500], RADIUS)[:2])
    assert as_set(a, b) <= across and len(as_set(a, b) & across) / len(across) >= 0.99


def test_a_bucket_larger_than_a_chunk_is_searched_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Identical hashes share every key: one bucket holding all of them, expanded in chunks.
    import auditkit.checks.leakage.hash_index as hash_index

    monkeypatch.setattr(hash_index, "_CHUNK_PAIRS", 97)
    rng = np.random.default_rng(6)
    same = np.repeat(random_hashes(rng, 1), 60, axis=0)
    (i, _j, _), _ = index_pairs_within(same, 3, rng=np.random.default_rng(7))
    assert i.size == 60 * 59 // 2
    (a, _b, _), _ = index_pairs(same[:30], same[30:], 3, rng=np.random.default_rng(8))
    assert a.size == 30 * 30


def test_a_homogeneous_study_gets_longer_keys() -> None:
    unrelated = np.full(1000, 128)
    alike = np.full(1000, 80)  # different patients' hashes close together
    loose = plan_index(RADIUS, 256, 100_000, 100_000, unrelated)
    tight = plan_index(RADIUS, 256, 100_000, 100_000, alike)
    assert tight.bits_per_key > loose.bits_per_key and tight.tables > loose.tables
    assert loose.speedup > 1


def test_auto_stays_exhaustive_and_exact_on_small_studies() -> None:
    rng = np.random.default_rng(9)
    hashes = random_hashes(rng, 500)
    hashes[1] = hashes[0]
    hashes[1, 0] ^= np.uint64(7)  # three bits of the first word
    assert AUTO_MIN_PAIRS > 500 * 499 // 2
    (i, j, d), plan = hamming_search_within(hashes, RADIUS, rng=rng)
    assert plan is None and as_set(i, j) == {(0, 1)} and d.tolist() == [3]
    (i, j, _), plan = hamming_search(hashes[:10], hashes, RADIUS, rng=rng)
    assert plan is None
    (_, _, _), plan = hamming_search_within(hashes, RADIUS, index="index", rng=rng)
    assert plan is not None and "tables" in plan.describe()


def test_the_index_validates_its_input() -> None:
    rng = np.random.default_rng(10)
    hashes = random_hashes(rng, 20)
    with pytest.raises(ValueError, match="radius must be in"):
        plan_index(256, 256, 10, 10, np.full(10, 128))
    with pytest.raises(ValueError, match="recall must be in"):
        plan_index(10, 256, 10, 10, np.full(10, 128), recall=1.0)
    with pytest.raises(ValueError, match=r"\(N, W\) uint64"):
        index_pairs_within(hashes.astype(np.int64), 5, rng=rng)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="words per hash"):
        index_pairs(hashes, hashes[:, :2], 5, rng=rng)


def test_the_near_duplicate_search_finds_the_same_copies_through_the_index() -> None:
    import torch

    from auditkit.checks.leakage import LeakageCheck
    from auditkit.checks.leakage.duplicates import near_duplicate_search
    from auditkit.checks.leakage.hashing import perceptual_hash, pixel_digests

    # A heterogeneous study (smooth random images) with re-noised copies: the hash search is on.
    generator = torch.Generator().manual_seed(11)
    coarse = torch.rand(400, 1, 6, 6, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False)
    images[360:] = images[:40] + 0.01 * torch.randn(40, 1, 64, 64, generator=generator)
    images = images.clamp(0, 1).half()
    p = LeakageCheck.Params()
    found = {}
    for index in ("exhaustive", "index"):
        search = near_duplicate_search(
            images, perceptual_hash(images), pixel_digests(images), features=None, z=p.near_z,
            z_per_decade=p.near_z_per_decade, floor=p.near_min_similarity, components=p.near_components,
            max_radius=49, hash_z=p.near_hash_z, min_cosine=p.near_min_cosine, rng=np.random.default_rng(0),
            hash_index=index,  # type: ignore[arg-type]
        )  # fmt: skip
        assert search.radius >= 0
        found[index] = {(int(a), int(b)) for a, b, h in zip(search.i, search.j, search.by_hash, strict=True) if h}
        assert (search.hash_plan is None) == (index == "exhaustive")
    assert len({(k, 360 + k) for k in range(40)} & found["exhaustive"]) >= 36
    assert found["index"] == found["exhaustive"]
