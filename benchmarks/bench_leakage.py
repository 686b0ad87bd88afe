"""Benchmark of the leakage check's near-duplicate searches at ``n`` and ``4n`` images per split.

Three measurements, each on synthetic stand-ins (the decoding and the shared pass are timed by
``bench_shared_pass``):

* **Hamming search** (the perceptual-hash search, the previous detector's only search and still
  the check's search in a heterogeneous study): ``n`` eval against ``n`` train 256-bit hashes,
  a tenth of eval planted as copies of train hashes with 2 to 40 bits flipped, at the default
  radius (0.195 x 256 = 49 bits), by the check's own
  :func:`auditkit.checks.leakage.hashing.hamming_pairs` (exhaustive XOR and population count in
  bounded tiles). Quadratic: the time should grow about 16-fold from ``n`` to ``4n``.
* **Hash search by the bit-sampling index** (:mod:`auditkit.checks.leakage.hash_index`, the
  check's ``near_hash_index: auto`` at these sizes) on the same hashes: the median of three runs,
  its recall of the planted pairs and of the exhaustive search's result, and its growth from ``n``
  to ``4n`` (target at most x6).
* **Fingerprint search** (:func:`auditkit.checks.leakage.fingerprint.similar_pairs`): the
  ``2n`` fingerprints of both splits pooled (train-eval and within-split pairs in one search),
  2,304-dimensional unit vectors whose pairwise similarities spread like a homogeneous study's
  (robust standard deviation ~0.06), a hundredth planted as copies (similarity ~0.8), at the
  bound such a study calibrates (0.45). Above 8,192 images it runs on a 384-dimensional random
  sketch and measures the candidates exactly. Quadratic too.
* **Fingerprinting** (:func:`auditkit.checks.leakage.fingerprint.fingerprints`: registration to
  the study template, ranks, band pass, projection) of 2,048 smooth random 64 x 64 images, as
  images per second; linear in the number of images.

Planted pairs must all be found (recall is printed), so the timings are of correct searches.

Run: ``make bench`` / ``python -m benchmarks bench_leakage`` (or this module directly).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from auditkit.checks.leakage.fingerprint import fingerprints, similar_pairs
from auditkit.checks.leakage.hash_index import index_pairs
from auditkit.checks.leakage.hashing import hamming_pairs, pack_bits, unpack_bits

BITS = 256
RADIUS = int(0.195 * BITS)
# n and 4n images per split. 12,500 -> 50,000 shows the quadratic growth; the fingerprint search
# of 100,000 pooled images takes about two minutes on two cores. `python -m
# benchmarks.bench_leakage 100000` runs n = 25,000 and 100,000.
SIZES = (12_500, 50_000)
SEED = 0
FINGERPRINT_DIMENSION = 48 * 48
SIMILARITY_BOUND = 0.45
FINGERPRINTED_IMAGES = 2048
INDEX_REPEATS = 3


def synthetic_hashes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train, eval, planted)``: two ``(n, 4)`` uint64 hash sets, a tenth of eval planted."""
    words = BITS // 64
    train = rng.integers(0, 2**64, size=(n, words), dtype=np.uint64, endpoint=False)
    test = rng.integers(0, 2**64, size=(n, words), dtype=np.uint64, endpoint=False)
    planted = n // 10
    bits = unpack_bits(train[:planted])
    flips = rng.integers(2, RADIUS - 3, size=planted)
    for row, count in zip(bits, flips, strict=True):
        row[rng.choice(BITS, size=int(count), replace=False)] ^= True
    test[:planted] = pack_bits(bits)
    return train, test, planted


def time_search(n: int) -> tuple[dict[str, float], dict[str, float]]:
    """The exhaustive search and the bit-sampling index on the same ``n`` eval x ``n`` train hashes:
    seconds, pairs and recall on the planted pairs each; the index's recall of the exhaustive
    result too."""
    train, test, planted = synthetic_hashes(n, np.random.default_rng([SEED, n]))
    started = time.perf_counter()
    i, j, _ = hamming_pairs(test, train, RADIUS)
    seconds = time.perf_counter() - started
    exhaustive = {
        "n": n,
        "seconds": seconds,
        "pairs": float(i.size),
        "recall": int(np.count_nonzero((i < planted) & (i == j))) / planted,
        "ns_per_comparison": seconds / (n * n) * 1e9,
    }
    repeats = []
    for repeat in range(INDEX_REPEATS):  # seconds, not minutes: the median of three steadies the growth
        started = time.perf_counter()
        (found_i, found_j, _), found_plan = index_pairs(
            test, train, RADIUS, rng=np.random.default_rng([SEED, n, repeat])
        )
        repeats.append(time.perf_counter() - started)
        if repeat == 0:
            a, b, plan = found_i, found_j, found_plan
    seconds = float(np.median(repeats))
    truth = set(zip(i.tolist(), j.tolist(), strict=True))
    found = set(zip(a.tolist(), b.tolist(), strict=True))
    indexed = {
        "n": n,
        "seconds": seconds,
        "pairs": float(a.size),
        "recall": int(np.count_nonzero((a < planted) & (a == b))) / planted,
        "recall_exhaustive": len(found & truth) / max(1, len(truth)),
        "outside": float(len(found - truth)),
        "bits": float(plan.bits_per_key),
        "tables": float(plan.tables),
        "probes": float(plan.probes),
    }
    return exhaustive, indexed


