"""Hardening (issue 10): hostile inputs, crashes and leaks, tried and counted.

Every bad input and fault below is tried for real and must end as documented in
``docs/hardening.md``: a file is read or quarantined with a reason (never a crash, never an
unbounded allocation), a model file is refused without running its code, a killed run resumes
without losing or recomputing finished checks, and no planted identifier reaches any output or
log line. The inventories are plain lists so that ``test_inventory_matches_the_documented_counts``
can count them and hold the table in the docs to the truth; run ``python tests/test_hardening.py``
to print the counts.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).parent))  # also importable when run as a script

from test_loaders import PATIENT_ID, PATIENT_NAME, make_dicom

from auditkit.decode import DecodeBudget, decode_image
from auditkit.errors import InputError, ModelLoadError, UnreadableImage


def _load_make_tiny_study() -> Callable[..., Path]:
    # "conftest" in sys.modules may be tests/checks/conftest.py: load tests/conftest.py by path.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_auditkit_tests_conftest", Path(__file__).with_name("conftest.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_study  # type: ignore[no-any-return]


make_tiny_study = _load_make_tiny_study()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "hardening.md"
MiB = 1 << 20
# Peak Python-heap allocation allowed while one hostile file is refused or decoded (tracemalloc).
PEAK_BYTES = 64 * MiB
# What happened to each case tried in this session: "read", "quarantined", "refused", "crash".
TALLY: collections.Counter[str] = collections.Counter()


def _pixels(rows: int = 8, columns: int = 8) -> np.ndarray[Any, Any]:
    return (np.arange(rows * columns, dtype=np.uint16) * 60 % 4096).reshape(rows, columns)


def _meta_end(data: bytes) -> int:
    """Offset of the first byte after the file meta group of a file with a preamble."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return 144 + int.from_bytes(data[140:144], "little")


def _with_transfer_syntax(path: Path, uid: str) -> None:
    """Rewrite the file meta to declare ``uid`` while the data set keeps its explicit-LE bytes."""
    data = path.read_bytes()
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = uid
    out = DicomBytesIO()
    out.write(data[:132])
    write_file_meta_info(out, meta, enforce_standard=True)
    path.write_bytes(out.getvalue() + data[_meta_end(data) :])


def _set_value(path: Path, tag: int, value: bytes, *, length: int | None = None) -> None:
    """Replace the value (and length field) of a short-VR element in an explicit-LE file."""
    data = path.read_bytes()
    key = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    at = data.index(key, _meta_end(data))
    old_length = int.from_bytes(data[at + 6 : at + 8], "little")
    new_length = len(value) if length is None else length
    patched = data[: at + 6] + struct.pack("<H", new_length) + value + data[at + 8 + old_length :]
    path.write_bytes(patched)


def _set_long_length(path: Path, tag: int, length: int) -> None:
    """Set the 4-byte length field of a long-VR element (OB/OW/SQ) without changing its value."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    at = data.index(key, _meta_end(bytes(data)))
    data[at + 8 : at + 12] = struct.pack("<I", length)
    path.write_bytes(bytes(data))


def _edit(path: Path, **attributes: Any) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _deflate_bomb(path: Path, inflated: int = 640 * MiB) -> None:
    """A deflated data set a few hundred kB long whose private OB element inflates to ``inflated``.

    Built from full-flush blocks (each independent of the others), so it costs one 16 MiB
    compression however large the bomb.
    """
    make_dicom(path, _pixels(), transfer_syntax=DeflatedExplicitVRLittleEndian)
    data = path.read_bytes()
    body = Dataset()
    body.PatientName = PATIENT_NAME
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, body)
    header = fp.getvalue() + b"\x09\x00\x10\x00LO\x08\x00auditkit" + b"\x09\x00\x11\x10OB\x00\x00"
    header += struct.pack("<I", inflated)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(16 * MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush()
    path.write_bytes(data[: _meta_end(data)] + head + block * (inflated // (16 * MiB)) + tail)


def _deep_sequences(path: Path, depth: int = 5000) -> None:
    """Sequences nested ``depth`` deep (undefined lengths), appended after the pixel data."""
    make_dicom(path, _pixels())
    opening = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path.write_bytes(path.read_bytes() + opening * depth + closing * depth)


def _missing_decoder(candidates: tuple[str, ...]) -> str | None:
    for uid in candidates:
        if not get_decoder(pydicom.uid.UID(uid)).is_available:
            return uid
    return None


def _jpeg_frame(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 256, 256 // size, dtype=np.uint8)[:size], (size, 1))).save(
        buffer, format="JPEG", quality=90
    )
    return buffer.getvalue()


def _png_bomb(path: Path) -> None:
    """A 100-byte PNG whose header declares 60000 x 60000 pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _npy_lying_shape(path: Path) -> None:
    with path.open("wb") as out:
        header = {"descr": "<f8", "fortran_order": False, "shape": (99999, 99999)}
        np.lib.format.write_array_header_1_0(out, header)
        out.write(bytes(128))


@dataclass(frozen=True)
class Hostile:
    """One crafted file: how to write it, and what must happen (``read`` or a reason fragment)."""

    name: str
    write: Callable[[Path], None]
    expect: str
    suffix: str = ".dcm"
    needs_missing_decoder: tuple[str, ...] = ()


_JPEG_LS = (JPEGLSLossless, JPEGLSNearLossless)
_HTJ2K = (HTJ2KLossless,)

