"""Decoding: one image file (DICOM, PNG, JPEG or NumPy) into the model-input array, safely.

One public entry point, :func:`decode_image`, over four modules: :mod:`.budget` (file kinds,
budgets, safe reads, reasons without patient data), :mod:`.intensity` (windows, scaling,
channels, resizing), :mod:`.dicom` (headers and pixels) and :mod:`.raster` (PNG, JPEG, NumPy). A
new format is a reader module returning a float array and its source shape, registered by kind in
:func:`.budget.image_kind` and :func:`.image.decode_image` (docs/architecture.md, "How to add").

Volumes have their own entry points in :mod:`.volume`: :func:`decode_volume` (NIfTI, ``.npy``
``(D, H, W)``, a folder holding one DICOM series) to ``float32`` ``(C, D, H, W)`` in ``[0, 1]``
with its :class:`VolumeGeometry` (spacing in mm, LPS affine, canonical orientation),
:func:`decode_label_map` for 3-D label maps and :func:`resample_volume` to the model's input.

Every image reaches the checks as ``float32`` ``(C, H, W)`` in ``[0, 1]`` at the model's input
size. DICOM pixels go through the modality LUT (Rescale Slope/Intercept or a Modality LUT
Sequence), the VOI transform (VOI LUT Sequence, or Window Center/Width with the VOI LUT Function of
DICOM PS3.3 C.11.2.1.2, or min-max scaling when the header has neither), MONOCHROME1 inversion,
then channel reconciliation and bilinear, antialiased resizing.

Reads are bounded (docs/hardening.md): the file size, the declared pixel size (Rows x Columns x
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
    pydicom's warnings and log records may quote element values, so they are silenced while a
    DICOM file is read (:func:`quiet_pydicom`, reference-counted so a thread pool shares one
    silenced period).
"""

from __future__ import annotations

from auditkit.decode.budget import DecodeBudget, image_kind, quiet_pydicom
from auditkit.decode.dicom import (
    HEADER_ATTRIBUTES,
    HeaderInfo,
    convert_elements,
    header_info,
    header_texts,
    read_dicom_header,
)
from auditkit.decode.image import DecodedImage, decode_image, decode_volume_image
from auditkit.decode.intensity import (
    WindowSetting,
    invert_monochrome1,
    min_max_scale,
    to_channels,
    window_linear,
    window_linear_exact,
    window_sigmoid,
)
from auditkit.decode.volume import (
    DecodedLabelMap,
    DecodedVolume,
    VolumeBudget,
    VolumeGeometry,
    decode_label_map,
    decode_volume,
    resample_volume,
    volume_kind,
)

__all__ = [
    "HEADER_ATTRIBUTES",
    "DecodeBudget",
    "DecodedImage",
    "DecodedLabelMap",
    "DecodedVolume",
    "HeaderInfo",
    "VolumeBudget",
    "VolumeGeometry",
    "WindowSetting",
    "convert_elements",
    "decode_image",
    "decode_label_map",
    "decode_volume",
    "decode_volume_image",
    "header_info",
    "header_texts",
    "image_kind",
    "invert_monochrome1",
    "min_max_scale",
    "quiet_pydicom",
    "read_dicom_header",
    "resample_volume",
    "to_channels",
    "volume_kind",
    "window_linear",
    "window_linear_exact",
    "window_sigmoid",
]
