"""Manifests, surrogate IDs and decoded splits.

A manifest is a CSV of ``path,label[,patient_id][,study_id][,split][,<group columns>]`` rows; a
multi-label study has one column per label instead of ``label`` (``1``, ``0`` or empty for unknown),
a regression study a ``target`` column (one output) or one column per output name.
Every problem is reported with the manifest file, the 0-based data row (and the file's line
number) and the column, so a user can fix the file. Images are decoded once per run into one
compact tensor per split; a file that cannot be decoded is quarantined with its reason and the
audit goes on.

Patient and study identifiers, from the manifest or from DICOM headers, are replaced by
surrogates (``P0001``, ``S0001``) as soon as they are read; raw values stay in memory only.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
import re
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch

from auditkit.decode import (
    DecodeBudget,
    DecodedImage,
    VolumeBudget,
    WindowSetting,
    decode_image,
    decode_label_map,
    decode_volume_image,
    resample_volume,
)
from auditkit.decode.labels import decode_label_image, resize_labels
from auditkit.errors import InputError, UnreadableImage
from auditkit.pixels import DiskPixels, PixelFile, memory_limit_bytes
from auditkit.spec import AuditSpec, GroupSpec

if TYPE_CHECKING:
    import pydicom

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label")
MISSING_GROUP = "missing"
MAX_REPORTED_PROBLEMS = 20
RowMapper = Callable[[Callable[[Any], Any], list[Any]], list[Any]]
"""``mapper(function, items)``: ``function`` of every item, in the items' order."""
HEADERS_KEPT = 256
"""DICOM data sets of a split kept from decoding (a few tens of KB each as pydicom objects); the
rest are read again from their files when a check asks for them."""
SERIES_HEADERS_KEPT = 8
"""DICOM series of a split whose slices' data sets are kept from decoding (3-D inputs)."""
# Header attributes a group column may name when the manifest lacks it: non-identifying ones only.
HEADER_GROUP_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "PhotometricInterpretation",
    "PatientSex",
    "PatientAge",
    "BodyPartExamined",
    "ViewPosition",
)


@dataclass(frozen=True)
class ManifestRow:
    """One data row of a manifest; ``row`` is its 0-based index among the data rows."""

    row: int
    path: Path
    label: int
    patient_id: str | None
    study_id: str | None
    split: str | None
    groups: dict[str, str]
    values: tuple[float, ...] = ()
    """Multi-label: ``1.0``/``0.0``/NaN (unknown) per label; regression: the target per output."""
    mask: Path | None = None
    """Segmentation: the reference label map (resolved inside ``data.root``)."""


@dataclass
class Manifest:
    """A validated manifest."""

    source: Path
    columns: list[str]
    rows: list[ManifestRow]


