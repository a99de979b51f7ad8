"""The OpenAI side of the endpoint: POST /v1/chat/completions and GET /v1/models (the routes, which
server.py includes), which fields are refused, seeds, stop strings, log-probabilities, and the
server-sent event stream.

Streaming: the response starts once the first token is generated, so every refusal (401, 400, 429,
503, a prompt over the context) is still an ordinary JSON error. After that, a problem (the
request timeout, a failed generation) ends the stream with an `data: {"error": {...}}` event and
`data: [DONE]`, as vLLM does; the openai client raises it as an APIError. A client that disconnects
cancels its generation (limits.py sees the disconnect and cancels the route, which cancels its
batcher work). Text is released only when it cannot change: never half of a multi-byte character
(decoded text ending in U+FFFD is held back), never a possible start of a stop string (a tail as
long as the longest stop string is held back), never trailing whitespace (the reply is stripped, as
the non-streamed one is), so the chunks join to exactly the non-streamed reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator, Iterator, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from finetune_phi.endpoint import schemas
from finetune_phi.endpoint.engine import Completion, Engine, Message, SamplingParams
from finetune_phi.endpoint.limits import DEADLINE_SCOPE_KEY, error_response
from finetune_phi.endpoint.runtime import ERROR_RESPONSES, ApiError, Runtime, require_key, require_text, runtime_of

log = logging.getLogger(__name__)

# Every /v1 route needs the key; server.py includes this router in the app.
router = APIRouter(tags=["openai"], dependencies=[Depends(require_key)])

SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON schemas.ChatCompletionChunk or error object, or [DONE]"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _apply_stop(text: str, stops: Sequence[str], finish: str) -> tuple[str, str]:
    cut = _first_stop(text, stops)
    return (text, finish) if cut is None else (text[:cut], "stop")



# --- the OpenAI chat contract ------------------------------------------------------------------------


def unsupported_fields(request: schemas.ChatCompletionRequest) -> list[tuple[str, str]]:
    """(field, why) for every OpenAI field the request sets to something this server does not do.

    Refused rather than ignored: a client that asks for JSON mode, tools or n=3 and gets a plain
    single reply would take it for what it asked for."""
    refused: list[tuple[str, str]] = []
    if request.n != 1:
        refused.append(("n", "only 1 choice per request is served: send n requests (with different seeds)"))
    if request.stream_options is not None and not request.stream:
        refused.append(("stream_options", "is only allowed with stream: true"))
    if request.top_logprobs and not request.logprobs:
        refused.append(("top_logprobs", "needs logprobs: true"))
    if request.logprobs and request.stream:
        refused.append(("logprobs", "is not offered with stream: true here: ask without streaming"))
    if request.logit_bias:
        refused.append(("logit_bias", "is not applied by this server: leave it empty"))
    if request.response_format is not None and request.response_format != {"type": "text"}:
        refused.append(("response_format", 'only {"type": "text"}: this server has no JSON or schema-constrained decoding'))
    if request.tools or request.functions:
        refused.append(("tools" if request.tools else "functions", "tool calling is not served: the model has no tool-call format"))
    for name in ("tool_choice", "function_call"):
        if getattr(request, name) not in (None, "none"):
            refused.append((name, 'only "none": tool calling is not served'))
    if request.modalities is not None and request.modalities != ["text"]:
        refused.append(("modalities", 'only ["text"]: the model reads and writes text'))
    for name in ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", "moderation"):
        if getattr(request, name) is not None:
            refused.append((name, "is not supported by this server or model: leave it out"))
    return refused


def torch_seed(seed: int | None) -> int | None:
    """OpenAI's seed (a signed 64-bit integer) as torch's generator seed, one to one: a negative seed
    wraps to its two's-complement value, as a C int64 -> uint64 cast does."""
    return None if seed is None else seed % 2**64


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_piece(tokenizer: Any, context: Sequence[int], token: int) -> tuple[str, list[int]]:
    """The text one token adds after `context` (the few tokens before it), and its UTF-8 bytes.

    A byte-fallback token (<0xE2>) is one byte of a character: its bytes are that byte, as OpenAI's
    `bytes` field gives them, and its text is that byte escaped ("\\xe2") as OpenAI shows it."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str) and (match := _BYTE_PIECE.fullmatch(piece)):
        value = int(match.group(1), 16)
        return (chr(value) if value < 0x80 else f"\\x{value:02x}"), [value]
    before = tokenizer.decode(list(context), skip_special_tokens=False)
    text = tokenizer.decode([*context, token], skip_special_tokens=False)[len(before) :]
    return text, list(text.encode("utf-8"))


def reply_logprobs(
    engine: Engine, conversation: Sequence[Message], reply: Sequence[int], text: str, top: int
) -> list[schemas.TokenLogprob]:
    """OpenAI's logprobs.content for the reply's tokens, from one forward pass over prompt + reply.

    Log-softmax of the model's raw logits, before temperature, top-p/top-k or penalties: what vLLM
    returns by default (logprobs_mode "raw_logprobs"), so the numbers describe the model, not the
    sampler. The tokens are those of the returned text: the stop token, and any token past a stop
    string's cut, are left out."""
    import torch

    kept = list(reply)
    end = next((i for i, t in enumerate(kept) if t in engine.stop_token_ids), None)
    kept = kept[:end]
    decode = engine.tokenizer.decode
    if decode(kept, skip_special_tokens=True).strip() != text:  # cut by a stop string: tokens up to the cut
        n = 0
        while n < len(kept) and len(decode(kept[: n + 1], skip_special_tokens=True).strip()) <= len(text):
            n += 1
        kept = kept[:n]
    if not kept:
        return []
    prompt = engine.encode(conversation)
    ids = torch.tensor([prompt + kept], dtype=torch.long, device=engine.model.device)
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(kept) - 1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(kept, device=logprobs.device)[:, None])[:, 0].tolist()
    best = logprobs.topk(top, dim=-1) if top else None
    content: list[schemas.TokenLogprob] = []
    for i, (token, value) in enumerate(zip(kept, chosen)):
        context = kept[max(0, i - 4) : i]  # a few tokens before: enough for the tokenizer's spacing rules
        alternatives = []
        if best is not None:
            for alt_value, alt in zip(best.values[i].tolist(), best.indices[i].tolist()):
                alt_text, alt_bytes = _token_piece(engine.tokenizer, context, alt)
                alternatives.append(schemas.TopLogprob(token=alt_text, logprob=alt_value, bytes=alt_bytes))
        piece, piece_bytes = _token_piece(engine.tokenizer, context, token)
        content.append(schemas.TokenLogprob(token=piece, logprob=value, bytes=piece_bytes, top_logprobs=alternatives))
    return content


