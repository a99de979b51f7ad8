"""The HTTP side of the local endpoint: Azure ML's scoring contract plus OpenAI chat completions.

Routes (all JSON):
    GET  /, /health/live      liveness (no key)
    GET  /health/ready        200 once the model is loaded, 503 before (no key)
    POST /score               Azure ML managed online endpoint contract (Bearer key)
    POST /v1/chat/completions OpenAI chat completions (Bearer key), GET /v1/models
    GET  /openapi.json        this API, described from the typed bodies in schemas.py

Generation runs on one worker thread so the event loop keeps answering health checks and
rejecting bad requests while a batch is being generated. limits.py bounds what the POST routes
accept (body size, content type, requests in flight, time per request); every error, the
framework's included, is answered in OpenAI's JSON error shape naming the field at fault.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune_phi.endpoint import schemas
from finetune_phi.endpoint.batcher import Batcher, QueueFull
from finetune_phi.endpoint.engine import MAX_NEW_TOKENS_CAP, MIN_TEMPERATURE, Completion, Engine, InputTooLong, Message, SamplingParams
from finetune_phi.endpoint.limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT_S,
    InFlight,
    Limits,
    RequestLimits,
    error_response,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers



class Runtime:
    """What the routes share: the engine once loaded, its load status, and the generation thread."""

    def __init__(self, model_name: str, engine: Engine | None) -> None:
        self.model_name = model_name
        self.engine = engine
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
        self, conversations: Sequence[Sequence[Message] | str], params: SamplingParams, param: str = "input_data"
    ) -> list[Completion]:
        """Replies from the shared micro-batcher; cancelling the awaiting task abandons the work."""
        engine = self.ready_engine()
        if self.batcher is None or self.batcher.engine is not engine:
            self.batcher = Batcher(engine)
        try:
            return await self.batcher.submit(conversations, params)
        except InputTooLong as exc:
            raise ApiError(400, str(exc), "invalid_request_error", param) from exc
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error", headers={"Retry-After": "1"}) from exc

    def close(self) -> None:
        """Stop the generation thread (queued requests get an error); call at shutdown."""
        if self.batcher is not None:
            self.batcher.close()


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": schemas.ErrorResponse, "description": "the body is not JSON, or the prompt does not fit the model's context"},
    401: {"model": schemas.ErrorResponse, "description": "missing or wrong key"},
    408: {"model": schemas.ErrorResponse, "description": "the request ran past the endpoint's timeout; its work was cancelled"},
    413: {"model": schemas.ErrorResponse, "description": "the body is over the endpoint's size limit"},
    415: {"model": schemas.ErrorResponse, "description": "the body is not sent as application/json"},
    429: {"model": schemas.ErrorResponse, "description": "too many requests in flight: retry after Retry-After seconds"},
    503: {"model": schemas.ErrorResponse, "description": "the model is still loading"},
}


def create_app(
    key: str,
    *,
    engine: Engine | None = None,
    loader: Callable[[], Engine] | None = None,
    model_name: str | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """An app serving `engine`, or the engine `loader` builds in the background at startup.

    At most `max_concurrent_requests` generation requests are admitted at once (more get 429), each
    for at most `request_timeout_s` seconds (then 408, its work cancelled), with a JSON body of at
    most `max_body_bytes` (more gets 413).
    """
    limits = Limits(
        max_body_bytes=max_body_bytes, max_concurrent_requests=max_concurrent_requests, request_timeout_s=request_timeout_s
    )
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
        runtime.close()  # requests still queued get an error instead of waiting for a thread that is gone
        runtime.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="finetune-phi local online endpoint",
        version="1.0",
        description="Azure ML managed online endpoint contract (/score) and OpenAI chat completions (/v1).",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    in_flight = InFlight()
    app.state.in_flight = in_flight
    app.add_middleware(
        RequestLimits, limits=limits, paths=("/score", "/v1/chat/completions"), in_flight=in_flight  # type: ignore[arg-type]
    )
    bearer = HTTPBearer(auto_error=False, description="the endpoint key (deploy_model.py writes it to .env)")
    expected = key.encode()

    # async: a plain def dependency would take a thread-pool hop on every request.
    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise ApiError(401, "missing key: send the header 'Authorization: Bearer <key>'", "authentication_error", "Authorization")
        # Constant time: how long a comparison takes must not tell how much of a guess was right.
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(
                401, "invalid key in the Authorization header: use AZURE_ML_API_KEY from .env", "authentication_error", "Authorization"
            )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        # Every message starts with the field at fault, as validation errors do.
        message = exc.message
        if exc.param and exc.status < 500 and not message.startswith(exc.param):
            message = f"{exc.param}: {message}"
        return error_response(exc.status, message, exc.type, exc.param, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Framework errors (unparseable body, unknown route, wrong method) in the same shape as ours.
        message, param = str(exc.detail), None
        if exc.status_code == 400 and message == BODY_PARSE_ERROR:  # e.g. invalid UTF-8, nesting too deep
            message, param = "the body is not valid JSON text (UTF-8, nested at most a few hundred levels)", "body"
        return error_response(exc.status_code, message, "invalid_request_error", param, headers=exc.headers, detail=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()

        def field_path(error: Any) -> list[str]:
            return [str(part) for part in error.get("loc", ()) if part != "body" and not _is_type_tag(part)]

        # A value that matches no member of a union fails once per member; the deepest failure is
        # the member it came closest to (a list of messages with a bad role, not "not a string").
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:
            # Not JSON at all: a syntax error (400), not a well-formed body with wrong values (422).
            where = (broken.get("ctx") or {}).get("error", "invalid JSON")
            position = broken.get("loc", ("body", "?"))[-1]
            return error_response(
                400, f"the body is not valid JSON: {where} at character {position}", "invalid_request_error", "body"
            )
        first = max(errors, key=lambda e: len(field_path(e)), default={"loc": (), "msg": "invalid request"})
        loc = field_path(first)
        param = ".".join(loc) or "body"
        message = f"{param}: {str(first.get('msg')).removeprefix('Value error, ')}"
        if first.get("type") == "extra_forbidden" and loc[:1] == ["params"] and len(loc) == 2:
            message = f"{param}: {schemas.UNKNOWN_PARAM}"
        elif not loc and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
            message = "body: must be a JSON object as described in /openapi.json"
        # Keep FastAPI's `detail` list (what /openapi.json documents for 422) beside OpenAI's `error`,
        # without the optional `input`: echoing it would send back up to max_body_bytes per error,
        # NaN (not JSON), or a list nested deeper than an encoder's recursion limit.
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))} for e in errors]
        return error_response(422, message, "invalid_request_error", param, detail=detail)

    def health() -> schemas.Health:
        detail = str(runtime.load_error) if runtime.load_error else None
        return schemas.Health(
            status=runtime.status,
            model=runtime.model_name,
            pid=os.getpid(),
            detail=detail,
            in_flight=in_flight.count,
            max_concurrent_requests=limits.max_concurrent_requests,
        )

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
        response_model=list[str],
        responses=ERROR_RESPONSES,
        dependencies=[Depends(require_key)],
        tags=["azure ml"],
    )
    async def score(request: schemas.ScoreRequest) -> list[str]:
        """What Azure's scoring script answers for the same model and payload, byte for byte.

        Each prompt string is wrapped in the model's prompt template; params left out get the
        model's params-schema defaults, as MLflow fills them in."""
        engine = runtime.ready_engine()
        prompts = list(request.input_data)
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ApiError(
                    422, f"input_data.{i}: the prompt is empty: put the question in it", "invalid_request_error", f"input_data.{i}"
                )
        completions = await runtime.generate(prompts, _score_sampling(request.params, engine))
        return [c.text for c in completions]

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
        _require_text(conversation, "messages")
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
    """Pydantic names the union member in an error's location ('constrained-str', 'list[TextPart]');
    field names are snake_case identifiers or list indexes."""
    if not isinstance(part, str):
        return False
    return not part.isidentifier() or part[:1].isupper() or part in ("str", "int", "float", "bool", "list", "dict")


BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's detail when json.loads itself fails


def _require_text(conversation: Sequence[Message], param: str) -> None:
    """The last message is what the model answers: blank, there is nothing to answer.

    Earlier messages may be empty (a chat history can hold an empty reply)."""
    if conversation[-1]["content"].strip():
        return
    field = f"{param}.{len(conversation) - 1}.content"
    raise ApiError(
        422, f"{field}: the last message is empty: put the question in it", "invalid_request_error", field
    )


def _score_sampling(options: schemas.GenerationParams | None, engine: Engine) -> SamplingParams:
    """/score params over the model's params-schema defaults, with MLflow's meaning: greedy unless
    do_sample is true (a temperature alone does not sample), top_k 50 when sampling.

    Where Azure's scoring script would answer 500 (HF refuses the combination), a 422 names the field."""
    given = options.model_dump(exclude_none=True) if options else {}
    values = {**dataclasses.asdict(engine.score_defaults), **given}
    if values["do_sample"] and values["temperature"] <= 0:
        raise ApiError(
            422,
            "params.temperature: must be above 0 when do_sample is true (for greedy decoding set do_sample false)",
            "invalid_request_error",
            "params.temperature",
        )
    sample = bool(values["do_sample"]) and values["temperature"] >= MIN_TEMPERATURE  # that close to 0 it is greedy
    return SamplingParams(
        max_new_tokens=min(int(values["max_new_tokens"]), MAX_NEW_TOKENS_CAP),
        do_sample=sample,
        temperature=float(values["temperature"]) if sample else 1.0,
        top_p=float(values["top_p"]),
        top_k=int(values["top_k"]),
        # 1.0 is no penalty (generate() adds no processor for it): None lets these rows batch with chat ones.
        repetition_penalty=None if values["repetition_penalty"] == 1.0 else float(values["repetition_penalty"]),
    )


def _apply_stop(text: str, stop: str | list[str] | None, finish: str) -> tuple[str, str]:
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
    cuts = [text.find(s) for s in stops if s and s in text]
    if not cuts:
        return text, finish
    return text[: min(cuts)], "stop"