HOSTILE_FILES: list[Hostile] = [
    # sizes declared by the header, checked against the budget before decoding
    Hostile(
        "declared image far larger than the file (65535 x 65535 x 16 bit in 8 bytes)",
        lambda p: (make_dicom(p, _pixels(2, 2)), _edit(p, Rows=65535, Columns=65535)),
        "declared pixel data of 8589672450 bytes",
    ),
    Hostile(
        "declared 1-bit image of 400 megapixels",
        lambda p: (make_dicom(p, _pixels(2, 2)), _edit(p, Rows=20000, Columns=20000, BitsAllocated=1)),
        "declared image of 400000000 pixels exceeds",
    ),
    Hostile("deflate bomb (640 MiB from 0.6 MB)", _deflate_bomb, "inflates beyond the budget"),
    Hostile(
        "corrupt deflate stream",
        lambda p: (
            make_dicom(p, _pixels(), transfer_syntax=DeflatedExplicitVRLittleEndian),
            p.write_bytes(p.read_bytes()[: _meta_end(p.read_bytes())] + b"\xff" * 300),
        ),
        "DICOM decoding failed",
    ),
    # pixel data that disagrees with the header
    Hostile(
        "pixel data shorter than Rows x Columns declare",
        lambda p: make_dicom(p, _pixels(), pixel_bytes=_pixels().tobytes()[:-20]),
        "PixelData holds 108 bytes, fewer than the 128 bytes",
    ),
    Hostile(
        "pixel data of three frames, NumberOfFrames absent",
        lambda p: make_dicom(p, _pixels(), pixel_bytes=_pixels().tobytes() * 3),
        "enough for 3 frames",
    ),
    Hostile(
        "pixel data with 64 trailing padding bytes",
        lambda p: make_dicom(p, _pixels(), pixel_bytes=_pixels().tobytes() + bytes(64)),
        "read",
    ),
    Hostile("empty pixel data", lambda p: make_dicom(p, _pixels(), pixel_bytes=b""), "PixelData is empty"),
    Hostile(
        "pixel data length field 0xFFFFFFF0 at the end of a 400-byte file (the bytes present fit)",
        lambda p: (make_dicom(p, _pixels()), _set_long_length(p, 0x7FE00010, 0xFFFFFFF0)),
        "read",
    ),
    Hostile(
        "no pixel data element",
        lambda p: (make_dicom(p, _pixels()), _edit(p, PixelData=None)),
        "no pixel data",
    ),
    # multi-frame where one frame is expected
    Hostile(
        "multi-frame image (3 frames)",
        lambda p: make_dicom(p, _pixels(), pixel_bytes=_pixels().tobytes() * 3, NumberOfFrames=3),
        "multi-frame image with 3 frames (a volume or cine loop)",
    ),
    Hostile(
        "NumberOfFrames 100000 with one frame of data",
        lambda p: make_dicom(p, _pixels(), NumberOfFrames=100000),
        "multi-frame image with 100000 frames",
    ),
    Hostile(
        "NumberOfFrames not an integer",
        lambda p: (make_dicom(p, _pixels(), NumberOfFrames=7), _set_value(p, 0x00280008, b"ab")),
        "NumberOfFrames is not an integer",
    ),
    # compressed transfer syntaxes: no decoder, lying or broken codestreams
    Hostile(
        "JPEG-LS without a decoder plugin",
        lambda p: make_dicom(
            p, _pixels(), transfer_syntax=_missing_decoder(_JPEG_LS), pixel_bytes=encapsulate([b"\xff\xd8\xff\xd9"])
        ),
        "no decoder plugin is installed for the transfer syntax",
        needs_missing_decoder=_JPEG_LS,
    ),
    Hostile(
        "HTJ2K without a decoder plugin",
        lambda p: make_dicom(
            p, _pixels(), transfer_syntax=HTJ2KLossless, pixel_bytes=encapsulate([b"\xff\x4f\xff\x51" + bytes(40)])
        ),
        "no decoder plugin is installed for the transfer syntax",
        needs_missing_decoder=_HTJ2K,
    ),
    Hostile(
        "private (GE) transfer syntax",
        lambda p: (make_dicom(p, _pixels()), _with_transfer_syntax(p, "1.2.840.113619.5.2")),
        "transfer syntax '1.2.840.113619.5.2' is private; no pydicom decoder supports it",
    ),
    Hostile(
        "JPEG codestream of 64 x 64 where the header declares 8 x 8",
        lambda p: make_dicom(
            p,
            _pixels().astype(np.uint8),
            bits_stored=8,
            transfer_syntax=JPEGBaseline8Bit,
            pixel_bytes=encapsulate([_jpeg_frame(64)]),
        ),
        "compressed frame is larger than declared",
    ),
    Hostile(
        "garbage JPEG codestream",
        lambda p: make_dicom(
            p,
            _pixels().astype(np.uint8),
            bits_stored=8,
            transfer_syntax=JPEGBaseline8Bit,
            pixel_bytes=encapsulate([b"\xff\xd8" + bytes(100) + b"\xff\xd9"]),
        ),
        "DICOM decoding failed",
    ),
    Hostile(
        "garbage JPEG 2000 codestream",
        lambda p: make_dicom(
            p,
            _pixels(),
            transfer_syntax=JPEG2000Lossless,
            pixel_bytes=encapsulate([b"\xff\x4f\xff\x51" + bytes(60)]),
        ),
        "DICOM decoding failed",
    ),
    Hostile(
        "garbage RLE segments",
        lambda p: make_dicom(p, _pixels(), transfer_syntax=RLELossless, pixel_bytes=encapsulate([bytes(64)])),
        "DICOM decoding failed",
    ),
    Hostile(
        "native pixel bytes under an encapsulated transfer syntax",
        lambda p: (make_dicom(p, _pixels()), _with_transfer_syntax(p, RLELossless)),
        "DICOM decoding failed",
    ),
    # invalid image pixel attributes
    Hostile("Rows 0", lambda p: (make_dicom(p, _pixels()), _edit(p, Rows=0)), "Rows must be a positive integer"),
    Hostile(
        "BitsAllocated 0",
        lambda p: (make_dicom(p, _pixels()), _edit(p, BitsAllocated=0)),
        "BitsAllocated must be a positive integer",
    ),
    Hostile(
        "BitsAllocated 7",
        lambda p: (make_dicom(p, _pixels()), _edit(p, BitsAllocated=7)),
        "BitsAllocated must be 1 or a multiple of 8",
    ),
    Hostile(
        "BitsAllocated 64 over 16-bit data",
        lambda p: (make_dicom(p, _pixels()), _edit(p, BitsAllocated=64)),
        "fewer than the 512 bytes",
    ),
    Hostile(
        "BitsStored 40 > BitsAllocated 16",
        lambda p: (make_dicom(p, _pixels()), _edit(p, BitsStored=40, HighBit=39)),
        "Bits Stored",
    ),
    Hostile(
        "SamplesPerPixel 0",
        lambda p: (make_dicom(p, _pixels()), _edit(p, SamplesPerPixel=0)),
        "SamplesPerPixel must be a positive integer",
    ),
    Hostile(
        "SamplesPerPixel 2",
        lambda p: (make_dicom(p, _pixels()), _edit(p, SamplesPerPixel=2)),
        "fewer than the 256 bytes",
    ),
    Hostile(
        "PhotometricInterpretation ARGB (retired)",
        lambda p: make_dicom(p, _pixels(), photometric="ARGB"),
        "unsupported combination",
    ),
    Hostile(
        "PALETTE COLOR without a palette",
        lambda p: make_dicom(p, _pixels().astype(np.uint8), bits_stored=8, photometric="PALETTE COLOR"),
        "DICOM decoding failed",
    ),
    Hostile(
        "float pixel data, all NaN",
        lambda p: (
            make_dicom(p, _pixels()),
            _edit(
                p,
                PixelData=None,
                BitsStored=None,
                HighBit=None,
                PixelRepresentation=None,
                BitsAllocated=32,
                FloatPixelData=np.full((8, 8), np.nan, np.float32).tobytes(),
            ),
        ),
        "non-finite values in the pixel data",
    ),
    Hostile(
        "WindowWidth 0",
        lambda p: make_dicom(p, _pixels(), WindowCenter=100, WindowWidth=0),
        "WindowWidth must be at least 1",
    ),
    Hostile(
        "RescaleSlope 1e309 (infinite)",
        lambda p: (
            make_dicom(p, _pixels(), RescaleSlope="2", RescaleIntercept="0"),
            _set_value(p, 0x00281053, b"1e309 "),
        ),
        "non-finite values after the modality LUT",
    ),
    Hostile(
        "VOI LUT Sequence with an empty LUT",
        lambda p: make_dicom(p, _pixels(), VOILUTSequence=[_lut_item([0, 0, 16], [])]),
        "DICOM decoding failed",
    ),
    Hostile(
        "Modality LUT Sequence with one entry for 4096 values",
        lambda p: make_dicom(p, _pixels(), ModalityLUTSequence=[_lut_item([1, 0, 16], [5], ModalityLUTType="HU")]),
        "DICOM decoding failed",
    ),
    Hostile("sequences nested 5000 deep", _deep_sequences, "DICOM decoding failed"),
    # broken files
    Hostile(
        "truncated to half",
        lambda p: (make_dicom(p, _pixels()), p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])),
        "",
    ),
    Hostile(
        "preamble and DICM prefix only",
        lambda p: (make_dicom(p, _pixels()), p.write_bytes(p.read_bytes()[:132])),
        "",
    ),
    Hostile("empty file", lambda p: p.write_bytes(b""), "empty file"),
    Hostile("text named .dcm", lambda p: p.write_bytes(f"Patient: {PATIENT_NAME}\n".encode() * 20), "not a DICOM file"),
    Hostile(
        "random bytes after a DICM prefix",
        lambda p: p.write_bytes(bytes(128) + b"DICM" + np.random.default_rng(0).bytes(512)),
        "",
    ),
    Hostile(
        "UID-like name without a suffix, not DICOM",
        lambda p: p.write_bytes(b"%PDF-1.4 " * 40),
        "unsupported file type",
        suffix=".1.2.840.113619",
    ),
    Hostile("a folder named like a DICOM file", lambda p: p.mkdir(), "a folder, not a file"),
    Hostile("a FIFO named like a DICOM file (would block a reader)", lambda p: os.mkfifo(p), "not a regular file"),
    # other formats
    Hostile("PNG declaring 60000 x 60000 pixels in 100 bytes", _png_bomb, "decompression-bomb limit", suffix=".png"),
    Hostile(
        "truncated PNG",
        lambda p: (Image.fromarray(np.zeros((64, 64), np.uint8)).save(p), p.write_bytes(p.read_bytes()[:60])),
        "PNG decoding failed",
        suffix=".png",
    ),
    Hostile(
        ".npy whose header declares 99999 x 99999 float64 in 128 bytes",
        _npy_lying_shape,
        "not a usable .npy file",
        suffix=".npy",
    ),
    Hostile(
        ".npy holding pickled objects",
        lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "object arrays (pickled data) are refused",
        suffix=".npy",
    ),
]


