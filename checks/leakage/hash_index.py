"""A sub-quadratic Hamming search: bit-sampling tables (Indyk and Motwani, STOC 1998) with
multi-probe lookups (Lv, Josephson, Wang, Charikar and Li, VLDB 2007).

The exhaustive search (:func:`.hashing.hamming_pairs`) compares every pair: ``n^2`` XORs, which at
a million images per split is hours. Here each of ``L`` tables keys every hash by ``k`` of its ``B``
bits drawn at random. With ``probes = 0`` a query looks in its own bucket: two hashes at Hamming
distance ``d`` share a table's key when none of the ``k`` bits differs, probability
``C(B - d, k) / C(B, k)``. With ``probes = 1`` it also looks in the ``k`` buckets whose key differs
from its own in one bit: the pair is found when at most one of the ``k`` bits differs. A pair
within the radius ``r`` is found by at least one table with probability at least
``1 - (1 - p_r)^L``; every candidate is measured exactly and kept when within the radius, so the
result is the exhaustive one less the pairs no table brought together - never a pair outside it.

:func:`plan_index` sets ``L`` so that a pair *at* the radius is found with probability ``recall``
(0.995 by default; nearer pairs more often) and picks ``k`` and ``probes`` to minimise the
estimated work: ``L`` tables of ``n`` keys, the probes, and the candidates, whose number follows
from the distances of a sample of the study's own pairs (a homogeneous study, whose hashes are
close, gets longer keys). The work grows as ``n^(1 + rho)``, ``rho = ln p_r / ln p_0`` for the
typical pair distance ``d0``: for 256-bit hashes of unrelated images (``d0`` = 128) at the default
radius of 49 bits, ``rho`` = 0.30 without probing (``4n`` costs 4^1.30 = 6.1 times ``n``) and 0.23
with one-bit probes (5.5 times), where the exhaustive search costs 16 times. When the exhaustive
search is estimated cheaper, or the study is small (:data:`AUTO_MIN_PAIRS`), ``auto`` keeps it.

A table's keys are built byte by byte through 256-entry lookups (:func:`_tables`) and sorted by
stable 16-bit radix passes; a query's probes test a bitmap of the occupied keys (``2^k`` bits, in
cache) before any bucket is read; the candidates are generated and measured in bounded chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from .hashing import HashArray, Pairs, hamming_distance, hamming_pairs, hamming_pairs_within

__all__ = [
    "AUTO_MIN_PAIRS",
    "HashIndex",
    "IndexPlan",
    "hamming_search",
    "hamming_search_within",
    "index_pairs",
    "index_pairs_within",
    "plan_index",
]

HashIndex = Literal["auto", "exhaustive", "index"]

# Work per unit, in nanoseconds on this project's 2-core CPU (measured; only their ratios matter).
_NS_PER_EXHAUSTIVE_WORD_PAIR = 2.0  # XOR + population count of one 64-bit word pair, tiled
_NS_PER_KEY = 40.0  # one hash keyed, bucketed and looked up, per table
_NS_PER_PROBE = 6.0  # one query looked up in one neighbouring bucket
_NS_PER_BUCKET = 2.0  # one slot of a table's 2^k counts
_NS_PER_CANDIDATE = 150.0  # one candidate pair generated and measured
_MAX_KEY_BITS = 24  # 2^24 buckets per table at most (their int32 starts and counts: 128 MiB)
_SAMPLE_PAIRS = 4096
_CHUNK_PAIRS = 1 << 22  # candidates measured at a time
_PROBE_ELEMENTS = 1 << 21  # query x probe lookups at a time
AUTO_MIN_PAIRS = 50_000_000
"""``auto`` stays exhaustive (exact) below this many pairs (about 10,000 images searched within one
set: well under a second exhaustively)."""


@dataclass(frozen=True)
class IndexPlan:
    """How a bit-sampling search runs.

    Attributes:
        bits_per_key: ``k``, bits sampled per table key.
        tables: ``L``, tables.
        probes: 0: a query looks in its own bucket; 1: also in the ``k`` buckets whose key differs
            from its own in one bit (multi-probe, Lv et al., VLDB 2007), so a pair is found when
            at most one of a table's bits differs; ``p``: every key at most ``p`` bits away
            (:func:`plan_index` chooses 0 or 1).
        recall_at_radius: the probability that a pair at the radius shares a key (planned).
        expected_candidates: candidate pairs estimated from the study's sampled distances.
        speedup: the exhaustive search's estimated work over the index's.
    """

    bits_per_key: int
    tables: int
    probes: int
    recall_at_radius: float
    expected_candidates: float
    speedup: float

    def describe(self) -> str:
        probing = ", each query probing the buckets one bit away" if self.probes else ""
        return (
            f"bit-sampling index: {self.tables} tables of {self.bits_per_key}-bit keys{probing}"
            f" (a pair at the radius found with probability {self.recall_at_radius:.4f})"
        )


def plan_index(
    radius: int,
    bits: int,
    n_queries: int,
    n_references: int,
    sample_distances: NDArray[np.integer],
    *,
    recall: float = 0.995,
    within: bool = False,
) -> IndexPlan:
    """The cheapest ``(k, L)`` reaching ``recall`` at ``radius`` for this study's distances.

    Args:
        radius: Hamming radius (inclusive), ``0 <= radius < bits``.
        bits: hash length ``B``.
        n_queries, n_references: hashes on each side (the same set twice when ``within``).
        sample_distances: Hamming distances of random pairs of the study (the candidates'
            estimate; the more alike the study, the longer the keys).
        recall: probability of finding a pair at the radius, in (0, 1).
        within: one set searched against itself (pairs counted once).

    Raises:
        ValueError: a radius outside ``[0, bits)`` or a recall outside (0, 1).
    """
    if not 0 <= radius < bits:
        raise ValueError(f"radius must be in [0, {bits}), got {radius}")
    if not 0.0 < recall < 1.0:
        raise ValueError(f"recall must be in (0, 1), got {recall}")
    distances = np.asarray(sample_distances, dtype=np.float64)
    pairs = n_queries * (n_queries - 1) / 2 if within else float(n_queries) * n_references
    keyed = n_queries if within else n_queries + n_references
    exhaustive = pairs * _NS_PER_EXHAUSTIVE_WORD_PAIR * math.ceil(bits / 64)
    from scipy.stats import hypergeom

    values, counts = np.unique(distances, return_counts=True)  # at most bits + 1 distinct distances
    weights = counts / max(1, distances.size)
    best: IndexPlan | None = None
    best_cost = math.inf
    for probes in (0, 1):  # two-bit probes measured slower at 25,000-100,000 hashes (C(k, 2) lookups)
        for k in range(4, _MAX_KEY_BITS + 1):
            # a table holds a pair when at most `probes` of its k bits (drawn without replacement)
            # are among the pair's differing ones
            hit = float(hypergeom.cdf(probes, bits, radius, k))
            tables = 1 if hit >= 1.0 else math.ceil(math.log1p(-recall) / math.log1p(-hit))
            collide = float(hypergeom.cdf(probes, bits, values, k) @ weights) if distances.size else 2.0**-k
            candidates = tables * pairs * collide
            flips = sum(math.comb(k, flipped) for flipped in range(1, probes + 1))
            per_table = keyed * _NS_PER_KEY + (1 << k) * _NS_PER_BUCKET + flips * n_queries * _NS_PER_PROBE
            cost = tables * per_table + candidates * _NS_PER_CANDIDATE
            if cost < best_cost:
                best_cost = cost
                planned = 1.0 - (1.0 - hit) ** tables
                best = IndexPlan(k, tables, probes, planned, candidates, exhaustive / cost)
    assert best is not None
    return best


def _tables(hashes: NDArray[np.uint64], plan: IndexPlan, rng: np.random.Generator) -> Iterator[NDArray[np.uint32]]:
    """Each table's keys: ``plan.tables`` arrays of ``(n,)`` ``uint32``, each of ``k`` random bits.

    The hashes are read as byte planes (``(bytes, n)``, no larger than the hashes); a table's key
    ORs, for each byte holding some of its bits, a 256-entry lookup of that byte (the byte's
    sampled bits moved to their places in the key): one gather per byte touched.
    """
    planes = np.ascontiguousarray(np.asarray(hashes).view(np.uint8).T)  # bit p: bit p % 8 of byte p // 8
    values = np.arange(256, dtype=np.uint32)
    for _ in range(plan.tables):
        positions = rng.choice(planes.shape[0] * 8, size=plan.bits_per_key, replace=False)
        key = np.zeros(planes.shape[1], dtype=np.uint32)
        for byte in np.unique(positions // 8).tolist():
            lookup = np.zeros(256, dtype=np.uint32)
            for slot in np.flatnonzero(positions // 8 == byte).tolist():
                lookup |= ((values >> np.uint32(positions[slot] % 8)) & np.uint32(1)) << np.uint32(slot)
            key |= lookup[planes[byte]]
        yield key


def _bucket(
    keys: NDArray[np.uint32], k: int
) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.int32], NDArray[np.uint8]]:
    """``(order, starts, counts, occupied)``: positions sorted by key (stable radix passes), each
    key's first slot and size (``int32`` of ``2^k``), and a bitmap of the non-empty keys
    (``2^k / 8`` bytes, so probes test it in cache)."""
    order = np.argsort((keys & np.uint32(0xFFFF)).astype(np.uint16), kind="stable")
    if k > 16:
        order = order[np.argsort((keys[order] >> np.uint32(16)).astype(np.uint16), kind="stable")]
    ranked = keys[order]
    first = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if ranked.size else np.zeros(0, dtype=np.int64)
    present = ranked[first]
    starts = np.zeros(1 << k, dtype=np.int32)
    counts = np.zeros(1 << k, dtype=np.int32)
    starts[present] = first
    counts[present] = np.diff(np.r_[first, ranked.size])
    occupied = np.zeros(1 << k, dtype=bool)
    occupied[present] = True
    return order.astype(np.int64), starts, counts, np.packbits(occupied, bitorder="little")


def _occupied(occupied: NDArray[np.uint8], keys: NDArray[np.uint32]) -> NDArray[np.bool_]:
    """Whether each key's bucket holds a hash (bit ``key % 8`` of byte ``key // 8``)."""
    bits: NDArray[np.uint8] = (occupied[keys >> np.uint32(3)] >> (keys & np.uint32(7)).astype(np.uint8)) & np.uint8(1)
    return bits.astype(bool)


