"""Bootstrap resamples of every group at once, as row multiplicities, over patients when known.

The multi-label and regression analyses (:mod:`.multilabel`, :mod:`.regression`) compute every
statistic as a weighted sum over a group's rows, so a resample is best given as how many times
each row was drawn: a ``(B, m)`` count matrix ``C`` turns every per-label sum into one matrix
product ``C @ X`` (``X`` of shape ``(m, K)``), for all ``B`` resamples and all ``K`` labels at
once.

Resampling unit: each group is resampled on its own (stratified by group, as the classification
analysis does), so every resample keeps every group. Within a group the unit is the patient
when the manifest names patients (the cluster bootstrap: Davison & Hinkley 1997, "Bootstrap
Methods and their Application", sec. 3.8; Field & Welsh 2007, "Bootstrapping clustered data",
JRSS B 69(3); a patient's images are not independent, so resampling images would give too
narrow intervals): a group's patients are drawn with replacement and each drawn patient brings
all of their images *in that group*. A patient whose images fall in two groups of a grouping
(two sites, or two age bands over the years) is a cluster in each. An image without a patient
id is its own cluster. Clusters and groups are numbered by first occurrence, never by name, so
renaming groups or patients leaves every resample, hence every interval, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["GroupResampler", "first_occurrence_codes"]

CountMatrix = NDArray[np.intp]

# Bounds the elements of one block of count matrices (summed over groups), as auditkit.stats does.
_MAX_BLOCK_ELEMENTS = 1 << 24


def first_occurrence_codes(values: ArrayLike) -> NDArray[np.intp]:
    """Integer codes ``0..J-1`` numbering the distinct values by first occurrence."""
    array = np.asarray(values, dtype=object)
    if array.size == 0:
        return np.zeros(0, dtype=np.intp)
    _, first, inverse = np.unique(array.astype(str), return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")
    return np.asarray(rank[inverse.ravel()], dtype=np.intp)


@dataclass(frozen=True)
class GroupResampler:
    """Draws stratified (cluster) bootstrap resamples of some groups of a grouping.

    Build with :meth:`of`.

    Attributes:
        members: group -> its rows (indices into the analysed arrays), ascending.
        clusters: group -> the cluster code of each of its rows (``0..J-1``).
        order: the groups in the order they are drawn (first occurrence in the data).
        unit: ``"patient"`` when patient ids were given for some rows, else ``"image"``.
    """

    members: Mapping[str, NDArray[np.intp]]
    clusters: Mapping[str, NDArray[np.intp]]
    order: tuple[str, ...]
    unit: str

    @classmethod
    def of(
        cls, groups: ArrayLike, include: Sequence[str], patients: Sequence[str | None] | None = None
    ) -> GroupResampler:
        """The resampler of the groups ``include`` of the group labels ``groups`` ``(N,)``.

        Args:
            groups: group label per row.
            include: the groups to resample (each must have rows).
            patients: surrogate patient id per row, ``None`` where unknown; ``None``: images.

        Raises:
            ValueError: a shape mismatch or an included group without rows.
        """
        labels = np.asarray(groups).astype(str)
        n = labels.shape[0]
        ids: NDArray[np.object_] | None = None
        if patients is not None:
            ids = np.asarray(list(patients), dtype=object)
            if ids.shape != (n,):
                raise ValueError(f"patients must have shape ({n},), got {ids.shape}")
        known = ids is not None and any(p is not None for p in ids.tolist())
        codes = first_occurrence_codes(labels)
        first_code = {str(labels[i]): int(codes[i]) for i in range(n)}
        missing = [g for g in include if g not in first_code]
        if missing:
            raise ValueError(f"groups {missing} have no rows; present are {sorted(first_code)}")
        order = tuple(sorted(include, key=lambda g: first_code[g]))
        members = {g: np.flatnonzero(labels == g).astype(np.intp) for g in order}
        clusters: dict[str, NDArray[np.intp]] = {}
        for group, rows in members.items():
            if known and ids is not None:
                keys = [
                    f"id:{p}" if p is not None else f"row:{r}" for p, r in zip(ids[rows], rows.tolist(), strict=True)
                ]
                clusters[group] = first_occurrence_codes(np.asarray(keys, dtype=object))
            else:
                clusters[group] = np.arange(rows.size, dtype=np.intp)
        return cls(members, clusters, order, "patient" if known else "image")

    def units(self, group: str) -> int:
        """How many resampling units (patients or images) the group has."""
        return int(self.clusters[group].max()) + 1 if self.clusters[group].size else 0

    def blocks(self, n_boot: int, rng: np.random.Generator) -> Iterator[tuple[slice, dict[str, CountMatrix]]]:
        """``n_boot`` resamples in blocks: (the block's slice of ``0..n_boot``, group -> counts).

        ``counts[b, j]`` is how many times the group's ``j``-th row is in resample ``b``: its
        cluster's draw count. The groups are drawn in :attr:`order`, from ``rng`` only.
        """
        if n_boot < 1:
            raise ValueError(f"n_boot must be at least 1, got {n_boot}")
        total = max(1, sum(int(rows.size) for rows in self.members.values()))
        block = max(1, min(n_boot, _MAX_BLOCK_ELEMENTS // total))
        for start in range(0, n_boot, block):
            size = min(block, n_boot - start)
            out: dict[str, CountMatrix] = {}
            for group in self.order:
                codes = self.clusters[group]
                units = self.units(group)
                picks = rng.integers(0, units, size=(size, units), dtype=np.intp)
                offsets = (units * np.arange(size, dtype=np.intp))[:, None]
                drawn = np.bincount((picks + offsets).ravel(), minlength=size * units).reshape(size, units)
                out[group] = np.ascontiguousarray(drawn[:, codes]).astype(np.intp, copy=False)
            yield slice(start, start + size), out
