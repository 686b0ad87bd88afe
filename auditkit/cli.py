"""The ``auditkit`` command line (docs/architecture.md, "Data flow").

Exit codes: 0 pass, 1 policy failed, 2 usage or input error, 3 a check errored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from auditkit import __version__
from auditkit.errors import AuditkitError, InputError

if TYPE_CHECKING:
    from auditkit.bundle import VerifyReport

EXIT_USAGE = 2
EXIT_INTERNAL = 3  # the audit could not complete, like a check that errored


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
        bar = tqdm(total=total, desc=label, unit="img", leave=False, file=sys.stderr, dynamic_ncols=True)
        bars.append(bar)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance

    return factory


def _format_value(value: float | None, *, count: bool = False) -> str:
    if value is None:
        return "undefined"
    if count and float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}"


_COUNTS = frozenset(
    {
        "coverage.images_read",
        "bias.min_group_size",
        "leakage.patient_overlap",
        "leakage.study_overlap",
        "leakage.series_overlap",
        "leakage.exact_duplicates",
        "leakage.near_duplicates",
        "phi.files_with_identifiers",
        "phi.burned_in_annotation_files",
        "phi.identity_not_removed_files",
    }
)
"""Metrics whose values are counts, printed without decimals."""


def _quarantine_lines(split: str, data: dict[str, Any], limit: int = 5) -> list[str]:
    """The quarantine of one split: counts by reason, commonest first, and the first rows."""
    entries = [q for q in data.get("quarantine", []) if q.get("split") == split]
    by_reason: dict[str, list[int]] = {}
    for entry in entries:
        by_reason.setdefault(str(entry.get("reason")), []).append(int(entry.get("row", -1)))
    ordered = sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))
    lines = []
    for reason, rows in ordered[:limit]:
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        lines.append(f"      {len(rows)} x {reason} (row{'s' if len(rows) > 1 else ''} {shown})")
    if len(ordered) > limit:
        lines.append(f"      ... {len(ordered) - limit} other reason(s): results.json data.quarantine")
    return lines


def print_summary(results: dict[str, Any], out: TextIO | None = None) -> None:
    """A short, CI-log-friendly summary: data coverage, checks with headline metrics, rules, verdict."""
    out = out or sys.stdout
    run, data = results["run"], results["data"]
    out.write(f"auditkit {run['auditkit_version']} on {run['device']}, {run['duration_s']:.1f} s\n")
    coverage = data.get("coverage") or {}
    for name, split in data["splits"].items():
        counts = coverage.get(name)
        if counts:
            share = f" ({100 * counts['quarantined_fraction']:.1f}%)" if counts["quarantined"] else ""
            out.write(
                f"  split {name}: {counts['read']} of {counts['listed']} images read,"
                f" {counts['quarantined']} quarantined{share}, {split['n_patients']} patients\n"
            )
        else:
            out.write(
                f"  split {name}: {split['n_images']} images, {split['n_quarantined']} quarantined,"
                f" {split['n_patients']} patients\n"
            )
        for line in _quarantine_lines(name, data):
            out.write(line + "\n")
    out.write(
        f"  forward pass: {run['images_forwarded']} images in {run['forward_calls']} batches"
        f" of <= {run['batch_size']}\n"
    )
    selection = run.get("selection") or {}
    for check in results["checks"]:
        if check["id"] == "coverage":
            continue
        status = "reused" if check.get("resumed") else check["status"]
        when = f"{check['duration_s']:.1f} s"
        if check.get("resumed"):
            when += " in the earlier run"
        line = f"[{status:>7}] {check['id']} ({when})"
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
            out.write(f"          {metric['name']:<36} {_format_value(metric['value'])}{interval}\n")
    if selection.get("not_run"):
        narrowing = ", ".join(f"{key} {selection[key]}" for key in ("only", "skip") if selection.get(key))
        out.write(
            f"[not run] {', '.join(selection['not_run'])} ({narrowing or 'narrowed'},"
            f" from the {selection.get('source', 'spec')})\n"
        )
    rules = results.get("rules") or []
    for rule in rules:
        if rule["status"] in ("fail", "warn"):
            ci = rule.get("ci")
            interval = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            bound = "<=" if rule["bound"] == "max" else ">="
            out.write(
                f"  {rule['status'].upper():<4} {rule['id']}: {rule['metric']}"
                f" {_format_value(rule['observed'], count=rule['metric'] in _COUNTS)}{interval}"
                f" ({rule['use']}) {bound} {rule['threshold']}\n"
            )
    policy = results.get("policy") or {}
    if policy:
        counts = policy.get("control_counts", {})
        out.write(
            f"policy {policy.get('name')}: {sum(r['status'] == 'pass' for r in rules)} rules passed,"
            f" {sum(r['status'] == 'warn' for r in rules)} warned,"
            f" {sum(r['status'] == 'fail' for r in rules)} failed,"
            f" {sum(r['status'] == 'not_evaluated' for r in rules)} not evaluated;"
            f" AI RMF subcategories: {counts.get('met', 0)} met, {counts.get('not_met', 0)} not met,"
            f" {counts.get('not_evaluated', 0)} not evaluated, {counts.get('attested', 0)} attested,"
            f" {counts.get('not_assessed', 0)} not assessed (of {sum(counts.values())})\n"
        )
    verdict = results["verdict"].upper()
    evaluated = policy.get("evaluated") or {}
    if evaluated.get("text"):
        verdict += f" ({evaluated['text']})"
    out.write(f"verdict: {verdict}\n")


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
        executor=args.executor,
        ray_address=args.ray_address,
        pixels=getattr(args, "pixels", "auto"),
        pdf=not args.no_pdf,
        progress=_progress_factory(not args.quiet and sys.stderr.isatty()),
        argv=["auditkit", *sys.argv[1:]],
    )
    outcome = run_audit(spec, options)
    if not args.quiet:
        print_summary(outcome.results)
    print(f"results: {outcome.out_dir / 'results.json'}")
    if (outcome.out_dir / "report.pdf").is_file() and not args.no_pdf:
        print(f"report: {outcome.out_dir / 'report.pdf'}")
    return outcome.exit_code


_DEMO_FINDINGS = {
    "classification": (
        "the demo fails the default policy on the three faults it plants: a tiny CNN with too soft"
        " probabilities (CAL-ECE), a site whose scanner it reads poorly (BIAS-SENS-GAP, site C) and no"
        " robustness to acquisition shifts (COR-MEAN-DROP); the README and report.pdf say why"
    ),
    "multilabel": (
        "the multilabel demo fails the default policy: its model was trained on labels that under-report"
        " women's findings (planted) and underdiagnoses women; report.pdf says which rules fail and why"
    ),
    "regression": (
        "the regression demo fails the default policy: its model never saw site C in training (planted)"
        " and errs more there; report.pdf says which rules fail and why"
    ),
    "segmentation": (
        "the segmentation demo fails the default policy: its U-Net never saw site C's contrast-enhanced"
        " lesions (planted) and outlines them worse there (SEG-DICE-GAP); report.pdf says which rules fail and why"
    ),
    "volumes": (
        "the volumes demo fails the default policy: its 3-D CNN never saw site C's scanner (planted), misses"
        " its nodules (BIAS-SENS-GAP) and is overconfident there (CAL-ECE); the CT series also carry planted"
        " identifiers in every slice (PHI-IDENTIFIERS); report.pdf says which rules fail and why"
    ),
}


def _cmd_demo(args: argparse.Namespace) -> int:
    from auditkit.demo import prepare_demo, prepare_task_demo

    out = Path(args.out).resolve()
    if args.task == "classification":
        spec_path = prepare_demo(out, n_patients=240 if args.patients is None else args.patients)
    elif args.patients is not None:
        print(
            f"auditkit: error: --patients applies to --task classification; the {args.task} study is fixed"
            " (its packaged model was trained on its train split)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    else:
        spec_path = prepare_task_demo(out, args.task)
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
        executor=None,
        ray_address=None,
        pixels="auto",
        no_pdf=args.no_pdf,
        quiet=args.quiet,
    )
    code = _cmd_run(run_args)
    if code == 1:  # a failed policy is the demo's finding, not an error of the demo
        print(_DEMO_FINDINGS[args.task])
        return 0
    return code


def _cmd_checks(args: argparse.Namespace) -> int:
    from auditkit.registry import discover

    checks, broken = discover()
    for cid, cls in checks.items():
        print(f"{cid:<14} {cls.family:<12} {cls.__module__}  {cls.summary()}")
    for item in broken:
        print(f"{item.id:<14} BROKEN       {item.target}  {item.reason}")
    return 0 if not broken else 3


def _cmd_policies(args: argparse.Namespace) -> int:
    from auditkit.policy import load_policy, packaged_policies

    if not args.name:
        for name in packaged_policies():
            policy, _ = load_policy(name)
            print(f"{name:<28} v{policy.version}  {len(policy.rules)} rules  {policy.description[:70]}")
        return 0
    policy, _ = load_policy(args.name, base_dir=Path.cwd())
    print(f"{policy.name} v{policy.version} ({policy.framework})")
    if policy.description:
        print(policy.description)
    for rule in policy.rules:
        bound = f"<= {rule.max}" if rule.max is not None else f">= {rule.min}"
        labels = "worst of all" if rule.labels is None else (rule.labels or "overall")
        print(
            f"  {rule.id:<22} {rule.severity:<4} {rule.metric} {labels} {bound} (use {rule.use})"
            f"  [{', '.join(rule.controls)}]" + (f"  tasks: {', '.join(rule.tasks)}" if rule.tasks else "")
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from auditkit.bundle import write_bundle
    from auditkit.results import load_results

    folder = Path(args.dir)
    results = load_results(folder)
    write_bundle(folder, results, spec=None, report=True, pdf=not args.no_pdf)
    print(f"report: {folder / ('report.html' if args.no_pdf else 'report.pdf')}")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from auditkit.pack import keygen

    private, public = keygen(Path(args.key), Path(args.pub) if args.pub else None)
    print(f"private key: {private} (keep it secret; mode 0600)")
    print(f"public key:  {public} (give it to whoever verifies a pack)")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from auditkit.pack import pack

    out = pack(Path(args.dir), Path(args.out) if args.out else None, key=Path(args.key) if args.key else None)
    print(f"pack: {out} ({'signed' if args.key else 'unsigned: auditkit keygen, then --key'})")
    return 0


def _print_differences(report: VerifyReport) -> None:
    for label, names in (("CHANGED", report.changed), ("MISSING", report.missing), ("UNEXPECTED", report.unexpected)):
        for name in names:
            print(f"{label:<11} {name}")


def _cmd_verify_pack(target: Path, pubkey: Path | None) -> int:
    from auditkit.pack import verify_pack

    report = verify_pack(target, pubkey)
    _print_differences(report)
    signature = {
        "valid": "signature valid",
        "invalid": "signature INVALID for this public key",
        "absent": "unsigned pack",
        "not checked": "signature not checked (give --pubkey)",
    }[report.signature]
    if report.ok:
        print(f"ok: {report.checked} files match attestation.json; {signature}; verdict {report.verdict}")
        return 0
    print(
        f"verification failed: {len(report.changed)} changed, {len(report.missing)} missing,"
        f" {len(report.unexpected)} unexpected; {signature}"
    )
    return 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from auditkit.bundle import verify_bundle
    from auditkit.pack import ATTESTATION

    target = Path(args.dir)
    pubkey = Path(args.pubkey) if args.pubkey else None
    if target.is_file() or (target / ATTESTATION).is_file():  # a submission pack, zipped or unpacked
        return _cmd_verify_pack(target, pubkey)
    if pubkey is not None:
        raise InputError(f"{target}: an evidence bundle has no signature; --pubkey verifies a pack (auditkit pack)")
    report = verify_bundle(target)
    _print_differences(report)
    if report.ok:
        print(f"ok: {report.checked} files match manifest.json")
        return 0
    print(
        f"verification failed: {len(report.changed)} changed, {len(report.missing)} missing,"
        f" {len(report.unexpected)} unexpected"
    )
    return 1


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    from auditkit.compare import compare, format_markdown, format_text

    comparison = compare(
        Path(args.base), Path(args.new), tolerance=args.tolerance, allow_different=args.allow_different
    )
    if args.format == "json":
        print(json.dumps(comparison.to_json(), indent=2, allow_nan=False))
    elif args.format == "markdown":
        print(format_markdown(comparison), end="")
    else:
        print(format_text(comparison, all_metrics=args.all), end="")
    return int(comparison.exit_code)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="auditkit", description="Audit a medical-imaging model before deployment.")
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
    run.add_argument("--resume", action="store_true", help="reuse checks finished by an earlier run")
    run.add_argument("--no-pdf", action="store_true", help="do not render report.pdf")
    run.add_argument("--batch-size", type=int, default=64, help="images per forward call (halved on OOM)")
    run.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where the decode and the shared pass run (overrides the spec's executor; ray needs auditkit[ray])",
    )
    run.add_argument("--ray-address", help="a running Ray cluster, host:port or auto (default: start a local instance)")
    run.add_argument(
        "--pixels",
        choices=["auto", "memory", "disk"],
        default="auto",
        help="where decoded images are held: disk writes them under OUT/.pixels and reads them back by rows"
        " (auto: disk above AUDITKIT_PIXEL_MEMORY_MIB, default 2048 MiB)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="audit the packaged synthetic study and model")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument(
        "--task",
        choices=["classification", "multilabel", "regression", "segmentation", "volumes"],
        default="classification",
        help="classification (default): the nodule study and tiny CNN; multilabel: a model that"
        " underdiagnoses women (planted); regression: a cardiothoracic-ratio model that never saw site C;"
        " segmentation: a U-Net that never saw site C's lesions; volumes: a 3-D CNN on CT volumes that never"
        " saw site C",
    )
    demo.add_argument(
        "--patients", type=int, help="patients in the synthetic study (--task classification; default 240)"
    )
    demo.add_argument("--only", action="append", help="comma-separated check ids to run")
    demo.add_argument("--skip", action="append", help="comma-separated check ids to skip")
    demo.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    demo.add_argument("--no-pdf", action="store_true", help="do not render report.pdf")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    demo.set_defaults(func=_cmd_demo)

    checks = sub.add_parser("checks", help="list the installed checks")
    checks.set_defaults(func=_cmd_checks)

    policies = sub.add_parser("policies", help="list the packaged policies, or show one's rules")
    policies.add_argument("name", nargs="?", help="a packaged policy name or a policy YAML file")
    policies.set_defaults(func=_cmd_policies)

    report = sub.add_parser("report", help="re-render report.html/report.pdf from DIR/results.json")
    report.add_argument("dir", help="an auditkit output folder")
    report.add_argument("--no-pdf", action="store_true", help="only report.html")
    report.set_defaults(func=_cmd_report)

    verify = sub.add_parser("verify", help="recompute the hashes of an evidence bundle or a submission pack")
    verify.add_argument("dir", help="an auditkit output folder, a pack (.zip) or an unpacked pack folder")
    verify.add_argument("--pubkey", help="the signer's Ed25519 public key (PEM): also check the pack's signature")
    verify.set_defaults(func=_cmd_verify)

    keygen = sub.add_parser("keygen", help="write an Ed25519 key pair for signing packs")
    keygen.add_argument("--key", default="auditkit-signing.pem", help="private key file (default %(default)s)")
    keygen.add_argument("--pub", help="public key file (default: the key's name with .pub.pem)")
    keygen.set_defaults(func=_cmd_keygen)

    pack = sub.add_parser("pack", help="write the submission pack of an evidence bundle (a deterministic zip)")
    pack.add_argument("dir", help="an auditkit output folder")
    pack.add_argument("--key", help="Ed25519 private key (PEM) to sign the attestation with")
    pack.add_argument("--out", help="the zip (default: DIR-pack.zip beside DIR)")
    pack.set_defaults(func=_cmd_pack)

    cmp = sub.add_parser(
        "compare",
        help="metric, rule and check deltas between two audits; exit 1 on regression, 2 when not comparable",
    )
    cmp.add_argument("base", help="the reference audit's output folder")
    cmp.add_argument("new", help="the candidate audit's output folder")
    cmp.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    cmp.add_argument("--all", action="store_true", help="list every metric, not only the changes")
    cmp.add_argument("--tolerance", type=float, default=1e-9, help="changes below this are unchanged")
    cmp.add_argument(
        "--allow-different",
        action="store_true",
        help="compare audits of different data or classes anyway (exit 0/1, not 2); the warnings stay",
    )
    cmp.set_defaults(func=_cmd_compare)
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
    except Exception as error:  # a bug, not a user error: no traceback unless asked for (-v)
        logging.getLogger("auditkit").info("internal error", exc_info=True)
        print(
            f"auditkit: internal error: {type(error).__name__}: {error}. This is a bug in auditkit or a"
            " plug-in, not in your inputs; finished checks are checkpointed (--resume). Rerun with -v for"
            " the traceback, and please report it.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return code


if __name__ == "__main__":
    sys.exit(main())
