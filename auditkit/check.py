"""The check contract (docs/architecture.md, "The check contract"): what a check declares, what
it reads, what it returns.

A check measures; it never decides pass or fail (policies judge) and never renders HTML. It reads
the audit only through :class:`CheckContext` - class names, splits and their row data, the shared
pass's predictions and embeddings, images, DICOM headers, a :class:`ModelHandle`, seeded
generators and an artifact writer, all bound to the check's id - and only what its :class:`Needs`
declare. Third-party checks subclass :class:`Check` and register under the entry-point group
``auditkit.checks`` exactly as the built-ins do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from auditkit.errors import Skip

if TYPE_CHECKING:
    import pydicom
    import torch
    from torch import nn

    from auditkit.pixels import DiskPixels

__all__ = [
    "TASK_NAMES",
    "Artifact",
    "Check",
    "CheckContext",
    "CheckParams",
    "CheckResult",
    "Direction",
    "InputGeometry",
    "Metric",
    "ModelHandle",
    "Needs",
    "Predictions",
    "QuarantinedRow",
    "Resources",
    "Skip",
    "SplitRows",
    "Status",
    "require_finite_logits",
]

TASK_NAMES = {
    "classification": "a single-label classifier (task: classification)",
    "multilabel": "a multi-label model (task: multilabel)",
    "regression": "a regression model (task: regression)",
    "segmentation": "a segmentation model (task: segmentation)",
}
"""How a reason names each ``model.task``."""

Direction = Literal["higher_is_better", "lower_is_better"]
Status = Literal["ok", "skipped", "error"]
_R = TypeVar("_R")


class CheckParams(BaseModel):
    """Base for a check's ``Params``: unknown keys are errors; instances are frozen."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


@dataclass(frozen=True)
class Needs:
    """What a check asks of the shared context, so the runner can plan one pass before any check.

    Attributes:
        predictions: logits and probabilities of the splits the check reads.
        features: embeddings (the input of the last ``nn.Linear`` unless ``feature_layer`` says
            otherwise).
        gradients: the check backpropagates through the model itself (attacks, trigger search).
        train: the check needs the train split; without one it is skipped with that reason.
        train_optional: the check reads the train split when the spec has one (its pass is then
            shared) and works without it; never skipped for its absence.
        ood: the check reads the spec's out-of-distribution sets.
        headers: the check reads DICOM headers (header-only reads, no pixels).
        images: the check reads decoded images.
        reference: the check reads the outputs of ``model.reference`` (the PyTorch model an
            artefact was exported from); without one it is skipped with that reason.
    """

    predictions: bool = False
    features: bool = False
    gradients: bool = False
    train: bool = False
    train_optional: bool = False
    ood: bool = False
    headers: bool = False
    images: bool = False
    reference: bool = False


@dataclass(frozen=True)
class Resources:
    """What one run of a check asks of a worker when checks run as Ray tasks (``executor: ray``);
    the local executor runs every check in-process and does not read it.

    Attributes:
        cpus: CPU cores the check keeps busy (Ray's ``num_cpus`` of its task).
        gpus: GPUs it uses when the cluster has them (the attacks and the trigger search: 1); on a
            cluster without GPUs the task asks for none and runs on CPU, as it does locally.

    A check whose need grows with the study overrides :meth:`Check.resources_for`.
    """

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class Metric:
    """One measurement: ``{name, labels, value, ci, n, direction}``, + ``reason`` if undefined."""

    name: str
    value: float | None
    direction: Direction
    labels: dict[str, str] = field(default_factory=dict)
    ci: tuple[float, float] | None = None
    n: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        self.labels = {str(k): str(v) for k, v in self.labels.items()}
        if self.value is not None:
            value = float(self.value)
            if not math.isfinite(value):
                self.reason = self.reason or f"not finite ({value})"
                self.value = None
            else:
                self.value = value
        if self.value is None and self.reason is None:
            raise ValueError(f"metric {self.name} {self.labels} is undefined but gives no reason")
        if self.ci is not None:
            lo, hi = (float(self.ci[0]), float(self.ci[1]))
            self.ci = (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "labels": dict(self.labels),
            "value": self.value,
            "ci": list(self.ci) if self.ci is not None else None,
            "n": self.n,
            "direction": self.direction,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metric:
        ci = data.get("ci")
        return cls(
            name=data["name"],
            value=data.get("value"),
            direction=data["direction"],
            labels=dict(data.get("labels") or {}),
            ci=(ci[0], ci[1]) if ci else None,
            n=data.get("n"),
            reason=data.get("reason"),
        )


@dataclass
class Artifact:
    """A file a check wrote under the bundle's ``artifacts/`` folder (path relative to it)."""

    name: str
    path: str
    media_type: str
    description: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "path": self.path,
            "media_type": self.media_type,
            "description": self.description,
        }


