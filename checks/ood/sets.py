"""Built-in out-of-distribution sets: they need no user data.

* Synthetic shifts of eval images (:func:`synthetic_shift`): ``noise`` (uniform noise, no
  anatomy), ``inverted`` (``1 - x``, a wrong photometric interpretation), ``blank`` (constant
  images, a blank detector readout) and ``corrupted`` (additive Gaussian noise of standard
  deviation 0.38, severity 5 of Hendrycks & Dietterich 2019, "Benchmarking Neural Network
  Robustness to Common Corruptions and Perturbations", ICLR).
* A real other-modality set (:func:`load_other_modality`): the single-frame grayscale CT and MR
  images that pydicom ships in its package test data (``pydicom/data/test_files``), found by a
  listing of four header elements of each file in that folder (never downloaded), decoded with
  :func:`auditkit.decode.decode_image` to the model's input, and de-duplicated by decoded
  pixels (pydicom ships the same MR slice in several transfer syntaxes).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from auditkit.decode import DecodeBudget, WindowSetting, decode_image, quiet_pydicom
from auditkit.errors import UnreadableImage

__all__ = [
    "BUILTIN_SETS",
    "OTHER_MODALITIES",
    "SYNTHETIC_SHIFTS",
    "OtherModalitySet",
    "clear_caches",
    "describe",
    "find_other_modality_files",
    "load_other_modality",
    "pydicom_test_files",
    "synthetic_shift",
]

log = logging.getLogger(__name__)

SYNTHETIC_SHIFTS = ("noise", "inverted", "blank", "corrupted")
BUILTIN_SETS = (*SYNTHETIC_SHIFTS, "other_modality")
OTHER_MODALITIES = ("CT", "MR")
CORRUPTION_SIGMA = 0.38
"""Standard deviation of the ``corrupted`` set's Gaussian noise (ImageNet-C severity 5)."""

_DESCRIPTIONS = {
    "noise": "uniform noise images in [0, 1], one per sampled eval image (no anatomy)",
    "inverted": "sampled eval images with inverted intensities (1 - x)",
    "blank": "constant images at evenly spaced grey levels from black to white",
    "corrupted": (
        f"sampled eval images with additive Gaussian noise (sigma {CORRUPTION_SIGMA}, "
        "ImageNet-C severity 5), clipped to [0, 1]"
    ),
    "other_modality": "single-frame CT and MR slices from pydicom's package test data",
}


def describe(name: str) -> str:
    """One sentence describing a built-in set."""
    if name not in _DESCRIPTIONS:
        raise ValueError(f"unknown built-in set {name!r}; expected one of {list(BUILTIN_SETS)}")
    return _DESCRIPTIONS[name]


def synthetic_shift(name: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One synthetic out-of-distribution image per input image.

    Args:
        name: one of :data:`SYNTHETIC_SHIFTS`.
        images: float images ``(N, C, H, W)`` or volumes ``(N, C, D, H, W)`` in [0, 1] (eval
            images; ``noise`` and ``blank`` use their shape only).
        generator: the source of randomness (``noise`` and ``corrupted``).

    Returns:
        float32 images of the input's shape in [0, 1].

    Raises:
        ValueError: an unknown ``name`` or images that are neither 4-D nor 5-D.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"images must have shape (N, C, H, W) or (N, C, D, H, W), got {tuple(images.shape)}")
    x = images.float()
    if name == "noise":
        return torch.rand(x.shape, generator=generator)
    if name == "inverted":
        return 1.0 - x
    if name == "blank":
        n = x.shape[0]
        levels = torch.linspace(0.0, 1.0, n) if n > 1 else torch.full((n,), 0.5)
        return levels.view(n, *([1] * (x.ndim - 1))).expand_as(x).contiguous()
    if name == "corrupted":
        noise = torch.randn(x.shape, generator=generator) * CORRUPTION_SIGMA
        return (x + noise).clamp(0.0, 1.0)
    raise ValueError(f"unknown synthetic shift {name!r}; expected one of {list(SYNTHETIC_SHIFTS)}")


# --------------------------------------------------------------------------------------------
# Other modality


def pydicom_test_files() -> Path:
    """The folder of pydicom's packaged test data (it may be absent from slim installs)."""
    import pydicom

    return Path(pydicom.__file__).resolve().parent / "data" / "test_files"


