"""The shared pass against one plain inference pass and against a naive glued-together baseline.

Figures (issue 11), measured in one process on the demo study (DICOM, 240 patients, 370 images
stored at 256x256), for two models: a torchvision ResNet-18 decoding the study to 224x224 (random
weights: speed, not accuracy, is measured; the configuration a user would audit) and, as the
worst case for the ratios, the packaged tiny CNN at 64x64 (inference so cheap that every fixed
cost of the checks shows):

1. shared-pass ratio: the shared pass plus every installed prediction-based check (calibration,
   ood, bias, leakage, performance, and backdoor's data-level detectors when installed), over one plain
   ``model(x)`` pass (fp32, NCHW, batch 64) over the same decoded eval and train images.
   Target <= 1.3. Each repeat's run is divided by the median of two plain passes made right
   after it, and the median over repeats is reported (on cores shared with other jobs a single
   unpaired ratio swung by 30%), with the same ratio in CPU seconds of the process beside it.
   The OOD check's inference on its own built-in sets (new images, not study images) is
   counted in. The breakdown prints the pass alone over the plain pass, each check's
   time, the OOD sets' inference, and the ratio against a plain pass in the engine's memory
   layout (channels_last), so the checks' cost is visible apart from the layout's gain.
2. forward passes per study image (images forwarded on eval and train / images in them) and
   images decoded per manifest image. Both must be 1.0. Images the OOD check makes itself (its
   built-in sets: new inputs, each forwarded once) are printed apart.
3. the naive baseline a user would write by gluing the same libraries: each check loads the
   model, decodes the study and predicts on its own, then measures (the same check code, so the
   difference is the sharing). Target: ours at least 2.5x faster.

Backdoor runs with ``trigger_search: false`` (the model-level search is gradient work like the
attacks) and ``strip: false`` (STRIP forwards blended copies of the training images: extra
passes, not a measurement over the shared predictions). Caches that outlive one audit (the OOD
check's decoded other-modality set) are cleared before each audit, ours and each naive check's,
so every audit pays what a fresh process pays.
6. peak resident memory (``VmHWM`` of a fresh process that decodes the study, runs the pass
   and the prediction-based checks) for the demo study and ones ten and twenty times its size,
   with the dtype and bytes of the decoded images. Target (issue 21): the 20x study under 1.5x
   the demo's peak.

Run: ``make bench`` / ``python -m benchmarks bench_shared_pass``.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

PREDICTION_CHECKS = ("calibration", "ood", "bias", "leakage", "performance", "backdoor")
BENCH_SIZE = 224
"""Side of the images the ResNet-18 configuration decodes to."""
"""The prediction-based checks (figures 1-3); each is included when installed."""

# Words naming a model-level trigger search (Neural Cleanse and kin), which backpropagates
# through the model and so is not a prediction-based measurement.
_TRIGGER_SEARCH_WORDS = ("trigger", "cleanse", "reverse", "model_level", "model_scan")

DEMO_PATIENTS = 240


def resnet18_gray(num_classes: int = 2) -> nn.Module:
    """torchvision's ResNet-18 for one-channel images (random weights)."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return cast(nn.Module, model)


