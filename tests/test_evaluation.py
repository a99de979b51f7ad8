"""finetuning_dir/evaluation.py and eval_flow/scores.py: scores of hand-made answers with known values,
the summary, the held-out examples, and greedy batched answers that stop (or not) on a tiny Phi-3."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "finetuning_dir"))  # the job's code folder imports its siblings by bare name

import evaluation  # noqa: E402
from evaluation import Answer  # noqa: E402

REFERENCE = "Microsoft was founded by Bill Gates and Paul Allen."


def _flow_scores():
    """eval_flow/scores.py, loaded by path: the flow folder is not a package (it runs alone on Azure)."""
    spec = importlib.util.spec_from_file_location("eval_flow_scores", REPO / "eval_flow" / "scores.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Hand-counted over the words microsoft was founded by bill gates and paul allen (9):
#   "Bill Gates and Paul Allen founded it" (7 words) shares 6 -> P 6/7, R 6/9, F1 0.75;
#   its longest common subsequence is "bill gates and paul allen" (5) -> P 5/7, R 5/9, ROUGE-L 0.625.
CASES = [
    (REFERENCE, {"f1": 1.0, "rougeL": 1.0, "exact_match": 1.0, "contains": 1.0}),
    ("microsoft WAS founded by Bill Gates and Paul Allen", {"f1": 1.0, "rougeL": 1.0, "exact_match": 1.0, "contains": 1.0}),
    ("Bill Gates and Paul Allen founded it", {"f1": 0.75, "rougeL": 0.625, "exact_match": 0.0, "contains": 0.0}),
    # 9 of its 12 words: P 9/12, R 1, F1 = 18/21
    ("Sure: Microsoft was founded by Bill Gates and Paul Allen. Anything else?",
     {"f1": 18 / 21, "rougeL": 18 / 21, "exact_match": 0.0, "contains": 1.0}),
    ("", {"f1": 0.0, "rougeL": 0.0, "exact_match": 0.0, "contains": 0.0}),
    ("the the the", {"f1": 0.0, "rougeL": 0.0, "exact_match": 0.0, "contains": 0.0}),
]


@pytest.mark.parametrize(("answer", "expected"), CASES)
def test_text_scores_of_hand_made_answers(answer: str, expected: dict[str, float]) -> None:
    assert evaluation.score_text(answer, REFERENCE) == pytest.approx(expected)


def test_the_eval_flow_scores_exactly_as_the_training_run_does() -> None:
    flow = _flow_scores()
    for answer, expected in CASES:
        assert flow.score_text(answer, REFERENCE) == evaluation.score_text(answer, REFERENCE) == pytest.approx(expected)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first"}, {"role": "assistant", "content": "x"}]
    assert flow.reference_of("", messages) == "first"
    assert flow.reference_of("given", messages) == "given"
    with pytest.raises(ValueError, match="ground_truth"):
        flow.reference_of("", [{"role": "user", "content": "q"}])


def test_summary_means_stop_rate_and_length() -> None:
    references = [REFERENCE, "Apple was founded by Steve Jobs."]
    before = [Answer("banana " * 48, stopped=False, tokens=48), Answer("", stopped=False, tokens=48)]
    after = [Answer(REFERENCE, stopped=True, tokens=10), Answer("Apple was founded by Steve Jobs.", stopped=True, tokens=8)]
    b, a = evaluation.summarize(before, references), evaluation.summarize(after, references)
    assert b == pytest.approx({"f1": 0.0, "rougeL": 0.0, "exact_match": 0.0, "contains": 0.0, "stop_rate": 0.0,
                               "answer_tokens": 48.0})  # fmt: skip
    assert a == pytest.approx({"f1": 1.0, "rougeL": 1.0, "exact_match": 1.0, "contains": 1.0, "stop_rate": 1.0,
                               "answer_tokens": 9.0})  # fmt: skip
    half = evaluation.summarize([after[0], before[1]], references)
    assert half["stop_rate"] == 0.5 and half["f1"] == 0.5
    line = evaluation.summary_line(b, a)
    assert line.startswith("F1 0.00 -> 1.00, ROUGE-L 0.00 -> 1.00")
    assert "stop rate 0% -> 100%" in line and "answer length 48.0 -> 9.0 tokens" in line


def test_held_out_examples_take_the_conversation_up_to_its_first_answer() -> None:
    rows = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
        [{"role": "assistant", "content": "opens"}, {"role": "user", "content": "late"}, {"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}],
        [{"role": "user", "content": "Q4"}, {"role": "assistant", "content": "A4"}],
    ]  # fmt: skip
    examples = evaluation.held_out_examples(rows, limit=3)
    assert [(e.question, e.reference) for e in examples] == [("Q1", "A1"), ("Q3", "A3")]  # row 2 answers no question
    assert [m["role"] for m in examples[0].prompt] == ["system", "user"]


def test_greedy_batched_answers_record_whether_each_one_stopped(phi3_tokenizer_dir: Path) -> None:
    from helpers_model import biased, tiny_phi3

    model, tokenizer = tiny_phi3(phi3_tokenizer_dir)
    tokenizer.padding_side = "right"
    examples = evaluation.held_out_examples(
        [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
         [{"role": "user", "content": "A much longer question, so that the batch needs left padding?"},
          {"role": "assistant", "content": "Yes."}]], limit=10)  # fmt: skip
    short = len(tokenizer("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"])
    assert evaluation.fitting(examples, tokenizer, max_tokens=short) == examples[:1]  # the long question is left out
    assert evaluation.fitting(examples, tokenizer, max_tokens=1024) == examples
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    undo = biased(model, end)
    try:
        stopping = evaluation.generate_answers(model, tokenizer, examples, max_new_tokens=6)
    finally:
        undo()
    assert stopping == [Answer("", stopped=True, tokens=0)] * 2
    word = tokenizer.convert_tokens_to_ids("▁Paris")
    undo = biased(model, word)
    try:
        talking = evaluation.generate_answers(model, tokenizer, examples, max_new_tokens=6)
    finally:
        undo()
    assert [(a.stopped, a.tokens) for a in talking] == [(False, 6), (False, 6)]
    assert talking[0].text == talking[1].text == " ".join(["Paris"] * 6)  # left padding: both rows continue alike
    assert tokenizer.padding_side == "right"  # restored for whoever uses the tokenizer next
    s = evaluation.summarize(talking, [e.reference for e in examples])
    assert s["stop_rate"] == 0.0 and s["answer_tokens"] == 6.0
