"""Robust accuracy against the perturbation budget, as a byte-reproducible SVG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from auditkit.checks.adversarial.attacks import ATTACKS, eps_label

__all__ = ["robust_accuracy_plot"]

_COLOURS = {
    "fgsm": "#dd8452",
    "pgd_linf": "#4c72b0",
    "pgd_l2": "#4c72b0",
    "cw_l2": "#8172b3",
    "square": "#55a868",
    "autoattack": "#c44e52",
}


def robust_accuracy_plot(
    curves: Mapping[str, Mapping[float, float]],
    clean_accuracy: float,
    path: str | Path,
    *,
    n: int,
    cis: Mapping[tuple[str, float], tuple[float, float] | None] | None = None,
) -> Path:
    """Draw robust accuracy against epsilon, one line per attack, one panel per norm.

    Args:
        curves: attack -> {eps: robust accuracy}; attacks named in :data:`ATTACKS`.
        clean_accuracy: accuracy without perturbation (a dashed line).
        path: the SVG to write (its folder must exist).
        n: the sample size, for the title.
        cis: optional (attack, eps) -> 95% interval, drawn as error bars.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no curve to draw, or an unknown attack.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    unknown = sorted(set(curves) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; expected names from {sorted(ATTACKS)}")
    norms = [norm for norm in ("Linf", "L2") if any(ATTACKS[a].norm == norm for a in curves)]
    if not norms or not any(curves.values()):
        raise ValueError("nothing to draw: no attack has a robust accuracy")
    with matplotlib.rc_context(
        {
            "svg.hashsalt": "auditkit-adversarial",
            "svg.id": "robust-accuracy",
            "svg.fonttype": "path",
            "font.family": "DejaVu Sans",
            "font.size": 9.0,
        }
    ):
        fig = Figure(figsize=(4.0 * len(norms) + 1.0, 4.0), layout="constrained")
        axes = fig.subplots(1, len(norms), squeeze=False)[0]
        for axis, norm in zip(axes, norms, strict=True):
            for attack, curve in curves.items():
                if ATTACKS[attack].norm != norm or not curve:
                    continue
                eps = sorted(curve)
                accuracy = [curve[e] for e in eps]
                colour = _COLOURS[attack]
                style = "--" if attack == "fgsm" else "-"
                axis.plot(
                    eps,
                    accuracy,
                    marker="o",
                    markersize=3.5,
                    linestyle=style,
                    color=colour,
                    label=attack,
                )
                intervals = [(cis or {}).get((attack, e)) for e in eps]
                if all(ci is not None for ci in intervals):
                    lower = [a - ci[0] for a, ci in zip(accuracy, intervals, strict=True) if ci]
                    upper = [ci[1] - a for a, ci in zip(accuracy, intervals, strict=True) if ci]
                    axis.errorbar(
                        eps,
                        accuracy,
                        yerr=[[max(v, 0.0) for v in lower], [max(v, 0.0) for v in upper]],
                        fmt="none",
                        ecolor=colour,
                        elinewidth=0.8,
                        capsize=2.0,
                    )
            axis.axhline(clean_accuracy, color="0.4", linestyle=":", linewidth=1.0, label="clean")
            axis.set_xscale("log")
            # Ticks at the budgets measured, labelled as the metrics label them.
            grid = sorted({e for a, c in curves.items() if ATTACKS[a].norm == norm for e in c})
            axis.set_xticks(grid, [eps_label(e) for e in grid], rotation=45)
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_ylim(-0.02, 1.02)
            axis.set_xlabel(f"eps ({'L-infinity' if norm == 'Linf' else 'L2'}, [0, 1] units)")
            axis.set_ylabel("robust accuracy")
            axis.set_title(f"{'L-infinity' if norm == 'Linf' else 'L2'} attacks")
            axis.legend(loc="center right", frameon=False)
        fig.suptitle(f"Robust accuracy against perturbation budget (n = {n})")
        out = Path(path)
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out
