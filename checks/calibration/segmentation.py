"""The calibration check on a segmentation model: voxel calibration within a region of interest.

:func:`run_segmentation` is :class:`~auditkit.checks.calibration.CalibrationCheck` for
``model.task: segmentation`` (2-D images and 3-D volumes alike).

Why a region of interest. Nearly every voxel of a medical image is background that the model calls
background with a probability of 1.000: counted in, those voxels pull any calibration error towards
0 however wrong the probabilities are where it matters, at the boundary of a lesion or organ. So
each foreground class ``k`` is measured, case by case, within its *region of interest* (ROI): the
union of the reference's and the prediction's class-``k`` voxels, grown by a margin (every voxel
whose centre lies within ``margin`` of a voxel of the union, Euclidean distance, in voxels of the
model grid or in millimetres with the case's spacing; :func:`region_of_interest`). A case where
neither the reference nor the prediction holds the class contributes no ROI.

What is measured. Within the ROI, ``p_k`` (the softmax probability of class ``k``) is a binary
forecast of the outcome ``reference == k``: the positive-class convention of :mod:`.binary`
(within a bin of ``p_k``, is the voxel of class ``k`` as often as predicted?), with the same
binning (netcal's: ``p`` clipped to ``[eps, 1 - eps]``, equal-width bins ``[lower, upper)``). So
a class's ECE is exactly the binary ECE (netcal's ``ECE(bins)`` on 1-D input) of the concatenated
ROI voxels of all cases, its MCE netcal's ``MCE``, its Brier score scikit-learn's
``brier_score_loss`` and its NLL ``log_loss`` on them. The class-agnostic version is the top-label
ECE and MCE of :mod:`.metrics` (largest probability against ``argmax == reference``) within the
union of every class's ROI.

Streaming. No array of all voxels is ever formed: one pass over the cases keeps, per case and
scope, the sums of each equal-width bin (voxels, outcomes, clipped probabilities) and the sums of
the Brier and log-loss terms (:class:`CaseTables`, ``(N, bins)`` and ``(N,)`` float64 arrays);
memory beyond the predictions themselves is one case's maps. Every metric is a function of the
tables summed over cases, and a bootstrap resample of patients is a weighted sum of the cases'
tables (a case's weight is how often its patient was drawn), so the intervals are exact
bootstraps of the voxel-level metrics at the cost of a ``(B, N) @ (N, bins)`` product.

Not measured for segmentation, with the reasons in a ``not_measured`` finding: the ACE
(equal-mass bins need the quantiles of every ROI voxel's probability, which the streaming pass
does not hold) and ``ece_after_temperature`` (a voxel-level temperature, cross-fitted over cases,
needs the logits of every ROI voxel through repeated passes; not implemented).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from auditkit.check import CheckResult, Metric
from auditkit.checks.calibration.binary import BINARY_BOUNDS, cluster_codes, resampled_counts
from auditkit.checks.calibration.metrics import _EPS, FloatArray, _equal_width_bins, _to_numpy
from auditkit.checks.calibration.plots import BinnedPanel, class_reliability_grid
from auditkit.errors import InputError
from auditkit.stats import median_centred_interval, stable_seed

if TYPE_CHECKING:
    from auditkit.check import CheckContext
    from auditkit.checks.calibration import CalibrationParams

__all__ = [
    "CLASS_METRIC_NAMES",
    "GROUP_METRIC_NAMES",
    "NOT_MEASURED",
    "TOP_LABEL_METRIC_NAMES",
    "CaseTables",
    "SegmentationTables",
    "region_of_interest",
    "run_segmentation",
    "segmentation_tables",
]

CLASS_METRIC_NAMES: tuple[str, ...] = ("ece", "mce", "brier", "nll")
"""Metrics per foreground class (``{"class": name}``), positive-class convention within its ROI."""

GROUP_METRIC_NAMES: tuple[str, ...] = ("ece", "brier")
"""Metrics per foreground class and subgroup (``{"class", "group_by", "group"}``)."""

TOP_LABEL_METRIC_NAMES: tuple[str, ...] = ("ece", "mce")
"""Class-agnostic top-label metrics (``labels={}``) within the union of every class's ROI."""

