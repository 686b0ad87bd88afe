"""RGB everywhere: every installed check runs on a 3-channel model without a stride assumption.

On the CPU (as on CUDA) the engine converts convolutional models to ``channels_last``; for a
3-channel input that layout is not the contiguous one, so any ``Tensor.view`` on an input, a
gradient or a perturbation the model produced breaks (torchattacks' PGD-L2 did:
"view size is not compatible with input tensor's size and stride"). A grayscale model never shows
the problem, because a 1-channel ``channels_last`` tensor is also contiguous. This test builds a
small RGB study (PNG files, a 3-channel tiny CNN trained for a few steps) and runs the full set of
installed checks through :func:`auditkit.runner.run_audit` with small budgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 32
"""Image side: the smallest the tiny CNN's three pooling stages accept comfortably."""


@pytest.fixture(scope="module")
def single_torch_thread() -> Any:
    """Tiny tensors: on a busy 2-core machine, thread hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rgb_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 3, SIZE, SIZE)`` images in [0, 1] and labels; class 1 has a red central square.

    The signal lives in one colour channel, so a model that only saw luma would lose most of it.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    images = rng.uniform(0.2, 0.5, size=(n, 3, SIZE, SIZE)).astype(np.float32)
    quarter = SIZE // 4
    images[labels == 1, 0, quarter : 3 * quarter, quarter : 3 * quarter] += 0.45
    return np.clip(images, 0.0, 1.0), labels


def _train_state(images: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    """A few Adam steps of the 3-channel tiny CNN (about a second on one core)."""
    from auditkit.fixtures.models import tiny_cnn

    torch.manual_seed(0)
    model = tiny_cnn(num_classes=2, in_channels=3)
    x = (torch.from_numpy(images) - 0.5) / 0.25
    y = torch.from_numpy(labels).long()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(25):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        torch.autograd.backward(loss)
        optimiser.step()
    model.eval()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# Small budgets: every check and every default attack still runs, but on a handful of images.
SMALL_PARAMS: dict[str, dict[str, Any]] = {
    "calibration": {"n_boot": 50},
    "ood": {
        "n_boot": 50,
        "min_builtin_images": 8,
        "max_builtin_images": 8,
        "detectors": ["msp", "max_logit", "energy", "mahalanobis", "knn", "odin"],
    },
    "bias": {"n_boot": 50, "min_group_size": 4},
    "corruption": {"n_samples": 8, "severities": [1, 5], "n_boot": 50},
    "adversarial": {
        "n_samples": 6,
        "eps": [0.01, 0.03],
        "eps_l2": [0.25, 1.0],
        "pgd_steps": 3,
        "cw_steps": 3,
        "square_queries": 5,
        "unbounded_steps": 3,
        "n_boot": 50,
    },
    "backdoor": {
        "trigger_steps": 3,
        "trigger_samples": 8,
        "min_class_size": 4,
        "strip_blends": 2,
        "strip_max_images": 8,
        "clustering_components": 2,
    },
}


def make_rgb_study(root: Path, *, n: int = 48, seed: int = 0) -> Path:
    """Write RGB PNG images, a manifest, weights and ``audit.yaml``; return the spec path.

    Every third image is an eval image; patients are disjoint between the splits.
    """
    from PIL import Image
    from safetensors.torch import save_file

    images, labels = _rgb_images(n, seed)
    data = root / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,label,patient_id,split,sex"]
    for i in range(n):
        pixels = np.round(np.moveaxis(images[i], 0, -1) * 255.0).astype(np.uint8)
        Image.fromarray(pixels, mode="RGB").save(data / "img" / f"{i:03d}.png")
        split = "test" if i % 3 == 0 else "train"
        rows.append(f"img/{i:03d}.png,{['plain', 'red'][labels[i]]},pat{i:03d},{split},{'FM'[i % 2]}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    train = np.arange(n) % 3 != 0
    # Train on the images as stored (8-bit), as the engine will decode them.
    stored = np.round(images * 255.0) / 255.0
    save_file(_train_state(stored[train].astype(np.float32), labels[train]), str(root / "weights.safetensors"))
    spec = {
        "model": {
            "factory": "auditkit.fixtures.models:tiny_cnn",
            "factory_kwargs": {"num_classes": 2, "in_channels": 3},
            "weights": "weights.safetensors",
            "classes": ["plain", "red"],
            "positive_class": "red",
            "input": {"channels": 3, "height": SIZE, "width": SIZE},
            "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        },
        "data": {
            "root": "data",
            "manifest": "data/manifest.csv",
            "splits": {"eval": "test", "train": "train"},
            "groups": {"sex": {}},
        },
        "checks": SMALL_PARAMS,
        "seed": 0,
        "device": "cpu",
        "output": "out",
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def test_every_check_runs_on_an_rgb_model(tmp_path: Path) -> None:
    from auditkit.registry import discover
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    spec_path = make_rgb_study(tmp_path / "study")
    outcome = run_audit(load_spec(spec_path), RunOptions(out_dir=tmp_path / "out", pdf=False, report=False))
    results = outcome.results
    # The engine ran the model channels_last, the layout that breaks a view on 3 channels.
    assert results["run"]["channels_last"] is True
    records = {record["id"]: record for record in results["checks"]}
    found, broken = discover()
    assert not broken, broken
    installed = set(found)
    assert installed <= set(records), sorted(installed - set(records))
    for check_id, record in records.items():
        error = record.get("error") or {}
        assert record["status"] in ("ok", "skipped"), (check_id, error.get("message"), error.get("where"))
        if record["status"] == "skipped":
            reason = str(record.get("reason"))
            assert not any(word in reason.lower() for word in ("channel", "rgb", "stride", "view")), (check_id, reason)
    # The attack that used to fail, and a gradient detector, measured something.
    robust_l2 = [
        m
        for m in records["adversarial"]["metrics"]
        if m["name"] == "adversarial.robust_accuracy" and m["labels"]["attack"] == "pgd_l2"
    ]
    assert len(robust_l2) == 2 and all(m["value"] is not None for m in robust_l2)
    odin = [m for m in records["ood"]["metrics"] if m["name"] == "ood.auroc" and m["labels"]["detector"] == "odin"]
    assert odin and all(m["value"] is not None for m in odin)
