"""The check contract (DESIGN section 4): what a check declares, what it returns.

A check measures; it never decides pass or fail (policies judge) and never renders HTML.
Third-party checks subclass :class:`Check` and register under the entry-point group
``auditkit.checks`` exactly as the built-ins do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from auditkit.context import AuditContext

Direction = Literal["higher_is_better", "lower_is_better"]
Status = Literal["ok", "skipped", "error"]


class CheckParams(BaseModel):
    """Base for a check's ``Params``: unknown keys are errors; instances are frozen."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


@dataclass(frozen=True)
class Needs:
    """What a check asks of the shared context, so the runner can plan one pass before any check.

    Attributes:
        predictions: logits and probabilities of the splits the check reads.
        features: embeddings (the input of the last ``nn.Linear`` unless ``feature_layer`` says
            otherwise).
        gradients: the check backpropagates through the model itself (attacks, trigger search).
        train: the check needs the train split; without one it is skipped with that reason.
        train_optional: the check reads the train split when the spec has one (its pass is then
            shared) and works without it; never skipped for its absence.
        ood: the check reads the spec's out-of-distribution sets.
        headers: the check reads DICOM headers (header-only reads, no pixels).
        images: the check reads decoded images.
    """

    predictions: bool = False
    features: bool = False
    gradients: bool = False
    train: bool = False
    train_optional: bool = False
    ood: bool = False
    headers: bool = False
    images: bool = False


@dataclass
class Metric:
    """One measurement: ``{name, labels, value, ci, n, direction}``, + ``reason`` if undefined."""

    name: str
    value: float | None
    direction: Direction
    labels: dict[str, str] = field(default_factory=dict)
    ci: tuple[float, float] | None = None
    n: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        self.labels = {str(k): str(v) for k, v in self.labels.items()}
        if self.value is not None:
            value = float(self.value)
            if not math.isfinite(value):
                self.reason = self.reason or f"not finite ({value})"
                self.value = None
            else:
                self.value = value
        if self.value is None and self.reason is None:
            raise ValueError(f"metric {self.name} {self.labels} is undefined but gives no reason")
        if self.ci is not None:
            lo, hi = (float(self.ci[0]), float(self.ci[1]))
            self.ci = (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "labels": dict(self.labels),
            "value": self.value,
            "ci": list(self.ci) if self.ci is not None else None,
            "n": self.n,
            "direction": self.direction,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metric:
        ci = data.get("ci")
        return cls(
            name=data["name"],
            value=data.get("value"),
            direction=data["direction"],
            labels=dict(data.get("labels") or {}),
            ci=(ci[0], ci[1]) if ci else None,
            n=data.get("n"),
            reason=data.get("reason"),
        )


@dataclass
class Artifact:
    """A file a check wrote under the bundle's ``artifacts/`` folder (path relative to it)."""

    name: str
    path: str
    media_type: str
    description: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "path": self.path,
            "media_type": self.media_type,
            "description": self.description,
        }


@dataclass
class CheckResult:
    """What ``Check.run`` returns: measurements, plain-record findings and artifacts."""

    metrics: list[Metric] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)


class Skip(Exception):
    """Raised inside ``run`` when the check cannot apply: recorded as ``skipped``, with reason."""


def require_finite_logits(logits: Any, what: str = "eval image") -> Any:
    """Which rows of ``(N, K)`` logits are finite; :class:`Skip` when none of ``N >= 1`` is.

    A model that outputs only NaN or infinite logits leaves nothing to measure: an argmax over
    NaN would pick class 0 and score it as a lucky guess.

    Returns:
        Boolean NumPy array ``(N,)``.
    """
    import numpy as np

    finite = np.isfinite(np.asarray(logits, dtype=np.float64)).all(axis=1)
    if finite.size and not finite.any():
        raise Skip(f"the logits of every {what} are non-finite")
    return finite


class Check:
    """Base class of every check.

    Subclasses set ``id``, ``family``, ``Params``, ``needs`` and ``emits`` and implement ``run``.
    The class docstring names the method and its paper, the inputs it needs, the metrics it emits
    and the NIST AI RMF subcategories it informs; ``auditkit checks`` shows its first line.
    ``emits`` lists every metric name ``run`` can produce, so policies can be checked against the
    installed checks without running them.
    """

    id: ClassVar[str]
    family: ClassVar[str]
    Params: ClassVar[type[CheckParams]] = CheckParams
    needs: ClassVar[Needs] = Needs()
    emits: ClassVar[tuple[str, ...]] = ()

    def run(self, ctx: AuditContext, params: Any) -> CheckResult:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
