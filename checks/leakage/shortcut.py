"""Shortcut signals: how well one metadata column alone predicts the label.

A column whose values give the label away (a site where nearly every patient is positive, a
scanner used only for follow-ups) lets a model score well without looking at the anatomy
(DeGrave et al. 2021, "AI for radiographic COVID-19 detection selects shortcuts over signal",
Nature Machine Intelligence; Zech et al. 2018, "Variable generalization performance of a deep
learning model to detect pneumonia in chest radiographs", PLOS Medicine). The measurement is the
cross-validated AUROC of the simplest classifier of the label from the column: out-of-fold target
encoding (each level scored by the smoothed label frequency of that level in the other folds;
Micci-Barreca 2001, "A preprocessing scheme for high-cardinality categorical attributes", SIGKDD
Explorations). Folds keep each patient's images together and the class balance
(:class:`sklearn.model_selection.StratifiedGroupKFold`), so a patient's images never score one
another. 0.5 means the column carries no label information; 1.0 that it alone is a perfect
classifier.

A multi-label study is measured per label, on the images whose entry for that label is known
(:func:`metadata_auroc` on the label's 1/0 entries). A regression target is continuous: the
measurement is then the cross-validated R^2 of the same encoder, each image
predicted by its level's smoothed mean target in the other folds (:func:`metadata_r2`), with folds
that keep each patient's images together (:func:`group_fold_plan`; no stratification for a
continuous target). 0 (or below) means the column carries no information about the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from auditkit.stats import auroc_from_counts, bootstrap_cis, resample_counts

__all__ = [
    "MISSING",
    "AucResult",
    "FoldPlan",
    "R2Result",
    "encode_levels",
    "fold_plan",
    "group_fold_plan",
    "metadata_auroc",
    "metadata_r2",
    "out_of_fold_means",
    "out_of_fold_scores",
]

MISSING = "\x00missing"
"""The level of an image whose column value is absent (never shown: levels are not reported)."""

_NUMERIC_SHARE = 0.9  # a column is numeric when at least this share of its values parse
_QUANTILE_BINS = 10


@dataclass(frozen=True)
class AucResult:
    """The AUROC of one column, or why it is undefined.

    Attributes:
        value: cross-validated AUROC (macro one-vs-rest for more than two classes) or ``None``.
        ci: 95% percentile bootstrap interval over images (binary labels only) or ``None``.
        n: images used.
        n_levels: distinct levels of the column (after binning a numeric column).
        n_missing: images without a value (one level of their own).
        folds: folds used.
        reason: why ``value`` is ``None``.
    """

    value: float | None
    ci: tuple[float, float] | None
    n: int
    n_levels: int
    n_missing: int
    folds: int
    reason: str | None = None


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def encode_levels(values: Sequence[str | None], *, max_levels: int = 20) -> NDArray[np.int64]:
    """Integer level codes of a column; a numeric column with many values is binned.

    Args:
        values: one value per image; ``None`` or blank is its own ``missing`` level.
        max_levels: a column whose values mostly parse as numbers and take more than this many
            distinct values is cut into deciles (edges from all images: unsupervised, so no label
            information enters the encoding).

    Returns:
        ``int64`` codes in ``[0, levels)``, in order of first appearance.
    """
    texts = [MISSING if v is None or not str(v).strip() else str(v).strip() for v in values]
    present = [t for t in texts if t != MISSING]
    distinct = set(present)
    numbers = [_as_number(t) for t in present]
    numeric = [x for x in numbers if x is not None]
    if len(distinct) > max_levels and len(numeric) >= _NUMERIC_SHARE * max(len(present), 1):
        edges = np.unique(np.quantile(numeric, np.linspace(0, 1, _QUANTILE_BINS + 1)[1:-1]))
        binned = []
        for text in texts:
            number = None if text == MISSING else _as_number(text)
            binned.append(MISSING if number is None else f"bin{np.searchsorted(edges, number)}")
        texts = binned
    index: dict[str, int] = {}
    return np.array([index.setdefault(t, len(index)) for t in texts], dtype=np.int64)


def out_of_fold_scores(
    codes: NDArray[np.int64],
    labels: NDArray[np.int64],
    folds: list[tuple[NDArray[np.intp], NDArray[np.intp]]],
    n_classes: int,
    *,
    smoothing: float = 1.0,
) -> NDArray[np.float64]:
    """Each image's score per class: its level's excess class rate in the other folds.

    ``score_k = (count(level, k) + smoothing * prior_k) / (count(level) + smoothing) - prior_k``
    with the fit folds' class priors: the smoothed rate of class ``k`` at that level minus the
    base rate. A level unseen in the fit folds (or a column with one level) scores 0. Removing
    the fit folds' prior keeps scores of different folds comparable: the fold priors are
    anti-correlated with the held-out labels, so raw rates would push a useless column below
    an AUROC of 0.5.

    Returns:
        ``(N, n_classes)`` float64 scores in ``[-1, 1]`` (rows outside every test fold stay NaN).
    """
    n_levels = int(codes.max()) + 1 if codes.size else 0
    scores = np.full((codes.size, n_classes), np.nan)
    for fit, test in folds:
        counts = np.zeros((n_levels, n_classes))
        np.add.at(counts, (codes[fit], labels[fit]), 1.0)
        prior = np.bincount(labels[fit], minlength=n_classes) / max(fit.size, 1)
        level = counts[codes[test]]
        rate = (level + smoothing * prior) / (level.sum(axis=1, keepdims=True) + smoothing)
        scores[test] = np.round(rate - prior, 12)  # exact ties stay ties despite rounding
    return scores


def _batched_auroc(scores: NDArray[np.float64], positive: NDArray[np.bool_]):  # type: ignore[no-untyped-def]
    """AUROC of many resamples at once: Mann-Whitney U with mid-ranks for ties, the scores sorted
    once and each resample given by its row multiplicities."""

    def statistic(idx: NDArray[np.intp]) -> NDArray[np.float64]:
        return auroc_from_counts(scores, positive, resample_counts(idx, scores.size))

    return statistic


@dataclass(frozen=True)
class FoldPlan:
    """The cross-validation folds of a shortcut search, shared by every column searched.

    The folds depend on the labels and patients only, never on a column's values, so one plan
    serves every column: each column is then scored on the same folds (comparable AUROCs) and
    the grouped fold assignment, the slow part, is computed once.

    Attributes:
        folds: ``(fit, test)`` row index pairs; empty when the AUROC is undefined.
        k: number of folds (0 when undefined by the labels).
        reason: why no folds could be made, else ``None``.
        n: number of images the plan was made for.
    """

    folds: list[tuple[NDArray[np.intp], NDArray[np.intp]]]
    k: int
    reason: str | None = None
    n: int | None = None


def fold_plan(
    labels: NDArray[np.int64],
    *,
    groups: Sequence[str | None] | None,
    folds: int,
    rng: np.random.Generator,
) -> FoldPlan:
    """Stratified folds that keep each patient's images together.

    Args:
        labels: ``int64`` class index per image.
        groups: patient surrogate per image (``None`` entries are singletons), or ``None`` for
            ungrouped (stratified only) folds.
        folds: number of folds wanted; reduced to the smallest class count (images, or patients
            when grouped) when that is smaller.
        rng: draws the seed of the fold assignment (one integer).

    Returns:
        The :class:`FoldPlan`; its ``reason`` says why there are none (a single class, fewer than
        2 images or patients of some class).
    """
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    if present.size < 2:
        return FoldPlan([], 0, "the labels hold a single class", labels.size)
    k = int(min(folds, np.bincount(labels)[present].min()))
    if k < 2:
        return FoldPlan([], k, "fewer than 2 images of some class for 2 folds", labels.size)
    seed = int(rng.integers(0, 2**31 - 1))
    placeholder = np.zeros((labels.size, 1))  # the splitters read only the number of rows
    if groups is not None and any(g is not None for g in groups):
        group_ids = np.array([g if g is not None else f"\x00image{i}" for i, g in enumerate(groups)], dtype=object)
        patients_per_class = min(len(set(group_ids[labels == c].tolist())) for c in present.tolist())
        k = min(k, patients_per_class)
        if k < 2:
            return FoldPlan([], k, "fewer than 2 patients of some class for 2 folds", labels.size)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return FoldPlan(list(splitter.split(placeholder, labels, groups=group_ids)), k, n=labels.size)
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(placeholder, labels)
    return FoldPlan(list(split), k, n=labels.size)


def metadata_auroc(
    values: Sequence[str | None],
    labels: NDArray[np.int64],
    *,
    n_classes: int,
    positive_class: int | None,
    groups: Sequence[str | None] | None,
    folds: int,
    n_boot: int,
    rng: np.random.Generator,
    max_levels: int = 20,
    plan: FoldPlan | None = None,
) -> AucResult:
    """Cross-validated AUROC of predicting ``labels`` from one column alone.

    Args:
        values: the column, one value per image (kept in memory; never reported).
        labels: ``int64`` class index per image.
        n_classes: number of classes of the model.
        positive_class: the class scored when two classes are present (default, or when it is
            not among them: the higher class index). With more classes the AUROC is the macro
            average of one-vs-rest AUROCs.
        groups: patient surrogate per image (``None`` entries are singletons); folds keep a
            patient's images together.
        folds: number of folds (reduced to the smallest class count when that is smaller).
        n_boot: bootstrap resamples of the interval (binary labels); 0 for none.
        rng: generator of the fold assignment (unless ``plan`` is given) and the bootstrap.
        max_levels: see :func:`encode_levels`.
        plan: folds made by :func:`fold_plan` on the same ``labels`` (and ``groups``), to score
            several columns on the same folds; ``groups`` and ``folds`` are then not used.

    Returns:
        The :class:`AucResult`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    codes = encode_levels(values, max_levels=max_levels)
    n_missing = sum(1 for v in values if v is None or not str(v).strip())
    n_levels = int(codes.max()) + 1 if codes.size else 0
    present = np.unique(labels)
    n = int(labels.size)

    def result(value: float | None, ci: tuple[float, float] | None, folds: int, reason: str | None = None) -> AucResult:
        return AucResult(value, ci, n, n_levels, n_missing, folds, reason)

    if present.size < 2:
        return result(None, None, 0, "the labels hold a single class")
    if n_missing == labels.size:
        return result(None, None, 0, "no image has a value")
    if plan is None:
        plan = fold_plan(labels, groups=groups, folds=folds, rng=rng)
    elif plan.n != labels.size:
        raise ValueError(f"the fold plan was made for {plan.n} images, but {labels.size} labels are given")
    if plan.reason is not None:
        return result(None, None, plan.k, plan.reason)
    split, k = plan.folds, plan.k
    scores = out_of_fold_scores(codes, labels, split, n_classes)
    scored = ~np.isnan(scores).any(axis=1)
    if present.size == 2:
        positive = positive_class if positive_class in present.tolist() else int(present.max())
        y = labels[scored] == positive
        s = scores[scored, positive]
        value = float(roc_auc_score(y, s))
        ci = None
        if n_boot > 0:
            ci = bootstrap_cis(
                {"auroc": _batched_auroc(s, y)},
                int(s.size),
                n_boot=n_boot,
                rng=rng,
                estimates={"auroc": value},  # centred on the reported scikit-learn value exactly
                bounds=(0.0, 1.0),
            )["auroc"]
        return result(value, ci, k)
    value = float(np.mean([roc_auc_score(labels[scored] == k, scores[scored, k]) for k in present.tolist()]))
    return result(value, None, k)


