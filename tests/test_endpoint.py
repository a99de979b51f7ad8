"""The local endpoint: Azure ML's /score contract, OpenAI chat completions, health, auth, errors.

A real uvicorn server on a free 127.0.0.1 port (in a thread of this process) serves a tiny random
Phi-3 loaded from a real MLflow registry; random weights make gibberish, so the tests check the
contract, the parameters' effects, stop tokens and decoding rather than the words.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from finetune_phi.endpoint import KEY_ENV
from finetune_phi.endpoint.__main__ import EXIT_PORT_BUSY, EXIT_USAGE
from finetune_phi.endpoint.__main__ import main as endpoint_main
from finetune_phi.endpoint.engine import Engine, SamplingParams, served_name
from finetune_phi.endpoint.server import create_app
from finetune_phi.training import job_module
from helpers_endpoint import AUTH, KEY, ThreadServer
from helpers_model import RegisteredModel, biased, registered_tiny_model, tiny_phi3


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> RegisteredModel:
    return registered_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")


@pytest.fixture(scope="module")
def engine(tiny_model: RegisteredModel) -> Engine:
    return Engine.from_mlflow(tiny_model.registry_uri)


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(KEY, engine=engine)) as running:
        yield running


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=60) as c:
        yield c


def score(client: httpx.Client, body: dict[str, Any]) -> Any:
    response = client.post("/score", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def special_tokens(engine: Engine) -> list[str]:
    return sorted(set(engine.tokenizer.all_special_tokens) | set(engine.tokenizer.get_added_vocab()))


# --- the engine on its own -----------------------------------------------------------------------


def test_engine_loads_from_registry_with_phi3_stop_tokens(engine: Engine, tiny_model: RegisteredModel) -> None:
    tok = engine.tokenizer
    assert engine.name == tiny_model.name
    assert set(engine.stop_token_ids) == {tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id}
    prompt = engine.render([{"role": "user", "content": "Who founded Microsoft?"}])
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n")


def tokenizer_without_end_of_turn() -> Any:
    """A tokenizer with EOS and <unk> but no <|end|>: not the Phi-3 chat format."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "hi": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", eos_token="<|endoftext|>")


def test_one_stop_token_policy_a_tokenizer_without_end_of_turn_is_refused_by_job_and_endpoint() -> None:
    """Training, evaluation and serving share chat_format's policy: no <|end|>, no model, with the fix named."""
    chat_format, evaluation = job_module("chat_format"), job_module("evaluation")
    tokenizer = tokenizer_without_end_of_turn()
    with pytest.raises(ValueError) as refused:
        chat_format.stop_token_ids(tokenizer)
    message = str(refused.value)
    assert "no '<|end|>' token" in message and "Use a Phi tokenizer" in message
    model, phi3 = tiny_phi3()
    with pytest.raises(ValueError) as by_engine:
        Engine(model, tokenizer)
    example = evaluation.Example("hi", [{"role": "user", "content": "hi"}], "hello")
    with pytest.raises(ValueError) as by_evaluation:
        evaluation.generate_answers(model, tokenizer, [example], max_new_tokens=1)
    assert str(by_engine.value) == str(by_evaluation.value) == message
    # The control: the real Phi-3 tokenizer passes, <|end|> first.
    assert chat_format.stop_token_ids(phi3) == [phi3.convert_tokens_to_ids("<|end|>"), phi3.eos_token_id]


def test_one_max_new_tokens_default_for_the_saved_model_the_endpoint_and_the_client() -> None:
    import dataclasses

    from chat_flow import endpoint_client
    from finetune_phi.endpoint.engine import ScoreDefaults

    chat_format, mlflow_model = job_module("chat_format"), job_module("mlflow_model")
    saved = {p.name: p.default for p in mlflow_model.generation_params_schema().params}
    assert saved == dataclasses.asdict(ScoreDefaults()) == endpoint_client.DEFAULT_PARAMS
    assert saved["max_new_tokens"] == chat_format.DEFAULT_MAX_NEW_TOKENS == 128
    assert saved["do_sample"] is False  # greedy unless asked: the demo's answer is the same every run
    # A /v1/chat/completions request without max_tokens, and the client's OpenAI form of its defaults.
    assert SamplingParams.resolve().max_new_tokens == 128
    assert endpoint_client.openai_params() == {"max_tokens": 128, "temperature": 0.0, "top_p": 1.0}



