"""The gate before serving: deploy_model.py refuses a fine-tune that answers worse than what it would replace.

fine_tune.py logs `<metric>_before` (the base model) and `<metric>_after` (the fine-tuned model) on its
run (finetuning_dir/evaluation.py). Before registering and serving a run's model, deploy_model.py
compares that run's `_after` scores with

  * the base model's, from the same run (`_before`): did the fine-tune make it worse?
  * the currently deployed model's run (`_after`), when one is recorded: would the swap make it worse?

It refuses when EVAL_PRIMARY_METRIC (f1 by default) falls by more than EVAL_GATE_MARGIN, or when the
stop rate falls at all (a model that no longer emits <|end|> talks until the token limit). `--force`
deploys anyway. The verdict (passed, forced, refused, or unchecked when a run logged no evaluation)
goes into the state file's "gate" section and onto the model version / registered model as tags.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import config

log = logging.getLogger(__name__)

STOP_RATE = "stop_rate"
TAG = "deploy_gate"  # passed / forced / refused / unchecked
DETAIL_TAG = "deploy_gate_detail"
# The run tag finetuning_dir/evaluation.py writes: the scores as JSON. On Azure a job's run tags are the
# job's tags, which the SDK reads without MLflow (metrics it cannot).
SCORES_TAG = "eval_scores"


class GateRefused(RuntimeError):
    """The model scores worse than what it would replace; the message names the metric, both values and --force."""

    def __init__(self, decision: "Decision") -> None:
        self.decision = decision
        super().__init__(decision.message)


@dataclass(frozen=True)
class Decision:
    verdict: str  # passed, forced, refused, unchecked
    candidate: str  # the run (local) or job (Azure) about to be deployed
    metric: str
    problems: list[str] = field(default_factory=list)
    compared_with: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # the candidate's <metric>_after, stop_rate_after

    @property
    def message(self) -> str:
        if self.verdict == "unchecked":
            return (f"{self.candidate} logged no before/after evaluation (trained with EVAL_MAX_ROWS=0, resumed, "
                    "or by an older version): nothing to compare, deploying it unchecked")  # fmt: skip
        if not self.problems:
            return f"{self.candidate} is no worse than {' and '.join(self.compared_with)} ({self._scores()})"
        listed = "; ".join(self.problems)
        if self.verdict == "forced":
            return f"deploying {self.candidate} although it scores worse (--force): {listed}"
        return (f"refusing to deploy {self.candidate}: {listed}. Train it longer or fix the data, or deploy it "
                "anyway with `python deploy_model.py --force`")  # fmt: skip

    def _scores(self) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in self.scores.items())

    def record(self) -> dict[str, Any]:
        """What the state file keeps."""
        return {
            "verdict": self.verdict,
            "candidate": self.candidate,
            "metric": self.metric,
            "scores": self.scores,
            "compared_with": self.compared_with,
            "problems": self.problems,
            "message": self.message,
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def tags(self) -> dict[str, str]:
        """Tags for the model version (local registry) or registered model (Azure); values stay short."""
        return {TAG: self.verdict, DETAIL_TAG: self.message[:4000]}


def _fall(name: str, new: float, old: float, margin: float) -> bool:
    if name == STOP_RATE:
        return new < old - 1e-9  # any fall: 23/24 vs 24/24 is one more answer that never stopped
    return new < old - margin - 1e-9


def decide(
    settings: config.Settings,
    candidate: str,
    metrics: Mapping[str, float],
    *,
    deployed: str | None = None,
    deployed_metrics: Mapping[str, float] | None = None,
    force: bool = False,
) -> Decision:
    """Compare `candidate`'s scores (its run's metrics) with its base model and with the deployed model's run."""
    metric, margin = settings.EVAL_PRIMARY_METRIC, settings.EVAL_GATE_MARGIN
    watched = (metric, STOP_RATE)
    after = {m: metrics.get(f"{m}_after") for m in watched}
    if any(v is None for v in after.values()):
        return Decision("unchecked", candidate, metric)
    problems: list[str] = []
    compared: list[str] = []
    references = [("the base model (same run)", {m: metrics.get(f"{m}_before") for m in watched})]
    if deployed is not None and deployed != candidate:
        if deployed_metrics is not None and all(f"{m}_after" in deployed_metrics for m in watched):
            references.append((f"the deployed model ({deployed})", {m: deployed_metrics[f"{m}_after"] for m in watched}))
        else:
            log.warning("the deployed model (%s) logged no evaluation: comparing with the base model only", deployed)
    for label, old in references:
        if any(v is None for v in old.values()):
            continue
        compared.append(label)
        for m in watched:
            if _fall(m, float(after[m]), float(old[m]), margin):
                allowed = "" if m == STOP_RATE else f" by more than EVAL_GATE_MARGIN={margin:g}"
                problems.append(f"{m} {after[m]:.2f} is below {label}'s {old[m]:.2f}{allowed}")
    verdict = "passed" if not problems else "forced" if force else "refused"
    return Decision(verdict, candidate, metric, problems, compared, {f"{m}_after": float(v) for m, v in after.items()})


def enforce(decision: Decision) -> Decision:
    """Log the decision; raise GateRefused when it refuses."""
    if decision.verdict == "refused":
        raise GateRefused(decision)
    level = logging.WARNING if decision.verdict in ("forced", "unchecked") else logging.INFO
    log.log(level, "deploy gate: %s", decision.message)
    return decision
