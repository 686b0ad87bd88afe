"""Run every ``benchmarks/bench_*.py`` module's ``main()`` and print the lines it returns, then ``gpu``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def run_all(names: list[str] | None = None) -> int:
    """Run the named benchmark modules (default: all ``bench_*``); return the exit status."""
    modules = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if names:
        unknown = sorted(set(names) - set(modules))
        if unknown:
            print(f"unknown benchmark(s) {unknown}; available: {modules}", file=sys.stderr)
            return 2
        modules = [m for m in modules if m in names]
    total_started = time.perf_counter()
    for name in modules:
        started = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}")
        for line in module.main():
            print(line)
        print(f"   ({time.perf_counter() - started:.1f} s)")
    if not names:
        from benchmarks import gpu

        print("== gpu")
        for line in gpu.main():
            print(line)
    print(f"== total {time.perf_counter() - total_started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_all(sys.argv[1:]))
