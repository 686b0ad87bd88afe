"""The preflight: one small batch through the model before any image is decoded.

A model that does not fit its spec (three input channels against ``input.channels: 1``, a 3-D
network given 2-D slices, a segmentation or regression head, a final Softmax or Sigmoid) would
otherwise fail deep inside the shared pass with a PyTorch traceback, or, worse, run and return
numbers that mean nothing (a softmax over probabilities). The preflight runs two mid-grey images
of the spec's input shape through the model on its device and turns every such mismatch into a
:class:`~auditkit.errors.ModelLoadError` (exit code 2) that names the spec field, what the model
expects, and, when the output is not a classifier's, the kind of model its shape suggests.

Mid-grey images rather than the first decoded image: the question is the model's interface, not
the data, and asking it before the decode means a mismatch costs a second, not a decode of the
study.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from auditkit import __version__
from auditkit.errors import ModelLoadError
from auditkit.model import ModelAdapter, first_line

log = logging.getLogger(__name__)

PREFLIGHT_IMAGES = 2
_SUPPORTED = (
    f"auditkit {__version__} audits classifiers that return one logit per class (task: classification,"
    " softmax; task: multilabel, sigmoid), regressors that return one value per output (task: regression)"
    " and segmentation models that return one logit per class for every pixel (task: segmentation), of 2-D"
    " images or 3-D volumes (input.depth)"
)
_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")
_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")


@dataclass
class PreflightReport:
    """What the preflight saw; written into ``results.json`` under ``model.preflight``.

    Attributes:
        input_shape: the batch's shape.
        output_shape: the model's output shape.
        first_layer: the first convolution or linear layer that ran, with its expected input.
        final_module: the last leaf module that ran (``Softmax``, ``Sigmoid``, ``Linear``...).
        warnings: notes that do not stop the audit.
    """

    input_shape: list[int]
    output_shape: list[int] = field(default_factory=list)
    first_layer: str | None = None
    final_module: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "input_shape": self.input_shape,
            "output_shape": self.output_shape,
            "first_layer": self.first_layer,
            "final_module": self.final_module,
            "warnings": list(self.warnings),
        }


class _Abort(Exception):
    """Raised from a forward pre-hook to stop the preflight with a finished message."""


def _describe_layer(name: str, module: nn.Module) -> str:
    where = f"layer {name!r}" if name else "the model"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{where} ({type(module).__name__}, {module.in_channels} input channels)"
    if isinstance(module, nn.Linear):
        return f"{where} (Linear, {module.in_features} input features)"
    return where


def run_preflight(adapter: ModelAdapter) -> PreflightReport:
    """Two mid-grey images of the spec's input through the model; every mismatch is a clear error.

    Raises:
        ModelLoadError: naming the spec field and what the model expects.
    """
    spec = adapter.spec
    shape = (PREFLIGHT_IMAGES, *spec.input.shape)
    report = PreflightReport(input_shape=list(shape))
    batch = torch.full(shape, 0.5, device=adapter.device)
    if adapter.channels_last and batch.ndim == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)

    names = {id(m): n for n, m in adapter.user_module.named_modules()}
    first: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    leaves: list[nn.Module] = []

    def before(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        tensor = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if not first and tensor is not None:
            first.append((names.get(id(module), ""), module, tuple(tensor.shape)))
        if isinstance(module, nn.Conv3d) and tensor is not None and tensor.ndim == 4:
            raise _Abort(
                f"model.input: the model's first convolution, {_describe_layer(names.get(id(module), ''), module)},"
                f" is 3-D: it expects volumes (N, C, D, H, W), and was given 2-D images {tuple(tensor.shape)}."
                " Set model.input.depth (slices per volume) to audit it on volumes"
            )
        if isinstance(module, nn.Conv2d) and tensor is not None and tensor.ndim == 5 and first[0][1] is module:
            raise _Abort(
                f"model.input: the model's first convolution, {_describe_layer(names.get(id(module), ''), module)},"
                f" is 2-D: it expects images (N, C, H, W), and was given volumes {tuple(tensor.shape)}"
                " (model.input.depth is set). Remove model.input.depth to audit it on 2-D images"
            )

    def after(module: nn.Module, _inputs: tuple[Any, ...], _output: Any) -> None:
        if not list(module.children()):
            leaves.append(module)

    raw: list[Any] = []
    handles = []
    if not isinstance(adapter.user_module, torch.jit.ScriptModule):  # scripted modules take no hooks
        handles.append(adapter.user_module.register_forward_hook(lambda _m, _i, out: raw.append(out)))
        for module in adapter.user_module.modules():
            if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
                handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    try:
        with torch.inference_mode():
            output = adapter.module(batch)
    except _Abort as abort:
        raise ModelLoadError(str(abort)) from None
    except Exception as error:
        raise ModelLoadError(_explain_failure(error, first, shape)) from None
    finally:
        for handle in handles:
            handle.remove()
    if first:
        report.first_layer = _describe_layer(first[0][0], first[0][1])
    if leaves:
        report.final_module = type(leaves[-1]).__name__
    _check_output(raw[-1] if raw else output, adapter, report, narrowed=not raw)
    for warning in report.warnings:
        log.warning("preflight: %s", warning)
    return report


def _explain_failure(
    error: BaseException, first: list[tuple[str, nn.Module, tuple[int, ...]]], shape: tuple[int, ...]
) -> str:
    """The failure of the preflight batch, said in terms of the spec."""
    message = first_line(error)
    size = "x".join(str(n) for n in shape[2:])
    given = f"{shape[1]} channel(s) of {size} (model.input)"
    channels = _CHANNELS.search(message)
    if channels:
        expected = int(channels.group(1))
        return (
            f"model.input.channels is {shape[1]} but the model expects {expected} input channels"
            f"{' at ' + _describe_layer(first[0][0], first[0][1]) if first else ''}; set model.input.channels:"
            f" {expected} (images are converted to that many channels), or give a model built for {shape[1]}"
        )
    if first and isinstance(first[0][1], nn.modules.conv._ConvNd) and first[0][1].in_channels != shape[1]:
        expected = int(first[0][1].in_channels)
        return (
            f"model.input.channels is {shape[1]} but the model's first layer"
            f" {_describe_layer(first[0][0], first[0][1])} expects {expected}; set model.input.channels: {expected}"
        )
    matmul = _MATMUL.search(message)
    if matmul:
        return (
            f"the model does not fit model.input ({size}): a linear layer expects"
            f" {matmul.group(3)} input features and got {matmul.group(2)}. The model was probably built for"
            f" another {'volume' if len(shape) == 5 else 'image'} size; set model.input"
            f"{'.depth, ' if len(shape) == 5 else '.'}height and width to the size it was trained on"
            + (" (or remove model.input.depth for a model of 2-D images)" if len(shape) == 5 else "")
        )
    return (
        f"the model failed on a preflight batch of {shape[0]} images with {given}:"
        f" {type(error).__name__}: {message}. Check model.input and model.factory_kwargs against the model"
    )


def _check_segmentation_output(output: torch.Tensor, adapter: ModelAdapter, report: PreflightReport, k: int) -> None:
    """A segmentation model returns ``(N, K, *spatial)`` logits on the input's grid."""
    spatial = tuple(adapter.spec.input.spatial)
    shown = tuple(report.output_shape)
    expected = f"(N, {k}, {', '.join(map(str, spatial))})"
    if output.ndim != 2 + len(spatial) or output.shape[0] != PREFLIGHT_IMAGES:
        raise ModelLoadError(
            f"the model returns {shown} for {PREFLIGHT_IMAGES} inputs of {spatial}; a segmentation model returns"
            f" one logit per class for every pixel, {expected}"
        )
    if output.shape[1] != k:
        raise ModelLoadError(
            f"the model returns {output.shape[1]} score maps per image but model.classes lists {k}"
            f" {list(adapter.classes)}; name one class per output channel (label value 0 first, the background)"
        )
    if tuple(output.shape[2:]) != spatial:
        raise ModelLoadError(
            f"the model returns score maps of {tuple(output.shape[2:])} for inputs of {spatial}; auditkit compares"
            " them with the reference pixel by pixel, so they must have the input's size (upsample inside the"
            " model)"
        )
    if report.final_module in ("Softmax", "Sigmoid"):
        raise ModelLoadError(
            f"the model's forward ends in {report.final_module}: it returns probabilities, not logits, and"
            " auditkit applies the softmax over the classes itself. Remove the final activation"
        )


