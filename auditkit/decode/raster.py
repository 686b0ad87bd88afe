"""PNG, JPEG and NumPy files: dimensions checked before decompression, then to model input."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile

from auditkit.decode.budget import DecodeBudget, _check_regular_file, _exception_reason, _path_secrets, _read_bytes
from auditkit.decode.intensity import FloatArray, min_max_scale
from auditkit.errors import UnreadableImage

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
                    f"multi-frame image with {frames} frames (a volume or cine loop); single-frame 2-D images"
                    " are read (volumes: a DICOM series folder, NIfTI or .npy with model.input.depth)"
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
            f"3-D array {source_shape}: a volume (D, H, W)? A 2-D model reads (H, W), (C, H, W) or (H, W, C)"
            " with C in {1, 3, 4} (set model.input.depth to audit a 3-D model on volumes)"
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
