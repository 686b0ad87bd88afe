"""The shared inference context (DESIGN section 5).

Checks read everything through :class:`AuditContext`: the model, the decoded splits, and cached
results computed once per run — logits, probabilities and embeddings from ONE forward pass per
split, header-only DICOM reads, and a seeded random generator per check. The runner asks every
selected check what it needs (:class:`auditkit.check.Needs`) and calls :meth:`prepare` before the
first check, so no check triggers a second pass.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np
import torch

from auditkit.check import Skip
from auditkit.data import Dataset, SplitData
from auditkit.model import ModelAdapter
from auditkit.spec import AuditSpec
from auditkit.stats import stable_seed

if TYPE_CHECKING:
    import pydicom

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Callable[[int], None] | None]

_P = ParamSpec("_P")
_R = TypeVar("_R")


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


@dataclass(frozen=True)
class Predictions:
    """Model outputs for one split, aligned with the split's rows.

    Attributes:
        logits: float32 (N, K) on the CPU.
        probs: float64 (N, K) softmax of the logits (rows with non-finite logits are NaN).
        labels: int64 (N,) class indices (``-1`` for unlabelled out-of-distribution sets).
    """

    logits: torch.Tensor
    probs: np.ndarray
    labels: np.ndarray

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def predicted(self) -> np.ndarray:
        return np.asarray(self.probs.argmax(axis=1), dtype=np.int64)


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
        spec: AuditSpec,
        model: ModelAdapter,
        dataset: Dataset,
        out_dir: Path,
        *,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.dataset = dataset
        self.out_dir = out_dir
        self._progress = progress
        self._outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._with_features: dict[str, bool] = {}
        self._predictions: dict[str, Predictions] = {}
        self._raw_headers: dict[str, list[pydicom.Dataset | None]] = {}
        self._headers: dict[str, list[pydicom.Dataset | None]] = {}

    # ----------------------------------------------------------------- splits and labels
    @property
    def classes(self) -> list[str]:
        return list(self.spec.model.classes)

    @property
    def positive_index(self) -> int | None:
        return self.spec.model.positive_index

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def split_names(self) -> list[str]:
        return list(self.dataset.splits)

    def has_split(self, split: str) -> bool:
        return split in self.dataset.splits

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

    def images(self, split: str = "eval", indices: np.ndarray | Iterable[int] | None = None) -> torch.Tensor:
        """Decoded images as float32 (N, C, H, W) in [0, 1], on the CPU."""
        stored = self.split(split).images
        if indices is not None:
            stored = stored[
                torch.as_tensor(
                    np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices),
                    dtype=torch.long,
                )
            ]
        return stored.float()

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

    def _forward(self, name: str, *, features: bool = True) -> None:
        split = self.dataset.splits[name]
        callback = self._progress(f"inference {name}", split.n) if self._progress else None
        features = features and self.model.has_features
        logits, embeddings = self.model.forward_pass(split.images, split=name, progress=callback, features=features)
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
        """Logits, softmax probabilities and labels of a split (computed once, cached)."""
        if split not in self._predictions:
            logits, _ = self._cached(split)
            with np.errstate(invalid="ignore", over="ignore"):
                probs = torch.softmax(logits.double(), dim=1).numpy()
            self._predictions[split] = Predictions(logits=logits, probs=probs, labels=self.labels(split))
        return self._predictions[split]

    def features(self, split: str = "eval") -> torch.Tensor:
        """Embeddings (N, D) float32 from the same pass as the predictions.

        Raises :class:`Skip` when the model offers none (TorchScript, or no ``nn.Linear`` and no
        ``model.feature_layer``).
        """
        if not self.model.has_features:
            raise Skip(f"embeddings unavailable ({self.model.feature_layer})")
        return self._cached(split, features=True)[1]

    def _read_headers(self, split: str) -> list[pydicom.Dataset | None]:
        """A split's DICOM headers, elements left raw: those kept by the decoder
        (``load_dataset(..., keep_headers=True)``), else header-only reads (once per split)."""
        if split not in self._raw_headers:
            from auditkit.errors import UnreadableImage
            from auditkit.loaders import read_dicom_header

            data = self.split(split)
            if data.headers is not None:
                self._raw_headers[split] = data.headers
                return data.headers
            headers: list[pydicom.Dataset | None] = []
            for path, kind in zip(data.paths, data.kinds, strict=True):
                if kind != "dicom":
                    headers.append(None)
                    continue
                try:
                    headers.append(read_dicom_header(path, convert=False))
                except UnreadableImage:
                    headers.append(None)
            self._raw_headers[split] = headers
        return self._raw_headers[split]

    def headers(self, split: str = "eval") -> list[pydicom.Dataset | None]:
        """Header-only DICOM reads (no pixels), ``None`` for non-DICOM or unreadable files.

        Every element is converted (while pydicom is silenced), so any access is safe. The
        datasets hold patient data: use them to measure, never copy values into results.
        """
        if split not in self._headers:
            from auditkit.loaders import convert_elements

            converted: list[pydicom.Dataset | None] = []
            for header in self._read_headers(split):
                if header is None:
                    converted.append(None)
                    continue
                try:
                    convert_elements(header)
                except Exception:  # an element pydicom cannot convert: the header is unreadable
                    converted.append(None)
                    continue
                converted.append(header)
            self._headers[split] = converted
        return self._headers[split]

    def header_texts(self, split: str, keywords: Iterable[str]) -> list[dict[str, str | None] | None]:
        """Text values of a few header elements per image; ``None`` for non-DICOM or unreadable files.

        Only the named elements are converted (:func:`auditkit.loaders.header_texts`), which is
        about three times cheaper than :meth:`headers` for a check that needs a handful of them;
        the files are read once whichever of the two is called first. A value is ``None`` when
        absent, empty, binary or unconvertible. The values are patient data: measure with them,
        never copy them into results.
        """
        from auditkit.loaders import _quiet_pydicom, header_texts

        wanted = tuple(dict.fromkeys(keywords))
        headers = self._read_headers(split)
        with _quiet_pydicom():  # one silenced period for the split, not one per file
            return [None if h is None else header_texts(h, wanted) for h in headers]

    # ----------------------------------------------------------------- per-check helpers
    def rng(self, check_id: str) -> np.random.Generator:
        """A NumPy generator seeded from the spec's seed and the check id (same every run)."""
        return np.random.default_rng(stable_seed(self.spec.seed, check_id))

    def torch_generator(self, check_id: str) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(stable_seed(self.spec.seed, check_id, "torch"))
        return generator

    def artifact_path(self, check_id: str, filename: str) -> tuple[Path, str]:
        """Where a check writes an artifact: (absolute path, path relative to the bundle)."""
        if Path(filename).name != filename or filename.startswith("."):
            raise ValueError(f"artifact names are plain file names, got {filename!r}")
        relative = Path("artifacts") / check_id / filename
        absolute = self.out_dir / relative
        absolute.parent.mkdir(parents=True, exist_ok=True)
        return absolute, relative.as_posix()
