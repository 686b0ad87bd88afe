"""An example auditkit check shipped as its own package (see ../pyproject.toml)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from auditkit.check import Check, CheckContext, CheckParams, CheckResult, Metric, Needs
from auditkit.stats import bootstrap_ci


def mean_entropy(probs: np.ndarray) -> float:
    """Mean Shannon entropy (nats) of the predicted class distributions."""
    clipped = np.clip(probs, 1e-12, 1.0)
    return float(-(clipped * np.log(clipped)).sum(axis=1).mean())


class PredictionEntropyParams(CheckParams):
    n_boot: int = Field(default=200, ge=0)


class PredictionEntropyCheck(Check[PredictionEntropyParams]):
    """Predictive entropy: how undecided the model is, overall and per subgroup.

    Method: mean Shannon entropy of the softmax distribution (Shannon 1948) with a percentile
    bootstrap interval. High entropy on a group flags inputs the model finds ambiguous.

    Inputs: eval-split probabilities; the spec's subgroup columns.

    Metrics: ``prediction_entropy.mean`` overall and ``{group_by, group}``.

    NIST AI RMF 1.0: MEASURE 2.5.
    """

    id: ClassVar[str] = "prediction_entropy"
    family: ClassVar[str] = "uncertainty"
    needs: ClassVar[Needs] = Needs(predictions=True)
    emits: ClassVar[tuple[str, ...]] = ("prediction_entropy.mean",)

    Params = PredictionEntropyParams

    def run(self, ctx: CheckContext, params: PredictionEntropyParams) -> CheckResult:
        preds = ctx.predictions("eval")
        rng = ctx.rng()
        scopes = [({}, np.ones(preds.n, dtype=bool))]
        for column, values in ctx.group_labels("eval").items():
            scopes += [({"group_by": column, "group": str(g)}, values == g) for g in sorted(set(values))]
        metrics = []
        for labels, mask in scopes:
            probs = preds.probs[mask]
            if len(probs) == 0:
                continue
            ci = bootstrap_ci(mean_entropy, probs, n_boot=params.n_boot, rng=rng) if params.n_boot else None
            metrics.append(
                Metric(
                    name="prediction_entropy.mean",
                    value=mean_entropy(probs),
                    direction="lower_is_better",
                    labels=labels,
                    ci=ci,
                    n=len(probs),
                )
            )
        return CheckResult(metrics=metrics)
