"""The OOD check's work over the audit context: fit the detectors once, score every set.

:class:`Scorer` fits Mahalanobis and k-NN on the train split's embeddings, or on a
class-stratified part of eval when the run has none, and scores any split with every requested
detector. :func:`score_spec_sets` scores the spec's OOD sets from the shared pass;
:func:`score_builtin_sets` builds each built-in set and scores it with one pass of its new images.
Nothing here re-runs the eval split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from auditkit.check import NO_GRADIENTS, Skip
from auditkit.checks.ood.detectors import (
    FEATURE_DETECTORS,
    LOGIT_DETECTORS,
    ClassGaussians,
    energy_score,
    fit_class_gaussians,
    joint_energy_score,
    knn_score,
    mahalanobis_score,
    max_logit_score,
    max_sigmoid_score,
    msp_score,
    odin_score,
    pixel_pooled_score,
)
from auditkit.checks.ood.sets import (
    SYNTHETIC_SHIFTS,
    describe,
    load_other_modality,
    synthetic_shift,
)
from auditkit.stats import stable_seed

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = [
    "TASK_SCORES",
    "ScoredSet",
    "Scorer",
    "fit_labels",
    "not_applicable",
    "score_builtin_sets",
    "score_spec_sets",
    "stratified_split",
]

FloatArray = NDArray[np.float64]
ImagesOf = Callable[[str], torch.Tensor]


def stratified_split(
    labels: NDArray[np.int64], fraction: float, rng: np.random.Generator
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Fit and held-out rows, ``fraction`` of each class to fit (each class of >= 2 gives both).

    Returns:
        Sorted row indices ``(fit, held_out)`` partitioning ``range(len(labels))``.
    """
    fit: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        take = round(fraction * members.size)
        if members.size >= 2:
            take = min(max(take, 1), members.size - 1)
        fit += members[:take].tolist()
    fit_rows = np.sort(np.asarray(fit, dtype=np.intp))
    return fit_rows, np.setdiff1d(np.arange(labels.size), fit_rows).astype(np.intp)


TASK_SCORES: dict[str, dict[str, str]] = {
    "multilabel": {
        "msp": "maximum sigmoid probability over labels, max_k sigmoid(z_k) (Wang et al. 2021)",
        "max_logit": "largest logit over labels, max_k z_k (Hendrycks et al. 2022)",
        "energy": "negative joint energy over per-label two-class logits [0, z_k],"
        " sum_k log(1 + exp(z_k)) (Wang et al. 2021)",
        "mahalanobis": "negative Mahalanobis distance to the mean of one Gaussian fitted to every fit"
        " embedding (no single class per image to condition on), Ledoit-Wolf-shrunk covariance",
        "knn": "negative distance to the k-th nearest normalised fit embedding (Sun et al. 2022)",
    },
    "segmentation": {
        "msp": "the largest softmax probability of each pixel, averaged over the pixels the model calls"
        " foreground (over every pixel when it calls none)",
        "max_logit": "the largest logit of each pixel, averaged as msp's",
        "energy": "the negative free energy of each pixel, logsumexp_k z_k, averaged as msp's",
        "mahalanobis": "negative Mahalanobis distance of the spatially averaged feature_layer map to one Gaussian"
        " fitted to every fit embedding, Ledoit-Wolf-shrunk covariance",
        "knn": "negative distance of the spatially averaged feature_layer map to the k-th nearest normalised fit"
        " embedding (Sun et al. 2022)",
    },
    "regression": {
        "mahalanobis": "negative Mahalanobis distance to the mean of one Gaussian fitted to every fit"
        " embedding (a regressor has no classes to condition on), Ledoit-Wolf-shrunk covariance",
        "knn": "negative distance to the k-th nearest normalised fit embedding (Sun et al. 2022)",
    },
}
"""What each detector scores for a task other than classification (the ``ood_scores`` finding)."""


