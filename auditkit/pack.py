"""The submission pack: one deterministic zip of the evidence, attested and signed, checked offline.

``auditkit pack DIR`` writes every file of an evidence bundle under ``bundle/`` into a zip whose
bytes depend only on the files (names sorted, fixed timestamps, permissions and compression), with
``attestation.json``: an in-toto Statement v1 (https://in-toto.io/Statement/v1) whose subjects are
every other member with its SHA-256 and whose predicate follows in-toto's test-result predicate
(``result``, ``passedTests``, ``warnedTests``, ``failedTests``, ``configuration``) for the policy's
rules, in a DSSE envelope (https://github.com/secure-systems-lab/dsse) signed with Ed25519 when a
key is given (``auditkit keygen``). ``auditkit verify PACK.zip|DIR [--pubkey PUB.pem]`` recomputes
every subject's hash and, with the public key, checks the signature over DSSE's pre-authentication
encoding of the payload - offline, naming the member that changed.

A pack is read without extracting anything: members are read into memory one at a time, after
their names (no absolute path, no ``..``, no drive or backslash) and sizes (per member, in all, and
the compression ratio: a zip bomb) were checked against limits.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from auditkit.bundle import VerifyReport, _bundle_files
from auditkit.cards import data_card, model_card
from auditkit.crosswalk import (
    CONTROL_COLUMNS,
    FRAMEWORKS,
    controls_table,
    crosswalk_table,
    load_crosswalk,
    to_csv,
    to_markdown,
)
from auditkit.errors import InputError
from auditkit.policy import load_framework

__all__ = [
    "ATTESTATION",
    "PAYLOAD_TYPE",
    "PackReport",
    "keygen",
    "pack",
    "pae",
    "verify_pack",
]

ATTESTATION = "attestation.json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://in-toto.io/attestation/test-result/v0.1"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no build time in the bytes
_MAX_MEMBERS = 10_000
_MAX_MEMBER_BYTES = 1 << 30
_MAX_TOTAL_BYTES = 4 << 30
_MAX_RATIO = 200  # uncompressed / compressed, above 1 MiB: a zip bomb
_RESULT = {"PASS": "PASSED", "WARN": "WARNED", "FAIL": "FAILED"}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, lengths as ASCII decimal byte counts.
    """
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


# --------------------------------------------------------------------------------------------
# Keys


