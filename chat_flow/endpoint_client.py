"""The one HTTP client for the fine-tuned model's scoring endpoint: plain `requests`, no Prompt flow.

    from chat_flow.endpoint_client import ask, chat          # from the repository or the installed project
    ask("http://127.0.0.1:5001/score", key, "Who founded Microsoft?", kind="local")
    chat(endpoint, key, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Who founded Microsoft?"}], kind="azure-catalog")

It lives inside the chat flow's folder so that every flow snapshot Prompt flow or Azure uploads carries
it: chat_flow/ is the chat flow's snapshot, and the standard flow's snapshot (the repository minus
.amlignore) includes chat_flow/. The chat flow's tool imports it as `endpoint_client` (its folder is
on sys.path); the standard flow's tool, tests and scripts as `chat_flow.endpoint_client`. Nothing here
imports Prompt flow (retired on 2027-04-20) or this project's other modules; the flows' `@tool`
functions are thin wrappers over these functions.

The Phi-3 chat format (the prompt template, encode_prompt, the default generation settings) comes
from its one home, finetuning_dir/chat_format.py, the training job's own file: load_chat_format says
where each flow snapshot carries it.

Four kinds of deployment, recorded by deploy_model.py (AZURE_ML_ENDPOINT_KIND in .env, `kind` in the
Prompt flow connection's configs), and the request each one answers:

  * "local" (finetune_phi.endpoint) and "azure-mlflow" (Azure's no-code deployment of our MLflow
    text-generation model, whose prompt template is chat_format.PROMPT_TEMPLATE):
        {"input_data": ["<prompt>"], "params": {"max_new_tokens": ..., ...}}  ->  ["<reply>"]
    A conversation becomes ONE prompt string (encode_prompt) which, inside the template, is exactly
    what the model family's chat template makes of the same messages.
  * "azure-catalog" (a model-catalog fine-tune on a managed online endpoint, the catalog's scoring script):
        {"input_data": {"input_string": [messages], "parameters": {...}}}     ->  {"output": "<reply>"}
    as documented on the Phi-3-mini-4k-instruct model card ("Inference sample inputs and outputs",
    Azure/azureml-assets assets/models/system/phi-3-mini-4k-instruct/description.md).
  * "azure-serverless" (fine-tuning as a service, deployed as a serverless endpoint): OpenAI chat
    completions at {scoring URI}/v1/chat/completions, {"messages": [...], "max_tokens", ...} ->
    {"choices": [{"message": {"content": "<reply>"}}]}, as Azure's fine-tuning samples post it.

Our MLflow model gets a 500 from Azure's scoring server for the catalog shape, and the local endpoint
refuses it, so the shape follows the kind. A setting written by hand, without a kind, is told by its
URL where the URL can tell (guess_kind); where it cannot, the tutorial's own shape is sent, and a
refusal says which setting to fill in and with what (never another shape tried silently).

Streaming (`chat_stream`, what the chat flow's tool yields): the "local" and "azure-serverless" kinds
stream. The local endpoint's OpenAI route sits beside /score (the same server, the same key): the URL
is the /score URI with /score replaced by /v1/chat/completions, the conversation travels as messages
(rendered by the model's chat template, which is what encode_prompt reproduces inside the prompt
template), and the reply arrives as server-sent chat.completion.chunk events; a serverless endpoint
streams the same events. Azure's managed online deployments (azure-mlflow, azure-catalog) answer
/score only and do not stream: chat_stream yields their whole reply as one piece.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlparse, urlunparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

CHAT_FORMAT_FILE = "chat_format.py"


def load_chat_format() -> ModuleType:
    """finetuning_dir/chat_format.py, the Phi-3 chat format's one home, wherever this file runs.

    Beside this file in the chat flow's snapshot (flow.dag.yaml's additional_includes copies it in);
    at ../finetuning_dir/ in the repository and in the standard flow's snapshot (the repository minus
    .amlignore). Loaded under its bare name, as the training job imports it, so that a process that
    also runs the job's code holds one copy.
    """
    if "chat_format" in sys.modules:
        return sys.modules["chat_format"]
    here = Path(__file__).resolve().parent
    for path in (here / CHAT_FORMAT_FILE, here.parent / "finetuning_dir" / CHAT_FORMAT_FILE):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("chat_format", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["chat_format"] = module
            spec.loader.exec_module(module)
            return module
    raise ImportError(
        f"{CHAT_FORMAT_FILE} (the Phi-3 chat format, finetuning_dir/{CHAT_FORMAT_FILE}) is neither beside {here} "
        "nor in ../finetuning_dir: run the chat flow with pf, whose additional_includes copies it in, or keep "
        "chat_flow/ and finetuning_dir/ side by side as in the repository"
    )


chat_format = load_chat_format()
# The prompt template our MLflow model is packaged with: encode_prompt's output is meant to be wrapped in it.
PROMPT_TEMPLATE: str = chat_format.PROMPT_TEMPLATE
encode_prompt = chat_format.encode_prompt
# Sent with every request, so that every kind of deployment answers alike (a model-catalog deployment
# has defaults of its own): the model's own defaults, greedy.
DEFAULT_PARAMS: dict[str, Any] = dataclasses.asdict(chat_format.GENERATION_DEFAULTS)

# (connect, read) seconds. Generation on a CPU endpoint takes seconds; a real Phi-3 on a small
# Azure instance can take tens of seconds for the default max_new_tokens.
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 120.0)

# 429 (throttled) and 503 (no healthy instance yet, e.g. while a deployment scales) are worth a
# retry; other errors are not going to change by asking again.
RETRY_STATUSES = (429, 503)
RETRIES = 3
BACKOFF_FACTOR = 0.5  # 0.5 s, 1 s, 2 s between tries
RETRY_AFTER_MAX = 30.0  # never sleep longer than this on a server's Retry-After

NOT_DEPLOYED_HINT = "run python deploy_model.py first"

# The deployment kinds (config.ENDPOINT_KINDS holds the same; a test keeps them equal).
KINDS = ("local", "azure-mlflow", "azure-catalog", "azure-serverless")
PROMPT_KINDS = ("local", "azure-mlflow")  # our MLflow model: one prompt string in, a list of strings out
OPENAI_KINDS = ("azure-serverless",)  # OpenAI chat completions: messages in, choices[0].message out
KIND_HELP = (
    "local (this project's endpoint), azure-mlflow (a managed online endpoint serving the MLflow model "
    "of setup_ml.py --backend azure), azure-catalog (a managed online endpoint serving a model-catalog "
    "fine-tune), azure-serverless (a serverless endpoint: OpenAI chat completions)"
)
KIND_VARIABLE = "AZURE_ML_ENDPOINT_KIND"
CONNECTION_KIND = "the Prompt flow connection's configs.kind"
CHAT_FORMAT_VARIABLE = "AZURE_ML_CHAT_FORMAT"
DEFAULT_CHAT_FORMAT: str = chat_format.DEFAULT_TURN_FORMAT
# Azure ML serverless endpoints (fine-tuning as a service) answer at https://<name>.<region>.models.ai.azure.com.
SERVERLESS_HOST_SUFFIXES = (".models.ai.azure.com",)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Answers that say the request's shape or route was wrong, not the key, the load or the clock.
SHAPE_STATUSES = frozenset({400, 404, 405, 415, 422, 424, 500})


class EndpointError(RuntimeError):
    """The endpoint could not be reached or did not answer; the message names it and the HTTP status."""

    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.detail = detail  # what the endpoint said, key hidden


def validate_endpoint(endpoint: str | None) -> str:
    """Return the endpoint URL, or raise EndpointError saying how to get one."""
    endpoint = (endpoint or "").strip()
    if not endpoint:
        raise EndpointError(
            f"no endpoint URL: AZURE_ML_ENDPOINT (or the connection's endpoint) is empty; {NOT_DEPLOYED_HINT}"
        )
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise EndpointError(
            f"endpoint {endpoint!r} is not an http(s) URL (expected e.g. http://127.0.0.1:5001/score); "
            f"{NOT_DEPLOYED_HINT}",
            endpoint=endpoint,
        )
    return endpoint


def make_session(retries: int = RETRIES, backoff_factor: float = BACKOFF_FACTOR) -> requests.Session:
    """A Session that retries refused connections and 429/503 answers, with backoff and Retry-After."""
    retry = Retry(
        total=retries,
        connect=retries,
        # A read error means the server may be generating already: asking again doubles the load
        # and the wait, so a read timeout is reported, not retried.
        read=False,
        status=retries,
        other=0,
        allowed_methods=frozenset({"POST"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=backoff_factor,
        respect_retry_after_header=True,
        retry_after_max=RETRY_AFTER_MAX,
        raise_on_status=False,  # hand back the last response, so its status can be reported
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _hide(text: str, key: str) -> str:
    return text.replace(key, "<key>") if key else text


def _error_detail(response: requests.Response, key: str) -> str:
    try:
        body: Any = response.json()
        if isinstance(body, dict):
            body = body.get("error") or body.get("detail") or body.get("message") or body
        text = body if isinstance(body, str) else json.dumps(body)
    except ValueError:
        text = response.text
    text = " ".join(_hide(text, key).split())
    return text[:300]


def _post(
    endpoint: str,
    key: str,
    payload: Mapping[str, Any],
    *,
    timeout: float | tuple[float, float],
    session: requests.Session | None,
    stream: bool = False,
) -> requests.Response:
    """POST `payload` with the key as a Bearer token; a 2xx response, or EndpointError naming the fix.

    With `stream`, the response body is left unread (the caller iterates it and closes it)."""
    endpoint = validate_endpoint(endpoint)
    if not key:
        raise EndpointError(
            f"no key for endpoint {endpoint}: AZURE_ML_API_KEY (or the connection's key) is empty; "
            f"{NOT_DEPLOYED_HINT}",
            endpoint=endpoint,
        )
    accept = "text/event-stream" if stream else "application/json"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": accept}
    own_session = session is None
    session = session or make_session()
    try:
        response = session.post(endpoint, json=dict(payload), headers=headers, timeout=timeout, stream=stream)
    except requests.exceptions.Timeout as exc:
        read = timeout[1] if isinstance(timeout, tuple) else timeout
        raise EndpointError(
            f"endpoint {endpoint} did not answer within {read:g} s (timeout); "
            "is the model still loading, or is max_new_tokens too large?",
            endpoint=endpoint,
        ) from exc
    except requests.exceptions.RetryError as exc:
        # Only raised when urllib3 runs out of retries on a status it raises for; kept for safety.
        raise EndpointError(f"endpoint {endpoint} kept refusing the request: {exc}", endpoint=endpoint) from exc
    except requests.exceptions.ConnectionError as exc:
        raise EndpointError(
            f"cannot reach endpoint {endpoint} (connection failed, also on retry): "
            f"is it running? {NOT_DEPLOYED_HINT}",
            endpoint=endpoint,
        ) from exc
    finally:
        if own_session and not stream:
            session.close()

    status = response.status_code
    if status < 400:
        return response
    detail = _error_detail(response, key)
    response.close()
    if status in (401, 403):
        raise EndpointError(
            f"endpoint {endpoint} rejected the key (HTTP {status}): {detail}; "
            "the key in AZURE_ML_API_KEY / the Prompt flow connection is not this endpoint's — "
            "re-run python deploy_model.py to refresh both",
            endpoint=endpoint,
            status=status,
        )
    if status in RETRY_STATUSES:
        raise EndpointError(
            f"endpoint {endpoint} is busy or not ready (HTTP {status}), also on retry: {detail}",
            endpoint=endpoint,
            status=status,
        )
    raise EndpointError(f"endpoint {endpoint} answered HTTP {status}: {detail}", endpoint=endpoint, status=status,
                        detail=detail)


def score(
    endpoint: str,
    key: str,
    payload: Mapping[str, Any],
    *,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
) -> Any:
    """POST `payload` to the scoring URI with the key as a Bearer token; return the decoded JSON."""
    response = _post(endpoint, key, payload, timeout=timeout, session=session)
    try:
        return response.json()
    except ValueError as exc:
        raise EndpointError(
            f"endpoint {endpoint} answered HTTP {response.status_code} with a body that is not JSON: "
            f"{_hide(response.text[:200], key)!r}",
            endpoint=endpoint,
            status=response.status_code,
        ) from exc


# --- the request and reply of each kind ---------------------------------------------------------------

_logged_guesses: set[tuple[str, str]] = set()


def check_kind(kind: str, *, source: str = KIND_VARIABLE) -> str:
    """A recorded deployment kind, validated; `source` names where it came from, for the message."""
    kind = (kind or "").strip()
    if kind not in KINDS:
        raise EndpointError(
            f"{source}={kind!r} is not a deployment kind: use one of {', '.join(KINDS)} "
            f"(python deploy_model.py writes it)"
        )
    return kind


def guess_kind(url: str, source: str = KIND_VARIABLE) -> str:
    """The kind of an endpoint whose kind was never recorded (a connection or .env made by hand).

    The URL tells it where it can: a serverless endpoint's host, a /v1 route, or any URL that is not
    Azure ML's /score route takes OpenAI chat completions; a /score on this machine is our local
    endpoint. A managed online endpoint's /score (https://<name>.<region>.inference.ml.azure.com/score)
    serves our MLflow model or a catalog model alike, so there the request is the one the tutorial that
    made the setting sends: a connection is the Studio tutorial's (the catalog shape), an .env the SDK
    tutorial's (the MLflow shape). A wrong guess is reported as such (see chat), never retried silently.
    """
    parsed = urlparse(validate_endpoint(url))
    host = (parsed.hostname or "").lower()
    segments = [part for part in parsed.path.lower().split("/") if part]
    if host.endswith(SERVERLESS_HOST_SUFFIXES) or "v1" in segments or segments[-1:] != ["score"]:
        return "azure-serverless"  # not Azure ML's /score route: an OpenAI server's base URI or route
    if host in LOOPBACK_HOSTS:
        return "local"
    return "azure-catalog" if source == CONNECTION_KIND else "azure-mlflow"


def resolve_kind(kind: str | None, url: str, *, source: str = KIND_VARIABLE) -> tuple[str, str]:
    """(kind, guessed_from): the recorded kind and "", or the URL's guess and the setting that was empty."""
    if (kind or "").strip():
        return check_kind(str(kind), source=source), ""
    guessed = guess_kind(url, source)
    if (source, url) not in _logged_guesses:  # once per setting and URL, not once per chat turn
        _logged_guesses.add((source, url))
        log.info("%s is not set: sending %s the %s request shape (set it to one of %s to choose)",
                 source, url, guessed, ", ".join(KINDS))  # fmt: skip
    return guessed, source


