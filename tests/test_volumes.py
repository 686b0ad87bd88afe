"""Tests for :mod:`auditkit.decode.volume`: NIfTI, ``.npy`` and DICOM-series volumes, their geometry,
the series quarantine reasons, bounded reads of hostile volumes, and resampling.

Every volume is synthetic and written here with pydicom, nibabel or numpy. Geometry is checked in
patient coordinates: a voxel's world position (LPS+, mm) from the decoded affine must equal the
position the writer gave the voxel that holds the same (unique) value, whatever reordering or
reorientation happened on the way.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from auditkit.decode import (
    DecodedVolume,
    VolumeBudget,
    WindowSetting,
    decode_label_map,
    decode_volume,
    resample_volume,
    volume_kind,
    window_linear,
)
from auditkit.decode import volume as volume_module
from auditkit.errors import ConfigError, UnreadableImage

MiB = 1 << 20
PEAK_BYTES = 64 * MiB  # Python-heap peak allowed while one hostile volume is refused (tracemalloc)
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042-SECRET"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "hardening.md"
Array = np.ndarray[Any, Any]


# --------------------------------------------------------------------------------------------------
# writers


def _ds(values: Sequence[float], decimals: int = 6) -> list[str]:
    return [f"{value:.{decimals}f}" for value in values]


def write_slice(
    path: Path,
    pixels: Array,
    *,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.7, 0.7),
    series_uid: str,
    study_uid: str,
    instance: int,
    slope: float = 1.0,
    intercept: float = 0.0,
    **attributes: Any,
) -> Path:
    """One CT slice (16-bit unsigned, explicit VR little endian) with identifying data."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(orientation, 8)
    ds.PixelSpacing = _ds(pixel_spacing)
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def unique_volume(depth: int = 6, height: int = 8, width: int = 10) -> Array:
    """Voxel values 0..N-1, each once: a value names its voxel."""
    return np.arange(depth * height * width, dtype=np.uint16).reshape(depth, height, width)


class Series:
    """A series written slice by slice: ``truth[d]`` at ``origin + d * step * normal``."""

    def __init__(
        self,
        folder: Path,
        truth: Array,
        *,
        step: float = 3.0,
        pixel_spacing: tuple[float, float] = (0.7, 0.7),
        orientation: Sequence[float] = AXIAL,
        origin: Sequence[float] = (-40.0, -55.0, 12.5),
        file_order: Sequence[int] | None = None,
        instance_numbers: Sequence[int] | None = None,
        slopes: Sequence[float] | None = None,
        intercepts: Sequence[float] | None = None,
        **attributes: Any,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.truth = truth
        self.step = step
        self.pixel_spacing = pixel_spacing
        self.row = np.array(orientation[:3], dtype=np.float64)
        self.column = np.array(orientation[3:], dtype=np.float64)
        self.normal = np.cross(self.row, self.column)
        self.origin = np.array(origin, dtype=np.float64)
        depth = truth.shape[0]
        file_order = list(range(depth)) if file_order is None else list(file_order)
        numbers = list(range(1, depth + 1)) if instance_numbers is None else list(instance_numbers)
        series_uid, study_uid = generate_uid(), generate_uid()
        self.paths: list[Path] = []
        for d in range(depth):
            path = write_slice(
                folder / f"slice_{file_order[d]:03d}.dcm",
                truth[d],
                position=self.position(d),
                orientation=orientation,
                pixel_spacing=pixel_spacing,
                series_uid=series_uid,
                study_uid=study_uid,
                instance=numbers[d],
                slope=1.0 if slopes is None else slopes[d],
                intercept=0.0 if intercepts is None else intercepts[d],
                **attributes,
            )
            self.paths.append(path)

    def position(self, d: float) -> Array:
        result: Array = self.origin + d * self.step * self.normal
        return result

    def world(self, d: Array, h: Array, w: Array) -> Array:
        """LPS position of the truth voxel (d, h, w): columns along the row cosine."""
        row_spacing, column_spacing = self.pixel_spacing
        result: Array = (
            self.origin[:, None]
            + self.row[:, None] * (w * column_spacing)
            + self.column[:, None] * (h * row_spacing)
            + self.normal[:, None] * (d * self.step)
        )
        return result


def edit(path: Path, **attributes: Any) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def write_nifti(
    path: Path, data: Array, affine: Array | None, *, zooms: Sequence[float] | None = None, nifti2: bool = False
) -> Path:
    """A NIfTI file; ``affine=None`` writes neither a qform nor an sform."""
    image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    image = image_class(data, affine)
    if zooms is not None:
        image.header.set_zooms(zooms)
    nib.save(image, str(path))
    return path


def world_of_nifti_voxel(affine_ras: Array, ijk: Array) -> Array:
    """LPS position of NIfTI voxels ``(3, N)`` under a RAS+ affine."""
    ras = affine_ras[:3, :3] @ ijk + affine_ras[:3, 3:4]
    result: Array = ras * np.array([[-1.0], [-1.0], [1.0]])
    return result


def decoded_world_positions(volume: DecodedVolume) -> tuple[Array, Array]:
    """The values at every decoded voxel and their LPS positions ``(3, N)``."""
    affine = volume.geometry.affine_array()
    d, h, w = np.indices(volume.voxels.shape[1:]).reshape(3, -1)
    positions = affine[:3, :3] @ np.stack([d, h, w]).astype(np.float64) + affine[:3, 3:4]
    return volume.voxels[0].reshape(-1), positions


def unscale(values: Array, count: int) -> Array:
    """Back from min-max ``[0, 1]`` to the unique integer values 0..count-1."""
    result: Array = np.rint(values.astype(np.float64) * (count - 1)).astype(np.int64)
    return result


def rotation(axis: Sequence[float], degrees: float) -> Array:
    """A rotation matrix (Rodrigues) about ``axis``."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = math.radians(degrees)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    result: Array = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    return result


def assert_clean(reason: str) -> None:
    """A reason names no file, patient or UID."""
    assert reason.strip()
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, "slice_", ".dcm", "/tmp", "1.2.826.0.1.3680043"):
        assert secret not in reason, f"{secret!r} leaked into {reason!r}"


def refusal_and_peak(decode: Callable[[], object]) -> tuple[str, int]:
    """The reason ``decode`` is refused with, and the Python-heap peak (tracemalloc) meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableImage) as caught:
            decode()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(caught.value), peak


