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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field

from auditkit.check import (
    NO_GRADIENTS,
    Check,
    CheckParams,
    CheckResult,
    Metric,
    Needs,
    Resources,
    require_finite_logits,
)
from auditkit.checks.backdoor.signatures import (
    Detection,
    absent_from_reference,
    activation_clustering,
    confirm_population,
    spectral_signature,
    train_only_neighbourhood,
)
from auditkit.checks.backdoor.stamps import train_only_stamps
from auditkit.checks.backdoor.strip import class_thresholds, strip_entropy
from auditkit.checks.backdoor.trigger import (
    TriggerResult,
    anomaly_indices,
    apply_trigger,
    feature_excursion,
    reverse_engineer_trigger,
)
from auditkit.context import serial_blas
from auditkit.sampling import stratified_sample

if TYPE_CHECKING:
    from auditkit.check import CheckContext

__all__ = [
    "BackdoorCheck",
    "Detection",
    "TriggerResult",
    "absent_from_reference",
    "activation_clustering",
    "anomaly_indices",
    "apply_trigger",
    "class_thresholds",
    "confirm_population",
    "feature_excursion",
    "reverse_engineer_trigger",
    "spectral_signature",
    "strip_entropy",
    "train_only_neighbourhood",
    "train_only_stamps",
]

log = logging.getLogger(__name__)

Method = Literal["activation_clustering", "spectral_signature", "neighbourhood", "stamp", "strip"]
METHODS: tuple[Method, ...] = ("activation_clustering", "spectral_signature", "neighbourhood", "stamp", "strip")
_STRIP_CHUNK = 512  # images widened to float32 at a time


@dataclass
class _DataLevel:
    """Per method: flagged mask and scores over the train split (``None`` if not run), and the
    class indices where a method's candidate population was confirmed against the eval split."""

    flagged: dict[str, NDArray[np.bool_]]
    scores: dict[str, NDArray[np.float64]]
    confirmed: dict[int, list[str]] = field(default_factory=dict)
    strip_gap: float | None = None
    strip_gap_reason: str | None = None
    # Each label's confirmation level (:func:`_label_alpha`).
    level: float = 0.05
    # The neighbourhood test's detections per class, held until corroborated (:func:`_settle`).
    neighbourhood: dict[int, tuple[NDArray[np.int64], Detection]] = field(default_factory=dict)


class BackdoorParams(CheckParams):
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
    shortcut_ratio: float = Field(
        default=1.75,
        ge=1,
        description="with a train split, a shortcut's excursion against the eval range over that against the "
        "training range, at least",
    )
    anomaly_threshold: float = Field(default=2.0, gt=0, description="MAD anomaly index of an outlier")
    min_class_size: int = Field(default=10, ge=2, description="training samples a label needs to be judged")
    clustering_components: int = Field(default=10, ge=1)
    clustering_max_relative_size: float = Field(default=0.45, gt=0, lt=0.5)
    clustering_min_silhouette: float = Field(default=0.25, ge=0, lt=1)
    spectral_z: float = Field(default=3.5, gt=0, description="robust z of the spectral cut")
    neighbourhood: bool = Field(
        default=True, description="run the train-only neighbourhood test (needs eval images of the label)"
    )
    neighbourhood_neighbours: int = Field(
        default=10, ge=1, description="neighbours per training row in the train-only neighbourhood test"
    )
    neighbourhood_separation: float = Field(
        default=1.15,
        gt=0,
        description="median distance to the nearest eval image over that to the k-th training neighbour, at "
        "least, of a train-only population",
    )
    stamp: bool = Field(
        default=True, description="search the training images for a patch no eval image of the label carries"
    )
    stamp_levels: int = Field(default=32, ge=2, le=256, description="grey levels a stamp's window is quantised to")
    stamp_window: int = Field(default=3, ge=2, le=8, description="window side in pixels (the smallest stamp found)")
    stamp_contrast: float = Field(
        default=0.25, gt=0, le=1, description="smallest span of a window's levels, as a share of the range"
    )
    stamp_min_rows: int = Field(default=5, ge=2, description="training images of a label that must carry a stamp")
    stamp_max_images: int = Field(
        default=512, ge=16, description="images per label and split the windows are counted on (a sample beyond)"
    )
    confirm: bool = Field(
        default=True,
        description="flag a data-level population only when the eval split's images of the label avoid it "
        "(false: the papers' unconfirmed rules, and the model level falls back to shortcut or anomaly index)",
    )
    confirm_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="family-wise level of a model's confirmations: the largest binomial p of the eval images' "
        "absence that confirms, divided by the number of classes",
    )
    confirm_max_ratio: float = Field(
        default=0.25, gt=0, le=1, description="largest eval share / training share of a confirmed population"
    )
    strip: bool = Field(default=True, description="run STRIP on the training images")
    strip_blends: int = Field(default=16, ge=1)
    strip_alpha: float = Field(default=0.6, gt=0, lt=1, description="weight of the inspected image")
    strip_false_rejection: float = Field(default=0.005, ge=0, lt=0.5)
    strip_max_images: int | None = Field(default=None, ge=1, description="training images STRIP inspects")
    strip_overlays: int = Field(default=512, ge=1, description="eval images drawn as the overlay pool, at most")
    batch_size: int = Field(default=128, ge=1)
    top_findings: int = Field(default=20, ge=0, description="top-ranked samples listed per method")


