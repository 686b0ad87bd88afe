"""``results.json``: the one document every reader of an audit uses (docs/architecture.md,
"The results document").

This module owns it: the schema version (:data:`SCHEMA`, written here and nowhere else), the
sections the runner fills (:func:`model_section`, :func:`data_section`, :func:`run_section`,
:func:`assemble`), writing (:func:`write_results`) and loading with validation
(:func:`load_results`). The report, ``auditkit compare``, the pytest plugin, ``auditkit report``
and the exports read it through :func:`load_results`; nothing else parses the file.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditkit.errors import InputError
from auditkit.jsonio import write_json_atomic

if TYPE_CHECKING:
    from auditkit.data import Dataset
    from auditkit.model import ModelAdapter
    from auditkit.preflight import PreflightReport
    from auditkit.spec import AuditSpec

__all__ = [
    "FILENAME",
    "SCHEMA",
    "assemble",
    "data_section",
    "load_results",
    "model_section",
    "results_path",
    "run_section",
    "validate_results",
    "write_results",
]

SCHEMA = "auditkit.results/v1"
"""The schema version of ``results.json``; a reader refuses any other."""

FILENAME = "results.json"

_REQUIRED = ("checks", "rules", "verdict")
"""What every reader needs; the other sections are read where present."""


def results_path(location: Path) -> Path:
    """``location`` itself when it is a file, else ``location/results.json``."""
    return location if location.is_file() else location / FILENAME


def validate_results(data: Any, source: Path | str) -> dict[str, Any]:
    """``data`` when it is an ``auditkit.results/v1`` document; :class:`InputError` naming what is wrong."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a JSON object with schema {SCHEMA!r}, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise InputError(f"{source}: expected schema {SCHEMA!r}, got {data.get('schema')!r}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise InputError(f"{source}: an {SCHEMA} document without {', '.join(missing)}")
    if not isinstance(data["checks"], list) or not all(isinstance(c, dict) and "id" in c for c in data["checks"]):
        raise InputError(f"{source}: 'checks' must be a list of check records with an 'id'")
    return data


def load_results(location: Path) -> dict[str, Any]:
    """Read and validate ``results.json`` from an audit's output folder (or the file itself).

    Raises:
        InputError: no such file, not JSON, or not an ``auditkit.results/v1`` document; the
            message names the path and what was expected.
    """
    path = results_path(location)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no {FILENAME} in {location} (pass an auditkit output folder)") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise InputError(f"{path}: not valid JSON: {error}") from None
    return validate_results(data, path)


def write_results(out_dir: Path, results: Mapping[str, Any]) -> Path:
    """Write ``out_dir/results.json`` atomically (a reader sees the old file or the new one)."""
    path = out_dir / FILENAME
    write_json_atomic(path, results)
    return path


def environment() -> dict[str, Any]:
    """Python, platform, devices, and the versions of the libraries the measurements depend on."""
    import os

    import numpy
    import pydicom
    import torch

    from auditkit import __version__

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "numpy": numpy.__version__,
        "pydicom": pydicom.__version__,
        "auditkit": __version__,
        "packages": _package_versions(),
    }


def _package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torchvision", "scipy", "scikit-learn", "netcal", "fairlearn", "torchattacks", "pillow",
             "safetensors", "pydantic", "matplotlib", "weasyprint", "jinja2", "monai")  # fmt: skip
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def model_section(
    spec: AuditSpec,
    model: ModelAdapter,
    preflight: PreflightReport,
    weights_sha256: str | None,
    *,
    reference: ModelAdapter | None = None,
) -> dict[str, Any]:
    """What was audited: the model's identity, its input pipeline and the preflight; with
    ``model.reference``, the reference's identity and the images its pass forwarded."""
    m = spec.model
    reference_section = None
    if m.reference is not None and reference is not None:
        from auditkit.jsonio import sha256_file

        weights = spec.resolve(m.reference.weights) if m.reference.weights is not None else None
        reference_section = {
            "factory": m.reference.factory,
            "factory_kwargs": m.reference.factory_kwargs,
            "weights": m.reference.weights.name if m.reference.weights else None,
            "weights_sha256": sha256_file(weights) if weights is not None and weights.is_file() else None,
            "n_parameters": reference.num_parameters,
            "images_forwarded": reference.stats.images_forwarded,
            "images_forwarded_per_split": dict(reference.stats.per_split),
        }
    return {
        "task": m.task,
        "format": m.resolved_format,
        "artefact": model.artefact,
        "factory": m.factory,
        "factory_kwargs": m.factory_kwargs,
        "weights": m.weights.name if m.weights else None,
        "weights_sha256": weights_sha256,
        "classes": m.classes,
        "output_names": m.output_names,
        "positive_class": m.classes[m.positive_index] if m.positive_index is not None else None,
        "operating_point": m.operating_point,
        "claims": m.claims,
        "units": {c: u for c in m.classes if (u := m.unit_of(c)) is not None} if m.task == "regression" else None,
        "input": m.input.model_dump(),
        "normalize": m.normalize.model_dump() if m.normalize else None,
        "sliding_window": model.sliding_window,
        "feature_layer": model.feature_layer,
        "trust_code": m.trust_code,
        "n_parameters": model.num_parameters,
        "preflight": preflight.to_json(),
        "reference": reference_section,
        "intended_use": spec.intended_use.model_dump() if spec.intended_use is not None else None,
    }


