"""Acquisition fingerprints: what a copy of an image shares with it and a look-alike does not.

In a homogeneous study (one anatomy, one protocol) two patients' images at the model's input
differ by a few percent, and a global perceptual hash or a model embedding sees them as near
duplicates. A *copy* of an acquisition (re-noised, re-windowed, re-cropped, rescaled,
re-compressed) keeps what is specific to that exposure: the patient's fine anatomy and texture
and the exposure's own noise, at the places where they were. The fingerprint of an image is that
content, separated from what the study's images have in common:

1. **one analysis size**: the channel mean of each image, resampled to 64 x 64 (bilinear,
   antialiased), whatever the model's input size;
2. **tone**: pixel values are replaced by their ranks (:func:`central_cdf`,
   :func:`rank_normalise`), which no monotone change of window, level, gamma or contrast curve
   alters;
3. **pose**: each image is registered to the study's template (the mean rank image, re-estimated
   once after a first registration) by an affine transform, fitted by efficient second-order
   minimisation (Benhimane and Malis 2004) on the central 80% of the template frame, coarse to
   fine (blur 1 and 0.5 pixels at 32 x 32, then 0.7 pixels at 64 x 64). Shifts, re-crops (a zoom
   and a shift) and rescaling of a copy are undone. The image is resampled into the template's
   frame and its central ``52 x 52`` pixels ranked again, so both images of a pair are ranked on
   the same anatomy, not on the borders a crop removed;
4. **detail**: a difference-of-Gaussians band pass (sigma 0.7 and 1.5 pixels by default) keeps
   the scale of fine anatomy, texture and noise, not the outline of the body and organs that
   every patient shares; the central ``48 x 48`` pixels are kept;
5. **what look-alikes share**: the study's mean detail image and its leading principal axes (the
   population's common modes of variation: rib positions, organ borders, lesions in common
   places) are projected out. The axes are fitted with each image weighted by the inverse of
   the number of images nearly identical to it (cosine above 0.85 before the projection), so a
   group of copies cannot make itself a principal axis and project itself away. At most one
   axis per ten images is used. The rest is centred and scaled to unit length.

The similarity of two images is the inner product of their fingerprints, a correlation in
``[-1, 1]``. :func:`similar_pairs` finds every pair above a bound by blocked matrix products
(time quadratic in the number of images, memory bounded; above 8,192 images on a random sketch
whose candidates are then measured exactly); :func:`calibrate` sets that bound from the study
itself: the similarities of random pairs of its images (which are almost all different
acquisitions, whatever the number of copies) have a median and a robust spread, and a copy lies
``z`` of those spreads above the median, ``z`` growing with the number of pairs compared.

Measured on look-alike studies (``docs/leakage.md``): different patients' pairs have a median
similarity of 0.00 and a robust standard deviation of 0.05-0.06; planted copies score 0.5-1.0.

Plain functions, testable without the engine. Tensors are CPU ``torch`` tensors.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

__all__ = [
    "ANALYSIS_SIZE",
    "DEFAULT_BAND",
    "Calibration",
    "Canonical",
    "Fingerprints",
    "calibrate",
    "canonical_images",
    "central_cdf",
    "detail_vectors",
    "fingerprints",
    "rank_normalise",
    "register_to_template",
    "robust_location",
    "sample_pairs",
    "similar_pairs",
    "slice_depths",
    "volume_fingerprints",
    "warp_affine",
]

ANALYSIS_SIZE = 64
"""Side of the square image every fingerprint is computed from."""

REGISTRATION_SIZE = 32
"""Side of the images of the coarse registration levels (pose is resolution-free; 4x cheaper)."""

CANONICAL_MARGIN = 6
"""Pixels of the 64 x 64 canonical image left out on each side (52 x 52 kept): borders that a
re-crop or a shift of up to ~9% of the width removes or replicates."""

FILTER_MARGIN = 2
"""Further pixels left out after the band pass, whose border is unreliable (48 x 48 kept)."""

DEFAULT_BAND = (0.7, 1.5)
"""Sigmas (pixels of the 64 x 64 image) of the difference-of-Gaussians band pass."""

COARSE_SIGMAS = (1.0, 0.5)
"""Blurs (pixels at 32 x 32) of the coarse registration levels."""

FINE_SIGMA = 0.7
"""Blur (pixels at 64 x 64) of the fine registration level."""

DUPLICATE_COSINE = 0.85
"""Cosine of two detail images (before the projection) above which they count as one image
when the principal axes are fitted."""

MIN_CALIBRATION_PAIRS = 20
"""Pairs a study must have for its own calibration (seven images)."""

UNCALIBRATED_BOUND = 0.95
"""The bound of a study too small to calibrate: only near-identical images (different patients of
the look-alike studies score up to ~0.9 without the study's mean and axes projected out)."""

MIN_FIT_IMAGES = 7
"""Images a study needs before its mean is projected out of the fingerprints (the mean of two
images is half of each: it would make any two images' fingerprints opposite)."""

EXACT_LIMIT = 8192
"""Images up to which :func:`similar_pairs` searches the fingerprints themselves (a few seconds)."""

SKETCH_DIMENSION = 384
"""Random projections of the sketch a larger search runs on."""

DEVICE_MARGIN = 0.01
"""How far below the bound :func:`similar_pairs` keeps candidates found on a device, before it
measures them again on the CPU: a GPU's float32 products may run in TF32 (a 10-bit mantissa,
errors of about 1e-3 on a unit-vector product)."""

_BATCH = 256  # images registered or fingerprinted at a time, all workers together (~40 MiB)
_WORKERS = 4  # most threads that register parts of a batch at once
_FIT_SAMPLE = 2048  # images the template, mean and principal axes are estimated from
_KEEP_LIMIT = 2048  # images whose fine-level registration images are kept (16 KB each); beyond, made per use
_MAX_STEP = 0.1  # largest change of an affine coefficient in one Gauss-Newton step
_RANK_ELEMENTS = 1 << 19  # values ranked at a time (~45 MiB of sort keys and positions)


@dataclass(frozen=True)
class Canonical:
    """Images in the template's pose.

    Attributes:
        images: ``(N, 52, 52)`` float32 rank images in ``[-0.5, 0.5]``.
        theta: ``(N, 2, 3)`` poses (``warp_affine(image, theta)`` is in the template's frame).
        moved: images whose pose is not the identity.
    """

    images: torch.Tensor
    theta: torch.Tensor
    moved: int


@dataclass(frozen=True)
class Fingerprints:
    """Unit-length fingerprints of a set of images.

    Attributes:
        vectors: ``(N, D)`` float32, each row of unit norm (a zero row for a flat image).
        components: principal axes projected out.
        moved: images registered away from the identity pose.
    """

    vectors: torch.Tensor
    components: int
    moved: int


@dataclass(frozen=True)
class Calibration:
    """The study's similarity between different images, and the bound derived from it.

    Attributes:
        median: median similarity of the measured pairs.
        scale: their robust standard deviation (interquartile range / 1.349).
        z: robust standard deviations above the median required (grown with the pairs compared).
        threshold: the bound a near duplicate must reach, ``max(median + z * scale, floor)``.
        pairs: pairs measured (every pair of a small study, a random sample of a large one).
    """

    median: float
    scale: float
    z: float
    threshold: float
    pairs: int


# --------------------------------------------------------------------------------------------
# Tone


def _ranks(values: torch.Tensor, counted: NDArray[np.bool_] | None) -> torch.Tensor:
    """Each value's mid-rank among the ``counted`` columns of its row, scaled to ``[-0.5, 0.5]``.

    The mid-rank of ``v`` is ``(#counted < v + #counted <= v) / 2``: tied values share one. NumPy
    sorts (several times faster than :func:`torch.sort` on a CPU); a tie group is found from its
    first and last sorted positions.
    """
    n, p = values.shape
    rows = max(1, _RANK_ELEMENTS // max(p, 1))
    if n > rows:  # rows are independent; a block at a time bounds the ~90 bytes per value below
        return torch.cat([_ranks(values[start : start + rows], counted) for start in range(0, n, rows)])
    array = np.ascontiguousarray(values.detach().float().numpy())
    order = np.argsort(array, axis=1)
    ordered = np.take_along_axis(array, order, axis=1)
    starts = np.ones((n, p), dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones((n, p), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    position = np.arange(p)
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, position, p)[:, ::-1], axis=1)[:, ::-1]
    middle: NDArray[np.float64]
    if counted is None:
        middle = (first + last + 1) / 2.0
        total = p
    else:
        flags = counted[order].astype(np.int64)
        counts = np.cumsum(flags, axis=1)
        below: NDArray[np.int64] = np.take_along_axis(counts, first, axis=1) - np.take_along_axis(flags, first, axis=1)
        middle = (below + np.take_along_axis(counts, last, axis=1)) / 2.0
        total = int(counted.sum())
    out = np.empty((n, p), dtype=np.float32)
    np.put_along_axis(out, order, (middle / total - 0.5).astype(np.float32), axis=1)
    return torch.from_numpy(out)


def rank_normalise(values: torch.Tensor) -> torch.Tensor:
    """Ranks of each row's values, ties averaged, scaled to ``[-0.5, 0.5]``.

    A monotone increasing change of the values leaves the ranks unchanged, except where it merges
    values (clipping, quantisation).

    Args:
        values: ``(N, P)`` float tensor.

    Returns:
        ``(N, P)`` float32: ``(rank + 0.5) / P - 0.5`` with ranks counted from 0.
    """
    if values.shape[1] == 0:
        return values.float()
    return _ranks(values, None)


def central_cdf(images: torch.Tensor, fraction: float = 0.6) -> torch.Tensor:
    """Each pixel's rank among the central pixels of its own image, in ``[-0.5, 0.5]``.

    Like :func:`rank_normalise`, unchanged by a monotone change of tone; the reference histogram
    is the central ``fraction`` of the width and height only, which a re-crop or a shift of a few
    percent leaves as it was (the ranks over the whole frame are not: a crop removes border
    pixels, a shift replicates them).

    Args:
        images: ``(N, 1, S, S)`` images.
        fraction: side of the central square, as a fraction of the image's side.
    """
    n, _, side, _ = images.shape
    margin = round(side * (1 - fraction) / 2)
    central = np.zeros((side, side), dtype=bool)
    central[margin : side - margin, margin : side - margin] = True
    return _ranks(images.reshape(n, -1), central.reshape(-1)).reshape(images.shape)


# --------------------------------------------------------------------------------------------
# Pose


def _gaussian(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` images, edges replicated.

    Weighted sums of shifted slices: a third of the time of :func:`torch.nn.functional.conv2d`
    with a one-channel kernel on a CPU.
    """
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights = (taps / taps.sum()).tolist()
    height, width = images.shape[-2:]
    padded = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    rows = weights[0] * padded[..., :, 0:width]
    for k in range(1, len(weights)):
        rows = rows + weights[k] * padded[..., :, k : k + width]
    padded = F.pad(rows, (0, 0, radius, radius), mode="replicate")
    out: torch.Tensor = weights[0] * padded[..., 0:height, :]
    for k in range(1, len(weights)):
        out = out + weights[k] * padded[..., k : k + height, :]
    return out


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int) -> torch.Tensor:
    """``(H * W, 3)`` homogeneous normalised coordinates ``(x, y, 1)`` of the pixel centres."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), torch.ones(height * width)], dim=1)


@functools.lru_cache(maxsize=16)
def _region_centres(height: int, width: int, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` ``(1, P)`` of the pixel centres of rows and columns ``first:last``."""
    centres = _pixel_centres(height, width).view(height, width, 3)[first:last, first:last].reshape(-1, 3)
    return centres[None, :, 0].contiguous(), centres[None, :, 1].contiguous()


def warp_affine(images: torch.Tensor, theta: torch.Tensor, region: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample ``(N, 1, H, W)`` images at ``theta @ (x, y, 1)`` (normalised coordinates).

    The convention of :func:`torch.nn.functional.affine_grid` with ``align_corners=False``:
    pixel centres span ``(-1, 1)``; the border is replicated. The sampling grid is computed here
    (``affine_grid`` costs more than the resampling itself on a CPU).

    Args:
        images: ``(N, 1, H, W)`` images.
        theta: ``(N, 2, 3)`` poses.
        region: ``(first, last)``: only rows and columns ``first:last`` of the output frame
            (the same values as those of the whole frame, for less work).
    """
    n, _, height, width = images.shape
    first, last = region if region is not None else (0, max(height, width))
    x, y = _region_centres(height, width, first, last)
    rows, columns = min(last, height) - first, min(last, width) - first
    grid = torch.empty(n, x.shape[1], 2)
    grid[:, :, 0] = theta[:, 0, 0, None] * x + theta[:, 0, 1, None] * y + theta[:, 0, 2, None]
    grid[:, :, 1] = theta[:, 1, 0, None] * x + theta[:, 1, 1, None] * y + theta[:, 1, 2, None]
    return F.grid_sample(
        images, grid.view(n, rows, columns, 2), mode="bilinear", padding_mode="border", align_corners=False
    )


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    full = torch.zeros(theta.shape[0], 3, 3, dtype=theta.dtype)
    full[:, :2] = theta
    full[:, 2, 2] = 1.0
    return full


def _gradients(images: torch.Tensor, margin: int = 0, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of ``(N, 1, S, S)`` images per normalised unit, as ``(N, P)``.

    ``margin`` pixels on each side are left out (``P = (S - 2 margin) ** 2``): the differences
    there read the neighbours in the margin; without a margin the border is replicated. ``side``
    is the side of the frame the normalised units refer to (default ``S``: the images are a whole
    frame, not a region of one).
    """
    width = images.shape[-1]
    frame = images[:, 0] if margin else F.pad(images, (1, 1, 1, 1), mode="replicate")[:, 0]
    first, kept = max(margin, 1), width - 2 * margin  # the first kept pixel's position in frame
    inner, before, after = (slice(first + d, first + d + kept) for d in (0, -1, 1))
    # A pixel is 2 / side normalised units; a central difference spans two pixels.
    scale = (side if side is not None else width) / 4
    grad_x = (frame[:, inner, after] - frame[:, inner, before]) * scale
    grad_y = (frame[:, after, inner] - frame[:, before, inner]) * scale
    return grad_x.reshape(images.shape[0], -1), grad_y.reshape(images.shape[0], -1)


def _fit_margin(side: int) -> int:
    """Pixels of each side of a ``side``-pixel template frame outside the fitted centre."""
    return round(side * CANONICAL_MARGIN / ANALYSIS_SIZE)


@functools.lru_cache(maxsize=8)
def _fit_coordinates(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` ``(P,)`` of the fitted pixels of a ``side``-pixel template frame (row-major)."""
    margin = _fit_margin(side)
    inner = _pixel_centres(side, side).view(side, side, 3)[margin : side - margin, margin : side - margin]
    return inner[..., 0].reshape(-1).contiguous(), inner[..., 1].reshape(-1).contiguous()


def _align(
    moving: torch.Tensor, template: torch.Tensor, theta: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta`` such that ``warp_affine(moving, theta) ~ template``, by damped Gauss-Newton.

    Efficient second-order minimisation (Benhimane and Malis 2004, "Real-time image-based
    tracking of planes using efficient second-order minimization", IROS): the Jacobian is the
    mean of the template's and the warped image's gradients, the update compositional. A step
    that raises an image's error is undone and that image's next steps are halved, so the error
    never rises (undamped Gauss-Newton oscillates on a blurred population-mean template). Only
    the centre of the template frame is fitted: a crop or a shift of a copy changes what lies at
    the borders, and the pose must not depend on it.

    Only the fitted centre and the ring of pixels its gradients read are resampled (28 x 28 of
    a 32 x 32 frame, 54 x 54 of 64 x 64): the same values as slicing the whole warped frame.

    Returns the refined ``theta`` and each image's mean squared error there.
    """
    n = theta.shape[0]
    side = template.shape[-1]
    margin = _fit_margin(side)
    inner = slice(margin, side - margin)
    x, y = _fit_coordinates(side)
    target = template[:, 0, inner, inner].reshape(1, -1)
    template_x, template_y = _gradients(template, margin)
    identity = torch.eye(3).expand(n, 3, 3)
    damping = torch.ones(n)
    regulariser = 1e-6 * torch.eye(6)

    region = (margin - 1, side - margin + 1) if margin else None
    fitted = slice(1, -1) if margin else slice(None)
    moving_margin = 1 if margin else 0

    def measure(at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        warped = warp_affine(moving, at, region)
        residual = warped[:, 0, fitted, fitted].reshape(n, -1) - target
        return warped, residual, residual.pow(2).mean(dim=1)

    warped, residual, error = measure(theta)
    previous = (theta, warped, residual, error)
    for iteration in range(iterations + 1):
        if iteration:
            warped, residual, error = measure(theta)
            worse = ~(error <= previous[3])
            theta = torch.where(worse[:, None, None], previous[0], theta)
            warped = torch.where(worse[:, None, None, None], previous[1], warped)
            residual = torch.where(worse[:, None], previous[2], residual)
            error = torch.where(worse, previous[3], error)
            damping = torch.where(worse, damping / 2, damping)
        if iteration == iterations:
            break
        moving_x, moving_y = _gradients(warped, moving_margin, side)
        grad_x = (moving_x + template_x) / 2
        grad_y = (moving_y + template_y) / 2
        jacobian = torch.stack([grad_x * x, grad_x * y, grad_x, grad_y * x, grad_y * y, grad_y], dim=1)
        hessian = jacobian @ jacobian.transpose(1, 2) + regulariser
        gradient = (jacobian @ residual[:, :, None])[:, :, 0]
        step = -torch.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        step = (step * damping[:, None]).clamp(-_MAX_STEP, _MAX_STEP)
        update = identity.clone()
        update[:, :2] += step.view(n, 2, 3)
        previous = (theta, warped, residual, error)
        theta = (_homogeneous(theta) @ update)[:, :2]
    return theta, error


def register_to_template(
    moving: torch.Tensor,
    template: torch.Tensor,
    *,
    sigmas: tuple[float, ...] = COARSE_SIGMAS,
    iterations: int = 5,
    theta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine pose of each image relative to a template, coarse to fine.

    Args:
        moving: ``(N, 1, S, S)`` tone-normalised images.
        template: ``(1, 1, S, S)`` template of the same size.
        sigmas: Gaussian blurs (pixels) of the successive levels.
        iterations: Gauss-Newton steps per level.
        theta: starting poses ``(N, 2, 3)`` (default: the identity).

    Returns:
        ``(theta, improved)``: the poses, and which images fit the template better than at the
        start. The others keep their starting pose, as do poses that zoom by more than a factor
        of two or shift by more than a quarter of the width: a failed fit must not move them.
    """
    levels = [(_gaussian(moving, sigma), _gaussian(template, sigma)) for sigma in sigmas]
    start = torch.eye(2, 3).repeat(moving.shape[0], 1, 1) if theta is None else theta.clone()
    return _register(levels, start, iterations)


def _register(
    levels: list[tuple[torch.Tensor, torch.Tensor]], start: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`register_to_template` on blurred ``(moving, template)`` pairs, coarse to fine."""
    current = start
    after = torch.empty(0)
    for moving, template in levels:
        current, after = _align(moving, template, current, iterations)
    # ``after`` is the finest level's error at ``current``: the same as measuring it again.
    _, before = _align(*levels[-1], start, 0)
    linear = current[:, :, :2]
    determinant = linear[:, 0, 0] * linear[:, 1, 1] - linear[:, 0, 1] * linear[:, 1, 0]
    plausible = (determinant > 0.5) & (determinant < 2.0) & (current[:, :, 2].abs().amax(dim=1) < 0.5)
    improved = (after <= before) & plausible & torch.isfinite(after)
    return torch.where(improved[:, None, None], current, start), improved


# --------------------------------------------------------------------------------------------
# Canonical images and fingerprints


def _analysis_images(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 64, 64)`` float32 channel means, resampled (bilinear, antialiased)."""
    # One channel is its own mean (the same values, without a second pass over the images).
    gray = images.float() if images.shape[1] == 1 else images.float().mean(dim=1, keepdim=True)
    if gray.shape[-2:] == (ANALYSIS_SIZE, ANALYSIS_SIZE):
        return gray
    size = (ANALYSIS_SIZE, ANALYSIS_SIZE)
    return F.interpolate(gray, size=size, mode="bilinear", antialias=True, align_corners=False)


def _as_analysis(images: torch.Tensor, pool: _Workers) -> torch.Tensor:
    """The analysis images, made once when the inputs are larger or have more channels.

    Registration reads each image some ten times (rounds, levels, the canonical pass); at 224 x 224
    the antialiased resampling each read repeated was most of the check's time. The result (16 KB
    an image) is smaller than the inputs it stands for, and identical to what each read made.
    """
    if images.shape[1] == 1 and tuple(images.shape[-2:]) == (ANALYSIS_SIZE, ANALYSIS_SIZE):
        return images
    return torch.cat(pool.run(lambda b: _analysis_images(images[b]), pool.parts(images.shape[0])))


def _sample(n: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` evenly spaced indices of ``n`` (deterministic)."""
    if n <= limit:
        return torch.arange(n)
    return torch.from_numpy(np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64)))


def _batches(n: int) -> list[slice]:
    return [slice(start, min(start + _BATCH, n)) for start in range(0, n, _BATCH)]


def _small(images: torch.Tensor) -> torch.Tensor:
    """Tone-normalised 32 x 32 images of the coarse registration levels."""
    analysis = _analysis_images(images)
    return central_cdf(F.interpolate(analysis, size=(REGISTRATION_SIZE, REGISTRATION_SIZE), mode="area"))


def _fine(images: torch.Tensor) -> torch.Tensor:
    """Tone-normalised 64 x 64 images of the fine registration level."""
    return central_cdf(_analysis_images(images))


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[int]:
    """PyTorch on one thread for the duration (restored after); yields the threads it had.

    Registration is some forty passes of small element-wise operations per batch; on cores shared
    with other work, PyTorch's parallel regions wait for a descheduled thread, and registering
    1,024 images took about 3x longer on two threads than on one. The principal axes' fit is no
    different: its QR factorisations of a tall, thin matrix took 1.6 s on two loaded threads
    against 0.05 s on one, and the projection 0.12 s against 0.01 s (370 images).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


_T = TypeVar("_T")


class _Workers:
    """Threads that each run PyTorch on their own part of the images (see :func:`_workers`)."""

    def __init__(self, count: int, pool: ThreadPoolExecutor | None) -> None:
        self.count = count
        self._pool = pool

    def parts(self, n: int) -> list[slice]:
        """Slices of ``n`` images, one per thread and batch: at most ``_BATCH`` images in flight."""
        size = max(1, min(_BATCH // self.count, math.ceil(n / self.count)))
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def run(self, function: Callable[[slice], _T], parts: list[slice]) -> list[_T]:
        """``function`` of each part, in order (the parts at once, up to one per thread)."""
        if self._pool is None or len(parts) < 2:
            return [function(part) for part in parts]
        return list(self._pool.map(function, parts))


@contextlib.contextmanager
def _workers(count: int) -> Iterator[_Workers]:
    """``count`` threads (at most :data:`_WORKERS`) that each process their own images.

    Each thread runs PyTorch on one intra-op thread (:func:`_one_torch_thread`) over its own part
    of the images, and the threads meet once per :meth:`_Workers.run`, not at every operation as
    PyTorch's parallel regions do: on two cores a study registers in about 0.6 of the time of
    one, and a thread descheduled by other work delays only its own part. Every image's
    arithmetic is the same whatever the parts (the operations are per image), and so are the
    fingerprints.
    """
    count = max(1, min(count, _WORKERS))
    if count == 1:
        yield _Workers(1, None)
        return
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="auditkit-fingerprint") as pool:
        yield _Workers(count, pool)


def _poses(images: torch.Tensor, rounds: int, iterations: int, fine_iterations: int, pool: _Workers) -> torch.Tensor:
    """The pose of each image relative to the study's template, ``(N, 2, 3)``.

    Each image's tone-normalised images are ranked once (a sort of every pixel: the largest cost
    after the resampling): the coarse levels' 32 x 32 images (4 KB an image, a quarter of the
    analysis images already held) are kept for every round, the fine level's 64 x 64 ones for the
    template and the registration up to ``_KEEP_LIMIT`` images; beyond, those are made again for
    the template's sample and for each part, so memory stays a batch. Each part is blurred once
    per level and round, the template once per level and round. The parts are registered on the
    ``pool``'s threads.
    """
    n = images.shape[0]
    parts = pool.parts(n)
    sample = _sample(n, _FIT_SAMPLE)
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    small = torch.cat(pool.run(lambda b: _small(images[b]), parts))
    template = small[sample].mean(dim=0, keepdim=True)
    for round_number in range(rounds):
        blurred = [_gaussian(template, sigma) for sigma in COARSE_SIGMAS]

        def coarse(b: slice, blurred: list[torch.Tensor] = blurred) -> None:
            levels = [(_gaussian(small[b], sigma), t) for sigma, t in zip(COARSE_SIGMAS, blurred, strict=True)]
            theta[b], _ = _register(levels, theta[b].clone(), iterations)

        pool.run(coarse, parts)
        if round_number + 1 < rounds:
            template = warp_affine(small[sample], theta[sample]).mean(dim=0, keepdim=True)
    if fine_iterations:
        fine = torch.cat(pool.run(lambda b: _fine(images[b]), parts)) if n <= _KEEP_LIMIT else None
        sampled = (
            fine[sample]
            if fine is not None
            else torch.cat(pool.run(lambda b: _fine(images[sample[b]]), pool.parts(sample.numel())))
        )
        template = warp_affine(sampled, theta[sample])
        finest = _gaussian(template.mean(dim=0, keepdim=True), FINE_SIGMA)

        def refine(b: slice) -> None:
            moving = _gaussian(fine[b] if fine is not None else _fine(images[b]), FINE_SIGMA)
            theta[b], _ = _register([(moving, finest)], theta[b].clone(), fine_iterations)

        pool.run(refine, parts)
    return theta


def _canonical(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``(N, 52, 52)`` rank images in the template's frame."""
    keep = slice(CANONICAL_MARGIN, ANALYSIS_SIZE - CANONICAL_MARGIN)
    warped = warp_affine(_analysis_images(images), theta)[:, 0, keep, keep]
    side = warped.shape[-1]
    return rank_normalise(warped.reshape(warped.shape[0], -1)).reshape(-1, side, side)


def canonical_images(
    images: torch.Tensor, *, rounds: int = 2, iterations: int = 5, fine_iterations: int = 4
) -> Canonical:
    """Images in the study template's pose, ranked over their central region.

    Args:
        images: ``(N, C, H, W)`` images of one study (any size and value range).
        rounds: coarse template estimates (the first is the mean of the unregistered images).
        iterations: Gauss-Newton steps per coarse level and round.
        fine_iterations: Gauss-Newton steps of the fine level (0 skips it).

    Returns:
        The :class:`Canonical` images.
    """
    n = images.shape[0]
    side = ANALYSIS_SIZE - 2 * CANONICAL_MARGIN
    if n == 0:
        return Canonical(torch.empty(0, side, side), torch.empty(0, 2, 3), 0)
    with _one_torch_thread() as threads, _workers(threads) as pool:
        images = _as_analysis(images, pool)
        theta = _poses(images, rounds, iterations, fine_iterations, pool)
        canonical = torch.cat(pool.run(lambda b: _canonical(images[b], theta[b]), pool.parts(n)))
    return Canonical(canonical, theta, _moved(theta))


def _moved(theta: torch.Tensor) -> int:
    return int((theta - torch.eye(2, 3)).abs().amax(dim=(1, 2)).gt(1e-6).sum())


def detail_vectors(canonical: torch.Tensor, band: tuple[float, float] = DEFAULT_BAND) -> torch.Tensor:
    """Difference-of-Gaussians band of ``(N, S, S)`` canonical images, central pixels, flattened.

    Returns:
        ``(N, (S - 4) ** 2)`` float32.
    """
    images = canonical[:, None]
    passed = _gaussian(images, band[0]) - _gaussian(images, band[1])
    inner = slice(FILTER_MARGIN, canonical.shape[-1] - FILTER_MARGIN)
    return passed[:, 0, inner, inner].reshape(canonical.shape[0], -1)


def _principal_axes(rows: torch.Tensor, k: int, *, oversampling: int = 16, iterations: int = 6) -> torch.Tensor:
    """The ``k`` leading principal axes ``(k, D)`` of (weighted, centred) rows ``(n, D)``.

    Subspace iteration from a fixed random start (Halko, Martinsson and Tropp 2011, "Finding
    structure with randomness", SIAM Review 53: algorithm 4.4), then Rayleigh-Ritz on the small
    subspace: deterministic, and ``O(n D k)`` where a full eigendecomposition of the Gram matrix
    of 2,048 images took half a minute on two shared cores.
    """
    dimension = rows.shape[1]
    if k == 0:
        return torch.empty(0, dimension, dtype=rows.dtype)
    width = min(k + oversampling, dimension)
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(dimension, width, generator=generator, dtype=torch.float64).to(rows.dtype)
    basis, _ = torch.linalg.qr(rows.T @ (rows @ basis))
    for _ in range(iterations - 1):
        basis, _ = torch.linalg.qr(rows.T @ (rows @ basis))
    projected = rows @ basis
    _, vectors = torch.linalg.eigh(projected.T @ projected)
    axes: torch.Tensor = basis @ vectors[:, -k:]
    return axes.T.contiguous()


def fingerprints(
    images: torch.Tensor,
    *,
    band: tuple[float, float] = DEFAULT_BAND,
    components: int = 64,
    images_per_component: int = 10,
) -> Fingerprints:
    """The fingerprint of each image of one study (see the module docstring).

    Args:
        images: ``(N, C, H, W)`` images of the study (every split together: the template and
            the principal axes describe the study, not one split).
        band: the band pass's two Gaussian sigmas, in pixels of the 64 x 64 analysis image.
        components: most principal axes projected out.
        images_per_component: at most one axis per this many images, so a small study does not
            project out its own images' specific detail.

    Returns:
        The :class:`Fingerprints`.
    """
    n = images.shape[0]
    if n == 0:
        return Fingerprints(torch.empty(0, 0), 0, 0)
    # The detail vectors are projected in place, batch by batch: one (N, D) float32 array.
    vectors = torch.empty(n, (ANALYSIS_SIZE - 2 * CANONICAL_MARGIN - 2 * FILTER_MARGIN) ** 2)
    with _one_torch_thread() as threads, _workers(threads) as pool:
        images = _as_analysis(images, pool)
        theta = _poses(images, rounds=2, iterations=5, fine_iterations=4, pool=pool)

        def detail(b: slice) -> None:
            vectors[b] = detail_vectors(_canonical(images[b], theta[b]), band)

        pool.run(detail, pool.parts(n))
        fit = vectors[_sample(n, _FIT_SAMPLE)].double()
        # Weight each fitted image by 1 / (images nearly identical to it, itself included): a
        # group of copies counts as one image and cannot become a principal axis.
        unit = fit - fit.mean(dim=0)
        unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
        weights = 1.0 / (unit @ unit.T > DUPLICATE_COSINE).sum(dim=1).clamp_min(1).double()
        weights = weights / weights.sum()
        enough = fit.shape[0] >= MIN_FIT_IMAGES
        mean = (weights[:, None] * fit).sum(dim=0) if enough else torch.zeros_like(fit[0])
        k = max(0, min(components, fit.shape[0] // images_per_component, fit.shape[1]))
        axes = _principal_axes((fit - mean) * weights.sqrt()[:, None], k)
        for b in _batches(n):
            block = vectors[b].double() - mean
            block = block - (block @ axes.T) @ axes
            block = block - block.mean(dim=1, keepdim=True)
            norms = block.norm(dim=1, keepdim=True)
            vectors[b] = torch.where(norms > 1e-12, block / norms.clamp_min(1e-12), torch.zeros_like(block)).float()
    return Fingerprints(vectors, k, _moved(theta))


def slice_depths(depth: int, slices: int) -> list[int]:
    """Indices of ``min(slices, depth)`` axial slices at the centres of equal slabs of ``depth``.

    Raises:
        ValueError: ``depth`` or ``slices`` below 1.
    """
    if depth < 1 or slices < 1:
        raise ValueError(f"depth and slices must be at least 1, got depth={depth}, slices={slices}")
    k = min(slices, depth)
    return [((2 * s + 1) * depth) // (2 * k) for s in range(k)]


def volume_fingerprints(
    volumes: torch.Tensor,
    *,
    slices: int = 8,
    band: tuple[float, float] = DEFAULT_BAND,
    components: int = 64,
    images_per_component: int = 10,
) -> Fingerprints:
    """The fingerprint of each volume of one study: its axial slices' fingerprints, concatenated.

    The slices are taken at the same depths of every volume (:func:`slice_depths`, on the model's
    input grid, so every volume has the same depth), and the slices at one depth are fingerprinted
    as one 2-D study (:func:`fingerprints`: their own template, pose, mean and principal axes).
    The concatenation is scaled by ``1 / sqrt(k)``, so two volumes' similarity is the mean of
    their ``k`` slice similarities: a copy of a volume matches at every depth, while another
    patient's look-alike matches at some depths by chance and the mean pulls it to the bulk (the
    robust spread of different volumes' similarities shrinks about as ``1 / sqrt(k)``).

    Args:
        volumes: ``(N, C, D, H, W)`` volumes (every split together).
        slices: axial slices per volume (at most ``D``).
        band: as :func:`fingerprints`.
        components: most principal axes projected out at each depth.
        images_per_component: as :func:`fingerprints`.

    Returns:
        :class:`Fingerprints` with ``(N, k * D')`` vectors, each of unit norm unless some of its
        slices are flat; ``components`` is the most used at one depth and ``moved`` counts slices
        registered away from the identity.

    Raises:
        ValueError: ``volumes`` is not 5-D.
    """
    if volumes.ndim != 5:
        raise ValueError(f"volumes must have shape (N, C, D, H, W), got {tuple(volumes.shape)}")
    if volumes.shape[0] == 0:
        return Fingerprints(torch.empty(0, 0), 0, 0)
    depths = slice_depths(volumes.shape[2], slices)
    vectors = torch.empty(0)
    used, moved = 0, 0
    for k, d in enumerate(depths):  # one depth's fingerprints at a time, written into one array
        part = fingerprints(
            volumes[:, :, d], band=band, components=components, images_per_component=images_per_component
        )
        width = part.vectors.shape[1]
        if k == 0:
            vectors = torch.empty(volumes.shape[0], width * len(depths))
        vectors[:, k * width : (k + 1) * width] = part.vectors / math.sqrt(len(depths))
        used, moved = max(used, part.components), moved + part.moved
    return Fingerprints(vectors, used, moved)


# --------------------------------------------------------------------------------------------
# Calibrating and searching


def _excluded(groups: torch.Tensor | None, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor | None:
    if groups is None:
        return None
    a, b = groups[rows], groups[columns]
    return (a == b) & (a >= 0)


def sample_pairs(
    n: int, rng: np.random.Generator, *, exclude: NDArray[np.int64] | None = None, max_pairs: int = 20_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(i, j)`` of ``n`` images, ``i != j``: every pair when there are at most
    ``max_pairs``, else ``max_pairs`` uniform random pairs; pairs inside one exact-duplicate group
    (equal labels >= 0 in ``exclude``) are left out."""
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        i = torch.from_numpy(rng.integers(0, n, size=max_pairs))
        j = torch.from_numpy(rng.integers(0, n - 1, size=max_pairs))
        j = j + (j >= i).long()  # uniform over the other images
    skip = _excluded(torch.from_numpy(exclude) if exclude is not None else None, i, j)
    if skip is not None:
        i, j = i[~skip], j[~skip]
    return i, j


def robust_location(values: NDArray[np.float64]) -> tuple[float, float]:
    """Median and robust standard deviation (interquartile range / 1.349) of ``values``."""
    if values.size < 2:
        return math.nan, math.nan
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return float(median), float(q3 - q1) / 1.349


def calibrate(
    vectors: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    *,
    z: float,
    floor: float,
    z_per_decade: float = 0.0,
    reference_pairs: int = 40_000,
) -> Calibration:
    """The near-duplicate bound from the similarities of the study's own image pairs.

    Pairs of images of a study are almost all different acquisitions, however many copies it
    holds (``c`` copy pairs among ``n (n - 1) / 2``), so the median and the interquartile range of
    their similarities describe how alike two *different* images of this study are. A copy must
    lie ``z`` robust standard deviations above that median, and reach ``floor`` whatever the
    study. A study with fewer than :data:`MIN_CALIBRATION_PAIRS` pairs cannot be calibrated; its
    bound is :data:`UNCALIBRATED_BOUND` (only near-identical images are near duplicates there).

    The more pairs a search compares, the further the most alike look-alike pair lies in the tail
    (the tail of look-alike similarities is about exponential: ~1.75 robust standard deviations
    per tenfold fewer pairs, measured on look-alike studies of up to 2,080 images), so beyond
    ``reference_pairs`` the bound rises by ``z_per_decade`` per tenfold more pairs: the expected
    number of look-alike pairs above it stays about the same whatever the study's size.

    Args:
        vectors: ``(N, D)`` fingerprints.
        pairs: the pairs measured (:func:`sample_pairs`).
        z: robust standard deviations above the median, up to ``reference_pairs`` pairs.
        floor: smallest bound.
        z_per_decade: added to ``z`` per tenfold more pairs than ``reference_pairs``.
        reference_pairs: pairs compared up to which ``z`` applies as it is.
    """
    n = vectors.shape[0]
    compared = n * (n - 1) // 2
    z_used = z + z_per_decade * max(0.0, math.log10(max(compared, 1) / reference_pairs))
    i, j = pairs
    values = _dot_rows(vectors, i, j).double().numpy()
    median, scale = robust_location(values)
    if values.size < MIN_CALIBRATION_PAIRS or not math.isfinite(median):
        return Calibration(median, scale, z_used, max(floor, UNCALIBRATED_BOUND), int(values.size))
    return Calibration(median, scale, z_used, max(median + z_used * scale, floor), int(values.size))


def _blocked_pairs(
    vectors: torch.Tensor, threshold: float, groups: torch.Tensor | None, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair ``i < j`` with ``vectors[i] . vectors[j] >= threshold``, block by block."""
    n = vectors.shape[0]
    above_diagonal = torch.ones(block, block, dtype=torch.bool, device=vectors.device).triu(diagonal=1)
    found_i: list[torch.Tensor] = []
    found_j: list[torch.Tensor] = []
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        hit = (vectors[r0:r1] @ vectors[r0:].T) >= threshold  # columns from r0 on: upper triangle
        hit[:, : r1 - r0] &= above_diagonal[: r1 - r0, : r1 - r0]
        i, j = torch.nonzero(hit, as_tuple=True)
        found_i.append(i + r0)
        found_j.append(j + r0)
    if not found_i:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    i, j = torch.cat(found_i), torch.cat(found_j)
    if groups is not None:
        keep = ~((groups[i] == groups[j]) & (groups[i] >= 0))
        i, j = i[keep], j[keep]
    return i, j


def similar_pairs(
    vectors: torch.Tensor,
    threshold: float,
    *,
    exclude: NDArray[np.int64] | None = None,
    block: int = 1024,
    exact_limit: int = EXACT_LIMIT,
    device: torch.device | str | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Every pair ``i < j`` of one set with ``vectors[i] . vectors[j] >= threshold``.

    Exhaustive, by blocked matrix products over the upper triangle (``block`` rows at a time, so
    memory is ``block x N`` floats). Up to ``exact_limit`` images on the fingerprints themselves
    (``N^2 D / 2`` multiply-adds); beyond, on a random sketch of :data:`SKETCH_DIMENSION`
    Gaussian projections (Johnson-Lindenstrauss; six times fewer operations), with the bound
    lowered by four standard deviations of the sketch's error (``(1 - t^2) / sqrt(k)`` for a
    correlation ``t`` from ``k`` projections), and every candidate then measured exactly: the
    answer is the exact one unless a pair's sketch errs by more than four standard deviations
    (a chance of 3 in 100,000).

    With a ``device``, the products run there (a GPU: the search is quadratic, and a GPU's
    matrix products are two orders of magnitude faster than two CPU cores'), on a bound lowered
    by :data:`DEVICE_MARGIN` for the device's rounding (reduced precision included), and every
    candidate is measured again on the CPU, as without one: the pairs are the same.

    Args:
        vectors: ``(N, D)`` float32 unit vectors (on the CPU).
        threshold: smallest similarity reported.
        exclude: optional ``(N,)`` group labels; pairs with equal labels >= 0 are skipped
            (exact duplicates, counted apart).
        block: rows per matrix product.
        exact_limit: most images searched without the sketch.
        device: where the products run; ``None``: on the CPU, measured as they are found.

    Returns:
        ``(i, j, similarity)`` sorted by ``i`` then ``j``.
    """
    n = vectors.shape[0]
    on = torch.device("cpu") if device is None else torch.device(device)
    labels = None if exclude is None else torch.from_numpy(exclude).to(on)
    slack = 0.0 if device is None else DEVICE_MARGIN
    sketched = n > exact_limit and vectors.shape[1] > SKETCH_DIMENSION
    if not sketched:
        i, j = _blocked_pairs(vectors.to(on), threshold - slack, labels, block)
    else:
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(vectors.shape[1], SKETCH_DIMENSION, generator=generator).to(on)
        # Projected a block at a time: only the sketch lives on the device, not the fingerprints
        # (9 GB for a million 224 x 224 images; the sketch is a sixth of that).
        sketch = torch.cat([vectors[r : r + block].to(on) @ projection for r in range(0, n, block)])
        sketch = torch.nn.functional.normalize(sketch, dim=1)
        bounded = min(max(threshold, 0.0), 1.0)
        margin = 4.0 * (1.0 - bounded**2) / math.sqrt(SKETCH_DIMENSION)
        i, j = _blocked_pairs(sketch, threshold - margin - slack, labels, block)
    order = torch.from_numpy(np.lexsort((j.cpu().numpy(), i.cpu().numpy())))
    i, j = i.cpu()[order], j.cpu()[order]
    similarity = _dot_rows(vectors, i, j)  # each pair's sum whatever the chunk: the same as measured
    if sketched or device is not None:  # candidates below the bound: measured on the CPU, kept above it
        keep = similarity >= threshold
        i, j, similarity = i[keep], j[keep], similarity[keep]
    return i.numpy().astype(np.int64), j.numpy().astype(np.int64), similarity.double().numpy()


def _dot_rows(vectors: torch.Tensor, i: torch.Tensor, j: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``vectors[i] . vectors[j]`` per pair, ``chunk`` pairs at a time, on one thread.

    Small chunks keep the gathered rows in the cache (256 pairs of 2,304-float fingerprints are
    2.4 MB an operand): 16,384 at a time (150 MB an operand) made the 20,000 calibration pairs of
    a 370-image study take 0.8 s instead of 0.15 s. Each pair's sum is the same whatever the
    chunk and the threads.
    """
    out = torch.empty(i.numel())
    with _one_torch_thread():
        for start in range(0, i.numel(), chunk):
            a, b = i[start : start + chunk], j[start : start + chunk]
            out[start : start + chunk] = (vectors[a] * vectors[b]).sum(dim=1)
    return out
