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
  singular vector of the centred embeddings; the projection on it separates the two;
* **train-only neighbourhoods** (:func:`train_only_neighbourhood`, this project's, issue 16):
  poison exists in the training split only, so a poisoned row's nearest neighbours among the
  label's pooled training and clean eval embeddings are training rows; the rows whose
  neighbourhoods hold significantly few eval images, and that are one another's neighbours,
  form the population - without asking k-means to separate it from the label's natural
  sub-populations.

The paper's cut for spectral signatures removes a fixed multiple of the *expected* poisoning rate,
which an auditor does not know; here the cut is a robust z-score of the projection (see
:func:`spectral_signature`).

Everything here is plain NumPy/scikit-learn over arrays; :mod:`auditkit.checks.backdoor` applies
it to the shared pass's cached embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Detection",
    "absent_from_reference",
    "activation_clustering",
    "confirm_population",
    "spectral_signature",
    "train_only_neighbourhood",
]

_MAD_CONSISTENCY = 1.4826
_MIN_SAMPLES = 10  # fewer samples of a label are not judged


@dataclass
class Detection:
    """One detector's verdict on the samples of one training label.

    Attributes:
        scores: Suspicion per sample (higher = more suspicious), shape ``(n,)``.
        flagged: Boolean per sample: the candidate population, kept only when confirmed (or
            when no reference was given).
        statistic: The detector's summary (silhouette for clustering, the largest robust z for
            spectral signatures).
        candidate: The population the detector found before confirmation, shape ``(n,)``.
        reference_share: Share of the clean reference samples (eval images of the same label)
            that fall into the candidate population's region; ``None`` without a reference or
            a candidate.
        confirmation_p: One-sided binomial probability of seeing that few reference samples
            there if the candidate were a natural sub-population of the label (as common among
            clean images as among training ones); ``None`` without a reference or a candidate.
        confirmed: Whether the candidate is confirmed as poison-like (``confirmation_p`` at most
            the level); ``None`` without a reference or a candidate.
    """

    scores: NDArray[np.float64]
    flagged: NDArray[np.bool_]
    statistic: float
    candidate: NDArray[np.bool_] | None = None
    reference_share: float | None = None
    confirmation_p: float | None = None
    confirmed: bool | None = None

    @property
    def candidate_share(self) -> float:
        """Share of the label's samples in the candidate population (0 without one)."""
        return 0.0 if self.candidate is None or self.candidate.size == 0 else float(self.candidate.mean())