def strided_cnn(num_classes: int = 2) -> nn.Module:
    """A small one-channel CNN for any input size (random weights): the memory figure's cheap model
    at 224 x 224, where the images, not the model, are what memory holds."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=8, stride=8),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def backdoor_params(check: type[Any]) -> tuple[dict[str, Any] | None, str]:
    """Parameters that keep only backdoor's data-level detectors, or ``None`` and why not.

    STRIP (a ``strip`` switch) forwards blended copies of images: it is turned off too.
    """
    fields = check.Params.model_fields
    for name, info in fields.items():
        if info.annotation in (bool, "bool") and any(word in name for word in _TRIGGER_SEARCH_WORDS):
            params: dict[str, Any] = {name: False}
            if "strip" in fields and fields["strip"].annotation in (bool, "bool"):
                params["strip"] = False
            words = ", ".join(f"{key}=false" for key in params)
            return params, f"backdoor with {words} (data-level detectors over the shared pass only)"
    for name in ("methods", "detectors"):
        if name in fields:
            default = list(fields[name].get_default(call_default_factory=True) or [])
            kept = [m for m in default if not any(w in str(m).lower() for w in _TRIGGER_SEARCH_WORDS)]
            if kept and len(kept) < len(default):
                return {name: kept}, f"backdoor with {name}={kept} (data-level detectors only)"
    return None, "backdoor left out: no parameter turns its model-level trigger search off"


def prediction_checks() -> tuple[dict[str, tuple[type[Any], Any]], list[str]]:
    """Installed prediction-based checks with their parameters, and notes on what was left out."""
    from auditkit.registry import discover

    installed, _broken = discover()
    selected: dict[str, tuple[type[Any], Any]] = {}
    notes: list[str] = []
    for check_id in PREDICTION_CHECKS:
        if check_id not in installed:
            notes.append(f"{check_id} not installed")
            continue
        cls = installed[check_id]
        raw: dict[str, Any] = {}
        if check_id == "backdoor":
            params, note = backdoor_params(cls)
            notes.append(note)
            if params is None:
                continue
            raw = params
        selected[check_id] = (cls, cls.Params(**raw))
    return selected, notes


MODELS = {
    "resnet18_224": "torchvision ResNet-18 (random weights), 224x224",
    "tiny_cnn": "packaged tiny CNN, 64x64 (worst case: near-free inference)",
    "volume_cnn": "packaged 3-D CNN of the CT fixture, 16x32x32 volumes (DICOM series, NIfTI, .npy)",
    "volume_unet": "packaged 3-D U-Net of the CT segmentation fixture, 16x32x32 volumes (DICOM series, NIfTI)",
}


def bench_spec(spec_path: Path, model: str) -> Any:
    """The demo spec, with the packaged tiny CNN (64x64) or ResNet-18 (224x224)."""
    from auditkit.spec import load_spec

    spec = load_spec(spec_path)
    if model != "resnet18_224":  # the spec's own model (the packaged tiny CNN, the CT fixture's 3-D CNN)
        return spec
    shape = spec.model.input.model_copy(update={"height": BENCH_SIZE, "width": BENCH_SIZE})
    update: dict[str, Any] = {
        "factory": "benchmarks.bench_shared_pass:resnet18_gray",
        "factory_kwargs": {},
        "weights": None,
        "input": shape,
    }
    return spec.model_copy(update={"model": spec.model.model_copy(update=update)})


def clear_process_caches() -> None:
    """Forget what an earlier audit in this process left cached (a fresh audit pays for it)."""
    from auditkit.checks.ood.sets import clear_caches

    clear_caches()


def _plan_of(checks: Mapping[str, tuple[type[Any], Any]]) -> Any:
    from auditkit.runner import Plan, SelectedCheck

    return Plan.of([SelectedCheck(cid, cls, params, {}) for cid, (cls, params) in checks.items()])


def _plan(checks: Mapping[str, tuple[type[Any], Any]], dataset: Any) -> tuple[list[str], bool]:
    plan = _plan_of(checks)
    return plan.pass_splits(dataset), plan.features


def _load(spec: Any, checks: Mapping[str, tuple[type[Any], Any]]) -> Any:
    """Decode what the checks need, as the runner does (headers kept when a check reads them)."""
    from auditkit.data import load_dataset

    plan = _plan_of(checks)
    return load_dataset(spec, roles=list(plan.roles), keep_headers=plan.headers)


def plain_pass(
    module: nn.Module, images: list[torch.Tensor], batch_size: int = 64, *, channels_last: bool = False
) -> float:
    """Seconds of one bare ``model(x)`` pass over the decoded images (what a user runs at least).

    ``channels_last`` runs the same pass in NHWC (module and batches), the engine's CPU layout.
    """
    return timed_plain_pass(module, images, batch_size, channels_last=channels_last)[0]


def timed_plain_pass(
    module: nn.Module, images: list[torch.Tensor], batch_size: int = 64, *, channels_last: bool = False
) -> tuple[float, float]:
    """:func:`plain_pass` as (wall seconds, CPU seconds of this process)."""
    import copy

    if channels_last:
        module = copy.deepcopy(module).to(memory_format=torch.channels_last)
    else:
        module = copy.deepcopy(module).to(memory_format=torch.contiguous_format)
    started, started_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for split in images:
            for first in range(0, split.shape[0], batch_size):
                batch = split[first : first + batch_size].float()
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                module(batch)
    return time.perf_counter() - started, time.process_time() - started_cpu


def run_checks(ctx: Any, checks: Mapping[str, tuple[type[Any], Any]], only: str | None = None) -> dict[str, float]:
    """Seconds per check (the shared pass already ran or runs on first use)."""
    from auditkit.check import Skip

    seconds: dict[str, float] = {}
    for check_id, (cls, params) in checks.items():
        if only is not None and check_id != only:
            continue
        refusal = cls.refusal(check_id, ctx.task, ctx.spatial_dims)
        if refusal is not None:  # as the runner: a check is not run on a task or input it does not measure
            seconds[f"{check_id} (not run: not written for this task or input)"] = 0.0
            continue
        started = time.perf_counter()
        try:
            cls().run(ctx.for_check(cls), params)
        except Skip as skip:
            seconds[f"{check_id} (skipped: {skip})"] = 0.0
            continue
        seconds[check_id] = time.perf_counter() - started
    return seconds


def shared(spec: Any, checks: Mapping[str, tuple[type[Any], Any]], out: Path) -> dict[str, Any]:
    """auditkit's way: load once, decode once, one pass, then every check over the cache."""
    from auditkit.context import AuditContext
    from auditkit.model import ModelAdapter

    clear_process_caches()
    started = time.perf_counter()
    adapter = ModelAdapter(spec, device="cpu")
    dataset = _load(spec, checks)
    loaded = time.perf_counter()
    ctx = AuditContext(spec, adapter, dataset, out)
    splits, features = _plan(checks, dataset)
    loaded_cpu = time.process_time()
    ctx.prepare(splits, features=features)
    prepared = time.perf_counter()
    per_check = run_checks(ctx, checks)
    finished, finished_cpu = time.perf_counter(), time.process_time()
    study = {name: dataset.splits[name].n for name in ("eval", "train") if name in dataset.splits}
    return {
        "load_decode_s": loaded - started,
        "pass_s": prepared - loaded,
        "checks_s": finished - prepared,
        "pass_checks_cpu_s": finished_cpu - loaded_cpu,
        "total_s": finished - started,
        "per_check": per_check,
        "per_split": dict(adapter.stats.per_split),
        "builtin_ood_s": sum(v for k, v in adapter.stats.seconds_per_split.items() if k.startswith("ood:builtin:")),
        "study": study,
        "images_decoded": dataset.images_decoded,
        "manifest_rows": len(dataset.manifest.rows),
        "images": [dataset.splits[name].images for name in study],
        "module": adapter.module,
        "channels_last": adapter.channels_last,
    }