def _lut_item(descriptor: list[int], data: list[int], **attributes: Any) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _skip_reason(case: Hostile) -> str | None:
    if case.needs_missing_decoder and _missing_decoder(case.needs_missing_decoder) is None:
        return "a decoder plugin for this transfer syntax is installed"
    return None


@pytest.fixture(scope="module")
def leaky_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose name holds a patient's name and ID: a leaked path leaks them too."""
    return tmp_path_factory.mktemp("hostile") / f"{PATIENT_NAME} {PATIENT_ID}"


def _case_path(folder: Path, index: int, case: Hostile) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{index:02d}_{PATIENT_ID}{case.suffix}"


def _assert_clean(reason: str, path: Path) -> None:
    assert reason.strip(), "empty quarantine reason"
    for secret in (str(path), path.name, PATIENT_NAME, "Doe", PATIENT_ID):
        assert secret not in reason, f"{secret!r} in {reason!r}"
    assert not re.search(r" at 0x[0-9a-fA-F]", reason)  # object addresses would differ between runs


def _decode_counted(path: Path, **kwargs: Any) -> tuple[str, int]:
    """Decode under tracemalloc; return ``("read" | reason, peak bytes)``; tally the outcome."""
    tracemalloc.start()
    try:
        decode_image(path, channels=1, height=8, width=8, **kwargs)
        outcome = "read"
    except UnreadableImage as error:
        outcome = str(error)
    except BaseException:
        TALLY["crash"] += 1
        raise
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    TALLY["read" if outcome == "read" else "quarantined"] += 1
    return outcome, peak


# --------------------------------------------------------------------------------------------------
# hostile files, one by one


@pytest.mark.parametrize("case", HOSTILE_FILES, ids=[c.name for c in HOSTILE_FILES])
def test_hostile_file_is_read_or_quarantined_with_bounded_memory(case: Hostile, leaky_folder: Path) -> None:
    if (why := _skip_reason(case)) is not None:
        pytest.skip(why)
    path = _case_path(leaky_folder, HOSTILE_FILES.index(case), case)
    case.write(path)
    outcome, peak = _decode_counted(path)
    assert peak < PEAK_BYTES, f"{peak / MiB:.1f} MiB allocated for {case.name}"
    if case.expect == "read":
        assert outcome == "read"
        return
    assert outcome != "read", f"{case.name} was decoded; expected a quarantine reason"
    _assert_clean(outcome, path)
    assert case.expect in outcome


def test_reads_ask_for_the_file_size_not_the_budget(tmp_path: Path) -> None:
    """Regression: each read once asked for max_file_bytes + 1 (512 MiB) up front."""
    path = make_dicom(tmp_path / "a.dcm", _pixels())
    outcome, peak = _decode_counted(path)
    assert outcome == "read" and peak < 8 * MiB


def test_deflate_bomb_inflation_is_streamed_under_a_small_budget(tmp_path: Path) -> None:
    path = tmp_path / "bomb.dcm"
    _deflate_bomb(path, inflated=64 * MiB)
    budget = DecodeBudget(max_file_bytes=4 * MiB)
    outcome, peak = _decode_counted(path, budget=budget)
    assert "inflates beyond the budget of 4194304 bytes" in outcome
    assert peak < 2 * budget.max_file_bytes


# --------------------------------------------------------------------------------------------------
# structure-aware mutation: the image pixel module's values and lengths


_IMAGE_TAGS = (0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102,
               0x00280103, 0x00281050, 0x00281051, 0x00281052, 0x00281053, 0x7FE00010)  # fmt: skip
STRUCTURED_EXAMPLES = 60


def _element_offsets(data: bytes) -> dict[int, int]:
    """Offsets of the image-pixel elements in an explicit-LE file written by :func:`make_dicom`."""
    offsets = {}
    start = _meta_end(data)
    for tag in _IMAGE_TAGS:
        key = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        at = data.find(key, start)
        if at >= 0:
            offsets[tag] = at
    return offsets


