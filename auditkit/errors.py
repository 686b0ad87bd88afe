"""Exception hierarchy.

Every auditkit error subclasses both :class:`AuditkitError` and the matching built-in, so callers
can catch either (``except ValueError`` keeps working for a bad spec value).
"""

from __future__ import annotations


class AuditkitError(Exception):
    """Base class of every error auditkit raises on purpose."""


class ConfigError(AuditkitError, ValueError):
    """The audit spec, a check's parameters or a command-line option is invalid (exit code 2)."""


class InputError(AuditkitError, ValueError):
    """A manifest, model file or data file cannot be used as given (exit code 2)."""


class ModelLoadError(InputError):
    """The model factory, its weights or the loading policy (``trust_code``) refused the model."""


class UnreadableImage(AuditkitError, ValueError):
    """One image cannot be decoded; the runner quarantines it and the audit goes on.

    The message is the quarantine reason. It must never contain header values (patient data):
    name the attribute keyword and the expectation instead.
    """


class Skip(Exception):
    """Raised inside a check's ``run`` when it cannot apply: recorded as ``skipped``, with the reason."""


class UndeclaredRead(AuditkitError, RuntimeError):
    """A check read something its ``needs`` does not declare (features, headers, images, a split,
    gradients). The engine plans one shared pass from ``needs``, so an undeclared read would cost
    a second pass or read data the audit never planned; the check errors with this message."""
