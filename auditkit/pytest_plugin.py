"""auditkit as a pytest plugin: one test item per policy rule (README, "Use in CI").

``pytest --audit SPEC`` runs the audit once per session — once in total under pytest-xdist, in
the controller, before the workers collect — or ``--audit-results DIR`` reuses a finished one.
``--audit-only``/``--audit-skip`` narrow the checks, ``--audit-policy`` and ``--audit-out``
override the spec, ``--audit-no-pdf`` skips the PDF. While the audit runs, the terminal shows
where it writes, each stage and check, and the verdict (not under ``-q``).

Items:

* ``auditkit::audit``: the audit itself. Its reported duration is the audit's own
  (``run.duration_s``), so JUnit's time and ``--durations`` include it; it fails when the run's
  coverage failed: no eval image read, a ``coverage.*`` rule failed, the coverage record errored,
  or no rule of the policy could be evaluated (a run that measured nothing must not go green).
* ``auditkit::<RULE-ID>`` per rule: fails with the observed value, the threshold, the interval
  and the AI RMF subcategories; a warn-severity rule that trips passes with a warning, its
  description on stdout and ``auditkit_status=warn`` among its JUnit properties; a rule whose
  metric is absent is skipped with the reason (``check ood not selected (only: calibration)``).
  Every rule item records its status, metric, observed value, threshold and controls as JUnit
  properties.
* ``auditkit::check:<id>``: a check that errored, failing.

Fixtures ``audit_results`` and ``audit_context`` serve a team's own assertions. The terminal
summary shows the verdict, how much of the policy was evaluated (``partial: 7 of 38 rules
evaluated; not run: ...``), the data coverage and the AI RMF subcategory counts; JUnit gets the
verdict and the evaluated text as test-suite properties.

Timing: without xdist the audit runs at the start of collection, after pytest has started its
clock, so the closing "in N s" includes it. Under xdist it must finish before the workers start,
in ``pytest_sessionstart``, which precedes the terminal's clock; there only ``auditkit::audit``
carries its time.

This module is imported by every pytest run of every user who has auditkit installed, so it
imports nothing heavy (no torch, weasyprint or torchattacks) at import time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

RESULTS_KEY = pytest.StashKey["AuditResults | None"]()
CONTEXT_KEY = pytest.StashKey[Any]()
# Whether the audit ran in this session (in this process or, under xdist, in the controller):
# only then is its duration part of this session's time.
RAN_KEY = pytest.StashKey[bool]()
WORKER_INPUT = "auditkit_results_dir"
WORKER_RAN = "auditkit_ran_audit"
RUN_LOG_ENV = "AUDITKIT_PYTEST_RUN_LOG"  # test instrumentation: one line per audit actually run
RMF_STATUSES = ("met", "not_met", "not_evaluated", "attested", "not_assessed")
RULE_STATUSES = ("pass", "warn", "fail", "not_evaluated")


class AuditRuleWarning(UserWarning):
    """A warn-severity policy rule tripped."""


@dataclass(frozen=True)
class MetricValue:
    name: str
    labels: dict[str, str]
    value: float | None
    ci: tuple[float, float] | None
    n: int | None
    direction: str
    reason: str | None = None


class AuditResults:
    """A finished audit's ``results.json`` with lookups for custom assertions.

    Example::

        def test_site_b_calibration(audit_results):
            assert audit_results.metric("calibration.ece", group="site=B").value < 0.04
    """

    def __init__(self, data: dict[str, Any], folder: Path) -> None:
        self.data = data
        self.folder = folder

    @classmethod
    def load(cls, folder: Path) -> AuditResults:
        from auditkit.errors import InputError
        from auditkit.results import load_results

        try:
            return cls(load_results(folder), folder)
        except InputError as error:
            raise pytest.UsageError(f"--audit-results: {error}") from None

    @property
    def verdict(self) -> str:
        return str(self.data.get("verdict"))

    @property
    def rules(self) -> list[dict[str, Any]]:
        return list(self.data.get("rules") or [])

    @property
    def duration_s(self) -> float | None:
        """The audit's own run time (``run.duration_s``), if recorded."""
        value = (self.data.get("run") or {}).get("duration_s")
        return float(value) if isinstance(value, int | float) else None

    @property
    def evaluated_text(self) -> str:
        """How much of the policy was judged: the engine's ``policy.evaluated.text``, or counted.

        Results written before the engine recorded it get ``"N of M rules evaluated"``.
        """
        evaluated = (self.data.get("policy") or {}).get("evaluated") or {}
        if evaluated.get("text"):
            return str(evaluated["text"])
        rules = self.rules
        done = sum(r.get("status") in ("pass", "warn", "fail") for r in rules)
        return f"{done} of {len(rules)} rules evaluated"

    @property
    def partial(self) -> bool:
        evaluated = (self.data.get("policy") or {}).get("evaluated") or {}
        selection = (self.data.get("run") or {}).get("selection") or {}
        return bool(evaluated.get("partial") or selection.get("partial"))

    def split_coverage(self) -> dict[str, dict[str, Any]]:
        """Per split: ``listed``, ``read``, ``quarantined`` (``data.coverage``, else the split summary)."""
        data = self.data.get("data") or {}
        coverage = data.get("coverage")
        if isinstance(coverage, dict) and coverage:
            return {str(k): dict(v) for k, v in coverage.items()}
        out: dict[str, dict[str, Any]] = {}
        for name, split in (data.get("splits") or {}).items():
            read, quarantined = split.get("n_images"), split.get("n_quarantined")
            if read is None or quarantined is None:
                continue
            out[str(name)] = {"listed": read + quarantined, "read": read, "quarantined": quarantined}
        return out

    def metrics(self, name: str | None = None) -> Iterator[MetricValue]:
        for check in self.data.get("checks", []):
            for m in check.get("metrics", []):
                if name is None or m["name"] == name:
                    ci = m.get("ci")
                    yield MetricValue(
                        name=m["name"],
                        labels=dict(m.get("labels") or {}),
                        value=m.get("value"),
                        ci=(ci[0], ci[1]) if ci else None,
                        n=m.get("n"),
                        direction=m.get("direction", ""),
                        reason=m.get("reason"),
                    )

    def metric(self, name: str, **labels: str) -> MetricValue:
        """The metric with exactly these labels (none: the overall value).

        ``group="site=B"`` is shorthand for ``group_by="site", group="B"``.
        """
        wanted = {k: str(v) for k, v in labels.items()}
        if "group" in wanted and "=" in wanted["group"] and "group_by" not in wanted:
            wanted["group_by"], wanted["group"] = wanted["group"].split("=", 1)
        candidates = list(self.metrics(name))
        for candidate in candidates:
            if candidate.labels == wanted:
                return candidate
        shown = sorted({json.dumps(c.labels, sort_keys=True) for c in candidates})[:10]
        raise KeyError(f"no metric {name} with labels {wanted}; available labels: {shown or 'none'}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("auditkit", "auditkit model audit")
    group.addoption(
        "--audit",
        metavar="SPEC",
        help="run the auditkit audit of SPEC once and test each policy rule",
    )
    group.addoption("--audit-results", metavar="DIR", help="test the policy rules of a finished audit in DIR")
    group.addoption("--audit-policy", metavar="POLICY", help="policy name or YAML file (overrides the spec)")
    group.addoption("--audit-only", metavar="C1,C2", help="run only these checks")
    group.addoption("--audit-skip", metavar="C1,C2", help="do not run these checks")
    group.addoption("--audit-out", metavar="DIR", help="output folder of the audit (default: the spec's)")
    group.addoption("--audit-no-pdf", action="store_true", help="do not render report.pdf (report.html still)")


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("audit") or config.getoption("audit_results"))


