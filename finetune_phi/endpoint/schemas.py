"""Typed request and response bodies: they validate input and make /openapi.json describe the API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_phi.endpoint.engine import MAX_NEW_TOKENS_CAP

# One request may carry several inputs (generated together as one batch); this bounds its memory.
MAX_INPUTS_PER_REQUEST = 32
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 100_000


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)


Conversation = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
Prompt = Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]


class GenerationParams(BaseModel):
    """The `params` / `parameters` of an Azure ML scoring request (HF generate names)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0, le=5)
    do_sample: bool | None = None
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1, le=1000)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    return_full_text: bool = False


class StudioInput(BaseModel):
    """The Azure ML Studio / model-catalog chat shape: one conversation and its parameters."""

    model_config = ConfigDict(extra="forbid")

    input_string: Conversation
    parameters: GenerationParams | None = None


class ScoreRequest(BaseModel):
    """`POST /score`. Either a list of inputs (each a user message, or a list of chat messages)
    with optional `params`, answered by a list of replies; or the Studio object, answered by
    `{"output": reply}`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input_data": ["Who founded Microsoft?"], "params": {"temperature": 0.7, "max_new_tokens": 64}},
                {
                    "input_data": {
                        "input_string": [{"role": "user", "content": "Who founded Microsoft?"}],
                        "parameters": {"max_new_tokens": 64},
                    }
                },
            ]
        },
    )

    input_data: Annotated[list[Prompt | Conversation], Field(min_length=1, max_length=MAX_INPUTS_PER_REQUEST)] | StudioInput = Field(
        description="a list of prompts (string or chat messages), or the Studio {input_string, parameters} object"
    )
    params: GenerationParams | None = None


class StudioOutput(BaseModel):
    output: str


# --- OpenAI chat completions ------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class OpenAIMessage(BaseModel):
    # OpenAI clients send fields this server has no use for (name, tool_calls...): ignore them.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | list[TextPart]

    def as_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is the newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="accepted and reported back; one model is served")
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_CAP)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_CAP)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = Field(default=False, description="streaming is not supported: leave it false")
    stop: str | list[str] | None = Field(default=None, description="cut the reply at the first of these strings")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


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
