"""The two flows on Microsoft Agent Framework (maf_flows/), run with the real packages in their own venv.

`make agent-framework` builds .venv-maf (Agent Framework cannot share a venv with promptflow); every
test runs `python -m maf_flows` from it, as a user does, against the real local endpoint serving a
tiny model behind a recording proxy on 127.0.0.1 (what the endpoint received is asserted on), and
against stand-ins of a catalog deployment and a serverless endpoint. The parity tests ask the same
questions through the real `pf` CLI and through Agent Framework and compare the greedy answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import config
from catalog_standin import CatalogStandIn, RecordingProxy, ServerlessStandIn
from conftest import REPO, free_port
from finetune_phi import pf_connection, pf_env
from helpers_pf import built_venv, local_endpoint, start_own_pf_service

KEY = "maf-test-key-0123456789abcdefghijkl"
MAF_VENV = REPO / ".venv-maf"
PF = str(Path(sys.executable).parent / "pf")
QUESTIONS = ["Who founded Microsoft?", "What is the capital of France?", "Tell me about Phi-3."]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def maf_python() -> Path:
    return built_venv(REPO, "agent-framework", MAF_VENV)


@dataclass
class Served:
    proxy: RecordingProxy
    env: dict[str, str]  # AZURE_ML_* pointing at the proxy, a Prompt flow home with its connection


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from helpers_model import registered_tiny_model

    tmp = tmp_path_factory.mktemp("maf")
    model = registered_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")
    settings = config.load(env={}, dotenv_path=tmp / "no.env", STATE_DIR=str(tmp / "state"))
    (tmp / "home").mkdir()
    with local_endpoint(model, tmp, KEY) as port:
        proxy = RecordingProxy(f"http://127.0.0.1:{port}/score").start()
        env = {**pf_env.subprocess_env(settings), "HOME": str(tmp / "home"), "AZURE_ML_ENDPOINT": proxy.url,
               "AZURE_ML_API_KEY": KEY, "AZURE_ML_ENDPOINT_KIND": "local", "ENV_FILE": str(tmp / "none.env")}  # fmt: skip
        try:
            start_own_pf_service(PF, env)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("HOME", env["HOME"])
                pf_connection.upsert_connection(settings, endpoint=proxy.url, key=KEY, kind="local")
            yield Served(proxy, env)
        finally:
            subprocess.run([PF, "service", "stop"], env=env, capture_output=True, timeout=60)
            proxy.stop()


def maf(python: Path, env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "maf_flows", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def asked(python: Path, env: dict[str, str], question: str) -> str:
    done = maf(python, env, "ask", question)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout)["answer"]


def bot_lines(stdout: str) -> list[str]:
    return [part.split("\nUser:")[0].strip() for part in stdout.split("Bot: ")[1:]]


def test_the_standard_flow_answers_through_the_real_local_endpoints_openai_route(maf_python: Path, served: Served) -> None:
    n = len(served.proxy.exchanges)
    reply = asked(maf_python, served.env, "Who founded Microsoft?")
    (sent,) = served.proxy.since(n)
    assert sent.status == 200 and sent.authorization == f"Bearer {KEY}"
    assert sent.request["messages"] == [{"role": "user", "content": "Who founded Microsoft?"}]
    assert sent.request["stream"] is True and sent.request["temperature"] == 0.0  # greedy, as the pf tools
    assert reply == sent.response[0] and reply.strip()


def test_the_chat_flow_sends_the_history_as_messages_and_the_second_answer_follows_the_first(
    maf_python: Path, served: Served
) -> None:
    n = len(served.proxy.exchanges)
    done = maf(maf_python, served.env, "chat", stdin="Who founded Microsoft?\nAnd when?\n")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = served.proxy.since(n)
    replies = bot_lines(done.stdout)
    assert replies == [first.response[0].strip(), second.response[0].strip()]
    assert second.request["messages"] == [
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": first.response[0]},
        {"role": "user", "content": "And when?"},
    ]


def test_the_chat_streams_pieces_before_the_reply_ends(maf_python: Path, served: Served) -> None:
    served.proxy.hold_stream_after(2)
    proc = subprocess.Popen([str(maf_python), "-m", "maf_flows", "chat"], cwd=REPO, env=served.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    shown = bytearray()

    def read() -> None:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 4096):
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"Who founded Microsoft?\n")
        proc.stdin.flush()
        assert served.proxy.held.wait(60), "the endpoint's stream never reached its second piece"
        so_far = served.proxy.pieces_before_hold[0]
        # While the endpoint holds the rest of its reply back, the pieces already sent are on screen.
        deadline = time.monotonic() + 30
        while so_far not in shown.decode("utf-8", "replace") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert so_far in shown.decode("utf-8", "replace"), shown.decode("utf-8", "replace")
    finally:
        served.proxy.resume.set()
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode == 0
    assert shown.decode().count("Bot: ") == 1


def test_an_endpoint_error_reaches_the_caller_as_one_line(maf_python: Path, served: Served) -> None:
    wrong_key = maf(maf_python, {**served.env, "AZURE_ML_API_KEY": "not-the-key-0123456789"}, "ask", "Hi")
    assert wrong_key.returncode == 1 and wrong_key.stdout == ""
    (line,) = wrong_key.stderr.strip().splitlines()
    assert line.startswith("error: endpoint ") and "rejected the key (HTTP 401)" in line and "deploy_model.py" in line
    assert "not-the-key" not in line
    down = maf(maf_python, {**served.env, "AZURE_ML_ENDPOINT": f"http://127.0.0.1:{free_port()}/score"}, "ask", "Hi")
    (line,) = down.stderr.strip().splitlines()
    assert down.returncode == 1 and "cannot reach endpoint" in line
    nothing = maf(maf_python, {**served.env, "AZURE_ML_ENDPOINT": ""}, "ask", "Hi")
    (line,) = nothing.stderr.strip().splitlines()
    assert nothing.returncode == 1 and "AZURE_ML_ENDPOINT or AZURE_ML_API_KEY is not set" in line


def test_the_same_greedy_answers_through_prompt_flow_and_agent_framework(maf_python: Path, served: Served) -> None:
    from finetune_phi.demo import parse_flow_answer

    for question in QUESTIONS:
        through_pf = subprocess.run([PF, "flow", "test", "--flow", ".", "--inputs", f"input_data={question}"],
                                    cwd=REPO, env=served.env, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert through_pf.returncode == 0, through_pf.stdout[-2000:] + through_pf.stderr[-2000:]
        assert asked(maf_python, served.env, question) == parse_flow_answer(through_pf.stdout), question
    # The chat flow: two turns, the history carried by each framework its own way.
    turns = "Who founded Microsoft?\nAnd when?\n"
    chat_pf = subprocess.run([PF, "flow", "test", "--flow", "chat_flow", "--interactive"], input=turns, cwd=REPO,
                             env=served.env, capture_output=True, text=True, timeout=180)  # fmt: skip
    chat_maf = maf(maf_python, served.env, "chat", stdin=turns)
    assert chat_pf.returncode == chat_maf.returncode == 0, chat_pf.stdout[-2000:] + chat_maf.stderr[-2000:]
    n = len(served.proxy.exchanges)
    maf(maf_python, served.env, "chat", stdin=turns)
    replies = [e.response[0].strip() for e in served.proxy.since(n)]
    assert bot_lines(chat_maf.stdout) == replies
    for reply in replies:  # pf reflows whitespace when it prints a reply
        assert " ".join(reply.split()) in " ".join(chat_pf.stdout.split()), (reply, chat_pf.stdout[-2000:])


def test_the_score_kinds_go_through_the_projects_client(maf_python: Path, served: Served) -> None:
    # azure-mlflow: the request shape of Azure's MLflow scoring, to the local endpoint's /score.
    n = len(served.proxy.exchanges)
    reply = asked(maf_python, {**served.env, "AZURE_ML_ENDPOINT_KIND": "azure-mlflow"}, "Who founded Microsoft?")
    (sent,) = served.proxy.since(n)
    assert sent.request["input_data"] == ["Who founded Microsoft?"] and reply == sent.response[0]
    assert reply == asked(maf_python, served.env, "Who founded Microsoft?")  # the same greedy answer as /v1
    # azure-catalog: the Studio tutorial's shape, answered {"output": ...}.
    catalog = CatalogStandIn(KEY).start()
    try:
        env = {**served.env, "AZURE_ML_ENDPOINT": catalog.url, "AZURE_ML_ENDPOINT_KIND": "azure-catalog"}
        assert asked(maf_python, env, "Hi") == " Catalog reply 1 to: Hi"
        done = maf(maf_python, env, "chat", stdin="Hi\nAnd then?\n")
        assert bot_lines(done.stdout) == ["Catalog reply 1 to: Hi", "Catalog reply 2 to: And then?"]
        assert catalog.exchanges[-1].request["input_data"]["input_string"][1] == {
            "role": "assistant", "content": " Catalog reply 1 to: Hi"}
    finally:
        catalog.stop()


def test_a_serverless_endpoint_answers_through_agent_frameworks_own_client(maf_python: Path, served: Served) -> None:
    serverless = ServerlessStandIn(KEY).start()
    try:
        env = {**served.env, "AZURE_ML_ENDPOINT": serverless.url.removesuffix("/score"),
               "AZURE_ML_ENDPOINT_KIND": "azure-serverless"}  # fmt: skip
        assert asked(maf_python, env, "Who founded Microsoft?") == "Serverless reply 1 to: Who founded Microsoft?"
        (sent,) = serverless.exchanges
        assert sent.status == 200 and sent.request["stream"] is True
        assert sent.request["messages"] == [{"role": "user", "content": "Who founded Microsoft?"}]
        # No kind in the .env (a hand-made one): the serverless URL tells it.
        env_file = Path(served.env["HOME"]) / "hand-made.env"
        env_file.write_text(f"AZURE_ML_ENDPOINT={env['AZURE_ML_ENDPOINT']}\nAZURE_ML_API_KEY={KEY}\n")
        bare = {k: v for k, v in served.env.items() if not k.startswith("AZURE_ML_")}
        assert asked(maf_python, {**bare, "ENV_FILE": str(env_file)}, "Hi") == "Serverless reply 1 to: Hi"
        # A URI that names the route and an api-version: the query goes with every request, not into the path.
        routed = {**env, "AZURE_ML_ENDPOINT": env["AZURE_ML_ENDPOINT"] + "/v1/chat/completions?api-version=2024-05-01-preview"}
        assert asked(maf_python, routed, "Hi") == "Serverless reply 1 to: Hi"
    finally:
        serverless.stop()


def test_nothing_of_agent_framework_is_in_the_projects_venv() -> None:
    import importlib.util

    assert importlib.util.find_spec("agent_framework") is None
    pinned = (REPO / "maf_flows" / "requirements.txt").read_text()
    assert "agent-framework-core==" in pinned and "agent-framework-openai==" in pinned
