"""Volumes: a NIfTI file, a ``.npy`` array or a folder holding one DICOM series, to a ``(C, D, H, W)``
array in ``[0, 1]`` that carries its physical geometry; label maps to integer ``(D, H, W)``; and
resampling to the model's input that keeps distances physical.

Orientation is explicit. Every volume with a known orientation is turned (by axis permutations and
flips only, never interpolation) so that its array axes ``(D, H, W)`` point as close as possible to
the patient's superior, posterior and left (axis codes ``"SPL"``): the layout of an axial DICOM
series displayed radiologically (rows top to bottom run anterior to posterior, columns left to right
run from the patient's right to left). A DICOM series and a NIfTI mask converted from it (e.g. by
dcm2niix, which writes the RAS+ affine) therefore land on the same voxel grid.
:attr:`VolumeGeometry.affine` maps a voxel index ``(d, h, w, 1)`` to patient coordinates in
millimetres in DICOM's LPS+ frame (x to the patient's left, y posterior, z superior); an oblique
acquisition keeps its obliquity there. ``.npy`` arrays and NIfTI files with neither a qform nor an
sform carry no orientation: their axes are used as stored and :attr:`VolumeGeometry.orientation` is
``"unknown"``.

Reads are bounded before allocation (docs/hardening.md): a NIfTI header's declared voxel data
(shape x bytes per voxel, plus its data offset) is checked against :class:`VolumeBudget` and
against the file's size (``.nii``) before any voxel is read; a ``.nii.gz`` is stream-decompressed
in 1 MiB steps up to exactly what its header declares, and a stream that goes on beyond that (a
decompression bomb) is refused after at most one more step; a ``.npy`` header is parsed with
:func:`numpy.lib.format.read_magic` and its shape checked before the array is mapped, never with
pickles; a DICOM series folder's entries are counted before any file is opened, each slice is
read with the 2-D decoder's bounded reads (:class:`DecodeBudget`), and the whole series'
voxels are checked against the budget between the header pass and the pixel pass.

A DICOM series is ordered by ImagePositionPatient projected on the slice normal (the cross product
of the ImageOrientationPatient row and column cosines), never by InstanceNumber. Spacing between
slices is the mean step of those projections, in-plane spacing is PixelSpacing. A series is
quarantined, with the reason, for: more than one SeriesInstanceUID in the folder, slices of
different sizes, pixel spacings or orientations, two slices at one position, gantry tilt (the
positions move more than :data:`TILT_TOLERANCE_DEGREES` off the normal), missing slices (a step
more than :data:`GAP_FACTOR` times the median step) and irregular spacing (a step more than
:data:`SPACING_TOLERANCE` of the median away from it), a symlink that leaves the folder (or the
given data root), a subfolder, a special file, or a file that is not DICOM. Each slice goes through
its own modality LUT (slopes and intercepts may differ between slices), then one VOI transform for
the whole volume (:class:`~auditkit.decode.intensity.WindowSetting`).

Quarantine reasons (:class:`~auditkit.errors.UnreadableImage`) name what is wrong and what was
expected. They never carry a path, a file name or a header value; they may carry measurements
derived from the geometry (a step in millimetres, an angle) and counts.
"""

from __future__ import annotations

import io
import math
import os
import stat
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, overload

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from auditkit.decode.budget import (
    _INFLATE_CHUNK,
    DecodeBudget,
    _dataset_secrets,
    _exception_reason,
    _path_secrets,
    _read_bytes,
    quiet_pydicom,
)
from auditkit.decode.dicom import (
    HeaderInfo,
    _as_header,
    _check_declared_size,
    _dcmread,
    _decode_dicom_pixels,
    _voi_lut_sequence,
    _window_from_header,
    header_info,
    header_texts,
    read_dicom_header,
)
from auditkit.decode.intensity import FloatArray, WindowSetting, window_linear
from auditkit.errors import ConfigError, UnreadableImage

#: A step between slice positions longer than this many median steps means missing slices.
GAP_FACTOR = 1.5
#: Steps may differ from the median step by this fraction of it. Positions are decimal strings in
#: the headers, often rounded to 0.1 mm or coarser, so a 0.625 mm CT step can read 0.6 or 0.7;
#: larger deviations are irregular spacing that one voxel size cannot represent.
SPACING_TOLERANCE = 0.1
#: The slice positions may move this many degrees off the slice normal (first to last slice)
#: before the series counts as acquired with a gantry tilt (a sheared grid).
TILT_TOLERANCE_DEGREES = 0.5
#: ImageOrientationPatient cosines of two slices may differ by this much (about 0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3

#: Axis codes of ``(D, H, W)`` after reorientation: superior, posterior, left.
CANONICAL_ORIENTATION = "SPL"
_CANONICAL_IJK = ("L", "P", "S")  # nibabel's codes for the stored (W, H, D) axes, RAS+ world
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (d, h, w, 1) <-> (w, h, d, 1): its own inverse.
_SWAP_DW = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)