# --------------------------------------------------------------------------------------------
# A continuous target (task: regression)


@dataclass(frozen=True)
class R2Result:
    """The cross-validated R^2 of one column for one continuous target, or why it
    is undefined.

    Attributes:
        value: ``1 - SSE / SST`` of the out-of-fold predictions (scikit-learn's ``r2_score``; 0 or
            below: no information) or ``None``.
        ci: 95% median-centred bootstrap interval over images (the out-of-fold predictions held
            fixed) or ``None``.
        n: images used.
        n_levels: distinct levels of the column (after binning a numeric column).
        n_missing: images without a value (one level of their own).
        folds: folds used.
        reason: why ``value`` is ``None``.
    """

    value: float | None
    ci: tuple[float, float] | None
    n: int
    n_levels: int
    n_missing: int
    folds: int
    reason: str | None = None


def group_fold_plan(
    n: int,
    *,
    groups: Sequence[str | None] | None,
    folds: int,
    rng: np.random.Generator,
) -> FoldPlan:
    """Folds for a continuous target: each patient's images together, no stratification.

    Args:
        n: number of images.
        groups: patient surrogate per image (``None`` entries are singletons), or ``None`` for
            ungrouped folds.
        folds: number of folds wanted; reduced to the number of patients (images when ungrouped)
            when that is smaller.
        rng: draws the seed of the fold assignment (one integer).

    Returns:
        The :class:`FoldPlan` (:class:`sklearn.model_selection.GroupKFold` with shuffling, or
        :class:`sklearn.model_selection.KFold`); its ``reason`` says why there are none.
    """
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} patient surrogates for {n} images")
    grouped = groups is not None and any(g is not None for g in groups)
    units = len({g if g is not None else f"\x00image{i}" for i, g in enumerate(groups or [])}) if grouped else n
    k = int(min(folds, units))
    if k < 2:
        what = "patients" if grouped else "images"
        return FoldPlan([], k, f"fewer than 2 {what} for 2 folds", n)
    seed = int(rng.integers(0, 2**31 - 1))
    placeholder = np.zeros((n, 1))
    if grouped:
        assert groups is not None
        group_ids = np.array([g if g is not None else f"\x00image{i}" for i, g in enumerate(groups)], dtype=object)
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return FoldPlan(list(splitter.split(placeholder, groups=group_ids)), k, n=n)
    return FoldPlan(list(KFold(n_splits=k, shuffle=True, random_state=seed).split(placeholder)), k, n=n)


