"""The endpoint under bad input, overload, slow clients and shutdown, probed as an operator would.

Real servers only: uvicorn on 127.0.0.1 (a thread of this process, or the CLI in a subprocess) with
the tiny random Phi-3. A greedy reply to "hi" from that model never meets a stop token, so
`max_new_tokens: 2048` keeps it generating until its 512-token context is full (about a second):
that is the slow request the overload, timeout and shutdown tests need.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from finetune_phi.endpoint import KEY_ENV
from finetune_phi.endpoint.__main__ import EXIT_USAGE, build_parser, is_loopback
from finetune_phi.endpoint.__main__ import main as endpoint_main
from finetune_phi.endpoint.engine import Engine
from finetune_phi.endpoint.server import create_app
from helpers_endpoint import AUTH, KEY, ProcessServer, ThreadServer, assert_generation_stopped, count_forward_passes, wait_until
from helpers_model import RegisteredModel, registered_tiny_model, slowed, tiny_phi3

MAX_BODY = 64 * 1024
JSON = {"Content-Type": "application/json"}
SLOW_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2048, "temperature": 0}
GOOD_SCORE = {"input_data": ["hi"], "params": {"max_new_tokens": 2}}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> RegisteredModel:
    return registered_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")


@pytest.fixture(scope="module")
def engine() -> Engine:
    """A fresh engine per module: tests hook its model to count forward passes."""
    return Engine(*tiny_phi3())


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(KEY, engine=engine, max_body_bytes=MAX_BODY)) as running:
        yield running


@pytest.fixture
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        yield c


def raw(body: Any) -> bytes:
    """JSON as bytes with ASCII escapes, so that lone surrogates travel as `\\ud800` like any client sends them."""
    return json.dumps(body).encode()


def chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    """A body with no Content-Length: httpx sends it chunked."""
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def chat(messages: list[dict[str, Any]], **extra: Any) -> bytes:
    return raw({"messages": messages, **extra})


USER_HI = [{"role": "user", "content": "hi"}]

# (id, path, body, extra headers, status, param). Every case must come back as a JSON error with
# that status whose `param` names the field at fault and whose message mentions it.
BAD_REQUESTS: list[tuple[str, str, Any, dict[str, str], int, str]] = [
    # -- the body itself
    ("malformed-json", "/score", b'{"input_data": [', JSON, 400, "body"),
    ("not-utf8", "/score", b"\xff\xfe{}", JSON, 400, "body"),
    ("nested-too-deep", "/score", b"[" * 20_000 + b"]" * 20_000, JSON, 400, "body"),
    ("json-array-not-object", "/score", raw(["hi"]), JSON, 422, "body"),
    ("content-type-text", "/score", raw(GOOD_SCORE), {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("content-type-form", "/score", b"input_data=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("content-type-missing", "/score", raw(GOOD_SCORE), {}, 415, "Content-Type"),
    ("too-large-content-length", "/score", b" " * (MAX_BODY + 1), JSON, 413, "body"),
    ("too-large-chunked", "/score", lambda: chunks(MAX_BODY + 1), JSON, 413, "body"),
    # -- /score fields
    ("input-data-missing", "/score", raw({"params": {"max_new_tokens": 2}}), JSON, 422, "input_data"),
    ("input-data-a-string", "/score", raw({"input_data": "hi"}), JSON, 422, "input_data"),
    ("input-data-empty", "/score", raw({"input_data": []}), JSON, 422, "input_data"),
    ("input-data-a-number", "/score", raw({"input_data": [3]}), JSON, 422, "input_data.0"),
    # A conversation is ONE prompt string (the contract): lists and message objects are refused by index.
    ("conversation-a-list", "/score", raw({"input_data": [[]]}), JSON, 422, "input_data.0"),
    ("messages-a-list", "/score", raw({"input_data": ["hi", [{"role": "user", "content": "hi"}]]}), JSON, 422, "input_data.1"),
    ("message-object", "/score", raw({"input_data": [{"role": "user", "content": "hi"}]}), JSON, 422, "input_data.0"),
    ("prompt-blank", "/score", raw({"input_data": ["  "]}), JSON, 422, "input_data.0"),
    ("prompt-empty", "/score", raw({"input_data": ["hi", ""]}), JSON, 422, "input_data.1"),
    ("prompt-lone-surrogate", "/score", raw({"input_data": ["a\ud800b"]}), JSON, 422, "input_data.0"),
    ("prompt-over-context", "/score", raw({"input_data": ["word " * 600], "params": {"max_new_tokens": 4}}), JSON, 400, "input_data"),
    ("max-new-tokens-negative", "/score", raw({"input_data": ["hi"], "params": {"max_new_tokens": -5}}), JSON, 422, "params.max_new_tokens"),
    ("max-new-tokens-huge", "/score", raw({"input_data": ["hi"], "params": {"max_new_tokens": 10**9}}), JSON, 422, "params.max_new_tokens"),
    ("max-new-tokens-text", "/score", raw({"input_data": ["hi"], "params": {"max_new_tokens": "many"}}), JSON, 422, "params.max_new_tokens"),
    ("max-new-tokens-infinity", "/score", b'{"input_data": ["hi"], "params": {"max_new_tokens": Infinity}}', JSON, 422, "params.max_new_tokens"),
    ("temperature-negative", "/score", raw({"input_data": ["hi"], "params": {"temperature": -0.5}}), JSON, 422, "params.temperature"),
    ("temperature-text", "/score", raw({"input_data": ["hi"], "params": {"temperature": "hot"}}), JSON, 422, "params.temperature"),
    ("temperature-nan", "/score", b'{"input_data": ["hi"], "params": {"temperature": NaN}}', JSON, 422, "params.temperature"),
    ("top-p-zero", "/score", raw({"input_data": ["hi"], "params": {"top_p": 0}}), JSON, 422, "params.top_p"),
    ("param-unknown-but-typed-wrong", "/score", raw({"input_data": ["hi"], "params": {"max_tokenz": 5, "top_k": "5"}}), JSON, 422, "params.top_k"),
    # The model-catalog (Studio) shape, broken.
    ("studio-empty-conversation", "/score", raw({"input_data": {"input_string": []}}), JSON, 422, "input_data.input_string"),
    ("studio-blank-question", "/score", raw({"input_data": {"input_string": [{"role": "user", "content": ""}]}}), JSON, 422, "input_data.input_string.0.content"),
    ("studio-role-tool", "/score", raw({"input_data": {"input_string": [{"role": "tool", "content": "x"}]}}), JSON, 422, "input_data.input_string.0.role"),
    ("studio-bad-parameter", "/score", raw({"input_data": {"input_string": [{"role": "user", "content": "x"}], "parameters": {"max_new_tokens": 0}}}), JSON, 422, "input_data.parameters.max_new_tokens"),
    ("sampling-at-temperature-0", "/score", raw({"input_data": ["hi"], "params": {"do_sample": True, "temperature": 0}}), JSON, 422, "params.temperature"),
    # -- /v1/chat/completions fields: 400 for every invalid request, as OpenAI and vLLM answer
    ("chat-malformed-json", "/v1/chat/completions", b'{"messages": [}', JSON, 400, "body"),
    ("chat-messages-missing", "/v1/chat/completions", raw({"max_tokens": 2}), JSON, 400, "messages"),
    ("chat-messages-empty", "/v1/chat/completions", chat([]), JSON, 400, "messages"),
    ("chat-role-tool", "/v1/chat/completions", chat([{"role": "tool", "content": "hi"}]), JSON, 400, "messages.0.role"),
    ("chat-content-blank", "/v1/chat/completions", chat([{"role": "user", "content": " \n"}]), JSON, 400, "messages.0.content"),
    ("chat-content-no-parts", "/v1/chat/completions", chat([{"role": "user", "content": []}]), JSON, 400, "messages.0.content"),
    ("chat-max-tokens-negative", "/v1/chat/completions", chat(USER_HI, max_tokens=-1), JSON, 400, "max_tokens"),
    ("chat-temperature-negative", "/v1/chat/completions", chat(USER_HI, temperature=-1), JSON, 400, "temperature"),
    ("chat-too-many-stops", "/v1/chat/completions", chat(USER_HI, stop=[str(i) for i in range(17)]), JSON, 400, "stop"),
    ("chat-model-lone-surrogate", "/v1/chat/completions", chat(USER_HI, model="m\udfff"), JSON, 400, "model"),
    ("chat-over-context", "/v1/chat/completions", chat([{"role": "user", "content": "word " * 600}]), JSON, 400, "messages"),
    # -- the key
    ("key-missing", "/score", raw(GOOD_SCORE), {**JSON, "Authorization": ""}, 401, "Authorization"),
    ("key-wrong", "/score", raw(GOOD_SCORE), {**JSON, "Authorization": "Bearer not-the-key"}, 401, "Authorization"),
    ("key-wrong-scheme", "/v1/chat/completions", chat(USER_HI), {**JSON, "Authorization": f"Basic {KEY}"}, 401, "Authorization"),
]


def send(client: httpx.Client, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    merged = {**AUTH, **headers}
    if not merged.get("Authorization"):
        merged.pop("Authorization")
    content = body() if callable(body) else body
    return client.post(path, content=content, headers=merged)


@pytest.mark.parametrize("case_id,path,body,headers,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_a_json_error_naming_the_field(
    client: httpx.Client, case_id: str, path: str, body: Any, headers: dict[str, str], status: int, param: str
) -> None:
    response = send(client, path, body, headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["param"] == param
    assert param.split(".")[-1].lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize("depth", [500, 900])
@pytest.mark.parametrize("template", ['{"input_data": %s}', '{"input_data": ["hi"], "params": %s}', "%s"])
def test_deeply_nested_json_is_a_client_error(client: httpx.Client, template: str, depth: int) -> None:
    # Deep enough to pass json.loads yet break a recursive encoder echoing it back (it did: 500).
    body = template % ("[" * depth + "]" * depth)
    response = client.post("/score", content=body.encode(), headers={**AUTH, **JSON})
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["param"].split(".")[0] in ("body", "input_data", "params")


def test_bad_requests_table_is_big_enough_and_covers_every_status() -> None:
    assert len(BAD_REQUESTS) >= 25
    assert {case[4] for case in BAD_REQUESTS} == {400, 401, 413, 415, 422}


def test_after_every_bad_request_the_server_still_answers(client: httpx.Client) -> None:
    for case_id, path, body, headers, status, _ in BAD_REQUESTS:
        assert send(client, path, body, headers).status_code == status, case_id
    good = client.post("/score", json=GOOD_SCORE, headers=AUTH)
    assert good.status_code == 200 and len(good.json()) == 1
    assert client.get("/health/ready").json()["in_flight"] == 0


def test_key_comparison_is_constant_time(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert client.get("/v1/models", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert compared == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]


# --- size limits checked before the body is read -------------------------------------------------


def http_exchange(port: int, head: str, body: bytes = b"", timeout: float = 10) -> str:
    """Send a request head (and some body) on a raw socket without finishing the body; the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    return reply.decode(errors="replace")


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def request_head(port: int, extra: str) -> str:
    return (
        f"POST /score HTTP/1.1\nHost: 127.0.0.1:{port}\nAuthorization: Bearer {KEY}\n"
        f"Content-Type: application/json\n{extra}"
    )


