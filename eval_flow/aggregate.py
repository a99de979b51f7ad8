"""The aggregation node: the mean of every score over the run's lines, logged as the run's metrics
(`pf run show-metrics`), and a note naming the scores it skipped."""

from typing import Any, Dict, List

from promptflow.core import log_metric, tool

from judge import JUDGE_METRICS, skipped_note


@tool
def aggregate(scores: List[Dict[str, Any]]) -> Dict[str, Any]:
    lines = [s for s in scores if isinstance(s, dict)]  # a failed line has no scores
    names = sorted({k for s in lines for k, v in s.items() if isinstance(v, (int, float))})
    means: Dict[str, Any] = {}
    for name in names:
        values = [float(s[name]) for s in lines if isinstance(s.get(name), (int, float))]
        means[name] = round(sum(values) / len(values), 4)
        log_metric(key=name, value=means[name])
    log_metric(key="lines", value=len(lines))
    skipped = [m for m in JUDGE_METRICS if m not in means]
    if skipped:
        note = skipped_note()
        print(note, flush=True)  # in the run's logs (pf run show-details / the run's folder)
        means["skipped"] = note
    return means
