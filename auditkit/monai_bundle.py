"""MONAI bundles as the audit's model, read as data.

A MONAI bundle (the Model Zoo's format) is a folder or zip with ``configs/metadata.json``
(``network_data_format``: the inputs' channels, spatial shape, value range and modality, the
outputs' channels and their meaning; ``eval_metrics``: the figures the authors report),
``configs/inference.json`` (or ``.yaml``; ``network_def`` names the network and its arguments)
and ``models/model.pt`` (its weights). A bundle config can name any importable callable and embed
Python expressions (``$...``) that MONAI's ``ConfigParser`` evaluates, so the audit does not hand it
to the parser: ``network_def``'s ``_target_`` must be one of MONAI's own network classes
(``monai.networks.nets``, an allow-list), every argument a literal (no ``$`` expression, no ``@``
reference), and the weights are read with ``torch.load(..., weights_only=True)``. Only with
``model.trust_code: true`` does MONAI's parser instantiate the network (and a TorchScript
``models/model.ts`` load). Entries of a zip are read in memory, never extracted; a path that
leaves the bundle is refused.

The metadata are held against the spec: a channel count that differs is an error naming the spec
field; other differences (spatial shape, output channels' names, value range) are recorded in
``results.json`` (``model.artefact.differences``). ``eval_metrics`` the audit can measure become
performance claims (``model.claims`` in the spec takes precedence), held against the measured
intervals by the packaged PERF-CLAIM rule.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from auditkit.errors import ConfigError, ModelLoadError

__all__ = ["BundleInfo", "allowed_networks", "load_monai_bundle", "read_bundle"]

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 4 * 2**20
MAX_WEIGHTS_BYTES = 4 * 2**30

_CLAIM_KEYS = {
    "mean_dice": "performance.mean_dice",
    "val_mean_dice": "performance.mean_dice",
    "dice": "performance.mean_dice",
    "accuracy": "performance.accuracy",
    "val_accuracy": "performance.accuracy",
    "acc": "performance.accuracy",
    "auc": "performance.auroc",
    "roc_auc": "performance.auroc",
    "val_auc": "performance.auroc",
    "auroc": "performance.auroc",
}
"""``eval_metrics`` keys of Model Zoo bundles and the audit's metric each one claims."""


@dataclass
class BundleInfo:
    """What the bundle declares.

    Attributes:
        name: ``metadata.json``'s ``name`` (or the folder's name).
        version: its ``version``.
        network: the ``_target_`` of ``network_def``.
        data_format: ``network_data_format`` as declared.
        eval_metrics: the numbers of ``eval_metrics``.
        claims: the claims taken from them (audit metric -> value).
        differences: where the metadata disagree with the spec (besides errors).
    """

    name: str
    version: str | None
    network: str
    data_format: dict[str, Any]
    eval_metrics: dict[str, float]
    claims: dict[str, float] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)


class _Source:
    """The bundle's files, from a folder or a zip, by path relative to the bundle's root."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise ModelLoadError(
                    f"model.weights: {path.name} is neither a bundle folder nor a readable zip: {error}"
                ) from None
            names = self._zip.namelist()
            for name in names:
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ModelLoadError(f"model.weights: {path.name} holds {name!r}, a path that leaves the bundle")
            tops = {name.split("/", 1)[0] for name in names if "/" in name}
            if "configs" not in tops and len(tops) == 1:
                self._prefix = tops.pop() + "/"
        elif not path.is_dir():
            raise ModelLoadError(f"model.weights: bundle not found: {path}")

    def _entry(self, relative: str) -> zipfile.ZipInfo | Path | None:
        if self._zip is not None:
            try:
                return self._zip.getinfo(self._prefix + relative)
            except KeyError:
                return None
        target = (self.path / relative).resolve()
        if not target.is_relative_to(self.path.resolve()):
            raise ModelLoadError(f"model.weights: the bundle's {relative} points outside the bundle")
        return target if target.is_file() else None

    def exists(self, relative: str) -> bool:
        return self._entry(relative) is not None

    def read(self, relative: str, limit: int) -> bytes:
        entry = self._entry(relative)
        if entry is None:
            raise ModelLoadError(f"model.weights: the bundle {self.path.name} has no {relative}")
        size = entry.file_size if isinstance(entry, zipfile.ZipInfo) else entry.stat().st_size
        if size > limit:
            raise ModelLoadError(f"model.weights: the bundle's {relative} is {size} bytes; the limit is {limit}")
        if isinstance(entry, zipfile.ZipInfo):
            assert self._zip is not None
            with self._zip.open(entry) as handle:
                data = handle.read(limit + 1)
        else:
            data = entry.read_bytes()
        if len(data) > limit:
            raise ModelLoadError(f"model.weights: the bundle's {relative} exceeds {limit} bytes when read")
        return data


def allowed_networks() -> dict[str, type[nn.Module]]:
    """MONAI's network classes (``monai.networks.nets``): the ``_target_`` values a bundle may name."""
    import inspect

    import monai.networks.nets as nets

    return {
        name: obj
        for name in dir(nets)
        if not name.startswith("_") and inspect.isclass(obj := getattr(nets, name)) and issubclass(obj, nn.Module)
    }


