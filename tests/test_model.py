"""The model adapter: safe weight loading, normalisation, embeddings, batch halving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from auditkit.errors import ConfigError, ModelLoadError
from auditkit.model import ModelAdapter, load_state_dict
from auditkit.spec import load_spec


def _spec_with(spec_path: Path, **model_updates: object):  # type: ignore[no-untyped-def]
    spec = load_spec(spec_path)
    return spec.model_copy(update={"model": spec.model.model_copy(update=model_updates)})


def test_safetensors_and_state_dict_pt_give_the_same_model(tiny_study: Path) -> None:
    root = tiny_study.parent
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu")
    torch.save(adapter.module.model.state_dict(), root / "weights.pt")
    same = ModelAdapter(_spec_with(tiny_study, weights=Path("weights.pt")), device="cpu")
    images = torch.rand(5, 1, 16, 16)
    torch.testing.assert_close(adapter.forward_pass(images)[0], same.forward_pass(images)[0])


def test_pickled_module_is_refused_without_trust_code(tiny_study: Path, tmp_path: Path) -> None:
    root = tiny_study.parent
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu")
    torch.save(adapter.module.model, root / "whole.pt")  # a pickled nn.Module
    with pytest.raises(ModelLoadError, match=r"weights_only=True refused it.*trust_code: true"):
        ModelAdapter(_spec_with(tiny_study, weights=Path("whole.pt")), device="cpu")


class _Marker:
    """Unpickling this object would create a marker file: the attack a weights file can carry."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


def test_malicious_pickle_never_runs(tiny_study: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"weight": _Marker(str(marker))}, tiny_study.parent / "evil.pt")
    with pytest.raises(ModelLoadError):
        load_state_dict(tiny_study.parent / "evil.pt")
    assert not marker.exists()


def test_torchscript_needs_trust_code(tiny_study: Path) -> None:
    root = tiny_study.parent
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu")
    torch.jit.script(adapter.module.model).save(str(root / "scripted.pt"))
    with pytest.raises(ModelLoadError, match=r"TorchScript archive.*trust_code: true"):
        ModelAdapter(_spec_with(tiny_study, weights=Path("scripted.pt")), device="cpu")
    trusted = ModelAdapter(
        _spec_with(
            tiny_study,
            weights=Path("scripted.pt"),
            trust_code=True,
            factory=None,
            feature_layer=None,
        ),
        device="cpu",
    )
    images = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(trusted.forward_pass(images)[0], adapter.forward_pass(images)[0])


def test_mismatched_weights_name_the_keys(tiny_study: Path) -> None:
    from safetensors.torch import save_file

    save_file({"bogus.weight": torch.zeros(2)}, str(tiny_study.parent / "bad.safetensors"))
    with pytest.raises(
        ModelLoadError,
        match=r"missing keys \['1.bias', '1.weight'.*unexpected keys \['bogus.weight'\]",
    ):
        ModelAdapter(_spec_with(tiny_study, weights=Path("bad.safetensors")), device="cpu")


def test_factory_errors(tiny_study: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot import module 'no_such_module'"):
        ModelAdapter(_spec_with(tiny_study, factory="no_such_module:build"), device="cpu")
    with pytest.raises(ModelLoadError, match="has no attribute 'nope'"):
        ModelAdapter(_spec_with(tiny_study, factory="tiny_model:nope"), device="cpu")
    with pytest.raises(ModelLoadError, match="file not found"):
        ModelAdapter(_spec_with(tiny_study, weights=Path("missing.safetensors")), device="cpu")


def test_normalisation_happens_inside_and_features_are_the_last_linear_input(
    tiny_study: Path,
) -> None:
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu")
    user_model = adapter.module.model
    images = torch.rand(4, 1, 16, 16)
    logits, features = adapter.forward_pass(images)
    with torch.no_grad():
        expected = user_model((images - 0.5) / 0.25)
        hidden = user_model[2](user_model[1](user_model[0]((images - 0.5) / 0.25)))
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(features, hidden)
    assert adapter.feature_layer == "input of 3"


def test_named_feature_layer_and_unknown_name(tiny_study: Path) -> None:
    adapter = ModelAdapter(_spec_with(tiny_study, feature_layer="1"), device="cpu")
    _, features = adapter.forward_pass(torch.rand(2, 1, 16, 16))
    assert features.shape == (2, 8)
    with pytest.raises(ConfigError, match="no module named 'fc9'"):
        ModelAdapter(_spec_with(tiny_study, feature_layer="fc9"), device="cpu")


def test_batch_halving_on_out_of_memory(tiny_study: Path) -> None:
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu", batch_size=16)
    _reference, _ = adapter.forward_pass(torch.rand(1, 1, 16, 16))
    inner = adapter.module.model

    class OOMAbove4(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x)  # type: ignore[no-any-return]

    adapter.module.model = OOMAbove4()
    images = torch.rand(11, 1, 16, 16)
    logits, features = adapter.forward_pass(images)
    assert logits.shape == (11, 2) and features.shape == (11, 8)
    assert adapter.batch_size == 4 and adapter.stats.batch_halvings == 2
    assert adapter.stats.images_forwarded == 12  # 1 + 11, each image once


def test_wrong_number_of_logits(tiny_study: Path) -> None:
    spec = load_spec(tiny_study)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"classes": ["a", "b", "c"]})})
    adapter = ModelAdapter(spec, device="cpu")
    with pytest.raises(ModelLoadError, match=r"returns 2 logits per image but model\.classes lists 3"):
        adapter.forward_pass(torch.rand(2, 1, 16, 16))


def test_cuda_request_without_cuda_is_a_config_error(tiny_study: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        ModelAdapter(load_spec(tiny_study), device="cuda:0")
