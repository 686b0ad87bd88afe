"""Decode one image file (DICOM, PNG, JPEG or NumPy) into the model-input array, safely.

Every image reaches the checks as ``float32`` ``(C, H, W)`` in ``[0, 1]`` at the model's input
size (DESIGN.md section 3). DICOM pixels go through the modality LUT (Rescale Slope/Intercept or a
Modality LUT Sequence), the VOI transform (VOI LUT Sequence, or Window Center/Width with the VOI
LUT Function of DICOM PS3.3 C.11.2.1.2, or min-max scaling when the header has neither),
MONOCHROME1 inversion, then channel reconciliation and bilinear, antialiased resizing.

Reads are bounded (DESIGN.md section 10): the file size, the declared pixel size (Rows x Columns x
Samples x Frames x BitsAllocated / 8), the size a JPEG/JPEG 2000 frame declares in its own header
and the inflated size of a deflated dataset are checked against a :class:`DecodeBudget` *before*
anything is decoded, and PNG/JPEG dimensions are checked before Pillow decompresses them. Any file
that cannot be used raises :class:`~auditkit.errors.UnreadableImage` whose message is a short
quarantine reason that never contains the file path or a header value (patient data); nothing else
escapes :func:`decode_image` for a bad file.

The window functions (:func:`window_linear`, :func:`window_linear_exact`, :func:`window_sigmoid`,
:func:`min_max_scale`, :func:`invert_monochrome1`) are plain functions so that the maths can be
tested with hand-computed values.

Note:
    pydicom's warnings may quote element values, so they are silenced while a DICOM file is read;
    this uses :func:`warnings.catch_warnings`, which is not thread-safe. Decode in worker processes
    (or a single thread), not in a thread pool.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.filereader
import pydicom.uid
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    convert_color_space,
)
from pydicom.pixels.utils import as_pixel_options
from pydicom.valuerep import VR

from auditkit.errors import ConfigError, UnreadableImage

__all__ = [
    "HEADER_ATTRIBUTES",
    "DecodeBudget",
    "DecodedImage",
    "HeaderInfo",
    "WindowSetting",
    "convert_elements",
    "decode_image",
    "header_info",
    "header_texts",
    "image_kind",
    "invert_monochrome1",
    "min_max_scale",
    "read_dicom_header",
    "to_channels",
    "window_linear",
    "window_linear_exact",
    "window_sigmoid",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.floating[Any]]

#: Non-identifying header attributes kept in :attr:`HeaderInfo.attributes` for later checks.
HEADER_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "Manufacturer",
    "StationName",
    "PhotometricInterpretation",
    "PixelSpacing",
    "Rows",
    "Columns",
    "BitsStored",
    "PatientSex",
    "PatientAge",
    "BodyPartExamined",
)

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


@dataclass(frozen=True)
class WindowSetting:
    """How DICOM intensities are mapped to ``[0, 1]`` (the spec's ``data.dicom.window``).

    Attributes:
        mode: ``"auto"``: the header's VOI LUT Sequence, else its Window Center/Width with its VOI
            LUT Function, else min-max over the image; ``"minmax"``: always min-max;
            ``"fixed"``: :attr:`center` and :attr:`width` with the LINEAR function.
        center: Window center for ``"fixed"`` (in modality units, e.g. HU).
        width: Window width for ``"fixed"``; at least 1.

    Raises:
        ConfigError: An unknown mode, or ``"fixed"`` without a finite center and a width >= 1.
    """

    mode: Literal["auto", "minmax", "fixed"] = "auto"
    center: float | None = None
    width: float | None = None

    def __post_init__(self) -> None:
        """Validate the combination of mode, center and width."""
        if self.mode not in ("auto", "minmax", "fixed"):
            raise ConfigError(f"data.dicom.window must be one of auto, minmax, fixed, got {self.mode!r}")
        if self.mode == "fixed":
            if self.center is None or not math.isfinite(self.center):
                raise ConfigError(
                    f"data.dicom.window center must be a finite number for mode fixed, got {self.center!r}"
                )
            if self.width is None or not math.isfinite(self.width) or self.width < 1:
                raise ConfigError(f"data.dicom.window width must be a number >= 1 for mode fixed, got {self.width!r}")


@dataclass
class HeaderInfo:
    """Identifiers and a few non-identifying attributes of a DICOM header.

    In memory only, never serialised: the raw values are patient data. Callers turn
    :attr:`patient_id` and the UIDs into surrogates before anything is written.

    Attributes:
        patient_id: PatientID, or ``None`` when missing or empty.
        study_uid: StudyInstanceUID, or ``None``.
        series_uid: SeriesInstanceUID, or ``None``.
        sop_uid: SOPInstanceUID, or ``None``.
        attributes: Keyword -> string value for the present, non-empty :data:`HEADER_ATTRIBUTES`;
            multi-valued attributes are joined with a backslash (``"0.5\\0.5"``).
    """

    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    attributes: dict[str, str]


@dataclass
class DecodedImage:
    """One decoded image, ready for the model.

    Attributes:
        pixels: ``float32`` array of shape ``(C, H, W)`` (the model input size), values in
            ``[0, 1]``.
        kind: ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"npy"``.
        source_shape: Shape of the decoded source array before channel changes and resizing
            (``(H, W)`` or ``(H, W, S)`` for DICOM and Pillow images, as stored for ``.npy``).
        header: Identifiers and attributes for DICOM, else ``None``.
        notes: Fixed phrases describing the conversions applied (no values), e.g.
            ``"min-max scaling (no window in header)"``.
        dataset: With ``decode_image(..., keep_header=True)``, the DICOM data set the pixels came
            from, as a header-only read gives it (nothing from the pixel data on, no read buffer;
            elements not used by the decoder stay
            raw: read them through :func:`header_texts` or :func:`convert_elements`), else
            ``None``. Patient data: keep it in memory only.
    """

    pixels: npt.NDArray[np.float32]
    kind: str
    source_shape: tuple[int, ...]
    header: HeaderInfo | None
    notes: tuple[str, ...] = ()
    dataset: Dataset | None = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------------------------------
# Window functions (DICOM PS3.3 C.11.2.1.2) and other plain intensity maps


def window_linear(values: npt.ArrayLike, center: float, width: float) -> FloatArray:
    """Apply the DICOM LINEAR VOI function, output range ``[0, 1]``.

    ``y = ((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped to ``[0, 1]`` (DICOM PS3.3 C.11.2.1.2.1):
    values ``<= c - 0.5 - (w - 1) / 2`` map to 0, values ``> c - 0.5 + (w - 1) / 2`` map to 1. A
    width of 1 is a threshold at ``c - 0.5``.

    Args:
        values: Input values (after the modality LUT), any shape.
        center: Window Center ``c``.
        width: Window Width ``w``, at least 1.

    Returns:
        ``float64`` array of the input's shape, values in ``[0, 1]``.

    Raises:
        UnreadableImage: ``width`` is below 1 or ``center``/``width`` is not finite.
    """
    x = np.asarray(values, dtype=np.float64)
    _check_window(center, width, minimum_width=1.0, function="LINEAR")
    if width == 1:
        return np.where(x <= center - 0.5, 0.0, 1.0)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def window_linear_exact(values: npt.ArrayLike, center: float, width: float) -> FloatArray:
    """Apply the DICOM LINEAR_EXACT VOI function, output range ``[0, 1]``.

    ``y = (x - c) / w + 0.5`` clipped to ``[0, 1]`` (DICOM PS3.3 C.11.2.1.3.2).

    Args:
        values: Input values (after the modality LUT), any shape.
        center: Window Center ``c``.
        width: Window Width ``w``, greater than 0.

    Returns:
        ``float64`` array of the input's shape, values in ``[0, 1]``.

    Raises:
        UnreadableImage: ``width`` is not positive or a parameter is not finite.
    """
    x = np.asarray(values, dtype=np.float64)
    _check_window(center, width, minimum_width=None, function="LINEAR_EXACT")
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)


def window_sigmoid(values: npt.ArrayLike, center: float, width: float) -> FloatArray:
    """Apply the DICOM SIGMOID VOI function, output range ``(0, 1)``.

    ``y = 1 / (1 + exp(-4 (x - c) / w))`` (DICOM PS3.3 C.11.2.1.3.1), evaluated as
    ``0.5 * (1 + tanh(2 (x - c) / w))``, which is the same function without overflow.

    Args:
        values: Input values (after the modality LUT), any shape.
        center: Window Center ``c``; ``y(c) = 0.5``.
        width: Window Width ``w``, greater than 0.

    Returns:
        ``float64`` array of the input's shape, values in ``[0, 1]``.

    Raises:
        UnreadableImage: ``width`` is not positive or a parameter is not finite.
    """
    x = np.asarray(values, dtype=np.float64)
    _check_window(center, width, minimum_width=None, function="SIGMOID")
    result: FloatArray = 0.5 * (1.0 + np.tanh(2.0 * (x - center) / width))
    return result


def min_max_scale(values: npt.ArrayLike) -> tuple[FloatArray, bool]:
    """Scale values linearly so that the minimum maps to 0 and the maximum to 1.

    Args:
        values: Finite input values, any shape.

    Returns:
        The scaled ``float64`` array, and ``True`` when the input was constant (the result is then
        all zeros).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x, True
    low = float(x.min())
    high = float(x.max())
    if high <= low:
        return np.zeros_like(x), True
    span = high - low
    if not math.isfinite(span):
        # The range overflows float64 (e.g. +-1e308): scale in two steps.
        return np.clip(x / 2 / (high / 2 - low / 2) - low / 2 / (high / 2 - low / 2), 0, 1), False
    return np.clip((x - low) / span, 0.0, 1.0), False


def invert_monochrome1(values: npt.ArrayLike) -> FloatArray:
    """Invert a MONOCHROME1 image (minimum is white) so that higher means brighter.

    Args:
        values: Values in ``[0, 1]``.

    Returns:
        ``1 - values`` as ``float64``.
    """
    return 1.0 - np.asarray(values, dtype=np.float64)


def _check_window(center: float, width: float, *, minimum_width: float | None, function: str) -> None:
    if not (math.isfinite(center) and math.isfinite(width)):
        raise UnreadableImage(f"WindowCenter and WindowWidth must be finite for the {function} VOI")
    if minimum_width is not None and width < minimum_width:
        raise UnreadableImage(f"WindowWidth must be at least 1 for the {function} VOI function")
    if width <= 0:
        raise UnreadableImage(f"WindowWidth must be positive for the {function} VOI function")


# --------------------------------------------------------------------------------------------------
# Channels and size


def to_channels(image: npt.NDArray[Any], channels: int) -> tuple[FloatArray, tuple[str, ...]]:
    """Reconcile a ``(C, H, W)`` image with the number of channels the model wants.

    Grayscale is repeated; RGB becomes grayscale by ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B);
    a fourth (alpha) channel is dropped when the model does not want four.

    Args:
        image: ``(C, H, W)`` array with values in ``[0, 1]``.
        channels: Channels the model expects (at least 1).

    Returns:
        The ``(channels, H, W)`` ``float64`` array and notes describing the conversion.

    Raises:
        UnreadableImage: The channel counts cannot be reconciled (e.g. 2 channels for an RGB model).
    """
    array = np.asarray(image, dtype=np.float64)
    notes: list[str] = []
    have = array.shape[0]
    if have == channels:
        return array, ()
    if have == 4 and channels != 4:
        array = array[:3]
        have = 3
        notes.append("alpha channel dropped")
    if have == channels:
        return array, tuple(notes)
    if have == 1:
        notes.append(f"grayscale repeated to {channels} channels")
        return np.repeat(array, channels, axis=0), tuple(notes)
    if have == 3 and channels == 1:
        luma = 0.299 * array[0] + 0.587 * array[1] + 0.114 * array[2]
        notes.append("RGB converted to grayscale")
        return luma[None], tuple(notes)
    raise UnreadableImage(f"image has {have} channels; the model expects {channels}")


def _resize(image: FloatArray, height: int, width: int) -> npt.NDArray[np.float32]:
    """Resize ``(C, H, W)`` with bilinear, antialiased interpolation and clip to ``[0, 1]``."""
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    if pixels.shape[1:] != (height, width):
        import torch  # imported here so that importing this module stays light

        with torch.no_grad():
            tensor = torch.from_numpy(pixels)
            resized = torch.nn.functional.interpolate(
                tensor[None],
                size=(height, width),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
        pixels = resized.numpy()
    out: npt.NDArray[np.float32] = np.clip(pixels, 0.0, 1.0).astype(np.float32, copy=False)
    return out


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
        raise UnreadableImage(f"a volume file ({_volume_suffix(file_path.name)}); this version reads 2-D images")
    if file_path.is_dir():
        raise UnreadableImage(
            "a folder, not a file (a DICOM series?); this version reads 2-D images, one file per manifest row"
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
def _quiet_pydicom() -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------------
# DICOM


def _check_deflate_bound(handle: BinaryIO, budget: DecodeBudget) -> None:
    """Refuse a deflated dataset whose inflated size exceeds ``budget.max_file_bytes``.

    pydicom inflates a Deflated Explicit VR Little Endian dataset in one unbounded call, so a small
    file could expand to gigabytes; this streams the inflation first and stops at the budget.
    ``handle`` is rewound to the start afterwards.
    """
    start = handle.tell()
    try:
        pydicom.filereader.read_preamble(handle, True)
        # There is no public API that leaves the handle at the end of the file meta group.
        file_meta = pydicom.filereader._read_file_meta_info(handle)
        transfer_syntax = file_meta.get("TransferSyntaxUID")
        if transfer_syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        limit = budget.max_file_bytes
        while chunk := handle.read(_INFLATE_CHUNK):
            pending = chunk
            while pending and not inflater.eof:  # bytes after the stream's end stay unconsumed
                inflated += len(inflater.decompress(pending, _INFLATE_CHUNK))
                if inflated > limit:
                    raise UnreadableImage(f"deflated dataset inflates beyond the budget of {limit} bytes")
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
    finally:
        handle.seek(start)


def _dcmread(handle: BinaryIO, *, stop_before_pixels: bool, budget: DecodeBudget) -> Dataset:
    """Read a DICOM data set from a binary handle, bounded; UnreadableImage if it is not DICOM."""
    head = handle.read(132)
    handle.seek(0)
    if not _looks_like_dicom(head):
        raise UnreadableImage("not a DICOM file: no 'DICM' prefix at offset 128 and no data element at the start")
    has_prefix = len(head) >= 132 and head[128:132] == b"DICM"
    _check_deflate_bound(handle, budget)
    return pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels, force=not has_prefix)


def read_dicom_header(
    path: str | os.PathLike[str], budget: DecodeBudget = DecodeBudget(), *, convert: bool = True
) -> Dataset:
    """Read a DICOM header without its pixel data, bounded by ``budget``.

    The file size is checked first, a deflated dataset's inflated size is bounded, and parsing stops
    before the pixel data element. By default every element is converted while pydicom's warnings
    and logging are silenced, so that later access does not log invalid values.

    Args:
        path: The DICOM file.
        budget: Size limits.
        convert: Convert every element now (the default). ``False`` leaves the elements raw, which
            is about three times faster for a caller that needs a few of them: it must then read
            them only through :func:`header_texts` (or within ``convert_elements``), never by plain
            attribute access, which would convert (and may log) outside the silenced period.

    Returns:
        The pydicom data set (file meta in ``file_meta``), without pixel data. Its values are
        patient data: keep them in memory and store surrogates only.

    Raises:
        UnreadableImage: The file is missing, too large, not DICOM or cannot be parsed; the reason
            contains neither the path nor header values.
    """
    file_path = Path(path)
    _check_regular_file(file_path, budget)
    try:
        with _quiet_pydicom(), file_path.open("rb") as handle:
            ds = _dcmread(handle, stop_before_pixels=True, budget=budget)
            if convert:
                # Convert every raw element now, while pydicom is silenced: converting later (on
                # first access) would warn and log invalid values, i.e. patient data.
                for _ in ds.iterall():
                    pass
            return ds
    except UnreadableImage:
        raise
    except Exception as exc:
        raise UnreadableImage(
            "cannot parse the DICOM header: " + _exception_reason(exc, _path_secrets(file_path))
        ) from None


def _text_value(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(item).strip() for item in value)
    elif isinstance(value, bytes):
        return None
    else:
        text = str(value).strip()
    return text or None


def convert_elements(ds: Dataset) -> None:
    """Convert every raw element of ``ds`` (read with ``convert=False``) while pydicom is silenced.

    Raises:
        Exception: whatever pydicom raises on an element it cannot convert (the elements before it
            stay converted); callers treat the header as unreadable.
    """
    with _quiet_pydicom():
        for _ in ds.iterall():
            pass


def header_texts(ds: Dataset, keywords: Iterable[str]) -> dict[str, str | None]:
    """Text values of the named elements, converting only those, while pydicom is silenced.

    A multi-valued element is joined with ``\\``; an absent, empty, binary or unconvertible
    element gives ``None``. The result does not depend on whether the other elements were
    converted (``read_dicom_header(convert=True)`` or :func:`convert_elements`) before.

    Args:
        ds: A data set from :func:`read_dicom_header`, converted or not.
        keywords: DICOM keywords (``"SeriesInstanceUID"``, ``"Rows"``).

    Returns:
        keyword -> text or ``None``. The values are patient data: measure with them in memory,
        never report them.
    """
    with _quiet_pydicom():
        return {keyword: _text_value(ds, keyword) for keyword in keywords}


def header_info(ds: Dataset) -> HeaderInfo:
    """Extract identifiers and :data:`HEADER_ATTRIBUTES` from a DICOM data set.

    Args:
        ds: A data set read by pydicom (pixel data not needed).

    Returns:
        The :class:`HeaderInfo`; empty or malformed values become ``None`` / are left out.
    """
    attributes = {keyword: text for keyword in HEADER_ATTRIBUTES if (text := _text_value(ds, keyword)) is not None}
    return HeaderInfo(
        patient_id=_text_value(ds, "PatientID"),
        study_uid=_text_value(ds, "StudyInstanceUID"),
        series_uid=_text_value(ds, "SeriesInstanceUID"),
        sop_uid=_text_value(ds, "SOPInstanceUID"),
        attributes=attributes,
    )


def _positive_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise UnreadableImage(f"missing required attribute {keyword}")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UnreadableImage(f"{keyword} is not an integer") from None
    if number < 1:
        raise UnreadableImage(f"{keyword} must be a positive integer")
    return number


def _first_float(value: object, keyword: str) -> float:
    if isinstance(value, MultiValue | list | tuple):
        if len(value) == 0:
            raise UnreadableImage(f"{keyword} is empty")
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UnreadableImage(f"{keyword} is not a number") from None
    if not math.isfinite(number):
        raise UnreadableImage(f"{keyword} is not finite")
    return number


def _check_declared_size(ds: Dataset, budget: DecodeBudget) -> tuple[int, int, bool]:
    """Refuse missing pixel data, multi-frame images, declared sizes over the budget and native
    pixel data whose length disagrees with the header.

    Returns:
        Rows, Columns, and whether native pixel data has trailing bytes (ignored).
    """
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise UnreadableImage("no pixel data (PixelData element missing)")
    rows = _positive_int(ds, "Rows")
    columns = _positive_int(ds, "Columns")
    samples = _positive_int(ds, "SamplesPerPixel", default=1)
    bits_allocated = _positive_int(ds, "BitsAllocated")
    if bits_allocated > 64 or (bits_allocated != 1 and bits_allocated % 8):
        raise UnreadableImage("BitsAllocated must be 1 or a multiple of 8 up to 64")
    frames = _positive_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise UnreadableImage(
            f"multi-frame image with {frames} frames (a volume or cine loop); this version reads single-frame 2-D"
            " images"
        )
    declared = math.ceil(rows * columns * samples * frames * bits_allocated / 8)
    if declared > budget.max_pixel_bytes:
        raise UnreadableImage(
            f"declared pixel data of {declared} bytes (Rows x Columns x SamplesPerPixel x "
            f"NumberOfFrames x BitsAllocated / 8) exceeds the budget of "
            f"{budget.max_pixel_bytes} bytes"
        )
    if rows * columns > budget.max_pixels:
        raise UnreadableImage(f"declared image of {rows * columns} pixels exceeds the budget of {budget.max_pixels}")
    transfer_syntax = _transfer_syntax(ds)
    trailing = False
    if transfer_syntax is not None and not transfer_syntax.is_transfer_syntax:
        raise UnreadableImage(_unknown_syntax_reason(transfer_syntax))
    if transfer_syntax is not None and not transfer_syntax.is_encapsulated:
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
        if photometric == "YBR_FULL_422" and samples == 3:
            declared = declared // 3 * 2  # native 4:2:2 stores two samples per pixel
        trailing = _check_native_length(ds, declared)
    _check_codestream_size(ds, rows * columns * samples)
    return rows, columns, trailing


def _check_native_length(ds: Dataset, declared: int) -> bool:
    """Refuse native (uncompressed) pixel data shorter than the header declares, or holding more
    than one frame's worth while the image is single-frame (a multi-frame image without
    NumberOfFrames); return whether it has trailing bytes (less than a frame), which are ignored.
    """
    keyword = next(k for k in _PIXEL_DATA_KEYWORDS if k in ds)
    value = ds[keyword].value
    if value is None or (isinstance(value, bytes | bytearray) and len(value) == 0):
        raise UnreadableImage(f"{keyword} is empty")
    if not isinstance(value, bytes | bytearray):
        return False  # an undefined-length (encapsulated) value under a native syntax: the decoder refuses it
    actual = len(value)
    what = "Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated / 8"
    if actual < declared:
        raise UnreadableImage(f"{keyword} holds {actual} bytes, fewer than the {declared} bytes {what} declare")
    if actual >= 2 * declared:
        raise UnreadableImage(
            f"{keyword} holds {actual} bytes, enough for {actual // declared} frames of the {declared} bytes"
            f" {what} declare, but NumberOfFrames is absent or 1; expected a single frame"
        )
    return actual > declared + 1  # one byte pads an odd length to even


def _unknown_syntax_reason(uid: pydicom.uid.UID) -> str:
    # A transfer syntax UID names an encoding, not a patient: safe to quote.
    kind = "private" if uid.is_private else "unknown"
    return f"transfer syntax {str(uid)!r} is {kind}; no pydicom decoder supports it"


def _transfer_syntax(ds: Dataset) -> pydicom.uid.UID | None:
    """The data set's transfer syntax: from its file meta, else from how pydicom parsed it."""
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if transfer_syntax:
        return pydicom.uid.UID(str(transfer_syntax))
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return None
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def _check_codestream_size(ds: Dataset, declared_samples: int) -> None:
    """Refuse a JPEG/JPEG-LS/JPEG 2000 frame whose own header is larger than Rows x Columns.

    Decoders allocate what the codestream says, not what the DICOM header says, so a 64 x 64 image
    could otherwise inflate to the codec's limits.
    """
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not transfer_syntax or not pydicom.uid.UID(str(transfer_syntax)).is_encapsulated:
        return
    pixel_data = ds.get("PixelData")
    if not isinstance(pixel_data, bytes | bytearray):
        return
    frame = next(generate_frames(bytes(pixel_data), number_of_frames=1), b"")
    dimensions = _codestream_dimensions(frame)
    if dimensions is None:
        return
    rows, columns, components = dimensions
    if rows * columns * max(components, 1) > declared_samples:
        raise UnreadableImage("compressed frame is larger than declared by Rows, Columns and SamplesPerPixel")


def _codestream_dimensions(frame: bytes) -> tuple[int, int, int] | None:
    """Return ``(rows, columns, components)`` from a JPEG/JPEG-LS SOF or JPEG 2000 SIZ marker.

    Returns ``None`` when the frame is not one of these codestreams or its header cannot be parsed
    (the decoder then reports the problem).
    """
    if frame[:2] == b"\xff\xd8":
        offset = 2
        while offset + 10 <= len(frame):
            marker = frame[offset : offset + 2]
            if marker[0] != 0xFF:
                return None
            if marker in _JPEG_SOF_MARKERS:
                rows = int.from_bytes(frame[offset + 5 : offset + 7], "big")
                columns = int.from_bytes(frame[offset + 7 : offset + 9], "big")
                return rows, columns, frame[offset + 9]
            length = int.from_bytes(frame[offset + 2 : offset + 4], "big")
            if length < 2:
                return None
            offset += 2 + length
        return None
    offset = 0
    if frame[:8] == b"\x00\x00\x00\x0cjP  ":
        # JP2 file format: walk the boxes to the contiguous codestream box.
        while offset + 8 <= len(frame):
            box_length = int.from_bytes(frame[offset : offset + 4], "big")
            if frame[offset + 4 : offset + 8] == b"jp2c":
                offset += 8
                break
            if box_length < 8:
                return None
            offset += box_length
        else:
            return None
    if frame[offset : offset + 4] != b"\xff\x4f\xff\x51" or len(frame) < offset + 42:
        return None
    x_size = int.from_bytes(frame[offset + 8 : offset + 12], "big")
    y_size = int.from_bytes(frame[offset + 12 : offset + 16], "big")
    x_origin = int.from_bytes(frame[offset + 16 : offset + 20], "big")
    y_origin = int.from_bytes(frame[offset + 20 : offset + 24], "big")
    components = int.from_bytes(frame[offset + 40 : offset + 42], "big")
    return max(y_size - y_origin, 0), max(x_size - x_origin, 0), components


def _decode_dicom_pixels(ds: Dataset) -> tuple[npt.NDArray[Any], dict[str, str | int]]:
    """Decode the (single-frame) pixel data; return the array and its image pixel properties."""
    uid = _transfer_syntax(ds)
    if uid is None:
        raise UnreadableImage("transfer syntax unknown (no TransferSyntaxUID in file meta)")
    if not uid.is_transfer_syntax:
        raise UnreadableImage(_unknown_syntax_reason(uid))
    file_meta = getattr(ds, "file_meta", None)
    if not (file_meta is not None and file_meta.get("TransferSyntaxUID")):
        # A data set without file meta: its encoding is known from how it was parsed.
        if file_meta is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise UnreadableImage(f"transfer syntax {uid.name!r} is not supported by any pydicom decoder") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        hint = f" (options: {missing})" if missing else ""
        raise UnreadableImage(f"no decoder plugin is installed for the transfer syntax {uid.name!r}{hint}")
    options = as_pixel_options(ds)
    array, properties = decoder.as_array(ds, raw=False, **options)
    return array, properties


def _voi_lut_sequence(values: FloatArray, ds: Dataset) -> FloatArray:
    """Apply the first VOI LUT Sequence item and scale by the LUT's output range."""
    item = ds.VOILUTSequence[0]
    descriptor = item.LUTDescriptor
    bits = int(descriptor[2])
    mapped = np.asarray(apply_voi(values, ds, index=0), dtype=np.float64)
    top = float(2**bits - 1)
    if mapped.size and float(mapped.max()) > top:
        # Some writers declare fewer bits than the LUT entries use; never exceed [0, 1].
        top = float(mapped.max())
    result: FloatArray = np.clip(mapped / top, 0.0, 1.0)
    return result


def _window_from_header(values: FloatArray, ds: Dataset) -> tuple[FloatArray, str] | None:
    center_value = ds.get("WindowCenter")
    width_value = ds.get("WindowWidth")
    if center_value in (None, "") or width_value in (None, ""):
        return None
    center = _first_float(center_value, "WindowCenter")
    width = _first_float(width_value, "WindowWidth")
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function == "LINEAR":
        return window_linear(values, center, width), "header window (LINEAR)"
    if function == "LINEAR_EXACT":
        return window_linear_exact(values, center, width), "header window (LINEAR_EXACT)"
    if function == "SIGMOID":
        return window_sigmoid(values, center, width), "header window (SIGMOID)"
    raise UnreadableImage("VOILUTFunction is not one of LINEAR, LINEAR_EXACT, SIGMOID")


def _grayscale_dicom(
    raw: npt.NDArray[Any], ds: Dataset, photometric: str, window: WindowSetting
) -> tuple[FloatArray, list[str]]:
    notes: list[str] = []
    modality = apply_modality_lut(raw, ds)
    values = np.asarray(modality, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise UnreadableImage("non-finite values after the modality LUT")
    result: FloatArray
    if window.mode == "fixed":
        assert window.center is not None and window.width is not None  # validated by WindowSetting
        result = window_linear(values, window.center, window.width)
        notes.append("fixed window (LINEAR)")
    elif window.mode == "minmax":
        result, constant = min_max_scale(values)
        notes.append("min-max scaling")
        if constant:
            notes.append("constant image; all zeros")
    elif ds.get("VOILUTSequence"):
        result = _voi_lut_sequence(values, ds)
        notes.append("VOI LUT Sequence applied")
    elif (windowed := _window_from_header(values, ds)) is not None:
        result, note = windowed
        notes.append(note)
    else:
        result, constant = min_max_scale(values)
        notes.append("min-max scaling (no window in header)")
        if constant:
            notes.append("constant image; all zeros")
    if not np.all(np.isfinite(result)):
        raise UnreadableImage("non-finite values after the VOI transform")
    if photometric == "MONOCHROME1":
        result = invert_monochrome1(result)
        notes.append("MONOCHROME1 inverted")
    return result[None], notes


def _colour_dicom(
    raw: npt.NDArray[Any], ds: Dataset, photometric: str, bits_stored: int
) -> tuple[FloatArray, list[str]]:
    notes: list[str] = []
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(raw, ds))
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
        notes.append("palette colour LUT applied")
        values = np.asarray(rgb, dtype=np.float64) / top
    else:
        if photometric.startswith("YBR"):
            # pydicom converts YBR_FULL(_422) itself; anything left over is converted here.
            raw = convert_color_space(raw, photometric, "RGB")
            notes.append(f"{photometric} converted to RGB")
        elif photometric != "RGB":
            raise UnreadableImage(
                "PhotometricInterpretation is not one of MONOCHROME1, MONOCHROME2, RGB, YBR_*, PALETTE COLOR"
            )
        values = np.asarray(raw, dtype=np.float64) / float(2**bits_stored - 1)
    if values.ndim != 3 or values.shape[-1] != 3:
        raise UnreadableImage("colour image does not have three samples per pixel")
    if not np.all(np.isfinite(values)):
        raise UnreadableImage("non-finite values in the colour image")
    return np.clip(np.moveaxis(values, -1, 0), 0.0, 1.0), notes


# The first pixel data element: a header read stops before it (``stop_before_pixels``).
_FIRST_PIXEL_TAG = 0x7FE00008


def _as_header(ds: Dataset) -> Dataset:
    """``ds`` as a header-only read would give it, in place: without its pixel data, without any
    element after it (trailing padding, private groups, signatures: what ``stop_before_pixels``
    never reads) and without the buffer it was read from."""
    # keys(), not iteration: iterating a Dataset converts every element it yields.
    for tag in [tag for tag in ds.keys() if tag >= _FIRST_PIXEL_TAG]:  # noqa: SIM118
        del ds[tag]
    if isinstance(ds, pydicom.dataset.FileDataset):
        ds.buffer = None  # the whole file's bytes
    return ds


def _decode_dicom(
    path: Path, window: WindowSetting, budget: DecodeBudget, *, keep_header: bool = False
) -> tuple[FloatArray, tuple[int, ...], HeaderInfo, list[str], Dataset | None]:
    data = _read_bytes(path, budget)
    secrets = _path_secrets(path)
    with _quiet_pydicom():
        ds: Dataset | None = None
        try:
            ds = _dcmread(io.BytesIO(data), stop_before_pixels=False, budget=budget)
            image, source_shape, notes = _dicom_to_image(ds, window, budget)
            info = header_info(ds)
            return image, source_shape, info, notes, (_as_header(ds) if keep_header else None)
        except UnreadableImage:
            raise
        except InvalidDicomError as exc:
            raise UnreadableImage("not a DICOM file: " + _exception_reason(exc, secrets)) from None
        except Exception as exc:
            reason = _exception_reason(exc, [*secrets, *_dataset_secrets(ds)])
            raise UnreadableImage(f"DICOM decoding failed: {reason}") from None


def _dicom_to_image(
    ds: Dataset, window: WindowSetting, budget: DecodeBudget
) -> tuple[FloatArray, tuple[int, ...], list[str]]:
    """Check the budget, decode the pixels and map them to ``(C, H, W)`` in ``[0, 1]``."""
    rows, columns, trailing = _check_declared_size(ds, budget)
    raw, properties = _decode_dicom_pixels(ds)
    samples = int(properties.get("samples_per_pixel", 1))
    photometric = str(properties.get("photometric_interpretation", "")).strip().upper()
    bits_stored = int(properties.get("bits_stored", properties.get("bits_allocated", 8)))
    if raw.ndim not in (2, 3):
        raise UnreadableImage(f"decoded pixel array has {raw.ndim} dimensions; expected 2")
    if tuple(raw.shape[:2]) != (rows, columns) or (raw.ndim == 3) != (samples > 1):
        raise UnreadableImage(
            f"decoded pixel array has shape {tuple(int(n) for n in raw.shape)}; Rows, Columns and"
            f" SamplesPerPixel declare ({rows}, {columns}{f', {samples}' if samples > 1 else ''})"
        )
    source_shape = tuple(int(n) for n in raw.shape)
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise UnreadableImage("non-finite values in the pixel data")
    if samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2", ""):
        image, notes = _grayscale_dicom(raw, ds, photometric, window)
    elif photometric == "PALETTE COLOR" or samples == 3:
        image, notes = _colour_dicom(raw, ds, photometric, bits_stored)
    else:
        raise UnreadableImage(f"unsupported combination of SamplesPerPixel ({samples}) and PhotometricInterpretation")
    if trailing:
        notes.append("trailing bytes after the pixel data ignored")
    return image, source_shape, notes


# --------------------------------------------------------------------------------------------------
# PNG / JPEG


def _decode_pillow(path: Path, kind: str, budget: DecodeBudget) -> tuple[FloatArray, tuple[int, ...], list[str]]:
    data = _read_bytes(path, budget)
    # A truncated image must be quarantined, never padded: other libraries (WeasyPrint, on
    # import) switch this process-wide flag on, so it is pinned off for every decode.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    formats = ["PNG"] if kind == "png" else ["JPEG"]
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise UnreadableImage("image has zero width or height")
            if width * height > budget.max_pixels:
                raise UnreadableImage(f"image of {width * height} pixels exceeds the budget of {budget.max_pixels}")
            frames = int(getattr(image, "n_frames", 1))
            if frames > 1:
                raise UnreadableImage(
                    f"multi-frame image with {frames} frames (a volume or cine loop); this version reads single-frame 2-D"
                    " images"
                )
            image.load()
            array, notes = _pillow_to_array(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage("image exceeds Pillow's decompression-bomb limit") from None
    except Exception as exc:
        raise UnreadableImage(
            f"{kind.upper()} decoding failed: {_exception_reason(exc, _path_secrets(path))}"
        ) from None
    source_shape = tuple(int(n) for n in array.shape)
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if not np.all(np.isfinite(array)):
        raise UnreadableImage("non-finite values in the image")
    return np.clip(array, 0.0, 1.0), source_shape, notes


def _pillow_to_array(image: Image.Image) -> tuple[FloatArray, list[str]]:
    """Map a loaded Pillow image to ``(H, W)`` or ``(H, W, 3)`` float64 in ``[0, 1]``."""
    mode = image.mode
    notes: list[str] = []
    if mode == "1":
        return np.asarray(image, dtype=np.float64), notes
    if mode == "L":
        return np.asarray(image, dtype=np.float64) / 255.0, notes
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.float64) / 65535.0, notes
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.format == "PNG":
            # PNG stores at most 16 bits per grey sample; older Pillow opens those as mode I.
            return values / 65535.0, notes
        scaled, constant = min_max_scale(values)
        notes.append("min-max scaling (32-bit integer image)")
        if constant:
            notes.append("constant image; all zeros")
        return scaled, notes
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise UnreadableImage("non-finite values in the image")
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            return values, notes
        scaled, constant = min_max_scale(values)
        notes.append("min-max scaling (float image outside [0, 1])")
        if constant:
            notes.append("constant image; all zeros")
        return scaled, notes
    if mode in ("LA", "La"):
        notes.append("alpha channel dropped")
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0, notes
    if mode == "RGB":
        return np.asarray(image, dtype=np.float64) / 255.0, notes
    if mode in ("P", "PA"):
        notes.append("palette image converted to RGB")
        converted = image.convert("RGBA").convert("RGB")
        return np.asarray(converted, dtype=np.float64) / 255.0, notes
    if mode in ("RGBA", "RGBa", "RGBX"):
        if mode != "RGBX":
            notes.append("alpha channel dropped")
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0, notes
    # CMYK, YCbCr, LAB, HSV and other 8-bit modes: Pillow's own conversion to RGB.
    notes.append(f"{mode} converted to RGB")
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0, notes


# --------------------------------------------------------------------------------------------------
# NumPy


def _decode_npy(path: Path, budget: DecodeBudget) -> tuple[FloatArray, tuple[int, ...], list[str]]:
    _check_regular_file(path, budget)
    notes: list[str] = []
    secrets = _path_secrets(path)
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        text = str(exc)
        if "pickle" in text.lower() or "object" in text.lower():
            raise UnreadableImage("object arrays (pickled data) are refused; save a numeric array") from None
        reason = _exception_reason(exc, secrets)
        raise UnreadableImage(f"not a usable .npy file: {reason}") from None
    except Exception as exc:
        reason = _exception_reason(exc, secrets)
        raise UnreadableImage(f"not a usable .npy file: {reason}") from None
    if not isinstance(loaded, np.ndarray):
        close = getattr(loaded, "close", None)
        if callable(close):
            close()
        raise UnreadableImage("not a .npy array (an .npz archive or other container)")
    try:
        return _npy_to_image(loaded, budget, notes)
    except UnreadableImage:
        raise
    except Exception as exc:
        raise UnreadableImage(f".npy decoding failed: {_exception_reason(exc, secrets)}") from None
    finally:
        del loaded


def _npy_to_image(
    loaded: npt.NDArray[Any], budget: DecodeBudget, notes: list[str]
) -> tuple[FloatArray, tuple[int, ...], list[str]]:
    dtype = loaded.dtype
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise UnreadableImage(f"array dtype kind {dtype.kind!r} is not numeric; expected bool, int or float")
    source_shape = tuple(int(n) for n in loaded.shape)
    channel_counts = (1, 3, 4)
    first_is_channels = loaded.ndim == 3 and loaded.shape[0] in channel_counts
    last_is_channels = loaded.ndim == 3 and loaded.shape[-1] in channel_counts
    if first_is_channels and last_is_channels:
        # (4, 5, 3) or (3, 64, 4): the channel axis is the shorter one; a tie is read as (C, H, W).
        last_is_channels = loaded.shape[-1] < loaded.shape[0]
        first_is_channels = not last_is_channels
    if loaded.ndim == 2:
        chw = loaded[None]
    elif first_is_channels:
        chw = loaded
    elif last_is_channels:
        chw = np.moveaxis(loaded, -1, 0)
        notes.append("channels-last array transposed")
    elif loaded.ndim == 3:
        raise UnreadableImage(
            f"3-D array {source_shape}: a volume (D, H, W)? This version reads 2-D images: (H, W), (C, H, W) or"
            " (H, W, C) with C in {1, 3, 4}"
        )
    else:
        raise UnreadableImage(
            f"array shape has {loaded.ndim} dimensions; expected (H, W), (C, H, W) or (H, W, C) with C in {{1, 3, 4}}"
        )
    height, width = int(chw.shape[1]), int(chw.shape[2])
    if height < 1 or width < 1:
        raise UnreadableImage("array has zero height or width")
    if height * width > budget.max_pixels:
        raise UnreadableImage(f"array of {height * width} pixels exceeds the budget of {budget.max_pixels}")
    if loaded.nbytes > budget.max_pixel_bytes:
        raise UnreadableImage(f"array of {loaded.nbytes} bytes exceeds the budget of {budget.max_pixel_bytes} bytes")
    values = np.array(chw, dtype=np.float64)  # copies out of the memory map
    if not np.all(np.isfinite(values)):
        raise UnreadableImage("non-finite values in the array")
    if dtype.kind == "b":
        return values, source_shape, notes
    if dtype == np.uint8:
        return values / 255.0, source_shape, notes
    if dtype == np.uint16:
        return values / 65535.0, source_shape, notes
    if dtype.kind == "f" and (values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)):
        return values, source_shape, notes
    scaled, constant = min_max_scale(values)
    notes.append(f"min-max scaling ({dtype.name} array)")
    if constant:
        notes.append("constant image; all zeros")
    return scaled, source_shape, notes


# --------------------------------------------------------------------------------------------------
# Entry point


def decode_image(
    path: str | os.PathLike[str],
    *,
    channels: int,
    height: int,
    width: int,
    window: WindowSetting = WindowSetting(),
    budget: DecodeBudget = DecodeBudget(),
    keep_header: bool = False,
) -> DecodedImage:
    """Decode one image file into the model input, ``float32`` ``(channels, height, width)``.

    DICOM: modality LUT, VOI transform chosen by ``window`` (see :class:`WindowSetting`),
    MONOCHROME1 inversion; colour DICOM is converted to RGB and scaled by its bit depth. PNG/JPEG:
    8-bit /255, 16-bit /65535, 32-bit integer and out-of-range float min-max. ``.npy``: uint8 /255,
    uint16 /65535, other integers and floats outside [0, 1] min-max, bool as 0/1. Then channels are
    reconciled (:func:`to_channels`), the image is resized bilinearly with antialiasing and clipped
    to [0, 1].

    Args:
        path: The image file (kind from :func:`image_kind`).
        channels: Channels the model expects.
        height: Model input height.
        width: Model input width.
        window: DICOM intensity window.
        budget: Size limits checked before decoding.
        keep_header: Keep the DICOM data set, without its pixel data, in
            :attr:`DecodedImage.dataset`, so header checks need not read the file again.

    Returns:
        The :class:`DecodedImage`.

    Raises:
        UnreadableImage: The file cannot be used; the message is the quarantine reason and contains
            neither the path nor header values.
        ConfigError: ``channels``, ``height`` or ``width`` is not a positive integer.
    """
    for name, value in (("channels", channels), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.input.{name} must be a positive integer, got {value!r}")
    file_path = Path(path)
    kind = image_kind(file_path)
    header: HeaderInfo | None = None
    dataset: Dataset | None = None
    if kind == "dicom":
        image, source_shape, header, notes, dataset = _decode_dicom(file_path, window, budget, keep_header=keep_header)
    elif kind in ("png", "jpeg"):
        image, source_shape, notes = _decode_pillow(file_path, kind, budget)
    else:
        image, source_shape, notes = _decode_npy(file_path, budget)
    image, channel_notes = to_channels(image, channels)
    pixels = _resize(image, height, width)
    if not np.all(np.isfinite(pixels)):
        raise UnreadableImage("non-finite values after resizing")
    return DecodedImage(
        pixels=pixels,
        kind=kind,
        source_shape=source_shape,
        header=header,
        notes=(*notes, *channel_notes),
        dataset=dataset,
    )