def _label_counts(labels: Any, task: str, classes: Sequence[str]) -> dict[str, Any]:
    """Images per class; multilabel: positives, negatives and unknown entries per label;
    regression: the targets' count, mean and standard deviation per output (no single value: a
    minimum or maximum would be one patient's)."""
    import numpy as np

    if task == "multilabel":
        return {
            c: {
                "positive": int((labels[:, k] == 1).sum()),
                "negative": int((labels[:, k] == 0).sum()),
                "unknown": int((labels[:, k] == -1).sum()),
            }
            for k, c in enumerate(classes)
        }
    if task == "segmentation":  # images holding each class, and its share of the pixels
        present = {c: int((labels == i).reshape(labels.shape[0], -1).any(axis=1).sum()) for i, c in enumerate(classes)}
        share = {c: round(float((labels == i).mean()), 6) if labels.size else None for i, c in enumerate(classes)}
        return {c: {"images": present[c], "pixel_share": share[c]} for c in classes}
    if task == "regression":
        out: dict[str, Any] = {}
        for k, c in enumerate(classes):
            column = labels[:, k][np.isfinite(labels[:, k])]
            out[c] = (
                {"n": int(column.size), "mean": float(column.mean()), "sd": float(column.std())}
                if column.size
                else {"n": 0}
            )
        return out
    return {c: int((labels == i).sum()) for i, c in enumerate(classes)}