def synthetic_fingerprints(images: int, seed: int) -> tuple[torch.Tensor, int]:
    """``(vectors, planted)``: unit vectors, the last ``planted`` copies of the first ones.

    Vectors drawn from a 300-dimensional subspace have pairwise similarities with a standard
    deviation of ~0.06, like the fingerprints of a homogeneous study.
    """
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(300, FINGERPRINT_DIMENSION, generator=generator)
    vectors = torch.nn.functional.normalize(torch.randn(images, 300, generator=generator) @ basis, dim=1)
    planted = images // 100
    noise = torch.nn.functional.normalize(torch.randn(planted, FINGERPRINT_DIMENSION, generator=generator), dim=1)
    vectors[images - planted :] = torch.nn.functional.normalize(vectors[:planted] + 0.7 * noise, dim=1)
    return vectors, planted


def time_fingerprint_search(n: int) -> dict[str, float]:
    """Seconds to search the pooled fingerprints of two splits of ``n`` images, and the recall."""
    images = 2 * n
    vectors, planted = synthetic_fingerprints(images, SEED + n)
    started = time.perf_counter()
    i, j, _ = similar_pairs(vectors, SIMILARITY_BOUND)
    seconds = time.perf_counter() - started
    found = int(np.count_nonzero(j - i == images - planted))
    return {
        "n": n,
        "seconds": seconds,
        "pairs": float(i.size),
        "recall": found / planted,
        "ns_per_comparison": seconds / (images * (images - 1) / 2) * 1e9,
    }


def time_fingerprinting(images: int = FINGERPRINTED_IMAGES) -> float:
    """Images fingerprinted per second (smooth random 64 x 64 images)."""
    generator = torch.Generator().manual_seed(SEED)
    coarse = torch.rand(images, 1, 12, 12, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False)
    started = time.perf_counter()
    fingerprints(smooth.clamp(0, 1))
    return images / (time.perf_counter() - started)


def _growth(small: dict[str, float], large: dict[str, float]) -> str:
    ratio = large["seconds"] / small["seconds"]
    return f"  growth n -> 4n: x{ratio:.1f} (an exhaustive search is quadratic: x16 expected)"


def main(sizes: tuple[int, int] = SIZES) -> list[str]:
    """Measure both searches at n and 4n and the fingerprinting rate; return the report lines.

    One timed run per size (the 4n searches take a minute or more on two CPU cores; the
    harness's interleaved repeats would multiply that).
    """
    lines = [f"hash search: {BITS}-bit pHash, radius {RADIUS} bits, exhaustive tiles (n eval x n train)"]
    both = [time_search(n) for n in sizes]
    results = [exhaustive for exhaustive, _ in both]
    for r in results:
        lines.append(
            f"  n={int(r['n']):>7,} eval x {int(r['n']):>7,} train: {r['seconds']:8.2f} s"
            f"  ({r['ns_per_comparison']:.2f} ns per hash pair, {int(r['pairs']):,} pairs found,"
            f" planted recall {r['recall']:.3f})"
        )
    lines.append(_growth(*results))
    lines.append(
        "hash search by the bit-sampling index (the check's near_hash_index: index; auto takes it from 50 million"
        " pairs)"
    )
    indexed = [index for _, index in both]
    for r, e in zip(indexed, results, strict=True):
        lines.append(
            f"  n={int(r['n']):>7,} eval x {int(r['n']):>7,} train: {r['seconds']:8.2f} s"
            f"  ({int(r['tables'])} tables of {int(r['bits'])}-bit keys, probes {int(r['probes'])}; median of"
            f" {INDEX_REPEATS}; planted recall {r['recall']:.4f},"
            f" recall of the exhaustive result {r['recall_exhaustive']:.4f}, {int(r['outside'])} pairs outside it;"
            f" exhaustive / index {e['seconds'] / r['seconds']:.1f}x)"
        )
    lines.append(
        f"  growth n -> 4n: x{indexed[1]['seconds'] / indexed[0]['seconds']:.1f}"
        " (target at most x6; the method's own at this radius: 4^1.23 = x5.5 with one-bit probes)"
    )
    lines.append(
        f"fingerprint search: {FINGERPRINT_DIMENSION}-d fingerprints of both splits pooled, bound"
        f" {SIMILARITY_BOUND} (every pair, train-eval and within)"
    )
    prints = [time_fingerprint_search(n) for n in sizes]
    for r in prints:
        lines.append(
            f"  n={int(r['n']):>7,} per split ({2 * int(r['n']):,} pooled): {r['seconds']:8.2f} s"
            f"  ({r['ns_per_comparison']:.2f} ns per image pair, {int(r['pairs']):,} pairs found,"
            f" planted recall {r['recall']:.3f})"
        )
    lines.append(_growth(*prints))
    rate = time_fingerprinting()
    lines.append(
        f"fingerprinting: {rate:,.0f} images/s ({FINGERPRINTED_IMAGES:,} images; linear, so"
        f" {2 * sizes[1] / rate:,.0f} s for {2 * sizes[1]:,})"
    )
    return lines


if __name__ == "__main__":
    import sys

    large = int(sys.argv[1]) if len(sys.argv) > 1 else SIZES[1]
    print("\n".join(main((large // 4, large))))
