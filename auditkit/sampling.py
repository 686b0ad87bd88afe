"""Class-stratified, seeded samples of a split (drawn by the robustness and backdoor checks)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["stratified_allocation", "stratified_sample"]


def stratified_allocation(counts: ArrayLike, n: int) -> NDArray[np.int64]:
    """How many of ``n`` draws each class gets: proportional, by largest remainder.

    Quotas ``n * count / total`` are rounded down and the left-over draws go to the largest
    remainders (ties to the lower class index). Then every class with images gets at least one
    draw when ``n`` allows it, taken from the class with the largest allocation, so a rare class
    (the positive finding, often) is never left out of a small sample.

    Args:
        counts: images per class, shape ``(K,)``, non-negative integers.
        n: the sample size, ``0 <= n <= counts.sum()``.

    Returns:
        int64 allocation per class, shape ``(K,)``, summing to ``n``, never above ``counts``.

    Raises:
        ValueError: negative counts, or ``n`` outside ``[0, counts.sum()]``.

    Example:
        >>> stratified_allocation([6, 3, 1], 5).tolist()
        [2, 2, 1]
    """
    available = np.asarray(counts, dtype=np.int64)
    if available.ndim != 1 or (available < 0).any():
        raise ValueError(f"counts must be non-negative integers per class, got {available}")
    total = int(available.sum())
    if not 0 <= n <= total:
        raise ValueError(f"sample size must be in [0, {total}] (the images available), got {n}")
    if n == total:
        return available.copy()
    exact = n * available / total
    allocation = np.floor(exact).astype(np.int64)
    remainder = exact - allocation
    order = np.lexsort((np.arange(len(available)), -remainder))
    for k in order[: n - int(allocation.sum())]:
        allocation[k] += 1
    present = np.flatnonzero(available > 0)
    if n >= len(present):
        for k in present:
            if allocation[k] == 0:
                donor = int(np.argmax(allocation))
                allocation[donor] -= 1
                allocation[k] += 1
    return allocation


def stratified_sample(labels: ArrayLike, n: int | None, rng: np.random.Generator) -> NDArray[np.intp]:
    """Row indices of a class-stratified random sample of ``n`` images, in increasing order.

    Args:
        labels: class index of every image, shape ``(N,)``, values ``>= 0``.
        n: sample size; ``None`` or ``n >= N`` takes every image.
        rng: the only source of randomness (the same generator state gives the same sample).

    Returns:
        Sorted indices into ``labels``; per-class counts follow :func:`stratified_allocation`.

    Raises:
        ValueError: ``n`` is negative, or a label is negative.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    if n is not None and n < 0:
        raise ValueError(f"sample size must be non-negative, got {n}")
    if n is None or n >= y.shape[0]:
        return np.arange(y.shape[0], dtype=np.intp)
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(y.min())}")
    counts = np.bincount(y.astype(np.int64)) if y.size else np.zeros(0, dtype=np.int64)
    allocation = stratified_allocation(counts, n)
    chosen = [
        rng.choice(np.flatnonzero(y == k), size=int(take), replace=False)
        for k, take in enumerate(allocation.tolist())
        if take > 0
    ]
    if not chosen:
        return np.zeros(0, dtype=np.intp)
    return np.sort(np.concatenate(chosen)).astype(np.intp)