def adapter_module(spec: Any) -> nn.Module:
    from auditkit.model import ModelAdapter

    return ModelAdapter(spec, device="cpu").module


def naive(spec: Any, checks: Mapping[str, tuple[type[Any], Any]], out: Path) -> float:
    """The glued baseline: every check loads the model, decodes and predicts on its own."""
    from auditkit.context import AuditContext
    from auditkit.model import ModelAdapter

    started = time.perf_counter()
    for check_id, (cls, params) in checks.items():
        clear_process_caches()  # a separately glued tool pays its own one-time costs
        one = {check_id: (cls, params)}
        adapter = ModelAdapter(spec, device="cpu")
        dataset = _load(spec, one)
        ctx = AuditContext(spec, adapter, dataset, out)
        splits, features = _plan(one, dataset)
        ctx.prepare(splits, features=features)
        run_checks(ctx, one)
    return time.perf_counter() - started


def _fmt_checks(per_check: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in per_check.items())


def measure_model(
    spec_path: Path,
    model: str,
    checks: Mapping[str, tuple[type[Any], Any]],
    out: Path,
    *,
    repeats: int,
    naive_repeats: int,
) -> list[str]:
    """Figures 1-3 for one model.

    Each repeat runs ours, then the plain pass twice (and once in channels_last); the first
    ``naive_repeats`` repeats also run the naive baseline. Figure 1 is the median over repeats of
    ours over the median of its own two plain passes: pairing each run with the plain passes
    next to it cancels the slow swings of a shared machine's load, which move a single ratio by
    up to 30%. The same ratio in CPU seconds of the process is printed beside it.
    """
    spec = bench_spec(spec_path, model)
    plain_pass(adapter_module(spec), [torch.rand(8, *spec.model.input.shape)])  # warm-up
    runs: list[dict[str, Any]] = []
    naive_runs: list[float] = []
    plain_times: list[float] = []
    plain_nhwc_times: list[float] = []
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for repeat in range(repeats):
        run = shared(spec, checks, out)
        runs.append(run)
        pair = [timed_plain_pass(run["module"], run["images"]) for _ in range(2)]
        plain_times += [wall for wall, _ in pair]
        ratios.append((run["pass_s"] + run["checks_s"]) / statistics.median(wall for wall, _ in pair))
        cpu_ratios.append(run["pass_checks_cpu_s"] / statistics.median(cpu for _, cpu in pair))
        if run["channels_last"]:
            plain_nhwc_times.append(plain_pass(run["module"], run["images"], channels_last=True))
        if repeat < naive_repeats:
            naive_runs.append(naive(spec, checks, out))
    ours = runs[0]
    plain = statistics.median(plain_times)
    ours_total = statistics.median([r["total_s"] for r in runs])
    naive_total = statistics.median(naive_runs)
    pass_and_checks = statistics.median([r["pass_s"] + r["checks_s"] for r in runs])
    pass_s = statistics.median([r["pass_s"] for r in runs])
    builtin_s = statistics.median([r["builtin_ood_s"] for r in runs])
    per_check = {name: statistics.median([r["per_check"][name] for r in runs]) for name in ours["per_check"]}
    n_study = sum(ours["study"].values())
    study_forwarded = sum(ours["per_split"].get(name, 0) for name in ours["study"])
    extra = {k: v for k, v in ours["per_split"].items() if k not in ours["study"]}
    n_extra = sum(extra.values())
    layout = "channels_last" if ours["channels_last"] else "NCHW"
    spread = ", ".join(f"{r:.2f}" for r in ratios)
    lines = [
        f"[{model}] {MODELS[model]}; {n_study} study images ({ours['study']}); engine pass fp32 {layout};"
        f" {repeats} repeats (naive baseline: {naive_repeats})",
        f"  plain model(x) pass (fp32, NCHW, batch 64): {plain:.2f} s ({n_study / plain:.0f} images/s;"
        f" median of {len(plain_times)}: {', '.join(f'{t:.2f}' for t in plain_times)})",
        f"  1. shared pass + checks / plain pass   {statistics.median(ratios):7.2f}x  (target <= 1.3x)"
        f"  [each repeat's run over its own plain passes: {spread};"
        f" in CPU seconds {statistics.median(cpu_ratios):.2f}x]",
        f"     = pass alone {pass_s / plain:.2f}x + checks {(pass_and_checks - pass_s) / plain:.2f}x, of which the OOD"
        f" check's inference on its {n_extra} built-in-set images {builtin_s / plain:.2f}x",
        f"     seconds: pass {pass_s:.2f}; {_fmt_checks(per_check)}; OOD built-in-set inference {builtin_s:.2f}",
    ]
    if plain_nhwc_times:
        plain_nhwc = statistics.median(plain_nhwc_times)
        lines.append(
            f"     against a plain pass in the engine's layout (channels_last, {plain_nhwc:.2f} s):"
            f" {pass_and_checks / plain_nhwc:.2f}x (pass alone {pass_s / plain_nhwc:.2f}x)"
        )
    lines += [
        f"  2. forward passes per study image      {study_forwarded / n_study:7.2f}   (must be 1.0);"
        f" images decoded per manifest image {ours['images_decoded'] / ours['manifest_rows']:.2f} (must be 1.0);"
        f" OOD built-in sets forwarded once each: {n_extra} new images {extra}",
        f"  3. naive glued baseline / ours         {naive_total / ours_total:7.2f}x  (target >= 2.5x)"
        f"   [naive {naive_total:.1f} s, ours {ours_total:.1f} s end to end: load, decode, pass, checks]",
    ]
    return lines