class _AuditConsole:
    """Lines on pytest's terminal while the audit runs: where it writes, each stage, the verdict.

    Silent under ``-q`` or without a terminal reporter, so CI logs that ask for quiet stay quiet.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.reporter: Any = config.pluginmanager.get_plugin("terminalreporter")
        self.enabled = self.reporter is not None and config.get_verbosity() >= 0
        self.started = time.perf_counter()

    def line(self, text: str, **markup: bool) -> None:
        if self.enabled:
            self.reporter.write_line(f"auditkit [{time.perf_counter() - self.started:6.1f} s] {text}", **markup)

    def progress(self, label: str, total: int) -> Callable[[int], None] | None:
        """A :data:`auditkit.context.ProgressFactory`: one line per stage, none per image."""
        self.line(f"{label}: {total} image(s)")
        return None


class _ConsoleLogHandler(logging.Handler):
    """The runner's per-check INFO lines and every auditkit warning, onto the audit console."""

    def __init__(self, console: _AuditConsole) -> None:
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "auditkit.runner" and record.levelno < logging.WARNING:
            return
        try:
            prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            self.console.line(prefix + record.getMessage(), yellow=record.levelno >= logging.WARNING)
        except Exception:  # a console problem must not break the audit
            self.handleError(record)


@contextmanager
def _console_logging(console: _AuditConsole) -> Generator[None, None, None]:
    if not console.enabled:
        yield
        return
    package, runner = logging.getLogger("auditkit"), logging.getLogger("auditkit.runner")
    handler = _ConsoleLogHandler(console)
    level = runner.level
    # The runner says "running check X" at INFO, below the default WARNING: lower its level for the
    # run only, so the user's logging configuration is as it was afterwards.
    if runner.getEffectiveLevel() > logging.INFO:
        runner.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        runner.setLevel(level)


