"""The attacks of the adversarial check, on torchattacks (plain functions, no engine).

Every function takes the model that maps images in ``[0, 1]`` to logits (the audit's model with
its normalisation inside), float ``(N, C, H, W)`` images in ``[0, 1]`` of any size and channel
count, and int64 labels ``(N,)``. Attacks run in fp32 on the model's device, in batches.

Seeding: each batch of each attack at each epsilon is attacked under
``torch.random.fork_rng`` after ``torch.manual_seed(seed + batch_index)``, so random starts are
reproducible and the caller's random state is left untouched. For one batch this is exactly
``torch.manual_seed(seed); attack(images, labels)``, the direct torchattacks call.

Memory layout: torchattacks flattens images, perturbations and input gradients with
``Tensor.view``, which needs the contiguous (NCHW) layout. The engine runs convolutional models
``channels_last`` (NHWC), and autograd then returns the input gradient in that layout; for one
channel the two layouts coincide, for RGB they do not. Every attack therefore gets contiguous
images and the model wrapped by :class:`ContiguousGradients`, which hands back contiguous input
gradients; the model itself keeps its layout (and its speed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "ATTACKS",
    "L2_EPS",
    "LINF_EPS",
    "AttackConfig",
    "AttackInfo",
    "ContiguousGradients",
    "build_attack",
    "eps_label",
    "minimum_norm_perturbations",
    "predict",
    "seeded",
    "still_correct",
]

LINF_EPS: tuple[float, ...] = (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
"""Default L-infinity budgets in [0, 1] intensity units: half to 8 grey levels of an 8-bit
display (1/255 is 16 raw levels of a 12-bit detector, 257 of a 16-bit one)."""

L2_EPS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
"""Default L2 budgets in [0, 1] intensity units over the whole image (for a 64x64 image, 1.0 is
an RMS change of 4 grey levels of 8 bits; the same budget is spread thinner on larger images)."""

AttackName = Literal["fgsm", "pgd_linf", "pgd_l2", "cw_l2", "square", "autoattack"]


@dataclass(frozen=True)
class AttackInfo:
    """What the check needs to know about an attack.

    Attributes:
        name: the ``attack`` label of the metrics.
        norm: the threshold norm, which picks the epsilon grid (``Linf`` or ``L2``).
        access: ``white`` (gradients), ``black`` (queries only) or ``ensemble``.
        iterative: several steps (robust accuracy should not rise with epsilon).
        minimum_norm: one run finds the smallest perturbation; robust accuracy at an epsilon
            counts the images whose smallest perturbation is larger.
        reference: the paper.
    """

    name: str
    norm: Literal["Linf", "L2"]
    access: Literal["white", "black", "ensemble"]
    iterative: bool
    minimum_norm: bool
    reference: str


ATTACKS: dict[str, AttackInfo] = {
    info.name: info
    for info in (
        AttackInfo(
            "fgsm",
            "Linf",
            "white",
            False,
            False,
            "Goodfellow et al. 2015, 'Explaining and Harnessing Adversarial Examples', ICLR",
        ),
        AttackInfo(
            "pgd_linf",
            "Linf",
            "white",
            True,
            False,
            "Madry et al. 2018, 'Towards Deep Learning Models Resistant to Adversarial Attacks', ICLR",
        ),
        AttackInfo("pgd_l2", "L2", "white", True, False, "Madry et al. 2018 (L2 projection)"),
        AttackInfo(
            "cw_l2",
            "L2",
            "white",
            True,
            True,
            "Carlini & Wagner 2017, 'Towards Evaluating the Robustness of Neural Networks', IEEE S&P",
        ),
        AttackInfo(
            "square",
            "Linf",
            "black",
            True,
            False,
            "Andriushchenko et al. 2020, 'Square Attack: a query-efficient black-box adversarial"
            " attack via random search', ECCV",
        ),
        AttackInfo(
            "autoattack",
            "Linf",
            "ensemble",
            True,
            False,
            "Croce & Hein 2020, 'Reliable evaluation of adversarial robustness with an ensemble of"
            " diverse parameter-free attacks', ICML",
        ),
    )
}
"""Every supported attack by name."""


@dataclass(frozen=True)
class AttackConfig:
    """Hyper-parameters shared by the attacks (the check's ``Params`` fill them in).

    Attributes:
        pgd_steps: PGD iterations.
        pgd_step_size: PGD step as a multiple of ``eps / pgd_steps`` (2.5 as in Madry et al.,
            so the iterate can cross the whole ball and come back).
        random_start: PGD starts from a uniform random point of the ball.
        cw_c: weight of the classification term of Carlini-Wagner.
        cw_kappa: confidence margin of Carlini-Wagner.
        cw_steps: Adam steps of Carlini-Wagner.
        cw_lr: Adam learning rate of Carlini-Wagner.
        square_queries: model queries per image of the Square attack.
        n_classes: the model's number of classes (AutoAttack's targeted attacks need it).
    """

    pgd_steps: int = 20
    pgd_step_size: float = 2.5
    random_start: bool = True
    cw_c: float = 1.0
    cw_kappa: float = 0.0
    cw_steps: int = 100
    cw_lr: float = 0.01
    square_queries: int = 1000
    n_classes: int = 2

    def pgd_alpha(self, eps: float) -> float:
        """The PGD step size for budget ``eps``."""
        return self.pgd_step_size * eps / self.pgd_steps


class _ContiguousGradient(torch.autograd.Function):
    """Identity forward; the backward pass returns the incoming gradient in contiguous layout."""

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor) -> torch.Tensor:
        return images.view_as(images)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class ContiguousGradients(nn.Module):
    """``model`` with input gradients in the contiguous layout, whatever layout it runs in.

    A ``channels_last`` model returns ``channels_last`` input gradients for a 3-channel input,
    and ``grad.view(batch, -1)`` in torchattacks' PGD-L2 (and other attacks) then fails with
    "view size is not compatible with input tensor's size and stride". The forward pass is
    unchanged (same module, parameters, mode and device), so the logits are identical.

    Args:
        model: images in ``[0, 1]`` -> logits.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # A new module starts in training mode; torchattacks restores the mode it finds on the
        # module it is given, so the wrapper must carry the model's (else the audited model is left
        # in training mode after an attack: batch-norm statistics, dropout).
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's logits; gradients flowing back to ``images`` are made contiguous."""
        logits: torch.Tensor = self.model(_ContiguousGradient.apply(images))
        return logits


