"""A plain HTTP client for the model's online endpoint (Azure ML's scoring contract, or the local one).

    from finetune_phi.endpoint_client import ask, chat
    ask("http://127.0.0.1:5001/score", key, "Who founded Microsoft?")
    chat(endpoint, key, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Who founded Microsoft?"}])

Nothing here imports Prompt flow: the flows' `@tool` functions are thin wrappers over these, so the
client outlives Prompt flow (retired on 2027-04-20) and is tested on its own.

Two request shapes, both answered by Azure ML managed endpoints and by finetune_phi.endpoint:
  * SDK shape:    {"input_data": ["question", ...], "params": {...}}      -> ["reply", ...]
  * Studio shape: {"input_data": {"input_string": [messages], "parameters": {...}}} -> {"output": "reply"}
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

# (connect, read) seconds. Generation on a CPU endpoint takes seconds; a real Phi-3 on a small
# Azure instance can take tens of seconds for 128 new tokens.
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 120.0)
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 128, "temperature": 0.7, "do_sample": True}

# 429 (throttled) and 503 (no healthy instance yet, e.g. while a deployment scales) are worth a
# retry; other errors are not going to change by asking again.
RETRY_STATUSES = (429, 503)
RETRIES = 3
BACKOFF_FACTOR = 0.5  # 0.5 s, 1 s, 2 s between tries
RETRY_AFTER_MAX = 30.0  # never sleep longer than this on a server's Retry-After

NOT_DEPLOYED_HINT = "run python deploy_model.py first"


class EndpointError(RuntimeError):
    """The endpoint could not be reached or did not answer; the message names it and the HTTP status."""

    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None):
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


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


def score(
    endpoint: str,
    key: str,
    payload: Mapping[str, Any],
    *,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
) -> Any:
    """POST `payload` to the scoring URI with the key as a Bearer token; return the decoded JSON."""
    endpoint = validate_endpoint(endpoint)
    if not key:
        raise EndpointError(
            f"no key for endpoint {endpoint}: AZURE_ML_API_KEY (or the connection's key) is empty; "
            f"{NOT_DEPLOYED_HINT}",
            endpoint=endpoint,
        )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": "application/json"}
    own_session = session is None
    session = session or make_session()
    try:
        response = session.post(endpoint, json=dict(payload), headers=headers, timeout=timeout)
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
        if own_session:
            session.close()

    status = response.status_code
    if status in (401, 403):
        raise EndpointError(
            f"endpoint {endpoint} rejected the key (HTTP {status}): {_error_detail(response, key)}; "
            "the key in AZURE_ML_API_KEY / the Prompt flow connection is not this endpoint's — "
            "re-run python deploy_model.py to refresh both",
            endpoint=endpoint,
            status=status,
        )
    if status in RETRY_STATUSES:
        raise EndpointError(
            f"endpoint {endpoint} is busy or not ready (HTTP {status}), also on retry: "
            f"{_error_detail(response, key)}",
            endpoint=endpoint,
            status=status,
        )
    if status >= 400:
        raise EndpointError(
            f"endpoint {endpoint} answered HTTP {status}: {_error_detail(response, key)}",
            endpoint=endpoint,
            status=status,
        )
    try:
        return response.json()
    except ValueError as exc:
        raise EndpointError(
            f"endpoint {endpoint} answered HTTP {status} with a body that is not JSON: "
            f"{_hide(response.text[:200], key)!r}",
            endpoint=endpoint,
            status=status,
        ) from exc


def _reply_text(body: Any, endpoint: str) -> str:
    """The reply in any of the shapes endpoints use: ["..."], [{"0": "..."}], {"output": "..."}."""
    item = body[0] if isinstance(body, list) and body else body
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for field in ("output", "generated_text", "0", "answer"):
            if isinstance(item.get(field), str):
                return item[field]
    raise EndpointError(
        f"endpoint {endpoint} answered with an unexpected shape: {json.dumps(body)[:200]}", endpoint=endpoint
    )


def ask(
    endpoint: str,
    key: str,
    question: str,
    *,
    params: Mapping[str, Any] | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
) -> str:
    """One question, one reply (the SDK request shape)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty: pass the text to send to the model")
    payload = {"input_data": [question], "params": {**DEFAULT_PARAMS, **(params or {})}}
    body = score(endpoint, key, payload, timeout=timeout, session=session)
    return _reply_text(body, endpoint)


def chat(
    endpoint: str,
    key: str,
    messages: Iterable[Mapping[str, str]],
    *,
    params: Mapping[str, Any] | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: requests.Session | None = None,
) -> str:
    """A conversation (role/content messages, the last one the user's) in, the assistant's reply out."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("messages must end with a user message: add the question as the last message")
    payload = {"input_data": {"input_string": msgs, "parameters": {**DEFAULT_PARAMS, **(params or {})}}}
    body = score(endpoint, key, payload, timeout=timeout, session=session)
    return _reply_text(body, endpoint)


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
