"""The HTML/PDF report: hostile strings stay text, nothing is fetched, the PDF says the verdict."""

from __future__ import annotations

import copy
import html as html_module
import json
import re
import socket
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from pypdf import PdfReader

from auditkit.reports.render import (
    build_view,
    fmt_ci,
    fmt_count,
    fmt_number,
    metric_word,
    parse_docstring,
    pivot,
    render_html,
    select,
    write_report,
)
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, demo_spec: Path) -> Path:
    """A real bundle of the demo study (calibration only, to stay quick)."""
    out = tmp_path_factory.mktemp("bundle")
    run_audit(load_spec(demo_spec), RunOptions(out_dir=out, only=["calibration"]))
    return out


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory: pytest.TempPathFactory, demo_spec: Path) -> Path:
    """A bundle of the demo study with the quick checks that emit many per-group and per-row metrics."""
    out = tmp_path_factory.mktemp("wide")
    run_audit(load_spec(demo_spec), RunOptions(out_dir=out, only=["performance", "calibration", "bias", "leakage"]))
    return out


def _pdf_text(path: Path) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(path).pages)


def test_pdf_holds_verdict_controls_and_page_numbers(bundle: Path) -> None:
    results = json.loads((bundle / "results.json").read_text())
    reader = PdfReader(bundle / "report.pdf")
    text = _pdf_text(bundle / "report.pdf")
    pages = len(reader.pages)
    assert pages >= 8
    assert results["verdict"].upper() in text
    for control in ("GOVERN 1.1", "MAP 2.3", "MEASURE 2.5", "MEASURE 2.11", "MANAGE 4.3"):
        assert control in text
    assert f"Page 1 of {pages}" in text
    assert "Executive summary" in text and "Contents" in text
    assert "CAL-ECE" in text


def test_html_lists_all_72_subcategories(bundle: Path) -> None:
    html = (bundle / "report.html").read_text()
    results = json.loads((bundle / "results.json").read_text())
    assert len(results["controls"]) == 72
    for control in results["controls"]:
        assert f">{control['id']}<" in html


