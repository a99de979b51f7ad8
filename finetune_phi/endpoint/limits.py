"""Admission control for the endpoint's POST routes: body size, content type, requests in flight, time.

An ASGI middleware (not Starlette's BaseHTTPMiddleware, which runs the app in a task group of its
own and hides cancellation) that answers, before the app sees the request:

    413  a declared Content-Length over the limit, or a (chunked) body that grows past it while read
    415  a Content-Type other than application/json
    429  more requests in flight than allowed (with Retry-After): a bounded load, not an unbounded queue
    408  the request (reading the body included) ran past the timeout; its work is cancelled

and cancels a request's work when its client disconnects.

A streamed response (text/event-stream) that has started when the timeout runs out is not cut
off here: the route reads the same deadline (scope[DEADLINE_SCOPE_KEY], event-loop time) and ends
its stream with an error event and `data: [DONE]`, as vLLM ends a stream on an error; this
middleware gives it STREAM_GRACE_S to do so, then cancels it. A stream counts as in flight until
it ends, so max_concurrent_requests bounds streams too. Health, model list and the API document
are GETs and never limited, so probes keep answering while the server is saturated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, MutableMapping

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from finetune_phi.endpoint import schemas

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# 32 inputs (schemas.MAX_INPUTS_PER_REQUEST) of a full 4k-token Phi-3 context are ~16 KB each as
# text: 1 MiB holds a full batch with room to spare, and bounds what one request can make us buffer.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# Requests admitted at once (generating, or queued in the batcher). Azure's
# max_concurrent_requests_per_instance defaults to 1 because its scoring server runs one request
# at a time; this one batches concurrent requests, up to batcher.DEFAULT_MAX_BATCH_ROWS (16) rows
# per generate: 16 one-conversation requests fill a batch, and the batcher's own queue (64) is
# never what refuses an HTTP request.
DEFAULT_MAX_CONCURRENT_REQUESTS = 16
# The same as the Azure deployment's request_timeout_ms (finetune_phi.azure.entities.REQUEST_TIMEOUT_MS).
DEFAULT_REQUEST_TIMEOUT_S = 90.0
RETRY_AFTER_S = 1
# Where the route finds the request's deadline (asyncio loop time), and how long past it a started
# stream may take to send its closing error event before it is cancelled.
DEADLINE_SCOPE_KEY = "finetune_phi.deadline"
STREAM_GRACE_S = 5.0


class AsciiJSONResponse(JSONResponse):
    """Errors may quote what the client sent (an unknown field's name), lone surrogates included
    ("\\ud800" is valid JSON): UTF-8 cannot encode them, ASCII escapes send them back as sent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
    **extra: Any,
) -> JSONResponse:
    """OpenAI's error shape, used by every error this server sends."""
    body = schemas.ErrorResponse(error=schemas.ErrorBody(message=message, type=type_, param=param, code=code))
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return AsciiJSONResponse({**body.model_dump(), **extra}, status_code=status, headers=headers)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be a positive number, not {value!r}"
            for name, value in (
                ("max_body_bytes", self.max_body_bytes),
                ("max_concurrent_requests", self.max_concurrent_requests),
                ("request_timeout_s", self.request_timeout_s),
            )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
        ]
        if problems:
            raise ValueError("; ".join(problems))


class InFlight:
    """How many limited requests are being served now (reported by the health routes)."""

    def __init__(self) -> None:
        self.count = 0


class BodyTooLarge(Exception):
    pass


def is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class RequestLimits:
    """ASGI middleware applying `limits` to POST requests on `paths`."""

    def __init__(self, app: ASGIApp, *, limits: Limits, paths: Collection[str], in_flight: InFlight) -> None:
        self.app = app
        self.limits = limits
        self.paths = frozenset(paths)
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(Headers(scope=scope))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        self.in_flight.count += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            self.in_flight.count -= 1

    def _refusal(self, headers: Headers) -> JSONResponse | None:
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        # uvicorn has already refused a Content-Length that is not a number.
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _too_large(limit)
        content_type = headers.get("content-type")
        if content_type is None or not is_json(content_type):
            shown = f"'{content_type}'" if content_type else "none"
            return error_response(
                415,
                f"Content-Type is {shown}: send the body as JSON with 'Content-Type: application/json'",
                "invalid_request_error",
                "Content-Type",
            )
        if self.in_flight.count >= self.limits.max_concurrent_requests:
            return error_response(
                429,
                f"the endpoint is serving its maximum of {self.limits.max_concurrent_requests} requests: "
                f"retry after {RETRY_AFTER_S} s",
                "rate_limit_error",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return None

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = finished = streaming = False
        disconnected = asyncio.Event()

        async def send_tracked(message: Message) -> None:
            nonlocal started, finished, streaming
            if message["type"] == "http.response.start":
                started = True
                content_type = Headers(raw=message.get("headers") or []).get("content-type", "")
                streaming = content_type.startswith("text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout_s
        try:
            body = await asyncio.wait_for(self._read_body(receive), timeout=self.limits.request_timeout_s)
        except BodyTooLarge:
            await _too_large(self.limits.max_body_bytes)(scope, receive, send)
            return
        except TimeoutError:
            await _timed_out(self.limits.request_timeout_s)(scope, receive, send)
            return
        if body is None:  # the client left while sending
            return

        delivered = False

        async def replay() -> Message:
            # The body was read above; afterwards the app only learns about the client leaving.
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        scope[DEADLINE_SCOPE_KEY] = deadline
        app_task = asyncio.ensure_future(self.app(scope, replay, send_tracked))
        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait(
                {app_task, watcher}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done and streaming:  # the stream ends itself with an error event (docstring)
                done, _ = await asyncio.wait({app_task, watcher}, timeout=STREAM_GRACE_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when this task is cancelled (uvicorn's graceful-shutdown timeout ran out).
            watcher.cancel()
            if not app_task.done():
                app_task.cancel()
        if app_task in done:
            app_task.result()  # re-raise the app's own error for the server's 500 handler
            return
        # Cancelling the route's task cancels its wait for the model, which drops its queued work.
        await asyncio.gather(app_task, return_exceptions=True)
        if finished:  # the server reports the end of a sent response as a disconnect too
            return
        if watcher in done:
            log.info("%s %s: the client disconnected; its work was cancelled", scope["method"], scope["path"])
            return
        log.warning(
            "%s %s ran past the %.3g s request timeout; its work was cancelled",
            scope["method"],
            scope["path"],
            self.limits.request_timeout_s,
        )
        if not started:
            await _timed_out(self.limits.request_timeout_s)(scope, receive, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnected; BodyTooLarge as soon as it passes the
        limit, so a chunked body of any length is never held beyond max_body_bytes."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> JSONResponse:
    return error_response(
        413,
        f"the body is larger than this endpoint's limit of {limit} bytes: send fewer or shorter inputs",
        "invalid_request_error",
        "body",
        headers={"Connection": "close"},
    )


def _timed_out(timeout_s: float) -> JSONResponse:
    return error_response(
        408,
        f"the request took longer than this endpoint's {timeout_s:g} s timeout: "
        "ask for fewer max_new_tokens or shorter inputs, or retry when the endpoint is less busy",
        "timeout",
        headers={"Connection": "close"},
    )