@dataclass
class OtherModalitySet:
    """The decoded other-modality images and what was used or left out.

    Attributes:
        images: float32 ``(N, C, H, W)`` in [0, 1].
        files: paths relative to the test-data folder, one per image.
        modalities: the DICOM Modality of each image (``CT`` or ``MR``).
        duplicates: files left out because their decoded pixels repeat an earlier file's.
        skipped: ``{file, reason}`` of candidates that could not be decoded.
    """

    images: torch.Tensor
    files: list[str]
    modalities: list[str]
    duplicates: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


_LISTING_TAGS = ("Modality", "Rows", "NumberOfFrames", "SamplesPerPixel")


@functools.lru_cache(maxsize=4)
def find_other_modality_files(folder: Path) -> tuple[tuple[Path, str], ...]:
    """Single-frame, single-sample CT and MR files under ``folder``, sorted by relative path.

    Reads only the four header elements that decide (``specific_tags``): the folder is
    pydicom's own packaged test data, not user input, and a full header read of its ~170 files
    cost about two seconds per audit. Unreadable files, other modalities, multi-frame and colour
    images are left out; the images themselves are decoded by :func:`load_other_modality` under
    the full, bounded decoder. Returns ``(path, modality)`` pairs, cached per folder.
    """
    import pydicom

    found: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return ()
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        if not path.is_file() or path.suffix.lower() not in ("", ".dcm"):
            continue
        try:
            with quiet_pydicom():
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_LISTING_TAGS))
                modality = str(header.get("Modality", "") or "")
                rows = header.get("Rows")
                frames = int(header.get("NumberOfFrames", 1) or 1)
                samples = int(header.get("SamplesPerPixel", 1) or 1)
        except Exception:
            continue
        if modality in OTHER_MODALITIES and rows is not None and frames == 1 and samples == 1:
            found.append((path, modality))
    return tuple(found)


def load_other_modality(
    *,
    channels: int,
    height: int,
    width: int,
    window: WindowSetting | None = None,
    budget: DecodeBudget | None = None,
    folder: Path | None = None,
) -> OtherModalitySet:
    """Decode pydicom's CT and MR test images to the model input, once each.

    Args:
        channels: channels the model expects.
        height: model input height.
        width: model input width.
        window: the spec's DICOM window (the deployed pipeline would apply the same); default
            ``auto``.
        budget: decoding limits; default :class:`~auditkit.decode.DecodeBudget`.
        folder: where to look (default :func:`pydicom_test_files`).

    Returns:
        The set; ``images`` has zero rows when the folder is missing or nothing decodes. The
        decoded set is cached per argument set for the life of the process (installed package
        data do not change), so repeated audits in one process decode it once; the caller gets
        its own copy of the images. :func:`clear_caches` empties the cache.
    """
    root = folder if folder is not None else pydicom_test_files()
    loaded = _load_other_modality(channels, height, width, window or WindowSetting(), budget or DecodeBudget(), root)
    return replace(
        loaded,
        images=loaded.images.clone(),
        files=list(loaded.files),
        modalities=list(loaded.modalities),
        duplicates=list(loaded.duplicates),
        skipped=[dict(s) for s in loaded.skipped],
    )


def clear_caches() -> None:
    """Forget the listing and the decoded other-modality set (the next audit reads them again)."""
    find_other_modality_files.cache_clear()
    _load_other_modality.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_other_modality(
    channels: int, height: int, width: int, window: WindowSetting, budget: DecodeBudget, root: Path
) -> OtherModalitySet:
    images: list[torch.Tensor] = []
    files: list[str] = []
    modalities: list[str] = []
    duplicates: list[str] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    for path, modality in find_other_modality_files(root):
        name = path.relative_to(root).as_posix()
        try:
            decoded = decode_image(path, channels=channels, height=height, width=width, window=window, budget=budget)
        except UnreadableImage as error:
            skipped.append({"file": name, "reason": str(error) or type(error).__name__})
            continue
        digest = hashlib.sha256(decoded.pixels.tobytes()).hexdigest()
        if digest in seen:
            duplicates.append(name)
            continue
        seen.add(digest)
        images.append(torch.from_numpy(decoded.pixels))
        files.append(name)
        modalities.append(modality)
    stacked = torch.stack(images).float() if images else torch.empty((0, channels, height, width))
    log.debug("other-modality set: %d images, %d skipped", len(files), len(skipped))
    return OtherModalitySet(stacked, files, modalities, duplicates, skipped)
