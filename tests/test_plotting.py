"""The shared figure mechanics (auditkit.plotting) and the checks' figures drawn with fixed layouts.

The checks' figures take their margins from text sizes computed before drawing, not from a layout
engine; these tests draw each figure with demo-like and hostile inputs (long labels, many rows,
one panel) and assert that no text leaves the figure or overlaps another text.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from scipy.special import softmax

from auditkit import plotting
from auditkit.plotting import figure_style, fixed_ticks, inch_margins, legend_columns, range_ticks, text_width


def _svg_renderer(fig: Any) -> Any:
    """A renderer measuring text exactly as the SVG output draws it (72 dpi, text as paths)."""
    from matplotlib.backends.backend_svg import RendererSVG

    fig.set_dpi(72)
    width, height = fig.get_size_inches() * 72
    renderer = RendererSVG(width, height, io.StringIO(), image_dpi=72)
    fig.draw(renderer)
    return renderer


# --------------------------------------------------------------------------------------------
# The helpers


def test_text_width_is_the_width_the_svg_backend_draws() -> None:
    from matplotlib.figure import Figure

    with figure_style("t", hashsalt="t", font_size=8.0):
        fig = Figure(figsize=(4, 1))
        texts = {
            (label, weight): fig.text(0.0, 0.5, label, fontsize=8.0, fontweight=weight)
            for label in ("F×65-120  (n=<5)  insufficient", "sex×site", "WWWW iiii")
            for weight in ("normal", "bold")
        }
        renderer = _svg_renderer(fig)
        for (label, weight), text in texts.items():
            measured = text.get_window_extent(renderer).width / 72.0
            assert text_width(label, 8.0, weight=weight) == pytest.approx(measured, abs=1e-3)
    assert text_width("sex", 8.0, weight="bold") > text_width("sex", 8.0)
    assert text_width("ab", 16.0) == pytest.approx(2 * text_width("ab", 8.0), rel=1e-3)
    assert text_width("", 8.0) == 0.0


def test_inch_margins_are_fractions_of_the_figure() -> None:
    assert inch_margins(10.0, 5.0, left=1.0, right=0.5, top=1.0, bottom=0.5) == {
        "left": 0.1,
        "right": 0.95,
        "top": 0.8,
        "bottom": 0.1,
    }
    with pytest.raises(ValueError, match=r"margins of 4.00 x 0.20 in leave no room in a 4.00 x 3.00 in figure"):
        inch_margins(4.0, 3.0, left=2.0, right=2.0, top=0.1, bottom=0.1)


def test_figure_style_fixes_titles_and_keeps_text_as_paths() -> None:
    from matplotlib.figure import Figure

    with figure_style("t", hashsalt="t", font_size=8.0):
        fig = Figure(figsize=(3, 3))
        ax = fig.subplots()
        ax.set_title("a title")
        ax.set_xticks([0.0, 1.0], labels=["0\n0\n0", "1"], minor=False)
        ax.xaxis.set_ticks_position("top")  # tick labels where an automatic title would dodge them
        _svg_renderer(fig)
        assert ax.title.get_position()[1] == 1.0
        import matplotlib

        assert matplotlib.rcParams["svg.fonttype"] == "none"


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.0, 1.0), (-3.4, 3.3), (0.0, 0.38), (-1e-3, 2e-3), (1.0, 1000.0)],
)
def test_range_ticks_stay_inside_the_range(low: float, high: float) -> None:
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    range_ticks(ax.yaxis, low, high)
    ticks = ax.get_yticks()
    assert 3 <= len(ticks) <= 7
    assert ticks.min() >= low - 1e-12 and ticks.max() <= high + 1e-12


def test_fixed_ticks_label_their_values() -> None:
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    fixed_ticks(ax.xaxis, (0.0, 0.5, 1.0))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0", "0.5", "1.0"]
    fixed_ticks(ax.xaxis, range(3), "{:d}")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("labels", "width"),
    [
        (["in-distribution", *(f"builtin:set_{i} (n = 32)" for i in range(5)), "95% TPR threshold"], 12.0),
        (["in-distribution", *(f"ood:an_external_site_number_{i} (n = 20)" for i in range(9))], 4.0),
        (["fgsm", "pgd_linf", "square", "autoattack", "clean"], 5.0),
        (["a" * 120], 3.0),
    ],
)
def test_legend_columns_fit_the_width(labels: list[str], width: float) -> None:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    columns = legend_columns(labels, 8.0, width, max_columns=4)
    assert 1 <= columns <= min(4, len(labels))
    with figure_style("t", hashsalt="t", font_size=8.0):
        fig = Figure(figsize=(width + 1.0, 3.0))
        legend = fig.legend([Line2D([], []) for _ in labels], labels, ncols=columns, frameon=False)
        renderer = _svg_renderer(fig)
        drawn = legend.get_window_extent(renderer).width / 72.0
    if columns > 1:
        assert drawn <= width + 1e-6
        # One more column would not have fitted (or there is none to add).
        assert columns == min(4, len(labels)) or legend_columns(labels, 8.0, width, max_columns=columns + 1) == columns


# --------------------------------------------------------------------------------------------
# The checks' figures: nothing clipped, nothing overlapping


def _drawn_tick_labels(fig: Any) -> tuple[set[int], set[int]]:
    """Ids of all tick labels, and of those drawn (a tick outside the view is not)."""
    every: set[int] = set()
    drawn: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                labels = {id(tick.label1), id(tick.label2)}
                every |= labels
                if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    drawn |= labels
    return every, drawn


def _assert_laid_out(fig: Any) -> None:
    """Every visible text inside the figure, and no two texts overlapping."""
    from matplotlib.text import Text

    renderer = _svg_renderer(fig)
    all_ticks, drawn_ticks = _drawn_tick_labels(fig)
    boxes = []
    for artist in fig.findobj(Text):
        if not artist.get_visible() or not artist.get_text().strip():
            continue
        if artist.axes is not None and not artist.axes.get_visible():
            continue
        if id(artist) in all_ticks and id(artist) not in drawn_ticks:
            continue
        boxes.append((artist.get_text(), artist.get_window_extent(renderer)))
    figure = fig.bbox
    for text, box in boxes:
        assert box.x0 >= figure.x0 - 0.5 and box.x1 <= figure.x1 + 0.5, f"{text!r} leaves the figure sideways: {box}"
        assert box.y0 >= figure.y0 - 0.5 and box.y1 <= figure.y1 + 0.5, f"{text!r} leaves the figure: {box}"
    for (text_a, a), (text_b, b) in itertools.combinations(boxes, 2):
        overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_x <= 0.5 or overlap_y <= 0.5, f"{text_a!r} overlaps {text_b!r}"


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions save, checked for layout as they are saved."""
    saved: list[Any] = []
    real = plotting.save_svg

    def save_and_keep(fig: Any, path: str | Path, **kwargs: Any) -> Path:
        out = real(fig, path, **kwargs)
        saved.append(fig)
        return out

    from auditkit.checks.adversarial import plots as adversarial
    from auditkit.checks.backdoor import plots as backdoor
    from auditkit.checks.bias import plots as bias
    from auditkit.checks.calibration import plots as calibration
    from auditkit.checks.corruption import plots as corruption
    from auditkit.checks.ood import plots as ood

    module: ModuleType
    for module in (adversarial, backdoor, bias, calibration, corruption, ood):
        monkeypatch.setattr(module, "save_svg", save_and_keep)
    return saved


