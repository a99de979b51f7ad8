"""Typed request and response bodies: they validate input and make /openapi.json describe the API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from finetune_phi.endpoint.engine import MAX_NEW_TOKENS_CAP

# One request may carry several inputs (generated together as one batch); this bounds its memory.
MAX_INPUTS_PER_REQUEST = 32
MAX_MESSAGES = 256  # per /v1/chat/completions request
MAX_CONTENT_CHARS = 100_000


# Strict: JSON `false` is not a seed and "5" is not a token count; pydantic's lax mode would coerce them.
STRICT_FORBID = ConfigDict(extra="forbid", strict=True)
STRICT_IGNORE = ConfigDict(extra="ignore", strict=True)


def _integer(value: object) -> object:
    """JSON Schema's integer includes 5.0 but not true or "5"; strict mode alone would refuse 5.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


def _boolean(value: object) -> object:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _unicode(value: str) -> str:
    """JSON's \\ud800-style escapes can encode half of a UTF-16 pair, which no tokenizer or UTF-8
    response can carry: refuse it here rather than fail while generating or answering."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"holds an unpaired surrogate {value[exc.start]!r} at character {exc.start}: send valid Unicode"
        ) from None
    return value


# Every string a request carries; the limit bounds tokenizer work, the body limit bounds the rest.
Text = Annotated[str, Field(max_length=MAX_CONTENT_CHARS), AfterValidator(_unicode)]

# The bounds sit inside, next to int, so that /openapi.json shows them as minimum/maximum.
TokenCount = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_CAP), BeforeValidator(_integer)]
TopK = Annotated[int, Field(ge=1, le=1000), BeforeValidator(_integer)]


Prompt = Text


# The params a /score request may set: the model's MLflow params schema (fine_tune.py), no more.
SCORE_PARAMS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
# The response header that names what a /score request carried and the endpoint did not use.
IGNORED_HEADER = "X-Ignored-Fields"
NOT_PROMPT_LIST = (
    "is an object: a prompt list is [\"prompt\", ...]; an object is the model-catalog (Studio) shape "
    '{"input_string": [{"role": ..., "content": ...}, ...], "parameters": {...}}'
)


class GenerationParams(BaseModel):
    """The `params` of a /score request: the model's params schema, with its names and types.

    A param the request leaves out gets the schema's default (as MLflow fills it in). A name outside
    the schema is ignored, as Azure's scoring of the model ignores it (MLflow drops params its schema
    does not know: the SDK tutorial's `return_full_text`, `seed`, `max_length`...); the endpoint names
    it in the IGNORED_HEADER response header and its log. A known name with a wrong type is refused."""

    model_config = ConfigDict(extra="allow", strict=True)

    def ignored(self) -> list[str]:
        return sorted(self.model_extra or {})

    max_new_tokens: TokenCount | None = None
    temperature: float | None = Field(default=None, ge=0, le=5, description="used when do_sample is true; then > 0")
    do_sample: bool | None = None
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: TopK | None = None
    # Below ~0.1 the penalty divides logits by almost nothing: inf, then NaN probabilities.
    repetition_penalty: float | None = Field(default=None, ge=0.1, le=10)


def _prompt_list(value: object) -> object:
    if isinstance(value, dict):
        raise ValueError(NOT_PROMPT_LIST)
    return value


def _one_prompt(value: object) -> object:
    """Every input is ONE string; other items get a message that names what they are and the contract."""
    if not isinstance(value, str):
        kind = "a list of messages" if isinstance(value, list) else "a message object" if isinstance(value, dict) else type(value).__name__
        raise ValueError(
            f"is {kind}, not a string: every input is ONE prompt string; encode a conversation as the first "
            'user message, then "<|end|>\\n<|role|>\\n" + content for each later message'
        )
    return value


ScorePrompt = Annotated[Prompt, BeforeValidator(_one_prompt)]


class ScoreRequest(BaseModel):
    """`POST /score`: what Azure ML's scoring script serves for this model (an MLflow
    text-generation model): a list of prompt strings and optional `params`, answered by a list of
    replies, one per prompt. A conversation travels as one string (see SCORE_CONTRACT in README)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"input_data": ["Who founded Microsoft?"], "params": {"temperature": 0.7, "max_new_tokens": 64, "do_sample": True}},
                {"input_data": ["Who founded Microsoft?<|end|>\n<|assistant|>\nBill Gates and Paul Allen.<|end|>\n<|user|>\nWhen?"]},
            ]
        },
    )

    input_data: Annotated[
        list[ScorePrompt], Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST), BeforeValidator(_prompt_list)
    ] = Field(description="prompt strings, each answered on its own; a conversation is encoded as one string")
    params: GenerationParams | None = None