def _split_summary(dataset: Dataset, spec: AuditSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    quarantined: dict[str, int] = {}
    for entry in dataset.quarantine:
        quarantined[entry.split] = quarantined.get(entry.split, 0) + 1
    for name, split in dataset.splits.items():
        counts = _label_counts(split.labels, spec.model.task, spec.model.classes)
        groups = {
            col: {str(g): int((values == g).sum()) for g in sorted(set(values.tolist()))}
            for col, values in split.groups.items()
        }
        out[name] = {
            "manifest": split.manifest.name,
            "split_value": {"eval": spec.data.splits.eval, "train": spec.data.splits.train}.get(name),
            "n_images": split.n,
            "n_quarantined": quarantined.get(name, 0),
            "n_patients": len({p for p in split.patients if p is not None}),
            "class_counts": counts if not name.startswith("ood:") else None,
            "group_counts": groups,
            "quarantined_by_group": split.quarantined_groups,
            # acquisition facts for a data card: devices by count, the StudyDate range by month only
            "devices": dict(split.devices),
            "study_months": list(split.study_months) if split.study_months is not None else None,
        }
        if split.spacing is not None and split.spacing.shape[1] == 3:
            out[name]["volumes"] = _volume_summary(split.kinds, split.spacing)
    return out


def _volume_summary(kinds: Sequence[str], spacing: Any) -> dict[str, Any]:
    """A 3-D split's file kinds and the voxel sizes of its model-input grids (mm; min, median,
    max per axis ``(z, y, x)``): the physical scale every distance in millimetres rests on."""
    import numpy as np

    summary: dict[str, Any] = {"kinds": {k: kinds.count(k) for k in sorted(set(kinds))}}
    if spacing.size:
        summary["spacing_mm"] = {
            "axes": ["z", "y", "x"],
            "min": [round(float(v), 6) for v in spacing.min(axis=0)],
            "median": [round(float(v), 6) for v in np.median(spacing, axis=0)],
            "max": [round(float(v), 6) for v in spacing.max(axis=0)],
        }
    return summary


def data_section(
    spec: AuditSpec, dataset: Dataset, coverage: Mapping[str, Mapping[str, Any]], manifest_sha256: str | None
) -> dict[str, Any]:
    """What was read: the manifest, groups, per-split counts, coverage and the quarantine list."""
    return {
        "manifest": spec.manifest_path.name,
        "manifest_sha256": manifest_sha256,
        "groups": {k: v.model_dump() for k, v in spec.data.groups.items()},
        "dicom_window": spec.data.dicom.window,
        "splits": _split_summary(dataset, spec),
        "coverage": {name: {k: v for k, v in c.items() if k != "first_rows"} for name, c in coverage.items()},
        "quarantine": [q.to_json() for q in dataset.quarantine],
    }


def run_section(
    *,
    run_id: str,
    started_at: str,
    finished_at: str,
    duration_s: float,
    version: str,
    command: Sequence[str],
    seed: int,
    model: ModelAdapter,
    images_decoded: int,
    resumed: Sequence[str],
    decode_s: float | None = None,
    selection: Mapping[str, Any],
    peak_rss_mib: float | None = None,
    executor: Mapping[str, Any] | None = None,
    pixels: Mapping[str, Any] | None = None,
    frameworks: Sequence[str] = (),
) -> dict[str, Any]:
    """How the audit ran: times, command, seed, peak memory, the shared pass's settings and
    statistics, and the crosswalks the report answers."""
    stats = model.stats
    return {
        "id": run_id,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_s": duration_s,
        "auditkit_version": version,
        "command": list(command),
        "seed": seed,
        "device": str(model.device),
        # Where the decode and the shared pass ran (auditkit.executors); checks run in-process.
        "executor": dict(executor) if executor is not None else {"kind": "local"},
        # Where the decoded images were held: memory, or a file read back by rows (auditkit.pixels).
        "pixels": dict(pixels) if pixels is not None else {"place": "memory"},
        # The shared pass's settings; attacks and other gradient work always run in fp32.
        "precision": stats.precision,
        "precision_parity": stats.parity,
        "precision_fallback": stats.precision_fallback,
        "channels_last": stats.channels_last,
        "loader_workers": stats.workers,
        "pin_memory": stats.pin_memory,
        "batch_size": stats.batch_size,
        "batch_halvings": stats.batch_halvings,
        "forward_calls": stats.forward_calls,
        "images_forwarded": stats.images_forwarded,
        "images_forwarded_per_split": stats.per_split,
        # Every forward pass through the adapter: the shared one, built-in OOD sets, corruptions.
        "inference_s": round(stats.seconds, 4),
        "inference_s_per_split": {k: round(v, 4) for k, v in stats.seconds_per_split.items()},
        "images_decoded": images_decoded,
        "decode_s": None if decode_s is None else round(decode_s, 3),  # manifests read, images decoded
        # Resident set size's peak during the audit (VmHWM, reset at its start where Linux allows).
        "peak_rss_mib": None if peak_rss_mib is None else round(peak_rss_mib, 1),
        "resumed_checks": list(resumed),
        "selection": dict(selection),
        # The spec's `frameworks:`: crosswalks the report answers beside the NIST AI RMF.
        "frameworks": list(frameworks),
    }


def reset_peak_rss() -> bool:
    """Start a new peak of this process's resident set size (Linux: ``/proc/self/clear_refs``,
    value 5); ``False`` where the kernel does not allow it (the peak is then the process's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float | None:
    """This process's peak resident set size in MiB since :func:`reset_peak_rss` (``VmHWM``), else
    since it started (``ru_maxrss``); ``None`` where neither can be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def assemble(
    *,
    run: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    checks: list[dict[str, Any]],
    judged: Mapping[str, Any],
    policy_source: str,
    policy_sha256: str,
) -> dict[str, Any]:
    """The document, its sections in their fixed order."""
    return {
        "schema": SCHEMA,
        "run": run,
        "environment": environment(),
        "model": model,
        "data": data,
        "checks": checks,
        "policy": {**judged["policy"], "source": policy_source, "sha256": policy_sha256},
        "rules": judged["rules"],
        "controls": judged["controls"],
        "verdict": judged["verdict"],
    }