def _probed(
    keys: NDArray[np.uint32], plan: IndexPlan, occupied: NDArray[np.uint8], *, upward: bool = False
) -> Iterator[tuple[NDArray[np.int64], NDArray[np.uint32]]]:
    """``(row, key)`` for every query row and probed key whose bucket is not empty, by chunks.

    ``upward`` (one set searched against itself) probes only keys above the row's own, so each
    pair of buckets is joined once; the row's own bucket is then left to the caller.
    """
    flips = _flips(plan)[1:] if upward else _flips(plan)
    if not flips.size:
        return
    step = max(1024, _PROBE_ELEMENTS // flips.size)
    for start in range(0, keys.size, step):
        own = keys[start : start + step, None]
        probes = own ^ flips[None, :]
        hit = _occupied(occupied, probes)
        if upward:
            hit &= probes > own
        row, column = np.nonzero(hit)
        yield row.astype(np.int64) + start, probes[row, column]


def _expand(counts: NDArray[np.int64]) -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """For rows with ``counts[i]`` partners: ``(row, rank)`` of every partner, in bounded chunks."""
    rows = np.flatnonzero(counts)
    if not rows.size:
        return
    per = counts[rows]
    ends = np.cumsum(per)
    start = 0
    while start < rows.size:
        # rows[start:stop] hold at most _CHUNK_PAIRS partners (at least one row)
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _CHUNK_PAIRS, side="right")))
        chunk, sizes = rows[start:stop], per[start:stop]
        total = int(sizes.sum())
        row = np.repeat(chunk, sizes)
        rank = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        yield row, rank
        start = stop


