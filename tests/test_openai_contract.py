"""/v1/chat/completions against OpenAI's contract, through the `openai` client where it can be.

Cases modeled on public OpenAI-server test suites (vLLM's tests/entrypoints/openai/test_chat.py:
streaming chunks with the role first and finish_reason last, include_usage, logprobs shape, seeds,
refused fields, models.retrieve). The model is the tiny random Phi-3 over the real Phi-3 tokenizer:
its words are gibberish, so the tests check shapes and consistency (streamed == not streamed).
"""

from __future__ import annotations

import inspect
import json
import socket
import threading
from typing import Any, Iterator

import httpx
import openai
import pytest

from finetune_phi.endpoint.engine import Engine
from finetune_phi.endpoint.openai_chat import IncrementalText, torch_seed
from finetune_phi.endpoint.server import create_app
from helpers_endpoint import AUTH, KEY, ThreadServer, assert_generation_stopped, count_forward_passes, serving, tiny_engine
from helpers_endpoint import wait_until
from helpers_model import slowed

USER = [{"role": "user", "content": "Who founded Microsoft?"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ThreadServer]:
    with serving(engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(server: ThreadServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def events(response: httpx.Response) -> list[Any]:
    """The data of each server-sent event, JSON-decoded except the final [DONE]."""
    datas = [line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


# --- streaming --------------------------------------------------------------------------------------


def test_stream_through_the_openai_client_joins_to_the_unstreamed_reply(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=USER, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=USER, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, *middle, last_choice, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in middle)
    assert len(middle) >= 2  # the text came in pieces, not at the end
    assert last_choice.choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content for c in middle) == whole.choices[0].message.content
    assert usage.choices == [] and usage.usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_event_stream_ends_with_done_and_has_no_usage_unless_asked(server: ThreadServer) -> None:
    response = chat(server, {"messages": USER, "stream": True, **GREEDY})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    data = events(response)
    assert data[-1] == "[DONE]" and data[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in d for d in data[:-1])


def test_a_stop_string_across_a_chunk_boundary_ends_the_stream_as_unstreamed(client: openai.OpenAI) -> None:
    pieces = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(model="tiny", messages=USER, stream=True, max_tokens=24, temperature=0)
        if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 3
    stop = pieces[1][-1] + pieces[2][:2]  # ends one token's text, starts the next one's
    full = "".join(pieces)
    expected = full[: full.find(stop)]
    streamed = list(client.chat.completions.create(model="tiny", messages=USER, stream=True, max_tokens=24, temperature=0, stop=[stop]))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == expected and stop not in text
    assert streamed[-1].choices[0].finish_reason == "stop"
    whole = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, temperature=0, stop=stop)
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"


def test_incremental_text_never_splits_a_character(engine: Engine) -> None:
    # Emoji and CJK fall back to byte tokens in Phi-3's vocabulary: one character over several tokens.
    reply = "Olá 日本語 🙂🚀 done"
    ids = engine.tokenizer(reply, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(reply.split())
    text = IncrementalText(engine.tokenizer, stops=[])
    pieces = [text.add([token])[0] for token in ids] + [text.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True).strip() == reply


def test_incremental_text_holds_back_a_possible_stop_string(engine: Engine) -> None:
    ids = engine.tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    text = IncrementalText(engine.tokenizer, stops=["three f"])
    out = ""
    for token in ids:
        piece, stopped = text.add([token])
        out += piece
        assert "three"[:3] not in out or stopped  # "thr" is held until it is known not to stop
        if stopped:
            break
    assert stopped and out == "one two "


def test_a_client_that_leaves_a_stream_cancels_its_generation(server: ThreadServer, engine: Engine) -> None:
    calls, remove = count_forward_passes(engine)
    try:
        body = json.dumps({"messages": USER, "stream": True, "max_tokens": 2048, "temperature": 0}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head.encode() + body)
            received = b""
            while b"chat.completion.chunk" not in received:  # streaming has begun
                received += sock.recv(4096)
            wait_until(lambda: calls[0] > 5, 10, "generation is under way")
        assert_generation_stopped(server.base, calls, max_before=1000)
    finally:
        remove()


def test_errors_before_the_first_byte_are_json_with_their_status(server: ThreadServer, engine: Engine) -> None:
    stream = {"messages": USER, "stream": True}
    cases = [
        (httpx.post(f"{server.base}/v1/chat/completions", json=stream, timeout=30), 401, "Authorization"),
        (chat(server, {**stream, "n": 2}), 400, "n"),
        (chat(server, {**stream, "stream": "yes"}), 400, "stream"),
        (chat(server, {**stream, "messages": [{"role": "user", "content": "word " * 600}]}), 400, "messages"),
    ]
    for response, status, param in cases:
        assert (response.status_code, response.json()["error"]["param"]) == (status, param), response.text
        assert response.headers["content-type"] == "application/json"
    release = threading.Event()
    loading = create_app(KEY, loader=lambda: (release.wait(30), engine)[1])
    with ThreadServer(loading) as cold:
        response = chat(cold, stream)
        release.set()
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"


def test_the_request_timeout_ends_a_started_stream_with_an_error_event(engine: Engine) -> None:
    # ~500 tokens fit the tiny model's context: at 5 ms more per step they take 2.5 s, far past 0.5 s.
    with ThreadServer(create_app(KEY, engine=engine, request_timeout_s=0.5)) as slow, slowed(engine.model, 0.005):
        client = openai.OpenAI(base_url=f"{slow.base}/v1", api_key=KEY, max_retries=0, timeout=30)
        received = []
        with pytest.raises(openai.APIError, match="timeout"):
            for c in client.chat.completions.create(model="tiny", messages=USER, stream=True, max_tokens=2048, temperature=0):
                received.append(c)
        # The stream started, then ended with the server's timeout error (not a finished answer).
        assert received and received[0].choices[0].delta.role == "assistant"
        raw = chat(slow, {"messages": USER, "stream": True, "max_tokens": 2048, "temperature": 0})
        data = events(raw)
        assert data[-1] == "[DONE]" and data[-2]["error"]["type"] == "timeout"
        assert all(d["choices"][0]["finish_reason"] is None for d in data[:-2])


# --- the rest of the contract ------------------------------------------------------------------------


def test_logprobs_have_openais_shape_and_are_the_greedy_choice(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="tiny", messages=USER, logprobs=True, top_logprobs=3, **GREEDY)
    choice = completion.choices[0]
    content = choice.logprobs.content
    assert len(content) == completion.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(t.token for t in content).strip() == choice.message.content
    for token in content:
        assert token.logprob <= 0 and bytes(token.bytes).decode("utf-8", "replace") == token.token
        assert len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy decoding picks the most likely token of the raw logits.
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)
    plain = client.chat.completions.create(model="tiny", messages=USER, logprobs=True, **GREEDY)
    assert plain.choices[0].logprobs.content[0].top_logprobs == []
    assert client.chat.completions.create(model="tiny", messages=USER, **GREEDY).choices[0].logprobs is None


REFUSED = [
    ("n", 2),
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("logit_bias", {"50256": -100}),
    ("moderation", {"model": "omni-moderation-latest"}),
    ("stream_options", {"include_usage": True}),
    ("top_logprobs", 2),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("reasoning_effort", "low"),
]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f for f, _ in REFUSED])
def test_a_field_the_server_does_not_honour_is_refused_by_name(client: openai.OpenAI, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, **{field: value})
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == field and refused.value.body["message"].startswith(f"{field}: ")


