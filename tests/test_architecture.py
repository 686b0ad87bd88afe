"""The engine's boundaries: what a check may read, and the architecture page held to the registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from auditkit.check import Check, CheckContext, CheckParams, CheckResult, Metric, Needs
from auditkit.errors import UndeclaredRead
from auditkit.registry import discover
from auditkit.testing import CheckConformanceError, check_check, make_context

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "checks"
HANDLE = {
    "predict",
    "predict_with_features",
    "differentiable",
    "has_gradients",
    "forward_module",
    "batch_size",
    "has_features",
    "device",
}


def _sources() -> list[Path]:
    return sorted(p for p in CHECKS.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(CHECKS)))
def test_a_built_in_check_reads_only_its_context(path: Path) -> None:
    """No ``ctx.spec``/``ctx.dataset``, no model internals, no other check, no private engine name."""
    family = path.relative_to(CHECKS).parts[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems: list[str] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "ctx"
            and (node.attr in ("spec", "dataset", "out_dir") or node.attr.startswith("_"))
        ):
            problems.append(f"line {node.lineno}: ctx.{node.attr}")
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "model"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id in ("ctx", "self")
            and node.attr not in HANDLE
        ):
            problems.append(f"line {node.lineno}: ctx.model.{node.attr} is not part of the model handle")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("auditkit"):
            module = node.module
            if module.startswith("auditkit.checks.") and not module.startswith(f"auditkit.checks.{family}"):
                problems.append(f"line {node.lineno}: imports another check ({module})")
            if not module.startswith("auditkit.checks."):
                if any(part.startswith("_") for part in module.split(".")):
                    problems.append(f"line {node.lineno}: imports the private module {module}")
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    problems.append(f"line {node.lineno}: imports private engine names {private} from {module}")
            engine = {a.name for a in node.names} & {"AuditContext", "CheckView"}
            if module == "auditkit.context" and engine:
                problems.append(
                    f"line {node.lineno}: imports {sorted(engine)} (a check sees auditkit.check.CheckContext)"
                )
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def _documented_checks() -> dict[str, tuple[str, set[str], set[str], set[int], set[str]]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("### Built-in checks", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            needs = {n.strip() for n in cells[2].split(",") if n.strip()}
            tasks = {t.strip() for t in cells[3].split(",") if t.strip()}
            dims = {int(d.strip().removesuffix("-D")) for d in cells[4].split(",") if d.strip()}
            metrics = set(re.findall(r"`([a-z0-9_.]+)`", cells[5]))
            rows[cells[0].strip("`")] = (cells[1], needs, tasks, dims, metrics)
    return rows


def test_the_architecture_page_lists_every_check_with_its_needs_and_metrics() -> None:
    installed, broken = discover()
    assert not broken
    documented = _documented_checks()
    assert set(documented) == set(installed)
    for check_id, cls in installed.items():
        family, needs, tasks, dims, metrics = documented[check_id]
        declared = {flag for flag, value in vars(cls.needs).items() if value}
        assert family == cls.family, check_id
        assert tasks == set(cls.tasks), f"{check_id}: page says tasks {sorted(tasks)}, the check {cls.tasks}"
        assert dims == set(cls.spatial_dims), (
            f"{check_id}: page says inputs {sorted(dims)}, the check {cls.spatial_dims}"
        )
        assert needs == declared, f"{check_id}: page says {sorted(needs)}, needs declares {sorted(declared)}"
        assert metrics == set(cls.emits), f"{check_id}: page and emits differ"


def test_no_code_or_readme_cites_a_document_outside_the_repository() -> None:
    cited = []
    for path in [ROOT / "README.md", *sorted((ROOT / "auditkit").rglob("*.py")), *_sources()]:
        text = path.read_text(encoding="utf-8")
        if re.search(r"DESIGN(\.md)? section|\.\./shared/", text):
            cited.append(str(path.relative_to(ROOT)))
    assert not cited


# --------------------------------------------------------------------------------------------
# Needs are enforced


class _ReadsFeaturesParams(CheckParams):
    pass


class ReadsFeaturesUndeclared(Check[_ReadsFeaturesParams]):
    """Mean embedding norm, read without declaring features (a deliberately broken check).

    Metrics: ``reads_features.norm``.
    """

    id: ClassVar[str] = "reads_features"
    family: ClassVar[str] = "test"
    Params = _ReadsFeaturesParams
    needs: ClassVar[Needs] = Needs(predictions=True)
    emits: ClassVar[tuple[str, ...]] = ("reads_features.norm",)

    def run(self, ctx: CheckContext, params: _ReadsFeaturesParams) -> CheckResult:
        try:
            norm = float(np.linalg.norm(ctx.features("eval").numpy(), axis=1).mean())
        except Exception:  # a check that swallows the refusal is still caught by the kit
            norm = 0.0
        return CheckResult(metrics=[Metric("reads_features.norm", norm, "lower_is_better")])


def test_the_context_refuses_an_undeclared_read() -> None:
    ctx = make_context([0, 1], probs=[[0.8, 0.2], [0.3, 0.7]], features=np.eye(2), needs=Needs(predictions=True))
    assert ctx.predictions("eval").n == 2
    with pytest.raises(UndeclaredRead, match=r"read features\('eval'\) without declaring it.*features=True"):
        ctx.features("eval")
    with pytest.raises(UndeclaredRead, match=r"headers=True"):
        ctx.header_texts("eval", ["Modality"])
    with pytest.raises(UndeclaredRead, match=r"read map_headers\('eval'\) without declaring it.*headers=True"):
        ctx.map_headers("eval", str)
    with pytest.raises(UndeclaredRead, match=r"read map_series_headers\('eval'\) without declaring it"):
        ctx.map_series_headers("eval", str)
    with pytest.raises(UndeclaredRead, match=r"gradients=True"):
        ctx.model.differentiable()
    with pytest.raises(UndeclaredRead, match=r"train=True or train_optional=True"):
        ctx.labels("train")


def test_the_conformance_kit_fails_a_check_that_reads_more_than_it_declares(tmp_path: Path) -> None:
    with pytest.raises(CheckConformanceError, match=r"undeclared read: check 'reads_features' read features\('eval'\)"):
        check_check(ReadsFeaturesUndeclared, workdir=tmp_path, n_patients=8)
