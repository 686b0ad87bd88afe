"""The model adapter: load a candidate model safely and run it on images in [0, 1].

Weights are read from ``.safetensors`` or from a ``.pt``/``.pth`` *state_dict* with
``torch.load(..., weights_only=True)``. TorchScript archives and pickled modules can run code
while loading, so they load only when the spec says ``trust_code: true``. Normalisation lives
inside the adapter (:class:`NormalizedModel`), so every check works in the [0, 1] image domain and
attacks perturb what the scanner produced, not a normalised tensor.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import nn

from auditkit.errors import ConfigError, ModelLoadError
from auditkit.pixels import DiskPixels
from auditkit.spec import AuditSpec, ModelSpec

log = logging.getLogger(__name__)


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)[:, outputs]``: the user's model behind its own normalisation,
    its outputs narrowed to the audited ones; images ``(N, C, H, W)`` or volumes ``(N, C, D, H, W)``.

    ``outputs`` are the positions of the audited outputs (``model.output_names``: a model with
    more outputs than audited labels, whose other outputs are masked, never averaged in);
    ``None`` keeps all. A regression model's ``(N,)`` output becomes ``(N, 1)``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    outputs: torch.Tensor | None

    def __init__(
        self,
        model: nn.Module,
        mean: list[float] | None,
        std: list[float] | None,
        *,
        outputs: list[int] | None = None,
        vector_output: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean or [0.0]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or [1.0]).view(1, -1, 1, 1), persistent=False)
        index = torch.tensor(outputs, dtype=torch.long) if outputs is not None else None
        self.register_buffer("outputs", index, persistent=False)
        self.vector_output = vector_output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean, self.std
        if images.ndim == 5:  # (N, C, D, H, W): the per-channel constants broadcast over depth too
            mean, std = mean.unsqueeze(-1), std.unsqueeze(-1)
        out: torch.Tensor = self.model((images - mean) / std)
        if self.vector_output and isinstance(out, torch.Tensor) and out.ndim == 1:
            out = out.unsqueeze(1)
        if self.outputs is not None and isinstance(out, torch.Tensor) and out.ndim == 2:
            if out.shape[1] <= int(self.outputs.max()):
                return out  # the preflight names the mismatch
            out = out.index_select(1, self.outputs)
        return out


class SlidingWindowModel(nn.Module):
    """``model`` applied by MONAI's ``sliding_window_inference``: ``roi`` patches of the input,
    overlapping by ``overlap``, blended by ``mode`` into one score map of the input's size. The
    wrapper is part of the model, so the shared pass forwards each image once (its patches are the
    model's own business) and attacks differentiate through the blend."""

    def __init__(self, model: nn.Module, roi: list[int], overlap: float, mode: str, sw_batch_size: int) -> None:
        super().__init__()
        self.model = model
        self.roi = list(roi)
        self.overlap = overlap
        self.mode = mode
        self.sw_batch_size = sw_batch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from monai.inferers.utils import sliding_window_inference

        out = sliding_window_inference(
            images, self.roi, self.sw_batch_size, self.model, overlap=self.overlap, mode=self.mode
        )
        assert isinstance(out, torch.Tensor)
        return out

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` records under ``model.sliding_window``."""
        import monai

        return {
            "roi": self.roi,
            "overlap": self.overlap,
            "mode": self.mode,
            "sw_batch_size": self.sw_batch_size,
            "implementation": f"MONAI {monai.__version__} sliding_window_inference",
        }


def resolve_device(requested: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {requested!r} requested but CUDA is not available")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {requested!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return torch.device(requested)


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def import_factory(factory: str, base_dir: Path) -> Callable[..., Any]:
    """Import ``package.module:callable`` with the spec's folder on the import path."""
    module_name, _, attr_path = factory.partition(":")
    with _on_path(base_dir):
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ModelLoadError(
                f"model.factory: cannot import module {module_name!r} ({error});"
                f" it must be importable or lie in the spec's folder {base_dir}"
            ) from error
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"model.factory: module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"model.factory: {factory!r} is not callable")
    return target  # type: ignore[no-any-return]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(("/code/", "constants.pkl")) or "/code/" in name for name in archive.namelist())


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message without terminal colour codes (torch adds some)."""
    lines = _ANSI.sub("", str(error)).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _weights_only_refusal(error: BaseException) -> str:
    """Why ``weights_only=True`` refused a file, in one clause (torch's message is a page long)."""
    found = _GLOBAL.search(_ANSI.sub("", str(error)))
    if found:
        return f"it pickles {found.group(1)}, which is code, not only tensors"
    return first_line(error)


def _refuse_artefacts(path: Path) -> None:
    """Exported artefacts this version cannot run, named as such instead of failing to unpickle."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        raise ModelLoadError(
            f"model.weights: {path.name} is an ONNX model; set model.format: onnx (or auto) and remove"
            " model.factory to audit the graph with ONNX Runtime"
        )
    if suffix in (".engine", ".plan", ".tflite", ".pb", ".h5", ".keras", ".mlmodel"):
        raise ModelLoadError(
            f"model.weights: {path.name} is not a PyTorch file; this version audits PyTorch modules"
            " (a .safetensors or .pt state_dict, or TorchScript with trust_code: true)"
        )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict without executing code: safetensors, or ``weights_only=True`` pickles."""
    if not path.is_file():
        raise ModelLoadError(f"model.weights: file not found: {path}")
    _refuse_artefacts(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:
            raise ModelLoadError(
                f"model.weights: {path.name} is not a readable safetensors file: {first_line(error)}"
            ) from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        if _is_torchscript(path):
            raise ModelLoadError(
                f"model.weights: {path.name} is a TorchScript archive, which can run code while"
                " loading; set model.trust_code: true in the spec if you trust its origin"
            )
        return read_state_dict(path, path.name)
    raise ModelLoadError(
        f"model.weights: unsupported file type {suffix!r} for {path.name}; expected .safetensors, .pt or .pth"
    )


def read_state_dict(source: Path | BinaryIO, name: str) -> dict[str, torch.Tensor]:
    """A pickled state_dict read with ``torch.load(..., weights_only=True)`` (no code runs), from a
    file or an in-memory stream; checkpoints wrapping it as ``{"state_dict": ...}`` (Lightning) or
    ``{"model": ...}`` (MONAI bundles) are unwrapped. ``name`` is how errors name the file.

    Raises:
        ModelLoadError: the pickle holds more than tensors, or no mapping of names to tensors.
    """
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(
            f"model.weights: {name} is not a plain state_dict (torch.load with"
            f" weights_only=True refused it: {_weights_only_refusal(error)})."
            " A pickled module can run code while loading; save model.state_dict()"
            " instead, or set model.trust_code: true if you trust its origin"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(
            f"model.weights: {name} holds a {type(loaded).__name__}, expected a state_dict"
            " (a mapping of parameter names to tensors)"
        )
    return {str(k): v for k, v in loaded.items()}


def _load_trusted_module(path: Path) -> nn.Module:
    """TorchScript or a whole pickled module; only reached with ``trust_code: true``."""
    if not path.is_file():
        raise ModelLoadError(f"model.weights: file not found: {path}")
    _refuse_artefacts(path)
    log.warning("loading %s with trust_code: true; it may execute code", path.name)
    try:
        if _is_torchscript(path):
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        else:
            module = torch.load(path, map_location="cpu", weights_only=False)  # trust_code gate
    except Exception as error:
        raise ModelLoadError(
            f"model.weights: {path.name} is neither a TorchScript archive nor a pickled torch module"
            f" ({type(error).__name__}: {first_line(error)})"
        ) from None
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"model.weights: {path.name} holds a {type(module).__name__}, expected a module")
    return module


def build_module(spec: ModelSpec, base_dir: Path, weights: Path | None) -> nn.Module:
    """Instantiate the user's model (without normalisation) with its weights loaded."""
    if spec.factory is None:
        assert weights is not None and spec.trust_code  # guaranteed by the spec validator
        return _load_trusted_module(weights)
    factory = import_factory(spec.factory, base_dir)
    with _on_path(base_dir):
        try:
            module = factory(**spec.factory_kwargs)
        except Exception as error:
            raise ModelLoadError(
                f"model.factory: {spec.factory}(**{spec.factory_kwargs}) raised {type(error).__name__}: {error}"
            ) from error
    if not isinstance(module, nn.Module):
        raise ModelLoadError(
            f"model.factory: {spec.factory} returned a {type(module).__name__}, expected torch.nn.Module"
        )
    if weights is not None:
        if spec.trust_code and _is_torchscript(weights):
            return _load_trusted_module(weights)
        state = load_state_dict(weights)
        missing, unexpected = _compare_keys(module, state)
        if missing or unexpected:
            raise ModelLoadError(
                f"model.weights: {weights.name} does not match {spec.factory}: missing keys"
                f" {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys"
                f" {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelLoadError(f"model.weights: {weights.name}: {first_line(error)}") from None
    lazy = [n for n, p in module.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ModelLoadError(
            f"model.factory: {spec.factory} returned a model with uninitialised lazy parameters ({lazy[0]}, ...);"
            " give model.weights, or run one batch through it inside the factory"
        )
    return module


def _compare_keys(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(module.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA (or simulated) out-of-memory errors, which batch halving can recover from."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


Precision = Literal["auto", "fp32", "bf16"]

PARITY_IMAGES = 64
"""Images of the first split run in both fp32 and bf16 before a bf16 pass (the parity record)."""
PARITY_MIN_AGREEMENT = 0.99
PARITY_MAX_PROB_DIFF = 0.05


def precision_parity(
    reference_logits: torch.Tensor, test_logits: torch.Tensor, task: str = "classification"
) -> dict[str, float | int]:
    """How far reduced-precision logits stray from fp32 ones on the same images.

    Returns ``{"images", "top1_agreement", "max_prob_diff"}``: the share of images whose arg-max
    class is the same, and the largest absolute difference of any softmax probability. For a
    multi-label model: the share whose every label falls on the same side of 0.5, and the largest
    sigmoid difference; for a regressor: the share whose outputs move by under 1% of the
    reference's spread, and the largest move in those spreads (so the same bounds apply); for a
    segmentation model: the share of pixels whose arg-max class is the same, and the largest
    softmax difference of any pixel.
    """
    if reference_logits.shape != test_logits.shape:
        raise ValueError(f"parity needs logits of one shape, got {reference_logits.shape} and {test_logits.shape}")
    n = int(reference_logits.shape[0])
    if n == 0:
        return {"images": 0, "top1_agreement": 1.0, "max_prob_diff": 0.0}
    reference, test = reference_logits.double(), test_logits.double()
    if task == "segmentation":
        agreement = (reference.argmax(dim=1) == test.argmax(dim=1)).double().mean().item()
        difference = (torch.softmax(reference, dim=1) - torch.softmax(test, dim=1)).abs().max().item()
    elif task == "multilabel":
        same = ((reference >= 0) == (test >= 0)).all(dim=1)
        agreement = same.double().mean().item()
        difference = (torch.sigmoid(reference) - torch.sigmoid(test)).abs().max().item()
    elif task == "regression":
        spread = reference.std(dim=0, unbiased=False).clamp_min(1e-6) if n > 1 else reference.abs().clamp_min(1.0)
        moved = (reference - test).abs() / spread
        agreement = (moved < 0.01).all(dim=1).double().mean().item()
        difference = moved.max().item()
    else:
        agreement = (reference.argmax(dim=1) == test.argmax(dim=1)).double().mean().item()
        difference = (torch.softmax(reference, dim=1) - torch.softmax(test, dim=1)).abs().max().item()
    return {"images": n, "top1_agreement": float(agreement), "max_prob_diff": float(difference)}


def parity_acceptable(parity: dict[str, float | int]) -> bool:
    """bf16 is kept when top-1 agreement is at least 0.99 and no probability moves by over 0.05."""
    return float(parity["top1_agreement"]) >= PARITY_MIN_AGREEMENT and (
        float(parity["max_prob_diff"]) <= PARITY_MAX_PROB_DIFF
    )


@dataclass(frozen=True)
class InferenceOptions:
    """How the shared pass runs; ``auto`` picks per device (CPU: fp32, in-process).

    Attributes:
        precision: ``auto`` (bf16 autocast on CUDA when the GPU supports it, else fp32), ``fp32``
            or ``bf16`` (also allowed on the CPU, where autocast supports it, for testing).
        channels_last: ``None`` (auto: for models with 2-D convolutions, on CUDA and on the CPU,
            where oneDNN's NHWC convolutions ran ResNet-18 and the demo CNN about 1.3x faster
            than NCHW on a 2-core Xeon; same fp32 arithmetic, summed in another order) or a choice.
        workers: batch-loader worker processes (``None``: auto, up to 4 on CUDA, 0 on the CPU).
        pin_memory: page-locked host batches for asynchronous copies (``None``: on CUDA).
    """

    precision: Precision = "auto"
    channels_last: bool | None = None
    workers: int | None = None
    pin_memory: bool | None = None


def _describe_artefact(module: nn.Module) -> dict[str, Any] | None:
    """``results.json``'s ``model.artefact``: the runtime of an exported model, ``None`` for PyTorch."""
    from auditkit.artefact import OnnxModule

    if not isinstance(module, OnnxModule):
        return None
    import onnxruntime

    info = module.info
    return {
        "format": "onnx",
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "provider": module.provider,
        "input": {"name": info.input_name, "shape": info.input_shape, "type": info.input_type},
        "opsets": info.opsets,
        "tensor_bytes": info.tensor_bytes,
        "embedding": None if info.embedding is None else info.embedding[1],
    }


def _has_conv2d(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


@dataclass
class PassStats:
    """What the shared pass did; written into results.json (it depends on the machine)."""

    images_forwarded: int = 0
    forward_calls: int = 0
    batch_size: int = 0
    batch_halvings: int = 0
    seconds: float = 0.0
    per_split: dict[str, int] = field(default_factory=dict)
    seconds_per_split: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    channels_last: bool = False
    workers: int = 0
    pin_memory: bool = False
    parity: dict[str, float | int] | None = None
    precision_fallback: str | None = None

    def merge_counts(self, other: PassStats) -> None:
        """Add the images, calls and seconds another adapter forwarded (a check run as a Ray task
        loads the model again in its worker; its corruption and attack passes count here)."""
        self.forward_calls += other.forward_calls
        for split, images in other.per_split.items():
            self.per_split[split] = self.per_split.get(split, 0) + images
        self.images_forwarded += other.images_forwarded
        for split, seconds in other.seconds_per_split.items():
            self.seconds_per_split[split] = self.seconds_per_split.get(split, 0.0) + seconds
        self.seconds += other.seconds

    def add_images(self, split: str, images: int) -> None:
        """Count ``images`` forwarded, under ``split`` too when it has a name."""
        self.images_forwarded += images
        if split:
            self.per_split[split] = self.per_split.get(split, 0) + images

    def add_seconds(self, split: str, seconds: float) -> None:
        """Count ``seconds`` of forwarding, under ``split`` too when it has a name."""
        self.seconds += seconds
        if split:
            self.seconds_per_split[split] = self.seconds_per_split.get(split, 0.0) + seconds


class _Batches(torch.utils.data.Dataset[torch.Tensor]):
    """Contiguous batches of a stored (N, C, H, W) tensor, for a DataLoader's worker processes."""

    def __init__(self, images: torch.Tensor | DiskPixels, start: int, batch_size: int) -> None:
        self.images, self.start, self.batch_size = images, start, batch_size

    def __len__(self) -> int:
        remaining = self.images.shape[0] - self.start
        return max(0, -(-remaining // self.batch_size))

    def __getitem__(self, index: int) -> torch.Tensor:
        first = self.start + index * self.batch_size
        return self.images[first : first + self.batch_size].float()


class ModelAdapter:
    """The candidate model on its device, in eval mode, taking images in [0, 1].

    Args:
        spec: the validated audit spec.
        batch_size: images per forward call; halved on out-of-memory.
        device: overrides ``spec.device``.
        options: precision, memory format and batch loading of the shared pass
            (:class:`InferenceOptions`; default: chosen per device).
    """

    bundle: Any = None
    """The MONAI bundle's :class:`~auditkit.monai_bundle.BundleInfo` (``format: monai_bundle``)."""

    def __init__(
        self,
        spec: AuditSpec,
        *,
        batch_size: int = 64,
        device: str | None = None,
        options: InferenceOptions | None = None,
    ) -> None:
        self.spec = spec.model
        if spec.model.resolved_format == "onnx":
            from auditkit.artefact import load_onnx

            assert spec.weights_path is not None  # guaranteed by the spec validator
            user_module: nn.Module = load_onnx(
                spec.weights_path,
                channels=spec.model.input.channels,
                spatial=tuple(spec.model.input.spatial),
                feature_layer=spec.model.feature_layer,
                device=resolve_device(device or spec.device),
            )
        elif spec.model.resolved_format == "monai_bundle":
            from auditkit.monai_bundle import load_monai_bundle

            assert spec.weights_path is not None  # guaranteed by the spec validator
            user_module, bundle = load_monai_bundle(
                spec.weights_path,
                channels=spec.model.input.channels,
                spatial=tuple(spec.model.input.spatial),
                classes=list(spec.model.classes),
                task=spec.model.task,
                trust_code=spec.model.trust_code,
            )
            self.bundle = bundle
        else:
            user_module = build_module(spec.model, spec.base_dir, spec.weights_path)
        window = spec.model.sliding_window
        if window is not None:
            user_module = SlidingWindowModel(user_module, window.roi, window.overlap, window.mode, window.sw_batch_size)
        norm = spec.model.normalize
        self._setup(
            user_module,
            classes=spec.model.classes,
            mean=norm.mean if norm else None,
            std=norm.std if norm else None,
            feature_layer=spec.model.feature_layer,
            device=resolve_device(device or spec.device),
            batch_size=batch_size,
            options=options,
            task=spec.model.task,
            output_names=spec.model.output_names,
        )

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        classes: list[str],
        device: str = "cpu",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        feature_layer: str | None = None,
        batch_size: int = 64,
        options: InferenceOptions | None = None,
        task: str = "classification",
        output_names: list[str] | None = None,
    ) -> ModelAdapter:
        """An adapter over a module already built (tests, the conformance kit, notebooks)."""
        adapter = cls.__new__(cls)
        adapter._setup(
            module,
            classes=classes,
            mean=mean,
            std=std,
            feature_layer=feature_layer,
            device=resolve_device(device),
            batch_size=batch_size,
            options=options,
            task=task,
            output_names=output_names,
        )
        return adapter

    def _setup(
        self,
        user_module: nn.Module,
        *,
        classes: list[str],
        mean: list[float] | None,
        std: list[float] | None,
        feature_layer: str | None,
        device: torch.device,
        batch_size: int,
        options: InferenceOptions | None,
        task: str = "classification",
        output_names: list[str] | None = None,
    ) -> None:
        self.device = device
        self.task = task
        self._classes = list(classes)
        self.output_names = list(output_names) if output_names is not None else None
        """Every output the model has (``model.output_names``); ``None``: exactly ``classes``."""
        self._feature_layer_name = feature_layer
        self.user_module: nn.Module = user_module
        """The user's model without the normalisation wrapper (same parameters as ``module``)."""
        outputs = [self.output_names.index(c) for c in classes] if self.output_names is not None else None
        self.module: nn.Module = NormalizedModel(
            user_module, mean, std, outputs=outputs, vector_output=task == "regression" and len(classes) == 1
        )
        self.module.eval().to(self.device)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.batch_size = batch_size
        self.stats = PassStats(batch_size=batch_size)
        self._feature_module, self._feature_source = self._find_feature_module(user_module)
        self.num_parameters = sum(p.numel() for p in user_module.parameters())
        inner = user_module.model if isinstance(user_module, SlidingWindowModel) else user_module
        self.has_gradients: bool = bool(getattr(inner, "has_gradients", True))
        """Whether gradients flow from the outputs to the inputs (not through an ONNX Runtime session)."""
        self.artefact: dict[str, Any] | None = _describe_artefact(inner)
        """What runs the model when it is not a PyTorch module (format, runtime, provider), else ``None``."""
        bundle = self.bundle
        if bundle is not None:
            self.artefact = {
                "format": "monai_bundle",
                "bundle": bundle.name,
                "version": bundle.version,
                "network": bundle.network,
                "data_format": bundle.data_format,
                "eval_metrics": bundle.eval_metrics,
                "claims_from_eval_metrics": bundle.claims,
                "differences": bundle.differences,
            }
        self._configure(options or InferenceOptions(), user_module)

    def _configure(self, options: InferenceOptions, user_module: nn.Module) -> None:
        cuda = self.device.type == "cuda"
        precision = options.precision
        if precision == "auto":
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        self.precision: str = precision
        self._parity_pending = precision == "bf16"
        channels_last = options.channels_last
        if channels_last is None:  # NHWC convolutions: tensor cores on CUDA, oneDNN's blocked kernels on CPUs
            channels_last = self.device.type in ("cuda", "cpu") and _has_conv2d(user_module)
        if channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.channels_last = bool(channels_last)
        self.workers = options.workers if options.workers is not None else (min(4, os.cpu_count() or 1) if cuda else 0)
        self.pin_memory = options.pin_memory if options.pin_memory is not None else cuda
        self.stats.precision = self.precision
        self.stats.channels_last = self.channels_last
        self.stats.workers = self.workers
        self.stats.pin_memory = self.pin_memory

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def feature_layer(self) -> str:
        return self._feature_source

    @property
    def sliding_window(self) -> dict[str, Any] | None:
        """The sliding-window settings the model runs under (``None``: whole inputs)."""
        module = self.user_module
        return module.describe() if isinstance(module, SlidingWindowModel) else None

    def _find_feature_module(self, module: nn.Module) -> tuple[nn.Module | None, str]:
        from auditkit.artefact import OnnxModule

        layer = self._feature_layer_name
        if isinstance(module, OnnxModule):
            if module.info.embedding is None:
                return None, "unavailable: the ONNX graph has no Gemm/MatMul node (set model.feature_layer)"
            return module.embedding, module.info.embedding[1]
        if isinstance(module, SlidingWindowModel):
            if layer is not None:
                log.warning("model.feature_layer is ignored with sliding_window: the layer sees patches, not images")
            return None, "unavailable: sliding-window inference (the layer sees patches, not images)"
        if layer is not None:
            modules = dict(module.named_modules())
            if layer not in modules:
                names = [n for n in modules if n][:12]
                raise ConfigError(
                    f"model.feature_layer: no module named {layer!r};"
                    f" expected one of {names}{'...' if len(modules) > 13 else ''}"
                )
            return modules[layer], f"output of {layer}"
        if isinstance(module, torch.jit.ScriptModule):
            log.warning("TorchScript model: embeddings unavailable (hooks cannot be added after scripting)")
            return None, "unavailable: TorchScript module"
        linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            log.warning("the model has no nn.Linear; embeddings unavailable unless model.feature_layer names a module")
            return None, "unavailable: no nn.Linear (set model.feature_layer)"
        name, last = linears[-1]
        return last, f"input of {name}"

    @property
    def has_features(self) -> bool:
        return self._feature_module is not None

    @property
    def feature_module(self) -> nn.Module | None:
        """The module whose input (default) or output (``model.feature_layer``) is the embedding.

        A check that forwards new images itself (the backdoor check's triggered images) hooks it to
        get embeddings comparable with the shared pass's; ``None`` when embeddings are unavailable.
        """
        return self._feature_module

    def _autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        if precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_batch(
        self, images: torch.Tensor, *, features: bool = True, precision: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        use_input = self._feature_layer_name is None
        feature_module = self._feature_module if features else None

        pool = self.task == "segmentation"

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            tensor = inputs[0] if use_input else output
            if pool and tensor.ndim > 2:  # a bottleneck map: one embedding per image, averaged over space
                tensor = tensor.flatten(2).mean(dim=2)
            captured.append(tensor.detach().flatten(1))

        handle = feature_module.register_forward_hook(hook) if feature_module is not None else None
        batch = images.to(self.device, non_blocking=True)
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        try:
            self.stats.forward_calls += 1
            with self._autocast(precision or self.precision):
                logits = self.module(batch)
        finally:
            if handle is not None:
                handle.remove()
        spatial = tuple(images.shape[2:]) if self.task == "segmentation" else ()
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 + len(spatial):
            shape = ", ".join(["N", str(len(self.classes)), *map(str, spatial)])
            got = getattr(logits, "shape", type(logits).__name__)
            raise ModelLoadError(f"the model must return logits of shape ({shape}), got {got}")
        if spatial and tuple(logits.shape[2:]) != spatial:
            raise ModelLoadError(
                f"the model returns logits of spatial size {tuple(logits.shape[2:])} for inputs of {spatial};"
                " a segmentation model must return one score per class for every input pixel"
            )
        if logits.shape[1] != len(self.classes):
            raise ModelLoadError(
                f"the model returns {logits.shape[1]} logits per image but model.classes lists"
                f" {len(self.classes)} classes"
            )
        if feature_module is None:
            return logits.float().cpu(), torch.empty(logits.shape[0], 0)
        if not captured:
            raise ModelLoadError(f"the feature hook ({self._feature_source}) never fired")
        return logits.float().cpu(), captured[-1].float().cpu()

    def check_parity(self, images: torch.Tensor | DiskPixels) -> dict[str, float | int]:
        """Run up to :data:`PARITY_IMAGES` images in fp32 and in the pass's precision; record it.

        When bf16 strays too far (:func:`parity_acceptable`), the run falls back to fp32 and says
        so in ``stats.precision_fallback``.
        """
        sample = images[:PARITY_IMAGES].float()
        with torch.inference_mode():
            reference, _ = self._forward_batch(sample, features=False, precision="fp32")
            reduced, _ = self._forward_batch(sample, features=False, precision=self.precision)
        parity = precision_parity(reference, reduced, self.task)
        self.stats.parity = parity
        self._parity_pending = False
        if not parity_acceptable(parity):
            log.warning("bf16 disagrees with fp32 (%s); the pass runs in fp32", parity)
            self.stats.precision_fallback = (
                f"bf16 parity below bound (top-1 agreement >= {PARITY_MIN_AGREEMENT},"
                f" max probability difference <= {PARITY_MAX_PROB_DIFF})"
            )
            self.precision = self.stats.precision = "fp32"
        return parity

    def _batches(self, images: torch.Tensor | DiskPixels, start: int) -> Iterator[torch.Tensor]:
        """Float32 batches from ``start``: sliced in-process, or by DataLoader worker processes."""
        if self.workers == 0 and not self.pin_memory:
            for first in range(start, images.shape[0], self.batch_size):
                yield images[first : first + self.batch_size].float()
            return
        loader = torch.utils.data.DataLoader(
            _Batches(images, start, self.batch_size),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            pin_memory_device=str(self.device) if self.pin_memory and self.device.type == "cuda" else "",
        )
        yield from loader

    def forward_pass(
        self,
        images: torch.Tensor | DiskPixels,
        *,
        split: str = "",
        progress: Callable[[int], None] | None = None,
        features: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and embeddings for ``images`` (N, C, H, W) in [0, 1], batch by batch.

        The pass is a map over batches whose outputs merge by concatenation. On out-of-memory the
        batch is halved and retried; the final batch size is kept for the rest of the run. With
        ``features=False`` no embedding hook runs and the embeddings are an empty (N, 0) tensor.
        The time spent is added to ``stats.seconds`` (and per split).
        """
        started = time.perf_counter()
        if self._parity_pending and images.shape[0] > 0:
            self.check_parity(images)
        logits_parts: list[torch.Tensor] = []
        feature_parts: list[torch.Tensor] = []
        start = 0
        n = images.shape[0]
        with torch.inference_mode():
            while start < n:
                halved = False
                for batch in self._batches(images, start):
                    try:
                        logits, embeddings = self._forward_batch(batch, features=features)
                    except Exception as error:
                        if not is_out_of_memory(error) or self.batch_size == 1:
                            raise
                        self.batch_size = max(1, self.batch_size // 2)
                        self.stats.batch_halvings += 1
                        self.stats.batch_size = self.batch_size
                        log.warning("out of memory; retrying with batch size %d", self.batch_size)
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                        halved = True
                        break
                    logits_parts.append(logits)
                    feature_parts.append(embeddings)
                    start += batch.shape[0]
                    self.stats.add_images(split, batch.shape[0])
                    if progress is not None:
                        progress(batch.shape[0])
                if not halved:
                    break
        self.stats.add_seconds(split, time.perf_counter() - started)
        n_classes = len(self.classes)
        if not logits_parts:
            return torch.empty(0, n_classes), torch.empty(0, 0)
        return torch.cat(logits_parts), torch.cat(feature_parts)