@pytest.fixture(scope="module")
def structured_seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[int, int], Path]:
    folder = tmp_path_factory.mktemp(f"mutant_{PATIENT_ID}")
    seed = make_dicom(
        folder / "seed.dcm",
        _pixels(),
        NumberOfFrames=1,
        WindowCenter=2000,
        WindowWidth=4000,
        RescaleSlope=1,
        RescaleIntercept=-1024,
    ).read_bytes()
    offsets = _element_offsets(seed)
    assert len(offsets) == len(_IMAGE_TAGS)
    return seed, offsets, folder / "mutant.dcm"


@settings(
    max_examples=STRUCTURED_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
    database=None,
)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(_IMAGE_TAGS),
            st.sampled_from(["value", "length"]),
            st.one_of(
                st.integers(0, 0xFFFF).map(lambda n: struct.pack("<H", n)),
                st.integers(0, 0xFFFFFFFF).map(lambda n: struct.pack("<I", n)),
                st.sampled_from([b"-1", b"0 ", b"1e309 ", b"NaN ", b"\x00\x00", b"99999999", b"MONOCHROME3 "]),
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_header_values_and_lengths_are_read_or_quarantined(
    structured_seed: tuple[bytes, dict[int, int], Path], edits: list[tuple[int, str, bytes]]
) -> None:
    seed, offsets, path = structured_seed
    data = bytearray(seed)
    for tag, what, payload in edits:
        if tag not in offsets:
            continue
        at = offsets[tag]
        long_vr = data[at + 4 : at + 6] in (b"OB", b"OW", b"OF", b"OD", b"SQ", b"UN", b"UT")
        value_at = at + (12 if long_vr else 8)
        if what == "length":
            field = slice(at + 8, at + 12) if long_vr else slice(at + 6, at + 8)
            width = field.stop - field.start
            data[field] = (payload * 4)[:width]
        else:
            data[value_at : value_at + len(payload)] = payload
    path.write_bytes(bytes(data))
    outcome, peak = _decode_counted(path)
    assert peak < PEAK_BYTES
    if outcome != "read":
        _assert_clean(outcome, path)


# --------------------------------------------------------------------------------------------------
# a study with planted identifiers in headers, file names and folder names, plus the hostile files


IDENTIFIER_TOKENS = (
    "Quixote",  # PatientName family name (per patient: Quixote<k>^Dulcinea)
    "Dulcinea",  # PatientName given name, also in every file name
    "QXMRN",  # PatientID prefix, also in every folder name
    "19230405",  # PatientBirthDate
    "ACCZQ",  # AccessionNumber prefix, also in every file name
    "Zanzibar",  # InstitutionName
    "Hollowell",  # ReferringPhysicianName
    "Ignatius",
    "OPIDZQ",  # OtherPatientIDs
    "STZQ",  # StudyID
    "Quellstrasse",  # PatientAddress
    PATIENT_NAME,  # the hostile files' folder and header
    PATIENT_ID,  # the hostile files' names
)
_INTEGRATION_SKIP = ("deflate bomb (640 MiB from 0.6 MB)",)  # its own test; 0.6 s per decode


@dataclass
class PlantedStudy:
    spec: Path
    uids: list[str]
    hostile_rows: dict[int, Hostile]
    jpeg_ls_rows: list[int]


def _to_dicom(image: np.ndarray[Any, Any], path: Path, k: int, i: int, sex: str, age: int, uids: list[str]) -> None:
    stored = np.clip(np.round(image * 4095), 0, 4095).astype(np.uint16)
    study_uid, series_uid = generate_uid(), generate_uid()
    uids += [study_uid, series_uid]
    make_dicom(
        path,
        stored,
        PatientName=f"Quixote{k}^Dulcinea",
        PatientID=f"QXMRN{k:05d}",
        PatientBirthDate="19230405",
        PatientAddress="12 Quellstrasse",
        OtherPatientIDs=f"OPIDZQ{k}",
        AccessionNumber=f"ACCZQ{i:05d}",
        InstitutionName="Zanzibar Quell Infirmary",
        ReferringPhysicianName="Hollowell^Ignatius",
        StudyID=f"STZQ{i}",
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        PatientSex=sex,
        PatientAge=f"{age:03d}Y",
        WindowCenter=2048,
        WindowWidth=4096,
    )
    uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))


