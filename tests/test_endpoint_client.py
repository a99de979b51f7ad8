"""The endpoint client against a real HTTP server on 127.0.0.1 that plays scripted answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from finetune_phi import endpoint_client as ec

KEY = "s3cr3t-key-0123456789abcdef"


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: ["ok"])
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    echo_key: bool = False  # put the received Authorization header in the body (a leaky server)


@dataclass
class Seen:
    headers: dict[str, str]
    body: Any
    at: float


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
                outer.seen.append(Seen(dict(self.headers), json.loads(raw or b"null"), time.monotonic()))
                reply = outer.script.popleft() if outer.script else outer.default
                if reply.delay:
                    time.sleep(reply.delay)
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
    assert seen.body["params"]["do_sample"] is True  # defaults kept where not overridden


def test_chat_posts_the_studio_shape_with_history(server: ScriptedServer) -> None:
    server.script.append(Reply(body={"output": "Seattle."}))
    history = [{"inputs": {"question": "Hi"}, "outputs": {"answer": "Hello!"}}]
    messages = ec.messages_from_history(history, "Where is Microsoft?")
    assert ec.chat(server.url, KEY, messages) == "Seattle."
    body = server.seen[0].body
    assert body["input_data"]["input_string"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Where is Microsoft?"},
    ]
    assert body["input_data"]["parameters"]["max_new_tokens"] == 128


def test_read_timeout_is_reported_once_not_retried(server: ScriptedServer) -> None:
    server.script.append(Reply(delay=1.5))
    start = time.monotonic()
    with pytest.raises(ec.EndpointError) as err:
        ec.ask(server.url, KEY, "slow?", timeout=(2.0, 0.3), session=fast_session())
    assert time.monotonic() - start < 1.4
    assert "timeout" in str(err.value) and server.url in str(err.value)
    assert len(server.seen) == 1


def test_401_names_endpoint_and_status_but_never_the_key(server: ScriptedServer) -> None:
    server.script.append(Reply(status=401, echo_key=True))
    with pytest.raises(ec.EndpointError) as err:
        ec.ask(server.url, KEY, "hi", session=fast_session())
    message = str(err.value)
    assert "HTTP 401" in message and server.url in message and "deploy_model.py" in message
    assert KEY not in message and KEY[:12] not in message
    assert err.value.status == 401
    assert len(server.seen) == 1  # a wrong key does not become right by asking again


def test_429_with_retry_after_is_retried_after_waiting(server: ScriptedServer) -> None:
    server.script.extend([Reply(status=429, body={"error": "throttled"}, headers={"Retry-After": "1"}),
                          Reply(body=["second time lucky"])])
    assert ec.ask(server.url, KEY, "hi", session=fast_session()) == "second time lucky"
    first, second = server.seen
    assert second.at - first.at >= 0.9  # waited the server's Retry-After, not the 10 ms backoff


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
        ec.ask(server.url, KEY, "hi")
    with pytest.raises(ec.EndpointError, match="not JSON"):
        ec.ask(server.url, KEY, "hi")


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
