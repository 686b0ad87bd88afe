"""DICOM: bounded header-only reads, header values as text, and pixels through the modality and VOI
transforms, with every declared size checked against the budget first."""

from __future__ import annotations

import io
import math
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.filereader
import pydicom.uid
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

from auditkit.decode.budget import (
    _INFLATE_CHUNK,
    _JPEG_SOF_MARKERS,
    _PIXEL_DATA_KEYWORDS,
    DecodeBudget,
    _check_regular_file,
    _dataset_secrets,
    _exception_reason,
    _looks_like_dicom,
    _path_secrets,
    _read_bytes,
    quiet_pydicom,
)
from auditkit.decode.intensity import (
    FloatArray,
    WindowSetting,
    invert_monochrome1,
    min_max_scale,
    window_linear,
    window_linear_exact,
    window_sigmoid,
)
from auditkit.errors import UnreadableImage

#: Non-identifying header attributes kept in :attr:`HeaderInfo.attributes` for later checks.
HEADER_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "StudyDate",
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
        with quiet_pydicom(), file_path.open("rb") as handle:
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
    with quiet_pydicom():
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
    with quiet_pydicom():
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
            f"multi-frame image with {frames} frames (a volume or cine loop); single-frame 2-D images are read"
            " (volumes: a DICOM series folder, NIfTI or .npy with model.input.depth)"
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
    with quiet_pydicom():
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
