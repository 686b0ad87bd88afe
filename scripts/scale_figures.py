"""Figures of docs/scale.md: how an audit's time and memory grow with the study, per stage.

For studies of ``factor`` times the demo's 240 patients (stored 64 x 64, the packaged tiny CNN),
runs ``auditkit run`` in a fresh process per study with the prediction-based checks and PHI
(calibration, ood, bias, leakage, performance, phi; PDF off) and prints one markdown row per
study: images, wall seconds, decode, shared pass, each check's seconds and the peak resident
memory, all read from ``results.json`` (``run.decode_s``, ``run.inference_s_per_split``, each
check's ``duration_s``, ``run.peak_rss_mib``). ``--executor ray`` runs the same on Ray.

Run: ``python scripts/scale_figures.py [--factors 1 4 100] [--executor local|ray]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKS = "calibration,ood,bias,leakage,performance,phi"
DEMO_PATIENTS = 240


def audit(spec: Path, out: Path, executor: str) -> tuple[float, dict]:  # type: ignore[type-arg]
    command = [sys.executable, "-m", "auditkit", "run", str(spec), "--only", CHECKS, "--no-pdf", "-q"]
    command += ["--out", str(out), "--executor", executor]
    started = time.perf_counter()
    subprocess.run(command, check=False, capture_output=True)
    return time.perf_counter() - started, json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 100])
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    args = parser.parse_args()
    from auditkit.demo import prepare_demo

    checks = CHECKS.split(",")
    print(f"| study | images | wall s | decode s | pass s | {' | '.join(f'{c} s' for c in checks)} | peak MiB |")
    print("|" + "---|" * (6 + len(checks)))
    with tempfile.TemporaryDirectory(prefix="auditkit-scale-") as name:
        tmp = Path(name)
        for factor in args.factors:
            spec = prepare_demo(tmp / f"x{factor}", n_patients=DEMO_PATIENTS * factor, image_size=64)
            wall, results = audit(spec, tmp / f"out{factor}", args.executor)
            run = results["run"]
            durations = {c["id"]: c.get("duration_s") for c in results["checks"]}
            passes = {k: v for k, v in run["inference_s_per_split"].items() if not k.startswith("ood:")}
            cells = " | ".join(f"{durations.get(c) or 0:.1f}" for c in checks)
            print(
                f"| {factor}x | {run['images_decoded']} | {wall:.1f} | {run['decode_s']:.1f} |"
                f" {sum(passes.values()):.1f} | {cells} | {run['peak_rss_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