def test_generation_stops_at_end_of_turn_even_if_the_config_names_only_eos() -> None:
    model, tokenizer = tiny_phi3(end_is_eos=False)
    engine = Engine(model, tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_id in engine.stop_token_ids
    undo = biased(model, end_id)
    try:
        [done] = engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=20))
    finally:
        undo()
    assert (done.text, done.completion_tokens, done.finish_reason) == ("", 1, "stop")


def test_special_tokens_never_reach_the_reply() -> None:
    model, tokenizer = tiny_phi3()
    engine = Engine(model, tokenizer)
    undo = biased(model, tokenizer.convert_tokens_to_ids("<|assistant|>"))
    try:
        [done] = engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=4))
    finally:
        undo()
    # Four <|assistant|> tokens were generated (so the limit was reached) and none shows.
    assert (done.text, done.completion_tokens, done.finish_reason) == ("", 4, "length")


def test_max_new_tokens_is_clamped_to_the_context_left() -> None:
    model, tokenizer = tiny_phi3()
    engine = Engine(model, tokenizer)
    undo = biased(model, tokenizer.convert_tokens_to_ids("<|placeholder1|>"))  # never a stop token
    try:
        [done] = engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=2048))
    finally:
        undo()
    # The tiny model's context is 512 tokens: generation runs until it is full, not past it.
    assert done.prompt_tokens + done.completion_tokens == engine.max_context == 512
    assert done.finish_reason == "length"


def test_sampling_params_resolution() -> None:
    assert not SamplingParams.resolve().do_sample
    assert SamplingParams.resolve(temperature=0.7).do_sample
    assert not SamplingParams.resolve(temperature=0, do_sample=True).do_sample
    assert not SamplingParams.resolve(temperature=0.7, do_sample=False).do_sample
    assert SamplingParams.resolve(max_new_tokens=5).max_new_tokens == 5
    assert served_name("models:/finetune-phi3-model/3") == "finetune-phi3-model"


# --- /score ------------------------------------------------------------------------------------------


def test_score_sdk_shape_returns_one_reply_per_input(client: httpx.Client) -> None:
    # A conversation travels as ONE prompt string (the contract in mlflow_model.save_mlflow_model).
    conversation = "Be brief.\n\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nWho founded Microsoft?"
    replies = score(
        client,
        {
            "input_data": ["Who founded Microsoft?", conversation],
            "params": {"temperature": 0.7, "max_new_tokens": 8, "do_sample": True, "top_p": 0.9},
        },
    )
    assert isinstance(replies, list) and len(replies) == 2
    assert all(isinstance(r, str) for r in replies)


def test_score_answers_the_studio_shape_as_a_catalog_deployment_does(client: httpx.Client) -> None:
    """{input_string, parameters} is a model-catalog deployment's shape (the Studio tutorial's): answered
    {"output": ...}, the greedy reply the OpenAI route gives the same messages."""
    messages = [{"role": "user", "content": "Who founded Microsoft?"}, {"role": "assistant", "content": "Gates."},
                {"role": "user", "content": "When?"}]  # fmt: skip
    body = {"input_data": {"input_string": messages, "parameters": {"max_new_tokens": 8, "return_full_text": False}}}
    response = client.post("/score", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"output"}
    assert response.headers["X-Ignored-Fields"] == "input_data.parameters.return_full_text"
    chat = client.post("/v1/chat/completions", headers=AUTH,
                       json={"messages": messages, "max_tokens": 8, "temperature": 0}).json()  # fmt: skip
    assert response.json()["output"] == chat["choices"][0]["message"]["content"]
    # Prompt strings are not the catalog's shape: the item is named.
    strings = {"input_data": {"input_string": ["Who founded Microsoft?"], "parameters": {"max_new_tokens": 8}}}
    refused = client.post("/score", json=strings, headers=AUTH)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "input_data.input_string.0"
    # The catalog shape with our model's `params` beside it: the catalog shape's own error is named.
    stray = client.post("/score", json={"input_data": {"input_string": messages}, "params": {"max_new_tokens": 3}},
                        headers=AUTH)  # fmt: skip
    assert stray.status_code == 422 and stray.json()["error"]["param"] == "params", stray.text