def _forest_analyses(labels: dict[str, list[str]], n: int, seed: int) -> list[Any]:
    from auditkit.checks.bias import Outcomes, analyse_grouping, intersect

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    y[:2] = [0, 1]
    probs = softmax(rng.normal(size=(n, 2)) + 1.5 * np.eye(2)[y], axis=1)
    outcomes = Outcomes.from_probs(probs, y, 1)
    columns = {name: rng.choice(values, size=n) for name, values in labels.items()}
    names = list(columns)
    groupings = dict(columns)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            groupings[f"{first}×{second}"] = intersect(columns[first], columns[second])
    return [
        analyse_grouping(outcomes, values, group_by=name, min_group_size=10, n_boot=20, rng=rng)
        for name, values in groupings.items()
    ]


FOREST_CASES = {
    "demo": {"sex": ["F", "M"], "age": ["0-40", "40-65", "65-120"], "site": ["A", "B", "C"]},
    "long labels": {
        "site $x$": ["Hospital Universitario de Santiago (ES) 1", "Royal Infirmary of Edinburgh, UK <b>", "C"],
        "scanner": ["Siemens Magnetom Vida 3T, software XA50", "GE"],
    },
    "many rows": {f"column_{k}": [f"group {k}.{j}" for j in range(5)] for k in range(4)},
}


@pytest.mark.parametrize("case", list(FOREST_CASES))
def test_forest_plot_lays_out_its_labels(case: str, figures: list[Any], tmp_path: Path) -> None:
    from auditkit.checks.bias import forest_plot

    analyses = _forest_analyses(FOREST_CASES[case], 400, 0)
    forest_plot(analyses, tmp_path / "forest.svg", overall={"sensitivity": 0.8, "ece": 0.05})
    forest_plot(analyses[:1], tmp_path / "one.svg", metrics=["auroc"])
    for fig in figures:
        _assert_laid_out(fig)


