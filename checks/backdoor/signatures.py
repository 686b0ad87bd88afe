"""Data-level poisoning detectors on the training split's embeddings (no forward pass).

Poisoned training images carry the trigger *and* the features of their true class, yet are
labelled as the target class; inside that label they form a small, separate population in the
model's embedding. Both detectors look for it one training label at a time:

* **activation clustering** (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
  Activation Clustering", 2018): project the label's embeddings on their leading components,
  split them in two with k-means and call the smaller cluster poisoned when it is clearly
  separated (silhouette score) and small (relative size);
* **spectral signatures** (Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks",
  NeurIPS 2018): the poisoned population shifts the label's mean, so it dominates the top
  singular vector of the centred embeddings; the projection on it separates the two.

The paper's cut for spectral signatures removes a fixed multiple of the *expected* poisoning rate,
which an auditor does not know; here the cut is a robust z-score of the projection (see
:func:`spectral_signature`).

Everything here is plain NumPy/scikit-learn over arrays; :mod:`auditkit.checks.backdoor` applies
it to the shared pass's cached embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Detection", "activation_clustering", "spectral_signature"]

_MAD_CONSISTENCY = 1.4826
_MIN_SAMPLES = 10  # fewer samples of a label are not judged


@dataclass
class Detection:
    """One detector's verdict on the samples of one training label.

    Attributes:
        scores: Suspicion per sample (higher = more suspicious), shape ``(n,)``.
        flagged: Boolean per sample: beyond the data-driven cut.
        statistic: The detector's summary (silhouette for clustering, the largest robust z for
            spectral signatures).
    """

    scores: NDArray[np.float64]
    flagged: NDArray[np.bool_]
    statistic: float


def _principal(features: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Validated ``(n, d)`` features: centred copy, singular values and right singular vectors."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features must be finite, got NaN or infinite values")
    centred = x - x.mean(axis=0)
    if x.shape[0] < _MIN_SAMPLES:
        return centred, np.zeros(0), np.zeros((0, x.shape[1]))
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    return centred, singular, vt


def _nothing(n: int) -> Detection:
    return Detection(np.zeros(n), np.zeros(n, dtype=bool), float("nan"))


def activation_clustering(
    features: ArrayLike,
    *,
    components: int = 10,
    max_relative_size: float = 0.35,
    min_silhouette: float = 0.25,
    seed: int = 0,
) -> Detection:
    """Chen et al.'s activation clustering of one label's embeddings.

    The embeddings are centred and projected on their ``components`` leading principal
    components (the paper uses ICA to 10 components; PCA is deterministic and keeps the same
    subspace up to rotation, which k-means on Euclidean distances barely notices), then split by
    k-means with two clusters (10 restarts). The smaller cluster is flagged when its share is at
    most ``max_relative_size`` and the mean silhouette of the split is at least
    ``min_silhouette`` (the paper's two criteria).

    A sample's score is how much closer it lies to the smaller cluster's centre than to the
    larger one's, in units of the larger cluster's spread: positive inside the small cluster.

    Args:
        features: ``(n, d)`` embeddings of the samples with one training label.
        components: Principal components kept (at most ``min(n, d)``).
        max_relative_size: Largest share of the smaller cluster that can be poison.
        min_silhouette: Smallest mean silhouette of a split into a real second population.
        seed: k-means seed.

    Returns:
        The :class:`Detection`; nothing flagged for fewer than 10 samples.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    centred, singular, vt = _principal(features)
    n = centred.shape[0]
    if n < _MIN_SAMPLES:
        return _nothing(n)
    keep = max(1, min(components, int((singular > singular[0] * 1e-9).sum())))
    projected = centred @ vt[:keep].T
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(projected)
    counts = np.bincount(labels, minlength=2)
    if counts.min() == 0:
        return Detection(np.zeros(n), np.zeros(n, dtype=bool), 0.0)
    small = int(np.argmin(counts))
    silhouette = float(silhouette_score(projected, labels))
    small_centre = projected[labels == small].mean(axis=0)
    large_centre = projected[labels != small].mean(axis=0)
    large_spread = float(np.sqrt(((projected[labels != small] - large_centre) ** 2).sum(axis=1).mean())) + 1e-12
    scores = (
        np.linalg.norm(projected - large_centre, axis=1) - np.linalg.norm(projected - small_centre, axis=1)
    ) / large_spread
    suspicious = counts[small] / n <= max_relative_size and silhouette >= min_silhouette
    flagged = (labels == small) if suspicious else np.zeros(n, dtype=bool)
    return Detection(scores, flagged, silhouette)


def spectral_signature(features: ArrayLike, *, z_threshold: float = 3.5) -> Detection:
    """Tran et al.'s spectral signature of one label's embeddings, with a data-driven cut.

    The centred embeddings are projected on their top right singular vector. The paper removes
    a fixed multiple of the *expected* poisoning rate from the top of the squared projections;
    the rate is unknown to an auditor, so the cut here is found in the data: the projection's
    robust z-score ``|p - median(p)| / (1.4826 MAD(p))`` above ``z_threshold`` (3.5: a clean,
    roughly normal projection exceeds it for ~0.05% of samples).

    The cut assumes the poison is a minority of its label: when it is a large share (about a
    third of the label on the packaged multi-class fixture) it inflates the MAD itself and the
    cut misses it; activation clustering, which splits the label in two, does not have that
    weakness. Tried and rejected on the fixtures: an Otsu split of the projection, which also
    splits clean labels with natural sub-populations (lesion sides, sites).

    A sample's score is Tran's: the squared projection.

    Args:
        features: ``(n, d)`` embeddings of the samples with one training label.
        z_threshold: Robust z beyond which a sample is flagged.

    Returns:
        The :class:`Detection` (statistic: the largest robust z); nothing flagged for fewer than
        10 samples.
    """
    centred, _, vt = _principal(features)
    n = centred.shape[0]
    if n < _MIN_SAMPLES:
        return _nothing(n)
    projection = centred @ vt[0]
    scores = projection**2
    median = float(np.median(projection))
    mad = _MAD_CONSISTENCY * float(np.median(np.abs(projection - median)))
    if mad <= 0.0:
        return Detection(scores, np.zeros(n, dtype=bool), 0.0)
    robust_z = np.abs(projection - median) / mad
    return Detection(scores, robust_z > z_threshold, float(robust_z.max()))