class Surrogates:
    """Stable surrogates for identifiers: the n-th distinct value seen becomes ``<prefix>n``.

    Surrogates follow the manifest's row order, so they are reproducible across runs of the same
    manifest and reveal nothing about the raw value.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._ids: dict[str, str] = {}

    def __call__(self, raw: str | None) -> str | None:
        if raw is None or not raw.strip():
            return None
        key = raw.strip()
        if key not in self._ids:
            self._ids[key] = f"{self.prefix}{len(self._ids) + 1:04d}"
        return self._ids[key]

    def __len__(self) -> int:
        return len(self._ids)


def _line_of(row: int) -> int:
    return row + 2  # header line + 1-based lines


def _where(source: Path, row: int) -> str:
    return f"{source.name}: row {row} (line {_line_of(row)})"


def read_manifest(
    source: Path,
    *,
    root: Path,
    classes: Sequence[str] | None,
    group_columns: Iterable[str] = (),
    header_group_columns: Iterable[str] = (),
    require_label: bool = True,
    task: str = "classification",
) -> Manifest:
    """Read and validate a manifest.

    Args:
        source: the CSV file.
        root: every path must resolve inside this folder (symlinks included).
        classes: allowed labels; ``None`` accepts any (out-of-distribution sets).
        group_columns: subgroup columns that must be present in the manifest.
        header_group_columns: subgroup columns that may instead come from DICOM headers.
        require_label: whether the label columns are required.
        task: ``classification`` (a ``label`` column of class names), ``multilabel`` (a column per
            name in ``classes`` holding 1, 0 or empty), ``regression`` (a ``target`` column for
            one output, else a column per output name, holding numbers) or ``segmentation`` (a
            ``mask`` column: the path of the reference label map, inside ``root``).

    Raises:
        InputError: naming the file, the row and the column of every problem (up to 20).
    """
    try:
        text = source.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"manifest not found: {source}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read manifest {source}: {error}") from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        fieldnames = reader.fieldnames
    except csv.Error as error:
        raise InputError(f"{source.name}: near line {reader.line_num + 1}: not readable as CSV: {error}") from None
    columns = [c.strip() for c in (fieldnames or [])]
    if not columns:
        raise InputError(f"{source.name}: empty manifest, expected a header line with path,label,...")
    reader.fieldnames = columns
    value_columns = _value_columns(task, columns, classes) if require_label else []
    label_columns = {"classification": ["label"], "segmentation": ["mask"]}.get(task, value_columns)
    required = ["path", *label_columns] if require_label else ["path"]
    missing = [c for c in required if c not in columns]
    missing += [c for c in group_columns if c not in columns and c not in header_group_columns]
    if missing:
        raise InputError(
            f"{source.name}: missing column(s) {missing}; the header has {columns}"
            + _delimiter_hint(columns)
            + (_task_hint(columns, classes, require_label) if task == "classification" else "")
            + _value_hint(task, columns)
        )
    if len(set(columns)) != len(columns):
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        raise InputError(f"{source.name}: duplicate column name(s) {duplicates}")

    root = root.resolve()
    problems: list[str] = []
    n_problems = 0
    rows: list[ManifestRow] = []
    seen: dict[Path, int] = {}
    class_index = {name: i for i, name in enumerate(classes)} if classes is not None else {}
    labels_seen: dict[str, int] = {}
    for row, record in enumerate(_records(reader, source)):
        problem = None
        if None in record:  # more cells than header columns
            problem = f"{len(columns) + len(record[None])} cells, the header has {len(columns)}"
        values = {k: (v or "").strip() for k, v in record.items() if k is not None}
        raw_path = values.get("path", "")
        if problem is None and not raw_path:
            problem = "column 'path' is empty"
        if problem is None and "\x00" in raw_path:
            problem = "column 'path' contains a NUL character"
        resolved = root
        if problem is None:
            resolved = _resolve_manifest_path(raw_path, root)
            if not resolved.is_relative_to(root):
                problem = (
                    f"column 'path' value {raw_path!r} resolves outside data.root ({root});"
                    " every path must stay inside it"
                )
            elif resolved in seen:
                problem = f"column 'path' value {raw_path!r} duplicates row {seen[resolved]}"
        label = -1
        numbers: tuple[float, ...] = ()
        mask: Path | None = None
        if problem is None and task == "segmentation" and require_label:
            mask, problem = _mask_path(values.get("mask", ""), root)
        if problem is None and value_columns:
            numbers, problem = _parse_values(task, values, value_columns)
        if problem is None and task == "classification" and "label" in values:
            text_label = values["label"]
            if classes is None:
                label = labels_seen.setdefault(text_label, len(labels_seen))
            elif text_label in class_index:
                label = class_index[text_label]
            else:
                problem = f"column 'label' value {text_label!r} is not one of model.classes {list(classes)}"
        if problem is not None:
            n_problems += 1
            if len(problems) < MAX_REPORTED_PROBLEMS:
                problems.append(f"{_where(source, row)}: {problem}")
            continue
        seen[resolved] = row
        rows.append(
            ManifestRow(
                row=row,
                path=resolved,
                label=label,
                patient_id=values.get("patient_id") or None,
                study_id=values.get("study_id") or None,
                split=values.get("split") or None,
                groups={c: values[c] for c in group_columns if c in values},
                values=numbers,
                mask=mask,
            )
        )
    if problems:
        shown = f"; the first {len(problems)}" if n_problems > len(problems) else ""
        raise InputError(
            f"{source} has {n_problems} problem(s){shown}:\n  " + "\n  ".join(problems) + _label_hint(problems, classes)
        )
    if not rows:
        raise InputError(f"{source.name}: no data rows")
    return Manifest(source=source, columns=columns, rows=rows)


_BINARY = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0, "": math.nan}


def _value_columns(task: str, columns: Sequence[str], classes: Sequence[str] | None) -> list[str]:
    """The columns that hold a multi-label or regression study's labels."""
    if task == "multilabel":
        return list(classes or [])
    if task == "regression":
        names = list(classes or [])
        if len(names) == 1 and "target" in columns:
            return ["target"]
        return names if len(names) > 1 or names[0] in columns else ["target"]
    return []


def _value_hint(task: str, columns: Sequence[str]) -> str:
    if task == "multilabel" and "label" in columns:
        return (
            ". A multi-label manifest has one column per label in model.classes (1, 0, or empty for unknown)"
            " instead of one 'label' column"
        )
    if task == "regression" and "label" in columns:
        return ". A regression manifest holds the true value in a 'target' column (or one column per output name)"
    return ""


