"""A small headless-Chromium driver over the Chrome DevTools Protocol (CDP), for testing report.html.

The report is meant to be read in a browser as well as printed; this module lets a test (or
``scripts/report_screenshots.py``) open it in a real Chromium and look at what a reader sees::

    from auditkit.reports.browser import Browser, find_chromium

    executable = find_chromium()
    with Browser(executable) as browser:
        browser.open(bundle / "report.html")
        assert browser.evaluate("document.querySelector('.verdict').textContent").strip()
        browser.screenshot(tmp / "first-screen.png")
        assert not browser.console_errors
        assert not browser.foreign_requests()

How it works: Chromium starts headless with ``--remote-debugging-port=0``, so it picks a free port
itself and prints ``DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID`` on stderr; the
driver reads that line (a thread drains stderr for the life of the process, so Chromium never blocks
on a full pipe), connects one synchronous websocket (the ``websocket-client`` package) to the
browser endpoint, creates a fresh page with ``Target.createTarget`` and attaches to it with
``Target.attachToTarget(flatten=True)``: every page command then carries that ``sessionId`` over the
same socket, and events of other targets are ignored. Nothing but the standard library and
``websocket-client`` (a ``dev`` extra, imported only when a browser starts) is needed; no Playwright,
no Selenium.

Every wait has a deadline (``timeout`` seconds, 30 by default) and fails with :class:`BrowserError`
saying what it waited for. On exit the whole process group of Chromium is ended and its temporary
profile folder removed.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import websocket

__all__ = [
    "CHROMIUM_NAMES",
    "Browser",
    "BrowserError",
    "ConsoleMessage",
    "JavaScriptError",
    "Request",
    "find_chromium",
]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
"""Executable names :func:`find_chromium` looks for on ``PATH``, in this order."""

_DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")
_STDERR_TAIL = 40


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable on ``PATH``, or ``None`` when there is none."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    """Chromium did not start, a CDP command failed, or a wait ran past its deadline."""


class JavaScriptError(BrowserError):
    """An expression passed to :meth:`Browser.evaluate` threw."""


@dataclass(frozen=True)
class ConsoleMessage:
    """A console error or an uncaught exception seen on the page.

    ``source`` is ``console`` (``console.error``), ``exception`` (uncaught) or the ``Log`` domain's
    source (``security`` for a Content-Security-Policy violation, ``network``, ``javascript``, ...).
    """

    source: str
    text: str
    url: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = self.url if self.line is None else f"{self.url}:{self.line}"
        return f"[{self.source}] {self.text}" + (f" ({where})" if self.url else "")


@dataclass(frozen=True)
class Request:
    """A request the page started (``Network.requestWillBeSent``)."""

    url: str
    resource_type: str = ""

    def __repr__(self) -> str:  # data: URIs of figures run to megabytes
        return f"Request({_shorten(self.url, 120)!r}, {self.resource_type!r})"


@dataclass
class _Session:
    """What the driver has collected from the page's events."""

    console_errors: list[ConsoleMessage] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


