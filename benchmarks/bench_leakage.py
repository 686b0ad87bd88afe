"""Benchmark of the leakage check's near-duplicate search (Hamming radius over perceptual hashes).

Synthetic 256-bit hashes (the check's default length) stand in for images: a train set of ``n``
uniform random hashes and an eval set of ``n`` hashes, a tenth of which are copies of train
hashes with 2 to 40 bits flipped (planted near duplicates). The search is the check's own
(:func:`auditkit.checks.leakage.hashing.hamming_pairs`, exhaustive XOR and population count in
bounded tiles) at the check's default radius (0.195 x 256 = 49 bits). It is timed at ``n`` and
``4n``; an exhaustive search does ``n^2`` hash comparisons, so the time should grow about 16-fold.
The planted pairs must all be found (recall is printed), so the timing is of a correct search.

Run: ``make bench`` / ``python -m benchmarks bench_leakage`` (or this module directly).
"""

from __future__ import annotations

import time

import numpy as np

from auditkit.checks.leakage.hashing import hamming_pairs, pack_bits, unpack_bits

BITS = 256
RADIUS = int(0.195 * BITS)
# n and 4n. 12,500 -> 50,000 shows the quadratic growth in ~30 s on two cores; the
# 100,000 x 100,000 search costs ~4x the 50,000 one (about 100 s there), which the ten-minute
# budget of `make bench` cannot spare. `python -m benchmarks.bench_leakage 100000` runs it.
SIZES = (12_500, 50_000)
SEED = 0


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


def time_search(n: int) -> dict[str, float]:
    """Seconds to search ``n`` eval hashes against ``n`` train hashes, and the recall."""
    train, test, planted = synthetic_hashes(n, np.random.default_rng([SEED, n]))
    started = time.perf_counter()
    i, j, _ = hamming_pairs(test, train, RADIUS)
    seconds = time.perf_counter() - started
    found = int(np.count_nonzero((i < planted) & (i == j)))
    return {
        "n": n,
        "seconds": seconds,
        "pairs": float(i.size),
        "recall": found / planted,
        "ns_per_comparison": seconds / (n * n) * 1e9,
    }


def main(sizes: tuple[int, int] = SIZES) -> list[str]:
    """Measure the near-duplicate search at n and 4n; return the report lines.

    One timed run per size (the 4n search takes a minute or more on two CPU cores; the
    harness's interleaved repeats would multiply that).
    """
    lines = [f"near-duplicate search: {BITS}-bit pHash, radius {RADIUS} bits, exhaustive tiles"]
    results = [time_search(n) for n in sizes]
    for r in results:
        lines.append(
            f"  n={int(r['n']):>7,} eval x {int(r['n']):>7,} train: {r['seconds']:8.2f} s"
            f"  ({r['ns_per_comparison']:.2f} ns per hash pair, {int(r['pairs']):,} pairs found,"
            f" planted recall {r['recall']:.3f})"
        )
    small, large = results
    lines.append(
        f"  growth n -> 4n: x{large['seconds'] / small['seconds']:.1f}"
        " (an exhaustive search is quadratic: x16 expected)"
    )
    return lines


if __name__ == "__main__":
    import sys

    large = int(sys.argv[1]) if len(sys.argv) > 1 else SIZES[1]
    print("\n".join(main((large // 4, large))))
