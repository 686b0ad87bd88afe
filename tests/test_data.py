"""Manifest validation, banding, surrogates and the decoded splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from auditkit.data import Surrogates, band, band_labels, load_dataset, parse_numeric, read_manifest
from auditkit.errors import InputError
from auditkit.spec import GroupSpec, load_spec


def _manifest(tmp_path: Path, text: str) -> Path:
    (tmp_path / "root").mkdir(exist_ok=True)
    path = tmp_path / "root" / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    return path


def _read(path: Path, **kwargs: object) -> object:
    return read_manifest(path, root=path.parent, classes=["normal", "nodule"], **kwargs)  # type: ignore[arg-type]


def test_valid_manifest_rows(tmp_path: Path) -> None:
    path = _manifest(
        tmp_path,
        "path,label,patient_id,split,sex\na.png,normal,p1,test,F\nb.png,nodule,p2,train,M\n",
    )
    manifest = read_manifest(path, root=path.parent, classes=["normal", "nodule"], group_columns=["sex"])
    assert [r.row for r in manifest.rows] == [0, 1]
    assert [r.label for r in manifest.rows] == [0, 1]
    assert manifest.rows[1].groups == {"sex": "M"}
    assert manifest.rows[0].path == (path.parent / "a.png").resolve()


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "file,label\na.png,normal\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['path'\]; the header has \['file', 'label'\]"):
        _read(path)
    path = _manifest(tmp_path, "path,label\na.png,normal\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['site'\]"):
        _read(path, group_columns=["site"])


def test_unknown_label_names_row_value_and_classes(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "path,label\na.png,normal\nb.png,tumour\n")
    with pytest.raises(InputError) as info:
        _read(path)
    message = str(info.value)
    assert (
        "manifest.csv: row 1 (line 3): column 'label' value 'tumour' is not one of model.classes ['normal', 'nodule']"
        in message
    )


def test_duplicate_paths_name_both_rows(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "path,label\na.png,normal\nb.png,normal\n./a.png,nodule\n")
    with pytest.raises(InputError, match=r"row 2 \(line 4\): column 'path' value './a.png' duplicates row 0"):
        _read(path)


@pytest.mark.parametrize("escape", ["../secret.png", "/etc/passwd", "sub/../../x.png"])
def test_paths_escaping_the_root_are_refused(tmp_path: Path, escape: str) -> None:
    path = _manifest(tmp_path, f"path,label\na.png,normal\n{escape},normal\n")
    with pytest.raises(InputError, match=r"row 1 \(line 3\): column 'path' value .* resolves outside data.root"):
        _read(path)


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "path,label\nlink.png,normal\n")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    (path.parent / "link.png").symlink_to(outside)
    with pytest.raises(InputError, match=r"resolves outside data\.root"):
        _read(path)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = _manifest(tmp_path, "path,label\n,normal\nb.png,cat\nc.png,normal,extra\n")
    with pytest.raises(InputError) as info:
        _read(path)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "row 0 (line 2): column 'path' is empty" in message
    assert "row 1 (line 3): column 'label' value 'cat'" in message
    assert "row 2 (line 4): 3 cells, the header has 2" in message


@pytest.mark.parametrize("n_bad", [19, 20, 21, 200])
def test_the_problem_count_is_the_true_count_and_20_are_shown(tmp_path: Path, n_bad: int) -> None:
    """200 bad rows said '21 problem(s) (stopped after 20)' and then listed 300 lines."""
    rows = "".join(f"img/{i}.png,{'cat' if i % 2 else ''}{'' if i % 3 else ',extra'}\n" for i in range(n_bad))
    path = _manifest(tmp_path, "path,label\n" + rows + "ok.png,normal\n")
    with pytest.raises(InputError) as info:
        _read(path)
    message = str(info.value)
    listed = [line for line in message.splitlines() if line.startswith("  manifest.csv: row")]
    assert f"has {n_bad} problem(s)" in message
    assert len(listed) == min(n_bad, 20)
    assert ("; the first 20:" in message) == (n_bad > 20)


def test_hints_for_other_layouts_and_delimiters(tmp_path: Path) -> None:
    cases = {
        "path;label\na.png;normal\n": "one column that holds semicolons",
        "path\tlabel\na.png\tnormal\n": "one column that holds tabs",
        "path,normal,nodule\na.png,1,0\n": "the layout of a multi-label study",
        "path,mask\na.png,a_mask.png\n": "the layout of a segmentation study",
    }
    for text, hint in cases.items():
        with pytest.raises(InputError, match=hint):
            _read(_manifest(tmp_path, text))
    with pytest.raises(InputError, match=r"labels are class names from model\.classes"):
        _read(_manifest(tmp_path, "path,label\na.png,1\n"))


def test_windows_separators_resolve_when_the_literal_name_does_not_exist(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"png")
    (root / "literal\\b.png").write_bytes(b"png")  # a POSIX name holding a backslash is kept as is
    path = _manifest(tmp_path, "path,label\nimg\\a.png,normal\nliteral\\b.png,nodule\n")
    manifest = read_manifest(path, root=root, classes=["normal", "nodule"])
    assert [r.path for r in manifest.rows] == [(root / "img" / "a.png").resolve(), (root / "literal\\b.png").resolve()]


def test_empty_manifest_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest not found"):
        _read(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="no data rows"):
        _read(_manifest(tmp_path, "path,label\n"))


def test_banding() -> None:
    spec = GroupSpec(bins=[0, 40, 65, 120])
    assert band_labels(spec.bins or []) == ["0-40", "40-65", "65-120"]
    assert band("39.9", spec) == "0-40"
    assert band("40", spec) == "40-65"
    assert band("120", spec) == "65-120"  # the last band includes its upper edge
    assert band("121", spec) == ">120"
    assert band("-1", spec) == "<0"
    assert band("", spec) == "missing"
    assert band("045Y", spec) == "40-65"  # DICOM Age String
    assert band("F", GroupSpec()) == "F"
    with pytest.raises(ValueError, match="expected a number to band"):
        band("old", spec)


def test_parse_numeric_age_strings() -> None:
    assert parse_numeric("006M") == pytest.approx(0.5)
    assert parse_numeric("070Y") == 70
    assert parse_numeric("nan") is None
    assert parse_numeric("x") is None


def test_surrogates_are_stable_and_reveal_nothing() -> None:
    patients = Surrogates("P")
    assert patients("DOE^JOHN") == "P0001"
    assert patients("123-45-6789") == "P0002"
    assert patients(" DOE^JOHN ") == "P0001"
    assert patients("") is None and patients(None) is None
    assert len(patients) == 2


def test_load_dataset_splits_groups_and_surrogates(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    dataset = load_dataset(spec)
    assert set(dataset.splits) == {"eval", "train"}
    evals = dataset.splits["eval"]
    assert evals.n == 16 and dataset.splits["train"].n == 32
    assert evals.images.dtype.is_floating_point and tuple(evals.images.shape[1:]) == (1, 16, 16)
    assert float(evals.images.min()) >= 0.0 and float(evals.images.max()) <= 1.0
    assert set(evals.groups) == {"sex", "age"}
    assert set(evals.groups["age"].tolist()) == {"0-40", "40-65", "65-120"}
    assert all(p is not None and p.startswith("P") for p in evals.patients)
    assert not any("pat" in (p or "") for p in evals.patients)  # raw IDs never kept
    assert list(evals.rows) == list(range(0, 48, 3))
    assert dataset.quarantine == []
    assert dataset.images_decoded == 48


def test_broken_images_are_quarantined_and_the_rest_go_on(tiny_study: Path) -> None:
    data = tiny_study.parent / "data"
    (data / "img" / "000.npy").write_bytes(b"not numpy at all")
    np.save(data / "img" / "003.npy", np.array([object()], dtype=object), allow_pickle=True)
    (data / "img" / "006.npy").unlink()
    dataset = load_dataset(load_spec(tiny_study))
    quarantined = {q.row: q.reason for q in dataset.quarantine}
    assert set(quarantined) == {0, 3, 6}
    assert all(reason for reason in quarantined.values())
    assert all(str(data) not in reason for reason in quarantined.values())
    assert dataset.splits["eval"].n == 13
    assert sum(dataset.splits["eval"].quarantined_groups["sex"].values()) == 3


def test_train_split_without_split_column(tmp_path: Path, tiny_study: Path) -> None:
    manifest = tiny_study.parent / "data" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != 3) for line in lines))
    with pytest.raises(InputError, match=r"data\.splits\.train is 'train' but the manifest has no 'split' column"):
        load_dataset(load_spec(tiny_study))


def test_unknown_eval_split_value(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    spec = spec.model_copy(
        update={
            "data": spec.data.model_copy(update={"splits": spec.data.splits.model_copy(update={"eval": "validation"})})
        }
    )
    with pytest.raises(
        InputError,
        match=r"no rows with split 'validation' \(data.splits.eval\); the split column holds \['test', 'train'\]",
    ):
        load_dataset(spec)


def _tiny_cnn_spec(study: Path, groups: dict[str, dict[str, object]] | None = None) -> Path:
    """Write ``audit.yaml`` for a generated study (test/train splits) and the packaged tiny CNN."""
    import yaml

    data: dict[str, object] = {"root": ".", "manifest": "manifest.csv", "splits": {"eval": "test", "train": "train"}}
    if groups is not None:
        data["groups"] = groups
    spec = {
        "model": {
            "factory": "auditkit.fixtures.models:tiny_cnn",
            "classes": ["normal", "nodule"],
            "input": {"channels": 1, "height": 64, "width": 64},
        },
        "data": data,
    }
    path = study / "audit.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_patient_ids_from_dicom_headers_become_surrogates(tmp_path: Path) -> None:
    """No patient_id column: PatientID is read from each header and kept only as a surrogate."""

    from auditkit.fixtures.synthetic import generate_study

    study = generate_study(tmp_path / "study", n_patients=16, image_size=64, patient_id_in_manifest=False)
    header = study.manifest_path.read_text().splitlines()[0]
    assert "patient_id" not in header
    spec_path = _tiny_cnn_spec(tmp_path / "study", groups={"site": {}, "PatientSex": {}})
    dataset = load_dataset(load_spec(spec_path))
    for name, split_value in (("eval", "test"), ("train", "train")):
        split = dataset.splits[name]
        truth = [r.patient_id for r in study.rows if r.split == split_value]
        assert split.n == len(truth)
        # the same patient maps to the same surrogate, different patients to different ones
        assert len(set(split.patients)) == len(set(truth))
        pairs = set(zip(truth, split.patients, strict=True))
        assert len(pairs) == len(set(truth))
        assert all(p is not None and p.startswith("P") for p in split.patients)
        # a group column missing from the manifest is read from a non-identifying header attribute
        assert set(split.groups["PatientSex"].tolist()) <= {"F", "M"}
    surrogates = {p for s in dataset.splits.values() for p in s.patients}
    assert not any(p.startswith("SYN") for p in surrogates if p)


def test_headers_kept_by_the_decoder_spare_a_second_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keep_headers: each DICOM image's data set comes from the decode pass (no pixel data, no
    file buffer), and the context's header reads use it instead of opening the files again."""
    import pydicom

    import auditkit.decode
    from auditkit.context import AuditContext
    from auditkit.fixtures.synthetic import generate_study
    from auditkit.model import ModelAdapter

    study = generate_study(tmp_path / "study", n_patients=12, image_size=64)
    spec_path = _tiny_cnn_spec(tmp_path / "study")
    broken = sorted((tmp_path / "study").rglob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:300])  # quarantined: its header is not kept
    spec = load_spec(spec_path)
    plain = load_dataset(spec)
    kept = load_dataset(spec, keep_headers=True)
    assert all(split.headers is None for split in plain.splits.values())
    assert len(kept.quarantine) == 1 and kept.images_decoded == plain.images_decoded == len(study.rows)
    keywords = ["PatientID", "SeriesInstanceUID", "Rows", "Manufacturer", "PatientSex"]
    read_back = AuditContext(spec, ModelAdapter(spec, device="cpu"), plain, tmp_path / "a")
    expected = {name: read_back.header_texts(name, keywords) for name in plain.splits}

    def no_second_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a kept header was read from its file again")

    monkeypatch.setattr(auditkit.decode, "read_dicom_header", no_second_read)
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), kept, tmp_path / "b")
    for name, split in kept.splits.items():
        assert split.headers is not None and sorted(split.headers) == list(range(split.n))
        for header in split.headers.values():
            assert isinstance(header, pydicom.Dataset)
            assert "PixelData" not in header and getattr(header, "buffer", None) is None
        assert ctx.header_texts(name, keywords) == expected[name]
        assert all(t is not None and t["PatientID"] for t in expected[name])
        full = ctx.headers(name)  # every element converted, silenced
        assert [str(h.PatientID) for h in full if h is not None] == [t["PatientID"] for t in expected[name] if t]