class Browser:
    """A headless Chromium with one page, driven over CDP; use it as a context manager.

    ``width`` x ``height`` is the page's viewport in CSS pixels (device scale factor 1), so a
    screenshot is exactly ``width`` x ``height`` pixels. ``timeout`` bounds every wait, in seconds.
    Console errors and uncaught exceptions accumulate in :attr:`console_errors`, every request the
    page starts in :attr:`requests`, over the life of the browser (across :meth:`open` calls).
    """

    def __init__(self, executable: str, *, width: int = 1280, height: int = 800, timeout: float = 30.0) -> None:
        self.executable = executable
        self.width = width
        self.height = height
        self.timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._profile: Path | None = None
        self._ws: websocket.WebSocket | None = None
        self._session_id: str | None = None
        self._next_id = 0
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1_000)
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self._collected = _Session()
        self._opened: Path | None = None

    # ------------------------------------------------------------------------------------------
    # Life cycle

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start Chromium, connect to it and attach to a fresh page with the viewport set."""
        import websocket  # the dev extra ``websocket-client``; imported here so find_chromium needs nothing

        self._profile = Path(tempfile.mkdtemp(prefix="auditkit-chromium-"))
        args = [
            self.executable,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--mute-audio",
            "about:blank",
        ]
        try:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: close() ends Chromium's helpers too
            )
        except OSError as error:
            raise BrowserError(f"cannot start {self.executable}: {error}") from error
        url = self._devtools_url()
        try:
            self._ws = websocket.create_connection(url, timeout=self.timeout, suppress_origin=True)
        except (OSError, websocket.WebSocketException) as error:
            raise BrowserError(f"cannot connect to {self.executable}'s DevTools endpoint {url}: {error}") from error
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False)
        self._session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )

    def close(self) -> None:
        """End Chromium (politely, then by signal to its process group) and remove its profile folder."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.settimeout(2)
                self._send_raw("Browser.close", {}, session=False)
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        process, self._process = self._process, None
        if process is not None:
            _end_process_group(process)
            if process.stderr is not None:
                process.stderr.close()
        profile, self._profile = self._profile, None
        if profile is not None:
            for _ in range(5):  # a helper may still be writing into the profile for a moment
                shutil.rmtree(profile, ignore_errors=True)
                if not profile.exists():
                    break
                time.sleep(0.2)

    def _devtools_url(self) -> str:
        """Read stderr until the ``DevTools listening on ws://...`` line; keep draining it afterwards."""
        assert self._process is not None and self._process.stderr is not None
        lines: queue.Queue[str | None] = queue.Queue()
        stderr = self._process.stderr
        tail = self._stderr_tail
        found = threading.Event()

        def drain() -> None:
            for raw in iter(stderr.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                tail.append(line)  # the last lines, for error messages
                if not found.is_set():
                    lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, name="chromium-stderr", daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(
                    f"{self.executable} printed no 'DevTools listening on ws://...' line within {self.timeout:g} s"
                    f"{self._stderr_summary()}"
                )
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self._process.wait(timeout=self.timeout)
                raise BrowserError(
                    f"{self.executable} exited (code {code}) before printing its DevTools URL{self._stderr_summary()}"
                )
            match = _DEVTOOLS_LINE.search(line)
            if match:
                found.set()
                return match.group(1)

    def _stderr_summary(self) -> str:
        if not self._stderr_tail:
            return "; it wrote nothing on stderr"
        return "; last lines on stderr:\n  " + "\n  ".join(self._stderr_tail)

    # ------------------------------------------------------------------------------------------
    # Protocol

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one CDP command (to the page unless ``session=False``) and return its result.

        Waits ``timeout`` seconds (default: the browser's) for the reply. Events that arrive meanwhile
        are recorded and, except the ``Network`` domain's, kept for :meth:`wait_for_event`.
        """
        message_id = self._send_raw(method, params or {}, session=session)
        message = self._receive(lambda m: m.get("id") == message_id, f"the reply to {method}", timeout=timeout)
        if "error" in message:
            error = message["error"]
            raise BrowserError(f"{method} failed: {error.get('message', error)} {error.get('data', '')}".rstrip())
        result: dict[str, Any] = message.get("result", {})
        return result

    def wait_for_event(
        self,
        method: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Wait for (or take an already received) page event ``method`` whose params match ``predicate``."""
        matches = self._event_matcher(method, predicate)
        for event in list(self._events):
            if matches(event):
                self._events.remove(event)
                return dict(event.get("params", {}))
        message = self._receive(matches, f"the event {method}", timeout=timeout, keep_events=False)
        return dict(message.get("params", {}))

    def _event_matcher(
        self, method: str, predicate: Callable[[dict[str, Any]], bool] | None
    ) -> Callable[[dict[str, Any]], bool]:
        def matches(message: dict[str, Any]) -> bool:
            return (
                message.get("method") == method
                and message.get("sessionId") == self._session_id
                and (predicate is None or predicate(message.get("params", {})))
            )

        return matches

    def _send_raw(self, method: str, params: dict[str, Any], *, session: bool) -> int:
        if self._ws is None:
            raise BrowserError(f"cannot send {method}: the browser is not running")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            if self._session_id is None:
                raise BrowserError(f"cannot send {method}: no page attached")
            message["sessionId"] = self._session_id
        self._ws.send(json.dumps(message))
        return self._next_id

    def _receive(
        self,
        wanted: Callable[[dict[str, Any]], bool],
        what: str,
        *,
        timeout: float | None = None,
        keep_events: bool = True,
    ) -> dict[str, Any]:
        """Read messages until one is ``wanted``; record (and, with ``keep_events``, keep) the others."""
        import websocket

        if self._ws is None:
            raise BrowserError(f"cannot wait for {what}: the browser is not running")
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{what} did not come from {self.executable} within {limit:g} s")
            self._ws.settimeout(remaining)
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (OSError, websocket.WebSocketException) as error:
                running = self._process is not None and self._process.poll() is None
                state = "" if running else f" (the browser exited{self._stderr_summary()})"
                raise BrowserError(f"lost the DevTools connection waiting for {what}: {error!r}{state}") from error
            message: dict[str, Any] = json.loads(raw)
            if "method" in message:
                self._record(message)
            if wanted(message):
                return message
            if (
                keep_events
                and "method" in message
                and message.get("sessionId") == self._session_id
                and not message["method"].startswith("Network.")  # recorded above; data: URIs are large
            ):
                self._events.append(message)

    def _record(self, message: dict[str, Any]) -> None:
        """Collect console errors, uncaught exceptions and requests of the attached page."""
        if self._session_id is None or message.get("sessionId") != self._session_id:
            return
        method = message["method"]
        params: dict[str, Any] = message.get("params", {})
        collected = self._collected
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(_remote_object_text(arg) for arg in params.get("args", []))
            frames = params.get("stackTrace", {}).get("callFrames", [])
            top = frames[0] if frames else {}
            collected.console_errors.append(
                ConsoleMessage("console", text, top.get("url", ""), _one_based(top.get("lineNumber")))
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {})
            text = exception.get("description") or details.get("text", "uncaught exception")
            collected.console_errors.append(
                ConsoleMessage("exception", text, details.get("url", ""), _one_based(details.get("lineNumber")))
            )
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                collected.console_errors.append(
                    ConsoleMessage(
                        entry.get("source", "log"),
                        entry.get("text", ""),
                        entry.get("url", ""),
                        _one_based(entry.get("lineNumber")),
                    )
                )
        elif method == "Network.requestWillBeSent":
            request = params.get("request", {})
            collected.requests.append(Request(request.get("url", ""), params.get("type", "")))

    # ------------------------------------------------------------------------------------------
    # What a test uses

    @property
    def console_errors(self) -> list[ConsoleMessage]:
        """Console errors (``console.error``, ``Log`` entries of level error) and uncaught exceptions so far."""
        return list(self._collected.console_errors)

    @property
    def requests(self) -> list[Request]:
        """Every request the page has started so far (the documents themselves included)."""
        return list(self._collected.requests)

    def foreign_requests(self, allowed: Path | None = None) -> list[Request]:
        """Requests for anything but ``data:`` URIs and the file ``allowed`` (default: the last opened).

        A self-contained report makes none: its styles, script and figures are all inline.
        """
        own = (allowed or self._opened or Path("/nonexistent")).resolve().as_uri()
        return [
            request
            for request in self._collected.requests
            if not request.url.startswith("data:") and request.url.split("#", 1)[0] != own
        ]

    def open(self, path: Path, *, timeout: float | None = None) -> None:
        """Load the local file ``path`` and wait for its ``load`` event."""
        path = Path(path).resolve()
        if not path.is_file():
            raise BrowserError(f"no file {path}")
        for event in [e for e in self._events if e.get("method") == "Page.loadEventFired"]:
            self._events.remove(event)  # a stale load event must not end the wait below
        result = self.send("Page.navigate", {"url": path.as_uri()})
        if result.get("errorText"):
            raise BrowserError(f"cannot open {path}: {result['errorText']}")
        self._opened = path
        self.wait_for_event("Page.loadEventFired", timeout=timeout)

    def evaluate(self, expression: str, *, timeout: float | None = None) -> Any:
        """Evaluate a JavaScript expression in the page and return its value (JSON-serialisable).

        Promises are awaited, for up to ``timeout`` seconds (default: the browser's). Raises
        :class:`JavaScriptError` when the expression throws; such an exception is returned by CDP, not
        reported as an uncaught one.
        """
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True, "userGesture": True}
        reply = self.send("Runtime.evaluate", params, timeout=timeout)
        details = reply.get("exceptionDetails")
        if details:
            exception = details.get("exception", {})
            text = exception.get("description") or exception.get("value") or details.get("text", "exception")
            raise JavaScriptError(f"{text}\n  in: {_shorten(expression)}")
        return reply.get("result", {}).get("value")

    def wait_until(self, expression: str, *, timeout: float | None = None, interval: float = 0.05) -> Any:
        """Evaluate ``expression`` until it is truthy and return that value (e.g. after a click scrolls)."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise BrowserError(f"still false after {limit:g} s: {_shorten(expression)} (last value {value!r})")
            time.sleep(interval)

    def click(self, selector: str) -> None:
        """Click the first element matching the CSS ``selector`` (``element.click()``); raise when none does."""
        self.evaluate(
            f"""(() => {{
                const element = document.querySelector({json.dumps(selector)});
                if (!element) throw new Error("no element matches " + {json.dumps(selector)});
                element.click();
            }})()"""
        )

    def fill(self, selector: str, text: str) -> None:
        """Set the value of the input matching ``selector`` and dispatch ``input`` and ``change`` events."""
        self.evaluate(
            f"""(() => {{
                const element = document.querySelector({json.dumps(selector)});
                if (!element) throw new Error("no element matches " + {json.dumps(selector)});
                element.focus();
                element.value = {json.dumps(text)};
                element.dispatchEvent(new Event("input", {{bubbles: true}}));
                element.dispatchEvent(new Event("change", {{bubbles: true}}));
            }})()"""
        )

    def screenshot(self, path: Path) -> Path:
        """Write a PNG of the viewport (``width`` x ``height`` pixels) to ``path``; return ``path``."""
        reply = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(reply["data"]))
        return path


def _end_process_group(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Wait for Chromium to exit (after ``Browser.close``), then TERM and, if need be, KILL its process group.

    Chromium's helpers (zygote, renderer, GPU, network service) share the group that ``Popen`` started
    with ``start_new_session``, so the group id is the browser's pid; nothing else is signalled.
    """
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(process.pid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.05)  # reap the browser itself
            if not _group_alive(process.pid):
                return


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs; zombies (exited, not yet reaped by init) do not count."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _remote_object_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type", ""))


def _one_based(line: Any) -> int | None:
    return line + 1 if isinstance(line, int) else None


def _shorten(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