def _parse_values(task: str, values: Mapping[str, str], columns: Sequence[str]) -> tuple[tuple[float, ...], str | None]:
    """One row's label vector (multi-label: 1/0/NaN) or targets (regression), or the problem."""
    numbers: list[float] = []
    for column in columns:
        text = values.get(column, "")
        if task == "multilabel":
            if text not in _BINARY:
                hint = (
                    " (-1 is CheXpert's 'uncertain': map it to 1, 0 or empty before the audit)"
                    if text in ("-1", "-1.0")
                    else ""
                )
                return (), f"column {column!r} value {text!r}: expected 1, 0 or empty (unknown){hint}"
            numbers.append(_BINARY[text])
        else:
            number = parse_numeric(text) if text else None
            if number is None or not math.isfinite(number):
                return (), f"column {column!r} value {text!r}: expected a finite number (the regression target)"
            numbers.append(number)
    return tuple(numbers), None


def _mask_path(raw: str, root: Path) -> tuple[Path | None, str | None]:
    """A segmentation row's reference label map, or the problem."""
    if not raw:
        return None, "column 'mask' is empty; a segmentation study gives each image its reference label map"
    if "\x00" in raw:
        return None, "column 'mask' contains a NUL character"
    resolved = _resolve_manifest_path(raw, root)
    if not resolved.is_relative_to(root):
        return None, f"column 'mask' value {raw!r} resolves outside data.root ({root}); every path must stay inside it"
    return resolved, None


def _resolve_manifest_path(raw_path: str, root: Path) -> Path:
    """The absolute path of a manifest cell; Windows separators work when no such file exists.

    A backslash is a legal character in a POSIX file name, so ``img\\a.png`` is first taken
    literally and read as ``img/a.png`` only when the literal file is absent.
    """
    candidate = Path(raw_path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if "\\" in raw_path and not resolved.exists():
        posix = Path(raw_path.replace("\\", "/"))
        if not re.match(r"^[A-Za-z]:", str(posix)):  # a drive letter cannot be made relative
            alternative = (posix if posix.is_absolute() else root / posix).resolve()
            if alternative.exists():
                return alternative
    return resolved


def _delimiter_hint(columns: Sequence[str]) -> str:
    """A hint when the header looks ``;``- or tab-separated (Excel in many locales writes ``;``)."""
    if len(columns) == 1:
        for delimiter, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "pipes")):
            if delimiter in columns[0]:
                return (
                    f". The header is one column that holds {name}: a manifest is comma-separated;"
                    " save it as CSV with ',' between cells"
                )
    return ""


def _task_hint(columns: Sequence[str], classes: Sequence[str] | None, require_label: bool) -> str:
    """Name the multi-label layout (a 0/1 column per class) and the segmentation ``mask`` column,
    which this version does not read, instead of only saying that ``label`` is missing."""
    if not require_label or "label" in columns:
        return ""
    if "mask" in columns:
        return (
            ". A 'mask' column is the layout of a segmentation study, which this version does not"
            " audit; it reads one 'label' class name per image"
        )
    if classes is not None and sum(c in columns for c in classes) >= 2:
        return (
            ". The header has one column per class: the layout of a multi-label study, which this"
            " version does not audit; it reads one 'label' class name per image"
        )
    return ""


def _label_hint(problems: Sequence[str], classes: Sequence[str] | None) -> str:
    """When labels are numbers or 0/1 flags, say how labels are written."""
    if classes is None or not any("column 'label' value" in p for p in problems):
        return ""
    return (
        "\n  labels are class names from model.classes, e.g. "
        f"{classes[0]!r}; a numeric label column needs its names in model.classes in the same spelling"
    )


def _records(reader: csv.DictReader[str], source: Path) -> Iterator[dict[str | Any, str | Any]]:
    """The reader's records; a CSV syntax error (e.g. a cell over the csv module's 131072-character
    field limit) becomes an InputError naming the line."""
    try:
        yield from reader
    except csv.Error as error:
        raise InputError(f"{source.name}: near line {reader.line_num + 1}: not readable as CSV: {error}") from None


_AGE = re.compile(r"^(\d{1,3})([DWMY])$")


