"""Decoded images on disk: read back by rows, and the same audit as with the images in memory."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from auditkit.cli import main
from auditkit.demo import prepare_demo
from auditkit.pixels import DiskPixels, PixelFile, concat_pixels, memory_limit_bytes

# every check that reads pixels, and the ones that read only the pass's outputs
CHECKS = "calibration,bias,performance,leakage,phi,ood,corruption,adversarial,backdoor"


def _file(tmp_path: Path, rows: int = 10, shape: tuple[int, ...] = (1, 3, 4)) -> tuple[PixelFile, np.ndarray]:
    values = np.random.default_rng(0).random((rows, *shape)).astype(np.float16)
    file = PixelFile(tmp_path / "px" / "pixels.f16", shape, rows)
    for i in range(rows):
        file.write(i, values[i])
    return file, values


def test_rows_read_back_by_every_kind_of_index(tmp_path: Path) -> None:
    file, values = _file(tmp_path)
    images = file.view([7, 2, 3, 4, 9])  # a split's rows, in its order: a run and single rows
    expected = torch.from_numpy(values[[7, 2, 3, 4, 9]])
    assert images.shape == torch.Size((5, 1, 3, 4)) and images.ndim == 4 and len(images) == 5
    assert images.dtype == torch.float16 and images.nbytes == 5 * 12 * 2
    assert torch.equal(images[1], expected[1]) and torch.equal(images[-1], expected[-1])
    assert torch.equal(images[1:4], expected[1:4])
    assert torch.equal(images[np.array([4, 0, 0])], expected[[4, 0, 0]])
    assert torch.equal(images[torch.tensor([3, 1])], expected[[3, 1]])
    assert torch.equal(images[np.array([True, False, True, False, False])], expected[[0, 2]])
    assert torch.equal(images[:, :, 1], expected[:, :, 1])  # one row of every image (a depth, for volumes)
    assert torch.equal(images.to(torch.float32), expected.float()) and torch.equal(images.float(), expected.float())
    assert np.array_equal(images.numpy(), expected.numpy())
    assert [b.shape[0] for b in images.batches(2)] == [2, 2, 1]
    with pytest.raises(IndexError, match="row 5 out of range for 5 images"):
        images[5]


def test_a_pixel_file_travels_to_another_process_by_path(tmp_path: Path) -> None:
    file, values = _file(tmp_path)
    images = pickle.loads(pickle.dumps(file.view([0, 5])))  # a DataLoader worker under spawn
    assert torch.equal(images[:], torch.from_numpy(values[[0, 5]]))


def test_writes_are_held_to_the_file_shape(tmp_path: Path) -> None:
    file, _ = _file(tmp_path)
    with pytest.raises(ValueError, match=r"pixels of shape \(1, 4, 4\), expected \(1, 3, 4\)"):
        file.write(0, np.zeros((1, 4, 4)))
    with pytest.raises(IndexError, match="row 10 outside the pixel file's 10 rows"):
        file.write(10, np.zeros((1, 3, 4)))


def test_splits_of_one_file_pool_without_a_read(tmp_path: Path) -> None:
    file, values = _file(tmp_path)
    pooled = concat_pixels([file.view([0, 1]), file.view([8])])
    assert isinstance(pooled, DiskPixels) and torch.equal(pooled[:], torch.from_numpy(values[[0, 1, 8]]))
    mixed = concat_pixels([file.view([0]), torch.zeros(1, 1, 3, 4, dtype=torch.float16)])
    assert isinstance(mixed, torch.Tensor) and mixed.shape[0] == 2
    tensors = concat_pixels([torch.ones(2, 1, 3, 4), torch.zeros(1, 1, 3, 4)])
    assert isinstance(tensors, torch.Tensor) and tensors.shape[0] == 3


def test_the_memory_limit_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDITKIT_PIXEL_MEMORY_MIB", "1.5")
    assert memory_limit_bytes() == int(1.5 * 2**20)
    monkeypatch.setenv("AUDITKIT_PIXEL_MEMORY_MIB", "lots")
    with pytest.raises(ValueError, match="AUDITKIT_PIXEL_MEMORY_MIB must be a number of MiB, got 'lots'"):
        memory_limit_bytes()


def test_the_loader_writes_pixels_to_disk_as_they_are_decoded(tmp_path: Path) -> None:
    from auditkit.data import load_dataset
    from auditkit.spec import load_spec

    spec_path = prepare_demo(tmp_path / "demo", n_patients=12, image_size=64)
    broken = sorted((tmp_path / "demo" / "study").rglob("*.dcm"))[2]
    broken.write_bytes(broken.read_bytes()[:200])
    spec = load_spec(spec_path)
    memory = load_dataset(spec, roles=("eval", "train"))
    disk = load_dataset(spec, roles=("eval", "train"), pixels="disk", pixel_dir=tmp_path / "px")
    assert memory.pixel_file is None and disk.pixel_file is not None
    assert [q.row for q in memory.quarantine] == [q.row for q in disk.quarantine] and len(disk.quarantine) == 1
    for name, split in memory.splits.items():
        stored = disk.splits[name].images
        assert isinstance(stored, DiskPixels) and isinstance(split.images, torch.Tensor)
        assert torch.equal(stored[:], split.images), name
    auto = load_dataset(spec, roles=("eval",), pixels="auto", pixel_dir=tmp_path / "auto")
    assert auto.pixel_file is None  # far below the default limit


def _metrics(results: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    return {
        (check["id"], m["name"], json.dumps(m.get("labels", {}), sort_keys=True)): m["value"]
        for check in results["checks"]
        for m in check.get("metrics", [])
    }


def _untimed(value: Any) -> Any:
    """Findings without their wall-clock seconds (the one thing two runs may differ in)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def test_an_audit_with_its_pixels_on_disk_gives_the_same_results(tmp_path: Path) -> None:
    spec = prepare_demo(tmp_path / "demo", n_patients=24, image_size=64)
    runs = {}
    for place in ("memory", "disk"):
        out = tmp_path / place
        code = main(["run", str(spec), "--only", CHECKS, "--no-pdf", "-q", "--out", str(out), "--pixels", place])
        assert code in (0, 1), place
        runs[place] = json.loads((out / "results.json").read_text())
        assert not (out / ".pixels").exists()  # scratch, removed
    memory, disk = runs["memory"], runs["disk"]
    assert memory["run"]["pixels"] == {"place": "memory"}
    assert disk["run"]["pixels"]["place"] == "disk" and disk["run"]["pixels"]["mib"] > 0
    assert {c["id"]: c["status"] for c in disk["checks"]} == {c["id"]: c["status"] for c in memory["checks"]}
    assert _metrics(disk) == _metrics(memory)  # bit for bit: the same float16 pixels, read back
    for a, b in zip(memory["checks"], disk["checks"], strict=True):
        assert _untimed(a["findings"]) == _untimed(b["findings"]), a["id"]
    assert memory["verdict"] == disk["verdict"]