# ------------------------------------------------------------------------------------ memory


def _status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_child(spec_path: str, size: int = 0, pixels: str = "memory") -> dict[str, Any]:
    """In a fresh process: decode, pass, prediction-based checks; report peak RSS.

    ``size`` > 0 decodes to ``size`` x ``size`` for :func:`strided_cnn`; ``pixels`` is where the
    decoded images are held (``load_dataset(pixels=...)``).
    """
    from auditkit.context import AuditContext
    from auditkit.data import load_dataset
    from auditkit.model import ModelAdapter
    from auditkit.pixels import release_large_allocations
    from auditkit.spec import load_spec

    release_large_allocations()  # as the runner does
    checks, _notes = prediction_checks()
    spec = load_spec(Path(spec_path))
    if size:
        shape = spec.model.input.model_copy(update={"height": size, "width": size})
        update: dict[str, Any] = {
            "factory": "benchmarks.bench_shared_pass:strided_cnn",
            "factory_kwargs": {},
            "weights": None,
        }
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={**update, "input": shape})})
    baseline = _status_mib("VmRSS")
    adapter = ModelAdapter(spec, device="cpu")
    plan = _plan_of(checks)
    with tempfile.TemporaryDirectory(prefix="auditkit-mem-") as out:
        dataset = load_dataset(
            spec,
            roles=list(plan.roles),
            keep_headers=plan.headers,
            pixels=pixels,  # type: ignore[arg-type]
            pixel_dir=Path(out) / ".pixels",
        )
        ctx = AuditContext(spec, adapter, dataset, Path(out))
        splits, features = _plan(checks, dataset)
        ctx.prepare(splits, features=features)
        run_checks(ctx, checks)
    images = [s.images for s in dataset.splits.values()]
    return {
        "n_images": sum(int(i.shape[0]) for i in images),
        "dtype": "float16",
        "image_bytes": sum(2 * int(np.prod(i.shape)) for i in images),
        "pixels": pixels,
        "baseline_mb": baseline,
        "peak_mb": _status_mib("VmHWM"),
    }


