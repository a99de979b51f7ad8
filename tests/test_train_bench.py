"""bench/train_bench.py: its refusals and its loss definition (the timing itself is the bench's job, not a test's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "finetuning_dir"))

import tiny_model  # noqa: E402

_spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench" / "train_bench.py")
train_bench = importlib.util.module_from_spec(_spec)
sys.modules["train_bench"] = train_bench  # dataclasses look their module up while the class is built
_spec.loader.exec_module(train_bench)


def test_phi3_mini_shape_refuses_without_cuda_and_bad_flags_are_named(tmp_path):
    import torch

    args = train_bench.make_parser().parse_args(["--model", "phi3-mini-shape", "--steps", "1", "--data", str(tmp_path / "no.jsonl")])
    with pytest.raises(SystemExit) as excinfo:
        train_bench.validate(args)
    message = str(excinfo.value)
    assert "--steps must be >= 2" in message and "--data" in message
    assert ("--model phi3-mini-shape needs CUDA" in message) == (not torch.cuda.is_available())


def test_eval_loss_is_the_mean_nll_of_assistant_tokens(ultrachat_20, tmp_path):
    import torch
    from trl.chat_template_utils import get_training_chat_template

    train = tmp_path / "train.jsonl"
    train.write_text("".join(ultrachat_20.read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8")
    model, tokenizer = tiny_model.build_tiny(train, seed=3)
    messages = [{"role": "user", "content": "Who founded Microsoft?"},
                {"role": "assistant", "content": "Bill Gates and Paul Allen."},
                {"role": "user", "content": "When?"}, {"role": "assistant", "content": "In 1975."}]  # fmt: skip

    encoded = tokenizer.apply_chat_template(
        messages, chat_template=get_training_chat_template(tokenizer), return_dict=True, return_assistant_tokens_mask=True
    )
    ids = torch.tensor([encoded["input_ids"]])
    labels = torch.where(torch.tensor([encoded["assistant_masks"]]) == 1, ids, -100)
    assert 0 < int((labels != -100).sum()) < ids.shape[1] // 2  # both answers, nothing the user wrote
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()  # transformers' own shifted, masked mean
    assert train_bench.assistant_nll(model, tokenizer, [messages]) == pytest.approx(expected, rel=1e-5)
    # Two rows are weighted by their token counts, not averaged per row.
    short = messages[:2]
    both = train_bench.assistant_nll(model, tokenizer, [messages, short])
    assert both != pytest.approx((expected + train_bench.assistant_nll(model, tokenizer, [short])) / 2, rel=1e-6)
