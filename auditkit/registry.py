"""Check discovery through the entry-point group ``auditkit.checks``.

Built-in checks register exactly like third-party ones. Loading is lazy: listing the checks
imports each module once, and a broken plugin is reported by name instead of ending the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from auditkit.check import Check

log = logging.getLogger(__name__)

GROUP = "auditkit.checks"


@dataclass(frozen=True)
class BrokenCheck:
    """An entry point that failed to load, with the reason."""

    id: str
    target: str
    reason: str


def discover() -> tuple[dict[str, type[Check[Any]]], list[BrokenCheck]]:
    """All installed checks by id, and the entry points that could not be loaded."""
    checks: dict[str, type[Check[Any]]] = {}
    broken: list[BrokenCheck] = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            loaded = ep.load()
        except Exception as error:  # a broken plugin must not take the others down
            broken.append(BrokenCheck(ep.name, ep.value, f"{type(error).__name__}: {error}"))
            continue
        if not (isinstance(loaded, type) and issubclass(loaded, Check)):
            broken.append(BrokenCheck(ep.name, ep.value, "not a subclass of auditkit.check.Check"))
            continue
        if getattr(loaded, "id", None) != ep.name:
            broken.append(
                BrokenCheck(
                    ep.name,
                    ep.value,
                    f"entry point name differs from the class id {getattr(loaded, 'id', None)!r}",
                )
            )
            continue
        if ep.name in checks:
            log.warning("check %s registered twice; keeping %s", ep.name, checks[ep.name].__module__)
            continue
        checks[ep.name] = loaded
    for item in broken:
        log.warning("check %s (%s) could not be loaded: %s", item.id, item.target, item.reason)
    return checks, broken


def source_docstring(target: str) -> str | None:
    """The docstring of the class ``"package.module:Class"``, read from the module's source file
    without executing it (its parent packages are imported); ``None`` when the source cannot be
    read this way (a compiled module, a class made at run time)."""
    import ast
    import importlib.util

    module, _, qualname = target.partition(":")
    try:
        spec = importlib.util.find_spec(module.strip())
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".py"):
            return None
        with open(origin, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=origin)
    except (ImportError, ValueError, OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == qualname.strip():
            return ast.get_docstring(node, clean=False)
    return None


def docstrings(ids: Sequence[str]) -> dict[str, str]:
    """The class docstrings of the installed checks ``ids`` (:func:`source_docstring`).

    The report needs only a check's documentation, and importing a check imports its libraries
    (torch, attacks, fairlearn: seconds), so the docstrings are read from the source. A check
    left out here is one :func:`discover` must load.
    """
    found: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in ids and ep.name not in found and (doc := source_docstring(ep.value)) is not None:
            found[ep.name] = doc
    return found
