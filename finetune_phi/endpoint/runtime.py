"""What the endpoint's routes share: the loaded engine (or why it is not), the batcher, and their errors.

server.py wires the routes; openai_chat.py writes the OpenAI contract; both hand generation to the
Runtime an app holds (app.state.runtime) and raise ApiError, which the app answers in OpenAI's JSON
error shape.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

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
            caps = self.caps
            self.batcher = Batcher(engine, max_step_tokens=caps.max_step_tokens, max_batch_tokens=caps.max_batch_tokens,
                                   packed_weights=caps.packed_weights)  # fmt: skip
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