def test_score_prompt_is_wrapped_in_the_models_template_as_mlflow_does(engine: Engine) -> None:
    # The registered tiny model has no MLflow prompt template: a prompt string is one user message.
    assert engine.prompt_template is None
    assert engine.render("Hi") == engine.render([{"role": "user", "content": "Hi"}]) == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    model, tokenizer = tiny_phi3()
    templated = Engine(model, tokenizer, prompt_template="<|user|>\n{prompt}<|end|>\n<|assistant|>\n")
    assert templated.render("a {b}") == "<|user|>\na {b}<|end|>\n<|assistant|>\n"
    # Tokenized with the tokenizer's defaults (as MLflow's pipeline does): Phi-3 adds no BOS, so the
    # ids are those of the chat template's rendering.
    assert templated.encode("Hi") == engine.encode([{"role": "user", "content": "Hi"}])


def test_score_params_default_to_the_models_params_schema_as_mlflow_fills_them() -> None:
    from finetune_phi.endpoint import schemas
    from finetune_phi.endpoint.engine import ScoreDefaults
    from finetune_phi.endpoint.server import _score_sampling

    mlflow_model = job_module("mlflow_model")
    defaults = ScoreDefaults.from_params_schema(mlflow_model.generation_params_schema())
    assert defaults == ScoreDefaults(max_new_tokens=128, do_sample=False, temperature=1.0,
                                     top_p=1.0, top_k=50, repetition_penalty=1.0)  # fmt: skip
    assert set(defaults.names()) == set(schemas.SCORE_PARAMS) == {p.name for p in mlflow_model.generation_params_schema().params}
    model, tokenizer = tiny_phi3()
    engine = Engine(model, tokenizer, score_defaults=ScoreDefaults(max_new_tokens=7, top_k=9))
    none = _score_sampling(None, engine)
    assert (none.max_new_tokens, none.do_sample) == (7, False)
    sampled = _score_sampling(schemas.GenerationParams(do_sample=True, temperature=0.5), engine)
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.max_new_tokens) == (True, 0.5, 9, 7)


def test_greedy_is_reproducible_and_max_new_tokens_is_honoured(client: httpx.Client) -> None:
    question = ["Who founded Microsoft?"]
    long_a = score(client, {"input_data": question, "params": {"temperature": 0, "max_new_tokens": 12}})[0]
    long_b = score(client, {"input_data": question, "params": {"do_sample": False, "max_new_tokens": 12}})[0]
    # As in MLflow, a temperature without do_sample does not sample: do_sample defaults to false.
    long_c = score(client, {"input_data": question, "params": {"temperature": 0.9, "max_new_tokens": 12}})[0]
    short = score(client, {"input_data": question, "params": {"temperature": 0, "max_new_tokens": 1}})[0]
    assert long_a == long_b == long_c
    # Greedy decoding of 1 token is the first token of greedy decoding of 12.
    assert len(short) < len(long_a) and long_a.startswith(short)


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(client: httpx.Client) -> None:
    # /score takes the model's params schema only (no seed, as on Azure); chat completions take a seed.
    body = {"messages": [{"role": "user", "content": "Hello"}], "temperature": 1.0, "max_tokens": 12, "seed": 7}

    def chat(request: dict[str, Any]) -> str:
        response = client.post("/v1/chat/completions", json=request, headers=AUTH)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    first, second = chat(body), chat(body)
    greedy = chat({**body, "temperature": 0})
    assert first == second
    assert first != greedy
    # Not in the model's params schema: ignored, as Azure's scoring ignores it, and named.
    ignored = client.post("/score", json={"input_data": ["Hello"], "params": {"max_new_tokens": 12, "seed": 7}},
                          headers=AUTH)  # fmt: skip
    assert ignored.status_code == 200 and ignored.headers["X-Ignored-Fields"] == "params.seed"
    assert ignored.json() == [greedy]


