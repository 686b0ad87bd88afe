"""Check discovery through the entry-point group ``auditkit.checks``.

Built-in checks register exactly like third-party ones. Loading is lazy: listing the checks
imports each module once, and a broken plugin is reported by name instead of ending the run.
"""

from __future__ import annotations

import logging
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
