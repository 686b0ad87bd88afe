"""The entry point: one file to the model-input array, whatever its kind."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from auditkit.decode.budget import DecodeBudget, image_kind
from auditkit.decode.dicom import HeaderInfo, _decode_dicom
from auditkit.decode.intensity import WindowSetting, _resize, to_channels
from auditkit.decode.raster import _decode_npy, _decode_pillow
from auditkit.decode.volume import VolumeBudget, VolumeGeometry, decode_volume, resample_volume
from auditkit.errors import ConfigError, UnreadableImage


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
    spacing: tuple[float, ...] | None = None
    """The pixel or voxel size in millimetres on the model-input grid (after resizing): a
    volume's ``(z, y, x)``; a 2-D segmentation image's ``(y, x)`` (set by the loader);
    ``None`` otherwise."""
    source_size: tuple[int, ...] = ()
    """The spatial size as stored, before resizing: ``(H, W)`` or a volume's ``(D, H, W)``."""
    geometry: VolumeGeometry | None = field(default=None, repr=False, compare=False)
    """A volume's geometry as stored (reoriented, before resampling), for its label map."""
    labels: npt.NDArray[np.int16] | None = field(default=None, repr=False, compare=False)
    """Segmentation: the reference label map on the model-input grid (set by the loader)."""
    datasets: tuple[Dataset, ...] = field(default=(), repr=False, compare=False)
    """A DICOM series' slice headers in position order (with ``keep_header``); ``dataset`` is the
    first of them."""


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
    source_size = (int(image.shape[1]), int(image.shape[2]))
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
        source_size=source_size,
    )


def decode_volume_image(
    path: str | os.PathLike[str],
    *,
    channels: int,
    depth: int,
    height: int,
    width: int,
    window: WindowSetting = WindowSetting(),
    budget: VolumeBudget = VolumeBudget(),
    root: str | os.PathLike[str] | None = None,
    keep_header: bool = False,
) -> DecodedImage:
    """Decode one volume into the model input, ``float32`` ``(channels, depth, height, width)``.

    The volume is read by :func:`~auditkit.decode.volume.decode_volume` (a NIfTI file, a ``.npy``
    array or a folder holding one DICOM series, reoriented and bounded before allocation), its
    channels reconciled as a 2-D image's (:func:`to_channels`), and resampled to the input grid
    (:func:`~auditkit.decode.volume.resample_volume`: trilinear with anti-aliasing); the voxel
    size of the resampled grid travels in :attr:`DecodedImage.spacing`.

    Args:
        path: The volume.
        channels: Channels the model expects.
        depth: Model input depth (slices).
        height: Model input height.
        width: Model input width.
        window: Intensity window.
        budget: Size limits checked before the voxels are read.
        root: Symlinks in a series folder must resolve inside this folder (the data root).
        keep_header: Keep every slice's DICOM header (:attr:`DecodedImage.datasets`).

    Raises:
        UnreadableImage: The volume cannot be used; the message is the quarantine reason.
        ConfigError: A size is not a positive integer.
    """
    for name, value in (("channels", channels), ("depth", depth), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.input.{name} must be a positive integer, got {value!r}")
    volume = decode_volume(path, window=window, budget=budget, root=root, keep_headers=keep_header)
    notes: tuple[str, ...] = ()
    if volume.voxels.shape[0] != channels:
        have = volume.voxels.shape
        flat, notes = to_channels(volume.voxels.reshape(have[0], have[1] * have[2], have[3]), channels)
        volume.voxels = flat.reshape(channels, *have[1:]).astype(np.float32)
    stored = volume.geometry
    volume = resample_volume(volume, (depth, height, width))
    pixels = np.clip(volume.voxels, 0.0, 1.0)
    if not np.all(np.isfinite(pixels)):
        raise UnreadableImage("non-finite values after resampling")
    return DecodedImage(
        pixels=pixels,
        kind=volume.kind,
        source_shape=volume.source_shape,
        header=volume.header,
        notes=(*volume.notes, *notes),
        dataset=volume.datasets[0] if volume.datasets else None,
        spacing=volume.spacing,
        datasets=volume.datasets,
        source_size=stored.shape,
        geometry=stored,
    )
