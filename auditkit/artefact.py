"""Exported artefacts as the audit's model: ONNX graphs run by ONNX Runtime.

What a hospital deploys is usually not the training-time PyTorch module but an exported file. An
ONNX file is data, not code, and is read as such: :func:`inspect_onnx` parses the protobuf with
the ``onnx`` package (external tensors not loaded), refuses operators outside the standard
domains (a custom-op domain needs a shared library: code), external-data paths that leave the
model's folder and declared tensor sizes beyond a budget - all before ONNX Runtime sees the file -
and reads the graph's input name, layout and element type, which :func:`check_input` holds
against ``model.input``.

:class:`OnnxModule` wraps the session as a ``torch.nn.Module`` so the audit's adapter treats it as
any model (normalisation in front, batching, counting). It has no gradients: checks that need them
are told so (``has_gradients``). The embedding the detectors read is a graph value: the one
``model.feature_layer`` names, or by default the input of the last ``Gemm``/``MatMul`` node (the
analogue of the input of a PyTorch model's last ``nn.Linear``), added to the graph's outputs and
passed through an ``nn.Identity`` (:attr:`OnnxModule.embedding`) so the adapter's forward hook
sees it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from auditkit.errors import ConfigError, ModelLoadError

__all__ = [
    "MAX_ONNX_BYTES",
    "STANDARD_DOMAINS",
    "OnnxInfo",
    "OnnxModule",
    "check_input",
    "inspect_onnx",
    "load_onnx",
]

log = logging.getLogger(__name__)

MAX_ONNX_BYTES = 4 * 2**30
"""Largest total size of an ONNX model's tensors (inline and external) the audit loads."""

STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
"""Operator domains ONNX Runtime implements itself; any other is a custom op (a native library)."""

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


