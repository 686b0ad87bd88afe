"""FGSM and PGD on a task's loss, for models that are not single-label classifiers (plain functions).

torchattacks' attacks hard-code ``nn.CrossEntropyLoss`` against class indices, which a multi-label
model (independent sigmoid outputs, unknown entries) or a regressor does not have, and which a
segmentation model has per pixel (``(N, K, *spatial)`` logits; torchattacks' loss would accept them,
but its PGD-L2 and its random starts assume the rest of its pipeline, so one loop serves every task). These loops are
torchattacks' FGSM, PGD (L-infinity) and PGDL2 line by line (same random start, step, projection
and clamping to ``[0, 1]``; Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR; Goodfellow et al. 2015, ICLR) with the loss passed in:

* multilabel (:func:`multilabel_loss`): the summed binary cross-entropy with logits over the known
  label entries of each image (unknown entries, label -1, are masked). Maximising it pushes every
  label away from its truth: a present finding toward absent, an absent one toward present.
* regression (:func:`squared_error_loss`): the squared error against the target, summed over the
  outputs, each output's error divided by its target standard deviation in the attacked sample
  when there are several (so outputs in different units weigh alike; with one output the scale
  changes neither the sign of the gradient nor its direction, so it is the plain squared error).
* segmentation (:func:`segmentation_loss`): the mean over the pixels (voxels) of each image of the
  cross-entropy of the per-pixel logits ``(N, K, *spatial)`` against the reference label map
  ``(N, *spatial)``. Maximising it pushes every pixel away from its reference class.

The objective of a batch is the sum of the per-image losses, so an image's gradient does not
depend on the other images of its batch. With ``nn.CrossEntropyLoss``'s mean as the loss these
loops reproduce torchattacks' attacks (the tests hold them to it).

Every function takes the model that maps images in ``[0, 1]`` to outputs ``(N, K)`` or, for a
segmentation model, ``(N, K, *spatial)`` (the audit's model with its normalisation inside, in eval
mode), float ``(N, C, H, W)`` images in ``[0, 1]`` (a volume's depth folded into the channels,
:func:`~.attacks.as_images`) and targets ``(N, K)`` or label maps ``(N, *spatial)``. Seeding and
memory layout follow :mod:`.attacks`: each batch runs under ``torch.random.fork_rng`` after
``torch.manual_seed(seed + batch_index)``, on contiguous fp32 copies of the images, through
:class:`~.attacks.ContiguousGradients`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from auditkit.checks.adversarial.attacks import (
    AttackConfig,
    ContiguousGradients,
    _attack_inputs,
    _batches,
    _device_of,
    seeded,
)

__all__ = [
    "LOSS_ATTACKS",
    "AttackedOutputs",
    "TaskLoss",
    "attack_with_loss",
    "attacked_outputs",
    "model_outputs",
    "multilabel_loss",
    "segmentation_loss",
    "squared_error_loss",
]

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(outputs (N, K) or (N, K, *spatial), targets (N, K) or (N, *spatial)) -> per-image loss (N,)``
to maximise."""

LOSS_ATTACKS: tuple[str, ...] = ("fgsm", "pgd_linf", "pgd_l2")
"""The attacks run on a task loss; the others (Carlini-Wagner, Square, AutoAttack) are built on
class margins and run for classification only."""

_EPS_FOR_DIVISION = 1e-10
"""torchattacks' PGDL2 guard against a zero gradient norm."""