def parse_numeric(value: str) -> float | None:
    """A number from a manifest cell or a DICOM Age String (``045Y``, ``006M``) in years."""
    value = value.strip()
    match = _AGE.match(value)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return amount / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[unit]
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _edge(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def band_labels(bins: Sequence[float]) -> list[str]:
    """Labels of the bands ``[b0, b1), [b1, b2), ..., [b_{k-1}, b_k]`` as ``b0-b1``."""
    return [f"{_edge(lo)}-{_edge(hi)}" for lo, hi in itertools.pairwise(bins)]


def band(value: str, spec: GroupSpec) -> str:
    """The group label of one cell: the cell itself, or its band when ``bins`` are given.

    Values below the first edge become ``<b0``, above the last ``>bk``; empty cells ``missing``.
    Raises ValueError for a non-numeric value in a banded column.
    """
    if not value.strip():
        return MISSING_GROUP
    if spec.bins is None:
        return value.strip()
    number = parse_numeric(value)
    if number is None:
        raise ValueError(f"expected a number to band with bins {spec.bins}, got {value!r}")
    bins = spec.bins
    if number < bins[0]:
        return f"<{_edge(bins[0])}"
    if number > bins[-1]:
        return f">{_edge(bins[-1])}"
    index = min(int(np.searchsorted(bins, number, side="right")) - 1, len(bins) - 2)
    return band_labels(bins)[index]


@dataclass
class SplitData:
    """The decoded images of one split (quarantined files removed) and their row data.

    ``name`` is the split's role: ``eval``, ``train`` or ``ood:<name>``. ``rows`` are manifest row
    indices; ``patients``/``studies`` hold surrogates only.
    """

    name: str
    manifest: Path
    rows: np.ndarray
    labels: np.ndarray
    images: torch.Tensor | DiskPixels
    """``(N, *shape)`` ``float16`` in [0, 1]: a tensor, or its stand-in on disk (:mod:`auditkit.pixels`)."""
    patients: list[str | None]
    studies: list[str | None]
    groups: dict[str, np.ndarray]
    kinds: list[str]
    paths: list[Path] = field(repr=False)
    spacing: np.ndarray | None = None
    """3-D inputs: each volume's voxel size ``(z, y, x)`` in millimetres on the model-input grid,
    float64 ``(N, 3)``; ``None`` for 2-D images."""
    quarantined_groups: dict[str, dict[str, int]] = field(default_factory=dict)
    headers: dict[int, pydicom.Dataset] | None = field(default=None, repr=False, compare=False)
    """With ``load_dataset(..., keep_headers=True)``: the DICOM data sets as decoded, without
    pixel data, by position in the split, for the first :data:`HEADERS_KEPT` rows of the
    manifest's split (:data:`SERIES_HEADERS_KEPT` for volumes); elements the decoder did not
    use stay raw. The others are read again from their files when a check asks
    (:meth:`auditkit.context.AuditContext.headers`), so memory is bounded by the cap, not the
    study. Patient data: read through :meth:`~auditkit.context.AuditContext.headers` or
    :meth:`~auditkit.context.AuditContext.header_texts`, never reported. A DICOM series' entry is
    its first slice (in position order)."""
    devices: dict[str, int] = field(default_factory=dict)
    """Acquisition devices of the split's DICOM images: ``"Manufacturer ModelName"`` -> images
    (``"not recorded"`` for DICOM without either); no entry for other file kinds."""
    study_months: tuple[str, str] | None = None
    """The earliest and latest StudyDate of the split's DICOM images, coarsened to ``YYYY-MM``
    (a date is an identifier: a month range is what a data card may show)."""
    slice_headers: dict[int, tuple[pydicom.Dataset, ...]] | None = field(default=None, repr=False, compare=False)
    """3-D inputs with ``keep_headers``: every slice's data set of the kept DICOM series, by
    position, in slice position order; read through
    :meth:`auditkit.context.AuditContext.series_headers` (the others are read again)."""

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class QuarantineEntry:
    split: str
    row: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"split": self.split, "row": self.row, "reason": self.reason}


@dataclass
class DecodeResult:
    images: list[DecodedImage | None]
    reasons: list[str | None]


