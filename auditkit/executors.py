"""Where the decode and the shared pass run: in-process (the default) or on a Ray cluster.

An executor offers two things to the runner (:func:`auditkit.runner.run_audit`):

* ``map_rows(function, items)``: ``function`` of every item, in the items' order. The local
  executor maps on the decoder's thread pool (:func:`auditkit.data.decode_all`'s default); Ray's
  runs a Ray Data pipeline over the row ids (CPU tasks), and the results are joined by row id;
* ``shared_pass``: the shared pass (:class:`RayPass`, with the signature of
  :meth:`auditkit.model.ModelAdapter.forward_pass`). It sends every planned split's images with
  their row ids through one pipeline of model actors (``map_batches``), each a
  :class:`~auditkit.model.ModelAdapter` built from the same spec and options, so precision, the
  parity check, channels_last and the batch halving on out-of-memory are the local pass's;
  outputs are joined by row id.

Exactly once: every output row carries its input's row id, and a join that finds an id twice,
misses one or meets an unknown one is an error (:class:`ExecutorError`) naming the ids, never a
padded, shortened or doubled result.

* ``run_checks``: every pending check as a Ray task (:meth:`RayExecutor.run_checks`) with the
  resources its class declares (:class:`auditkit.check.Resources`: CPUs, and a GPU for the
  attacks, ODIN, the corruptions and the trigger search where the cluster has one, and for the
  leakage check's fingerprint search in a large study: :meth:`auditkit.check.Check.resources_for`),
  independent checks in parallel. A task rebuilds the check's context in its worker from a
  :class:`CheckSeed` put once in the object store (the spec, the decoded dataset, the shared
  pass's outputs, the arguments to load the model again: an adapter holds hooks and a device, so
  it is not sent) and returns the same record :func:`auditkit.runner.execute_check` returns
  locally; the driver checkpoints each as it arrives. A check that raises gives the same ``error`` record as
  locally; a worker that dies gives an ``error`` record naming what Ray reported.

Ray is optional (``pip install auditkit[ray]``): only :class:`RayExecutor` imports it, when the
spec or the command line asks for it.
"""

from __future__ import annotations

import logging
import pickle
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from auditkit.errors import ConfigError
from auditkit.model import first_line
from auditkit.pixels import DiskPixels

if TYPE_CHECKING:
    from auditkit.context import HeaderFiles
    from auditkit.data import Dataset
    from auditkit.model import ModelAdapter, PassStats
    from auditkit.runner import RunOptions, SelectedCheck
    from auditkit.spec import AuditSpec, ExecutorSpec