def _flips(plan: IndexPlan) -> NDArray[np.uint32]:
    """The key differences a query probes: 0 (its own bucket), then every key ``plan.probes`` bits away or fewer."""
    from itertools import combinations

    flips = [0] + [
        sum(1 << bit for bit in chosen)
        for flipped in range(1, plan.probes + 1)
        for chosen in combinations(range(plan.bits_per_key), flipped)
    ]
    return np.array(flips, dtype=np.uint32)


def _sampled_distances(
    first: HashArray, second: HashArray, rng: np.random.Generator, within: bool
) -> NDArray[np.int64]:
    i = rng.integers(0, first.shape[0], _SAMPLE_PAIRS)
    j = rng.integers(0, second.shape[0], _SAMPLE_PAIRS)
    keep = i != j if within else np.ones(i.size, dtype=bool)
    return hamming_distance(first[i[keep]], second[j[keep]])


def _validated(hashes: HashArray, name: str) -> NDArray[np.uint64]:
    array = np.asarray(hashes)
    if array.ndim != 2 or array.dtype != np.uint64:
        raise ValueError(f"{name} must be a (N, W) uint64 array, got {array.dtype} {array.shape}")
    return array


def _sorted(found: list[NDArray[np.int64]], width: int, first: HashArray, second: HashArray) -> Pairs:
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    i, j = codes // width, codes % width
    return i, j, hamming_distance(first[i], second[j])


