"""The audit spec: one YAML file that says what to audit and how.

Relative paths resolve against the spec file's folder, and that folder is put on the import path
when the model factory is imported. Unknown keys are errors (with the closest known key as a
suggestion), so a typo never silently falls back to a default.

Which checks run and how they are configured are separate keys: ``checks:`` only sets parameters
(``checks: {calibration: {bins: 15}}`` tunes calibration and leaves every other check running);
``only:`` and ``skip:`` narrow the selection, and a narrowed audit says so in its verdict.

``model.task`` is ``classification`` (one class per image, softmax), ``multilabel`` (each name in
``classes`` independently present, sigmoid), ``regression`` (continuous outputs named in
``classes``) or ``segmentation`` (a class per pixel, ``classes`` naming the label values, background
first), of 2-D images or, with ``model.input.depth``, 3-D volumes. ``model.format`` says what
``model.weights`` is: a PyTorch state_dict (``torch``; TorchScript with ``trust_code``), an ONNX
graph (``onnx``, or ``auto`` from a ``.onnx`` suffix) or a MONAI bundle (``monai_bundle``);
``model.reference`` names the PyTorch model an artefact was exported from.

``frameworks:`` lists the regulatory crosswalks (``policies/frameworks/``) whose items the report
answers beside the NIST AI RMF, which it always covers.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from auditkit.crosswalk import FRAMEWORKS
from auditkit.errors import ConfigError

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
AI_RMF = "nist-ai-rmf-1.0"
"""The framework every report covers (the policies' controls)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def unsupported(what: str, planned: str) -> str:
    """The message for a spec key this version knows by name but cannot audit yet."""
    from auditkit import __version__

    return f"{what} is not supported by auditkit {__version__}, which audits {planned}"


class InputShape(_Strict):
    """The model's input: channels and spatial size every image is resized to; ``depth`` makes the
    input 3-D (volumes resampled to ``(depth, height, width)``, tensors ``(N, C, D, H, W)``)."""

    channels: int = Field(ge=1, le=64)
    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)
    depth: int | None = Field(default=None, ge=1, le=4096)

    @property
    def spatial(self) -> tuple[int, ...]:
        """``(height, width)``, or ``(depth, height, width)`` for a 3-D input."""
        return (self.height, self.width) if self.depth is None else (self.depth, self.height, self.width)

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's tensor shape: ``(C, H, W)`` or ``(C, D, H, W)``."""
        return (self.channels, *self.spatial)


class SlidingWindow(_Strict):
    """Sliding-window inference (MONAI's ``sliding_window_inference``): the network sees ``roi``
    patches of the ``input`` grid, overlapping by ``overlap`` and blended by ``mode``, and returns
    one score map for the whole grid. For segmentation models whose training patch is smaller than
    the volumes (or images) they are deployed on."""

    roi: list[int] = Field(min_length=2, max_length=3)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(default=4, ge=1, le=1024)

    @field_validator("roi")
    @classmethod
    def _positive(cls, roi: list[int]) -> list[int]:
        if any(v < 1 for v in roi):
            raise ValueError(f"every roi size must be a positive integer, got {roi}")
        return roi


class Normalize(_Strict):
    """Per-channel normalisation applied inside the model adapter: ``(x - mean) / std``."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @field_validator("std")
    @classmethod
    def _positive(cls, std: list[float]) -> list[float]:
        for value in std:
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"every std must be a positive finite number, got {std}")
        return std

    @model_validator(mode="after")
    def _same_length(self) -> Normalize:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean and std must have one value per channel, got {len(self.mean)} means and {len(self.std)} stds"
            )
        return self


TASKS = ("classification", "multilabel", "segmentation", "regression")
FORMATS = ("auto", "torch", "torchscript", "onnx", "monai_bundle")
CLAIMABLE = tuple(
    f"performance.{m}"
    for m in ("accuracy", "balanced_accuracy", "auroc", "auprc", "sensitivity", "specificity", "ppv", "npv")
)
"""The figures a binary classifier's manufacturer can claim (``model.claims``), held to the measured interval."""
CLAIMABLE_MULTICLASS = ("performance.accuracy", "performance.balanced_accuracy")
CLAIMABLE_MULTILABEL = ("performance.macro_auroc", "performance.auroc", "performance.auprc")
"""A multi-label model's claims: the macro AUROC, and per-label AUROC or AUPRC as ``{label: value}``."""
CLAIMABLE_REGRESSION = ("performance.mae", "performance.rmse", "performance.r2")
CLAIMABLE_SEGMENTATION = ("performance.mean_dice", "performance.dice", "performance.hd95", "performance.nsd")
"""A regressor's claims: a number (one output) or ``{output: value}``; MAE and RMSE in the output's units."""
LOWER_IS_BETTER_CLAIMS = ("performance.mae", "performance.rmse", "performance.hd95")