def test_a_huge_declared_body_is_refused_without_waiting_for_it(server: ThreadServer) -> None:
    # A gigabyte is announced and never sent: only an answer given before reading it arrives.
    reply = http_exchange(server.port, request_head(server.port, "Content-Length: 1000000000\n"))
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"param":"body"' in reply


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server: ThreadServer) -> None:
    # One chunk just past the limit and no terminating chunk: the server must answer mid-body.
    chunk = b"x" * (MAX_BODY + 1)
    reply = http_exchange(
        server.port, request_head(server.port, "Transfer-Encoding: chunked\n"), f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    )
    assert reply.startswith("HTTP/1.1 413"), reply


def test_a_body_sent_too_slowly_times_out_with_408(engine: Engine) -> None:
    with ThreadServer(create_app(KEY, engine=engine, request_timeout_s=0.5)) as running:
        # The socket gives up after 10 s (raising), so a 408 here came from the server's own 0.5 s timeout.
        reply = http_exchange(running.port, request_head(running.port, "Content-Length: 100\n"), b'{"input_data"')
        assert reply.startswith("HTTP/1.1 408"), reply
        assert httpx.get(f"{running.base}/health/live", timeout=5).json()["in_flight"] == 0


# --- overload and timeouts ------------------------------------------------------------------------