class BackdoorCheck(Check[BackdoorParams]):
    """Backdoor and data-poisoning detection (NIST AI RMF MEASURE 2.7, MANAGE 2.4, MAP 4.1).

    Method: Neural Cleanse (Wang et al., IEEE S&P 2019) reverse-engineers, for each candidate
    target class, the smallest mask and pattern that flip clean eval images of the other classes
    to it. On the train split, activation clustering (Chen et al., 2018) and spectral signatures
    (Tran et al., NeurIPS 2018) look for a small separate population inside each label's cached
    embeddings, STRIP (Gao et al., ACSAC 2019) marks training images whose prediction stays
    confident when clean eval images are superimposed (thresholds per predicted class from the
    eval split), and the train-only neighbourhood test (``neighbourhood``, this project's) marks
    populations of training rows whose nearest neighbours among the label's pooled training and
    eval embeddings are significantly seldom eval images, and which lie farther from every eval
    image than from their own training neighbours (:func:`.signatures.train_only_neighbourhood`).
    On the pixels, the train-only stamp search (``stamp``, this project's; :mod:`.stamps`) marks
    training images of a label that carry a contrasted 3 x 3 window, quantised to 32 levels, which
    at least 5 of them repeat exactly and significantly few eval images of the label carry
    (binomial test over the windows that could reach significance, Tarone's count): a pasted
    patch trigger, wherever it sits.

    The papers' criteria also fire on clean models (issue 16): a label's natural sub-populations
    (bilateral effusions, one site's stain, inverted shapes) form small, separated clusters, a
    class that is naturally easy to paint has an outlying small mask, and a model is surer of its
    own training images than of eval ones. What no clean model has is a population of training
    images that clean images do not share - poison exists only in the training split. So a
    data-level candidate (the small cluster, the spectral tail, STRIP's marks) is *confirmed*
    only when the eval images of the same label avoid its region of the embedding: the one-sided
    binomial probability of so few of them there, were it as common among clean images, is at
    most ``confirm_alpha`` (0.05) divided by the number of classes (round 6: a model offers one
    chance per label; the stamp search also divides by its testable windows) and their share
    there at most ``confirm_max_ratio`` (0.25) of the training share (:mod:`.signatures`; the
    neighbourhood test asks it row by row first);
    unconfirmed candidates are reported as
    ``candidate_population`` findings and flag nothing. A class is a suspected target when its
    trigger reached the success threshold and either (a) it is a *shortcut*: it drives the
    embedding beyond the range clean eval images reach (feature excursion of at least 2, after
    the neuron elevation of ABS, Liu et al., CCS 2019) yet within the training images' range (below
    2, and at most 1/1.75 of the eval excursion), which the poisoned images taught it - a trigger
    beyond both ranges is an adversarial patch; or (b) a data-level population of its label is
    confirmed. The neighbourhood test's population counts, and flags its rows, only with a second
    line of evidence (round 5 of issue 16: a train-only neighbourhood also arises by chance in a
    small label): a shortcut, another method's confirmed population in the label, or - the trigger
    search's own opinion - a mask norm that is an outlier among the classes' (MAD anomaly index
    of at least ``anomaly_threshold``); uncorroborated, it is a ``candidate_population`` with
    ``corroborated: false``. The MAD anomaly index of the mask norms (on log norms) is reported;
    by itself it decides only without a train split or with ``confirm: false`` (the papers'
    rules).

    Figures (``docs/backdoor.md``; ``scripts/backdoor_population.py``): on a population of clean
    models of five architectures, three data kinds (shapes, textures, chest phantoms with natural
    sub-populations) and 2-5 classes, and poisoned twins (BadNets patches of 3-5 pixels in every
    corner, faint blended triggers, source-specific triggers, triggers on the lesion class of
    binary chest models), the rule was chosen on 135 models (83 clean) and measured once on each
    of three held-out parts of 41 models of new seeds (``held_out_4`` to ``held_out_6``), pooled: 2
    of 75 clean models suspected (2.7%, 95% Wilson interval 0.7-9.2%; 0/25, 1/25, 1/25), those two
    the only ones with a class above 2% flagged (26.7% by the neighbourhood test, a chance
    train-only population of separation 1.19; 11.7% by activation clustering on a model at chance
    accuracy; spectral signatures and STRIP: 0/75), 39 of 48 twins found with their target (81%,
    68-90%), and BadNets poisoned rows found by the neighbourhood test at recall 0.756 (440 of
    582), precision 0.99 (0.797, 0.745 and 0.727 per part; 0.86 and 1.00 on the tuning parts), by
    activation clustering at 0.59 and 0.99, by any method at 0.782 and 0.92 (3-pixel patches are
    the misses). The stamp search, added after those measurements and tuned on the tuning parts'
    data only (``scripts/stamp_population.py``; it reads pixels, so its rates are the data's): on
    ``held_out_4`` to ``held_out_6`` every BadNets row of the 30 twins (582 of 582, precision 1.00)
    and no row of the 75 clean studies; with it, BadNets rows are found by some method at recall
    1.00 and precision at least 0.93. Clean models' outputs are unchanged by it (it flagged none of
    their rows), so the false-positive rates above stand. The papers' rules on the first tuning
    part: 2 of 10 clean models suspected, STRIP flagging up to 10% of a clean class.

    Round 5 (the neighbourhood test only with a second line of evidence), chosen on the records of
    all 258 models above (0 of 158 clean models suspected, 88 of 100 twins found, as round 4) and
    measured once on ``held_out_7`` (41 new models): 2 of 25 clean models suspected (8.0%,
    2.2-25.0%), each by one marginal confirmation of another method (STRIP, p 0.031; the stamp
    search, p 0.047), none by the neighbourhood test (which confirmed and, uncorroborated, did not
    flag a chance pocket of 31.7% of a class that round 4 would have called poison); 13 of 16 twins
    found with their target; BadNets rows found by some method at recall 1.00, precision 0.87.

    Round 6 (each method's confirmations held to ``confirm_alpha`` over the model's labels, and
    the stamp search's level divided by its testable windows only, Tarone's count), chosen on the
    records of all 299 models above and measured once on ``held_out_8`` (52 new models: 36 clean,
    16 twins): 0 of 36 clean models suspected (0%, 0-9.6%), no row of a clean model flagged by any
    method, 15 of 16 twins found with their target (94%, 72-99%; the miss a faint blend), BadNets
    rows found by some method at recall 1.00, precision 0.95 (210 of 210; 10 of 10 models at
    recall 0.8 and precision 0.5). Audited again with it, the 299 models it was chosen on gave 0
    of 183 clean models suspected and 101 of 116 twins found (none lost against round 5).

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

    Findings: ``suspected_target`` (the class, its norm, excursion, success rate, anomaly index,
    the ``evidence`` that decided - ``shortcut``, ``confirmed_population:<method>`` or
    ``anomaly_index`` - and whether its mask is among the smaller half), ``trigger_search`` (per
    class: searched or not, steps, seconds), ``candidate_population`` (per method and class with
    a candidate: its size and share, the eval split's share, the binomial p, confirmed or not,
    and for the neighbourhood test's confirmed ones whether they were corroborated),
    ``poisoning_suspected`` (per method and class: the flagged training rows),
    ``suspicious_training_sample`` (the top ranked flagged samples per method: split, row,
    patient surrogate, class, score) - rows and surrogates only.

    Tasks: ``classification`` only. A multi-label or regression model is skipped with the reason
    (``task_reasons``): a regressor has no class to target or to group by; for multi-label models
    the per-label analogues (a trigger switching one label on or off, clustering and spectral
    signatures over each label's positive training images, a per-label STRIP) are not
    implemented, and the decision rule's figures above hold for single-label models only.

    On an exported artefact (ONNX Runtime, no gradients) the data-level detectors and STRIP run on
    the artefact's own outputs and embeddings; the trigger search runs on ``model.reference`` (the
    PyTorch model the artefact was exported from) when the spec names one, each trigger's success
    rate and feature excursion measured on the artefact (a trigger reaches the threshold only if it
    flips the artefact), and is left out with the reason otherwise.

    Limitations: the trigger search is bounded by ``trigger_steps`` (with early stopping),
    ``trigger_samples`` (default 32 images on the CPU, 128 on a GPU) and ``max_classes`` (classes
    beyond the cap are reported as not searched; ``class_order`` says which go first); a
    source-specific or dynamic trigger evades it, and a faint blended trigger mostly evades both
    levels (6 of 15 blends found in the population). The stamp search misses blends and one-colour
    patches (flat windows are dropped: they recur naturally) and any patch re-encoded per image
    beyond its quantisation (JPEG). Confirmation assumes the eval split is clean and drawn like the
    training split; it needs eval images of the label (with 40 of them, a population below about
    7% of its label cannot be confirmed) and loses poison that k-means does not separate from a
    label's natural sub-populations. A source-specific attack's cover images (stamped, label
    kept) are a confirmed population too, so their class can be named beside the target. The
    feature excursion needs embeddings (``model.feature_layer``); without a train split the
    model level falls back on the excursion and the anomaly index, which are not confirmed
    (on the population's first tuning part the anomaly index called 2 of 10 clean models
    trojaned). The data-level detectors judge a label with at least ``min_class_size`` samples.
    Spectral signatures miss poison that is a large share of its label (a third, on the
    multi-class fixture); STRIP is weak when the trigger fades under superimposition.
    """

    id: ClassVar[str] = "backdoor"
    family: ClassVar[str] = "poisoning"

    Params = BackdoorParams

    needs: ClassVar[Needs] = Needs(
        predictions=True, features=True, gradients=True, images=True, train_optional=True, reference=True
    )
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=1.0)  # on Ray: a GPU where there is one
    emits: ClassVar[tuple[str, ...]] = (
        "backdoor.model_suspected",
        "backdoor.trigger_norm",
        "backdoor.trigger_success_rate",
        "backdoor.trigger_excursion",
        "backdoor.anomaly_index",
        "backdoor.suspicious_fraction",
        "backdoor.strip_entropy_gap",
    )
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    task_reasons: ClassVar[dict[str, str]] = {
        "multilabel": (
            "its detectors are written and calibrated for one class per image (Neural Cleanse flips a"
            " softmax decision to one target class, STRIP measures the entropy of one softmax"
            " distribution, the data-level detectors group the training images by their one class,"
            " and the rule that tells a planted trigger from natural evidence was chosen on"
            " single-label models, docs/backdoor.md); a trigger search toward a label switched on or"
            " off and per-label detectors are not implemented or measured"
        ),
        "regression": (
            "a backdoor trigger flips a decision to a target class and the data-level detectors look"
            " for a separate population inside each class's training images; a regressor has no"
            " class to target or to group its training images by"
        ),
    }
    dims_reason: ClassVar[str | None] = (
        "its decision rule was chosen on 2-D models and, measured once unchanged on 20 3-D models (the"
        " population's volumes_3d part: 3-D CNN, ResNet and DenseNet on 3-D solids), it suspected 1 of 12"
        " clean models and found 4 of 8 poisoned twins (none of the three binary ones) - below its 2-D"
        " figures, so it is not a gate on volumes until a 3-D rule is chosen and measured (docs/backdoor.md)"
    )

    @serial_blas
    def run(self, ctx: CheckContext, params: BackdoorParams) -> CheckResult:
        """Data-level detectors on the train split, then the trigger search per class."""
        p = params
        result = CheckResult()
        classes = list(ctx.classes)
        require_finite_logits(ctx.predictions("eval").logits)
        data = self._data_level(ctx, p, result)
        order = _search_order(classes, data, ctx.labels("train") if data is not None else None, p)
        searchable = ctx.model.has_gradients or ctx.has_reference
        evidences: dict[int, list[str]] = {}
        if p.trigger_search and searchable:
            evidences = self._model_level(ctx, p, result, order, data)
        else:
            reason = (
                "trigger search disabled (trigger_search: false)"
                if not p.trigger_search
                else f"trigger search not run: {NO_GRADIENTS} and the spec names no model.reference to search on;"
                " the data-level detectors ran on the artefact"
            )
            result.metrics.append(Metric("backdoor.model_suspected", None, "lower_is_better", reason=reason))
        if data is not None:
            _settle(result, data, classes, evidences)
            train = ctx.split("train")
            labels = np.asarray(ctx.labels("train"), dtype=np.int64)
            _data_findings(result, data, train.rows, train.patients, labels, classes, p.top_findings)
        return result

    # ----------------------------------------------------------------- data level
    def _data_level(self, ctx: CheckContext, p: BackdoorParams, result: CheckResult) -> _DataLevel | None:
        classes = list(ctx.classes)
        if not ctx.has_split("train"):
            reason = "no train split"
            result.metrics += [_undefined_fraction(method, name, reason) for method in METHODS for name in classes]
            result.metrics.append(Metric("backdoor.strip_entropy_gap", None, "lower_is_better", reason=reason))
            return None
        labels = np.asarray(ctx.labels("train"), dtype=np.int64)
        features = ctx.features("train").float().cpu().numpy().astype(np.float64)
        # A sample whose embedding is not finite cannot be placed; it is left out of the detectors.
        finite: NDArray[np.bool_] = np.asarray(np.isfinite(features).all(axis=1))
        eval_features = _references(ctx, len(classes))
        references = eval_features if p.confirm else None
        alpha = _label_alpha(p, classes)
        data = _DataLevel(flagged={}, scores={}, level=alpha)
        for method in ("activation_clustering", "spectral_signature", "neighbourhood"):
            if method == "neighbourhood" and not p.neighbourhood:
                reason = "neighbourhood test disabled (neighbourhood: false)"
                result.metrics += [_undefined_fraction(method, name, reason) for name in classes]
                continue
            flagged = np.zeros(labels.shape[0], dtype=bool)
            scores = np.zeros(labels.shape[0])
            for k, name in enumerate(classes):
                members = np.flatnonzero((labels == k) & finite)
                if members.size < p.min_class_size:
                    result.metrics.append(_too_small(method, name, members.size, p.min_class_size))
                    continue
                reference = None if references is None else references[k]
                if method == "neighbourhood":
                    if eval_features[k].shape[0] == 0:
                        reason = "no eval image with this label (the neighbourhood test compares with them)"
                        result.metrics.append(_undefined_fraction(method, name, reason, n=int(members.size)))
                        continue
                    detection = train_only_neighbourhood(
                        features[members],
                        eval_features[k],
                        components=p.clustering_components,
                        neighbours=p.neighbourhood_neighbours,
                        separation=p.neighbourhood_separation,
                        confirm_alpha=alpha,
                        confirm_max_ratio=p.confirm_max_ratio,
                    )
                elif method == "activation_clustering":
                    detection = activation_clustering(
                        features[members],
                        reference=reference,
                        components=p.clustering_components,
                        max_relative_size=p.clustering_max_relative_size,
                        min_silhouette=p.clustering_min_silhouette,
                        confirm_alpha=alpha,
                        confirm_max_ratio=p.confirm_max_ratio,
                        seed=ctx.seed("clustering", name) % 2**31,
                    )
                else:
                    detection = spectral_signature(
                        features[members],
                        reference=reference,
                        z_threshold=p.spectral_z,
                        confirm_alpha=alpha,
                        confirm_max_ratio=p.confirm_max_ratio,
                    )
                flagged[members] = detection.flagged
                scores[members] = detection.scores
                if method == "neighbourhood":
                    # Held until the other evidence is in (:func:`_settle`): the flags stand for
                    # now only to order the trigger search.
                    data.neighbourhood[k] = (members, detection)
                    continue
                _record_candidate(result, data, method, k, name, detection)
                result.metrics.append(_fraction(method, name, detection.flagged))
            data.flagged[method], data.scores[method] = flagged, scores
        if p.stamp:
            self._stamps(ctx, p, result, data, labels)
        else:
            result.metrics += [
                _undefined_fraction("stamp", name, "stamp search disabled (stamp: false)") for name in classes
            ]
        if p.strip:
            self._strip(ctx, p, result, data, labels, features, finite, references)
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
        return data

    def _stamps(
        self, ctx: CheckContext, p: BackdoorParams, result: CheckResult, data: _DataLevel, labels: NDArray[Any]
    ) -> None:
        """The train-only stamp search (:mod:`.stamps`) per label, on the decoded pixels."""
        classes = list(ctx.classes)
        eval_labels = np.asarray(ctx.labels("eval"), dtype=np.int64)
        flagged = np.zeros(labels.shape[0], dtype=bool)
        scores = np.zeros(labels.shape[0])
        for k, name in enumerate(classes):
            members = np.flatnonzero(labels == k)
            if members.size < p.min_class_size:
                result.metrics.append(_too_small("stamp", name, members.size, p.min_class_size))
                continue
            reference = np.flatnonzero(eval_labels == k)
            if reference.size == 0:
                reason = "no eval image with this label (the stamp search compares with them)"
                result.metrics.append(_undefined_fraction("stamp", name, reason, n=int(members.size)))
                continue
            detection = train_only_stamps(
                lambda rows, members=members: ctx.images("train", members[rows], dtype=torch.float16).numpy(),
                int(members.size),
                lambda rows, reference=reference: ctx.images("eval", reference[rows], dtype=torch.float16).numpy(),
                int(reference.size),
                levels=p.stamp_levels,
                window=p.stamp_window,
                contrast=p.stamp_contrast,
                min_rows=p.stamp_min_rows,
                confirm_alpha=data.level,
                confirm_max_ratio=p.confirm_max_ratio,
                max_images=p.stamp_max_images,
                rng=ctx.rng("stamp", name),
            )
            _record_candidate(result, data, "stamp", k, name, detection)
            if detection.confirmed and detection.box is not None:
                top, left, bottom, right = detection.box
                result.findings.append(
                    {
                        "kind": "stamp",
                        "class": name,
                        "split": "train",
                        "count": int(detection.flagged.sum()),
                        "box": {"top": top, "left": left, "bottom": bottom, "right": right},
                        "positions": detection.positions,
                        "keys_recurring": detection.recurring,
                        "keys_tested": detection.candidates,
                        "p_value": detection.confirmation_p,
                    }
                )
            flagged[members] = detection.flagged
            scores[members] = detection.scores
            result.metrics.append(_fraction("stamp", name, detection.flagged))
        data.flagged["stamp"], data.scores["stamp"] = flagged, scores

    def _strip(
        self,
        ctx: CheckContext,
        p: BackdoorParams,
        result: CheckResult,
        data: _DataLevel,
        labels: NDArray[Any],
        features: NDArray[np.float64],
        finite: NDArray[np.bool_],
        references: list[NDArray[np.float64]] | None,
    ) -> None:
        classes = list(ctx.classes)
        model = ctx.model.forward_module()  # STRIP only queries the model: an artefact is judged too
        device = ctx.device
        generator = ctx.torch_generator()

        def predict(batch: torch.Tensor) -> torch.Tensor:
            return model(batch.to(device))  # type: ignore[no-any-return]

        eval_predicted = ctx.predictions("eval").predicted
        train_predicted = ctx.predictions("train").predicted
        n_train = labels.shape[0]
        inspected = np.arange(n_train)
        if p.strip_max_images is not None and n_train > p.strip_max_images:
            inspected = np.sort(ctx.rng().choice(n_train, size=p.strip_max_images, replace=False))
        n_eval = eval_predicted.shape[0]
        pool = np.arange(n_eval)
        if n_eval > p.strip_overlays:
            pool = np.sort(ctx.rng("overlays").choice(n_eval, size=p.strip_overlays, replace=False))
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
        data.scores["strip"] = np.where(judged, -np.nan_to_num(train_entropy, nan=0.0), -np.inf)
        for k, name in enumerate(classes):
            members = np.flatnonzero((labels == k) & judged)
            if members.size < p.min_class_size:
                result.metrics.append(_too_small("strip", name, members.size, p.min_class_size))
                below[members] = False
                continue
            if references is not None and below[members].any():
                # STRIP flags clean training images too (a model is surer of them than of eval
                # images); like the clustering's populations, its flags stand only where the
                # label's clean eval images avoid them in the embedding.
                placed = members[finite[members]]
                detection = confirm_population(
                    features[placed],
                    below[placed],
                    references[k],
                    components=p.clustering_components,
                    alpha=data.level,
                    max_ratio=p.confirm_max_ratio,
                )
                _record_candidate(result, data, "strip", k, name, detection)
                below[members] = False
                below[placed] = detection.flagged
            result.metrics.append(_fraction("strip", name, below[members]))
        data.flagged["strip"] = below
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
    def _model_level(
        self, ctx: CheckContext, p: BackdoorParams, result: CheckResult, order: Sequence[int], data: _DataLevel | None
    ) -> dict[int, list[str]]:
        """The trigger search per class and the verdict; returns each suspected class's evidence."""
        classes = list(ctx.classes)
        labels_all = np.asarray(ctx.labels("eval"), dtype=np.int64)
        budget = p.trigger_samples or (128 if ctx.device.type == "cuda" else 32)
        sample = stratified_sample(labels_all, min(budget, labels_all.shape[0]), ctx.rng())
        labels = labels_all[sample]
        images = ctx.images("eval", sample).to(ctx.device)
        # On an exported artefact the search runs on the reference it was exported from, and each
        # trigger counts only as far as it flips the artefact itself (the verdict is the artefact's).
        transfer = not ctx.model.has_gradients
        model = ctx.reference_model() if transfer else ctx.model.differentiable()
        artefact = ctx.model.forward_module() if transfer else None
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
            generator = torch.Generator().manual_seed(ctx.seed("trigger", k))
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
            if artefact is not None:
                trigger = _confirmed_on(artefact, trigger, others, k, p)
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
        evidences: dict[int, list[str]] = {}
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
                    direction: Literal["higher_is_better", "lower_is_better"] = (
                        "higher_is_better" if metric == "trigger_norm" else "lower_is_better"
                    )
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
            evidence = _evidence(trigger, excursion, train_excursions.get(k), index, data, k, p)
            if evidence:
                suspected.append(k)
                evidences[k] = evidence
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
                    "searched_on": "model.reference; success rate and embeddings of the artefact"
                    if transfer
                    else "the model",
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

            artifact = ctx.write_artifact(
                "triggers",
                "triggers.svg",
                lambda path: trigger_figure(
                    [(classes[k], triggers[k], excursions.get(k), k in suspected) for k in sorted(triggers)], path
                ),
                description="Reverse-engineered triggers per class: mask, and mask times pattern",
            )
            artifact_name = artifact.path
            result.artifacts.append(artifact)
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
                    "evidence": evidences[k],
                    "trigger_norm_at_most_median": bool(trigger.norm <= float(np.median(searched_norms))),
                    "artifact": artifact_name,
                }
            )
        return evidences


