"""The HTTP side of the local endpoint: Azure ML's scoring contract plus OpenAI chat completions.

Routes (all JSON):
    GET  /, /health/live      liveness (no key)
    GET  /health/ready        200 once the model is loaded, 503 before (no key)
    POST /score               Azure ML managed online endpoint contract (Bearer key)
    POST /v1/chat/completions OpenAI chat completions (Bearer key), GET /v1/models
    GET  /openapi.json        this API, described from the typed bodies in schemas.py

Generation runs on one worker thread so the event loop keeps answering health checks and
rejecting bad requests while a batch is being generated.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune_phi.endpoint import schemas
from finetune_phi.endpoint.engine import Completion, Engine, InputTooLong, Message, SamplingParams

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error_response(
    status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = schemas.ErrorResponse(error=schemas.ErrorBody(message=message, type=type_, param=param))
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({**body.model_dump(), **extra}, status_code=status, headers=headers)


class Runtime:
    """What the routes share: the engine once loaded, its load status, and the generation thread."""

    def __init__(self, model_name: str, engine: Engine | None) -> None:
        self.model_name = model_name
        self.engine = engine
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

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
        self, conversations: Sequence[Sequence[Message]], params: SamplingParams, param: str = "input_data"
    ) -> list[Completion]:
        engine = self.ready_engine()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, engine.generate, conversations, params)
        except InputTooLong as exc:
            raise ApiError(400, str(exc), "invalid_request_error", param) from exc


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.ErrorResponse, "description": "the request cannot be served as asked"},
    401: {"model": schemas.ErrorResponse, "description": "missing or wrong key"},
    503: {"model": schemas.ErrorResponse, "description": "the model is still loading"},
}


def create_app(
    key: str,
    *,
    engine: Engine | None = None,
    loader: Callable[[], Engine] | None = None,
    model_name: str | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app serving `engine`, or the engine `loader` builds in the background at startup."""
    if not key:
        raise ValueError("an endpoint key is required: an endpoint without one would answer anybody")
    if (engine is None) == (loader is None):
        raise ValueError("pass exactly one of engine= or loader=")
    runtime = Runtime(model_name or (engine.name if engine else "model"), engine)

    def loaded(future: Future[Engine]) -> None:
        exc = future.exception()
        if exc is None:
            runtime.engine = future.result()
            log.info("model %s loaded: ready", runtime.model_name)
            return
        runtime.load_error = exc
        log.error("loading model %s failed: %s", runtime.model_name, exc, exc_info=exc)
        if on_load_error is not None:
            on_load_error(exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if loader is not None and runtime.engine is None:
            runtime.executor.submit(loader).add_done_callback(loaded)
        yield
        runtime.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="finetune-phi local online endpoint",
        version="1.0",
        description="Azure ML managed online endpoint contract (/score) and OpenAI chat completions (/v1).",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    bearer = HTTPBearer(auto_error=False, description="the endpoint key (deploy_model.py writes it to .env)")
    expected = key.encode()

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise ApiError(401, "missing key: send the header 'Authorization: Bearer <key>'", "authentication_error")
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(401, "invalid key: use AZURE_ML_API_KEY from .env", "authentication_error")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Framework errors (unparseable body, unknown route, wrong method) in the same shape as ours.
        return _error_response(
            exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers, detail=exc.detail
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()

        def field_path(error: Any) -> list[str]:
            return [str(part) for part in error.get("loc", ()) if part != "body" and not _is_type_tag(part)]

        # A value that matches no member of a union fails once per member; the deepest failure is
        # the member it came closest to (a list of messages with a bad role, not "not a string").
        first = max(errors, key=lambda e: len(field_path(e)), default={"loc": (), "msg": "invalid request"})
        loc = field_path(first)
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if not param and first.get("type") == "model_attributes_type":
            message = "the body must be a JSON object sent with 'Content-Type: application/json'"
        # Keep FastAPI's `detail` list (what /openapi.json documents for 422) beside OpenAI's `error`.
        return _error_response(422, message, "invalid_request_error", param, detail=jsonable_encoder(errors))

    def health() -> schemas.Health:
        detail = str(runtime.load_error) if runtime.load_error else None
        return schemas.Health(status=runtime.status, model=runtime.model_name, pid=os.getpid(), detail=detail)

    @app.get("/", response_model=schemas.Health, tags=["health"])
    @app.get("/health/live", response_model=schemas.Health, tags=["health"])
    async def live() -> schemas.Health:
        return health().model_copy(update={"status": "alive"})

    @app.get(
        "/health/ready",
        response_model=schemas.Health,
        responses={503: {"model": schemas.Health, "description": "the model is loading, or failed to load"}},
        tags=["health"],
    )
    async def ready() -> Any:
        body = health()
        if runtime.engine is None:
            return JSONResponse(body.model_dump(), status_code=503)
        return body

    @app.post(
        "/score",
        response_model=list[str] | schemas.StudioOutput,
        responses=ERROR_RESPONSES,
        dependencies=[Depends(require_key)],
        tags=["azure ml"],
    )
    async def score(request: schemas.ScoreRequest) -> list[str] | schemas.StudioOutput:
        data = request.input_data
        if isinstance(data, schemas.StudioInput):
            options = data.parameters or request.params or schemas.GenerationParams()
            conversation = [m.model_dump() for m in data.input_string]
            [completion] = await runtime.generate([conversation], _sampling(options))
            return schemas.StudioOutput(output=_full_text(conversation, completion, options))
        options = request.params or schemas.GenerationParams()
        conversations = [
            [{"role": "user", "content": item}] if isinstance(item, str) else [m.model_dump() for m in item]
            for item in data
        ]
        completions = await runtime.generate(conversations, _sampling(options))
        return [_full_text(c, done, options) for c, done in zip(conversations, completions)]

    @app.post(
        "/v1/chat/completions",
        response_model=schemas.ChatCompletion,
        responses=ERROR_RESPONSES,
        dependencies=[Depends(require_key)],
        tags=["openai"],
    )
    async def chat_completions(request: schemas.ChatCompletionRequest) -> schemas.ChatCompletion:
        params = SamplingParams.resolve(
            max_new_tokens=request.max_completion_tokens or request.max_tokens,
            # OpenAI's default temperature is 1: sample unless the caller asks for 0.
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=request.top_p,
            seed=request.seed,
        )
        conversation = [m.as_message() for m in request.messages]
        [done] = await runtime.generate([conversation], params, param="messages")
        text, finish = _apply_stop(done.text, request.stop, done.finish_reason)
        return schemas.ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model or runtime.model_name,
            choices=[schemas.Choice(index=0, message=schemas.AssistantMessage(content=text), finish_reason=finish)],
            usage=schemas.Usage(
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.completion_tokens,
                total_tokens=done.prompt_tokens + done.completion_tokens,
            ),
        )

    @app.get(
        "/v1/models",
        response_model=schemas.ModelList,
        responses={401: ERROR_RESPONSES[401]},
        dependencies=[Depends(require_key)],
        tags=["openai"],
    )
    async def models() -> schemas.ModelList:
        return schemas.ModelList(data=[schemas.ModelCard(id=runtime.model_name, created=runtime.created)])

    return app


def _is_type_tag(part: object) -> bool:
    """Pydantic names the union member in an error's location ('constrained-str', 'StudioInput',
    'list[ChatMessage]'); field names are snake_case identifiers or list indexes."""
    if not isinstance(part, str):
        return False
    return not part.isidentifier() or part[:1].isupper() or part in ("str", "int", "float", "bool", "list", "dict")


def _sampling(options: schemas.GenerationParams) -> SamplingParams:
    return SamplingParams.resolve(**options.model_dump(exclude={"return_full_text"}))


def _full_text(conversation: list[Message], completion: Completion, options: schemas.GenerationParams) -> str:
    """The reply; with return_full_text, the caller's last message followed by it (as HF pipelines do)."""
    if not options.return_full_text:
        return completion.text
    return conversation[-1]["content"] + completion.text


def _apply_stop(text: str, stop: str | list[str] | None, finish: str) -> tuple[str, str]:
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
    cuts = [text.find(s) for s in stops if s and s in text]
    if not cuts:
        return text, finish
    return text[: min(cuts)], "stop"
