"""The standard flow and the chat flow as Microsoft Agent Framework workflows.

    from maf_flows.workflows import answer, chat_stream, load_endpoint
    endpoint = load_endpoint()                        # AZURE_ML_* from the environment or the .env deploy wrote
    answer(endpoint, "Who founded Microsoft?")        # {"answer": "..."}: flow.dag.yml's input and output
    async for piece in chat_stream(endpoint, "And when?", chat_history): ...   # chat_flow/flow.dag.yaml's

Each workflow is one executor over the same plain client the Prompt flow tools use
(chat_flow/endpoint_client.py), so both frameworks send the same requests:

* the OpenAI kinds ("local": the endpoint's /v1 route beside /score; "azure-serverless": the
  serverless endpoint's) go through Agent Framework's own OpenAIChatCompletionClient in an Agent,
  streamed; the conversation travels as role messages;
* the /score kinds ("azure-mlflow", "azure-catalog") go through endpoint_client.chat, which writes
  the request shape of the kind; their reply comes whole, as one piece (/score does not stream).

The executor yields the reply piece by piece as workflow outputs, so a caller of
`workflow.run(..., stream=True)` sees each piece as it arrives; `answer` joins them. Generation
settings are the model's own defaults (greedy), as in the Prompt flow tools: the same question gets
the same answer through either framework. Nothing here imports Prompt flow or the project's other
modules: it runs in its own environment (`make agent-framework`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence
from urllib.parse import parse_qsl, urlparse, urlunparse

# Before agent_framework is imported: no telemetry, and a plain User-Agent.
os.environ.setdefault("AGENT_FRAMEWORK_USER_AGENT_DISABLED", "true")
os.environ.setdefault("ENABLE_OTEL", "false")

from agent_framework import Agent, Executor, Message, WorkflowBuilder, WorkflowContext, handler  # noqa: E402
from typing_extensions import Never  # noqa: E402

from chat_flow import endpoint_client as ec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# A model name for the OpenAI request: the local endpoint reports it back, a serverless one ignores it.
MODEL_NAME = "finetune-phi"


class FlowError(RuntimeError):
    """The endpoint could not answer; the message is one line naming the endpoint and the cause."""


@dataclass(frozen=True)
class ChatTurn:
    """The chat flow's inputs (chat_flow/flow.dag.yaml): the question and Prompt flow's chat_history."""

    question: str
    chat_history: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


def load_endpoint(environ: Mapping[str, str] | None = None, folders: Iterable[Path] | None = None) -> ec.Endpoint:
    """The endpoint as the standard flow finds it: AZURE_ML_* from the environment, else the .env
    (ENV_FILE, else `.env` in the working directory or the repository). There is no connection store."""
    try:
        return ec.endpoint_from_environment(environ, folders=list(folders) if folders else [Path.cwd(), REPO])
    except ec.EndpointError as exc:
        raise FlowError(str(exc)) from exc


def openai_base_url(endpoint: ec.Endpoint) -> tuple[str, dict[str, str]]:
    """(base URL, query) an OpenAI client takes: the chat-completions route without its last two
    parts, and the URL's query (a serverless URI may carry api-version) for every request."""
    parts = urlparse(ec.openai_url(endpoint.url, endpoint.kind))
    base = urlunparse(parts._replace(path=parts.path.removesuffix("/chat/completions"), query=""))
    return base, dict(parse_qsl(parts.query))


def openai_headers(endpoint: ec.Endpoint) -> dict[str, str]:
    """Agent Framework writes the token limit as `max_completion_tokens`, which Azure AI model inference
    (a serverless endpoint's API) refuses as an extra parameter unless told to pass it to the model."""
    return {"extra-parameters": "pass-through"} if endpoint.kind in ec.OPENAI_KINDS else {}


def generation_options() -> dict[str, Any]:
    """The /score defaults (greedy, the model's token limit) as OpenAI options, as the Prompt flow tools send them."""
    options = ec.openai_params()
    return {"temperature": options["temperature"], "max_tokens": options["max_tokens"], "top_p": options.get("top_p")}