def make_planted_study(base: Path) -> PlantedStudy:
    """The tiny study as DICOM: identifiers in every header, file name and patient folder name.

    The manifest has no patient_id column (PatientID is read from the headers). Every third eval
    image is site B, stored as JPEG-LS when no JPEG-LS decoder is installed (so quarantined);
    the hostile files join the eval split as site ``hostile``.
    """
    spec_path = make_tiny_study(base)
    data = base / "data"
    lines = (data / "manifest.csv").read_text(encoding="utf-8").splitlines()
    missing = _missing_decoder(_JPEG_LS)
    rows = ["path,label,split,sex,age,site"]
    uids: list[str] = []
    jpeg_ls_rows: list[int] = []
    for i, line in enumerate(lines[1:]):
        npy, label, patient, split, sex, age = line.split(",")
        k = int(patient.removeprefix("pat"))
        folder = data / f"Quixote{k}^Dulcinea QXMRN{k:05d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"ACCZQ{i:05d}_Dulcinea.dcm"
        _to_dicom(np.load(data / npy), path, k, i, sex, int(age), uids)
        site = "A"
        if split == "test" and i % 2 == 0:
            site = "B"
            if missing is not None:
                _with_transfer_syntax(path, missing)
                ds = pydicom.dcmread(path)
                ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
                ds.save_as(path)
                jpeg_ls_rows.append(i)
        rows.append(f"{path.relative_to(data).as_posix()},{label},{split},{sex},{age},{site}")
    hostile_rows: dict[int, Hostile] = {}
    hostile_dir = data / f"{PATIENT_NAME} {PATIENT_ID}"
    for index, case in enumerate(HOSTILE_FILES):
        if case.name in _INTEGRATION_SKIP or _skip_reason(case) is not None:
            continue
        path = _case_path(hostile_dir, index, case)
        case.write(path)
        hostile_rows[len(rows) - 1] = case
        rows.append(f"{path.relative_to(data).as_posix()},dark,test,F,50,hostile")
    for old in (data / "img").iterdir():
        old.unlink()
    (data / "img").rmdir()
    (data / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    spec["data"]["groups"]["site"] = {}
    spec["checks"] = {
        "calibration": {},
        "bias": {"n_boot": 50},
        "leakage": {"n_boot": 0},
        "phi": {},
    }  # the checks that read headers, identifiers, groups or paths; the image-only ones see none
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return PlantedStudy(spec=spec_path, uids=uids, hostile_rows=hostile_rows, jpeg_ls_rows=jpeg_ls_rows)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> PlantedStudy:
    return make_planted_study(tmp_path_factory.mktemp("planted"))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class PlantedRun:
    out: Path
    results: dict[str, Any]
    log: list[str]
    warnings: list[str]


@pytest.fixture(scope="module")
def planted_run(planted: PlantedStudy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlantedRun]:
    """Every check of the planted study, in-process, with the PDF, logging at DEBUG."""
    import warnings

    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    out = tmp_path_factory.mktemp("planted-out")
    handler = _Records()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome = run_audit(load_spec(planted.spec), RunOptions(out_dir=out, pdf=True))
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    yield PlantedRun(out, outcome.results, handler.lines, [str(w.message) for w in caught])


def test_hostile_files_in_a_study_are_quarantined_per_row_and_counted_per_group(
    planted: PlantedStudy, planted_run: PlantedRun
) -> None:
    results = planted_run.results
    measured = [c for c in results["checks"] if c["id"] != "parity"]  # parity needs a model.reference
    assert [c["status"] for c in measured] == ["ok"] * len(measured), [
        (c["id"], c["error"]) for c in measured if c["status"] != "ok"
    ]
    reasons = {q["row"]: q["reason"] for q in results["data"]["quarantine"]}
    for row, case in planted.hostile_rows.items():
        if case.expect == "read":
            assert row not in reasons, (case.name, reasons.get(row))
        else:
            assert row in reasons, case.name
            assert case.expect in reasons[row], (case.name, reasons[row])
    for row in planted.jpeg_ls_rows:
        assert "no decoder plugin is installed" in reasons[row]
    n_hostile_quarantined = sum(1 for r in planted.hostile_rows if r in reasons)
    by_group = results["data"]["splits"]["eval"]["quarantined_by_group"]["site"]
    expected = {"hostile": n_hostile_quarantined}
    if planted.jpeg_ls_rows:
        expected["B"] = len(planted.jpeg_ls_rows)
    assert by_group == expected
    # the bias check states the quarantine per group, so a missing decoder cannot hide a subgroup
    bias = next(c for c in results["checks"] if c["id"] == "bias")
    finding = next(f for f in bias["findings"] if f["kind"] == "quarantined_by_group" and f["group_by"] == "site")
    assert finding["quarantined"] == expected


def _outputs(out: Path) -> dict[str, str]:
    from pypdf import PdfReader

    texts = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(out).as_posix()
        if path.suffix == ".pdf":
            texts[name] = "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
        texts[name + " (bytes)"] = path.read_bytes().decode("latin-1")
    return texts


def _assert_no_identifier(texts: dict[str, str], uids: list[str]) -> None:
    for where, text in texts.items():
        upper = text.upper()
        for token in IDENTIFIER_TOKENS:
            assert token.upper() not in upper, f"{token!r} found in {where}"
        for uid in uids:
            assert uid not in text, f"a StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID found in {where}"


def test_planted_identifiers_reach_no_output_and_no_log_line(planted: PlantedStudy, planted_run: PlantedRun) -> None:
    out = planted_run.out
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"results.json", "report.html", "report.pdf", "manifest.json", "metrics.csv", "findings.csv"} <= names
    assert any(name.startswith("artifacts/") for name in names) and any(n.startswith("checkpoints/") for n in names)
    texts = _outputs(out)
    assert "Dulcinea" not in texts["report.pdf"] and "calibration" in texts["report.pdf"].lower()
    texts["log (DEBUG)"] = "\n".join(planted_run.log)
    texts["warnings"] = "\n".join(planted_run.warnings)
    # the sweep proves something only if the run's INFO and DEBUG records were captured
    assert any("running check phi" in line for line in planted_run.log), planted_run.log
    assert any(line.startswith("DEBUG auditkit.") for line in planted_run.log), planted_run.log
    _assert_no_identifier(texts, planted.uids)
    # the PHI check did see the planted attributes: they are reported by keyword, not by value
    phi = next(c for c in planted_run.results["checks"] if c["id"] == "phi")
    files_with_identifiers = next(m for m in phi["metrics"] if m["name"] == "phi.files_with_identifiers")
    assert files_with_identifiers["value"] and files_with_identifiers["value"] > 0
    assert "PatientName" in json.dumps(phi["findings"])
    # and the patients were told apart through surrogates
    assert planted_run.results["data"]["splits"]["eval"]["n_patients"] > 1


# --------------------------------------------------------------------------------------------------
# faults: SIGKILL and --resume, out of memory, non-finite logits

GATE_PLUGIN = textwrap.dedent(
    '''
    """Test-only check: waits until the file named by AUDITKIT_TEST_GATE exists."""
    import os
    import time
    from pathlib import Path

    from auditkit.check import Check, CheckResult, Metric, Needs


    class Gate(Check):
        """Test-only: holds the run until a file appears, so that a test can kill it mid-run."""

        id = "gate"
        family = "test"
        needs = Needs()
        emits = ("gate.opened",)

        def run(self, ctx, params):
            gate = Path(os.environ["AUDITKIT_TEST_GATE"])
            gate.with_name("gate-waiting").touch()
            deadline = time.monotonic() + 300
            while not gate.exists():  # polling, not a timed assertion
                if time.monotonic() > deadline:
                    raise TimeoutError("the gate never opened")
                time.sleep(0.02)
            return CheckResult(metrics=[Metric(name="gate.opened", value=1.0, direction="higher_is_better")])
    '''
)


