"""The 3-D acquisition artefacts of the corruption check: physics, determinism, TorchIO parity,
the modality defaults and the check on volumes."""

from __future__ import annotations

import itertools
import math
import typing

import numpy as np
import pytest
import torch
from torch import nn

from auditkit.checks.corruption import CorruptionCheck
from auditkit.checks.corruption.volumes import (
    VOLUME_CORRUPTION_NAMES,
    VOLUME_CORRUPTIONS,
    VolumeCorruptionName,
    apply_volume_corruption,
    default_volume_corruptions,
    draw_volume_randomness,
)
from auditkit.testing import make_context

SHAPE = (1, 12, 24, 24)


def _phantom(n: int = 2) -> torch.Tensor:
    """Spheres of mid-grey tissue on a dark background, a bright core: anatomy-like volumes."""
    d, h, w = SHAPE[1:]
    z, y, x = torch.meshgrid(
        torch.linspace(-1, 1, d), torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij"
    )
    out = []
    for i in range(n):
        r = torch.sqrt(z**2 + (y - 0.1 * i) ** 2 + x**2)
        out.append((0.1 + 0.4 * (r < 0.8) + 0.4 * (r < 0.3)).float()[None])
    return torch.stack(out)


def test_the_catalogue_names_every_artefact_with_its_physics() -> None:
    assert set(typing.get_args(VolumeCorruptionName)) == set(VOLUME_CORRUPTION_NAMES)
    assert VOLUME_CORRUPTION_NAMES == (
        "mr_motion",
        "mr_ghosting",
        "mr_spike",
        "mr_bias_field",
        "ct_noise",
        "slice_thickness",
    )
    for corruption in VOLUME_CORRUPTIONS.values():
        assert len(corruption.levels) == 5 and list(corruption.levels) == sorted(corruption.levels)
        assert corruption.physics and corruption.parameter


@pytest.mark.parametrize("name", VOLUME_CORRUPTION_NAMES)
def test_each_artefact_grows_with_severity_keeps_the_volume_and_is_deterministic(name: str) -> None:
    volumes = _phantom()
    spacing = np.array([[2.5, 1.25, 1.25]] * 2)
    draw = draw_volume_randomness(name, tuple(volumes.shape), [11, 12])
    assert torch.equal(apply_volume_corruption(volumes, name, 0, spacing=spacing, draw=draw), volumes)
    changes = []
    for severity in range(1, 6):
        out = apply_volume_corruption(volumes.half(), name, severity, spacing=spacing, draw=draw)
        assert out.shape == volumes.shape and out.dtype == torch.float16
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        changes.append(float((out.float() - volumes).abs().mean()))
    assert changes[0] > 0 and all(b >= a for a, b in itertools.pairwise(changes)), changes
    # Per-volume seeds: the same seed gives the same volume whatever the batch.
    again = apply_volume_corruption(volumes[1:], name, 3, spacing=spacing[1:], seeds=[12])
    torch.testing.assert_close(
        again, apply_volume_corruption(volumes, name, 3, spacing=spacing, seeds=[11, 12])[1:], rtol=0, atol=1e-6
    )


def test_the_mr_artefacts_are_torchios_transforms() -> None:
    import torchio as tio

    volume = _phantom(1)
    spacing = (2.5, 1.25, 1.25)
    affine = np.diag([*spacing, 1.0])

    def direct(transform: typing.Any) -> torch.Tensor:
        subject = tio.Subject(image=tio.ScalarImage(tensor=volume[0].clone(), affine=affine))
        return transform(subject)["image"].data.float().clamp(0, 1)

    draw = draw_volume_randomness("mr_spike", tuple(volume.shape), [3])
    assert draw is not None
    expected = direct(tio.Spike(spikes_positions=draw[0].numpy()[None], intensity=0.2))
    got = apply_volume_corruption(volume, "mr_spike", 3, spacing=[spacing], draw=draw)[0]
    torch.testing.assert_close(got, expected)
    draw = draw_volume_randomness("mr_motion", tuple(volume.shape), [3])
    assert draw is not None
    params = draw[0].numpy()
    expected = direct(
        tio.Motion(
            degrees=5 * params[:, :3], translation=5 * params[:, 3:6], times=params[:, 6], image_interpolation="linear"
        )
    )
    got = apply_volume_corruption(volume, "mr_motion", 4, spacing=[spacing], draw=draw)[0]
    torch.testing.assert_close(got, expected)


