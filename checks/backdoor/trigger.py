"""Model-level backdoor test: Neural Cleanse trigger reverse-engineering and its judgement.

Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019) asks, for each candidate target class ``t``: what is the
smallest mask ``m`` (values in [0, 1], shared by the channels) and pattern ``p`` such that
``x' = (1 - m) * x + m * p`` is classified as ``t`` for (almost) every clean input ``x`` of the
other classes? A backdoored model has a shortcut to its target class, so that class's mask is
anomalously small; the paper judges the L1 norms of the masks with the median-absolute-deviation
anomaly index (> 2 is an outlier).

Two traps make the norms alone unreliable in medical imaging, and this module avoids both:

1. With two classes the anomaly index is degenerate: for any two norms the median is their mean
   and both deviations are equal, so the indices are always ``+-0.6745``. It is reported as
   undefined for binary models.
2. In lesion detection the positive class's natural evidence is small and local: a clean nodule
   detector is flipped to "nodule" by a bright blob of one or two pixels (measured on the
   packaged clean twin: a mask of ~2 pixels), far smaller than any planted patch. Small masks
   therefore also occur in clean models, for every lesion class.

What separates a planted trigger from natural evidence is *how* the model gets to the target
class. A backdoor is a shortcut the clean data never exercise: the trigger drives some embedding
channels far beyond the range they take on clean images (the "elevation" of compromised neurons
in ABS, Liu et al., CCS 2019; the dormant neurons of Fine-Pruning, Liu et al., RAID 2018). A
painted lesion reaches the class through the channels genuine images use, within their natural
range. :func:`feature_excursion` measures this for the images carrying the reverse-engineered
trigger. Measured on the packaged fixtures (eval-range excursion): the binary backdoor 10.1,
every lesion-class trigger of all four models 0.87-1.19.

One more case shows up in practice: adversarial patches. To flip lesion images to "normal" (or
one lesion class to another) a clean model can be pushed beyond its clean range too (excursion
4.3 and 4.8 on the clean multi-class twin). A planted trigger differs in that the poisoned
training images taught it, so it stays within the range of the *training* images; the patch
exceeds both. The check therefore judges the excursion against the eval split's range and,
when there is a train split, requires it to stay within the train split's (below the threshold,
and at most 1/1.75 of the eval excursion: on a clean held-out shapes CNN a natural trigger
reached 2.09 against the eval range and 1.39 against the training range, planted ones 2.0-5.9
times less against the training range).

The MAD anomaly index (on log norms, see :func:`anomaly_indices`) is reported but, measured on
a population of clean models (``docs/backdoor.md``), it is no evidence by itself: with three to
five classes the MAD of the log norms is that of two or three numbers, and a class that is
naturally easy to paint - a cross among round shapes - has a mask ten to twenty times smaller
than the median (indices 4-6 on clean models, 44 in the report of issue 16). With a train split
the check suspects a class whose trigger is not a shortcut only when the training data confirm
it (a population of the label that the clean eval images avoid, see :mod:`.signatures`) and its
mask is among the smaller half; the index alone judges only without a train split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from torch import nn

__all__ = [
    "MAD_CONSISTENCY",
    "TriggerResult",
    "anomaly_indices",
    "apply_trigger",
    "feature_excursion",
    "reverse_engineer_trigger",
]

MAD_CONSISTENCY = 1.4826
"""Scale that makes the median absolute deviation estimate a normal standard deviation."""


@dataclass
class TriggerResult:
    """The smallest trigger found for one target class.

    Attributes:
        target: Class index.
        mask: ``(H, W)`` (a volume's ``(D, H, W)``) float32 in [0, 1].
        pattern: ``(C, H, W)`` (``(C, D, H, W)``) float32 in [0, 1].
        norm: L1 norm of the mask (pixels or voxels at the model's input resolution).
        success_rate: Fraction of the sample classified as ``target`` with the trigger.
        reached: Whether the trigger reached the success threshold at some step.
        steps: Optimisation steps run (fewer than asked when the search stopped early).
        seconds: Wall time of the search.
    """

    target: int
    mask: NDArray[np.float32]
    pattern: NDArray[np.float32]
    norm: float
    success_rate: float
    reached: bool
    steps: int
    seconds: float


def apply_trigger(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * images + mask * pattern`` for ``(N, C, H, W)`` images (or ``(N, C, D, H, W)``
    volumes) in [0, 1]."""
    return (1.0 - mask) * images + mask * pattern


def reverse_engineer_trigger(
    model: nn.Module,
    images: torch.Tensor,
    target: int,
    *,
    steps: int = 300,
    learning_rate: float = 0.1,
    initial_cost: float = 1e-3,
    success_threshold: float = 0.99,
    patience: int = 5,
    early_stop: int = 40,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> TriggerResult:
    """Neural Cleanse's optimisation of a mask and pattern flipping ``images`` to ``target``.

    The mask and pattern are sigmoids of free parameters (the paper uses ``tanh / 2 + 0.5``, the
    same map up to scaling), optimised with Adam on ``cross_entropy(model(x'), target) + cost *
    |mask|_1``. The cost starts at ``initial_cost`` and adapts as in the paper: multiplied by 1.5
    after ``patience`` consecutive steps at or above the success threshold, divided by 1.5**1.5
    after ``patience`` steps below it. The smallest mask that reached the threshold is kept (or
    the last one, with ``reached=False``). Like the paper's implementation, the search stops early
    once the threshold has been reached and the smallest norm has not shrunk by 1% for
    ``early_stop`` steps.

    Args:
        model: Takes ``(N, C, H, W)`` images (or ``(N, C, D, H, W)`` volumes) in [0, 1] and
            returns logits; its parameters are not changed (gradients flow to the trigger only).
        images: Clean images of the other classes, ``(N, C, H, W)`` (volumes ``(N, C, D, H,
            W)``: the mask covers voxels, one per voxel shared by the channels) in [0, 1], on the
            model's device.
        target: Class index to flip to.
        steps: Optimisation steps (each a pass over ``images`` in batches).
        learning_rate: Adam step size on the free parameters.
        initial_cost: Starting weight of the mask's L1 norm.
        success_threshold: Fraction of ``images`` that must be flipped.
        patience: Steps before the cost is raised or lowered.
        early_stop: Steps without a 1% smaller successful mask before the search stops.
        batch_size: Images per forward call.
        generator: Seeds the pattern's initialisation (CPU generator).

    Returns:
        The best :class:`TriggerResult`.

    Raises:
        ValueError: ``images`` is empty or neither 4-D nor 5-D.
    """
    if images.ndim not in (4, 5) or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty (N, C, H, W) or (N, C, D, H, W) batch, got shape {tuple(images.shape)}"
        )
    started = time.perf_counter()
    device = images.device
    channels, spatial = int(images.shape[1]), tuple(int(v) for v in images.shape[2:])
    mask_param = torch.full((1, 1, *spatial), -3.0, device=device, requires_grad=True)
    init = torch.rand((1, channels, *spatial), generator=generator) * 2.0 - 1.0
    pattern_param = init.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_param, pattern_param], lr=learning_rate, betas=(0.5, 0.9))
    targets = torch.full((images.shape[0],), target, dtype=torch.long, device=device)
    cost = initial_cost
    above = below = 0
    best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    last_rate = 0.0
    steps_run = 0
    stale = 0
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        for _ in range(steps):
            steps_run += 1
            flipped = 0
            optimizer.zero_grad(set_to_none=True)
            for start in range(0, images.shape[0], batch_size):
                mask = torch.sigmoid(mask_param)
                pattern = torch.sigmoid(pattern_param)
                batch = images[start : start + batch_size]
                logits = model(apply_trigger(batch, mask, pattern))
                share = batch.shape[0] / images.shape[0]
                loss = F.cross_entropy(logits, targets[: batch.shape[0]]) * share + cost * mask.sum() * share
                loss.backward()  # type: ignore[no-untyped-call]
                flipped += int((logits.detach().argmax(dim=1) == target).sum())
            # The rate and norm belong to the trigger *before* this step's update.
            last_rate = flipped / images.shape[0]
            with torch.no_grad():
                norm = float(torch.sigmoid(mask_param).sum())
                if last_rate >= success_threshold and (best is None or norm < best[0]):
                    stale = 0 if best is None or norm < 0.99 * best[0] else stale + 1
                    best = (norm, torch.sigmoid(mask_param).clone(), torch.sigmoid(pattern_param).clone(), last_rate)
                elif best is not None:
                    stale += 1
            if best is not None and stale >= early_stop:
                break
            optimizer.step()
            if last_rate >= success_threshold:
                above, below = above + 1, 0
                if above >= patience:
                    cost, above = cost * 1.5, 0
            else:
                above, below = 0, below + 1
                if below >= patience:
                    cost, below = cost / 1.5**1.5, 0
    finally:
        for parameter, flag in zip(model.parameters(), requires, strict=True):
            parameter.requires_grad_(flag)
        model.train(was_training)
    if best is None:
        with torch.no_grad():
            best = (
                float(torch.sigmoid(mask_param).sum()),
                torch.sigmoid(mask_param),
                torch.sigmoid(pattern_param),
                last_rate,
            )
        reached = False
    else:
        reached = True
    norm, mask, pattern, rate = best
    return TriggerResult(
        target=target,
        mask=mask[0, 0].detach().float().cpu().numpy(),
        pattern=pattern[0].detach().float().cpu().numpy(),
        norm=norm,
        success_rate=rate,
        reached=reached,
        steps=steps_run,
        seconds=time.perf_counter() - started,
    )


