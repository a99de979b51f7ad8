"""What the endpoint's routes share: the loaded engine (or why it is not), the batcher, the key check
and their errors.

server.py wires the app and serves Azure's routes; openai_chat.py serves the OpenAI ones. Routes are
module-level functions: each finds what it needs on `request.app.state` (runtime, limits, in_flight,
key), hands generation to the Runtime there, and raises ApiError, which the app answers in OpenAI's
JSON error shape.
"""

from __future__ import annotations

import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from finetune_phi.endpoint import schemas
from finetune_phi.endpoint.batcher import Batcher, QueueFull
from finetune_phi.endpoint.caps import BatchCaps
from finetune_phi.endpoint.engine import Completion, Engine, InputTooLong, Message, SamplingParams


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.ErrorResponse, "description": "the body is not JSON, or the prompt does not fit the model's context"},
    401: {"model": schemas.ErrorResponse, "description": "missing or wrong key"},
    408: {"model": schemas.ErrorResponse, "description": "the request ran past the endpoint's timeout; its work was cancelled"},
    413: {"model": schemas.ErrorResponse, "description": "the body is over the endpoint's size limit"},
    415: {"model": schemas.ErrorResponse, "description": "the body is not sent as application/json"},
    429: {"model": schemas.ErrorResponse, "description": "too many requests in flight: retry after Retry-After seconds"},
    503: {"model": schemas.ErrorResponse, "description": "the model is still loading"},
}

BEARER = HTTPBearer(auto_error=False, description="the endpoint key (deploy_model.py writes it to .env)")


# async: a plain def dependency would take a thread-pool hop on every request.
async def require_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> None:
    """The key check every generation and model route depends on; the key is app.state.key (bytes)."""
    if credentials is None:
        raise ApiError(401, "missing key: send the header 'Authorization: Bearer <key>'", "authentication_error", "Authorization")
    # Constant time: how long a comparison takes must not tell how much of a guess was right.
    if not hmac.compare_digest(credentials.credentials.encode(), request.app.state.key):
        raise ApiError(
            401, "invalid key in the Authorization header: use AZURE_ML_API_KEY from .env", "authentication_error", "Authorization"
        )


def runtime_of(request: Request) -> "Runtime":
    return request.app.state.runtime  # type: ignore[no-any-return]


def require_text(conversation: Sequence[Message], param: str, status: int = 422) -> None:
    """The last message is what the model answers: blank, there is nothing to answer.

    Earlier messages may be empty (a chat history can hold an empty reply)."""
    if conversation[-1]["content"].strip():
        return
    field = f"{param}.{len(conversation) - 1}.content"
    raise ApiError(
        status, f"{field}: the last message is empty: put the question in it", "invalid_request_error", field
    )


class Runtime:
    """What the routes share: the engine once loaded, its load status, and the generation thread."""

    def __init__(self, model_name: str, engine: Engine | None, caps: BatchCaps = BatchCaps()) -> None:
        self.model_name = model_name
        self.engine = engine
        self.caps = caps
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self.batcher: Batcher | None = None  # built on the first request, once the engine is loaded

    @property
    def status(self) -> str:
        if self.engine is not None:
            return "ready"
        return "failed" if self.load_error is not None else "loading"

    def ready_engine(self) -> Engine:
        if self.engine is None:
            detail = f": {self.load_error}" if self.load_error else "; retry when GET /health/ready answers 200"
            raise ApiError(503, f"the model is not loaded{detail}", "service_unavailable")
        return self.engine

    async def generate(
        self,
        conversations: Sequence[Sequence[Message] | str],
        params: SamplingParams,
        param: str = "input_data",
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Completion]:
        """Replies from the shared batcher (continuous batching); cancelling the awaiting task abandons the work.

        `on_tokens(row, ids)` is called on the generation thread with each row's new token ids."""
        engine = self.ready_engine()
        if self.batcher is None or self.batcher.engine is not engine:
            self.batcher = Batcher(engine, caps=self.caps)
        try:
            return await self.batcher.submit(conversations, params, on_tokens=on_tokens)
        except InputTooLong as exc:
            raise ApiError(400, str(exc), "invalid_request_error", param) from exc
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error", headers={"Retry-After": "1"}) from exc

    def close(self) -> None:
        """Stop the generation thread (queued requests get an error); call at shutdown."""
        if self.batcher is not None:
            self.batcher.close()