def multilabel_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed binary cross-entropy with logits over the known entries of each image.

    Args:
        outputs: logits ``(N, K)``.
        targets: ``(N, K)`` of 1, 0 and -1 (unknown: masked).

    Returns:
        ``(N,)``: ``sum_k [y_k = known] * BCE(z_k, y_k)``.
    """
    known = targets >= 0
    bce = F.binary_cross_entropy_with_logits(outputs, targets.clamp(min=0).to(outputs.dtype), reduction="none")
    return torch.where(known, bce, torch.zeros_like(bce)).sum(dim=1)


def squared_error_loss(scale: torch.Tensor | None = None) -> TaskLoss:
    """The summed squared error ``sum_k ((f_k - y_k) / scale_k)^2`` over known targets (NaN masked).

    Args:
        scale: per-output divisor ``(K,)`` (``None``: 1).
    """

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = torch.isfinite(targets)
        error = outputs - torch.where(known, targets, torch.zeros_like(targets)).to(outputs.dtype)
        if scale is not None:
            error = error / scale.to(error.device, error.dtype)
        return torch.where(known, error * error, torch.zeros_like(error)).sum(dim=1)

    return loss


def segmentation_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean pixel-wise cross-entropy of each image against its reference label map.

    Args:
        outputs: logits ``(N, K, *spatial)``.
        targets: reference label maps ``(N, *spatial)`` of class indices ``0 .. K - 1``.

    Returns:
        ``(N,)``: ``mean_pixels -log softmax(z)_{y}``.
    """
    return F.cross_entropy(outputs, targets.long(), reduction="none").flatten(1).mean(dim=1)


def _gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss: TaskLoss) -> torch.Tensor:
    images.requires_grad = True
    cost = loss(model(images), targets).sum()
    return torch.autograd.grad(cost, images, retain_graph=False, create_graph=False)[0]


