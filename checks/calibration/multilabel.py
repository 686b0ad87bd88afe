"""The calibration check on a multi-label model: each label's sigmoid output as a binary classifier.

:func:`run_multilabel` is :class:`~auditkit.checks.calibration.CalibrationCheck` for
``model.task: multilabel``. Every label is measured on its own known entries (an unknown entry,
``-1``, is left out of that label and counted), with the positive-class metrics of
:mod:`.binary`, bootstrap intervals over patients when the manifest names them (a patient's
images are resampled together) and else over images stratified by the label's outcome, and a
cross-fitted temperature per label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from auditkit.check import CheckResult, Metric
from auditkit.checks.calibration.binary import (
    BINARY_BOUNDS,
    BinaryStatistics,
    binary_intervals,
    cluster_codes,
)
from auditkit.checks.calibration.metrics import METRIC_NAMES, FloatArray, _to_numpy
from auditkit.checks.calibration.plots import LabelPanel, label_reliability_grid
from auditkit.checks.calibration.temperature import (
    TEMPERATURE_BOUNDS,
    cross_fitted_binary_temperature_probs,
    did_not_help_record,
    fit_binary_temperature,
)
from auditkit.errors import InputError
from auditkit.stats import stable_seed

if TYPE_CHECKING:
    from auditkit.check import CheckContext
    from auditkit.checks.calibration import CalibrationParams

__all__ = ["GROUP_METRIC_NAMES", "run_multilabel"]

GROUP_METRIC_NAMES: tuple[str, ...] = ("ece", "brier")
"""Metrics per label and subgroup (the five of :data:`METRIC_NAMES` per label overall)."""


class _Design(NamedTuple):
    """How one scope is resampled: by patient (``clusters``) or by image within outcome (``strata``)."""

    clusters: tuple[NDArray[np.intp], int] | None
    strata: NDArray[np.float64] | None


class _Label(NamedTuple):
    """One label's known, finite rows: their probabilities, logits and 0/1 outcomes."""

    name: str
    probs: FloatArray
    logits: FloatArray
    outcomes: FloatArray


def run_multilabel(ctx: CheckContext, p: CalibrationParams) -> CheckResult:
    """Per-label calibration of a multi-label model on the eval split, overall and per subgroup."""
    result = CheckResult()
    preds = ctx.predictions("eval")
    names = list(ctx.classes)
    seed_root = int(ctx.rng().integers(0, 2**63 - 1))
    if preds.n == 0:
        for name in names:
            result.metrics += _undefined(METRIC_NAMES, "no eval images", 0, {"label": name})
            result.metrics.append(_undefined_after("no eval images", 0, name))
        return result

    logits, probs, labels = _eval_arrays(preds, len(names))
    finite = np.asarray(np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1))
    n_images = labels.shape[0]
    if int(finite.sum()) < n_images:
        result.findings.append({"kind": "non_finite_logits", "split": "eval", "count": n_images - int(finite.sum())})
    unknown = {name: int((labels[:, k] < 0).sum()) for k, name in enumerate(names)}
    if any(unknown.values()):
        result.findings.append(
            {
                "kind": "unknown_entries",
                "split": "eval",
                "counts": unknown,
                "detail": "entries left empty in the manifest (unknown) are left out of their label's metrics",
            }
        )
    patients = list(ctx.split("eval").patients)
    by_patient = any(patient is not None for patient in patients)
    groups = _group_columns(ctx, n_images)

    panels: list[LabelPanel] = []
    for k, name in enumerate(names):
        known = labels[:, k] >= 0
        rows = known & finite
        label = _Label(name, probs[rows, k], logits[rows, k], labels[rows, k].astype(np.float64))
        why = _why_empty(name, int(known.sum()), n_images)
        design = _design(by_patient, patients, rows, label.outcomes)
        result.metrics += _scope(
            label.probs,
            label.outcomes,
            METRIC_NAMES,
            {"label": name},
            p,
            why=why,
            min_size=2,
            seed=stable_seed(seed_root, "label", name),
            design=design,
        )
        after, findings = _after_temperature(label, p, seed_root, design, why)
        result.metrics.append(after.metric)
        result.findings += findings
        for column, values in groups.items():
            for group in sorted(set(values.tolist())):
                in_group = values == group
                scoped = rows & in_group
                group_known = int((known & in_group).sum())
                result.metrics += _scope(
                    probs[scoped, k],
                    labels[scoped, k].astype(np.float64),
                    GROUP_METRIC_NAMES,
                    {"label": name, "group_by": column, "group": group},
                    p,
                    why=_why_empty(name, group_known, int(in_group.sum()), f" in {column} = {group}"),
                    min_size=p.min_group_size,
                    seed=stable_seed(seed_root, "label", name, "group", column, group),
                    design=_design(by_patient, patients, scoped, labels[scoped, k].astype(np.float64)),
                )
        panels.append((name, label.probs, label.outcomes, after.probs_after))

    result.findings.append(
        {
            "kind": "bootstrap",
            "unit": "patient" if by_patient else "image",
            "n_boot": p.n_boot,
            "stratified_by": None if by_patient else "the label's outcome",
            "convention": "positive-class calibration of each label's sigmoid output on its known entries",
        }
    )
    if finite.any():
        result.artifacts.append(
            ctx.write_artifact(
                "reliability_diagram",
                "reliability.svg",
                lambda path: label_reliability_grid(panels, p.bins, path),
                description=(
                    f"Reliability diagram of each of the {len(names)} labels on the eval split ({p.bins}"
                    " equal-width bins): observed frequency of the finding versus the predicted (sigmoid)"
                    " probability on the label's known entries, before and after cross-fitted temperature"
                    " scaling."
                ),
            )
        )
    return result


