"""What every check that measures a segmentation model shares: the per-case figures.

Dice, HD95 and normalised surface Dice per case and foreground class are MONAI's own functions
(``compute_dice(include_background=False, ignore_empty=True)``,
``compute_hausdorff_distance(percentile=95, spacing=...)``, ``compute_surface_dice(class_thresholds,
spacing)``) on one-hot maps: distance metrics differ between tools by large margins (surface
extraction, percentile definition, empty masks), so every check uses this one named
implementation (:func:`implementation`) and a reviewer's MONAI notebook gives the same numbers.
A case whose reference holds no pixel of a class has no Dice (NaN); HD95 is NaN when either side
is empty; NSD is 0 when exactly one side is empty and NaN when both are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["case_figures", "implementation", "one_hot"]

_CHUNK = 16  # cases per MONAI call (the one-hot maps of a chunk are held at once)


def implementation() -> str:
    """The implementation's name, as the findings and the report give it."""
    import monai

    return (
        f"MONAI {monai.__version__}: compute_dice(include_background=False, ignore_empty=True),"
        " compute_hausdorff_distance(percentile=95, spacing), compute_surface_dice(class_thresholds, spacing)"
    )


def case_figures(
    predicted: NDArray[Any],
    reference: NDArray[Any],
    spacing: NDArray[np.float64],
    n_classes: int,
    tolerances: Sequence[float] = (),
    *,
    figures: Sequence[str] = ("dice", "hd95", "nsd"),
) -> dict[str, NDArray[np.float64]]:
    """Dice, HD95 (mm) and NSD of every case and foreground class, ``(N, K - 1)`` each (NaN where
    MONAI leaves a figure undefined), by MONAI's functions on one-hot maps, chunk by chunk.

    Args:
        predicted: arg-max label maps ``(N, *spatial)``.
        reference: reference label maps ``(N, *spatial)``, values in ``0 .. n_classes - 1``.
        spacing: pixel or voxel size per case ``(N, len(spatial))`` in mm.
        n_classes: classes including the background (label 0).
        tolerances: NSD tolerance in mm per foreground class (``n_classes - 1`` values; only
            needed for ``nsd``).
        figures: which of ``dice``, ``hd95`` and ``nsd`` to compute (the distances cost most).
    """
    from monai.metrics.hausdorff_distance import compute_hausdorff_distance
    from monai.metrics.meandice import compute_dice
    from monai.metrics.surface_dice import compute_surface_dice

    n = predicted.shape[0]
    out = {name: np.full((n, n_classes - 1), np.nan) for name in figures}
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        pred = one_hot(predicted[start:stop], n_classes)
        ref = one_hot(reference[start:stop], n_classes)
        spacings = [tuple(float(v) for v in row) for row in spacing[start:stop]]
        with warnings.catch_warnings():  # MONAI warns on every empty mask; they are counted instead
            warnings.simplefilter("ignore")
            if "dice" in out:
                out["dice"][start:stop] = compute_dice(pred, ref, include_background=False, ignore_empty=True).numpy()
            if "hd95" in out:
                out["hd95"][start:stop] = compute_hausdorff_distance(
                    pred, ref, include_background=False, percentile=95, spacing=spacings
                ).numpy()
            if "nsd" in out:
                out["nsd"][start:stop] = compute_surface_dice(
                    pred, ref, class_thresholds=list(tolerances), include_background=False, spacing=spacings
                ).numpy()
    return out


def one_hot(labels: NDArray[Any], n_classes: int) -> torch.Tensor:
    """Label maps ``(N, *spatial)`` as float one-hot maps ``(N, K, *spatial)``."""
    tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(tensor, n_classes).movedim(-1, 1).float()