def in_background(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def test_beyond_max_concurrent_requests_is_429_with_retry_after(engine: Engine) -> None:
    with ThreadServer(create_app(KEY, engine=engine, max_concurrent_requests=2)) as running:
        with httpx.Client(base_url=running.base, timeout=60) as c:

            def in_flight() -> int:
                return int(c.get("/health/live").json()["in_flight"])

            slow = [in_background(lambda: httpx.post(f"{running.base}/v1/chat/completions", json=SLOW_CHAT, headers=AUTH, timeout=60)) for _ in range(2)]
            wait_until(lambda: in_flight() == 2, 10, "both slow requests are in flight")
            refused = c.post("/score", json=GOOD_SCORE, headers=AUTH)
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            # Probes are not limited: a saturated server is alive and ready, not dead.
            ready = c.get("/health/ready")
            assert ready.status_code == 200 and ready.json()["max_concurrent_requests"] == 2
            for thread, result in slow:
                thread.join(timeout=60)
                assert result and result[0].status_code == 200, result
                assert result[0].json()["choices"][0]["finish_reason"] == "length"
            assert in_flight() == 0
            assert c.post("/score", json=GOOD_SCORE, headers=AUTH).status_code == 200


def test_a_request_past_the_timeout_is_408_and_its_generation_stops(engine: Engine) -> None:
    calls, remove = count_forward_passes(engine)
    try:
        # ~500 steps fill the tiny model's context: at 5 ms more each they take 2.5 s, far past 0.3 s.
        with ThreadServer(create_app(KEY, engine=engine, request_timeout_s=0.3)) as running, slowed(engine.model, 0.005):
            with httpx.Client(base_url=running.base, timeout=60) as c:
                response = c.post("/v1/chat/completions", json=SLOW_CHAT, headers=AUTH)
                assert response.status_code == 408, response.text
                assert response.json()["error"]["type"] == "timeout"
                assert c.get("/health/live").json()["in_flight"] == 0
                # The abandoned generation stops within a step or two; left running it would go on
                # for ~500 more forward passes.
                time.sleep(0.3)
                before = calls[0]
                time.sleep(0.5)
                assert calls[0] - before <= 2, f"{calls[0] - before} forward passes after the 408"
                assert before < 400, "the generation ran to the end of the context"
                assert c.post("/score", json=GOOD_SCORE, headers=AUTH).status_code == 200
    finally:
        remove()


def test_a_client_that_disconnects_has_its_generation_cancelled(server: ThreadServer, engine: Engine) -> None:
    calls, remove = count_forward_passes(engine)
    try:
        body = json.dumps(SLOW_CHAT).encode()
        head = request_head(server.port, f"Content-Length: {len(body)}\n").replace("POST /score", "POST /v1/chat/completions")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            wait_until(lambda: calls[0] > 5, 10, "generation has started")
        assert_generation_stopped(server.base, calls, max_before=400)
    finally:
        remove()


# --- binding and flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host,loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("myhost", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_default_bind_is_loopback_and_anything_else_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert build_parser().parse_args(["--model-uri", "models:/x/1"]).host == "127.0.0.1"
    monkeypatch.delenv(KEY_ENV, raising=False)  # stop right after the checks: nothing is served
    with caplog.at_level(logging.WARNING, logger="finetune_phi.endpoint"):
        assert endpoint_main(["--model-uri", "models:/x/1", "--host", "127.0.0.1", "--port", "1"]) == EXIT_USAGE
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        assert endpoint_main(["--model-uri", "models:/x/1", "--host", "0.0.0.0", "--port", "1"]) == EXIT_USAGE
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "0.0.0.0" in warning.getMessage() and "other machines" in warning.getMessage()


@pytest.mark.parametrize(
    "flag,value", [("--max-concurrent-requests", "0"), ("--request-timeout-s", "-1"), ("--max-body-bytes", "lots"), ("--graceful-shutdown-s", "inf")]
)
def test_limit_flags_refuse_nonsense(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--model-uri", "models:/x/1", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_create_app_refuses_nonsense_limits(engine: Engine) -> None:
    with pytest.raises(ValueError, match="max_concurrent_requests.*request_timeout_s"):
        create_app(KEY, engine=engine, max_concurrent_requests=0, request_timeout_s=float("nan"))


# --- graceful shutdown, with the real CLI ------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tiny_model: RegisteredModel, tmp_path: Path) -> None:
    with ProcessServer(tiny_model, tmp_path / "server.log", "--graceful-shutdown-s", "20") as running:
        thread, result = in_background(
            lambda: httpx.post(f"{running.base}/v1/chat/completions", json=SLOW_CHAT, headers=AUTH, timeout=60)
        )
        wait_until(
            lambda: httpx.get(f"{running.base}/health/live", timeout=5).json()["in_flight"] == 1, 10, "the request is in flight"
        )
        running.terminate()
        thread.join(timeout=60)
        assert result, "no reply"
        assert result[0].status_code == 200, result[0].text
        reply = result[0].json()
        # The whole generation ran (the context filled up), not a reply cut short by the stop.
        assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] > 400
        assert running.wait(timeout=30) == 0, running.log()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.base}/health/live", timeout=5)
    log = running.log()
    assert "Shutting down" in log and "Traceback" not in log