def _split_option(value: str | None) -> list[str]:
    return [value] if value else []


def _run_audit(config: pytest.Config) -> AuditResults:
    """Run the audit in this process (imports the engine lazily)."""
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    console = _AuditConsole(config)
    spec_path = config.getoption("audit")
    spec = load_spec(spec_path)
    if config.getoption("audit_policy"):
        spec = spec.model_copy(update={"policy": config.getoption("audit_policy")})
    only, skip = _split_option(config.getoption("audit_only")), _split_option(config.getoption("audit_skip"))
    out = config.getoption("audit_out")
    log_path = os.environ.get(RUN_LOG_ENV)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()}\n")
    narrowed = "".join([f"; only {', '.join(only)}" if only else "", f"; skip {', '.join(skip)}" if skip else ""])
    console.line(f"auditing {spec_path} -> {Path(out) if out else spec.output_dir}{narrowed}", bold=True)
    options = RunOptions(
        out_dir=Path(out) if out else None,
        only=only or None,
        skip=skip,
        pdf=not config.getoption("audit_no_pdf"),
        progress=console.progress if console.enabled else None,
        argv=["pytest", "--audit", str(spec_path)],
    )
    with _console_logging(console):
        outcome = run_audit(spec, options)
    results = AuditResults(outcome.results, outcome.out_dir)
    verdict = results.verdict.upper()
    # the engine's text of a partial audit starts with "partial:"; older results need the flag
    flag = " (partial)" if results.partial and not results.evaluated_text.startswith("partial") else ""
    console.line(
        f"verdict {verdict}{flag}; {results.evaluated_text}; results: {outcome.out_dir / 'results.json'}",
        bold=True,
        red=verdict != "PASS",
        green=verdict == "PASS",
    )
    return results


def _audit_now(config: pytest.Config) -> None:
    """Run the audit; an auditkit error (bad spec, nothing readable) is a pytest usage error."""
    try:
        config.stash[RESULTS_KEY] = _run_audit(config)
        config.stash[RAN_KEY] = True
    except Exception as error:  # a usage error in the spec must read as one
        from auditkit.errors import AuditkitError

        if isinstance(error, AuditkitError):
            raise pytest.UsageError(f"--audit: {error}") from None
        raise
    _record_suite_properties(config)


def _under_xdist_controller(config: pytest.Config) -> bool:
    return config.pluginmanager.has_plugin("dsession")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    config.stash[RESULTS_KEY] = None
    config.stash[RAN_KEY] = False
    if not _enabled(config):
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller ran the audit
        config.stash[RESULTS_KEY] = AuditResults.load(Path(workerinput[WORKER_INPUT]))
        config.stash[RAN_KEY] = workerinput.get(WORKER_RAN) == "1"
        return
    if config.getoption("audit_results"):
        config.stash[RESULTS_KEY] = AuditResults.load(Path(config.getoption("audit_results")))
        _record_suite_properties(config)
        return
    # The workers are configured in xdist's own pytest_sessionstart: they need the results folder,
    # so the audit runs now. Otherwise it waits for collection, inside pytest's clock.
    if _under_xdist_controller(config):
        _audit_now(config)


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: pytest.Session) -> None:
    config = session.config
    if (
        config.getoption("audit")
        and not config.getoption("audit_results")
        and config.stash.get(RESULTS_KEY, None) is None
        and not hasattr(config, "workerinput")
    ):
        _audit_now(config)