NOT_MEASURED: dict[str, str] = {
    "calibration.ace": (
        "equal-mass bins need the quantiles of the probabilities of every voxel in the regions of"
        " interest, which the streaming pass over cases does not hold (it keeps per-case sums of"
        " equal-width bins only)"
    ),
    "calibration.ece_after_temperature": (
        "a voxel-level temperature, cross-fitted over cases, needs the logits of every voxel in the"
        " regions of interest through repeated passes; not implemented for segmentation"
    ),
}
"""The check's other metrics, not measured on a segmentation model, and why."""


# --------------------------------------------------------------------------------------------
# Region of interest

_TIE = 1e-9
"""Relative slack of the margin: a voxel at exactly the margin's distance is in the ROI."""


def region_of_interest(
    union: NDArray[np.bool_], margin: float, sampling: ArrayLike | None = None
) -> tuple[tuple[slice, ...], NDArray[np.bool_]]:
    """The voxels within ``margin`` of ``union``: a bounding box and the ROI inside it.

    A voxel is in the ROI when the Euclidean distance from its centre to the centre of the
    nearest voxel of ``union`` is at most ``margin`` (up to a relative ``1e-9``, so that a tie is in
    whatever the float rounding; ``scipy.ndimage.distance_transform_edt``
    with ``sampling``), which for unit sampling and an integer margin is the binary dilation of
    ``union`` by a ball of that radius. It is computed within the union's bounding box grown by
    the margin along each axis (no voxel outside can be that close), so the cost follows the
    ROI, not the image.

    Args:
        union: a boolean map of any rank (2-D image or 3-D volume), at least one voxel set.
        margin: the distance, in the units of ``sampling``; ``0`` gives the union itself.
        sampling: the voxel size per axis (e.g. millimetres); ``None``: 1 per axis (voxels).

    Returns:
        ``(box, roi)``: ``union[box]`` is the bounding box and ``roi`` a boolean map of its shape.

    Raises:
        ValueError: ``union`` is empty, ``margin`` is negative or ``sampling`` is not positive.
    """
    if margin < 0:
        raise ValueError(f"the margin must be non-negative, got {margin}")
    rank = union.ndim
    steps = np.ones(rank) if sampling is None else np.asarray(sampling, dtype=np.float64).reshape(-1)
    if steps.shape != (rank,) or not (np.isfinite(steps).all() and (steps > 0).all()):
        raise ValueError(f"sampling must be {rank} positive voxel sizes, got {steps.tolist()}")
    box = []
    for axis in range(rank):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(rank) if a != axis)))
        if present.size == 0:
            raise ValueError("the region of interest of an empty union is undefined")
        reach = int(np.floor(margin / steps[axis]))
        box.append(slice(max(0, int(present[0]) - reach), min(union.shape[axis], int(present[-1]) + reach + 1)))
    crop = union[tuple(box)]
    if margin == 0:
        return tuple(box), crop.copy()
    distance = ndimage.distance_transform_edt(~crop, sampling=steps)
    # Ties at exactly ``margin`` (3-4-5 triangles of voxel sizes) are in, whatever the float rounding.
    return tuple(box), np.asarray(distance <= margin * (1.0 + _TIE))


# --------------------------------------------------------------------------------------------
# Per-case tables


