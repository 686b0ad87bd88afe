"""Tests for :mod:`auditkit.decode`: window maths, DICOM/PNG/JPEG/npy decoding, hostile files."""

from __future__ import annotations

import collections
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)

from auditkit import decode as loaders
from auditkit.decode import (
    DecodeBudget,
    WindowSetting,
    convert_elements,
    decode_image,
    header_info,
    header_texts,
    image_kind,
    invert_monochrome1,
    min_max_scale,
    read_dicom_header,
    to_channels,
    window_linear,
    window_linear_exact,
    window_sigmoid,
)
from auditkit.decode import dicom as decode_dicom
from auditkit.errors import ConfigError, UnreadableImage

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042-SECRET"
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


# --------------------------------------------------------------------------------------------------
# helpers


def make_dicom(
    path: Path,
    pixels: np.ndarray[Any, Any],
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_bytes: bytes | None = None,
    **attributes: Any,
) -> Path:
    """Write a small single-sample DICOM file with identifying data that must never leak."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "CT"
    ds.PatientSex = "F"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes() if pixel_bytes is None else pixel_bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp12(rows: int = 2, columns: int = 4) -> np.ndarray[Any, Any]:
    return np.array([0, 50, 100, 150, 200, 250, 1000, 4095], dtype=np.uint16)[: rows * columns].reshape(rows, columns)


def decode_native(path: Path, **kwargs: Any) -> loaders.DecodedImage:
    """Decode without resizing: the model size is the image's own size."""
    if path.suffix in (".png", ".jpg"):
        with Image.open(path) as image:
            width, height = image.size
    else:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        height, width = int(ds.Rows), int(ds.Columns)
    kwargs.setdefault("channels", 1)
    return decode_image(path, height=height, width=width, **kwargs)


def assert_clean_reason(reason: str, path: Path) -> None:
    assert reason.strip(), "quarantine reason is empty"
    assert str(path) not in reason
    assert path.name not in reason
    assert PATIENT_NAME not in reason and "Doe" not in reason
    assert PATIENT_ID not in reason


@pytest.fixture
def leaky_dir(tmp_path: Path) -> Path:
    """A folder whose name holds the patient name, so a leaked path would also leak the name."""
    folder = tmp_path / f"{PATIENT_NAME}_{PATIENT_ID}"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------------------------------------
# window maths (hand-computed values)


def test_window_linear_edges_and_mid_point() -> None:
    # c = 50, w = 11: 0 at x <= c - 0.5 - (w-1)/2 = 44.5, 1 above c - 0.5 + (w-1)/2 = 54.5
    x = [44.5, 40.0, 49.5, 50.0, 54.5, 54.6, 1e9]
    y = window_linear(x, center=50, width=11)
    np.testing.assert_allclose(y, [0.0, 0.0, 0.5, 0.55, 1.0, 1.0, 1.0])


def test_window_linear_width_one_is_a_threshold_and_below_one_is_refused() -> None:
    np.testing.assert_array_equal(window_linear([9.4, 9.5, 9.6, 11], 10, 1), [0, 0, 1, 1])
    with pytest.raises(UnreadableImage, match="WindowWidth must be at least 1"):
        window_linear([0.0], 10, 0.5)


