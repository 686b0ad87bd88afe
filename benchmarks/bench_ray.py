"""The Ray executor against the local one on the demo study, on this machine.

One figure (issue 21): the wall time of ``auditkit run`` with ``executor: ray`` (a local Ray
instance started and stopped by the audit, as a user without a cluster gets) over the same audit
with the local executor, for the demo study (240 patients, 370 DICOM images) and the prediction
checks of figure 1 (calibration, OOD, bias, leakage, performance), PDF off. The two executors
alternate, two runs each, and the medians are compared; the Ray instance's start and stop are
timed on their own and printed beside the ratio, with the decode and shared-pass seconds of each
executor (``results.json`` → ``run``). Both runs must give the same metrics (checked).

Run: ``make bench`` / ``python -m benchmarks bench_ray`` (needs ``auditkit[ray]``).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CHECKS = ["calibration", "ood", "bias", "leakage", "performance"]
REPEATS = 2


def _audit(spec_path: Path, out: Path, executor: str) -> tuple[float, dict[str, Any]]:
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    started = time.perf_counter()
    outcome = run_audit(load_spec(spec_path), RunOptions(out_dir=out, only=CHECKS, pdf=False, executor=executor))  # type: ignore[arg-type]
    return time.perf_counter() - started, outcome.results


def _values(results: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{c['id']}:{m['name']}:{json.dumps(m.get('labels', {}), sort_keys=True)}": m["value"]
        for c in results["checks"]
        for m in c.get("metrics", [])
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    va, vb = _values(a), _values(b)
    return va.keys() == vb.keys() and all(
        (x is None and y is None) or (x is not None and y is not None and abs(x - y) <= 1e-6)
        for x, y in ((va[k], vb[k]) for k in va)
    )


def main() -> list[str]:
    try:
        import ray
    except ImportError:
        return ["  Ray not installed (pip install 'auditkit[ray]'): not measured"]
    from auditkit.demo import prepare_demo

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.shutdown()
    startup = time.perf_counter() - started
    times: dict[str, list[float]] = {"local": [], "ray": []}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="auditkit-bench-ray-") as name:
        tmp = Path(name)
        spec_path = prepare_demo(tmp / "demo")
        for repeat in range(REPEATS):
            for executor in ("local", "ray"):
                seconds, results[executor] = _audit(spec_path, tmp / f"{executor}-{repeat}", executor)
                times[executor].append(seconds)
    local, on_ray = statistics.median(times["local"]), statistics.median(times["ray"])
    runs = {executor: results[executor]["run"] for executor in ("local", "ray")}
    n = runs["local"]["images_decoded"]
    spread = {executor: ", ".join(f"{t:.1f}" for t in times[executor]) for executor in times}
    same_rows = runs["local"]["images_forwarded_per_split"] == runs["ray"]["images_forwarded_per_split"]
    return [
        f"  demo study ({n} images), checks {', '.join(CHECKS)}, 2 cores, medians of {REPEATS}:",
        f"  Ray / local wall time              {on_ray / local:7.2f}x   [ray {on_ray:.1f} s ({spread['ray']}),"
        f" local {local:.1f} s ({spread['local']}); a local Ray instance's start and stop alone {startup:.1f} s]",
        f"  shared pass seconds: ray {runs['ray']['inference_s']:.2f} (model actors, images through the object"
        f" store), local {runs['local']['inference_s']:.2f}",
        f"  same metrics (1e-6): {_same(results['local'], results['ray'])}; same rows forwarded: {same_rows}",
    ]


if __name__ == "__main__":
    for line in main():
        print(line)