# --------------------------------------------------------------------------------------------
# Helpers


def _eval_arrays(preds: Any, n_labels: int) -> tuple[FloatArray, FloatArray, NDArray[np.int64]]:
    """Validated float64 logits and probabilities and int64 1/0/-1 labels, all ``(N, K)``."""
    logits = np.asarray(_to_numpy(preds.logits), dtype=np.float64)
    probs = np.asarray(_to_numpy(preds.probs), dtype=np.float64)
    labels = _to_numpy(preds.labels)
    n = int(preds.n)
    shape = (n, n_labels)
    if logits.shape != shape or probs.shape != shape:
        raise InputError(
            f"multi-label eval predictions must have shape {shape} (images, labels), "
            f"got logits {logits.shape} and probs {probs.shape}"
        )
    if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer) or not np.isin(labels, (-1, 0, 1)).all():
        raise InputError(
            f"multi-label eval labels must be {shape} of 1, 0 or -1 (unknown), got {labels.dtype} {labels.shape}"
        )
    return logits, probs, labels.astype(np.int64)


def _group_columns(ctx: CheckContext, n: int) -> dict[str, NDArray[Any]]:
    out = {}
    for column, values in sorted(ctx.group_labels("eval").items()):
        values = np.asarray(values).astype(str)
        if values.shape != (n,):
            raise InputError(f"group column {column!r} has {values.shape[0]} labels for {n} eval images")
        out[column] = values
    return out


def _why_empty(name: str, known: int, total: int, where: str = "") -> str:
    """Why a scope of label ``name`` has no rows: every entry unknown, or every known one non-finite."""
    if known == 0:
        return f"label {name!r} has no known entry among the {total} eval images{where} (every entry unknown)"
    return f"the logits of all {known} eval images{where} with a known {name!r} entry are non-finite"


def _design(by_patient: bool, patients: list[str | None], rows: NDArray[np.bool_], outcomes: FloatArray) -> _Design:
    if by_patient:
        return _Design(cluster_codes([patients[i] for i in np.flatnonzero(rows)]), None)
    return _Design(None, outcomes)


def _undefined(names: tuple[str, ...], reason: str, n: int, labels: dict[str, str]) -> list[Metric]:
    return [Metric(f"calibration.{name}", None, "lower_is_better", labels=labels, n=n, reason=reason) for name in names]


def _undefined_after(reason: str, n: int, name: str) -> Metric:
    return Metric(
        "calibration.ece_after_temperature", None, "lower_is_better", labels={"label": name}, n=n, reason=reason
    )