# --- streaming ------------------------------------------------------------------------------------------


class IncrementalText:
    """The reply's text as its token ids arrive, released only once it cannot change (module docstring).

    Decoding the whole reply each step (not token by token) keeps the spacing rules of tokenizers
    that drop a leading space, and makes the joined chunks equal to the non-streamed reply."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.sent) or len(upto) <= len(self.sent):
            return ""
        new, self.sent = upto[len(self.sent) :], upto
        return new

    def add(self, ids: Sequence[int]) -> tuple[str, bool]:
        """New text that is safe to send, and whether a stop string ended the reply."""
        self.ids.extend(ids)
        text = self._text()
        cut = _first_stop(text, self.stops)
        if cut is not None:
            return self._release(text[:cut]), True
        if text.endswith("\ufffd"):  # a character whose remaining bytes are in the next token
            return "", False
        safe = min(len(text.rstrip()), len(text) - self.hold)
        return self._release(text[:safe]), False

    def finish(self) -> str:
        """What is left once generation ended by itself (end of turn or length)."""
        text, _ = _apply_stop(self._text().rstrip(), self.stops, "")
        return self._release(text)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


async def _stream_chat(
    runtime: Runtime,
    engine: Engine,
    conversation: list[Message],
    params: SamplingParams,
    stops: list[str],
    model: str,
    include_usage: bool,
    deadline: float | None,
) -> AsyncIterator[bytes]:
    """Start generating; once the first tokens (or an error) arrive, the event stream to send.

    Waiting for the first tokens before answering is what keeps every refusal (429 queue full, a
    prompt over the context) an ordinary JSON error with its status."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[list[int] | None] = asyncio.Queue()

    def on_tokens(_row: int, ids: list[int]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ids)

    task = asyncio.ensure_future(runtime.generate([conversation], params, param="messages", on_tokens=on_tokens))
    # Token ids are handed over with call_soon_threadsafe before the result is, so None comes last.
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        first = await queue.get()
    except asyncio.CancelledError:  # the client left or the timeout ran out before the first token
        task.cancel()
        raise
    if first is None:
        task.result()  # an ApiError (429, 400, 503) becomes its JSON answer here
    return _events(task, queue, first, engine, conversation, stops, model, include_usage, deadline)


