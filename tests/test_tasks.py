"""Multi-label and regression models through the spec, the manifest, the model adapter and the
runner: what each reads, what each refuses (exit 2 naming the file, row or field), and that every
check either measures the task or is skipped with a reason that names it."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from auditkit.check import Check, CheckResult, Metric, Needs
from auditkit.cli import main
from auditkit.data import read_manifest, split_labels
from auditkit.errors import ConfigError, InputError
from auditkit.model import ModelAdapter, precision_parity
from auditkit.spec import parse_spec
from auditkit.testing import make_context

MODELS = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Linear(nn.Module):
        """A linear model over the pixels, with fixed weights given as a list."""

        def __init__(self, weight: list[list[float]], bias: list[float], vector: bool = False) -> None:
            super().__init__()
            self.fc = nn.Linear(len(weight[0]), len(weight))
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor(weight))
                self.fc.bias.copy_(torch.tensor(bias))
            self.vector = vector

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x.flatten(1))
            return out[:, 0] if self.vector else out


    def build(**kwargs) -> nn.Module:
        return Linear(**kwargs)
    '''
)

SIZE = 8


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose centre and border brightness are the two findings (independent)."""
    rng = np.random.default_rng(seed)
    centre, border = rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)
    images = rng.uniform(0.2, 0.4, size=(n, SIZE, SIZE)).astype(np.float32)
    images[centre == 1, 2:6, 2:6] += 0.5
    rim = np.ones((SIZE, SIZE), dtype=bool)
    rim[1:-1, 1:-1] = False
    images[border == 1] += 0.5 * rim
    return images, np.stack([centre, border], axis=1)


def _weights() -> tuple[list[list[float]], list[float]]:
    """Three outputs: centre, border (each a contrast of their region against the rest), extra."""
    centre = np.zeros((SIZE, SIZE))
    centre[2:6, 2:6] = 1 / 16
    rim = np.zeros((SIZE, SIZE))
    rim[[0, -1], :] = rim[:, [0, -1]] = 1 / 28
    weight = np.stack([centre * 40, rim * 40, np.ones((SIZE, SIZE))]).reshape(3, -1)
    return weight.tolist(), [-20.0 * 0.55, -20.0 * 0.55, 0.0]


