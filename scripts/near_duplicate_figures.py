"""Print the leakage check's near-duplicate figures: planted copies against look-alike patients.

Runs :class:`auditkit.checks.leakage.LeakageCheck` (default parameters, shared pass with the
packaged tiny CNN) on

* look-alike studies (:mod:`auditkit.fixtures.lookalike`) with planted copies of ten kinds, and
  their clean twins: those the parameters were chosen on (seed 0 with 240 patients, seed 3 with
  800, and with ``--large`` seed 5 with 2,000) and three held out (another scanner profile,
  another scanner without a window in the header, the study exported as 16-bit PNG; other seeds
  and stored sizes);
* the demo study exactly as ``make demo`` writes it (no copies planted: every train-eval near
  duplicate is a false one);
* the leaky fixture (:mod:`auditkit.fixtures.leaky`) and its clean twin;

and prints, per study, the planted and flagged pairs (train-eval and within each split),
precision and recall, the bound the study calibrated, the recall per kind of copy, and what the
previous detector (256-bit pHash within 49 bits, embedding cosine >= 0.5) flags on the same
decoded images. Takes about 7 minutes on two CPU cores (``--quick``: 4; ``--large``: 15).

    python scripts/near_duplicate_figures.py [--threads 2] [--quick] [--large]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Pair = tuple[str, int, int]  # (scope, first row, second row); cross pairs are (train, eval) rows


@dataclass
class Figures:
    """One study's outcome."""

    name: str
    images: int
    planted: set[Pair]
    kinds: dict[Pair, str]
    found: set[Pair]
    previous: set[Pair]
    search: dict[str, Any]
    seconds: float
    same_patient: int
    notes: list[str] = field(default_factory=list)

    def precision_recall(self, pairs: set[Pair], scope: str | None = None) -> tuple[int, int, float, float]:
        truth = {p for p in self.planted if scope is None or (p[0] == "cross") == (scope == "cross")}
        chosen = {p for p in pairs if scope is None or (p[0] == "cross") == (scope == "cross")}
        hits = len(chosen & truth)
        precision = hits / len(chosen) if chosen else 1.0
        recall = hits / len(truth) if truth else 1.0
        return len(chosen), hits, precision, recall


def _pair(scope: str, a: int, b: int) -> Pair:
    return (scope, a, b) if scope == "cross" else (scope, min(a, b), max(a, b))


def audit(name: str, spec_path: Path, out: Path, truth: dict[Pair, str]) -> Figures:
    """Run the leakage check on a study and collect its near-duplicate pairs."""
    from auditkit.checks.leakage import LeakageCheck, near_pairs_across, perceptual_hash, pixel_digests
    from auditkit.context import AuditContext
    from auditkit.data import load_dataset
    from auditkit.model import ModelAdapter
    from auditkit.spec import load_spec

    spec = load_spec(spec_path)
    dataset = load_dataset(spec, roles=("eval", "train"))
    ctx = AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, out)
    ctx.prepare(["eval", "train"])
    params = LeakageCheck.Params(n_boot=0, shortcut_columns=("site",))
    started = time.perf_counter()
    result = LeakageCheck().run(ctx.for_check(LeakageCheck), params)
    seconds = time.perf_counter() - started
    found: set[Pair] = set()
    search: dict[str, Any] = {}
    same_patient = 0
    for finding in result.findings:
        if finding["kind"] == "near_duplicate" and finding["scope"] == "train_eval":
            found.add(_pair("cross", finding["train_row"], finding["eval_row"]))
            same_patient += finding["train_patient"] == finding["eval_patient"]
        elif finding["kind"] == "near_duplicate":
            found.add(_pair(finding["split"], *finding["rows"]))
            same_patient += finding["patients"][0] == finding["patients"][1]
        elif finding["kind"] == "duplicate_search":
            search = finding
    # The previous detector on the same decoded images and embeddings (train-eval pairs).
    train, test = ctx.split("train"), ctx.split("eval")
    near = near_pairs_across(
        perceptual_hash(train.images),
        perceptual_hash(test.images),
        49,
        first_digests=pixel_digests(train.images),
        second_digests=pixel_digests(test.images),
        features=(ctx.features("train").numpy(), ctx.features("eval").numpy()),
        min_cosine=0.5,
    )
    previous = {_pair("cross", int(train.rows[i]), int(test.rows[j])) for i, j in zip(near.i, near.j, strict=True)}
    images = int(train.n + test.n)
    return Figures(name, images, set(truth), truth, found, previous, search, seconds, same_patient)


def lookalike(name: str, root: Path, **kwargs: Any) -> list[Figures]:
    """A look-alike study and its clean twin."""
    from auditkit.fixtures.lookalike import generate_lookalike_study

    out = []
    for planted in (True, False):
        study = generate_lookalike_study(root / f"{name}-{planted}", planted=planted, **kwargs)
        truth = {_pair(c.scope, c.original_row, c.copy_row): c.kind for c in study.copies}
        label = name if planted else f"{name}, clean twin"
        out.append(audit(label, study.spec_path, root / f"{name}-{planted}-ctx", truth))
    return out


