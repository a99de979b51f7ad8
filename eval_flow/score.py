"""The per-line node: one answer's scores against its reference (scores.py), plus the judge's (judge.py)."""

from typing import Any, Dict, List, Optional

from promptflow.core import tool

from judge import judge_scores, judge_settings
from scores import reference_of, score_text, words


@tool
def score(answer: str, ground_truth: str = "", messages: Optional[List[Dict[str, Any]]] = None,
          question: str = "") -> Dict[str, Any]:
    reference = reference_of(ground_truth, messages)
    result: Dict[str, Any] = {**score_text(answer, reference), "answer_words": float(len(words(answer or "")))}
    judge = judge_settings()
    if judge is not None:
        result.update(judge_scores(judge, question, answer, reference))
    return result