def index_pairs(
    queries: HashArray,
    references: HashArray,
    radius: int,
    *,
    recall: float = 0.995,
    rng: np.random.Generator,
    plan: IndexPlan | None = None,
) -> tuple[Pairs, IndexPlan]:
    """Pairs ``(i, j)`` with ``hamming(queries[i], references[j]) <= radius``, by bit-sampling tables.

    Returns:
        ``((i, j, distance), plan)``, sorted by ``i`` then ``j``: a subset of
        :func:`.hashing.hamming_pairs`'s result (each of its pairs present with probability at
        least ``plan.recall_at_radius``).

    Raises:
        ValueError: bad shapes, different word counts, or a radius or recall out of range.
    """
    q, r = _validated(queries, "queries"), _validated(references, "references")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} words per hash, references {r.shape[1]}")
    bits = q.shape[1] * 64
    if plan is None:
        plan = plan_index(radius, bits, q.shape[0], r.shape[0], _sampled_distances(q, r, rng, False), recall=recall)
    found: list[NDArray[np.int64]] = []
    both = np.concatenate([q, r])  # each table samples the same bits of both sides
    for keys in _tables(both, plan, rng):
        q_keys, r_keys = keys[: q.shape[0]], keys[q.shape[0] :]
        order, starts, counts, occupied = _bucket(r_keys, plan.bits_per_key)
        for rows, probes in _probed(q_keys, plan, occupied):
            for at, rank in _expand(counts[probes].astype(np.int64)):
                row, column = rows[at], order[starts[probes[at]] + rank]
                keep = hamming_distance(q[row], r[column]) <= radius
                found.append(row[keep] * r.shape[0] + column[keep])
    return _sorted(found, r.shape[0], q, r), plan


def index_pairs_within(
    hashes: HashArray,
    radius: int,
    *,
    recall: float = 0.995,
    rng: np.random.Generator,
    plan: IndexPlan | None = None,
) -> tuple[Pairs, IndexPlan]:
    """Pairs ``i < j`` of one set within ``radius``, by bit-sampling tables (see :func:`index_pairs`)."""
    h = _validated(hashes, "hashes")
    n, bits = h.shape[0], h.shape[1] * 64
    if plan is None:
        plan = plan_index(radius, bits, n, n, _sampled_distances(h, h, rng, True), recall=recall, within=True)
    found: list[NDArray[np.int64]] = []
    for keys in _tables(h, plan, rng):
        order, starts, counts, occupied = _bucket(keys, plan.bits_per_key)
        # The partners of the item at sorted slot s are the later slots of its bucket ...
        sorted_keys = keys[order]
        later = starts[sorted_keys].astype(np.int64) + counts[sorted_keys] - np.arange(n) - 1
        pairs = [(order[slot], order[slot + 1 + rank]) for slot, rank in _expand(later)]
        # ... and, when probing, every item of the buckets one bit above its key.
        for rows, probes in _probed(keys, plan, occupied, upward=True):
            pairs += [
                (rows[at], order[starts[probes[at]] + rank]) for at, rank in _expand(counts[probes].astype(np.int64))
            ]
        for a, b in pairs:
            keep = hamming_distance(h[a], h[b]) <= radius
            low, high = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
            found.append(low * n + high)
    return _sorted(found, n, h, h), plan


def hamming_search(
    queries: HashArray,
    references: HashArray,
    radius: int,
    *,
    index: HashIndex = "auto",
    recall: float = 0.995,
    rng: np.random.Generator,
) -> tuple[Pairs, IndexPlan | None]:
    """:func:`.hashing.hamming_pairs` or :func:`index_pairs`.

    ``auto`` indexes from :data:`AUTO_MIN_PAIRS` pairs on, when the plan estimates the index
    cheaper. The plan is ``None`` when the search was exhaustive (exact).
    """
    q, r = _validated(queries, "queries"), _validated(references, "references")
    if index == "exhaustive" or (index == "auto" and q.shape[0] * r.shape[0] < AUTO_MIN_PAIRS):
        return hamming_pairs(q, r, radius), None
    sample = _sampled_distances(q, r, rng, False)
    plan = plan_index(radius, q.shape[1] * 64, q.shape[0], r.shape[0], sample, recall=recall)
    if index == "auto" and plan.speedup <= 1.0:
        return hamming_pairs(q, r, radius), None
    return index_pairs(q, r, radius, rng=rng, plan=plan)


def hamming_search_within(
    hashes: HashArray,
    radius: int,
    *,
    index: HashIndex = "auto",
    recall: float = 0.995,
    rng: np.random.Generator,
) -> tuple[Pairs, IndexPlan | None]:
    """:func:`.hashing.hamming_pairs_within` or :func:`index_pairs_within` (see :func:`hamming_search`)."""
    h = _validated(hashes, "hashes")
    n = h.shape[0]
    if index == "exhaustive" or n < 2 or (index == "auto" and n * (n - 1) // 2 < AUTO_MIN_PAIRS):
        return hamming_pairs_within(h, radius), None
    sample = _sampled_distances(h, h, rng, True)
    plan = plan_index(radius, h.shape[1] * 64, n, n, sample, recall=recall, within=True)
    if index == "auto" and plan.speedup <= 1.0:
        return hamming_pairs_within(h, radius), None
    return index_pairs_within(h, radius, rng=rng, plan=plan)