def _install_gate(site: Path) -> None:
    """A real plugin: a module plus a dist-info folder with an ``auditkit.checks`` entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "auditkit_gate_plugin.py").write_text(GATE_PLUGIN, encoding="utf-8")
    info = site / "auditkit_gate_plugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: auditkit-gate-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[auditkit.checks]\ngate = auditkit_gate_plugin:Gate\n")


def _wait_for(paths: list[Path], process: subprocess.Popen[bytes], stderr: Path, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while not all(p.exists() for p in paths):
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {paths}: {stderr.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{paths} did not appear within {limit_s} s")
        time.sleep(0.02)


def _comparable(results: dict[str, Any]) -> dict[str, Any]:
    """Results minus what differs between two runs of the same audit (ids, times, the command)."""
    keep = {k: v for k, v in results.items() if k not in ("run", "environment")}
    keep["checks"] = [{k: v for k, v in c.items() if k not in ("duration_s", "resumed")} for c in results["checks"]]
    keep["run"] = {k: results["run"][k] for k in ("seed", "device", "precision", "batch_size", "images_decoded")}
    return keep


def test_a_run_killed_with_sigkill_resumes_to_the_same_results(
    planted: PlantedStudy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from auditkit.cli import main

    site = tmp_path / "site"
    _install_gate(site)
    gate = tmp_path / "gate-open"
    out = tmp_path / "killed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "AUDITKIT_TEST_GATE": str(gate),
        "PYTHONHASHSEED": "0",
    }
    command = [sys.executable, "-m", "auditkit", "-vv", "run", str(planted.spec), "--out", str(out)]
    command += ["--only", "calibration,gate,bias", "--no-pdf"]
    logs: dict[str, str] = {}
    with (tmp_path / "1.out").open("wb") as stdout, (tmp_path / "1.err").open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        try:
            _wait_for(
                [out / "checkpoints" / "calibration.json", tmp_path / "gate-waiting"], process, tmp_path / "1.err"
            )
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints == ["calibration.json"]
    finished = out / "checkpoints" / "calibration.json"
    before = (finished.read_bytes(), finished.stat().st_mtime_ns)

    gate.touch()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, env=env, timeout=600, check=False)
    assert resumed.returncode in (0, 1), resumed.stderr.decode()[-3000:]
    logs.update({"killed stdout": (tmp_path / "1.out").read_text(), "killed stderr": (tmp_path / "1.err").read_text()})
    logs.update({"resumed stdout": resumed.stdout.decode(), "resumed stderr": resumed.stderr.decode()})
    results = json.loads((out / "results.json").read_text(), parse_constant=_refuse_constant)
    assert results["run"]["resumed_checks"] == ["calibration"]
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == before  # not recomputed, not rewritten
    assert [c["id"] for c in results["checks"]] == ["coverage", "calibration", "gate", "bias"]
    assert [c["id"] for c in results["checks"] if c.get("resumed")] == ["calibration"]
    assert "[ reused] calibration" in resumed.stdout.decode()
    lost = [cid for cid in ("calibration",) if cid not in results["run"]["resumed_checks"]]
    TALLY["results_lost"] += len(lost)
    assert lost == []

    # a fresh, uninterrupted run of the same audit gives the same results
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("AUDITKIT_TEST_GATE", str(gate))
    fresh_out = tmp_path / "fresh"
    assert main(["run", str(planted.spec), "--out", str(fresh_out), "--only", "calibration,gate,bias", "--no-pdf"]) in (
        0,
        1,
    )
    fresh = json.loads((fresh_out / "results.json").read_text())
    assert fresh["run"]["resumed_checks"] == []
    assert _comparable(results) == _comparable(fresh)
    assert "running check gate" in logs["resumed stderr"] and "running check calibration" in logs["killed stderr"]
    _assert_no_identifier({**logs, **_outputs(out)}, planted.uids)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"results.json holds {name}, which is not JSON")


def test_a_garbled_checkpoint_is_recomputed_not_trusted(tiny_study: Path) -> None:
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    spec = load_spec(tiny_study)
    first = run_audit(spec, RunOptions(only=["calibration"], report=False))
    checkpoint = first.out_dir / "checkpoints" / "calibration.json"
    checkpoint.write_bytes(checkpoint.read_bytes()[:50])  # a torn write by something other than auditkit
    again = run_audit(spec, RunOptions(only=["calibration"], report=False, resume=True))
    assert again.results["run"]["resumed_checks"] == []
    assert _comparable(again.results)["checks"] == _comparable(first.results)["checks"]


OOM_MODEL = textwrap.dedent(
    '''
    """The tiny model, which runs out of (simulated CUDA) memory on batches of more than 4 images."""
    import torch
    from torch import nn


    class OutOfMemoryAbove4(nn.Sequential):
        def forward(self, x):
            if x.shape[0] > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            return super().forward(x)


    def build(num_classes: int = 2) -> nn.Module:
        torch.manual_seed(0)
        return OutOfMemoryAbove4(nn.Flatten(), nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, num_classes))
    '''
)


def test_out_of_memory_at_a_large_batch_completes_with_a_smaller_one(tiny_study: Path) -> None:
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    (tiny_study.parent / "oom_model.py").write_text(OOM_MODEL, encoding="utf-8")
    spec = load_spec(tiny_study)
    oom_spec = spec.model_copy(update={"model": spec.model.model_copy(update={"factory": "oom_model:build"})})
    options = {"only": ["calibration", "bias"], "report": False, "batch_size": 64}
    outcome = run_audit(oom_spec, RunOptions(out_dir=tiny_study.parent / "oom", **options))  # type: ignore[arg-type]
    plain = run_audit(spec, RunOptions(out_dir=tiny_study.parent / "plain", **options))  # type: ignore[arg-type]
    run = outcome.results["run"]
    assert run["batch_size"] <= 4 and run["batch_halvings"] >= 4  # 64 -> 32 -> 16 -> 8 -> 4
    assert [c["status"] for c in outcome.results["checks"]] == ["ok", "ok", "ok"]  # coverage, calibration, bias
    # batch size changes the floating-point reduction order, so values agree to rounding, not bit for bit
    for halved, whole in zip(outcome.results["checks"], plain.results["checks"], strict=True):
        assert len(halved["metrics"]) == len(whole["metrics"]) > 0
        for a, b in zip(halved["metrics"], whole["metrics"], strict=True):
            assert (a["name"], a["labels"], a["n"]) == (b["name"], b["labels"], b["n"])
            if b["value"] is None:
                assert a["value"] is None and a["reason"] == b["reason"]
            else:
                assert a["value"] == pytest.approx(b["value"], rel=1e-6, abs=1e-9), (a, b)


NAN_MODEL = textwrap.dedent(
    '''
    """The tiny model with NaN logits for every 3rd image, +inf and -inf for some others."""
    import torch
    from torch import nn


    class NonFinite(nn.Sequential):
        def forward(self, x):
            out = super().forward(x).clone()
            out[::{every}] = float("nan")
            out[1::5, 0] = float("inf")
            out[2::7, 1] = float("-inf")
            return out


    def build(num_classes: int = 2) -> nn.Module:
        torch.manual_seed(0)
        return NonFinite(nn.Flatten(), nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, num_classes))
    '''
)


def _nan_run(study: Path, every: int, checks: dict[str, Any]) -> dict[str, Any]:
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    # A distinct module name per variant: a module imported once stays in sys.modules.
    module = f"nan_model_every_{every}"
    (study.parent / f"{module}.py").write_text(NAN_MODEL.replace("{every}", str(every)), encoding="utf-8")
    spec = load_spec(study)
    spec = spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"factory": f"{module}:build"}),
            "checks": checks,
            "only": list(checks),
        }
    )
    outcome = run_audit(spec, RunOptions(report=True, pdf=False))
    text = (outcome.out_dir / "results.json").read_text(encoding="utf-8")
    results: dict[str, Any] = json.loads(text, parse_constant=_refuse_constant)
    for check in results["checks"]:
        for metric in check["metrics"]:
            assert metric["value"] is None or np.isfinite(metric["value"])
            assert metric["value"] is not None or metric.get("reason"), metric
    assert results["checks"][0]["id"] == "coverage"  # the engine's count of images read, always measured
    results["checks"] = results["checks"][1:]
    return results


def test_non_finite_logits_give_undefined_metrics_with_reasons_and_strict_json(tiny_study: Path) -> None:
    results = _nan_run(tiny_study, 3, {"calibration": {}, "bias": {"n_boot": 50}})
    assert [c["status"] for c in results["checks"]] == ["ok", "ok"]
    calibration = results["checks"][0]
    overall = next(m for m in calibration["metrics"] if m["name"] == "calibration.ece" and not m["labels"])
    n_eval = results["data"]["splits"]["eval"]["n_images"]
    assert overall["value"] is not None and 0 < overall["n"] < n_eval  # measured on the finite rows only
    undefined = [m for c in results["checks"] for m in c["metrics"] if m["value"] is None]
    assert any("non-finite" in m["reason"] for m in undefined)


def test_all_logits_nan_leave_nothing_measured(tiny_study: Path) -> None:
    results = _nan_run(tiny_study, 1, {"calibration": {}, "bias": {"n_boot": 50}})
    calibration, bias = results["checks"]
    assert calibration["status"] == "ok" and all(m["value"] is None for m in calibration["metrics"])
    assert bias["status"] == "skipped" and "non-finite" in bias["reason"]


def test_all_logits_nan_leave_no_ood_adversarial_or_corruption_number(tiny_study: Path) -> None:
    checks = {
        "ood": {"detectors": ["msp"], "builtin_sets": ["noise"], "n_boot": 0},
        "adversarial": {"attacks": ["fgsm"], "eps": [0.004], "n_samples": 8, "sanity_checks": False},
        "corruption": {"corruptions": ["gaussian_noise"], "severities": [1], "n_boot": 0},
        "backdoor": {"trigger_samples": 8, "trigger_steps": 5},
    }
    results = _nan_run(tiny_study, 1, checks)
    measured = [(c["id"], m["name"]) for c in results["checks"] for m in c["metrics"] if m["value"] is not None]
    assert measured == []
    assert {c["id"]: c["status"] for c in results["checks"]} == dict.fromkeys(checks, "skipped")
    assert all("non-finite" in c["reason"] for c in results["checks"])


# --------------------------------------------------------------------------------------------------
# model files of unknown origin


class _Touch:
    """Unpickling this creates a marker file: the attack a weights file can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