def test_the_spike_grating_and_the_bias_field_have_their_documented_size() -> None:
    flat = torch.full((1, *SHAPE), 0.5)
    # A spike of magnitude r times the spectrum's peak (the DC term) is a grating of amplitude
    # r times the mean intensity.
    level = VOLUME_CORRUPTIONS["mr_spike"].level(2)
    out = apply_volume_corruption(flat, "mr_spike", 2, seeds=[5])
    assert float((out - flat).abs().max()) == pytest.approx(level * 0.5, rel=0.02)
    # The bias field's log-gain peaks at the level.
    level = VOLUME_CORRUPTIONS["mr_bias_field"].level(3)
    out = apply_volume_corruption(torch.full((1, *SHAPE), 0.4), "mr_bias_field", 3, seeds=[5])
    assert float(torch.log(out / 0.4).abs().max()) == pytest.approx(level, rel=1e-3)


def test_ct_noise_has_the_level_as_its_sd_correlated_in_plane_only() -> None:
    flat = torch.full((1, 1, 16, 48, 48), 0.5)
    level = VOLUME_CORRUPTIONS["ct_noise"].level(2)
    noise = (apply_volume_corruption(flat, "ct_noise", 2, seeds=[9]) - flat)[0, 0]
    assert float(noise.std()) == pytest.approx(level, rel=0.05)
    in_plane = float(torch.corrcoef(torch.stack([noise[:, :, :-1].flatten(), noise[:, :, 1:].flatten()]))[0, 1])
    across = float(torch.corrcoef(torch.stack([noise[:-1].flatten(), noise[1:].flatten()]))[0, 1])
    assert in_plane > 0.4 and abs(across) < 0.05


def test_thicker_slices_average_a_slab_and_leave_what_is_constant_along_z() -> None:
    d, h, w = SHAPE[1:]
    constant = torch.rand(1, 1, 1, h, w).expand(1, 1, d, h, w).contiguous() * 0.8
    torch.testing.assert_close(apply_volume_corruption(constant, "slice_thickness", 5), constant)
    one_slice = torch.zeros(1, *SHAPE)
    one_slice[0, 0, 6] = 0.9
    for severity in (2, 4):
        factor = VOLUME_CORRUPTIONS["slice_thickness"].level(severity)
        out = apply_volume_corruption(one_slice, "slice_thickness", severity)[0, 0, :, 12, 12]
        assert float(out.max()) < 0.9 * 1.05 / factor + 0.05  # spread over about `factor` slices
        assert float(out.sum()) == pytest.approx(0.9, rel=0.25)  # the slab's signal is kept


def test_motion_is_in_millimetres_so_the_spacing_matters() -> None:
    volume = _phantom(1)
    draw = draw_volume_randomness("mr_motion", tuple(volume.shape), [1])
    assert draw is not None
    draw[..., :3] = 0.0  # translations only: a rotation moves voxels alike at any spacing
    fine = apply_volume_corruption(volume, "mr_motion", 4, spacing=[(1.0, 1.0, 1.0)], draw=draw)
    coarse = apply_volume_corruption(volume, "mr_motion", 4, spacing=[(8.0, 8.0, 8.0)], draw=draw)
    # Up to 5 mm is up to 5 voxels at 1 mm and under a voxel at 8 mm: the coarse grid changes less.
    assert float((fine - volume).abs().mean()) > 2 * float((coarse - volume).abs().mean())
    # Twice the millimetres on a grid of twice the spacing are the same voxels moved.
    doubled = draw.clone()
    doubled[..., 3:6] *= 2
    torch.testing.assert_close(
        apply_volume_corruption(volume, "mr_motion", 4, spacing=[(2.0, 2.0, 2.0)], draw=doubled),
        fine,
        atol=1e-5,
        rtol=0,
    )


def test_ghosts_lie_along_the_phase_encoding_axis() -> None:
    volume = torch.zeros(1, *SHAPE)
    volume[0, 0, 4:8, 9:15, 9:15] = 0.8
    draw = draw_volume_randomness("mr_ghosting", tuple(volume.shape), [2])
    assert draw is not None
    axis = int(draw[0, 0])  # 1: rows (H), 2: columns (W)
    out = apply_volume_corruption(volume, "mr_ghosting", 5, draw=draw)[0, 0, 4:8]
    rows_outside = float(out[:, :9, 9:15].abs().sum() + out[:, 15:, 9:15].abs().sum())
    cols_outside = float(out[:, 9:15, :9].abs().sum() + out[:, 9:15, 15:].abs().sum())
    along, across = (rows_outside, cols_outside) if axis == 1 else (cols_outside, rows_outside)
    assert along > 3 * across