def _record_suite_properties(config: pytest.Config) -> None:
    """The verdict and the evaluated text as JUnit test-suite properties (when --junitxml is on)."""
    results = config.stash.get(RESULTS_KEY, None)
    if results is None:
        return
    try:  # junitxml keeps its LogXML under this key; guarded, as the plugin may be disabled
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover - a pytest without it
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    policy = results.data.get("policy") or {}
    xml.add_global_property("auditkit_verdict", results.verdict)
    xml.add_global_property("auditkit_coverage", results.evaluated_text)
    xml.add_global_property("auditkit_partial", str(results.partial).lower())
    xml.add_global_property("auditkit_policy", f"{policy.get('name')} v{policy.get('version')}")
    xml.add_global_property("auditkit_results", str(results.folder / "results.json"))


class _XdistHooks:
    """Registered only when pytest-xdist is active: hands the results folder to each worker."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        results = self.config.stash.get(RESULTS_KEY, None)
        if results is not None:
            node.workerinput[WORKER_INPUT] = str(results.folder)
            node.workerinput[WORKER_RAN] = "1" if self.config.stash.get(RAN_KEY, False) else "0"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "auditkit: a policy rule of the auditkit audit")
    if _enabled(config) and config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_XdistHooks(config), "auditkit-xdist")


class AuditRuleFailure(Exception):
    """A failed fail-severity rule, an errored check or a failed coverage."""


class AuditCollector(pytest.Collector):
    """The virtual ``auditkit`` node: the audit, one item per errored check and one per rule."""

    def collect(self) -> list[pytest.Item]:
        results: AuditResults = self.config.stash[RESULTS_KEY]  # type: ignore[assignment]
        ran = self.config.stash.get(RAN_KEY, False)
        items: list[pytest.Item] = [
            AuditRunItem.from_parent(
                self, name="audit", results=results, duration_s=results.duration_s if ran else None
            )
        ]
        for check in results.data.get("checks", []):
            if check.get("status") == "error":
                items.append(CheckErrorItem.from_parent(self, name=f"check:{check['id']}", record=check))
        for rule in results.rules:
            items.append(AuditRuleItem.from_parent(self, name=rule["id"], rule=rule, results=results))
        return items


def _fmt(value: Any) -> str:
    return "undefined" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_rule(rule: dict[str, Any]) -> str:
    """One paragraph a CI log reader understands without opening the report."""
    ci = rule.get("ci")
    interval = f" (95% CI [{_fmt(ci[0])}, {_fmt(ci[1])}])" if ci else ""
    labels = rule.get("labels")
    where = "overall" if not labels else ", ".join(f"{k}={v}" for k, v in labels.items())
    bound = "at most" if rule.get("bound") == "max" else "at least"
    judged = "" if rule.get("use") == "value" else f", judged on {rule.get('use')}"
    text = (
        f"{rule['id']} {rule['status']}: {rule['metric']} [{where}] = {_fmt(rule.get('observed'))}{interval};"
        f" the policy requires {bound} {_fmt(rule.get('threshold'))}{judged}."
        f" Subcategories: {', '.join(rule.get('controls', [])) or '-'}."
    )
    if rule.get("rationale"):
        text += f" Why: {rule['rationale']}"
    if rule.get("note"):
        text += f" ({rule['note']})"
    return text


def rule_check(rule: dict[str, Any], results: AuditResults) -> str:
    """The check whose metric a rule judges: its ``check`` key, else the metric's prefix."""
    if rule.get("check"):
        return str(rule["check"])
    return str(rule.get("metric", "")).split(".", 1)[0]


def not_evaluated_reason(rule: dict[str, Any], results: AuditResults) -> str:
    """Why a rule was not evaluated, for its skip message."""
    cause = rule.get("cause")
    if cause == "not_selected":
        check = rule_check(rule, results)
        selection = (results.data.get("run") or {}).get("selection") or {}
        only, skip = list(selection.get("only") or []), list(selection.get("skip") or [])
        if check in skip:
            how = f"skip: {', '.join(skip)}"
        elif only and check not in only:
            how = f"only: {', '.join(only)}"
        else:
            how = "only/skip"
        return f"{rule['id']} not evaluated: check {check} not selected ({how})"
    return f"{rule['id']} not evaluated: {rule.get('note') or 'metric absent'}"