@dataclass
class CaseTables:
    """Per-case sums of one scope (a class's ROI, or the top label's), ``N`` cases by ``bins``.

    Attributes:
        counts: voxels per equal-width bin of the clipped probability, ``(N, bins)``.
        outcomes: sum of the 0/1 outcomes per bin, ``(N, bins)``.
        confidence: sum of the clipped probabilities per bin, ``(N, bins)``.
        brier: sum of ``(p - y)^2`` (unclipped ``p``), ``(N,)``.
        nll: sum of ``-log`` of the clipped likelihood of the outcome, ``(N,)``.
    """

    counts: FloatArray
    outcomes: FloatArray
    confidence: FloatArray
    brier: FloatArray
    nll: FloatArray

    @classmethod
    def zeros(cls, n: int, bins: int) -> CaseTables:
        return cls(np.zeros((n, bins)), np.zeros((n, bins)), np.zeros((n, bins)), np.zeros(n), np.zeros(n))

    @property
    def bins(self) -> int:
        return int(self.counts.shape[1])

    def add(self, case: int, probs: ArrayLike, outcomes: ArrayLike) -> None:
        """Add one case's voxels: probabilities ``p`` of the outcome and the 0/1 outcomes, ``(n,)``."""
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(outcomes, dtype=np.float64)
        confidence = np.clip(p, _EPS, 1.0 - _EPS)
        ids = _equal_width_bins(confidence, self.bins)
        self.counts[case] += np.bincount(ids, minlength=self.bins)
        self.outcomes[case] += np.bincount(ids, weights=y, minlength=self.bins)
        self.confidence[case] += np.bincount(ids, weights=confidence, minlength=self.bins)
        self.brier[case] += float(np.square(p - y).sum())
        self.nll[case] -= float(np.log(np.where(y == 1.0, confidence, 1.0 - confidence)).sum())

    def take(self, rows: NDArray[np.intp]) -> CaseTables:
        """The tables of the cases ``rows``."""
        return CaseTables(
            self.counts[rows], self.outcomes[rows], self.confidence[rows], self.brier[rows], self.nll[rows]
        )

    def voxels(self) -> int:
        return round(float(self.counts.sum()))

    def metrics(self, weights: FloatArray) -> dict[str, FloatArray]:
        """Each metric of the voxels of every case, the cases weighted by ``weights`` ``(B, N)``.

        ``weights`` of ones is the sample itself; a row of a bootstrap's case multiplicities is a
        resample (each case's voxels counted that many times). Returns name -> ``(B,)``, NaN
        where a row holds no voxel.
        """
        counts = weights @ self.counts
        gaps = np.abs(weights @ self.outcomes - weights @ self.confidence)
        total = counts.sum(axis=1)
        defined = total > 0
        safe = np.where(defined, total, 1.0)
        per_bin = np.divide(gaps, counts, out=np.zeros_like(gaps), where=counts > 0)
        return {
            "ece": np.where(defined, gaps.sum(axis=1) / safe, np.nan),
            "mce": np.where(defined, per_bin.max(axis=1, initial=0.0), np.nan),
            "brier": np.where(defined, (weights @ self.brier) / safe, np.nan),
            "nll": np.where(defined, (weights @ self.nll) / safe, np.nan),
        }

    def panel(self, name: str) -> BinnedPanel:
        """The reliability-diagram panel of all cases."""
        return BinnedPanel(name, self.counts.sum(axis=0), self.outcomes.sum(axis=0), self.confidence.sum(axis=0))


@dataclass
class SegmentationTables:
    """The per-case tables of a split: one :class:`CaseTables` per foreground class and the top label.

    Attributes:
        classes: one per foreground class (label values ``1 .. K - 1``).
        top_label: top-label confidence against ``argmax == reference`` in the union of the ROIs.
        finite: per case, whether its probabilities are all finite (a case that is not adds nothing).
        cases_with_roi: per foreground class, the cases with a non-empty ROI.
        reference_voxels: per foreground class, the reference's voxels of the class (all inside its ROI).
    """

    classes: list[CaseTables]
    top_label: CaseTables
    finite: NDArray[np.bool_]
    cases_with_roi: list[int] = field(default_factory=list)
    reference_voxels: list[int] = field(default_factory=list)


