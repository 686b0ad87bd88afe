"""Acquisition-shift corruptions of medical images, graded by severity (plain functions).

Each corruption emulates a physical change of how the image was acquired or stored: less dose,
another receive coil, a truncated k-space, a coarser detector, a lossy archive. Images are float
tensors ``(N, C, H, W)`` in ``[0, 1]`` (grayscale or multi-channel, any size) and stay in
``[0, 1]``; work happens on the images' device. Severity 0 is the identity; severities 1 to 5
use the levels of :data:`CORRUPTIONS`, chosen so that the change grows with severity.

Determinism: a stochastic corruption draws its randomness once per image from a CPU
:class:`torch.Generator` seeded with that image's seed, before the severity is applied, so

* the same image and seed give the same corrupted image on every device, batch and run;
* all severities of one image share that draw (common random numbers): severity only scales
  the same noise field, bias field or spike, which makes the change grow with severity rather
  than fluctuate from one fresh draw to the next.

MONAI (Cardoso et al. 2022, "MONAI: An open-source framework for deep learning in healthcare",
arXiv:2211.02701) supplies Gibbs ringing (:class:`monai.transforms.GibbsNoise`) and the discrete
Gaussian kernel of the blur (:func:`monai.networks.layers.gaussian_1d`,
:func:`~monai.networks.layers.separable_filtering`). The noise models are written here because
MONAI's random transforms draw NumPy noise from one stream per call (no per-image seed, no shared
draw across severities) and MONAI has no Poisson noise; the bias field follows MONAI's
``RandBiasField`` (a Legendre-polynomial log-field) with a per-image draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "MAX_SEVERITY",
    "Corruption",
    "CorruptionName",
    "apply_corruption",
    "binning_factors",
    "draw_randomness",
    "poisson_quantile",
    "seeded_draws",
]

MAX_SEVERITY = 5
"""Severities run from 0 (identity) to 5."""

CorruptionName = Literal[
    "gaussian_noise",
    "poisson_noise",
    "rician_noise",
    "blur",
    "contrast",
    "gamma",
    "bias_field",
    "gibbs_ringing",
    "kspace_spike",
    "downsample",
    "jpeg",
]
"""The names of :data:`CORRUPTIONS`, for parameter validation."""

Draw = Callable[[tuple[int, int, int], torch.Generator], torch.Tensor]
Apply = Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Corruption:
    """One acquisition shift.

    Attributes:
        name: the ``corruption`` label of the metrics.
        physics: what the corruption emulates and what its level means physically.
        parameter: the level's name and unit.
        levels: the parameter at severities 1 to 5.
        apply: ``(images, level, draw) -> corrupted images`` (``draw`` is ``None`` for
            deterministic corruptions).
        draw: ``((C, H, W), generator) -> per-image random tensor``, or ``None``.
    """

    name: str
    physics: str
    parameter: str
    levels: tuple[float, ...]
    apply: Apply
    draw: Draw | None = None

    def level(self, severity: int) -> float:
        """The parameter at ``severity`` (1 to 5)."""
        if not 1 <= severity <= len(self.levels):
            raise ValueError(f"severity of {self.name} must be in 1..{len(self.levels)}, got {severity}")
        return self.levels[severity - 1]


# --------------------------------------------------------------------------------------------
# Noise


def _normal_draw(count: int) -> Draw:
    def draw(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
        return torch.randn((count, *shape), generator=generator)

    return draw


def _uniform_draw(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    # Open interval (0, 1): the quantile of u = 0 or 1 is degenerate.
    return torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1.0 - 1e-12)


def _gaussian_noise(images: torch.Tensor, sigma: float, draw: torch.Tensor | None) -> torch.Tensor:
    assert draw is not None
    return (images + sigma * draw[:, 0]).clamp(0.0, 1.0)


def _rician_noise(images: torch.Tensor, sigma: float, draw: torch.Tensor | None) -> torch.Tensor:
    assert draw is not None
    real = images + sigma * draw[:, 0]
    imaginary = sigma * draw[:, 1]
    return torch.sqrt(real * real + imaginary * imaginary).clamp(0.0, 1.0)


def poisson_quantile(rate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The ``u``-quantile of Poisson(``rate``), element-wise: the smallest ``k`` with CDF >= u.

    Sampling by inversion turns uniforms into exact Poisson counts, so one uniform per pixel
    yields coupled counts at every dose (common random numbers). The CDF is
    ``P(K <= k) = Q(k + 1, rate)`` (the regularised upper incomplete gamma function); ``k`` is
    found by bisection on ``[0, rate + 12 sqrt(rate) + 12]``, which holds all but a
    ``1e-12``-tail of the distribution.

    Args:
        rate: non-negative expected counts, any shape.
        u: uniforms in ``(0, 1)``, same shape.

    Returns:
        float64 counts, same shape and device.
    """
    rate = rate.to(torch.float64)
    u = u.to(device=rate.device, dtype=torch.float64)
    low = torch.zeros_like(rate)
    high = torch.ceil(rate + 12.0 * torch.sqrt(rate) + 12.0)
    while bool((low < high).any()):
        middle = torch.floor((low + high) / 2.0)
        enough = torch.special.gammaincc(middle + 1.0, rate) >= u
        high = torch.where(enough, middle, high)
        low = torch.where(enough, low, middle + 1.0)
    return low