def peak_memory(spec_path: Path, size: int = 0, pixels: str = "memory") -> dict[str, Any]:
    """Run :func:`_memory_child` in a fresh interpreter (peak RSS never goes down in-process)."""
    code = (
        "import json, sys; from benchmarks.bench_shared_pass import _memory_child;"
        " print(json.dumps(_memory_child(sys.argv[1], int(sys.argv[2]), sys.argv[3])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(spec_path), str(size), pixels],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def memory_lines(demo_spec: Path, tmp: Path) -> list[str]:
    from auditkit.demo import prepare_demo

    lines = ["  6. peak resident memory (fresh process: decode, shared pass, prediction-based checks):"]
    peaks: dict[str, float] = {}
    paths: dict[int, Path] = {}
    for label, factor in (("demo study", 1), ("10x study", 10), ("20x study", 20)):
        path = paths[factor] = (
            demo_spec
            if factor == 1
            else prepare_demo(tmp / f"x{factor}", n_patients=DEMO_PATIENTS * factor, image_size=64)
        )
        m = peak_memory(path)
        peaks[label] = m["peak_mb"]
        lines.append(
            f"     {label:<10} {m['n_images']:>5} images held as {m['dtype']} ({m['image_bytes'] / 2**20:.1f} MiB):"
            f" peak {m['peak_mb']:.0f} MiB (resident after imports {m['baseline_mb']:.0f} MiB)"
        )
    lines.append(f"     20x study / demo study: {peaks['20x study'] / peaks['demo study']:.2f}x  (target < 1.5x)")
    lines.append(
        f"  6b. the same at {BENCH_SIZE}x{BENCH_SIZE} model inputs (a small strided CNN), decoded images in memory"
        " or on disk (--pixels disk):"
    )
    big: dict[tuple[str, str], float] = {}
    for label, factor in (("demo study", 1), ("20x study", 20)):
        path = paths[factor]
        for place in ("memory", "disk"):
            m = peak_memory(path, BENCH_SIZE, place)
            big[(label, place)] = m["peak_mb"]
            lines.append(
                f"     {label:<10} {m['n_images']:>5} images ({m['image_bytes'] / 2**20:.0f} MiB of float16 pixels)"
                f" in {place:<6}: peak {m['peak_mb']:.0f} MiB"
            )
    for place in ("memory", "disk"):
        ratio = big[("20x study", place)] / big[("demo study", place)]
        lines.append(
            f"     20x / demo, pixels in {place}: {ratio:.2f}x" + ("  (target < 1.5x)" if place == "disk" else "")
        )
    return lines


def main(models: tuple[str, ...] = ("resnet18_224", "tiny_cnn")) -> list[str]:
    """Measure figures 1, 2, 3 and 6; return the report lines."""
    from auditkit.demo import prepare_demo

    torch.manual_seed(0)
    checks, notes = prediction_checks()
    lines = [
        f"prediction-based checks: {', '.join(checks)}" + (f" ({'; '.join(notes)})" if notes else ""),
        f"demo study (DICOM, {DEMO_PATIENTS} patients, stored 256x256), CPU, {torch.get_num_threads()} threads;"
        " batch size 64",
    ]
    with tempfile.TemporaryDirectory(prefix="auditkit-bench-") as name:
        tmp = Path(name)
        spec_path = prepare_demo(tmp / "demo", n_patients=DEMO_PATIENTS)
        for model in models:
            lines += measure_model(
                spec_path,
                model,
                checks,
                tmp / "out",
                repeats=3,
                naive_repeats=3 if model == "tiny_cnn" else 1,
            )
        lines += memory_lines(spec_path, tmp)
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