def absent_from_reference(train_share: float, reference_hits: int, reference_size: int) -> float:
    """One-sided binomial p-value that a region holding ``train_share`` of a label's training
    samples holds only ``reference_hits`` of ``reference_size`` clean samples of the label.

    A natural sub-population (bilateral effusions, one site's images) is as common among the
    clean reference images as among the training ones; poison exists in the training split
    only. Small p: the region is under-populated by clean images. 1 when there is no reference.

    Example:
        >>> round(absent_from_reference(0.25, 0, 40), 6)  # 0.75 ** 40
        1e-05
    """
    if reference_size <= 0 or train_share <= 0.0:
        return 1.0
    from scipy.stats import binom

    return float(binom.cdf(reference_hits, reference_size, min(train_share, 1.0)))


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
    reference: ArrayLike | None = None,
    components: int = 10,
    max_relative_size: float = 0.45,
    min_silhouette: float = 0.25,
    confirm_alpha: float = 0.05,
    confirm_max_ratio: float = 0.25,
    seed: int = 0,
) -> Detection:
    """Chen et al.'s activation clustering of one label's embeddings, confirmed on clean data.

    The embeddings are centred and projected on their ``components`` leading principal
    components (the paper uses ICA to 10 components; PCA is deterministic and keeps the same
    subspace up to rotation, which k-means on Euclidean distances barely notices), then split by
    k-means with two clusters (10 restarts). The smaller cluster is a *candidate* when its share
    is at most ``max_relative_size`` and the mean silhouette of the split is at least
    ``min_silhouette`` (the paper's two criteria).

    The paper's criteria also fire on natural sub-populations of a label (bilateral effusions,
    one site's images, inverted shapes). With ``reference`` - clean images of the same label,
    the eval split - the candidate is *confirmed* only when the clean images under-populate
    it: each reference embedding goes to its nearest cluster centre (same centring and
    projection), and the one-sided binomial probability of so few of them landing in the small
    cluster, were it as common among clean images as among training ones
    (:func:`absent_from_reference`), must be at most ``confirm_alpha``. Poison exists only in
    the training split.

    A sample's score is how much closer it lies to the smaller cluster's centre than to the
    larger one's, in units of the larger cluster's spread: positive inside the small cluster.

    Args:
        features: ``(n, d)`` embeddings of the samples with one training label.
        reference: ``(m, d)`` embeddings of clean samples with the same label (the eval split),
            or ``None`` to flag unconfirmed candidates (the paper's rule).
        components: Principal components kept (at most ``min(n, d)``).
        max_relative_size: Largest share of the smaller cluster that can be poison.
        min_silhouette: Smallest mean silhouette of a split into a real second population.
        confirm_alpha: Largest binomial probability that confirms a candidate.
        confirm_max_ratio: Largest ratio of the reference share to the training share in the
            candidate's region that confirms it.
        seed: k-means seed.

    Returns:
        The :class:`Detection`; nothing flagged for fewer than 10 samples.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(features, dtype=np.float64)
    centred, singular, vt = _principal(x)
    n = centred.shape[0]
    if n < _MIN_SAMPLES:
        return _nothing(n)
    keep = max(1, min(components, int((singular > singular[0] * 1e-9).sum())))
    projected = centred @ vt[:keep].T
    kmeans = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(projected)
    labels = kmeans.labels_
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
    share = counts[small] / n
    candidate = (labels == small) if share <= max_relative_size and silhouette >= min_silhouette else None
    detection = Detection(scores, np.zeros(n, dtype=bool), silhouette, candidate=candidate)
    if candidate is None:
        return detection
    if reference is None:
        detection.flagged = candidate.copy()
        return detection
    ref = _finite_rows(reference, x.shape[1])
    ref_projected = (ref - x.mean(axis=0)) @ vt[:keep].T
    hits = int((kmeans.predict(ref_projected) == small).sum()) if ref.shape[0] else 0
    return _confirm(detection, share, hits, ref.shape[0], confirm_alpha, confirm_max_ratio)


def _finite_rows(reference: ArrayLike, width: int) -> NDArray[np.float64]:
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] != width:
        raise ValueError(f"reference must be (m, {width}), got shape {ref.shape}")
    return ref[np.isfinite(ref).all(axis=1)]


def _confirm(
    detection: Detection, region_share: float, hits: int, size: int, alpha: float, max_ratio: float
) -> Detection:
    """Keep the candidate when clean reference samples avoid its region: significantly (binomial
    p at most ``alpha``) and by a wide margin (their share at most ``max_ratio`` times the
    training share)."""
    assert detection.candidate is not None
    detection.reference_share = hits / size if size else None
    detection.confirmation_p = absent_from_reference(region_share, hits, size)
    detection.confirmed = bool(
        size > 0 and detection.confirmation_p <= alpha and hits / size <= max_ratio * region_share
    )
    detection.flagged = detection.candidate.copy() if detection.confirmed else np.zeros_like(detection.candidate)
    return detection


def confirm_population(
    features: ArrayLike,
    candidate: ArrayLike,
    reference: ArrayLike,
    *,
    components: int = 10,
    alpha: float = 0.05,
    max_ratio: float = 0.25,
) -> Detection:
    """Confirm a suspicious subset of one label's training samples against clean samples.

    For detectors that flag samples without a region of their own (STRIP): the label's
    embeddings are projected on their ``components`` leading principal components, the
    region is the set of points nearer to the candidate's centroid than to the rest's, and the
    candidate is confirmed as in :func:`activation_clustering` when the clean ``reference``
    samples avoid that region: the binomial probability of so few of them there, were the
    candidate's share of the label (not the larger region's) as common among clean images, is at
    most ``alpha``, and their share there is at most ``max_ratio`` times the candidate's.

    Args:
        features: ``(n, d)`` embeddings of the samples with one training label.
        candidate: ``(n,)`` boolean, the suspicious samples.
        reference: ``(m, d)`` embeddings of clean samples with the same label.
        components: Principal components kept.
        alpha: Largest binomial probability that confirms.
        max_ratio: Largest ratio of the reference share to the training share in the region.

    Returns:
        A :class:`Detection` whose ``scores`` are zero and ``statistic`` the training share of
        the region; ``flagged`` is the candidate when confirmed. Nothing is flagged for fewer
        than 10 samples, an empty candidate or a candidate of every sample.
    """
    x = np.asarray(features, dtype=np.float64)
    chosen = np.asarray(candidate, dtype=bool)
    if chosen.shape != (x.shape[0],):
        raise ValueError(f"candidate must have shape ({x.shape[0]},), got {chosen.shape}")
    centred, singular, vt = _principal(x)
    n = centred.shape[0]
    if n < _MIN_SAMPLES or not chosen.any() or chosen.all():
        return _nothing(n)
    keep = max(1, min(components, int((singular > singular[0] * 1e-9).sum())))
    projected = centred @ vt[:keep].T
    inside, outside = projected[chosen].mean(axis=0), projected[~chosen].mean(axis=0)

    def in_region(points: NDArray[np.float64]) -> NDArray[np.bool_]:
        nearer: NDArray[np.bool_] = np.linalg.norm(points - inside, axis=1) < np.linalg.norm(points - outside, axis=1)
        return nearer

    region = in_region(projected)
    ref = _finite_rows(reference, x.shape[1])
    hits = int(in_region((ref - x.mean(axis=0)) @ vt[:keep].T).sum()) if ref.shape[0] else 0
    detection = Detection(np.zeros(n), np.zeros(n, dtype=bool), float(region.mean()), candidate=chosen.copy())
    # The region (a half-space) holds more than the candidate; judging the clean images found
    # there against the candidate's own, smaller share is the conservative side.
    return _confirm(detection, detection.candidate_share, hits, ref.shape[0], alpha, max_ratio)


def spectral_signature(
    features: ArrayLike,
    *,
    reference: ArrayLike | None = None,
    z_threshold: float = 3.5,
    confirm_alpha: float = 0.05,
    confirm_max_ratio: float = 0.25,
) -> Detection:
    """Tran et al.'s spectral signature of one label's embeddings, with a data-driven cut.

    The centred embeddings are projected on their top right singular vector. The paper removes
    a fixed multiple of the *expected* poisoning rate from the top of the squared projections;
    the rate is unknown to an auditor, so the cut here is found in the data: the projection's
    robust z-score ``|p - median(p)| / (1.4826 MAD(p))`` above ``z_threshold`` (3.5: a clean,
    roughly normal projection exceeds it for ~0.05% of samples). The samples beyond the cut are
    the *candidate*; with ``reference`` (clean samples of the label) it is confirmed as in
    :func:`activation_clustering`: the reference samples, projected and scored with the
    training median and MAD, must significantly avoid the region beyond the cut
    (:func:`absent_from_reference` at most ``confirm_alpha``). A heavy natural tail of the
    projection is as heavy among clean images.

    The cut assumes the poison is a minority of its label: when it is a large share (about a
    third of the label on the packaged multi-class fixture) it inflates the MAD itself and the
    cut misses it; activation clustering, which splits the label in two, does not have that
    weakness. Tried and rejected on the fixtures: an Otsu split of the projection, which also
    splits clean labels with natural sub-populations (lesion sides, sites).

    A sample's score is Tran's: the squared projection.

    Args:
        features: ``(n, d)`` embeddings of the samples with one training label.
        reference: ``(m, d)`` embeddings of clean samples with the same label, or ``None`` to
            flag the unconfirmed cut.
        z_threshold: Robust z beyond which a sample is flagged.
        confirm_alpha: Largest binomial probability that confirms a candidate.
        confirm_max_ratio: Largest ratio of the reference share to the training share beyond
            the cut that confirms it.

    Returns:
        The :class:`Detection` (statistic: the largest robust z); nothing flagged for fewer than
        10 samples.
    """
    x = np.asarray(features, dtype=np.float64)
    centred, _, vt = _principal(x)
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
    beyond = robust_z > z_threshold
    detection = Detection(scores, beyond.copy(), float(robust_z.max()), candidate=beyond if beyond.any() else None)
    if reference is None or detection.candidate is None:
        return detection
    ref = _finite_rows(reference, x.shape[1])
    ref_z = np.abs((ref - x.mean(axis=0)) @ vt[0] - median) / mad
    hits = int((ref_z > z_threshold).sum())
    return _confirm(detection, detection.candidate_share, hits, ref.shape[0], confirm_alpha, confirm_max_ratio)


def train_only_neighbourhood(
    features: ArrayLike,
    reference: ArrayLike,
    *,
    components: int = 10,
    neighbours: int = 10,
    row_alpha: float = 0.05,
    min_rows: int = 5,
    min_share: float = 0.05,
    separation: float = 1.15,
    expand_alpha: float = 0.5,
    confirm_alpha: float = 0.05,
    confirm_max_ratio: float = 0.25,
) -> Detection:
    """Training rows of one label whose embedding neighbourhood clean images do not share.

    The label's training embeddings are centred and projected on their ``components`` leading
    principal components, and the clean ``reference`` embeddings (the eval split's images of the
    label) placed in the same projection. If the two splits were drawn alike, each of a training
    row's ``neighbours`` nearest neighbours among the pooled embeddings (itself left out) is a
    reference image with probability ``f = m / (n + m - 1)`` (``n`` training, ``m`` reference
    images): the count is binomial (measured on 83 clean models of the population, it is, to the
    second decimal, for natural sub-populations too - bilateral effusions, one site's stain - which
    both splits hold). Poison is in the training split only: its neighbours are training rows.

    1. *Rows*: a training row is a candidate when the binomial probability of so few reference
       images among its neighbours is at most ``row_alpha``.
    2. *Populations*: candidates that are among one another's neighbours (connected components of
       the neighbour graph) form a population; one with at least ``min_rows`` rows and
       ``min_share`` of the label is a *candidate* population.
    3. *Separation*: a model pulls its own training images together a little, so a few clean
       training rows can share a neighbourhood by chance; they lie among clean images all the
       same. A candidate population is kept when its rows are separated from the reference: the
       median over its rows of (distance to the nearest reference image) / (distance to the
       ``neighbours``-th nearest training row) is at least ``separation``. Measured on the tuning
       parts of the population: at most 1.02 on clean models' populations, at least 1.24 on
       BadNets poison.
    4. *Confirmation*, as for the other detectors (:func:`absent_from_reference`): the reference
       images whose nearest training row lies in the population must be significantly few
       (binomial p at most ``confirm_alpha``, were the population's training share theirs) and at
       most ``confirm_max_ratio`` of that share.
    5. *Expansion*: a confirmed population takes in, until nothing changes, the rows most of whose
       ``neighbours`` nearest training rows are in it and whose reference neighbours are not
       plentiful (binomial probability at most ``expand_alpha``): poisoned rows a clean image
       happens to neighbour.

    ``neighbours`` is about the smallest population found whole: a row of a population of fewer
    than ``neighbours + 1`` rows has other rows among its neighbours.

    A sample's score is its separation ratio (higher = farther from every clean image).

    Args:
        features: ``(n, d)`` embeddings of the samples with one training label.
        reference: ``(m, d)`` embeddings of clean samples with the same label (eval split).
        components: Principal components kept.
        neighbours: Neighbours examined per row.
        row_alpha: Largest binomial probability of a row's reference neighbours that makes it a
            candidate.
        min_rows: Fewest rows of a candidate population.
        min_share: Smallest share of the label of a candidate population.
        separation: Smallest median separation ratio of a kept population.
        expand_alpha: Largest binomial probability of a row taken in by expansion.
        confirm_alpha: Largest binomial probability that confirms a population.
        confirm_max_ratio: Largest ratio of the reference share to the training share of a
            confirmed population.

    Returns:
        The :class:`Detection`: ``candidate`` the candidate populations, ``flagged`` the confirmed
        ones (expanded), ``statistic`` the largest separation of a candidate population (0 without
        one), ``reference_share`` and ``confirmation_p`` those of the confirmed populations
        together (of the candidates when none is confirmed). Nothing is flagged for fewer than 10
        samples or no reference sample.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree
    from scipy.stats import binom

    x = np.asarray(features, dtype=np.float64)
    centred, singular, vt = _principal(x)
    n = centred.shape[0]
    ref = _finite_rows(reference, x.shape[1])
    m = ref.shape[0]
    if n < _MIN_SAMPLES or m == 0:
        return _nothing(n)
    share = m / (n + m - 1)  # a neighbour's chance of being a reference image, were the splits alike
    # Widened until a neighbourhood without reference images is significant on its own.
    needed = math.ceil(math.log(row_alpha) / math.log1p(-share)) if share < 1.0 else 1
    k = min(max(neighbours, needed), n - 1)
    keep = max(1, min(components, int((singular > singular[0] * 1e-9).sum())))
    train = centred @ vt[:keep].T
    clean = (ref - x.mean(axis=0)) @ vt[:keep].T
    pooled = np.vstack([train, clean])
    # Neighbours among the pooled embeddings and among the training ones, the row itself left out.
    pooled_nn = _without_self(cKDTree(pooled).query(train, k=k + 1)[1], k)
    train_distance, train_nn = cKDTree(train).query(train, k=k + 1)
    train_nn = _without_self(train_nn, k)
    reach = np.sort(train_distance, axis=1)[:, k]  # distance to the k-th other training row
    nearest_clean = cKDTree(clean).query(train, k=1)[0]
    ratio = nearest_clean / np.maximum(reach, 1e-12)
    clean_neighbours = (pooled_nn >= n).sum(axis=1)
    row_p = binom.cdf(clean_neighbours, k, share)
    candidate_rows = row_p <= row_alpha
    # Populations: candidates linked when one is among the other's neighbours.
    source = np.repeat(np.arange(n), k)
    target = pooled_nn.ravel()
    link = (target < n) & candidate_rows[source]
    link[link] &= candidate_rows[target[link]]
    graph = csr_matrix((np.ones(int(link.sum())), (source[link], target[link])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    owner = cKDTree(train).query(clean, k=1)[1]  # each clean image's nearest training row
    candidate = np.zeros(n, dtype=bool)
    flagged = np.zeros(n, dtype=bool)
    statistic = 0.0
    for label in np.unique(component[candidate_rows]):
        rows = candidate_rows & (component == label)
        if rows.sum() < max(min_rows, min_share * n):
            continue
        candidate |= rows
        spread = float(np.median(ratio[rows]))
        statistic = max(statistic, spread)
        hits = int(rows[owner].sum())
        train_share = float(rows.mean())
        confirmed = (
            spread >= separation
            and absent_from_reference(train_share, hits, m) <= confirm_alpha
            and hits / m <= confirm_max_ratio * train_share
        )
        if confirmed:
            flagged |= _expand(rows, train_nn, row_p, expand_alpha)
    detection = Detection(ratio, np.zeros(n, dtype=bool), statistic, candidate=candidate if candidate.any() else None)
    if detection.candidate is None:
        return detection
    region = flagged if flagged.any() else candidate
    hits = int(region[owner].sum())
    detection.reference_share = hits / m
    detection.confirmation_p = absent_from_reference(float(region.mean()), hits, m)
    detection.confirmed = bool(flagged.any())
    detection.flagged = flagged
    return detection


def _without_self(indices: NDArray[np.int64], k: int) -> NDArray[np.int64]:
    """``(n, k + 1)`` neighbour indices of rows ``0..n-1`` -> ``(n, k)`` without the row itself
    (the last neighbour dropped where a duplicate hid it)."""
    rows = np.arange(indices.shape[0])[:, None]
    is_self = indices == rows
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones(indices.shape, dtype=bool)
    keep[np.arange(indices.shape[0]), drop] = False
    out: NDArray[np.int64] = indices[keep].reshape(indices.shape[0], k)
    return out


def _expand(
    rows: NDArray[np.bool_], train_nn: NDArray[np.int64], row_p: NDArray[np.float64], alpha: float
) -> NDArray[np.bool_]:
    """Grow a population by the rows most of whose nearest training rows are in it and whose
    clean-neighbour probability is at most ``alpha``, until nothing changes."""
    members = rows.copy()
    while True:
        joining = ~members & (members[train_nn].mean(axis=1) >= 0.5) & (row_p <= alpha)
        if not joining.any():
            return members
        members |= joining