def check_chat_format(name: str | None, *, source: str = CHAT_FORMAT_VARIABLE) -> str:
    """The deployed model's family (chat_format.TURN_FORMATS); empty (an older deploy) means Phi-3's."""
    name = (name or "").strip() or DEFAULT_CHAT_FORMAT
    if name not in chat_format.TURN_FORMATS:
        raise EndpointError(
            f"{source}={name!r} is not a chat format: use one of {', '.join(chat_format.TURN_FORMATS)} "
            "(python deploy_model.py writes it)"
        )
    return name


def request_body(
    kind: str,
    messages: Sequence[Mapping[str, str]],
    params: Mapping[str, Any] | None = None,
    chat_format_name: str = DEFAULT_CHAT_FORMAT,
) -> dict[str, Any]:
    """What `kind`'s scoring endpoint expects for this conversation (see the module docstring), the
    conversation written in the deployed model's family's format (`chat_format_name`)."""
    kind = check_kind(kind)
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if kind in OPENAI_KINDS:
        return {"messages": msgs, **openai_params(params)}
    parameters = {**DEFAULT_PARAMS, **(params or {})}
    if kind == "azure-catalog":
        return {"input_data": {"input_string": msgs, "parameters": parameters}}
    return {"input_data": [encode_prompt(msgs, check_chat_format(chat_format_name))], "params": parameters}