def _literal(value: Any, where: str) -> None:
    """Refuse a MONAI config expression (``$``), reference (``@``) or macro (``%``) anywhere in ``value``."""
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ModelLoadError(
            f"model.weights: the bundle's network_def.{where} is {value[:60]!r}, a MONAI config expression or"
            " reference (evaluated as code by MONAI's parser); the audit builds networks from literal arguments"
            " only (set model.trust_code: true to let MONAI's parser build it)"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _literal(item, f"{where}.{key}")
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _literal(item, f"{where}[{k}]")


def _config(source: _Source, relative: str) -> dict[str, Any]:
    data = source.read(relative, MAX_CONFIG_BYTES)
    try:
        text = data.decode("utf-8")
        parsed = json.loads(text) if relative.endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ModelLoadError(f"model.weights: the bundle's {relative} is not valid: {type(error).__name__}") from None
    if not isinstance(parsed, dict):
        raise ModelLoadError(f"model.weights: the bundle's {relative} is not a mapping")
    return parsed


def _text(value: Any, limit: int = 200) -> str:
    """A metadata string as the audit records it: printable, bounded."""
    return "".join(ch for ch in str(value) if ch.isprintable())[:limit]


def read_bundle(path: Path, *, trust_code: bool = False) -> tuple[BundleInfo, dict[str, Any], _Source]:
    """Read a bundle's metadata and network definition without instantiating or importing anything.

    Returns:
        ``(info, network_def, source)``.

    Raises:
        ModelLoadError: a missing or invalid config, a ``_target_`` outside the allow-list or a
            non-literal argument (without ``trust_code``).
    """
    source = _Source(path)
    metadata = _config(source, "configs/metadata.json")
    inference = next(
        (
            f"configs/inference{suffix}"
            for suffix in (".json", ".yaml", ".yml")
            if source.exists(f"configs/inference{suffix}")
        ),
        None,
    )
    if inference is None:
        raise ModelLoadError(f"model.weights: the bundle {path.name} has no configs/inference.json or .yaml")
    network_def = _config(source, inference).get("network_def")
    if not isinstance(network_def, dict) or not isinstance(network_def.get("_target_"), str):
        raise ModelLoadError(f"model.weights: the bundle's {inference} has no network_def with a _target_")
    target = network_def["_target_"]
    name = target.removeprefix("monai.networks.nets.")
    if not trust_code:
        if name not in allowed_networks():
            raise ModelLoadError(
                f"model.weights: the bundle's network_def names {_text(target, 80)!r}, which is not one of MONAI's"
                " network classes (monai.networks.nets); a bundle config can name any importable callable, so the"
                " audit builds only those (set model.trust_code: true to let MONAI's parser build it)"
            )
        for key, value in network_def.items():
            if key != "_target_":
                _literal(value, key)
    raw_metrics = metadata.get("eval_metrics") or {}
    metrics = (
        {
            _text(k, 60): float(v)
            for k, v in raw_metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if isinstance(raw_metrics, dict)
        else {}
    )
    data_format = metadata.get("network_data_format") if isinstance(metadata.get("network_data_format"), dict) else {}
    info = BundleInfo(
        name=_text(metadata.get("name") or path.stem, 120),
        version=_text(metadata["version"], 40) if "version" in metadata else None,
        network=_text(target, 120),
        data_format=json.loads(json.dumps(data_format, default=str)),
        eval_metrics=metrics,
    )
    return info, network_def, source


def _compare(info: BundleInfo, channels: int, spatial: tuple[int, ...], classes: list[str], task: str) -> None:
    inputs = info.data_format.get("inputs") or {}
    outputs = info.data_format.get("outputs") or {}
    image: Any = next(iter(inputs.values()), {}) if isinstance(inputs, dict) else {}
    pred: Any = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    declared = image.get("num_channels") if isinstance(image, dict) else None
    if isinstance(declared, int) and declared != channels:
        raise ConfigError(
            f"model.input.channels: the bundle's network_data_format gives the input {declared} channels; the spec"
            f" says {channels}"
        )
    shape = image.get("spatial_shape") if isinstance(image, dict) else None
    if isinstance(shape, list) and all(isinstance(v, int) for v in shape) and tuple(shape) != spatial:
        patch = " (patch data: audit it with model.sliding_window)" if image.get("is_patch_data") else ""
        info.differences.append(f"input spatial_shape {shape} declared; the spec's input is {list(spatial)}{patch}")
    value_range = image.get("value_range") if isinstance(image, dict) else None
    if value_range is not None:
        info.differences.append(
            f"input value_range {_text(value_range, 40)} declared; the audit feeds [0, 1] images through"
            " model.normalize"
        )
    if isinstance(pred, dict):
        count = pred.get("num_channels")
        if isinstance(count, int) and count != len(classes) and task != "regression":
            info.differences.append(f"output num_channels {count} declared; model.classes has {len(classes)}")
        names = pred.get("channel_def")
        if isinstance(names, dict):
            named = [_text(names[k], 40) for k in sorted(names, key=lambda k: int(k) if str(k).isdigit() else 0)]
            if [n.lower() for n in named] != [c.lower() for c in classes]:
                info.differences.append(f"output channel_def {named} declared; model.classes is {classes}")
    modality = image.get("modality") if isinstance(image, dict) else None
    if modality:
        info.differences.append(f"input modality {_text(modality, 40)} declared (recorded, not checked)")


def _claims(info: BundleInfo, task: str, n_classes: int) -> None:
    from auditkit.spec import CLAIMABLE, CLAIMABLE_MULTICLASS

    allowed: tuple[str, ...] = ()
    if task == "segmentation":
        allowed = ("performance.mean_dice",)
    elif task == "classification":
        allowed = CLAIMABLE if n_classes == 2 else CLAIMABLE_MULTICLASS
    for key, value in info.eval_metrics.items():
        metric = _CLAIM_KEYS.get(key.lower())
        if metric is not None and metric in allowed and 0.0 <= value <= 1.0 and metric != "performance.dice":
            info.claims.setdefault(metric, value)


def load_monai_bundle(
    path: Path,
    *,
    channels: int,
    spatial: tuple[int, ...],
    classes: list[str],
    task: str,
    trust_code: bool = False,
) -> tuple[nn.Module, BundleInfo]:
    """Build the bundle's network from the allow-list, load its weights without running code, and
    compare its metadata with the spec.

    Raises:
        ModelLoadError: see :func:`read_bundle`; weights missing, not a plain state_dict, or not
            matching the network.
        ConfigError: the declared input channels differ from ``model.input.channels``.
    """
    from auditkit.model import first_line, read_state_dict

    info, network_def, source = read_bundle(path, trust_code=trust_code)
    _compare(info, channels, spatial, classes, task)
    _claims(info, task, len(classes))
    arguments = {k: v for k, v in network_def.items() if k != "_target_"}
    if trust_code:
        from monai.bundle.config_parser import ConfigParser

        log.warning("building the bundle's network with MONAI's parser (trust_code: true); it may execute code")
        network = ConfigParser({"network_def": network_def}).get_parsed_content("network_def")
    else:
        name = network_def["_target_"].removeprefix("monai.networks.nets.")
        try:
            network = allowed_networks()[name](**arguments)
        except Exception as error:
            raise ModelLoadError(
                f"model.weights: the bundle's network_def ({name}) cannot be built:"
                f" {type(error).__name__}: {first_line(error)}"
            ) from None
    if not isinstance(network, nn.Module):
        raise ModelLoadError(f"model.weights: the bundle's network_def built a {type(network).__name__}, not a module")
    if source.exists("models/model.pt"):
        data = source.read("models/model.pt", MAX_WEIGHTS_BYTES)
        state = read_state_dict(io.BytesIO(data), "the bundle's models/model.pt")
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelLoadError(f"model.weights: the bundle's models/model.pt: {first_line(error)}") from None
    elif source.exists("models/model.ts"):
        if not trust_code:
            raise ModelLoadError(
                "model.weights: the bundle holds only models/model.ts, a TorchScript archive, which can run code"
                " while loading; set model.trust_code: true if you trust its origin"
            )
        network = torch.jit.load(io.BytesIO(source.read("models/model.ts", MAX_WEIGHTS_BYTES)), map_location="cpu")  # type: ignore[no-untyped-call]
    else:
        raise ModelLoadError(f"model.weights: the bundle {path.name} has no models/model.pt")
    return network.eval(), info