def _evidence(
    trigger: TriggerResult,
    excursion: float | None,
    train_excursion: float | None,
    index: float,
    data: _DataLevel | None,
    k: int,
    p: BackdoorParams,
) -> list[str]:
    """The decision rule (see the class docstring): why class ``k`` is a suspected target.

    Empty when it is not. A trigger that never reached the success threshold suspects nothing.
    Otherwise:

    * ``shortcut``: the trigger drives the embedding beyond the clean eval images' range (feature
      excursion at least ``excursion_threshold``) and, with a train split, stays within the
      training images' range (below the threshold, and at most ``1 / shortcut_ratio`` of the
      eval excursion) - the poisoned ones taught it; a trigger beyond both is an adversarial
      patch;
    * ``confirmed_population:<method>``: with a train split and confirmation on, a data-level
      method found a population inside label ``k`` that the label's clean eval images avoid -
      training images that only the training split holds, which is what poison is. The trigger
      search need not agree: it cannot find a source-specific trigger (measured: a confirmed
      target with a mask above the median was missed when agreement was required), so whether
      it does is reported beside the verdict (``trigger_norm_at_most_median``);
    * ``anomaly_index`` (only without a train split, or with ``confirm: false``): with three or
      more classes searched, a MAD anomaly index of at least ``anomaly_threshold``. Measured on
      clean models it is no evidence by itself - a class that is naturally easy to paint (a
      cross among round shapes) has an outlying small mask - so with a train split it is
      reported, never decisive alone.

    The neighbourhood test's confirmed population (``confirmed_population:neighbourhood``) is
    the exception among the data-level methods: it counts only beside another reason above, or
    beside an outlying mask (then listed with ``anomaly_index``), and :func:`_settle` keeps its
    rows only where it counted (or, for a class no trigger judged, where another method's
    population is confirmed in the label).
    """
    if not trigger.reached:
        return []
    reasons: list[str] = []
    shortcut = excursion is not None and np.isfinite(excursion) and excursion >= p.excursion_threshold
    if shortcut and excursion is not None and train_excursion is not None and np.isfinite(train_excursion):
        # The poisoned training images reach the trigger's excursion: against the training range
        # it is small, and much smaller than against the eval range.
        shortcut = train_excursion < p.excursion_threshold and excursion >= p.shortcut_ratio * train_excursion
    if shortcut:
        reasons.append("shortcut")
    if data is not None and p.confirm:
        reasons += [f"confirmed_population:{method}" for method in data.confirmed.get(k, [])]
        pending = data.neighbourhood.get(k)
        if pending is not None and pending[1].confirmed:
            # A train-only neighbourhood also arises by chance in a small label (measured: one
            # clean model in 75); it counts with a second, independent line of evidence - any of
            # the above, or a mask that is an outlier among the classes' (the trigger search's
            # own opinion, no evidence by itself).
            outlier = bool(np.isfinite(index) and index >= p.anomaly_threshold)
            if reasons or outlier:
                reasons.append("confirmed_population:neighbourhood")
                if not reasons[:-1]:
                    reasons.append("anomaly_index")
    elif np.isfinite(index) and index >= p.anomaly_threshold:
        reasons.append("anomaly_index")
    return reasons