class DepthAsChannels(nn.Module):
    """A 3-D model seen by the attacks as a 2-D one: ``(N, C * D, H, W)`` in, the same logits out.

    torchattacks' attacks (and the loss attacks' steps) are written for ``(N, C, H, W)`` images
    (``view(-1, 1, 1, 1)`` and kin). Folding a volume's depth into its channels and unfolding it
    before the model is a reshape, so every voxel is one input element as before: the L-inf and
    L2 norms, the budgets, the gradients and so every attack step are exactly those on the
    volume. (Square's squares are then in-plane windows repeated over the slices, each slice
    with its own values.)

    Args:
        model: volumes ``(N, C, D, H, W)`` in ``[0, 1]`` -> logits.
        channels: ``C``.
        depth: ``D``.
    """

    def __init__(self, model: nn.Module, channels: int, depth: int) -> None:
        super().__init__()
        self.model = model
        self.channels = channels
        self.depth = depth
        self.train(model.training)  # the model's mode, as ContiguousGradients carries it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        logits: torch.Tensor = self.model(images.reshape(n, self.channels, self.depth, height, width))
        return logits


def as_images(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """``(model, images)`` for the attacks: a volume batch ``(N, C, D, H, W)`` folded to
    ``(N, C * D, H, W)`` behind :class:`DepthAsChannels`; 2-D images as they are."""
    if images.ndim != 5:
        return model, images
    n, channels, depth, height, width = images.shape
    return DepthAsChannels(model, channels, depth), images.reshape(n, channels * depth, height, width)


def _attack_inputs(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch on ``device`` in fp32 and the contiguous layout that torchattacks' views need."""
    return images.to(device, dtype=torch.float32).contiguous(), labels.to(device)


def eps_label(eps: float) -> str:
    """The ``eps`` label of a metric: two significant digits (``2/255`` -> ``"0.0078"``)."""
    return f"{eps:.2g}"


def build_attack(name: str, model: nn.Module, eps: float | None, config: AttackConfig, *, seed: int = 0) -> Any:
    """A torchattacks attack object for ``name`` at budget ``eps``.

    Args:
        name: one of :data:`ATTACKS`.
        model: images in ``[0, 1]`` -> logits, in eval mode.
        eps: the budget in the attack's norm (ignored by ``cw_l2``, a minimum-norm attack).
        config: shared hyper-parameters.
        seed: seed of the attacks that take one (Square, AutoAttack).

    Returns:
        A ``torchattacks.Attack`` on ``model`` wrapped by :class:`ContiguousGradients` (so it
        works whatever memory layout the model runs in); call it with contiguous
        ``(images, labels)``.

    Raises:
        ValueError: unknown attack, or a budget missing for a bounded attack.
    """
    import torchattacks

    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    if not isinstance(model, ContiguousGradients):
        model = ContiguousGradients(model)
    if name == "cw_l2":
        return torchattacks.CW(model, c=config.cw_c, kappa=config.cw_kappa, steps=config.cw_steps, lr=config.cw_lr)
    if eps is None:
        raise ValueError(f"attack {name!r} needs a budget eps, got None")
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=eps)
    if name == "pgd_linf":
        return torchattacks.PGD(
            model,
            eps=eps,
            alpha=config.pgd_alpha(eps),
            steps=config.pgd_steps,
            random_start=config.random_start,
        )
    if name == "pgd_l2":
        return torchattacks.PGDL2(
            model,
            eps=eps,
            alpha=config.pgd_alpha(eps),
            steps=config.pgd_steps,
            random_start=config.random_start,
        )
    if name == "square":
        import contextlib
        import io

        # A model without parameters (an exported artefact behind its normalisation) leaves
        # torchattacks unable to guess the device, which it says on stdout: set it ourselves.
        with contextlib.redirect_stdout(io.StringIO()):
            square = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=config.square_queries, seed=seed)
        square.set_device(_device_of(model))
        return square
    return _autoattack(model, eps, config.n_classes, seed)


