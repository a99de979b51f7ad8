"""A stand-in for an Azure ML model-catalog chat-completion deployment (kind "azure-catalog"), on 127.0.0.1.

It answers what the Phi-3-mini-4k-instruct model card documents for real-time inference
(Azure/azureml-assets, assets/models/system/phi-3-mini-4k-instruct/description.md, "Inference sample
inputs and outputs"): a POST of

    {"input_data": {"input_string": [{"role": ..., "content": ...}, ...], "parameters": {...}}}

with `Authorization: Bearer <key>` gets `{"output": "<reply>"}`. The reply is made up from the last
user message, so a test can tell turns apart; every request is recorded.

What it cannot show: the catalog scoring script itself (how it applies the chat template and the
parameters, its real errors and status codes), a real model's replies and latency, Azure's front end
(key rotation, throttling with 429, headers such as azureml-model-deployment), and whether a
fine-tuned catalog deployment answers exactly like the base model's card. Only a real deployment can.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import requests


@dataclass
class Exchange:
    """One request a recording server saw, and what it answered (shared with test_promptflow's proxy)."""

    request: Any
    authorization: str
    status: int
    response: Any


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """Serve `handler` on a free port of 127.0.0.1 in a daemon thread; returns the server and its /score URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/score"


# The catalog scoring script's own words for a request it cannot read (its "correct input format").
CATALOG_FORMAT = (
    '{"input_data": {"input_string": [{"role":"user", "content": "str1"}, '
    '{"role": "assistant", "content": "str2"} ....], "parameters": {"k1":"v1", "k2":"v2"}}}'
)


class RecordingServer:
    """A JSON server on 127.0.0.1 that records every POST; subclasses say what to answer."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.url = ""

    def handle(self, raw: bytes, headers: Any) -> tuple[Exchange, bytes]:
        """The exchange to record for one POST body, and the response body to send."""
        raise NotImplementedError

    def handle_path(self, path: str, raw: bytes, headers: Any) -> tuple[Exchange, bytes | Iterator[bytes], str]:
        """As handle, for a POST to `path`, with the response's Content-Type; a body given as an
        iterator is sent piece by piece as it comes (an event stream), chunked."""
        exchange, data = self.handle(raw, headers)
        return exchange, data, "application/json"

    def start(self) -> Any:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked bodies (handle_path); every other answer has a Content-Length
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                exchange, data, content_type = server.handle_path(self.path, raw, self.headers)
                server.exchanges.append(exchange)
                self.send_response(exchange.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Connection", "close")  # one request per connection, as with HTTP/1.0
                self.close_connection = True
                if isinstance(data, bytes):
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                # Chunked, so that a reader gets each piece as it is sent.
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for piece in data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd, self.url = serve_on_loopback(Handler)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def since(self, n: int) -> list[Exchange]:
        return self.exchanges[n:]


class CatalogStandIn(RecordingServer):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    @staticmethod
    def reply_to(body: Any) -> tuple[int, Any]:
        data = body.get("input_data") if isinstance(body, dict) else None
        messages = data.get("input_string") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(data.get("parameters", {}), dict):
            return 400, {"error": f"Expected input format: {CATALOG_FORMAT}"}
        if not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            return 400, {"error": f"Expected input format: {CATALOG_FORMAT}"}
        users = [m["content"] for m in messages if m["role"] == "user"]
        # A leading space, as in the model card's sample output.
        return 200, {"output": f" Catalog reply {len(users)} to: {users[-1] if users else ''}"}

    def handle(self, raw: bytes, headers: Any) -> tuple[Exchange, bytes]:
        auth = headers.get("Authorization", "")
        try:
            body: Any = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode("utf-8", "replace")
        if auth != f"Bearer {self.key}":
            status, answer = 401, {"message": "Invalid authentication"}
        else:
            status, answer = self.reply_to(body)
        return Exchange(body, auth, status, answer), json.dumps(answer).encode()


# The request fields a serverless chat-completions route takes (Azure AI model inference's chat
# completions: https://learn.microsoft.com/azure/ai-foundry/model-inference/reference/reference-model-inference-chat-completions).
# Others get 422 unless the caller sends `extra-parameters: pass-through` (or `drop`), the API's header
# for parameters it does not define (azure-rest-api-specs, ai/data-plane/ModelInference openapi 2025-04-01).
SERVERLESS_FIELDS = frozenset({
    "messages", "model", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed",
    "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
})  # fmt: skip


class ServerlessStandIn(RecordingServer):
    """A stand-in for an Azure ML serverless endpoint (kind "azure-serverless") on 127.0.0.1.

    What Azure's fine-tuning-as-a-service samples use: POST {scoring URI}/v1/chat/completions (or
    /chat/completions) with the key as `Authorization: <key>`, `Authorization: Bearer <key>` or
    `api-key: <key>`, an OpenAI chat body; a chat.completion back, or with "stream": true
    chat.completion.chunk events ending with `data: [DONE]`. Other routes (a serverless endpoint has
    no /score) answer 404; unknown fields and a body without messages 422. The reply is made up from
    the last user message. What it cannot show: the real service's error texts, content filtering,
    rate limits (429 with Retry-After), a real model's replies and its token accounting.
    """

    ROUTES = ("/v1/chat/completions", "/chat/completions")

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    @staticmethod
    def reply_to(body: Any, extra_parameters: str = "error") -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return 422, {"error": {"code": "Invalid input", "status": 422, "message": "messages: Field required"}}
        extra = sorted(set(body) - SERVERLESS_FIELDS)
        if extra and extra_parameters == "error":
            return 422, {"error": {"code": "Invalid input", "status": 422,
                                   "message": f"extra parameters {extra} are not allowed"}}  # fmt: skip
        users = [m.get("content", "") for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        text = f"Serverless reply {len(users)} to: {users[-1] if users else ''}"
        return 200, {
            "id": "chatcmpl-standin", "object": "chat.completion", "created": 1765090000, "model": "phi-4-mini-ft",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": None},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 9, "completion_tokens": len(text.split()), "total_tokens": 9 + len(text.split())},
        }  # fmt: skip

    def _authorized(self, headers: Any) -> bool:
        auth = headers.get("Authorization", "")
        return auth in (self.key, f"Bearer {self.key}") or headers.get("api-key", "") == self.key

    def handle_path(self, path: str, raw: bytes, headers: Any) -> tuple[Exchange, Any, str]:
        try:
            body: Any = json.loads(raw or b"null")
        except ValueError:
            body = raw.decode("utf-8", "replace")
        auth = headers.get("Authorization", "") or headers.get("api-key", "")
        route = path.split("?", 1)[0]
        if route not in self.ROUTES:
            status, answer = 404, {"error": {"code": "NotFound", "message": f"no route {route}"}}
        elif not self._authorized(headers):
            status, answer = 401, {"error": {"code": "Unauthorized", "message": "Access denied due to invalid key"}}
        else:
            status, answer = self.reply_to(body, headers.get("extra-parameters", "error"))
        exchange = Exchange(body, auth, status, answer)
        if status != 200 or not body.get("stream"):
            return exchange, json.dumps(answer).encode(), "application/json"
        return exchange, self._events(answer), "text/event-stream"

    @staticmethod
    def _events(answer: dict[str, Any]) -> Iterator[bytes]:
        words = answer["choices"][0]["message"]["content"].split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
                "model": answer["model"]}  # fmt: skip
        first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        yield b"data: " + json.dumps(first).encode() + b"\n\n"
        for piece in pieces:
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield b"data: " + json.dumps(last).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


# --- a recording pass-through proxy in front of the real endpoint --------------------------------------


class RecordingProxy(RecordingServer):
    """Forwards each POST to the same path on the endpoint (/score, or /v1/chat/completions for the
    chat flow's stream) and records it. An event stream is passed on event by event; its recorded
    response is the joined reply as a one-item list, the shape /score answers, so `response[0]` is
    the reply either way. `hold_stream_after(n)` holds the next stream after n content events until
    `resume` is set: what the client shows meanwhile is what arrived before the end."""

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream
        self.base = upstream.removesuffix("/score")
        self.hold_after: int | None = None
        self.held = threading.Event()
        self.resume = threading.Event()
        self.pieces_before_hold: list[str] = []
        self.streams_done = 0

    def hold_stream_after(self, events: int) -> None:
        self.hold_after, self.pieces_before_hold = events, []
        self.held.clear()
        self.resume.clear()

    def handle_path(self, path: str, raw: bytes, headers: Any) -> tuple[Exchange, Any, str]:
        forwarded = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type", "accept")}
        upstream = requests.post(self.base + path, data=raw, headers=forwarded, timeout=120, stream=True)
        content_type = upstream.headers.get("content-type", "application/json")
        if not content_type.startswith("text/event-stream"):
            try:
                decoded = upstream.json()
            except ValueError:
                decoded = upstream.text
            exchange = Exchange(json.loads(raw), headers.get("Authorization", ""), upstream.status_code, decoded)
            return exchange, upstream.content, content_type
        exchange = Exchange(json.loads(raw), headers.get("Authorization", ""), upstream.status_code, [""])
        hold_after, self.hold_after = self.hold_after, None

        def relay() -> Iterator[bytes]:
            pieces = 0
            with upstream:
                for line in upstream.iter_lines(chunk_size=None):  # each event as it comes
                    yield line + b"\n"
                    if not line.startswith(b"data: {"):
                        continue
                    for choice in json.loads(line[len(b"data: ") :]).get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            exchange.response[0] += piece
                            pieces += 1
                            if hold_after is not None and pieces == hold_after:
                                self.pieces_before_hold = [exchange.response[0]]
                                yield b"\n"
                                self.held.set()
                                self.resume.wait(30)
            self.streams_done += 1  # not when the client left mid-stream (the write raised)

        return exchange, relay(), content_type