def _references(ctx: CheckContext, num_classes: int) -> list[NDArray[np.float64]]:
    """The eval split's finite embeddings per label: the clean images a population must avoid."""
    features = ctx.features("eval").float().cpu().numpy().astype(np.float64)
    labels = np.asarray(ctx.labels("eval"), dtype=np.int64)
    finite = np.isfinite(features).all(axis=1)
    return [features[(labels == k) & finite] for k in range(num_classes)]


def _record_candidate(
    result: CheckResult,
    data: _DataLevel,
    method: str,
    k: int,
    name: str,
    detection: Detection,
    corroborated: bool | None = None,
) -> None:
    """A finding for every candidate population, confirmed or not, with the numbers that judged it
    (and, for the neighbourhood test's confirmed ones, whether other evidence corroborated it)."""
    if detection.candidate is None or not detection.candidate.any():
        return
    if detection.confirmed and corroborated is not False:
        data.confirmed.setdefault(k, []).append(method)
    finding: dict[str, Any] = {
        "kind": "candidate_population",
        "method": method,
        "class": name,
        "split": "train",
        "count": int(detection.candidate.sum()),
        "share": round(detection.candidate_share, 4),
        "eval_share": None if detection.reference_share is None else round(detection.reference_share, 4),
        "p_value": None if detection.confirmation_p is None else round(detection.confirmation_p, 6),
        "level": round(data.level, 6),
        "confirmed": detection.confirmed,
    }
    if corroborated is not None:
        finding["corroborated"] = corroborated
    result.findings.append(finding)


