"""Decoded images on disk: a split's pixels written once, read back by rows.

A decoded split is held as one ``float16`` tensor by default. For a study whose pixels do not fit
comfortably in memory (``RunOptions.pixels``: ``disk``, or ``auto`` above
:func:`memory_limit_bytes`), the loader writes each decoded image to a file as it arrives
(:class:`PixelFile`) and the split holds a :class:`DiskPixels` - an indexable stand-in for the
tensor that reads the rows asked for (``images[rows]``, ``images[a:b]``, ``images[:, :, d]``) with
``pread`` into a new buffer. Nothing is memory-mapped, so what a check reads is what stays
resident: the shared pass reads a batch at a time, the adversarial, corruption and backdoor
checks read their samples, the leakage check's fingerprints and hashes read in batches.

The files live in the run's output folder (``.pixels/``) and are removed when the audit ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = [
    "DiskPixels",
    "PixelFile",
    "Pixels",
    "concat_pixels",
    "memory_limit_bytes",
    "pixel_record",
    "release_large_allocations",
    "remove_pixel_files",
]

Pixels: TypeAlias = "torch.Tensor | DiskPixels"
_DTYPE = np.float16
_READ_ROWS = 256  # rows per read when a whole split is gathered for a per-depth index


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 128 * 1024


def release_large_allocations() -> bool:
    """Have glibc serve every allocation above 128 KiB from its own mapping, returned on free.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    blocks of a batch's size come from the heap and stay resident when freed. Threads that each
    resample batches of 224 x 224 images left 1.3 GB resident that way at 7,000 images (the
    leakage fingerprints' analysis images, measured: +1,330 MiB, against +220 MiB with the
    threshold fixed). Fixing the threshold keeps memory to what is live. Linux with glibc only;
    ``False`` elsewhere (nothing changed).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def memory_limit_bytes() -> int:
    """Decoded pixels held in memory at most under ``pixels: auto`` (``AUDITKIT_PIXEL_MEMORY_MIB``,
    default 2048 MiB); above it they go to disk."""
    text = os.environ.get("AUDITKIT_PIXEL_MEMORY_MIB", "2048")
    try:
        mib = float(text)
    except ValueError:
        raise ValueError(f"AUDITKIT_PIXEL_MEMORY_MIB must be a number of MiB, got {text!r}") from None
    return int(mib * 2**20)


