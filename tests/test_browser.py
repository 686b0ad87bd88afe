"""report.html in a real headless Chromium, over the DevTools protocol (auditkit.reports.browser).

What a reader of the HTML report sees at 1280x800: the verdict in the first screen, a contents
sidebar whose links land on their sections, the policy rules table sortable (rule rows keep their
rationale rows) and filterable, every status badge with words, and nothing fetched from anywhere
but the file itself (figures are data: URIs) with no console error or uncaught exception.

Skipped without Chromium on PATH, unless AUDITKIT_REQUIRE_BROWSER=1 (as .ci/run sets) makes that
a failure. AUDITKIT_BROWSER_REPORT=path/to/report.html tests that report (results.json beside it)
instead of building a bundle, e.g. ``demo-out/audit/report.html``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from auditkit.reports.browser import CHROMIUM_NAMES, Browser, BrowserError, find_chromium
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec

WIDTH, HEIGHT = 1280, 800
REQUIRE = "AUDITKIT_REQUIRE_BROWSER"
REPORT = "AUDITKIT_BROWSER_REPORT"
# The quick checks (~5 s on 2 cores; corruption would add 8-16 s, ood 2-4 s, backdoor 15 s, adversarial
# 30 s): a failing rule (CAL-ECE), check sections with tables and figures, a skipped check (parity).
CHECKS = ["performance", "calibration", "bias", "leakage", "phi", "parity"]
RULES_TABLE = "#rules table.sortable"


def _executable() -> str:
    """Chromium's path; skip (or fail under AUDITKIT_REQUIRE_BROWSER=1) when it or websocket-client is missing."""
    executable: str | None = find_chromium()
    problem = None
    if executable is None:
        problem = f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})"
    else:
        try:
            import websocket  # noqa: F401
        except ImportError:
            problem = "the websocket-client package is not installed (pip install -e '.[dev]')"
    if problem is not None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{problem}, and {REQUIRE}=1 says the browser tests must run", pytrace=False)
        pytest.skip(problem)
    assert executable is not None
    return executable


@pytest.fixture(scope="session")
def chromium() -> str:
    # Session-scoped so that it is resolved (and skips) before the session's demo study is built.
    return _executable()


