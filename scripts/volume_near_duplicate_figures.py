"""Figures of the near-duplicate search on 3-D volumes (docs/leakage.md, "Volumes").

Runs the leakage check's search (defaults, no embedding confirmation) on chest-CT phantom studies
with planted copies (:mod:`auditkit.fixtures.volume_copies`) and on their clean twins, and on
the population fixtures' ``shapes3d`` volumes (solids in noise, no anatomy) with copies made on
the decoded arrays, and prints one markdown table row per study, then the slice-count
comparison on the tuning study.

Run: ``python scripts/volume_near_duplicate_figures.py`` (about three minutes on two cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from auditkit.checks.leakage import LeakageCheck, pixel_digests
from auditkit.checks.leakage.duplicates import near_duplicate_search
from auditkit.checks.leakage.fingerprint import slice_depths
from auditkit.checks.leakage.hashing import volume_hash
from auditkit.fixtures.population import generate_dataset
from auditkit.fixtures.volume_copies import COPY_KINDS, copied_volumes

Truth = dict[tuple[int, int], str]


def search(volumes: np.ndarray, slices: int) -> tuple[set[tuple[int, int]], dict[str, float]]:
    images = torch.from_numpy(volumes).half()
    p = LeakageCheck.Params(near_volume_slices=slices)
    depths = slice_depths(images.shape[2], slices)
    started = time.perf_counter()
    found = near_duplicate_search(
        images, volume_hash(images, depths), pixel_digests(images), features=None, z=p.near_z,
        z_per_decade=p.near_z_per_decade, floor=p.near_min_similarity, components=p.near_components,
        max_radius=int(p.near_max_distance * p.hash_bits * len(depths)), hash_z=p.near_hash_z,
        min_cosine=p.near_min_cosine, rng=np.random.default_rng(0), volume_slices=slices,
    )  # fmt: skip
    info = {
        "threshold": found.calibration.threshold,
        "median": found.calibration.median,
        "scale": found.calibration.scale,
        "radius": found.radius,
        "seconds": time.perf_counter() - started,
    }
    return {(int(a), int(b)) for a, b in zip(found.i, found.j, strict=True)}, info


def row(name: str, volumes: np.ndarray, truth: Truth, slices: int = LeakageCheck.Params().near_volume_slices) -> str:
    found, info = search(volumes, slices)
    hits = found & set(truth)
    missed = sorted(truth[p] for p in set(truth) - found)
    precision = f"{len(hits) / len(found):.3f}" if found else "-"
    recall = f"{len(hits) / len(truth):.3f}" if truth else "-"
    radius = "off" if info["radius"] < 0 else str(int(info["radius"]))
    return (
        f"| {name} | {volumes.shape[0]} | {len(truth)} | {len(found)} | {len(found - set(truth))} | {precision} |"
        f" {recall} | {info['threshold']:.3f} ({info['median']:.3f} +- {info['scale']:.3f}) | {radius} |"
        f" {', '.join(missed) or '-'} | {info['seconds']:.1f} |"
    )


def copy_array(volume: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of a [0, 1] volume ``(D, H, W)`` by the steps of :data:`COPY_KINDS`, on the array."""
    if kind == "renoise":
        out = volume + rng.normal(0, rng.uniform(0.01, 0.02), volume.shape)
    elif kind == "calibration":
        out = volume * rng.uniform(0.95, 1.05) + rng.uniform(-0.03, 0.03)
    elif kind == "shift":
        out = ndimage.shift(volume, (0, rng.uniform(0.3, 0.8), -rng.uniform(0.3, 0.8)), order=1, mode="nearest")
    elif kind == "zshift":
        out = ndimage.shift(volume, (rng.uniform(0.2, 0.5), 0, 0), order=1, mode="nearest")
    elif kind == "blur":
        out = ndimage.gaussian_filter(volume, (0, rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.7)))
    elif kind == "rescale":
        small = ndimage.zoom(volume, (1, 0.75, 0.75), order=1)
        out = ndimage.zoom(small, (1, volume.shape[1] / small.shape[1], volume.shape[2] / small.shape[2]), order=1)
    else:
        out = copy_array(volume, "shift", rng) * rng.uniform(0.97, 1.03) + rng.normal(0, 0.01, volume.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def shapes3d(seed: int, n_copies: int) -> tuple[np.ndarray, Truth]:
    volumes = np.asarray(generate_dataset("shapes3d", 3, seed, per_class=80).images)
    rng = np.random.default_rng([seed, 77])
    truth: Truth = {}
    copies = []
    for k, original in enumerate(rng.choice(len(volumes), n_copies, replace=False).tolist()):
        kind = COPY_KINDS[k % len(COPY_KINDS)]
        copies.append(copy_array(volumes[original], kind, rng))
        truth[(int(original), len(volumes) + k)] = kind
    return np.concatenate([volumes, np.stack(copies)])[:, None], truth


def main() -> None:
    columns = ("study", "volumes", "planted", "flagged", "false", "precision", "recall")
    columns += ("bound (median +- robust sd)", "hash radius", "missed", "s")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    tuning = None
    for name, patients, seed in (
        ("CT phantoms, seed 0 (tuning)", 216, 0),
        ("CT phantoms, seed 5 (held out)", 300, 5),
        ("CT phantoms, seed 9 (held out)", 600, 9),
    ):
        with tempfile.TemporaryDirectory() as folder:
            study = copied_volumes(Path(folder), n_patients=patients, n_copies=28, seed=seed)
        truth = {(c.original, c.copy): c.kind for c in study.copies}
        print(row(name, study.volumes, truth), flush=True)
        print(row("clean twin", study.volumes[:patients], {}), flush=True)
        if tuning is None:
            tuning = (study.volumes, truth)
    volumes, truth = shapes3d(5, 28)
    print(row("shapes3d, seed 5 (held out: no anatomy)", volumes, truth), flush=True)
    print(row("clean twin", volumes[: volumes.shape[0] - 28], {}), flush=True)
    assert tuning is not None
    print()
    print("Axial slices per volume, tuning study:")
    for slices in (1, 2, 4, 8, 16):
        print(row(f"{slices} slice(s)", tuning[0], tuning[1], slices=slices), flush=True)


if __name__ == "__main__":
    main()