# --------------------------------------------------------------------------------------------------
# DICOM series: ordering, geometry, intensities


def test_shuffled_instance_numbers_decode_as_the_ordered_series(tmp_path: Path) -> None:
    truth = unique_volume()
    ordered = Series(tmp_path / "ordered", truth)
    rng = np.random.default_rng(7)
    numbers = [int(n) for n in rng.permutation(np.arange(1, 7))]
    names = [int(n) for n in rng.permutation(6)]
    assert numbers != sorted(numbers) and names != sorted(names)
    shuffled = Series(tmp_path / "shuffled", truth, instance_numbers=numbers, file_order=names)

    first = decode_volume(ordered.folder, window=WindowSetting(mode="minmax"))
    second = decode_volume(shuffled.folder, window=WindowSetting(mode="minmax"))

    np.testing.assert_array_equal(first.voxels, second.voxels)
    assert first.geometry == second.geometry
    # and both equal the truth, slice by position: an InstanceNumber order would differ from it
    assert first.voxels.shape == (1, 6, 8, 10) and first.geometry.orientation == "SPL"
    np.testing.assert_array_equal(unscale(first.voxels[0], truth.size), truth)
    np.testing.assert_allclose(first.geometry.world((0, 0, 0)), ordered.origin, atol=1e-6)
    assert first.kind == "dicom-series" and first.source_shape == (6, 8, 10)
    assert "slices ordered by ImagePositionPatient along the slice normal" in first.notes


def test_oblique_series_is_ordered_along_its_normal_and_placed_in_patient_space(tmp_path: Path) -> None:
    matrix = rotation((0.3, 1.0, 0.4), 35.0)
    orientation = (*matrix[:, 0], *matrix[:, 1])
    truth = unique_volume(5, 7, 9)
    # written in reverse: names and InstanceNumbers run against the positions along the normal
    series = Series(
        tmp_path / "oblique",
        truth,
        step=2.5,
        pixel_spacing=(0.8, 0.6),
        orientation=orientation,
        origin=(10.0, -20.0, 30.0),
        file_order=[4, 3, 2, 1, 0],
        instance_numbers=[5, 4, 3, 2, 1],
    )
    volume = decode_volume(series.folder, window=WindowSetting(mode="minmax"))

    values, positions = decoded_world_positions(volume)
    index = unscale(values, truth.size)
    expected = series.world(*np.unravel_index(index, truth.shape))
    np.testing.assert_allclose(positions, expected, atol=1e-3)
    assert sorted(volume.spacing) == pytest.approx(sorted((2.5, 0.8, 0.6)), abs=1e-5)
    assert np.unique(index).size == truth.size  # every voxel once


def test_anisotropic_spacing_is_read_from_the_series_nifti_and_npy(tmp_path: Path) -> None:
    truth = unique_volume(4, 6, 6)
    series = decode_volume(Series(tmp_path / "s", truth, step=3.0, pixel_spacing=(0.7, 0.7)).folder)
    assert series.spacing == pytest.approx((3.0, 0.7, 0.7), abs=1e-6)

    nifti = decode_volume(write_nifti(tmp_path / "v.nii.gz", truth.T.astype(np.int16), np.diag([0.7, 0.7, 3.0, 1.0])))
    assert nifti.spacing == pytest.approx((3.0, 0.7, 0.7), abs=1e-6)
    assert nifti.geometry.shape == (4, 6, 6)

    np.save(tmp_path / "v.npy", truth)
    assert decode_volume(tmp_path / "v.npy").spacing == (1.0, 1.0, 1.0)
    npy = decode_volume(tmp_path / "v.npy", spacing=(3.0, 0.7, 0.7))
    assert npy.spacing == (3.0, 0.7, 0.7) and npy.geometry.orientation == "unknown"
    with pytest.raises(ConfigError, match="spacing must be three positive numbers"):
        decode_volume(tmp_path / "v.npy", spacing=(3.0, 0.0, 0.7))


def test_rescale_slope_and_intercept_are_applied_per_slice_then_one_window(tmp_path: Path) -> None:
    hounsfield = (-1000.0 + 2 * np.arange(4 * 6 * 6)).reshape(4, 6, 6)
    slopes = [1.0, 2.0, 0.5, 1.0]
    intercepts = [-1024.0, -2000.0, -1100.0, -1000.0]
    stored = np.stack([(hounsfield[d] - intercepts[d]) / slopes[d] for d in range(4)])
    assert np.allclose(stored, np.rint(stored)) and stored.min() >= 0
    series = Series(tmp_path / "ct", np.rint(stored).astype(np.uint16), slopes=slopes, intercepts=intercepts)
    volume = decode_volume(series.folder, window=WindowSetting(mode="fixed", center=40, width=400))
    np.testing.assert_allclose(volume.voxels[0], window_linear(hounsfield, 40, 400), atol=1e-6)


