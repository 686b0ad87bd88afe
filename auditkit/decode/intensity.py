"""Intensity maps and geometry: the DICOM windows (PS3.3 C.11.2.1.2), min-max scaling, MONOCHROME1
inversion, channel reconciliation and resizing - plain functions tested with hand-computed values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from auditkit.errors import ConfigError, UnreadableImage

FloatArray = npt.NDArray[np.floating[Any]]


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
