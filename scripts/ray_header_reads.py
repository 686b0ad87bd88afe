"""Figures of docs/scale.md: a check's header reads on Ray, in its own task or spread over Ray tasks.

For a study ``factor`` times the demo's 240 patients (stored 64 x 64, the packaged tiny CNN), runs
the named checks (default: phi) locally, then on a local Ray instance twice each way alternating:
with every header read in the check's Ray task (one chunk, as before ``map_headers`` had a
mapper), and by chunks of :data:`auditkit.context.HEADER_CHUNK` files as Ray tasks. Prints each
run's wall time and the checks' ``duration_s``, and whether its metrics equal the local run's.

Run: ``python scripts/ray_header_reads.py [--factor 20] [--checks phi,leakage]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DEMO_PATIENTS = 240


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--factor", type=int, default=20)
    parser.add_argument("--checks", default="phi")
    args = parser.parse_args()
    import auditkit.context
    from auditkit.demo import prepare_demo
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    only = args.checks.split(",")
    chunk = auditkit.context.HEADER_CHUNK
    runs = [("local", chunk)] + [("ray", size) for _ in range(2) for size in (10**9, chunk)]
    reference = None
    with tempfile.TemporaryDirectory(prefix="auditkit-headers-") as name:
        tmp = Path(name)
        spec = load_spec(prepare_demo(tmp / "study", n_patients=DEMO_PATIENTS * args.factor, image_size=64))
        for executor, size in runs:
            auditkit.context.HEADER_CHUNK = size
            started = time.perf_counter()
            outcome = run_audit(spec, RunOptions(out_dir=tmp / "out", executor=executor, report=False, only=only))  # type: ignore[arg-type]
            wall = time.perf_counter() - started
            checks = [c for c in outcome.results["checks"] if c["id"] in only]
            metrics = [
                (c["id"], m["name"], sorted(m.get("labels", {}).items()), m["value"])
                for c in checks
                for m in c["metrics"]
            ]
            reference = metrics if reference is None else reference
            how = (
                "local"
                if executor == "local"
                else ("Ray, in the check's task" if size > chunk else f"Ray, tasks of {size} files")
            )
            seconds = ", ".join(f"{c['id']} {c.get('duration_s') or 0:.1f} s" for c in checks)
            print(
                f"{how}: {outcome.results['run']['images_decoded']} images, wall {wall:.1f} s, {seconds},"
                f" metrics {'equal to' if metrics == reference else 'DIFFERENT from'} the local run's",
                flush=True,
            )
    auditkit.context.HEADER_CHUNK = chunk


if __name__ == "__main__":
    main()