def _rule_properties(rule: dict[str, Any]) -> list[tuple[str, object]]:
    bound = "max" if rule.get("bound") == "max" else "min"
    properties: list[tuple[str, object]] = [
        ("auditkit_status", rule.get("status")),
        ("auditkit_severity", rule.get("severity")),
        ("auditkit_metric", rule.get("metric")),
        ("auditkit_labels", json.dumps(rule.get("labels"), sort_keys=True)),
        ("auditkit_observed", _fmt(rule.get("observed"))),
        ("auditkit_threshold", f"{bound} {_fmt(rule.get('threshold'))}"),
        ("auditkit_controls", ", ".join(rule.get("controls") or [])),
    ]
    if rule.get("ci"):
        properties.append(("auditkit_ci", f"[{_fmt(rule['ci'][0])}, {_fmt(rule['ci'][1])}]"))
    if rule.get("cause"):
        properties.append(("auditkit_cause", rule["cause"]))
    return properties


class AuditRuleItem(pytest.Item):
    def __init__(self, *, rule: dict[str, Any], results: AuditResults | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rule = rule
        self.results = results if results is not None else AuditResults({}, Path("."))
        self.add_marker("auditkit")
        # JUnit shows a passing test as passing: a tripped warning is visible there only through
        # these properties (and the description on stdout, with junit_logging=system-out).
        self.user_properties.extend(_rule_properties(rule))
        status = rule.get("status")
        if status in ("warn", "fail"):
            self.user_properties.append(("auditkit_description", describe_rule(rule)))
        elif status == "not_evaluated":
            self.user_properties.append(("auditkit_description", not_evaluated_reason(rule, self.results)))

    def runtest(self) -> None:
        status = self.rule.get("status")
        if status == "not_evaluated":
            raise pytest.skip.Exception(not_evaluated_reason(self.rule, self.results), _use_item_location=True)
        if status == "fail":
            raise AuditRuleFailure(describe_rule(self.rule))
        if status == "warn":
            description = describe_rule(self.rule)
            sys.stdout.write(f"auditkit warning: {description}\n")  # captured: -rP and JUnit system-out
            warnings.warn(AuditRuleWarning(description), stacklevel=1)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, AuditRuleFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return Path("auditkit"), 0, f"auditkit::{self.name}"


def coverage_problems(results: AuditResults) -> list[str]:
    """Why the audit's coverage failed, one sentence each (empty: it did not).

    A run whose eval split read nothing, whose coverage rules failed, that evaluated none of its
    policy's rules, or whose every check was skipped measured nothing a release may rest on.
    """
    problems: list[str] = []
    for check in results.data.get("checks", []):
        if check.get("id") == "coverage" and check.get("status") == "error":
            error = check.get("error") or {}
            problems.append(f"the coverage record errored: {error.get('type')}: {error.get('message')}")
    for rule in results.rules:
        if str(rule.get("metric", "")).startswith("coverage.") and rule.get("status") == "fail":
            problems.append(describe_rule(rule))
    eval_counts = results.split_coverage().get("eval")
    if eval_counts is not None and eval_counts.get("read") == 0:
        reasons = eval_counts.get("by_reason") or {}
        why = "; ".join(f"{n} x {reason}" for reason, n in list(reasons.items())[:3])
        problems.append(
            f"no eval image was read: all {eval_counts.get('listed')} listed rows were quarantined"
            + (f" ({why})" if why else "")
        )
    rules = results.rules
    if rules and not any(r.get("status") in ("pass", "warn", "fail") for r in rules):
        problems.append(f"no rule of the policy was evaluated ({results.evaluated_text})")
    elif ((results.data.get("policy") or {}).get("evaluated") or {}).get("nothing_measured"):
        problems.append(f"no check measured the model ({results.evaluated_text})")
    return problems


class AuditRunItem(pytest.Item):
    """``auditkit::audit``: the audit run, timed as the audit took, failing when its coverage failed."""

    def __init__(self, *, results: AuditResults, duration_s: float | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results = results
        self.duration_s = duration_s
        self.add_marker("auditkit")
        policy = results.data.get("policy") or {}
        self.user_properties.extend(
            [
                ("auditkit_verdict", results.verdict),
                ("auditkit_coverage", results.evaluated_text),
                ("auditkit_policy", f"{policy.get('name')} v{policy.get('version')}"),
                ("auditkit_audit_duration_s", _fmt(results.duration_s)),
                ("auditkit_results", str(results.folder / "results.json")),
            ]
        )

    def runtest(self) -> None:
        problems = coverage_problems(self.results)
        if problems:
            raise AuditRuleFailure("the audit's coverage failed: " + "; ".join(problems))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, AuditRuleFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return Path("auditkit"), 0, "auditkit::audit"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    # The audit ran before the items; its call phase takes its time, so JUnit's testcase time and
    # --durations show what the audit cost (a reused --audit-results run cost this session nothing).
    if isinstance(item, AuditRunItem) and call.when == "call" and item.duration_s is not None:
        report.duration = item.duration_s
    return report


class CheckErrorItem(pytest.Item):
    def __init__(self, *, record: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record = record
        error = record.get("error") or {}
        self.user_properties.extend(
            [
                ("auditkit_status", "error"),
                ("auditkit_check", record.get("id")),
                ("auditkit_error", f"{error.get('type')}: {error.get('message')}"),
            ]
        )

    def runtest(self) -> None:
        error = self.record.get("error") or {}
        raise AuditRuleFailure(
            f"check {self.record['id']} errored: {error.get('type')}: {error.get('message')};"
            " its rules are not evaluated and the audit verdict is fail"
        )

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        return str(excinfo.value)

    def reportinfo(self) -> tuple[Path, int, str]:
        return Path("auditkit"), 0, f"auditkit::{self.name}"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.stash.get(RESULTS_KEY, None) is None:
        return
    collector = AuditCollector.from_parent(session, name="auditkit", nodeid="auditkit")
    items.extend(collector.collect())


@pytest.fixture(scope="session")
def audit_results(request: pytest.FixtureRequest) -> AuditResults:
    """The audit's results (``--audit`` or ``--audit-results``)."""
    results = request.config.stash.get(RESULTS_KEY, None)
    if results is None:
        pytest.skip("no audit: pass --audit SPEC or --audit-results DIR")
    return results


@pytest.fixture(scope="session")
def audit_context(request: pytest.FixtureRequest) -> Any:
    """The :class:`auditkit.context.AuditContext` over the audited data and model.

    Rebuilt from the spec in this process (decoding and inference are not shared with the audit
    run); needs ``--audit SPEC``.
    """
    spec_path = request.config.getoption("audit")
    if not spec_path:
        pytest.skip("audit_context needs --audit SPEC (not --audit-results)")
    from auditkit.context import AuditContext
    from auditkit.data import load_dataset
    from auditkit.model import ModelAdapter
    from auditkit.spec import load_spec

    spec = load_spec(spec_path)
    results = request.config.stash[RESULTS_KEY]
    assert results is not None  # set before collection whenever --audit is given
    return AuditContext(spec, ModelAdapter(spec), load_dataset(spec), results.folder)


def _counts(counts: dict[str, int], statuses: tuple[str, ...]) -> str:
    return ", ".join(f"{counts.get(s, 0)} {s}" for s in statuses)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS_KEY, None)
    if results is None or hasattr(config, "workerinput"):
        return
    policy = results.data.get("policy") or {}
    control_counts = {str(k): int(v) for k, v in (policy.get("control_counts") or {}).items()}
    rules = results.rules
    verdict = results.verdict.upper()
    terminalreporter.write_sep("=", "auditkit")
    terminalreporter.write_line(
        f"verdict: {verdict} under {policy.get('name')} v{policy.get('version')} ({results.folder / 'results.json'})",
        red=verdict != "PASS",
        green=verdict == "PASS",
    )
    terminalreporter.write_line(results.evaluated_text, yellow=results.partial)
    coverage = results.split_coverage()
    if coverage:
        terminalreporter.write_line(
            "data: "
            + "; ".join(
                f"{split} {c.get('read')} of {c.get('listed')} images read, {c.get('quarantined')} quarantined"
                for split, c in coverage.items()
            )
        )
    rule_counts = {s: sum(r.get("status") == s for r in rules) for s in RULE_STATUSES}
    causes: dict[str, int] = {}
    for rule in rules:
        if rule.get("status") == "not_evaluated" and rule.get("cause"):
            causes[str(rule["cause"])] = causes.get(str(rule["cause"]), 0) + 1
    why = ", ".join(f"{n} {cause.replace('_', ' ')}" for cause, n in causes.items())
    terminalreporter.write_line("rules: " + _counts(rule_counts, RULE_STATUSES) + (f" ({why})" if why else ""))
    # Every subcategory of the framework has exactly one of the five statuses, so the five counts
    # sum to the framework's size (72 for AI RMF 1.0); the total makes a gap visible.
    total = sum(control_counts.get(s, 0) for s in RMF_STATUSES)
    terminalreporter.write_line(f"NIST AI RMF 1.0 subcategories ({total}): " + _counts(control_counts, RMF_STATUSES))