@dataclass
class OnnxInfo:
    """What the graph declares, read without running it.

    Attributes:
        path: The model file.
        input_name: The graph's one image input.
        input_shape: Its dimensions: an int when fixed, a string (the symbolic name) or ``None``
            when not.
        input_type: Its element type (``float32`` or ``float16``).
        output_names: The graph's outputs, logits first.
        value_names: Every value a node produces (candidates for ``feature_layer``).
        embedding: The value read as the embedding and how it was chosen, or ``None``.
        opsets: ``{domain: version}`` of the model.
        tensor_bytes: Declared size of every initializer, inline and external.
    """

    path: Path
    input_name: str
    input_shape: list[int | str | None]
    input_type: str
    output_names: list[str]
    value_names: list[str]
    embedding: tuple[str, str] | None
    opsets: dict[str, int] = field(default_factory=dict)
    tensor_bytes: int = 0

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the graph is fixed to, ``None`` when it is dynamic."""
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None


def _dims(value: Any) -> list[int | str | None]:
    shape = value.type.tensor_type.shape
    out: list[int | str | None] = []
    for dim in shape.dim:
        if dim.HasField("dim_value"):
            out.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            out.append(str(dim.dim_param))
        else:
            out.append(None)
    return out


def _tensor_bytes(tensor: Any) -> int:
    return int(math.prod(int(d) for d in tensor.dims)) * _ITEM_BYTES.get(int(tensor.data_type), 8)


def inspect_onnx(path: Path, *, feature_layer: str | None = None, budget: int = MAX_ONNX_BYTES) -> tuple[Any, OnnxInfo]:
    """Parse and vet an ONNX file; the graph (external tensors not loaded) and what it declares.

    Raises:
        ModelLoadError: not a readable ONNX model, a custom-op domain, external data outside the
            model's folder or missing, tensors beyond ``budget``, or not exactly one image input.
        ConfigError: ``feature_layer`` names no value of the graph.
    """
    import onnx

    name = path.name
    if not path.is_file():
        raise ModelLoadError(f"model.weights: file not found: {path}")
    size = path.stat().st_size
    if size > budget:
        raise ModelLoadError(f"model.weights: {name} is {size} bytes; the budget for an ONNX model is {budget} bytes")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ModelLoadError(
            f"model.weights: {name} is not a readable ONNX model (truncated or corrupt?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        ) from None
    graph = model.graph
    if not graph.node or not graph.output:
        raise ModelLoadError(f"model.weights: {name} holds no ONNX graph (no nodes or no outputs)")
    opsets = {str(o.domain): int(o.version) for o in model.opset_import}
    local = {str(f.domain) for f in model.functions}  # functions the model defines are graphs, not code
    custom = sorted(({str(node.domain) for node in graph.node} | set(opsets)) - set(STANDARD_DOMAINS) - local)
    if custom:
        raise ModelLoadError(
            f"model.weights: {name} uses operators of custom domains {custom}, which need a native library"
            f" (code) to run; the audit runs graphs of the standard domains {list(STANDARD_DOMAINS)} only"
        )
    folder = path.parent.resolve()
    total = 0
    for tensor in graph.initializer:
        total += _tensor_bytes(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            location = entries.get("location", "")
            target = (folder / location).resolve()
            if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
                raise ModelLoadError(
                    f"model.weights: {name} keeps tensor {tensor.name!r} in {location!r}, outside the model's"
                    " folder; external data must lie beside the model"
                )
            if not target.is_file():
                raise ModelLoadError(f"model.weights: {name}'s external data file {location!r} is missing")
    if total > budget:
        raise ModelLoadError(
            f"model.weights: {name} declares {total} bytes of tensors; the budget for an ONNX model is {budget} bytes"
        )
    initializers = {t.name for t in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ModelLoadError(
            f"model.weights: {name} has {len(inputs)} graph inputs ({[v.name for v in inputs]});"
            " the audit feeds one image tensor"
        )
    image = inputs[0]
    elem = int(image.type.tensor_type.elem_type)
    if elem not in (1, 10):
        raise ModelLoadError(
            f"model.weights: {name}'s input {image.name!r} is of element type"
            f" {_FLOAT_TYPES.get(elem, f'#{elem}')}; the audit feeds float32 or float16 images"
        )
    values = [str(out) for node in graph.node for out in node.output if out]
    embedding: tuple[str, str] | None = None
    if feature_layer is not None:
        if feature_layer not in values:
            import difflib

            close = difflib.get_close_matches(feature_layer, values, n=3)
            hint = f"; did you mean {close}?" if close else f"; some values: {values[-8:]}"
            raise ConfigError(f"model.feature_layer: the ONNX graph has no value named {feature_layer!r}{hint}")
        embedding = (feature_layer, f"value {feature_layer} of the ONNX graph")
    else:
        for node in reversed(graph.node):
            if node.op_type in ("Gemm", "MatMul") and node.input and node.input[0] not in initializers:
                embedding = (str(node.input[0]), f"input of {node.op_type} node {node.name or node.output[0]}")
                break
    info = OnnxInfo(
        path=path,
        input_name=str(image.name),
        input_shape=_dims(image),
        input_type=_FLOAT_TYPES[elem],
        output_names=[str(v.name) for v in graph.output],
        value_names=values,
        embedding=embedding,
        opsets=opsets,
        tensor_bytes=total,
    )
    return model, info


def check_input(info: OnnxInfo, channels: int, spatial: tuple[int, ...]) -> None:
    """Hold the graph's input to ``model.input`` (channels and spatial size; the batch is free).

    Raises:
        ConfigError: the ranks or a fixed dimension differ, naming ``model.input`` and the graph's shape.
    """
    shape = info.input_shape
    expected = ["N", channels, *spatial]
    layout = "(N, C, D, H, W)" if len(spatial) == 3 else "(N, C, H, W)"
    shown = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
    if len(shape) != len(expected):
        raise ConfigError(
            f"model.input: the ONNX graph's input {info.input_name!r} has shape {shown}; the spec describes"
            f" {layout} = {tuple(expected)}. Set model.input to the graph's layout"
            + (" (remove input.depth for a 2-D graph)" if len(spatial) == 3 else " (set input.depth for a 3-D graph)")
        )
    for axis, (got, want) in enumerate(zip(shape[1:], expected[1:], strict=True), start=1):
        if isinstance(got, int) and got > 0 and got != want:
            names = ["N", "channels", *(("depth", "height", "width") if len(spatial) == 3 else ("height", "width"))]
            raise ConfigError(
                f"model.input.{names[axis]}: the ONNX graph's input {info.input_name!r} has shape {shown}, fixed"
                f" at {got} on that axis; the spec says {want}"
            )


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a module: float images in, logits out, no gradients.

    ``embedding`` is an ``nn.Identity`` the graph's embedding value passes through on every call,
    so a forward hook on it reads the embedding as it reads a PyTorch layer's.
    """

    has_gradients = False

    def __init__(self, session: Any, info: OnnxInfo, embedding_output: str | None) -> None:
        super().__init__()
        self.session = session
        self.info = info
        self.embedding = nn.Identity()
        self._outputs = [info.output_names[0]] + ([embedding_output] if embedding_output else [])
        self._dtype = np.float16 if info.input_type == "float16" else np.float32
        self.provider = str(session.get_providers()[0]) if session.get_providers() else "unknown"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().float().cpu().numpy().astype(self._dtype, copy=False))
        fixed = self.info.fixed_batch
        n = array.shape[0]
        if fixed is None or n == fixed:
            results = self.session.run(self._outputs, {self.info.input_name: array})
        else:  # a graph fixed to one batch size: run it in chunks of that size, the last one padded
            parts: list[list[np.ndarray]] = []
            for start in range(0, n, fixed):
                chunk = array[start : start + fixed]
                short = fixed - chunk.shape[0]
                if short:
                    chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), dtype=chunk.dtype)])
                out = self.session.run(self._outputs, {self.info.input_name: chunk})
                parts.append([o[: fixed - short] for o in out])
            results = [np.concatenate([p[i] for p in parts]) for i in range(len(self._outputs))]
        logits = torch.from_numpy(np.asarray(results[0], dtype=np.float32)).to(images.device)
        if len(results) > 1:
            self.embedding(torch.from_numpy(np.asarray(results[1], dtype=np.float32)).to(images.device))
        return logits


