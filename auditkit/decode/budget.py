"""Reading a file safely: its kind, size budgets checked before anything is decoded, pydicom
silenced while it reads, and quarantine reasons that never carry a path or a header value."""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import VR

from auditkit.errors import UnreadableImage

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.floating[Any]]


# Values of these keywords are scrubbed from any exception text that becomes a quarantine reason.
_IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)

_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_PNG_SUFFIXES = frozenset({".png"})
_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
_NPY_SUFFIXES = frozenset({".npy"})
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MAX_REASON_CHARS = 240
# Groups a preamble-less data set usually starts with (file meta, identification, patient, ...).
_FIRST_GROUPS = frozenset({0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028})
_VRS = frozenset(str(vr).encode() for vr in VR if len(str(vr)) == 2)
# JPEG (ISO/IEC 10918-1) start-of-frame markers, and SOF55 of JPEG-LS (ISO/IEC 14495-1).
_JPEG_SOF_MARKERS = frozenset(
    bytes([0xFF, code]) for code in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7)
)
_INFLATE_CHUNK = 1 << 20
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class DecodeBudget:
    """Upper bounds checked before any decoding work is done.

    Attributes:
        max_file_bytes: Files larger than this are refused before they are read. It also bounds the
            inflated size of a deflated DICOM dataset (Deflated Explicit VR Little Endian).
        max_pixel_bytes: Bound on the declared DICOM pixel size
            ``Rows * Columns * SamplesPerPixel * NumberOfFrames * BitsAllocated / 8`` and on the
            in-memory size of a ``.npy`` array.
        max_pixels: Bound on ``width * height`` for PNG/JPEG (decompression bombs) and ``.npy``.
    """

    max_file_bytes: int = 512 * 2**20
    max_pixel_bytes: int = 256 * 2**20
    max_pixels: int = 100_000_000


# --------------------------------------------------------------------------------------------------
# Kinds and file access


def image_kind(path: str | os.PathLike[str]) -> str:
    """Return the kind of image a file holds, from its suffix.

    ``.dcm``/``.dicom`` are DICOM; ``.png``; ``.jpg``/``.jpeg``; ``.npy``. A file without a known
    suffix (including UID-like names such as ``1.2.840.113619.2.55``) is DICOM when it carries the
    ``DICM`` prefix at offset 128 or starts like a DICOM data set without a preamble.

    Args:
        path: The image file.

    Returns:
        ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"npy"``.

    Raises:
        UnreadableImage: Unknown suffix and the content is not DICOM, or the file cannot be read.
    """
    file_path = Path(path)
    suffix = file_path.suffix.lower()
    if file_path.name.lower().endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")):
        raise UnreadableImage(
            f"a volume file ({_volume_suffix(file_path.name)}); a 2-D model reads 2-D images (set model.input.depth"
            " to audit a 3-D model on volumes)"
        )
    if file_path.is_dir():
        raise UnreadableImage(
            "a folder, not a file (a DICOM series?); a 2-D model reads one image file per manifest row (set"
            " model.input.depth to audit a 3-D model on DICOM series folders)"
        )
    if suffix in _DICOM_SUFFIXES:
        return "dicom"
    if suffix in _PNG_SUFFIXES:
        return "png"
    if suffix in _JPEG_SUFFIXES:
        return "jpeg"
    if suffix in _NPY_SUFFIXES:
        return "npy"
    try:
        _check_regular_file(file_path)
        with file_path.open("rb") as handle:
            head = handle.read(132)
    except UnreadableImage:
        raise
    except OSError as exc:
        raise UnreadableImage(f"cannot read the file ({type(exc).__name__})") from None
    if _looks_like_dicom(head):
        return "dicom"
    shown = suffix if suffix.isascii() and suffix[1:].isalnum() and len(suffix) <= 8 else ""
    what = f"unsupported file type {shown!r}" if shown else "unsupported file type"
    raise UnreadableImage(f"{what}: expected .dcm, .dicom, .png, .jpg, .jpeg, .npy or DICOM content")


def _volume_suffix(name: str) -> str:
    lower = name.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else lower[lower.rfind(".") :]