@pytest.fixture(scope="module")
def report(chromium: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of a real bundle of the demo study (HTML only, the quick checks); ~5 s on 2 cores."""
    if os.environ.get(REPORT):
        return Path(os.environ[REPORT]).resolve()
    out = tmp_path_factory.mktemp("browser-bundle")
    started = time.perf_counter()
    demo_spec: Path = request.getfixturevalue("demo_spec")  # the session's 60-patient demo study (~2 s)
    run_audit(load_spec(demo_spec), RunOptions(out_dir=out, only=CHECKS, pdf=False))
    print(f"browser bundle built in {time.perf_counter() - started:.1f} s")
    return out / "report.html"


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """One headless Chromium for the module: console errors and requests accumulate over every test."""
    with Browser(chromium, width=WIDTH, height=HEIGHT) as instance:
        yield instance


@pytest.fixture
def page(browser: Browser, report: Path) -> Browser:
    """The browser with a fresh load of the report (sorting and filtering undone)."""
    browser.open(report)
    return browser


def _results(report: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((report.parent / "results.json").read_text(encoding="utf-8"))
    return results


def _settle(page: Browser, condition: str, timeout: float = 5.0) -> None:
    """Give the page up to ``timeout`` s for ``condition`` (smooth scrolling, a debounced filter);
    the caller asserts on the state afterwards, so a failure shows what the page did instead."""
    with contextlib.suppress(BrowserError):
        page.wait_until(condition, timeout=timeout)


# --------------------------------------------------------------------------------------------
# The first screen


def test_first_screen_shows_the_verdict(page: Browser, report: Path, tmp_path: Path) -> None:
    shot = page.screenshot(tmp_path / "first-screen.png")
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.size == (WIDTH, HEIGHT)
        colours = image.convert("RGB").getcolors(maxcolors=WIDTH * HEIGHT)
    assert colours is not None and len(colours) > 16, "the screenshot is blank"
    state = page.evaluate(
        """(() => {
            const verdict = document.querySelector(".verdict");
            const box = verdict && verdict.getBoundingClientRect();
            return {
                viewport: [innerWidth, innerHeight], scrollY,
                text: verdict && verdict.innerText, top: box && box.top, bottom: box && box.bottom,
            };
        })()"""
    )
    assert state["viewport"] == [WIDTH, HEIGHT]
    assert state["scrollY"] == 0, "the page scrolled away from the top by itself"
    assert state["text"] is not None, "no element with class verdict"
    verdict = _results(report)["verdict"].upper()
    assert verdict in ("PASS", "FAIL") and verdict in state["text"].upper(), state["text"]
    assert state["top"] >= 0 and state["bottom"] <= HEIGHT, (
        f"the verdict spans y={state['top']:.0f}..{state['bottom']:.0f}, not inside the first {HEIGHT} px"
    )


# --------------------------------------------------------------------------------------------
# Navigation


def test_contents_links_land_on_their_sections(page: Browser) -> None:
    links: list[str] = page.evaluate(
        """Array.from(document.querySelectorAll('nav.toc a[href^="#"]'), a => a.getAttribute("href"))"""
    )
    assert "#rules" in links, f"nav.toc has no link to #rules: {links}"
    missing = page.evaluate(f"{json.dumps(links)}.filter(href => !document.getElementById(href.slice(1)))")
    assert not missing, f"nav.toc links to ids that do not exist: {missing}"
    checks = [href for href in links if href.startswith("#check-")]
    assert checks, f"nav.toc links to no check section: {links}"
    for href in ("#rules", checks[0]):
        page.evaluate("scrollTo(0, 0)")
        page.click(f'nav.toc a[href="{href}"]')
        state_js = f"""(() => {{
            const target = document.getElementById({json.dumps(href[1:])});
            const nav = document.querySelector("nav.toc").getBoundingClientRect();
            return {{hash: location.hash, top: target.getBoundingClientRect().top,
                     navOnScreen: nav.bottom > 0 && nav.top < innerHeight && nav.width > 0}};
        }})()"""
        _settle(page, f"(s => s.hash === {json.dumps(href)} && Math.abs(s.top) < 100)({state_js})")
        state = page.evaluate(state_js)
        assert state["hash"] == href
        assert abs(state["top"]) < 100, f"after following {href} its section's top is at y={state['top']:.0f}"
        assert state["navOnScreen"], f"after following {href} the contents sidebar is off screen (not sticky)"


# --------------------------------------------------------------------------------------------
# Sortable and filterable tables

RULE_GROUPS = f"""(() => {{
    const table = document.querySelector({json.dumps(RULES_TABLE)});
    if (!table) return null;
    const head = table.querySelector("thead th");
    const groups = [];
    for (const row of table.querySelectorAll("tbody tr")) {{
        if (row.classList.contains("rationale") && groups.length) groups[groups.length - 1][1] += row.textContent.trim();
        else groups.push([row.cells[0].textContent.trim(), ""]);
    }}
    const collator = new Intl.Collator(undefined, {{numeric: true, sensitivity: "base"}});
    const texts = Array.from(table.querySelectorAll("tbody tr:not(.rationale) td:first-child"), c => c.textContent.trim());
    const order = texts.slice(1).map((text, i) => Math.sign(collator.compare(texts[i], text)));
    return {{header: head.textContent.trim(), ariaSort: head.getAttribute("aria-sort"), groups, texts, order}};
}})()"""


def test_rules_table_sorts_by_rule_keeping_rationales(page: Browser) -> None:
    before = page.evaluate(RULE_GROUPS)
    assert before is not None, f"no {RULES_TABLE}"
    assert before["header"].startswith("Rule"), f"the first column is {before['header']!r}"
    assert 1 in before["order"], "the rules come in alphabetical order already: sorting would prove nothing"
    head = f"{RULES_TABLE} thead th"
    for click, direction, wrong in ((1, "ascending", 1), (2, "descending", -1)):
        page.click(head)
        _settle(
            page, f"document.querySelector({json.dumps(head)}).getAttribute('aria-sort') === {json.dumps(direction)}"
        )
        after = page.evaluate(RULE_GROUPS)
        assert after["ariaSort"] == direction, f"after click {click} aria-sort is {after['ariaSort']!r}"
        unordered = [
            (after["texts"][i], after["texts"][i + 1]) for i, sign in enumerate(after["order"]) if sign == wrong
        ]
        assert not unordered, f"rules not in {direction} order after click {click}: {unordered[:5]}"
        assert sorted(map(tuple, after["groups"])) == sorted(map(tuple, before["groups"])), (
            "sorting separated a rule from its rationale row (or lost rows)"
        )


def test_rules_filter_shows_the_rows_that_match(page: Browser, report: Path) -> None:
    table_id = page.evaluate(f"(document.querySelector({json.dumps(RULES_TABLE)}) || {{}}).id || null")
    assert table_id, f"no {RULES_TABLE} with an id"
    selector = f'input.table-filter[data-table="{table_id}"]'
    assert page.evaluate(f"!!document.querySelector({json.dumps(selector)})"), f"no {selector}"
    failing = page.evaluate(
        f"""Array.from(document.querySelectorAll({json.dumps(RULES_TABLE + " tbody tr:not(.rationale)")}))
            .filter(row => Array.from(row.querySelectorAll(".badge"), b => b.textContent.trim().toUpperCase())
                           .includes("FAIL"))
            .map(row => row.cells[0].textContent.trim())"""
    )
    expected_failing = [rule["id"] for rule in _results(report)["rules"] if rule["status"] == "fail"]
    assert expected_failing, "the fixture bundle has no failing rule to filter by"
    assert sorted(failing) == sorted(expected_failing), "the FAIL badges disagree with results.json"
    needle = failing[0]
    state_js = f"""(() => {{
        const visible = row => !(row.hidden || getComputedStyle(row).display === "none");
        const needle = {json.dumps(needle.lower())};
        const groups = [];
        for (const row of document.querySelectorAll({json.dumps(RULES_TABLE + " tbody tr")})) {{
            if (row.classList.contains("rationale") && groups.length) groups[groups.length - 1].push(row);
            else groups.push([row]);
        }}
        return groups.map(group => ({{
            rule: group[0].cells[0].textContent.trim(),
            matches: group.map(row => row.textContent).join(" ").toLowerCase().includes(needle),
            visible: visible(group[0]),
            rationaleVisible: group.slice(1).map(visible),
        }}));
    }})()"""
    page.fill(selector, needle)
    _settle(page, f"{state_js}.every(g => g.visible === g.matches)")
    groups = page.evaluate(state_js)
    shown = [g["rule"] for g in groups if g["visible"]]
    matching = [g["rule"] for g in groups if g["matches"]]
    assert needle in shown
    assert len(shown) < len(groups), f"filtering by {needle} hid nothing"
    assert shown == matching, f"filter {needle!r}: shown {shown}, rows containing it {matching}"
    split = [g["rule"] for g in groups if any(v != g["visible"] for v in g["rationaleVisible"])]
    assert not split, f"rationale rows shown or hidden apart from their rule: {split}"
    page.fill(selector, "")
    _settle(page, f"{state_js}.every(g => g.visible)")
    assert all(g["visible"] for g in page.evaluate(state_js)), "clearing the filter left rows hidden"


# --------------------------------------------------------------------------------------------
# Status in words, no network, no errors


def test_every_badge_has_text(page: Browser) -> None:
    badges = page.evaluate(
        """Array.from(document.querySelectorAll(".badge"), b => [b.className, b.textContent.trim()])"""
    )
    assert len(badges) > 10
    empty = [cls for cls, text in badges if not text]
    assert not empty, f"{len(empty)} badges say their status by colour only: {sorted(set(empty))}"


def test_no_request_leaves_the_file_and_no_console_error(page: Browser, report: Path) -> None:
    """Exercise every link, sortable header and filter, then look at everything this module's browser saw."""
    links = page.evaluate(
        """Array.from(document.querySelectorAll('nav.toc a[href^="#"]'), a => a.getAttribute("href"))"""
    )
    for href in links:
        page.click(f'nav.toc a[href="{href}"]')
        _settle(page, f"location.hash === {json.dumps(href)}")
    clicked = page.evaluate(
        """(() => {
            let n = 0;
            for (const head of document.querySelectorAll("table.sortable thead th")) { head.click(); head.click(); n += 2; }
            for (const input of document.querySelectorAll("input.table-filter")) {
                for (const value of ["a", "zzz-no-such-row", ""]) {
                    input.value = value;
                    input.dispatchEvent(new Event("input", {bubbles: true}));
                }
            }
            return n;
        })()"""
    )
    page.evaluate("new Promise(done => requestAnimationFrame(() => setTimeout(done, 100)))")  # late errors
    own = report.resolve().as_uri()
    assert any(request.url == own for request in page.requests), "the browser recorded no request for the report"
    foreign = sorted({repr(request) for request in page.foreign_requests(report)})
    assert not foreign, "the report made requests beyond its own file and data: URIs:\n" + "\n".join(foreign)
    errors = page.console_errors
    assert not errors, "console errors / uncaught exceptions:\n" + "\n".join(map(str, errors))
    assert clicked > 0, "no sortable table header to click"