class _Listener:
    """A TCP listener on loopback that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


def _hostile(results: dict[str, Any], port: int) -> dict[str, Any]:
    evil = copy.deepcopy(results)
    script = "<script>alert('x')</script>"
    img = '<img src="file:///etc/hostname">'
    css = f"url(http://127.0.0.1:{port}/)"
    link = f'<link rel="stylesheet" href="http://127.0.0.1:{port}/x.css">'
    evil["model"]["factory"] = script
    evil["model"]["weights"] = img
    evil["model"]["classes"] = [script, img, css, link]
    evil["policy"]["name"] = f'<style>@import "http://127.0.0.1:{port}/a.css";</style>'
    for check in evil["checks"]:
        check["status"] = f'ok" style="background:{css}'
        for metric in check["metrics"]:
            if metric["labels"].get("group_by"):
                metric["labels"]["group"] = f"{img}{css}"
        check["artifacts"].append(
            {
                "name": "evil",
                "path": "../../../etc/hostname",
                "media_type": "image/svg+xml",
                "description": script,
            }
        )
        check["findings"].append({"kind": script, "detail": link})
    evil["data"]["quarantine"].append({"split": "eval", "row": 0, "reason": f"{script}{css}"})
    return evil


def test_hostile_strings_render_as_text_and_nothing_is_fetched(bundle: Path, tmp_path: Path) -> None:
    listener = _Listener()
    try:
        results = json.loads((bundle / "results.json").read_text())
        evil = _hostile(results, listener.port)
        html = render_html(evil, bundle)
        assert html.count("<script>") == 1 and "<script>alert" not in html and "&lt;script&gt;" in html
        assert '<img src="file:' not in html and "&lt;img src=&#34;file:///etc/hostname&#34;&gt;" in html
        assert '<link rel="stylesheet"' not in html
        assert f"url(http://127.0.0.1:{listener.port}/)" in html  # shown as text only
        assert 'style="background' not in html
        assert "st-unknown" in html  # a tampered status gets no class of its own
        target = tmp_path / "evil"
        target.mkdir()
        (target / "artifacts").symlink_to(bundle / "artifacts")
        files = write_report(target, evil, pdf=True)
        assert files.pdf is not None and files.pdf.stat().st_size > 10_000
        text = _pdf_text(files.pdf)
        assert "<script>alert('x')</script>" in text.replace("\n", "")
    finally:
        listener.close()
    assert listener.connections == 0


def test_artifacts_outside_the_bundle_are_never_embedded(bundle: Path) -> None:
    results = json.loads((bundle / "results.json").read_text())
    results["checks"][0]["artifacts"] = [
        {"name": "x", "path": "../../../../etc/hostname", "media_type": "image/svg+xml"}
    ]
    view = build_view(results, bundle)
    assert view["checks"][0]["figures"] == []


def test_docstring_sections_become_method_and_limitations() -> None:
    doc = parse_docstring(
        """Summary line.

        Method: does a thing (Someone et al. 2020).

        Metrics:
            ``x.y``

        Limitations:
            - first caveat
            - second caveat

        NIST AI RMF 1.0: MEASURE 2.5.
        """
    )
    assert doc.summary == "Summary line."
    assert doc.method == ["Method: does a thing (Someone et al. 2020)."]
    assert doc.limitations == ["first caveat", "second caveat"]
    assert doc.informs == "MEASURE 2.5."


def test_small_counts_print_as_less_than_five() -> None:
    from auditkit.reports.render import fmt_count

    assert [fmt_count(n) for n in (0, 1, 4, 5, 1234)] == ["0", "<5", "<5", "5", "1,234"]


# --------------------------------------------------------------------------- pivot tables
class _PivotTables(HTMLParser):
    """The ``table.pivot`` tables of a report, each under its ``h3`` title: flattened column
    headings (``(group, column)`` or ``(column,)``), and body rows as (row heads, cell texts) with a
    blank head carried down from the row above (the report prints a repeated head once)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, Any]] = {}
        self._title = ""
        self._in_h3 = False
        self._table: dict[str, Any] | None = None
        self._section = ""
        self._row: list[tuple[str, str, dict[str, str]]] = []
        self._cell: list[str] | None = None
        self._attrs: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "h3":
            self._in_h3, self._title = True, ""
        elif tag == "table" and "pivot" in found.get("class", "").split():
            self._table = {"header": [], "rows": []}
        elif self._table is not None and tag in ("thead", "tbody"):
            self._section = tag
        elif self._table is not None and tag == "tr":
            self._row = []
        elif self._table is not None and tag in ("th", "td"):
            self._cell, self._attrs = [], found
        elif self._cell is not None and tag == "br":
            self._cell.append(" ")

    def handle_data(self, data: str) -> None:
        if self._in_h3:
            self._title += data
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "h3":
            self._in_h3 = False
        elif self._cell is not None and tag in ("th", "td"):
            self._row.append((tag, " ".join("".join(self._cell).split()), self._attrs))
            self._cell = None
        elif self._table is not None and tag == "tr":
            self._table["header" if self._section == "thead" else "rows"].append(self._row)
        elif self._table is not None and tag == "table":
            self.tables[self._title.strip()] = _flatten(self._table)
            self._table = None


def _flatten(table: dict[str, Any]) -> dict[str, Any]:
    header = table["header"]
    columns: list[tuple[str, ...]] = []
    second = iter(text for _, text, _ in header[1]) if len(header) > 1 else iter(())
    for _, text, attrs in header[0]:
        for _ in range(int(attrs.get("colspan") or 1)):
            columns.append((text, next(second)) if "colspan" in attrs else (text,))
    rows = []
    previous: list[str] = []
    for row in table["rows"]:
        heads = [text for tag, text, _ in row if tag == "th"]
        heads = [h or (previous[i] if i < len(previous) else "") for i, h in enumerate(heads)]
        previous = heads
        rows.append((tuple(heads), [text for tag, text, _ in row if tag == "td"]))
    n_heads = len(rows[0][0]) if rows else 0
    return {"columns": columns[n_heads:], "rows": rows}


def _pivots(html: str) -> dict[str, dict[str, Any]]:
    parser = _PivotTables()
    parser.feed(html)
    return parser.tables


def _cell(table: dict[str, Any], heads: tuple[str, ...], column: tuple[str, ...]) -> str:
    index = table["columns"].index(column)
    matches = [cells[index] for row_heads, cells in table["rows"] if row_heads == heads]
    assert len(matches) == 1, (heads, column, table["rows"])
    return str(matches[0])


