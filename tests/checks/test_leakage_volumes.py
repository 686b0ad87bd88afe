"""The near-duplicate search on 3-D volumes: axial slices' fingerprints and hashes, planted copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditkit.checks.leakage import LeakageCheck, perceptual_hash, pixel_digests
from auditkit.checks.leakage.duplicates import near_duplicate_search
from auditkit.checks.leakage.fingerprint import fingerprints, slice_depths, volume_fingerprints
from auditkit.checks.leakage.hashing import hamming_distance, volume_hash
from auditkit.fixtures.volume_copies import COPY_KINDS, CopiedVolumes, copied_volumes, copy_scan

N_PATIENTS = 150
N_COPIES = 2 * len(COPY_KINDS)


def test_slice_depths_are_the_centres_of_equal_slabs() -> None:
    assert slice_depths(16, 4) == [2, 6, 10, 14]
    assert slice_depths(16, 1) == [8]
    assert slice_depths(3, 4) == [0, 1, 2]  # never more slices than the volume has
    assert slice_depths(1, 8) == [0]
    with pytest.raises(ValueError, match="depth=0"):
        slice_depths(0, 4)
    with pytest.raises(ValueError, match="slices=0"):
        slice_depths(16, 0)


def test_a_volume_similarity_is_the_mean_of_its_slices_similarities() -> None:
    generator = torch.Generator().manual_seed(3)
    volumes = torch.rand(20, 1, 8, 32, 32, generator=generator)
    prints = volume_fingerprints(volumes, slices=4)
    per_depth = [fingerprints(volumes[:, :, d]).vectors for d in slice_depths(8, 4)]
    expected = sum(v @ v.T for v in per_depth) / 4
    torch.testing.assert_close(prints.vectors @ prints.vectors.T, expected, atol=1e-5, rtol=0)
    assert volume_fingerprints(torch.empty(0, 1, 8, 32, 32)).vectors.shape == (0, 0)
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        volume_fingerprints(volumes[:, :, 0])


def test_a_volume_hash_is_its_slices_hashes_one_after_another() -> None:
    volumes = torch.rand(5, 1, 6, 32, 32, generator=torch.Generator().manual_seed(4))
    hashes = volume_hash(volumes, [1, 4], bits=128)
    expected = np.concatenate(
        [perceptual_hash(volumes[:, :, 1], bits=128), perceptual_hash(volumes[:, :, 4], bits=128)], axis=1
    )
    np.testing.assert_array_equal(hashes, expected)
    distance = hamming_distance(hashes[:1], hashes[1:2])
    assert distance[0] == sum(hamming_distance(expected[:1, w : w + 2], expected[1:2, w : w + 2])[0] for w in (0, 2))
    with pytest.raises(ValueError, match=r"depths must be slice indices in \[0, 6\), got \[6\]"):
        volume_hash(volumes, [6])
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        volume_hash(volumes[:, :, 0], [0])


def test_copy_scan_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'mirror'"):
        copy_scan(np.zeros((4, 8, 8), dtype=np.int16), "mirror", np.random.default_rng(0))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> CopiedVolumes:
    return copied_volumes(tmp_path_factory.mktemp("volume_copies"), n_patients=N_PATIENTS, n_copies=N_COPIES, seed=11)


def _near_pairs(volumes: np.ndarray) -> set[tuple[int, int]]:
    """Pairs the check's search finds with its defaults (no embeddings), positions ``i < j``."""
    images = torch.from_numpy(volumes).half()  # as the engine stores them
    p = LeakageCheck.Params()
    depths = slice_depths(images.shape[2], p.near_volume_slices)
    search = near_duplicate_search(
        images, volume_hash(images, depths), pixel_digests(images), features=None, z=p.near_z,
        z_per_decade=p.near_z_per_decade, floor=p.near_min_similarity, components=p.near_components,
        max_radius=int(p.near_max_distance * p.hash_bits * len(depths)), hash_z=p.near_hash_z,
        min_cosine=p.near_min_cosine, rng=np.random.default_rng(0), volume_slices=p.near_volume_slices,
    )  # fmt: skip
    return {(int(a), int(b)) for a, b in zip(search.i, search.j, strict=True)}


def test_planted_volume_copies_are_told_from_look_alike_patients(planted: CopiedVolumes) -> None:
    truth = {(c.original, c.copy): c.kind for c in planted.copies}
    assert len(truth) == N_COPIES and set(truth.values()) == set(COPY_KINDS)
    found = _near_pairs(planted.volumes)
    assert found <= set(truth), found - set(truth)  # no look-alike pair
    assert len(found) >= 0.9 * len(truth), set(truth) - found
    for kind in COPY_KINDS:  # every re-export, re-reconstruction and re-acquisition step
        assert any(truth[pair] == kind for pair in found), kind


def test_look_alike_volumes_without_copies_have_no_near_duplicate(planted: CopiedVolumes) -> None:
    # The same patients, one anatomy model at three sites: the clean twin.
    assert _near_pairs(planted.volumes[:N_PATIENTS]) == set()


def test_the_middle_slice_alone_misses_copies_the_slices_find(planted: CopiedVolumes) -> None:
    # What was tried before: one slice per volume. Its look-alike pairs spread twice as wide, so
    # the calibrated bound rises above some copies (docs/leakage.md, "Volumes").
    images = torch.from_numpy(planted.volumes)
    one = volume_fingerprints(images, slices=1).vectors
    eight = volume_fingerprints(images).vectors  # the default, 8
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, N_PATIENTS, (2, 2000))
    keep = i != j

    def spread(v: torch.Tensor) -> float:
        values = (v[i[keep]] * v[j[keep]]).sum(dim=1).numpy()
        q1, q3 = np.percentile(values, [25, 75])
        return float(q3 - q1)

    assert spread(eight) < 0.5 * spread(one)