def test_no_op_values_of_refused_fields_are_accepted(server: ThreadServer) -> None:
    body = {
        "messages": USER, "max_tokens": 2, "n": 1, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
        "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "modalities": ["text"], "user": "u1",
        "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True, "a_vendor_extra": 1,
    }  # fmt: skip
    assert chat(server, body).status_code == 200
    assert chat(server, {**body, "logprobs": True, "stream": True}).json()["error"]["param"] == "logprobs"


def test_seed_takes_any_signed_64_bit_integer_and_refuses_others_naming_seed(server: ThreadServer) -> None:
    sampled = {"messages": USER, "max_tokens": 8, "temperature": 1.0}
    replies = {}
    for seed in (-(2**63), -1, 0, 2**63 - 1, -9007199254740991):  # the last: openai-python's own test value
        response = chat(server, {**sampled, "seed": seed})
        assert response.status_code == 200, response.text
        replies[seed] = response.json()["choices"][0]["message"]["content"]
    assert chat(server, {**sampled, "seed": -1}).json()["choices"][0]["message"]["content"] == replies[-1]
    assert torch_seed(-1) == 2**64 - 1 and torch_seed(2**63 - 1) == 2**63 - 1 and torch_seed(-(2**63)) == 2**63
    # Outside int64, as vLLM refuses them.
    for seed in (2**63, 2**64 - 1, 2**64, -(2**63) - 1, 1.5, True):
        response = chat(server, {**sampled, "seed": seed})
        assert response.status_code == 400 and response.json()["error"]["param"] == "seed", response.text


