"""The submission pack: deterministic bytes, hashes and a DSSE signature checked offline, hostile zips refused."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from auditkit.cli import main
from auditkit.errors import InputError
from auditkit.pack import ATTESTATION, PAYLOAD_TYPE, keygen, pack, verify_pack

ESCAPING_NAMES = ["../evil.txt", "/etc/evil.txt", "bundle/../../evil.txt", "C:/evil.txt", "bundle\\evil.txt"]
HOSTILE_PACKS = [
    *(f"member named {name!r}" for name in ESCAPING_NAMES),
    "a truncated zip",
    "bytes that are not a zip",
    "a zip bomb (32 MiB of zeros in one member)",
    "an envelope with another payloadType",
    "a pack without attestation.json",
    "a forged verdict under the old signature",
    "a pack verified with another key",
    "an EC private key given to pack",
    "an EC public key given to verify",
    "a key file that is not PEM",
]
"""The hostile packs and keys the tests below try (counted in docs/hardening.md)."""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real evidence bundle: the demo study audited by one check, without the PDF."""
    from auditkit.demo import prepare_demo

    root = tmp_path_factory.mktemp("pack")
    spec = prepare_demo(root / "demo", n_patients=12, image_size=64)
    out = root / "audit"
    assert main(["run", str(spec), "--only", "performance,calibration", "--no-pdf", "-q", "--out", str(out)]) in (0, 1)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    return keygen(root / "signer.pem")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _rewrite(path: Path, members: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for info, data in extra:
            archive.writestr(info, data)


def test_packing_twice_gives_the_same_bytes_and_verifies(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    first = pack(bundle, tmp_path / "a.zip", key=keys[0])
    second = pack(bundle, tmp_path / "b.zip", key=keys[0])
    assert first.read_bytes() == second.read_bytes()  # Ed25519 is deterministic, the zip too
    members = _members(first)
    assert "bundle/results.json" in members and "bundle/manifest.json" in members and ATTESTATION in members
    report = verify_pack(first, keys[1])
    assert report.ok and report.signature == "valid" and report.checked == len(members) - 1
    assert report.verdict in ("pass", "fail")
    with zipfile.ZipFile(first) as archive:  # fixed metadata: no build time, no platform
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert archive.namelist() == sorted(archive.namelist())


def test_one_changed_byte_in_any_member_is_named(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    packed = pack(bundle, tmp_path / "p.zip", key=keys[0])
    members = _members(packed)
    for name in [n for n in members if n != ATTESTATION]:
        altered = dict(members)
        data = bytearray(altered[name])
        data[len(data) // 2] ^= 0x01
        altered[name] = bytes(data)
        target = tmp_path / "altered.zip"
        _rewrite(target, altered)
        report = verify_pack(target, keys[1])
        assert not report.ok and report.changed == [name], name
        assert report.signature == "valid"  # the attestation itself is intact: it names the change


def test_an_added_or_removed_member_is_named(bundle: Path, tmp_path: Path) -> None:
    members = _members(pack(bundle, tmp_path / "p.zip"))
    _rewrite(tmp_path / "added.zip", {**members, "bundle/extra.txt": b"x"})
    assert verify_pack(tmp_path / "added.zip").unexpected == ["bundle/extra.txt"]
    removed = {k: v for k, v in members.items() if k != "bundle/results.json"}
    _rewrite(tmp_path / "removed.zip", removed)
    assert verify_pack(tmp_path / "removed.zip").missing == ["bundle/results.json"]


def test_another_key_or_an_edited_statement_fails_the_signature(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    packed = pack(bundle, tmp_path / "p.zip", key=keys[0])
    _, other = keygen(tmp_path / "other.pem")
    report = verify_pack(packed, other)
    assert not report.ok and report.signature == "invalid"
    members = _members(packed)
    envelope = json.loads(members[ATTESTATION])
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["verdict"] = "pass"  # a forged verdict, the signature left as it was
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    _rewrite(tmp_path / "forged.zip", {**members, ATTESTATION: json.dumps(envelope).encode()})
    assert verify_pack(tmp_path / "forged.zip", keys[1]).signature == "invalid"


def test_the_signature_verifies_with_an_independent_pae(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    envelope = json.loads(_members(pack(bundle, tmp_path / "p.zip", key=keys[0]))[ATTESTATION])
    payload = base64.b64decode(envelope["payload"])
    kind = envelope["payloadType"].encode()
    # DSSE's specification, written out here rather than imported from auditkit
    message = b"DSSEv1 " + str(len(kind)).encode() + b" " + kind + b" " + str(len(payload)).encode() + b" " + payload
    public = load_pem_public_key(keys[1].read_bytes())
    public.verify(base64.b64decode(envelope["signatures"][0]["sig"]), message)  # type: ignore[union-attr,call-arg]
    assert envelope["payloadType"] == PAYLOAD_TYPE == "application/vnd.in-toto+json"
    statement = json.loads(payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://in-toto.io/attestation/test-result/v0.1"
    assert statement["predicate"]["result"] in ("PASSED", "WARNED", "FAILED")
    results = json.loads((bundle / "results.json").read_bytes())
    failed = sorted(r["id"] for r in results["rules"] if r["status"] == "fail")
    assert statement["predicate"]["failedTests"] == failed
    digests = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert digests["bundle/results.json"] == hashlib.sha256((bundle / "results.json").read_bytes()).hexdigest()


def test_an_unsigned_pack_verifies_its_hashes_and_says_it_is_unsigned(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    packed = pack(bundle, tmp_path / "u.zip")
    assert verify_pack(packed).signature == "absent" and verify_pack(packed).ok
    assert verify_pack(packed, keys[1]).signature == "invalid"  # a key was asked for, none signed


def test_an_unpacked_folder_verifies_too(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    packed = pack(bundle, tmp_path / "p.zip", key=keys[0])
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(packed) as archive:
        archive.extractall(folder)
    assert verify_pack(folder, keys[1]).ok
    (folder / "bundle" / "results.json").write_bytes(b"{}")
    assert verify_pack(folder, keys[1]).changed == ["bundle/results.json"]


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_a_member_escaping_the_pack_is_refused(bundle: Path, tmp_path: Path, name: str) -> None:
    members = _members(pack(bundle, tmp_path / "p.zip"))
    target = tmp_path / "hostile.zip"
    _rewrite(target, members, [(name, b"x")])
    with pytest.raises(InputError, match="absolute or parent path; refused"):
        verify_pack(target)
    assert not (tmp_path / "evil.txt").exists()


def test_corrupt_truncated_and_bomb_zips_are_refused(bundle: Path, tmp_path: Path) -> None:
    packed = pack(bundle, tmp_path / "p.zip")
    data = packed.read_bytes()
    (tmp_path / "truncated.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated pack"):
        verify_pack(tmp_path / "truncated.zip")
    (tmp_path / "noise.zip").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="not a readable zip"):
        verify_pack(tmp_path / "noise.zip")
    bomb = tmp_path / "bomb.zip"
    _rewrite(bomb, _members(packed), [("bundle/zeros.bin", bytes(32 << 20))])
    with pytest.raises(InputError, match="zip bomb"):
        verify_pack(bomb)


def test_a_wrong_payload_type_or_a_missing_attestation_is_refused(bundle: Path, tmp_path: Path) -> None:
    members = _members(pack(bundle, tmp_path / "p.zip"))
    envelope = json.loads(members[ATTESTATION])
    envelope["payloadType"] = "text/plain"
    _rewrite(tmp_path / "type.zip", {**members, ATTESTATION: json.dumps(envelope).encode()})
    with pytest.raises(InputError, match=r"payloadType 'text/plain', expected 'application/vnd\.in-toto\+json'"):
        verify_pack(tmp_path / "type.zip")
    _rewrite(tmp_path / "none.zip", {k: v for k, v in members.items() if k != ATTESTATION})
    with pytest.raises(InputError, match=r"no attestation\.json; not an auditkit submission pack"):
        verify_pack(tmp_path / "none.zip")


def test_a_key_that_is_not_ed25519_is_refused(bundle: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / "ec.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = tmp_path / "ec.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InputError, match="packs are signed with Ed25519"):
        pack(bundle, tmp_path / "p.zip", key=private)
    packed = pack(bundle, tmp_path / "p.zip")
    with pytest.raises(InputError, match="packs are verified with Ed25519 keys"):
        verify_pack(packed, public)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(InputError, match="not an unencrypted PEM private key"):
        pack(bundle, tmp_path / "p.zip", key=tmp_path / "junk.pem")


def test_the_cli_keygen_pack_verify_round_trip(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.pem"
    assert main(["keygen", "--key", str(key)]) == 0
    assert (key.stat().st_mode & 0o777) == 0o600 and (tmp_path / "k.pub.pem").is_file()
    assert main(["keygen", "--key", str(key)]) == 2  # never overwritten
    out = tmp_path / "pack.zip"
    assert main(["pack", str(bundle), "--key", str(key), "--out", str(out)]) == 0
    assert main(["verify", str(out), "--pubkey", str(tmp_path / "k.pub.pem")]) == 0
    assert "signature valid" in capsys.readouterr().out
    members = _members(out)
    members["bundle/results.json"] = members["bundle/results.json"] + b" "
    _rewrite(out, members)
    assert main(["verify", str(out), "--pubkey", str(tmp_path / "k.pub.pem")]) == 1
    assert "CHANGED     bundle/results.json" in capsys.readouterr().out
    assert main(["verify", str(bundle), "--pubkey", str(tmp_path / "k.pub.pem")]) == 2  # a bundle has no signature


def test_the_cards_give_counts_devices_and_months_and_no_patient_data(bundle: Path, tmp_path: Path) -> None:

    members = _members(pack(bundle, tmp_path / "p.zip"))
    model = members["cards/model-card.md"].decode()
    data = members["cards/data-card.md"].decode()
    results = json.loads((bundle / "results.json").read_bytes())
    assert results["model"]["weights_sha256"] in model and "to be supplied by the manufacturer" in model
    accuracy = next(m for c in results["checks"] if c["id"] == "performance" for m in c["metrics"])
    assert f"| {accuracy['name']} |" in model and f"{accuracy['value']:.4f}" in model
    eval_split = results["data"]["splits"]["eval"]
    assert eval_split["devices"] and all(
        f"| eval | {device} | {n} |" in data for device, n in eval_split["devices"].items()
    )
    first, last = eval_split["study_months"]
    assert len(first) == 7 and first[4] == "-" and f"| eval | {first} to {last} |" in data  # months, never days
    assert f"| eval | {eval_split['n_images']} | {eval_split['n_patients']} |" in data
    manifest = bundle.parent / "demo" / "study" / "manifest.csv"
    with manifest.open(encoding="utf-8") as handle:
        patients = {row["patient_id"] for row in csv.DictReader(handle) if row.get("patient_id")}
    assert patients and not [p for p in patients if p in model or p in data]


def test_the_crosswalk_tables_are_in_the_pack_with_the_run_s_rule_outcomes(bundle: Path, tmp_path: Path) -> None:
    from auditkit.crosswalk import FRAMEWORKS

    members = _members(pack(bundle, tmp_path / "p.zip"))
    results = json.loads((bundle / "results.json").read_bytes())
    evaluated = {r["id"]: r["status"] for r in results["rules"] if r["status"] in ("pass", "warn", "fail")}
    for framework in FRAMEWORKS:
        table = members[f"crosswalks/{framework}.md"].decode()
        assert f"crosswalks/{framework}.csv" in members
        assert "measured" in table and "to be supplied" in table, framework
    fda = members["crosswalks/fda-ai-dsf-2025-draft.md"].decode()
    assert any(f"{rule} {status}" in fda for rule, status in evaluated.items())
    # The AI RMF itself: one line per subcategory, the audit's control statuses.
    core = members["crosswalks/nist-ai-rmf-1.0.md"].decode().splitlines()
    assert len(core) == 2 + 72
    statuses = {c["id"]: c["status"] for c in results["controls"]}
    rows = list(csv.DictReader(io.StringIO(members["crosswalks/nist-ai-rmf-1.0.csv"].decode())))
    assert {row["id"]: row["status"] for row in rows} == statuses


def test_the_spec_s_intended_use_goes_to_results_and_the_model_card(tmp_path: Path) -> None:
    import yaml

    from auditkit.cards import model_card
    from auditkit.demo import prepare_demo

    spec_path = prepare_demo(tmp_path / "demo", n_patients=8, image_size=64)
    spec = yaml.safe_load(spec_path.read_text())
    spec["intended_use"] = {
        "purpose": "Flag chest CT slices with a nodule for a radiologist's second read.",
        "users": "Thoracic radiologists",
    }
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    assert main(["run", str(spec_path), "--only", "performance", "--no-pdf", "-q", "--out", str(out)]) in (0, 1)
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["intended_use"]["users"] == "Thoracic radiologists"
    card = model_card(results)
    assert "- intended purpose and clinical task: Flag chest CT slices" in card
    assert "- contraindications and known misuses: to be supplied by the manufacturer" in card
    spec["intended_use"] = {"purpose": "", "audience": "x"}
    spec_path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(spec_path), "--only", "performance", "--no-pdf", "-q", "--out", str(out)]) == 2


def test_the_spec_s_frameworks_each_get_a_crosswalk_section_in_the_report(tmp_path: Path) -> None:
    import yaml

    from auditkit.crosswalk import load_crosswalk
    from auditkit.demo import prepare_demo
    from auditkit.reports.render import render_html

    spec_path = prepare_demo(tmp_path / "demo", n_patients=8, image_size=64)
    spec = yaml.safe_load(spec_path.read_text())
    spec["frameworks"] = ["imdrf-gmlp-2025", "nist-ai-rmf-1.0", "eu-ai-act-annex-iv", "imdrf-gmlp-2025"]
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    assert main(["run", str(spec_path), "--only", "leakage", "--no-pdf", "-q", "--out", str(out)]) in (0, 1)
    results = json.loads((out / "results.json").read_text())
    # The AI RMF is always reported, so naming it adds nothing; a repeat counts once.
    assert results["run"]["frameworks"] == ["imdrf-gmlp-2025", "eu-ai-act-annex-iv"]
    html = render_html(results, out)
    assert html.count('id="crosswalk-') == 2
    assert 'href="#crosswalk-eu-ai-act-annex-iv"' in html
    gmlp = html[html.index('id="crosswalk-imdrf-gmlp-2025"') : html.index('id="crosswalk-eu-ai-act-annex-iv"')]
    for item in load_crosswalk("imdrf-gmlp-2025").items:
        assert f">{item.id}<" in gmlp
    # Leakage ran: the item on independent test sets shows its rules' outcomes; another says to be supplied.
    leak = next(r for r in results["rules"] if r["id"] == "LEAK-PATIENT")
    assert "LEAK-PATIENT" in gmlp and leak["status"] in ("pass", "fail")
    assert "measured" in gmlp and "to be supplied" in gmlp
    assert "crosswalk-fda-ai-dsf-2025-draft" not in html

    spec["frameworks"] = ["eu-ai-act-anex-iv"]
    spec_path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(spec_path), "--only", "leakage", "--no-pdf", "-q", "--out", str(out)]) == 2
