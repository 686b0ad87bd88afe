"""Samples and primary metrics of the multi-label and regression tasks (plain functions).

The robustness checks (``adversarial``, ``corruption``) measure a task's primary metric on a
sample of the eval split, clean and perturbed, with paired bootstrap intervals. This module holds
what they share for ``task: multilabel`` and ``task: regression``; the classification paths keep
their own code (accuracy of class-stratified samples).

Samples (:func:`task_sample`):

* multilabel: every label's AUROC needs a known positive and a known negative in the sample.
  The sample first takes, for each (label, value) class in order of rarity that the sample does
  not hold yet, one random image of that class (at most ``2 K`` images), then fills up with a
  sample stratified by each image's rarest class (:func:`sample_strata`, through
  :func:`auditkit.sampling.stratified_sample`). A label with a single known class in the whole
  split stays undefined (with the reason).
* regression: stratified by the quintile of the first output's target, so the sample spans the
  range of targets.

Metrics:

* macro AUROC (:func:`label_aurocs`, :func:`macro_auroc`): per label, the Mann-Whitney AUROC
  (scikit-learn's ``roc_auc_score``) of the scores on the entries whose label is known (1 or 0;
  -1 = unknown, left out and counted); the mean over the labels with both classes in the sample.
  A label with one class is undefined, with the reason, and left out of the mean.
* MAE (:func:`absolute_errors`, :func:`mae_per_output`): mean absolute error per output over the
  images whose target is known, in the output's unit (``model.units``).

Bootstraps (:func:`bootstrap_macro_aurocs`, :func:`bootstrap_maes`) evaluate every condition
(clean, each attack or corruption) on the same resamples, so differences between conditions get
paired intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from auditkit.sampling import stratified_sample
from auditkit.stats import auroc_from_counts, bootstrap_indices, resample_counts

__all__ = [
    "LabelAUROC",
    "absolute_errors",
    "bootstrap_macro_aurocs",
    "bootstrap_maes",
    "bootstrap_mean_dice",
    "label_aurocs",
    "macro_auroc",
    "mae_per_output",
    "mean_dice",
    "regression_units",
    "sample_strata",
    "task_sample",
    "task_scores",
    "worst_case_scores",
]

REGRESSION_BINS = 5
"""Regression samples are stratified by the quintile of the first output's target."""

_MAX_BLOCK_ELEMENTS = 1 << 22
"""Bootstrap resamples are drawn in blocks of at most this many indices."""


# --------------------------------------------------------------------------------------------
# Samples


def _class_matrix(labels: NDArray[Any]) -> NDArray[np.bool_]:
    """``(N, 2K)`` membership of each image in each (label, value) class: column ``2k + v``."""
    y = np.asarray(labels, dtype=np.int64)
    members = np.zeros((y.shape[0], 2 * y.shape[1]), dtype=bool)
    members[:, 0::2] = y == 0
    members[:, 1::2] = y == 1
    return members


def sample_strata(labels: NDArray[Any], task: str) -> NDArray[np.int64]:
    """One stratum per image, for a stratified sample or a stratified bootstrap.

    Args:
        labels: classification ``(N,)`` class indices; multilabel ``(N, K)`` of 1/0/-1;
            regression ``(N, K)`` float targets (NaN unknown).
        task: ``model.task``.

    Returns:
        int64 ``(N,)``: classification, the class; multilabel, the image's rarest (label, value)
        class (column ``2k + v``, ties to the lower column; ``2K`` for an image without any known
        label); regression, the quintile of the first output's target (``5`` when unknown);
        segmentation (label maps ``(N, *spatial)``), how many foreground classes the reference
        holds (0 for an empty reference).
    """
    if task == "classification":
        return np.asarray(labels, dtype=np.int64)
    y = np.asarray(labels)
    n = y.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if task == "segmentation":
        flat = y.reshape(n, -1)
        present = [(flat == k).any(axis=1) for k in range(1, int(flat.max(initial=0)) + 1)]
        return np.sum(present, axis=0).astype(np.int64) if present else np.zeros(n, dtype=np.int64)
    if task == "multilabel":
        members = _class_matrix(y)
        counts = members.sum(axis=0)
        # An image's rarest class: the member column of lowest split-wide count.
        rank = np.where(members, counts[None, :], np.iinfo(np.int64).max)
        rarest: NDArray[np.int64] = np.argmin(rank, axis=1).astype(np.int64)
        rarest[~members.any(axis=1)] = members.shape[1]
        return rarest
    target = np.asarray(y, dtype=np.float64).reshape(n, -1)[:, 0]
    known = np.isfinite(target)
    strata = np.full(n, REGRESSION_BINS, dtype=np.int64)
    if known.any():
        edges = np.quantile(target[known], np.linspace(0.0, 1.0, REGRESSION_BINS + 1)[1:-1])
        strata[known] = np.searchsorted(edges, target[known], side="right")
    return strata