def not_applicable(detector: str, task: str) -> str | None:
    """Why ``detector`` does not apply to a model of ``task``, or ``None`` when it does."""
    if task == "regression" and detector in (*LOGIT_DETECTORS, "odin"):
        return (
            f"task: regression: {detector} scores the model's outputs, and a regressor's outputs are the"
            " predicted values themselves, not class scores: they carry no confidence (the embedding"
            " detectors mahalanobis and knn apply)"
        )
    if task == "segmentation" and detector == "odin":
        return (
            "task: segmentation: ODIN perturbs the input towards one image's top softmax class; a"
            " segmentation model has a class per pixel, and no validated pixel-wise form of ODIN exists"
            " (msp, max_logit and energy are pooled over the predicted foreground)"
        )
    if task == "multilabel" and detector == "odin":
        return (
            "task: multilabel: ODIN perturbs the input towards the top softmax class and reads a"
            " temperature-scaled softmax; a multi-label model's outputs are independent sigmoids with"
            " no top class to perturb towards, and no validated multi-label form of ODIN exists"
            " (msp, max_logit and energy have one)"
        )
    return None


def fit_labels(labels: NDArray[Any], task: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The class per image that the embedding fit uses, and the strata of its eval hold-out.

    Classification: the class (Lee et al. 2018's class-conditional Gaussians), both times.
    Multi-label and regression: one class for all (one Gaussian: an image has no single class);
    the hold-out is stratified by "has any finding" (multi-label) or not at all (regression).
    """
    y = np.asarray(labels)
    if task == "classification":
        return y.astype(np.int64), y.astype(np.int64)
    one_class = np.zeros(y.shape[0], dtype=np.int64)
    if task == "multilabel":
        return one_class, np.asarray((y == 1).any(axis=1), dtype=np.int64)
    return one_class, one_class


@dataclass
class Scorer:
    """The requested detectors, fitted once, scoring any split of the context.

    Attributes:
        ctx: the audit context.
        detectors: the requested detector names, in report order.
        odin: ODIN's ``(temperature, epsilon)``.
        in_rows: detector -> the eval rows that are its in-distribution images (all of eval,
            except for detectors fitted on part of it).
        unavailable: detector -> why it cannot be measured in this run.
        findings: records for the check's findings (fit reference, non-finite scores).
        odin_passes: split -> images ODIN perturbed (each costs a forward-backward and a
            forward pass).
        has_features: whether embeddings were read (an embedding detector was requested and
            the model offers embeddings).
        task: ``model.task``: multi-label models get the multi-label forms of ``msp`` and
            ``energy``; detectors that do not apply to the task are unavailable with the reason
            (:func:`not_applicable`).
    """

    ctx: CheckContext
    detectors: Sequence[str]
    odin: tuple[float, float]
    in_rows: dict[str, NDArray[np.intp]]
    unavailable: dict[str, str] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    odin_passes: dict[str, int] = field(default_factory=dict)
    has_features: bool = False
    task: str = "classification"
    _gaussians: ClassGaussians | None = None
    _reference: FloatArray | None = None
    _knn_k: int = 0

    @classmethod
    def fit(
        cls,
        ctx: CheckContext,
        detectors: Sequence[str],
        *,
        knn_k: int,
        fit_fraction: float,
        odin: tuple[float, float],
        rng: np.random.Generator,
    ) -> Scorer:
        """Fit the embedding detectors on train, or on ``fit_fraction`` of eval without one."""
        n_eval = ctx.predictions("eval").n
        scorer = cls(ctx, list(detectors), odin, dict.fromkeys(detectors, np.arange(n_eval)), task=ctx.task)
        if ctx.task != "classification":
            scorer._task_limits()
        if "odin" in scorer.available and not ctx.model.has_gradients:
            reason = "ODIN perturbs each input along the model's gradient; " + NO_GRADIENTS
            scorer.unavailable["odin"] = reason
            scorer.findings.append(
                {"kind": "detector_not_applicable", "detector": "odin", "task": ctx.task, "reason": reason}
            )
        wanted = [d for d in detectors if d in FEATURE_DETECTORS]
        if wanted:
            scorer._fit_embeddings(wanted, knn_k, fit_fraction, rng)
        return scorer

    def _task_limits(self) -> None:
        """Findings saying what each detector scores for this task, and which do not apply."""
        scores = TASK_SCORES.get(self.task, {})
        self.findings.append(
            {
                "kind": "ood_scores",
                "task": self.task,
                "scores": {d: scores[d] for d in self.detectors if d in scores},
            }
        )
        for detector in self.detectors:
            reason = not_applicable(detector, self.task)
            if reason is not None:
                self.unavailable[detector] = reason
                self.findings.append(
                    {"kind": "detector_not_applicable", "detector": detector, "task": self.task, "reason": reason}
                )

    @property
    def available(self) -> list[str]:
        return [d for d in self.detectors if d not in self.unavailable]

    def _fit_embeddings(self, wanted: list[str], knn_k: int, fit_fraction: float, rng: np.random.Generator) -> None:
        ctx = self.ctx
        try:
            eval_features = ctx.features("eval")
        except Skip as reason:
            self.unavailable.update(dict.fromkeys(wanted, str(reason)))
            return
        self.has_features = True
        labels, strata = fit_labels(ctx.labels("eval"), self.task)
        finding: dict[str, Any] = {"kind": "ood_reference", "n_eval": int(labels.size)}
        if ctx.has_split("train"):
            fit_x, fit_y = ctx.features("train"), fit_labels(ctx.labels("train"), self.task)[0]
            finding["fit_split"] = "train"
        else:
            fit_rows, held_out = stratified_split(strata, fit_fraction, rng)
            fit_x, fit_y = eval_features[fit_rows], labels[fit_rows]
            self.in_rows.update(dict.fromkeys(wanted, held_out))
            finding.update(
                fit_split="eval",
                split="eval",
                rows=ctx.split("eval").rows[fit_rows].tolist(),
                n_held_out=int(held_out.size),
            )
        reference = fit_x.double().numpy()
        n_fit = int(np.isfinite(reference).all(axis=1).sum())
        n_in = len(self.in_rows[wanted[0]])
        finding["n_fit"] = n_fit
        self.findings.append(finding)
        if min(n_fit, n_in) < 2:
            why = f"too few images to fit and evaluate ({n_fit} to fit, {n_in} to evaluate)"
            self.unavailable.update(dict.fromkeys(wanted, why))
            return
        if "mahalanobis" in wanted:
            try:
                self._gaussians = fit_class_gaussians(reference, fit_y)
                finding["mahalanobis_shrinkage"] = self._gaussians.shrinkage
            except ValueError as error:
                self.unavailable["mahalanobis"] = f"cannot fit class Gaussians: {error}"
        if "knn" in wanted:
            self._reference, self._knn_k = reference, min(knn_k, n_fit)
            finding["knn_k"] = self._knn_k

    def score(
        self, split: str, logits: torch.Tensor, features: torch.Tensor | None, images: ImagesOf
    ) -> dict[str, FloatArray]:
        """Every available detector's scores of one split; undefined scores become ``-inf``.

        Args:
            split: the split name (for findings and ODIN's pass count).
            logits: its logits ``(N, K)`` from the shared (or the set's own) pass.
            features: its embeddings ``(N, D)`` from the same pass, or ``None``.
            images: ``images(split)`` returns its images; called only by ODIN.
        """
        out: dict[str, FloatArray] = {}
        for detector in self.available:
            multilabel = self.task == "multilabel"
            if self.task == "segmentation" and detector in LOGIT_DETECTORS:
                scores = pixel_pooled_score(detector, logits)
            elif detector == "msp":
                scores = max_sigmoid_score(logits) if multilabel else msp_score(logits)
            elif detector == "max_logit":
                scores = max_logit_score(logits)
            elif detector == "energy":
                scores = joint_energy_score(logits) if multilabel else energy_score(logits)
            elif detector == "mahalanobis":
                assert self._gaussians is not None and features is not None
                scores = mahalanobis_score(features, self._gaussians)
            elif detector == "knn":
                assert self._reference is not None and features is not None
                scores = knn_score(self._reference, features, self._knn_k)
            else:
                batch = images(split)
                scores = odin_score(
                    self.ctx.model.differentiable(),
                    batch,
                    temperature=self.odin[0],
                    epsilon=self.odin[1],
                    batch_size=self.ctx.model.batch_size,
                    device=self.ctx.device,
                )
                self.odin_passes[split] = int(batch.shape[0])
            undefined = np.isnan(scores)
            if undefined.any():
                self.findings.append(
                    {
                        "kind": "non_finite_scores",
                        "detector": detector,
                        "split": split,
                        "count": int(undefined.sum()),
                    }
                )
            out[detector] = np.where(undefined, -np.inf, scores)
        return out


@dataclass
class ScoredSet:
    """One OOD set: its name (``ood_set`` label), size, scores per detector and finding."""

    name: str
    n: int
    scores: dict[str, FloatArray]
    finding: dict[str, Any]
    reason: str | None = None


def score_spec_sets(ctx: CheckContext, scorer: Scorer) -> list[ScoredSet]:
    """The spec's OOD sets (splits ``ood:<name>``), scored from the shared pass."""
    out = []
    for split in (s for s in ctx.split_names if s.startswith("ood:")):
        name = split.removeprefix("ood:")
        preds = ctx.predictions(split)
        quarantined = sum(1 for q in ctx.quarantine() if q.split == split)
        finding = {
            "kind": "ood_set",
            "ood_set": name,
            "source": "spec",
            "split": split,
            "forward_split": split,
            "n_images": preds.n,
            "n_quarantined": quarantined,
        }
        if preds.n == 0:
            reason = f"every image of {split} was quarantined ({quarantined} rows; data.quarantine)"
            out.append(ScoredSet(name, 0, {}, finding, reason))
            continue
        features = ctx.features(split) if scorer.has_features else None
        out.append(ScoredSet(name, preds.n, scorer.score(split, preds.logits, features, ctx.images), finding))
    return out


def score_builtin_sets(
    ctx: CheckContext,
    scorer: Scorer,
    names: Sequence[str],
    *,
    n_images: int,
    rng: np.random.Generator,
) -> list[ScoredSet]:
    """Build each built-in set, run its new images through the model once and score them.

    The synthetic shifts use the same ``n_images`` eval images (sampled without replacement,
    at most all of eval); each set's pass is counted under split ``ood:builtin:<name>``.
    """

    n_eval = ctx.predictions("eval").n
    sample = np.sort(rng.choice(n_eval, size=min(n_eval, n_images), replace=False))
    eval_images = ctx.images("eval", sample) if set(names) & set(SYNTHETIC_SHIFTS) else None
    # One seed per set name, so adding or dropping a set leaves the others' images unchanged.
    seed_root = int(rng.integers(0, 2**63 - 1))
    out = []
    for name in names:
        label = f"builtin:{name}"
        finding: dict[str, Any] = {
            "kind": "ood_set",
            "ood_set": label,
            "source": "builtin",
            "description": describe(name),
            "forward_split": f"ood:{label}",
        }
        if name == "other_modality" and ctx.spatial_dims == 3:
            reason = (
                "the other-modality set is 2-D CT and MR slices from pydicom's test data; a model of 3-D"
                " volumes (model.input.depth) takes volumes"
            )
            finding["n_images"] = 0
            out.append(ScoredSet(label, 0, {}, finding, reason))
            continue
        if name == "other_modality":
            shape = ctx.input_geometry
            loaded = load_other_modality(
                channels=shape.channels,
                height=shape.height,
                width=shape.width,
                window=shape.window,
            )
            images = loaded.images
            finding.update(
                files=loaded.files,
                modalities=loaded.modalities,
                duplicates_left_out=len(loaded.duplicates),
                skipped=loaded.skipped,
            )
        else:
            assert eval_images is not None
            generator = torch.Generator().manual_seed(stable_seed(seed_root, name))
            images = synthetic_shift(name, eval_images, generator)
            finding.update(split="eval", rows=ctx.split("eval").rows[sample].tolist())
        finding["n_images"] = int(images.shape[0])
        if images.shape[0] == 0:
            reason = "no CT or MR image could be read from pydicom's package test data"
            out.append(ScoredSet(label, 0, {}, finding, reason))
            continue
        split = finding["forward_split"]
        if ctx.model.has_features:
            logits, features = ctx.model.predict_with_features(images, label=split)
        else:
            logits, features = ctx.model.predict(images, label=split), torch.empty(images.shape[0], 0)
        scores = scorer.score(split, logits, features, _held(images))
        out.append(ScoredSet(label, int(images.shape[0]), scores, finding))
    return out


def _held(images: torch.Tensor) -> ImagesOf:
    """``images(split)`` for a set held in memory rather than in the context."""
    return lambda _split: images