def decode_all(
    paths: Sequence[Path],
    *,
    channels: int,
    height: int,
    width: int,
    window: WindowSetting,
    budget: DecodeBudget,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    keep_headers: bool = False,
    depth: int | None = None,
    root: Path | None = None,
    masks: Sequence[Path | None] | None = None,
    num_classes: int = 0,
    mapper: RowMapper | None = None,
    sink: Callable[[int, DecodedImage], None] | None = None,
) -> DecodeResult:
    """Decode every path once, in a thread pool; failures become reasons, never exceptions.

    ``sink(index, image)``, when given, receives each decoded image in order as it arrives (the
    loader writes its pixels to disk and keeps only a placeholder: :func:`load_dataset` with
    ``pixels``), so the decoded pixels of a split are never all held at once.

    ``mapper(function, items)``, when given, computes ``function`` of every item in their order
    instead of the thread pool (an executor's, e.g. Ray tasks: :mod:`auditkit.executors`).

    ``keep_headers`` keeps the DICOM data set (without pixel data) of each of the first
    :data:`HEADERS_KEPT` paths (:data:`SERIES_HEADERS_KEPT` series' slices for volumes) with its
    image, so header checks do not read those files a second time; the others' are read again
    when asked for, which bounds the memory headers take whatever the study's size. ``depth``
    decodes volumes (NIfTI, ``.npy`` or a DICOM series folder) to ``(channels, depth, height,
    width)``, each slice of a series bounded by ``budget``; a series' symlinks must stay inside
    ``root``. ``masks`` (segmentation,
    one per path) are the reference label maps of ``num_classes`` classes: each must lie on its
    image as stored (same size; a volume's map on the same grid in patient space) and is resized
    to the model input by nearest neighbour (:attr:`DecodedImage.labels`); a row whose map is
    unusable is quarantined with the map's reason.
    """
    volume_budget = VolumeBudget(slice=budget)

    kept = SERIES_HEADERS_KEPT if depth is not None else HEADERS_KEPT

    def decode(path: Path, index: int) -> DecodedImage:
        keep_header = keep_headers and index < kept
        if depth is not None:
            return decode_volume_image(
                path,
                channels=channels,
                depth=depth,
                height=height,
                width=width,
                window=window,
                budget=volume_budget,
                root=root,
                keep_header=keep_header,
            )
        return decode_image(
            path,
            channels=channels,
            height=height,
            width=width,
            window=window,
            budget=budget,
            keep_header=keep_header,
        )

    def with_mask(image: DecodedImage, mask: Path) -> DecodedImage:
        try:
            if depth is not None:
                reference = decode_label_map(mask, budget=volume_budget, num_classes=num_classes)
                assert image.geometry is not None
                mismatch = image.geometry.mismatch(reference.geometry)
                if mismatch is not None:
                    raise UnreadableImage(f"mask: {mismatch}")
                image.labels = resample_volume(reference, (depth, height, width)).labels.astype(np.int16)
                return image
            labels = decode_label_image(mask, num_classes=num_classes, budget=budget)
        except UnreadableImage as error:
            text = str(error)
            raise UnreadableImage(text if text.startswith("mask: ") else f"mask: {text}") from None
        if labels.shape != image.source_size:
            raise UnreadableImage(
                f"mask: label map of size {labels.shape} on an image of {image.source_size} (H, W); expected the"
                " image's size"
            )
        image.labels = resize_labels(labels.labels, height, width)
        image.spacing = _pixel_spacing(image, height, width)
        return image

    def one(item: tuple[int, tuple[Path, Path | None]]) -> tuple[DecodedImage | None, str | None]:
        index, (path, mask) = item
        try:
            image = decode(path, index)
            if mask is not None:
                image = with_mask(image, mask)
            return image, None
        except UnreadableImage as error:
            return None, str(error) or type(error).__name__
        except MemoryError:
            return None, "out of memory while decoding"
        except Exception as error:  # a decoder bug must not end the audit
            # Where, not what: the message and the frames' locals may quote a path or header value.
            where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(error.__traceback__)[-4:]]
            log.debug("decoder raised %s at %s", type(error).__name__, " <- ".join(reversed(where)))
            return None, f"decoder error: {type(error).__name__}"

    workers = workers or min(4, os.cpu_count() or 1)
    results: list[tuple[DecodedImage | None, str | None]] = []
    items = list(enumerate(zip(paths, masks if masks is not None else [None] * len(paths), strict=True)))

    def keep(result: tuple[DecodedImage | None, str | None]) -> None:
        if sink is not None and result[0] is not None:
            sink(len(results), result[0])
        results.append(result)

    if mapper is not None:
        # by chunks when a sink takes the pixels, so the driver holds one chunk of them
        step = _MAPPED_CHUNK if sink is not None else max(1, len(items))
        for start in range(0, len(items), step):
            for result in mapper(one, items[start : start + step]):
                keep(result)
        if progress is not None:
            progress(len(results))
        return DecodeResult(images=[r[0] for r in results], reasons=[r[1] for r in results])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(one, items):
            keep(result)
            if progress is not None:
                progress(1)
    return DecodeResult(images=[r[0] for r in results], reasons=[r[1] for r in results])


_MAPPED_CHUNK = 1024  # rows an executor decodes per call when their pixels go to disk


def _pixel_spacing(image: DecodedImage, height: int, width: int) -> tuple[float, float]:
    """A 2-D image's pixel size ``(y, x)`` in mm on the model-input grid: DICOM PixelSpacing (1 mm
    when absent, as for PNG and ``.npy``) scaled by stored size over input size."""
    stored: tuple[float, ...] = (1.0, 1.0)
    text = image.header.attributes.get("PixelSpacing") if image.header is not None else None
    if text:
        try:
            values = tuple(float(v) for v in text.split("\\"))
        except ValueError:
            values = ()
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            stored = values
    rows, cols = image.source_size[-2:]
    return stored[0] * rows / height, stored[1] * cols / width


def window_setting(spec: AuditSpec) -> WindowSetting:
    window = spec.data.dicom.window
    if isinstance(window, dict):
        return WindowSetting(mode="fixed", center=window["center"], width=window["width"])
    return WindowSetting(mode=window)


