"""A conformance kit for third-party checks, as scikit-learn ships ``check_estimator``.

``check_check(MyCheck)`` runs a check through the real engine on a small synthetic DICOM study
(generated on the fly, with pseudonymous but realistic headers) and verifies the check contract
(docs/architecture.md): metadata (id, family, docstring, ``Params`` with valid defaults and no
unknown keys, ``needs``, ``emits``), the result schema (declared metric names, directions,
undefined values with a reason, ordered intervals, findings with a ``kind``), determinism under
the seed (two runs, identical results), that it reads nothing its ``needs`` do not declare, and
that no DICOM header value that identifies a patient or study ever appears in the metrics,
findings or artifacts.

Use it in the check's own test suite::

    from auditkit.testing import check_check

    def test_conformance():
        check_check(MyCheck)

or one test item per property of the contract::

    from auditkit.testing import check_property, parametrize_with_checks

    @parametrize_with_checks([MyCheck])
    def test_contract(check, prop):
        check_property(check, prop)

``make_context(...)`` builds a small in-memory context for a check's unit tests.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from auditkit.check import Check, CheckParams, Needs

if TYPE_CHECKING:
    from torch import nn

    from auditkit.context import CheckView

IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress",
    "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "ReferringPhysicianName", "InstitutionAddress", "StudyID",
)  # fmt: skip
_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class CheckConformanceError(AssertionError):
    """The check breaks the contract; the message lists every problem found."""


@dataclass
class ConformanceReport:
    check: str
    problems: list[str] = field(default_factory=list)
    status: str | None = None
    n_metrics: int = 0
    n_findings: int = 0

    def fail(self, message: str) -> None:
        self.problems.append(message)


def _metadata(cls: type[Check[Any]], report: ConformanceReport) -> None:
    cid = getattr(cls, "id", None)
    if not isinstance(cid, str) or not _ID.match(cid):
        report.fail(f"id must be a lowercase identifier, got {cid!r}")
    if not isinstance(getattr(cls, "family", None), str) or not cls.family:
        report.fail("family must be a non-empty string")
    if not (cls.__doc__ or "").strip():
        report.fail("the class needs a docstring naming the method, its paper, inputs and metrics")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, CheckParams)):
        report.fail("Params must subclass auditkit.check.CheckParams")
    else:
        try:
            cls.Params()
        except ValidationError as error:
            report.fail(f"Params() defaults are invalid: {error.errors()[0]['msg']}")
        try:
            cls.Params(**{"__not_a_parameter__": 1})
            report.fail("Params accepts unknown keys; a typo in a spec must be an error")
        except ValidationError:
            pass
    if not isinstance(cls.needs, Needs):
        report.fail("needs must be an auditkit.check.Needs")
    emits = getattr(cls, "emits", ())
    if not emits:
        report.fail("emits must list the metric names the check produces")
    bad = [name for name in emits if not (isinstance(name, str) and name.startswith(f"{cid}."))]
    if bad:
        report.fail(f"metric names must be '<check id>.<metric>', got {bad}")


def _declared_reads(record: dict[str, Any], cls: type[Check[Any]], report: ConformanceReport) -> None:
    for read in record.get("undeclared_reads", []):
        report.fail(f"undeclared read: {read}")


def _runs_ok(record: dict[str, Any], cls: type[Check[Any]], report: ConformanceReport) -> None:
    if record["status"] == "error":
        error = record.get("error") or {}
        report.fail(f"run() raised {error.get('type')}: {error.get('message')} (at {error.get('where')})")


def _declared_metrics(record: dict[str, Any], cls: type[Check[Any]], report: ConformanceReport) -> None:
    for metric in record["metrics"]:
        if metric["name"] not in cls.emits:
            report.fail(f"metric {metric['name']} {metric['labels']} is not declared in emits")


def _well_formed_metrics(record: dict[str, Any], cls: type[Check[Any]], report: ConformanceReport) -> None:
    for metric in record["metrics"]:
        where = f"metric {metric['name']} {metric['labels']}"
        if metric["direction"] not in ("higher_is_better", "lower_is_better"):
            report.fail(f"{where}: direction {metric['direction']!r}")
        if metric["value"] is None and not metric.get("reason"):
            report.fail(f"{where}: undefined without a reason")
        ci = metric.get("ci")
        if ci is not None and not ci[0] <= ci[1]:
            report.fail(f"{where}: interval {ci} is not ordered")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metric["labels"].items()):
            report.fail(f"{where}: labels must map strings to strings")


def _findings(record: dict[str, Any], cls: type[Check[Any]], report: ConformanceReport) -> None:
    for finding in record["findings"]:
        if not isinstance(finding, dict) or not isinstance(finding.get("kind"), str):
            report.fail(f"finding {str(finding)[:80]} needs a string 'kind'")


def _identifying_values(study: Path) -> set[str]:
    """Every identifying header value of the synthetic study (what must never leak)."""
    import pydicom

    values: set[str] = set()
    for path in study.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in IDENTIFYING_KEYWORDS:
            value = ds.get(keyword)
            if value is not None and len(str(value)) >= 4:
                values.add(str(value))
    return values


WALL_CLOCK_KEYS = frozenset({"duration_s", "seconds"})
"""Keys whose values are wall-clock times: they may differ between two runs with the same seed."""


def _strip_volatile(value: Any) -> Any:
    """The record without wall-clock times, at any depth (a check may time its stages in findings)."""
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


@dataclass
class _Runs:
    """Two runs of one check on the synthetic study, and what they published."""

    first: dict[str, Any]
    second: dict[str, Any]
    published: str
    identifying: set[str]


_CACHE: dict[tuple[type[Any], int], _Runs] = {}


def _run_twice(cls: type[Check[Any]], root: Path, n_patients: int) -> _Runs:
    from auditkit.demo import prepare_demo
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    spec_path = prepare_demo(root / "study-root", n_patients=n_patients)
    spec = load_spec(spec_path).model_copy(update={"checks": {cls.id: {}}, "only": [cls.id]})
    records = []
    for attempt in ("first", "second"):
        outcome = run_audit(spec, RunOptions(out_dir=root / attempt, report=False, pdf=False), checks={cls.id: cls})
        records.append(next(c for c in outcome.results["checks"] if c["id"] == cls.id))
    published = json.dumps(records[0], sort_keys=True)
    for artifact in records[0].get("artifacts", []):
        path = root / "first" / artifact["path"]
        if path.is_file():
            published += path.read_text(encoding="utf-8", errors="ignore")
    return _Runs(records[0], records[1], published, _identifying_values(spec_path.parent))


def _judge_runs(runs: _Runs, cls: type[Check[Any]], report: ConformanceReport, names: Sequence[str]) -> None:
    first = runs.first
    report.status = first["status"]
    report.n_metrics, report.n_findings = len(first["metrics"]), len(first["findings"])
    judges = {
        "declared_reads": _declared_reads,
        "runs": _runs_ok,
        "declared_metrics": _declared_metrics,
        "well_formed_metrics": _well_formed_metrics,
        "findings": _findings,
    }
    for name in names:
        if name in judges:
            judges[name](first, cls, report)
        elif name == "deterministic" and _strip_volatile(first) != _strip_volatile(runs.second):
            report.fail("two runs with the same seed gave different results (seed every random draw from ctx.rng)")
        elif name == "no_identifiers":
            leaked = sorted(k for k in runs.identifying if k in runs.published)
            if leaked:
                report.fail(f"{len(leaked)} identifying DICOM header value(s) appear in the results or artifacts")


PROPERTIES: tuple[str, ...] = (
    "metadata",
    "runs",
    "declared_reads",
    "declared_metrics",
    "well_formed_metrics",
    "findings",
    "deterministic",
    "no_identifiers",
)
"""The contract, one named property each (:func:`check_property`, :func:`parametrize_with_checks`)."""


def check_check(cls: type[Check[Any]], *, workdir: Path | None = None, n_patients: int = 24) -> ConformanceReport:
    """Verify ``cls`` against every property of the check contract at once.

    Raises :class:`CheckConformanceError` listing every problem found.

    Args:
        cls: the check class (not an instance).
        workdir: where to write the synthetic study and outputs (default: a temporary folder).
        n_patients: size of the synthetic study.
    """
    report = ConformanceReport(check=str(getattr(cls, "id", cls.__name__)))
    _metadata(cls, report)
    if report.problems:
        raise CheckConformanceError(f"{report.check}: " + "; ".join(report.problems))
    with tempfile.TemporaryDirectory(prefix="auditkit-conformance-") as tmp:
        runs = _run_twice(cls, workdir or Path(tmp), n_patients)
        _judge_runs(runs, cls, report, PROPERTIES)
    if report.problems:
        raise CheckConformanceError(f"{report.check}: " + "; ".join(report.problems))
    return report


def check_property(cls: type[Check[Any]], name: str, *, n_patients: int = 24) -> None:
    """Verify one named property of the contract (see :data:`PROPERTIES`).

    The check runs twice on the synthetic study once per class and process; each property then
    judges those runs, so a suite of one item per property costs one pair of runs.

    Raises:
        CheckConformanceError: the property does not hold; the message names each problem.
        ValueError: an unknown property name.
    """
    if name not in PROPERTIES:
        raise ValueError(f"unknown property {name!r}; expected one of {list(PROPERTIES)}")
    report = ConformanceReport(check=str(getattr(cls, "id", cls.__name__)))
    _metadata(cls, report)
    if name == "metadata" or report.problems:
        if report.problems:
            raise CheckConformanceError(f"{report.check} [{name}]: " + "; ".join(report.problems))
        return
    key = (cls, n_patients)
    if key not in _CACHE:
        _CACHE[key] = _run_twice(cls, Path(tempfile.mkdtemp(prefix="auditkit-conformance-")), n_patients)
    _judge_runs(_CACHE[key], cls, report, [name])
    if report.problems:
        raise CheckConformanceError(f"{report.check} [{name}]: " + "; ".join(report.problems))


def parametrize_with_checks(checks: Sequence[type[Check[Any]]]) -> Any:
    """A ``pytest.mark.parametrize`` over every (check, property) pair, as scikit-learn's
    ``parametrize_with_checks`` does: one test item per property, named ``<id>-<property>``::

        @parametrize_with_checks([MyCheck])
        def test_contract(check, prop):
            check_property(check, prop)
    """
    import pytest

    pairs = [(check, prop) for check in checks for prop in PROPERTIES]
    return pytest.mark.parametrize(
        ("check", "prop"), pairs, ids=[f"{getattr(c, 'id', c.__name__)}-{p}" for c, p in pairs]
    )


def rules_for(check_id: str, policy: str = "medical-imaging-default") -> Any:
    """The packaged policy cut down to the rules that judge one check's metrics.

    Lets a check's tests assert how the shipped policy judges planted faults and clean twins.
    """
    from auditkit.policy import load_policy

    loaded, _ = load_policy(policy)
    return loaded.model_copy(update={"rules": [r for r in loaded.rules if r.metric.startswith(f"{check_id}.")]})


def make_context(
    labels: Any,
    *,
    classes: Sequence[str] | None = None,
    positive_class: str | None = None,
    probs: Any = None,
    logits: Any = None,
    features: Any = None,
    images: Any = None,
    groups: Mapping[str, Any] | None = None,
    patients: Sequence[str | None] | None = None,
    rows: Any = None,
    quarantined_groups: Mapping[str, Mapping[str, int]] | None = None,
    train: Mapping[str, Any] | None = None,
    ood: Mapping[str, Mapping[str, Any]] | None = None,
    model: nn.Module | None = None,
    check: type[Check[Any]] | str = "test",
    needs: Needs | None = None,
    seed: int = 0,
    out_dir: Path | None = None,
    operating_point: Mapping[str, float] | None = None,
    claims: Mapping[str, Any] | None = None,
    task: str = "classification",
    units: Mapping[str, str] | None = None,
    spacing: Any = None,
) -> CheckView:
    """A small in-memory :class:`auditkit.check.CheckContext` for a check's unit tests.

        The eval split is given by its ``labels`` and whatever the test needs: model outputs
        (``logits``, or ``probs`` whose logs become the logits), embeddings, images ``(N, C, H, W)`` in
        [0, 1], group columns, surrogate patient ids, manifest row numbers (default ``0..N-1``) and the
        quarantined rows per group. ``train`` takes the same keys for a train split, ``ood`` maps set
    names to the same keys for out-of-distribution sets (labels ``-1``). With ``model`` the
        predictions and embeddings not given come from one pass of it over the images, as in a run.
        The context holds the check to its ``needs`` (those of ``check`` when it is a class), so a test
        fails loudly on an undeclared read.

        ``task`` is the model's task: for ``multilabel`` the labels are ``(N, K)`` of 1, 0 and -1
        (unknown) and ``probs`` are per-label sigmoid probabilities; for ``regression`` the labels
        are targets ``(N,)`` or ``(N, K)`` and ``probs`` (or ``logits``) the predicted values; for
        ``segmentation`` the labels are reference label maps ``(N, *spatial)``, ``probs`` (or
        ``logits``) ``(N, K, *spatial)``, and ``spacing`` the pixel or voxel size per image
        ``(N, len(spatial))`` in mm (default 1). Images ``(N, C, D, H, W)`` make the context 3-D
        (``spatial_dims`` 3, as ``model.input.depth`` does), with ``spacing`` ``(N, 3)`` per volume.

        Example::

            ctx = make_context([0, 1, 1], probs=[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], check=CalibrationCheck)
            result = CalibrationCheck().run(ctx, CalibrationCheck.Params(n_boot=0))
    """
    import numpy as np
    import torch

    from auditkit.context import AuditContext
    from auditkit.data import Dataset, Manifest, SplitData
    from auditkit.model import ModelAdapter

    def split(name: str, spec: Mapping[str, Any]) -> tuple[SplitData, tuple[torch.Tensor, torch.Tensor] | None]:
        if task == "regression":
            y = np.asarray(spec["labels"], dtype=np.float64)
            y = y.reshape(-1, 1) if y.ndim == 1 else y
        elif task == "segmentation":
            y = np.asarray(spec["labels"], dtype=np.int16)
        else:
            y = np.asarray(spec["labels"], dtype=np.int64)
        n = int(y.shape[0])
        pixels = spec.get("images")
        stored = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).half() if pixels is not None else None
        data = SplitData(
            name=name,
            manifest=Path("<memory>"),
            rows=np.asarray(spec.get("rows", np.arange(n)), dtype=np.int64),
            labels=y,
            images=stored if stored is not None else torch.zeros(n, 0, dtype=torch.float16),
            patients=list(spec.get("patients") or [None] * n),
            studies=[None] * n,
            groups={k: np.asarray(v) for k, v in (spec.get("groups") or {}).items()},
            kinds=["npy"] * n,
            paths=[Path(f"<memory>/{name}/{i}") for i in range(n)],
            quarantined_groups={k: dict(v) for k, v in (spec.get("quarantined_groups") or {}).items()},
            spacing=(
                np.broadcast_to(np.asarray(spec.get("spacing", 1.0), dtype=np.float64), (n, y.ndim - 1)).copy()
                if task == "segmentation"
                else np.broadcast_to(np.asarray(spec.get("spacing", 1.0), dtype=np.float64), (n, 3)).copy()
                if stored is not None and stored.ndim == 5
                else None
            ),
        )
        out = spec.get("logits")
        if out is None and spec.get("probs") is not None:
            p = np.asarray(spec["probs"], dtype=np.float64)
            with np.errstate(divide="ignore"):
                if task == "multilabel":
                    out = np.log(p) - np.log1p(-p)
                elif task == "regression":
                    out = p.reshape(-1, 1) if p.ndim == 1 else p
                else:
                    out = np.log(p)
        outputs = None
        if out is not None:
            emb = spec.get("features")
            outputs = (
                torch.as_tensor(np.asarray(out), dtype=torch.float32),
                torch.as_tensor(np.asarray(emb), dtype=torch.float32) if emb is not None else torch.empty(n, 0),
            )
        return data, outputs

    eval_spec = {
        "labels": labels, "probs": probs, "logits": logits, "features": features, "images": images,
        "groups": groups, "patients": patients, "quarantined_groups": quarantined_groups,
    }  # fmt: skip
    if spacing is not None:
        eval_spec["spacing"] = spacing
    if rows is not None:
        eval_spec["rows"] = rows
    splits = {"eval": split("eval", eval_spec)}
    if train is not None:
        splits["train"] = split("train", train)
    for name, values in (ood or {}).items():
        splits[f"ood:{name}"] = split(f"ood:{name}", values)
    if task in ("classification", "segmentation"):
        n_classes = int(max(int(np.max(s.labels, initial=0)) for s, _ in splits.values())) + 1
        outputs_given = probs if probs is not None else logits
        if task == "segmentation" and outputs_given is not None:  # a class may be absent from the references
            n_classes = max(n_classes, int(np.asarray(outputs_given).shape[1]))
        first = "background" if task == "segmentation" else "class0"
        default = [first, *(f"class{k}" for k in range(1, max(n_classes, 2)))]
    else:
        prefix = "label" if task == "multilabel" else "output"
        default = [f"{prefix}{k}" for k in range(splits["eval"][0].labels.shape[1])]
    names = list(classes) if classes is not None else default
    adapter = ModelAdapter.from_module(model, classes=names, task=task) if model is not None else None
    dataset = Dataset(
        splits={name: data for name, (data, _) in splits.items()},
        quarantine=[],
        manifest=Manifest(source=Path("<memory>"), columns=[], rows=[]),
    )
    folder = out_dir if out_dir is not None else Path(tempfile.mkdtemp(prefix="auditkit-context-"))
    ctx = AuditContext(
        None,
        adapter,
        dataset,
        folder,
        seed=seed,
        classes=names,
        positive_index=(
            names.index(positive_class)
            if positive_class is not None
            else (1 if len(names) == 2 and task == "classification" else None)
        ),
        group_columns=sorted({k for data, _ in splits.values() for k in data.groups}),
        operating_point=dict(operating_point or {}),
        claims=dict(claims or {}),
        task=task,
        units=dict(units or {}),
    )
    if images is not None and np.asarray(images).ndim == 5:  # volumes (N, C, D, H, W)
        ctx.spatial_dims = 3
    for name, (_, outputs) in splits.items():
        if outputs is not None:
            ctx._outputs[name] = outputs
            ctx._with_features[name] = outputs[1].shape[1] > 0
    return ctx.for_check(check, needs)