def demo(root: Path) -> list[Figures]:
    from auditkit.demo import prepare_demo

    spec_path = prepare_demo(root / "demo")
    return [audit("demo study (make demo)", spec_path, root / "demo-ctx", {})]


def leaky(root: Path) -> list[Figures]:
    from auditkit.fixtures.leaky import NEAR_TRANSFORMS, generate_leaky_study

    out = []
    for is_leaky in (True, False):
        study = generate_leaky_study(root / f"leaky-{is_leaky}", leaky=is_leaky)
        truth = {
            _pair("cross" if c.scope == "cross" else c.scope, c.original_row, c.copy_row): c.kind
            for c in study.truth.copies
            if c.kind in NEAR_TRANSFORMS
        }
        label = "leaky fixture" if is_leaky else "leaky fixture, clean twin"
        out.append(audit(label, study.spec_path, root / f"leaky-{is_leaky}-ctx", truth))
    return out


def _rate(value: float) -> str:
    return f"{value:.3f}"


def report(figures: list[Figures]) -> list[str]:
    """The markdown tables."""
    lines = [
        "| study | images | planted (train-eval / within) | flagged (train-eval / within) | of them one patient's"
        " | precision | recall | bound (z, similarity) | previous detector: train-eval flagged, precision, recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        cross_truth = sum(1 for p in f.planted if p[0] == "cross")
        cross_found = sum(1 for p in f.found if p[0] == "cross")
        n, _, precision, recall = f.precision_recall(f.found)
        _, _, old_p, old_r = f.precision_recall(f.previous, "cross")
        bound = f"z {f.search.get('z', 0):.2f}, {f.search.get('similarity_threshold', 0):.3f}"
        lines.append(
            f"| {f.name} | {f.images} | {cross_truth} / {len(f.planted) - cross_truth}"
            f" | {cross_found} / {n - cross_found} | {f.same_patient} | {_rate(precision)} | {_rate(recall)} | {bound}"
            f" | {len(f.previous)}, {_rate(old_p)}, {_rate(old_r)} |"
        )
    kinds = sorted({k for f in figures for k in f.kinds.values()})
    planted_studies = [f for f in figures if f.planted]
    lines += ["", "Recall per kind of copy (found / planted, every scope):", ""]
    lines.append("| kind | " + " | ".join(f.name for f in planted_studies) + " |")
    lines.append("|---|" + "---|" * len(planted_studies))
    for kind in kinds:
        cells = []
        for f in planted_studies:
            pairs = {p for p, k in f.kinds.items() if k == kind}
            cells.append(f"{len(pairs & f.found)} / {len(pairs)}" if pairs else "-")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Search details:", ""]
    for f in figures:
        s = f.search
        lines.append(
            f"- {f.name}: pair similarity median {s.get('pair_similarity_median')}, scale"
            f" {s.get('pair_similarity_scale')} ({s.get('pairs_measured')} pairs), hash radius"
            f" {s.get('radius_bits')} bits (pair Hamming median {s.get('pair_hamming_median')}, scale"
            f" {s.get('pair_hamming_scale')}); check {f.seconds:.1f} s"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="leave out the 800-patient study")
    parser.add_argument("--large", action="store_true", help="add a 2,000-patient look-alike study (minutes)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    from auditkit.fixtures.synthetic import DEFAULT_SITES

    site_b, site_c = DEFAULT_SITES[1], DEFAULT_SITES[2]
    studies: list[tuple[str, Callable[[Path], list[Figures]]]] = [
        ("look-alike, seed 0 (tuning)", lambda r: lookalike("look-alike, seed 0 (tuning)", r)),
    ]
    if not arguments.quick:
        studies.append(
            (
                "look-alike, 800 patients (tuning)",
                lambda r: lookalike(
                    "look-alike, 800 patients, seed 3 (tuning)", r, n_patients=800, seed=3, n_cross=5, n_within=2
                ),
            )
        )
    if arguments.large:
        studies.append(
            (
                "look-alike, 2,000 patients (tuning)",
                lambda r: lookalike(
                    "look-alike, 2,000 patients, seed 5 (tuning)", r, n_patients=2000, seed=5, n_cross=6, n_within=2
                ),
            )
        )
    studies += [
        (
            "held out: site B",
            lambda r: lookalike(
                "held out: site B (MONOCHROME1, blur), seed 21, 192 px", r, site=site_b, seed=21, image_size=192
            ),
        ),
        (
            "held out: site C",
            lambda r: lookalike(
                "held out: site C (no window, gamma), seed 22, 128 px", r, site=site_c, seed=22, image_size=128
            ),
        ),
        (
            "held out: PNG",
            lambda r: lookalike("held out: 16-bit PNG export, seed 23", r, seed=23, fmt="png"),
        ),
        ("demo", demo),
        ("leaky", leaky),
    ]
    figures: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="auditkit-near-") as folder:
        root = Path(folder)
        for _, make in studies:
            figures += make(root)
    print("\n".join(report(figures)))


if __name__ == "__main__":
    main()