def _settle(
    result: CheckResult, data: _DataLevel, classes: Sequence[str], evidences: Mapping[int, Sequence[str]]
) -> None:
    """The neighbourhood test's flags, once the other evidence is in.

    A confirmed population flags its rows when corroborated: by the trigger search (its class's
    ``evidences``, from :meth:`BackdoorCheck._model_level`, list it: :func:`_evidence` counted
    it) or, where the class was not judged by a trigger, by another method's confirmed population
    in the same label. Uncorroborated, it is reported as a ``candidate_population`` with
    ``corroborated: false`` and flags nothing. With ``confirm: false`` (the papers' rules) the
    trigger's opinion is not counted and clustering, spectral signatures and STRIP confirm
    nothing, so only a stamp confirmed in the label (the stamp search
    always compares with the eval split) lets the test flag its rows.
    """
    if "neighbourhood" not in data.flagged:
        return
    flagged = data.flagged["neighbourhood"]
    for k, (members, detection) in sorted(data.neighbourhood.items()):
        corroborated = None
        if detection.confirmed:
            counted = "confirmed_population:neighbourhood" in evidences.get(k, ())
            corroborated = counted or bool(data.confirmed.get(k))
            if not corroborated:
                flagged[members] = False
        _record_candidate(result, data, "neighbourhood", k, classes[k], detection, corroborated)
        result.metrics.append(_fraction("neighbourhood", classes[k], flagged[members]))