class _Shell:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _torchscript(path: Path, marker: Path) -> None:
    import torch

    torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))).save(str(path))


def _torch_save(obj: Callable[[Path], Any], **kwargs: Any) -> Callable[[Path, Path], None]:
    def write(path: Path, marker: Path) -> None:
        import torch

        torch.save(obj(marker), path, **kwargs)

    return write


MODEL_FILES: list[tuple[str, str, Callable[[Path, Path], None], str]] = [
    # (case, file name, writer, fragment of the refusal)
    ("pickled callable in a state_dict", "evil.pt", _torch_save(lambda m: {"0.weight": _Touch(m)}), "weights_only"),
    ("the same, .pth", "evil.pth", _torch_save(lambda m: {"0.weight": _Touch(m)}), "weights_only"),
    ("the same, .ckpt", "evil.ckpt", _torch_save(lambda m: {"0.weight": _Touch(m)}), "weights_only"),
    ("os.system payload", "shell.pt", _torch_save(lambda m: {"0.weight": _Shell(m)}), "weights_only"),
    (
        "legacy (pre-zip) torch.save format",
        "legacy.pt",
        _torch_save(lambda m: {"0.weight": _Touch(m)}, _use_new_zipfile_serialization=False),
        "weights_only",
    ),
    (
        "payload inside a Lightning-style checkpoint",
        "lightning.ckpt",
        _torch_save(lambda m: {"state_dict": {"0.weight": _Touch(m)}, "epoch": 3}),
        "weights_only",
    ),
    ("raw pickle named .pt", "raw.pt", lambda p, m: p.write_bytes(pickle.dumps(_Touch(m))), "weights_only"),
    (
        "pickle named .safetensors",
        "evil.safetensors",
        lambda p, m: p.write_bytes(pickle.dumps(_Touch(m))),
        "not a readable safetensors file",
    ),
    (
        "safetensors header declaring 1 PB",
        "huge.safetensors",
        lambda p, m: p.write_bytes(struct.pack("<Q", 10**15) + b"{}"),
        "not a readable safetensors file",
    ),
    ("TorchScript archive, trust_code false", "scripted.pt", _torchscript, "trust_code: true"),
    ("TorchScript archive named .pth", "scripted.pth", _torchscript, "trust_code: true"),
    ("whole pickled nn.Module", "module.pt", _torch_save(lambda m: _module_with_marker(m)), "trust_code: true"),
]


def _module_with_marker(marker: Path) -> Any:
    import torch

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    module.payload = _Touch(marker)  # type: ignore[assignment]
    return module


@pytest.fixture(scope="module")
def model_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_study(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("force_no_weights_only", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
@pytest.mark.parametrize("case", MODEL_FILES, ids=[c[0] for c in MODEL_FILES])
def test_model_files_that_carry_code_are_refused_and_never_run(
    case: tuple[str, str, Callable[[Path, Path], None], str],
    force_no_weights_only: bool,
    model_study: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from auditkit.model import ModelAdapter
    from auditkit.spec import load_spec

    _name, file_name, write, refusal = case
    marker = tmp_path / "marker"
    weights = tmp_path / file_name
    write(weights, marker)
    assert not marker.exists()
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    spec = load_spec(model_study)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"weights": weights})})
    try:
        ModelAdapter(spec, device="cpu")
    except ModelLoadError as error:
        message = str(error)
    except BaseException:
        TALLY["crash"] += 1
        raise
    else:
        pytest.fail(f"{file_name} was loaded")
    TALLY["refused"] += 1
    assert not marker.exists(), "the file's code ran"
    assert message.startswith("model.weights:") and file_name in message and refusal in message


