"""GPU figures: MONAI DenseNet-121 at 224x224 through the shared pass, on a CUDA device.

Measures, on one GPU and in one process:

* images per second of the shared pass (:meth:`auditkit.model.ModelAdapter.forward_pass`) in fp32
  and in bf16 autocast (channels_last, pinned memory and loader workers as ``auto`` picks them),
  with the recorded bf16-vs-fp32 parity (top-1 agreement, largest probability difference);
* the cost of one attack step (forward and backward to the input, fp32, as PGD takes it) relative
  to one forward pass of the same batch;
* real-DICOM loading (decoding the demo study's files, then the pass from host memory) against
  the pass over tensors already on the device;
* the leakage check's fingerprint search (:func:`auditkit.checks.leakage.fingerprint.similar_pairs`,
  quadratic) on the device at ``n`` and ``4n`` pooled fingerprints (``bench_leakage``'s synthetic
  homogeneous study with planted copies): seconds, growth, recall of the copies, and the CPU's
  time at ``n`` in the same process.

Run it once wherever a CUDA GPU is at hand (``python -m benchmarks.gpu``) and copy its lines,
with the GPU's name it prints, into ``benchmarks/RESULTS.md``. Without CUDA it prints that the
GPU figures are missing and exits 0 (``make bench`` calls it last). ``--device cpu --images 16
--size 64 --fingerprints 2000`` runs the same code on the CPU at toy size, to check the script itself.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

FACTORY = "monai.networks.nets:DenseNet121"
FACTORY_KWARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def densenet_spec(spec_path: Path, size: int) -> Any:
    from auditkit.spec import load_spec

    spec = load_spec(spec_path)
    update = {
        "factory": FACTORY,
        "factory_kwargs": FACTORY_KWARGS,
        "weights": None,
        "input": spec.model.input.model_copy(update={"height": size, "width": size}),
    }
    return spec.model_copy(update={"model": spec.model.model_copy(update=update)})


def fingerprint_search_lines(device: torch.device, images: int) -> list[str]:
    """The fingerprint search on ``device`` at ``images`` and ``4 * images`` pooled fingerprints."""
    from auditkit.checks.leakage.fingerprint import similar_pairs
    from benchmarks.bench_leakage import SEED, SIMILARITY_BOUND, synthetic_fingerprints

    similar_pairs(synthetic_fingerprints(256, SEED)[0], SIMILARITY_BOUND, device=device)  # warm-up
    seconds: dict[int, float] = {}
    recall: dict[int, float] = {}
    for count in (4 * images, images):  # the smaller last: its fingerprints are searched on the CPU too
        vectors, planted = synthetic_fingerprints(count, SEED + count)
        started = time.perf_counter()
        i, j, _ = similar_pairs(vectors, SIMILARITY_BOUND, device=device)  # returns on the host: synchronised
        seconds[count] = time.perf_counter() - started
        recall[count] = int(np.count_nonzero(j - i == count - planted)) / planted
    started = time.perf_counter()
    similar_pairs(vectors, SIMILARITY_BOUND)
    cpu_s = time.perf_counter() - started
    return [
        f"  fingerprint search (bound {SIMILARITY_BOUND}, sketch above 8,192) on the device: {images:,} pooled"
        f" {seconds[images]:.2f} s, {4 * images:,} {seconds[4 * images]:.2f} s"
        f" (x{seconds[4 * images] / seconds[images]:.1f} per 4n), recall {min(recall.values()):.3f};"
        f" on the CPU ({torch.get_num_threads()} threads) at {images:,}: {cpu_s:.2f} s"
        f" (device x{cpu_s / seconds[images]:.0f} faster)"
    ]


def main(
    device_name: str | None = None,
    n_images: int = 512,
    size: int = 224,
    batch_size: int = 64,
    fingerprint_images: int = 25_000,
) -> list[str]:
    """Measure and return the report lines (or the note that no GPU was at hand)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return ["GPU figures missing: no CUDA GPU on this machine (run `python -m benchmarks.gpu` on one)"]
        device_name = "cuda"
    from auditkit.data import load_dataset
    from auditkit.demo import prepare_demo
    from auditkit.model import InferenceOptions, ModelAdapter

    device = torch.device(device_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"device {name}; torch {torch.__version__}, CUDA {torch.version.cuda};"
        f" MONAI DenseNet-121 (2-D, 1 channel, 2 classes, random weights) at {size}x{size}, batch {batch_size}"
    ]
    with tempfile.TemporaryDirectory(prefix="auditkit-gpu-") as tmp:
        # About 1.55 images per patient; the stored images are 256x256 DICOM, decoded to `size`.
        spec_path = prepare_demo(Path(tmp), n_patients=max(8, int(n_images / 1.55)))
        spec = densenet_spec(spec_path, size)

        started = time.perf_counter()
        dataset = load_dataset(spec, roles=("eval", "train"))
        decode_s = time.perf_counter() - started
        images = torch.cat([s.images[:] for s in dataset.splits.values()])
        n = int(images.shape[0])

        rates: dict[str, float] = {}
        adapters: dict[str, ModelAdapter] = {}
        for precision in ("fp32", "bf16"):
            adapter = ModelAdapter(
                spec, batch_size=batch_size, device=device_name, options=InferenceOptions(precision=precision)
            )
            adapters[precision] = adapter
            rates[precision] = n / _median_time(functools.partial(adapter.forward_pass, images), device)
        bf16 = adapters["bf16"]
        parity = bf16.stats.parity or {}
        lines.append(
            f"  shared pass from host memory ({n} images): fp32 {rates['fp32']:.0f} images/s,"
            f" bf16 {rates['bf16']:.0f} images/s (x{rates['bf16'] / rates['fp32']:.2f});"
            f" channels_last {bf16.channels_last}, loader workers {bf16.workers}, pinned {bf16.pin_memory}"
        )
        lines.append(
            f"  bf16 parity against fp32 on {parity.get('images')} images: top-1 agreement"
            f" {parity.get('top1_agreement')}, largest probability difference {parity.get('max_prob_diff')};"
            f" pass precision kept: {bf16.stats.precision}"
        )

        module = adapters["fp32"].module
        batch = images[:batch_size].float().to(device)
        labels = torch.zeros(batch.shape[0], dtype=torch.long, device=device)

        def forward() -> None:
            with torch.no_grad():
                module(batch)

        def attack_step() -> None:
            x = batch.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(module(x), labels)
            (grad,) = torch.autograd.grad(loss, x)
            (x.detach() + 0.001 * grad.sign()).clamp_(0, 1)

        forward_s, step_s = _median_time(forward, device), _median_time(attack_step, device)
        lines.append(
            f"  one attack step (fp32 forward + input gradient) / one fp32 forward pass: {step_s / forward_s:.2f}x"
            f" ({step_s * 1e3:.1f} ms / {forward_s * 1e3:.1f} ms for {batch.shape[0]} images)"
        )

        on_device = images.to(device)

        def device_pass() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                for first in range(0, n, batch_size):
                    chunk = on_device[first : first + batch_size].float()
                    if bf16.channels_last:
                        chunk = chunk.contiguous(memory_format=torch.channels_last)
                    bf16.module(chunk)

        device_rate = n / _median_time(device_pass, device)
        lines.append(
            f"  real-DICOM loading: decode {n / decode_s:.0f} images/s; decode + bf16 pass"
            f" {n / (decode_s + n / rates['bf16']):.0f} images/s against the bf16 pass over tensors"
            f" already on the device {device_rate:.0f} images/s"
        )
    lines += fingerprint_search_lines(device, fingerprint_images)
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is one)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fingerprints", type=int, default=25_000, help="pooled fingerprints searched (and 4x)")
    args = parser.parse_args()
    print("\n".join(main(args.device, args.images, args.size, args.batch_size, args.fingerprints)))
    sys.exit(0)
