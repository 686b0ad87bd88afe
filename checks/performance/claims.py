"""The manufacturer's claims (``model.claims``) held against the measured 95% intervals.

A claim is supported when the data allow it at 95%: for a figure where higher is better, when it
is at most the upper end of the interval; for an error (MAE, RMSE), when it is at least the lower
end. ``performance.claim_shortfall`` is how far the claim lies beyond that end (positive: the data
do not support it; rule PERF-CLAIM), labelled ``{metric}`` plus the claim's ``label`` or
``output`` where it names one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from auditkit.check import CheckResult, Metric

__all__ = ["ClaimTarget", "judge_claims"]


@dataclass(frozen=True)
class ClaimTarget:
    """One claimed figure and the measurement it is held against.

    Attributes:
        metric: the claimed metric's name (``performance.auroc``).
        claimed: the claimed value.
        measured: the point estimate (NaN when undefined on the eval split).
        interval: its 95% interval, ``None`` when there is none (then the estimate is used).
        subject: ``{label: X}`` or ``{output: X}`` when the claim names one; ``{}`` otherwise.
        lower_is_better: the figure is an error (MAE, RMSE).
    """

    metric: str
    claimed: float
    measured: float
    interval: tuple[float, float] | None
    subject: dict[str, str] = field(default_factory=dict)
    lower_is_better: bool = False


def judge_claims(targets: Sequence[ClaimTarget], result: CheckResult) -> list[Metric]:
    """``performance.claim_shortfall`` per claim, and a ``claim`` finding per judged claim.

    Higher is better: claimed minus the interval's upper end; lower is better: the interval's
    lower end minus the claimed value. Either way positive means the claim is better than
    anything the data support. A claim on an undefined figure has no shortfall, with the reason.
    """
    metrics: list[Metric] = []
    if not targets:
        result.findings.append(
            {"kind": "claims", "count": 0, "note": "model.claims names no figure: rule PERF-CLAIM has nothing to judge"}
        )
    for target in targets:
        labels = {"metric": target.metric, **target.subject}
        if not np.isfinite(target.measured):
            of = "".join(f" for {value}" for value in target.subject.values())
            reason = f"{target.metric}{of} is undefined on this eval split, so the claim cannot be judged"
            metrics.append(Metric("performance.claim_shortfall", None, "lower_is_better", labels=labels, reason=reason))
            continue
        interval = target.interval
        if target.lower_is_better:
            lower = interval[0] if interval is not None else target.measured
            shortfall = lower - target.claimed
            end = "lower"
        else:
            upper = interval[1] if interval is not None else target.measured
            shortfall = target.claimed - upper
            end = "upper"
        metrics.append(Metric("performance.claim_shortfall", shortfall, "lower_is_better", labels=labels))
        finding: dict[str, Any] = {"kind": "claim", "metric": target.metric, **target.subject}
        finding.update(
            claimed=target.claimed,
            measured=target.measured,
            interval=list(interval) if interval is not None else None,
            supported=shortfall <= 0,
            judged_on=f"{end} end of the 95% interval" if interval is not None else "the point estimate",
        )
        result.findings.append(finding)
    return metrics
