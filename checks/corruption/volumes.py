"""Acquisition artefacts of 3-D volumes, graded by severity (plain functions).

The 2-D corruptions of :mod:`.transforms` change one image; a volume is acquired as a whole, and
its characteristic failures are of the acquisition: the patient moves during an MR scan, the
phase-encoding lines are inconsistent, one k-space sample is corrupted, the receive coil's
sensitivity varies over the field of view, a CT scan is taken at lower dose, or the slices are
reconstructed thicker. Volumes are float tensors ``(N, C, D, H, W)`` in ``[0, 1]`` (the loader's
presentation range, one window per volume) with each volume's voxel size ``(z, y, x)`` in
millimetres on the model's grid; results are clamped to ``[0, 1]`` and keep shape, dtype and
device.

The MR artefacts are TorchIO's deterministic transforms (Pérez-García et al. 2021, "TorchIO: a
Python library for efficient loading, preprocessing, augmentation and patch-based sampling of
medical images in deep learning", Computer Methods and Programs in Biomedicine):
:class:`torchio.Motion` (Shaw et al. 2019: k-space segments of rigidly moved copies of the
volume), :class:`torchio.Ghosting`, :class:`torchio.Spike` and :class:`torchio.BiasField`. Their
random counterparts draw parameters from one global stream; here the parameters are drawn per
volume from the volume's seed (a CPU :class:`torch.Generator`), once, and every severity scales
the same draw - the common random numbers of :mod:`.transforms` - so the same volume and seed
give the same corrupted volume on every device, batch and run, and the change grows with
severity. CT noise and slice thickness are written here (TorchIO has no CT noise model; its
resampling would change the grid the model reads).

Each volume is transformed on the CPU (TorchIO and SimpleITK work on NumPy arrays), one at a
time, and moved back to the images' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray

from auditkit.checks.corruption.transforms import MAX_SEVERITY, seeded_draws

__all__ = [
    "VOLUME_CORRUPTIONS",
    "VOLUME_CORRUPTION_NAMES",
    "VolumeCorruption",
    "VolumeCorruptionName",
    "apply_volume_corruption",
    "default_volume_corruptions",
    "draw_volume_randomness",
]

VolumeCorruptionName = Literal[
    "mr_motion",
    "mr_ghosting",
    "mr_spike",
    "mr_bias_field",
    "ct_noise",
    "slice_thickness",
]
"""The names of :data:`VOLUME_CORRUPTIONS`, for parameter validation."""

Shape = tuple[int, int, int, int]
"""One volume's shape ``(C, D, H, W)``."""
VolumeDraw = Callable[[Shape, torch.Generator], torch.Tensor]
VolumeApply = Callable[[torch.Tensor, float, "torch.Tensor | None", tuple[float, float, float]], torch.Tensor]
"""``(volume (C, D, H, W) float32 on the CPU, level, draw, spacing (z, y, x) mm) -> volume``."""


@dataclass(frozen=True)
class VolumeCorruption:
    """One acquisition artefact of a volume.

    Attributes:
        name: the ``corruption`` label of the metrics.
        physics: what the artefact emulates and what its level means physically.
        parameter: the level's name and unit.
        levels: the parameter at severities 1 to 5.
        apply: ``(volume, level, draw, spacing) -> corrupted volume`` for one ``(C, D, H, W)``
            float32 CPU volume (``draw`` is ``None`` for deterministic artefacts).
        draw: ``((C, D, H, W), generator) -> per-volume random tensor``, or ``None``.
        modality: ``MR`` or ``CT`` when the artefact belongs to one modality, ``None`` for any.
    """

    name: str
    physics: str
    parameter: str
    levels: tuple[float, ...]
    apply: VolumeApply
    draw: VolumeDraw | None = None
    modality: str | None = None

    def level(self, severity: int) -> float:
        """The parameter at ``severity`` (1 to 5)."""
        if not 1 <= severity <= len(self.levels):
            raise ValueError(f"severity of {self.name} must be in 1..{len(self.levels)}, got {severity}")
        return self.levels[severity - 1]


def _subject(volume: torch.Tensor, spacing: tuple[float, float, float]) -> Any:
    """A TorchIO subject of one volume whose voxel axes are ``(D, H, W)`` at ``spacing`` mm."""
    import torchio as tio

    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    image = tio.ScalarImage(tensor=volume.to(torch.float32), affine=affine)  # type: ignore[no-untyped-call]
    return tio.Subject(image=image)


