"""The HTML/PDF report: hostile strings stay text, nothing is fetched, the PDF says the verdict."""

from __future__ import annotations

import copy
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from auditkit.reports.render import build_view, parse_docstring, render_html, write_report
from auditkit.runner import RunOptions, run_audit
from auditkit.spec import load_spec


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, demo_spec: Path) -> Path:
    """A real bundle of the demo study (calibration only, to stay quick)."""
    out = tmp_path_factory.mktemp("bundle")
    run_audit(load_spec(demo_spec), RunOptions(out_dir=out, only=["calibration"]))
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
        assert "<script>" not in html and "&lt;script&gt;" in html
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
