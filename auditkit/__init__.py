"""auditkit: audit a medical-imaging deep-learning model before it reaches patients.

The engine (spec, adapters, shared inference context, runner, CLI) lives here; the built-in
checks, policies, report templates and synthetic fixtures are the subpackages ``auditkit.checks``,
``auditkit.policies``, ``auditkit.reports`` and ``auditkit.fixtures``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