def _assert_shows(cell: str, metric: dict[str, Any]) -> None:
    """The cell holds the metric's value first, its 95% interval last (or a dash if undefined)."""
    if metric["value"] is None:
        assert cell == "—", (cell, metric)
        return
    assert cell.split()[0] == fmt_number(metric["value"]), (cell, metric)
    if metric["ci"]:
        assert cell.endswith(fmt_ci(metric["ci"])), (cell, metric)


def _quick_study(maker: Any, root: Path, only: list[str]) -> Path:
    """A tiny real audit (HTML only) of a study from tests/test_tasks.py, with small bootstraps."""
    spec_path = maker(root)
    spec = yaml.safe_load(spec_path.read_text())
    spec["checks"] = {c: {"n_boot": 200} for c in only}
    spec["checks"]["bias"] = {"n_boot": 200, "min_group_size": 10}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = root / "audit"
    run_audit(load_spec(spec_path), RunOptions(out_dir=out, only=only, pdf=False))
    return out


@pytest.fixture(scope="module")
def multilabel_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_tasks import make_multilabel_study

    return _quick_study(make_multilabel_study, tmp_path_factory.mktemp("ml"), ["performance", "calibration", "bias"])


@pytest.fixture(scope="module")
def regression_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_tasks import make_regression_study

    return _quick_study(make_regression_study, tmp_path_factory.mktemp("reg"), ["performance", "bias"])


def _check(results: dict[str, Any], check_id: str) -> dict[str, Any]:
    return next(c for c in results["checks"] if c["id"] == check_id)


def test_multilabel_performance_and_calibration_pivot_by_label(multilabel_bundle: Path) -> None:
    results = json.loads((multilabel_bundle / "results.json").read_text())
    html = (multilabel_bundle / "report.html").read_text()
    tables = _pivots(html)
    performance = tables["Performance per label"]
    # NPV is undefined for every label here: its column is left out and named (below)
    assert [c[0] for c in performance["columns"]] == [
        "AUROC", "AUPRC", "Sensitivity", "Specificity", "PPV", "Known", "Unknown"
    ]  # fmt: skip
    assert [heads for heads, _ in performance["rows"]] == [("centre",), ("border",)]
    shown = 0
    for metric in _check(results, "performance")["metrics"]:
        if set(metric["labels"]) == {"label"} and metric["name"] != "performance.npv":
            column = (metric_word(metric["name"].split(".")[1]),)
            _assert_shows(_cell(performance, (metric["labels"]["label"],), column), metric)
            shown += 1
    assert shown == 10
    assert "Columns left out because none of their values is defined: NPV." in html
    counts = results["data"]["splits"]["eval"]["class_counts"]["border"]
    assert (
        _cell(performance, ("border",), ("Known",))
        == f"{counts['positive'] + counts['negative']} ({counts['positive']} pos.)"
    )
    assert _cell(performance, ("border",), ("Unknown",)) == str(counts["unknown"]) == "1"
    # NPV is undefined for both labels here (every known case called positive): one line, no listing
    npv = [m for m in _check(results, "performance")["metrics"] if m["name"] == "performance.npv"]
    assert all(m["value"] is None for m in npv)
    assert "2 values undefined: undefined for centre: the model called every known case" in html
    assert "listed with their reasons in metrics.csv" in html
    assert f'<span class="muted">undefined: {npv[0]["reason"]}' not in html  # no listing row
    macro = next(m for m in _check(results, "performance")["metrics"] if m["name"] == "performance.macro_auroc")
    assert f"Macro AUROC</strong>: {fmt_number(macro['value'])} {fmt_ci(macro['ci'])}" in html

    calibration = tables["Calibration per label"]
    by_group = tables["Calibration per group and label"]
    for metric in _check(results, "calibration")["metrics"]:
        labels = metric["labels"]
        word = metric_word(metric["name"].split(".")[1])
        if set(labels) == {"label"}:
            _assert_shows(_cell(calibration, (labels["label"],), (word,)), metric)
        elif metric["value"] is not None:
            _assert_shows(_cell(by_group, (labels["group_by"], labels["group"]), (word, labels["label"])), metric)
    # the failing per-label ECE rule marks its cell
    rule = next(r for r in results["rules"] if r["id"] == "CAL-ECE-LABEL")
    assert rule["status"] == "fail"
    assert "FAIL" in _cell(calibration, (rule["labels"]["label"],), ("ECE",)).split()