def test_replies_echo_no_prompt_and_no_special_tokens(client: httpx.Client, engine: Engine) -> None:
    question = "Who founded Microsoft?"
    [reply] = score(client, {"input_data": [question], "params": {"temperature": 0, "max_new_tokens": 12}})
    assert reply and not reply.startswith(question)
    leaked = [t for t in special_tokens(engine) if t in reply]
    assert not leaked, f"special tokens in the reply: {leaked}"
    # The model was saved with return_full_text false; a request cannot turn it on: Azure ignores it,
    # and so does this endpoint, saying so.
    full = client.post("/score", headers=AUTH, json={
        "input_data": [question], "params": {"temperature": 0, "max_new_tokens": 12, "return_full_text": True}})
    assert full.status_code == 200 and full.json() == [reply]
    assert full.headers["X-Ignored-Fields"] == "params.return_full_text"
    assert "X-Ignored-Fields" not in client.post("/score", json={"input_data": [question]}, headers=AUTH).headers


# --- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}],
    ids=["missing", "wrong", "basic-scheme", "no-scheme"],
)
@pytest.mark.parametrize(
    "method,path,body",
    [("POST", "/score", {"input_data": ["hi"]}), ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), ("GET", "/v1/models", None)],
    ids=["score", "chat", "models"],
)
def test_missing_or_wrong_key_is_401(client: httpx.Client, headers: dict[str, str], method: str, path: str, body: Any) -> None:
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "input_data"),
        ({"input_data": []}, "input_data"),
        ({"input_data": [3]}, "input_data.0"),
        ({"input_data": ["hi", [{"role": "user", "content": "hi"}]]}, "input_data.1"),
        ({"input_data": [{"role": "user", "content": "hi"}]}, "input_data.0"),
        ({"input_data": ["hi", " "]}, "input_data.1"),
        ({"input_data": "hi"}, "input_data"),
        ({"input_data": ["hi"], "params": {"max_new_tokens": 10**6}}, "params.max_new_tokens"),
        ({"input_data": ["hi"], "params": {"max_new_tokens": 0}}, "params.max_new_tokens"),
        ({"input_data": ["hi"], "params": {"temperature": -1}}, "params.temperature"),
        ({"input_data": {"input_string": []}}, "input_data.input_string"),
        ({"input_data": {"input_string": [{"role": "user", "content": " "}]}}, "input_data.input_string.0.content"),
        ({"input_data": ["hi"], "params": {"do_sample": True, "temperature": 0}}, "params.temperature"),
        # Strict types: JSON 1 is not a boolean, "5" is not a token count.
        ({"input_data": ["hi"], "params": {"do_sample": 1}}, "params.do_sample"),
        ({"input_data": ["hi"], "params": {"max_new_tokens": "5"}}, "params.max_new_tokens"),
        ({"input_data": ["hi"], "params": {"top_k": 2.5}}, "params.top_k"),
    ],
)
def test_bad_input_is_422_naming_the_field(client: httpx.Client, body: dict[str, Any], param: str) -> None:
    response = client.post("/score", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": 0}, "stream"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ],
)
def test_bad_chat_completion_is_400_naming_the_field(client: httpx.Client, body: dict[str, Any], param: str) -> None:
    # OpenAI and vLLM answer an invalid chat request with 400 (/score keeps FastAPI's 422).
    response = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_integral_floats_count_as_integers(client: httpx.Client) -> None:
    # JSON Schema's "integer" includes 2.0; schema-driven clients may send it.
    assert len(score(client, {"input_data": ["hi"], "params": {"max_new_tokens": 2.0, "top_k": 5.0, "do_sample": True}})) == 1