def test_the_defaults_follow_the_modality() -> None:
    assert default_volume_corruptions(["CT", "CT"]) == ("ct_noise", "slice_thickness")
    assert default_volume_corruptions(["MR"]) == (
        "mr_motion",
        "mr_ghosting",
        "mr_spike",
        "mr_bias_field",
        "slice_thickness",
    )
    assert default_volume_corruptions(["CT", "MR"]) == VOLUME_CORRUPTION_NAMES
    assert default_volume_corruptions(["CT", None]) == VOLUME_CORRUPTION_NAMES  # a volume without a header
    assert default_volume_corruptions([None]) == VOLUME_CORRUPTION_NAMES


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown volume corruption 'blur'"):
        apply_volume_corruption(_phantom(1), "blur", 1)
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        apply_volume_corruption(torch.zeros(1, 1, 8, 8), "ct_noise", 1)
    with pytest.raises(ValueError, match="one spacing per volume"):
        apply_volume_corruption(_phantom(2), "mr_motion", 1, spacing=[(1.0, 1.0, 1.0)])


class _MeanNet(nn.Module):
    """A 3-D classifier that thresholds the mean intensity of the volume's centre."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, :, 3:9, 8:16, 8:16].mean(dim=(1, 2, 3, 4))
        return torch.stack([0.5 - centre, centre - 0.5], dim=1) * 40


def test_the_check_runs_the_volume_artefacts_on_a_3d_classifier() -> None:
    rng = np.random.default_rng(0)
    n = 12
    labels = np.arange(n) % 2
    volumes = np.full((n, *SHAPE), 0.2, dtype=np.float32)
    for i, label in enumerate(labels):
        volumes[i, 0, 3:9, 8:16, 8:16] = 0.7 if label else 0.3
    volumes += rng.normal(0, 0.01, volumes.shape).astype(np.float32)
    ctx = make_context(
        labels, images=np.clip(volumes, 0, 1), model=_MeanNet(), check=CorruptionCheck, spacing=[2.5, 1.25, 1.25]
    )
    params = CorruptionCheck.Params(severities=[1, 5], n_boot=50)
    result = CorruptionCheck().run(ctx, params)
    names = {m.labels["corruption"] for m in result.metrics if m.name == "corruption.accuracy" and m.labels}
    assert names == {"none", *VOLUME_CORRUPTION_NAMES}  # no header: every artefact
    clean = next(m for m in result.metrics if m.name == "corruption.accuracy" and m.labels["severity"] == "0")
    assert clean.value == 1.0
    setup = next(f for f in result.findings if f["kind"] == "corruption_setup")
    assert setup["modalities"] == {"unknown": n}
    assert setup["corruptions"]["slice_thickness"]["thickness_mm"]["5"] == [15.0, 15.0]  # 6 x 2.5 mm
    drops = {
        (m.labels["corruption"], m.labels["severity"]): m.value
        for m in result.metrics
        if m.name == "corruption.relative_drop"
    }
    assert all(v is not None and math.isfinite(v) for v in drops.values())
    # A heavy bias field moves the centre's mean across the threshold for some volumes.
    assert max(drops.values()) > 0
    with pytest.raises(ValueError, match=r"checks.corruption.corruptions: \['blur'\] do not apply to volumes"):
        CorruptionCheck().run(ctx, CorruptionCheck.Params(corruptions=["blur", "ct_noise"], n_boot=0))
    selected = CorruptionCheck().run(ctx, CorruptionCheck.Params(corruptions=["ct_noise"], severities=[2], n_boot=0))
    assert {m.labels.get("corruption") for m in selected.metrics if m.labels} == {"none", "ct_noise"}


def test_a_volume_artefact_is_refused_for_2d_images() -> None:
    ctx = make_context([0, 1], images=np.zeros((2, 1, 8, 8)), probs=[[0.9, 0.1], [0.1, 0.9]], check=CorruptionCheck)
    with pytest.raises(ValueError, match=r"\['ct_noise'\] do not apply to 2-D images"):
        CorruptionCheck().run(ctx, CorruptionCheck.Params(corruptions=["ct_noise"], n_boot=0))
