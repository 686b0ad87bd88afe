"""The backdoor check: is this model trojaned, and which training images look poisoned?

Two answers, from plain functions testable without the engine:

* **model level** (:mod:`.trigger`): Neural Cleanse's trigger reverse-engineering per candidate
  target class, judged by the feature excursion of the found trigger (a planted shortcut drives
  the embedding beyond the range clean images reach; natural lesion evidence does not), with the
  paper's MAD anomaly index reported beside it when there are three or more classes;
* **data level** on the train split: activation clustering and spectral signatures on the shared
  pass's cached embeddings (:mod:`.signatures`, no forward pass), and STRIP on the training
  images superimposed with eval images (:mod:`.strip`), thresholds set from the eval split.

:class:`BackdoorCheck` runs them on the shared context and writes the reverse-engineered triggers
as an SVG artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field
from torch import nn

from auditkit.check import Artifact, Check, CheckParams, CheckResult, Metric, Needs, require_finite_logits
from auditkit.checks.adversarial.sampling import stratified_sample
from auditkit.checks.backdoor.signatures import Detection, activation_clustering, spectral_signature
from auditkit.checks.backdoor.strip import class_thresholds, strip_entropy
from auditkit.checks.backdoor.trigger import (
    TriggerResult,
    anomaly_indices,
    apply_trigger,
    feature_excursion,
    reverse_engineer_trigger,
)
from auditkit.context import serial_blas
from auditkit.stats import stable_seed

if TYPE_CHECKING:
    from auditkit.context import AuditContext

__all__ = [
    "BackdoorCheck",
    "Detection",
    "TriggerResult",
    "activation_clustering",
    "anomaly_indices",
    "apply_trigger",
    "class_thresholds",
    "feature_excursion",
    "reverse_engineer_trigger",
    "spectral_signature",
    "strip_entropy",
]

log = logging.getLogger(__name__)

Method = Literal["activation_clustering", "spectral_signature", "strip"]
METHODS: tuple[Method, ...] = ("activation_clustering", "spectral_signature", "strip")
_STRIP_CHUNK = 512  # images widened to float32 at a time


@dataclass
class _DataLevel:
    """Per method: flagged mask and scores over the train split (``None`` if not run)."""

    flagged: dict[str, NDArray[np.bool_]]
    scores: dict[str, NDArray[np.float64]]
    strip_gap: float | None = None
    strip_gap_reason: str | None = None


class BackdoorCheck(Check):
    """Backdoor and data-poisoning detection (NIST AI RMF MEASURE 2.7, MANAGE 2.4, MAP 4.1).

    Method: Neural Cleanse (Wang et al., IEEE S&P 2019) reverse-engineers, for each candidate
    target class, the smallest mask and pattern that flip clean eval images of the other classes
    to it. Small masks alone do not mean a backdoor: lesion evidence is small and local too (a
    clean nodule detector flips on a one- or two-pixel blob). A class is suspected when its
    trigger flips the sample and either (a) it is a *shortcut*: it drives the model's embedding
    far beyond the range clean eval images reach (the trigger's feature excursion, after the
    neuron elevation of ABS, Liu et al., CCS 2019) yet stays within the range of the training
    images, which the poisoned ones taught it - a trigger beyond both ranges is an adversarial
    patch, not a planted backdoor; or (b) with three or more classes searched, its mask norm is an
    outlier: the paper's MAD anomaly index, computed on log norms, of at least 2. With two classes
    the anomaly index is degenerate (+-0.6745 for any two norms) and only (a) judges.
    On the train split, activation clustering (Chen et al., 2018) and spectral signatures (Tran
    et al., NeurIPS 2018) look for a small separate population inside each label's cached
    embeddings, and STRIP (Gao et al., ACSAC 2019) flags training images whose prediction stays
    confident when clean eval images are superimposed (thresholds per predicted class from the
    eval split).

    Inputs: the eval split's images, predictions and embeddings; the train split's embeddings,
    predictions and images when the spec has a train split (otherwise the data-level metrics
    are undefined); gradients through the model for the trigger search (on the context's
    device).

    Metrics:
        ``backdoor.model_suspected`` (0/1), ``backdoor.trigger_norm`` {class} (mask L1 in input
        pixels), ``backdoor.trigger_success_rate`` {class}, ``backdoor.trigger_excursion``
        {class}, ``backdoor.anomaly_index`` {class}, ``backdoor.suspicious_fraction`` {method,
        class} (share of the class's training samples flagged), ``backdoor.strip_entropy_gap``
        (mean STRIP entropy of eval minus train images, for the predicted class where it is
        largest).

    Findings: ``suspected_target`` (the class, its norm, excursion and success rate),
    ``trigger_search`` (per class: searched or not, steps, seconds), ``poisoning_suspected``
    (per method and class: the flagged training rows), ``suspicious_training_sample`` (the top
    ranked samples per method: split, row, patient surrogate, class, score) - rows and
    surrogates only.

    Limitations: the trigger search is bounded by ``trigger_steps`` (with early stopping),
    ``trigger_samples`` (default 32 images on the CPU, 128 on a GPU) and ``max_classes`` (classes
    beyond the cap are reported as not searched; ``class_order`` says which go first); a trigger
    that only
    works on some inputs (source-specific) or a dynamic trigger can evade it. The feature
    excursion needs embeddings (``model.feature_layer``); without them only the anomaly index
    judges, and only with three or more classes; without a train split a shortcut cannot be told
    from an adversarial patch. The data-level detectors judge a label with at least
    ``min_class_size`` samples. Spectral signatures miss poison that is a large share of its label
    (a third, on the multi-class fixture). STRIP needs eval images of the predicted class, is weak
    when the trigger fades under superimposition (recall 0.14 on the binary fixture) and, with a
    larger ``strip_alpha``, flags a few percent of clean training images, of which a model is
    surer than of eval images.
    """

    id: ClassVar[str] = "backdoor"
    family: ClassVar[str] = "poisoning"

    class Params(CheckParams):
        trigger_search: bool = Field(default=True, description="run the model-level trigger search")
        trigger_samples: int | None = Field(
            default=None,
            ge=2,
            description="eval images in the trigger search (stratified); default 32 on the CPU, 128 on a GPU",
        )
        trigger_steps: int = Field(default=300, ge=1, description="optimisation steps per class, at most")
        trigger_early_stop: int = Field(
            default=40, ge=1, description="steps without a 1% smaller successful mask before a search stops"
        )
        trigger_learning_rate: float = Field(default=0.1, gt=0)
        success_threshold: float = Field(default=0.99, gt=0, le=1, description="share of the sample to flip")
        max_classes: int = Field(default=10, ge=1, description="classes searched at most")
        class_order: Literal["suspicion", "index"] = Field(
            default="suspicion",
            description="order in which classes are searched under the cap: most data-level suspicion first, "
            "then class index; or class index only",
        )
        excursion_threshold: float = Field(default=2.0, gt=0, description="feature excursion of a planted trigger")
        anomaly_threshold: float = Field(default=2.0, gt=0, description="MAD anomaly index of an outlier")
        min_class_size: int = Field(default=10, ge=2, description="training samples a label needs to be judged")
        clustering_components: int = Field(default=10, ge=1)
        clustering_max_relative_size: float = Field(default=0.35, gt=0, lt=0.5)
        clustering_min_silhouette: float = Field(default=0.5, gt=0, lt=1)
        spectral_z: float = Field(default=3.5, gt=0, description="robust z of the spectral cut")
        strip: bool = Field(default=True, description="run STRIP on the training images")
        strip_blends: int = Field(default=16, ge=1)
        strip_alpha: float = Field(default=0.6, gt=0, lt=1, description="weight of the inspected image")
        strip_false_rejection: float = Field(default=0.005, ge=0, lt=0.5)
        strip_max_images: int | None = Field(default=None, ge=1, description="training images STRIP inspects")
        strip_overlays: int = Field(default=512, ge=1, description="eval images drawn as the overlay pool, at most")
        batch_size: int = Field(default=128, ge=1)
        top_findings: int = Field(default=20, ge=0, description="top-ranked samples listed per method")

    needs: ClassVar[Needs] = Needs(predictions=True, features=True, gradients=True, images=True, train_optional=True)
    emits: ClassVar[tuple[str, ...]] = (
        "backdoor.model_suspected",
        "backdoor.trigger_norm",
        "backdoor.trigger_success_rate",
        "backdoor.trigger_excursion",
        "backdoor.anomaly_index",
        "backdoor.suspicious_fraction",
        "backdoor.strip_entropy_gap",
    )

    @serial_blas
    def run(self, ctx: AuditContext, params: Any) -> CheckResult:
        """Data-level detectors on the train split, then the trigger search per class."""
        p: BackdoorCheck.Params = params
        result = CheckResult()
        classes = list(ctx.classes)
        require_finite_logits(ctx.predictions("eval").logits)
        data = self._data_level(ctx, p, result)
        order = _search_order(classes, data, ctx.labels("train") if data is not None else None, p)
        if p.trigger_search:
            self._model_level(ctx, p, result, order)
        else:
            reason = "trigger search disabled (trigger_search: false)"
            result.metrics.append(Metric("backdoor.model_suspected", None, "lower_is_better", reason=reason))
        return result

    # ----------------------------------------------------------------- data level
    def _data_level(self, ctx: AuditContext, p: Params, result: CheckResult) -> _DataLevel | None:
        classes = list(ctx.classes)
        if not ctx.has_split("train"):
            reason = "no train split"
            result.metrics += [_undefined_fraction(method, name, reason) for method in METHODS for name in classes]
            result.metrics.append(Metric("backdoor.strip_entropy_gap", None, "lower_is_better", reason=reason))
            return None
        train = ctx.split("train")
        labels = np.asarray(ctx.labels("train"), dtype=np.int64)
        features = ctx.features("train").float().cpu().numpy().astype(np.float64)
        # A sample whose embedding is not finite cannot be placed; it is left out of the detectors.
        finite = np.isfinite(features).all(axis=1)
        data = _DataLevel(flagged={}, scores={})
        for method in ("activation_clustering", "spectral_signature"):
            flagged = np.zeros(labels.shape[0], dtype=bool)
            scores = np.zeros(labels.shape[0])
            for k, name in enumerate(classes):
                members = np.flatnonzero((labels == k) & finite)
                if members.size < p.min_class_size:
                    result.metrics.append(_too_small(method, name, members.size, p.min_class_size))
                    continue
                if method == "activation_clustering":
                    detection = activation_clustering(
                        features[members],
                        components=p.clustering_components,
                        max_relative_size=p.clustering_max_relative_size,
                        min_silhouette=p.clustering_min_silhouette,
                        seed=stable_seed(ctx.spec.seed, "backdoor", "clustering", name) % 2**31,
                    )
                else:
                    detection = spectral_signature(features[members], z_threshold=p.spectral_z)
                flagged[members] = detection.flagged
                scores[members] = detection.scores
                result.metrics.append(_fraction(method, name, detection.flagged))
            data.flagged[method], data.scores[method] = flagged, scores
        if p.strip:
            self._strip(ctx, p, result, data, labels)
        else:
            result.metrics += [_undefined_fraction("strip", name, "STRIP disabled (strip: false)") for name in classes]
            data.strip_gap_reason = "STRIP disabled (strip: false)"
        if data.strip_gap is None:
            reason = data.strip_gap_reason or "STRIP not run"
            result.metrics.append(Metric("backdoor.strip_entropy_gap", None, "lower_is_better", reason=reason))
        else:
            result.metrics.append(
                Metric("backdoor.strip_entropy_gap", data.strip_gap, "lower_is_better", n=int(labels.shape[0]))
            )
        _data_findings(result, data, train.rows, train.patients, labels, classes, p.top_findings)
        return data

    def _strip(self, ctx: AuditContext, p: Params, result: CheckResult, data: _DataLevel, labels: NDArray[Any]) -> None:
        classes = list(ctx.classes)
        model = ctx.model.module
        device = ctx.device
        generator = ctx.torch_generator("backdoor")

        def predict(batch: torch.Tensor) -> torch.Tensor:
            return model(batch.to(device))  # type: ignore[no-any-return]

        eval_predicted = ctx.predictions("eval").predicted
        train_predicted = ctx.predictions("train").predicted
        n_train = labels.shape[0]
        inspected = np.arange(n_train)
        if p.strip_max_images is not None and n_train > p.strip_max_images:
            inspected = np.sort(ctx.rng("backdoor").choice(n_train, size=p.strip_max_images, replace=False))
        n_eval = eval_predicted.shape[0]
        pool = np.arange(n_eval)
        if n_eval > p.strip_overlays:
            pool = np.sort(ctx.rng("backdoor-overlays").choice(n_eval, size=p.strip_overlays, replace=False))
        overlays = ctx.images("eval", pool)
        kwargs: dict[str, Any] = {
            "blends": p.strip_blends,
            "alpha": p.strip_alpha,
            "batch_size": p.batch_size,
            "generator": generator,
        }

        def entropies(split: str, rows: NDArray[Any]) -> NDArray[np.float64]:
            # Decoded images are held as float16; a chunk at a time is widened, so memory stays
            # bounded by the chunk and the overlay pool whatever the study's size.
            parts = [
                strip_entropy(predict, ctx.images(split, rows[i : i + _STRIP_CHUNK]), overlays, **kwargs)
                for i in range(0, rows.shape[0], _STRIP_CHUNK)
            ]
            return np.concatenate(parts) if parts else np.zeros(0)

        eval_entropy = entropies("eval", np.arange(n_eval))
        train_entropy = np.full(n_train, np.nan)
        train_entropy[inspected] = entropies("train", inspected)
        thresholds = class_thresholds(
            eval_entropy, eval_predicted, len(classes), false_rejection=p.strip_false_rejection
        )
        judged = ~np.isnan(train_entropy)
        below = np.zeros(n_train, dtype=bool)
        limit = thresholds[train_predicted]
        usable = judged & ~np.isnan(limit)
        below[usable] = train_entropy[usable] < limit[usable]
        data.flagged["strip"] = below
        data.scores["strip"] = np.where(judged, -np.nan_to_num(train_entropy, nan=0.0), -np.inf)
        for k, name in enumerate(classes):
            members = np.flatnonzero((labels == k) & judged)
            if members.size < p.min_class_size:
                result.metrics.append(_too_small("strip", name, members.size, p.min_class_size))
                continue
            result.metrics.append(_fraction("strip", name, below[members]))
        gaps = [
            float(eval_entropy[eval_predicted == k].mean() - train_entropy[usable & (train_predicted == k)].mean())
            for k in range(len(classes))
            if (eval_predicted == k).any() and (usable & (train_predicted == k)).any()
        ]
        if gaps:
            data.strip_gap = max(gaps)
        else:
            data.strip_gap_reason = "no class is predicted in both the eval and the train split"

    # ----------------------------------------------------------------- model level
    def _model_level(self, ctx: AuditContext, p: Params, result: CheckResult, order: Sequence[int]) -> None:
        classes = list(ctx.classes)
        labels_all = np.asarray(ctx.labels("eval"), dtype=np.int64)
        budget = p.trigger_samples or (128 if ctx.device.type == "cuda" else 32)
        sample = stratified_sample(labels_all, min(budget, labels_all.shape[0]), ctx.rng("backdoor"))
        labels = labels_all[sample]
        images = ctx.images("eval", sample).to(ctx.device)
        model = ctx.model.module
        embed = _embedder(ctx)
        clean_features = ctx.features("eval").float().cpu().numpy() if embed is not None else None
        train_features = (
            ctx.features("train").float().cpu().numpy() if embed is not None and ctx.has_split("train") else None
        )
        searched = list(order[: p.max_classes])
        triggers: dict[int, TriggerResult] = {}
        excursions: dict[int, float] = {}
        train_excursions: dict[int, float] = {}
        for k in searched:
            others = images[torch.as_tensor(labels != k, device=images.device)]
            if others.shape[0] == 0:
                continue
            generator = torch.Generator().manual_seed(stable_seed(ctx.spec.seed, "backdoor", "trigger", k) % 2**63)
            log.info("backdoor: trigger search for class %s on %d images (%s)", classes[k], others.shape[0], ctx.device)
            trigger = reverse_engineer_trigger(
                model,
                others,
                k,
                steps=p.trigger_steps,
                early_stop=p.trigger_early_stop,
                learning_rate=p.trigger_learning_rate,
                success_threshold=p.success_threshold,
                batch_size=p.batch_size,
                generator=generator,
            )
            triggers[k] = trigger
            if embed is not None and clean_features is not None:
                mask = torch.as_tensor(trigger.mask, device=others.device)[None, None]
                pattern = torch.as_tensor(trigger.pattern, device=others.device)[None]
                triggered = apply_trigger(others, mask, pattern)
                excursions[k] = feature_excursion(embed, triggered, clean_features, batch_size=p.batch_size)
                if train_features is not None:
                    train_excursions[k] = feature_excursion(embed, triggered, train_features, batch_size=p.batch_size)
        norms = np.array([triggers[k].norm if k in triggers else np.nan for k in range(len(classes))])
        searched_norms = norms[~np.isnan(norms)]
        indices = np.full(len(classes), np.nan)
        if searched_norms.size >= 3:
            indices[~np.isnan(norms)] = anomaly_indices(searched_norms)
        suspected: list[int] = []
        for k, name in enumerate(classes):
            label = {"class": name}
            trigger = triggers.get(k)
            if trigger is None:
                reason = (
                    f"not searched: beyond max_classes={p.max_classes}"
                    if k not in searched
                    else "no eval image of another class in the sample"
                )
                for metric in ("trigger_norm", "trigger_success_rate", "trigger_excursion", "anomaly_index"):
                    direction = "higher_is_better" if metric == "trigger_norm" else "lower_is_better"
                    result.metrics.append(Metric(f"backdoor.{metric}", None, direction, labels=label, reason=reason))
                result.findings.append({"kind": "trigger_search", "class": name, "searched": False, "reason": reason})
                continue
            n = int((labels != k).sum())
            result.metrics.append(Metric("backdoor.trigger_norm", trigger.norm, "higher_is_better", labels=label, n=n))
            result.metrics.append(
                Metric("backdoor.trigger_success_rate", trigger.success_rate, "lower_is_better", labels=label, n=n)
            )
            excursion = excursions.get(k)
            result.metrics.append(
                Metric(
                    "backdoor.trigger_excursion",
                    excursion,
                    "lower_is_better",
                    labels=label,
                    n=n,
                    reason=None if excursion is not None else "no embeddings (set model.feature_layer)",
                )
            )
            index = float(indices[k])
            result.metrics.append(
                Metric(
                    "backdoor.anomaly_index",
                    index if np.isfinite(index) else None,
                    "lower_is_better",
                    labels=label,
                    n=int(searched_norms.size),
                    reason=None if np.isfinite(index) else _anomaly_reason(searched_norms.size),
                )
            )
            if _is_suspected(trigger, excursion, train_excursions.get(k), index, p):
                suspected.append(k)
            result.findings.append(
                {
                    "kind": "trigger_search",
                    "class": name,
                    "searched": True,
                    "images": n,
                    "steps": trigger.steps,
                    "reached_success_threshold": trigger.reached,
                    "train_excursion": None if k not in train_excursions else round(train_excursions[k], 3),
                    "seconds": round(trigger.seconds, 2),
                }
            )
        judgeable = bool(triggers) and (bool(excursions) or searched_norms.size >= 3)
        if judgeable:
            result.metrics.append(
                Metric("backdoor.model_suspected", float(bool(suspected)), "lower_is_better", n=int(labels.shape[0]))
            )
        else:
            reason = (
                "no trigger searched"
                if not triggers
                else "no embeddings for the feature excursion and fewer than three classes for the anomaly index"
            )
            result.metrics.append(Metric("backdoor.model_suspected", None, "lower_is_better", reason=reason))
        artifact_name = None
        if triggers:
            from auditkit.checks.backdoor.plots import trigger_figure

            path, relative = ctx.artifact_path(self.id, "triggers.svg")
            trigger_figure(
                [(classes[k], triggers[k], excursions.get(k), k in suspected) for k in sorted(triggers)], path
            )
            artifact_name = relative
            result.artifacts.append(
                Artifact(
                    name="triggers",
                    path=relative,
                    media_type="image/svg+xml",
                    description="Reverse-engineered triggers per class: mask, and mask times pattern",
                )
            )
        for k in suspected:
            trigger = triggers[k]
            result.findings.append(
                {
                    "kind": "suspected_target",
                    "class": classes[k],
                    "trigger_norm": round(trigger.norm, 3),
                    "trigger_success_rate": round(trigger.success_rate, 4),
                    "trigger_excursion": None if k not in excursions else round(excursions[k], 3),
                    "anomaly_index": None if not np.isfinite(indices[k]) else round(float(indices[k]), 3),
                    "artifact": artifact_name,
                }
            )


def _is_suspected(
    trigger: TriggerResult,
    excursion: float | None,
    train_excursion: float | None,
    index: float,
    p: BackdoorCheck.Params,
) -> bool:
    """The decision rule (see the class docstring): a shortcut, or an outlier among 3+ classes.

    A shortcut drives the embedding beyond the clean eval images' range; when the train split is
    there it must also stay within the training images' range (the poisoned images taught it),
    which tells a planted trigger from an adversarial patch that no image, clean or poisoned,
    reaches.
    """
    if not trigger.reached:
        return False
    shortcut = excursion is not None and np.isfinite(excursion) and excursion >= p.excursion_threshold
    if shortcut and train_excursion is not None and np.isfinite(train_excursion):
        shortcut = train_excursion < p.excursion_threshold
    outlier = bool(np.isfinite(index) and index >= p.anomaly_threshold)
    return bool(shortcut or outlier)


def _anomaly_reason(count: int) -> str:
    if count < 3:
        return "degenerate with fewer than three classes searched"
    return "the MAD of the trigger norms is zero"


def _embedder(ctx: AuditContext) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Images in [0, 1] -> the embeddings the shared pass caches (same layer, same hook rule)."""
    feature_module = ctx.model.feature_module
    if feature_module is None:
        return None
    use_input = ctx.spec.model.feature_layer is None
    model = ctx.model.module
    device = ctx.device

    def embed(images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured.append((inputs[0] if use_input else output).detach().flatten(1))

        handle = feature_module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                model(images.to(device))
        finally:
            handle.remove()
        return captured[-1]

    return embed


def _search_order(
    classes: Sequence[str], data: _DataLevel | None, train_labels: NDArray[Any] | None, p: BackdoorCheck.Params
) -> list[int]:
    """Class indices in search order: most data-level suspicion first (ties by index), or by index."""
    indices = list(range(len(classes)))
    if p.class_order == "index" or data is None or train_labels is None or not data.flagged:
        return indices
    labels = np.asarray(train_labels)

    def suspicion(k: int) -> float:
        members = labels == k
        if not members.any():
            return 0.0
        return max(float(flagged[members].mean()) for flagged in data.flagged.values())

    return sorted(indices, key=lambda k: (-suspicion(k), k))


def _fraction(method: str, name: str, flagged: NDArray[np.bool_]) -> Metric:
    """The share of a label's training samples a method flagged."""
    return Metric(
        "backdoor.suspicious_fraction",
        float(np.mean(flagged)),
        "lower_is_better",
        labels={"method": method, "class": name},
        n=int(flagged.size),
    )


def _undefined_fraction(method: str, name: str, reason: str, n: int | None = None) -> Metric:
    return Metric(
        "backdoor.suspicious_fraction",
        None,
        "lower_is_better",
        labels={"method": method, "class": name},
        n=n,
        reason=reason,
    )


def _too_small(method: str, name: str, size: int, minimum: int) -> Metric:
    reason = f"{size} training samples with this label (and finite embeddings), fewer than min_class_size={minimum}"
    return _undefined_fraction(method, name, reason, n=int(size))


def _data_findings(
    result: CheckResult,
    data: _DataLevel,
    rows: NDArray[Any],
    patients: Sequence[str | None],
    labels: NDArray[Any],
    classes: Sequence[str],
    top: int,
) -> None:
    """Flagged rows per method and class, and the top-ranked samples per method."""
    for method, flagged in data.flagged.items():
        for k, name in enumerate(classes):
            hit = np.flatnonzero(flagged & (labels == k))
            if hit.size:
                result.findings.append(
                    {
                        "kind": "poisoning_suspected",
                        "method": method,
                        "class": name,
                        "split": "train",
                        "count": int(hit.size),
                        "rows": [int(rows[i]) for i in hit],
                    }
                )
        scores = data.scores[method]
        ranked = [i for i in np.argsort(-scores, kind="stable") if flagged[i]][:top]
        for rank, i in enumerate(ranked, start=1):
            result.findings.append(
                {
                    "kind": "suspicious_training_sample",
                    "method": method,
                    "rank": rank,
                    "split": "train",
                    "row": int(rows[i]),
                    "patient": patients[i],
                    "class": classes[int(labels[i])],
                    "score": round(float(scores[i]), 4),
                }
            )
