"""Measure the backdoor check's error rates on a population of models it was not tuned on.

Trains (or reads from the cache) every member of ``auditkit.fixtures.population.POPULATION`` -
clean models of several architectures, seeds, class counts and data kinds, and their poisoned
twins - audits each with the backdoor check at its default parameters (CPU), and prints:

* one row per model: part, data kind, architecture, classes, seed, attack, test accuracy,
  attack success, verdict, suspected target, and per data-level method the largest share of a
  class flagged (for a twin: recall / precision on the poisoned rows);
* per part (``tuning``, ``held_out_1`` to ``held_out_8``; the first four together are what round
  4's rule was chosen on and the next three measured it, also pooled; round 5 was chosen on all
  seven and measured on ``held_out_7``, round 6 on all eight and measured on ``held_out_8``;
  ``volumes_3d`` measures the 2-D rule on 3-D models): the
  model-level false-positive rate on clean models, the data-level one (a clean model with more
  than 2% of some class flagged by a method), both with Wilson 95% intervals; the detection
  rate with the right target on poisoned twins, by attack kind; recall and precision on the
  BadNets twins' poisoned rows.

    python scripts/backdoor_population.py [--part held_out_5] [--only chest] [--jobs 2] [--json out.json]

Trained weights are cached under ``--cache`` (default ``$XDG_CACHE_HOME/auditkit/backdoor-population``,
outside the repository) keyed by the member and the generator version; audit results are cached
too, keyed by the member and a hash of ``checks/backdoor/*.py``, so a rerun without changes only
prints. ``--no-result-cache`` re-audits.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

METHODS = ("activation_clustering", "spectral_signature", "neighbourhood", "stamp", "strip")
SHORT = {
    "activation_clustering": "AC",
    "spectral_signature": "SS",
    "neighbourhood": "NB",
    "stamp": "ST",
    "strip": "STRIP",
    "any": "any",
}
FAIL_RULES = ("activation_clustering", "spectral_signature")  # the policies' fail rules (BD-DATA-*)
DATA_LIMIT = 0.02  # the policies' BD-DATA-CLUSTER / BD-DATA-SPECTRAL threshold


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion (``(nan, nan)`` for ``n = 0``)."""
    from auditkit.stats import wilson_interval

    return wilson_interval(successes, n) or (float("nan"), float("nan"))


def _default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "auditkit" / "backdoor-population"


