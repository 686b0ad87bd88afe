"""Shared test fixtures: a tiny self-contained study (NumPy images, a two-layer model)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

TINY_MODEL = textwrap.dedent(
    '''
    """A test model: images (N, 1, 16, 16) -> logits (N, 2)."""
    import torch
    from torch import nn


    def build(num_classes: int = 2) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, num_classes)
        )
    '''
)


def _trained_state(images: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = (torch.from_numpy(images).float() - 0.5) / 0.25
    y = torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def make_tiny_study(
    root: Path,
    *,
    n: int = 48,
    seed: int = 0,
    spec_overrides: dict | None = None,
) -> Path:
    """Write images, manifest, model module, safetensors weights and ``audit.yaml``.

    Label ``bright`` when the image's central square is brighter: learnable by the tiny model.
    Returns the spec path.
    """
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    data = root / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 2, size=n)
    images = rng.uniform(0.2, 0.5, size=(n, 1, 16, 16)).astype(np.float32)
    images[labels == 1, :, 4:12, 4:12] += 0.4
    rows = ["path,label,patient_id,split,sex,age"]
    for i in range(n):
        np.save(data / "img" / f"{i:03d}.npy", images[i, 0])
        split = "train" if i % 3 else "test"
        sex = "F" if i % 2 else "M"
        rows.append(f"img/{i:03d}.npy,{['dark', 'bright'][labels[i]]},pat{i // 2},{split},{sex},{20 + i}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "tiny_model.py").write_text(TINY_MODEL, encoding="utf-8")
    train = np.array([i % 3 != 0 for i in range(n)])
    save_file(_trained_state(images[train], labels[train]), str(root / "weights.safetensors"))
    spec = {
        "model": {
            "factory": "tiny_model:build",
            "factory_kwargs": {"num_classes": 2},
            "weights": "weights.safetensors",
            "classes": ["dark", "bright"],
            "positive_class": "bright",
            "input": {"channels": 1, "height": 16, "width": 16},
            "normalize": {"mean": [0.5], "std": [0.25]},
        },
        "data": {
            "root": "data",
            "manifest": "data/manifest.csv",
            "splits": {"eval": "test", "train": "train"},
            "groups": {"sex": {}, "age": {"bins": [0, 40, 65, 120]}},
        },
        "seed": 0,
        "device": "cpu",
        "output": "out",
    }
    for key, value in (spec_overrides or {}).items():
        spec[key] = value
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    """Spec path of a fresh tiny study in a temporary folder."""
    return make_tiny_study(tmp_path)


@pytest.fixture
def study_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(**kwargs: object) -> Path:
        return make_tiny_study(tmp_path / f"study{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def demo_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Spec path of a small synthetic DICOM study (60 patients) with the packaged tiny CNN.

    Session-scoped: generated once; tests must not modify its files (copy them if needed) and
    should pass ``RunOptions(out_dir=tmp_path)`` so their outputs do not collide.
    """
    from auditkit.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"), n_patients=60)


@pytest.fixture(scope="session")
def demo_context(demo_spec: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """An :class:`AuditContext` over the demo study with eval and train decoded (shared pass not run).

    Session-scoped for speed: checks under test read from it; do not mutate it.
    """
    from auditkit.context import AuditContext
    from auditkit.data import load_dataset
    from auditkit.model import ModelAdapter
    from auditkit.spec import load_spec

    spec = load_spec(demo_spec)
    dataset = load_dataset(spec, roles=("eval", "train"))
    return AuditContext(spec, ModelAdapter(spec, device="cpu"), dataset, tmp_path_factory.mktemp("ctx-out"))