def test_the_header_window_of_the_middle_slice_is_applied_to_the_whole_series(tmp_path: Path) -> None:
    truth = unique_volume(4, 6, 6) * 10
    series = Series(tmp_path / "w", truth, WindowCenter="1000", WindowWidth="800")
    volume = decode_volume(series.folder)
    np.testing.assert_allclose(volume.voxels[0], window_linear(truth, 1000, 800), atol=1e-6)
    assert "header window (LINEAR) of the middle slice" in volume.notes
    assert volume.header is not None and volume.header.patient_id == PATIENT_ID  # in memory only
    kept = decode_volume(series.folder, keep_headers=True)
    assert len(kept.datasets) == 4 and not volume.datasets


# --------------------------------------------------------------------------------------------------
# NIfTI orientation


def test_nifti_is_reoriented_without_moving_any_voxel_in_patient_space(tmp_path: Path) -> None:
    # stored sagittally: i runs anterior, j inferior, k to the patient's left, with an origin
    affine = np.array(
        [
            [0.0, 0.0, 1.2, -30.0],
            [0.9, 0.0, 0.0, -45.0],
            [0.0, -2.0, 0.0, 60.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    data = unique_volume(7, 6, 5).astype(np.int16)  # as (I, J, K)
    volume = decode_volume(write_nifti(tmp_path / "sag.nii", data, affine), window=WindowSetting(mode="minmax"))
    assert nib.aff2axcodes(affine) == ("A", "I", "R")

    values, positions = decoded_world_positions(volume)
    ijk = np.stack(np.unravel_index(unscale(values, data.size), data.shape)).astype(np.float64)
    np.testing.assert_allclose(positions, world_of_nifti_voxel(affine, ijk), atol=1e-4)
    assert volume.geometry.orientation == "SPL"
    assert volume.spacing == pytest.approx((2.0, 0.9, 1.2), abs=1e-6)  # superior, posterior, left
    assert volume.source_shape == (7, 6, 5)
    assert "reoriented: the stored axes (I, J, K) point AIR; (D, H, W) now point SPL" in volume.notes


def test_a_series_and_its_nifti_conversion_land_on_the_same_grid(tmp_path: Path) -> None:
    truth = unique_volume(5, 6, 7)
    series = Series(tmp_path / "s", truth, step=2.0, pixel_spacing=(0.5, 0.75))
    # what dcm2niix writes: (i, j, k) = (column, row, slice), the y axis flipped into a RAS+ affine
    lps = np.eye(4)
    lps[:3, 0] = series.row * 0.75
    lps[:3, 1] = series.column * 0.5
    lps[:3, 2] = series.normal * 2.0
    lps[:3, 3] = series.origin
    flip_rows = np.eye(4)
    flip_rows[1, 1], flip_rows[1, 3] = -1.0, truth.shape[1] - 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps @ flip_rows
    stored = np.transpose(truth, (2, 1, 0))[:, ::-1, :].astype(np.int16)
    path = write_nifti(tmp_path / "s.nii.gz", stored, affine)

    from_series = decode_volume(series.folder, window=WindowSetting(mode="minmax"))
    from_nifti = decode_volume(path, window=WindowSetting(mode="minmax"))
    np.testing.assert_array_equal(from_series.voxels, from_nifti.voxels)
    assert from_series.geometry.mismatch(from_nifti.geometry) is None

    labels = decode_label_map(path)
    assert from_series.geometry.mismatch(labels.geometry) is None
    np.testing.assert_array_equal(labels.labels, truth)
    shifted = affine.copy()
    shifted[:3, 3] += (0.0, 0.0, 2.0)
    moved = decode_label_map(write_nifti(tmp_path / "moved.nii.gz", stored, shifted))
    reason = from_series.geometry.mismatch(moved.geometry)
    assert reason is not None and "corner voxels 2 mm apart" in reason and "expected the image's grid" in reason
    other_shape = decode_label_map(write_nifti(tmp_path / "small.nii", stored[:, :, :4], affine))
    assert "shape (D, H, W) (4, 6, 7) differs from the image's (5, 6, 7)" in str(
        from_series.geometry.mismatch(other_shape.geometry)
    )


def test_nifti_without_qform_or_sform_keeps_its_axes_and_pixdim(tmp_path: Path) -> None:
    data = unique_volume(3, 4, 5).astype(np.float32)
    path = write_nifti(tmp_path / "bare.nii", data, None, zooms=(0.5, 0.6, 2.5))
    volume = decode_volume(path, window=WindowSetting(mode="minmax"))
    assert volume.geometry.orientation == "unknown"
    assert volume.spacing == pytest.approx((2.5, 0.6, 0.5))
    np.testing.assert_array_equal(unscale(volume.voxels[0], data.size), np.transpose(data, (2, 1, 0)))


def test_nifti_intensities_display_range_slope_and_channels(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(4, 3, 2).T  # (I, J, K) = (2, 3, 4)
    stored = nib.Nifti1Image(data, np.eye(4)).to_bytes()  # stored 0..23 -> -10..36:
    (tmp_path / "cal.nii").write_bytes(_with_header(stored, scl_slope=2.0, scl_inter=-10.0, cal_min=4.0, cal_max=20.0))
    volume = decode_volume(tmp_path / "cal.nii")
    expected = np.clip((np.transpose(data, (2, 1, 0)) * 2.0 - 10.0 - 4.0) / 16.0, 0, 1)
    # RAS -> SPL flips H and W
    np.testing.assert_allclose(volume.voxels[0], expected[:, ::-1, ::-1], atol=1e-6)
    assert "header display range (cal_min, cal_max)" in volume.notes
    assert "scaled by scl_slope and scl_inter" in volume.notes

    four_d = np.random.default_rng(0).random((4, 5, 6, 2)).astype(np.float32)
    stacked = decode_volume(write_nifti(tmp_path / "two.nii.gz", four_d, np.eye(4)))
    assert stacked.voxels.shape == (2, 6, 5, 4) and stacked.source_shape == (4, 5, 6, 2)


# --------------------------------------------------------------------------------------------------
# label maps and resampling


def test_label_maps_are_integer_and_checked_against_the_classes(tmp_path: Path) -> None:
    labels = np.zeros((6, 8, 8), dtype=np.uint8)
    labels[1:4, 2:6, 2:6] = 2
    np.save(tmp_path / "mask.npy", labels)
    decoded = decode_label_map(tmp_path / "mask.npy", num_classes=3)
    assert decoded.labels.dtype == np.int32 and decoded.labels.shape == (6, 8, 8)
    np.testing.assert_array_equal(decoded.labels, labels)
    with pytest.raises(UnreadableImage, match=r"holds the value 2, outside the classes 0\.\.1; expected class indices"):
        decode_label_map(tmp_path / "mask.npy", num_classes=2)
    halves = write_nifti(tmp_path / "soft.nii", (labels / 4).astype(np.float32), np.eye(4))
    with pytest.raises(UnreadableImage, match="non-integer values; expected integer class indices"):
        decode_label_map(halves)
    whole = decode_label_map(write_nifti(tmp_path / "float.nii", labels.astype(np.float32), np.eye(4)))
    assert set(np.unique(whole.labels)) == {0, 2}
    with pytest.raises(UnreadableImage, match="label map"):
        decode_label_map(tmp_path)


def test_nearest_resampling_keeps_the_label_set_exactly(tmp_path: Path) -> None:
    labels = np.zeros((12, 16, 16), dtype=np.int16)
    labels[2:8, 3:11, 3:11] = 1
    labels[6:11, 9:15, 1:7] = 5
    labels[0:4, 0:4, 10:16] = 3
    np.save(tmp_path / "mask.npy", labels)
    mask = decode_label_map(tmp_path / "mask.npy", spacing=(3.0, 0.7, 0.7))
    for shape in ((24, 32, 32), (8, 10, 10), (5, 20, 7)):
        resampled = resample_volume(mask, shape)
        assert resampled.labels.shape == shape and resampled.labels.dtype == np.int32
        assert set(np.unique(resampled.labels)) == {0, 1, 3, 5}
    doubled = resample_volume(mask, (24, 32, 32))
    np.testing.assert_array_equal(doubled.labels, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    assert doubled.spacing == pytest.approx((1.5, 0.35, 0.35))
    with pytest.raises(ConfigError, match="nearest neighbour"):
        resample_volume(mask, (6, 8, 8), mode="trilinear")
    with pytest.raises(ConfigError, match="three positive integers"):
        resample_volume(mask, (6, 8))


def _sphere(shape: tuple[int, int, int], spacing: Sequence[float], centre_mm: Sequence[float], radius: float) -> Array:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)))
    result: Array = (distance <= radius).astype(np.float32)
    return result


def test_resampling_keeps_physical_size_and_position_under_anisotropic_spacing(tmp_path: Path) -> None:
    spacing = (3.0, 0.7, 0.7)
    shape = (16, 48, 48)
    centre, radius = (22.0, 16.0, 17.5), 12.0
    np.save(tmp_path / "ball.npy", _sphere(shape, spacing, centre, radius))
    image = decode_volume(tmp_path / "ball.npy", spacing=spacing)
    mask = decode_label_map(tmp_path / "ball.npy", spacing=spacing)
    truth_mm3 = 4 / 3 * math.pi * radius**3

    def physical(volume: Array, spacing: Sequence[float]) -> tuple[float, Array]:
        size = float(volume.sum()) * float(np.prod(spacing))
        centroid = (np.indices(volume.shape).reshape(3, -1) @ volume.reshape(-1)) / volume.sum()
        return size, centroid

    for target in ((24, 24, 24), (30, 20, 40)):
        resampled = resample_volume(image, target)
        assert resampled.geometry.shape == target
        expected_spacing = tuple(s * old / new for s, old, new in zip(spacing, shape, target, strict=True))
        assert resampled.spacing == pytest.approx(expected_spacing)
        size, centroid = physical(resampled.voxels[0].astype(np.float64), resampled.spacing)
        assert size == pytest.approx(truth_mm3, rel=0.05)  # 2.7x off if the spacing were kept
        np.testing.assert_allclose(resampled.geometry.world(centroid), centre, atol=0.3)
        labels = resample_volume(mask, target)
        size, centroid = physical(labels.labels.astype(np.float64), labels.spacing)
        assert size == pytest.approx(truth_mm3, rel=0.1)
        np.testing.assert_allclose(labels.geometry.world(centroid), centre, atol=0.7)


def test_trilinear_resampling_equals_monai_resize_with_anti_aliasing() -> None:
    from monai.transforms import Resize

    rng = np.random.default_rng(3)
    voxels = rng.random((2, 14, 30, 22)).astype(np.float32)
    for shape in ((20, 16, 11), (7, 40, 22)):
        ours = volume_module._resample_trilinear(voxels, shape)
        theirs = np.asarray(Resize(shape, mode="trilinear", align_corners=False, anti_aliasing=True)(voxels))
        np.testing.assert_allclose(ours, np.clip(theirs, 0, 1), atol=2e-6)


# --------------------------------------------------------------------------------------------------
# series quarantine


def _series(folder: Path, depth: int = 6) -> Series:
    return Series(folder, unique_volume(depth, 8, 8))


def _two_series(folder: Path) -> None:
    series = _series(folder)
    other = generate_uid()
    for path in series.paths[:2]:
        edit(path, SeriesInstanceUID=other)


def _missing_slice(folder: Path) -> None:
    _series(folder).paths[3].unlink()


def _mixed_orientation(folder: Path) -> None:
    edit(_series(folder).paths[2], ImageOrientationPatient=_ds((0.0, 1.0, 0.0, 0.0, 0.0, -1.0)))


def _irregular_spacing(folder: Path) -> None:
    series = _series(folder)
    for d, path in enumerate(series.paths[3:], start=3):
        edit(path, ImagePositionPatient=_ds(series.position(d) + np.array([0.0, 0.0, 0.5])))  # one step of 3.5 mm


def _gantry_tilt(folder: Path) -> None:
    series = _series(folder)
    shear = math.tan(math.radians(15.0)) * series.step
    for d, path in enumerate(series.paths):
        edit(path, ImagePositionPatient=_ds(series.position(d) + np.array([0.0, d * shear, 0.0])))


def _mixed_sizes(folder: Path) -> None:
    series = _series(folder)
    ds = pydicom.dcmread(series.paths[2])
    write_slice(
        series.paths[2],
        np.zeros((8, 10), dtype=np.uint16),
        position=series.position(2),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        instance=3,
    )


def _mixed_pixel_spacing(folder: Path) -> None:
    edit(_series(folder).paths[1], PixelSpacing=_ds((0.8, 0.8)))


def _duplicate_position(folder: Path) -> None:
    series = _series(folder)
    ds = pydicom.dcmread(series.paths[2])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "slice_900.dcm")


def _non_dicom_file(folder: Path) -> None:
    _series(folder)
    (folder / "notes.txt").write_text("scanned on Tuesday\n")


def _symlink_out_of_the_folder(folder: Path) -> None:
    series = _series(folder)
    outside = folder.parent / "elsewhere.dcm"
    series.paths[5].rename(outside)
    (folder / "slice_005.dcm").symlink_to(outside)


def _subfolder(folder: Path) -> None:
    _series(folder)
    (folder / "more").mkdir()


def _thousands_of_files(folder: Path) -> None:
    folder.mkdir()
    for index in range(3000):
        (folder / f"{index:05d}").touch()


def _empty_folder(folder: Path) -> None:
    folder.mkdir()


def _one_slice(folder: Path) -> None:
    _series(folder, depth=1)


def _no_position(folder: Path) -> None:
    series = _series(folder)
    ds = pydicom.dcmread(series.paths[4])
    del ds.ImagePositionPatient
    ds.save_as(series.paths[4])


def _multi_frame_file(folder: Path) -> None:
    edit(_series(folder).paths[1], NumberOfFrames="3")


def _colour_slice(folder: Path) -> None:
    edit(_series(folder).paths[1], PhotometricInterpretation="RGB", SamplesPerPixel=3)


def _short_pixel_data(folder: Path) -> None:
    path = _series(folder).paths[4]
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path)