def test_openai_pythons_every_parameter_request_is_answered(client: openai.OpenAI) -> None:
    """Every keyword of openai-python's chat.completions.create, each at a value this server honours
    (the penalties, the seed, stop, logprobs...) or at its no-op value; a keyword the client gains in a
    later release fails this test until the server decides what to do with it."""
    from openai.resources.chat.completions import Completions

    every = {
        "messages": [{"role": "system", "content": "Be brief.", "name": "name"}, *USER], "model": "tiny",
        "audio": None, "frequency_penalty": -2, "function_call": "none", "functions": [], "logit_bias": {},
        "logprobs": True, "max_completion_tokens": 4, "max_tokens": 6, "metadata": {"foo": "string"},
        "modalities": ["text"], "moderation": None, "n": 1, "parallel_tool_calls": True, "prediction": None,
        "presence_penalty": -2, "prompt_cache_key": "key", "prompt_cache_options": {}, "prompt_cache_retention": "24h",
        "reasoning_effort": None, "response_format": {"type": "text"}, "safety_identifier": "safety-id",
        "seed": -9007199254740991, "service_tier": "auto", "stop": "string", "store": True, "stream": False,
        "stream_options": None, "temperature": 1, "tool_choice": "none", "tools": [], "top_logprobs": 2, "top_p": 1,
        "user": "user-1234", "verbosity": None, "web_search_options": None,
    }  # fmt: skip
    transport = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
    assert set(inspect.signature(Completions.create).parameters) - transport == set(every)
    done = client.chat.completions.create(**every)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 4
    assert len(done.choices[0].logprobs.content[0].top_logprobs) == 2
    streamed = client.chat.completions.create(**{**every, "stream": True, "logprobs": None, "top_logprobs": None,
                                                 "stream_options": {"include_usage": True}})  # fmt: skip
    chunks = list(streamed)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=9, max_completion_tokens=2)
    assert done.usage.completion_tokens <= 2


def test_models_retrieve_and_an_unknown_id_is_404_in_openais_shape(client: openai.OpenAI) -> None:
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


def test_score_ignores_max_length_as_azure_does_and_names_it(server: ThreadServer) -> None:
    """Azure's chat samples send max_length; not in the model's params schema, Azure's scoring drops it."""
    body = {"input_data": ["hi"], "params": {"max_new_tokens": 4}}
    plain = httpx.post(f"{server.base}/score", json=body, headers=AUTH, timeout=30)
    extra = httpx.post(f"{server.base}/score", json={"input_data": ["hi"], "params": {"max_new_tokens": 4, "max_length": 2}},
                       headers=AUTH, timeout=30)  # fmt: skip
    assert plain.status_code == extra.status_code == 200 and extra.json() == plain.json()
    assert extra.headers["X-Ignored-Fields"] == "params.max_length"


# --- the chat flow's client ----------------------------------------------------------------------------


def test_chat_stream_yields_the_reply_in_pieces_that_join_to_chat(server: ThreadServer) -> None:
    from chat_flow.endpoint_client import chat, chat_stream

    history = [
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": "Bill Gates and Paul Allen."},
        {"role": "user", "content": "When?"},
    ]
    greedy = {"do_sample": False, "max_new_tokens": 16}
    pieces = list(chat_stream(f"{server.base}/score", KEY, history, kind="local", params=greedy))
    assert len(pieces) >= 2
    # /score gets the conversation as one encoded prompt string; the stream sends it as messages.
    assert "".join(pieces) == chat(f"{server.base}/score", KEY, history, kind="local", params=greedy)


def test_chat_stream_reports_a_mid_stream_error_and_azure_kinds_yield_one_piece(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chat_flow import endpoint_client

    with ThreadServer(create_app(KEY, engine=engine, request_timeout_s=0.5)) as slow, slowed(engine.model, 0.005):
        received = []
        with pytest.raises(endpoint_client.EndpointError, match="ended the stream with an error: the request took longer"):
            for piece in endpoint_client.chat_stream(f"{slow.base}/score", KEY, USER, params={"max_new_tokens": 2048}):
                received.append(piece)
        assert received
    monkeypatch.setattr(endpoint_client, "chat", lambda *a, **k: "whole reply")
    assert list(endpoint_client.chat_stream("https://x.invalid/score", "k", USER, kind="azure-mlflow")) == ["whole reply"]
    with pytest.raises(endpoint_client.EndpointError, match="does not end with /score"):
        endpoint_client.chat_completions_url("http://127.0.0.1:5001/predict")