def _check_hash() -> str:
    """Hash of the backdoor check's code: audit results are cached per version of the check.

    Docstrings are left out (the syntax tree without them is hashed), so documenting the figures
    does not invalidate the results they came from.
    """
    import ast

    import auditkit.checks.backdoor as package

    folder = Path(package.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and isinstance(body, list)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        digest.update(path.name.encode() + ast.dump(tree).encode())
    return digest.hexdigest()[:12]


def _weights(member: Any, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The member's trained weights and training metadata, trained now if not cached."""
    from auditkit.fixtures.population import (
        _save,
        attack_success_rate,
        clean_accuracy,
        member_dataset,
        train_member,
    )

    path = cache / "weights" / f"{member.name}-{member.key()}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    dataset = member_dataset(member)
    started = time.perf_counter()
    model = train_member(member, dataset)
    seconds = time.perf_counter() - started
    _save(model, path)
    meta = {
        "test_accuracy": clean_accuracy(model, dataset),
        "attack_success_rate": None if member.attack is None else attack_success_rate(model, dataset, member.attack),
        "train_seconds": round(seconds, 1),
    }
    meta_path.write_text(json.dumps(meta))
    return path, meta


def _findings(check: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    return [f for f in check["findings"] if f["kind"] == kind]


def audit_member(member: Any, cache: Path, *, use_result_cache: bool = True, threads: int = 1) -> dict[str, Any]:
    """Train (or load) one member, audit it with the backdoor check, and summarise the result."""
    import torch

    torch.set_num_threads(threads)
    from auditkit.checks.backdoor import BackdoorCheck
    from auditkit.fixtures.population import member_dataset, write_member_spec
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    result_path = cache / "results" / f"{member.name}-{member.key()}-{_check_hash()}.json"
    if use_result_cache and result_path.exists():
        return {**json.loads(result_path.read_text()), "part": member.part}
    weights, meta = _weights(member, cache)
    dataset = member_dataset(member)
    with tempfile.TemporaryDirectory(prefix="auditkit-population-") as folder:
        spec = write_member_spec(member, dataset, weights, Path(folder) / "study")
        started = time.perf_counter()
        outcome = run_audit(
            load_spec(spec),
            RunOptions(out_dir=Path(folder) / "out", pdf=False, report=False),
            checks={"backdoor": BackdoorCheck},
        )
        seconds = time.perf_counter() - started
    check = next(c for c in outcome.results["checks"] if c["id"] == "backdoor")
    if check["status"] != "ok":
        raise RuntimeError(f"{member.name}: the check ended {check['status']}: {check.get('error')}")
    classes = list(member.classes)
    metrics = {(m["name"], tuple(sorted(m["labels"].items()))): m["value"] for m in check["metrics"]}
    train_rows = {int(i) for i in (dataset.splits == "train").nonzero()[0]}
    truth = set(dataset.poisoned_rows)
    per_method: dict[str, Any] = {}
    for method in METHODS:
        rows = {row for f in _findings(check, "poisoning_suspected") if f["method"] == method for row in f["rows"]}
        fractions = [
            metrics.get(("backdoor.suspicious_fraction", (("class", name), ("method", method)))) for name in classes
        ]
        defined = [f for f in fractions if f is not None]
        hits = len(rows & truth)
        per_method[method] = {
            "max_fraction": max(defined) if defined else None,
            "flagged": len(rows),
            "recall": hits / len(truth) if truth else None,
            "precision": hits / len(rows) if truth and rows else None,
            "flagged_subgroups": sorted({str(dataset.subgroups[r]) or "main" for r in rows - truth}),
        }
    # "any": a row flagged by some method; its largest class share is bounded by the methods'.
    rows = {row for f in _findings(check, "poisoning_suspected") for row in f["rows"]}
    hits = len(rows & truth)
    shares = [m["max_fraction"] for m in per_method.values() if m["max_fraction"] is not None]
    per_method["any"] = {
        "max_fraction": max(shares) if shares else None,
        "flagged": len(rows),
        "recall": hits / len(truth) if truth else None,
        "precision": hits / len(rows) if truth and rows else None,
        "flagged_subgroups": sorted({str(dataset.subgroups[r]) or "main" for r in rows - truth}),
    }
    searches = {f["class"]: f for f in _findings(check, "trigger_search")}
    per_class = {
        name: {
            "norm": metrics.get(("backdoor.trigger_norm", (("class", name),))),
            "success": metrics.get(("backdoor.trigger_success_rate", (("class", name),))),
            "excursion": metrics.get(("backdoor.trigger_excursion", (("class", name),))),
            "anomaly": metrics.get(("backdoor.anomaly_index", (("class", name),))),
            "search": {k: v for k, v in searches.get(name, {}).items() if k not in ("kind", "class")},
        }
        for name in classes
    }
    attack = member.attack
    record = {
        "name": member.name,
        "part": member.part,
        "kind": member.kind,
        "arch": member.arch,
        "classes": len(classes),
        "seed": member.seed,
        "attack": None if attack is None else attack.kind,
        "attack_label": None if attack is None else attack.label,
        "target": None if attack is None else classes[attack.target],
        "poisoned_rows": len(truth),
        "train_rows": len(train_rows),
        **meta,
        "suspected": metrics.get(("backdoor.model_suspected", ())),
        "suspected_targets": [f["class"] for f in _findings(check, "suspected_target")],
        "methods": per_method,
        "per_class": per_class,
        "candidates": _findings(check, "candidate_population"),
        "evidence": {f["class"]: f.get("evidence") for f in _findings(check, "suspected_target")},
        "audit_seconds": round(seconds, 1),
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------------------------
# Summary


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "  -  " if value is None else format(value, spec)


def print_table(records: Sequence[Mapping[str, Any]], out: Any = sys.stdout) -> None:
    """One row per model."""
    header = (
        f"{'part':8s} {'kind':8s} {'arch':10s} {'K':>1s} {'seed':>4s} {'attack':18s} {'tgt':13s} "
        f"{'acc':>4s} {'asr':>4s} {'verdict':7s} {'suspected':14s} " + " ".join(f"{SHORT[m]:>9s}" for m in METHODS)
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in records:
        verdict = "n/a" if r["suspected"] is None else ("TROJAN" if r["suspected"] else "clean")
        cells = []
        for method in METHODS:
            m = r["methods"][method]
            if r["attack"] is None:
                cells.append(f"{_fmt(m['max_fraction'], '.1%'):>9s}")
            else:
                cells.append(f"{_fmt(m['recall'], '.2f')}/{_fmt(m['precision'], '.2f')}".rjust(9))
        asr = r["attack_success_rate"]
        print(
            f"{r['part']:8s} {r['kind']:8s} {r['arch']:10s} {r['classes']:1d} {r['seed']:4d} "
            f"{(r['attack_label'] or 'clean'):18s} {(r['target'] or '-'):13s} {r['test_accuracy']:4.2f} "
            f"{_fmt(asr):>4s} {verdict:7s} {','.join(r['suspected_targets']) or '-':14s} " + " ".join(cells),
            file=out,
        )


def _rate(hits: int, n: int) -> str:
    if n == 0:
        return "n/a (no models)"
    lo, hi = wilson(hits, n)
    return f"{hits}/{n} = {hits / n:.1%}  [95% Wilson {lo:.1%}, {hi:.1%}]"


def _attack_kind(record: Mapping[str, Any]) -> str:
    """The attack's family for the figures: a BadNets patch on the lesion class of a binary chest
    model counts as ``lesion-target``."""
    if record["attack"] == "badnets" and record["kind"] == "chest" and record["classes"] == 2:
        return "lesion-target"
    return str(record["attack"])


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The figures of one part: false-positive, detection, recall and precision rates."""
    clean = [r for r in records if r["attack"] is None]
    twins = [r for r in records if r["attack"] is not None]
    summary: dict[str, Any] = {"clean_models": len(clean), "poisoned_twins": len(twins)}
    summary["model_fp"] = (sum(bool(r["suspected"]) for r in clean), len(clean))
    for method in METHODS:
        over = sum((r["methods"][method]["max_fraction"] or 0.0) > DATA_LIMIT for r in clean)
        summary[f"data_fp_{method}"] = (over, len(clean))
        worst = max((r["methods"][method]["max_fraction"] or 0.0 for r in clean), default=0.0)
        summary[f"data_worst_{method}"] = worst
    failing = sum(any((r["methods"][m]["max_fraction"] or 0.0) > DATA_LIMIT for m in FAIL_RULES) for r in clean)
    summary["data_fp_fail_rules"] = (failing, len(clean))
    exact = [r["suspected_targets"] == [r["target"]] for r in twins]
    among = [r["target"] in r["suspected_targets"] for r in twins]
    summary["detected"] = (sum(among), len(twins))
    summary["detected_exact"] = (sum(exact), len(twins))
    summary["detected_any_target"] = (sum(bool(r["suspected"]) for r in twins), len(twins))
    # A twin whose backdoor did not take (attack success below one half) behaves like a clean model.
    effective = [hit for r, hit in zip(twins, among, strict=True) if (r["attack_success_rate"] or 0.0) >= 0.5]
    summary["detected_effective"] = (sum(effective), len(effective))
    by_kind: dict[str, list[int]] = {}
    for r, hit, only in zip(twins, among, exact, strict=True):
        counts = by_kind.setdefault(_attack_kind(r), [0, 0, 0])
        counts[0] += hit
        counts[1] += only
        counts[2] += 1
    summary["detected_by_kind"] = {kind: tuple(counts) for kind, counts in by_kind.items()}
    badnets = [r for r in twins if r["attack"] == "badnets"]
    for method in (*METHODS, "any"):
        truth = sum(r["poisoned_rows"] for r in badnets)
        hits = sum(round((r["methods"][method]["recall"] or 0.0) * r["poisoned_rows"]) for r in badnets)
        flagged = sum(r["methods"][method]["flagged"] for r in badnets)
        reached = sum(
            (r["methods"][method]["recall"] or 0.0) >= 0.8 and (r["methods"][method]["precision"] or 0.0) >= 0.5
            for r in badnets
        )
        summary[f"badnets_{method}"] = {
            "recall": hits / truth if truth else None,
            "precision": hits / flagged if flagged else None,
            "models_reaching": (reached, len(badnets)),
        }
    return summary


def print_summary(name: str, summary: Mapping[str, Any], out: Any = sys.stdout) -> None:
    print(f"\n== {name}: {summary['clean_models']} clean models, {summary['poisoned_twins']} poisoned twins", file=out)
    print(f"model-level false positives (clean model suspected): {_rate(*summary['model_fp'])}", file=out)
    for method in METHODS:
        print(
            f"data-level false positives, {SHORT[method]:5s} (some class > 2% flagged): "
            f"{_rate(*summary[f'data_fp_{method}'])}; worst class {summary[f'data_worst_{method}']:.1%}",
            file=out,
        )
    print(f"data-level false positives, AC or SS (the fail rules): {_rate(*summary['data_fp_fail_rules'])}", file=out)
    print(f"poisoned twins found, the target among the suspects: {_rate(*summary['detected'])}", file=out)
    print(f"poisoned twins found, the target the only suspect:   {_rate(*summary['detected_exact'])}", file=out)
    print(f"poisoned twins suspected (any target):               {_rate(*summary['detected_any_target'])}", file=out)
    effective = _rate(*summary["detected_effective"])
    print(f"twins whose attack took (success >= 0.5), target among the suspects: {effective}", file=out)
    for kind, (hits, only, n) in sorted(summary["detected_by_kind"].items()):
        print(f"  {kind:14s} target among suspects {hits}/{n}, only suspect {only}/{n}", file=out)
    for method in (*METHODS, "any"):
        figures = summary[f"badnets_{method}"]
        print(
            f"BadNets poisoned rows, {SHORT[method]:5s}: recall {_fmt(figures['recall'])}, precision "
            f"{_fmt(figures['precision'])} (pooled); recall >= 0.8 at precision >= 0.5 on "
            f"{figures['models_reaching'][0]}/{figures['models_reaching'][1]} models",
            file=out,
        )


def _select(members: Iterable[Any], parts: Sequence[str] | None, only: Sequence[str]) -> list[Any]:
    return [
        m for m in members if (not parts or m.part in parts) and (not only or any(token in m.name for token in only))
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from auditkit.fixtures.population import PARTS, POPULATION

    parser.add_argument("--part", choices=PARTS, action="append", help="only these parts (repeatable); default all")
    parser.add_argument("--only", action="append", default=[], help="members whose name contains this")
    parser.add_argument("--cache", type=Path, default=_default_cache())
    parser.add_argument("--jobs", type=int, default=2, help="members audited in parallel (one thread each)")
    parser.add_argument("--no-result-cache", action="store_true", help="re-audit even if a result is cached")
    parser.add_argument("--json", type=Path, help="write the records and summaries here")
    parser.add_argument("--train-only", action="store_true", help="train and cache the weights, audit nothing")
    arguments = parser.parse_args(argv)

    members = _select(POPULATION, arguments.part, arguments.only)
    started = time.perf_counter()
    use_cache = not arguments.no_result_cache
    if arguments.train_only:
        with ProcessPoolExecutor(max(1, arguments.jobs)) as pool:
            metas = list(pool.map(_weights, members, [arguments.cache] * len(members)))
        for member, (_, meta) in zip(members, metas, strict=True):
            print(f"{member.name:50s} {meta}")
        return
    if arguments.jobs > 1:
        with ProcessPoolExecutor(arguments.jobs) as pool:
            audit = functools.partial(audit_member, cache=arguments.cache, use_result_cache=use_cache)
            records = list(pool.map(audit, members))
    else:
        records = [audit_member(m, arguments.cache, use_result_cache=use_cache) for m in members]
    print_table(records)
    summaries = {}
    groups: dict[str, tuple[str, ...]] = {part: (part,) for part in PARTS}
    groups["tuning + held_out_1 + held_out_2 + held_out_3 (what the final rule was chosen on)"] = (
        "tuning",
        "held_out_1",
        "held_out_2",
        "held_out_3",
    )
    groups["held_out_4 + held_out_5 + held_out_6 (measured once each with round 4's rule; round 5 chosen on them)"] = (
        "held_out_4",
        "held_out_5",
        "held_out_6",
    )
    groups["every part round 5's rule was chosen on (tuning to held_out_6)"] = PARTS[:7]
    groups["every part round 6's rule was chosen on (tuning to held_out_7)"] = PARTS[:8]
    for label, parts in groups.items():
        chosen = [r for r in records if r["part"] in parts]
        if chosen and (len(parts) == 1 or len({r["part"] for r in chosen}) > 1):
            summaries[label] = summarise(chosen)
            print_summary(label, summaries[label])
    print(f"\n{len(records)} models in {time.perf_counter() - started:.0f} s (cache: {arguments.cache})")
    if arguments.json:
        arguments.json.write_text(json.dumps({"records": records, "summaries": summaries}, indent=1, default=str))


if __name__ == "__main__":
    main()