def _fifo(folder: Path) -> None:
    _series(folder)
    import os

    os.mkfifo(folder / "pipe")


#: description -> (builder of the series folder, fragments the reason must hold).
SERIES_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "two series in one folder": (_two_series, ("holds 2 series", "expected one series per folder")),
    "a missing slice": (_missing_slice, ("missing slices: a gap of 6 mm", "expected every step within 1.5x")),
    "a slice of another orientation (a localizer)": (
        _mixed_orientation,
        ("different ImageOrientationPatient", "expected one orientation"),
    ),
    "irregular spacing (one step of 3.5 mm among 3 mm)": (
        _irregular_spacing,
        ("irregular spacing: steps between slices of 3 to 3.5 mm", "expected every step within 10% of the median"),
    ),
    "gantry tilt of 15 degrees": (_gantry_tilt, ("gantry tilt", "15.0 degrees", "expected positions along the normal")),
    "slices of different sizes": (_mixed_sizes, ("different sizes (Rows x Columns 8x8 and 8x10)", "expected one size")),
    "slices of different pixel spacing": (_mixed_pixel_spacing, ("different PixelSpacing", "expected one in-plane")),
    "two slices at one position": (_duplicate_position, ("same position", "expected one slice per position")),
    "a text file among the slices": (_non_dicom_file, ("is not DICOM", "expected only DICOM slices")),
    "a symlink out of the series folder": (_symlink_out_of_the_folder, ("points outside the folder",)),
    "a subfolder": (_subfolder, ("a subfolder", "expected only the slices of one series")),
    "a FIFO among the slices (would block a reader)": (_fifo, ("not a regular file",)),
    "3000 files (more than the 2048-slice budget)": (
        _thousands_of_files,
        ("more than 2048 files", "the budget allows 2048 slices"),
    ),
    "an empty folder": (_empty_folder, ("empty folder", "expected the slices of one DICOM series")),
    "one slice": (_one_slice, ("1 slice", "expected at least 2 slices")),
    "a slice without ImagePositionPatient": (_no_position, ("ImagePositionPatient missing",)),
    "a multi-frame file among the slices": (_multi_frame_file, ("multi-frame", "expected one slice per file")),
    "an RGB slice": (_colour_slice, ("not a grayscale slice",)),
    "a slice whose pixel data is cut short": (
        _short_pixel_data,
        ("file 5 of 6 (in name order): PixelData holds 100 bytes, fewer than the 128 bytes",),
    ),
}