class AnswerExecutor(Executor):
    """Conversation in, the reply out piece by piece (workflow outputs), through `endpoint`'s kind."""

    def __init__(self, endpoint: ec.Endpoint, executor_id: str = "answer") -> None:
        super().__init__(id=executor_id)
        self.endpoint = endpoint
        self._agent: Agent | None = None

    def agent(self) -> Agent:
        if self._agent is None:
            from agent_framework.openai import OpenAIChatCompletionClient
            from openai import AsyncOpenAI

            base, query = openai_base_url(self.endpoint)
            transport = AsyncOpenAI(api_key=self.endpoint.key, base_url=base, default_query=query or None,
                                    default_headers=openai_headers(self.endpoint))  # fmt: skip
            client = OpenAIChatCompletionClient(model=MODEL_NAME, async_client=transport)
            self._agent = Agent(client, name="finetuned-phi")
        return self._agent

    async def pieces(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        endpoint = self.endpoint
        if endpoint.kind in ("local", *ec.OPENAI_KINDS):
            conversation = [Message(m["role"], [m["content"]]) for m in messages]
            try:
                stream = self.agent().run(conversation, stream=True, options=generation_options())
                async for update in stream:
                    if update.text:
                        yield update.text
            except Exception as exc:  # whatever the OpenAI client raised: one line, the cause chained
                raise FlowError(describe(exc, ec.openai_url(endpoint.url, endpoint.kind), endpoint)) from exc
            return
        try:  # a /score kind: the project's client writes the request shape of the kind
            reply = await asyncio.to_thread(ec.chat, endpoint.url, endpoint.key, messages, **endpoint.options())
        except ec.EndpointError as exc:
            raise FlowError(str(exc)) from exc
        yield reply

    @handler
    async def standard(self, input_data: str, ctx: WorkflowContext[Never, str]) -> None:
        if not input_data.strip():
            raise FlowError("input_data is empty: pass the question to send to the model")
        async for piece in self.pieces([{"role": "user", "content": input_data}]):
            await ctx.yield_output(piece)

    @handler
    async def chat(self, turn: ChatTurn, ctx: WorkflowContext[Never, str]) -> None:
        try:
            messages = ec.messages_from_history(turn.chat_history, turn.question)
        except ValueError as exc:
            raise FlowError(str(exc)) from exc
        async for piece in self.pieces(messages):
            await ctx.yield_output(piece)


def describe(exc: BaseException, url: str, endpoint: ec.Endpoint | None = None) -> str:
    """One line for an OpenAI client's failure, as endpoint_client words its own (a refused guess of
    the kind included)."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    for error in chain:
        status = getattr(error, "status_code", None)
        if status is not None:
            body = getattr(error, "body", None)
            detail = body.get("message") if isinstance(body, dict) else str(error)
            if status in (401, 403):
                return (f"endpoint {url} rejected the key (HTTP {status}): {detail}; re-run python deploy_model.py "
                        "to refresh AZURE_ML_API_KEY")
            if endpoint is not None and endpoint.guessed_from and status in ec.SHAPE_STATUSES:
                return ec.refused_guess(url, f"HTTP {status}: {detail}", endpoint.kind, endpoint.guessed_from)
            return f"endpoint {url} answered HTTP {status}: {detail}"
        if type(error).__name__ in ("APIConnectionError", "ConnectError", "ConnectionError"):
            return f"cannot reach endpoint {url} (connection failed): is it running? {ec.NOT_DEPLOYED_HINT}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"endpoint {url} did not answer: {first}"


def build_workflow(endpoint: ec.Endpoint) -> Any:
    """A one-executor workflow taking the standard flow's input (a str) or the chat flow's (ChatTurn).

    Build one per caller: a workflow refuses a second run while a stream of it is open."""
    return WorkflowBuilder(start_executor=AnswerExecutor(endpoint), name="finetuned-phi").build()


async def stream(endpoint: ec.Endpoint, message: str | ChatTurn) -> AsyncIterator[str]:
    """The reply's pieces as the workflow yields them."""
    workflow = build_workflow(endpoint)
    failure: BaseException | None = None
    async for event in workflow.run(message, stream=True):
        if event.type == "output" and isinstance(event.data, str):
            yield event.data
        elif event.type in ("failed", "error", "executor_failed"):
            failure = getattr(event, "data", None) or failure
    if failure is not None:
        raise FlowError(_failure_text(failure))


def _failure_text(failure: Any) -> str:
    message = getattr(failure, "message", None) or str(failure)
    return message.strip().splitlines()[0] if message.strip() else "the workflow failed"


def chat_stream(endpoint: ec.Endpoint, question: str, chat_history: Sequence[Mapping[str, Any]] = ()) -> AsyncIterator[str]:
    """chat_flow's inputs in, the reply's pieces out as they arrive."""
    return stream(endpoint, ChatTurn(question, tuple(chat_history)))


async def collect(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


def answer(endpoint: ec.Endpoint, input_data: str) -> dict[str, str]:
    """flow.dag.yml's `input_data` in, its `answer` out."""
    return {"answer": asyncio.run(collect(stream(endpoint, input_data)))}


def chat(endpoint: ec.Endpoint, question: str, chat_history: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
    """chat_flow/flow.dag.yaml's `question` and `chat_history` in, its `answer` out."""
    return {"answer": asyncio.run(collect(chat_stream(endpoint, question, chat_history)))}