def segmentation_tables(
    probs: NDArray[Any],
    reference: NDArray[Any],
    bins: int,
    margin: float,
    sampling: ArrayLike | None = None,
    include: NDArray[np.bool_] | None = None,
) -> SegmentationTables:
    """One streaming pass over the cases: the per-case bin tables of every foreground class's ROI.

    Args:
        probs: softmax probabilities ``(N, K, *spatial)`` (float32 is kept as it is: only one
            case's ROI voxels are ever converted to float64).
        reference: reference label maps ``(N, *spatial)``, values in ``0 .. K - 1``.
        bins: equal-width bins.
        margin: the ROI margin (:func:`region_of_interest`), in the units of ``sampling``.
        sampling: per case voxel size ``(N, len(spatial))`` (e.g. the spacing in mm); ``None``:
            the margin is in voxels.
        include: per case, whether to measure it (e.g. its logits are finite); ``None``: all.

    Returns:
        The tables; cases left out or whose probabilities are not all finite add nothing
        (``finite`` is false for them).
    """
    n, n_classes = probs.shape[0], probs.shape[1]
    steps = None if sampling is None else np.asarray(sampling, dtype=np.float64)
    per_class = [CaseTables.zeros(n, bins) for _ in range(1, n_classes)]
    top = CaseTables.zeros(n, bins)
    finite = np.zeros(n, dtype=bool)
    cases_with_roi = [0] * (n_classes - 1)
    reference_voxels = [0] * (n_classes - 1)
    for i in range(n):
        if include is not None and not include[i]:
            continue
        case = probs[i]
        # A float64 reduction in buffered chunks: NaN or inf anywhere makes the sum non-finite.
        if not np.isfinite(np.add.reduce(case, axis=None, dtype=np.float64)):
            continue
        finite[i] = True
        truth = reference[i]
        predicted = case.argmax(axis=0)
        any_roi = np.zeros(truth.shape, dtype=bool)
        for k in range(1, n_classes):
            is_k = truth == k
            union = is_k | (predicted == k)
            if not union.any():
                continue
            box, roi = region_of_interest(union, margin, None if steps is None else steps[i])
            per_class[k - 1].add(i, case[k][box][roi], is_k[box][roi])
            any_roi[box] |= roi
            cases_with_roi[k - 1] += 1
            reference_voxels[k - 1] += int(np.count_nonzero(is_k))
        if any_roi.any():
            voxels = case[:, any_roi]
            top.add(i, voxels.max(axis=0), voxels.argmax(axis=0) == truth[any_roi])
    return SegmentationTables(per_class, top, finite, cases_with_roi, reference_voxels)


# --------------------------------------------------------------------------------------------
# The check on a segmentation model


