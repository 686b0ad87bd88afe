"""Exact and near duplicates across two splits and within one split (plain functions).

Exact duplicates are images whose decoded model-input pixels are bit-identical (equal
:func:`.hashing.pixel_digests`). Near duplicates (:func:`near_duplicate_search`) are pairs that
are not exact duplicates, whose embeddings from the shared pass have a cosine similarity of at
least ``min_cosine`` (when embeddings are given), and which are found by either of two searches:

* **acquisition fingerprints** (:mod:`.fingerprint`): the fingerprint similarity reaches the
  bound calibrated on the study's own pairs (median + ``z`` robust standard deviations, at least
  ``floor``). This is what tells a copy from another patient's look-alike in a homogeneous study;
* **perceptual hashes** (:func:`.hashing.perceptual_hash`) within a Hamming radius, the radius
  also calibrated on the study: at most ``max_radius``, and at least ``hash_z`` robust standard
  deviations below the median distance of the study's random pairs. In a heterogeneous study
  (random pairs ~120 of 256 bits apart) the radius is ``max_radius``; in a homogeneous one the
  hashes of different patients are close (median ~80 bits, spread ~20) and the search is off.

Counting (docs/leakage.md): pairs of images, one from each split for the train-eval counts,
``i < j`` inside one split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from auditkit.checks.leakage.fingerprint import (
    MIN_CALIBRATION_PAIRS,
    Calibration,
    calibrate,
    fingerprints,
    robust_location,
    sample_pairs,
    similar_pairs,
    volume_fingerprints,
)
from auditkit.checks.leakage.hash_index import HashIndex, IndexPlan, hamming_search_within
from auditkit.checks.leakage.hashing import HashArray, hamming_distance, hamming_pairs, hamming_pairs_within

__all__ = [
    "DigestGroup",
    "NearPairs",
    "NearSearch",
    "cosine_rows",
    "duplicate_labels",
    "exact_groups_across",
    "exact_groups_within",
    "hash_radius",
    "near_duplicate_search",
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


def duplicate_labels(digests: Sequence[str]) -> NDArray[np.int64]:
    """A label per image: the same label >= 0 for bit-identical images, -1 for unique ones."""
    table: dict[str, int] = {}
    labels = np.array([table.setdefault(d, len(table)) for d in digests], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(table)) if labels.size else np.zeros(0, dtype=np.int64)
    return np.where(counts[labels] > 1, labels, -1) if labels.size else labels


def hash_radius(
    hashes: HashArray, pairs: tuple[torch.Tensor, torch.Tensor], *, max_radius: int, z: float
) -> tuple[int, float, float]:
    """The Hamming radius of the hash search, calibrated on the study's own pairs.

    Returns:
        ``(radius, median, scale)``: ``min(max_radius, floor(median - z * scale))`` of the
        Hamming distances of ``pairs`` (their median and robust standard deviation); ``-1``
        (no search) when that is negative. A study with fewer than 20 pairs keeps ``max_radius``.
    """
    i, j = (index.numpy() for index in pairs)
    distances = hamming_distance(hashes[i], hashes[j]).astype(np.float64)
    median, scale = robust_location(distances)
    if distances.size < MIN_CALIBRATION_PAIRS or not math.isfinite(median):
        return max_radius, median, scale
    return max(-1, min(max_radius, math.floor(median - z * scale))), median, scale


@dataclass(frozen=True)
class NearSearch:
    """Near-duplicate candidates of one pooled set of images, and how the bounds were set.

    Attributes:
        i: positions of the first image of each pair (``i < j``).
        j: positions of the second image.
        similarity: fingerprint similarity of each pair.
        hamming: Hamming distance of their perceptual hashes.
        cosine: embedding cosine (NaN without embeddings).
        by_fingerprint: the fingerprint similarity reached the bound.
        by_hash: the Hamming distance was within the radius.
        confirmed: the embeddings confirm the pair (every pair without embeddings).
        calibration: the fingerprint bound and the pair similarities it came from.
        radius: the Hamming radius used (-1: the hash search was off).
        hash_median: median Hamming distance of the study's random pairs.
        hash_scale: their robust standard deviation.
        components: principal axes projected out of the fingerprints.
        moved: images registered away from the identity pose.
        hash_plan: the bit-sampling index the hash search used (``None``: exhaustive, or off).
    """

    i: NDArray[np.int64]
    j: NDArray[np.int64]
    similarity: NDArray[np.float64]
    hamming: NDArray[np.int64]
    cosine: NDArray[np.float64]
    by_fingerprint: NDArray[np.bool_]
    by_hash: NDArray[np.bool_]
    confirmed: NDArray[np.bool_]
    calibration: Calibration
    radius: int
    hash_median: float
    hash_scale: float
    components: int
    moved: int
    hash_plan: IndexPlan | None = None


def near_duplicate_search(
    images: torch.Tensor,
    hashes: HashArray,
    digests: Sequence[str],
    *,
    features: NDArray[np.floating] | None,
    z: float,
    z_per_decade: float,
    floor: float,
    components: int,
    max_radius: int,
    hash_z: float,
    min_cosine: float,
    rng: np.random.Generator,
    volume_slices: int = 8,
    hash_index: HashIndex = "auto",
    hash_recall: float = 0.995,
    device: torch.device | None = None,
) -> NearSearch:
    """Near-duplicate candidates among ``N`` images (every split pooled; see the module docstring).

    Args:
        images: ``(N, C, H, W)`` decoded images, or ``(N, C, D, H, W)`` volumes, which are
            fingerprinted by ``volume_slices`` axial slices (:func:`.fingerprint.volume_fingerprints`).
        hashes: ``(N, W)`` perceptual hashes of the same images (of volumes: their slices'
            hashes one after another, :func:`.hashing.volume_hash`).
        digests: their pixel digests (pairs of bit-identical images are left out).
        features: ``(N, D)`` embeddings confirming each pair, or ``None``.
        z: robust standard deviations above the median pair similarity of a near duplicate
            (up to 40,000 pairs compared).
        z_per_decade: added to ``z`` per tenfold more pairs compared (:func:`.fingerprint.calibrate`).
        floor: smallest fingerprint similarity of a near duplicate.
        components: most principal axes projected out of the fingerprints.
        max_radius: largest Hamming radius of the hash search.
        hash_z: robust standard deviations below the median pair distance the radius must stay.
        min_cosine: smallest embedding cosine of a confirmed pair.
        rng: draws the calibration pairs of a large study.
        volume_slices: axial slices fingerprinted per volume.
        hash_index: ``exhaustive``, ``index`` (bit-sampling tables, :mod:`.hash_index`) or ``auto``
            (the index where it is estimated cheaper: large studies).
        hash_recall: the index's probability of finding a pair at the radius.
        device: where the fingerprint search's matrix products run (a GPU; ``None``: the CPU).

    Returns:
        The :class:`NearSearch`; callers keep ``confirmed`` pairs.
    """
    labels = duplicate_labels(digests)
    if images.ndim == 5:
        prints = volume_fingerprints(images, slices=volume_slices, components=components)
    else:
        prints = fingerprints(images, components=components)
    pairs = sample_pairs(images.shape[0], rng, exclude=labels)
    calibration = calibrate(prints.vectors, pairs, z=z, floor=floor, z_per_decade=z_per_decade)
    radius, hash_median, hash_scale = hash_radius(hashes, pairs, max_radius=max_radius, z=hash_z)
    found: dict[tuple[int, int], list[bool]] = {}
    fi, fj, _ = similar_pairs(prints.vectors, calibration.threshold, exclude=labels, device=device)
    for a, b in zip(fi.tolist(), fj.tolist(), strict=True):
        found[(a, b)] = [True, False]
    plan = None
    if radius >= 0:
        (hi, hj, _), plan = hamming_search_within(hashes, radius, index=hash_index, recall=hash_recall, rng=rng)
        for a, b in zip(hi.tolist(), hj.tolist(), strict=True):
            if labels[a] < 0 or labels[a] != labels[b]:
                found.setdefault((a, b), [False, False])[1] = True
    keys = sorted(found)
    i = np.array([k[0] for k in keys], dtype=np.int64)
    j = np.array([k[1] for k in keys], dtype=np.int64)
    similarity = (prints.vectors[i] * prints.vectors[j]).sum(dim=1).double().numpy() if keys else np.empty(0)
    cosine = cosine_rows(features, features, i, j) if features is not None else np.full(i.size, np.nan)
    confirmed = cosine >= min_cosine if features is not None else np.ones(i.size, dtype=bool)
    return NearSearch(
        i=i,
        j=j,
        similarity=similarity,
        hamming=hamming_distance(hashes[i], hashes[j]).astype(np.int64),
        cosine=cosine,
        by_fingerprint=np.array([found[k][0] for k in keys], dtype=bool),
        by_hash=np.array([found[k][1] for k in keys], dtype=bool),
        confirmed=confirmed,
        calibration=calibration,
        radius=radius,
        hash_median=hash_median,
        hash_scale=hash_scale,
        components=prints.components,
        moved=prints.moved,
        hash_plan=plan,
    )