# Decompressed bytes a .nii.gz may hold after the voxel data its header declares (some writers pad).
_GZIP_TRAILING_SLACK = 1 << 20
_NIFTI1_HEADER = 348
_NIFTI2_HEADER = 540
_MAX_NPY_CHANNELS = 8
_DICOM_KEYWORDS = (
    "SeriesInstanceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)

VolumeKind = Literal["nifti", "npy", "dicom-series"]
ResampleMode = Literal["trilinear", "nearest"]


# --------------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class VolumeBudget:
    """Upper bounds on one volume, checked before the voxels are read.

    Attributes:
        max_slices: Entries a DICOM series folder may hold; counted before any file is opened.
        max_voxels: Bound on ``C x D x H x W`` (the decoded array is ``float32``: 4 bytes each).
        max_bytes: Bound on the stored voxel data: a NIfTI's data offset plus its declared voxel
            bytes (for ``.nii.gz``, what it decompresses to), a ``.npy`` array's bytes, the sum of
            a DICOM series' file sizes; and on a ``.nii``/``.nii.gz``/``.npy`` file's size.
        slice: Limits for each file of a DICOM series, as for a 2-D image.
    """

    max_slices: int = 2048
    max_voxels: int = 512**3
    max_bytes: int = 2**30
    slice: DecodeBudget = DecodeBudget()


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of a ``(D, H, W)`` grid are.

    Attributes:
        shape: ``(D, H, W)``.
        spacing: Voxel size ``(z, y, x)`` in millimetres, along ``D``, ``H`` and ``W``.
        affine: 4 x 4 matrix (rows) mapping ``(d, h, w, 1)`` to patient LPS+ millimetres.
        orientation: ``"SPL"`` (the axes point closest to superior, posterior, left) or
            ``"unknown"`` (``.npy``, NIfTI without qform/sform: axes as stored, origin 0).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: tuple[tuple[float, float, float, float], ...]
    orientation: str

    def affine_array(self) -> npt.NDArray[np.float64]:
        """The affine as a ``(4, 4)`` float64 array."""
        return np.array(self.affine, dtype=np.float64)

    def world(self, index: Sequence[float]) -> npt.NDArray[np.float64]:
        """Patient LPS+ coordinates (mm) of the voxel index ``(d, h, w)`` (fractional allowed)."""
        point = np.array([*index, 1.0], dtype=np.float64)
        result: npt.NDArray[np.float64] = (self.affine_array() @ point)[:3]
        return result

    def mismatch(self, other: VolumeGeometry) -> str | None:
        """Why ``other`` (e.g. a label map) does not lie on this grid, or ``None`` when it does.

        Shapes must be equal. When both orientations are known, the eight corner voxel centres must
        agree within a tenth of the smallest voxel size (float32 NIfTI affines against decimal
        DICOM positions); when either is unknown (``.npy``), only the shapes are compared and the
        unknown one is taken to share the other's geometry.

        Returns:
            A reason naming what differs and what was expected, or ``None``.
        """
        if self.shape != other.shape:
            return f"shape (D, H, W) {other.shape} differs from the image's {self.shape}; expected the same grid"
        if "unknown" in (self.orientation, other.orientation):
            return None
        tolerance = 0.1 * min(min(self.spacing), min(other.spacing))
        corners = np.array(
            [
                [d, h, w, 1.0]
                for d in (0, self.shape[0] - 1)
                for h in (0, self.shape[1] - 1)
                for w in (0, self.shape[2] - 1)
            ]
        )
        mine = corners @ self.affine_array().T
        theirs = corners @ other.affine_array().T
        distance = float(np.max(np.linalg.norm(mine[:, :3] - theirs[:, :3], axis=1)))
        if distance > tolerance:
            spacing = ", ".join(f"{value:.3g}" for value in other.spacing)
            mine_spacing = ", ".join(f"{value:.3g}" for value in self.spacing)
            return (
                f"geometry differs from the image's: corner voxels {distance:.3g} mm apart (spacing {spacing} mm"
                f" against {mine_spacing} mm); expected the image's grid within {tolerance:.3g} mm"
            )
        return None

    def resampled(self, shape: tuple[int, int, int]) -> VolumeGeometry:
        """The geometry of this extent sampled on ``shape`` voxels (``align_corners=False``).

        The field of view stays where it is: each voxel size scales by ``old / new`` and the first
        voxel centre moves to ``(scale - 1) / 2`` old voxels from the old first centre.
        """
        scale = np.array([old / new for old, new in zip(self.shape, shape, strict=True)], dtype=np.float64)
        step = np.eye(4)
        step[:3, :3] = np.diag(scale)
        step[:3, 3] = 0.5 * scale - 0.5
        affine = self.affine_array() @ step
        return VolumeGeometry(
            shape=shape,
            spacing=_spacing_of(affine),
            affine=_affine_tuple(affine),
            orientation=self.orientation,
        )


@dataclass
class DecodedVolume:
    """One decoded image volume.

    Attributes:
        voxels: ``float32`` ``(C, D, H, W)`` in ``[0, 1]`` on the (reoriented) source grid.
        kind: ``"nifti"``, ``"npy"`` or ``"dicom-series"``.
        geometry: Shape, spacing, affine and orientation of ``(D, H, W)``.
        source_shape: The shape as stored: NIfTI ``(I, J, K[, T])``, ``.npy`` as saved, a DICOM
            series ``(slices, Rows, Columns)``.
        header: For a DICOM series, identifiers and attributes of its first slice (in position
            order), else ``None``.
        notes: Fixed phrases describing the conversions applied (no values).
        datasets: With ``keep_headers=True``, every slice's header (no pixel data, elements left raw:
            read them through :func:`~auditkit.decode.header_texts`), in position order. Patient
            data: keep in memory only.
    """

    voxels: npt.NDArray[np.float32]
    kind: VolumeKind
    geometry: VolumeGeometry
    source_shape: tuple[int, ...]
    header: HeaderInfo | None = None
    notes: tuple[str, ...] = ()
    datasets: tuple[Dataset, ...] = field(default=(), repr=False, compare=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(z, y, x)`` in millimetres."""
        return self.geometry.spacing


@dataclass
class DecodedLabelMap:
    """One decoded 3-D label map (segmentation reference).

    Attributes:
        labels: ``int32`` ``(D, H, W)`` class indices on the (reoriented) source grid.
        kind: ``"nifti"`` or ``"npy"``.
        geometry: As for :class:`DecodedVolume`; compare with the image's by
            :meth:`VolumeGeometry.mismatch`.
        source_shape: The shape as stored.
        notes: Fixed phrases describing the conversions applied.
    """

    labels: npt.NDArray[np.int32]
    kind: VolumeKind
    geometry: VolumeGeometry
    source_shape: tuple[int, ...]
    notes: tuple[str, ...] = ()

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(z, y, x)`` in millimetres."""
        return self.geometry.spacing


# --------------------------------------------------------------------------------------------------
# Entry points


def volume_kind(path: str | os.PathLike[str]) -> VolumeKind:
    """The kind of volume at ``path``: a folder is a DICOM series, else by suffix.

    Raises:
        UnreadableImage: Neither a folder nor a ``.nii``, ``.nii.gz`` or ``.npy`` file.
    """
    file_path = Path(path)
    name = file_path.name.lower()
    if file_path.is_dir():
        return "dicom-series"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    raise UnreadableImage(
        "not a volume: expected a .nii or .nii.gz file, a .npy array (D, H, W) or a folder holding one DICOM series"
    )


def decode_volume(
    path: str | os.PathLike[str],
    *,
    window: WindowSetting = WindowSetting(),
    budget: VolumeBudget = VolumeBudget(),
    spacing: Sequence[float] | None = None,
    root: str | os.PathLike[str] | None = None,
    keep_headers: bool = False,
) -> DecodedVolume:
    """Decode one image volume to ``float32`` ``(C, D, H, W)`` in ``[0, 1]`` with its geometry.

    Intensities: a DICOM series as a 2-D DICOM image is (modality LUT per slice, then ``window``:
    ``auto`` takes the middle slice's VOI LUT Sequence or Window Center/Width for the whole volume,
    else min-max over the volume; MONOCHROME1 inverted). NIfTI: scaled by ``scl_slope``/
    ``scl_inter``; ``auto`` takes the header's display range ``cal_min``/``cal_max`` when it is set,
    else min-max over the volume. ``.npy``: ``auto`` maps bool as 0/1, uint8 /255, uint16 /65535,
    floats already in ``[0, 1]`` as they are, anything else min-max. ``minmax`` and ``fixed``
    (LINEAR window, e.g. in Hounsfield units) apply to every kind.

    Args:
        path: A ``.nii``/``.nii.gz`` file, a ``.npy`` array ``(D, H, W)`` or ``(C, D, H, W)``, or a
            folder holding the slices of one DICOM series.
        window: Intensity mapping.
        budget: Size limits checked before the voxels are read.
        spacing: Voxel size ``(z, y, x)`` in mm for a ``.npy`` array (default 1 mm); NIfTI and DICOM
            carry their own and ignore it.
        root: Symlinks in a series folder must resolve inside this folder (default: the series
            folder itself).
        keep_headers: Keep every slice's header in :attr:`DecodedVolume.datasets`.

    Returns:
        The :class:`DecodedVolume`.

    Raises:
        UnreadableImage: The volume cannot be used; the message is the quarantine reason.
        ConfigError: ``spacing`` is not three positive finite numbers.
    """
    file_path = Path(path)
    npy_spacing = _check_spacing(spacing)
    kind = volume_kind(file_path)
    if kind == "dicom-series":
        return _decode_series(file_path, window, budget, root=root, keep_headers=keep_headers)
    if kind == "nifti":
        values, geometry, source_shape, notes, display = _read_nifti(file_path, budget)
        voxels, intensity_notes = _nifti_intensities(values, window, display)
    else:
        raw, source_shape, notes = _read_npy(file_path, budget, label_map=False)
        geometry = _unknown_geometry(raw.shape[1:], npy_spacing)
        voxels, intensity_notes = _npy_intensities(raw, window)
    return DecodedVolume(
        voxels=voxels,
        kind=kind,
        geometry=geometry,
        source_shape=source_shape,
        notes=(*notes, *intensity_notes),
    )


def decode_label_map(
    path: str | os.PathLike[str],
    *,
    budget: VolumeBudget = VolumeBudget(),
    spacing: Sequence[float] | None = None,
    num_classes: int | None = None,
) -> DecodedLabelMap:
    """Decode a 3-D label map (``.nii``, ``.nii.gz`` or ``.npy`` ``(D, H, W)``) to ``int32``.

    The same bounded reads and reorientation as :func:`decode_volume`, so a mask converted from a
    DICOM series lands on that series' grid. Values must be integers (a float map holding 1.0 is
    accepted, 0.5 is not).

    Args:
        path: The label map.
        budget: Size limits.
        spacing: Voxel size for a ``.npy`` map (default 1 mm).
        num_classes: When given, every value must lie in ``0 .. num_classes - 1``.

    Returns:
        The :class:`DecodedLabelMap`.

    Raises:
        UnreadableImage: The map cannot be used (including values that are not integer class
            indices); the message is the quarantine reason.
        ConfigError: ``spacing`` or ``num_classes`` is invalid.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    file_path = Path(path)
    npy_spacing = _check_spacing(spacing)
    kind = volume_kind(file_path)
    if kind == "dicom-series":
        raise UnreadableImage("a DICOM series folder as a label map; expected a .nii, .nii.gz or .npy label map")
    if kind == "nifti":
        values, geometry, source_shape, notes, _ = _read_nifti(file_path, budget)
        if values.shape[0] != 1:
            raise UnreadableImage(
                f"label map has {values.shape[0]} volumes (a 4-D NIfTI); expected one (D, H, W) map of class indices"
            )
        labels = _as_labels(values[0])
    else:
        raw, source_shape, notes = _read_npy(file_path, budget, label_map=True)
        geometry = _unknown_geometry(raw.shape[1:], npy_spacing)
        labels = _as_labels(raw[0])
    if num_classes is not None and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            found = low if low < 0 else high
            raise UnreadableImage(
                f"label map holds the value {found}, outside the classes 0..{num_classes - 1}; expected class indices"
            )
    return DecodedLabelMap(labels=labels, kind=kind, geometry=geometry, source_shape=source_shape, notes=tuple(notes))


@overload
def resample_volume(
    volume: DecodedVolume, shape: Sequence[int], *, mode: ResampleMode | None = None
) -> DecodedVolume: ...


@overload
def resample_volume(
    volume: DecodedLabelMap, shape: Sequence[int], *, mode: ResampleMode | None = None
) -> DecodedLabelMap: ...


def resample_volume(
    volume: DecodedVolume | DecodedLabelMap, shape: Sequence[int], *, mode: ResampleMode | None = None
) -> DecodedVolume | DecodedLabelMap:
    """Resample a volume or label map to ``shape`` ``(D, H, W)``, keeping its field of view.

    Images: trilinear (``align_corners=False``) after a Gaussian anti-aliasing filter along each
    axis that shrinks, sigma ``(old / new - 1) / 2`` voxels: MONAI's
    ``Resize(mode="trilinear", anti_aliasing=True)`` (erf-sampled kernel truncated at 4 sigma, zero
    padding), which it equals to float32 rounding; or ``mode="nearest"``. Label maps: nearest
    neighbour with pixel-centre alignment (``nearest-exact``: new voxel ``j`` takes old voxel
    ``floor((j + 0.5) * old / new)``), so values are copied, never invented, and the dtype is kept.
    The geometry follows (:meth:`VolumeGeometry.resampled`): the spacing scales by ``old / new``,
    so a distance measured in millimetres on the result is the distance on the source.

    Args:
        volume: A :class:`DecodedVolume` or :class:`DecodedLabelMap`.
        shape: Target ``(D, H, W)``, positive integers.
        mode: ``"trilinear"`` (images' default) or ``"nearest"`` (label maps' default, and the
            only mode they accept).

    Returns:
        An object of the same type on the new grid, with a note describing the resampling (the
        input itself when it already has ``shape``).

    Raises:
        ConfigError: ``shape`` is not three positive integers, or a label map asked for trilinear.
    """
    target = _check_shape(shape)
    if isinstance(volume, DecodedLabelMap):
        if mode not in (None, "nearest"):
            raise ConfigError(
                f"label maps are resampled by nearest neighbour, got mode {mode!r}; interpolation would invent labels"
            )
        if target == volume.geometry.shape:
            return volume
        labels = _resample_nearest(volume.labels[None], target)[0]
        return DecodedLabelMap(
            labels=labels,
            kind=volume.kind,
            geometry=volume.geometry.resampled(target),
            source_shape=volume.source_shape,
            notes=(*volume.notes, "resampled by nearest neighbour"),
        )
    chosen = mode or "trilinear"
    if chosen not in ("trilinear", "nearest"):
        raise ConfigError(f"resampling mode must be trilinear or nearest, got {mode!r}")
    if target == volume.geometry.shape:
        return volume
    if chosen == "trilinear":
        voxels = _resample_trilinear(volume.voxels, target)
        note = "resampled trilinearly with anti-aliasing"
    else:
        voxels = _resample_nearest(volume.voxels, target)
        note = "resampled by nearest neighbour"
    return DecodedVolume(
        voxels=voxels,
        kind=volume.kind,
        geometry=volume.geometry.resampled(target),
        source_shape=volume.source_shape,
        header=volume.header,
        notes=(*volume.notes, note),
        datasets=volume.datasets,
    )


# --------------------------------------------------------------------------------------------------
# Geometry helpers


def _affine_tuple(affine: npt.NDArray[np.float64]) -> tuple[tuple[float, float, float, float], ...]:
    return tuple((float(row[0]), float(row[1]), float(row[2]), float(row[3])) for row in affine)


def _spacing_of(affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return float(norms[0]), float(norms[1]), float(norms[2])


def _check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float]:
    if spacing is None:
        return 1.0, 1.0, 1.0
    try:
        values = tuple(float(value) for value in spacing)
    except (TypeError, ValueError):
        raise ConfigError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(value) and value > 0 for value in values):
        raise ConfigError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}")
    return values[0], values[1], values[2]


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(shape)
    if len(values) != 3 or not all(
        isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1 for n in values
    ):
        raise ConfigError(f"a volume shape must be three positive integers (D, H, W), got {shape!r}")
    return int(values[0]), int(values[1]), int(values[2])


def _unknown_geometry(shape: Sequence[int], spacing: tuple[float, float, float]) -> VolumeGeometry:
    depth, height, width = (int(n) for n in shape)
    affine = np.diag([*spacing, 1.0])
    return VolumeGeometry(
        shape=(depth, height, width), spacing=spacing, affine=_affine_tuple(affine), orientation="unknown"
    )


def _check_affine(affine: npt.NDArray[np.float64], what: str) -> None:
    if not np.all(np.isfinite(affine)):
        raise UnreadableImage(f"the {what} holds non-finite values; expected a finite voxel-to-patient transform")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0) or abs(float(np.linalg.det(affine[:3, :3]))) <= 1e-9 * float(np.prod(spacing)):
        raise UnreadableImage(
            f"the {what} is singular (a zero voxel size or two parallel axes); expected three independent axes"
        )


def _to_canonical(
    data: npt.NDArray[Any], affine_ras: npt.NDArray[np.float64], stored_axes: str
) -> tuple[npt.NDArray[Any], VolumeGeometry, list[str]]:
    """Turn ``data`` ``(I, J, K, C)`` with a RAS+ affine of ``(i, j, k)`` into ``(C, D, H, W)``
    whose axes point closest to (superior, posterior, left), with the LPS+ affine of ``(d, h, w)``.
    Only permutations and flips: no voxel is interpolated."""
    import nibabel.orientations

    orientations: Any = nibabel.orientations  # untyped functions
    notes: list[str] = []
    current = orientations.io_orientation(affine_ras)
    target = orientations.axcodes2ornt(_CANONICAL_IJK)
    transform = orientations.ornt_transform(current, target)
    if not np.array_equal(transform, orientations.axcodes2ornt(("R", "A", "S"))):
        source = "".join(str(code) for code in orientations.aff2axcodes(affine_ras))
        notes.append(f"reoriented: the stored axes {stored_axes} point {source}; (D, H, W) now point SPL")
    turned = orientations.apply_orientation(data, transform)
    affine = affine_ras @ orientations.inv_ornt_aff(transform, data.shape[:3])
    affine_dhw = _LPS_FROM_RAS @ affine @ _SWAP_DW
    voxels = np.ascontiguousarray(np.transpose(turned, (3, 2, 1, 0)))
    depth, height, width = (int(n) for n in voxels.shape[1:])
    geometry = VolumeGeometry(
        shape=(depth, height, width),
        spacing=_spacing_of(affine_dhw),
        affine=_affine_tuple(affine_dhw),
        orientation=CANONICAL_ORIENTATION,
    )
    return voxels, geometry, notes


# --------------------------------------------------------------------------------------------------
# NIfTI


def _regular_size(path: Path, limit: int) -> int:
    try:
        info = path.stat()
    except OSError as exc:
        raise UnreadableImage(f"cannot access the file ({type(exc).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableImage("not a regular file")
    if info.st_size == 0:
        raise UnreadableImage("empty file")
    if info.st_size > limit:
        raise UnreadableImage(f"file is {info.st_size} bytes; the budget allows {limit} bytes")
    return info.st_size


class _BoundedGunzip:
    """Decompresses a gzip file (one or more members) in steps of at most 1 MiB of output."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._ended = False

    def read(self, count: int) -> bytearray:
        """Up to ``count`` decompressed bytes; fewer only at the end of the stream.

        Raises:
            UnreadableImage: The stream stops inside a member (a truncated file).
            zlib.error: The stream is corrupt.
        """
        out = bytearray()
        while len(out) < count and not self._ended:
            if self._inflater.eof:
                data = self._inflater.unused_data or self._handle.read(_INFLATE_CHUNK)
                if not data:
                    self._ended = True
                    break
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the next member
            else:
                data = self._inflater.unconsumed_tail or self._handle.read(_INFLATE_CHUNK)
            piece = self._inflater.decompress(data, min(_INFLATE_CHUNK, count - len(out)))
            if not piece and not data and not self._inflater.eof:
                raise UnreadableImage("the gzip stream ends early (a truncated .nii.gz)")
            out += piece
        return out


def _nifti_header_class(head: bytes) -> tuple[type[Any], int]:
    import nibabel

    for byteorder in ("little", "big"):
        size = int.from_bytes(head[:4], byteorder) if len(head) >= 4 else 0
        if size == _NIFTI1_HEADER:
            return nibabel.Nifti1Header, size
        if size == _NIFTI2_HEADER:
            return nibabel.Nifti2Header, size
    raise UnreadableImage("not a NIfTI file: sizeof_hdr is neither 348 (NIfTI-1) nor 540 (NIfTI-2)")


def _read_nifti(
    path: Path, budget: VolumeBudget
) -> tuple[npt.NDArray[np.float32], VolumeGeometry, tuple[int, ...], list[str], tuple[float, float] | None]:
    """Read a ``.nii``/``.nii.gz`` within the budget; return ``(C, D, H, W)`` float32 values
    (scaled by scl_slope/scl_inter), the geometry, the stored shape, notes and the display range
    (``cal_min``, ``cal_max``) when the header sets one."""
    secrets = _path_secrets(path)
    try:
        header, data, shape, dtype, offset = _read_nifti_bytes(path, budget)
        return _nifti_values(header, data, shape, dtype, offset)
    except UnreadableImage:
        raise
    except zlib.error as exc:
        raise UnreadableImage(f"corrupt gzip stream: {_exception_reason(exc, secrets)}") from None
    except Exception as exc:
        raise UnreadableImage(f"not a readable NIfTI file: {_exception_reason(exc, secrets)}") from None


def _read_nifti_bytes(path: Path, budget: VolumeBudget) -> tuple[Any, bytearray, tuple[int, ...], np.dtype[Any], int]:
    """The header and exactly the bytes it declares (header, extensions, voxels), bounded.

    The header is read (for ``.nii.gz``: decompressed) first and its declared size checked
    against the budget and, for ``.nii``, the file size, before the voxel data is read. A
    ``.nii.gz`` is decompressed in 1 MiB steps up to the declared size, then at most 1 MiB more
    to see whether the stream goes on.
    """
    size = _regular_size(path, budget.max_bytes)
    with path.open("rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
        handle.seek(0)
        stream = _BoundedGunzip(handle) if compressed else None
        head = bytes(stream.read(_NIFTI2_HEADER)) if stream is not None else handle.read(_NIFTI2_HEADER)
        header_class, header_size = _nifti_header_class(head)
        if len(head) < header_size:
            raise UnreadableImage(f"the NIfTI header is cut short: {len(head)} of {header_size} bytes")
        # check=False: nibabel's check would silently repair fields (a pixdim of 0 becomes 1).
        header = header_class(binaryblock=head[:header_size], check=False)
        shape, dtype, offset, declared = _check_nifti_header(header, budget)
        needed = offset + declared
        if stream is None:
            if size < needed:
                raise UnreadableImage(
                    f"the header declares {declared} bytes of voxel data at offset {offset}; the file holds only"
                    f" {size} bytes"
                )
            handle.seek(0)
            data = bytearray(handle.read(needed))
        else:
            data = bytearray(head[:needed])
            data += stream.read(needed - len(data))
            if len(data) < needed:
                raise UnreadableImage(
                    f"the .nii.gz decompresses to {len(data)} bytes; its header declares {declared} bytes of voxel"
                    f" data at offset {offset}"
                )
            if len(stream.read(_GZIP_TRAILING_SLACK + 1)) > _GZIP_TRAILING_SLACK:
                raise UnreadableImage(
                    f"the .nii.gz decompresses beyond the {needed} bytes its header declares (a decompression"
                    " bomb?); expected the header and its voxel data"
                )
    if len(data) < needed:
        raise UnreadableImage(f"the file holds fewer than the {needed} bytes its header declares")
    return header, data, shape, dtype, offset


def _nifti_values(
    header: Any, data: bytearray, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int
) -> tuple[npt.NDArray[np.float32], VolumeGeometry, tuple[int, ...], list[str], tuple[float, float] | None]:
    count = int(np.prod(shape))
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F").astype(np.float32)
    del data
    notes: list[str] = []
    slope, intercept = header.get_slope_inter()
    if slope is not None and (slope != 1.0 or (intercept or 0.0) != 0.0):
        values *= np.float32(slope)
        values += np.float32(intercept or 0.0)
        notes.append("scaled by scl_slope and scl_inter")
    if not np.all(np.isfinite(values)):
        raise UnreadableImage("non-finite voxel values (NaN or infinity); expected finite intensities")
    if values.ndim == 3:
        values = values[..., None]
    source_shape = tuple(int(n) for n in shape)
    affine = _nifti_affine(header)
    if affine is None:
        zooms = [float(z) for z in header.get_zooms()[:3]]
        zooms += [1.0] * (3 - len(zooms))
        if not all(math.isfinite(z) and z > 0 for z in zooms):
            raise UnreadableImage(
                "no qform or sform, and pixdim gives a zero or non-finite voxel size; expected positive voxel sizes"
            )
        voxels = np.ascontiguousarray(np.transpose(values, (3, 2, 1, 0)))
        geometry = _unknown_geometry(voxels.shape[1:], (zooms[2], zooms[1], zooms[0]))
        notes.append("no qform or sform: orientation unknown, axes (K, J, I) as stored")
    else:
        voxels, geometry, orientation_notes = _to_canonical(values, affine, "(I, J, K)")
        notes.extend(orientation_notes)
    cal_min, cal_max = float(header["cal_min"]), float(header["cal_max"])
    display = (cal_min, cal_max) if math.isfinite(cal_min) and math.isfinite(cal_max) and cal_max > cal_min else None
    return voxels.astype(np.float32, copy=False), geometry, source_shape, notes, display


def _check_nifti_header(header: Any, budget: VolumeBudget) -> tuple[tuple[int, ...], np.dtype[Any], int, int]:
    """Shape, dtype, data offset and declared voxel bytes, each checked before anything is read."""
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic in (b"ni1", b"ni2"):
        raise UnreadableImage("a NIfTI header of a .hdr/.img pair; expected a single-file .nii or .nii.gz")
    if magic not in (b"n+1", b"n+2"):
        raise UnreadableImage("not a NIfTI file: the magic is not 'n+1' or 'n+2'")
    dims = [int(n) for n in header["dim"]]
    rank = dims[0]
    if not 1 <= rank <= 7:
        raise UnreadableImage(f"NIfTI dim[0] is {rank}; expected 1 to 7 dimensions")
    shape = tuple(dims[1 : rank + 1])
    if any(n < 1 for n in shape):
        raise UnreadableImage(f"NIfTI dimensions {shape} include a size below 1; expected positive sizes")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise UnreadableImage(
            f"NIfTI with {len(shape)} dimensions {shape}; expected a 3-D volume (I, J, K) or (I, J, K, channels)"
        )
    shape = shape + (1,) * (3 - len(shape))
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:  # nibabel: KeyError or HeaderDataError for a code it does not know
        raise UnreadableImage(
            f"NIfTI datatype code {int(header['datatype'])} is not one NIfTI defines; expected an integer or"
            " floating-point type"
        ) from None
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise UnreadableImage(
            f"NIfTI datatype {dtype.name} is not a real scalar type; expected integer or floating-point voxels"
        )
    voxels = int(np.prod(shape, dtype=object))
    if voxels > budget.max_voxels:
        raise UnreadableImage(
            f"the header declares {voxels} voxels {shape}; the budget allows {budget.max_voxels} voxels"
        )
    offset = int(header.get_data_offset())
    if offset < int(header["sizeof_hdr"]):
        raise UnreadableImage(f"vox_offset {offset} lies inside the header; expected the voxel data after it")
    declared = voxels * dtype.itemsize
    if offset + declared > budget.max_bytes:
        raise UnreadableImage(
            f"the header declares {declared} bytes of voxel data at offset {offset}; the budget allows"
            f" {budget.max_bytes} bytes"
        )
    return shape, dtype, offset, declared


def _nifti_affine(header: Any) -> npt.NDArray[np.float64] | None:
    """The sform when its code is set, else the qform when its code is set, else ``None``."""
    if int(header["sform_code"]) > 0:
        affine = np.asarray(header.get_sform(), dtype=np.float64)
        _check_affine(affine, "NIfTI sform")
        return affine
    if int(header["qform_code"]) > 0:
        affine = np.asarray(header.get_qform(), dtype=np.float64)
        _check_affine(affine, "NIfTI qform")
        return affine
    return None


def _nifti_intensities(
    values: npt.NDArray[np.float32], window: WindowSetting, display: tuple[float, float] | None
) -> tuple[npt.NDArray[np.float32], list[str]]:
    if window.mode == "fixed":
        assert window.center is not None and window.width is not None  # validated by WindowSetting
        center, width = window.center, window.width
        _per_slab(values, lambda slab: window_linear(slab, center, width))
        return values, ["fixed window (LINEAR)"]
    if window.mode == "auto" and display is not None:
        low, high = display
        values -= np.float32(low)
        values /= np.float32(high - low)
        np.clip(values, 0.0, 1.0, out=values)
        return values, ["header display range (cal_min, cal_max)"]
    return _min_max_in_place(
        values, "min-max scaling" if window.mode == "minmax" else "min-max scaling (no display range in header)"
    )


# --------------------------------------------------------------------------------------------------
# NumPy


def _read_npy(
    path: Path, budget: VolumeBudget, *, label_map: bool
) -> tuple[npt.NDArray[Any], tuple[int, ...], list[str]]:
    """Read a ``.npy`` volume as ``(C, D, H, W)`` (its own dtype), the header checked first."""
    size = _regular_size(path, budget.max_bytes)
    expected = "(D, H, W)" if label_map else "(D, H, W) or (C, D, H, W)"
    secrets = _path_secrets(path)
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise UnreadableImage(
                    f".npy format version {version[0]}.{version[1]} (structured field names); expected a numeric array"
                )
            offset = handle.tell()
    except UnreadableImage:
        raise
    except Exception as exc:
        raise UnreadableImage(f"not a usable .npy file: {_exception_reason(exc, secrets)}") from None
    if dtype.hasobject:
        raise UnreadableImage("object arrays (pickled data) are refused; save a numeric array")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise UnreadableImage(f"array dtype kind {dtype.kind!r} is not numeric; expected bool, int or float")
    source_shape = tuple(int(n) for n in shape)
    if len(source_shape) == 4 and label_map and source_shape[0] == 1:
        pass
    elif len(source_shape) not in ((3,) if label_map else (3, 4)):
        raise UnreadableImage(f"array of shape {source_shape}; a volume is {expected}")
    if len(source_shape) == 4 and source_shape[0] > _MAX_NPY_CHANNELS:
        raise UnreadableImage(
            f"a 4-D array is read as (C, D, H, W); its first axis of {source_shape[0]} is not a channel count"
            f" (at most {_MAX_NPY_CHANNELS})"
        )
    if any(n < 1 for n in source_shape):
        raise UnreadableImage(f"array of shape {source_shape} has an empty axis")
    voxels = int(np.prod(source_shape, dtype=object))
    if voxels > budget.max_voxels:
        raise UnreadableImage(f"array of {voxels} voxels {source_shape}; the budget allows {budget.max_voxels} voxels")
    declared = voxels * dtype.itemsize
    if declared > budget.max_bytes:
        raise UnreadableImage(f"array of {declared} bytes; the budget allows {budget.max_bytes} bytes")
    if offset + declared > size:
        raise UnreadableImage(f"the header declares {declared} bytes of data; the file holds only {size - offset}")
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        array = np.array(loaded, copy=True)  # out of the memory map, in its own dtype
        del loaded
    except Exception as exc:
        raise UnreadableImage(f"not a usable .npy file: {_exception_reason(exc, secrets)}") from None
    notes: list[str] = ["orientation unknown (.npy): axes (D, H, W) as stored"]
    if array.ndim == 3:
        array = array[None]
    if dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise UnreadableImage("non-finite values in the array; expected finite intensities")
    return array, source_shape, notes


def _npy_intensities(raw: npt.NDArray[Any], window: WindowSetting) -> tuple[npt.NDArray[np.float32], list[str]]:
    values = raw.astype(np.float32)
    dtype = raw.dtype
    if window.mode == "fixed":
        assert window.center is not None and window.width is not None
        center, width = window.center, window.width
        _per_slab(values, lambda slab: window_linear(slab, center, width))
        return values, ["fixed window (LINEAR)"]
    if window.mode == "auto":
        if dtype.kind == "b":
            return values, []
        if dtype == np.uint8:
            return values / np.float32(255.0), []
        if dtype == np.uint16:
            return values / np.float32(65535.0), []
        if dtype.kind == "f" and (values.size == 0 or (float(values.min()) >= 0.0 and float(values.max()) <= 1.0)):
            return values, []
        return _min_max_in_place(values, f"min-max scaling ({dtype.name} array)")
    return _min_max_in_place(values, "min-max scaling")


def _as_labels(values: npt.NDArray[Any]) -> npt.NDArray[np.int32]:
    """``int32`` class indices from a map that must hold integers within int32."""
    if values.dtype.kind == "b":
        return values.astype(np.int32)
    if values.size == 0:
        return values.astype(np.int32)
    low, high = float(values.min()), float(values.max())
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise UnreadableImage("label map holds non-finite values; expected integer class indices")
        if not np.array_equal(values, np.round(values)):
            raise UnreadableImage("label map holds non-integer values; expected integer class indices")
    info = np.iinfo(np.int32)
    if low < info.min or high > info.max:
        raise UnreadableImage("label map holds values beyond 32-bit integers; expected small class indices")
    return np.ascontiguousarray(values, dtype=np.int32)


# --------------------------------------------------------------------------------------------------
# Intensity helpers


def _per_slab(values: npt.NDArray[np.float32], function: Callable[[npt.NDArray[np.float32]], FloatArray]) -> None:
    """Apply ``function`` to each ``(C, H, W)`` slab along ``D`` in place (bounded temporaries)."""
    for depth in range(values.shape[1]):
        values[:, depth] = function(values[:, depth])


def _min_max_in_place(values: npt.NDArray[np.float32], note: str) -> tuple[npt.NDArray[np.float32], list[str]]:
    if values.size == 0:
        return values, [note, "constant image; all zeros"]
    low, high = float(values.min()), float(values.max())
    if high <= low:
        values[...] = 0.0
        return values, [note, "constant image; all zeros"]
    span = high - low
    if not math.isfinite(span):
        _per_slab(values, lambda slab: (slab.astype(np.float64) / 2 - low / 2) / (high / 2 - low / 2))
    else:
        values -= np.float32(low)
        values /= np.float32(span)
    np.clip(values, 0.0, 1.0, out=values)
    return values, [note]


# --------------------------------------------------------------------------------------------------
# DICOM series


@dataclass
class _Slice:
    path: Path
    order: int  # position in name order, for reasons
    series: str | None
    row_cosine: npt.NDArray[np.float64]
    column_cosine: npt.NDArray[np.float64]
    position: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    photometric: str
    window: tuple[str | None, str | None, str | None]
    dataset: Dataset  # header only, elements raw


def _list_series_folder(folder: Path, budget: VolumeBudget, root: Path, root_name: str) -> list[Path]:
    """The folder's files, counted (and refused above the budget) before any is opened."""
    entries: list[os.DirEntry[str]] = []
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                entries.append(entry)
                if len(entries) > budget.max_slices:
                    raise UnreadableImage(
                        f"the series folder holds more than {budget.max_slices} files; the budget allows"
                        f" {budget.max_slices} slices per series"
                    )
    except UnreadableImage:
        raise
    except OSError as exc:
        raise UnreadableImage(f"cannot list the series folder ({type(exc).__name__})") from None
    if not entries:
        raise UnreadableImage("empty folder; expected the slices of one DICOM series")
    files: list[Path] = []
    total_bytes = 0
    for entry in entries:
        entry_path = Path(entry.path)
        if entry.is_symlink():
            try:
                target = entry_path.resolve(strict=True)
            except (OSError, RuntimeError):
                raise UnreadableImage("a broken symlink in the series folder; expected the slices themselves") from None
            if not target.is_relative_to(root):
                raise UnreadableImage(
                    f"a symlink in the series folder points outside {root_name}; expected the slices themselves"
                )
        try:
            info = entry_path.stat()
        except OSError as exc:
            raise UnreadableImage(f"cannot access a file in the series folder ({type(exc).__name__})") from None
        if stat.S_ISDIR(info.st_mode):
            raise UnreadableImage("a subfolder in the series folder; expected only the slices of one series")
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableImage("a special file (not a regular file) in the series folder")
        total_bytes += info.st_size
        files.append(entry_path)
    if total_bytes > budget.max_bytes:
        raise UnreadableImage(f"the series files hold {total_bytes} bytes; the budget allows {budget.max_bytes} bytes")
    return sorted(files, key=lambda p: p.name)


def _numbers(text: str | None, count: int, keyword: str) -> tuple[float, ...]:
    if text is None:
        raise UnreadableImage(f"{keyword} missing; a series needs it to place each slice")
    try:
        values = tuple(float(part) for part in text.split("\\"))
    except ValueError:
        raise UnreadableImage(f"{keyword} is not {count} numbers") from None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise UnreadableImage(f"{keyword} is not {count} finite numbers")
    return values


def _read_slice_header(path: Path, order: int, total: int, budget: VolumeBudget) -> _Slice:
    where = f"file {order + 1} of {total} (in name order)"
    try:
        ds = read_dicom_header(path, budget.slice, convert=False)
        texts = header_texts(ds, _DICOM_KEYWORDS)
        frames = texts["NumberOfFrames"]
        if frames is not None and frames.strip() not in ("", "1"):
            raise UnreadableImage("a multi-frame file; expected one slice per file")
        samples = texts["SamplesPerPixel"]
        photometric = (texts["PhotometricInterpretation"] or "").strip().upper()
        if (samples is not None and samples.strip() != "1") or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise UnreadableImage(
                "not a grayscale slice (SamplesPerPixel 1, PhotometricInterpretation MONOCHROME1 or MONOCHROME2)"
            )
        cosines = np.array(_numbers(texts["ImageOrientationPatient"], 6, "ImageOrientationPatient"))
        row_cosine, column_cosine = cosines[:3], cosines[3:]
        if (
            abs(np.linalg.norm(row_cosine) - 1) > 0.01
            or abs(np.linalg.norm(column_cosine) - 1) > 0.01
            or abs(float(row_cosine @ column_cosine)) > 0.01
        ):
            raise UnreadableImage("ImageOrientationPatient is not two orthogonal unit vectors")
        position = np.array(_numbers(texts["ImagePositionPatient"], 3, "ImagePositionPatient"))
        spacing = _numbers(texts["PixelSpacing"], 2, "PixelSpacing")
        if min(spacing) <= 0:
            raise UnreadableImage("PixelSpacing is not positive")
        rows = int(_numbers(texts["Rows"], 1, "Rows")[0])
        columns = int(_numbers(texts["Columns"], 1, "Columns")[0])
    except UnreadableImage as exc:
        if str(exc).startswith("not a DICOM file"):
            raise UnreadableImage(f"{where} in the series folder is not DICOM; expected only DICOM slices") from None
        raise UnreadableImage(f"{where}: {exc}") from None
    return _Slice(
        path=path,
        order=order,
        series=texts["SeriesInstanceUID"],
        row_cosine=row_cosine / np.linalg.norm(row_cosine),
        column_cosine=column_cosine / np.linalg.norm(column_cosine),
        position=position,
        pixel_spacing=(spacing[0], spacing[1]),
        rows=rows,
        columns=columns,
        photometric=photometric,
        window=(texts["WindowCenter"], texts["WindowWidth"], texts["VOILUTFunction"]),
        dataset=ds,
    )


def _order_series(slices: list[_Slice]) -> tuple[list[_Slice], npt.NDArray[np.float64], float]:
    """Check the series is one regular stack; return the slices in position order, the slice
    normal and the spacing between slices."""
    if len({s.series for s in slices}) > 1:
        count = len({s.series for s in slices})
        raise UnreadableImage(
            f"the folder holds {count} series (SeriesInstanceUID differs between files); expected one series per folder"
        )
    if len(slices) < 2:
        raise UnreadableImage("a series of 1 slice; expected at least 2 slices to measure the spacing between them")
    first = slices[0]
    sizes = {(s.rows, s.columns) for s in slices}
    if len(sizes) > 1:
        shown = " and ".join(f"{r}x{c}" for r, c in sorted(sizes)[:2])
        raise UnreadableImage(f"slices of different sizes (Rows x Columns {shown}); expected one size for the series")
    if any(not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4) for s in slices):
        raise UnreadableImage("slices with different PixelSpacing; expected one in-plane spacing for the series")
    if any(
        np.max(np.abs(np.concatenate([s.row_cosine - first.row_cosine, s.column_cosine - first.column_cosine])))
        > ORIENTATION_TOLERANCE
        for s in slices
    ):
        raise UnreadableImage(
            "slices with different ImageOrientationPatient (mixed orientation, e.g. a localizer in the folder);"
            " expected one orientation for the series"
        )
    normal = np.cross(first.row_cosine, first.column_cosine)
    normal /= np.linalg.norm(normal)
    projections = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(projections, kind="stable")
    ordered = [slices[i] for i in order]
    projected = projections[order]
    steps = np.diff(projected)
    median = float(np.median(steps))
    if float(steps.min()) <= max(1e-3, 1e-3 * median):
        raise UnreadableImage(
            "two slices at the same position (duplicates, or two acquisitions in one series); expected one slice"
            " per position"
        )
    displacement = ordered[-1].position - ordered[0].position
    along = float(displacement @ normal)
    across = float(np.linalg.norm(displacement - along * normal))
    tilt = math.degrees(math.atan2(across, abs(along)))
    if tilt > TILT_TOLERANCE_DEGREES:
        raise UnreadableImage(
            f"gantry tilt: the slice positions move {tilt:.1f} degrees off the slice normal; expected positions along"
            f" the normal (within {TILT_TOLERANCE_DEGREES} degrees): resample the tilt out first"
        )
    largest = float(steps.max())
    if largest > GAP_FACTOR * median:
        missing = max(round(largest / median) - 1, 1)
        raise UnreadableImage(
            f"missing slices: a gap of {largest:.3g} mm where the median step is {median:.3g} mm (about {missing}"
            f" missing); expected every step within {GAP_FACTOR}x the median"
        )
    deviation = float(np.max(np.abs(steps - median)))
    if deviation > SPACING_TOLERANCE * median:
        raise UnreadableImage(
            f"irregular spacing: steps between slices of {float(steps.min()):.3g} to {largest:.3g} mm around a median"
            f" of {median:.3g} mm; expected every step within {SPACING_TOLERANCE:.0%} of the median"
        )
    spacing = float(projected[-1] - projected[0]) / (len(ordered) - 1)
    return ordered, normal, spacing


def _decode_series(
    folder: Path,
    window: WindowSetting,
    budget: VolumeBudget,
    *,
    root: str | os.PathLike[str] | None,
    keep_headers: bool,
) -> DecodedVolume:
    folder_resolved = folder.resolve()
    root_path = Path(root).resolve() if root is not None else folder_resolved
    if not folder_resolved.is_relative_to(root_path):
        raise UnreadableImage("the series folder resolves outside the data root; expected a folder inside it")
    files = _list_series_folder(folder, budget, root_path, "the data root" if root is not None else "the folder")
    slices = [_read_slice_header(path, i, len(files), budget) for i, path in enumerate(files)]
    ordered, normal, slice_spacing = _order_series(slices)
    first = ordered[0]
    depth, rows, columns = len(ordered), first.rows, first.columns
    if depth * rows * columns > budget.max_voxels:
        raise UnreadableImage(
            f"the series holds {depth * rows * columns} voxels ({depth} x {rows} x {columns}); the budget allows"
            f" {budget.max_voxels} voxels"
        )
    if len({s.photometric for s in ordered}) > 1:
        raise UnreadableImage("slices mix MONOCHROME1 and MONOCHROME2; expected one PhotometricInterpretation")
    values = np.empty((1, depth, rows, columns), dtype=np.float32)
    middle: Dataset | None = None
    with quiet_pydicom():
        for index, item in enumerate(ordered):
            dataset = _slice_modality_values(item, len(files), budget, values[0, index])
            if index == depth // 2:
                middle = dataset
    assert middle is not None
    voxels, notes = _series_intensities(values, window, middle, ordered)
    if first.photometric == "MONOCHROME1":
        voxels = np.subtract(np.float32(1.0), voxels, out=voxels)
        notes.append("MONOCHROME1 inverted")
    row_spacing, column_spacing = first.pixel_spacing
    # (d, h, w) -> LPS: columns run along the row cosine, rows along the column cosine.
    affine_dhw = np.eye(4)
    affine_dhw[:3, 0] = normal * slice_spacing
    affine_dhw[:3, 1] = first.column_cosine * row_spacing
    affine_dhw[:3, 2] = first.row_cosine * column_spacing
    affine_dhw[:3, 3] = first.position
    _check_affine(affine_dhw, "series geometry")
    affine_ras = _LPS_FROM_RAS @ affine_dhw @ _SWAP_DW  # of (w, h, d)
    canonical, geometry, orientation_notes = _to_canonical(
        np.transpose(voxels, (3, 2, 1, 0)), affine_ras, "(columns, rows, slices)"
    )
    with quiet_pydicom():
        header = header_info(first.dataset)
    return DecodedVolume(
        voxels=canonical.astype(np.float32, copy=False),
        kind="dicom-series",
        geometry=geometry,
        source_shape=(depth, rows, columns),
        header=header,
        notes=(
            "slices ordered by ImagePositionPatient along the slice normal",
            "spacing between slices from the positions (mean step)",
            *notes,
            *orientation_notes,
        ),
        datasets=tuple(s.dataset for s in ordered) if keep_headers else (),
    )


def _slice_modality_values(item: _Slice, total: int, budget: VolumeBudget, out: npt.NDArray[np.float32]) -> Dataset:
    """Decode one slice into ``out`` (modality units); return its header-only data set."""
    from pydicom.pixels.processing import apply_modality_lut

    where = f"file {item.order + 1} of {total} (in name order)"
    ds: Dataset | None = None
    try:
        data = _read_bytes(item.path, budget.slice)
        ds = _dcmread(io.BytesIO(data), stop_before_pixels=False, budget=budget.slice)
        del data
        rows, columns, _ = _check_declared_size(ds, budget.slice)
        if (rows, columns) != (item.rows, item.columns):
            raise UnreadableImage("Rows and Columns changed between reads; expected a stable file")
        raw, _properties = _decode_dicom_pixels(ds)
        if raw.shape != (rows, columns):
            raise UnreadableImage(f"decoded pixel array has shape {raw.shape}; expected ({rows}, {columns})")
        modality = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        if not np.all(np.isfinite(modality)):
            raise UnreadableImage("non-finite values after the modality LUT")
        out[...] = modality
        return _as_header(ds)
    except UnreadableImage as exc:
        raise UnreadableImage(f"{where}: {exc}") from None
    except Exception as exc:
        reason = _exception_reason(exc, [*_path_secrets(item.path), *_dataset_secrets(ds)])
        raise UnreadableImage(f"{where}: DICOM decoding failed: {reason}") from None


def _series_intensities(
    values: npt.NDArray[np.float32], window: WindowSetting, middle: Dataset, ordered: list[_Slice]
) -> tuple[npt.NDArray[np.float32], list[str]]:
    """One VOI transform for the whole series (a window per slice would make the volume's
    intensities inconsistent between slices)."""
    if window.mode == "fixed":
        assert window.center is not None and window.width is not None
        center, width = window.center, window.width
        _per_slab(values, lambda slab: window_linear(slab, center, width))
        return values, ["fixed window (LINEAR)"]
    if window.mode == "minmax":
        return _min_max_in_place(values, "min-max scaling over the volume")
    differ = len({s.window for s in ordered}) > 1
    disagreement = (
        ["slices carry different windows; the middle slice's is applied to the whole volume"] if differ else []
    )
    with quiet_pydicom():
        if middle.get("VOILUTSequence"):
            _per_slab(values, lambda slab: _voi_lut_sequence(slab.astype(np.float64), middle))
            return values, ["VOI LUT Sequence of the middle slice applied", *disagreement]
        probe = _window_from_header(np.zeros(1), middle)
        if probe is not None:

            def header_window(slab: npt.NDArray[np.float32]) -> FloatArray:
                windowed = _window_from_header(slab.astype(np.float64), middle)
                assert windowed is not None  # the same header as the probe
                return windowed[0]

            _per_slab(values, header_window)
            return values, [f"{probe[1]} of the middle slice", *disagreement]
    return _min_max_in_place(values, "min-max scaling over the volume (no window in header)")


# --------------------------------------------------------------------------------------------------
# Resampling


def _resample_nearest(array: npt.NDArray[Any], shape: tuple[int, int, int]) -> npt.NDArray[Any]:
    """``(C, D, H, W)`` to ``(C, *shape)`` by nearest neighbour (pixel centres aligned)."""
    indices = [
        np.minimum(((np.arange(new) + 0.5) * (old / new)).astype(np.int64), old - 1)
        for old, new in zip(array.shape[1:], shape, strict=True)
    ]
    return np.ascontiguousarray(
        array[:, indices[0][:, None, None], indices[1][None, :, None], indices[2][None, None, :]]
    )


def _gaussian_kernel(sigma: float, truncated: float = 4.0) -> npt.NDArray[np.float64]:
    """MONAI's ``gaussian_1d(sigma, truncated=4.0, approx="erf")``: the Gaussian integrated over
    each unit-wide bin."""
    from scipy.special import erf

    tail = int(max(sigma * truncated, 0.5) + 0.5)
    x = np.arange(-tail, tail + 1, dtype=np.float64)
    t = 0.70710678 / abs(sigma)
    kernel: npt.NDArray[np.float64] = np.clip(0.5 * (erf(t * (x + 0.5)) - erf(t * (x - 0.5))), 0.0, None)
    return kernel


def _resample_trilinear(voxels: npt.NDArray[np.float32], shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    """``(C, D, H, W)`` to ``(C, *shape)``: anti-aliasing Gaussian along shrinking axes, then
    trilinear interpolation (``align_corners=False``), clipped to ``[0, 1]``."""
    import torch
    from scipy import ndimage

    smoothed = voxels
    for axis, (old, new) in enumerate(zip(voxels.shape[1:], shape, strict=True), start=1):
        sigma = (old / new - 1.0) / 2.0
        if sigma > 0:
            smoothed = ndimage.convolve1d(
                smoothed, _gaussian_kernel(sigma).astype(np.float32), axis=axis, mode="constant", cval=0.0
            )
    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(smoothed, dtype=np.float32))[None]
        resized = torch.nn.functional.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)[0]
    out: npt.NDArray[np.float32] = np.clip(resized.numpy(), 0.0, 1.0).astype(np.float32, copy=False)
    return out