def test_the_cli_refuses_a_weights_pickle_with_exit_2(
    model_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from auditkit.cli import main

    marker = tmp_path / "marker"
    _torch_save(lambda m: {"0.weight": _Touch(m)})(model_study.parent / "evil.pt", marker)
    spec = yaml.safe_load(model_study.read_text())
    spec["model"]["weights"] = "evil.pt"
    evil_spec = model_study.parent / "evil.yaml"
    evil_spec.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert main(["run", str(evil_spec), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "model.weights: evil.pt" in capsys.readouterr().err
    assert not marker.exists()
    TALLY["refused"] += 1


# --------------------------------------------------------------------------------------------------
# manifests


def _symlink_out(root: Path) -> str:
    (root / "link.npy").symlink_to(root.parent / "outside.npy")
    return "link.npy"


def _symlink_dev_zero(root: Path) -> str:
    (root / "zero.npy").symlink_to("/dev/zero")
    return "zero.npy"


MANIFESTS: list[tuple[str, Callable[[Path], str], str]] = [
    # (case, writes what the manifest's data row holds, fragment of the InputError)
    ("parent traversal", lambda root: "../outside.npy,dark", "resolves outside data.root"),
    ("absolute path", lambda root: "/etc/passwd,dark", "resolves outside data.root"),
    ("traversal after a folder", lambda root: "img/../../outside.npy,dark", "resolves outside data.root"),
    ("tilde then traversal", lambda root: "~/../../outside.npy,dark", "resolves outside data.root"),
    ("symlink out of the root", lambda root: _symlink_out(root) + ",dark", "resolves outside data.root"),
    ("symlink to /dev/zero", lambda root: _symlink_dev_zero(root) + ",dark", "resolves outside data.root"),
    ("NUL byte in a path", lambda root: "a\x00b.npy,dark", "contains a NUL character"),
    ("cell over the CSV field limit", lambda root: "a" * 200_000 + ".npy,dark", "not readable as CSV"),
    ("more cells than columns", lambda root: "a.npy,dark,extra", "3 cells, the header has 2"),
    ("formula as a label", lambda root: "a.npy,=1+1", "is not one of model.classes"),
    ("duplicate path", lambda root: "a.npy,dark\r\n./a.npy,dark", "duplicates row 0"),
]


@pytest.mark.parametrize("case", MANIFESTS, ids=[c[0] for c in MANIFESTS])
def test_hostile_manifest_rows_are_input_errors_naming_the_row(
    case: tuple[str, Callable[[Path], str], str], tmp_path: Path
) -> None:
    from auditkit.data import read_manifest

    _name, row, fragment = case
    root = tmp_path / "data"
    root.mkdir()
    np.save(tmp_path / "outside.npy", np.zeros((2, 2)))
    manifest = root / "manifest.csv"
    manifest.write_text("path,label\n" + row(root) + "\n", encoding="utf-8")
    try:
        read_manifest(manifest, root=root, classes=["dark", "bright"])
    except InputError as error:
        message = str(error)
    except BaseException:
        TALLY["crash"] += 1
        raise
    else:
        pytest.fail("the manifest was accepted")
    TALLY["refused"] += 1
    assert fragment in message and "manifest.csv" in message
    assert "row 0" in message or "line" in message


def test_a_manifest_that_is_not_utf8_is_an_input_error(tmp_path: Path) -> None:
    from auditkit.data import read_manifest

    (tmp_path / "manifest.csv").write_bytes(b"path,label\n\xff\xfe.npy,dark\n")
    with pytest.raises(InputError, match="cannot read manifest"):
        read_manifest(tmp_path / "manifest.csv", root=tmp_path, classes=["dark"])
    TALLY["refused"] += 1


# --------------------------------------------------------------------------------------------------
# the count


FAULTS = (
    "SIGKILL after the first checkpoint, then --resume",
    "a torn checkpoint file, then --resume",
    "out of memory above 4 images per batch (simulated CUDA OOM on the CPU)",
    "NaN, +inf and -inf logits for some images",
    "NaN logits for every image (calibration, bias)",
    "NaN logits for every image (ood, adversarial, corruption, backdoor: skipped with the reason)",
)


def inventory() -> dict[str, int]:
    """What this module (and the corpus and byte-fuzzing tests it builds on) tries, by kind."""
    import test_export
    import test_loaders
    import test_monai_bundle
    import test_onnx
    import test_pack
    import test_segmentation_audit
    import test_tasks
    import test_user_mistakes
    import test_volumes

    byte_fuzz = test_loaders.test_mutated_dicom_bytes_only_raise_unreadable_image
    counts = {
        "crafted image files (DICOM, PNG, .npy)": len(HOSTILE_FILES),
        "pydicom test-data files": len(test_loaders._corpus_candidates()),
        "Hypothesis byte mutations of a DICOM file": byte_fuzz._hypothesis_internal_use_settings.max_examples,  # type: ignore[attr-defined]
        "Hypothesis header value/length mutations": STRUCTURED_EXAMPLES,
        "model files x 2 (with and without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), + 1 via the CLI": 2 * len(MODEL_FILES)
        + 1,
        "hostile manifests": len(MANIFESTS) + 1,
        "spreadsheet formula cells": len(test_export.FORMULA_CELLS),
        "faults": len(FAULTS),
        "spec, data and model mistakes through the CLI": len(test_user_mistakes.MISTAKES),
        "multi-label and regression mistakes through the CLI": len(test_tasks.MULTILABEL_MISTAKES)
        + len(test_tasks.REGRESSION_MISTAKES),
        "crafted volumes (NIfTI, .npy, DICOM series folders)": len(test_volumes.SERIES_CASES)
        + len(test_volumes.FILE_CASES),
        "Hypothesis NIfTI header value mutations (each as .nii and .nii.gz)": test_volumes.test_mutated_nifti_headers_only_raise_unreadable_image._hypothesis_internal_use_settings.max_examples,  # type: ignore[attr-defined]
        "crafted segmentation label maps (PNG, JPEG, .npy, NIfTI)": len(test_segmentation_audit.LABEL_MAP_CASES)
        + test_segmentation_audit.AUDIT_MASK_CASES,
        "ONNX artefacts and their specs through the CLI": len(test_onnx.ONNX_CASES),
        "MONAI bundles (configs, archives, metadata)": len(test_monai_bundle.BUNDLE_CASES),
        "submission packs and signing keys": len(test_pack.HOSTILE_PACKS),
    }
    counts["bad inputs tried"] = sum(counts.values())
    return counts


def summary_line() -> str:
    return f"Bad inputs tried: {inventory()['bad inputs tried']}; crashes: 0; results lost: 0"


def test_inventory_matches_the_documented_counts() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert summary_line() in text, f"docs/hardening.md must say: {summary_line()}"
    for kind, count in inventory().items():
        if kind != "bad inputs tried":
            assert f"| {kind} | {count} |" in text, f"docs/hardening.md: row '| {kind} | {count} |' missing"
    assert len(IDENTIFIER_TOKENS) == 13 and "13 planted identifier" in text
    import test_user_mistakes

    for mistake in test_user_mistakes.MISTAKES:
        assert f"| {mistake} |" in text, f"docs/hardening.md: the mistake '{mistake}' is not in its table"


def test_zz_no_crash_and_no_result_lost_in_this_session(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last in this module: what the cases above recorded as they ran."""
    assert TALLY["crash"] == 0 and TALLY["results_lost"] == 0
    with capsys.disabled():
        tried = TALLY["read"] + TALLY["quarantined"] + TALLY["refused"]
        print(
            f"\nhardening: {tried} hostile inputs handled in this session ({TALLY['read']} read,"
            f" {TALLY['quarantined']} quarantined, {TALLY['refused']} refused); crashes: {TALLY['crash']};"
            f" results lost: {TALLY['results_lost']}; inventory: {summary_line()}"
        )


if __name__ == "__main__":
    for kind, count in inventory().items():
        print(f"{count:6d}  {kind}")
    print(summary_line())
