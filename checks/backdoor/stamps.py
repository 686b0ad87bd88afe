"""Train-only stamps: a patch trigger recurs pixel for pixel in poisoned training images only.

A BadNets-style trigger (Gu et al., "BadNets", 2017) is one patch pasted into every poisoned
image: the same few pixels, to the grey level, in images that otherwise share nothing. Natural
images do not repeat a contrasted patch exactly - noise, anatomy and positioning differ - and when
they do (a burned-in marker, a template's edge), the clean eval images of the label repeat it as
often as the training images.

The test, one training label at a time, on the decoded pixels (no model, so it also runs on an
artefact without embeddings):

1. *Windows.* Every ``window x window`` window of every image (all channels), quantised to
   ``levels`` grey levels of [0, 1], is a key. Windows whose levels span less than ``contrast``
   (a share of the range) are dropped: flat and gently varying windows (background, soft tissue)
   recur everywhere by chance. The key ignores the window's position, so a trigger pasted at
   random positions is found as well as a fixed one.
2. *Recurrence.* A key carried by at least ``min_rows`` training images of the label (each image
   counted once) is a candidate.
3. *Absence from the eval images.* Under a natural origin, an image carrying the key is an eval
   image with probability ``f = m / (n + m)`` (``n`` training, ``m`` eval images of the label); the
   one-sided binomial probability of so few eval carriers must be at most ``confirm_alpha``
   divided by the number of *testable* candidates, and their eval share at most
   ``confirm_max_ratio`` of the training share. A key carried by ``t`` images can never reach a
   probability below ``(1 - f) ** t`` (all of them training images), so most candidates, carried
   by a handful of images, could not be significant whatever their split; the count is Tarone's
   (Tarone, "A modified Bonferroni method for discrete data", Biometrics 1990): the smallest
   ``K`` such that at most ``K`` candidates can reach ``confirm_alpha / K``. It controls the
   family-wise error as Bonferroni over every candidate does, and on a label of hundreds of
   images it divides by tens of keys instead of thousands.
4. The training images carrying a confirmed key are flagged.

Measured (``python scripts/stamp_population.py``; figures in docs/backdoor.md): the levels,
contrast and window were chosen on the datasets of the tuning parts of the backdoor population
(``tuning``, ``held_out_1``-``3``); on ``held_out_4``-``6`` (measured once, unchanged) every BadNets
row of 30 twins was found with no false row, and no clean dataset had a row flagged. Tarone's
count replaced Bonferroni over every candidate in round 6 of issue 16, when the check began to
divide ``confirm_alpha`` over a model's labels. Blended triggers (no exact pixel survives the
blend) and solid one-colour patches (flat windows, dropped in step 1) are left to the
embedding-based detectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .signatures import Detection

__all__ = ["StampDetection", "stamp_keys", "tarone_count", "train_only_stamps"]

_HASH_BASE = np.uint64(1_000_003)
_CHUNK_VALUES = 1 << 22  # pixels quantised at a time (bounded memory on large images)

ImageLoader = Callable[[NDArray[np.int64]], NDArray[np.floating]]


@dataclass
class StampDetection(Detection):
    """A :class:`Detection` with where the confirmed stamp sits.

    Attributes:
        keys: Confirmed window keys (the stamp's quantised windows).
        box: ``(top, left, bottom, right)`` pixel box of the confirmed windows in the flagged image
            where they are commonest (exclusive bottom/right), or ``None``.
        positions: Distinct boxes among the flagged images (1: a fixed position).
        candidates: Testable keys (Tarone's count, the divisor of the level).
        recurring: Keys carried by at least ``min_rows`` training images (the candidates).
    """

    keys: NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    box: tuple[int, int, int, int] | None = None
    positions: int = 0
    candidates: int = 0
    recurring: int = 0


def stamp_keys(
    images: NDArray[np.floating], *, levels: int = 32, window: int = 3, contrast: float = 0.25
) -> NDArray[np.uint64]:
    """The window keys of ``(B, C, H, W)`` images in [0, 1]: ``(B, H - window + 1, W - window + 1)``.

    A key is a hash of the window's quantised levels over every channel (a different window gives
    a different key but for a 2^-64 collision); 0 marks a window whose levels span less than
    ``contrast`` of the range (dropped).

    Raises:
        ValueError: Not a 4-D array, or images smaller than the window.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {x.shape}")
    _, channels, height, width = x.shape
    if height < window or width < window:
        raise ValueError(f"images of {height} x {width} pixels are smaller than the {window}-pixel window")
    q = np.clip(np.floor(x.astype(np.float32) * levels), 0, levels - 1).astype(np.uint8)
    h, w = height - window + 1, width - window + 1
    key = np.zeros((x.shape[0], h, w), dtype=np.uint64)
    for c in range(channels):
        for dy in range(window):
            for dx in range(window):
                key = key * _HASH_BASE + q[:, c, dy : dy + h, dx : dx + w].astype(np.uint64) + np.uint64(1)
    views = np.lib.stride_tricks.sliding_window_view(q, (window, window), axis=(2, 3))
    span = views.max(axis=(1, 4, 5)).astype(np.int16) - views.min(axis=(1, 4, 5)).astype(np.int16)
    key[span < max(1, round(contrast * levels))] = 0
    return key


def tarone_count(smallest: NDArray[np.floating], alpha: float) -> int:
    """Tarone's number of testable hypotheses: the smallest ``K`` with ``#{smallest <= alpha / K} <= K``.

    Args:
        smallest: Each hypothesis's smallest attainable p-value.
        alpha: The family-wise level.

    Returns:
        ``K`` (1 without a hypothesis); testing the hypotheses whose smallest p-value is at most
        ``alpha / K`` at level ``alpha / K`` controls the family-wise error at ``alpha``.
    """
    order = np.sort(np.asarray(smallest, dtype=np.float64).ravel())
    if order.size == 0:
        return 1
    k = np.arange(1, order.size + 1)
    testable = np.searchsorted(order, alpha / k, side="right")
    return int(k[np.argmax(testable <= k)])  # testable(k) falls and k rises: the first k holds


def _unique_per_image(keys: NDArray[np.uint64]) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Each image's distinct non-zero keys, flattened, with the image index of each."""
    flat = np.sort(keys.reshape(keys.shape[0], -1), axis=1)
    keep = flat != 0
    keep[:, 1:] &= flat[:, 1:] != flat[:, :-1]
    rows = np.broadcast_to(np.arange(flat.shape[0])[:, None], flat.shape)
    return flat[keep], rows[keep]


def _batches(load: ImageLoader, rows: NDArray[np.int64]) -> Iterator[tuple[NDArray[np.int64], NDArray[np.floating]]]:
    """``(rows, images)`` in chunks of about ``_CHUNK_VALUES`` pixels (the first image sets the size)."""
    if rows.size == 0:
        return
    first = np.asarray(load(rows[:1]))
    step = max(1, _CHUNK_VALUES // max(1, int(np.prod(first.shape[1:]))))
    yield rows[:1], first
    for start in range(1, rows.size, step):
        chunk = rows[start : start + step]
        yield chunk, np.asarray(load(chunk))


def _key_counts(
    load: ImageLoader, rows: NDArray[np.int64], levels: int, window: int, contrast: float
) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Distinct keys over ``rows`` and the number of images carrying each."""
    parts = [
        _unique_per_image(stamp_keys(images, levels=levels, window=window, contrast=contrast))[0]
        for _, images in _batches(load, rows)
    ]
    unique, counts = np.unique(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64), return_counts=True)
    return unique, counts.astype(np.int64)


def train_only_stamps(
    load: ImageLoader,
    n: int,
    load_reference: ImageLoader,
    m: int,
    *,
    levels: int = 32,
    window: int = 3,
    contrast: float = 0.25,
    min_rows: int = 5,
    confirm_alpha: float = 0.05,
    confirm_max_ratio: float = 0.25,
    max_images: int = 512,
    rng: np.random.Generator | None = None,
) -> StampDetection:
    """Training images of one label that carry a contrasted window no eval image of it carries.

    Args:
        load: Training images of the label by position ``0..n-1`` -> ``(B, C, H, W)`` in [0, 1].
        n: Training images of the label.
        load_reference: The label's clean eval images by position ``0..m-1``.
        m: Eval images of the label.
        levels: Grey levels of the quantisation.
        window: Window side in pixels (the smallest stamp found whole).
        contrast: Smallest span of a kept window's levels, as a share of the range.
        min_rows: Training images that must carry a key.
        confirm_alpha: Family-wise level over the candidate keys (Tarone's count).
        confirm_max_ratio: Largest eval share / training share of a confirmed key.
        max_images: Images of each split the keys are counted on (a seeded sample beyond); every
            training image is then searched for the confirmed keys.
        rng: Generator of the samples.

    Returns:
        The :class:`StampDetection` (scores: confirmed keys a row carries; statistic: -log10 of the
        smallest adjusted probability, ``p`` times Tarone's count; 0 without a candidate).
    """
    from scipy.stats import binom

    nothing = StampDetection(np.zeros(n), np.zeros(n, dtype=bool), 0.0)
    if n < min_rows or m == 0:
        return nothing
    rng = rng if rng is not None else np.random.default_rng(0)
    train_rows = np.arange(n) if n <= max_images else np.sort(rng.choice(n, size=max_images, replace=False))
    eval_rows = np.arange(m) if m <= max_images else np.sort(rng.choice(m, size=max_images, replace=False))
    keys, train_counts = _key_counts(load, train_rows, levels, window, contrast)
    candidate = train_counts >= min_rows
    keys, train_counts = keys[candidate], train_counts[candidate]
    if keys.size == 0:
        return nothing
    eval_keys, eval_counts = _key_counts(load_reference, eval_rows, levels, window, contrast)
    hits = np.zeros_like(train_counts)
    if eval_keys.size:
        at = np.minimum(np.searchsorted(eval_keys, keys), eval_keys.size - 1)
        hits = np.where(eval_keys[at] == keys, eval_counts[at], 0)
    f = eval_rows.size / (train_rows.size + eval_rows.size)
    p = binom.cdf(hits, train_counts + hits, f)
    testable = tarone_count((1.0 - f) ** (train_counts + hits), confirm_alpha)
    # A key that cannot reach alpha / testable has p above it, so adjusting every key alike
    # confirms only testable ones.
    adjusted = np.minimum(1.0, p * testable)
    ratio_ok = hits / eval_rows.size <= confirm_max_ratio * train_counts / train_rows.size
    confirmed = (adjusted <= confirm_alpha) & ratio_ok
    best = int(np.argmin(adjusted))
    found = keys[confirmed] if confirmed.any() else keys[best : best + 1]
    scores, boxes = _carriers(load, n, found, levels, window, contrast)
    carriers = scores > 0
    detection = StampDetection(
        scores.astype(np.float64),
        carriers.copy() if confirmed.any() else np.zeros(n, dtype=bool),
        float(-np.log10(max(adjusted[best], 1e-300))),
        candidate=carriers if p[best] <= confirm_alpha else None,
        reference_share=float(hits[best] / eval_rows.size),
        confirmation_p=float(adjusted[best]),
        confirmed=bool(confirmed.any()),
        keys=keys[confirmed],
        candidates=testable,
        recurring=int(keys.size),
    )
    if confirmed.any() and boxes:
        distinct, counts = np.unique(np.array(boxes), axis=0, return_counts=True)
        top, left, bottom, right = (int(v) for v in distinct[int(np.argmax(counts))])
        detection.box = (top, left, bottom, right)
        detection.positions = int(distinct.shape[0])
    return detection


def _carriers(
    load: ImageLoader, n: int, keys: NDArray[np.uint64], levels: int, window: int, contrast: float
) -> tuple[NDArray[np.int64], list[tuple[int, int, int, int]]]:
    """Per training image, how many of ``keys`` it carries, and the box of the carried windows."""
    scores = np.zeros(n, dtype=np.int64)
    boxes: list[tuple[int, int, int, int]] = []
    for rows, images in _batches(load, np.arange(n)):
        batch_keys = stamp_keys(images, levels=levels, window=window, contrast=contrast)
        found = np.isin(batch_keys, keys)
        for i, image_keys, hit in zip(rows, batch_keys, found, strict=True):
            if hit.any():
                ys, xs = np.nonzero(hit)
                scores[i] = np.unique(image_keys[hit]).size
                boxes.append((int(ys.min()), int(xs.min()), int(ys.max()) + window, int(xs.max()) + window))
    return scores, boxes