def out_of_fold_means(
    codes: NDArray[np.int64],
    targets: NDArray[np.float64],
    folds: list[tuple[NDArray[np.intp], NDArray[np.intp]]],
    *,
    smoothing: float = 1.0,
) -> NDArray[np.float64]:
    """Each image's prediction: its level's smoothed mean target in the other folds.

    ``(sum(level) + smoothing * mean) / (count(level) + smoothing)`` with the fit folds' mean
    target; a level unseen in the fit folds is predicted by that mean.

    Returns:
        ``(N,)`` float64 predictions (rows outside every test fold stay NaN).
    """
    n_levels = int(codes.max()) + 1 if codes.size else 0
    predictions = np.full(codes.size, np.nan)
    for fit, test in folds:
        mean = float(targets[fit].mean())
        sums = np.bincount(codes[fit], weights=targets[fit], minlength=n_levels)
        counts = np.bincount(codes[fit], minlength=n_levels).astype(np.float64)
        predictions[test] = (sums[codes[test]] + smoothing * mean) / (counts[codes[test]] + smoothing)
    return predictions


def _batched_r2(targets: NDArray[np.float64], predictions: NDArray[np.float64]):  # type: ignore[no-untyped-def]
    """R^2 of many resamples at once (NaN where a resample's target is constant)."""

    def statistic(idx: NDArray[np.intp]) -> NDArray[np.float64]:
        y, f = targets[idx], predictions[idx]
        sse = np.sum((y - f) ** 2, axis=1)
        sst = np.sum((y - y.mean(axis=1, keepdims=True)) ** 2, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)

    return statistic


