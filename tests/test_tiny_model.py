"""The tiny stand-in must speak exactly the real Phi-3's chat format, and be reproducible."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FINETUNING_DIR = Path(__file__).resolve().parents[1] / "finetuning_dir"
sys.path.insert(0, str(FINETUNING_DIR))  # the job's code folder imports its siblings by bare name

import chat_format  # noqa: E402
import tiny_model  # noqa: E402

from testkit import fixtures  # noqa: E402
from finetune_phi.demo_data import demo_rows  # noqa: E402

PHI3_SPECIALS = ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>")


def _ultrachat_conversations(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """Trained on 16 real ultrachat rows where the fixture resolves, else on the demo rows: the tests
    that compare it with the real Phi-3 request the real fixtures themselves and skip without them."""
    try:
        rows = _ultrachat_conversations(fixtures.ultrachat_first20())[:16]
    except fixtures.FixtureUnavailable:
        rows = [row["messages"] for row in demo_rows()]
    return tiny_model.build_tokenizer(tiny_model.corpus_from_rows(rows))


def test_tiny_tokenizer_formats_chats_exactly_like_the_real_phi3(tiny_tokenizer, phi3_tokenizer_dir, ultrachat_20):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
    assert tiny_tokenizer.chat_template == real.chat_template == chat_format.PHI3_CHAT_TEMPLATE
    conversations = _ultrachat_conversations(ultrachat_20)[:5]
    conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who founded Microsoft?"}])
    for messages in conversations:
        for add_generation_prompt in (False, True):
            prompt = messages[:1] if add_generation_prompt else messages
            tiny_text = tiny_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
            real_text = real.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert tiny_text == real_text
    assert tiny_tokenizer.eos_token == real.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("token", PHI3_SPECIALS)
def test_tiny_tokenizer_carries_phi3_special_tokens_as_single_tokens(tiny_tokenizer, phi3_tokenizer_dir, token):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
    for tok in (tiny_tokenizer, real):
        ids = tok.encode(f"hello{token}world", add_special_tokens=False)
        assert tok.convert_tokens_to_ids(token) in ids, f"{token} is split into pieces by {type(tok).__name__}"
        # Served answers are decoded with skip_special_tokens=True: the chat markers must vanish.
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "helloworld"


def test_tiny_tokenizer_pads_with_its_own_token_and_round_trips_unseen_text(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id is not None
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    text = "Reykjavík ☃ 東京 — never in the training text"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_build_tiny_is_deterministic_and_about_a_million_parameters(tmp_path, ultrachat_20):
    import torch

    train = tmp_path / "train.jsonl"
    train.write_text("".join(ultrachat_20.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
    model_a, tok_a = tiny_model.build_tiny(train, seed=7)
    model_b, tok_b = tiny_model.build_tiny(train, seed=7)
    other = tiny_model.build_model(tok_a, seed=8)

    assert tok_a.get_vocab() == tok_b.get_vocab()
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["lm_head.weight"], other.state_dict()["lm_head.weight"])
    assert 300_000 < model_a.num_parameters() < 2_000_000
    assert type(model_a).__name__ == "Phi3ForCausalLM"
    # Generation must stop at the end of an assistant turn, as the real Phi-3 does.
    assert tok_a.convert_tokens_to_ids("<|end|>") in model_a.generation_config.eos_token_id


def test_build_tiny_refuses_a_file_that_is_not_chat_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    with pytest.raises(chat_format.DataError, match=r"bad.jsonl:1: needs a non-empty `messages`"):
        tiny_model.build_tiny(bad, seed=0)