@pytest.mark.parametrize("case", list(SERIES_CASES))
def test_series_quarantine_reasons(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build, fragments = SERIES_CASES[case]
    folder = tmp_path / "series"
    build(folder)
    if case.startswith("3000 files"):  # refused from the listing alone: no file is opened
        monkeypatch.setattr(volume_module, "read_dicom_header", _never)
    reason, peak = refusal_and_peak(lambda: decode_volume(folder))
    for fragment in fragments:
        assert fragment in reason, f"{case}: {fragment!r} not in {reason!r}"
    assert_clean(reason)
    assert peak < PEAK_BYTES


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a file was opened")


def test_a_series_over_the_voxel_budget_is_refused_before_any_pixel_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _series(tmp_path / "s").folder
    monkeypatch.setattr(volume_module, "_slice_modality_values", _never)
    with pytest.raises(UnreadableImage, match=r"holds 384 voxels \(6 x 8 x 8\); the budget allows 300 voxels"):
        decode_volume(folder, budget=VolumeBudget(max_voxels=300))


def test_symlinks_inside_the_data_root_are_followed_and_outside_it_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    series = _series(root / "series")
    elsewhere = root / "store" / "slice.dcm"
    elsewhere.parent.mkdir()
    series.paths[0].rename(elsewhere)
    series.paths[0].symlink_to(elsewhere)
    with pytest.raises(UnreadableImage, match="points outside the folder"):
        decode_volume(series.folder)
    assert decode_volume(series.folder, root=root).voxels.shape == (1, 6, 8, 8)
    with pytest.raises(UnreadableImage, match="points outside the data root"):
        decode_volume(series.folder, root=root / "series")  # the root given: named as the data root


# --------------------------------------------------------------------------------------------------
# hostile NIfTI and .npy files


def _nifti_bytes(shape: Sequence[int], dtype: Any = np.int16) -> bytes:
    image = nib.Nifti1Image(np.zeros(shape, dtype=dtype), np.eye(4))
    result: bytes = image.to_bytes()
    return result


def _with_header(data: bytes, **fields: Any) -> bytes:
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(data[:348]), check=False)
    for name, value in fields.items():
        header[name] = value
    return header.binaryblock + data[348:]