def _anomaly_reason(count: int) -> str:
    if count < 3:
        return "degenerate with fewer than three classes searched"
    return "the MAD of the trigger norms is zero"


def _confirmed_on(
    artefact: torch.nn.Module, trigger: TriggerResult, images: torch.Tensor, target: int, p: BackdoorParams
) -> TriggerResult:
    """A trigger found on the reference, judged by the artefact: its success rate is the share of
    ``images`` the artefact calls ``target`` once they carry it, and it reached the threshold only if
    the artefact's rate does."""
    import dataclasses

    mask = torch.as_tensor(trigger.mask, device=images.device)[None, None]
    pattern = torch.as_tensor(trigger.pattern, device=images.device)[None]
    with torch.no_grad():
        hits = sum(
            int((artefact(apply_trigger(images[i : i + p.batch_size], mask, pattern)).argmax(dim=1) == target).sum())
            for i in range(0, images.shape[0], p.batch_size)
        )
    rate = hits / max(1, images.shape[0])
    return dataclasses.replace(trigger, success_rate=rate, reached=trigger.reached and rate >= p.success_threshold)


def _embedder(ctx: CheckContext) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Images in [0, 1] -> embeddings from the shared pass's layer (``None`` when the model has none)."""
    if not ctx.model.has_features:
        return None

    def embed(images: torch.Tensor) -> torch.Tensor:
        return ctx.model.predict_with_features(images, label="backdoor:triggered")[1]

    return embed


def _search_order(
    classes: Sequence[str], data: _DataLevel | None, train_labels: NDArray[Any] | None, p: BackdoorParams
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


def _label_alpha(p: BackdoorParams, classes: Sequence[str]) -> float:
    """Each label's confirmation level: ``confirm_alpha`` over the model's labels (Bonferroni).

    Every method confirms a population in each label, so a model offers one chance per label to
    call a chance pocket poison; the family-wise level over the labels is ``confirm_alpha``
    (round 6 of issue 16: the held-out false positives of round 5 were single confirmations at
    p 0.031 and 0.047 on models of 3 classes).
    """
    return p.confirm_alpha / max(1, len(classes))


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
