"""16 concurrent clients send 2,000 requests to the real CLI server over loopback.

Nothing may come back 5xx, nothing may be lost (every request gets an HTTP answer), and every
answer must be well-formed for what was asked: replies for good requests, JSON errors naming the
field for bad ones. The server runs with --max-concurrent-requests 16, sized so that 16 clients
are never refused: any 429 fails the test (tests/test_endpoint_hardening.py covers 429 itself).

Kept cheap: 1-2 new tokens per generation and half the traffic on fast paths (health, model list,
requests refused before generation), so it runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Callable, Iterator

import httpx
import pytest

from helpers_endpoint import AUTH, ProcessServer
from helpers_model import RegisteredModel, registered_tiny_model

CLIENTS = 16
REQUESTS = 2000
DEADLINE_S = 120  # the whole run; one request may take at most REQUEST_TIMEOUT_S
REQUEST_TIMEOUT_S = 30
JSON = {"Content-Type": "application/json"}

Check = Callable[[httpx.Response], bool]


def _error_names(param: str) -> Check:
    return lambda r: r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def _score_reply(r: httpx.Response) -> bool:
    body = r.json()
    return isinstance(body, list) and len(body) == 2 and all(isinstance(s, str) for s in body)


def _chat_reply(r: httpx.Response) -> bool:
    body = r.json()
    [choice] = body["choices"]
    usage = body["usage"]
    return (
        body["object"] == "chat.completion"
        and isinstance(choice["message"]["content"], str)
        and 1 <= usage["completion_tokens"] <= 2
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )


def _catalog_reply(r: httpx.Response) -> bool:
    body = r.json()
    return set(body) == {"output"} and isinstance(body["output"], str)


def _health(r: httpx.Response) -> bool:
    body = r.json()
    return body["status"] in ("alive", "ready") and 0 <= body["in_flight"] <= CLIENTS


# (name, method, path, body bytes, headers, expected status, check). Request i uses KINDS[i % 10].
KINDS: list[tuple[str, str, str, bytes | None, dict[str, str], int, Check]] = [
    ("score", "POST", "/score", json.dumps({"input_data": ["hi", "Be brief.\n\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nWho?"], "params": {"max_new_tokens": 1}}).encode(), {**AUTH, **JSON}, 200, _score_reply),
    ("chat", "POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}).encode(), {**AUTH, **JSON}, 200, _chat_reply),
    ("sampled", "POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hey"}], "max_tokens": 2, "temperature": 0.8, "seed": 3}).encode(), {**AUTH, **JSON}, 200, _chat_reply),
    ("studio", "POST", "/score", json.dumps({"input_data": {"input_string": [{"role": "user", "content": "x"}], "parameters": {"max_new_tokens": 1}}}).encode(), {**AUTH, **JSON}, 200, _catalog_reply),
    ("ready", "GET", "/health/ready", None, {}, 200, _health),
    ("models", "GET", "/v1/models", None, AUTH, 200, lambda r: r.json()["object"] == "list" and len(r.json()["data"]) == 1),
    ("invalid", "POST", "/score", json.dumps({"input_data": ["hi"], "params": {"max_new_tokens": 0}}).encode(), {**AUTH, **JSON}, 422, _error_names("params.max_new_tokens")),
    ("malformed", "POST", "/v1/chat/completions", b'{"messages": [', {**AUTH, **JSON}, 400, _error_names("body")),
    ("no-key", "POST", "/score", b'{"input_data": ["hi"]}', JSON, 401, _error_names("Authorization")),
    ("live", "GET", "/health/live", None, {}, 200, _health),
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> RegisteredModel:
    return registered_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")


@pytest.fixture(scope="module")
def cli_server(tiny_model: RegisteredModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    log_path = tmp_path_factory.mktemp("load") / "server.log"
    flags = ("--max-concurrent-requests", str(CLIENTS), "--request-timeout-s", str(REQUEST_TIMEOUT_S))
    with ProcessServer(tiny_model, log_path, *flags) as running:
        yield running


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S + 60)
def test_16_clients_2000_requests_no_5xx_none_lost_all_well_formed(cli_server: ProcessServer) -> None:
    statuses: Counter[str] = Counter()
    problems: list[str] = []
    answered = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_S

    def client(worker: int) -> None:
        with httpx.Client(base_url=cli_server.base, timeout=REQUEST_TIMEOUT_S) as http:
            for i in range(worker, REQUESTS, CLIENTS):
                name, method, path, body, headers, expected, check = KINDS[i % len(KINDS)]
                if time.monotonic() > deadline:
                    with lock:
                        problems.append(f"#{i} {name}: not sent, the {DEADLINE_S} s deadline passed")
                    continue
                try:
                    response = http.request(method, path, content=body, headers=headers)
                    fine = response.status_code == expected and check(response)
                    problem = None if fine else f"#{i} {name}: {response.status_code} {response.text[:200]}"
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:  # lost: no HTTP answer
                    problem, outcome = f"#{i} {name}: {type(exc).__name__}: {exc}", "lost"
                except (ValueError, KeyError, TypeError) as exc:  # an answer that is not the documented shape
                    problem, outcome = f"#{i} {name}: malformed reply: {exc!r}", "malformed"
                with lock:
                    statuses[outcome] += 1
                    answered[0] += outcome not in ("lost",)
                    if problem:
                        problems.append(problem)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic() + REQUEST_TIMEOUT_S))
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "clients still running after the deadline"

    summary = f"{dict(statuses)} in {elapsed:.1f} s"
    assert not problems, f"{len(problems)} bad outcomes ({summary}), first: {problems[:5]}"
    assert sum(statuses.values()) == answered[0] == REQUESTS, summary
    assert not [s for s in statuses if s.startswith("5")], summary
    expected = Counter(str(kind[5]) for kind in KINDS)  # each kind is sent REQUESTS / len(KINDS) times
    assert statuses == {status: n * REQUESTS // len(KINDS) for status, n in expected.items()}, summary
    assert cli_server.proc is not None and cli_server.proc.poll() is None, "the server died"
    log = cli_server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    with httpx.Client(base_url=cli_server.base, timeout=10) as http:
        assert http.get("/health/ready").json()["in_flight"] == 0
    print(f"load: {summary}")