def _check_output(output: Any, adapter: ModelAdapter, report: PreflightReport, *, narrowed: bool = False) -> None:
    """The user's model's own output (before ``output_names`` narrows it, unless ``narrowed``)
    against the spec."""
    task = adapter.task
    names = adapter.classes if narrowed else (adapter.output_names or adapter.classes)
    k = len(names)
    field_name = "model.output_names" if adapter.output_names is not None else "model.classes"
    what = "values" if task == "regression" else "logits"
    if not isinstance(output, torch.Tensor):
        kind = type(output).__name__
        hint = f" (a dict or tuple of heads: wrap the model so it returns the {what})"
        raise ModelLoadError(f"the model returns a {kind}; auditkit needs one tensor of {what} (N, {k}){hint}")
    report.output_shape = [int(n) for n in output.shape]
    shown = tuple(report.output_shape)
    if not output.dtype.is_floating_point:
        raise ModelLoadError(
            f"the model returns {output.dtype} values {shown}: class indices or labels, not logits; {_SUPPORTED}"
            " (the scores before argmax)"
        )
    if task == "segmentation":
        _check_segmentation_output(output, adapter, report, k)
        return
    if output.ndim in (4, 5) and output.shape[0] == PREFLIGHT_IMAGES:
        spatial = "a volume" if output.ndim == 5 else "an image"
        raise ModelLoadError(
            f"the model returns {shown}: a segmentation output (a score per class for every pixel of"
            f" {spatial}); set model.task: segmentation and name its label values in model.classes, background"
            " first"
        )
    if task == "regression" and output.ndim == 1 and k == 1 and output.shape[0] == PREFLIGHT_IMAGES:
        return
    if task == "classification" and (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        raise ModelLoadError(
            f"the model returns one value per image {shown}: a regression model (set model.task: regression and"
            " name the output in model.classes), or a binary classifier with a single logit (set model.task:"
            " multilabel with one label, or wrap it to return torch.cat([torch.zeros_like(z), z], dim=1),"
            " whose softmax is sigmoid(z))"
        )
    if output.ndim != 2 or output.shape[0] != PREFLIGHT_IMAGES:
        raise ModelLoadError(f"the model returns {shown} for {PREFLIGHT_IMAGES} images; expected {what} (N, {k})")
    if output.shape[1] != k:
        extra = ""
        if output.shape[1] > k and adapter.output_names is None and task != "classification":
            extra = (
                " A model with more outputs than audited labels (e.g. torchxrayvision's 18) names every output"
                " in model.output_names; outputs not in model.classes are then masked"
            )
        elif output.shape[1] > k and adapter.output_names is None:
            extra = " A multi-label model with more outputs than audited labels sets task: multilabel and output_names"
        unit = "value" if task == "regression" else "logit"
        raise ModelLoadError(
            f"the model returns {output.shape[1]} {unit}s per image but {field_name} lists {k} {names};"
            f" give one name per output, in the model's output order.{extra}"
        )
    if task == "regression":
        return
    final = report.final_module
    if final == "Softmax":
        raise ModelLoadError(
            "the model's forward ends in Softmax: it returns probabilities, not logits, and auditkit applies"
            " softmax itself (a second softmax flattens every confidence and corrupts calibration). Remove the"
            " final Softmax, or end in LogSoftmax"
            if task == "classification"
            else "the model's forward ends in Softmax, but task: multilabel scores each label independently"
            " (sigmoid); a model whose classes exclude each other is task: classification"
        )
    if final == "Sigmoid":
        raise ModelLoadError(
            "the model's forward ends in Sigmoid: it returns independent probabilities per output (a multi-label"
            " model), not logits. Set model.task: multilabel and remove the final Sigmoid (auditkit applies it)"
            if task == "classification"
            else "the model's forward ends in Sigmoid: it returns probabilities, not logits, and auditkit applies"
            " the sigmoid itself. Remove the final Sigmoid"
        )
    values = output.detach().double().cpu()
    if task == "classification" and torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
        if torch.allclose(values.sum(dim=1), torch.ones(values.shape[0], dtype=torch.float64), atol=1e-4):
            raise ModelLoadError(
                "the model returns probabilities that sum to 1 (a softmax inside forward), not logits;"
                " auditkit applies softmax itself. Return the scores before the softmax (or their log)"
            )
        report.warnings.append(
            "every output of the preflight batch lies in [0, 1]: if the model applies a sigmoid inside"
            " forward, its outputs are probabilities, not logits, and the audit's softmax is wrong"
        )
    elif task == "multilabel" and torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
        report.warnings.append(
            "every output of the preflight batch lies in [0, 1]: if the model applies a sigmoid inside"
            " forward, its outputs are probabilities, not logits, and the audit's sigmoid is applied twice"
        )