def _huge_header_small_file(path: Path) -> None:
    path.write_bytes(_with_header(_nifti_bytes((2, 2, 2)), dim=[3, 4000, 4000, 4000, 1, 1, 1, 1]))


def _huge_header_within_a_huge_budget(path: Path) -> None:
    path.write_bytes(_with_header(_nifti_bytes((2, 2, 2)), dim=[3, 1000, 1000, 100, 1, 1, 1, 1]))


def _gzip_member(deflated: bytes) -> bytes:
    """A gzip member around raw deflate data; its CRC is not checked before the refusal."""
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflated + struct.pack("<II", 0, 0)


def _gzip_bomb(path: Path, inflated: int = 1024 * MiB) -> None:
    """A small NIfTI whose .nii.gz stream goes on with ``inflated`` bytes of zeros (about 1 MB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(_nifti_bytes((4, 4, 4))) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(b"\x00" * MiB) + compressor.flush(zlib.Z_FULL_FLUSH)
    path.write_bytes(_gzip_member(head + block * (inflated // MiB) + compressor.flush(zlib.Z_FINISH)))


def _gzip_claiming_a_huge_volume(path: Path) -> None:
    path.write_bytes(gzip.compress(_with_header(_nifti_bytes((2, 2, 2)), dim=[3, 2048, 2048, 2048, 1, 1, 1, 1])))


def _truncated_gzip(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 999, (20, 20, 10)).astype(np.int16)
    whole = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    path.write_bytes(whole[: len(whole) // 2])


def _corrupt_gzip(path: Path) -> None:
    whole = bytearray(gzip.compress(_nifti_bytes((20, 20, 10))))
    whole[12:20] = b"\xff" * 8
    path.write_bytes(bytes(whole))


def _not_nifti(path: Path) -> None:
    path.write_bytes(b"plain text, not a volume\n" * 40)


def _header_pair(path: Path) -> None:
    path.write_bytes(_with_header(_nifti_bytes((2, 2, 2)), magic=b"ni1"))


def _complex_voxels(path: Path) -> None:
    path.write_bytes(_nifti_bytes((3, 3, 3), np.complex64))


def _nan_voxels(path: Path) -> None:
    write_nifti(path, np.full((3, 3, 3), np.nan, dtype=np.float32), np.eye(4))


def _no_geometry_zero_pixdim(path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None)
    image.header["pixdim"] = [1, 0, 0, 0, 1, 1, 1, 1]
    image.header.set_sform(None, code=0)
    image.header.set_qform(None, code=0)
    path.write_bytes(image.to_bytes())


def _singular_sform(path: Path) -> None:
    affine = np.eye(4)
    affine[:, 2] = 0.0
    affine[3, 3] = 1.0
    image = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None)
    image.header.set_sform(affine, code=1)
    path.write_bytes(image.to_bytes())


def _six_dimensions(path: Path) -> None:
    path.write_bytes(_nifti_bytes((2, 2, 2, 2, 2, 2)))


def _offset_beyond_the_budget(path: Path) -> None:
    path.write_bytes(_with_header(_nifti_bytes((2, 2, 2)), vox_offset=2.0**40))


def _no_dimensions(path: Path) -> None:
    path.write_bytes(_with_header(_nifti_bytes((2, 2, 2)), dim=[0, 2, 2, 2, 1, 1, 1, 1]))


def _negative_dimension(path: Path) -> None:
    path.write_bytes(_with_header(_nifti_bytes((2, 2, 2)), dim=[3, 2, -2, 2, 1, 1, 1, 1]))


def _unknown_datatype(path: Path) -> None:
    path.write_bytes(_with_header(_nifti_bytes((2, 2, 2)), datatype=999))


def _npy_huge_header(path: Path) -> None:
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (99999, 99999, 99999), }"
    header += " " * (117 - len(header)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())


def _npy_pickle(path: Path) -> None:
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _npy_two_d(path: Path) -> None:
    np.save(path, np.zeros((8, 8), dtype=np.float32))


def _npy_channels_last(path: Path) -> None:
    np.save(path, np.zeros((64, 8, 8, 3), dtype=np.float32))


#: description -> (file name, builder, budget, fragments the reason must hold).
FILE_CASES: dict[str, tuple[str, Callable[[Path], None], VolumeBudget, tuple[str, ...]]] = {
    "NIfTI header declaring 4000^3 voxels in a 368-byte file": (
        "huge.nii",
        _huge_header_small_file,
        VolumeBudget(),
        ("the header declares 64000000000 voxels", "the budget allows 134217728 voxels"),
    ),
    "NIfTI header declaring 100 M voxels (200 MB) in a 368-byte file, budget raised to allow it": (
        "huge.nii",
        _huge_header_within_a_huge_budget,
        VolumeBudget(max_voxels=10**9, max_bytes=2**40),
        ("declares 200000000 bytes of voxel data at offset 352", "the file holds only 368 bytes"),
    ),
    ".nii.gz bomb: a 4x4x4 volume followed by 1 GiB of zeros (1 MB compressed)": (
        "bomb.nii.gz",
        _gzip_bomb,
        VolumeBudget(),
        ("decompresses beyond the 480 bytes its header declares", "decompression bomb"),
    ),
    ".nii.gz whose header declares 2048^3 voxels": (
        "claims.nii.gz",
        _gzip_claiming_a_huge_volume,
        VolumeBudget(),
        ("the header declares 8589934592 voxels", "the budget allows"),
    ),
    "truncated .nii.gz": ("cut.nii.gz", _truncated_gzip, VolumeBudget(), ("truncated",)),
    "corrupt .nii.gz stream": ("bad.nii.gz", _corrupt_gzip, VolumeBudget(), ("corrupt gzip stream",)),
    "text named .nii": ("text.nii", _not_nifti, VolumeBudget(), ("not a NIfTI file", "348 (NIfTI-1)")),
    "NIfTI header of a .hdr/.img pair named .nii": (
        "pair.nii",
        _header_pair,
        VolumeBudget(),
        ("a .hdr/.img pair", "expected a single-file .nii"),
    ),
    "complex64 voxels": ("complex.nii", _complex_voxels, VolumeBudget(), ("complex64 is not a real scalar type",)),
    "NaN voxels": ("nan.nii", _nan_voxels, VolumeBudget(), ("non-finite voxel values", "expected finite")),
    "no qform or sform and pixdim 0": (
        "flat.nii",
        _no_geometry_zero_pixdim,
        VolumeBudget(),
        ("zero or non-finite voxel size", "expected positive voxel sizes"),
    ),
    "sform with a zero column": ("singular.nii", _singular_sform, VolumeBudget(), ("singular", "three independent")),
    "6-D NIfTI": ("six.nii", _six_dimensions, VolumeBudget(), ("6 dimensions", "expected a 3-D volume")),
    "vox_offset of 1 TiB": (
        "far.nii",
        _offset_beyond_the_budget,
        VolumeBudget(),
        ("at offset 1099511627776; the budget allows 1073741824 bytes",),
    ),
    "dim[0] of 0": ("none.nii", _no_dimensions, VolumeBudget(), ("dim[0] is 0; expected 1 to 7 dimensions",)),
    "a negative dimension": ("negative.nii", _negative_dimension, VolumeBudget(), ("a size below 1",)),
    "unknown datatype code 999": (
        "code.nii",
        _unknown_datatype,
        VolumeBudget(),
        ("datatype code 999 is not one NIfTI defines",),
    ),
    ".npy header declaring 99999^3 float64 in 128 bytes": (
        "huge.npy",
        _npy_huge_header,
        VolumeBudget(),
        ("array of 999970000299999 voxels", "the budget allows"),
    ),
    ".npy holding pickled objects": ("pickle.npy", _npy_pickle, VolumeBudget(), ("pickled data) are refused",)),
    "2-D .npy as a volume": ("flat.npy", _npy_two_d, VolumeBudget(), ("a volume is (D, H, W) or (C, D, H, W)",)),
    "4-D .npy with a first axis of 64 (channels last?)": (
        "last.npy",
        _npy_channels_last,
        VolumeBudget(),
        ("first axis of 64 is not a channel count", "at most 8"),
    ),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_hostile_volume_files_are_refused_with_bounded_memory(case: str, tmp_path: Path) -> None:
    name, build, budget, fragments = FILE_CASES[case]
    path = tmp_path / name
    build(path)
    reason, peak = refusal_and_peak(lambda: decode_volume(path, budget=budget))
    for fragment in fragments:
        assert fragment in reason, f"{case}: {fragment!r} not in {reason!r}"
    assert name not in reason and str(tmp_path) not in reason
    assert peak < PEAK_BYTES, f"{case}: peak {peak / MiB:.0f} MiB"


def test_a_nii_gz_within_the_budget_reads_like_its_nii(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(-1000, 1000, (9, 7, 5)).astype(np.int16)
    plain = decode_volume(write_nifti(tmp_path / "v.nii", data, np.diag([0.8, 0.8, 2.0, 1.0])))
    packed = decode_volume(write_nifti(tmp_path / "v.nii.gz", data, np.diag([0.8, 0.8, 2.0, 1.0])))
    np.testing.assert_array_equal(plain.voxels, packed.voxels)
    assert plain.geometry == packed.geometry and plain.kind == packed.kind == "nifti"
    two = decode_volume(write_nifti(tmp_path / "v2.nii.gz", data, np.diag([0.8, 0.8, 2.0, 1.0]), nifti2=True))
    np.testing.assert_array_equal(plain.voxels, two.voxels)
    swapped = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]), nib.Nifti1Header(endianness=">"))
    (tmp_path / "big.nii").write_bytes(swapped.to_bytes())
    big_endian = decode_volume(tmp_path / "big.nii")
    np.testing.assert_array_equal(plain.voxels, big_endian.voxels)
    # gzip members written back to back (pigz -i, concatenated files) are one stream
    whole = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(whole[:200]) + gzip.compress(whole[200:]))
    np.testing.assert_array_equal(decode_volume(tmp_path / "multi.nii.gz").voxels, plain.voxels)


_HEADER_EDGES: dict[str, list[Any]] = {
    "dim": [[3, 0, 2, 2, 1, 1, 1, 1], [8, 2, 2, 2, 2, 2, 2, 2], [3, 32767, 32767, 32767, 1, 1, 1, 1], [-1] * 8],
    "datatype": [0, 1, 2, 32, 128, 2304, 1536, 32767],
    "bitpix": [0, 7, 128],
    "vox_offset": [0.0, 347.0, 353.0, 1e30, float("nan"), -1.0],
    "pixdim": [[1, 0, 0, 0, 1, 1, 1, 1], [-1, -2, 1e-30, 1e30, 1, 1, 1, 1], [1] + [float("nan")] * 7],
    "scl_slope": [0.0, float("nan"), float("inf"), 1e38, -1.0],
    "scl_inter": [float("inf"), 1e38],
    "cal_max": [float("nan"), 1e38],
    "qform_code": [0, 1, 5, -3],
    "sform_code": [0, 2, 99],
    "quatern_b": [2.0, float("nan")],
    "srow_x": [[0, 0, 0, 0], [float("inf"), 0, 0, 0], [1e38, 1e38, 0, 0]],
    "magic": [b"n+2", b"\x00\x00\x00", b"ni1"],
    "sizeof_hdr": [0, 540, 2**31 - 1],
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.sampled_from([(k, i) for k, v in _HEADER_EDGES.items() for i in range(len(v))]), max_size=3))
def test_mutated_nifti_headers_only_raise_unreadable_image(tmp_path: Path, edits: list[tuple[str, int]]) -> None:
    base = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.diag([0.8, 0.9, 2.5, 1.0]))
    base.header.set_sform(np.diag([0.8, 0.9, 2.5, 1.0]), code=1)
    data = base.to_bytes()
    for compress in (False, True):
        path = tmp_path / ("fuzz.nii.gz" if compress else "fuzz.nii")
        mutated = _with_header(data, **{key: _HEADER_EDGES[key][index] for key, index in edits})
        path.write_bytes(gzip.compress(mutated) if compress else mutated)
        tracemalloc.start()
        try:
            volume = decode_volume(path)
        except UnreadableImage as error:
            assert str(error).strip() and "fuzz" not in str(error)
        else:
            assert volume.voxels.dtype == np.float32 and np.all((volume.voxels >= 0) & (volume.voxels <= 1))
            assert all(math.isfinite(v) and v > 0 for v in volume.spacing)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < PEAK_BYTES


def test_volume_kinds_and_channels_first_npy(tmp_path: Path) -> None:
    assert volume_kind(tmp_path) == "dicom-series"
    assert volume_kind(tmp_path / "a.NII.GZ") == "nifti" and volume_kind(tmp_path / "a.npy") == "npy"
    with pytest.raises(UnreadableImage, match="not a volume"):
        volume_kind(tmp_path / "a.png")
    channels = np.random.default_rng(2).random((2, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "c.npy", channels)
    volume = decode_volume(tmp_path / "c.npy")
    np.testing.assert_array_equal(volume.voxels, channels)
    assert volume.geometry.shape == (3, 4, 5) and volume.source_shape == (2, 3, 4, 5)
    hounsfield = np.array([[[-1000, 0], [40, 3000]]], dtype=np.int16)
    np.save(tmp_path / "ct.npy", hounsfield)
    windowed = decode_volume(tmp_path / "ct.npy", window=WindowSetting(mode="fixed", center=40, width=400))
    np.testing.assert_allclose(windowed.voxels[0], window_linear(hounsfield, 40, 400))


def test_every_hostile_case_is_listed_in_the_hardening_document() -> None:
    text = DOCS.read_text(encoding="utf-8")
    count = len(SERIES_CASES) + len(FILE_CASES)
    assert f"| crafted volumes (NIfTI, .npy, DICOM series folders) | {count} |" in text
    for description in [*SERIES_CASES, *FILE_CASES]:
        assert f"| {description} |" in text, f"docs/hardening.md: '{description}' is not in the volumes table"
