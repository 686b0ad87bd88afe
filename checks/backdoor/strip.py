"""STRIP on training images: does an image keep its prediction whatever is superimposed on it?

STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC
2019) superimposes an input with clean images and measures the entropy of the predictions: the
anatomy of a clean image is disturbed by the overlay and the prediction wavers, while a trigger
dominates whatever lies under it, so a poisoned image keeps a confident, low-entropy prediction.

Two adjustments for medical images, both measured on the packaged fixtures:

* **the overlay weight**: the paper adds the two images at full weight. A radiograph's trigger
  then loses half its contrast and a trojaned tiny CNN no longer recognises it; the inspected
  image keeps weight ``alpha`` (0.6 by default) and the clean image gets ``1 - alpha``. A larger
  weight keeps more of a faint trigger but also more of a clean training image's own evidence.
  Measured in the check on the packaged fixtures: at 0.7 (false rejection 0.01) 19 of the 28
  binary poisoned images were flagged, but so were 2.9% and 3.3% of the clean twins' training
  images; at the default 0.6 (false rejection 0.005), 4 of the 28, all 27 multi-class ones, and
  at most 0.7% of a clean twin's training images. False alarms on clean data were judged the
  worse error; activation clustering carries the binary case.
* **class-conditional thresholds**: a lesion survives any overlay, so genuine positive images
  also keep low entropy. The threshold is therefore set per predicted class from the eval split
  (the ``false_rejection`` quantile of the eval images predicted as that class, the paper's
  false-rejection-rate rule), and a training image is judged against the threshold of the class
  the model predicts for it.

A limit no threshold from the eval split avoids: a model is more confident on the images it was
trained on, so clean training images fall below an eval-set quantile more often than the
false-rejection rate says (on the packaged clean multi-class twin at alpha 0.7, 2.6% of them fall
below even the lowest eval entropy of their class; on a population of clean models at the default
0.6, up to 10% of a class). The check therefore keeps STRIP's flags in a label only when the
label's clean eval images avoid them in the embedding (:func:`.signatures.confirm_population`),
as it does for the clustering's populations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

__all__ = ["class_thresholds", "strip_entropy"]


def strip_entropy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    overlays: torch.Tensor,
    *,
    blends: int = 16,
    alpha: float = 0.6,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> NDArray[np.float64]:
    """Mean prediction entropy (nats) of each image superimposed with ``blends`` random overlays.

    Args:
        predict: Maps ``(N, C, H, W)`` images in [0, 1] to logits.
        images: The inspected images, ``(N, C, H, W)`` in [0, 1].
        overlays: Clean images to superimpose, same shape except ``N``.
        blends: Overlays per image, drawn with replacement.
        alpha: Weight of the inspected image in ``alpha * x + (1 - alpha) * overlay``.
        batch_size: Blended images per forward call.
        generator: Seeds the overlay draws (CPU generator).

    Returns:
        ``(N,)`` mean entropies in ``[0, log K]``.

    Raises:
        ValueError: No overlays, ``blends < 1`` or ``alpha`` outside ``(0, 1)``.
    """
    if overlays.shape[0] == 0:
        raise ValueError("STRIP needs at least one overlay image, got none")
    if blends < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"blends must be >= 1 and alpha in (0, 1), got {blends}, {alpha}")
    n = images.shape[0]
    if n == 0:
        return np.zeros(0)
    choice = torch.randint(0, overlays.shape[0], (n, blends), generator=generator)
    flat_images = torch.arange(n).repeat_interleave(blends)
    flat_overlays = choice.flatten()
    entropies = torch.empty(n * blends, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n * blends, batch_size):
            stop = min(start + batch_size, n * blends)
            blended = alpha * images[flat_images[start:stop]] + (1.0 - alpha) * overlays[flat_overlays[start:stop]]
            log_probs = torch.log_softmax(predict(blended).float(), dim=1)
            entropies[start:stop] = -(log_probs.exp() * log_probs).sum(dim=1).double().cpu()
    return entropies.view(n, blends).mean(dim=1).numpy()


def class_thresholds(
    entropies: ArrayLike, predicted: ArrayLike, num_classes: int, *, false_rejection: float = 0.01
) -> NDArray[np.float64]:
    """Per predicted class, the ``false_rejection`` quantile of clean images' STRIP entropy.

    Args:
        entropies: ``(M,)`` STRIP entropies of clean (eval) images.
        predicted: ``(M,)`` the class the model predicts for each of them.
        num_classes: Number of classes.
        false_rejection: Share of clean images of a class that fall below its threshold.

    Returns:
        ``(num_classes,)`` thresholds; NaN for a class no clean image is predicted as (nothing
        predicted as it can be judged).
    """
    h = np.asarray(entropies, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.int64)
    if h.shape != p.shape:
        raise ValueError(f"entropies and predicted must have the same shape, got {h.shape} and {p.shape}")
    thresholds = np.full(num_classes, np.nan)
    for k in range(num_classes):
        if bool((p == k).any()):
            thresholds[k] = float(np.quantile(h[p == k], false_rejection))
    return thresholds
