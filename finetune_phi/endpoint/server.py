"""The HTTP side of the local endpoint: Azure ML's scoring contract plus OpenAI chat completions.

Routes (JSON, except a streamed chat completion):
    GET  /, /health/live      liveness (no key)
    GET  /health/ready        200 once the model is loaded, 503 before (no key)
    POST /score               Azure ML managed online endpoint contract (Bearer key), never streamed: our
                              MLflow model's prompt list, or a catalog deployment's {input_string} shape
    POST /v1/chat/completions OpenAI chat completions (Bearer key); `stream: true` answers server-sent
                              chat.completion.chunk events; GET /v1/models, GET /v1/models/{id}
    GET  /openapi.json        this API, described from the typed bodies in schemas.py

Generation runs on one worker thread so the event loop keeps answering health checks and
rejecting bad requests while a batch is being generated. limits.py bounds what the POST routes
accept (body size, content type, requests in flight, time per request); every error, the
framework's included, is answered in OpenAI's JSON error shape naming the field at fault; on /v1
a request the server cannot honour is a 400 (as OpenAI and vLLM answer), on /score a 422.

The /v1 routes and their streaming: openai_chat.py. What both contracts' routes share (the runtime on
app.state, the key check, errors): runtime.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune_phi.endpoint import openai_chat, schemas
from finetune_phi.endpoint.caps import BatchCaps
from finetune_phi.endpoint.engine import MAX_NEW_TOKENS_CAP, MIN_TEMPERATURE, Engine, SamplingParams
from finetune_phi.endpoint.runtime import ERROR_RESPONSES, ApiError, Runtime, require_key, require_text, runtime_of
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

MAX_NAMED_IGNORED = 20  # ignored /score params named in the response header and log line


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
    batch_caps: BatchCaps = BatchCaps(),
) -> FastAPI:
    """An app serving `engine`, or the engine `loader` builds in the background at startup.

    At most `max_concurrent_requests` generation requests are admitted at once (more get 429), each
    for at most `request_timeout_s` seconds (then 408, its work cancelled), with a JSON body of at
    most `max_body_bytes` (more gets 413). `batch_caps` bounds the batcher (caps.py).
    """
    limits = Limits(
        max_body_bytes=max_body_bytes, max_concurrent_requests=max_concurrent_requests, request_timeout_s=request_timeout_s
    )
    if not key:
        raise ValueError("an endpoint key is required: an endpoint without one would answer anybody")
    if (engine is None) == (loader is None):
        raise ValueError("pass exactly one of engine= or loader=")
    runtime = Runtime(model_name or (engine.name if engine else "model"), engine, batch_caps)

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
    # What the module-level routes and handlers read from request.app.state.
    app.state.runtime, app.state.limits, app.state.in_flight, app.state.key = runtime, limits, InFlight(), key.encode()
    app.add_middleware(
        RequestLimits, limits=limits, paths=("/score", "/v1/chat/completions"), in_flight=app.state.in_flight  # type: ignore[arg-type]
    )
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.include_router(router)
    app.include_router(openai_chat.router)
    return app


# --- errors: every one, the framework's included, in OpenAI's JSON error shape --------------------------


async def api_error(_: Request, exc: ApiError) -> JSONResponse:
    # Every message starts with the field at fault, as validation errors do.
    message = exc.message
    if exc.param and exc.status < 500 and not message.startswith(exc.param):
        message = f"{exc.param}: {message}"
    return error_response(exc.status, message, exc.type, exc.param, headers=exc.headers)


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Framework errors (unparseable body, unknown route, wrong method) in the same shape as ours.
    message, param = str(exc.detail), None
    if exc.status_code == 400 and message == BODY_PARSE_ERROR:  # e.g. invalid UTF-8, nesting too deep
        message, param = "the body is not valid JSON text (UTF-8, nested at most a few hundred levels)", "body"
    return error_response(exc.status_code, message, "invalid_request_error", param, headers=exc.headers, detail=exc.detail)


async def invalid_request(http: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # OpenAI (and vLLM) answer every invalid request with 400; /score keeps FastAPI's 422.
    status = 400 if http.url.path.startswith("/v1/") else 422

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
    if http.url.path == "/score" and isinstance(exc.body, dict) and isinstance(exc.body.get("input_data"), dict):
        # An object as input_data is the catalog shape: what is wrong is wrong with that shape.
        errors = [e for e in errors if "CatalogScoreRequest" in e.get("loc", ())] or errors
    first = max(errors, key=lambda e: len(field_path(e)), default={"loc": (), "msg": "invalid request"})
    loc = field_path(first)
    param = ".".join(loc) or "body"
    message = f"{param}: {str(first.get('msg')).removeprefix('Value error, ')}"
    if not loc and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        message = "body: must be a JSON object as described in /openapi.json"
    # Keep FastAPI's `detail` list (what /openapi.json documents for 422) beside OpenAI's `error`,
    # without the optional `input`: echoing it would send back up to max_body_bytes per error,
    # NaN (not JSON), or a list nested deeper than an encoder's recursion limit.
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))} for e in errors]
    return error_response(status, message, "invalid_request_error", param, detail=detail)


# --- health and Azure's /score --------------------------------------------------------------------------

router = APIRouter()


def health(app: FastAPI) -> schemas.Health:
    runtime: Runtime = app.state.runtime
    detail = str(runtime.load_error) if runtime.load_error else None
    return schemas.Health(
        status=runtime.status,
        model=runtime.model_name,
        pid=os.getpid(),
        detail=detail,
        in_flight=app.state.in_flight.count,
        max_concurrent_requests=app.state.limits.max_concurrent_requests,
    )

@router.get("/", response_model=schemas.Health, tags=["health"])
@router.get("/health/live", response_model=schemas.Health, tags=["health"])
async def live(http: Request) -> schemas.Health:
    return health(http.app).model_copy(update={"status": "alive"})

@router.get(
    "/health/ready",
    response_model=schemas.Health,
    responses={503: {"model": schemas.Health, "description": "the model is loading, or failed to load"}},
    tags=["health"],
)
async def ready(http: Request) -> Any:
    body = health(http.app)
    if http.app.state.runtime.engine is None:
        return JSONResponse(body.model_dump(), status_code=503)
    return body

@router.post(
    "/score",
    response_model=list[str] | schemas.CatalogReply,
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_key)],
    tags=["azure ml"],
)
async def score(request: schemas.ScoreRequest | schemas.CatalogScoreRequest, response: Response, http: Request) -> Any:
    """What Azure answers for the same payload: our MLflow model's scoring (a prompt list), or a
    model-catalog deployment's (one conversation as messages, answered {"output": ...}).

    Each prompt string is wrapped in the model's prompt template; a conversation is rendered by
    the model's chat template; params left out get the model's params-schema defaults, as MLflow
    fills them in. Params outside the schema are ignored, as Azure ignores them, and named in the
    X-Ignored-Fields header and the log."""
    runtime = runtime_of(http)
    engine = runtime.ready_engine()
    if isinstance(request, schemas.CatalogScoreRequest):
        conversation = [m.as_message() for m in request.input_data.input_string]
        require_text(conversation, "input_data.input_string")
        parameters = request.input_data.parameters
        _name_ignored(response, "input_data.parameters", parameters)
        sampling = _score_sampling(parameters, engine, "input_data.parameters")
        [done] = await runtime.generate([conversation], sampling, param="input_data.input_string")
        return schemas.CatalogReply(output=done.text)
    prompts = list(request.input_data)
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ApiError(
                422, f"input_data.{i}: the prompt is empty: put the question in it", "invalid_request_error", f"input_data.{i}"
            )
    _name_ignored(response, "params", request.params)
    completions = await runtime.generate(prompts, _score_sampling(request.params, engine))
    return [c.text for c in completions]


def _is_type_tag(part: object) -> bool:
    """Pydantic names the union member in an error's location ('constrained-str', 'list[TextPart]');
    field names are snake_case identifiers or list indexes."""
    if not isinstance(part, str):
        return False
    return not part.isidentifier() or part[:1].isupper() or part in ("str", "int", "float", "bool", "list", "dict")


BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's detail when json.loads itself fails


def _name_ignored(response: Response, where: str, options: schemas.GenerationParams | None) -> None:
    """Name the params a /score request carried outside the model's schema: Azure's scoring ignores
    them silently; here they are ignored the same way, but said so."""
    ignored = [f"{where}.{name}" for name in (options.ignored() if options else [])]
    if ignored:
        # A header holds visible ASCII only: names are percent-encoded (a plain name reads as it is), and
        # a request with very many stays within a header's size.
        shown = [quote(name, safe="._-~") for name in ignored[:MAX_NAMED_IGNORED]]
        more = len(ignored) - len(shown)
        response.headers[schemas.IGNORED_HEADER] = ", ".join(shown) + (f", and {more} more" if more else "")
        log.info("/score: ignored %s (not in the model's params schema: %s), as Azure's scoring ignores them",
                 ", ".join(map(repr, ignored[:MAX_NAMED_IGNORED])) + (f" and {more} more" if more else ""),
                 ", ".join(schemas.SCORE_PARAMS))  # fmt: skip


def _score_sampling(options: schemas.GenerationParams | None, engine: Engine, where: str = "params") -> SamplingParams:
    """/score params over the model's params-schema defaults, with MLflow's meaning: greedy unless
    do_sample is true (a temperature alone does not sample), top_k 50 when sampling.

    Where Azure's scoring script would answer 500 (HF refuses the combination), a 422 names the field."""
    given = {k: v for k, v in (options.model_dump(exclude_none=True) if options else {}).items()
             if k in schemas.SCORE_PARAMS}  # fmt: skip
    values = {**dataclasses.asdict(engine.score_defaults), **given}
    if values["do_sample"] and values["temperature"] <= 0:
        raise ApiError(
            422,
            f"{where}.temperature: must be above 0 when do_sample is true (for greedy decoding set do_sample false)",
            "invalid_request_error",
            f"{where}.temperature",
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