def task_sample(labels: NDArray[Any], task: str, n: int | None, rng: np.random.Generator) -> NDArray[np.intp]:
    """Sorted row indices of a seeded sample of ``n`` images (see the module docstring).

    Classification is :func:`auditkit.sampling.stratified_sample` on the classes, unchanged.

    Args:
        labels: as :func:`sample_strata`.
        task: ``model.task``.
        n: sample size; ``None`` or ``n >= N`` takes every image.
        rng: the only source of randomness.
    """
    if task == "classification":
        return stratified_sample(labels, n, rng)
    y = np.asarray(labels)
    total = int(y.shape[0])
    if n is not None and n < 0:
        raise ValueError(f"sample size must be non-negative, got {n}")
    if n is None or n >= total:
        return np.arange(total, dtype=np.intp)
    chosen: list[int] = []
    if task == "multilabel":
        members = _class_matrix(y)
        counts = members.sum(axis=0)
        held = np.zeros(members.shape[1], dtype=bool)
        for column in np.lexsort((np.arange(len(counts)), counts)).tolist():
            if len(chosen) >= n:
                break
            if counts[column] == 0 or held[column]:
                continue
            pick = int(rng.choice(np.flatnonzero(members[:, column])))
            chosen.append(pick)
            held |= members[pick]
    rest = np.setdiff1d(np.arange(total), np.asarray(chosen, dtype=np.intp))
    strata = sample_strata(y, task)[rest]
    more = rest[stratified_sample(strata, n - len(chosen), rng)]
    return np.sort(np.concatenate([np.asarray(chosen, dtype=np.intp), more])).astype(np.intp)


# --------------------------------------------------------------------------------------------
# Multilabel: macro AUROC