class CatalogMessage(BaseModel):
    model_config = STRICT_IGNORE

    role: Literal["system", "user", "assistant"]
    content: Text

    def as_message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class CatalogInput(BaseModel):
    model_config = STRICT_FORBID

    input_string: list[CatalogMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    parameters: GenerationParams | None = None


class CatalogScoreRequest(BaseModel):
    """`POST /score` in the model-catalog (Studio) shape: what a catalog chat deployment of a Phi model
    takes (the Phi-3-mini-4k-instruct model card's "Inference sample inputs and outputs"): one
    conversation as role messages, rendered by the model's own chat template, and HF generation
    `parameters`; answered `{"output": "<reply>"}`."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"input_data": {
            "input_string": [{"role": "user", "content": "I am going to Paris, what should I see?"}],
            "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": False, "max_new_tokens": 64}}}]},
    )  # fmt: skip

    input_data: CatalogInput


class CatalogReply(BaseModel):
    output: str


# --- OpenAI chat completions ------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = STRICT_IGNORE

    type: Literal["text"]
    text: Text


class OpenAIMessage(BaseModel):
    # OpenAI clients send fields this server has no use for (name, tool_calls...): ignore them.
    model_config = STRICT_IGNORE

    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart]

    def as_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is the newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


# A signed 64-bit integer, as OpenAI's API documents it and vLLM checks it (outside: 400 naming seed);
# the server maps it onto torch's 64-bit generator seed.
Seed64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(_integer)]
TopLogprobs = Annotated[int, Field(ge=0, le=20), BeforeValidator(_integer)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class StreamOptions(BaseModel):
    model_config = STRICT_FORBID

    include_usage: Bool | None = Field(default=None, description="end the stream with a chunk carrying usage, choices []")
    include_obfuscation: Bool | None = Field(
        default=None, description="accepted; this server adds no obfuscation padding (it serves loopback)"
    )


REFUSED = "refused with 400 naming the field"


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Every field of OpenAI's chat API is listed here and either honoured
    or refused with 400 by name (server.unsupported_fields); metadata fields that cannot change the
    reply (user, metadata, store, service_tier, ...) are accepted. Fields OpenAI does not define are
    ignored, as OpenAI clients send extras (vLLM ignores them too)."""

    model_config = STRICT_IGNORE

    model: Annotated[str, Field(max_length=256), AfterValidator(_unicode)] | None = Field(
        default=None, description="accepted and reported back; one model is served"
    )
    messages: list[OpenAIMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="the conversation; the last message's content must not be blank"
    )
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = Field(default=None, description="wins over max_tokens")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Annotated[int, Field(ge=1, le=128), BeforeValidator(_integer)] = Field(default=1, description=f"only 1; more is {REFUSED}")
    stream: Bool = Field(default=False, description="server-sent chat.completion.chunk events, then data: [DONE]")
    stream_options: StreamOptions | None = Field(default=None, description=f"only with stream: true; else {REFUSED}")
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = Field(
        default=None, description="cut the reply at the first of these strings"
    )
    seed: Seed64 | None = None
    logprobs: Bool | None = Field(default=None, description="log-probabilities of the reply's tokens (raw logits, as vLLM)")
    top_logprobs: TopLogprobs | None = Field(default=None, description="alternatives per token; needs logprobs: true")
    presence_penalty: Penalty | None = Field(
        default=None, description="subtracted once from the logit of each token the reply holds so far, as vLLM does")
    frequency_penalty: Penalty | None = Field(
        default=None, description="subtracted from each token's logit once per time the reply holds it so far, as vLLM does")
    # Honoured only at their no-op values; anything else is refused by name (server.unsupported_fields).
    logit_bias: dict[str, float] | None = Field(default=None, description=f"empty only; else {REFUSED}")
    response_format: dict[str, object] | None = Field(default=None, description=f'{{"type": "text"}} only; else {REFUSED}')
    tools: list[object] | None = Field(default=None, description=f"empty only; else {REFUSED}")
    tool_choice: object | None = Field(default=None, description=f'"none" only; else {REFUSED}')
    functions: list[object] | None = Field(default=None, description=f"empty only; else {REFUSED}")
    function_call: object | None = Field(default=None, description=f'"none" only; else {REFUSED}')
    modalities: list[str] | None = Field(default=None, description=f'["text"] only; else {REFUSED}')
    audio: object | None = Field(default=None, description=REFUSED)
    prediction: object | None = Field(default=None, description=REFUSED)
    web_search_options: object | None = Field(default=None, description=REFUSED)
    reasoning_effort: object | None = Field(default=None, description=f"{REFUSED} (not a reasoning model)")
    verbosity: object | None = Field(default=None, description=REFUSED)
    moderation: object | None = Field(default=None, description=f"{REFUSED}: this server runs no moderation model")
    # Accepted with no effect on the reply (bookkeeping on OpenAI's side).
    parallel_tool_calls: Bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: Bool | None = Field(default=None, description="accepted; nothing is stored")
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, object] | None = Field(default=None, description="accepted; no prompt cache is kept")
    prompt_cache_retention: str | None = Field(default=None, description="accepted; no prompt cache is kept")
    # vLLM's sampling extras that this engine has.
    top_k: Annotated[int, Field(ge=-1, le=1000), BeforeValidator(_integer)] | None = Field(
        default=None, description="vLLM extra: -1 or 0 for no limit"
    )
    repetition_penalty: float | None = Field(default=None, ge=0.1, le=10, description="vLLM extra: 1 for none")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (`data: {...}`); the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "finetune-phi"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- errors and health ----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which the openai client turns into a readable exception."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["alive", "ready", "loading", "failed"]
    model: str
    pid: int
    detail: str | None = None
    in_flight: int = Field(default=0, description="generation requests being served now")
    max_concurrent_requests: int | None = Field(default=None, description="beyond this many in flight, 429")
