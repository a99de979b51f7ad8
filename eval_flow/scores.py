"""Text scores of one answer against its reference: the definitions fine_tune.py logs.

Same as finetuning_dir/evaluation.py's score_text (a test checks both give the same numbers; this
flow folder runs alone on an Azure Prompt flow runtime, so it cannot import that one):
  f1           ROUGE-1 F-measure from rouge-score: SQuAD's token F1 over lower-cased alphanumeric words
  rougeL       ROUGE-L F-measure (longest common word subsequence)
  exact_match  the answer's words equal the reference's
  contains     the reference's words appear, in order and contiguous, inside the answer's
  answer_words the answer's length in those words
The training run also has the stop rate and token lengths: they need the generated token ids, which
a flow's text answer no longer carries.
"""

import logging
from functools import lru_cache
from typing import Any, Dict, List, Optional

TEXT_METRICS = ("f1", "rougeL", "exact_match", "contains")


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # "Using default tokenizer." on every scorer
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def words(text: str) -> List[str]:
    from rouge_score import tokenize

    return tokenize.tokenize(text, None)


def reference_of(ground_truth: str, messages: Optional[List[Dict[str, Any]]]) -> str:
    """ground_truth when given, else the first assistant turn of an ultrachat-style `messages` list."""
    if ground_truth and ground_truth.strip():
        return ground_truth
    for message in messages or []:
        if isinstance(message, dict) and message.get("role") == "assistant":
            return str(message.get("content") or "")
    raise ValueError("no reference: map ground_truth (a string) or messages (a chat with an assistant turn)")


def score_text(answer: str, reference: str) -> Dict[str, float]:
    scores = _scorer().score(reference, answer or "")
    got, want = " ".join(words(answer or "")), " ".join(words(reference))
    return {
        "f1": scores["rouge1"].fmeasure,
        "rougeL": scores["rougeL"].fmeasure,
        "exact_match": float(got == want),
        "contains": float(bool(want) and f" {want} " in f" {got} "),
    }