def test_window_linear_exact() -> None:
    y = window_linear_exact([40, 45, 50, 52.5, 55, 60], center=50, width=10)
    np.testing.assert_allclose(y, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    with pytest.raises(UnreadableImage):
        window_linear_exact([0.0], 0, 0)


def test_window_sigmoid() -> None:
    y = window_sigmoid([50, 52.5, 47.5], center=50, width=10)
    # y(c) = 0.5; y(c + w/4) = 1 / (1 + e^-1)
    np.testing.assert_allclose(y, [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])
    with np.errstate(all="raise"):  # no overflow far from the center
        far = window_sigmoid([-1e300, 1e300], center=0, width=1)
    np.testing.assert_allclose(far, [0.0, 1.0])


def test_min_max_scale_and_constant_image() -> None:
    y, constant = min_max_scale([[10, 20], [30, 50]])
    np.testing.assert_allclose(y, [[0, 0.25], [0.5, 1.0]])
    assert not constant
    y, constant = min_max_scale(np.full((2, 2), 7.0))
    np.testing.assert_array_equal(y, np.zeros((2, 2)))
    assert constant


def test_invert_monochrome1() -> None:
    np.testing.assert_allclose(invert_monochrome1([0.0, 0.25, 1.0]), [1.0, 0.75, 0.0])


def test_window_setting_validation() -> None:
    with pytest.raises(ConfigError, match="center"):
        WindowSetting(mode="fixed", width=100)
    with pytest.raises(ConfigError, match="width"):
        WindowSetting(mode="fixed", center=40, width=0.5)
    with pytest.raises(ConfigError):
        WindowSetting(mode="bogus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# channels


def test_to_channels() -> None:
    gray = np.full((1, 2, 2), 0.5)
    three, notes = to_channels(gray, 3)
    assert three.shape == (3, 2, 2) and notes == ("grayscale repeated to 3 channels",)
    rgb = np.stack([np.full((2, 2), v) for v in (1.0, 0.5, 0.0)])
    luma, notes = to_channels(rgb, 1)
    np.testing.assert_allclose(luma, np.full((1, 2, 2), 0.299 + 0.587 * 0.5))
    assert notes == ("RGB converted to grayscale",)
    rgba = np.concatenate([rgb, np.ones((1, 2, 2))])
    assert to_channels(rgba, 3)[0].shape == (3, 2, 2)
    with pytest.raises(UnreadableImage, match="2 channels; the model expects 3"):
        to_channels(np.zeros((2, 2, 2)), 3)


# --------------------------------------------------------------------------------------------------
# DICOM


def test_dicom_12bit_with_header_window(leaky_dir: Path) -> None:
    # c = 100.5, w = 201: LINEAR gives y = (x - 100) / 200 + 0.5 = x / 200, clipped
    path = make_dicom(leaky_dir / "a.dcm", ramp12(), WindowCenter=100.5, WindowWidth=201)
    decoded = decode_native(path)
    expected = np.array([[0, 0.25, 0.5, 0.75], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    assert decoded.pixels.dtype == np.float32
    assert decoded.pixels.shape == (1, 2, 4)
    np.testing.assert_allclose(decoded.pixels[0], expected, atol=1e-6)
    assert decoded.kind == "dicom"
    assert decoded.source_shape == (2, 4)
    assert decoded.notes == ("header window (LINEAR)",)
    assert decoded.header is not None
    assert decoded.header.patient_id == PATIENT_ID
    assert decoded.header.attributes["Modality"] == "CT"
    assert decoded.header.attributes["Rows"] == "2"
    assert decoded.header.attributes["BitsStored"] == "12"
    assert PATIENT_NAME not in repr(decoded.header.attributes)


def test_dicom_multi_valued_window_uses_first_value(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", ramp12(), WindowCenter=[100.5, 3000], WindowWidth=[201, 10])
    np.testing.assert_allclose(decode_native(path).pixels[0, 0], [0, 0.25, 0.5, 0.75], atol=1e-6)


def test_dicom_rescale_slope_intercept(tmp_path: Path) -> None:
    # modality value = 2 x - 100; window c = 100.5, w = 201 -> y = (2x - 100) / 200
    path = make_dicom(
        tmp_path / "a.dcm",
        ramp12(),
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=100.5,
        WindowWidth=201,
    )
    expected = np.clip((2 * ramp12().astype(float) - 100) / 200, 0, 1)
    np.testing.assert_allclose(decode_native(path).pixels[0], expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    path = make_dicom(
        tmp_path / "a.dcm",
        ramp12(),
        photometric="MONOCHROME1",
        WindowCenter=100.5,
        WindowWidth=201,
    )
    decoded = decode_native(path)
    np.testing.assert_allclose(decoded.pixels[0, 0], [1.0, 0.75, 0.5, 0.25], atol=1e-6)
    assert "MONOCHROME1 inverted" in decoded.notes


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("LINEAR_EXACT", [0.0, 0.25, 0.5, 0.75]),  # (x - 100) / 200 + 0.5
        ("SIGMOID", [1 / (1 + math.exp(2)), 1 / (1 + math.exp(1)), 0.5, 1 / (1 + math.exp(-1))]),
    ],
)
def test_dicom_voi_lut_function(tmp_path: Path, function: str, expected: list[float]) -> None:
    path = make_dicom(
        tmp_path / "a.dcm",
        ramp12(),
        WindowCenter=100,
        WindowWidth=200,
        VOILUTFunction=function,
    )
    decoded = decode_native(path)
    np.testing.assert_allclose(decoded.pixels[0, 0], expected, atol=1e-6)
    assert decoded.notes == (f"header window ({function})",)


def test_dicom_without_window_is_min_max_scaled(tmp_path: Path) -> None:
    decoded = decode_native(make_dicom(tmp_path / "a.dcm", ramp12()))
    np.testing.assert_allclose(decoded.pixels[0].ravel(), ramp12().ravel() / 4095, atol=1e-6)
    assert decoded.notes == ("min-max scaling (no window in header)",)


def test_dicom_constant_image_is_zeros_with_a_note(tmp_path: Path) -> None:
    pixels = np.full((2, 2), 7, dtype=np.uint16)
    decoded = decode_native(make_dicom(tmp_path / "a.dcm", pixels))
    np.testing.assert_array_equal(decoded.pixels, np.zeros((1, 2, 2), dtype=np.float32))
    assert "constant image; all zeros" in decoded.notes


def test_dicom_window_modes_minmax_and_fixed(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", ramp12(), WindowCenter=100.5, WindowWidth=201)
    minmax = decode_native(path, window=WindowSetting(mode="minmax"))
    np.testing.assert_allclose(minmax.pixels[0].ravel(), ramp12().ravel() / 4095, atol=1e-6)
    fixed = decode_native(path, window=WindowSetting(mode="fixed", center=200.5, width=401))
    np.testing.assert_allclose(fixed.pixels[0, 0], [0, 0.125, 0.25, 0.375], atol=1e-6)
    assert fixed.notes == ("fixed window (LINEAR)",)


def test_dicom_voi_lut_sequence_scaled_by_output_range(tmp_path: Path) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", list(range(0, 65536, 16)))  # LUTData: y = 16 x
    path = make_dicom(tmp_path / "a.dcm", ramp12(), VOILUTSequence=[item], WindowCenter=1, WindowWidth=1)
    decoded = decode_native(path)
    expected = np.minimum(16 * ramp12().astype(float), 65520) / 65535
    np.testing.assert_allclose(decoded.pixels[0], expected, atol=1e-6)
    assert decoded.notes == ("VOI LUT Sequence applied",)


def test_dicom_rgb_scaled_by_bit_depth_and_converted_to_gray(tmp_path: Path) -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [51, 102, 204]]], dtype=np.uint8)
    path = make_dicom(tmp_path / "rgb.dcm", rgb, bits_stored=8, photometric="RGB")
    colour = decode_native(path, channels=3)
    np.testing.assert_allclose(colour.pixels, np.moveaxis(rgb / 255, -1, 0), atol=1e-6)
    gray = decode_native(path, channels=1)
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    np.testing.assert_allclose(gray.pixels[0], luma, atol=1e-6)


def test_dicom_is_resized(tmp_path: Path) -> None:
    pixels = (np.arange(64 * 48, dtype=np.uint16) % 4096).reshape(64, 48)
    decoded = decode_image(make_dicom(tmp_path / "a.dcm", pixels), channels=3, height=16, width=20)
    assert decoded.pixels.shape == (3, 16, 20)
    assert decoded.source_shape == (64, 48)
    assert decoded.pixels.min() >= 0 and decoded.pixels.max() <= 1


def test_multi_frame_is_refused(tmp_path: Path) -> None:
    frames = np.zeros((3, 2, 2), dtype=np.uint16)
    path = make_dicom(tmp_path / "mf.dcm", frames[0], pixel_bytes=frames.tobytes(), NumberOfFrames=3)
    with pytest.raises(UnreadableImage) as info:
        decode_native(path)
    assert str(info.value) == (
        "multi-frame image with 3 frames (a volume or cine loop); single-frame 2-D images are read"
        " (volumes: a DICOM series folder, NIfTI or .npy with model.input.depth)"
    )


def test_declared_size_over_budget_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_dicom(tmp_path / "big.dcm", np.zeros((2, 2), dtype=np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 65535  # declares 8 GiB of 16-bit pixels; the file holds 8 bytes
    ds.save_as(path)
    decoded_pixels = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        decoded_pixels.append(True)
        raise RuntimeError("pixel decoding must not be reached")

    monkeypatch.setattr(decode_dicom, "_decode_dicom_pixels", spy)
    with pytest.raises(UnreadableImage, match="declared pixel data of 8589672450 bytes"):
        decode_image(path, channels=1, height=8, width=8)
    assert not decoded_pixels
    with pytest.raises(UnreadableImage, match="exceeds the budget"):
        decode_image(
            make_dicom(tmp_path / "small.dcm", ramp12()),
            channels=1,
            height=8,
            width=8,
            budget=DecodeBudget(max_pixel_bytes=15),
        )


def test_file_size_budget(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", ramp12())
    with pytest.raises(UnreadableImage, match="budget allows 100 bytes"):
        decode_image(path, channels=1, height=2, width=4, budget=DecodeBudget(max_file_bytes=100))
    with pytest.raises(UnreadableImage, match="budget allows 100 bytes"):
        read_dicom_header(path, DecodeBudget(max_file_bytes=100))


def test_deflate_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.dcm"
    make_dicom(path, ramp12(), transfer_syntax=DeflatedExplicitVRLittleEndian, WindowCenter=100.5)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00091010, "LO", "auditkit test")
    ds.add_new(0x00091011, "OB", bytes(3_000_000))  # inflates to 3 MB, deflates to ~3 kB
    ds.save_as(path)
    assert path.stat().st_size < 20_000
    budget = DecodeBudget(max_file_bytes=1_000_000)
    with pytest.raises(UnreadableImage, match="inflates beyond the budget"):
        decode_image(path, channels=1, height=2, width=4, budget=budget)
    with pytest.raises(UnreadableImage, match="inflates beyond the budget"):
        read_dicom_header(path, budget)
    # the same file within a larger budget decodes
    assert decode_image(path, channels=1, height=2, width=4).pixels.shape == (1, 2, 4)


def test_jpeg_baseline_dicom_and_oversized_codestream(tmp_path: Path) -> None:
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG Baseline decoder plugin")
    buffer = io.BytesIO()
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=95)
    encapsulated = encapsulate([buffer.getvalue()])
    path = make_dicom(
        tmp_path / "jpeg.dcm",
        gradient,
        bits_stored=8,
        transfer_syntax=JPEGBaseline8Bit,
        pixel_bytes=encapsulated,
    )
    decoded = decode_native(path)
    np.testing.assert_allclose(decoded.pixels[0], gradient / 255, atol=0.03)
    # Rows/Columns declare 8 x 8 while the codestream holds 64 x 64: refused before decoding
    lying = make_dicom(
        tmp_path / "lying.dcm",
        gradient[:8, :8],
        bits_stored=8,
        transfer_syntax=JPEGBaseline8Bit,
        pixel_bytes=encapsulated,
    )
    with pytest.raises(UnreadableImage, match="compressed frame is larger than declared"):
        decode_native(lying)


def test_missing_decoder_plugin_names_the_transfer_syntax(tmp_path: Path) -> None:
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed")
    path = make_dicom(
        tmp_path / "jls.dcm",
        ramp12(),
        transfer_syntax=JPEGLSLossless,
        pixel_bytes=encapsulate([b"\xff\xd8\xff\xd9"]),
    )
    with pytest.raises(UnreadableImage) as info:
        decode_native(path)
    assert "no decoder plugin is installed" in str(info.value)
    assert "JPEG-LS Lossless Image Compression" in str(info.value)


def test_read_dicom_header_and_header_info(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", ramp12(), PixelSpacing=[0.5, 0.25], BodyPartExamined="CHEST")
    ds = read_dicom_header(path)
    assert "PixelData" not in ds
    assert str(ds.PatientName) == PATIENT_NAME
    info = header_info(ds)
    assert info.patient_id == PATIENT_ID
    assert info.study_uid == str(ds.StudyInstanceUID)
    assert info.sop_uid == str(ds.SOPInstanceUID)
    assert info.attributes["PixelSpacing"] == "0.5\\0.25"
    assert info.attributes["BodyPartExamined"] == "CHEST"
    assert "StationName" not in info.attributes
    ds.PatientID = ""
    assert header_info(ds).patient_id is None


def test_broken_dicom_files_are_quarantined(leaky_dir: Path) -> None:
    good = make_dicom(leaky_dir / "good.dcm", ramp12(), WindowCenter=100.5, WindowWidth=201)
    data = good.read_bytes()
    cases = {
        "truncated.dcm": data[: len(data) - 5],
        "half.dcm": data[: len(data) // 2],
        "header_only.dcm": data[:140],
        "text.dcm": b"Patient: Doe^Jane\nThis is not an image.\n" * 10,
        "empty.dcm": b"",
        "noext": b"\x00" * 128 + b"DICM" + b"\xff" * 20,
    }
    for name, content in cases.items():
        path = leaky_dir / name
        path.write_bytes(content)
        with pytest.raises(UnreadableImage) as info:
            decode_image(path, channels=1, height=2, width=4)
        assert_clean_reason(str(info.value), path)
    with pytest.raises(UnreadableImage, match="empty file"):
        decode_image(leaky_dir / "empty.dcm", channels=1, height=2, width=4)
    with pytest.raises(UnreadableImage, match="not a DICOM file"):
        decode_image(leaky_dir / "text.dcm", channels=1, height=2, width=4)
    with pytest.raises(UnreadableImage):
        read_dicom_header(leaky_dir / "text.dcm")


def test_dicom_without_preamble_or_file_meta(tmp_path: Path) -> None:
    ds = Dataset()
    ds.PatientName = PATIENT_NAME  # group 0010 comes first: no group 0008 at all
    ds.Rows, ds.Columns = 2, 2
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.array([[0, 1], [2, 3]], dtype=np.uint16).tobytes()
    path = tmp_path / "bare"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert image_kind(path) == "dicom"
    decoded = decode_image(path, channels=1, height=2, width=2)
    np.testing.assert_allclose(decoded.pixels[0], [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)


def test_pydicom_warnings_and_logs_do_not_leak_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    leaked_uid = "1.2.3.Doe^Jane"  # invalid UI value that pydicom would quote when it warns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = make_dicom(tmp_path / "a.dcm", ramp12(), SeriesInstanceUID=leaked_uid)
    caplog.clear()  # writing the file logged the value; only reading is under test
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_image(path, channels=1, height=2, width=4)
        ds = read_dicom_header(path)
        assert str(ds.SeriesInstanceUID) == leaked_uid  # converted already: no warning now
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Doe" in m], messages


def _with_broken_element(path: Path) -> Path:
    """Give a written file a US element of three bytes, which pydicom cannot convert."""
    ds = pydicom.dcmread(path)
    ds.add_new((0x0018, 0x1164), "DS", "0.5\\0.5")  # ImagerPixelSpacing, to be replaced raw
    pydicom.dcmwrite(path, ds)
    data = path.read_bytes()
    # (0018,1164) DS "0.5\0.5" -> (0018,1240) US with three bytes of value (explicit VR LE).
    element = b"\x18\x00\x64\x11DS\x08\x000.5\\0.5 "
    assert element in data
    broken = b"\x18\x00\x40\x12US\x03\x00\x01\x02\x03"
    path.write_bytes(data.replace(element, broken))
    return path


def test_header_texts_convert_only_what_is_asked_and_stay_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    leaked_uid = "1.2.3.Doe^Jane"  # invalid UI value that pydicom would quote when it warns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = make_dicom(tmp_path / "a.dcm", ramp12(), SeriesInstanceUID=leaked_uid, PixelSpacing=[0.5, 0.25])
    wanted = ["SeriesInstanceUID", "PixelSpacing", "Rows", "StationName", "PatientID"]
    eager = read_dicom_header(path)
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = read_dicom_header(path, convert=False)
        texts = header_texts(raw, wanted)
        assert isinstance(raw.get_item("PatientName"), pydicom.dataelem.RawDataElement)  # not asked: raw
        assert not isinstance(raw.get_item("SeriesInstanceUID"), pydicom.dataelem.RawDataElement)
        convert_elements(raw)
        assert header_texts(raw, wanted) == texts  # the same before and after full conversion
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Doe" in m], messages
    assert texts == {
        "SeriesInstanceUID": leaked_uid,
        "PixelSpacing": "0.5\\0.25",
        "Rows": "2",
        "StationName": None,
        "PatientID": PATIENT_ID,
    }
    assert header_texts(eager, wanted) == texts


def test_an_unconvertible_element_spoils_only_itself_in_header_texts(tmp_path: Path) -> None:
    path = _with_broken_element(make_dicom(tmp_path / "a.dcm", ramp12()))
    with pytest.raises(UnreadableImage, match="cannot parse the DICOM header: BytesLengthException"):
        read_dicom_header(path)  # eager conversion: the whole header is unreadable
    raw = read_dicom_header(path, convert=False)
    broken = raw.get_item((0x0018, 0x1240))
    assert broken is not None and broken.length == 3
    texts = header_texts(raw, ["UpperLowerPixelValues", "PatientID", "Rows", "ExposureTime"])
    assert texts == {"UpperLowerPixelValues": None, "PatientID": PATIENT_ID, "Rows": "2", "ExposureTime": None}
    with pytest.raises(Exception, match="bytes per value"):
        convert_elements(raw)


def test_a_kept_header_is_what_a_header_only_read_gives(tmp_path: Path) -> None:
    """decode_image(keep_header=True) keeps the header without pixel data and without anything
    after it (a private group, padding): exactly the elements of a header-only read."""
    path = make_dicom(tmp_path / "a.dcm", ramp12())
    ds = pydicom.dcmread(path)
    ds.add_new((0x7FE1, 0x0010), "LO", "VENDOR CSA NON-IMAGE")
    ds.add_new((0x7FE1, 0x1010), "OB", b"\x01" * 4096)
    ds.add_new((0xFFFC, 0xFFFC), "OB", b"\x00" * 64)  # DataSetTrailingPadding
    pydicom.dcmwrite(path, ds)
    decoded = decode_image(path, channels=1, height=2, width=4, keep_header=True)
    kept = decoded.dataset
    assert kept is not None and decoded.header is not None
    header_only = read_dicom_header(path)
    assert list(kept.keys()) == list(header_only.keys())
    assert max(kept.keys()) < 0x7FE00008 and getattr(kept, "buffer", None) is None
    assert decode_image(path, channels=1, height=2, width=4).dataset is None  # kept only on request
    np.testing.assert_array_equal(decoded.pixels, decode_image(path, channels=1, height=2, width=4).pixels)


def test_image_kind(tmp_path: Path) -> None:
    assert image_kind(tmp_path / "x.DCM") == "dicom"
    assert image_kind(tmp_path / "x.jpeg") == "jpeg"
    assert image_kind(tmp_path / "x.npy") == "npy"
    dicom = make_dicom(tmp_path / "1.2.840.113619.2", ramp12())  # UID-like name, no real suffix
    assert image_kind(dicom) == "dicom"
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(UnreadableImage, match="unsupported file type"):
        image_kind(other)


# --------------------------------------------------------------------------------------------------
# PNG / JPEG


def test_png_8bit_and_16bit(tmp_path: Path) -> None:
    eight = np.array([[0, 51, 255], [102, 204, 153]], dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "g8.png")
    decoded = decode_native(tmp_path / "g8.png")
    np.testing.assert_allclose(decoded.pixels[0], eight / 255, atol=1e-6)
    assert decoded.kind == "png" and decoded.source_shape == (2, 3)
    sixteen = np.array([[0, 1000, 65535], [32768, 4095, 12]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    np.testing.assert_allclose(decode_native(tmp_path / "g16.png").pixels[0], sixteen / 65535, atol=1e-6)


def test_png_rgb_to_gray_and_modes(tmp_path: Path) -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    decoded = decode_native(tmp_path / "rgb.png")
    np.testing.assert_allclose(decoded.pixels[0, 0], [0.299, 0.587, 0.114], atol=1e-6)
    assert "RGB converted to grayscale" in decoded.notes
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    assert decode_native(tmp_path / "rgba.png", channels=3).pixels.shape == (3, 1, 3)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert decode_native(tmp_path / "p.png", channels=3).pixels.shape == (3, 1, 3)
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "b.png")
    np.testing.assert_allclose(decode_native(tmp_path / "b.png").pixels[0, 0], [0, 1])


def test_jpeg_and_resize(tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 30, 3), 128, dtype=np.uint8)).save(tmp_path / "x.jpg")
    decoded = decode_image(tmp_path / "x.jpg", channels=3, height=10, width=12)
    assert decoded.kind == "jpeg" and decoded.pixels.shape == (3, 10, 12)
    np.testing.assert_allclose(decoded.pixels, 128 / 255, atol=0.02)


def test_png_pixel_budget_and_wrong_content(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((100, 100), dtype=np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(UnreadableImage, match="10000 pixels exceeds the budget of 9999"):
        decode_image(
            tmp_path / "big.png",
            channels=1,
            height=4,
            width=4,
            budget=DecodeBudget(max_pixels=9999),
        )
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "fake.png", format="JPEG")
    with pytest.raises(UnreadableImage, match="PNG decoding failed"):
        decode_image(tmp_path / "fake.png", channels=1, height=4, width=4)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "big.png").read_bytes()[:60])
    with pytest.raises(UnreadableImage):
        decode_image(truncated, channels=1, height=4, width=4)


# --------------------------------------------------------------------------------------------------
# NumPy


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0, 255], [51, 102]], dtype=np.uint8), np.array([[0, 1], [0.2, 0.4]])),
        (np.array([[0, 65535], [13107, 0]], dtype=np.uint16), np.array([[0, 1], [0.2, 0]])),
        (np.array([[0.0, 1.0], [0.25, 0.5]], dtype=np.float32), np.array([[0, 1], [0.25, 0.5]])),
        (np.array([[-10.0, 30.0], [10.0, 0.0]]), np.array([[0, 1], [0.5, 0.25]])),
        (np.array([[-100, 300], [100, 0]], dtype=np.int16), np.array([[0, 1], [0.5, 0.25]])),
        (np.array([[True, False], [False, True]]), np.array([[1, 0], [0, 1]])),
    ],
    ids=["uint8", "uint16", "float32-unit", "float64-minmax", "int16-minmax", "bool"],
)
def test_npy_dtypes(tmp_path: Path, array: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> None:
    path = tmp_path / "a.npy"
    np.save(path, array)
    decoded = decode_image(path, channels=1, height=2, width=2)
    np.testing.assert_allclose(decoded.pixels[0], expected, atol=1e-6)
    assert decoded.kind == "npy"


def test_npy_layouts(tmp_path: Path) -> None:
    hwc = np.zeros((4, 5, 3), dtype=np.uint8)
    hwc[..., 0] = 255
    np.save(tmp_path / "hwc.npy", hwc)
    decoded = decode_image(tmp_path / "hwc.npy", channels=3, height=4, width=5)
    np.testing.assert_allclose(decoded.pixels[0], 1.0)
    np.testing.assert_allclose(decoded.pixels[1:], 0.0)
    assert decoded.source_shape == (4, 5, 3)
    assert "channels-last array transposed" in decoded.notes
    np.save(tmp_path / "chw.npy", np.moveaxis(hwc, -1, 0))
    gray = decode_image(tmp_path / "chw.npy", channels=1, height=4, width=5)
    np.testing.assert_allclose(gray.pixels, 0.299, atol=1e-6)
    np.save(tmp_path / "one.npy", np.ones((1, 4, 5), dtype=np.float32))
    assert decode_image(tmp_path / "one.npy", channels=3, height=8, width=8).pixels.shape == (
        3,
        8,
        8,
    )
    for name, bad in {
        "4d.npy": np.zeros((1, 1, 4, 4)),
        "two.npy": np.zeros((2, 4, 5)),
        "nan.npy": np.array([[0.0, np.nan]]),
        "complex.npy": np.zeros((4, 4), dtype=np.complex64),
    }.items():
        np.save(tmp_path / name, bad)
        with pytest.raises(UnreadableImage):
            decode_image(tmp_path / name, channels=1, height=4, width=4)
    np.savez(tmp_path / "archive.npy", a=np.zeros((2, 2)))
    (tmp_path / "archive.npy.npz").rename(tmp_path / "archive.npy")
    with pytest.raises(UnreadableImage, match="npz"):
        decode_image(tmp_path / "archive.npy", channels=1, height=2, width=2)


UNPICKLED: list[str] = []


def _tripwire(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Tripwire:
    """Unpickling this object calls :func:`_tripwire`, which records that it happened."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _tripwire, ("unpickled!",)


def test_object_npy_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    array = np.empty((2, 2), dtype=object)
    array[:] = _Tripwire()
    np.save(path, array, allow_pickle=True)
    with pytest.raises(UnreadableImage, match="object arrays"):
        decode_image(path, channels=1, height=2, width=2)
    assert UNPICKLED == []
    # a raw pickle renamed .npy is refused too
    path.write_bytes(b"\x80\x04\x95" + bytes(20))
    with pytest.raises(UnreadableImage):
        decode_image(path, channels=1, height=2, width=2)
    assert UNPICKLED == []


def test_decode_image_validates_model_size(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"model\.input\.height"):
        decode_image(tmp_path / "a.npy", channels=1, height=0, width=2)


# --------------------------------------------------------------------------------------------------
# corpus and fuzzing


def _corpus_candidates() -> list[Path]:
    """pydicom's bundled test files that are present locally: *.dcm and extensionless DICOM."""
    candidates = []
    for path in sorted(PYDICOM_TEST_FILES.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix.lower() == ".dcm":
            candidates.append(path)
        elif path.suffix == "" or path.suffix[1:].isdigit():
            head = path.read_bytes()[:132]
            if head[128:132] == b"DICM":
                candidates.append(path)
    return candidates


def test_pydicom_corpus_is_read_or_quarantined(record_property: Any) -> None:
    candidates = _corpus_candidates()
    assert len(candidates) > 50, "pydicom's bundled test files were not found"
    read: list[str] = []
    quarantined: collections.Counter[str] = collections.Counter()
    for path in candidates:
        try:
            decoded = decode_image(path, channels=1, height=32, width=32)
        except UnreadableImage as exc:
            reason = str(exc)
            assert reason.strip(), f"empty quarantine reason for {path.name}"
            assert str(path) not in reason and str(PYDICOM_TEST_FILES) not in reason
            quarantined[reason] += 1
            continue
        assert decoded.pixels.shape == (1, 32, 32), path.name
        assert decoded.pixels.dtype == np.float32
        assert np.all(np.isfinite(decoded.pixels)), path.name
        assert decoded.pixels.min() >= 0.0 and decoded.pixels.max() <= 1.0, path.name
        read.append(path.name)
    summary = f"pydicom corpus: {len(read)} read, {sum(quarantined.values())} quarantined; reasons: " + "; ".join(
        f"{count} x {reason}" for reason, count in quarantined.most_common()
    )
    record_property("corpus_read", len(read))
    record_property("corpus_quarantined", sum(quarantined.values()))
    record_property("corpus_summary", summary)
    for required in ("CT_small.dcm", "MR_small.dcm"):
        assert required in read, summary
    assert len(read) >= 30, summary


def test_ct_small_reason_never_leaks_patient_name() -> None:
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    name = str(ds.PatientName)
    path = PYDICOM_TEST_FILES / "MR_truncated.dcm"
    with pytest.raises(UnreadableImage) as info:
        decode_image(path, channels=1, height=8, width=8)
    truncated_name = str(pydicom.dcmread(path, stop_before_pixels=True).PatientName)
    assert name not in str(info.value) and truncated_name not in str(info.value)


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    folder = tmp_path_factory.mktemp(f"fuzz_{PATIENT_NAME}")
    pixels = (np.arange(64, dtype=np.uint16) * 60).reshape(8, 8)
    seed = make_dicom(
        folder / "seed.dcm",
        pixels,
        WindowCenter=2000,
        WindowWidth=4000,
        RescaleSlope=1,
        RescaleIntercept=-1024,
    )
    return seed.read_bytes(), folder / "mutant.dcm"


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,  # reproducible in CI; run with a random seed locally to explore more
    database=None,
)
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=7)), max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_mutated_dicom_bytes_only_raise_unreadable_image(
    fuzz_seed: tuple[bytes, Path], flips: list[tuple[int, int]], cut: int | None
) -> None:
    seed, path = fuzz_seed
    data = bytearray(seed)
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path.write_bytes(bytes(data))
    try:
        decoded = decode_image(path, channels=1, height=8, width=8)
    except UnreadableImage as exc:
        assert_clean_reason(str(exc), path)
        return
    assert decoded.pixels.shape == (1, 8, 8)
    assert np.all(np.isfinite(decoded.pixels))
    assert decoded.pixels.min() >= 0.0 and decoded.pixels.max() <= 1.0


def test_bytes_after_the_deflate_stream_do_not_hang(tmp_path: Path) -> None:
    """Regression: data after the end of a deflated stream once looped the inflation forever."""
    path = tmp_path / "trailing.dcm"
    make_dicom(path, ramp12(), transfer_syntax=DeflatedExplicitVRLittleEndian, WindowCenter=100.5)
    path.write_bytes(path.read_bytes() + b"\x00" * 64)
    try:
        image = decode_image(path, channels=1, height=2, width=4)
    except UnreadableImage as error:
        assert str(error)
    else:
        assert image.pixels.shape == (1, 2, 4)


def test_truncated_png_is_refused_even_after_weasyprint_is_imported(tmp_path: Path) -> None:
    """WeasyPrint sets PIL's LOAD_TRUNCATED_IMAGES on import; decoding must not inherit it."""
    import weasyprint  # noqa: F401
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    Image.fromarray(np.zeros((100, 100), dtype=np.uint8)).save(tmp_path / "whole.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(UnreadableImage):
        decode_image(truncated, channels=1, height=4, width=4)
