"""Plan, then execute: the audit run.

1. resolve the selected checks (every installed one unless ``only``/``skip`` narrow them) and
   validate their parameters (before any slow work);
2. load the model and run the preflight (:mod:`auditkit.preflight`): a model that does not fit
   its spec is a usage error before anything is decoded;
3. decode every image the plan needs, once; measure coverage and stop when no eval image is
   readable (:mod:`auditkit.coverage`);
4. run ONE forward pass per split that any selected check needs;
5. run each check as an independent unit over the cached results; an exception becomes an
   ``error`` result and the others still run; each finished check is checkpointed atomically, so
   ``--resume`` continues a run that died;
6. judge the records against the policy and write ``results.json`` (schema
   ``auditkit.results/v1``), the exports, the report and ``manifest.json``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from auditkit import __version__
from auditkit.bundle import write_bundle
from auditkit.check import Check, CheckResult, Needs, Skip
from auditkit.context import AuditContext, ProgressFactory
from auditkit.coverage import CoverageCheck, coverage_record, require_readable_eval, split_coverage
from auditkit.data import Dataset, PixelPlace, load_dataset
from auditkit.errors import ConfigError, ModelLoadError
from auditkit.executors import CheckSeed, RayExecutor, open_executor
from auditkit.jsonio import jsonable, sha256_file, sha256_json, sha256_path, sha256_text, write_json_atomic
from auditkit.model import InferenceOptions, ModelAdapter, Precision, first_line, is_out_of_memory
from auditkit.pixels import pixel_record, release_large_allocations, remove_pixel_files
from auditkit.policy import evaluate, load_attestations, load_framework, load_policy
from auditkit.preflight import run_preflight
from auditkit.registry import BrokenCheck, discover
from auditkit.results import assemble, data_section, model_section, peak_rss_mib, reset_peak_rss, run_section
from auditkit.spec import AuditSpec, ExecutorSpec, format_validation_error

log = logging.getLogger(__name__)

EXIT_PASS, EXIT_POLICY_FAILED, EXIT_USAGE, EXIT_CHECK_ERROR = 0, 1, 2, 3


@dataclass
class RunOptions:
    """Command-line overrides of the spec."""

    out_dir: Path | None = None
    only: Sequence[str] | None = None
    skip: Sequence[str] = ()
    device: str | None = None
    resume: bool = False
    batch_size: int = 64
    precision: Precision = "auto"
    channels_last: bool | None = None
    workers: int | None = None
    executor: Literal["local", "ray"] | None = None
    """Overrides ``executor.kind`` of the spec."""
    ray_address: str | None = None
    """Overrides ``executor.address`` of the spec (and implies ``executor: ray``)."""
    pixels: PixelPlace = "auto"
    """Where decoded images are held: ``memory``, ``disk`` (``out_dir/.pixels``, removed at the end)
    or ``auto`` (disk above ``AUDITKIT_PIXEL_MEMORY_MIB``, default 2048 MiB of pixels)."""
    report: bool = True
    pdf: bool = True
    progress: ProgressFactory | None = None
    argv: list[str] = field(default_factory=list)


@dataclass
class SelectedCheck:
    id: str
    cls: type[Check[Any]] | None
    params: Any
    raw_params: dict[str, Any]
    broken: BrokenCheck | None = None


@dataclass
class AuditOutcome:
    results: dict[str, Any]
    out_dir: Path
    exit_code: int


def _split_ids(values: Sequence[str] | None) -> list[str]:
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


@dataclass
class Selection:
    """Which checks run, and why the others do not.

    Attributes:
        checks: the selected checks with validated parameters, in run order.
        installed: every installed check id (broken plug-ins included).
        not_run: installed checks left out by ``only``/``skip``.
        only, skip: the narrowing that applied, and where it came from (``source``).
    """

    checks: list[SelectedCheck]
    installed: list[str]
    not_run: list[str]
    only: list[str]
    skip: list[str]
    source: str

    @property
    def partial(self) -> bool:
        return bool(self.not_run)

    def to_json(self) -> dict[str, Any]:
        return {
            "installed": list(self.installed),
            "run": [s.id for s in self.checks],
            "not_run": list(self.not_run),
            "only": list(self.only),
            "skip": list(self.skip),
            "source": self.source,
            "partial": self.partial,
        }


def _unknown_ids(source: str, ids: Sequence[str], known: Sequence[str]) -> None:
    import difflib

    unknown = [cid for cid in ids if cid not in known]
    if unknown:
        hints = [difflib.get_close_matches(cid, list(known), n=1) for cid in unknown]
        suggestion = "; ".join(f"did you mean {h[0]!r} for {u!r}?" for u, h in zip(unknown, hints, strict=True) if h)
        raise ConfigError(
            f"{source}: unknown check(s) {unknown}; installed checks are {list(known)}"
            + (f" ({suggestion})" if suggestion else "")
        )


def choose_checks(
    spec: AuditSpec,
    available: Mapping[str, type[Check[Any]]],
    broken: Sequence[BrokenCheck] = (),
    *,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
) -> Selection:
    """Every installed check, narrowed by ``only``/``skip``, each with its validated parameters.

    ``spec.checks`` only configures parameters. The narrowing comes from the command line when it
    gives ``--only`` or ``--skip`` (then the spec's ``only``/``skip`` are ignored: the command
    line wins), else from the spec. Checks the spec configures run first, in its order, then the
    others by id.

    Raises:
        ConfigError: an unknown check id, invalid parameters, or nothing left to run.
    """
    broken_by_id = {b.id: b for b in broken}
    known = sorted(set(available) | set(broken_by_id))
    cli_only, cli_skip = _split_ids(only), _split_ids(skip)
    if cli_only or cli_skip:
        only_ids, skip_ids, source = cli_only, cli_skip, "command line"
    else:
        only_ids, skip_ids = _split_ids(spec.only), _split_ids(spec.skip)
        source = "spec" if only_ids or skip_ids else "all installed"
    only_source = "--only" if source == "command line" else "only"
    skip_source = "--skip" if source == "command line" else "skip"
    for label, ids in (("checks", list(spec.checks)), (only_source, only_ids), (skip_source, skip_ids)):
        _unknown_ids(label, ids, known)
    order = list(dict.fromkeys([*spec.checks, *known]))
    wanted = [cid for cid in (only_ids or order) if cid not in skip_ids]
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        raise ConfigError(
            f"no check left to run: only {only_ids or 'every check'} minus skip {skip_ids};"
            f" installed checks are {known}"
        )
    selected: list[SelectedCheck] = []
    for cid in wanted:
        raw = spec.checks.get(cid, {})
        if cid in broken_by_id:
            selected.append(SelectedCheck(cid, None, None, raw, broken_by_id[cid]))
            continue
        cls = available[cid]
        if not isinstance(raw, dict):
            raise ConfigError(f"checks.{cid}: expected a mapping of parameters, got {raw!r}")
        try:
            params = cls.Params(**raw)
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, f"checks.{cid}", cls.Params)) from None
        selected.append(SelectedCheck(cid, cls, params, raw))
    not_run = [cid for cid in known if cid not in wanted]
    return Selection(selected, known, not_run, only_ids, skip_ids, source)


def select_checks(
    spec: AuditSpec,
    available: Mapping[str, type[Check[Any]]],
    broken: Sequence[BrokenCheck] = (),
    *,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
) -> list[SelectedCheck]:
    """The checks to run, with validated parameters (:func:`choose_checks` without the record)."""
    return choose_checks(spec, available, broken, only=only, skip=skip).checks


@dataclass(frozen=True)
class Plan:
    """What the selected checks need, read from their ``needs`` once, before any slow work.

    Attributes:
        roles: the split roles to load (``eval``, and ``train``/``ood`` when a check reads them).
        pass_train: the shared pass covers the train split.
        pass_ood: the shared pass covers the OOD sets.
        any_pass: some check reads predictions or embeddings at all.
        features: the pass captures embeddings (else the feature hook is skipped).
        headers: the decoder keeps DICOM headers (else checks would read the files again).
    """

    roles: tuple[str, ...]
    any_pass: bool
    pass_train: bool
    pass_ood: bool
    features: bool
    headers: bool

    @classmethod
    def of(cls, selected: Sequence[SelectedCheck], task: str = "classification", spatial_dims: int = 2) -> Plan:
        """The plan of ``selected``; a check that does not measure ``task`` on ``spatial_dims``-D
        inputs needs nothing."""
        needs = [s.cls.needs for s in selected if s.cls is not None and s.cls.refusal(s.id, task, spatial_dims) is None]
        forward = [n for n in needs if n.predictions or n.features]
        roles = ["eval"]
        if any(n.train or n.train_optional for n in needs):
            roles.append("train")
        if any(n.ood for n in needs):
            roles.append("ood")
        return cls(
            roles=tuple(roles),
            any_pass=bool(forward),
            pass_train=any(n.train or n.train_optional for n in forward),
            pass_ood=any(n.ood for n in forward),
            features=any(n.features for n in needs),
            headers=any(n.headers for n in needs),
        )

    def pass_splits(self, dataset: Dataset) -> list[str]:
        """The loaded splits whose forward pass is needed (each computed once)."""
        if not self.any_pass:
            return []
        splits = ["eval"] + (["train"] if self.pass_train else [])
        if self.pass_ood:
            splits += [name for name in dataset.splits if name.startswith("ood:")]
        return [s for s in splits if s in dataset.splits]


def _error_record(error: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(error.__traceback__)
    return {
        "type": type(error).__name__,
        "message": str(error),
        "where": [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames[-6:]],
    }


def _base_record(selected: SelectedCheck) -> dict[str, Any]:
    return {
        "id": selected.id,
        "family": selected.cls.family if selected.cls else None,
        "status": "ok",
        "reason": None,
        "params": selected.params.model_dump(mode="json") if selected.params is not None else selected.raw_params,
        "duration_s": 0.0,
        "metrics": [],
        "findings": [],
        "artifacts": [],
        "error": None,
    }


def failed_record(selected: SelectedCheck, error: BaseException) -> dict[str, Any]:
    """The ``error`` record of a check that could not run at all (e.g. its Ray worker died)."""
    record = _base_record(selected)
    record["status"] = "error"
    record["error"] = _error_record(error)
    return record


def execute_check(selected: SelectedCheck, ctx: AuditContext) -> dict[str, Any]:
    """Run one check; never raises for a failure inside the check."""
    record = _base_record(selected)
    if selected.cls is None:
        assert selected.broken is not None
        record["status"] = "error"
        record["error"] = {
            "type": "PluginLoadError",
            "message": f"{selected.broken.target}: {selected.broken.reason}",
            "where": [],
        }
        return record
    needs: Needs = selected.cls.needs
    refusal = selected.cls.refusal(selected.id, ctx.task, ctx.spatial_dims)
    if refusal is not None:
        record["status"], record["reason"] = "skipped", refusal
        return record
    if needs.train and not ctx.has_split("train"):
        record["status"], record["reason"] = (
            "skipped",
            "no train split (set data.splits.train in the spec)",
        )
        return record
    started = time.perf_counter()
    view = ctx.for_check(selected.cls)
    try:
        result = selected.cls().run(view, selected.params)
        if not isinstance(result, CheckResult):
            raise TypeError(f"run() returned {type(result).__name__}, expected CheckResult")
        undeclared = sorted({m.name for m in result.metrics} - set(selected.cls.emits))
        if undeclared:
            log.warning(
                "check %s emitted metrics it does not declare in `emits`: %s",
                selected.id,
                undeclared,
            )
        record["metrics"] = [m.to_json() for m in result.metrics]
        record["findings"] = jsonable(result.findings)
        record["artifacts"] = [a.to_json() for a in result.artifacts]
    except Skip as skip:
        record["status"], record["reason"] = "skipped", str(skip)
    except Exception as error:
        log.error("check %s failed: %s: %s", selected.id, type(error).__name__, error)
        record["status"] = "error"
        record["error"] = _error_record(error)
    if view.undeclared:
        record["undeclared_reads"] = list(view.undeclared)
    record["duration_s"] = round(time.perf_counter() - started, 4)
    return record


def _fingerprint(spec: AuditSpec, selected: SelectedCheck, inputs: dict[str, str | None]) -> str:
    return sha256_json(
        {
            "auditkit": __version__,
            "check": selected.id,
            "params": selected.params.model_dump(mode="json") if selected.params is not None else None,
            "spec": {k: v for k, v in spec.to_yaml_dict().items() if k not in ("output", "policy", "checks")},
            "inputs": inputs,
        }
    )


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    import json

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if saved.get("fingerprint") != fingerprint or saved.get("record", {}).get("status") == "error":
        return None
    record: dict[str, Any] = saved["record"]
    return record


def _reference_adapter(spec: AuditSpec, model: ModelAdapter, options: RunOptions) -> ModelAdapter | None:
    """The adapter of ``model.reference``, its outputs' shape held to the model's on two mid-grey
    inputs of the spec's shape; ``None`` without a reference."""
    import torch

    reference_spec = spec.reference_spec()
    if reference_spec is None:
        return None
    try:
        reference = ModelAdapter(
            reference_spec,
            batch_size=options.batch_size,
            device=options.device,
            options=InferenceOptions(precision="fp32", channels_last=options.channels_last, workers=options.workers),
        )
    except (ModelLoadError, ConfigError) as error:
        raise ModelLoadError(f"model.reference: {error}") from None
    shape = (2, spec.model.input.channels, *spec.model.input.spatial)
    grey = torch.full(shape, 0.5)
    with torch.inference_mode():
        try:
            expected = model._forward_batch(grey, features=False)[0].shape
            got = reference._forward_batch(grey, features=False)[0].shape
        except ModelLoadError as error:
            raise ModelLoadError(f"model.reference: {error}") from None
    if tuple(got) != tuple(expected):
        raise ModelLoadError(
            f"model.reference returns outputs of shape {tuple(got)} for two inputs of the spec's shape, the model"
            f" {tuple(expected)}; the reference must be the model the artefact was exported from"
        )
    return reference


