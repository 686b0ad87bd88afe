"""Exact and near duplicates across two splits and within one split (plain functions).

Exact duplicates are images whose decoded model-input pixels are bit-identical (equal
:func:`.hashing.pixel_digests`). Near duplicates are pairs whose perceptual hashes
(:func:`.hashing.perceptual_hash`) differ in at most ``radius`` bits, whose embeddings from the
shared pass have a cosine similarity of at least ``min_cosine`` (when embeddings are given), and
which are not exact duplicates. Counting follows DESIGN section 4: pairs of images, one from each
split for the train-eval counts, ``i < j`` inside one split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from auditkit.checks.leakage.hashing import HashArray, hamming_pairs, hamming_pairs_within

__all__ = [
    "DigestGroup",
    "NearPairs",
    "cosine_rows",
    "exact_groups_across",
    "exact_groups_within",
    "near_pairs_across",
    "near_pairs_within",
]


@dataclass(frozen=True)
class DigestGroup:
    """Images sharing one pixel digest: positions in the first and second split (or one split).

    Attributes:
        first: positions in the first (train) split, or in the only split.
        second: positions in the second (eval) split; empty for a within-split group.
        pairs: image pairs the group contributes (``len(first) * len(second)`` across,
            ``k (k - 1) / 2`` within).
    """

    first: tuple[int, ...]
    second: tuple[int, ...]
    pairs: int


@dataclass(frozen=True)
class NearPairs:
    """Near-duplicate pairs and the hash matches the embeddings did not confirm.

    Attributes:
        i: positions in the first split.
        j: positions in the second split (the same split for within-split pairs, ``i < j``).
        hamming: Hamming distance of each pair.
        cosine: embedding cosine of each pair (NaN without embeddings).
        rejected: hash matches (not exact) whose embedding cosine was below the bound.
    """

    i: NDArray[np.int64]
    j: NDArray[np.int64]
    hamming: NDArray[np.int64]
    cosine: NDArray[np.float64]
    rejected: int

    @property
    def count(self) -> int:
        return int(self.i.size)


def _positions(digests: Sequence[str]) -> dict[str, list[int]]:
    table: dict[str, list[int]] = {}
    for position, digest in enumerate(digests):
        table.setdefault(digest, []).append(position)
    return table


def exact_groups_across(first: Sequence[str], second: Sequence[str]) -> list[DigestGroup]:
    """Digests present in both splits, as groups with their cross-split pair counts."""
    a, b = _positions(first), _positions(second)
    return [DigestGroup(tuple(a[d]), tuple(b[d]), len(a[d]) * len(b[d])) for d in a.keys() & b.keys()]


def exact_groups_within(digests: Sequence[str]) -> list[DigestGroup]:
    """Digests held by two or more images of one split."""
    return [DigestGroup(tuple(p), (), len(p) * (len(p) - 1) // 2) for p in _positions(digests).values() if len(p) > 1]


def cosine_rows(
    a: NDArray[np.floating], b: NDArray[np.floating], i: NDArray[np.int64], j: NDArray[np.int64]
) -> NDArray[np.float64]:
    """Cosine similarity of rows ``a[i]`` and ``b[j]`` (0 where a row has zero norm)."""
    x = np.asarray(a, dtype=np.float64)[i]
    y = np.asarray(b, dtype=np.float64)[j]
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    dots = np.einsum("ij,ij->i", x, y)
    cosine: NDArray[np.float64] = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return cosine


def _confirm(
    i: NDArray[np.int64],
    j: NDArray[np.int64],
    d: NDArray[np.int64],
    exact: NDArray[np.bool_],
    features: tuple[NDArray[np.floating], NDArray[np.floating]] | None,
    min_cosine: float,
) -> NearPairs:
    i, j, d = i[~exact], j[~exact], d[~exact]
    if features is None:
        return NearPairs(i, j, d, np.full(i.size, np.nan), 0)
    cosine = cosine_rows(features[0], features[1], i, j)
    keep = cosine >= min_cosine
    return NearPairs(i[keep], j[keep], d[keep], cosine[keep], int((~keep).sum()))


def near_pairs_across(
    first: HashArray,
    second: HashArray,
    radius: int,
    *,
    first_digests: Sequence[str],
    second_digests: Sequence[str],
    features: tuple[NDArray[np.floating], NDArray[np.floating]] | None,
    min_cosine: float,
) -> NearPairs:
    """Near-duplicate pairs between two splits.

    Args:
        first: ``(n, W)`` hashes of the first (train) split.
        second: ``(m, W)`` hashes of the second (eval) split.
        radius: largest Hamming distance of a near duplicate.
        first_digests: pixel digests of the first split (exact duplicates are excluded).
        second_digests: pixel digests of the second split.
        features: embeddings ``((n, D), (m, D))`` confirming each hash match, or ``None``.
        min_cosine: smallest embedding cosine of a confirmed pair.
    """
    i, j, d = hamming_pairs(first, second, radius)
    exact = np.array([first_digests[a] == second_digests[b] for a, b in zip(i, j, strict=True)], dtype=bool)
    return _confirm(i, j, d, exact, features, min_cosine)


def near_pairs_within(
    hashes: HashArray,
    radius: int,
    *,
    digests: Sequence[str],
    features: NDArray[np.floating] | None,
    min_cosine: float,
) -> NearPairs:
    """Near-duplicate pairs ``i < j`` inside one split (same arguments as the cross version)."""
    i, j, d = hamming_pairs_within(hashes, radius)
    exact = np.array([digests[a] == digests[b] for a, b in zip(i, j, strict=True)], dtype=bool)
    pair = (features, features) if features is not None else None
    return _confirm(i, j, d, exact, pair, min_cosine)
