"""The model adapter: safe weight loading, normalisation, embeddings, batch halving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from auditkit.errors import ConfigError, ModelLoadError
from auditkit.model import InferenceOptions, ModelAdapter, load_state_dict, parity_acceptable, precision_parity
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


# ---------------------------------------------------------------------------------------------
# The pass's precision, memory format and loading (the GPU path's logic, exercised on the CPU)


def test_precision_parity_by_hand() -> None:
    reference = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    same = precision_parity(reference, reference.clone())
    assert same == {"images": 3, "top1_agreement": 1.0, "max_prob_diff": 0.0}
    flipped = reference.clone()
    flipped[1] = torch.tensor([1.0, 0.0])  # the second image's arg-max flips
    parity = precision_parity(reference, flipped)
    assert parity["top1_agreement"] == pytest.approx(2 / 3)
    expected = abs(torch.softmax(torch.tensor([0.0, 1.0]), 0)[0] - torch.softmax(torch.tensor([1.0, 0.0]), 0)[0])
    assert parity["max_prob_diff"] == pytest.approx(float(expected))
    assert not parity_acceptable(parity) and parity_acceptable(same)
    assert precision_parity(torch.empty(0, 2), torch.empty(0, 2))["images"] == 0
    with pytest.raises(ValueError, match="one shape"):
        precision_parity(reference, reference[:2])


def test_cpu_defaults_are_fp32_in_process(tiny_study: Path) -> None:
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu")
    # This model has no 2-D convolution, so it stays in NCHW.
    assert (adapter.precision, adapter.channels_last, adapter.workers, adapter.pin_memory) == ("fp32", False, 0, False)
    adapter.forward_pass(torch.rand(3, 1, 16, 16), split="eval")
    assert adapter.stats.parity is None and adapter.stats.precision == "fp32"
    assert adapter.stats.seconds > 0 and set(adapter.stats.seconds_per_split) == {"eval"}


def test_bf16_autocast_records_parity_against_fp32(tiny_study: Path) -> None:
    fp32 = ModelAdapter(load_spec(tiny_study), device="cpu")
    bf16 = ModelAdapter(load_spec(tiny_study), device="cpu", options=InferenceOptions(precision="bf16"))
    images = torch.rand(70, 1, 16, 16)
    reference, _ = fp32.forward_pass(images)
    logits, features = bf16.forward_pass(images, split="eval")
    parity = bf16.stats.parity
    assert parity is not None and parity["images"] == 64  # PARITY_IMAGES of the first split
    assert parity == precision_parity(reference[:64], bf16.forward_pass(images[:64])[0])
    assert logits.dtype == torch.float32 and features.dtype == torch.float32 and features.shape == (70, 8)
    assert bf16.stats.precision == ("bf16" if parity_acceptable(parity) else "fp32")
    assert bf16.stats.per_split == {"eval": 70}  # parity images are not counted as the pass


def test_bf16_falls_back_to_fp32_when_parity_fails(tiny_study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu", options=InferenceOptions(precision="bf16"))
    monkeypatch.setattr("auditkit.model.parity_acceptable", lambda _parity: False)
    adapter.forward_pass(torch.rand(4, 1, 16, 16))
    assert adapter.precision == "fp32" and adapter.stats.precision_fallback is not None


def test_cpu_convolutional_models_run_channels_last(demo_spec: Path) -> None:
    adapter = ModelAdapter(load_spec(demo_spec), device="cpu")  # the demo CNN: 2-D convolutions
    assert adapter.channels_last and adapter.stats.channels_last and adapter.precision == "fp32"
    reference = ModelAdapter(load_spec(demo_spec), device="cpu", options=InferenceOptions(channels_last=False))
    images = torch.rand(6, 1, 64, 64)
    torch.testing.assert_close(adapter.forward_pass(images)[0], reference.forward_pass(images)[0])


def test_loader_workers_and_channels_last_give_the_same_outputs(tiny_study: Path) -> None:
    plain = ModelAdapter(
        load_spec(tiny_study), device="cpu", batch_size=4, options=InferenceOptions(channels_last=False)
    )
    assert not plain.channels_last
    loaded = ModelAdapter(
        load_spec(tiny_study),
        device="cpu",
        batch_size=4,
        options=InferenceOptions(channels_last=True, workers=1, pin_memory=False),
    )
    assert loaded.workers == 1 and loaded.channels_last
    images = torch.rand(11, 1, 16, 16).half()  # stored splits are float16
    expected = plain.forward_pass(images)
    got = loaded.forward_pass(images, split="eval")
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert loaded.stats.forward_calls == 3 and loaded.stats.per_split == {"eval": 11}


def test_pass_without_features_skips_the_hook(tiny_study: Path) -> None:
    adapter = ModelAdapter(load_spec(tiny_study), device="cpu")
    images = torch.rand(5, 1, 16, 16)
    logits, features = adapter.forward_pass(images, features=False)
    assert features.shape == (5, 0)
    torch.testing.assert_close(logits, adapter.forward_pass(images)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pass_uses_bf16_channels_last_and_pinned_workers(tiny_study: Path) -> None:
    adapter = ModelAdapter(load_spec(tiny_study), device="cuda", batch_size=8)
    cpu = ModelAdapter(load_spec(tiny_study), device="cpu", batch_size=8)
    images = torch.rand(40, 1, 16, 16).half()
    logits, features = adapter.forward_pass(images, split="eval")
    assert adapter.stats.pin_memory and adapter.stats.workers >= 1 and adapter.channels_last
    parity = adapter.stats.parity
    if torch.cuda.is_bf16_supported():
        assert parity is not None and parity["images"] == 40
    reference, _ = cpu.forward_pass(images)
    agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.95 and features.shape == (40, 8)