def test_headers_beyond_the_kept_ones_are_read_again_not_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory bounded by the cap: past HEADERS_KEPT rows the decoder keeps no data set, and the
    context reads those headers from their files at each access, giving the same values."""
    import auditkit.data
    from auditkit.context import AuditContext
    from auditkit.fixtures.synthetic import generate_study
    from auditkit.model import ModelAdapter

    generate_study(tmp_path / "study", n_patients=12, image_size=64)
    spec = load_spec(_tiny_cnn_spec(tmp_path / "study"))
    keywords = ["PatientID", "StudyInstanceUID", "Rows"]
    everything = load_dataset(spec, keep_headers=True)
    monkeypatch.setattr(auditkit.data, "HEADERS_KEPT", 3)
    capped = load_dataset(spec, keep_headers=True)
    full = AuditContext(spec, ModelAdapter(spec, device="cpu"), everything, tmp_path / "a")
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), capped, tmp_path / "b")
    for name, split in capped.splits.items():
        assert split.headers is not None and len(split.headers) <= 3 < split.n
        assert ctx.header_texts(name, keywords) == full.header_texts(name, keywords)
        headers = ctx.headers(name)
        assert len(headers) == split.n
        assert [str(h.StudyInstanceUID) for h in headers if h is not None] == [
            str(h.StudyInstanceUID) for h in full.headers(name) if h is not None
        ]
        assert headers[-1] is not headers[-1]  # read again at each access, never held


def test_map_headers_reads_the_files_by_chunks_through_the_mapper_every_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check's per-file header work (the PHI check's judgement, the texts the leakage check
    reads): the kept headers are used where they are, the other files go to the mapper (Ray
    tasks on Ray) by chunks, each file once, and the results come back in position order, the
    same as reading them one after another."""
    import pickle

    import auditkit.data
    from auditkit.checks.phi import _judged, judge_header
    from auditkit.context import AuditContext
    from auditkit.fixtures.synthetic import generate_study
    from auditkit.model import ModelAdapter

    generate_study(tmp_path / "study", n_patients=12, image_size=64)
    spec = load_spec(_tiny_cnn_spec(tmp_path / "study"))
    monkeypatch.setattr(auditkit.data, "HEADERS_KEPT", 3)
    dataset = load_dataset(spec, keep_headers=True)
    serial = AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, tmp_path / "a")
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, tmp_path / "b")
    sent: list[list[tuple[str, str]]] = []

    def elsewhere(work: Any, chunks: list[list[tuple[str, str]]]) -> list[list[Any]]:
        sent.extend(chunks)
        shipped = pickle.loads(pickle.dumps(work))  # as a Ray task receives it
        return [pickle.loads(pickle.dumps(shipped(chunk))) for chunk in chunks]

    ctx.header_mapper, ctx.header_chunk = elsewhere, 4
    keywords = ["PatientID", "StudyInstanceUID", "Rows"]
    chunked = 0
    for name, split in dataset.splits.items():
        sent.clear()
        verdicts = list(ctx.map_headers(name, _judged))
        assert verdicts == [None if h is None else judge_header(h) for h in serial.headers(name)]
        assert all(v is not None and v.identifiers for v in verdicts)  # the synthetic headers identify
        # The kept headers stayed here; every other file was sent once, by chunks of 4 (one
        # chunk alone is read here: a task's start would cost more than it saves).
        assert split.headers is not None
        others = sorted(str(split.paths[i]) for i in range(split.n) if i not in split.headers)
        read = [path for chunk in sent for path, _ in chunk]
        assert sorted(read) == (others if len(others) > 4 else [])
        assert len(read) == len(set(read)) and all(len(chunk) <= 4 for chunk in sent)
        chunked += len(sent)
        assert ctx.header_texts(name, keywords) == serial.header_texts(name, keywords)
    assert chunked > 1
    # A mapper that loses a chunk is an error naming the split, never a shorter result.
    ctx.header_mapper, ctx.header_chunk = (lambda work, chunks: iter([work(chunk) for chunk in chunks[1:]])), 1
    with pytest.raises(RuntimeError, match=r"eval: header chunk \d+ of \d+ returned no results for 1 files"):
        list(ctx.map_headers("eval", _judged))
    ctx.header_mapper = lambda work, chunks: iter([work(chunk)[:-1] or [None, None] for chunk in chunks])
    with pytest.raises(RuntimeError, match=r"eval: header chunk 1 of \d+ returned 2 results for 1 files"):
        list(ctx.map_headers("eval", _judged))
    # Without a mapper, what a Ray task could not receive is refused too, before any file is read.
    with pytest.raises(TypeError, match=r"cannot be pickled.*module-level function"):
        serial.map_headers("eval", lambda header: header is None)