async def _events(
    task: asyncio.Future[list[Completion]],
    queue: asyncio.Queue[list[int] | None],
    first: list[int] | None,
    engine: Engine,
    conversation: list[Message],
    stops: list[str],
    model: str,
    include_usage: bool,
    deadline: float | None,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
        body["choices"] = (
            [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        )
        if include_usage:
            body["usage"] = usage
        return _sse(body)

    def error(status: int, message: str, type_: str) -> Iterator[bytes]:
        yield _sse({"error": {"message": message, "type": type_, "param": None, "code": status}})
        yield DONE_EVENT

    text = IncrementalText(engine.tokenizer, stops)
    generated, ended, stopped = 0, False, False
    try:
        yield chunk({"role": "assistant", "content": ""})
        ids = first
        while ids is not None:
            if not ended:
                kept = []
                for token in ids:
                    generated += 1
                    if token in engine.stop_token_ids:
                        ended = True
                        break
                    kept.append(token)
                piece, stopped = text.add(kept)
                if piece:
                    yield chunk({"content": piece})
                if stopped:
                    task.cancel()  # the reply is complete: free its rows in the batch
                    break
            remaining = None if deadline is None else deadline - loop.time()
            try:
                ids = await asyncio.wait_for(queue.get(), timeout=remaining)
            except TimeoutError:
                task.cancel()
                log.warning("a streamed chat completion ran past the request timeout; ended with an error event")
                for event in error(
                    408, "the request took longer than this endpoint's timeout: ask for fewer max_tokens", "timeout"
                ):
                    yield event
                return
        if stopped:
            finish = "stop"
            prompt_tokens = len(await loop.run_in_executor(None, engine.encode, conversation)) if include_usage else 0
            completion_tokens = generated
        else:
            try:
                [done] = task.result()
            except Exception as exc:
                log.error("a streamed chat completion failed: %s", exc, exc_info=exc)
                for event in error(500, f"generation failed: {exc}", "server_error"):
                    yield event
                return
            finish, prompt_tokens, completion_tokens = done.finish_reason, done.prompt_tokens, done.completion_tokens
            rest = text.finish()
            if rest:
                yield chunk({"content": rest})
        yield chunk({}, finish)
        if include_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            yield chunk(None, usage=usage)
        yield DONE_EVENT
    finally:
        if not task.done():  # the client disconnected, or the stream was cancelled
            task.cancel()


# --- the routes ------------------------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    response_model=schemas.ChatCompletion,
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "the completion; with stream: true, server-sent events (schemas.ChatCompletionChunk)",
            # One server-sent event, as OpenAPI 3.2 describes an event stream item: `data` holds a
            # JSON chat.completion.chunk (or an error object), and the last event's is [DONE].
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        },
    },
)
async def chat_completions(request: schemas.ChatCompletionRequest, http: Request) -> Any:
    runtime = runtime_of(http)
    refused = unsupported_fields(request)
    if refused:
        (field, why), others = refused[0], [f for f, _ in refused[1:]]
        also = f" (also refused: {', '.join(others)})" if others else ""
        raise ApiError(400, f"{field}: {why}{also}", "invalid_request_error", field)
    engine = runtime.ready_engine()
    params = SamplingParams.resolve(
        max_new_tokens=request.max_completion_tokens or request.max_tokens,
        # OpenAI's default temperature is 1: sample unless the caller asks for 0.
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=request.top_p,
        top_k=request.top_k if request.top_k and request.top_k > 0 else None,
        repetition_penalty=None if request.repetition_penalty in (None, 1.0) else request.repetition_penalty,
        seed=torch_seed(request.seed),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
    )
    conversation = [m.as_message() for m in request.messages]
    require_text(conversation, "messages", status=400)
    stops = [request.stop] if isinstance(request.stop, str) else [s for s in request.stop or [] if s]
    model = request.model or runtime.model_name
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        deadline = http.scope.get(DEADLINE_SCOPE_KEY)
        events = await _stream_chat(runtime, engine, conversation, params, stops, model, include_usage, deadline)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    reply: list[int] = []
    collect = (lambda _row, ids: reply.extend(ids)) if request.logprobs else None
    [done] = await runtime.generate([conversation], params, param="messages", on_tokens=collect)
    text, finish = _apply_stop(done.text, stops, done.finish_reason)
    logprobs = None
    if request.logprobs:
        content = await asyncio.get_running_loop().run_in_executor(
            None, reply_logprobs, engine, conversation, reply, text, request.top_logprobs or 0
        )
        logprobs = schemas.ChoiceLogprobs(content=content)
    return schemas.ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[
            schemas.Choice(
                index=0, message=schemas.AssistantMessage(content=text), finish_reason=finish, logprobs=logprobs
            )
        ],
        usage=schemas.Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
        ),
    )

@router.get(
    "/v1/models",
    response_model=schemas.ModelList,
    responses={401: ERROR_RESPONSES[401]},
)
async def models(http: Request) -> schemas.ModelList:
    runtime = runtime_of(http)
    return schemas.ModelList(data=[schemas.ModelCard(id=runtime.model_name, created=runtime.created)])

@router.get(
    "/v1/models/{model_id}",
    response_model=schemas.ModelCard,
    responses={401: ERROR_RESPONSES[401], 404: {"model": schemas.ErrorResponse, "description": "no model has this id"}},
)
async def model_card(model_id: str, http: Request) -> schemas.ModelCard:
    runtime = runtime_of(http)
    if model_id != runtime.model_name:
        # OpenAI's answer for an unknown model, code included.
        return error_response(  # type: ignore[return-value]
            404,
            f"The model '{model_id}' does not exist: this endpoint serves '{runtime.model_name}' (GET /v1/models)",
            "invalid_request_error",
            "model",
            code="model_not_found",
        )
    return schemas.ModelCard(id=runtime.model_name, created=runtime.created)