def _torchio(transform: Any, volume: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    out = transform(_subject(volume, spacing))["image"].data
    return torch.as_tensor(out, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# MR: motion, ghosting, spike, bias field (TorchIO)

_MOVEMENTS = 2
"""Movements per motion-corrupted scan (TorchIO's ``RandomMotion`` default)."""


def _motion_draw(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """Per movement: rotation and translation directions in ``[-1, 1]^3`` and the time (share of
    the scan) at which it happens, sorted, in ``[0.1, 0.9]``."""
    directions = torch.rand(_MOVEMENTS, 6, generator=generator, dtype=torch.float64) * 2 - 1
    times = torch.sort(0.1 + 0.8 * torch.rand(_MOVEMENTS, generator=generator, dtype=torch.float64)).values
    return torch.cat([directions, times[:, None]], dim=1)


def _motion(
    volume: torch.Tensor, level: float, draw: torch.Tensor | None, spacing: tuple[float, float, float]
) -> torch.Tensor:
    import torchio as tio

    assert draw is not None
    params = draw.numpy()
    transform = tio.Motion(
        degrees=level * params[:, :3],
        translation=level * params[:, 3:6],
        times=params[:, 6],
        image_interpolation="linear",
    )
    return _torchio(transform, volume, spacing)


def _ghosting_draw(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """The phase-encoding axis (``H`` or ``W``) and the number of ghosts (4 to 10)."""
    axis = 1 + int(torch.randint(0, 2, (1,), generator=generator))
    ghosts = int(torch.randint(4, 11, (1,), generator=generator))
    return torch.tensor([float(axis), float(ghosts)], dtype=torch.float64)


def _ghosting(
    volume: torch.Tensor, level: float, draw: torch.Tensor | None, spacing: tuple[float, float, float]
) -> torch.Tensor:
    import torchio as tio

    assert draw is not None
    axis, ghosts = (int(v) for v in draw.tolist())
    transform = tio.Ghosting(num_ghosts=ghosts, axis=axis, intensity=level, restore=0.02)
    return _torchio(transform, volume, spacing)


def _spike_draw(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """One k-space position at 10-40 % of the Nyquist frequency in a random 3-D direction, as
    TorchIO's fraction of each axis (0.5 is the centre of the shifted spectrum)."""
    direction = torch.randn(3, generator=generator, dtype=torch.float64)
    direction = direction / direction.norm().clamp_min(1e-12)
    radius = 0.1 + 0.3 * float(torch.rand(1, generator=generator, dtype=torch.float64))
    position: torch.Tensor = 0.5 + 0.5 * radius * direction
    sizes = torch.tensor(shape[1:], dtype=torch.float64)
    # Never the centre itself (the DC term only shifts the intensity): at least one sample off it.
    index = torch.floor(position * sizes) - sizes // 2
    if not bool(index.abs().sum()):
        position[2] += 1.0 / float(sizes[2])
    return position


def _spike(
    volume: torch.Tensor, level: float, draw: torch.Tensor | None, spacing: tuple[float, float, float]
) -> torch.Tensor:
    import torchio as tio

    assert draw is not None
    transform = tio.Spike(spikes_positions=draw.numpy()[None, :], intensity=level)
    return _torchio(transform, volume, spacing)


_BIAS_ORDER = 3


def _bias_draw(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """TorchIO's polynomial log-field coefficients (order 3, 20 terms), uniform in ``[-1, 1]``
    as in ``RandomBiasField`` but without the constant term (which only rescales the volume),
    scaled so the log-field's largest magnitude over the volume is 1."""
    import torchio as tio

    terms = (_BIAS_ORDER + 1) * (_BIAS_ORDER + 2) * (_BIAS_ORDER + 3) // 6
    coefficients = torch.rand(terms, generator=generator, dtype=torch.float64) * 2 - 1
    coefficients[0] = 0.0  # x^0 y^0 z^0
    field = tio.BiasField.generate_bias_field(np.zeros((1, *shape[1:])), _BIAS_ORDER, coefficients.tolist())
    peak = float(np.abs(np.log(field)).max())
    scaled: torch.Tensor = coefficients / peak if peak > 0 else coefficients
    return scaled


def _bias_field(
    volume: torch.Tensor, level: float, draw: torch.Tensor | None, spacing: tuple[float, float, float]
) -> torch.Tensor:
    import torchio as tio

    assert draw is not None
    transform = tio.BiasField(coefficients=(level * draw).tolist(), order=_BIAS_ORDER)
    return _torchio(transform, volume, spacing)


# --------------------------------------------------------------------------------------------
# CT: noise at reduced dose; every modality: thicker slices

_CT_NOISE_SIGMA = 0.8
"""In-plane standard deviation (pixels) of the Gaussian that correlates the CT noise."""


def _ct_noise_draw(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance noise correlated in-plane (a reconstruction kernel's noise texture),
    independent between slices."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    radius = max(1, math.ceil(3 * _CT_NOISE_SIGMA))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / _CT_NOISE_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    c, d, h, w = shape
    planes = noise.reshape(c * d, 1, h, w)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="circular"), kernel.view(1, 1, -1, 1))
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="circular"), kernel.view(1, 1, 1, -1))
    planes = planes.reshape(shape)
    return planes / planes.std().clamp_min(1e-12)


def _ct_noise(
    volume: torch.Tensor, level: float, draw: torch.Tensor | None, spacing: tuple[float, float, float]
) -> torch.Tensor:
    assert draw is not None
    return volume + level * draw


def _slice_thickness(
    volume: torch.Tensor, level: float, draw: torch.Tensor | None, spacing: tuple[float, float, float]
) -> torch.Tensor:
    _, d, h, w = volume.shape
    thick = max(1, round(d / level))
    # Each thick slice averages the thin slices it covers (its slab); the model's grid is then
    # filled back by linear interpolation between the thick slices' centres.
    slabs = F.adaptive_avg_pool3d(volume[None], (thick, h, w))
    return F.interpolate(slabs, size=(d, h, w), mode="trilinear", align_corners=False)[0]


# --------------------------------------------------------------------------------------------
# The catalogue

VOLUME_CORRUPTIONS: dict[str, VolumeCorruption] = {
    corruption.name: corruption
    for corruption in (
        VolumeCorruption(
            "mr_motion",
            "Rigid patient motion during an MR acquisition (TorchIO Motion, after Shaw et al. 2019, "
            "'MRI k-space motion artefact augmentation', MIDL): the patient moves twice, at random "
            "times of the scan; k-space is filled by segments from the moved copies of the volume "
            "(the centre from the position held longest), so edges ghost and blur along the "
            "readout. Level: each movement's largest rotation about each axis in degrees and "
            "translation along each axis in millimetres (the same number; directions random per "
            "volume).",
            "largest rotation (deg) and translation (mm) per movement",
            (1.0, 2.0, 3.0, 5.0, 8.0),
            _motion,
            _motion_draw,
            "MR",
        ),
        VolumeCorruption(
            "mr_ghosting",
            "MR ghosting from inconsistent phase-encoding lines (periodic motion: breathing, "
            "pulsation; TorchIO Ghosting): every n-th k-space plane along the phase-encoding axis "
            "(in-plane, random per volume, n = 4 to 10) is attenuated, the central 2 % restored, "
            "so shifted copies of the anatomy appear along that axis. Level: the attenuation of "
            "those planes (1 removes them).",
            "attenuation of every n-th phase-encoding plane",
            (0.15, 0.3, 0.5, 0.7, 0.9),
            _ghosting,
            _ghosting_draw,
            "MR",
        ),
        VolumeCorruption(
            "mr_spike",
            "MR spike (herringbone) artefact: one corrupted k-space sample from an RF discharge "
            "(TorchIO Spike) at 10-40 % of the Nyquist frequency in a random 3-D direction adds a "
            "grating through the whole volume. Level: the spike's magnitude as a fraction of the "
            "spectrum's peak, which is the grating's amplitude as a fraction of the volume's mean "
            "intensity.",
            "spike magnitude (fraction of the spectrum's peak)",
            (0.05, 0.1, 0.2, 0.3, 0.5),
            _spike,
            _spike_draw,
            "MR",
        ),
        VolumeCorruption(
            "mr_bias_field",
            "Smooth multiplicative intensity inhomogeneity of the MR receive coil (B1) (TorchIO "
            "BiasField): the log-gain is a random cubic polynomial of the three coordinates with "
            "peak magnitude 1, scaled by the level; at 0.3 intensities vary by a factor 0.74 to "
            "1.35 across the volume.",
            "peak |log gain|",
            (0.1, 0.2, 0.3, 0.45, 0.6),
            _bias_field,
            _bias_draw,
            "MR",
        ),
        VolumeCorruption(
            "ct_noise",
            "CT quantum noise at reduced dose: noise added to the reconstructed volume, correlated "
            "in-plane as a reconstruction kernel leaves it (Gaussian, sigma 0.8 pixels) and "
            "independent between slices. Halving the dose multiplies the noise by sqrt(2), so a "
            "scan of noise s at full dose has noise s*sqrt(1/f) at dose f; the added noise is "
            "s*sqrt(1/f - 1). Level: the added noise's standard deviation as a fraction of the "
            "display window; in a 400 HU soft-tissue window, 10, 20, 30, 45 and 60 HU (a routine "
            "scan has 10-15 HU: severity 2 is about a quarter of the dose).",
            "added noise SD (fraction of the window)",
            (0.025, 0.05, 0.075, 0.1125, 0.15),
            _ct_noise,
            _ct_noise_draw,
            "CT",
        ),
        VolumeCorruption(
            "slice_thickness",
            "Thicker slices (a different reconstruction or protocol): each thick slice averages "
            "the thin slices of its slab (partial-volume averaging along the slice axis), and the "
            "model's grid is filled back by linear interpolation. Level: the thick slice as a "
            "multiple of the model grid's slice spacing (the thickness in millimetres at each "
            "volume's spacing is in the corruption_setup finding).",
            "slice thickness (multiple of the slice spacing)",
            (1.5, 2.0, 3.0, 4.0, 6.0),
            _slice_thickness,
        ),
    )
}
"""Every volume artefact by name, in the order metrics and plots list them."""

VOLUME_CORRUPTION_NAMES: tuple[str, ...] = tuple(VOLUME_CORRUPTIONS)


def default_volume_corruptions(modalities: Sequence[str | None]) -> tuple[str, ...]:
    """The artefacts run on volumes of these DICOM modalities by default.

    Every volume of the sample ``CT``: CT noise and slice thickness; every one ``MR``: the MR
    artefacts and slice thickness; otherwise (mixed, unknown, NIfTI or ``.npy`` without a
    header): every artefact.
    """
    known = {m.upper() for m in modalities if m}
    if len(known) == 1 and len(known) == len({m or "" for m in modalities}):
        (modality,) = known
        if modality in ("CT", "MR"):
            return tuple(n for n, c in VOLUME_CORRUPTIONS.items() if c.modality in (None, modality))
    return VOLUME_CORRUPTION_NAMES


def _lookup(name: str) -> VolumeCorruption:
    try:
        return VOLUME_CORRUPTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown volume corruption {name!r}; expected one of {list(VOLUME_CORRUPTION_NAMES)}"
        ) from None


def draw_volume_randomness(name: str, shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor | None:
    """The per-volume random draw of an artefact, on the CPU (``None`` if it is deterministic).

    Args:
        name: the artefact.
        shape: the volumes' shape ``(N, C, D, H, W)``.
        seeds: one seed per volume.

    Returns:
        A tensor whose first axis is the volume, shared by every severity of that volume.
    """
    corruption = _lookup(name)
    if corruption.draw is None:
        return None
    draws: torch.Tensor = seeded_draws(corruption.draw, shape, seeds, "(N, C, D, H, W)")
    return draws


def apply_volume_corruption(
    volumes: torch.Tensor,
    name: str,
    severity: int,
    *,
    spacing: ArrayLike | None = None,
    seeds: Sequence[int] | None = None,
    draw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Corrupt ``volumes`` with artefact ``name`` at ``severity`` (0 = unchanged).

    Args:
        volumes: float ``(N, C, D, H, W)`` in ``[0, 1]``, on any device.
        name: one of :data:`VOLUME_CORRUPTION_NAMES`.
        severity: 0 to 5.
        spacing: ``(N, 3)`` voxel sizes ``(z, y, x)`` in mm on the volumes' grid (default 1 mm):
            motion translations are in millimetres.
        seeds: one seed per volume for random artefacts (default: the volume's index).
        draw: a draw from :func:`draw_volume_randomness` to reuse across severities (overrides
            ``seeds``).

    Returns:
        The corrupted volumes: same shape, dtype and device, values in ``[0, 1]``.

    Raises:
        ValueError: unknown artefact, severity outside 0..5, volumes not 5-D or a spacing of
            another shape.
    """
    corruption = _lookup(name)
    if volumes.ndim != 5:
        raise ValueError(f"volumes must have shape (N, C, D, H, W), got {tuple(volumes.shape)}")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}")
    n = volumes.shape[0]
    grid: NDArray[np.float64] = (
        np.ones((n, 3)) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1, 3)
    )
    if grid.shape[0] != n:
        raise ValueError(f"expected one spacing per volume ({n}), got {grid.shape[0]}")
    if severity == 0 or n == 0:
        return volumes.clone()
    if corruption.draw is not None and draw is None:
        draw = draw_volume_randomness(name, tuple(volumes.shape), list(range(n)) if seeds is None else seeds)
    level = corruption.level(severity)
    out = torch.empty_like(volumes)
    with torch.no_grad():
        for i in range(n):
            volume = volumes[i].detach().to("cpu", torch.float32)
            corrupted = corruption.apply(
                volume, level, None if draw is None else draw[i].cpu(), (grid[i, 0], grid[i, 1], grid[i, 2])
            )
            out[i] = corrupted.clamp(0.0, 1.0).to(device=volumes.device, dtype=volumes.dtype)
    return out