def _poisson_noise(images: torch.Tensor, quanta: float, draw: torch.Tensor | None) -> torch.Tensor:
    assert draw is not None
    counts = poisson_quantile(images.to(torch.float64) * quanta, draw)
    return (counts / quanta).to(images.dtype).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Resolution and intensity transfer


def _blur(images: torch.Tensor, sigma: float, draw: torch.Tensor | None) -> torch.Tensor:
    from monai.networks.layers.convutils import gaussian_1d
    from monai.networks.layers.simplelayers import separable_filtering

    kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf")
    kernel = kernel / kernel.sum()  # keep the mean intensity: the truncated tails are dropped
    # "replicate" continues the detector edge; zero padding would darken every border.
    blurred = separable_filtering(images, [kernel, kernel], mode="replicate")
    return blurred.clamp(0.0, 1.0)


def _contrast(images: torch.Tensor, factor: float, draw: torch.Tensor | None) -> torch.Tensor:
    mean = images.mean(dim=(2, 3), keepdim=True)
    return mean + factor * (images - mean)


def _gamma(images: torch.Tensor, gamma: float, draw: torch.Tensor | None) -> torch.Tensor:
    return images.clamp(0.0, 1.0).pow(gamma)


def _legendre(x: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """Legendre polynomials P_0 .. P_degree at ``x`` (Bonnet's recursion)."""
    polys = [torch.ones_like(x), x]
    for n in range(1, degree):
        polys.append(((2 * n + 1) * x * polys[n] - n * polys[n - 1]) / (n + 1))
    return polys[: degree + 1]


_BIAS_DEGREE = 3
_BIAS_TERMS = [(i, j) for i in range(_BIAS_DEGREE + 1) for j in range(_BIAS_DEGREE + 1 - i)]


def _bias_draw(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """A smooth log-field with max |value| 1: Legendre terms P_i(y) P_j(x), i + j <= 3.

    Coefficients are uniform in [-1, 1] as in MONAI's ``RandBiasField`` (except the constant
    term, which would only rescale the image); the field is scaled so its largest magnitude is 1.
    """
    _, height, width = shape
    coefficients = torch.rand(len(_BIAS_TERMS), generator=generator, dtype=torch.float64) * 2 - 1
    coefficients[_BIAS_TERMS.index((0, 0))] = 0.0
    rows = _legendre(torch.linspace(-1.0, 1.0, height, dtype=torch.float64), _BIAS_DEGREE)
    cols = _legendre(torch.linspace(-1.0, 1.0, width, dtype=torch.float64), _BIAS_DEGREE)
    field = torch.zeros(height, width, dtype=torch.float64)
    for coefficient, (i, j) in zip(coefficients, _BIAS_TERMS, strict=True):
        field += coefficient * rows[i][:, None] * cols[j][None, :]
    peak = field.abs().max()
    if peak > 0:
        field = field / peak
    return field.to(torch.float32).expand(shape).clone()


def _bias_field(images: torch.Tensor, amplitude: float, draw: torch.Tensor | None) -> torch.Tensor:
    assert draw is not None
    return (images * torch.exp(amplitude * draw)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# k-space artefacts


def _gibbs(images: torch.Tensor, alpha: float, draw: torch.Tensor | None) -> torch.Tensor:
    from monai.transforms.intensity.array import GibbsNoise

    n, c, h, w = images.shape
    # MONAI treats the first axis as channels: fold batch and channels together.
    out = GibbsNoise(alpha=alpha)(images.reshape(n * c, h, w))
    if hasattr(out, "as_tensor"):  # a MONAI MetaTensor: drop the metadata
        out = out.as_tensor()
    return torch.as_tensor(out).reshape(n, c, h, w).to(images.dtype).clamp(0.0, 1.0)


def _spike_draw(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """(ky, kx, phase) of one spike at 10-40 % of the Nyquist frequency, random orientation."""
    _, height, width = shape
    radius, angle, phase = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    radius = 0.1 + 0.3 * radius
    angle *= math.pi
    ky = round(radius * math.sin(angle) * height / 2.0)
    kx = round(radius * math.cos(angle) * width / 2.0)
    if ky == 0 and kx == 0:  # tiny images: never the DC term, which would only shift intensity
        kx = 1
    return torch.tensor([float(ky), float(kx), 2.0 * math.pi * phase], dtype=torch.float64)


def _kspace_spike(images: torch.Tensor, amplitude: float, draw: torch.Tensor | None) -> torch.Tensor:
    assert draw is not None
    _, _, height, width = images.shape
    params = draw.to(device=images.device, dtype=torch.float64)
    ky, kx, phase = (params[:, i].view(-1, 1, 1) for i in range(3))
    rows = torch.arange(height, device=images.device, dtype=torch.float64).view(1, -1, 1)
    cols = torch.arange(width, device=images.device, dtype=torch.float64).view(1, 1, -1)
    # A Hermitian pair of k-space samples at +-(ky, kx) is a real cosine grating in the image.
    stripes = torch.cos(2.0 * math.pi * (ky * rows / height + kx * cols / width) + phase)
    mean = images.mean(dim=(2, 3), keepdim=True)
    return (images + amplitude * mean * stripes.unsqueeze(1).to(images.dtype)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Sampling and storage


def binning_factors(area: int) -> tuple[int, int]:
    """Block (rows, columns) of a detector element of ``area`` input pixels (a power of two).

    Rows are binned first: 2 -> 2x1, 4 -> 2x2, 8 -> 4x2, 16 -> 4x4, 32 -> 8x4. Every grid
    refines the next, so a coarser element only discards detail that a finer one kept.
    """
    exponent = int(area).bit_length() - 1
    if area < 1 or 2**exponent != area:
        raise ValueError(f"binning area must be a power of two, got {area}")
    rows = 2 ** ((exponent + 1) // 2)
    return rows, int(area) // rows


def _downsample(images: torch.Tensor, area: float, draw: torch.Tensor | None) -> torch.Tensor:
    rows, cols = binning_factors(int(area))
    _, _, height, width = images.shape
    # ceil_mode keeps the partial blocks at the far edges; their mean is over the pixels present.
    binned = F.avg_pool2d(images, (rows, cols), stride=(rows, cols), ceil_mode=True)
    replicated = binned.repeat_interleave(rows, dim=2).repeat_interleave(cols, dim=3)
    return replicated[:, :, :height, :width].contiguous()


def _jpeg(images: torch.Tensor, quality: float, draw: torch.Tensor | None) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    n, c = images.shape[:2]
    # Baseline JPEG stores 8 bits per sample; each channel is coded as its own grayscale image,
    # as DICOM stores monochrome frames (no chroma subsampling of multi-channel inputs).
    planes = (images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    out = np.empty_like(planes)
    for i in range(n):
        for j in range(c):
            buffer = io.BytesIO()
            Image.fromarray(planes[i, j]).save(buffer, format="JPEG", quality=int(quality))
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                out[i, j] = np.asarray(decoded.convert("L"))
    return torch.from_numpy(out).to(device=images.device, dtype=images.dtype) / 255.0


# --------------------------------------------------------------------------------------------
# The catalogue


CORRUPTIONS: dict[str, Corruption] = {
    corruption.name: corruption
    for corruption in (
        Corruption(
            "gaussian_noise",
            "Additive electronic (read-out) noise of the detector, independent of the signal. "
            "Level: noise standard deviation as a fraction of the full intensity range "
            "(0.01 is 2.6 grey levels of an 8-bit display, 41 of a 12-bit detector).",
            "sigma (fraction of full scale)",
            (0.01, 0.02, 0.04, 0.06, 0.10),
            _gaussian_noise,
            _normal_draw(1),
        ),
        Corruption(
            "poisson_noise",
            "Quantum (shot) noise at reduced X-ray or CT dose: the pixel value is read as the "
            "mean of N detected quanta at full scale, and the image is replaced by exact Poisson "
            "counts divided by N. Each severity halves the dose (N = 1600 ... 100); the relative "
            "noise at mid-grey grows from 3.5 % to 14 %.",
            "quanta per pixel at full scale",
            (1600.0, 800.0, 400.0, 200.0, 100.0),
            _poisson_noise,
            _uniform_draw,
        ),
        Corruption(
            "rician_noise",
            "MR magnitude noise: Gaussian noise of equal variance in the real and imaginary "
            "receiver channels, then the magnitude, which biases dark regions upwards "
            "(Gudbjartsson & Patz 1995, 'The Rician distribution of noisy MRI data', MRM). "
            "Level: the per-channel standard deviation as a fraction of full scale (SNR 50 to "
            "5 at mid-grey).",
            "sigma (fraction of full scale)",
            (0.01, 0.02, 0.04, 0.06, 0.10),
            _rician_noise,
            _normal_draw(2),
        ),
        Corruption(
            "blur",
            "Loss of spatial resolution from focal-spot size, detector scatter, patient motion or "
            "a softer reconstruction kernel: convolution with a Gaussian point-spread function. "
            "Level: its standard deviation in pixels of the model input (FWHM = 2.355 sigma).",
            "PSF sigma (pixels)",
            (0.5, 1.0, 1.5, 2.0, 3.0),
            _blur,
        ),
        Corruption(
            "contrast",
            "Reduced subject contrast from scatter and veiling glare, a higher tube voltage or a "
            "wider display window: every pixel moves towards the image mean. Level: the "
            "remaining fraction of contrast.",
            "contrast factor",
            (0.8, 0.65, 0.5, 0.35, 0.2),
            _contrast,
        ),
        Corruption(
            "gamma",
            "A different intensity transfer curve (detector response, VOI LUT or vendor "
            "post-processing): x -> x^gamma on the [0, 1] presentation range; gamma > 1 darkens "
            "mid-tones as a harder LUT does.",
            "gamma",
            (1.25, 1.5, 2.0, 2.5, 3.0),
            _gamma,
        ),
        Corruption(
            "bias_field",
            "Smooth multiplicative intensity inhomogeneity: MR receive-coil (B1) sensitivity, "
            "the X-ray heel effect (Van Leemput et al. 1999, 'Automated model-based tissue "
            "classification of MR images of the brain', IEEE TMI). The log-field is a random "
            "cubic Legendre polynomial with peak magnitude 1, scaled by the level: at 0.3 "
            "intensities vary by a factor 0.74 to 1.35 across the field.",
            "peak |log gain|",
            (0.1, 0.2, 0.3, 0.45, 0.6),
            _bias_field,
            _bias_draw,
        ),
        Corruption(
            "gibbs_ringing",
            "MR truncation artefact: k-space acquired only inside a disc (a smaller acquisition "
            "matrix than the reconstruction matrix), so sharp edges ring (MONAI GibbsNoise). "
            "Level alpha: the disc radius is (1 - alpha) of the half-diagonal of k-space.",
            "alpha",
            (0.35, 0.45, 0.55, 0.65, 0.75),
            _gibbs,
        ),
        Corruption(
            "kspace_spike",
            "MR spike (herringbone) artefact: one corrupted k-space sample, e.g. from an RF "
            "discharge, adds a cosine grating across the whole image; its orientation, spatial "
            "frequency (10-40 % of Nyquist) and phase are random per image. Level: grating "
            "amplitude as a fraction of the image's mean intensity.",
            "amplitude (fraction of mean intensity)",
            (0.05, 0.1, 0.2, 0.3, 0.5),
            _kspace_spike,
            _spike_draw,
        ),
        Corruption(
            "downsample",
            "A coarser detector element or acquisition matrix: pixels are binned (averaged) "
            "over 2x1, 2x2, 4x2, 4x4 and 8x4 blocks (rows x columns) and shown back at the input "
            "size by replication. Level: the binned element's area in input pixels, doubling "
            "with each severity.",
            "element area (pixels)",
            (2.0, 4.0, 8.0, 16.0, 32.0),
            _downsample,
        ),
        Corruption(
            "jpeg",
            "Lossy 8-bit baseline JPEG as in teleradiology and archive compression (DICOM "
            "transfer syntax 1.2.840.10008.1.2.4.50); includes the rounding to 8 bits. Level: "
            "the JPEG quality factor.",
            "JPEG quality",
            (90.0, 75.0, 50.0, 30.0, 15.0),
            _jpeg,
        ),
    )
}
"""Every corruption by name, in the order metrics and plots list them."""

CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)


def _lookup(name: str) -> Corruption:
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown corruption {name!r}; expected one of {list(CORRUPTION_NAMES)}") from None


def draw_randomness(name: str, shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor | None:
    """The per-image random draw of a corruption, on the CPU (``None`` if it is deterministic).

    Args:
        name: the corruption.
        shape: the images' shape ``(N, C, H, W)``.
        seeds: one seed per image.

    Returns:
        A tensor whose first axis is the image, shared by every severity of that image.
    """
    corruption = _lookup(name)
    if corruption.draw is None:
        return None
    return seeded_draws(corruption.draw, shape, seeds, "(N, C, H, W)")


def seeded_draws(
    draw: Callable[..., torch.Tensor], shape: tuple[int, ...], seeds: Sequence[int], layout: str
) -> torch.Tensor:
    """``draw(one item's shape, generator)`` for every item of a batch of ``shape`` (``layout``
    names its axes, the first being the item), each from a CPU generator seeded by its seed.

    Raises:
        ValueError: ``shape`` is not of ``layout``'s rank, or not one seed per item.
    """
    if len(shape) != layout.count(",") + 1:
        raise ValueError(f"expected shape {layout}, got {tuple(shape)}")
    if len(seeds) != shape[0]:
        raise ValueError(f"expected one seed per item ({shape[0]}), got {len(seeds)}")
    per_item = tuple(int(v) for v in shape[1:])
    draws = []
    for seed in seeds:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
        draws.append(draw(per_item, generator))
    return torch.stack(draws)


def apply_corruption(
    images: torch.Tensor,
    name: str,
    severity: int,
    *,
    seeds: Sequence[int] | None = None,
    draw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Corrupt ``images`` with corruption ``name`` at ``severity`` (0 = unchanged).

    Args:
        images: float ``(N, C, H, W)`` in ``[0, 1]``, on any device.
        name: one of :data:`CORRUPTION_NAMES`.
        severity: 0 to 5.
        seeds: one seed per image for stochastic corruptions (default: the image's index).
        draw: a draw from :func:`draw_randomness` to reuse across severities (overrides
            ``seeds``).

    Returns:
        The corrupted images: same shape, dtype and device, values in ``[0, 1]``.

    Raises:
        ValueError: unknown corruption, severity outside 0..5, or images not 4-D.
    """
    corruption = _lookup(name)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}")
    if severity == 0 or images.shape[0] == 0:
        return images.clone()
    if corruption.draw is not None and draw is None:
        draw = draw_randomness(name, tuple(images.shape), list(range(images.shape[0])) if seeds is None else seeds)
    if draw is not None:
        draw = draw.to(images.device)
    with torch.no_grad():
        out = corruption.apply(images, corruption.level(severity), draw)
    return out.to(images.dtype)