def _ood_scores(detectors: list[str], sets: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = np.random.default_rng(1)
    in_scores = {d: rng.normal(1.0, 1.0, 125) for d in detectors}
    out = {d: {s: rng.normal(-0.5, 1.2, 32) for s in sets} for d in detectors}
    return in_scores, out


@pytest.mark.parametrize(
    ("detectors", "sets"),
    [
        (
            ["msp", "max_logit", "energy", "mahalanobis", "knn"],
            ["builtin:noise", "builtin:blank", "builtin:other_modality"],
        ),
        (["msp"], [f"ood:an_external_site_with_a_long_name_{i}" for i in range(8)]),
        (["msp", "knn"], ["builtin:noise"]),
    ],
)
def test_ood_figures_lay_out_their_legends(
    detectors: list[str], sets: list[str], figures: list[Any], tmp_path: Path
) -> None:
    from auditkit.checks.ood import roc_curves, score_histograms

    in_scores, out_scores = _ood_scores(detectors, sets)
    score_histograms(in_scores, out_scores, {detectors[0]: 0.0}, tmp_path / "h.svg")
    roc_curves(in_scores, out_scores, tmp_path / "r.svg")
    assert len(figures) == 2
    for fig in figures:
        _assert_laid_out(fig)
        assert len(fig.axes) == len(detectors)  # no hidden panel


def test_histograms_take_an_infinite_threshold(figures: list[Any], tmp_path: Path) -> None:
    from auditkit.checks.ood import score_histograms

    in_scores = {"knn": np.r_[np.linspace(0.0, 1.0, 10), np.full(5, -np.inf)]}
    out_scores = {"knn": {"a": np.linspace(-1.0, 0.5, 5)}}
    score_histograms(in_scores, out_scores, {"knn": -np.inf}, tmp_path / "inf.svg")
    (ax,) = figures[0].axes
    assert ax.get_xlim() == pytest.approx((-1.1, 1.1))


def test_the_other_figures_lay_out_their_labels(figures: list[Any], tmp_path: Path) -> None:
    from auditkit.checks.adversarial import L2_EPS, LINF_EPS, robust_accuracy_plot
    from auditkit.checks.backdoor.plots import trigger_figure
    from auditkit.checks.backdoor.trigger import TriggerResult
    from auditkit.checks.calibration import reliability_diagram
    from auditkit.checks.corruption import CORRUPTIONS, severity_plot

    rng = np.random.default_rng(2)
    linf = {a: {e: 0.9 - 2 * e for e in LINF_EPS} for a in ("fgsm", "pgd_linf", "square", "autoattack")}
    l2 = {a: {e: 0.9 - e / 2 for e in L2_EPS} for a in ("pgd_l2", "cw_l2")}
    cis = {(a, e): (v - 0.1, v + 0.1) for a, c in {**linf, **l2}.items() for e, v in c.items()}
    robust_accuracy_plot({**linf, **l2}, 0.95, tmp_path / "a.svg", n=48, cis=cis)
    robust_accuracy_plot(linf, 0.95, tmp_path / "b.svg", n=48)
    severity_plot({name: {s: 0.9 - s / 10 for s in range(1, 6)} for name in CORRUPTIONS}, 0.95, tmp_path / "c.svg", n=9)
    probs = softmax(rng.normal(0, 2, (125, 2)), axis=1)
    labels = (rng.uniform(size=125) < probs[:, 1]).astype(int)
    reliability_diagram(probs, labels, 15, tmp_path / "d.svg", probs_after=softmax(np.log(probs) / 2, axis=1))
    mask = np.zeros((16, 16), np.float32)
    mask[10:14, 10:14] = 1.0

    def trigger(target: int) -> TriggerResult:
        return TriggerResult(target, mask, np.ones((1, 16, 16), np.float32), 16.0, 0.9, True, 10, 0.1)

    trigger_figure(
        [("pleural effusion with a long class name", trigger(0), 1.5, True), ("normal", trigger(1), None, False)],
        tmp_path / "e.svg",
    )
    assert len(figures) == 5
    for fig in figures:
        _assert_laid_out(fig)


def test_figures_keep_text_as_text_in_one_font_and_no_date(tmp_path: Path) -> None:
    from auditkit.checks.corruption import severity_plot

    svg = severity_plot({"blur": {1: 0.8}}, 0.9, tmp_path / "s.svg", n=10).read_text()
    # Text stays text (a glyph per <use> made the PDF's drawing twice as slow), in the report's font.
    assert "<text" in svg and "DejaVu Sans" in svg
    assert "<dc:date>" not in svg


def test_shared_figure_helpers_leave_rcparams_alone() -> None:
    import matplotlib

    before = dict(matplotlib.rcParams)
    with figure_style("t", hashsalt="t", font_size=5.0):
        assert matplotlib.rcParams["font.size"] == 5.0
    assert dict(matplotlib.rcParams) == before
