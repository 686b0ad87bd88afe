"""The shared inference context (docs/architecture.md, "The shared pass and the context").

:class:`AuditContext` is the engine's: the model adapter, the decoded splits, and what is computed
once per run — logits, probabilities and embeddings from ONE forward pass per split, header-only
DICOM reads. The runner asks every selected check what it needs (:class:`auditkit.check.Needs`)
and calls :meth:`AuditContext.prepare` before the first check, so no check triggers a second pass.

A check never sees it: it gets a :class:`CheckView` (:meth:`AuditContext.for_check`), the
:class:`auditkit.check.CheckContext` bound to the check's id and held to its ``needs``.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import numpy as np
import torch

from auditkit.check import (
    NO_GRADIENTS,
    NO_REFERENCE,
    Artifact,
    InputGeometry,
    Needs,
    Predictions,
    QuarantinedRow,
    SplitRows,
)
from auditkit.data import Dataset, SplitData
from auditkit.errors import Skip, UndeclaredRead
from auditkit.model import ModelAdapter
from auditkit.pixels import DiskPixels
from auditkit.spec import AuditSpec
from auditkit.stats import stable_seed

if TYPE_CHECKING:
    import pydicom
    from torch import nn

    from auditkit.check import Check

__all__ = ["AuditContext", "CheckView", "Predictions", "serial_blas"]

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Callable[[int], None] | None]

_P = ParamSpec("_P")
_R = TypeVar("_R")

HEADER_CHUNK = 512
"""Files :meth:`AuditContext.map_headers` reads per chunk (about 1.5 s of reading and judging on
one core: long enough to pay a Ray task's start, short enough to spread a study's reads)."""

SERIES_CHUNK = 8
"""Series :meth:`AuditContext.map_headers` reads per chunk with ``slices`` (every slice's file:
a few hundred files a series in a CT study)."""

HeaderFiles = list[tuple[str, str]]
"""One chunk of :meth:`AuditContext.map_headers`: ``(path, kind)`` of each file."""
HeaderMapper = Callable[[Callable[[HeaderFiles], list[Any]], list[HeaderFiles]], Iterator[list[Any]] | None]
"""``mapper(work, chunks)``: ``work`` of every chunk, in the chunks' order as they come, or
``None`` when it declines (the chunks are then read in the caller's process)."""


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # inspecting the loaded libraries costs ~0.1 s: once per process


def serial_blas(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``function`` with NumPy/SciPy's BLAS and LAPACK on one thread (PyTorch's are untouched).

    A check's linear algebra is small (embeddings of a few thousand images by a few hundred
    dimensions, covariance matrices of that side): threaded OpenBLAS gains nothing there, and on
    cores shared with other work (or with PyTorch's own threads) its spinning threads made one
    245x512 SVD take 1.5 to 3.7 s instead of 0.03 s on a two-core Xeon. The runner runs checks
    one after another, so the limit never starves a concurrent pass.
    """

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _blas_controller().limit(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapper


def scores_of(logits: torch.Tensor, task: str) -> np.ndarray:
    """float64 scores of ``(N, K)`` outputs: softmax (classification), sigmoid (multilabel), the
    values themselves (regression); segmentation: float32 softmax over the classes of every pixel
    ``(N, K, *spatial)`` (no float64 copy of the voxels)."""
    if task == "segmentation":
        return torch.softmax(logits.float(), dim=1).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        if task == "multilabel":
            return torch.sigmoid(logits.double()).numpy()
        if task == "regression":
            return logits.double().numpy().copy()
        return torch.softmax(logits.double(), dim=1).numpy()


class AuditContext:
    """What every check sees.

    Args:
        spec: the validated audit spec.
        model: the loaded model adapter.
        dataset: decoded splits and the quarantine list.
        out_dir: the evidence bundle folder (artifacts go to ``out_dir/artifacts/<check>/``).
        progress: optional progress-bar factory ``(label, total) -> callback(n)``.
    """

    def __init__(
        self,
        spec: AuditSpec | None,
        model: ModelAdapter | None,
        dataset: Dataset,
        out_dir: Path,
        *,
        progress: ProgressFactory | None = None,
        seed: int | None = None,
        classes: list[str] | None = None,
        positive_index: int | None = None,
        group_columns: list[str] | None = None,
        geometry: InputGeometry | None = None,
        operating_point: dict[str, float] | None = None,
        claims: dict[str, Any] | None = None,
        task: str = "classification",
        units: dict[str, str] | None = None,
        reference: ModelAdapter | None = None,
        shared_pass: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.spec = spec
        self._model = model
        self._shared_pass = shared_pass
        """Runs the shared pass instead of ``model.forward_pass`` (same signature): an executor's
        (:mod:`auditkit.executors`); other passes (built-in sets, corruptions) stay in-process."""
        self.reference = reference
        """The adapter of ``model.reference`` (``None`` without one)."""
        self._reference_predictions: dict[str, Predictions] = {}
        self.dataset = dataset
        self.out_dir = out_dir
        self._progress = progress
        if spec is not None:
            from auditkit.data import window_setting

            shape = spec.model.input
            seed, classes, positive_index = spec.seed, list(spec.model.classes), spec.model.positive_index
            group_columns = list(spec.data.groups)
            operating_point, claims = spec.model.operating_point, spec.model.claims
            task = spec.model.task
            units = {c: u for c in classes if (u := spec.model.unit_of(c)) is not None}
            geometry = InputGeometry(shape.channels, shape.height, shape.width, window_setting(spec), shape.depth)
        if classes is None or seed is None:
            raise ValueError("an AuditContext without a spec needs classes and a seed")
        self.seed = seed
        self._classes = classes
        self._positive_index = positive_index
        self.group_columns = group_columns or []
        self.geometry = geometry
        self.operating_point = dict(operating_point or {})
        self.claims = dict(claims or {})
        self.task = task
        self.units = dict(units or {})
        self.spatial_dims = 2 if geometry is None or geometry.depth is None else 3
        self._outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._with_features: dict[str, bool] = {}
        self._predictions: dict[str, Predictions] = {}
        self._raw_headers: dict[str, _SplitHeaders] = {}
        self.header_mapper: HeaderMapper | None = None
        """Runs :meth:`map_headers`' chunks of files elsewhere (on Ray: in Ray tasks,
        :mod:`auditkit.executors`); ``None``: one after the other in this process."""
        self.header_chunk = HEADER_CHUNK
        """Files read per chunk of :meth:`map_headers`."""
        self.series_chunk = SERIES_CHUNK
        """Series read per chunk of :meth:`map_headers` with ``slices``."""

    # ----------------------------------------------------------------- splits and labels
    @property
    def model(self) -> ModelAdapter:
        if self._model is None:
            raise Skip("this context has no model")
        return self._model

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def positive_index(self) -> int | None:
        return self._positive_index

    @property
    def device(self) -> torch.device:
        return self._model.device if self._model is not None else torch.device("cpu")

    @property
    def split_names(self) -> list[str]:
        return list(self.dataset.splits)

    def has_split(self, split: str) -> bool:
        return split in self.dataset.splits

    @property
    def has_reference(self) -> bool:
        return self.reference is not None

    def split(self, split: str) -> SplitData:
        """The decoded split; a missing ``train`` or OOD split raises :class:`Skip`."""
        try:
            return self.dataset.splits[split]
        except KeyError:
            if split == "train":
                raise Skip("no train split (set data.splits.train in the spec)") from None
            if split.startswith("ood"):
                raise Skip(f"no out-of-distribution set {split!r} (data.ood in the spec)") from None
            raise KeyError(f"unknown split {split!r}; this run has {self.split_names}") from None

    def labels(self, split: str = "eval") -> np.ndarray:
        return self.split(split).labels

    def group_labels(self, split: str = "eval") -> dict[str, np.ndarray]:
        """Group column -> the (banded) group label of each image of the split."""
        return dict(self.split(split).groups)

    def pixels(self, split: str = "eval") -> torch.Tensor | DiskPixels:
        """The split's stored images, unread: the ``float16`` tensor, or its stand-in on disk
        (:class:`auditkit.pixels.DiskPixels`), which reads the rows a caller indexes or slices."""
        return self.split(split).images

    def images(
        self,
        split: str = "eval",
        indices: np.ndarray | Iterable[int] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Decoded images (N, C, H, W) in [0, 1], on the CPU, as ``dtype``.

        ``torch.float16`` is the stored precision: no copy is made, so the caller must not write
        into the result.
        """
        stored = self.split(split).images
        if indices is not None:
            stored = stored[
                torch.as_tensor(
                    np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices),
                    dtype=torch.long,
                )
            ]
        return stored.to(dtype)

    # ----------------------------------------------------------------- the shared pass
    def prepare(self, splits: Iterable[str], *, features: bool = True) -> None:
        """Run the shared forward pass for every listed split not yet cached.

        Args:
            splits: the splits the selected checks read.
            features: also capture embeddings (skip the hook when no selected check reads them).
        """
        for name in splits:
            if name in self.dataset.splits and name not in self._outputs:
                self._forward(name, features=features)

    def shared_outputs(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, bool]]:
        """The shared pass's outputs per split (logits, embeddings) and whether each has embeddings:
        what a context rebuilt in another process (a check run as a Ray task) adopts."""
        return dict(self._outputs), dict(self._with_features)

    def adopt_outputs(
        self, outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], with_features: dict[str, bool]
    ) -> None:
        """Take another context's shared-pass outputs (:meth:`shared_outputs`) instead of running it."""
        self._outputs.update(outputs)
        self._with_features.update(with_features)

    def _forward(self, name: str, *, features: bool = True) -> None:
        split = self.dataset.splits[name]
        callback = self._progress(f"inference {name}", split.n) if self._progress else None
        features = features and self.model.has_features
        forward = self._shared_pass or self.model.forward_pass
        logits, embeddings = forward(split.images, split=name, progress=callback, features=features)
        self._outputs[name] = (logits, embeddings)
        self._with_features[name] = features

    def _cached(self, name: str, *, features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        self.split(name)
        if name not in self._outputs:
            log.debug("split %s was not planned; running its pass now", name)
            self._forward(name, features=True)
        elif features and not self._with_features[name]:
            # A check read embeddings without declaring Needs(features=True): a second pass.
            log.warning("split %s: embeddings were not planned (a check does not declare them); second pass", name)
            self._forward(name, features=True)
        return self._outputs[name]

    def predictions(self, split: str = "eval") -> Predictions:
        """Logits, probabilities (softmax; multilabel: sigmoid; regression: the values) and labels of
        a split (computed once, cached)."""
        if split not in self._predictions:
            self._predictions[split] = self._predictions_of(self._cached(split)[0], split)
        return self._predictions[split]

    def _predictions_of(self, logits: torch.Tensor, split: str) -> Predictions:
        return Predictions(logits=logits, probs=scores_of(logits, self.task), labels=self.labels(split), task=self.task)

    def reference_predictions(self, split: str = "eval") -> Predictions:
        """The predictions of ``model.reference`` on a split (its pass run once, counted under
        ``reference:<split>``)."""
        if self.reference is None:
            raise Skip(NO_REFERENCE)
        if split not in self._reference_predictions:
            data = self.split(split)
            callback = self._progress(f"reference {split}", data.n) if self._progress else None
            logits, _ = self.reference.forward_pass(
                data.images, split=f"reference:{split}", progress=callback, features=False
            )
            self._reference_predictions[split] = self._predictions_of(logits, split)
        return self._reference_predictions[split]

    def features(self, split: str = "eval") -> torch.Tensor:
        """Embeddings (N, D) float32 from the same pass as the predictions.

        Raises :class:`Skip` when the model offers none (TorchScript, or no ``nn.Linear`` and no
        ``model.feature_layer``).
        """
        if self._model is None:
            embeddings = self._cached(split)[1]
            if embeddings.shape[1] == 0:
                raise Skip("embeddings unavailable (none given to this context)")
            return embeddings
        if not self.model.has_features:
            raise Skip(f"embeddings unavailable ({self.model.feature_layer})")
        return self._cached(split, features=True)[1]

    def _read_headers(self, split: str) -> _SplitHeaders:
        """A split's DICOM headers, elements left raw: those the decoder kept
        (``load_dataset(..., keep_headers=True)``), the others header-only reads made on each
        access and not held (:class:`_SplitHeaders`)."""
        if split not in self._raw_headers:
            data = self.split(split)
            self._raw_headers[split] = _SplitHeaders(data.headers or {}, data.paths, data.kinds, convert=False)
        return self._raw_headers[split]

    def headers(self, split: str = "eval") -> Sequence[pydicom.Dataset | None]:
        """Header-only DICOM reads (no pixels), ``None`` for non-DICOM or unreadable files.

        Every element is converted (while pydicom is silenced), so any access is safe. A
        sequence: the decoder's kept headers are held, the others are read from their files at
        each access (memory bounded whatever the study's size; iterate once). The datasets hold
        patient data: use them to measure, never copy values into results.
        """
        return self._read_headers(split).converted()

    def series_headers(self, split: str = "eval") -> list[tuple[pydicom.Dataset | None, ...]]:
        """Every file's header of each image, converted as :meth:`headers`' are: a DICOM series'
        slices in position order (``None`` for a slice pydicom cannot convert), a 2-D DICOM
        image's one header, ``()`` for other kinds. Patient data: measure, never report."""
        from auditkit.decode import read_dicom_header
        from auditkit.errors import UnreadableImage

        data = self.split(split)
        kept = data.slice_headers or {}
        firsts = self.headers(split)
        out: list[tuple[pydicom.Dataset | None, ...]] = []
        for position, (path, kind) in enumerate(zip(data.paths, data.kinds, strict=True)):
            if position in kept:
                out.append(tuple(_converted(header) for header in kept[position]))
            elif kind != "dicom-series":
                out.append((firsts[position],) if kind == "dicom" else ())
            else:
                slices: list[pydicom.Dataset | None] = []
                for file in _slice_files(path):
                    try:
                        slices.append(read_dicom_header(file))
                    except UnreadableImage:
                        slices.append(None)
                out.append(tuple(slices))
        return out

    def header_texts(self, split: str, keywords: Iterable[str]) -> list[dict[str, str | None] | None]:
        """Text values of a few header elements per image; ``None`` for non-DICOM or unreadable files.

        Only the named elements are converted (:func:`auditkit.decode.header_texts`), which is
        about three times cheaper than :meth:`headers` for a check that needs a handful of them;
        the files are read once whichever of the two is called first. A value is ``None`` when
        absent, empty, binary or unconvertible. The values are patient data: measure with them,
        never copy them into results.
        """
        wanted = tuple(dict.fromkeys(keywords))
        return list(self.map_headers(split, functools.partial(_texts_of, wanted), convert=False))

    def map_headers(
        self,
        split: str,
        function: Callable[[pydicom.Dataset | None], _R],
        *,
        convert: bool = True,
        slices: bool = False,
    ) -> Iterator[Any]:
        """``function`` of every header of a split, in position order, as they come (``None`` for
        a non-DICOM or unreadable file; each header converted as :meth:`headers`' are, or left raw
        without ``convert``).

        The headers the decoder kept are passed here; the others are read from their files by
        chunks of :attr:`header_chunk`, through :attr:`header_mapper` where there is one (on Ray,
        the chunks run as Ray tasks side by side, each in its own process, when the cluster has a
        CPU free), else one after the other here. The results are joined by chunk, every file
        read once, and handed over a chunk at a time, so a caller that folds them as they come
        holds one chunk's. ``function`` must be picklable (a module-level function, or a
        :func:`functools.partial` of one: checked here without a mapper, so a check that would
        fail on Ray fails locally too) and so must what it returns; it runs where the files are
        read, with pydicom silenced.

        With ``slices``, each image's result is a tuple, as :meth:`series_headers` gives:
        ``function`` of every slice's header of a DICOM series in the slices' file-name order, of
        a 2-D DICOM image's one header, ``()`` for other kinds; series are read
        :attr:`series_chunk` at a time.

        Raises:
            TypeError: ``function`` cannot be pickled.
        """
        import pickle

        try:
            if self.header_mapper is None:  # a mapper ships it itself (Ray: cloudpickle), or says why not
                pickle.dumps(function)
        except Exception as error:
            raise TypeError(
                f"map_headers: {getattr(function, '__qualname__', type(function).__name__)} cannot be pickled"
                f" ({type(error).__name__}); pass a module-level function or a functools.partial of one,"
                " as the Ray tasks that read the files receive it"
            ) from None
        headers = self._read_headers(split)
        kept_slices = (self.split(split).slice_headers or {}) if slices else {}
        files = [
            (position, str(path), kind)
            for position, (path, kind) in enumerate(zip(headers.paths, headers.kinds, strict=True))
            if not _here(position, kind, headers, kept_slices, slices)
        ]
        size = self.series_chunk if slices else self.header_chunk
        chunks = [files[start : start + size] for start in range(0, len(files), size)]
        work = functools.partial(_map_files, function, convert=convert, slices=slices)
        lists = [[(path, kind) for _, path, kind in chunk] for chunk in chunks]
        # The tasks start now, while the kept headers are judged here; a lone chunk is read here
        # (a task's start costs more than it saves), and so is every chunk when the mapper declines.
        streamed = self.header_mapper(work, lists) if self.header_mapper is not None and len(chunks) > 1 else None
        outputs: Iterable[list[Any]] = streamed if streamed is not None else (work(chunk) for chunk in lists)
        return self._in_order(split, headers, kept_slices, function, convert, slices, _joined(split, chunks, outputs))

    @staticmethod
    def _in_order(
        split: str,
        headers: _SplitHeaders,
        kept_slices: Mapping[int, tuple[pydicom.Dataset, ...]],
        function: Callable[[pydicom.Dataset | None], _R],
        convert: bool,
        slices: bool,
        read: Iterator[tuple[int, Any]],
    ) -> Iterator[Any]:
        from auditkit.decode import quiet_pydicom

        of = functools.partial(_apply, function, convert)
        for position, kind in enumerate(headers.kinds):
            if _here(position, kind, headers, kept_slices, slices):
                with quiet_pydicom():
                    if not slices:
                        yield of(headers[position])
                    elif position in kept_slices:
                        yield tuple(of(header) for header in kept_slices[position])
                    else:
                        yield (of(headers[position]),) if kind == "dicom" else ()
                continue
            found, value = next(read, (None, None))
            if found != position:
                raise RuntimeError(f"{split}: the header chunks gave position {found} where {position} was due")
            yield value
        if next(read, None) is not None:
            raise RuntimeError(f"{split}: the header chunks gave more results than files")

    # ----------------------------------------------------------------- per-check helpers
    def rng(self, check_id: str) -> np.random.Generator:
        """A NumPy generator seeded from the spec's seed and the check id (same every run)."""
        return np.random.default_rng(stable_seed(self.seed, check_id))

    def torch_generator(self, check_id: str) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(stable_seed(self.seed, check_id, "torch"))
        return generator

    def artifact_path(self, check_id: str, filename: str) -> tuple[Path, str]:
        """Where a check writes an artifact: (absolute path, path relative to the bundle)."""
        if Path(filename).name != filename or filename.startswith("."):
            raise ValueError(f"artifact names are plain file names, got {filename!r}")
        relative = Path("artifacts") / check_id / filename
        absolute = self.out_dir / relative
        absolute.parent.mkdir(parents=True, exist_ok=True)
        return absolute, relative.as_posix()

    # ----------------------------------------------------------------- what checks see
    def for_check(self, check: type[Check[Any]] | str, needs: Needs | None = None) -> CheckView:
        """The :class:`CheckView` of one check: its id, held to its ``needs``."""
        if isinstance(check, str):
            return CheckView(self, check, needs if needs is not None else Needs())
        return CheckView(self, check.id, needs if needs is not None else check.needs)

    def quarantined_headers(
        self, splits: Iterable[str]
    ) -> Iterable[tuple[QuarantinedRow, pydicom.Dataset | str | None]]:
        """Header-only reads of the quarantined rows of ``splits`` (paths from their manifests)."""
        from auditkit.data import read_manifest
        from auditkit.decode import image_kind, read_dicom_header
        from auditkit.errors import UnreadableImage

        wanted = [q for q in self.dataset.quarantine if q.split in set(splits)]
        if not wanted:
            return
        paths: dict[tuple[str, int], Path] = {}
        main = {row.row: row.path for row in self.dataset.manifest.rows}
        for entry in wanted:
            if entry.split in ("eval", "train") and entry.row in main:
                paths[entry.split, entry.row] = main[entry.row]
        ood_names = {q.split.removeprefix("ood:") for q in wanted if q.split.startswith("ood:")}
        for name in sorted(ood_names if self.spec is not None else ()):
            assert self.spec is not None
            ood = self.spec.data.ood.get(name)
            if ood is None:
                continue
            manifest = read_manifest(
                self.spec.resolve(ood.manifest), root=self.spec.data_root, classes=None, require_label=False
            )
            for row in manifest.rows:
                paths[f"ood:{name}", row.row] = row.path
        for entry in wanted:
            path = paths.get((entry.split, entry.row))
            if path is None:
                continue
            record = QuarantinedRow(entry.split, entry.row, entry.reason)
            try:
                if image_kind(path) != "dicom":
                    yield record, "non-dicom"
                    continue
                yield record, read_dicom_header(path)
            except UnreadableImage:
                yield record, None


def _converted(header: pydicom.Dataset | None) -> pydicom.Dataset | None:
    """``header`` with every element converted (pydicom silenced), or ``None`` when an element
    cannot be: the header is then unreadable."""
    if header is None:
        return None
    from auditkit.decode import convert_elements

    try:
        convert_elements(header)
    except Exception:  # an element pydicom cannot convert: the header is unreadable
        return None
    return header


class _SplitHeaders(Sequence["pydicom.Dataset | None"]):
    """A split's DICOM headers by position: the decoder's kept data sets, else a header-only read
    of the file (a series' first slice by name) at each access, never held; with ``convert``,
    each converted by :func:`_converted` on access."""

    def __init__(
        self, kept: Mapping[int, pydicom.Dataset], paths: Sequence[Path], kinds: Sequence[str], *, convert: bool
    ) -> None:
        self.kept = kept
        self.paths = paths
        self.kinds = kinds
        self._convert = convert

    def converted(self) -> _SplitHeaders:
        """The same headers, every element converted on access."""
        return _SplitHeaders(self.kept, self.paths, self.kinds, convert=True)

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> pydicom.Dataset | None: ...
    @overload
    def __getitem__(self, index: slice) -> list[pydicom.Dataset | None]: ...
    def __getitem__(self, index: int | slice) -> pydicom.Dataset | list[pydicom.Dataset | None] | None:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        header = self._raw(range(len(self))[index])
        return _converted(header) if self._convert else header

    def _raw(self, position: int) -> pydicom.Dataset | None:
        if position in self.kept:
            return self.kept[position]
        return _file_header(self.paths[position], self.kinds[position])


_HEADER_KINDS = ("dicom", "dicom-series")


def _file_header(path: Path | str, kind: str) -> pydicom.Dataset | None:
    """A header-only read, elements left raw (a series' first slice by name); ``None`` for other
    kinds and for a file pydicom cannot read."""
    if kind not in _HEADER_KINDS:
        return None
    from auditkit.decode import read_dicom_header
    from auditkit.errors import UnreadableImage

    path = Path(path)
    try:
        return read_dicom_header(_first_slice(path) if kind != "dicom" else path, convert=False)
    except (UnreadableImage, OSError):
        return None


def _joined(
    split: str, chunks: list[list[tuple[int, str, str]]], outputs: Iterable[list[Any]]
) -> Iterator[tuple[int, Any]]:
    """``(position, result)`` of every file read, chunk after chunk; a chunk missing, short or
    long, or one too many, is an error naming it, never a shifted result."""
    for number, (chunk, output) in enumerate(itertools.zip_longest(chunks, outputs)):
        if chunk is None or output is None or len(output) != len(chunk):
            got = "no" if output is None else len(output)
            raise RuntimeError(
                f"{split}: header chunk {number + 1} of {len(chunks)} returned {got} results"
                f" for {0 if chunk is None else len(chunk)} files"
            )
        yield from zip((position for position, _, _ in chunk), output, strict=True)


def _here(position: int, kind: str, headers: _SplitHeaders, kept_slices: Mapping[int, Any], slices: bool) -> bool:
    """Whether :meth:`AuditContext.map_headers` handles a position in the caller's process (its
    headers kept, or nothing to read) rather than in a chunk of files."""
    if not slices:
        return position in headers.kept or kind not in _HEADER_KINDS
    if position in kept_slices or kind not in _HEADER_KINDS:
        return True
    return kind == "dicom" and position in headers.kept


def _apply(function: Callable[[pydicom.Dataset | None], _R], convert: bool, header: pydicom.Dataset | None) -> _R:
    """``function`` of a header, converted first with ``convert`` (``None`` when it cannot be)."""
    return function(_converted(header) if convert else header)


def _map_files(
    function: Callable[[pydicom.Dataset | None], _R], files: HeaderFiles, *, convert: bool, slices: bool = False
) -> list[Any]:
    """``function`` of each ``(path, kind)``'s header (converted with ``convert``), pydicom
    silenced: one chunk of :meth:`AuditContext.map_headers`, wherever it runs. With ``slices``,
    a tuple for each: ``function`` of every slice of a series folder, by file name."""
    from auditkit.decode import quiet_pydicom

    of = functools.partial(_apply, function, convert)
    with quiet_pydicom():
        out: list[Any] = []
        for path, kind in files:
            if slices and kind == "dicom-series":
                out.append(tuple(of(_file_header(file, "dicom")) for file in _slice_files(Path(path))))
            elif slices:
                out.append((of(_file_header(path, kind)),))
            else:
                out.append(of(_file_header(path, kind)))
        return out


def _texts_of(keywords: tuple[str, ...], header: pydicom.Dataset | None) -> dict[str, str | None] | None:
    from auditkit.decode import header_texts

    return None if header is None else header_texts(header, keywords)


def _slice_files(folder: Path) -> list[Path]:
    """The files of a DICOM series folder, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file())


def _first_slice(folder: Path) -> Path:
    """The first file of a DICOM series folder by name (any slice carries the series' identifiers)."""
    files = _slice_files(folder)
    if not files:
        raise OSError("empty series folder")
    return files[0]


class _ModelHandle:
    """:class:`auditkit.check.ModelHandle` over the adapter, held to the check's ``needs``."""

    def __init__(self, engine: AuditContext, view: CheckView) -> None:
        self._engine = engine
        self._view = view

    @property
    def _adapter(self) -> ModelAdapter:
        return self._engine.model

    @property
    def device(self) -> torch.device:
        return self._adapter.device

    @property
    def batch_size(self) -> int:
        return self._adapter.batch_size

    @property
    def has_features(self) -> bool:
        return self._adapter.has_features

    def predict(self, images: torch.Tensor, *, label: str = "") -> torch.Tensor:
        self._view._require("predictions", "model.predict")
        logits, _ = self._adapter.forward_pass(images, split=label, features=False)
        return logits

    def predict_with_features(self, images: torch.Tensor, *, label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        self._view._require("features", "model.predict_with_features")
        if not self._adapter.has_features:
            raise Skip(f"embeddings unavailable ({self._adapter.feature_layer})")
        return self._adapter.forward_pass(images, split=label, features=True)

    @property
    def has_gradients(self) -> bool:
        return self._adapter.has_gradients

    def differentiable(self) -> nn.Module:
        self._view._require("gradients", "model.differentiable")
        if not self.has_gradients:
            raise Skip(NO_GRADIENTS)
        return self._adapter.module

    def forward_module(self) -> nn.Module:
        self._view._require("images", "model.forward_module")
        return self._adapter.module


class CheckView:
    """The :class:`auditkit.check.CheckContext` of one check over the engine's context.

    Every read is held to the check's ``needs``: an undeclared one raises
    :class:`auditkit.errors.UndeclaredRead` naming the read and the flag to declare, and is
    recorded in :attr:`undeclared` (the conformance kit reports it even when the check catches
    the error). Seeds and artifact paths are the check's own.
    """

    def __init__(self, engine: AuditContext, check_id: str, needs: Needs) -> None:
        self._engine = engine
        self._id = check_id
        self._needs = needs
        self.undeclared: list[str] = []
        self._model = _ModelHandle(engine, self)

    # ----------------------------------------------------------------- the guard
    def _require_split(self, split: str, read: str) -> None:
        needs = self._needs
        if split == "train" and not (needs.train or needs.train_optional):
            self._refuse(f"{read}('train')", "train=True or train_optional=True")
        if split.startswith("ood") and not needs.ood:
            self._refuse(f"{read}({split!r})", "ood=True")

    def _require(self, flag: str, read: str, split: str | None = None) -> None:
        if split is not None:
            self._require_split(split, read)
        needs = self._needs
        declared = (needs.predictions or needs.features) if flag == "predictions" else getattr(needs, flag)
        if not declared:
            where = f"{read}({split!r})" if split is not None else read
            self._refuse(where, f"{flag}=True")

    def _refuse(self, read: str, flag: str) -> None:
        message = f"check {self._id!r} read {read} without declaring it: set needs = Needs(..., {flag})"
        self.undeclared.append(message)
        raise UndeclaredRead(message)

    # ----------------------------------------------------------------- identity and row data
    @property
    def check_id(self) -> str:
        return self._id

    @property
    def classes(self) -> list[str]:
        return self._engine.classes

    @property
    def positive_index(self) -> int | None:
        return self._engine.positive_index

    @property
    def task(self) -> str:
        return self._engine.task

    @property
    def units(self) -> dict[str, str]:
        return dict(self._engine.units)

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def split_names(self) -> list[str]:
        return self._engine.split_names

    @property
    def group_columns(self) -> list[str]:
        return list(self._engine.group_columns)

    @property
    def operating_point(self) -> dict[str, float]:
        return dict(self._engine.operating_point)

    @property
    def claims(self) -> dict[str, Any]:
        return dict(self._engine.claims)

    @property
    def spatial_dims(self) -> int:
        return self._engine.spatial_dims

    @property
    def input_geometry(self) -> InputGeometry:
        if self._engine.geometry is None:
            raise Skip("this context does not know the model's input geometry")
        return self._engine.geometry

    @property
    def model(self) -> _ModelHandle:
        return self._model

    def has_split(self, split: str) -> bool:
        return self._engine.has_split(split)

    @property
    def has_reference(self) -> bool:
        return self._engine.has_reference

    def _split(self, split: str, read: str) -> SplitData:
        self._require_split(split, read)
        return self._engine.split(split)

    def split(self, split: str) -> SplitRows:
        data = self._split(split, "split")
        return SplitRows(
            name=data.name,
            rows=data.rows,
            labels=data.labels,
            groups=dict(data.groups),
            patients=tuple(data.patients),
            studies=tuple(data.studies),
            kinds=tuple(data.kinds),
            quarantined_groups=data.quarantined_groups,
            spacing=data.spacing,
        )

    def labels(self, split: str = "eval") -> np.ndarray:
        return self._split(split, "labels").labels

    def group_labels(self, split: str = "eval") -> dict[str, np.ndarray]:
        return dict(self._split(split, "group_labels").groups)

    def quarantine(self) -> list[QuarantinedRow]:
        return [QuarantinedRow(q.split, q.row, q.reason) for q in self._engine.dataset.quarantine]

    # ----------------------------------------------------------------- the shared pass, pixels, headers
    def predictions(self, split: str = "eval") -> Predictions:
        self._require("predictions", "predictions", split)
        return self._engine.predictions(split)

    def reference_predictions(self, split: str = "eval") -> Predictions:
        self._require("reference", "reference_predictions", split)
        return self._engine.reference_predictions(split)

    def reference_model(self) -> nn.Module:
        self._require("reference", "reference_model")
        if self._engine.reference is None:
            raise Skip(NO_REFERENCE)
        return self._engine.reference.module

    def features(self, split: str = "eval") -> torch.Tensor:
        self._require("features", "features", split)
        return self._engine.features(split)

    def images(
        self,
        split: str = "eval",
        indices: np.ndarray | Iterable[int] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        self._require("images", "images", split)
        return self._engine.images(split, indices, dtype=dtype)

    def pixels(self, split: str = "eval") -> torch.Tensor | DiskPixels:
        """The split's images unread, for a check that reads them in batches (bounded memory when
        they are on disk): index or slice it to get ``float16`` tensors."""
        self._require("images", "pixels", split)
        return self._engine.pixels(split)

    def headers(self, split: str = "eval") -> Sequence[pydicom.Dataset | None]:
        self._require("headers", "headers", split)
        return self._engine.headers(split)

    def header_texts(self, split: str, keywords: Iterable[str]) -> list[dict[str, str | None] | None]:
        self._require("headers", "header_texts", split)
        return self._engine.header_texts(split, keywords)

    def map_headers(self, split: str, function: Callable[[pydicom.Dataset | None], _R]) -> Iterator[_R]:
        self._require("headers", "map_headers", split)
        return self._engine.map_headers(split, function)

    def map_series_headers(
        self, split: str, function: Callable[[pydicom.Dataset | None], _R]
    ) -> Iterator[tuple[_R, ...]]:
        self._require("headers", "map_series_headers", split)
        return self._engine.map_headers(split, function, slices=True)

    def series_headers(self, split: str = "eval") -> list[tuple[pydicom.Dataset | None, ...]]:
        self._require("headers", "series_headers", split)
        return self._engine.series_headers(split)

    def quarantined_headers(
        self, splits: Iterable[str]
    ) -> Iterable[tuple[QuarantinedRow, pydicom.Dataset | str | None]]:
        splits = list(splits)
        for split in splits:
            self._require("headers", "quarantined_headers", split)
        return self._engine.quarantined_headers(splits)

    # ----------------------------------------------------------------- seeds and artifacts
    def seed(self, *salt: object) -> int:
        return stable_seed(self._engine.seed, self._id, *salt)

    def rng(self, *salt: object) -> np.random.Generator:
        return np.random.default_rng(self.seed(*salt))

    def torch_generator(self, *salt: object) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.seed(*salt, "torch"))
        return generator

    def write_artifact(
        self,
        name: str,
        filename: str,
        write: Callable[[Path], object],
        *,
        description: str,
        media_type: str = "image/svg+xml",
    ) -> Artifact:
        path, relative = self._engine.artifact_path(self._id, filename)
        write(path)
        return Artifact(name=name, path=relative, media_type=media_type, description=description)
