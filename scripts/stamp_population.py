"""Measure the backdoor check's train-only stamp search on the population's data (no model needed).

The stamp search (``auditkit.checks.backdoor.stamps``) reads pixels only, so its error rates are
properties of the data: this script builds every 2-D member's study of
``auditkit.fixtures.population`` (clean studies and their poisoned twins), rounds the images as
the engine decodes the population's 16-bit PNGs (then float16, the stored precision), runs the
search per label with the check's defaults and prints, per group of parts:

* clean studies with any row flagged (the data-level false-positive rate, Wilson 95% interval);
* BadNets twins: recall and precision on the poisoned rows, and twins with every row found;
* source-specific twins: recall on the stamped rows (poisoned and cover images);
* blended twins: rows flagged (expected none: no pixel survives a blend exactly).

The levels, contrast and window were chosen on ``tuning`` and ``held_out_1``-``3``; ``held_out_4``-``6``
were measured once with them unchanged. ``--variants`` adds studies on seeds no part uses (90-95)
with triggers the search was not tuned on: a random binary patch, a grey two-level glyph, a
checkerboard with per-image noise of 2/255, one pasted at a random position per image, a
3-pixel checkerboard, and one-colour squares (a documented blind spot).

    python scripts/stamp_population.py [--variants]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

GROUPS = {
    "chosen on (tuning, held_out_1-3)": ("tuning", "held_out_1", "held_out_2", "held_out_3"),
    "measured once (held_out_4-6)": ("held_out_4", "held_out_5", "held_out_6"),
}


def decoded(images: NDArray[np.float32]) -> NDArray[np.float16]:
    """``(N, H, W)`` in [0, 1] as the engine holds them after a 16-bit PNG: ``(N, 1, H, W)`` float16."""
    return (np.rint(np.clip(images, 0, 1) * 65535) / 65535).astype(np.float16)[:, None]


def flag_study(images: NDArray[np.float16], labels: NDArray[np.int64], splits: NDArray[np.str_]) -> NDArray[np.bool_]:
    """Rows the stamp search flags, label by label, with the check's defaults."""
    from auditkit.checks.backdoor.stamps import train_only_stamps

    train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    flagged = np.zeros(labels.shape[0], dtype=bool)
    for k in np.unique(labels):
        members, reference = train[labels[train] == k], test[labels[test] == k]
        found = train_only_stamps(
            lambda rows, members=members: images[members[rows]],
            members.size,
            lambda rows, reference=reference: images[reference[rows]],
            reference.size,
        )
        flagged[members[found.flagged]] = True
    return flagged


@dataclass
class Tally:
    clean: int = 0
    clean_flagged: int = 0
    twins: dict[str, list[int]] = field(default_factory=dict)  # kind -> [twins, all rows found, tp, flagged, truth]

    def add(self, kind: str, found: NDArray[np.bool_], truth: NDArray[np.bool_]) -> None:
        row = self.twins.setdefault(kind, [0, 0, 0, 0, 0])
        tp = int((found & truth).sum())
        row[0] += 1
        row[1] += int(tp == truth.sum())
        row[2] += tp
        row[3] += int(found.sum())
        row[4] += int(truth.sum())

    def lines(self) -> list[str]:
        from auditkit.stats import wilson_interval

        low, high = wilson_interval(self.clean_flagged, self.clean) or (float("nan"), float("nan"))
        out = [
            f"  clean studies with a row flagged: {self.clean_flagged}/{self.clean}"
            f" = {self.clean_flagged / max(1, self.clean):.1%} [{low:.1%}, {high:.1%}]"
        ]
        for kind, (twins, whole, tp, flagged, truth) in sorted(self.twins.items()):
            precision = f"{tp / flagged:.3f}" if flagged else "-"
            out.append(
                f"  {kind:24s} twins {twins:3d}, all rows found {whole:3d}; rows recall {tp}/{truth}"
                f" = {tp / max(1, truth):.3f}, precision {tp}/{flagged} = {precision}"
            )
        return out


def population(parts: Sequence[str]) -> Tally:
    from auditkit.fixtures.population import POPULATION, member_dataset

    tally = Tally()
    for member in POPULATION:
        if member.part not in parts or member.kind == "shapes3d":
            continue
        data = member_dataset(member)
        found = flag_study(decoded(data.images), data.labels, data.splits)
        if member.attack is None:
            tally.clean += 1
            tally.clean_flagged += int(found.any())
            continue
        truth = np.zeros(found.shape[0], dtype=bool)
        kind = member.attack.kind
        rows = data.stamped_rows if kind == "source" else data.poisoned_rows
        truth[list(rows)] = True
        tally.add({"badnets": "BadNets", "source": "source-specific (stamped)", "blend": "blend"}[kind], found, truth)
    return tally


def _checker(size: int) -> NDArray[np.float32]:
    cells = np.arange(size)
    return ((cells[:, None] + cells[None, :]) % 2 == 0).astype(np.float32)


VARIANTS: dict[str, Callable[[np.random.Generator], tuple[NDArray[np.float32], bool]]] = {
    # name -> draw(rng) -> (patch, random position)
    "random binary 4px": lambda rng: ((np.random.default_rng(123).random((4, 4)) > 0.5).astype(np.float32), False),
    "grey glyph 0.35/0.65": lambda rng: (
        np.where(np.random.default_rng(5).random((4, 4)) > 0.5, 0.65, 0.35).astype(np.float32),
        False,
    ),
    "checker + noise 2/255": lambda rng: (np.clip(_checker(4) + rng.normal(0, 2 / 255, (4, 4)), 0, 1), False),
    "checker, random position": lambda rng: (_checker(4), True),
    "checker 3px": lambda rng: (_checker(3), False),
    "solid white 4px": lambda rng: (np.ones((4, 4), np.float32), False),
    "solid black 4px": lambda rng: (np.zeros((4, 4), np.float32), False),
}


def variants() -> Tally:
    from auditkit.fixtures.population import generate_dataset

    tally = Tally()
    for kind in ("shapes", "textures", "chest"):
        for seed in range(90, 96):
            k = 2 + seed % 4
            data = generate_dataset(kind, k, seed)
            tally.clean += 1
            tally.clean_flagged += int(flag_study(decoded(data.images), data.labels, data.splits).any())
            train = np.flatnonzero(data.splits == "train")
            for name, draw in VARIANTS.items():
                rng = np.random.default_rng([seed, len(name)])
                target = seed % k
                poisoned = rng.choice(train[data.labels[train] != target], size=round(0.1 * train.size), replace=False)
                images, labels = data.images.copy(), data.labels.copy()
                for i in poisoned:
                    patch, anywhere = draw(rng)
                    side = patch.shape[0]
                    top, left = (
                        rng.integers(1, images.shape[1] - side - 1, 2)
                        if anywhere
                        else (images.shape[1] - 1 - side, images.shape[2] - 1 - side)
                    )
                    images[i, top : top + side, left : left + side] = patch
                labels[poisoned] = target
                truth = np.zeros(labels.shape[0], dtype=bool)
                truth[poisoned] = True
                tally.add(name, flag_study(decoded(images), labels, data.splits), truth)
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", action="store_true", help="also the triggers the search was not tuned on")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    for title, parts in GROUPS.items():
        print(title)
        print("\n".join(population(parts).lines()))
    if args.variants:
        print("other triggers on new seeds 90-95 (18 clean studies, one twin per trigger)")
        print("\n".join(variants().lines()))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