@dataclass
class CheckResult:
    """What ``Check.run`` returns: measurements, plain-record findings and artifacts."""

    metrics: list[Metric] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)


@dataclass(frozen=True)
class Predictions:
    """Model outputs for one split, aligned with the split's rows; their form follows the task.

    Attributes:
        logits: float32 (N, K) on the CPU: the audited outputs (``model.output_names`` masked);
            segmentation (N, K, *spatial).
        probs: float64 (N, K): classification, the softmax of the logits; multilabel, the sigmoid
            of each; regression, the predicted values themselves (rows with non-finite outputs
            are NaN); segmentation, float32 (N, K, *spatial), the softmax over the classes of
            every pixel.
        labels: classification, int64 (N,) class indices (``-1`` for unlabelled OOD sets);
            multilabel, int64 (N, K) of 1, 0 and -1 (unknown); regression, float64 (N, K)
            targets (NaN when unlabelled); segmentation, the reference label maps int16
            (N, *spatial) (``-1`` everywhere when unlabelled).
        task: ``model.task``.
    """

    logits: torch.Tensor
    probs: NDArray[np.float64]
    labels: NDArray[Any]
    task: str = "classification"

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def predicted(self) -> NDArray[np.int64]:
        """The arg-max class per image (classification); per pixel (segmentation, (N, *spatial))."""
        return np.asarray(self.probs.argmax(axis=1), dtype=np.int64)


@dataclass(frozen=True)
class SplitRows:
    """The row data of one split as a check sees it: no pixels, no paths, surrogates only.

    Attributes:
        name: the split's role: ``eval``, ``train`` or ``ood:<name>``.
        rows: manifest row numbers of the readable images (quarantined rows left out).
        labels: as :attr:`Predictions.labels`: class index per image (``-1`` where unlabelled);
            multilabel (N, K) of 1/0/-1; regression (N, K) float targets.
        groups: group column -> banded group label per image.
        patients: surrogate patient id per image (``None`` where the manifest has none).
        studies: surrogate study id per image.
        kinds: decoded file kind per image (``dicom``, ``png``, ``npy``; volumes ``nifti``,
            ``npy``, ``dicom-series``).
        quarantined_groups: group column -> group label -> how many quarantined rows it lost.
        spacing: 3-D inputs: each volume's voxel size ``(z, y, x)`` in millimetres on the
            model-input grid, ``(N, 3)``; ``None`` for 2-D images.
    """

    name: str
    rows: NDArray[np.int64]
    labels: NDArray[Any]
    groups: dict[str, NDArray[Any]]
    patients: Sequence[str | None]
    studies: Sequence[str | None]
    kinds: Sequence[str]
    quarantined_groups: dict[str, dict[str, int]]
    spacing: NDArray[np.float64] | None = None

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class QuarantinedRow:
    """A manifest row the loader refused: its split, row number and reason (never a header value)."""

    split: str
    row: int
    reason: str


@dataclass(frozen=True)
class InputGeometry:
    """What the model takes: channels, height, width (and ``depth`` for a 3-D input, else
    ``None``), and how DICOM intensities map to [0, 1] (a :class:`auditkit.decode.WindowSetting`),
    for a check that decodes images of its own."""

    channels: int
    height: int
    width: int
    window: Any
    depth: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's tensor shape: ``(C, H, W)`` or ``(C, D, H, W)``."""
        spatial = (self.height, self.width) if self.depth is None else (self.depth, self.height, self.width)
        return (self.channels, *spatial)


