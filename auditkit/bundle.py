"""The evidence bundle: writing it (:func:`write_bundle`), its hash manifest and ``auditkit verify``
(docs/architecture.md, "The results document").

``manifest.json`` records the SHA-256 of every input (spec, weights, data manifest, policy,
attestations) and of every file the run wrote (results, report, artifacts, checkpoints), with the
environment. ``verify`` recomputes the output hashes and names every file that changed, vanished
or appeared.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditkit.errors import InputError
from auditkit.export import write_csv_exports
from auditkit.jsonio import sha256_file, sha256_path, write_json_atomic
from auditkit.results import write_results

if TYPE_CHECKING:
    from auditkit.spec import AuditSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "auditkit.manifest/v1"


def _bundle_files(out_dir: Path) -> list[Path]:
    """Every regular file of the bundle except the manifest itself and temporary files."""
    files = []
    for path in sorted(out_dir.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        relative = path.relative_to(out_dir)
        if relative.as_posix() == MANIFEST or any(part.startswith(".") for part in relative.parts):
            continue
        files.append(path)
    return files


def _entry(path: Path, name: str, role: str | None = None) -> dict[str, Any]:
    if path.is_dir():  # a MONAI bundle: one digest over its files' paths and hashes
        files = [p for p in path.rglob("*") if p.is_file()]
        entry: dict[str, Any] = {
            "path": name,
            "sha256": sha256_path(path),
            "bytes": sum(p.stat().st_size for p in files),
            "files": len(files),
        }
        if role is not None:
            entry["role"] = role
        return entry
    entry = {
        "path": name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    if role is not None:
        entry["role"] = role
    return entry


def write_manifest(
    out_dir: Path,
    *,
    inputs: dict[str, Path | None],
    environment: dict[str, Any],
    extra_inputs: dict[str, tuple[str, str]] | None = None,
    previous_inputs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Hash inputs and outputs into ``out_dir/manifest.json`` (written atomically).

    Args:
        out_dir: the bundle folder.
        inputs: role -> file (``None`` when the role has no file).
        environment: versions and devices (from ``results.json``).
        extra_inputs: role -> (name, sha256) for inputs that are not files (a packaged policy).
        previous_inputs: input entries kept from an earlier manifest (``auditkit report`` re-renders
            without the inputs at hand).
    """

    entries = [
        _entry(path, path.name, role)
        for role, path in inputs.items()
        if path is not None and (path.is_file() or (role == "weights" and path.is_dir()))
    ]
    for role, (name, digest) in (extra_inputs or {}).items():
        entries.append({"path": name, "sha256": digest, "role": role})
    known = {entry["role"] for entry in entries}
    entries += [entry for entry in previous_inputs or [] if entry.get("role") not in known]
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hash": "sha256",
        "inputs": entries,
        "outputs": [_entry(p, p.relative_to(out_dir).as_posix()) for p in _bundle_files(out_dir)],
        "environment": environment,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


@dataclass
class VerifyReport:
    checked: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.unexpected)


def verify_bundle(out_dir: Path) -> VerifyReport:
    """Recompute every output hash listed in ``manifest.json``."""
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{out_dir}: no {MANIFEST}; not an auditkit evidence bundle") from None
    except ValueError as error:
        raise InputError(f"{path}: not valid JSON ({error}); the manifest itself was altered") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise InputError(f"{path}: expected schema {MANIFEST_SCHEMA!r}")
    report = VerifyReport()
    listed = set()
    for entry in manifest.get("outputs", []):
        name = entry["path"]
        listed.add(name)
        target = out_dir / name
        if not target.resolve().is_relative_to(out_dir.resolve()):
            report.changed.append(name)
            continue
        if not target.is_file():
            report.missing.append(name)
            continue
        report.checked += 1
        if sha256_file(target) != entry["sha256"]:
            report.changed.append(name)
    for extra in _bundle_files(out_dir):
        name = extra.relative_to(out_dir).as_posix()
        if name not in listed:
            report.unexpected.append(name)
    return report


def write_bundle(
    out_dir: Path,
    results: dict[str, Any],
    *,
    spec: AuditSpec | None,
    report: bool = True,
    pdf: bool = True,
) -> None:
    """results.json, the CSV exports, then report.html/report.pdf, then manifest.json over all of them."""
    write_results(out_dir, results)
    write_csv_exports(out_dir, results)
    if report:
        from auditkit.reports.render import write_report

        write_report(out_dir, results, pdf=pdf)
    inputs: dict[str, Path | None] = {}
    if spec is not None:
        inputs = {
            "spec": spec.source_file,
            "weights": spec.weights_path,
            "data_manifest": spec.manifest_path,
            "attestations": spec.attestations_path,
        }
        policy_path = spec.resolve(Path(spec.policy))
        if policy_path.is_file():
            inputs["policy"] = policy_path
    previous: list[dict[str, Any]] = []
    if spec is None and (out_dir / "manifest.json").is_file():
        import json

        try:
            previous = list(json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))["inputs"])
        except (ValueError, KeyError, TypeError):
            log.warning("manifest.json unreadable; its input hashes are not carried over")
    extra = {}
    policy = results.get("policy") or {}
    if policy.get("sha256") and "policy" not in inputs:
        extra["policy"] = (f"{policy.get('name')} (packaged)", policy["sha256"])
    write_manifest(
        out_dir,
        inputs=inputs,
        environment=results.get("environment", {}),
        extra_inputs=extra,
        previous_inputs=previous,
    )
