"""The shared pass through ONNX Runtime against the same pass through PyTorch, on the CPU.

Issue 20's bench line: the audit's shared pass (``ModelAdapter.forward_pass``: normalisation,
batches of 64, the embedding read) over the same 256 images in [0, 1], once with the PyTorch module
and once with its ONNX export run by ONNX Runtime's CPU provider (``auditkit.artefact``), for a
torchvision ResNet-18 at 224x224 (random weights, one channel) and the packaged tiny CNN at 64x64.
Each configuration runs three times alternating the two, and the ratio of medians is reported
(ONNX Runtime seconds / PyTorch seconds; below 1: the artefact's pass is faster), with the parity
of the two passes (top-1 agreement, largest probability difference) beside it.

Run: ``make bench`` / ``python -m benchmarks bench_onnx``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

IMAGES = 256
REPEATS = 3


def _configurations() -> list[tuple[str, torch.nn.Module, int]]:
    from auditkit.fixtures.models import tiny_cnn
    from benchmarks.bench_shared_pass import resnet18_gray

    torch.manual_seed(0)
    return [("ResNet-18, 224x224", resnet18_gray().eval(), 224), ("tiny CNN, 64x64", tiny_cnn(2, 1).eval(), 64)]


def main() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return ["   onnxruntime is not installed (pip install 'auditkit[onnx]'): no ONNX line"]
    from auditkit.artefact import load_onnx
    from auditkit.fixtures.artefacts import export_onnx
    from auditkit.model import ModelAdapter

    lines = [f"   onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"]
    for name, module, side in _configurations():
        images = torch.rand(IMAGES, 1, side, side, generator=torch.Generator().manual_seed(1))
        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(module, Path(folder) / "model.onnx", (1, side, side))
            graph = load_onnx(path, channels=1, spatial=(side, side), feature_layer=None, device=torch.device("cpu"))
        kwargs = {"classes": ["a", "b"], "mean": [0.5], "std": [0.25]}
        adapters = {
            "torch": ModelAdapter.from_module(module, **kwargs),  # type: ignore[arg-type]
            "onnx": ModelAdapter.from_module(graph, **kwargs),  # type: ignore[arg-type]
        }
        seconds: dict[str, list[float]] = {"torch": [], "onnx": []}
        outputs = {}
        for _ in range(REPEATS):
            for key, adapter in adapters.items():
                started = time.perf_counter()
                outputs[key] = adapter.forward_pass(images)[0]
                seconds[key].append(time.perf_counter() - started)
        torch_s, onnx_s = statistics.median(seconds["torch"]), statistics.median(seconds["onnx"])
        probs = {k: v.softmax(dim=1) for k, v in outputs.items()}
        agreement = float((probs["torch"].argmax(1) == probs["onnx"].argmax(1)).float().mean())
        difference = float((probs["torch"] - probs["onnx"]).abs().max())
        lines.append(
            f"   {name}: ONNX Runtime pass / PyTorch pass = {onnx_s / torch_s:.2f}x"
            f" ({onnx_s:.2f} s vs {torch_s:.2f} s for {IMAGES} images, medians of {REPEATS});"
            f" agreement {agreement:.4f}, largest probability difference {difference:.1e}"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