def test_framework_errors_use_the_same_error_shape(client: httpx.Client) -> None:
    # Not JSON at all is a syntax error (400); well-formed JSON with wrong values is 422.
    for broken in (b"\xff{not json", b"input_data=hi"):
        response = client.post("/score", content=broken, headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "body", response.text
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


def test_too_long_prompt_is_a_client_error(client: httpx.Client) -> None:
    # The tiny model's context is 512 tokens: a long prompt plus max_new_tokens cannot fit.
    body = {"input_data": ["word " * 600], "params": {"max_new_tokens": 16}}
    response = client.post("/score", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input_data"
    assert "context" in response.json()["error"]["message"]


# --- OpenAI -------------------------------------------------------------------------------------------


def test_openai_client_gets_a_chat_completion(server: ThreadServer, tiny_model: RegisteredModel) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=60)
    [card] = client.models.list().data
    assert card.id == tiny_model.name
    completion = client.chat.completions.create(
        model=card.id,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who founded Microsoft?"}],
        max_tokens=3,
        temperature=0,
    )
    assert completion.object == "chat.completion" and completion.model == card.id
    [choice] = completion.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= completion.usage.completion_tokens <= 3
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    again = client.chat.completions.create(
        model=card.id, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who founded Microsoft?"}], max_tokens=3, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="n: "):
        client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": "hi"}], n=2)


def test_chat_completions_stop_strings_cut_the_reply(client: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/chat/completions", json=body, headers=AUTH).json()["choices"][0]["message"]["content"]
    assert len(full) > 2
    cut_at = full[1:3]
    stopped = client.post("/v1/chat/completions", json={**body, "stop": [cut_at]}, headers=AUTH).json()["choices"][0]
    assert stopped["message"]["content"] == full[: full.find(cut_at)]
    assert stopped["finish_reason"] == "stop"


# --- health and the API description --------------------------------------------------------------


def test_health_routes_and_openapi_document(client: httpx.Client) -> None:
    for path in ("/", "/health/live"):
        response = client.get(path)
        assert response.status_code == 200 and response.json()["status"] == "alive"
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    doc = client.get("/openapi.json").json()
    assert {"/score", "/v1/chat/completions", "/v1/models", "/health/ready"} <= set(doc["paths"])
    score_body = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert sorted(r["$ref"].rsplit("/", 1)[1] for r in score_body["anyOf"]) == ["CatalogScoreRequest", "ScoreRequest"]
    assert "input_data" in doc["components"]["schemas"]["ScoreRequest"]["properties"]
    assert {"401", "422"} <= set(doc["paths"]["/score"]["post"]["responses"])
    assert any("HTTPBearer" in scheme for scheme in doc["components"]["securitySchemes"])


def test_readiness_is_503_until_the_model_is_loaded(engine: Engine) -> None:
    release = threading.Event()

    def slow_loader() -> Engine:
        release.wait(timeout=30)
        return engine

    with ThreadServer(create_app(KEY, loader=slow_loader, model_name="slow")) as running:
        with httpx.Client(base_url=running.base, timeout=30) as c:
            assert c.get("/health/live").status_code == 200
            loading = c.get("/health/ready")
            assert loading.status_code == 503 and loading.json()["status"] == "loading"
            early = c.post("/score", json={"input_data": ["hi"]}, headers=AUTH)
            assert early.status_code == 503 and early.json()["error"]["type"] == "service_unavailable"
            release.set()
            deadline = time.monotonic() + 10
            while c.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "never became ready"
                time.sleep(0.05)
            assert c.post("/score", json={"input_data": ["hi"], "params": {"max_new_tokens": 2}}, headers=AUTH).status_code == 200


def test_a_failed_load_reports_503_failed_and_calls_back() -> None:
    failures: list[BaseException] = []

    def broken_loader() -> Engine:
        raise OSError("no such model")

    with ThreadServer(create_app(KEY, loader=broken_loader, on_load_error=failures.append)) as running:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        body = httpx.get(f"{running.base}/health/ready", timeout=10)
    assert body.status_code == 503
    assert body.json()["status"] == "failed" and "no such model" in body.json()["detail"]


# --- the command line ------------------------------------------------------------------------------


def test_cli_refuses_to_start_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert endpoint_main(["--model-uri", "models:/x/1", "--port", "1"]) == EXIT_USAGE


def test_cli_reports_a_busy_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with socket.socket() as foreign:  # bound without SO_REUSEPORT, like any other program
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        assert endpoint_main(["--model-uri", "models:/x/1", "--port", str(port)]) == EXIT_PORT_BUSY


def test_create_app_refuses_an_empty_key(engine: Engine) -> None:
    with pytest.raises(ValueError, match="key"):
        create_app("", engine=engine)