class ReferenceSpec(_Strict):
    """``model.reference``: the PyTorch model an artefact was exported from, held against it by the
    parity check (same classes, input and task as ``model``)."""

    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Path | None = None
    normalize: Normalize | None = None
    """The reference's normalisation; default ``model.normalize`` (an artefact that normalises inside
    its graph while its source module did not needs ``model.normalize: null`` and this set)."""
    trust_code: bool = False

    @model_validator(mode="after")
    def _loadable(self) -> ReferenceSpec:
        if self.weights is not None and self.weights.suffix.lower() == ".onnx":
            raise ValueError(
                "the reference is the PyTorch model the artefact was exported from (factory and a state_dict),"
                f" not an ONNX graph ({self.weights.name})"
            )
        if self.factory is None and not (self.trust_code and self.weights is not None):
            raise ValueError(
                "factory is required (a reference given only as a TorchScript file needs weights: <file> and"
                " trust_code: true)"
            )
        return self


def _positive_index(classes: list[str], positive_class: str | None) -> int | None:
    if positive_class is not None:
        return classes.index(positive_class) if positive_class in classes else None
    return 1 if len(classes) == 2 else None


class ModelSpec(_Strict):
    """Where the model comes from and how to call it."""

    task: str = "classification"
    format: str = "auto"
    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Path | None = None
    classes: list[str] = Field(min_length=1)
    positive_class: str | None = None
    input: InputShape
    normalize: Normalize | None = None
    feature_layer: str | None = None
    trust_code: bool = False
    output_names: list[str] | None = None
    reference: ReferenceSpec | None = None
    operating_point: dict[str, float] | None = None
    claims: dict[str, float | dict[str, float]] | None = None
    units: str | dict[str, str] | None = None
    sliding_window: SlidingWindow | None = None

    @field_validator("task")
    @classmethod
    def _task(cls, task: str) -> str:
        if task not in TASKS:
            raise ValueError(f"expected one of {list(TASKS)}, got {task!r}")
        return task

    @field_validator("format")
    @classmethod
    def _format(cls, fmt: str) -> str:
        if fmt not in FORMATS:
            raise ValueError(f"expected one of {list(FORMATS)}, got {fmt!r}")
        return fmt

    @field_validator("output_names")
    @classmethod
    def _output_names(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if names is None:
            return None
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique, got {names}")
        classes = info.data.get("classes") or []
        absent = [c for c in classes if c not in names]
        if absent:
            raise ValueError(
                f"names every output of the model, so it must include each of model.classes; {absent} missing"
                f" from {names}"
            )
        return names

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, factory: str | None) -> str | None:
        if factory is not None and not _FACTORY.match(factory):
            raise ValueError(f"expected 'package.module:callable', got {factory!r}")
        return factory

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names must be unique, got {classes}")
        if any(not c.strip() for c in classes):
            raise ValueError(f"class names must be non-empty, got {classes}")
        return classes

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.sliding_window is not None:
            if self.task != "segmentation":
                raise ValueError(
                    "sliding_window applies to task: segmentation (a score map per patch, blended); a"
                    f" {self.task} model's outputs per patch have no place to be blended into"
                )
            spatial = self.input.spatial
            roi = self.sliding_window.roi
            if len(roi) != len(spatial) or any(r > s for r, s in zip(roi, spatial, strict=False)):
                raise ValueError(
                    f"sliding_window.roi {roi} must give one size per spatial axis of the input {list(spatial)}"
                    " (depth, height, width for volumes), each at most the input's"
                )
        if self.task == "segmentation" and len(self.classes) < 2:
            raise ValueError(
                f"classes: a segmentation model names its label values 0..K-1, background first; got {self.classes}"
            )
        if self.task == "classification" and len(self.classes) < 2:
            raise ValueError(
                f"classes: a classifier needs at least two classes, got {self.classes}"
                " (a model with one continuous output is task: regression; one sigmoid output, task: multilabel)"
            )
        if self.positive_class is not None and self.task != "classification":
            raise ValueError(f"positive_class applies to task: classification, not task: {self.task}")
        if self.units is not None and self.task != "regression":
            raise ValueError(f"units applies to task: regression, not task: {self.task}")
        if isinstance(self.units, dict):
            unknown = [name for name in self.units if name not in self.classes]
            if unknown:
                raise ValueError(f"units names {unknown}, which are not in model.classes {self.classes}")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise ValueError(f"positive_class must be one of {self.classes}, got {self.positive_class!r}")
        if self.normalize is not None and len(self.normalize.mean) not in (1, self.input.channels):
            raise ValueError(
                f"normalize needs 1 or {self.input.channels} values (input.channels), got {len(self.normalize.mean)}"
            )
        if self.resolved_format == "monai_bundle":
            if self.weights is None:
                raise ValueError("format: monai_bundle needs weights: the bundle's folder or zip")
            if self.factory is not None:
                raise ValueError(
                    "format: monai_bundle builds the network its configs/inference.json names; model.factory does"
                    " not apply"
                )
            return self
        if self.resolved_format == "onnx":
            if self.weights is None:
                raise ValueError("format: onnx needs weights: the .onnx file")
            if self.factory is not None:
                raise ValueError(
                    "format: onnx runs the graph in model.weights; model.factory does not apply (the PyTorch"
                    " model it was exported from goes under model.reference)"
                )
            if self.trust_code:
                raise ValueError("trust_code does not apply to format: onnx (an ONNX file is data, not code)")
            return self
        if self.weights is not None and self.weights.suffix.lower() == ".onnx":
            raise ValueError(
                f"format: {self.format} cannot read {self.weights.name}, an ONNX graph; set format: onnx (or auto)"
            )
        if self.factory is None and not (self.trust_code and self.weights is not None):
            raise ValueError(
                "factory is required (a model given only as a TorchScript or pickled module file"
                " needs weights: <file> and trust_code: true; an ONNX graph needs format: onnx or auto)"
            )
        return self

    @property
    def resolved_format(self) -> str:
        """``format``, with ``auto`` read from the weights' suffix (``.onnx``: onnx; else torch)."""
        if self.format != "auto":
            return self.format
        return "onnx" if self.weights is not None and self.weights.suffix.lower() == ".onnx" else "torch"

    @field_validator("operating_point")
    @classmethod
    def _operating_point(cls, value: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        classes = info.data.get("classes")
        if value is None or classes is None:
            return value
        task = info.data.get("task", "classification")
        if task == "regression":
            raise ValueError("applies to classifiers; a regression model has no decision threshold")
        if task == "segmentation":
            raise ValueError("applies to classifiers; a segmentation model decides each pixel by argmax")
        for name, threshold in value.items():
            if name not in classes:
                raise ValueError(f"names {name!r}, which is not one of model.classes {classes}")
            if not 0.0 < threshold < 1.0:
                raise ValueError(f"operating_point[{name!r}] must be a probability in (0, 1), got {threshold}")
        if task == "multilabel":
            return value  # one threshold per label; labels not named decide at 0.5
        positive = _positive_index(classes, info.data.get("positive_class"))
        if positive is None or len(classes) != 2:
            raise ValueError("needs a binary classifier (two classes); a multi-class model decides by argmax")
        if set(value) != {classes[positive]}:
            raise ValueError(f"sets the decision threshold of the positive class ({classes[positive]!r}) only")
        return value

    @field_validator("claims")
    @classmethod
    def _claims(
        cls, value: dict[str, float | dict[str, float]] | None, info: ValidationInfo
    ) -> dict[str, float | dict[str, float]] | None:
        classes = info.data.get("classes")
        if value is None or classes is None:
            return value
        task = info.data.get("task", "classification")
        allowed: tuple[str, ...]
        if task == "multilabel":
            allowed, what = CLAIMABLE_MULTILABEL, " for a multi-label model"
        elif task == "regression":
            allowed, what = CLAIMABLE_REGRESSION, " for a regression model"
        elif task == "segmentation":
            allowed, what = CLAIMABLE_SEGMENTATION, " for a segmentation model"
        elif len(classes) == 2:
            allowed, what = CLAIMABLE, ""
        else:
            allowed, what = CLAIMABLE_MULTICLASS, " for a multi-class model (per-class figures have no claim)"
        for metric, claimed in value.items():
            if metric not in allowed:
                raise ValueError(f"names {metric!r}; a claim is one of {list(allowed)}{what}")
            per_output = (
                task == "regression"
                or (task == "multilabel" and metric != "performance.macro_auroc")
                or (task == "segmentation" and metric != "performance.mean_dice")
            )
            if isinstance(claimed, dict):
                if not per_output:
                    raise ValueError(f"claims[{metric!r}] is one number, got a mapping")
                unknown = [name for name in claimed if name not in classes]
                if unknown:
                    raise ValueError(f"claims[{metric!r}] names {unknown}, which are not in model.classes {classes}")
                items = list(claimed.items())
            else:
                if task in ("multilabel", "segmentation") and per_output:
                    example = classes[-1] if task == "segmentation" else classes[0]
                    per = "class" if task == "segmentation" else "label"
                    raise ValueError(
                        f"claims[{metric!r}] is per {per}: write {{{per}: value}}, e.g. {{{example}: {claimed}}}"
                    )
                if task == "regression" and len(classes) > 1:
                    raise ValueError(
                        f"claims[{metric!r}]: the model has {len(classes)} outputs; write {{output: value}}"
                    )
                items = [("", claimed)]
            for name, number in items:
                where = f"claims[{metric!r}]" + (f"[{name!r}]" if name else "")
                if not math.isfinite(number):
                    raise ValueError(f"{where} must be a finite number, got {number}")
                if metric in LOWER_IS_BETTER_CLAIMS:
                    if number < 0:
                        unit = "a distance in mm" if metric == "performance.hd95" else "an error in the output's units"
                        raise ValueError(f"{where} is {unit} and cannot be negative, got {number}")
                elif metric == "performance.r2":
                    if number > 1.0:
                        raise ValueError(f"{where} must be at most 1, got {number}")
                elif not 0.0 <= number <= 1.0:
                    raise ValueError(f"{where} must be in [0, 1], got {number}")
        return value

    def unit_of(self, output: str) -> str | None:
        """The unit of a regression output (``model.units``), or ``None`` when not given."""
        if isinstance(self.units, dict):
            return self.units.get(output)
        return self.units

    @property
    def output_index(self) -> list[int] | None:
        """Positions of ``classes`` among ``output_names`` (the outputs audited); ``None``: all, in order."""
        if self.output_names is None:
            return None
        return [self.output_names.index(name) for name in self.classes]

    @property
    def positive_index(self) -> int | None:
        """Index of the positive class; for two classes without one, the second class (classifiers only)."""
        return _positive_index(self.classes, self.positive_class) if self.task == "classification" else None


class GroupSpec(_Strict):
    """A subgroup column; numeric columns may be banded with increasing ``bins`` edges."""

    bins: list[float] | None = None

    @field_validator("bins")
    @classmethod
    def _increasing(cls, bins: list[float] | None) -> list[float] | None:
        if bins is None:
            return None
        if len(bins) < 2:
            raise ValueError(f"bins needs at least two edges, got {bins}")
        if any(not math.isfinite(b) for b in bins):
            raise ValueError(f"bins must be finite numbers, got {bins}")
        if any(b >= c for b, c in itertools.pairwise(bins)):
            raise ValueError(f"bins must be increasing, got {bins}")
        return bins


class OODSetSpec(_Strict):
    """A named out-of-distribution set: its own manifest (paths inside ``data.root``)."""

    manifest: Path


class DicomOptions(_Strict):
    """How DICOM pixels become intensities: ``auto`` (VOI LUT or window from the header, else
    min-max), ``minmax``, or a fixed ``{center, width}`` window."""

    window: Literal["auto", "minmax"] | dict[str, float] = "auto"

    @field_validator("window")
    @classmethod
    def _window(cls, window: Any) -> Any:
        if isinstance(window, dict):
            if set(window) != {"center", "width"}:
                raise ValueError(f"a fixed window is {{center: C, width: W}}, got keys {sorted(window)}")
            if not window["width"] >= 1:
                raise ValueError(f"window width must be >= 1, got {window['width']}")
        return window


class Splits(_Strict):
    """Which values of the manifest's ``split`` column play the roles eval and train."""

    eval: str = "test"
    train: str | None = None


class DataSpec(_Strict):
    """The labelled data: a folder and a CSV manifest of ``path,label[,patient_id]...`` rows."""

    root: Path
    manifest: Path
    splits: Splits = Field(default_factory=Splits)
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    ood: dict[str, OODSetSpec] = Field(default_factory=dict)
    dicom: DicomOptions = Field(default_factory=DicomOptions)

    @field_validator("groups", mode="before")
    @classmethod
    def _none_is_empty(cls, groups: Any) -> Any:
        if isinstance(groups, dict):
            return {k: ({} if v is None else v) for k, v in groups.items()}
        return groups

    @field_validator("groups")
    @classmethod
    def _group_names(cls, groups: dict[str, GroupSpec]) -> dict[str, GroupSpec]:
        reserved = {"path", "label", "patient_id", "study_id", "split"}
        clash = sorted(reserved & set(groups))
        if clash:
            raise ValueError(f"group columns cannot be reserved manifest columns, got {clash}")
        return groups


class ExecutorSpec(_Strict):
    """Where the decode and the shared pass run: ``local`` (in-process, the default) or ``ray``.

    ``address``: a running Ray cluster (``host:port``, ``ray://host:port`` or ``auto``); without
    one a local Ray instance is started for the audit and stopped after it. ``num_cpus``: the
    local instance's CPUs (default: all). ``model_actors``: model replicas of the shared pass.
    """

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    model_actors: int = Field(default=1, ge=1, le=1024)

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _address_needs_ray(self) -> ExecutorSpec:
        if self.kind == "local" and (self.address is not None or self.num_cpus is not None):
            raise ValueError("executor.address and executor.num_cpus apply to kind: ray only")
        if self.address is not None and self.num_cpus is not None:
            raise ValueError(
                "executor.num_cpus sizes the local Ray instance started without an address; a cluster at"
                f" {self.address} has its own CPUs: remove one of the two"
            )
        return self


class IntendedUse(_Strict):
    """What the manufacturer states the model is for (the model card's intended use; optional).

    Free text, each a sentence or two; written to ``results.json`` and the model card as given,
    so it must hold no patient data.
    """

    purpose: str = Field(min_length=1, max_length=2000, description="intended purpose and clinical task")
    users: str | None = Field(default=None, max_length=2000, description="intended users and the setting of use")
    population: str | None = Field(
        default=None, max_length=2000, description="patient population, and who is out of scope"
    )
    decision: str | None = Field(
        default=None, max_length=2000, description="the decision the output informs, and the human oversight around it"
    )
    contraindications: str | None = Field(default=None, max_length=2000, description="contraindications, known misuses")


class AuditSpec(_Strict):
    """The whole audit: model, data, checks, policy, device, seed and output folder."""

    model: ModelSpec
    data: DataSpec
    intended_use: IntendedUse | None = None
    frameworks: list[str] = Field(default_factory=list)
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    only: list[str] = Field(default_factory=list)
    skip: list[str] = Field(default_factory=list)
    policy: str = "medical-imaging-default"
    attestations: Path | None = None
    device: str = "auto"
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    output: Path = Path("audit-out")
    base_dir: Path = Field(default=Path("."), exclude=True)
    source_file: Path | None = Field(default=None, exclude=True)

    @field_validator("checks", mode="before")
    @classmethod
    def _checks_are_parameters(cls, checks: Any) -> Any:
        if checks is None:
            return {}
        if isinstance(checks, list):
            # Older specs used a list to choose checks; now a list would silently run everything.
            names = ", ".join(str(c) for c in checks)
            raise ValueError(
                "expected a mapping of check parameters (e.g. {calibration: {bins: 15}}); a list"
                f" does not choose which checks run: to run only these, write only: [{names}]"
            )
        if isinstance(checks, dict):
            return {k: ({} if v is None else v) for k, v in checks.items()}
        return checks

    @field_validator("frameworks", mode="before")
    @classmethod
    def _framework_ids(cls, ids: Any) -> Any:
        if ids is None:
            return []
        if isinstance(ids, str):  # `frameworks: eu-ai-act-annex-iv` or a comma-separated list
            ids = [part.strip() for part in ids.split(",") if part.strip()]
        if not isinstance(ids, list):
            return ids  # pydantic names the type expected
        chosen: list[str] = []
        for value in ids:
            if value == AI_RMF:  # always in the report; naming it is harmless
                continue
            if value not in FRAMEWORKS:
                close = difflib.get_close_matches(str(value), FRAMEWORKS, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown crosswalk {value!r}{hint} (packaged: {', '.join(FRAMEWORKS)};"
                    f" the NIST AI RMF, {AI_RMF}, is always reported)"
                )
            if value not in chosen:
                chosen.append(value)
        return chosen

    @field_validator("only", "skip", mode="before")
    @classmethod
    def _check_ids(cls, ids: Any) -> Any:
        if ids is None:
            return []
        if isinstance(ids, str):  # `only: calibration` or `only: calibration, ood`
            return [part.strip() for part in ids.split(",") if part.strip()]
        return ids

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not _DEVICE.match(device):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {device!r}")
        return device

    def resolve(self, path: Path) -> Path:
        """An absolute path for a spec-relative one."""
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes (``model.input.depth`` set)."""
        return 2 if self.model.input.depth is None else 3

    @property
    def data_root(self) -> Path:
        return self.resolve(self.data.root)

    @property
    def manifest_path(self) -> Path:
        return self.resolve(self.data.manifest)

    @property
    def weights_path(self) -> Path | None:
        return None if self.model.weights is None else self.resolve(self.model.weights)

    def reference_spec(self) -> AuditSpec | None:
        """This spec with ``model.reference`` as its model (task, classes, input and outputs kept),
        for the reference's adapter; ``None`` without a reference."""
        reference = self.model.reference
        if reference is None:
            return None
        model = self.model.model_copy(
            update={
                "format": "auto",
                "factory": reference.factory,
                "factory_kwargs": dict(reference.factory_kwargs),
                "weights": reference.weights,
                "normalize": reference.normalize if reference.normalize is not None else self.model.normalize,
                "feature_layer": None,
                "trust_code": reference.trust_code,
                "reference": None,
            }
        )
        return self.model_copy(update={"model": model})

    @property
    def attestations_path(self) -> Path | None:
        return None if self.attestations is None else self.resolve(self.attestations)

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The spec as plain data (paths as written), for the results and round-trips."""
        return self.model_dump(mode="json", exclude={"base_dir", "source_file"}, exclude_none=False)


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of ``loc`` (mappings of models are stepped over)."""
    model: Any = root
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        model = _model_in(annotation)
        if model is None:
            # dict[str, Model]: the next part is a user-chosen key (a group or OOD set name)
            args = typing.get_args(annotation) if typing.get_origin(annotation) is dict else ()
            value_model = _model_in(args[-1]) if args else None
            if value_model is None or not parts:
                return None
            parts.pop(0)
            model = value_model
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Model | None
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def unknown_key_message(key: str, known: Sequence[str]) -> str:
    """``unknown key; did you mean 'model'? (allowed: ...)`` for a key not in ``known``."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (allowed here: {', '.join(known)})"


def format_validation_error(error: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``source: field.path: what was expected, got <value>``.

    ``model`` is the validated class (default :class:`AuditSpec`), for "did you mean" hints on
    unknown keys.
    """
    model = model or AuditSpec
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            holder = _model_at(model, item["loc"])
            known = [name for name, f in holder.model_fields.items() if not f.exclude] if holder else []
            message = unknown_key_message(str(item["loc"][-1]), known) if known else "unknown key"
        elif item["type"] == "missing":
            message = "required but missing"
        got = item.get("input")
        said = "got " in message or "is not supported by auditkit" in message  # the value is in the message
        shown = "" if item["type"] in ("missing", "extra_forbidden") or said else f", got {got!r}"
        if isinstance(got, dict) and item["type"] != "extra_forbidden":
            shown = ""
        lines.append(f"{source}: {loc}: {message}{shown}")
    return "\n".join(lines)


def parse_spec(data: Any, *, base_dir: Path, source: str = "spec", source_file: Path | None = None) -> AuditSpec:
    """Validate already-parsed YAML data into an :class:`AuditSpec`."""
    extra = {"source_file": source_file} if source_file is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return AuditSpec.model_validate({**data, "base_dir": base_dir.resolve(), **extra})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def load_spec(path: Path | str) -> AuditSpec:
    """Read and validate a spec file; every problem is a :class:`ConfigError` naming the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"spec file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read spec file {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(data, base_dir=path.resolve().parent, source=str(path), source_file=path.resolve())