def keygen(private_path: Path, public_path: Path | None = None) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM: the private key (PKCS#8, mode 0600) and the public key.

    Raises:
        InputError: either file exists (keys are never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public_path = public_path or private_path.with_suffix(".pub.pem")
    for path in (private_path, public_path):
        if path.exists():
            raise InputError(f"{path}: exists; auditkit keygen never overwrites a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    public_path.write_bytes(public)
    return private_path, public_path


def _key(path: Path, *, private: bool) -> Any:
    """An Ed25519 key from a PEM file (PKCS#8 private, or SubjectPublicKeyInfo public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    what = "an unencrypted PEM private key" if private else "a PEM public key"
    try:
        data = path.read_bytes()
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except FileNotFoundError:
        raise InputError(f"{path}: key file not found") from None
    except (ValueError, TypeError) as error:
        raise InputError(f"{path}: not {what} ({error})") from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        use = "signed with Ed25519 (auditkit keygen)" if private else "verified with Ed25519 keys"
        raise InputError(f"{path}: a {type(key).__name__.lstrip('_')}; packs are {use}")
    return key


def key_id(public_key: Any) -> str:
    """SHA-256 of the raw Ed25519 public key (hex): which key signed."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------------------------
# Writing


def _statement(members: Mapping[str, bytes], results: Mapping[str, Any]) -> dict[str, Any]:
    """The in-toto Statement over ``members``, its predicate the audit's rule outcomes."""
    rules = results.get("rules", [])
    outcome = {
        status: sorted(r["id"] for r in rules if r.get("status") == status) for status in ("pass", "warn", "fail")
    }
    policy = results.get("policy", {})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": name, "digest": {"sha256": hashlib.sha256(data).hexdigest()}}
            for name, data in sorted(members.items())
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "result": _RESULT.get(str(results.get("verdict", "")).upper(), "FAILED"),
            "configuration": [
                {
                    "name": f"policy:{policy.get('name', policy.get('source', 'unknown'))}",
                    "digest": {"sha256": policy.get("sha256", "")},
                }
            ],
            "passedTests": outcome["pass"],
            "warnedTests": outcome["warn"],
            "failedTests": outcome["fail"],
            "notEvaluatedTests": sorted(r["id"] for r in rules if r.get("status") == "not_evaluated"),
            "verdict": results.get("verdict"),
            "runId": results.get("run", {}).get("id"),
        },
    }


def _envelope(payload: bytes, key: Any | None) -> dict[str, Any]:
    signatures = []
    if key is not None:
        signature = key.sign(pae(PAYLOAD_TYPE, payload))
        signatures.append({"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode("ascii")})
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"), "signatures": signatures}


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def pack(bundle: Path, out: Path | None = None, *, key: Path | None = None) -> Path:
    """Write the submission pack of the evidence bundle ``bundle`` (see the module docstring).

    Returns:
        The zip's path (default ``bundle/../<bundle name>-pack.zip``).

    Raises:
        InputError: ``bundle`` is not an evidence bundle (no ``results.json``), or the key is not an
            Ed25519 private key.
    """
    bundle = Path(bundle)
    results_path = bundle / "results.json"
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{bundle}: no results.json; not an auditkit evidence bundle") from None
    except ValueError as error:
        raise InputError(f"{results_path}: not valid JSON ({error})") from None
    signer = _key(key, private=True) if key is not None else None
    members = {f"bundle/{path.relative_to(bundle).as_posix()}": path.read_bytes() for path in _bundle_files(bundle)}
    manifest = bundle / "manifest.json"
    if manifest.is_file():
        members["bundle/manifest.json"] = manifest.read_bytes()
    members["cards/model-card.md"] = model_card(results).encode("utf-8")
    members["cards/data-card.md"] = data_card(results).encode("utf-8")
    for framework in FRAMEWORKS:  # each item: its rules' outcomes, the facts pre-filled, what a person supplies
        rows = crosswalk_table(load_crosswalk(framework), results.get("rules", []))
        members[f"crosswalks/{framework}.md"] = to_markdown(rows).encode("utf-8")
        members[f"crosswalks/{framework}.csv"] = to_csv(rows).encode("utf-8")
    # The AI RMF itself: every subcategory with the status the policy's rules give it.
    core = load_framework(str(results.get("policy", {}).get("framework") or "nist-ai-rmf-1.0"))
    rows = controls_table(core, results)
    members[f"crosswalks/{core.id}.md"] = to_markdown(rows, CONTROL_COLUMNS).encode("utf-8")
    members[f"crosswalks/{core.id}.csv"] = to_csv(rows, CONTROL_COLUMNS).encode("utf-8")
    payload = _canonical(_statement(members, results))
    members[ATTESTATION] = _canonical(_envelope(payload, signer)) + b"\n"
    out = Path(out) if out is not None else bundle.parent / f"{bundle.name}-pack.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever the platform
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[name], compresslevel=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(out)
    return out


# --------------------------------------------------------------------------------------------
# Reading and verifying


@dataclass
class PackReport(VerifyReport):
    """What ``verify_pack`` found: the bundle's comparison (changed, missing, unexpected members)
    and the signature."""

    signed: bool = False
    signature: str = "not checked"
    """``valid``, ``invalid`` (the key named none of the signatures, or they fail), ``absent`` (an
    unsigned pack) or ``not checked`` (signed, no public key given)."""
    verdict: str | None = None

    @property
    def ok(self) -> bool:
        return super().ok and self.signature in ("valid", "not checked", "absent")


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return not (
        not name
        or "\\" in name
        or name.startswith("/")
        or path.is_absolute()
        or any(part in ("..", "") for part in name.rstrip("/").split("/"))
        or (len(name) > 1 and name[1] == ":")
    )


def _read_zip(path: Path) -> dict[str, bytes]:
    """Every member of a pack, in memory, after its name and sizes were checked; nothing extracted."""
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(f"{path}: not a readable zip ({error}); a corrupt or truncated pack") from None
    members: dict[str, bytes] = {}
    with archive:
        infos = archive.infolist()
        if len(infos) > _MAX_MEMBERS:
            raise InputError(f"{path}: {len(infos)} members, more than the {_MAX_MEMBERS} a pack may hold")
        total = 0
        for info in infos:
            if not _safe_name(info.filename):
                raise InputError(f"{path}: member {info.filename!r} has an absolute or parent path; refused")
            if info.is_dir():
                continue
            total += info.file_size
            ratio = info.file_size / max(1, info.compress_size)
            if (
                info.file_size > _MAX_MEMBER_BYTES
                or total > _MAX_TOTAL_BYTES
                or (info.file_size > 1 << 20 and ratio > _MAX_RATIO)
            ):
                raise InputError(
                    f"{path}: member {info.filename!r} expands to {info.file_size} bytes (ratio {ratio:.0f});"
                    " refused as a zip bomb"
                )
            if info.filename in members:
                raise InputError(f"{path}: member {info.filename!r} appears twice")
            try:
                with archive.open(info) as handle:
                    data = handle.read(_MAX_MEMBER_BYTES + 1)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
                raise InputError(f"{path}: member {info.filename!r} is unreadable ({error})") from None
            if len(data) != info.file_size:
                raise InputError(f"{path}: member {info.filename!r} is not the size its header says")
            members[info.filename] = data
    return members


def _read_dir(folder: Path) -> dict[str, bytes]:
    """Every regular file of an unpacked pack (symlinks refused: they could point anywhere)."""
    members: dict[str, bytes] = {}
    for item in sorted(folder.rglob("*")):
        if item.is_symlink():
            raise InputError(f"{item}: a symbolic link in the pack folder; refused")
        if item.is_file():
            members[item.relative_to(folder).as_posix()] = item.read_bytes()
    return members


def _envelope_of(members: Mapping[str, bytes], where: Path) -> tuple[dict[str, Any], bytes]:
    data = members.get(ATTESTATION)
    if data is None:
        raise InputError(f"{where}: no {ATTESTATION}; not an auditkit submission pack")
    try:
        envelope = json.loads(data)
        payload = base64.b64decode(envelope["payload"], validate=True)
        statement = json.loads(payload)
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{where}/{ATTESTATION}: not a DSSE envelope of JSON ({error})") from None
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise InputError(
            f"{where}/{ATTESTATION}: payloadType {envelope.get('payloadType')!r}, expected {PAYLOAD_TYPE!r}"
        )
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise InputError(f"{where}/{ATTESTATION}: the payload is not an in-toto Statement v1")
    return envelope, payload


def verify_pack(target: Path, pubkey: Path | None = None) -> PackReport:
    """Check a pack (a zip, or the folder it was unpacked to): every subject's hash, nothing else
    in it, and with ``pubkey`` the signature.

    Raises:
        InputError: not a pack, a member refused (path, size), or a key that is not Ed25519.
    """
    target = Path(target)
    members = _read_dir(target) if target.is_dir() else _read_zip(target)
    envelope, payload = _envelope_of(members, target)
    statement = json.loads(payload)
    report = PackReport(signed=bool(envelope.get("signatures")))
    report.verdict = statement.get("predicate", {}).get("verdict")
    listed: set[str] = set()
    for subject in statement.get("subject", []):
        name = str(subject.get("name", ""))
        listed.add(name)
        data = members.get(name)
        if data is None:
            report.missing.append(name)
            continue
        report.checked += 1
        if hashlib.sha256(data).hexdigest() != subject.get("digest", {}).get("sha256"):
            report.changed.append(name)
    report.unexpected = sorted(set(members) - listed - {ATTESTATION})
    if pubkey is not None:
        key = _key(pubkey, private=False)
        wanted = key_id(key)
        report.signature = "invalid"
        for signature in envelope.get("signatures", []):
            if signature.get("keyid") not in (wanted, None, ""):
                continue
            try:
                key.verify(base64.b64decode(signature.get("sig", ""), validate=True), pae(PAYLOAD_TYPE, payload))
            except Exception:  # InvalidSignature, or a signature that is not base64
                continue
            report.signature = "valid"
            break
    elif not report.signed:
        report.signature = "absent"
    return report