def run_segmentation(ctx: CheckContext, p: CalibrationParams) -> CheckResult:
    """Voxel calibration of a segmentation model per foreground class, within each class's ROI."""
    result = CheckResult()
    preds = ctx.predictions("eval")
    split = ctx.split("eval")
    names = list(ctx.classes)
    foreground = names[1:]
    seed_root = int(ctx.rng().integers(0, 2**63 - 1))
    margin, unit = (p.roi_margin_mm, "mm") if p.roi_margin_mm is not None else (float(p.roi_margin_px), "voxels")
    result.findings.append(_not_measured())
    if preds.n == 0:
        for name in foreground:
            result.metrics += _undefined(CLASS_METRIC_NAMES, "no eval cases", {"class": name})
        result.metrics += _undefined(TOP_LABEL_METRIC_NAMES, "no eval cases", {})
        return result

    probs, reference = _eval_arrays(preds, len(names))
    sampling = None
    if unit == "mm":
        spacing = split.spacing
        sampling = np.ones((preds.n, reference.ndim - 1)) if spacing is None else np.asarray(spacing, np.float64)
    logits = preds.logits
    finite_logits = np.array([bool(torch.isfinite(logits[i]).all()) for i in range(preds.n)], dtype=bool)
    tables = segmentation_tables(probs, reference, p.bins, margin, sampling, include=finite_logits)
    finite = tables.finite
    n_finite = int(finite.sum())
    if n_finite < preds.n:
        result.findings.append({"kind": "non_finite_logits", "split": "eval", "count": preds.n - n_finite})
    rows = np.flatnonzero(finite)
    patients = list(split.patients)
    by_patient = any(patient is not None for patient in patients)
    scope = _Scope(p, patients, seed_root)
    margin_text = f"{margin:g} {unit}"
    all_nonfinite = f"the outputs of all {preds.n} eval cases are non-finite"

    for k, name in enumerate(foreground):
        why = all_nonfinite if n_finite == 0 else _no_roi(name)
        result.metrics += scope.metrics(
            tables.classes[k], rows, CLASS_METRIC_NAMES, {"class": name}, why=why, min_cases=2, salt=("class", name)
        )
    why_top = (
        all_nonfinite if n_finite == 0 else "no foreground class is in the reference or the prediction of any case"
    )
    result.metrics += scope.metrics(
        tables.top_label, rows, TOP_LABEL_METRIC_NAMES, {}, why=why_top, min_cases=2, salt=("top_label",)
    )
    for column, values in _group_columns(ctx, preds.n).items():
        for group in sorted(set(values.tolist())):
            in_group = values == group
            group_rows = np.flatnonzero(in_group & finite)
            for k, name in enumerate(foreground):
                where = f" in {column} = {group}"
                if group_rows.size == 0:
                    why = f"the outputs of all {int(in_group.sum())} eval cases{where} are non-finite"
                else:
                    why = _no_roi(name, where)
                result.metrics += scope.metrics(
                    tables.classes[k],
                    group_rows,
                    GROUP_METRIC_NAMES,
                    {"class": name, "group_by": column, "group": group},
                    why=why,
                    min_cases=p.min_group_size,
                    salt=("class", name, "group", column, group),
                )

    result.findings.append(
        {
            "kind": "segmentation_calibration",
            "region_of_interest": (
                f"per class and case: the union of the reference's and the prediction's voxels of the class,"
                f" grown by {margin_text} (Euclidean distance"
                + (", with each case's spacing)" if unit == "mm" else " on the model grid)")
            ),
            "margin": margin,
            "margin_unit": unit,
            "bins": p.bins,
            "convention": (
                "per class: positive-class calibration of the class's softmax probability against"
                " reference == class within its region of interest; unlabelled: top-label calibration"
                " within the union of every class's region of interest"
            ),
            "classes": {
                name: {
                    "cases_with_roi": tables.cases_with_roi[k],
                    "roi_voxels": tables.classes[k].voxels(),
                    "reference_voxels": tables.reference_voxels[k],
                }
                for k, name in enumerate(foreground)
            },
            "cases": n_finite,
        }
    )
    result.findings.append(
        {
            "kind": "bootstrap",
            "unit": "patient" if by_patient else "case",
            "n_boot": p.n_boot,
            "method": "cluster bootstrap: each resample sums the per-case bin tables weighted by how often"
            " its patient (case) was drawn",
        }
    )
    if n_finite > 0:
        panels = [tables.classes[k].take(rows).panel(name) for k, name in enumerate(foreground)]
        result.artifacts.append(
            ctx.write_artifact(
                "reliability_diagram",
                "reliability.svg",
                lambda path: class_reliability_grid(
                    panels, p.bins, path, what=f"ROI: reference or prediction + {margin_text}"
                ),
                description=(
                    f"Reliability diagram of each of the {len(foreground)} foreground classes on the eval"
                    f" split ({n_finite} cases, {p.bins} equal-width bins): how often a voxel is of the class"
                    " versus its predicted probability, over the voxels of the class's region of interest"
                    f" (reference or prediction of the class grown by {margin_text})."
                ),
            )
        )
    return result


# --------------------------------------------------------------------------------------------
# Helpers