def _value_type(model: Any, name: str) -> int:
    """The element type of graph value ``name`` by ONNX shape inference (float32 when unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a convenience here; ONNX Runtime checks the graph itself
        return int(onnx.TensorProto.FLOAT)
    for value in inferred.graph.value_info:
        if value.name == name and value.type.tensor_type.elem_type:
            return int(value.type.tensor_type.elem_type)
    return int(onnx.TensorProto.FLOAT)


def load_onnx(
    path: Path,
    *,
    channels: int,
    spatial: tuple[int, ...],
    feature_layer: str | None,
    device: torch.device,
    budget: int = MAX_ONNX_BYTES,
) -> OnnxModule:
    """Vet the file (:func:`inspect_onnx`, :func:`check_input`) and open an ONNX Runtime session on
    the CPU provider, or CUDA's when the audit runs on a GPU and ONNX Runtime has it.

    Raises:
        ModelLoadError: the file is refused, onnxruntime is missing or cannot build a session.
        ConfigError: the graph's input or ``feature_layer`` disagrees with the spec.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError(
            "model.format: onnx needs the onnx and onnxruntime packages: pip install 'auditkit[onnx]'"
        ) from None
    import onnx

    model, info = inspect_onnx(path, feature_layer=feature_layer, budget=budget)
    check_input(info, channels, spatial)
    embedding_output = None
    if info.embedding is not None:
        name = info.embedding[0]
        if name not in info.output_names:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, _value_type(model, name), None))
            embedding_output = name
        elif name != info.output_names[0]:
            embedding_output = name
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
    except Exception as error:
        raise ModelLoadError(
            f"model.weights: ONNX Runtime cannot run {path.name}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    log.info("ONNX Runtime %s on %s: %s", ort.__version__, providers[0], path.name)
    return OnnxModule(session, info, embedding_output)