def _looks_like_dicom(head: bytes) -> bool:
    """Whether the first bytes are DICOM: ``DICM`` at 128, or a plausible first data element.

    Without the preamble (older or non-conformant writers) the data set starts directly with its
    first element: a tag in one of the usual first groups, then an explicit VR, or an implicit
    length that is small or undefined.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    for byteorder in ("little", "big"):
        group = int.from_bytes(head[0:2], byteorder)
        if group not in _FIRST_GROUPS:
            continue
        if head[4:6] in _VRS:
            return True
        length = int.from_bytes(head[4:8], byteorder)
        if length <= 0xFFFF or length == 0xFFFFFFFF:
            return True
    return False


def _check_regular_file(path: Path, budget: DecodeBudget | None = None) -> int:
    """Return the file size after checking it is a non-empty regular file within the budget."""
    try:
        info = path.stat()
    except OSError as exc:
        raise UnreadableImage(f"cannot access the file ({type(exc).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableImage("not a regular file")
    if info.st_size == 0:
        raise UnreadableImage("empty file")
    if budget is not None and info.st_size > budget.max_file_bytes:
        raise UnreadableImage(f"file is {info.st_size} bytes; the budget allows {budget.max_file_bytes} bytes")
    return info.st_size


def _read_bytes(path: Path, budget: DecodeBudget) -> bytes:
    size = _check_regular_file(path, budget)
    limit = budget.max_file_bytes
    try:
        with path.open("rb") as handle:
            # read(n) allocates n bytes up front, so ask for the size stat() reported (plus one
            # byte, to notice a file that grew since), never for the whole budget.
            data = handle.read(size + 1)
            if len(data) > size:  # it grew: read on in small steps up to the budget
                parts = [data]
                total = len(data)
                while total <= limit and (chunk := handle.read(min(_INFLATE_CHUNK, limit + 1 - total))):
                    parts.append(chunk)
                    total += len(chunk)
                data = b"".join(parts)
    except OSError as exc:
        raise UnreadableImage(f"cannot read the file ({type(exc).__name__})") from None
    if len(data) > limit:
        raise UnreadableImage(f"file exceeds the budget of {limit} bytes")
    if not data:
        raise UnreadableImage("empty file")
    return data


def _scrub(message: str, secrets: Iterable[str]) -> str:
    """Remove the path and header values from an exception message and shorten it."""
    text = " ".join(message.split())
    for secret in sorted({s for s in secrets if s and len(s) >= 2}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    # Object reprs ("<_io.BytesIO object at 0x7f...>") would make the same file's reason differ
    # between runs, and so the results of a resumed run from a fresh one.
    text = _ADDRESS.sub(" at 0x...", text)
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _path_secrets(path: Path) -> list[str]:
    secrets = [str(path), os.fspath(path), path.name]
    with suppress(OSError):
        secrets.append(str(path.resolve()))
    return secrets


def _dataset_secrets(ds: Dataset | None) -> list[str]:
    """String forms of the identifying values in ``ds``, to scrub from messages."""
    if ds is None:
        return []
    secrets: list[str] = []
    for keyword in _IDENTIFYING_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed element: nothing usable to scrub
            continue
        if value is None:
            continue
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        for item in values:
            text = str(item).strip()
            if text:
                secrets.append(text)
                secrets.extend(part for part in text.split("^") if len(part) >= 3)
    return secrets


def _exception_reason(exc: BaseException, secrets: Iterable[str]) -> str:
    message = _scrub(str(exc), secrets)
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[int, list[Any]] | None = None


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while it reads: its warnings and log records can quote element values.

    The ``pydicom`` logger (with its children) is raised above CRITICAL and warnings are ignored
    for the duration. Both are process-wide settings, so the context is reference-counted under a
    lock: images decoded in a thread pool share one silenced period, and the last reader to leave
    restores the previous state (``warnings.catch_warnings`` is not thread-safe).
    """
    global _quiet_depth, _quiet_saved
    pydicom_logger = logging.getLogger("pydicom")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = (pydicom_logger.level, list(warnings.filters))
            pydicom_logger.setLevel(logging.CRITICAL + 1)
            warnings.simplefilter("ignore")
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                level, filters = _quiet_saved
                pydicom_logger.setLevel(level)
                warnings.filters[:] = filters  # type: ignore[index]
                warnings._filters_mutated()  # type: ignore[attr-defined]  # invalidate the caches
                _quiet_saved = None
