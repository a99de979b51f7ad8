"""The endpoint client (chat_flow/endpoint_client.py) against a real HTTP server on 127.0.0.1 that plays scripted answers.

Also: the request shape of each deployment kind, the prompt encoding against Phi-3's real chat
template, and where a flow finds the endpoint (connection, environment, .env).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import requests
import urllib3.util.retry

import config
from chat_flow import endpoint_client as ec
from finetune_phi import common

KEY = "s3cr3t-key-0123456789abcdef"


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: ["ok"])
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None  # answer only once the test sets it (a server still generating)
    echo_key: bool = False  # put the received Authorization header in the body (a leaky server)


@dataclass
class Seen:
    headers: dict[str, str]
    body: Any


class ScriptedServer:
    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.default = Reply()
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                outer.seen.append(Seen(dict(self.headers), json.loads(raw or b"null")))
                reply = outer.script.popleft() if outer.script else outer.default
                if reply.hold is not None:
                    reply.hold.wait(30)  # bounded, so a client that never gives up fails instead of hanging
                body = reply.body
                if reply.echo_key:
                    body = {"error": f"bad token {self.headers.get('Authorization')}"}
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


def fast_session() -> Any:
    return ec.make_session(backoff_factor=0.01)


def test_ask_posts_the_sdk_shape_with_the_key_as_bearer_token(server: ScriptedServer) -> None:
    server.script.append(Reply(body=["Bill Gates and Paul Allen."]))
    answer = ec.ask(server.url, KEY, "Who founded Microsoft?", params={"max_new_tokens": 16})
    assert answer == "Bill Gates and Paul Allen."
    (seen,) = server.seen
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.body["input_data"] == ["Who founded Microsoft?"]
    assert seen.body["params"]["max_new_tokens"] == 16
    assert seen.body["params"]["do_sample"] is False  # the model's (greedy) defaults kept where not overridden


HISTORY = [{"inputs": {"question": "Hi"}, "outputs": {"answer": "Hello!"}}]


@pytest.mark.parametrize("kind", ["local", "azure-mlflow"])
def test_chat_sends_our_models_shape_one_encoded_prompt(server: ScriptedServer, kind: str) -> None:
    server.script.append(Reply(body=["Seattle."]))
    messages = ec.messages_from_history(HISTORY, "Where is Microsoft?")
    assert ec.chat(server.url, KEY, messages, kind=kind, params={"top_p": 0.9}) == "Seattle."
    body = server.seen[0].body
    assert body == {
        "input_data": ["Hi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nWhere is Microsoft?"],
        "params": {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 0.9, "top_k": 50,
                   "repetition_penalty": 1.0},
    }


def test_chat_sends_the_catalog_shape_with_the_history_as_messages(server: ScriptedServer) -> None:
    # The reply shape of the Phi-3-mini-4k-instruct model card's sample output (leading space and all).
    server.script.append(Reply(body={"output": " Seattle."}))
    messages = ec.messages_from_history(HISTORY, "Where is Microsoft?")
    assert ec.chat(server.url, KEY, messages, kind="azure-catalog") == " Seattle."
    body = server.seen[0].body
    assert body == {
        "input_data": {
            "input_string": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Where is Microsoft?"},
            ],
            "parameters": {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50,
                           "repetition_penalty": 1.0},
        }
    }


def test_ask_follows_the_kind_too(server: ScriptedServer) -> None:
    server.script.extend([Reply(body=["mlflow"]), Reply(body={"output": "catalog"})])
    assert ec.ask(server.url, KEY, "Q?", kind="azure-mlflow") == "mlflow"
    assert ec.ask(server.url, KEY, "Q?", kind="azure-catalog") == "catalog"
    assert server.seen[0].body["input_data"] == ["Q?"]
    assert server.seen[1].body["input_data"]["input_string"] == [{"role": "user", "content": "Q?"}]


def test_a_reply_in_another_kinds_shape_names_the_kind_setting(server: ScriptedServer) -> None:
    server.script.append(Reply(body={"output": "I am a catalog deployment"}))
    with pytest.raises(ec.EndpointError, match="unexpected shape for kind 'local'.*AZURE_ML_ENDPOINT_KIND"):
        ec.ask(server.url, KEY, "hi", kind="local")


def test_an_unknown_kind_is_refused_before_any_request_naming_the_setting_and_the_kinds(server: ScriptedServer) -> None:
    with pytest.raises(ec.EndpointError) as err:
        ec.ask(server.url, KEY, "hi", kind="azure-maas")
    assert "AZURE_ML_ENDPOINT_KIND='azure-maas'" in str(err.value)
    assert "local, azure-mlflow, azure-catalog, azure-serverless" in str(err.value)
    with pytest.raises(ec.EndpointError, match="connection's configs.kind='openai'.*local, azure-mlflow, azure-catalog"):
        ec.endpoint_from_connection({"endpoint": server.url, "kind": "openai"}, {"key": KEY})
    assert server.seen == []


def test_no_kind_on_this_machine_means_our_endpoints_shape_logged_once(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ec, "_logged_guesses", set())
    server.default = Reply(body=["ok"])
    made_by_hand = ec.endpoint_from_connection({"endpoint": server.url}, {"key": KEY})
    assert (made_by_hand.kind, made_by_hand.guessed_from) == ("local", ec.CONNECTION_KIND)
    with caplog.at_level(logging.INFO, logger=ec.__name__):
        for _ in range(3):
            assert ec.ask(server.url, KEY, "hi", kind="") == "ok"
    assert server.seen[0].body["input_data"] == ["hi"]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "AZURE_ML_ENDPOINT_KIND is not set" in logged[0], logged  # the connection's was logged before
    assert KEY not in repr(made_by_hand)


def test_the_kinds_match_config() -> None:
    assert ec.KINDS == config.ENDPOINT_KINDS
    assert config.Settings().AZURE_ML_ENDPOINT_KIND == ""  # told from the URL (ec.guess_kind)
    assert tuple(ec.chat_format.TURN_FORMATS) == config.CHAT_FORMATS  # the families, named alike in both
    assert config.Settings().AZURE_ML_CHAT_FORMAT == ec.DEFAULT_CHAT_FORMAT


# --- the prompt our MLflow model sees ---------------------------------------------------------------------

CONVERSATIONS = {
    "one question": [{"role": "user", "content": "Who founded Microsoft?"}],
    "multi-turn": [
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": "Bill Gates and Paul Allen."},
        {"role": "user", "content": "And in which year?"},
        {"role": "assistant", "content": "In 1975.\n\nIn Albuquerque."},
        {"role": "user", "content": "Where is it now?  Answer in <5 words> & {braces}."},
    ],
    "system": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": "Gates and Allen."},
        {"role": "user", "content": "When?"},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encoded_prompt_in_the_template_is_phi3s_chat_template_byte_for_byte(name: str, phi3_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
    messages = CONVERSATIONS[name]
    if messages[0]["role"] == "system":
        # The MLflow template opens with <|user|>, so the system text goes into the first user turn.
        folded = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}, *messages[2:]]
    else:
        folded = messages
    expected = tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)
    ours = ec.PROMPT_TEMPLATE.format(prompt=ec.encode_prompt(messages))
    assert ours == expected
    # And the same token ids, not only the same text.
    assert tokenizer(ours, add_special_tokens=False)["input_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_the_template_is_the_one_the_model_is_packaged_and_served_with() -> None:
    from finetune_phi.endpoint import engine
    from finetune_phi.training import job_module

    chat_format, fine_tune = job_module("chat_format"), job_module("fine_tune")
    # One object, not equal copies: the client's, the one the job saves the model with, the endpoint's.
    assert ec.PROMPT_TEMPLATE is fine_tune.PROMPT_TEMPLATE is chat_format.PROMPT_TEMPLATE
    assert ec.chat_format is engine.chat_format is chat_format


def test_encode_prompt_refuses_conversations_the_template_cannot_hold() -> None:
    with pytest.raises(ValueError, match="start with a user message"):
        ec.encode_prompt([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="followed by a user message"):
        ec.encode_prompt([{"role": "system", "content": "s"}])


# --- where a flow finds the endpoint --------------------------------------------------------------------


def test_the_flows_read_back_exactly_what_deploy_writes_beside_a_users_own_lines(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("# mine\nexport SEED=3\nPLAIN=a b # comment\nSINGLE='x y'\n")
    written = {"AZURE_ML_ENDPOINT": "https://e.inference.ml.azure.com/score", "AZURE_ML_API_KEY": 'k"$ey\\x',
               "AZURE_ML_ENDPOINT_KIND": "azure-catalog"}
    common.write_dotenv(path, written)
    read = ec.read_env_file(path)
    assert {name: read[name] for name in written} == written
    assert (read["SEED"], read["PLAIN"], read["SINGLE"]) == ("3", "a b", "x y")
    assert read == config.read_dotenv(path)


def test_endpoint_from_environment_env_beats_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ec, "_logged_guesses", set())
    env_file = tmp_path / "deploy.env"
    common.write_dotenv(env_file, {"AZURE_ML_ENDPOINT": "http://127.0.0.1:1/score", "AZURE_ML_API_KEY": "file-key",
                                   "AZURE_ML_ENDPOINT_KIND": "azure-catalog"})
    from_file = ec.endpoint_from_environment({"ENV_FILE": str(env_file)}, folders=[])
    assert (from_file.url, from_file.key, from_file.kind) == ("http://127.0.0.1:1/score", "file-key", "azure-catalog")
    mixed = ec.endpoint_from_environment({"ENV_FILE": str(env_file), "AZURE_ML_API_KEY": "env-key"}, folders=[])
    assert (mixed.key, mixed.kind) == ("env-key", "azure-catalog")
    # No ENV_FILE: `.env` in the first folder that has one.
    (tmp_path / "flow").mkdir()
    (tmp_path / "flow" / ".env").write_text('AZURE_ML_ENDPOINT="http://127.0.0.1:2/score"\nAZURE_ML_API_KEY="k2"\n')
    found = ec.endpoint_from_environment({}, folders=[tmp_path / "empty", tmp_path / "flow"])
    assert (found.url, found.key, found.kind) == ("http://127.0.0.1:2/score", "k2", "local")  # no kind: the URL's
    with pytest.raises(ec.EndpointError, match="AZURE_ML_ENDPOINT or AZURE_ML_API_KEY is not set.*deploy_model.py"):
        ec.endpoint_from_environment({}, folders=[tmp_path / "empty"])
    with pytest.raises(ec.EndpointError, match="AZURE_ML_ENDPOINT_KIND='cloud'"):
        ec.endpoint_from_environment({"AZURE_ML_ENDPOINT": "http://x/score", "AZURE_ML_API_KEY": "k",
                                      "AZURE_ML_ENDPOINT_KIND": "cloud"}, folders=[])


def test_read_timeout_is_reported_once_not_retried(server: ScriptedServer) -> None:
    # The server holds its answer until after ask() has returned: ask() can only have raised by giving
    # up on its own read timeout, never because an answer came (a client that ignored the timeout
    # would get the answer once the server's 30 s hold ran out, and pytest.raises would fail).
    hold = threading.Event()
    server.script.append(Reply(hold=hold))
    try:
        with pytest.raises(ec.EndpointError) as err:
            ec.ask(server.url, KEY, "slow?", timeout=(2.0, 0.3), session=fast_session())
    finally:
        hold.set()
    assert isinstance(err.value.__cause__, requests.exceptions.ReadTimeout)
    assert "did not answer within 0.3 s (timeout)" in str(err.value) and server.url in str(err.value)
    assert len(server.seen) == 1  # the server may be generating already: asking again doubles the load


def test_401_names_endpoint_and_status_but_never_the_key(server: ScriptedServer) -> None:
    server.script.append(Reply(status=401, echo_key=True))
    with pytest.raises(ec.EndpointError) as err:
        ec.ask(server.url, KEY, "hi", session=fast_session())
    message = str(err.value)
    assert "HTTP 401" in message and server.url in message and "deploy_model.py" in message
    assert KEY not in message and KEY[:12] not in message
    assert err.value.status == 401
    assert len(server.seen) == 1  # a wrong key does not become right by asking again


def test_429_with_retry_after_is_retried_after_waiting(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib3's Retry does the waiting between attempts; its clock is swapped for one that records
    # each wait instead of sleeping it, so the test reads what was waited, not how long it took.
    waits: list[float] = []
    monkeypatch.setattr(urllib3.util.retry, "time", SimpleNamespace(sleep=waits.append, time=time.time))
    server.script.extend([Reply(status=429, body={"error": "throttled"}, headers={"Retry-After": "7"}),
                          Reply(status=503, body={"error": "busy"}), Reply(status=503, body={"error": "busy"}),
                          Reply(body=["fourth time lucky"])])
    assert ec.ask(server.url, KEY, "hi", session=fast_session()) == "fourth time lucky"
    assert len(server.seen) == 4
    # The server's Retry-After, not the 10 ms backoff; then, without one, the backoff doubling.
    assert waits == [7, pytest.approx(0.02), pytest.approx(0.04)]


def test_503_is_retried_then_reported(server: ScriptedServer) -> None:
    server.default = Reply(status=503, body={"error": "no healthy upstream"})
    with pytest.raises(ec.EndpointError) as err:
        ec.ask(server.url, KEY, "hi", session=fast_session())
    assert "HTTP 503" in str(err.value) and server.url in str(err.value)
    assert "no healthy upstream" in str(err.value)
    assert len(server.seen) == 1 + ec.RETRIES


def test_500_is_not_retried(server: ScriptedServer) -> None:
    server.default = Reply(status=500, body={"error": "model crashed"})
    with pytest.raises(ec.EndpointError, match="HTTP 500: model crashed"):
        ec.ask(server.url, KEY, "hi", session=fast_session())
    assert len(server.seen) == 1


def test_connection_refused_names_the_endpoint() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(ec.EndpointError) as err:
        ec.ask(url, KEY, "hi", session=fast_session())
    assert url in str(err.value) and "cannot reach" in str(err.value)
    assert KEY not in str(err.value)


def test_unexpected_shapes_and_non_json_are_clear_errors(server: ScriptedServer) -> None:
    server.script.extend([Reply(body={"weird": 1}), Reply(body=b"<html>oops</html>")])
    with pytest.raises(ec.EndpointError, match="unexpected shape"):
        ec.ask(server.url, KEY, "hi", kind="local")
    with pytest.raises(ec.EndpointError, match="not JSON"):
        ec.ask(server.url, KEY, "hi", kind="local")


@pytest.mark.parametrize("endpoint", ["", "   ", None])
def test_missing_endpoint_says_to_deploy_first(endpoint: str | None) -> None:
    with pytest.raises(ec.EndpointError, match="run python deploy_model.py first"):
        ec.ask(endpoint, KEY, "hi")  # type: ignore[arg-type]


def test_bad_endpoint_url_and_empty_key_are_rejected_before_any_request(server: ScriptedServer) -> None:
    with pytest.raises(ec.EndpointError, match="not an http"):
        ec.ask("127.0.0.1:5001/score", KEY, "hi")
    with pytest.raises(ec.EndpointError, match="no key"):
        ec.ask(server.url, "", "hi")
    with pytest.raises(ValueError, match="question is empty"):
        ec.ask(server.url, KEY, "  ")
    with pytest.raises(ValueError, match="end with a user message"):
        ec.chat(server.url, KEY, [{"role": "assistant", "content": "hi"}])
    assert server.seen == []