def anomaly_indices(norms: ArrayLike) -> NDArray[np.float64]:
    """Neural Cleanse's anomaly index per class, on log norms: ``(median - v) / (1.4826 MAD)``.

    ``v`` is the log of a class's mask norm. The paper uses the norms themselves; masks differ by
    factors (a lesion class's natural trigger is a few pixels, the "normal" class's one tens), so
    on the raw scale the one large norm inflates the MAD and hides a planted outlier among the
    small ones. Positive for norms below the median (a candidate target), negative above. NaN
    where it is not defined: fewer than three classes (degenerate: ``+-0.6745`` for any two
    norms), a norm that is not positive, or a MAD of zero.

    Example:
        >>> anomaly_indices([8.0, 8.0, 16.0, 1.0]).round(3).tolist()
        [0.0, 0.0, -1.349, 4.047]
    """
    values = np.asarray(norms, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"norms must be 1-D, got shape {values.shape}")
    if values.shape[0] < 3 or not bool((values > 0).all()):
        return np.full(values.shape, np.nan)
    logs = np.log(values)
    median = float(np.median(logs))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(logs - median)))
    if mad <= 0.0:
        return np.full(values.shape, np.nan)
    return (median - logs) / mad


def feature_excursion(
    embed: Callable[[torch.Tensor], torch.Tensor],
    triggered: torch.Tensor,
    clean_features: ArrayLike,
    *,
    quantile: float = 0.99,
    batch_size: int = 128,
) -> float:
    """How far a trigger drives the embedding beyond the range of clean images.

    Every channel is measured in units of its clean spread, ``(a - median) / (q - median)`` with
    the median and the ``quantile`` over the clean images, so 1 is the top of the clean range.
    For every triggered image the largest such value over channels; the median of that over the
    images. At most about 1 for evidence the clean data also carry, well above 1 for a shortcut
    they never exercise.

    Args:
        embed: Maps ``(N, C, H, W)`` images in [0, 1] to ``(N, D)`` embeddings.
        triggered: Images carrying the trigger.
        clean_features: ``(M, D)`` embeddings of clean images (the eval split).
        quantile: The channel range's upper quantile.
        batch_size: Images per forward call.

    Returns:
        The median maximal ratio (``nan`` if ``triggered`` is empty).

    Raises:
        ValueError: Embedding widths differ.
    """
    clean = np.asarray(clean_features, dtype=np.float64)
    if triggered.shape[0] == 0:
        return float("nan")
    # Each channel in units of its clean spread above the median: (a - median) / (q - median),
    # so 1 is the top of the clean range whatever the activation's sign or offset. The spread is
    # floored at a tenth of the typical channel's, so a near-constant channel cannot turn
    # rounding noise into a huge ratio.
    median = np.median(clean, axis=0)
    spread = np.quantile(clean, quantile, axis=0) - median
    floor = 0.1 * float(np.median(spread)) + 1e-12
    spread = np.maximum(spread, floor)
    with torch.no_grad():
        parts = [embed(triggered[i : i + batch_size]).float().cpu() for i in range(0, triggered.shape[0], batch_size)]
    features = torch.cat(parts).numpy().astype(np.float64)
    if features.shape[1] != clean.shape[1]:
        raise ValueError(f"embedding widths differ: triggered {features.shape[1]}, clean {clean.shape[1]}")
    return float(np.median(np.max((features - median) / spread, axis=1)))