def task_scores(outputs: torch.Tensor, task: str) -> NDArray[np.float64]:
    """float64 scores of model outputs ``(N, K)`` as the shared pass computes them: the sigmoid
    of each logit (multilabel), the values themselves (regression)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if task == "multilabel":
            return np.asarray(torch.sigmoid(outputs.double()).numpy(), dtype=np.float64)
        return np.array(outputs.double().numpy(), dtype=np.float64, copy=True)


@dataclass(frozen=True)
class LabelAUROC:
    """One label's AUROC on a sample.

    Attributes:
        label: the label's name.
        value: the AUROC, or ``None`` when the sample lacks a known positive or negative.
        positives: known positive entries.
        negatives: known negative entries.
        unknown: entries left out (label -1).
        reason: why ``value`` is ``None``.
    """

    label: str
    value: float | None
    positives: int
    negatives: int
    unknown: int
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "auroc": self.value,
            "positives": self.positives,
            "negatives": self.negatives,
            "unknown": self.unknown,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def worst_case_scores(scores: NDArray[np.float64], labels: NDArray[Any]) -> NDArray[np.float64]:
    """``scores`` with every NaN replaced by the worst score for its truth.

    A non-finite model output is a failure of the model, never a lucky rank: a positive entry
    gets ``-inf`` (below every negative), a negative (or unknown) one ``+inf``.
    """
    out = np.array(scores, dtype=np.float64, copy=True)
    bad = np.isnan(out)
    if bad.any():
        out[bad] = np.where(np.asarray(labels)[bad] == 1, -np.inf, np.inf)
    return out


def label_aurocs(scores: NDArray[np.float64], labels: NDArray[Any], names: Sequence[str]) -> list[LabelAUROC]:
    """Per-label AUROC on the known entries (the Mann-Whitney statistic, as scikit-learn's).

    Args:
        scores: float ``(N, K)``, higher = more likely present (sigmoid or logit; NaN is
            treated by :func:`worst_case_scores`).
        labels: int ``(N, K)`` of 1, 0 and -1 (unknown).
        names: the ``K`` label names.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = worst_case_scores(scores, y)
    out = []
    for k, name in enumerate(names):
        known = y[:, k] >= 0
        positives, negatives = int((y[:, k] == 1).sum()), int((y[:, k] == 0).sum())
        unknown = int((~known).sum())
        if positives == 0 or negatives == 0:
            missing = "positive" if positives == 0 else "negative"
            reason = (
                f"label {name!r}: no known {missing} entry in the sample ({positives} positive, {negatives} negative)"
            )
            out.append(LabelAUROC(name, None, positives, negatives, unknown, reason))
            continue
        ones = np.ones((1, int(known.sum())), dtype=np.intp)
        value = float(auroc_from_counts(s[known, k], y[known, k] == 1, ones)[0])
        out.append(LabelAUROC(name, value, positives, negatives, unknown))
    return out


def macro_auroc(per_label: Sequence[LabelAUROC]) -> tuple[float | None, str | None]:
    """The mean AUROC over the labels it is defined for, or ``None`` and the reason."""
    defined = [p.value for p in per_label if p.value is not None]
    if not defined:
        return None, "no label has both a known positive and a known negative entry in the sample"
    return float(np.mean(defined)), None


def mean_dice(dice: NDArray[np.float64]) -> float | None:
    """The mean over foreground classes of each class's mean Dice over the cases where it is
    defined (``dice``: ``(n, K - 1)``, NaN where a case's reference lacks the class); ``None`` when
    no class is defined anywhere."""
    defined = np.isfinite(dice)
    counts = defined.sum(axis=0)
    if not (counts > 0).any():
        return None
    per_class = np.where(defined, dice, 0.0).sum(axis=0)[counts > 0] / counts[counts > 0]
    return float(per_class.mean())


def bootstrap_mean_dice(
    dice_sets: Sequence[NDArray[np.float64]],
    *,
    n_boot: int,
    rng: np.random.Generator,
    strata: NDArray[Any] | None = None,
) -> NDArray[np.float64]:
    """:func:`mean_dice` of every condition on the same case resamples: ``(B, conditions)``."""
    n = dice_sets[0].shape[0]
    out = np.full((n_boot, len(dice_sets)), np.nan)
    if n == 0 or n_boot == 0:
        return out[:0] if n_boot == 0 else out
    for start, size, idx in _blocks(n, n_boot, rng, strata):
        counts = resample_counts(idx, n).astype(np.float64)  # (size, n)
        for c, dice in enumerate(dice_sets):
            defined = np.isfinite(dice)
            sums = counts @ np.where(defined, dice, 0.0)
            totals = counts @ defined.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_class = np.where(totals > 0, sums / np.where(totals > 0, totals, 1.0), np.nan)
                valid = np.isfinite(per_class)
                means = np.where(valid, per_class, 0.0).sum(axis=1) / valid.sum(axis=1)
            out[start : start + size, c] = np.where(valid.any(axis=1), means, np.nan)
    return out


def _blocks(n: int, n_boot: int, rng: np.random.Generator, strata: NDArray[Any] | None) -> Any:
    block = max(1, min(n_boot, _MAX_BLOCK_ELEMENTS // max(n, 1)))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        yield start, size, bootstrap_indices(n, n_boot=size, rng=rng, strata=strata)


def bootstrap_macro_aurocs(
    score_sets: Sequence[NDArray[np.float64]],
    labels: NDArray[Any],
    *,
    n_boot: int,
    rng: np.random.Generator,
    strata: NDArray[Any] | None = None,
) -> NDArray[np.float64]:
    """Macro AUROC of several score matrices on the same bootstrap resamples.

    Every condition is evaluated on the same resampled images, so differences between conditions
    (the relative drop of a corruption against clean) get paired intervals. The macro mean is over
    the labels defined on the sample itself (the same for every condition); a resample on which
    one of them lacks a class is undefined (NaN) rather than averaged over fewer labels.

    Args:
        score_sets: ``C`` float ``(n, K)`` score matrices of the same images.
        labels: int ``(n, K)`` of 1, 0 and -1.
        n_boot: number of resamples.
        rng: the generator to draw from.
        strata: optional stratum per image (see :func:`auditkit.stats.bootstrap_indices`).

    Returns:
        float64 ``(n_boot, C)`` (empty when ``n_boot`` is 0 or ``n`` < 2).
    """
    y = np.asarray(labels, dtype=np.int64)
    n, k_labels = y.shape
    out = np.full((max(n_boot, 0), len(score_sets)), np.nan, dtype=np.float64)
    if n_boot <= 0 or n < 2:
        return out[:0]
    used = [k for k in range(k_labels) if (y[:, k] == 1).any() and (y[:, k] == 0).any()]
    if not used:
        return out
    scores = [worst_case_scores(s, y) for s in score_sets]
    for start, size, idx in _blocks(n, n_boot, rng, strata):
        counts = resample_counts(idx, n)
        total = np.zeros((size, len(scores)), dtype=np.float64)
        for k in used:
            known = y[:, k] >= 0
            positive = y[known, k] == 1
            for c, s in enumerate(scores):
                total[:, c] += auroc_from_counts(s[known, k], positive, counts[:, known])
        out[start : start + size] = total / len(used)
    return out


# --------------------------------------------------------------------------------------------
# Regression: MAE


def absolute_errors(predicted: NDArray[np.float64], targets: NDArray[Any]) -> NDArray[np.float64]:
    """``|predicted - target|`` per image and output, NaN where the target is unknown.

    A non-finite prediction of a known target gives ``inf``: the MAE is then undefined, not
    silently averaged over fewer images.
    """
    y = np.asarray(targets, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64).reshape(y.shape)
    with np.errstate(invalid="ignore"):
        errors = np.abs(p - y)
    errors[np.isfinite(y) & ~np.isfinite(p)] = np.inf
    return errors


def mae_per_output(errors: NDArray[np.float64]) -> NDArray[np.float64]:
    """MAE per output over the known targets (NaN for an output without one; inf if a
    prediction was not finite)."""
    known = ~np.isnan(errors)
    count = known.sum(axis=0)
    total = np.where(known, errors, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_maes(
    error_sets: Sequence[NDArray[np.float64]],
    *,
    n_boot: int,
    rng: np.random.Generator,
    strata: NDArray[Any] | None = None,
) -> NDArray[np.float64]:
    """MAE per output of several error matrices on the same bootstrap resamples.

    Args:
        error_sets: ``C`` float ``(n, K)`` absolute errors (:func:`absolute_errors`) of the same
            images.
        n_boot: number of resamples.
        rng: the generator to draw from.
        strata: optional stratum per image.

    Returns:
        float64 ``(n_boot, C, K)`` (empty when ``n_boot`` is 0 or ``n`` < 2).
    """
    n, k_outputs = error_sets[0].shape if error_sets else (0, 0)
    if n_boot <= 0 or n < 2 or not error_sets:
        return np.empty((0, len(error_sets), k_outputs), dtype=np.float64)
    known = ~np.isnan(error_sets[0])
    values = np.stack([np.where(known, e, 0.0) for e in error_sets])  # (C, n, K)
    out = np.empty((n_boot, len(error_sets), k_outputs), dtype=np.float64)
    for start, size, idx in _blocks(n, n_boot, rng, strata):
        # Resample weights (how often each image was drawn) turn every mean into one product.
        weights = resample_counts(idx, n).astype(np.float64)
        count = weights @ known.astype(np.float64)  # (B, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            sums = np.einsum("bn,cnk->bck", weights, values)
            out[start : start + size] = np.where(count[:, None, :] > 0, sums / count[:, None, :], np.nan)
    return out


def regression_units(names: Sequence[str], units: dict[str, str]) -> dict[str, str | None]:
    """The unit of each output (``model.units``), ``None`` where the spec gives none."""
    return {name: units.get(name) for name in names}


def sample_summary(targets: NDArray[Any], task: str, names: Sequence[str], units: dict[str, str]) -> dict[str, Any]:
    """What a sample of a multi-label or regression split holds, for a check's findings: per label
    the positive, negative and unknown entries; per output the known targets' count, mean and
    standard deviation with the unit (no single value: a minimum or maximum would be one
    patient's)."""
    if task == "multilabel":
        codes = np.asarray(targets, dtype=np.int64)
        return {
            "label_counts": {
                name: {
                    "positive": int((codes[:, k] == 1).sum()),
                    "negative": int((codes[:, k] == 0).sum()),
                    "unknown": int((codes[:, k] < 0).sum()),
                }
                for k, name in enumerate(names)
            }
        }
    y = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    out: dict[str, Any] = {}
    for k, name in enumerate(names):
        known = y[:, k][np.isfinite(y[:, k])]
        out[name] = {
            "known": int(known.size),
            "mean": float(known.mean()) if known.size else None,
            "sd": float(known.std()) if known.size else None,
            "unit": units.get(name),
        }
    return {"targets": out}
