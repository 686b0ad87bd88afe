"""Image fingerprints and the Hamming-space search behind the duplicate measurements.

Plain functions, testable without the engine:

* :func:`pixel_digests`: a BLAKE2b digest of each image's decoded model-input pixels (exact
  duplicates are images with equal digests);
* :func:`perceptual_hash`: a DCT perceptual hash (pHash; Zauner 2010, "Implementation and
  Benchmarking of Perceptual Image Hash Functions", Upper Austria University of Applied Sciences;
  the pHash library, https://www.phash.org) of each image, packed into ``uint64`` words;
* :func:`hamming_pairs` and :func:`hamming_pairs_within`: every pair of hashes within a Hamming
  radius, by vectorised XOR and population count (:func:`numpy.bitwise_count`) over tiles of a
  bounded size, so memory stays constant whatever the number of images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from scipy.fft import dctn

from auditkit.pixels import DiskPixels

__all__ = [
    "HASH_SIZE",
    "Pairs",
    "hamming_distance",
    "hamming_pairs",
    "hamming_pairs_within",
    "low_frequencies",
    "pack_bits",
    "perceptual_hash",
    "pixel_digests",
    "unpack_bits",
    "volume_hash",
]

HASH_SIZE = 32
"""Side of the downsampled image whose DCT the perceptual hash reads."""

HashBits = Literal[64, 128, 256]
HashArray = NDArray[np.uint64]
Pairs = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]
"""``(i, j, distance)``: index arrays into the two hash sets and the Hamming distance of each pair."""

# Tile of the pairwise search: (queries, references) per step; 64 x 4096 words (2 MiB of uint64)
# stay in cache, which is several times faster than one large block.
_CHUNK_BYTES = 1 << 25  # pixels digested or hashed at a time (32 MiB)
_QUERY_TILE = 64
_REFERENCE_TILE = 4096


def pixel_digests(images: torch.Tensor | NDArray[np.generic] | DiskPixels) -> list[str]:
    """A BLAKE2b-128 hex digest of each image's pixels (bytes of the array as stored).

    Args:
        images: ``(N, C, H, W)`` decoded model-input images (the context stores float16).

    Returns:
        ``N`` hex digests; equal digests mean bit-identical decoded images.
    """
    digests: list[str] = []
    step = max(1, _CHUNK_BYTES // (2 * max(1, int(np.prod(tuple(images.shape[1:]))))))
    for start in range(0, images.shape[0], step):  # a chunk at a time: images on disk stay there
        batch = images[start : start + step]
        array = np.ascontiguousarray(batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch))
        digests += [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in array]
    return digests


def low_frequencies(count: int, size: int = HASH_SIZE) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """The ``count`` lowest-frequency AC positions of a ``size`` x ``size`` DCT.

    Ordered by square shells ``max(u, v)`` (then ``u + v``, then ``u``): 64 bits are the classic
    pHash 8 x 8 block without its DC term plus one coefficient of the next shell, 256 bits the
    16 x 16 block likewise. The square block keeps the horizontal and vertical resolution equal.
    """
    order = sorted(
        ((u, v) for u in range(size) for v in range(size) if (u, v) != (0, 0)),
        key=lambda uv: (max(uv), uv[0] + uv[1], uv[0]),
    )[:count]
    rows, cols = zip(*order, strict=True)
    return np.array(rows, dtype=np.intp), np.array(cols, dtype=np.intp)


def perceptual_hash(
    images: torch.Tensor | NDArray[np.floating] | DiskPixels, *, bits: HashBits = 256, batch: int = 4096
) -> HashArray:
    """DCT perceptual hash of each image, packed into ``bits / 64`` ``uint64`` words.

    Method (pHash, Zauner 2010): the channel mean of each image is standardised (zero mean,
    unit variance, so a change of window, level or gain leaves it unchanged), area-averaged to
    32 x 32, and transformed by the orthonormal 2-D DCT-II; the ``bits`` lowest-frequency AC
    coefficients (:func:`low_frequencies`) are compared with their median, one bit each. The Hamming
    distance between two hashes counts the low-frequency structure they disagree on: small for
    re-windowed, re-noised, re-compressed or resampled copies and for shifts and crops of about
    1-2% of the width, about ``bits / 2`` for unrelated images.

    Args:
        images: ``(N, C, H, W)`` images (any value range; ``H, W >= 32`` recommended).
        bits: hash length, 64, 128 or 256.
        batch: images transformed at a time (bounds memory).

    Returns:
        ``uint64`` array ``(N, bits // 64)``; bit ``k`` of the hash is bit ``k % 64`` of word
        ``k // 64``.

    Raises:
        ValueError: ``images`` is not 4-D or ``bits`` is not 64, 128 or 256.
    """
    if bits not in (64, 128, 256):
        raise ValueError(f"bits must be 64, 128 or 256, got {bits!r}")
    tensor = images if isinstance(images, torch.Tensor | DiskPixels) else torch.as_tensor(images)
    if tensor.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(tensor.shape)}")
    rows, cols = low_frequencies(bits)
    out = np.empty((tensor.shape[0], bits // 64), dtype=np.uint64)
    # at most _CHUNK_BYTES of float32 in flight whatever the image size (a 224 x 224 study's 4,096
    # images would be 822 MB)
    batch = max(1, min(batch, _CHUNK_BYTES // (4 * max(1, int(np.prod(tuple(tensor.shape[1:])))))))
    for start in range(0, tensor.shape[0], batch):
        chunk = tensor[start : start + batch].float()
        if chunk.shape[1] != 1:  # one channel is its own mean: no second pass over the images
            chunk = chunk.mean(dim=1, keepdim=True)
        small = F.interpolate(chunk, size=(HASH_SIZE, HASH_SIZE), mode="area")[:, 0]
        values = small.double().numpy()
        values = values - values.mean(axis=(1, 2), keepdims=True)
        scale = values.std(axis=(1, 2), keepdims=True)
        values = np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)
        coefficients = dctn(values, axes=(1, 2), norm="ortho")[:, rows, cols]
        median = np.median(coefficients, axis=1, keepdims=True)
        out[start : start + chunk.shape[0]] = pack_bits(coefficients > median)
    return out


def pack_bits(bits: NDArray[np.bool_]) -> HashArray:
    """Pack ``(N, B)`` booleans (``B`` a multiple of 64) into ``(N, B // 64)`` ``uint64`` words.

    Raises:
        ValueError: ``bits`` is not 2-D with a multiple of 64 columns.
    """
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim != 2 or bits.shape[1] % 64:
        raise ValueError(f"expected (N, B) booleans with B a multiple of 64, got {bits.shape}")
    packed = np.ascontiguousarray(np.packbits(bits, axis=1, bitorder="little"))  # (N, B // 8)
    words = packed.view("<u8").astype(np.uint64, copy=False)
    return words.reshape(bits.shape[0], bits.shape[1] // 64)


def unpack_bits(hashes: HashArray) -> NDArray[np.bool_]:
    """The inverse of :func:`pack_bits`: ``(N, W)`` words to ``(N, 64 W)`` booleans."""
    words = np.ascontiguousarray(np.asarray(hashes, dtype="<u8"))
    return np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)


def hamming_distance(a: HashArray, b: HashArray) -> NDArray[np.int64]:
    """Row-wise Hamming distance of two ``(N, W)`` hash arrays (broadcasting like NumPy)."""
    distance: NDArray[np.int64] = np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)
    return distance


def _check(hashes: HashArray, name: str) -> NDArray[np.uint64]:
    array = np.asarray(hashes)
    if array.ndim != 2 or array.dtype != np.uint64:
        raise ValueError(f"{name} must be a (N, W) uint64 array, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array.T)  # (W, N): one contiguous row per word


def _tiles(queries: NDArray[np.uint64], references: NDArray[np.uint64], radius: int, *, upper: bool) -> Iterator[Pairs]:
    """Pairs within ``radius``, tile by tile; ``upper`` keeps ``j > i`` only (one set).

    Distances accumulate in ``uint8`` (a third less memory traffic than ``uint16``); with 256
    bits the one distance that does not fit, 256, wraps to 0, so hits are re-measured exactly.
    """
    words, n_queries = queries.shape
    n_references = references.shape[1]
    wraps = words * 64 > 255
    buffer = np.empty((_QUERY_TILE, _REFERENCE_TILE), dtype=np.uint64)
    counts = np.empty((_QUERY_TILE, _REFERENCE_TILE), dtype=np.uint8)
    distance = np.empty((_QUERY_TILE, _REFERENCE_TILE), dtype=np.uint8)
    for q0 in range(0, n_queries, _QUERY_TILE):
        q1 = min(q0 + _QUERY_TILE, n_queries)
        r_start = q0 if upper else 0
        for r0 in range(r_start, n_references, _REFERENCE_TILE):
            r1 = min(r0 + _REFERENCE_TILE, n_references)
            shape = (q1 - q0, r1 - r0)
            xor = buffer[: shape[0], : shape[1]]
            ones = counts[: shape[0], : shape[1]]
            total = distance[: shape[0], : shape[1]]
            np.bitwise_xor(queries[0, q0:q1, None], references[0, None, r0:r1], out=xor)
            np.bitwise_count(xor, out=total)
            for word in range(1, words):
                np.bitwise_xor(queries[word, q0:q1, None], references[word, None, r0:r1], out=xor)
                np.bitwise_count(xor, out=ones)
                np.add(total, ones, out=total)
            hit = total <= radius
            if upper:  # keep j > i: drop the diagonal and below inside this tile
                hit &= np.arange(r0, r1)[None, :] > np.arange(q0, q1)[:, None]
            i, j = np.nonzero(hit)
            if not i.size:
                continue
            i, j = i + q0, j + r0
            if wraps:
                exact = np.bitwise_count(queries[:, i] ^ references[:, j]).sum(axis=0, dtype=np.int64)
                keep = exact <= radius
                yield i[keep].astype(np.int64), j[keep].astype(np.int64), exact[keep]
            else:
                d = total[i - q0, j - r0].astype(np.int64)
                yield i.astype(np.int64), j.astype(np.int64), d


def _collect(parts: Iterator[Pairs]) -> Pairs:
    found = list(parts)
    if not found:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return (
        np.concatenate([p[0] for p in found]),
        np.concatenate([p[1] for p in found]),
        np.concatenate([p[2] for p in found]),
    )


def hamming_pairs(queries: HashArray, references: HashArray, radius: int) -> Pairs:
    """Every pair ``(i, j)`` with ``hamming(queries[i], references[j]) <= radius``.

    Exhaustive and exact: the XOR and population count of all pairs, computed tile by tile
    (64 queries x 4096 references), so the cost is ``O(n m W)`` word operations and the memory a
    few MiB whatever ``n`` and ``m``.

    Args:
        queries: ``(n, W)`` ``uint64`` hashes.
        references: ``(m, W)`` ``uint64`` hashes, the same ``W``.
        radius: largest Hamming distance reported (inclusive), ``>= 0``.

    Returns:
        ``(i, j, distance)`` int64 arrays, sorted by ``i`` then ``j``.

    Raises:
        ValueError: bad shapes, dtypes, word counts or a negative radius.
    """
    q, r = _check(queries, "queries"), _check(references, "references")
    if q.shape[0] != r.shape[0]:
        raise ValueError(f"queries have {q.shape[0]} words per hash, references {r.shape[0]}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    i, j, d = _collect(_tiles(q, r, radius, upper=False))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def hamming_pairs_within(hashes: HashArray, radius: int) -> Pairs:
    """Every pair ``i < j`` of one hash set with ``hamming(hashes[i], hashes[j]) <= radius``.

    Same method as :func:`hamming_pairs`, over the upper triangle only.

    Raises:
        ValueError: bad shape or dtype, or a negative radius.
    """
    h = _check(hashes, "hashes")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    i, j, d = _collect(_tiles(h, h, radius, upper=True))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def volume_hash(volumes: torch.Tensor, depths: Sequence[int], bits: HashBits = 256) -> HashArray:
    """The perceptual hashes of axial slices of each volume, one after another.

    Args:
        volumes: ``(N, C, D, H, W)`` volumes.
        depths: slice indices, the same for every volume
            (:func:`.fingerprint.slice_depths`).
        bits: each slice's hash length.

    Returns:
        ``uint64`` array ``(N, len(depths) * bits // 64)``: the Hamming distance of two volumes is
        the sum of their slices' distances.

    Raises:
        ValueError: ``volumes`` is not 5-D, a depth is out of range, or ``bits`` is invalid.
    """
    if volumes.ndim != 5:
        raise ValueError(f"volumes must have shape (N, C, D, H, W), got {tuple(volumes.shape)}")
    if not depths or any(not 0 <= d < volumes.shape[2] for d in depths):
        raise ValueError(f"depths must be slice indices in [0, {volumes.shape[2]}), got {list(depths)}")
    return np.concatenate([perceptual_hash(volumes[:, :, d], bits=bits) for d in depths], axis=1)
