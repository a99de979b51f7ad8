"""Before/after evaluation of a fine-tune: greedy answers to held-out questions, scored against the references.

fine_tune.py answers the first questions of --eval-file twice, with the model before training and
after, and logs each score as `<metric>_before` / `<metric>_after` on the training run, the answers
as a table (MLflow UI: the run's Artifacts → eval/answers.json, or Evaluation → Traces/Tables), and
one summary line. deploy_model.py's gate compares those numbers.

The text scores come from `rouge-score` (Google's reference ROUGE, also behind Hugging Face
`evaluate` and azure-ai-evaluation's vendored RougeScoreEvaluator) rather than hand-written scorers:
  * f1            ROUGE-1 F-measure: SQuAD's token F1 (multiset word overlap) over rouge-score's
                  tokens (lower-cased alphanumeric words), without SQuAD's a/an/the removal
  * rougeL        ROUGE-L F-measure (longest common word subsequence)
  * exact_match   the answer's tokens equal the reference's
  * contains      the reference's tokens appear, in order and contiguous, inside the answer's
  * stop_rate     share of answers that ended with an end-of-turn token before the token limit
                  (a Phi-3 fine-tune that never emits <|end|> talks until it is cut off)
  * answer_tokens mean generated tokens per answer, the stop token excluded
eval_flow/scores.py scores a Prompt flow batch run with the same definitions (a test checks that
both give the same numbers); this folder is the Azure job's code, so it imports nothing from the repo.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("fine_tune.evaluation")

TEXT_METRICS = ("f1", "rougeL", "exact_match", "contains")
TABLE_FILE = "eval/answers.json"
SUMMARY_TAG = "eval_summary"
SCORES_TAG = "eval_scores"


@dataclass(frozen=True)
class Example:
    question: str  # the last user message, for the table
    prompt: list[dict[str, str]]  # every message before the first assistant turn
    reference: str  # that assistant turn


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # an end-of-turn token came before the token limit
    tokens: int  # generated, without the stop token


def held_out_examples(rows: Sequence[list[dict[str, str]]], limit: int) -> list[Example]:
    """The first `limit` rows as (prompt, reference): the conversation up to its first assistant turn."""
    examples = []
    for messages in rows[:limit]:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")  # read_chat_rows checked one exists
        prompt = messages[:first]
        if not any(m["role"] == "user" for m in prompt):
            continue  # an assistant turn that opens the conversation answers no question
        question = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
        examples.append(Example(question, prompt, messages[first]["content"]))
    return examples


def fitting(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[Example]:
    """The examples whose prompt fits in `max_tokens` (the --max-seq-length the model was trained on):
    a longer one would be answered from a truncated question, or overflow a 4k context."""
    kept = [e for e in examples if len(_prompt_ids(tokenizer, e)) <= max_tokens]
    if len(kept) < len(examples):
        log.info("evaluation: left out %d question(s) longer than %d tokens", len(examples) - len(kept), max_tokens)
    return kept


def _prompt_text(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    return tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    return tokenizer(_prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]


# --- scores -------------------------------------------------------------------------------------


def _scorer() -> Any:
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # "Using default tokenizer." on every scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def _tokens(text: str) -> list[str]:
    from rouge_score import tokenize

    return tokenize.tokenize(text, None)


def score_text(answer: str, reference: str, scorer: Any = None) -> dict[str, float]:
    """f1, rougeL, exact_match and contains of one answer (each in [0, 1])."""
    scores = (scorer or _scorer()).score(reference, answer)  # score(target, prediction)
    got, want = " ".join(_tokens(answer)), " ".join(_tokens(reference))
    return {
        "f1": scores["rouge1"].fmeasure,
        "rougeL": scores["rougeL"].fmeasure,
        "exact_match": float(got == want),
        "contains": float(bool(want) and f" {want} " in f" {got} "),
    }


def summarize(answers: Sequence[Answer], references: Sequence[str]) -> dict[str, float]:
    """The mean of every metric over the answers."""
    if not answers:
        return {}
    scorer = _scorer()
    per_answer = [score_text(a.text, r, scorer) for a, r in zip(answers, references, strict=True)]
    n = len(answers)
    means = {name: sum(s[name] for s in per_answer) / n for name in TEXT_METRICS}
    means["stop_rate"] = sum(a.stopped for a in answers) / n
    means["answer_tokens"] = sum(a.tokens for a in answers) / n
    return means


def summary_line(before: dict[str, float], after: dict[str, float]) -> str:
    """`F1 0.05 -> 0.81, ROUGE-L 0.04 -> 0.80, contains 0% -> 62%, stop rate 0% -> 100%, 64.0 -> 11.2 tokens`."""
    def pct(v: float) -> str:
        return f"{v:.0%}"

    parts = [
        f"F1 {before['f1']:.2f} -> {after['f1']:.2f}",
        f"ROUGE-L {before['rougeL']:.2f} -> {after['rougeL']:.2f}",
        f"exact {pct(before['exact_match'])} -> {pct(after['exact_match'])}",
        f"contains {pct(before['contains'])} -> {pct(after['contains'])}",
        f"stop rate {pct(before['stop_rate'])} -> {pct(after['stop_rate'])}",
        f"answer length {before['answer_tokens']:.1f} -> {after['answer_tokens']:.1f} tokens",
    ]
    return ", ".join(parts)


# --- answers ------------------------------------------------------------------------------------


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[Answer]:
    """Greedy answers, batched (left padding, longest prompts together), in the order of `examples`."""
    import torch

    from chat_format import generation_stop_ids

    # What the served model stops at too (finetune_phi/endpoint/engine.py), so the stop rate means the same.
    stops = set(generation_stop_ids(tokenizer, model.generation_config.eos_token_id))
    prompts = [_prompt_text(tokenizer, e) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, Answer] = {}
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # a decoder continues from the end of each row
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                    eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            for row, i in enumerate(batch):
                new = out[row, enc["input_ids"].shape[1] :].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), None)
                kept = new if cut is None else new[:cut]
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                answers[i] = Answer(text=text, stopped=cut is not None, tokens=len(kept))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [answers[i] for i in range(len(examples))]


# --- MLflow -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    before: dict[str, float]
    after: dict[str, float]
    rows: int
    seconds: float
    line: str


def log_evaluation(
    examples: Sequence[Example], before: Sequence[Answer], after: Sequence[Answer], seconds: float, step: int
) -> Evaluation:
    """Log the metrics, the answers table and the summary line on the active MLflow run."""
    import mlflow

    references = [e.reference for e in examples]
    scores_before, scores_after = summarize(before, references), summarize(after, references)
    metrics = {f"{k}_before": v for k, v in scores_before.items()} | {f"{k}_after": v for k, v in scores_after.items()}
    metrics["eval_rows"] = float(len(examples))
    mlflow.log_metrics(metrics, step=step)
    line = summary_line(scores_before, scores_after)
    # Also as tags: on Azure a job's run tags are the job's tags, which deploy_model.py's gate reads
    # through the azure-ai-ml SDK (finetune_phi/gate.py SCORES_TAG).
    mlflow.set_tags({SUMMARY_TAG: line, SCORES_TAG: json.dumps({k: round(v, 4) for k, v in metrics.items()})})
    scorer = _scorer()
    mlflow.log_table(
        data={
            "question": [e.question for e in examples],
            "reference": references,
            "before": [a.text for a in before],
            "after": [a.text for a in after],
            "f1_before": [score_text(a.text, r, scorer)["f1"] for a, r in zip(before, references)],
            "f1_after": [score_text(a.text, r, scorer)["f1"] for a, r in zip(after, references)],
            "stopped_before": [a.stopped for a in before],
            "stopped_after": [a.stopped for a in after],
        },
        artifact_file=TABLE_FILE,
    )
    return Evaluation(scores_before, scores_after, len(examples), seconds, line)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start