def _scope(
    probs: FloatArray,
    outcomes: FloatArray,
    names: tuple[str, ...],
    scope: dict[str, str],
    p: CalibrationParams,
    *,
    why: str,
    min_size: int,
    seed: int,
    design: _Design,
) -> list[Metric]:
    """The metrics ``names`` of one label's rows in one scope, with intervals from ``min_size`` rows."""
    n = int(probs.size)
    if n == 0:
        return _undefined(names, why, 0, scope)
    adaptive_bins = p.adaptive_bins if p.adaptive_bins is not None else p.bins
    stats = BinaryStatistics(probs, outcomes, p.bins, adaptive_bins)
    batched = {name: stats.batched()[name] for name in names}
    ones = stats.ones()
    values = {name: float(fn(ones)[0]) for name, fn in batched.items()}
    cis: dict[str, tuple[float, float] | None] = dict.fromkeys(names)
    if n >= min_size:
        cis = binary_intervals(
            batched,
            n,
            n_boot=p.n_boot,
            rng=np.random.default_rng(seed),
            strata=design.strata,
            clusters=design.clusters,
            bounds=BINARY_BOUNDS,
        )
    return [
        Metric(f"calibration.{name}", values[name], "lower_is_better", labels=scope, ci=cis[name], n=n)
        for name in names
    ]


class _AfterTemperature(NamedTuple):
    metric: Metric
    probs_after: FloatArray | None = None


def _after_temperature(
    label: _Label, p: CalibrationParams, seed_root: int, design: _Design, why: str
) -> tuple[_AfterTemperature, list[dict[str, Any]]]:
    """One label's cross-fitted ECE after temperature scaling, and its findings (``why``: the
    reason when the label has no row)."""
    n = int(label.probs.size)
    name = label.name
    if n == 0:
        return _AfterTemperature(_undefined_after(why, 0, name)), []
    if n < p.temperature_folds:
        reason = (
            f"{n} images with a known {name!r} entry are too few for {p.temperature_folds}-fold"
            " cross-fitted temperature scaling"
        )
        return _AfterTemperature(_undefined_after(reason, n, name)), []
    positives = int(label.outcomes.sum())
    if positives in (0, n):
        which = "positive" if positives == 0 else "negative"
        reason = (
            f"label {name!r} has no {which} entry among its {n} known ones: the likelihood of a temperature"
            " keeps improving towards a bound, so none can be fitted"
        )
        return _AfterTemperature(_undefined_after(reason, n, name)), []
    probs_after, fold_temperatures = cross_fitted_binary_temperature_probs(
        label.logits,
        label.outcomes,
        p.temperature_folds,
        rng=np.random.default_rng(stable_seed(seed_root, "label", name, "temperature_folds")),
    )
    temperature = fit_binary_temperature(label.logits, label.outcomes)
    findings: list[dict[str, Any]] = [
        {
            "kind": "temperature_scaling",
            "label": name,
            "temperature": temperature,
            "fold_temperatures": fold_temperatures,
            "folds": p.temperature_folds,
            "bounds": list(TEMPERATURE_BOUNDS),
        }
    ]
    before = BinaryStatistics(label.probs, label.outcomes, p.bins, p.bins)
    after = BinaryStatistics(probs_after, label.outcomes, p.bins, p.bins)
    ones = before.ones()
    ece_before, ece_after = float(before.ece(ones)[0]), float(after.ece(ones)[0])
    ci = binary_intervals(
        {"ece": after.ece},
        n,
        n_boot=p.n_boot,
        rng=np.random.default_rng(stable_seed(seed_root, "label", name, "after_temperature")),
        strata=design.strata,
        clusters=design.clusters,
        bounds=BINARY_BOUNDS,
    )["ece"]
    metric = Metric(
        "calibration.ece_after_temperature", ece_after, "lower_is_better", labels={"label": name}, ci=ci, n=n
    )
    if ece_after > ece_before:
        interval = binary_intervals(
            {"increase": lambda counts: after.ece(counts) - before.ece(counts)},
            n,
            n_boot=p.n_boot,
            rng=np.random.default_rng(stable_seed(seed_root, "label", name, "temperature_difference")),
            strata=design.strata,
            clusters=design.clusters,
            bounds={"increase": (-1.0, 1.0)},
        )["increase"]
        record = did_not_help_record(ece_before, ece_after, interval, temperature, fold_temperatures, n=n, bins=p.bins)
        findings.append({"kind": record.pop("kind"), "label": name, **record})
    return _AfterTemperature(metric, probs_after), findings