@dataclass(frozen=True)
class DataSource:
    """What the loader takes from a spec, paths resolved: where the data are, which rows are which
    split, the group columns, the OOD manifests, and the model input the images are decoded to.

    Attributes:
        root: the folder manifest paths are relative to.
        manifest: the main manifest (eval and train rows).
        eval_split, train_split: the ``split`` column values of the eval and train rows.
        groups: group column -> its spec (banding).
        ood: OOD set name -> its manifest.
        classes: the label names, in the model's output order.
        task: the model's task (``model.task``), which decides the label columns.
        shape: ``(channels, height, width)`` of the model input, ``(channels, depth, height,
            width)`` for a 3-D input.
        window: how DICOM intensities map to [0, 1].
    """

    root: Path
    manifest: Path
    eval_split: str
    train_split: str | None
    groups: Mapping[str, GroupSpec]
    ood: Mapping[str, Path]
    classes: Sequence[str]
    shape: tuple[int, ...]
    window: WindowSetting
    task: str = "classification"

    @classmethod
    def from_spec(cls, spec: AuditSpec) -> DataSource:
        shape = spec.model.input
        return cls(
            root=spec.data_root,
            manifest=spec.manifest_path,
            eval_split=spec.data.splits.eval,
            train_split=spec.data.splits.train,
            groups=dict(spec.data.groups),
            ood={name: spec.resolve(ood.manifest) for name, ood in spec.data.ood.items()},
            classes=list(spec.model.classes),
            shape=shape.shape,
            window=window_setting(spec),
            task=spec.model.task,
        )


@dataclass
class Dataset:
    """Every split the audit uses, the quarantine list and the surrogate tables' sizes."""

    splits: dict[str, SplitData]
    quarantine: list[QuarantineEntry]
    manifest: Manifest
    images_decoded: int = 0
    pixel_file: PixelFile | None = None
    """Where the splits' pixels are, when they are on disk (``load_dataset(pixels=...)``)."""


def build_split(
    name: str,
    rows: Sequence[ManifestRow],
    manifest: Path,
    decoded: DecodeResult,
    *,
    source: DataSource,
    patients: Surrogates,
    studies: Surrogates,
    quarantine: list[QuarantineEntry],
    keep_headers: bool = False,
    pixels: PixelFile | None = None,
    base: int = 0,
) -> SplitData:
    """Assemble one split from its decoded rows; quarantined rows are recorded and left out.

    ``keep_headers``: the rows' DICOM data sets (decoded with ``keep_headers``) go into
    :attr:`SplitData.headers`. ``pixels``: the rows' pixels were written to this file from
    position ``base`` on (``decode_all``'s sink); the split's images are a view of it.
    """
    shape = source.shape
    keep: list[int] = []
    group_values: dict[str, list[str]] = {g: [] for g in source.groups}
    quarantined_groups: dict[str, dict[str, int]] = {g: {} for g in source.groups}
    patient_ids: list[str | None] = []
    study_ids: list[str | None] = []
    for i, row in enumerate(rows):
        image, reason = decoded.images[i], decoded.reasons[i]
        header = image.header if image is not None else None
        patient = patients(row.patient_id or (header.patient_id if header else None))
        study = studies(row.study_id or (header.study_uid if header else None))
        groups: dict[str, str] = {}
        for column, group_spec in source.groups.items():
            raw = row.groups.get(column)
            if raw is None:  # read from the DICOM header instead
                raw = header.attributes.get(column, "") if header else ""
            try:
                groups[column] = band(raw, group_spec)
            except ValueError as error:
                raise InputError(f"{_where(manifest, row.row)}: column {column!r}: {error}") from None
        if image is not None and tuple(image.pixels.shape) != shape:
            reason, image = f"decoded shape {image.pixels.shape}, expected {shape}", None
        if image is None:
            quarantine.append(QuarantineEntry(split=name, row=row.row, reason=reason or "unreadable"))
            for column, value in groups.items():
                counts = quarantined_groups[column]
                counts[value] = counts.get(value, 0) + 1
            continue
        keep.append(i)
        patient_ids.append(patient)
        study_ids.append(study)
        for column, value in groups.items():
            group_values[column].append(value)
    images: torch.Tensor | DiskPixels = (
        pixels.view([base + i for i in keep])
        if pixels is not None
        else torch.empty((len(keep), *shape), dtype=torch.float16)
    )
    segmentation = source.task == "segmentation"
    spatial = len(shape) - 1
    spacing = np.zeros((len(keep), spatial), dtype=np.float64) if spatial == 3 or segmentation else None
    masks = np.full((len(keep), *shape[1:]), -1, dtype=np.int16) if segmentation else None
    for out_index, i in enumerate(keep):
        image = decoded.images[i]
        assert image is not None
        if isinstance(images, torch.Tensor):
            images[out_index] = torch.from_numpy(image.pixels)
        if spacing is not None:
            spacing[out_index] = image.spacing if image.spacing is not None else 1.0
        if masks is not None and image.labels is not None:
            masks[out_index] = image.labels
    devices, study_months = _acquisition(decoded, keep)
    return SplitData(
        name=name,
        manifest=manifest,
        rows=np.array([rows[i].row for i in keep], dtype=np.int64),
        devices=devices,
        study_months=study_months,
        labels=masks if masks is not None else split_labels([rows[i] for i in keep], source.task, len(source.classes)),
        images=images,
        patients=patient_ids,
        studies=study_ids,
        groups={c: np.array(v, dtype=object) for c, v in group_values.items()},
        kinds=[decoded.images[i].kind for i in keep],  # type: ignore[union-attr]
        paths=[rows[i].path for i in keep],
        spacing=spacing,
        quarantined_groups={c: v for c, v in quarantined_groups.items() if v},
        headers=_kept(keep, decoded, lambda image: image.dataset) if keep_headers else None,
        slice_headers=(
            _kept(keep, decoded, lambda image: image.datasets or None) if keep_headers and len(shape) == 4 else None
        ),
    )