def _autoattack(model: nn.Module, eps: float, n_classes: int, seed: int) -> Any:
    """AutoAttack's standard L-infinity ensemble; for fewer than 4 classes, its untargeted form.

    The targeted APGD-T of the standard version uses the DLR loss, which compares the 1st, 3rd
    and 4th largest logits and so needs at least 4 classes. Binary and 3-class models (most
    diagnostic models) get APGD-CE, untargeted FAB and Square with 5000 queries instead.
    """
    import torchattacks

    if n_classes >= 4:
        return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed)
    return torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, norm="Linf", eps=eps, seed=seed, loss="ce", n_restarts=1),
            torchattacks.FAB(model, norm="Linf", eps=eps, seed=seed, multi_targeted=False, n_classes=n_classes),
            torchattacks.Square(model, norm="Linf", eps=eps, seed=seed, n_queries=5000),
        ]
    )


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block and restore the caller's state afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, slice]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for index, start in enumerate(range(0, n, batch_size)):
        yield index, slice(start, min(start + batch_size, n))


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes (int64, CPU) of ``images``, in fp32 without gradients; -1 for non-finite logits."""
    device = _device_of(model)
    parts = [torch.zeros(0, dtype=torch.long)]
    with torch.no_grad():
        for _, rows in _batches(images.shape[0], batch_size):
            logits = model(images[rows].to(device, dtype=torch.float32))
            # -1 (never a label) where the logits are not finite: no lucky argmax over NaN.
            finite = torch.isfinite(logits).all(dim=1)
            parts.append(torch.where(finite, logits.argmax(dim=1), -1).cpu())
    return torch.cat(parts)


def still_correct(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    name: str,
    eps: float,
    config: AttackConfig,
    *,
    seed: int,
    batch_size: int,
    judge: nn.Module | None = None,
) -> torch.Tensor:
    """Attack every image within budget ``eps``; True where the model still predicts its label.

    This is the raw outcome of the attack on each image. The check's robust accuracy also
    requires the clean image to be classified correctly (``delta = 0`` is in every budget).

    Args:
        model: images in ``[0, 1]`` -> logits.
        images: float ``(N, C, H, W)`` in ``[0, 1]``.
        labels: int64 ``(N,)``.
        name: a bounded attack of :data:`ATTACKS` (not ``cw_l2``).
        eps: the budget in the attack's norm.
        config: shared hyper-parameters.
        seed: batch ``b`` is attacked after ``torch.manual_seed(seed + b)``.
        batch_size: images per attack call.
        judge: the model whose prediction on the attacked images counts (default ``model``):
            an exported artefact judging images crafted on its reference (a transfer attack).

    Returns:
        bool ``(N,)`` on the CPU.
    """
    if name not in ATTACKS or ATTACKS[name].minimum_norm:
        raise ValueError(
            f"still_correct runs a bounded attack; expected one of "
            f"{sorted(k for k, v in ATTACKS.items() if not v.minimum_norm)}, got {name!r}"
        )
    device = _device_of(model)
    parts = [torch.zeros(0, dtype=torch.bool)]
    for index, rows in _batches(images.shape[0], batch_size):
        x, y = _attack_inputs(images[rows], labels[rows], device)
        with seeded(seed + index, device):
            attack = build_attack(name, model, eps, config, seed=seed + index)
            adversarial = attack(x, y)
        with torch.no_grad():
            parts.append(((judge or model)(adversarial).argmax(dim=1) == y).cpu())
    return torch.cat(parts)


def minimum_norm_perturbations(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: AttackConfig,
    *,
    seed: int,
    batch_size: int,
    judge: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carlini-Wagner L2: which images it fools (``judge``'s prediction, default ``model``'s), and
    the L2 norm of each perturbation found.

    Robust accuracy at budget ``eps`` counts an image as broken when ``fooled`` and
    ``norm <= eps``: one run answers every L2 budget.

    Returns:
        ``(fooled, norms)``: bool ``(N,)`` and float64 ``(N,)`` on the CPU (``inf`` where the
        attack found nothing).
    """
    device = _device_of(model)
    fooled_parts = [torch.zeros(0, dtype=torch.bool)]
    norm_parts = [torch.zeros(0, dtype=torch.float64)]
    for index, rows in _batches(images.shape[0], batch_size):
        x, y = _attack_inputs(images[rows], labels[rows], device)
        with seeded(seed + index, device):
            adversarial = build_attack("cw_l2", model, None, config)(x, y)
        with torch.no_grad():
            fooled = (judge or model)(adversarial).argmax(dim=1) != y
            norms = (adversarial - x).flatten(1).double().norm(dim=1)
        norms = torch.where(fooled, norms, torch.full_like(norms, float("inf")))
        fooled_parts.append(fooled.cpu())
        norm_parts.append(norms.cpu())
    return torch.cat(fooled_parts), torch.cat(norm_parts)