def run_audit(
    spec: AuditSpec,
    options: RunOptions | None = None,
    *,
    checks: Mapping[str, type[Check[Any]]] | None = None,
) -> AuditOutcome:
    """Run the audit described by ``spec`` and write ``results.json``.

    Args:
        spec: the validated spec.
        options: command-line overrides.
        checks: the checks to choose from (default: every installed check).

    Raises:
        ConfigError, InputError: usage or input problems (exit code 2).
    """
    options = options or RunOptions()
    release_large_allocations()  # freed batches go back to the system, not to a growing heap
    reset_peak_rss()
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    broken: list[BrokenCheck] = []
    if checks is None:
        checks, broken = discover()
    selection = choose_checks(spec, checks, broken, only=options.only, skip=options.skip)
    selected = selection.checks
    policy, policy_text = load_policy(spec.policy, base_dir=spec.base_dir)
    attestations = (
        load_attestations(spec.attestations_path, load_framework(policy.framework))
        if spec.attestations_path is not None
        else []
    )

    out_dir = (options.out_dir or spec.output_dir).resolve()
    checkpoints = out_dir / "checkpoints"
    if not options.resume:
        for stale in (checkpoints, out_dir / "artifacts"):
            if stale.is_dir():
                shutil.rmtree(stale)
    checkpoints.mkdir(parents=True, exist_ok=True)

    weights = spec.weights_path
    adapter_args: dict[str, Any] = {
        "batch_size": options.batch_size,
        "device": options.device,
        "options": InferenceOptions(
            precision=options.precision, channels_last=options.channels_last, workers=options.workers
        ),
    }
    model = ModelAdapter(spec, **adapter_args)
    preflight = run_preflight(model)
    bundle = model.bundle
    if bundle is not None and bundle.claims:  # a MONAI bundle's eval_metrics; the spec's claims win
        claims = {**bundle.claims, **(spec.model.claims or {})}
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"claims": claims})})
    reference = _reference_adapter(spec, model, options)
    inputs = {
        "manifest_sha256": sha256_file(spec.manifest_path) if spec.manifest_path.is_file() else None,
        "weights_sha256": sha256_path(weights) if weights is not None else None,
    }
    plan = Plan.of(selected, spec.model.task, spec.spatial_dims)
    executor = _executor(spec, options)
    pixel_dir = out_dir / ".pixels"  # scratch: removed when the checks are done, whatever happened
    with executor if executor is not None else nullcontext(), _scratch(pixel_dir):
        decode_started = time.perf_counter()
        dataset = load_dataset(
            spec,
            roles=list(plan.roles),
            progress=options.progress,
            keep_headers=plan.headers,
            mapper=executor.map_rows if executor is not None else None,
            pixels=options.pixels,
            pixel_dir=pixel_dir,
        )
        decode_s = time.perf_counter() - decode_started
        coverage = split_coverage(dataset)
        require_readable_eval(coverage, data_root=str(spec.data_root), manifest=spec.manifest_path.name)
        shared_pass = executor.shared_pass(spec, model, adapter_args) if executor is not None else None
        ctx = AuditContext(
            spec, model, dataset, out_dir, progress=options.progress, reference=reference, shared_pass=shared_pass
        )

        records: dict[str, dict[str, Any]] = {}
        fingerprints = {s.id: _fingerprint(spec, s, inputs) for s in selected}
        resumed: list[str] = []
        if options.resume:
            for s in selected:
                record = _load_checkpoint(checkpoints / f"{s.id}.json", fingerprints[s.id])
                if record is not None:
                    records[s.id] = {**record, "resumed": True}
                    resumed.append(s.id)
        pending = [s for s in selected if s.id not in records]
        try:
            remaining = Plan.of(pending, spec.model.task, spec.spatial_dims)
            if shared_pass is not None:  # every split through one pipeline: one start of the model actors
                planned = [name for name in remaining.pass_splits(dataset) if name in dataset.splits]
                shared_pass.prefetch(
                    {name: dataset.splits[name].images for name in planned}, features=remaining.features
                )
            ctx.prepare(remaining.pass_splits(dataset), features=remaining.features)
        except Exception as error:  # the preflight passed: the failure depends on the images themselves
            if is_out_of_memory(error):
                raise
            raise ModelLoadError(
                f"the model failed in the shared pass over the study's images ({type(error).__name__}:"
                f" {first_line(error)}); it ran on the preflight's mid-grey images, so the failure depends on"
                " the image content"
            ) from error

        if executor is not None and pending:  # each check a Ray task, independent ones side by side
            import torch

            outputs, with_features = ctx.shared_outputs()
            seed = CheckSeed(
                spec=spec,
                adapter_args=adapter_args,
                options=replace(options, progress=None),
                dataset=dataset,
                out_dir=out_dir,
                outputs=outputs,
                with_features=with_features,
                torch_threads=torch.get_num_threads(),
                header_chunk=ctx.header_chunk,
            )
            finished = _on_ray(executor, pending, seed, model)
        else:
            finished = _in_process(pending, ctx)
        for s, record in finished:  # checkpointed as each finishes, so --resume keeps it
            records[s.id] = record
            write_json_atomic(checkpoints / f"{s.id}.json", {"fingerprint": fingerprints[s.id], "record": record})
        # Ray stays up while the checks run (a split read late is still passed on it), not for
        # the judging and the report.
        executor_record = executor.description if executor is not None else {"kind": "local"}

    check_records = [coverage_record(coverage), *(records[s.id] for s in selected)]
    emitters = {name: cid for cid, cls in checks.items() for name in cls.emits}
    emitters.update({name: CoverageCheck.id for name in CoverageCheck.emits})
    judged = evaluate(
        policy,
        check_records,
        attestations=attestations,
        emitters=emitters,
        not_run=selection.not_run,
        task=spec.model.task,
        spatial_dims=spec.spatial_dims,
        has_reference=spec.model.reference is not None,
    )
    finished_at = datetime.now(UTC)
    results = assemble(
        run=run_section(
            run_id=uuid.uuid4().hex,
            started_at=started_at.isoformat(timespec="seconds"),
            finished_at=finished_at.isoformat(timespec="seconds"),
            duration_s=round(time.perf_counter() - started, 3),
            version=__version__,
            command=options.argv or sys.argv,
            seed=spec.seed,
            model=model,
            images_decoded=dataset.images_decoded,
            decode_s=decode_s,
            resumed=resumed,
            selection=selection.to_json(),
            peak_rss_mib=peak_rss_mib(),
            executor=executor_record,
            pixels=pixel_record(dataset.pixel_file),
            frameworks=spec.frameworks,
        ),
        model=model_section(spec, model, preflight, inputs["weights_sha256"], reference=reference),
        data=data_section(spec, dataset, coverage, inputs["manifest_sha256"]),
        checks=check_records,
        judged=judged,
        policy_source=spec.policy,
        policy_sha256=sha256_text(policy_text),
    )
    write_bundle(out_dir, results, spec=spec, report=options.report, pdf=options.pdf)
    return AuditOutcome(results=results, out_dir=out_dir, exit_code=exit_code_for(results))