def _acquisition(decoded: DecodeResult, keep: Sequence[int]) -> tuple[dict[str, int], tuple[str, str] | None]:
    """The kept DICOM images' devices (counts) and StudyDate month range (see :class:`SplitData`)."""
    devices: dict[str, int] = {}
    months: list[str] = []
    for i in keep:
        image = decoded.images[i]
        header = image.header if image is not None else None
        if header is None:
            continue
        attributes = header.attributes
        device = " ".join(attributes[k] for k in ("Manufacturer", "ManufacturerModelName") if attributes.get(k))
        devices[device or "not recorded"] = devices.get(device or "not recorded", 0) + 1
        date = attributes.get("StudyDate", "")
        if len(date) >= 6 and date[:6].isdigit() and 1 <= int(date[4:6]) <= 12:
            months.append(f"{date[:4]}-{date[4:6]}")
    return dict(sorted(devices.items())), ((min(months), max(months)) if months else None)


_T = TypeVar("_T")
PixelPlace = Literal["memory", "disk", "auto"]


def _kept(keep: Sequence[int], decoded: DecodeResult, value: Callable[[DecodedImage], _T | None]) -> dict[int, _T]:
    """``value`` of each kept row's decoded image that has one, by position in the split."""
    out: dict[int, _T] = {}
    for position, i in enumerate(keep):
        image = decoded.images[i]
        kept = value(image) if image is not None else None
        if kept is not None:
            out[position] = kept
    return out


def split_labels(rows: Sequence[ManifestRow], task: str, outputs: int) -> np.ndarray:
    """The labels of a split's rows: class indices (N,) int64; multi-label (N, L) int64 of 1, 0 and
    -1 (unknown); regression targets (N, T) float64. Unlabelled rows (OOD sets) are -1 / NaN."""
    if task == "classification":
        return np.array([r.label for r in rows], dtype=np.int64)
    values = np.full((len(rows), outputs), np.nan)
    for i, row in enumerate(rows):
        if row.values:
            values[i] = row.values
    if task == "multilabel":
        return np.where(np.isnan(values), -1, values).astype(np.int64)
    return values