__all__ = ["CheckSeed", "ExecutorError", "RayExecutor", "RayPass", "check_exactly_once", "open_executor"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

CONNECT_TIMEOUT_S = 5.0
"""Seconds a cluster address gets to accept a TCP connection before the audit stops (exit 2)."""

ROWS_PER_TASK = 16
"""Rows one decode task handles (Ray Data batch size of the decode stage)."""


class ExecutorError(RuntimeError):
    """The distributed pass lost, doubled or invented rows."""


def check_exactly_once(ids: Sequence[int], n: int, what: str) -> np.ndarray:
    """The order that sorts ``ids`` into ``0 .. n-1``; an :class:`ExecutorError` naming the
    missing, repeated or unknown ids otherwise."""
    array = np.asarray(ids, dtype=np.int64)
    counts = np.bincount(array[(array >= 0) & (array < n)], minlength=n)
    unknown = sorted({int(i) for i in array if not 0 <= i < n})
    missing = np.flatnonzero(counts == 0).tolist()
    repeated = np.flatnonzero(counts > 1).tolist()
    if unknown or missing or repeated:
        raise ExecutorError(
            f"{what}: expected each of {n} row ids once; missing {missing[:10]}, repeated {repeated[:10]},"
            f" unknown {unknown[:10]}"
        )
    return np.argsort(array, kind="stable")


def _reachable(address: str) -> None:
    """Raise :class:`ConfigError` naming ``address`` unless it accepts a TCP connection."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"executor.address: expected host:port, ray://host:port or auto, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise ConfigError(
            f"executor.address: the Ray cluster at {address} cannot be reached ({error.strerror or error});"
            " start it (`ray start --head`) or leave the address out to start a local instance"
        ) from None


class _ModelActor:
    """One model replica of the shared pass (a Ray Data actor).

    Its batches carry the images themselves, or, when every split's pixels are in the scratch file
    (``sources``: each split's :class:`~auditkit.pixels.DiskPixels` and its first global row id),
    only the row ids: the actor reads those rows from the file, so the driver never holds a split.
    """

    def __init__(
        self,
        spec: AuditSpec,
        adapter_args: dict[str, Any],
        features: bool,
        sources: list[tuple[int, DiskPixels]] | None = None,
    ) -> None:
        from auditkit.model import ModelAdapter

        self.adapter = ModelAdapter(spec, **adapter_args)
        self.features = features
        self.sources = sources

    def _read(self, rows: np.ndarray) -> torch.Tensor:
        """The images of these global row ids, in their order, read from each split's file rows."""
        assert self.sources is not None
        starts = np.asarray([start for start, _ in self.sources])
        which = np.searchsorted(starts, rows, side="right") - 1
        images: torch.Tensor | None = None
        for k in np.unique(which):
            where = np.flatnonzero(which == k)
            start, pixels = self.sources[int(k)]
            part = pixels[rows[where] - start]
            if images is None:
                images = torch.empty((rows.size, *part.shape[1:]), dtype=part.dtype)
            images[torch.from_numpy(where)] = part
        assert images is not None
        return images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.sources is not None:
            images = self._read(np.asarray(batch["row"], dtype=np.int64))
        else:
            images = torch.from_numpy(np.stack(list(batch["image"])))
        logits, embeddings = self.adapter.forward_pass(images, features=self.features)
        return {
            "row": np.asarray(batch["row"], dtype=np.int64),
            "logits": logits.float().numpy(),
            "embedding": embeddings.float().numpy(),
        }


class RayExecutor:
    """The decode and the shared pass on Ray (see the module docstring); a context manager that
    connects to ``spec.address`` or starts a local instance, and stops what it started."""

    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        self._started = False
        self._ray: Any = None
        self._check_tasks: dict[str, dict[str, float]] = {}

    def __enter__(self) -> RayExecutor:
        try:
            import ray
            import ray.data
        except ImportError:
            raise ConfigError(
                "executor: kind ray needs Ray: pip install 'auditkit[ray]' (or run with --executor local)"
            ) from None
        address = self.spec.address
        if address not in (None, "auto"):
            _reachable(address)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            try:
                if address is None:
                    ray.init(num_cpus=self.spec.num_cpus, **kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except ConnectionError as error:
                raise ConfigError(f"executor.address: no Ray cluster at {address} ({error})") from None
            self._started = True
        for name in ("ray", "ray.data"):  # the audit's own log says what ran; Ray's INFO lines are noise
            logging.getLogger(name).setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        self._ray = ray
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._started = False

    @property
    def ray(self) -> Any:
        """The ``ray`` module, once connected."""
        if self._ray is None:
            raise RuntimeError("the Ray executor is used outside its `with` block")
        return self._ray

    @property
    def description(self) -> dict[str, Any]:
        """What ``results.json`` records of the executor."""
        resources = self._ray.cluster_resources() if self._ray is not None else {}
        return {
            "kind": "ray",
            "address": self.spec.address or "local instance",
            "ray_version": getattr(self._ray, "__version__", None),
            "cluster_cpus": resources.get("CPU"),
            "cluster_gpus": resources.get("GPU", 0.0),
            "model_actors": self.spec.model_actors,
            # Each check ran as a Ray task with these resources (a GPU only where the cluster has one).
            "check_tasks": dict(self._check_tasks),
        }

    def map_rows(self, function: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``function`` of each item, computed in Ray Data tasks over row ids, joined by id."""
        if not items:
            return []
        data = self.ray.data
        captured = list(items)

        def run(batch: dict[str, np.ndarray]) -> dict[str, Any]:
            rows = [int(r) for r in batch["row"]]
            return {
                "row": np.asarray(rows, dtype=np.int64),
                "result": [pickle.dumps(function(captured[r])) for r in rows],
            }

        dataset = data.from_items([{"row": i} for i in range(len(captured))])
        out = dataset.map_batches(run, batch_size=ROWS_PER_TASK, batch_format="numpy").take_all()
        order = check_exactly_once([int(r["row"]) for r in out], len(captured), "decode")
        return [pickle.loads(out[int(k)]["result"]) for k in order]

    def run_checks(
        self, pending: Sequence[SelectedCheck], seed: CheckSeed
    ) -> Iterator[tuple[SelectedCheck, dict[str, Any], PassStats | None]]:
        """Each check of ``pending`` as a Ray task, all submitted at once (Ray runs as many side by
        side as the declared resources allow); yields ``(check, record, worker's pass stats)`` in
        the order they finish. A task whose worker died yields an ``error`` record and no stats."""
        from auditkit.check import Resources
        from auditkit.runner import failed_record

        ray = self.ray
        has_gpus = float(ray.cluster_resources().get("GPU", 0.0)) > 0
        payload = ray.put(seed)
        task = ray.remote(_check_task)
        submitted: dict[Any, SelectedCheck] = {}
        images = {role: split.n for role, split in seed.dataset.splits.items()}
        for selected in pending:
            wants = selected.cls.resources_for(images) if selected.cls is not None else Resources()
            asked = {"num_cpus": wants.cpus, "num_gpus": wants.gpus if has_gpus else 0.0}
            self._check_tasks[selected.id] = asked
            # No retry: a check that killed its worker would kill the next one too.
            remote = task.options(**asked, max_retries=0, name=f"auditkit check {selected.id}")
            submitted[remote.remote(selected, payload)] = selected
        waiting = list(submitted)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            selected = submitted[done[0]]
            try:
                record, stats = ray.get(done[0])
            except Exception as error:  # the task never returned: its worker died or could not start
                log.error("check %s: its Ray task failed: %s", selected.id, first_line(error))
                yield selected, failed_record(selected, error), None
                continue
            yield selected, record, stats

    def shared_pass(self, spec: AuditSpec, model: ModelAdapter, adapter_args: dict[str, Any]) -> RayPass:
        """The shared pass in model actors (:class:`RayPass`), counted into ``model.stats``."""
        return RayPass(self, spec, model, adapter_args)


class RayPass:
    """The shared pass in Ray model actors, with :meth:`~auditkit.model.ModelAdapter.forward_pass`'s
    signature (``__call__``). :meth:`prefetch` runs several splits through one pipeline (one pool
    of model actors, started once); a split's call then returns its prefetched outputs."""

    def __init__(
        self, executor: RayExecutor, spec: AuditSpec, model: ModelAdapter, adapter_args: dict[str, Any]
    ) -> None:
        self._executor = executor
        self._spec = spec
        self._model = model
        self._adapter_args = adapter_args
        self._ready: dict[str, tuple[torch.Tensor, torch.Tensor, bool, float]] = {}

    def _run(
        self, images: dict[str, torch.Tensor | DiskPixels], features: bool
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """One pipeline over every split's rows (global row ids), outputs split back by id."""
        ray = self._executor.ray
        started = time.perf_counter()
        offsets = np.cumsum([0] + [t.shape[0] for t in images.values()])
        n = int(offsets[-1])
        sources: list[tuple[int, DiskPixels]] | None = None
        if all(isinstance(t, DiskPixels) for t in images.values()):
            # Pixels on disk stay there: the actors read their rows from the scratch file (a file
            # system the driver and the actors share: one machine, or a shared mount).
            sources = [(int(offsets[k]), t) for k, t in enumerate(images.values()) if isinstance(t, DiskPixels)]
            items: list[dict[str, Any]] = [{"row": i} for i in range(n)]
        else:
            arrays = [t.numpy() for t in images.values()]
            items = [
                {"row": int(offsets[k]) + i, "image": a[i]} for k, a in enumerate(arrays) for i in range(a.shape[0])
            ]
        out = (
            ray.data.from_items(items)
            .map_batches(
                _ModelActor,
                fn_constructor_args=(self._spec, self._adapter_args, features, sources),
                batch_size=self._model.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self._executor.spec.model_actors),
                num_gpus=1 if self._model.device.type == "cuda" else 0,
            )
            .take_all()
            if n
            else []
        )
        order = check_exactly_once([int(r["row"]) for r in out], n, f"shared pass {', '.join(images)}")
        elapsed = time.perf_counter() - started
        results: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for k, name in enumerate(images):
            rows = order[offsets[k] : offsets[k + 1]]
            if rows.size == 0:
                results[name] = (torch.empty(0, len(self._model.classes)), torch.empty(0, 0), 0.0)
                continue
            logits = torch.from_numpy(np.stack([out[int(r)]["logits"] for r in rows]))
            embeddings = torch.from_numpy(np.stack([out[int(r)]["embedding"] for r in rows]))
            results[name] = (logits, embeddings, elapsed * rows.size / max(n, 1))
        return results

    def prefetch(self, images: dict[str, torch.Tensor | DiskPixels], *, features: bool) -> None:
        """Run these splits' passes now, in one pipeline; each split's call returns its outputs."""
        for name, (logits, embeddings, seconds) in self._run(images, features).items():
            self._ready[name] = (logits, embeddings, features, seconds)

    def __call__(
        self,
        images: torch.Tensor | DiskPixels,
        *,
        split: str = "",
        progress: Callable[[int], None] | None = None,
        features: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ready = self._ready.pop(split, None)
        if ready is not None and ready[0].shape[0] == images.shape[0] and (ready[2] or not features):
            logits, embeddings, _, seconds = ready
        else:
            key = split or "split"
            logits, embeddings, seconds = self._run({key: images}, features)[key]
        self._model.stats.add_images(split, images.shape[0])
        self._model.stats.add_seconds(split, seconds)
        if progress is not None:
            progress(images.shape[0])
        return logits, embeddings


@dataclass
class CheckSeed:
    """What a check run as a Ray task rebuilds its context from, in its worker."""

    spec: AuditSpec
    adapter_args: dict[str, Any]
    """:class:`~auditkit.model.ModelAdapter`'s keyword arguments, as the driver loaded the model."""
    options: RunOptions
    """The run's options without the progress callback (for the reference adapter's)."""
    dataset: Dataset
    out_dir: Path
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """The shared pass's logits and embeddings per split (:meth:`AuditContext.shared_outputs`)."""
    with_features: dict[str, bool]
    torch_threads: int
    """The driver's intra-op threads: the same thread count gives the same floating-point sums."""
    header_chunk: int
    """Files per Ray task of the check's header reads (:meth:`AuditContext.map_headers`)."""


def _check_task(selected: SelectedCheck, seed: CheckSeed) -> tuple[dict[str, Any], PassStats]:
    """Run one check in a Ray worker: its record, and what the worker's adapter forwarded."""
    from auditkit.context import AuditContext
    from auditkit.model import ModelAdapter
    from auditkit.runner import _reference_adapter, execute_check

    torch.set_num_threads(seed.torch_threads)
    model = ModelAdapter(seed.spec, **seed.adapter_args)
    needs_reference = selected.cls is not None and selected.cls.needs.reference
    reference = _reference_adapter(seed.spec, model, seed.options) if needs_reference else None
    ctx = AuditContext(seed.spec, model, seed.dataset, seed.out_dir, reference=reference)
    ctx.adopt_outputs(seed.outputs, seed.with_features)
    ctx.header_mapper, ctx.header_chunk = _header_tasks, seed.header_chunk
    return execute_check(selected, ctx), model.stats


def _header_tasks(work: Callable[[HeaderFiles], list[Any]], chunks: list[HeaderFiles]) -> Iterator[list[Any]] | None:
    """A check's header reads (:meth:`AuditContext.map_headers`): a Ray task per chunk of files,
    all submitted now, the results handed over in the chunks' order as they come. ``None`` (the
    check's process reads them) when no CPU of the cluster is free: with every CPU busy the
    tasks would only add their start. While the check's task waits for them, Ray lends its CPU to
    them."""
    import ray as ray_module

    ray: Any = ray_module
    if float(ray.available_resources().get("CPU", 0.0)) < 1.0:
        return None
    # No retry: a file that killed its reader would kill the next one too.
    remote = ray.remote(_run_work).options(num_cpus=1, max_retries=0, name="auditkit header reads")
    return _in_chunk_order(ray, [remote.remote(work, chunk) for chunk in chunks])


def _in_chunk_order(ray: Any, refs: list[Any]) -> Iterator[list[Any]]:
    """Each task's result in order, its reference dropped once handed over (``refs`` is consumed),
    so the object store can free it. A task that failed raises its own error (the exception the
    reader raised, as the check's process would have, or Ray's for a dead worker); the tasks not
    yet read are cancelled then, and when the caller stops early."""
    pending = refs
    pending.reverse()
    try:
        while pending:
            ref = pending[-1]
            try:
                output: list[Any] = ray.get(ref)
            except ray.exceptions.RayTaskError as error:  # the reader's own exception, as locally
                cause = getattr(error, "cause", None)
                raise (cause if isinstance(cause, Exception) else error.as_instanceof_cause()) from None
            pending.pop()
            yield output
    finally:
        for ref in pending:
            ray.cancel(ref)


def _run_work(work: Callable[[HeaderFiles], list[Any]], chunk: HeaderFiles) -> list[Any]:
    return work(chunk)


def open_executor(spec: ExecutorSpec) -> RayExecutor | None:
    """The executor a spec names: ``None`` for ``local`` (the runner's in-process path)."""
    return RayExecutor(spec) if spec.kind == "ray" else None