NO_GRADIENTS = (
    "the model is an ONNX Runtime artefact (model.format: onnx), through which no gradient flows; the"
    " attacks and the trigger search need the model's gradients"
)
"""Why a check that needs gradients cannot run on an exported artefact (:meth:`ModelHandle.differentiable`)."""


NO_REFERENCE = (
    "no model.reference in the spec: the parity of an exported artefact is measured against the PyTorch"
    " model it was exported from (model.reference: {factory, weights})"
)
"""Why a check that compares with the reference model cannot run."""


class ModelHandle(Protocol):
    """The candidate model as a check may use it: images in [0, 1], (N, C, H, W), float32.

    ``predict`` and ``predict_with_features`` run batched, without gradients, in the shared
    pass's precision, and count their images under ``label`` in the run's inference statistics.
    ``differentiable`` is the model itself (normalisation included) for attacks and trigger
    searches; only a check that declares ``Needs(gradients=True)`` may ask for it.
    """

    @property
    def device(self) -> torch.device: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def has_features(self) -> bool: ...

    def predict(self, images: torch.Tensor, *, label: str = "") -> torch.Tensor:
        """Logits (N, K) on the CPU."""
        ...

    def predict_with_features(self, images: torch.Tensor, *, label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K) and embeddings (N, D) from the layer the shared pass reads, on the CPU."""
        ...

    @property
    def has_gradients(self) -> bool:
        """Whether :meth:`differentiable` can give gradients (not through an ONNX Runtime session)."""
        ...

    def differentiable(self) -> nn.Module:
        """The model on its device in eval mode, parameters frozen, gradients through inputs;
        raises :class:`Skip` for a model without gradients (an exported artefact)."""
        ...

    def forward_module(self) -> nn.Module:
        """The model (normalisation included) as a module for forward calls only - an exported
        artefact too - for black-box attacks and for judging images crafted on the reference."""
        ...


class CheckContext(Protocol):
    """Everything a check may read, bound to the check's id and held to its ``needs``.

    A read that ``needs`` does not declare (features without ``features``, headers without
    ``headers``, pixels without ``images``, the model's gradients without ``gradients``, the train
    split without ``train``/``train_optional``, an OOD set without ``ood``) raises
    :class:`auditkit.errors.UndeclaredRead`; a missing train or OOD split raises :class:`Skip`.
    """

    @property
    def check_id(self) -> str: ...

    @property
    def task(self) -> str:
        """``model.task``: ``classification``, ``multilabel`` or ``regression``."""
        ...

    @property
    def classes(self) -> list[str]:
        """Class names; multilabel: label names; regression: output names."""
        ...

    @property
    def units(self) -> dict[str, str]:
        """Regression: the unit of each output that has one (``model.units``)."""
        ...

    @property
    def positive_index(self) -> int | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def split_names(self) -> list[str]: ...

    @property
    def group_columns(self) -> list[str]:
        """The spec's group columns (``data.groups``), in order."""
        ...

    @property
    def operating_point(self) -> dict[str, float]:
        """Decision thresholds by class (``model.operating_point``); empty: argmax."""
        ...

    @property
    def claims(self) -> dict[str, Any]:
        """The manufacturer's claimed figures by metric name (``model.claims``); empty when none."""
        ...

    @property
    def input_geometry(self) -> InputGeometry: ...

    @property
    def spatial_dims(self) -> int:
        """2 for images ``(N, C, H, W)``, 3 for volumes ``(N, C, D, H, W)`` (``model.input.depth``)."""
        ...

    @property
    def model(self) -> ModelHandle: ...

    def has_split(self, split: str) -> bool: ...

    @property
    def has_reference(self) -> bool:
        """Whether the spec names ``model.reference`` (see :meth:`reference_model`)."""
        ...

    def split(self, split: str) -> SplitRows: ...

    def labels(self, split: str = "eval") -> NDArray[Any]: ...

    def group_labels(self, split: str = "eval") -> dict[str, NDArray[Any]]: ...

    def quarantine(self) -> list[QuarantinedRow]: ...

    def predictions(self, split: str = "eval") -> Predictions: ...

    def reference_predictions(self, split: str = "eval") -> Predictions:
        """The predictions of ``model.reference`` on the same images (its pass run once, counted);
        raises :class:`Skip` without a reference."""
        ...

    def reference_model(self) -> nn.Module:
        """``model.reference`` as a differentiable module (its normalisation included), for attacks
        crafted on it and judged on the artefact; raises :class:`Skip` without a reference."""
        ...

    def features(self, split: str = "eval") -> torch.Tensor: ...

    def images(
        self,
        split: str = "eval",
        indices: NDArray[Any] | Iterable[int] | None = None,
        *,
        dtype: torch.dtype = ...,
    ) -> torch.Tensor:
        """Decoded images ``(N, C, H, W)`` (volumes ``(N, C, D, H, W)``) in [0, 1]: float32 by
        default; ``torch.float16`` is the stored precision, returned without a copy (read it, never
        write into it)."""
        ...

    def pixels(self, split: str = "eval") -> torch.Tensor | DiskPixels:
        """The split's stored images unread (``float16``): a tensor, or a stand-in for one whose rows
        live on disk (:class:`auditkit.pixels.DiskPixels`, for a study too large for memory); index
        or slice it to read ``float16`` tensors - a check that reads a whole split should read it
        in batches."""
        ...

    def headers(self, split: str = "eval") -> Sequence[pydicom.Dataset | None]:
        """One DICOM header per image (a series' first slice), ``None`` for other kinds: a
        sequence whose headers beyond the decoder's kept ones are read from their files at each
        access (iterate it once rather than indexing it repeatedly)."""
        ...

    def header_texts(self, split: str, keywords: Iterable[str]) -> list[dict[str, str | None] | None]: ...

    def map_headers(self, split: str, function: Callable[[pydicom.Dataset | None], _R]) -> Iterator[_R]:
        """``function`` of every header of a split (converted as :meth:`headers`' are; ``None``
        for a non-DICOM or unreadable file), in position order as they come: for a check whose
        work is per file (fold the results as they come: memory stays a chunk's). On Ray the
        files are read and ``function`` runs in Ray tasks side by side, so ``function`` and its
        results must be picklable (a module-level function or a :func:`functools.partial` of
        one; a ``TypeError`` otherwise, locally too); return what the check measures, not header
        values: they travel through Ray's object store."""
        ...

    def map_series_headers(
        self, split: str, function: Callable[[pydicom.Dataset | None], _R]
    ) -> Iterator[tuple[_R, ...]]:
        """As :meth:`map_headers`, per image a tuple as :meth:`series_headers` gives: ``function`` of
        every slice's header of a DICOM series (file-name order), of a 2-D DICOM image's one
        header, ``()`` for other kinds; series are read a few at a time, on Ray in Ray tasks."""
        ...

    def series_headers(self, split: str = "eval") -> list[tuple[pydicom.Dataset | None, ...]]:
        """Every file's header per image: a DICOM series' slices in position order, a 2-D DICOM
        image's one header, ``()`` for other kinds."""
        ...

    def quarantined_headers(
        self, splits: Iterable[str]
    ) -> Iterable[tuple[QuarantinedRow, pydicom.Dataset | str | None]]:
        """Header-only reads of the quarantined rows of ``splits``: the header, ``"non-dicom"``, or
        ``None`` when unreadable."""
        ...

    def rng(self, *salt: object) -> np.random.Generator:
        """A NumPy generator seeded from the audit's seed, the check's id and ``salt``."""
        ...

    def torch_generator(self, *salt: object) -> torch.Generator: ...

    def seed(self, *salt: object) -> int:
        """A 64-bit seed from the audit's seed, the check's id and ``salt`` (same every run)."""
        ...

    def write_artifact(
        self,
        name: str,
        filename: str,
        write: Callable[[Path], object],
        *,
        description: str,
        media_type: str = "image/svg+xml",
    ) -> Artifact:
        """Call ``write(path)`` with the file's path under ``artifacts/<check id>/`` and return
        the record for ``CheckResult.artifacts``."""
        ...


