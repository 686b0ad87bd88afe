"""The ``auditkit`` command line (DESIGN section 8).

Exit codes: 0 pass, 1 policy failed, 2 usage or input error, 3 a check errored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from auditkit import __version__
from auditkit.errors import AuditkitError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep our wording
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"auditkit: error: {message}\n")


def _progress_factory(enabled: bool) -> Callable[[str, int], Callable[[int], None] | None] | None:
    if not enabled:
        return None
    from tqdm import tqdm

    bars: list[Any] = []

    def factory(label: str, total: int) -> Callable[[int], None] | None:
        for bar in bars:
            bar.close()
        bars.clear()
        bar = tqdm(
            total=total, desc=label, unit="img", leave=False, file=sys.stderr, dynamic_ncols=True
        )
        bars.append(bar)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance

    return factory


def _format_value(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def print_summary(results: dict[str, Any], out: TextIO | None = None) -> None:
    """A short, CI-log-friendly summary: data, checks with headline metrics, verdict."""
    out = out or sys.stdout
    run, data = results["run"], results["data"]
    out.write(f"auditkit {run['auditkit_version']} on {run['device']}, {run['duration_s']:.1f} s\n")
    for name, split in data["splits"].items():
        out.write(
            f"  split {name}: {split['n_images']} images, {split['n_quarantined']} quarantined,"
            f" {split['n_patients']} patients\n"
        )
    out.write(
        f"  forward pass: {run['images_forwarded']} images in {run['forward_calls']} batches"
        f" of <= {run['batch_size']}\n"
    )
    for check in results["checks"]:
        line = f"[{check['status']:>7}] {check['id']} ({check['duration_s']:.1f} s)"
        if check["status"] == "skipped":
            line += f": {check['reason']}"
        if check["status"] == "error":
            error = check["error"] or {}
            line += f": {error.get('type')}: {error.get('message')}"
        out.write(line + "\n")
        for metric in check["metrics"]:
            if metric["labels"]:
                continue
            ci = metric["ci"]
            interval = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            out.write(
                f"          {metric['name']:<36} {_format_value(metric['value'])}{interval}\n"
            )
    out.write(f"verdict: {results['verdict'].upper()}\n")


def _cmd_run(args: argparse.Namespace) -> int:
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    spec = load_spec(args.spec)
    if args.policy:
        spec = spec.model_copy(update={"policy": args.policy})
    options = RunOptions(
        out_dir=Path(args.out) if args.out else None,
        only=args.only,
        skip=args.skip or (),
        device=args.device,
        resume=args.resume,
        batch_size=args.batch_size,
        progress=_progress_factory(not args.quiet and sys.stderr.isatty()),
        argv=["auditkit", *sys.argv[1:]],
    )
    outcome = run_audit(spec, options)
    if not args.quiet:
        print_summary(outcome.results)
    print(f"results: {outcome.out_dir / 'results.json'}")
    return outcome.exit_code


def _cmd_demo(args: argparse.Namespace) -> int:
    from auditkit.demo import prepare_demo

    out = Path(args.out).resolve()
    spec_path = prepare_demo(out, n_patients=args.patients)
    print(f"demo study and spec written to {spec_path.parent}")
    run_args = argparse.Namespace(
        spec=str(spec_path),
        out=str(out / "audit"),
        policy=None,
        only=args.only,
        skip=args.skip,
        device=args.device,
        resume=False,
        batch_size=64,
        quiet=args.quiet,
    )
    return _cmd_run(run_args)


def _cmd_checks(args: argparse.Namespace) -> int:
    from auditkit.registry import discover

    checks, broken = discover()
    for cid, cls in checks.items():
        print(f"{cid:<14} {cls.family:<12} {cls.__module__}  {cls.summary()}")
    for item in broken:
        print(f"{item.id:<14} BROKEN       {item.target}  {item.reason}")
    return 0 if not broken else 3


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="auditkit", description="Audit a medical-imaging model before deployment."
    )
    parser.add_argument("--version", action="version", version=f"auditkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the audit described by a spec file")
    run.add_argument("spec", help="audit spec (YAML)")
    run.add_argument("--out", help="output folder (default: the spec's `output`)")
    run.add_argument("--policy", help="policy name or YAML path (overrides the spec)")
    run.add_argument("--only", action="append", help="comma-separated check ids to run")
    run.add_argument("--skip", action="append", help="comma-separated check ids to skip")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the spec)")
    run.add_argument(
        "--resume", action="store_true", help="reuse checks finished by an earlier run"
    )
    run.add_argument("--no-pdf", action="store_true", help="do not render report.pdf")
    run.add_argument(
        "--batch-size", type=int, default=64, help="images per forward call (halved on OOM)"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="audit the packaged synthetic study and model")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--patients", type=int, default=240, help="patients in the synthetic study")
    demo.add_argument("--only", action="append", help="comma-separated check ids to run")
    demo.add_argument("--skip", action="append", help="comma-separated check ids to skip")
    demo.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    demo.set_defaults(func=_cmd_demo)

    checks = sub.add_parser("checks", help="list the installed checks")
    checks.set_defaults(func=_cmd_checks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "batch_size", 1) < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        code: int = args.func(args)
    except AuditkitError as error:
        print(f"auditkit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "auditkit: interrupted; finished checks are checkpointed (use --resume)",
            file=sys.stderr,
        )
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