def test_multilabel_bias_pivots_group_by_label(multilabel_bundle: Path) -> None:
    results = json.loads((multilabel_bundle / "results.json").read_text())
    html = (multilabel_bundle / "report.html").read_text()
    tables = _pivots(html)
    gaps = tables["Largest gap between the groups of each grouping, per label"]
    per_group = next(t for title, t in tables.items() if title.startswith("Per group and label"))
    assert gaps["columns"] == [("sex",)]
    left_out = re.findall(r"Rows left out because none of their values is defined: ([^<]*)</p>", html)[0]
    checked = {"gap": 0, "group": 0, "underdiagnosis": 0}
    for metric in _check(results, "bias")["metrics"]:
        labels, name = metric["labels"], metric["name"]
        if name == "bias.max_gap" and "label" in labels:
            heads = (metric_word(labels["metric"]), labels["label"])
            if metric["value"] is None and heads not in [h for h, _ in gaps["rows"]]:
                assert " · ".join(heads) in left_out  # a row with no defined value is named, not shown
            else:
                _assert_shows(_cell(gaps, heads, ("sex",)), metric)
            checked["gap"] += 1
        elif name == "bias.group_metric" and labels["metric"] in ("sensitivity", "specificity"):
            column = (metric_word(labels["metric"]), labels["label"])
            _assert_shows(_cell(per_group, (labels["group_by"], labels["group"]), column), metric)
            checked["group"] += 1
        elif name == "bias.underdiagnosis_rate":
            column = ("Underdiagnosis rate", "all labels")
            _assert_shows(_cell(per_group, (labels["group_by"], labels["group"]), column), metric)
            checked["underdiagnosis"] += 1
    assert checked == {"gap": 14, "group": 8, "underdiagnosis": 2}
    underdiagnosis = [m for m in _check(results, "bias")["metrics"] if m["name"] == "bias.underdiagnosis_rate"]
    assert all(m["value"] is not None and m["ci"] for m in underdiagnosis)  # values with intervals
    # the other per-group values are counted, not listed
    assert "bias.group_metric {group, group_by, label, metric}" in html
    assert "are not printed here; they are in metrics.csv" in html
    assert html.count("<td>bias.group_metric</td>") == 0


def test_regression_pivots_by_output_with_units(regression_bundle: Path) -> None:
    results = json.loads((regression_bundle / "results.json").read_text())
    html = (regression_bundle / "report.html").read_text()
    tables = _pivots(html)
    performance = tables["Performance per output"]
    assert [c[0] for c in performance["columns"]] == ["MAE", "RMSE", "Mean error", "R²", "n"]
    metrics = _check(results, "performance")["metrics"]
    assert {m["name"] for m in metrics} == {f"performance.{m}" for m in ("mae", "rmse", "mean_error", "r2")}
    for metric in metrics:  # one output: no output label, the row is named from model.classes
        _assert_shows(_cell(performance, ("brightness (%)",), (metric_word(metric["name"].split(".")[1]),)), metric)
    assert _cell(performance, ("brightness (%)",), ("n",)) == str(metrics[0]["n"])
    assert "Bland-Altman, brightness: mean difference (prediction - target)" in html

    errors = tables["Error per group"]
    gaps = tables["Largest gap between the groups of each grouping"]
    seen = 0
    for metric in _check(results, "bias")["metrics"]:
        labels = metric["labels"]
        if metric["name"] == "bias.group_metric":
            cell = _cell(
                errors, (labels["group_by"], labels["group"]), ("brightness (%)", metric_word(labels["metric"]))
            )
            if labels["metric"] == "n":
                assert cell == fmt_count(int(metric["value"]))
            else:
                _assert_shows(cell, metric)
            seen += 1
        elif metric["name"] == "bias.max_gap":
            _assert_shows(_cell(gaps, (labels["group_by"],), ("brightness (%)", metric_word(labels["metric"]))), metric)
            seen += 1
    assert seen == 2 * 3 + 3  # two sites x (n, MAE, mean error); gaps in MAE, mean error, MAE ratio


RARE_REASON = "no positive case of rare in eval"


