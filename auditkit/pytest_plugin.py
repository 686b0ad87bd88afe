"""auditkit as a pytest plugin: one test item per policy rule (DESIGN section 9).

``pytest --audit SPEC`` runs the audit once per session — once in total under pytest-xdist, in
the controller, before the workers collect — or ``--audit-results DIR`` reuses a finished one.
Each rule of the policy becomes an item named ``auditkit::<RULE-ID>`` that fails with the
observed value, the threshold, the interval and the AI RMF subcategories; a warn-severity rule
that trips passes with a warning; a rule whose metric is absent is skipped with the reason; a
check that errored is a failing ``auditkit::check:<id>`` item. Fixtures ``audit_results`` and
``audit_context`` serve a team's own assertions. The terminal summary shows the verdict and the
control coverage.

This module is imported by every pytest run of every user who has auditkit installed, so it
imports nothing heavy (no torch, weasyprint or torchattacks) at import time.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

RESULTS_KEY = pytest.StashKey["AuditResults | None"]()
CONTEXT_KEY = pytest.StashKey[Any]()
WORKER_INPUT = "auditkit_results_dir"
RUN_LOG_ENV = "AUDITKIT_PYTEST_RUN_LOG"  # test instrumentation: one line per audit actually run


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
        path = folder / "results.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise pytest.UsageError(f"--audit-results: no results.json in {folder}") from None
        except ValueError as error:
            raise pytest.UsageError(f"--audit-results: {path} is not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("schema") != "auditkit.results/v1":
            raise pytest.UsageError(f"--audit-results: {path} is not an auditkit.results/v1 file")
        return cls(data, folder)

    @property
    def verdict(self) -> str:
        return str(self.data.get("verdict"))

    @property
    def rules(self) -> list[dict[str, Any]]:
        return list(self.data.get("rules") or [])

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
    group.addoption("--audit-out", metavar="DIR", help="output folder of the audit (default: the spec's)")


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("audit") or config.getoption("audit_results"))


def _run_audit(config: pytest.Config) -> AuditResults:
    """Run the audit in this process (imports the engine lazily)."""
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    spec = load_spec(config.getoption("audit"))
    if config.getoption("audit_policy"):
        spec = spec.model_copy(update={"policy": config.getoption("audit_policy")})
    only = config.getoption("audit_only")
    out = config.getoption("audit_out")
    log_path = os.environ.get(RUN_LOG_ENV)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()}\n")
    outcome = run_audit(
        spec,
        RunOptions(
            out_dir=Path(out) if out else None,
            only=[only] if only else None,
            argv=["pytest", "--audit"],
        ),
    )
    return AuditResults(outcome.results, outcome.out_dir)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    config.stash[RESULTS_KEY] = None
    if not _enabled(config):
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller ran the audit
        config.stash[RESULTS_KEY] = AuditResults.load(Path(workerinput[WORKER_INPUT]))
        return
    if config.getoption("audit_results"):
        config.stash[RESULTS_KEY] = AuditResults.load(Path(config.getoption("audit_results")))
        return
    try:
        config.stash[RESULTS_KEY] = _run_audit(config)
    except Exception as error:  # a usage error in the spec must read as one
        from auditkit.errors import AuditkitError

        if isinstance(error, AuditkitError):
            raise pytest.UsageError(f"--audit: {error}") from None
        raise


class _XdistHooks:
    """Registered only when pytest-xdist is active: hands the results folder to each worker."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        results = self.config.stash.get(RESULTS_KEY, None)
        if results is not None:
            node.workerinput[WORKER_INPUT] = str(results.folder)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "auditkit: a policy rule of the auditkit audit")
    if _enabled(config) and config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_XdistHooks(config), "auditkit-xdist")


class AuditRuleFailure(Exception):
    """A failed fail-severity rule or an errored check."""


class AuditCollector(pytest.Collector):
    """The virtual ``auditkit`` node holding one item per rule and per errored check."""

    def collect(self) -> list[pytest.Item]:
        results: AuditResults = self.config.stash[RESULTS_KEY]  # type: ignore[assignment]
        items: list[pytest.Item] = []
        for check in results.data.get("checks", []):
            if check.get("status") == "error":
                items.append(CheckErrorItem.from_parent(self, name=f"check:{check['id']}", record=check))
        for rule in results.rules:
            items.append(AuditRuleItem.from_parent(self, name=rule["id"], rule=rule))
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


class AuditRuleItem(pytest.Item):
    def __init__(self, *, rule: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rule = rule
        self.add_marker("auditkit")

    def runtest(self) -> None:
        status = self.rule.get("status")
        if status == "not_evaluated":
            reason = f"{self.rule['id']} not evaluated: {self.rule.get('note') or 'metric absent'}"
            raise pytest.skip.Exception(reason, _use_item_location=True)
        if status == "fail":
            raise AuditRuleFailure(describe_rule(self.rule))
        if status == "warn":
            warnings.warn(AuditRuleWarning(describe_rule(self.rule)), stacklevel=1)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, AuditRuleFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return Path("auditkit"), 0, f"auditkit::{self.name}"


class CheckErrorItem(pytest.Item):
    def __init__(self, *, record: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record = record

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
    assert results is not None  # set by pytest_sessionstart whenever --audit is given
    return AuditContext(spec, ModelAdapter(spec), load_dataset(spec), results.folder)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS_KEY, None)
    if results is None or hasattr(config, "workerinput"):
        return
    policy = results.data.get("policy") or {}
    counts = policy.get("control_counts") or {}
    rules = results.rules
    terminalreporter.write_sep("=", "auditkit")
    terminalreporter.write_line(
        f"verdict: {results.verdict.upper()} under {policy.get('name')} v{policy.get('version')}"
        f" ({results.folder / 'results.json'})"
    )
    terminalreporter.write_line(
        "rules: "
        + ", ".join(f"{sum(r['status'] == s for r in rules)} {s}" for s in ("pass", "warn", "fail", "not_evaluated"))
    )
    terminalreporter.write_line(
        "NIST AI RMF 1.0 subcategories: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("met", "not_met", "not_evaluated", "attested", "not_assessed"))
    )
