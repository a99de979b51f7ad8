"""The continuous batcher's own forward pass against `model.generate()`, for every attention layout a
supported Phi model family uses: each greedy row, packed beside others and fed in prefill chunks,
gets exactly the tokens generate() gives it alone.

Layouts (tiny random models of each, built from the families' published config fields):
- Phi-3-mini-4k: multi-head attention, a sliding window (2,047 there; 24 here) that a prompt outgrows;
- grouped-query attention (Phi-4-mini: 24 query heads over 8 key/value heads);
- partial rotary embedding (Phi-4-mini: 0.75 of each head);
- LongRoPE (Phi-3.5-mini and Phi-4-mini): short factors up to original_max_position_embeddings,
  long factors beyond it, picked per sequence as transformers picks them;
- tied input/output embeddings (Phi-4-mini);
- all of Phi-4-mini's at once.
A layout the batcher does not cover (another RoPE scaling) falls back to generate() per request.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from finetune_phi.endpoint.continuous import Stepper, supports
from finetune_phi.endpoint.engine import Engine, SamplingParams
from helpers_model import stand_in_tokenizer_dir

HEAD_DIM = 16
ORIGINAL_CONTEXT = 32  # LongRoPE switches to its long factors past this many positions


def longrope(rotary_dim: int) -> dict[str, Any]:
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "long_factor": [1.5 + 0.4 * i for i in range(half)],
    }


def layout(name: str) -> dict[str, Any]:
    heads = 4
    base = dict(hidden_size=heads * HEAD_DIM, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                num_key_value_heads=heads, max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False)  # fmt: skip
    gqa = {"num_key_value_heads": 2}
    partial = {"partial_rotary_factor": 0.75}
    long = {"rope_scaling": longrope(HEAD_DIM), "original_max_position_embeddings": ORIGINAL_CONTEXT}
    tied = {"tie_word_embeddings": True}
    variants = {
        "phi3-mini sliding window": {"sliding_window": 24},
        "grouped-query attention": gqa,
        "partial rotary": partial,
        "longrope": long,
        "tied embeddings": tied,
        "phi4-mini (all of them)": {**gqa, **partial, **tied, "rope_scaling": longrope(int(HEAD_DIM * 0.75)),
                                    "original_max_position_embeddings": ORIGINAL_CONTEXT},
    }  # fmt: skip
    return {**base, **variants[name]}


LAYOUTS = ["phi3-mini sliding window", "grouped-query attention", "partial rotary", "longrope", "tied embeddings",
           "phi4-mini (all of them)"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stand_in_tokenizer_dir())


def build(name: str, tokenizer: Any) -> Engine:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **layout(name))
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # generate() and the stepper both run to the limit here
    engine = Engine(model, tokenizer)
    engine.stop_token_ids = []
    return engine


def alone(engine: Engine, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt):].tolist()


def stepped(engine: Engine, prompts: list[list[int]], new: int, step_tokens: int) -> list[list[int]]:
    stepper = Stepper(engine)
    rows = [stepper.start(p, new, SamplingParams(max_new_tokens=new)) for p in prompts]
    while not all(r.done for r in rows):
        stepper.step([r for r in rows if not r.done], step_tokens)
    return [r.generated for r in rows]


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_row_gets_the_tokens_generate_gives_it_alone(name: str, tokenizer: Any) -> None:
    engine = build(name, tokenizer)
    assert supports(engine.model), f"{name}: the batcher should cover this layout"
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model.config.vocab_size
    # Short prompts, one that outgrows the sliding window and LongRoPE's original context while it
    # decodes, and one longer than both from the start (prefilled in several chunks of 16 tokens).
    lengths = [5, 11, ORIGINAL_CONTEXT - 4, ORIGINAL_CONTEXT + 9]
    prompts = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]
    new = 12
    expected = [alone(engine, p, new) for p in prompts]
    assert stepped(engine, prompts, new, step_tokens=16) == expected
    assert stepped(engine, prompts[::-1], new, step_tokens=7) == expected[::-1]  # other neighbours, other chunks


def test_a_layout_the_batcher_does_not_cover_falls_back_to_generate(tokenizer: Any) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_phi.endpoint.batcher import Batcher

    # Another family's layout: separate q/k/v projections instead of Phi-3's fused qkv_proj.
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, pad_token_id=0)).eval()  # fmt: skip
    # A Phi-3 layout with a RoPE variant whose cos/sin the step does not reproduce.
    other_rope = build("grouped-query attention", tokenizer).model
    other_rope.model.rotary_emb.rope_type = "dynamic"
    for model in (llama, other_rope):
        assert not supports(model)
        engine = Engine(model, tokenizer)
        engine.stop_token_ids = []
        assert Batcher(engine).stepper is None  # one generate() per request
        [done] = engine.generate([[{"role": "user", "content": "Hello"}]], SamplingParams(max_new_tokens=3))
        assert done.completion_tokens == 3
