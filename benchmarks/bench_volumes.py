"""The shared pass on 3-D volumes: figures 1, 2 and 6 of :mod:`.bench_shared_pass` for 3-D models.

Two configurations of the CT fixture (:mod:`auditkit.fixtures.volumes`: chest CT phantoms stored
as DICOM series, NIfTI and ``.npy`` volumes of 24 x 48 x 48 voxels with anisotropic spacing): its
3-D CNN classifier on 216 patients, and its 3-D U-Net on the segmentation study (DICOM series and
NIfTI volumes with NIfTI masks, 120 patients), both at a 16 x 32 x 32 input. Figures, measured as
in :mod:`.bench_shared_pass` (each repeat paired with its own plain passes):

1. the shared pass plus every installed prediction-based check (the checks that measure volumes:
   calibration, ood, bias, leakage, performance; backdoor is skipped on volumes) over one plain
   ``model(x)`` pass over the same decoded volumes. Target <= 1.3.
2. forward passes per study volume and decodes per manifest row. Both must be 1.0.
3. the naive glued baseline over ours.
6. peak resident memory of a fresh process that decodes the study, runs the pass and the checks.

Run: ``make bench`` / ``python -m benchmarks bench_volumes``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_shared_pass import measure_model, peak_memory, prediction_checks

PATIENTS = 216
SEGMENTATION_PATIENTS = 120


def main() -> list[str]:
    """Measure figures 1, 2, 3 and 6 on the CT fixture; return the report lines."""
    from auditkit.fixtures.volumes import (
        generate_volume_segmentation_study,
        generate_volume_study,
        write_volume_segmentation_spec,
        write_volume_spec,
    )

    torch.manual_seed(0)
    checks, notes = prediction_checks()
    lines = [
        f"prediction-based checks: {', '.join(checks)}" + (f" ({'; '.join(notes)})" if notes else ""),
        f"CT fixture ({PATIENTS} patients; DICOM series, NIfTI and .npy volumes), CPU,"
        f" {torch.get_num_threads()} threads; batch size 64",
    ]
    with tempfile.TemporaryDirectory(prefix="auditkit-bench-volumes-") as name:
        root = Path(name) / "ct"
        generate_volume_study(root, n_patients=PATIENTS, seed=5)
        spec_path = write_volume_spec(root, "fair")
        lines += measure_model(spec_path, "volume_cnn", checks, Path(name) / "out", repeats=3, naive_repeats=1)
        lines.append(_memory_line(peak_memory(spec_path)))
        seg_root = Path(name) / "ct-seg"
        generate_volume_segmentation_study(seg_root, n_patients=SEGMENTATION_PATIENTS, seed=5)
        seg_spec = write_volume_segmentation_spec(seg_root, "clean")
        lines += measure_model(seg_spec, "volume_unet", checks, Path(name) / "out-seg", repeats=3, naive_repeats=1)
        lines.append(_memory_line(peak_memory(seg_spec)))
    return lines


def _memory_line(memory: dict[str, Any]) -> str:
    return (
        f"  6. peak resident memory (fresh process): {memory['n_images']} volumes held as {memory['dtype']}"
        f" ({memory['image_bytes'] / 2**20:.1f} MiB): peak {memory['peak_mb']:.0f} MiB"
        f" (resident after imports {memory['baseline_mb']:.0f} MiB)"
    )


if __name__ == "__main__":
    print("\n".join(main()))