class PixelFile:
    """A file of ``capacity`` rows of ``row_shape`` ``float16`` values, written row by row.

    Args:
        path: the file (created, truncated).
        row_shape: one image's shape, ``(C, H, W)`` or ``(C, D, H, W)``.
        capacity: rows the file can hold (every planned split's manifest rows, one after another;
            quarantined ones stay unwritten).
    """

    def __init__(self, path: Path, row_shape: Sequence[int], capacity: int) -> None:
        self.path = Path(path)
        self.row_shape = tuple(int(v) for v in row_shape)
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(_DTYPE).itemsize
        self.capacity = capacity
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.row_bytes * capacity)

    def write(self, position: int, pixels: NDArray[Any]) -> None:
        """Store one image at ``position`` (converted to ``float16``)."""
        if not 0 <= position < self.capacity:
            raise IndexError(f"row {position} outside the pixel file's {self.capacity} rows")
        array = np.ascontiguousarray(pixels, dtype=_DTYPE)
        if array.shape != self.row_shape:
            raise ValueError(f"pixels of shape {array.shape}, expected {self.row_shape}")
        os.pwrite(self._fd, array.tobytes(), position * self.row_bytes)

    def view(self, positions: Sequence[int] | NDArray[np.integer]) -> DiskPixels:
        """The rows at ``positions`` (in that order), as a split's images."""
        return DiskPixels(self, np.asarray(positions, dtype=np.int64))

    def read(self, positions: NDArray[np.int64]) -> NDArray[np.float16]:
        """Rows at ``positions`` into a new array; runs of consecutive rows in one read each."""
        out = np.empty((positions.size, *self.row_shape), dtype=_DTYPE)
        if not positions.size:
            return out
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, positions.size], strict=True):
            target = out[start:stop].data.cast("B")
            offset = int(positions[start]) * self.row_bytes
            done = 0
            while done < target.nbytes:  # pread may return less than asked
                count = os.preadv(self._fd, [target[done:]], offset + done)
                if count <= 0:
                    raise OSError(f"{self.path.name}: short read at byte {offset + done}")
                done += count
        return out

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker or another process reopens the file
        return {"path": self.path, "row_shape": self.row_shape, "row_bytes": self.row_bytes, "capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # the file itself is removed with its folder (remove_pixel_files)
        with contextlib.suppress(OSError):
            self.close()


class DiskPixels:
    """A split's images on disk, indexed like the ``(N, *row_shape)`` ``float16`` tensor they stand for.

    ``images[i]``, ``images[a:b]``, ``images[index_array]`` and ``images[rows, ...rest]`` read the
    rows asked for and return a ``torch.float16`` tensor (a new buffer); ``.to(dtype)``,
    ``.float()`` and ``.numpy()`` read every row (for callers that need the whole split at once).
    """

    def __init__(self, file: PixelFile, positions: NDArray[np.int64]) -> None:
        self.file = file
        self.positions = positions

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.positions.size), *self.file.row_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.file.row_shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16

    @property
    def nbytes(self) -> int:
        """Bytes the rows would take in memory."""
        return int(self.positions.size) * self.file.row_bytes

    def __len__(self) -> int:
        return int(self.positions.size)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def _rows(self, key: Any) -> tuple[NDArray[np.int64], bool]:
        """Positions in the file selected by ``key`` along the first axis, and whether it was one row."""
        if isinstance(key, int | np.integer):
            index = int(key)
            if not -len(self) <= index < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} images")
            return self.positions[[index]], True
        if isinstance(key, slice):
            return self.positions[key], False
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        array = np.asarray(key)
        if array.dtype == bool:
            return self.positions[array], False
        return self.positions[array.astype(np.int64)], False

    def __getitem__(self, key: Any) -> torch.Tensor:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        positions, single = self._rows(key)
        if not rest:
            out = torch.from_numpy(self.file.read(positions))
            return out[0] if single else out
        # an index into the rows' other axes (e.g. one depth of every volume): applied a chunk at a time
        parts = [
            torch.from_numpy(self.file.read(positions[start : start + _READ_ROWS]))[(slice(None), *rest)]
            for start in range(0, max(1, positions.size), _READ_ROWS)
        ]
        out = torch.cat(parts) if parts else torch.empty(0)
        return out[0] if single else out

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive rows, ``size`` at a time."""
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        return self[:].to(dtype)

    def float(self) -> torch.Tensor:
        return self.to(torch.float32)

    def numpy(self) -> NDArray[np.float16]:
        return self.file.read(self.positions)

    def __repr__(self) -> str:
        return f"DiskPixels({tuple(self.shape)}, file={self.file.path.name})"


def concat_pixels(parts: Sequence[Pixels]) -> Pixels:
    """``torch.cat`` of split images; splits on disk in one file (every split of a run shares its
    file) pool into one view without reading them."""
    disk = [p for p in parts if isinstance(p, DiskPixels)]
    if not disk:
        return torch.cat([p for p in parts if isinstance(p, torch.Tensor)])
    if len(disk) == len(parts) and len({p.file.path for p in disk}) == 1:
        return DiskPixels(disk[0].file, np.concatenate([p.positions for p in disk]))
    return torch.cat([p[:] if isinstance(p, DiskPixels) else p for p in parts])


def pixel_record(file: PixelFile | None) -> dict[str, Any]:
    """``results.json`` ``run.pixels``: where the decoded images were held, and how many MiB on disk."""
    if file is None:
        return {"place": "memory"}
    return {"place": "disk", "mib": round(file.row_bytes * file.capacity / 2**20, 1)}


def remove_pixel_files(folder: Path) -> None:
    """Remove a run's pixel files (``out_dir/.pixels``)."""
    shutil.rmtree(folder, ignore_errors=True)