def load_dataset(
    spec: AuditSpec | DataSource,
    *,
    roles: Iterable[str] = ("eval", "train", "ood"),
    budget: DecodeBudget | None = None,
    progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
    keep_headers: bool = False,
    mapper: RowMapper | None = None,
    pixels: PixelPlace = "memory",
    pixel_dir: Path | None = None,
) -> Dataset:
    """Validate the manifests, decode every image the audit needs once, quarantine failures.

    Args:
        spec: the audit spec, or just the parts the loader uses (:class:`DataSource`).
        roles: which roles to load (``eval`` always; ``train`` and ``ood`` when a check needs them).
        budget: decoding limits.
        progress: ``progress(label, total)`` returns a per-image callback (or None).
        keep_headers: keep each DICOM image's data set without its pixel data
            (:attr:`SplitData.headers`) for checks that read headers, instead of their reading
            every file again (about 22 KB per image of memory, against a second parse).
        mapper: where the rows are decoded (:func:`decode_all`); default the thread pool.
        pixels: where the decoded images are held: ``memory`` (one ``float16`` tensor per split),
            ``disk`` (written to ``pixel_dir/pixels.f16`` as they are decoded and read back by
            rows: :mod:`auditkit.pixels`), or ``auto`` (disk when every planned split's pixels
            would take more than :func:`auditkit.pixels.memory_limit_bytes`).
        pixel_dir: the folder of the pixel file (``disk`` and ``auto``); its owner removes it.
    """
    source = spec if isinstance(spec, DataSource) else DataSource.from_spec(spec)
    roles = set(roles) | {"eval"}
    budget = budget or DecodeBudget()
    root = source.root
    if not root.is_dir():
        raise InputError(f"data.root: folder not found: {root}")
    group_columns = list(source.groups)
    manifest = read_manifest(
        source.manifest,
        root=root,
        classes=list(source.classes),
        group_columns=group_columns,
        header_group_columns=HEADER_GROUP_KEYWORDS,
        task=source.task,
    )
    has_split_column = "split" in manifest.columns
    wanted = {"eval": source.eval_split}
    if source.train_split is not None:
        wanted["train"] = source.train_split
    if not has_split_column and "train" in wanted:
        raise InputError(
            f"{manifest.source.name}: data.splits.train is {source.train_split!r} but the"
            " manifest has no 'split' column"
        )
    by_role: dict[str, list[ManifestRow]] = {}
    for role, value in wanted.items():
        by_role[role] = [r for r in manifest.rows if not has_split_column or r.split == value]
    if not by_role["eval"]:
        present = sorted({r.split or "" for r in manifest.rows})
        raise InputError(
            f"{manifest.source.name}: no rows with split {source.eval_split!r}"
            f" (data.splits.eval); the split column holds {present}"
        )
    if "train" in by_role and not by_role["train"]:
        present = sorted({r.split or "" for r in manifest.rows})
        raise InputError(
            f"{manifest.source.name}: no rows with split {source.train_split!r}"
            f" (data.splits.train); the split column holds {present}"
        )
    extra_manifests: dict[str, Manifest] = {}
    if "ood" in roles:
        for name, path in source.ood.items():
            extra_manifests[f"ood:{name}"] = read_manifest(path, root=root, classes=None, require_label=False)

    patients, studies = Surrogates("P"), Surrogates("S")
    quarantine: list[QuarantineEntry] = []
    splits: dict[str, SplitData] = {}
    channels, *spatial = source.shape
    depth, (height, width) = (spatial[0] if len(spatial) == 3 else None), spatial[-2:]
    plan: list[tuple[str, Sequence[ManifestRow], Path]] = [
        (role, by_role[role], manifest.source) for role in ("eval", "train") if role in by_role and role in roles
    ]
    plan += [(name, m.rows, m.source) for name, m in extra_manifests.items()]
    # Surrogates follow manifest row order whichever split is decoded first.
    ordered = sorted((r for _, rows, src in plan if src == manifest.source for r in rows), key=lambda r: r.row)
    for r in ordered:
        if r.patient_id:
            patients(r.patient_id)
        if r.study_id:
            studies(r.study_id)
    decoded_total = 0
    pixel_file = _pixel_file(pixels, pixel_dir, source.shape, sum(len(rows) for _, rows, _ in plan))
    base = 0
    for name, rows, manifest_path in plan:
        callback = progress(f"decode {name}", len(rows)) if progress else None
        sink = _pixel_sink(pixel_file, base, source.shape) if pixel_file is not None else None
        decoded = decode_all(
            [r.path for r in rows],
            channels=channels,
            height=height,
            width=width,
            window=source.window,
            budget=budget,
            progress=callback,
            keep_headers=keep_headers,
            depth=depth,
            root=root,
            masks=[r.mask for r in rows] if source.task == "segmentation" else None,
            num_classes=len(source.classes),
            mapper=mapper,
            sink=sink,
        )
        decoded_total += len(rows)
        splits[name] = build_split(
            name,
            rows,
            manifest_path,
            decoded,
            source=source,
            patients=patients,
            studies=studies,
            quarantine=quarantine,
            keep_headers=keep_headers,
            pixels=pixel_file,
            base=base,
        )
        base += len(rows)
        if splits[name].n == 0:
            log.warning("split %s: every image was quarantined", name)
    return Dataset(
        splits=splits, quarantine=quarantine, manifest=manifest, images_decoded=decoded_total, pixel_file=pixel_file
    )


def _pixel_file(place: PixelPlace, folder: Path | None, shape: tuple[int, ...], rows: int) -> PixelFile | None:
    """The file the decoded pixels go to, or ``None`` to hold them in memory."""
    if place == "memory" or rows == 0:
        return None
    needed = rows * int(np.prod(shape)) * 2
    if place == "auto" and needed <= memory_limit_bytes():
        return None
    if folder is None:
        raise ValueError("pixels on disk need a pixel_dir")
    log.info("decoded pixels go to disk (%d MiB for %d rows)", needed >> 20, rows)
    return PixelFile(folder / "pixels.f16", shape, rows)


def _pixel_sink(file: PixelFile, base: int, shape: tuple[int, ...]) -> Callable[[int, DecodedImage], None]:
    """Write each decoded image of the right shape at ``base + index``; keep a placeholder of its shape."""

    def sink(index: int, image: DecodedImage) -> None:
        if tuple(image.pixels.shape) == shape:  # another shape is quarantined by build_split
            file.write(base + index, image.pixels)
            image.pixels = np.broadcast_to(np.float32(0), image.pixels.shape)  # no memory, same shape

    return sink