class _UnexpectedShape(EndpointError):
    """A 2xx answer whose body is not the reply shape of the kind that was sent."""


def reply_text(kind: str, body: Any, endpoint: str = "") -> str:
    """The reply in `kind`'s response: ["reply"] (local, azure-mlflow), {"output": "reply"} (azure-catalog)
    or an OpenAI chat.completion (azure-serverless)."""
    kind = check_kind(kind)
    if kind == "azure-catalog":
        if isinstance(body, dict) and isinstance(body.get("output"), str):
            return body["output"]
    elif kind in OPENAI_KINDS:
        choices = body.get("choices") if isinstance(body, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return message["content"]
    elif isinstance(body, list) and body and isinstance(body[0], str):
        return body[0]
    shown = json.dumps(body)[:200]
    raise _UnexpectedShape(
        f"endpoint {endpoint} answered with an unexpected shape for kind {kind!r}: {shown}; "
        f"if the deployment is another kind, set {KIND_VARIABLE} (one of {', '.join(KINDS)}) "
        "or re-run python deploy_model.py",
        endpoint=endpoint,
        detail=f"a reply of another shape: {shown}",
    )


@contextmanager
def _guessed(kind: str, guessed_from: str, url: str) -> Iterator[None]:
    """Turn the refusal of a guessed request shape into one line naming the setting and its values."""
    try:
        yield
    except EndpointError as exc:
        if not guessed_from or not (isinstance(exc, _UnexpectedShape) or exc.status in SHAPE_STATUSES):
            raise
        answer = f"HTTP {exc.status}: {exc.detail}" if exc.status else exc.detail
        raise EndpointError(refused_guess(url, answer, kind, guessed_from), endpoint=url, status=exc.status,
                            detail=exc.detail) from exc


def refused_guess(url: str, answer: str, kind: str, guessed_from: str) -> str:
    """One line for an endpoint that refused the request shape a kind guessed from its URL."""
    return (f"endpoint {url} answered {answer} to the {kind} request, the shape sent because {guessed_from} is "
            f"not set: if the deployment is another kind, set {guessed_from} to one of {KIND_HELP}")


def scoring_url(endpoint: str, kind: str) -> str:
    """Where `kind` takes a request: the scoring URI itself, or the OpenAI route of an OpenAI kind."""
    return openai_url(endpoint, kind) if check_kind(kind) in OPENAI_KINDS else validate_endpoint(endpoint)


def ask(
    endpoint: str,
    key: str,
    question: str,
    *,
    kind: str = "",
    params: Mapping[str, Any] | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
    chat_format_name: str = DEFAULT_CHAT_FORMAT,
    guessed_from: str = "",
) -> str:
    """One question, one reply."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty: pass the text to send to the model")
    return chat(endpoint, key, [{"role": "user", "content": question}], kind=kind, params=params,
                timeout=timeout, session=session, chat_format_name=chat_format_name, guessed_from=guessed_from)


def chat(
    endpoint: str,
    key: str,
    messages: Iterable[Mapping[str, str]],
    *,
    kind: str = "",
    params: Mapping[str, Any] | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
    chat_format_name: str = DEFAULT_CHAT_FORMAT,
    guessed_from: str = "",
) -> str:
    """A conversation (role/content messages, the last one the user's) in, the assistant's reply out.

    An empty `kind` is told from the URL (guess_kind). `guessed_from` names the setting a caller's
    kind was guessed for: when the endpoint refuses the guessed shape, the error says to set it."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("messages must end with a user message: add the question as the last message")
    if not kind:
        kind, guessed_from = resolve_kind(kind, endpoint)
    url = scoring_url(endpoint, kind)
    payload = request_body(kind, msgs, params, chat_format_name)
    with _guessed(kind, guessed_from, url):
        body = score(url, key, payload, timeout=timeout, session=session)
        return reply_text(kind, body, url)


def chat_completions_url(score_url: str) -> str:
    """The local endpoint's OpenAI route beside its /score URI (same host, port and key)."""
    parsed = urlparse(validate_endpoint(score_url))
    path = parsed.path.rstrip("/")
    if not path.endswith("/score"):
        raise EndpointError(
            f"endpoint {score_url} does not end with /score, so its /v1/chat/completions cannot be derived: "
            f"use the scoring URI python deploy_model.py wrote",
            endpoint=score_url,
        )
    return urlunparse(parsed._replace(path=path[: -len("/score")] + "/v1/chat/completions", query="", fragment=""))


def openai_url(endpoint: str, kind: str = "azure-serverless") -> str:
    """Where an endpoint takes OpenAI chat completions.

    The local endpoint: beside its /score. A serverless endpoint: under the URI Azure reports
    (https://<name>.<region>.models.ai.azure.com -> .../v1/chat/completions), as Azure's own samples
    post; a URI that already names a /v1 or /chat/completions route is kept (its query too)."""
    if kind == "local":
        return chat_completions_url(endpoint)
    parsed = urlparse(validate_endpoint(endpoint))
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
    return urlunparse(parsed._replace(path=path, fragment=""))


def openai_params(params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The /score params (DEFAULT_PARAMS and what the caller sets) as OpenAI chat fields."""
    p = {**DEFAULT_PARAMS, **(params or {})}
    body: dict[str, Any] = {"max_tokens": int(p["max_new_tokens"])}
    # /score samples only with do_sample; OpenAI samples unless the temperature is 0.
    body["temperature"] = float(p["temperature"]) if p.get("do_sample") else 0.0
    if "top_p" in p:
        body["top_p"] = float(p["top_p"])
    return body


def chat_stream(
    endpoint: str,
    key: str,
    messages: Iterable[Mapping[str, str]],
    *,
    kind: str = "",
    params: Mapping[str, Any] | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
    chat_format_name: str = DEFAULT_CHAT_FORMAT,
    guessed_from: str = "",
) -> Iterator[str]:
    """The assistant's reply in pieces as they are generated (local, azure-serverless), or whole in one
    piece (azure-mlflow, azure-catalog: /score does not stream).

    Joined, the pieces are what `chat` returns for the same greedy request. An error before the
    first piece raises EndpointError as `chat` does; one in the middle of the stream (the endpoint's
    timeout, say) raises EndpointError after the pieces already yielded."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("messages must end with a user message: add the question as the last message")
    if not kind:
        kind, guessed_from = resolve_kind(kind, endpoint)
    if kind != "local" and kind not in OPENAI_KINDS:
        yield chat(endpoint, key, msgs, kind=kind, params=params, timeout=timeout, session=session,
                   chat_format_name=chat_format_name, guessed_from=guessed_from)
        return
    url = openai_url(endpoint, kind)
    body = {"messages": msgs, "stream": True, **openai_params(params)}
    own_session = session is None
    session = session or make_session()
    try:
        with _guessed(kind, guessed_from, url):
            response = _post(url, key, body, timeout=timeout, session=session, stream=True)
        yield from _read_stream(response, url)
    finally:
        if own_session:
            session.close()


def _read_stream(response: requests.Response, url: str) -> Iterator[str]:
    """The content pieces of an OpenAI chat completion event stream, until data: [DONE]."""
    with response:
        try:
            # chunk_size=None: each chunk as it arrives (the server sends one per event); with the
            # default 512 a reader waits for 512 bytes, two or three events late.
            for line in response.iter_lines(chunk_size=None):
                if not line.startswith(b"data: "):
                    continue  # blank separators, comments, event names
                data = line[len(b"data: ") :]
                if data.strip() == b"[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and event.get("error"):
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    raise EndpointError(f"endpoint {url} ended the stream with an error: {message}", endpoint=url)
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except requests.exceptions.RequestException as exc:
            raise EndpointError(f"the stream from endpoint {url} broke off: {exc}", endpoint=url) from exc
    raise EndpointError(f"endpoint {url} closed the stream before data: [DONE]", endpoint=url)


def messages_from_history(chat_history: Iterable[Mapping[str, Any]], question: str) -> list[dict[str, str]]:
    """Prompt flow's chat_history ([{"inputs": {"question"}, "outputs": {"answer"}}]) plus the new question."""
    messages: list[dict[str, str]] = []
    for turn in chat_history or []:
        inputs, outputs = turn.get("inputs", {}), turn.get("outputs", {})
        if inputs.get("question"):
            messages.append({"role": "user", "content": str(inputs["question"])})
        if outputs.get("answer"):
            messages.append({"role": "assistant", "content": str(outputs["answer"])})
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty: type a question for the model")
    messages.append({"role": "user", "content": question})
    return messages


# --- where a flow finds the endpoint -----------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    url: str
    key: str = field(repr=False)  # never in a log line or a traceback
    kind: str = ""  # config.ENDPOINT_KINDS; "" = told from the URL on each call (guess_kind)
    chat_format: str = DEFAULT_CHAT_FORMAT  # the deployed model's family (chat_format.TURN_FORMATS)
    guessed_from: str = ""  # the empty setting `kind` was guessed for (guess_kind), else ""

    def options(self) -> dict[str, str]:
        """What ask / chat / chat_stream take besides the URL and key, to answer this endpoint."""
        return {"kind": self.kind, "chat_format_name": self.chat_format, "guessed_from": self.guessed_from}


def endpoint_from_connection(configs: Mapping[str, Any], secrets: Mapping[str, Any]) -> Endpoint:
    """The endpoint in a Prompt flow CustomConnection: configs.endpoint, configs.kind, secrets.key."""
    url = str(configs["endpoint"]) if "endpoint" in configs else ""
    key = str(secrets["key"]) if "key" in secrets else ""
    if not url or not key:
        raise EndpointError(
            f"the Prompt flow connection lacks configs.endpoint or secrets.key; {NOT_DEPLOYED_HINT}"
        )
    kind, guessed_from = resolve_kind(str(configs.get("kind") or ""), url, source=CONNECTION_KIND)
    family = str(configs["chat_format"]) if "chat_format" in configs else ""
    return Endpoint(url, key, kind, check_chat_format(family, source="the Prompt flow connection's configs.chat_format"),
                    guessed_from)


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines of a .env file, read by python-dotenv as config.py reads it (quotes, comments,
    `export`): one parser for what deploy_model.py writes."""
    from dotenv import dotenv_values

    return {name: value for name, value in dotenv_values(path).items() if value is not None}


def find_env_file(environ: Mapping[str, str], folders: Iterable[Path]) -> Path | None:
    """ENV_FILE when set (relative to the working directory), else the first `.env` in `folders`."""
    if environ.get("ENV_FILE"):
        return Path(environ["ENV_FILE"]).expanduser().resolve()
    for folder in folders:
        candidate = Path(folder) / ".env"
        if candidate.is_file():
            return candidate
    return None


def endpoint_from_environment(
    environ: Mapping[str, str] | None = None, folders: Iterable[Path] | None = None
) -> Endpoint:
    """AZURE_ML_ENDPOINT / AZURE_ML_API_KEY / AZURE_ML_ENDPOINT_KIND from the environment, else from the .env.

    The .env is ENV_FILE (what deploy_model.py wrote to) or `.env` in one of `folders` (default: the
    working directory). The environment wins over the file, as in config.py.
    """
    environ = os.environ if environ is None else environ
    folders = [Path.cwd()] if folders is None else [Path(f) for f in folders]
    names = ("AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY", KIND_VARIABLE, CHAT_FORMAT_VARIABLE)
    values = {n: environ[n] for n in names if environ.get(n)}
    env_file = None
    if len(values) < len(names):
        env_file = find_env_file(environ, folders)
        if env_file is not None and env_file.is_file():
            values = {**{n: v for n, v in read_env_file(env_file).items() if n in names and v}, **values}
    if not values.get("AZURE_ML_ENDPOINT") or not values.get("AZURE_ML_API_KEY"):
        where = f"the environment or {env_file}" if env_file else "the environment (and no .env was found)"
        raise EndpointError(
            f"AZURE_ML_ENDPOINT or AZURE_ML_API_KEY is not set in {where}; {NOT_DEPLOYED_HINT}, "
            "or set ENV_FILE to the .env it wrote"
        )
    kind, guessed_from = resolve_kind(values.get(KIND_VARIABLE), values["AZURE_ML_ENDPOINT"])
    return Endpoint(values["AZURE_ML_ENDPOINT"], values["AZURE_ML_API_KEY"], kind,
                    check_chat_format(values.get(CHAT_FORMAT_VARIABLE)), guessed_from)