def require_finite_logits(logits: Any, what: str = "eval image") -> Any:
    """Which rows of ``(N, K)`` logits are finite; :class:`Skip` when none of ``N >= 1`` is.

    A model that outputs only NaN or infinite logits leaves nothing to measure: an argmax over
    NaN would pick class 0 and score it as a lucky guess.

    Returns:
        Boolean NumPy array ``(N,)``.
    """
    finite = np.isfinite(np.asarray(logits, dtype=np.float64)).all(axis=1)
    if finite.size and not finite.any():
        raise Skip(f"the logits of every {what} are non-finite")
    return finite


P = TypeVar("P", bound=CheckParams)


def task_refusal(check_id: str, task: str, tasks: Sequence[str], why: str | None = None) -> str:
    """Why a check does not run on a model of ``task``: the task named, what it measures, and the
    check's own reason when it gives one (``Check.task_reasons``)."""
    measured = " and ".join(f"task: {t}" for t in tasks) or "no task"
    text = f"check '{check_id}' does not measure {TASK_NAMES.get(task, f'task: {task}')}; it measures {measured}"
    return f"{text}: {why}" if why else text


class Check(Generic[P]):
    """Base class of every check, generic in its parameters: ``class MyCheck(Check[MyParams])``.

    Subclasses set ``id``, ``family``, ``Params`` (the class ``P``), ``needs``, ``emits`` and
    ``tasks`` and implement ``run(ctx, params)``, where ``params`` is a validated, frozen ``P``.
    ``tasks`` lists the ``model.task`` values the check measures; on any other the runner skips
    it with a reason that names the task, never running it to produce a wrong number. A check
    listing a task may still :class:`Skip` it with a more specific reason. ``spatial_dims`` does
    the same for the input: 2 (images ``(N, C, H, W)``), 3 (volumes ``(N, C, D, H, W)``, set by
    ``model.input.depth``); a check that does not list 3 is skipped on a 3-D model with a reason.
    The class docstring names the method and its paper, the inputs it needs, the metrics it emits
    and the NIST AI RMF subcategories it informs; ``auditkit checks`` shows its first line.
    ``emits`` lists every metric name ``run`` can produce, so policies can be checked against the
    installed checks without running them.
    """

    id: ClassVar[str]
    family: ClassVar[str]
    Params: ClassVar[type[CheckParams]] = CheckParams
    needs: ClassVar[Needs] = Needs()
    resources: ClassVar[Resources] = Resources()
    emits: ClassVar[tuple[str, ...]] = ()
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    task_reasons: ClassVar[dict[str, str]] = {}
    """Why a task missing from ``tasks`` is not measured (task -> one sentence), for the skip reason."""
    spatial_dims: ClassVar[tuple[int, ...]] = (2,)
    dims_reason: ClassVar[str | None] = None
    """Why 3-D volumes are not measured when 3 is missing from ``spatial_dims`` (one sentence)."""

    @classmethod
    def refusal(cls, check_id: str, task: str, spatial_dims: int = 2) -> str | None:
        """Why this check does not run on a model of ``task`` with ``spatial_dims``-D inputs, or
        ``None`` when it does."""
        if task not in cls.tasks:
            return task_refusal(check_id, task, cls.tasks, cls.task_reasons.get(task))
        if spatial_dims not in cls.spatial_dims:
            kind = {2: "2-D images", 3: "3-D volumes (model.input.depth)"}
            text = f"check '{check_id}' does not measure {kind.get(spatial_dims, f'{spatial_dims}-D inputs')}"
            measured = " and ".join(kind.get(d, f"{d}-D inputs") for d in cls.spatial_dims)
            text += f"; it measures {measured}"
            return f"{text}: {cls.dims_reason}" if cls.dims_reason else text
        return None

    @classmethod
    def resources_for(cls, images: Mapping[str, int]) -> Resources:
        """What one run asks of a Ray worker for a study of ``images`` (split role -> decoded
        images): :attr:`resources`, unless the check's need grows with the study (the leakage
        check asks for a GPU only where its quadratic search outweighs its fingerprinting)."""
        return cls.resources

    def run(self, ctx: CheckContext, params: P) -> CheckResult:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