def metadata_r2(
    values: Sequence[str | None],
    targets: NDArray[np.float64],
    *,
    groups: Sequence[str | None] | None,
    folds: int,
    n_boot: int,
    rng: np.random.Generator,
    max_levels: int = 20,
    plan: FoldPlan | None = None,
) -> R2Result:
    """Cross-validated R^2 of predicting a continuous ``targets`` from one column
    alone.

    Args:
        values: the column, one value per image (kept in memory; never reported).
        targets: the finite target per image.
        groups: patient surrogate per image (``None`` entries are singletons); folds keep a
            patient's images together.
        folds: number of folds (reduced to the number of patients when that is smaller).
        n_boot: bootstrap resamples of the interval; 0 for none.
        rng: generator of the fold assignment (unless ``plan`` is given) and the bootstrap.
        max_levels: see :func:`encode_levels`.
        plan: folds made by :func:`group_fold_plan` for the same images, to score several columns
            and targets on the same folds; ``groups`` and ``folds`` are then not used.

    Returns:
        The :class:`R2Result`: scikit-learn's ``r2_score`` of the targets and the out-of-fold
        predictions of :func:`out_of_fold_means` (pooled over folds).

    Raises:
        ValueError: a target is not finite, or ``plan`` was made for another number of images.
    """
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 1 or not np.isfinite(targets).all():
        raise ValueError("targets must be one finite number per image")
    codes = encode_levels(values, max_levels=max_levels)
    n_missing = sum(1 for v in values if v is None or not str(v).strip())
    n_levels = int(codes.max()) + 1 if codes.size else 0
    n = int(targets.size)

    def result(value: float | None, ci: tuple[float, float] | None, k: int, reason: str | None = None) -> R2Result:
        return R2Result(value, ci, n, n_levels, n_missing, k, reason)

    if n < 2 or float(np.ptp(targets)) == 0.0:
        return result(None, None, 0, "the target is constant (R^2 is undefined)")
    if n_missing == n:
        return result(None, None, 0, "no image has a value")
    if plan is None:
        plan = group_fold_plan(n, groups=groups, folds=folds, rng=rng)
    elif plan.n != n:
        raise ValueError(f"the fold plan was made for {plan.n} images, but {n} targets are given")
    if plan.reason is not None:
        return result(None, None, plan.k, plan.reason)
    predictions = out_of_fold_means(codes, targets, plan.folds)
    scored = ~np.isnan(predictions)
    y, f = targets[scored], predictions[scored]
    if float(np.ptp(y)) == 0.0:
        return result(None, None, plan.k, "the target is constant (R^2 is undefined)")
    value = float(r2_score(y, f))
    ci = None
    if n_boot > 0:
        ci = bootstrap_cis(
            {"r2": _batched_r2(y, f)},
            int(y.size),
            n_boot=n_boot,
            rng=rng,
            estimates={"r2": value},
            bounds=(-np.inf, 1.0),
        )["r2"]
    return result(value, ci, plan.k)
