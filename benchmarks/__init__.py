"""Performance harness: ``python -m benchmarks`` (``make bench``) runs every ``bench_*`` module.

Each ``benchmarks/bench_<topic>.py`` module defines ``main() -> list[str]``: it measures one thing
in-process (median of interleaved repeats) and returns the lines to print. Speed is measured
here, never asserted in the test suite.
"""