def make_multilabel_study(root: Path, *, n: int = 80, seed: int = 0, unknown: int = 3) -> Path:
    """A tiny multi-label study (labels ``centre`` and ``border``) and a linear model whose third
    output ``extra`` is not audited (``output_names``). Returns the spec path."""
    images, truth = _images(n, seed)
    data = root / "data"
    (data / "img").mkdir(parents=True)
    rows = ["path,patient_id,split,sex,centre,border"]
    for i in range(n):
        np.save(data / "img" / f"{i:03d}.npy", images[i])
        cells = [str(v) for v in truth[i]]
        if i < unknown:
            cells[1] = ""  # unknown
        sex = "F" if (i // 2) % 2 else "M"
        rows.append(f"img/{i:03d}.npy,pat{i // 2},{'test' if i % 2 else 'train'},{sex},{','.join(cells)}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "task_models.py").write_text(MODELS)
    weight, bias = _weights()
    spec = {
        "model": {
            "task": "multilabel",
            "factory": "task_models:build",
            "factory_kwargs": {"weight": weight, "bias": bias},
            "classes": ["centre", "border"],
            "output_names": ["centre", "border", "extra"],
            "input": {"channels": 1, "height": SIZE, "width": SIZE},
        },
        "data": {
            "root": "data",
            "manifest": "data/manifest.csv",
            "splits": {"eval": "test", "train": "train"},
            "groups": {"sex": {}},
        },
        "device": "cpu",
        "output": "out",
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def make_regression_study(root: Path, *, n: int = 60, seed: int = 1) -> Path:
    """A tiny regression study: the target is the centre's mean brightness in percent, and the
    model measures it exactly (a mean over the centre, times 100)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.1, 0.9, size=(n, SIZE, SIZE)).astype(np.float32)
    targets = images[:, 2:6, 2:6].astype(np.float64).mean(axis=(1, 2)) * 100
    data = root / "data"
    (data / "img").mkdir(parents=True)
    rows = ["path,patient_id,split,site,target"]
    for i in range(n):
        np.save(data / "img" / f"{i:03d}.npy", images[i])
        rows.append(f"img/{i:03d}.npy,pat{i},{'test' if i % 2 else 'train'},{'AB'[i % 4 // 2]},{targets[i]:.6f}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "task_models.py").write_text(MODELS)
    centre = np.zeros((SIZE, SIZE))
    centre[2:6, 2:6] = 100 / 16
    spec = {
        "model": {
            "task": "regression",
            "factory": "task_models:build",
            "factory_kwargs": {"weight": [centre.reshape(-1).tolist()], "bias": [0.0], "vector": True},
            "classes": ["brightness"],
            "units": "%",
            "input": {"channels": 1, "height": SIZE, "width": SIZE},
        },
        "data": {
            "root": "data",
            "manifest": "data/manifest.csv",
            "splits": {"eval": "test", "train": "train"},
            "groups": {"site": {}},
        },
        "device": "cpu",
        "output": "out",
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _edit(spec_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    spec = yaml.safe_load(spec_path.read_text())
    change(spec)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))


def _rewrite_manifest(spec_path: Path, change: Callable[[list[str]], list[str]]) -> None:
    manifest = spec_path.parent / "data" / "manifest.csv"
    manifest.write_text("\n".join(change(manifest.read_text().splitlines())) + "\n")


def _run(spec: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["run", str(spec), "--no-pdf", *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --------------------------------------------------------------------------- end to end
def test_multilabel_study_runs_and_every_check_measures_or_names_the_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_multilabel_study(tmp_path)
    code, output = _run(spec, capsys)
    assert code in (0, 1), output
    assert "Traceback" not in output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"]["task"] == "multilabel"
    for record in results["checks"]:
        assert record["status"] in ("ok", "skipped"), (record["id"], record.get("error"))
        if record["status"] == "skipped" and record["id"] == "parity":  # no exported artefact here
            assert "no model.reference" in record["reason"]
        elif record["status"] == "skipped":
            assert "multilabel" in record["reason"] or "multi-label" in record["reason"], record


def test_regression_study_runs_and_every_check_measures_or_names_the_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_regression_study(tmp_path)
    code, output = _run(spec, capsys)
    assert code in (0, 1), output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"]["task"] == "regression"
    for record in results["checks"]:
        assert record["status"] in ("ok", "skipped"), (record["id"], record.get("error"))
        if record["status"] == "skipped" and record["id"] == "parity":  # no exported artefact here
            assert "no model.reference" in record["reason"]
        elif record["status"] == "skipped":
            assert "regression" in record["reason"], record


# --------------------------------------------------------------------------- bad input, exit 2
def _drop_column(lines: list[str]) -> list[str]:
    return [",".join(line.split(",")[:-1]) for line in lines]


def _cell(row: int, value: str) -> Callable[[list[str]], list[str]]:
    def change(lines: list[str]) -> list[str]:
        cells = lines[row + 1].split(",")
        cells[-1] = value
        lines[row + 1] = ",".join(cells)
        return lines

    return change


MULTILABEL_MISTAKES: dict[str, tuple[str, Any, list[str]]] = {
    "label column missing": ("manifest", _drop_column, ["manifest.csv: missing column(s) ['border']"]),
    "label value 2": ("manifest", _cell(4, "2"), ["row 4 (line 6): column 'border' value '2': expected 1, 0 or empty"]),
    "CheXpert's -1": ("manifest", _cell(5, "-1"), ["value '-1'", "CheXpert's 'uncertain'"]),
    "label the model does not output": (
        "spec",
        lambda s: s["model"].update(classes=["centre", "border", "effusion"]),
        ["model.output_names", "['effusion'] missing"],
    ),
    "threshold outside (0, 1)": (
        "spec",
        lambda s: s["model"].update(operating_point={"border": 0.0}),
        ["model.operating_point", "operating_point['border'] must be a probability in (0, 1), got 0.0"],
    ),
    "claim of an unknown metric": (
        "spec",
        lambda s: s["model"].update(claims={"performance.accuracy": 0.9}),
        ["model.claims: names 'performance.accuracy'", "for a multi-label model"],
    ),
    "per-label claim as one number": (
        "spec",
        lambda s: s["model"].update(claims={"performance.auroc": 0.9}),
        ["claims['performance.auroc'] is per label: write {label: value}"],
    ),
    "output count does not match output_names": (
        "spec",
        lambda s: s["model"].update(output_names=["centre", "border"]),
        ["the model returns 3 logits per image but model.output_names lists 2"],
    ),
    "a 'label' column instead of one per label": (
        "manifest",
        lambda lines: [lines[0].replace("centre,border", "label,border"), *lines[1:]],
        ["missing column(s) ['centre']", "one column per label in model.classes"],
    ),
}


@pytest.mark.parametrize("mistake", list(MULTILABEL_MISTAKES))
def test_multilabel_mistakes_are_exit_2_naming_the_field(
    mistake: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_multilabel_study(tmp_path, n=12)
    where, change, expected = MULTILABEL_MISTAKES[mistake]
    if where == "spec":
        _edit(spec, change)
    else:
        _rewrite_manifest(spec, change)
    code, output = _run(spec, capsys)
    assert code == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text in output, output


REGRESSION_MISTAKES: dict[str, tuple[str, Any, list[str]]] = {
    "non-numeric target": (
        "manifest",
        _cell(3, "n/a"),
        ["row 3 (line 5): column 'target' value 'n/a': expected a finite number"],
    ),
    "empty target": ("manifest", _cell(2, ""), ["column 'target' value '': expected a finite number"]),
    "operating point on a regressor": (
        "spec",
        lambda s: s["model"].update(operating_point={"brightness": 0.5}),
        ["model.operating_point: applies to classifiers"],
    ),
    "units for an unknown output": (
        "spec",
        lambda s: s["model"].update(units={"age": "months"}),
        ["units names ['age']"],
    ),
    "negative MAE claim": (
        "spec",
        lambda s: s["model"].update(claims={"performance.mae": -1.0}),
        ["claims['performance.mae'] is an error in the output's units and cannot be negative"],
    ),
    "two outputs for one name": (
        "spec",
        lambda s: s["model"]["factory_kwargs"].update(weight=[[0.0] * SIZE * SIZE] * 2, bias=[0.0, 0.0], vector=False),
        ["the model returns 2 values per image but model.classes lists 1"],
    ),
}


@pytest.mark.parametrize("mistake", list(REGRESSION_MISTAKES))
def test_regression_mistakes_are_exit_2_naming_the_field(
    mistake: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_regression_study(tmp_path, n=12)
    where, change, expected = REGRESSION_MISTAKES[mistake]
    if where == "spec":
        _edit(spec, change)
    else:
        _rewrite_manifest(spec, change)
    code, output = _run(spec, capsys)
    assert code == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text in output, output


# --------------------------------------------------------------------------- units
def test_manifest_reads_multilabel_cells_and_counts_unknown(tmp_path: Path) -> None:
    spec = make_multilabel_study(tmp_path, n=10, unknown=3)
    manifest = read_manifest(
        tmp_path / "data" / "manifest.csv", root=tmp_path / "data", classes=["centre", "border"], task="multilabel"
    )
    labels = split_labels(manifest.rows, "multilabel", 2)
    assert labels.shape == (10, 2) and labels.dtype == np.int64
    assert (labels[:3, 1] == -1).all() and set(np.unique(labels[3:])) <= {0, 1}
    assert spec.exists()


def test_regression_reads_a_column_per_output(tmp_path: Path) -> None:
    (tmp_path / "a.npy").write_bytes(b"")
    (tmp_path / "m.csv").write_text("path,age,height\na.npy,12.5,140\n")
    manifest = read_manifest(tmp_path / "m.csv", root=tmp_path, classes=["age", "height"], task="regression")
    assert split_labels(manifest.rows, "regression", 2).tolist() == [[12.5, 140.0]]
    with pytest.raises(InputError, match=r"missing column\(s\) \['height'\]"):
        (tmp_path / "n.csv").write_text("path,age\na.npy,12.5\n")
        read_manifest(tmp_path / "n.csv", root=tmp_path, classes=["age", "height"], task="regression")


def test_output_names_mask_the_outputs_that_are_not_audited() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    adapter = ModelAdapter.from_module(
        module, classes=["c", "a"], output_names=["a", "b", "c"], task="multilabel", device="cpu"
    )
    x = torch.rand(5, 1, 2, 2)
    with torch.no_grad():
        full = module(x)
    assert torch.allclose(adapter.module(x), full[:, [2, 0]])


def test_spec_per_task_validation(tmp_path: Path) -> None:
    base = {
        "model": {
            "task": "multilabel",
            "factory": "m:f",
            "classes": ["a"],
            "input": {"channels": 1, "height": 8, "width": 8},
            "operating_point": {"a": 0.3},
            "claims": {"performance.macro_auroc": 0.8, "performance.auroc": {"a": 0.85}},
        },
        "data": {"root": ".", "manifest": "m.csv"},
    }
    spec = parse_spec(base, base_dir=tmp_path)
    assert spec.model.positive_index is None and spec.model.operating_point == {"a": 0.3}
    classifier = json.loads(json.dumps(base))
    classifier["model"].update(task="classification", operating_point=None, claims=None)
    with pytest.raises(ConfigError, match="a classifier needs at least two classes"):
        parse_spec(classifier, base_dir=tmp_path)
    regression = json.loads(json.dumps(base))
    regression["model"].update(
        task="regression", classes=["age", "ef"], operating_point=None, claims={"performance.mae": 3.0}
    )
    with pytest.raises(ConfigError, match=r"the model has 2 outputs; write \{output: value\}"):
        parse_spec(regression, base_dir=tmp_path)
    regression["model"]["claims"] = {"performance.mae": {"age": 3.0}, "performance.r2": {"ef": 0.7}}
    regression["model"]["units"] = {"age": "months", "ef": "%"}
    parsed = parse_spec(regression, base_dir=tmp_path).model
    assert parsed.unit_of("age") == "months" and parsed.unit_of("ef") == "%"


class _ClassifierOnly(Check[Any]):
    """A classification-only check, as every third-party check is by default."""

    id = "classifier_only"
    family = "test"
    needs = Needs(predictions=True)

    def run(self, ctx: Any, params: Any) -> CheckResult:
        return CheckResult(metrics=[Metric("x.y", 1.0, "higher_is_better")])


def test_a_check_that_does_not_list_the_task_is_skipped_naming_it() -> None:
    from auditkit.runner import SelectedCheck, execute_check

    ctx = make_context([[1, 0], [0, 1]], probs=[[0.9, 0.2], [0.1, 0.7]], task="multilabel")
    engine = ctx._engine  # the engine behind the view
    record = execute_check(SelectedCheck(id="classifier_only", cls=_ClassifierOnly, params=None, raw_params={}), engine)
    assert record["status"] == "skipped"
    assert "task: multilabel" in record["reason"] and "classifier_only" in record["reason"]


def test_predictions_follow_the_task() -> None:
    ctx = make_context(
        [[1, -1], [0, 1]], probs=[[0.9, 0.2], [0.1, 0.7]], task="multilabel", needs=Needs(predictions=True)
    )
    predictions = ctx.predictions()
    assert predictions.task == "multilabel"
    assert np.allclose(predictions.probs, [[0.9, 0.2], [0.1, 0.7]])
    regression = make_context(
        [3.0, 4.5], probs=[2.5, 5.0], task="regression", units={"output0": "cm"}, needs=Needs(predictions=True)
    )
    assert regression.predictions().probs.tolist() == [[2.5], [5.0]]
    assert regression.predictions().labels.tolist() == [[3.0], [4.5]]
    assert regression.units == {"output0": "cm"}


def test_precision_parity_per_task() -> None:
    reference = torch.tensor([[2.0, -1.0], [-3.0, 0.5]])
    flipped = torch.tensor([[2.0, 1.0], [-3.0, 0.5]])
    assert precision_parity(reference, flipped, "multilabel")["top1_agreement"] == 0.5
    values = torch.tensor([[10.0], [20.0], [30.0]])
    moved = values + torch.tensor([[0.0], [0.0], [4.0]])
    parity = precision_parity(values, moved, "regression")
    assert parity["top1_agreement"] == pytest.approx(2 / 3)
    assert parity["max_prob_diff"] == pytest.approx(4.0 / values.std(unbiased=False).item())