def _synthetic_multilabel(results: dict[str, Any]) -> dict[str, Any]:
    """The multi-label results with a label that has no positive case and a hostile label name."""
    evil = copy.deepcopy(results)
    performance = _check(evil, "performance")
    for metric in performance["metrics"]:
        if metric["labels"].get("label") == "border":
            metric["labels"]["label"] = "<script>alert(1)</script>"
    for name in ("auroc", "auprc", "sensitivity", "ppv", "npv", "specificity"):
        performance["metrics"].append(
            {"name": f"performance.{name}", "labels": {"label": "rare"}, "value": None, "ci": None, "n": 40,
             "direction": "higher_is_better", "reason": RARE_REASON}
        )  # fmt: skip
    return evil


def test_undefined_rows_aggregate_into_one_line_and_labels_stay_text(multilabel_bundle: Path) -> None:
    results = _synthetic_multilabel(json.loads((multilabel_bundle / "results.json").read_text()))
    html = render_html(results, multilabel_bundle)
    performance = _pivots(html)["Performance per label"]
    assert [heads for heads, _ in performance["rows"]] == [("centre",), ("<script>alert(1)</script>",)]
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Rows left out because none of their values is defined: rare." in html
    assert "8 values undefined: " in html  # 2 NPVs + the 6 figures of ``rare``, one line
    assert f"{RARE_REASON} (6)" in html
    assert f'<span class="muted">undefined: {RARE_REASON}' not in html  # no listing row


def test_pivot_orders_by_first_appearance_and_keeps_one_metric_per_cell() -> None:
    def m(name: str, value: float, **labels: str) -> dict[str, Any]:
        return {"name": name, "labels": labels, "value": value, "ci": None, "n": 1}

    metrics = [
        m("bias.max_gap", 0.1, metric="sensitivity", group_by="sex", label="b"),
        m("bias.max_gap", 0.2, metric="sensitivity", group_by="age", label="a"),
        m("bias.max_gap", 0.3, metric="auroc", group_by="sex", label="a"),
        m("bias.max_gap", 0.9, metric="auroc", group_by="sex", label="a"),  # a second for one cell
        m("bias.max_gap", 0.5, metric="auroc", group_by="sex"),  # other label keys: not selected
    ]
    rows, cols, cells = pivot(
        metrics, [select("bias.max_gap", "group_by", "label", "metric")], ("measure", "label"), ("group_by",)
    )
    assert rows == [("sensitivity", "b"), ("sensitivity", "a"), ("auroc", "a")]
    assert cols == [("sex",), ("age",)]
    assert cells[(("auroc", "a"), ("sex",))]["value"] == 0.3
    assert len(cells) == 3


def test_classification_sections_lead_with_pivots_and_every_figure_is_traceable(wide_bundle: Path) -> None:
    from auditkit.reports.render import fmt_number

    bundle = wide_bundle
    results = json.loads((bundle / "results.json").read_text())
    assert results["model"].get("task", "classification") == "classification"
    view = build_view(results, bundle)
    by_id = {check["record"]["id"]: check for check in view["checks"]}
    titles = {cid: [p["title"] for p in check["pivots"]] for cid, check in by_id.items()}
    assert "Per group" in titles["bias"] and "Largest gap between the groups of each grouping" in titles["bias"]
    assert "Performance on the eval split" in titles["performance"]
    # Undefined values are aggregated into one line per table, never listed row by row.
    for check in view["checks"]:
        assert all(metric.get("value") is not None for table in check["tables"] for metric in table["rows"])
        for table in check["pivots"]:
            assert all(not all(cell["undefined"] for cell in row["cells"] if cell["text"]) for row in table["rows"])
    html = render_html(results, bundle)
    assert 'class="grid small pivot"' in html
    for check in results["checks"]:  # every defined figure that is not summarised is printed somewhere
        for metric in check["metrics"]:
            summarised = metric["name"] == "bias.group_metric" and metric["labels"]["metric"] in (
                "n",
                "prevalence",
                "selection_rate",
            )
            if metric["value"] is None or summarised:
                continue
            assert f">{fmt_number(metric['value'])}" in html, (check["id"], metric)