def test_map_headers_keeps_positions_when_the_kept_headers_are_not_the_first(tmp_path: Path) -> None:
    """Kept headers anywhere in the split: each result still lands at its own position."""
    from auditkit.checks.phi import _judged
    from auditkit.context import AuditContext
    from auditkit.fixtures.synthetic import generate_study
    from auditkit.model import ModelAdapter

    generate_study(tmp_path / "study", n_patients=12, image_size=64)
    spec = load_spec(_tiny_cnn_spec(tmp_path / "study"))
    dataset = load_dataset(spec, keep_headers=True)
    reference = AuditContext(spec, ModelAdapter(spec, device="cpu"), load_dataset(spec), tmp_path / "a")
    split = dataset.splits["train"]
    assert split.headers is not None and split.n > 8
    for position in [p for p in split.headers if p not in (1, 5)]:
        del split.headers[position]  # kept: positions 1 and 5 only
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, tmp_path / "b")
    ctx.header_mapper, ctx.header_chunk = (lambda work, chunks: (work(chunk) for chunk in chunks)), 2
    expected = list(reference.map_headers("train", _judged))
    assert list(ctx.map_headers("train", _judged)) == expected
    ids = reference.header_texts("train", ["SOPInstanceUID"])
    assert ctx.header_texts("train", ["SOPInstanceUID"]) == ids and len({str(t) for t in ids}) == split.n
