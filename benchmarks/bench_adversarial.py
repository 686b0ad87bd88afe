"""The adversarial check's PGD against a direct torchattacks call on the same batch.

For each attack call the check forks and seeds torch's random state, builds the torchattacks
object, moves the batch to the model's device and reads the predictions back
(:func:`auditkit.checks.adversarial.still_correct`). This benchmark times that path against the
plain torchattacks recipe (``torch.manual_seed``, ``PGD(...)(x, y)``, one forward pass for the
predictions) on the same batch of the demo study, with the packaged tiny CNN, in one process:
the two are interleaved (alternating which goes first), after a warm-up, and the medians are
compared. Target: at most 1.10x. It also checks that both give the same outcome per image.

A second line times the whole ``AdversarialCheck.run`` (sampling, clean pass, bootstrap, the SVG
plot) for the same single attack, for context; that fixed cost does not grow with the attack.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

EPS = 2 / 255
STEPS = 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def main(repeats: int = 3, n_images: int = 32) -> list[str]:
    """Measure and return the report lines."""
    import torchattacks

    from auditkit.checks.adversarial import AdversarialCheck, AttackConfig, still_correct
    from auditkit.context import AuditContext
    from auditkit.data import load_dataset
    from auditkit.demo import prepare_demo
    from auditkit.model import ModelAdapter
    from auditkit.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="auditkit-bench-") as tmp:
        spec = load_spec(prepare_demo(Path(tmp), n_patients=120))
        adapter = ModelAdapter(spec)
        dataset = load_dataset(spec, roles=("eval",))
        ctx = AuditContext(spec, adapter, dataset, Path(tmp) / "out")
        model, device = adapter.module, adapter.device
        n = min(n_images, len(ctx.labels("eval")))
        images = ctx.images("eval", np.arange(n)).to(device)
        labels = torch.as_tensor(ctx.labels("eval")[:n], device=device)
        config = AttackConfig(pgd_steps=STEPS)
        seed = 1234

        def through_check() -> torch.Tensor:
            survived: torch.Tensor = still_correct(
                model, images, labels, "pgd_linf", EPS, config, seed=seed, batch_size=n
            )
            return survived

        def direct() -> torch.Tensor:
            torch.manual_seed(seed)
            attack = torchattacks.PGD(model, eps=EPS, alpha=config.pgd_alpha(EPS), steps=STEPS, random_start=True)
            adversarial = attack(images, labels)
            with torch.no_grad():
                survived: torch.Tensor = (model(adversarial).argmax(dim=1) == labels).cpu()
            return survived

        same = bool(torch.equal(through_check(), direct()))  # also the warm-up
        check_times: list[float] = []
        direct_times: list[float] = []
        for repeat in range(repeats):
            pair = [(check_times, through_check), (direct_times, direct)]
            for times, fn in pair if repeat % 2 == 0 else pair[::-1]:
                times.append(_timed(fn, device))
        check_median = statistics.median(check_times)
        direct_median = statistics.median(direct_times)

        params = AdversarialCheck.Params(
            attacks=["pgd_linf"], eps=[EPS], n_samples=n, pgd_steps=STEPS, sanity_checks=False, n_boot=0
        )
        run_times = [_timed(lambda: AdversarialCheck().run(ctx.for_check(AdversarialCheck), params), device)]

    shape = "x".join(str(s) for s in images.shape[1:])
    return [
        f"pgd_linf eps=2/255 steps={STEPS}, {n} images {shape}, tiny CNN on {device} "
        f"({torch.get_num_threads()} threads), median of {repeats} interleaved repeats:",
        f"  direct torchattacks.PGD   {direct_median * 1e3:8.1f} ms",
        f"  check (still_correct)     {check_median * 1e3:8.1f} ms",
        f"  ratio check/direct        {check_median / direct_median:8.3f}x  (target <= 1.10x); "
        f"same outcome per image: {same}",
        f"  whole AdversarialCheck.run with this one attack: {run_times[0] * 1e3:.1f} ms "
        "(adds sampling, clean pass, bootstrap and the SVG plot)",
    ]


if __name__ == "__main__":
    for line in main():
        print(line)