def test_the_method_leaves_out_other_tasks_paragraphs() -> None:
    from auditkit.reports.render import method_for_task

    paragraphs = [
        "Method: the eval split is cut by every group column.",
        "Multi-label models (model.task: multilabel): per label.",
        "Regression models (model.task: regression): MAE per group.",
        "Segmentation models (model.task: segmentation): Dice per class.",
        "Small groups: a group below the minimum is insufficient.",
        "Multi-label and regression findings add bootstrap.",
    ]
    assert method_for_task(paragraphs, "classification") == [paragraphs[0], paragraphs[4]]
    assert method_for_task(paragraphs, "regression") == [paragraphs[0], paragraphs[2], paragraphs[4], paragraphs[5]]
    assert method_for_task(paragraphs, "multilabel") == [paragraphs[0], paragraphs[1], paragraphs[4], paragraphs[5]]


def test_the_page_forbids_the_network_and_runs_only_its_own_script(bundle: Path) -> None:
    import base64
    import hashlib
    from importlib import resources

    html = render_html(json.loads((bundle / "results.json").read_text()), bundle)
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', html)
    assert policy is not None
    content = html_module.unescape(policy.group(1))
    directives = dict(part.strip().split(" ", 1) for part in content.split(";"))
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 1
    packaged = (resources.files("auditkit.reports") / "static" / "report.js").read_text(encoding="utf-8")
    assert scripts[0] == packaged
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert directives["script-src"] == f"'sha256-{digest}'"


def test_many_labels_move_into_the_rows(multilabel_bundle: Path) -> None:
    """Five labels x two metrics would be ten value columns: the label becomes a row key instead."""
    results = copy.deepcopy(json.loads((multilabel_bundle / "results.json").read_text()))
    bias = _check(results, "bias")
    labels = [f"finding{i}" for i in range(5)]
    metrics: list[dict[str, Any]] = []
    for g, group in enumerate(("F", "M")):
        for k, label in enumerate(labels):
            for j, measure in enumerate(("sensitivity", "specificity")):
                value = 0.5 + 0.01 * k + 0.1 * j + 0.2 * g
                metrics.append(
                    {"name": "bias.group_metric", "value": value, "ci": [value - 0.05, value + 0.05], "n": 40,
                     "labels": {"metric": measure, "group_by": "sex", "group": group, "label": label},
                     "direction": "higher_is_better"}
                )  # fmt: skip
        metrics.append(
            {"name": "bias.underdiagnosis_rate", "value": 0.1 + g, "ci": [0.05, 0.2 + g], "n": 40,
             "labels": {"group_by": "sex", "group": group}, "direction": "lower_is_better"}
        )  # fmt: skip
    bias["metrics"] = metrics
    html = render_html(results, multilabel_bundle)
    table = next(t for title, t in _pivots(html).items() if title.startswith("Per group and label"))
    assert table["columns"] == [("Sensitivity",), ("Specificity",), ("Underdiagnosis rate",)]
    for metric in metrics:
        ml = metric["labels"]
        if metric["name"] == "bias.group_metric":
            _assert_shows(_cell(table, ("sex", ml["group"], ml["label"]), (metric_word(ml["metric"]),)), metric)
        else:
            _assert_shows(_cell(table, ("sex", ml["group"], "all labels"), ("Underdiagnosis rate",)), metric)


def test_the_pdf_aggregates_undefined_values_and_hides_screen_detail(wide_bundle: Path, tmp_path: Path) -> None:
    results = json.loads((wide_bundle / "results.json").read_text())
    undefined = sum(m["value"] is None for check in results["checks"] for m in check["metrics"])
    assert undefined > 20  # a 60-patient study has many groups below the minimum size
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "artifacts").symlink_to(wide_bundle / "artifacts")
    files = write_report(target, results, pdf=True)
    assert files.pdf is not None
    text = re.sub(r"\s+", " ", _pdf_text(files.pdf))
    # Every "undefined: <reason>" the PDF prints is a count with its reasons, never a row of its own.
    found = list(re.finditer(r"undefined:", text))
    assert found
    for match in found:
        before = text[max(0, match.start() - 40) : match.start()]
        assert re.search(r"\d+ (further )?(value|metric)s? $", before), text[match.start() - 80 :][:160]
    # Screen-only detail stays out of the PDF and in the HTML.
    html = (target / "report.html").read_text()
    from auditkit.policy import load_framework

    unassessed = next(c["id"] for c in results["controls"] if c["status"] == "not_assessed")
    words = " ".join(load_framework().subcategories[unassessed].text.split()[:8])
    assert words in html and words not in text and unassessed in text  # named in the PDF, its text on screen
    assert "Filter rules" in html and "Filter rules" not in text
