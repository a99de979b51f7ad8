"""OpenAI's presence and frequency penalties on /v1, against a reference written from their definition.

OpenAI's API reference ("parameter details") defines them on the logits before sampling:
    mu[j] -> mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty
with c[j] how often token j was sampled before the current position; vLLM applies them that way, on
the tokens generated so far (not the prompt), after the repetition penalty and before temperature.
The reference below is that definition as a plain loop over tokens (no tensors shared with the
code under test); the served model's greedy reply is compared with a decoding loop that applies it.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest
import torch

from finetune_phi.endpoint.continuous import Row, _sample_one
from finetune_phi.endpoint.engine import Engine, SamplingParams, apply_openai_penalties
from helpers_endpoint import AUTH, ThreadServer, serving, tiny_engine

QUESTION = [{"role": "user", "content": "Who founded Microsoft?"}]


def reference(logits: list[float], prompt: list[int], generated: list[int], repetition: float, presence: float,
              frequency: float) -> list[float]:  # fmt: skip
    """One row's logits after the repetition penalty (transformers': over prompt and reply, a positive
    logit divided, a negative one multiplied) and then OpenAI's definition, token by token."""
    out = list(logits)
    for j in set(prompt) | set(generated):
        out[j] = out[j] * repetition if out[j] < 0 else out[j] / repetition
    for j in range(len(out)):
        c = generated.count(j)
        out[j] = out[j] - c * frequency - float(c > 0) * presence
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0), (2.0, 2.0)])
def test_the_penalties_match_the_definition_on_logits(presence: float, frequency: float) -> None:
    generator = torch.Generator().manual_seed(11)
    vocab = 40
    logits = torch.randn(3, vocab, generator=generator)
    generated = torch.randint(0, 12, (3, 9), generator=generator)  # repeats: counts above 1
    ours = apply_openai_penalties(logits.clone(), generated, presence, frequency)
    for row in range(3):
        expected = reference(logits[row].tolist(), [], generated[row].tolist(), 1.0, presence, frequency)
        assert ours[row].tolist() == pytest.approx(expected, abs=1e-6)
    # Nothing generated yet: the logits are untouched whatever the penalties (the prompt does not count).
    assert torch.equal(apply_openai_penalties(logits, torch.empty(3, 0, dtype=torch.long), presence, frequency), logits)


def test_a_rows_next_token_applies_repetition_then_openai_penalties_as_the_definition_does() -> None:
    generator = torch.Generator().manual_seed(5)
    vocab = 30
    for trial in range(40):
        logits = torch.randn(1, vocab, generator=generator) * 3
        prompt = torch.randint(0, vocab, (6,), generator=generator).tolist()
        generated = torch.randint(0, 8, (10,), generator=generator).tolist()
        params = SamplingParams(do_sample=False, repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.6)
        row = Row.__new__(Row)  # only what _sample_one reads
        row.params, row.prompt, row.generated, row.generator = params, prompt, generated, None
        expected = reference(logits[0].tolist(), prompt, generated, 1.3, 0.8, 0.6)
        assert _sample_one(row, logits) == max(range(vocab), key=expected.__getitem__), trial


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Engine, ThreadServer]]:
    engine = tiny_engine()
    with serving(engine) as running:
        yield engine, running


def reference_greedy(engine: Engine, presence: float, frequency: float, steps: int) -> str:
    """Greedy decoding with the whole sequence re-run each step and the definition applied to its logits."""
    prompt = engine.encode(QUESTION)
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = engine.model(torch.tensor([prompt + generated])).logits[0, -1].float().tolist()
            token = max(range(len(logits)), key=reference(logits, prompt, generated, 1.0, presence, frequency).__getitem__)
            if token in engine.stop_token_ids:
                break
            generated.append(token)
    return engine.completion(generated, len(prompt)).text


def chat(server: ThreadServer, **fields: Any) -> str:
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 16, **fields}
    response = httpx.post(f"{server.base}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 1.0), (-2.0, -1.5)])
def test_the_served_greedy_reply_with_penalties_is_the_reference_decoding(
    served: tuple[Engine, ThreadServer], presence: float, frequency: float
) -> None:
    engine, server = served
    plain = chat(server)
    penalised = chat(server, presence_penalty=presence, frequency_penalty=frequency)
    assert penalised == reference_greedy(engine, presence, frequency, 16)
    assert plain == reference_greedy(engine, 0.0, 0.0, 16)
    if presence < 0:  # negative penalties reward repeating: the reply must change (the random tiny model
        assert penalised != plain  # repeats nothing of its own in 16 tokens, so positive ones may not)
    # The batched generate() path (transformers' processors plus the engine's) gives the same reply.
    params = SamplingParams.resolve(max_new_tokens=16, temperature=0, presence_penalty=presence,
                                    frequency_penalty=frequency)  # fmt: skip
    assert engine.generate([QUESTION], params)[0].text == penalised
    # Streamed, the pieces join to the same reply.
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 16, "presence_penalty": presence,
            "frequency_penalty": frequency, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == penalised
