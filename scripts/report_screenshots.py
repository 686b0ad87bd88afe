"""Screenshots of a bundle's report.html as a reader sees it at 1280x800, in headless Chromium.

    python scripts/report_screenshots.py BUNDLE_DIR [--out DIR]

Writes into DIR (default: a ``screenshots`` folder beside the bundle, e.g. ``demo-out/screenshots``;
not inside it, where ``auditkit verify`` and the pack would count the PNGs as part of the evidence):

* ``first-screen.png``: the top of the report (cover and verdict);
* ``rules-sorted.png``: after clicking the Rule header of the policy rules table;
* ``check-<n>.png``: after following the contents link to the first check with a failing rule
  (the first check when none fails).

Prints the names of the files written. Exits 2 when no Chromium (or the websocket-client package)
is available, 1 when the report cannot be driven.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from auditkit.reports.browser import CHROMIUM_NAMES, Browser, BrowserError, find_chromium

WIDTH, HEIGHT = 1280, 800

# The href of the first check section (in the contents' order) with a failing rule, else of the first
# check. A failing rule's check is the family of its metric ("calibration.ece" -> "calibration"), which
# the contents link names ("Check: calibration").
FIRST_FAILING_CHECK = r"""(() => {
    const links = Array.from(document.querySelectorAll('nav.toc a[href^="#check-"]'));
    if (!links.length) return null;
    const failing = new Set();
    for (const row of document.querySelectorAll("#rules tbody tr:not(.rationale)")) {
        const words = Array.from(row.querySelectorAll(".badge"), b => b.textContent.trim().toUpperCase());
        if (words.includes("FAIL") && row.cells.length > 2) failing.add(row.cells[2].textContent.trim().split(".")[0]);
    }
    const check = links.find(a => failing.has(a.textContent.trim().split(/\s+/).pop())) || links[0];
    return check.getAttribute("href");
})()"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="an audit bundle folder (holds report.html)")
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default: screenshots/ beside the bundle)")
    args = parser.parse_args(argv)
    report = args.bundle / "report.html"
    if not report.is_file():
        print(f"error: no {report}", file=sys.stderr)
        return 1
    executable = find_chromium()
    if executable is None:
        print(
            f"error: no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); "
            "install it, e.g. apt-get install chromium",
            file=sys.stderr,
        )
        return 2
    try:
        import websocket  # noqa: F401
    except ImportError:
        print("error: the websocket-client package is missing: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    out: Path = args.out or args.bundle.resolve().parent / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    try:
        with Browser(executable, width=WIDTH, height=HEIGHT) as browser:
            for name in shoot(browser, report, out):
                print(name)
            for problem in browser.console_errors:
                print(f"warning: {problem}", file=sys.stderr)
    except BrowserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def shoot(browser: Browser, report: Path, out: Path) -> list[str]:
    """Take the three screenshots; return their file names."""
    written = []
    browser.open(report)
    browser.screenshot(out / "first-screen.png")
    written.append("first-screen.png")

    rules = browser.evaluate("!!document.querySelector('#rules table.sortable thead th')")
    if rules:
        browser.evaluate("document.getElementById('rules').scrollIntoView()")
        browser.click("#rules table.sortable thead th")
        browser.screenshot(out / "rules-sorted.png")
        written.append("rules-sorted.png")
    else:
        print("warning: no sortable rules table (#rules table.sortable): rules-sorted.png not written", file=sys.stderr)

    href = browser.evaluate(FIRST_FAILING_CHECK)
    if href:
        browser.evaluate("scrollTo(0, 0)")
        browser.click(f"nav.toc a[href={json.dumps(href)}]")
        browser.wait_until(f"location.hash === {json.dumps(href)}", timeout=5)
        with contextlib.suppress(BrowserError):  # a smooth scroll still on its way
            top = f"document.getElementById({json.dumps(href[1:])}).getBoundingClientRect().top"
            browser.wait_until(f"Math.abs({top}) < 100", timeout=2)
        name = f"{href[1:]}.png"  # check-<n>.png
        browser.screenshot(out / name)
        written.append(name)
    else:
        print("warning: the contents link no check section: check-<n>.png not written", file=sys.stderr)
    return written


if __name__ == "__main__":
    sys.exit(main())
