"""2-D segmentation references: a PNG or ``.npy`` label map of class indices, read with the image
decoders' bounds and resized to the model input by nearest neighbour (values are copied, never
invented).

A label map is refused, with a reason that names what is wrong and what was expected (never a path
or a value beyond the offending class index), when it is not a PNG or ``.npy`` file (a JPEG's lossy
compression invents labels at every edge), when its pixels are not integers (a float map holding
``1.0`` is read, ``0.5`` is not), when it holds a value outside ``0 .. num_classes - 1``, or when it
is larger than the budget. Whether it has its image's size is the caller's comparison
(:func:`auditkit.data.decode_all`): the map must lie on the image as stored.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile

from auditkit.decode.budget import DecodeBudget, _check_regular_file, _exception_reason, _path_secrets, _read_bytes
from auditkit.errors import ConfigError, UnreadableImage

__all__ = ["DecodedLabels", "decode_label_image", "resize_labels"]

_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")


@dataclass
class DecodedLabels:
    """One 2-D reference label map.

    Attributes:
        labels: ``int16`` ``(H, W)`` class indices, as stored.
        kind: ``"png"`` or ``"npy"``.
    """

    labels: npt.NDArray[np.int16]
    kind: str

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])


def decode_label_image(
    path: str | os.PathLike[str], *, num_classes: int, budget: DecodeBudget = DecodeBudget()
) -> DecodedLabels:
    """Read a 2-D label map of class indices (PNG: modes 1, L, P, I, I;16; ``.npy``: ``(H, W)``).

    Args:
        path: The map.
        num_classes: Every value must lie in ``0 .. num_classes - 1``.
        budget: Size limits, as for images.

    Raises:
        UnreadableImage: The map cannot be used; the message is the quarantine reason.
        ConfigError: ``num_classes`` is not a positive integer.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    file_path = Path(path)
    suffix = file_path.suffix.lower()
    if suffix == ".png":
        raw, kind = _read_png(file_path, budget), "png"
    elif suffix == ".npy":
        raw, kind = _read_npy(file_path, budget), "npy"
    else:
        shown = suffix or "no suffix"
        raise UnreadableImage(
            f"a label map must be a PNG or .npy array of class indices, got {shown}"
            + (" (JPEG's lossy compression changes labels at every edge)" if suffix in (".jpg", ".jpeg") else "")
        )
    labels = _as_indices(raw)
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            found = low if low < 0 else high
            raise UnreadableImage(
                f"label map holds the value {found}, outside the classes 0..{num_classes - 1}; expected class indices"
            )
    return DecodedLabels(labels=labels.astype(np.int16), kind=kind)


def resize_labels(labels: npt.NDArray[Any], height: int, width: int) -> npt.NDArray[np.int16]:
    """Nearest-neighbour resize with pixel-centre alignment: new pixel ``j`` takes old pixel
    ``floor((j + 0.5) * old / new)`` along each axis (PyTorch's ``nearest-exact``)."""
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.intp), labels.shape[1] - 1)
    return np.ascontiguousarray(labels[rows][:, cols], dtype=np.int16)


def _read_png(path: Path, budget: DecodeBudget) -> npt.NDArray[Any]:
    data = _read_bytes(path, budget)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated map is refused, never padded
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise UnreadableImage("label map has zero width or height")
            if width * height > budget.max_pixels:
                raise UnreadableImage(f"label map of {width * height} pixels exceeds the budget of {budget.max_pixels}")
            if int(getattr(image, "n_frames", 1)) > 1:
                raise UnreadableImage("label map has several frames; expected one 2-D map")
            if image.mode not in _LABEL_MODES:
                raise UnreadableImage(
                    f"label map in PNG mode {image.mode} (colour); expected one channel of class indices"
                    " (modes L, P, I or I;16)"
                )
            image.load()
            return np.array(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage("label map exceeds Pillow's decompression-bomb limit") from None
    except Exception as exc:
        raise UnreadableImage(f"PNG label map decoding failed: {_exception_reason(exc, _path_secrets(path))}") from None


def _read_npy(path: Path, budget: DecodeBudget) -> npt.NDArray[Any]:
    _check_regular_file(path, budget)
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        reason = _exception_reason(exc, _path_secrets(path))
        if "pickle" in reason.lower() or "object" in reason.lower():
            raise UnreadableImage("object arrays (pickled data) are refused; save a numeric label map") from None
        raise UnreadableImage(f"not a usable .npy label map: {reason}") from None
    if not isinstance(loaded, np.ndarray):
        raise UnreadableImage("not a .npy array (an .npz archive or other container)")
    if loaded.ndim != 2:
        raise UnreadableImage(f"label map of shape {tuple(loaded.shape)}; expected a 2-D (H, W) array of class indices")
    if loaded.size > budget.max_pixels:
        raise UnreadableImage(f"label map of {loaded.size} pixels exceeds the budget of {budget.max_pixels}")
    return np.array(loaded)


def _as_indices(values: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    dtype = values.dtype
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise UnreadableImage(f"label map dtype kind {dtype.kind!r} is not numeric; expected integer class indices")
    if dtype.kind == "f" and not (np.all(np.isfinite(values)) and np.all(values == np.round(values))):
        raise UnreadableImage("label map holds values that are not integers; expected class indices")
    return values.astype(np.int64)