def attack_with_loss(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss: TaskLoss,
    name: str,
    eps: float,
    config: AttackConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch attacked within budget ``eps``: FGSM, PGD-Linf or PGD-L2 maximising ``loss``.

    Draws its random start from torch's global generator (the caller seeds it).

    Args:
        model: images in ``[0, 1]`` -> outputs ``(N, K)`` or ``(N, K, *spatial)``; its parameters frozen.
        images: contiguous float ``(N, C, H, W)`` in ``[0, 1]``.
        targets: ``(N, K)`` or label maps ``(N, *spatial)`` on the images' device.
        loss: per-image loss to maximise.
        name: ``fgsm``, ``pgd_linf`` or ``pgd_l2``.
        eps: the budget in the attack's norm.
        config: PGD steps, step size (``alpha = pgd_step_size * eps / steps``) and random start.

    Returns:
        ``(adversarial, start)``: the attacked images and the point the attack started from (the
        images themselves without a random start), both in ``[0, 1]``.
    """
    if name not in LOSS_ATTACKS:
        raise ValueError(f"attack {name!r} does not run on a task loss; expected one of {list(LOSS_ATTACKS)}")
    images = images.clone().detach()
    targets = targets.clone().detach()
    if eps == 0:
        # The zero budget holds only the image (PGDL2's projection would divide 0 by 0).
        return images, images
    if name == "fgsm":
        grad = _gradient(model, images.clone(), targets, loss)
        return torch.clamp(images + eps * grad.sign(), min=0, max=1).detach(), images
    alpha = config.pgd_alpha(eps)
    adversarial = images.clone().detach()
    batch = len(images)
    if config.random_start and name == "pgd_linf":
        adversarial = adversarial + torch.empty_like(adversarial).uniform_(-eps, eps)
        adversarial = torch.clamp(adversarial, min=0, max=1).detach()
    elif config.random_start:
        delta = torch.empty_like(adversarial).normal_()
        norm = delta.view(batch, -1).norm(p=2, dim=1).view(batch, 1, 1, 1)
        radius = torch.zeros_like(norm).uniform_(0, 1)
        delta *= radius / norm * eps
        adversarial = torch.clamp(adversarial + delta, min=0, max=1).detach()
    start = adversarial.clone()
    for _ in range(config.pgd_steps):
        grad = _gradient(model, adversarial, targets, loss)
        if name == "pgd_linf":
            adversarial = adversarial.detach() + alpha * grad.sign()
            delta = torch.clamp(adversarial - images, min=-eps, max=eps)
        else:
            grad_norms = torch.norm(grad.view(batch, -1), p=2, dim=1) + _EPS_FOR_DIVISION
            adversarial = adversarial.detach() + alpha * (grad / grad_norms.view(batch, 1, 1, 1))
            delta = adversarial - images
            delta_norms = torch.norm(delta.view(batch, -1), p=2, dim=1)
            factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
            delta = delta * factor.view(-1, 1, 1, 1)
        adversarial = torch.clamp(images + delta, min=0, max=1).detach()
    return adversarial, start


@dataclass(frozen=True)
class AttackedOutputs:
    """What an attack did to a sample, on the CPU.

    Attributes:
        outputs: float32 ``(N, K)`` (segmentation ``(N, K, *spatial)``) model outputs on the attacked
            images.
        losses: float64 ``(N,)`` the loss on the attacked images.
        start_losses: float64 ``(N,)`` the loss at the attack's starting point.
        norms: float64 ``(N,)`` the perturbation's norm in the attack's norm (L-infinity or L2).
    """

    outputs: torch.Tensor
    losses: torch.Tensor
    start_losses: torch.Tensor
    norms: torch.Tensor


def model_outputs(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """The model's outputs ``(N, K)`` or ``(N, K, *spatial)`` (float32, CPU) in fp32 without gradients.

    With no image the result is an empty ``(0, 0)`` tensor: the model is not run, so the output's
    shape is unknown (the check stops before reading outputs of an empty sample).
    """
    device = _device_of(model)
    parts = []
    with torch.no_grad():
        for _, rows in _batches(images.shape[0], batch_size):
            parts.append(model(images[rows].to(device, dtype=torch.float32)).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def attacked_outputs(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss: TaskLoss,
    name: str,
    eps: float,
    config: AttackConfig,
    *,
    seed: int,
    batch_size: int,
    judge: nn.Module | None = None,
) -> AttackedOutputs:
    """Attack every image within budget ``eps`` and return the outputs on the attacked images
    (``judge``'s outputs when given: an exported artefact judging images crafted on its reference).

    Args:
        model: images in ``[0, 1]`` -> outputs ``(N, K)`` or ``(N, K, *spatial)``.
        images: float ``(N, C, H, W)`` in ``[0, 1]``.
        targets: ``(N, K)``: multilabel 1/0/-1, regression float targets; segmentation label maps
            ``(N, *spatial)``.
        loss: per-image loss to maximise (:func:`multilabel_loss`, :func:`squared_error_loss`,
            :func:`segmentation_loss`).
        name: one of :data:`LOSS_ATTACKS`.
        eps: the budget in the attack's norm.
        config: shared hyper-parameters.
        seed: batch ``b`` is attacked after ``torch.manual_seed(seed + b)``.
        batch_size: images per attack call.
    """
    device = _device_of(model)
    wrapped = model if isinstance(model, ContiguousGradients) else ContiguousGradients(model)
    outputs, losses, starts, norms = [], [], [], []
    for index, rows in _batches(images.shape[0], batch_size):
        x, y = _attack_inputs(images[rows], targets[rows], device)
        with seeded(seed + index, device):
            adversarial, start = attack_with_loss(wrapped, x, y, loss, name, eps, config)
        with torch.no_grad():
            out = (judge or model)(adversarial)
            outputs.append(out.float().cpu())
            losses.append(loss(out, y).double().cpu())
            starts.append(loss((judge or model)(start), y).double().cpu())
            delta = (adversarial - x).flatten(1).double()
            norms.append((delta.abs().amax(dim=1) if name != "pgd_l2" else delta.norm(dim=1)).cpu())
    if not outputs:
        empty = torch.zeros(0, dtype=torch.float64)
        return AttackedOutputs(torch.zeros(0, 0), empty, empty, empty)
    return AttackedOutputs(torch.cat(outputs), torch.cat(losses), torch.cat(starts), torch.cat(norms))