class _Scope:
    """Values and patient-bootstrap intervals of the metrics of some cases' tables."""

    def __init__(self, p: CalibrationParams, patients: Sequence[str | None], seed_root: int) -> None:
        self.p = p
        self.patients = list(patients)
        self.seed_root = seed_root

    def metrics(
        self,
        tables: CaseTables,
        rows: NDArray[np.intp],
        names: tuple[str, ...],
        labels: dict[str, str],
        *,
        why: str,
        min_cases: int,
        salt: tuple[str, ...],
    ) -> list[Metric]:
        scoped = tables.take(rows)
        n = scoped.voxels()
        if n == 0:
            return _undefined(names, why, labels)
        values = {name: float(v[0]) for name, v in scoped.metrics(np.ones((1, rows.size))).items()}
        cis: dict[str, tuple[float, float] | None] = dict.fromkeys(names)
        clusters = cluster_codes([self.patients[i] for i in rows])
        if self.p.n_boot > 0 and rows.size >= min_cases and clusters[1] >= 2:
            replicates: dict[str, list[FloatArray]] = {name: [] for name in names}
            rng = np.random.default_rng(stable_seed(self.seed_root, *salt))
            for counts in resampled_counts(rows.size, self.p.n_boot, rng, clusters=clusters):
                block = scoped.metrics(counts.astype(np.float64))
                for name in names:
                    replicates[name].append(block[name])
            cis = {
                name: median_centred_interval(
                    np.concatenate(replicates[name]), values[name], bounds=BINARY_BOUNDS[name]
                )
                for name in names
            }
        return [
            Metric(f"calibration.{name}", values[name], "lower_is_better", labels=labels, ci=cis[name], n=n)
            for name in names
        ]


def _undefined(names: tuple[str, ...], reason: str, labels: dict[str, str]) -> list[Metric]:
    return [Metric(f"calibration.{name}", None, "lower_is_better", labels=labels, n=0, reason=reason) for name in names]


def _no_roi(name: str, where: str = "") -> str:
    return (
        f"class {name!r} is in neither the reference nor the prediction of any eval case{where}:"
        " no region of interest to measure"
    )


def _not_measured() -> dict[str, Any]:
    return {"kind": "not_measured", "task": "segmentation", "metrics": dict(NOT_MEASURED)}


def _eval_arrays(preds: Any, n_classes: int) -> tuple[NDArray[Any], NDArray[Any]]:
    """The probabilities ``(N, K, *spatial)`` (as given, float32) and the reference maps, validated."""
    probs = _to_numpy(preds.probs)
    reference = _to_numpy(preds.labels)
    n = int(preds.n)
    if probs.ndim < 4 or probs.shape[:2] != (n, n_classes) or not np.issubdtype(probs.dtype, np.floating):
        raise InputError(
            f"segmentation eval probabilities must have shape (N, K, *spatial) with N = {n} and K = {n_classes},"
            f" got {probs.dtype} {probs.shape}"
        )
    if reference.shape != (n, *probs.shape[2:]) or not np.issubdtype(reference.dtype, np.integer):
        raise InputError(
            f"segmentation eval labels must be integer label maps {(n, *probs.shape[2:])}, got"
            f" {reference.dtype} {reference.shape}"
        )
    low, high = int(reference.min()), int(reference.max())
    if low < 0 or high >= n_classes:
        raise InputError(
            f"segmentation eval labels must be class indices in [0, {n_classes}) (a labelled reference for"
            f" every case), got values from {low} to {high}"
        )
    return probs, reference


def _group_columns(ctx: CheckContext, n: int) -> dict[str, NDArray[Any]]:
    out = {}
    for column, values in sorted(ctx.group_labels("eval").items()):
        values = np.asarray(values).astype(str)
        if values.shape != (n,):
            raise InputError(f"group column {column!r} has {values.shape[0]} labels for {n} eval cases")
        out[column] = values
    return out
