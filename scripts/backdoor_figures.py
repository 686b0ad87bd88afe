"""Print the backdoor check's detection figures on the packaged poisoned models and clean twins.

Runs the check with its default parameters on the binary and multi-class studies of
``auditkit.fixtures.poison`` (poisoned model on the poisoned study, clean twin on the clean one)
and prints, per model, the trigger search per class (mask norm, feature excursion against the
eval and train ranges, anomaly index, steps, seconds), the verdict and its evidence; every
data-level candidate population with its share, the eval split's share and the confirmation's p;
per data-level method, recall and precision on the poisoned rows and the share of the clean twin's
training set flagged. The population figures (clean models the check was not tuned on) come from
``scripts/backdoor_population.py``.

    python scripts/backdoor_figures.py [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    from auditkit.checks.backdoor import BackdoorCheck
    from auditkit.fixtures.poison import generate_clean_study, generate_poisoned_study, write_backdoor_spec
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="auditkit-backdoor-") as folder:
        root = Path(folder)
        for task in ("binary", "multiclass"):
            checks: dict[str, Any] = {}
            studies = {"poisoned": generate_poisoned_study(root / f"{task}-p", task)}
            studies["clean"] = generate_clean_study(root / f"{task}-c", task)
            for variant, study in studies.items():
                spec = write_backdoor_spec(study, variant, checks={"backdoor": {}})
                outcome = run_audit(
                    load_spec(spec),
                    RunOptions(out_dir=root / f"{task}-{variant}-out", pdf=False, report=False),
                    checks={"backdoor": BackdoorCheck},
                )
                checks[variant] = next(c for c in outcome.results["checks"] if c["id"] == "backdoor")
            poisoned = studies["poisoned"]
            truth = set(poisoned.poisoned_rows)
            n_clean_train = studies["clean"].study.split_counts["train"]
            print(f"\n== {task}: target {poisoned.poison.target!r}, {len(truth)} poisoned training images")
            for variant, check in checks.items():
                metrics = {(m["name"], tuple(sorted(m["labels"].items()))): m for m in check["metrics"]}
                suspected = metrics[("backdoor.model_suspected", ())]["value"]
                targets = {f["class"]: f["evidence"] for f in check["findings"] if f["kind"] == "suspected_target"}
                print(f"{variant:9s} model_suspected={suspected} suspected classes and evidence={targets}")
                for search in (f for f in check["findings"] if f["kind"] == "trigger_search"):
                    label = (("class", search["class"]),)
                    norm = metrics[("backdoor.trigger_norm", label)]["value"]
                    excursion = metrics[("backdoor.trigger_excursion", label)]["value"]
                    index = metrics[("backdoor.anomaly_index", label)]["value"]
                    print(
                        f"  {search['class']:8s} norm {norm:6.2f}  excursion eval {excursion:5.2f}"
                        f" train {search['train_excursion']:5.2f}  anomaly "
                        f"{'  n/a' if index is None else f'{index:5.2f}'}  steps {search['steps']:3d}"
                        f"  {search['seconds']:6.1f} s"
                    )
                for candidate in (f for f in check["findings"] if f["kind"] == "candidate_population"):
                    eval_share = "  n/a" if candidate["eval_share"] is None else f"{candidate['eval_share']:.3f}"
                    p_value = "n/a" if candidate["p_value"] is None else f"{candidate['p_value']:.2g}"
                    print(
                        f"  candidate {candidate['method']:22s} {candidate['class']:8s} share {candidate['share']:.3f}"
                        f"  eval share {eval_share}  p {p_value}  confirmed {candidate['confirmed']}"
                    )
            for method in ("activation_clustering", "spectral_signature", "neighbourhood", "strip"):
                found = {
                    row
                    for f in checks["poisoned"]["findings"]
                    if f["kind"] == "poisoning_suspected" and f["method"] == method
                    for row in f["rows"]
                }
                clean_flags = sum(
                    f["count"]
                    for f in checks["clean"]["findings"]
                    if f["kind"] == "poisoning_suspected" and f["method"] == method
                )
                hits = len(found & truth)
                precision = hits / len(found) if found else float("nan")
                print(
                    f"  {method:22s} recall {hits / len(truth):.2f}  precision {precision:.2f}"
                    f"  clean twin flagged {clean_flags}/{n_clean_train} ({clean_flags / n_clean_train:.1%})"
                )


if __name__ == "__main__":
    main()