@contextmanager
def _scratch(folder: Path) -> Iterator[None]:
    """Remove ``folder`` (the decoded pixels on disk) when the block ends."""
    try:
        yield
    finally:
        remove_pixel_files(folder)


def _in_process(pending: Sequence[SelectedCheck], ctx: AuditContext) -> Iterator[tuple[SelectedCheck, dict[str, Any]]]:
    """Each check in this process, in order."""
    for s in pending:
        log.info("running check %s", s.id)
        yield s, execute_check(s, ctx)


def _on_ray(
    executor: RayExecutor, pending: Sequence[SelectedCheck], seed: CheckSeed, model: ModelAdapter
) -> Iterator[tuple[SelectedCheck, dict[str, Any]]]:
    """Each check as a Ray task, as they finish; what the workers' adapters forwarded is counted
    in ``model.stats``."""
    for s, record, stats in executor.run_checks(pending, seed):
        if stats is not None:
            model.stats.merge_counts(stats)
        yield s, record


def _executor(spec: AuditSpec, options: RunOptions) -> RayExecutor | None:
    """The executor of the spec, with the command line's overrides."""
    chosen = spec.executor
    if options.executor is not None or options.ray_address is not None:
        kind = options.executor or "ray"
        if kind == "local" and options.ray_address is not None:
            raise ConfigError("--ray-address needs --executor ray (or none)")
        update: dict[str, Any] = {"kind": kind}
        if kind == "local":
            update.update(address=None, num_cpus=None)
        elif options.ray_address is not None:  # a cluster's own CPUs, not a local instance's
            update.update(address=options.ray_address, num_cpus=None)
        chosen = ExecutorSpec.model_validate({**chosen.model_dump(), **update})
    return open_executor(chosen)


def exit_code_for(results: Mapping[str, Any]) -> int:
    """3 when a check errored, else 1 when the policy failed, else 0."""
    if any(c.get("status") == "error" for c in results.get("checks", [])):
        return EXIT_CHECK_ERROR
    return EXIT_POLICY_FAILED if results.get("verdict") == "fail" else EXIT_PASS
