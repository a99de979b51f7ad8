"""Prompt flow, end to end: the real `pf` CLI, the real local endpoint serving a tiny Phi-3, headless Chromium.

Every pf process runs with the project's Prompt flow environment (an isolated home in a temporary
STATE_DIR, HOME pointed at a temporary folder) and a `sitecustomize` that refuses and records any
connection or name lookup outside 127.0.0.1: each test ends by checking that record is empty.
Between the flows and the endpoint sits a recording pass-through proxy, so the tests can compare
what the flow answered with what the endpoint said, and see the request shapes and the key used.

Each flow also runs from a copy of its snapshot alone (what pf copies for a batch run and Azure
uploads), with this project's installed packages hidden, against the real local endpoint and against
a stand-in for an Azure model-catalog deployment (tests/catalog_standin.py says what it cannot show).
"""

from __future__ import annotations

import ast
import importlib.metadata
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import free_port
from helpers_pf import local_endpoint, start_own_pf_service, stop_group, wait_http
import requests
import yaml

import config
from catalog_standin import CatalogStandIn, RecordingProxy, ServerlessStandIn
from chat_flow.endpoint_client import encode_prompt
from finetune_phi import pf_connection, pf_env

REPO = Path(__file__).resolve().parents[1]
KEY = "flow-test-key-0123456789abcdefghij"
PF = str(Path(sys.executable).parent / "pf")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]

NET_GUARD = '''
"""Test guard: this process may talk to loopback addresses only; anything else is refused and logged."""
import ipaddress, os, socket, traceback

_LOG = os.environ.get("PF_TEST_NET_GUARD_LOG")


def _local(host):
    if host in (None, "", "localhost") or isinstance(host, bytes) and host == b"localhost":
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:
        return False


def _refuse(what):
    with open(_LOG, "a", encoding="utf-8") as fh:
        fh.write(f"pid {os.getpid()}: {what}\\n" + "".join(traceback.format_stack(limit=6)) + "\\n")
    raise OSError(101, f"network blocked by test guard: {what}")


if _LOG:
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"connect {address!r}")
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"connect_ex {address!r}")
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _refuse(f"getaddrinfo {host!r}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo

if os.environ.get("PF_TEST_SNAPSHOT_ONLY"):
    # As on an Azure Prompt flow runtime, where this project is not installed: drop the editable
    # install's finder, so finetune_phi, config and chat_flow resolve only from the flow's own files.
    import sys

    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
'''


# --- fixtures -----------------------------------------------------------------------------------------


@dataclass
class FlowRig:
    settings: config.Settings
    env: dict[str, str]
    proxy: RecordingProxy
    guard_log: Path
    tmp: Path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowRig]:
    from helpers_model import registered_tiny_model

    tmp = tmp_path_factory.mktemp("pf")
    model = registered_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")
    settings = config.load(env={}, dotenv_path=tmp / "no.env", STATE_DIR=str(tmp / "state"))
    guard_dir = tmp / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(NET_GUARD, encoding="utf-8")
    (tmp / "home").mkdir()
    with local_endpoint(model, tmp, KEY) as port:
        proxy = RecordingProxy(f"http://127.0.0.1:{port}/score").start()
        env = pf_env.subprocess_env(settings)
        env.update(
            HOME=str(tmp / "home"),  # whatever pf would write under ~ lands here, and is checked below
            PYTHONPATH=os.pathsep.join(p for p in (str(guard_dir), env.get("PYTHONPATH", "")) if p),
            PF_TEST_NET_GUARD_LOG=str(tmp / "network-attempts.log"),
            AZURE_ML_ENDPOINT=proxy.url,  # the SDK variant reads these (environment beats .env)
            AZURE_ML_API_KEY=KEY,
            AZURE_ML_ENDPOINT_KIND="local",
        )
        rig = FlowRig(settings, env, proxy, tmp / "network-attempts.log", tmp)
        try:
            start_own_pf_service(PF, env)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("HOME", env["HOME"])  # the connection's child process inherits it
                pf_connection.upsert_connection(settings, endpoint=proxy.url, key=KEY, kind="local")
            yield rig
        finally:
            subprocess.run([PF, "service", "stop"], env=env, capture_output=True, timeout=60)
            proxy.stop()
    leftovers = sorted(str(p.relative_to(tmp / "home")) for p in (tmp / "home").rglob("*"))
    assert leftovers == [], f"Prompt flow wrote into HOME despite PF_HOME_DIRECTORY: {leftovers}"


@pytest.fixture
def flow(rig: FlowRig) -> Iterator[FlowRig]:
    yield rig
    attempts = rig.guard_log.read_text(encoding="utf-8") if rig.guard_log.exists() else ""
    assert attempts == "", f"a pf process tried to reach beyond 127.0.0.1:\n{attempts[:3000]}"


def pf(rig: FlowRig, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
       ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [PF, *args], input=stdin, capture_output=True, text=True, cwd=REPO,
        env=env or rig.env, timeout=180,
    )
    if ok:
        assert proc.returncode == 0, f"pf {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def flow_outputs(stdout: str) -> dict[str, Any]:
    """`pf flow test` prints the outputs as the last JSON object of its output."""
    start = stdout.rfind("{")
    while start != -1:
        try:
            return json.loads(stdout[start:])
        except json.JSONDecodeError:
            start = stdout.rfind("{", 0, start)
    raise AssertionError(f"no JSON outputs in pf output:\n{stdout[-2000:]}")


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]{3,}", text)


@pytest.mark.slow
def test_the_network_guard_catches_an_outside_connection(rig: FlowRig) -> None:
    """The control for every `flow` test's "no network" check: the guard does record attempts."""
    log = rig.tmp / "control-attempts.log"
    code = "import socket\ntry:\n    socket.getaddrinfo('pypi.org', 443)\nexcept OSError as e:\n    print(e)"
    proc = subprocess.run([sys.executable, "-c", code], env={**rig.env, "PF_TEST_NET_GUARD_LOG": str(log)},
                          capture_output=True, text=True, timeout=30)
    assert "network blocked by test guard" in proc.stdout
    assert "getaddrinfo 'pypi.org'" in log.read_text()


# --- Prompt flow's environment (no subprocess) ----------------------------------------------------------


def test_pf_env_prepares_an_offline_isolated_home(tmp_path: Path) -> None:
    settings = config.load(env={}, dotenv_path=tmp_path / "no.env", STATE_DIR=str(tmp_path / "state"))
    home = pf_env.promptflow_home(settings)
    home.mkdir(parents=True)
    (home / "pf.yaml").write_text("cli:\n  installation_id: abc\ntrace:\n  destination: local\n")
    env = pf_env.promptflow_env(settings)
    again = pf_env.promptflow_env(settings)
    assert env == again
    assert env["PF_HOME_DIRECTORY"] == str(tmp_path / "state" / "promptflow")
    assert env["PYTHON_KEYRING_BACKEND"] == "keyrings.alt.file.PlaintextKeyring"
    assert env["KEYRING_PROPERTY_FILE_PATH"].startswith(env["PF_HOME_DIRECTORY"])
    assert env["APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED"] == "true"
    cfg = yaml.safe_load((home / "pf.yaml").read_text())
    # Telemetry turned off, an explicit choice already there (local traces) and other keys kept.
    assert cfg == {"cli": {"installation_id": "abc"}, "telemetry": {"enabled": False}, "trace": {"destination": "local"}}
    check = json.loads((home / "pf_version_check.json").read_text())
    assert check["last_check_time"].startswith("2999")
    assert (home / "keyring_pass.cfg").stat().st_mode & 0o077 == 0
    assert home.stat().st_mode & 0o077 == 0


def test_pf_env_exports_the_home_and_the_env_file_for_a_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ENV_FILE", "deploy.env")  # relative: exported as the absolute path config resolves
    assert pf_env.main([]) == 0
    exported = dict(line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert exported["PF_HOME_DIRECTORY"] == str(tmp_path / "state" / "promptflow")
    assert exported["ENV_FILE"] == str(config.ROOT / "deploy.env")


def test_project_pf_yaml_keeps_pf_offline_from_the_checkout() -> None:
    cfg = yaml.safe_load((REPO / "pf.yaml").read_text())
    assert cfg["telemetry"]["enabled"] is False and cfg["trace"]["destination"] == "none"


def test_flow_definitions_match_the_contract() -> None:
    dag = yaml.safe_load((REPO / "flow.dag.yml").read_text())
    assert dag["inputs"] == {"input_data": {"type": "string", "default": "Who founded Microsoft?"}}
    assert [n["name"] for n in dag["nodes"]] == ["integrate_with_promptflow"]
    assert set(dag["outputs"]) == {"answer"}
    chat = yaml.safe_load((REPO / "chat_flow" / "flow.dag.yaml").read_text())
    assert chat["inputs"]["chat_history"]["is_chat_history"] is True
    assert chat["inputs"]["question"]["is_chat_input"] is True
    assert chat["outputs"]["answer"]["is_chat_output"] is True
    (node,) = chat["nodes"]
    assert node["inputs"]["connection"] == config.Settings().PROMPTFLOW_CONNECTION_NAME
    for line in (REPO / "chat_flow" / "data.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert set(row) == {"question", "chat_history"}
    # Both flows name their schema and the requirements an Azure runtime installs, inside the flow.
    for folder, flow in ((REPO, dag), (REPO / "chat_flow", chat)):
        assert flow["$schema"].endswith("/Flow.schema.json")
        requirements = folder / flow["environment"]["python_requirements_txt"]
        assert requirements.resolve().is_relative_to(folder) and requirements.is_file()


def test_flow_requirements_pin_what_the_project_pins() -> None:
    """What an Azure runtime installs for the flows is what the tests ran with (constraints.txt)."""
    def pins(path: Path) -> dict[str, str]:
        found = (re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.split("#")[0].strip())
                 for line in path.read_text().splitlines())
        return {m.group(1).lower(): m.group(2) for m in found if m}

    flow_pins, project_pins = pins(REPO / "chat_flow" / "requirements.txt"), pins(REPO / "constraints.txt")
    assert set(flow_pins) == {"promptflow", "python-dotenv", "requests", "urllib3"}
    assert {name: project_pins.get(name) for name in flow_pins} == flow_pins


def test_tool_imports_quietly_and_takes_the_studio_connection() -> None:
    code = """
import logging
import integrate_with_promptflow as t
from promptflow.connections import CustomConnection
from chat_flow.endpoint_client import EndpointError

assert logging.getLogger().handlers == [], logging.getLogger().handlers  # importing configured nothing
conn = CustomConnection(configs={"endpoint": "http://127.0.0.1:9/score", "kind": "azure-catalog"},
                        secrets={"key": "studio-key"})
found = t.find_endpoint(conn)
assert (found.url, found.key, found.kind) == ("http://127.0.0.1:9/score", "studio-key", "azure-catalog")
try:
    t.find_endpoint(CustomConnection(configs={}, secrets={"key": "k"}))
except EndpointError as exc:
    assert "deploy_model.py" in str(exc)
else:
    raise AssertionError("a connection without an endpoint was accepted")
print("ok")
"""
    with tempfile.TemporaryDirectory() as tmp:
        settings = config.load(env={}, dotenv_path=Path(tmp) / "no.env", STATE_DIR=tmp)
        env = {**pf_env.subprocess_env(settings), "HOME": tmp}
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --- the CustomConnection ------------------------------------------------------------------------------


@pytest.mark.slow
def test_connection_upsert_creates_updates_and_keeps_the_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # the children inherit it: ~/.promptflow would land here
    settings = config.load(env={}, dotenv_path=tmp_path / "no.env", STATE_DIR=str(tmp_path / "state"))

    first = pf_connection.upsert_connection(settings, endpoint="http://127.0.0.1:5001/score",
                                            key="key-one-aaaaaaaaaaaaaaaa", kind="local")
    assert first == {"name": "phi3_endpoint",
                     "configs": {"endpoint": "http://127.0.0.1:5001/score", "kind": "local", "chat_format": "phi3"}}
    pf_connection.upsert_connection(settings, endpoint="http://127.0.0.1:5002/score",
                                    key="key-two-bbbbbbbbbbbbbbbb", kind="azure-mlflow", chat_format="phi4-mini")
    stored = pf_connection.read_connection(settings, with_secret=True)
    assert stored["configs"] == {"endpoint": "http://127.0.0.1:5002/score", "kind": "azure-mlflow", "chat_format": "phi4-mini"}
    assert stored["secrets"] == {"key": "key-two-bbbbbbbbbbbbbbbb"}

    # Encrypted at rest: the sqlite store does not hold the key in clear.
    store = (pf_env.promptflow_home(settings) / "pf.sqlite").read_bytes()
    assert b"key-two-bbbbbbbbbbbbbbbb" not in store
    assert list(home.iterdir()) == [], "nothing may be written under HOME (~/.promptflow, keyrings)"

    with pytest.raises(config.ConfigError, match="not an http"):
        pf_connection.upsert_connection(settings, endpoint="", key="k", kind="local")
    with pytest.raises(config.ConfigError, match="PROMPTFLOW_CONNECTION_NAME"):
        pf_connection.upsert_connection(settings.with_overrides(PROMPTFLOW_CONNECTION_NAME="bad name!"),
                                        endpoint="http://127.0.0.1:1/score", key="k", kind="local")
    with pytest.raises(config.ConfigError, match="local, azure-mlflow, azure-catalog"):
        pf_connection.upsert_connection(settings, endpoint="http://127.0.0.1:1/score", key="k", kind="serverless")
    with pytest.raises(config.ConfigError, match="chat_format='phi5': use one of phi3, phi4-mini"):
        pf_connection.upsert_connection(settings, endpoint="http://127.0.0.1:1/score", key="k", kind="local",
                                        chat_format="phi5")


# --- the flows through the real pf CLI -----------------------------------------------------------------


@pytest.mark.slow
def test_standard_flow_answers_with_the_endpoints_reply(flow: FlowRig) -> None:
    n = len(flow.proxy.exchanges)
    default = flow_outputs(pf(flow, "flow", "test", "--flow", ".").stdout)
    custom = flow_outputs(pf(flow, "flow", "test", "--flow", ".", "--inputs", "input_data=What is Phi-3?").stdout)
    first, second = flow.proxy.since(n)
    assert first.request["input_data"] == ["Who founded Microsoft?"]  # the flow's default input
    assert second.request["input_data"] == ["What is Phi-3?"]
    assert first.authorization == f"Bearer {KEY}" and first.status == 200
    assert default == {"answer": first.response[0]}
    assert custom == {"answer": second.response[0]}


@pytest.mark.slow
def test_standard_flow_with_a_wrong_key_names_the_fix_and_hides_the_key(flow: FlowRig) -> None:
    wrong = pf(flow, "flow", "test", "--flow", ".", env={**flow.env, "AZURE_ML_API_KEY": "wrong-key-zzzzzzzzzzzzzzzz"}, ok=False)
    out = wrong.stdout + wrong.stderr
    assert wrong.returncode != 0
    assert f"endpoint {flow.proxy.url} rejected the key (HTTP 401)" in out
    assert "wrong-key-zzzzzzzzzzzzzzzz" not in out and KEY not in out
    assert "re-run python deploy_model.py" in out


async def serve_app_settled(chat_url: str) -> None:
    """`pf flow test --ui` restarts its serve app when a turn writes into the flow folder
    (.promptflow/): wait for the restart to begin and the new app to answer before the next question."""
    port = re.search(r"serve_app_port=(\d+)", chat_url)
    assert port, chat_url
    await asyncio.sleep(2)
    end = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port.group(1)}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < end, "the --ui serve app did not come back after its restart"
        await asyncio.sleep(0.2)


async def _chat_in_browser(url: str, questions: list[str], user_data_dir: Path, proxy: RecordingProxy | None = None) -> str:
    """Open the chat page in headless Chromium over the DevTools protocol, ask, return the message list text.

    With `proxy` holding the first reply's stream part way (hold_stream_after), check that the page
    shows the part that has arrived while the rest is held, then let the rest through; each turn
    ends when the proxy has relayed its whole stream and the page shows the reply's first words."""
    import aiohttp

    browser = subprocess.Popen(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        port_file = user_data_dir / "DevToolsActivePort"
        for _ in range(150):
            if port_file.exists() and len(port_file.read_text().split()) >= 2:
                break
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1_000_000))

                async def call(method: str, **params: Any) -> Any:
                    mid = next(ids)
                    await ws.send_json({"id": mid, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json(timeout=60)
                        if msg.get("id") == mid:
                            assert "error" not in msg, msg
                            return msg["result"]

                async def js(expression: str) -> Any:
                    result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                    return result["result"].get("value")

                async def until(expression: str, seconds: float) -> Any:
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        value = await js(expression)
                        if value:
                            return value
                        await asyncio.sleep(0.2)
                    page_text = await js("document.body.innerText")
                    raise AssertionError(f"chat page: {expression} stayed false for {seconds} s; page:\n{page_text[-1500:]}")

                messages = "document.querySelector('[data-chatbox-locator=chatbox-message-list]')"
                await call("Page.navigate", url=url)
                await until("!!document.querySelector('[data-lexical-editor]')", 60)
                editor = "document.querySelector('[data-lexical-editor]')"
                streams_before = proxy.streams_done if proxy is not None else 0
                send_enabled = "!document.querySelector('button[title=Send]').disabled"
                for i, question in enumerate(questions, start=1):
                    # The editor can exist before its handlers are attached: type until Send enables.
                    for _ in range(20):
                        await js(f"{editor}.focus()")
                        if not (await js(f"{editor}.innerText")).strip():
                            await call("Input.insertText", text=question)
                        await asyncio.sleep(0.5)
                        if await js(send_enabled):
                            break
                    await until(send_enabled, 1)
                    await js("document.querySelector('button[title=Send]').click()")
                    if proxy is not None and i == 1:
                        end = time.monotonic() + 60
                        while not proxy.held.is_set():
                            assert time.monotonic() < end, "the reply's stream never reached the proxy's hold"
                            await asyncio.sleep(0.1)
                        shown = words(proxy.pieces_before_hold[0])[:3]
                        assert shown, proxy.pieces_before_hold
                        # While the stream is held, its first pieces are on the page (a streaming
                        # turn shows its "View trace" link as soon as it starts).
                        await until(f"{json.dumps(shown)}.every(w => {messages}.innerText.includes(w))", 20)
                        proxy.resume.set()
                    if proxy is not None:
                        end = time.monotonic() + 90
                        while proxy.streams_done < streams_before + i:
                            assert time.monotonic() < end, "the reply's stream did not end"
                            await asyncio.sleep(0.1)
                        reply = words(proxy.exchanges[-1].response[0])[:8]
                        await until(f"{json.dumps(reply)}.every(w => {messages}.innerText.includes(w))", 30)
                        if i < len(questions):
                            await serve_app_settled(url)
                    # An answered turn shows its reply and a "View trace" link; one in progress
                    # shows the link beside "Generating chat output for you".
                    await until(
                        f"!{messages}.innerText.includes('Generating chat output')"
                        f" && ({messages}.innerText.match(/View trace/g) || []).length >= {i}",
                        90,
                    )
                return await js(f"{messages}.innerText")
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()


@pytest.mark.slow
def test_chat_flow_ui_answers_in_headless_chromium(flow: FlowRig) -> None:
    if shutil.which("chromium") is None:
        pytest.fail("chromium not found: run `apt-get install -y chromium` (scripts/ensure-chromium.sh does it)")
    # A copy of the flow: the chat page keeps its conversation in <flow>/.promptflow/ux.inputs.json,
    # and the test must start from an empty one without touching a user's.
    chat_flow = flow.tmp / "chat_flow"
    shutil.rmtree(chat_flow, ignore_errors=True)
    shutil.copytree(REPO / "chat_flow", chat_flow, ignore=shutil.ignore_patterns(".promptflow", "__pycache__"))
    # Beside it as in the repository, for the flow's additional_includes (../finetuning_dir/chat_format.py).
    (flow.tmp / "finetuning_dir").mkdir(exist_ok=True)
    shutil.copy2(REPO / "finetuning_dir" / "chat_format.py", flow.tmp / "finetuning_dir" / "chat_format.py")
    port = free_port()
    log_path = flow.tmp / "ui.log"
    with log_path.open("w") as log:
        ui = subprocess.Popen(
            [PF, "flow", "test", "--flow", str(chat_flow), "--ui", "--skip-open-browser", "--port", str(port)],
            cwd=REPO, env=flow.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    n = len(flow.proxy.exchanges)
    flow.proxy.hold_stream_after(4)
    try:
        end = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < end and ui.poll() is None:
            found = re.search(r"http://127\.0\.0\.1:\d+/v1\.0/ui/chat\?\S+", log_path.read_text())
            url = found.group(0) if found else None
            time.sleep(0.2)
        assert url, f"pf --ui printed no chat URL:\n{log_path.read_text()[-3000:]}"
        wait_http(f"http://127.0.0.1:{port}/health", 60, ui)
        text = asyncio.run(
            _chat_in_browser(url, ["Who founded Microsoft?", "And when?"], flow.tmp / "chromium", proxy=flow.proxy)
        )
    finally:
        flow.proxy.resume.set()
        stop_group(ui)
    first, second = flow.proxy.since(n)
    # The page kept the history: the second request holds the first turn (the local kind streams
    # from /v1/chat/completions, the conversation as messages).
    assert second.request["stream"] is True and second.request["messages"] == [
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": first.response[0]},
        {"role": "user", "content": "And when?"},
    ]
    assert "Who founded Microsoft?" in text and "And when?" in text
    for exchange in (first, second):
        reply_words = words(exchange.response[0])[:8]
        assert reply_words and all(w in text for w in reply_words), (reply_words, text[-1500:])


@pytest.mark.slow
def test_flow_serve_answers_post_score(flow: FlowRig) -> None:
    port = free_port()
    serve = subprocess.Popen(
        [PF, "flow", "serve", "--source", ".", "--host", "127.0.0.1", "--port", str(port), "--skip-open-browser"],
        cwd=REPO, env=flow.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, serve)
        n = len(flow.proxy.exchanges)
        reply = requests.post(f"http://127.0.0.1:{port}/score", json={"input_data": "Served question?"}, timeout=60)
    finally:
        stop_group(serve)
    (exchange,) = flow.proxy.since(n)
    assert reply.status_code == 200
    assert exchange.request["input_data"] == ["Served question?"]
    assert reply.json() == {"answer": exchange.response[0]}


@pytest.mark.slow
def test_batch_run_over_test_data_writes_one_answer_per_row(flow: FlowRig, ultrachat_20: Path) -> None:
    rows = [json.loads(line) for line in ultrachat_20.read_text(encoding="utf-8").splitlines()[:3]]
    data = flow.tmp / "test_data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    n = len(flow.proxy.exchanges)
    pf(flow, "run", "create", "--flow", ".", "--data", str(data), "--name", "batch_test_run",
       "--column-mapping", "input_data=${data.prompt}")
    run_dir = pf_env.promptflow_home(flow.settings) / ".runs" / "batch_test_run"
    outputs = [json.loads(line) for line in (run_dir / "flow_outputs" / "output.jsonl").read_text().splitlines()]
    by_question = {e.request["input_data"][0]: e.response[0] for e in flow.proxy.since(n)}
    assert sorted(o["line_number"] for o in outputs) == [0, 1, 2]
    for out in outputs:
        assert out["answer"] == by_question[rows[out["line_number"]]["prompt"]]
    snapshot = run_dir / "snapshot"
    assert (snapshot / "integrate_with_promptflow.py").is_file()
    assert (snapshot / "chat_flow" / "endpoint_client.py").is_file()
    # What pf copied is what flow_snapshot_files says (pf adds the DAG under its default name).
    assert {p.name for p in snapshot.iterdir()} - {"flow.dag.yaml"} == {p.parts[0] for p in flow_snapshot_files(REPO)}
    for heavy_or_secret in (".venv", ".git", ".env", ".finetune_phi", "data", "finetune_phi", "config.py"):
        assert not (snapshot / heavy_or_secret).exists(), f"{heavy_or_secret} copied into the run snapshot"


@pytest.mark.slow
def test_chat_flow_batch_run_snapshot_carries_the_chat_format_it_includes(flow: FlowRig) -> None:
    """pf resolves the chat flow's additional_includes into the run's snapshot, as copy_snapshot models it."""
    name = f"chat_batch_{uuid.uuid4().hex[:8]}"
    n = len(flow.proxy.exchanges)
    pf(flow, "run", "create", "--flow", "chat_flow", "--data", "chat_flow/data.jsonl", "--name", name,
       "--column-mapping", "question=${data.question}", "chat_history=${data.chat_history}")
    run_dir = pf_env.promptflow_home(flow.settings) / ".runs" / name
    outputs = [json.loads(line) for line in (run_dir / "flow_outputs" / "output.jsonl").read_text().splitlines()]
    rows = (REPO / "chat_flow" / "data.jsonl").read_text().splitlines()
    assert len(outputs) == len(rows) == len(flow.proxy.since(n))
    assert all(out["answer"] for out in outputs)
    snapshot = run_dir / "snapshot"
    assert (snapshot / "chat_format.py").read_bytes() == (REPO / "finetuning_dir" / "chat_format.py").read_bytes()
    assert "additional_includes" not in yaml.safe_load((snapshot / "flow.dag.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        modelled = copy_snapshot(REPO / "chat_flow", Path(tmp) / "chat")
        ours = {p.relative_to(modelled) for p in modelled.rglob("*") if p.is_file()}
    written = {p.relative_to(snapshot) for p in snapshot.rglob("*") if p.is_file()}
    assert written == ours, (written ^ ours)


# --- each flow's snapshot on its own: what Azure would upload, run with nothing else ---------------------

FLOWS = {"standard": REPO, "chat": REPO / "chat_flow"}


def ignore_patterns(flow_dir: Path) -> list[str]:
    """Prompt flow's rule (promptflow 1.18.5: PromptflowIgnoreFile, LocalStorageOperations.dump_snapshot):
    .git, .runs and __pycache__, plus the lines of the flow folder's .amlignore, or of its .gitignore
    when it has none, each matched against names at every depth (shutil.ignore_patterns). The batch
    run test checks this against the snapshot pf really writes."""
    for name in (".amlignore", ".gitignore"):
        path = flow_dir / name
        if path.is_file():
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            return [".git", ".runs", "__pycache__", *(line for line in lines if line and not line.startswith("#"))]
    return [".git", ".runs", "__pycache__"]


def flow_snapshot_files(flow_dir: Path) -> list[Path]:
    """The files Prompt flow copies into a run's snapshot (and uploads to Azure), relative to the flow."""
    ignore = shutil.ignore_patterns(*ignore_patterns(flow_dir))
    found: list[Path] = []
    for root, dirs, files in os.walk(flow_dir):
        skipped = ignore(root, dirs + files)
        dirs[:] = sorted(d for d in dirs if d not in skipped)
        found += [Path(root, f).relative_to(flow_dir) for f in sorted(files) if f not in skipped]
    return found


def flow_dag(flow_dir: Path) -> Path:
    return next(flow_dir.glob("flow.dag.y*ml"))


def included_files(flow_dir: Path) -> dict[Path, Path]:
    """The flow's additional_includes (files): its name in the snapshot -> the file pf copies there.

    pf puts each at the snapshot's root under its own name and drops the key from the snapshot's DAG
    (promptflow 1.18.5: _merge_local_code_and_additional_includes, remove_additional_includes); the chat
    flow's batch run test checks this against the snapshot pf really writes."""
    includes = yaml.safe_load(flow_dag(flow_dir).read_text()).get("additional_includes") or []
    return {Path(Path(item).name): (flow_dir / item).resolve() for item in includes}


def copy_snapshot(flow_dir: Path, dest: Path) -> Path:
    """The flow as pf snapshots it and Azure receives it: its own files plus its additional includes."""
    shutil.rmtree(dest, ignore_errors=True)
    includes = included_files(flow_dir)
    sources = {rel: flow_dir / rel for rel in flow_snapshot_files(flow_dir)} | includes
    for rel, source in sources.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / rel)
    if includes:
        dag_path = flow_dag(dest)
        dag = yaml.safe_load(dag_path.read_text())
        dag.pop("additional_includes")
        dag_path.write_text(yaml.safe_dump(dag, sort_keys=False))
    return dest


def requirement_names(path: Path) -> set[str]:
    """The top-level import names the requirements provide: each distribution's own name, and the
    packages it installs as this venv's metadata records them (python-dotenv installs `dotenv`)."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name).lower()

    dists = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            dists.add(norm(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    provided = {top for top, owners in importlib.metadata.packages_distributions().items()
                if any(norm(owner) in dists for owner in owners)}  # fmt: skip
    return dists | provided


def run_time_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, less the bodies of `if TYPE_CHECKING:` blocks: imports for type hints never run."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            nodes = [child.test, *child.orelse]
        else:
            nodes = [child]
        for node in nodes:
            yield node
            yield from run_time_nodes(node)


def imports_from_outside(snapshot: Path, requirements: Path) -> list[str]:
    """Every import in the snapshot's .py files that neither the standard library, the flow's
    requirements nor the snapshot itself can satisfy. A file resolves top-level names against the
    snapshot (the flow folder is on sys.path) and against the folder of the flow it belongs to, the
    nearest one with a flow.dag.yaml (chat_flow/ inside the standard flow's snapshot)."""
    allowed = set(sys.stdlib_module_names) | requirement_names(requirements)
    problems = []
    for py in sorted(snapshot.rglob("*.py")):
        own_flow = next((d for d in py.parents if d.is_relative_to(snapshot) and any(d.glob("flow.dag.y*ml"))), snapshot)
        roots = {snapshot, own_flow}
        tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
        for node in run_time_nodes(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must stay inside the snapshot
                    base = py.parent
                    for _ in range(node.level - 1):
                        base = base.parent
                    if not base.resolve().is_relative_to(snapshot.resolve()):
                        problems.append(f"{py.relative_to(snapshot)}: from {'.' * node.level}{node.module or ''}")
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                inside = any((root / f"{top}.py").is_file() or (root / top).is_dir() for root in roots)
                if top not in allowed and not inside:
                    problems.append(f"{py.relative_to(snapshot)}: import {name}")
    return problems


@dataclass
class Target:
    """A deployment of one kind, with a pf environment whose connection and AZURE_ML_* point at it."""

    kind: str
    url: str
    env: dict[str, str]
    recorder: Any  # RecordingProxy or CatalogStandIn: .exchanges, .since(n)

    def reply(self, exchange: Any) -> str:
        if self.kind == "azure-serverless":
            return exchange.response["choices"][0]["message"]["content"]
        return exchange.response["output"] if self.kind == "azure-catalog" else exchange.response[0]


@pytest.fixture(scope="module")
def catalog(rig: FlowRig) -> Iterator[Target]:
    standin = CatalogStandIn(KEY).start()
    settings = config.load(env={}, dotenv_path=rig.tmp / "no.env", STATE_DIR=str(rig.tmp / "catalog-state"))
    env = {**rig.env, **pf_env.promptflow_env(settings),  # a Prompt flow home of its own, for its connection
           "AZURE_ML_ENDPOINT": standin.url, "AZURE_ML_ENDPOINT_KIND": "azure-catalog"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", env["HOME"])
            pf_connection.upsert_connection(settings, endpoint=standin.url, key=KEY, kind="azure-catalog")
        yield Target("azure-catalog", standin.url, env, standin)
    finally:
        subprocess.run([PF, "service", "stop"], env=env, capture_output=True, timeout=60)
        standin.stop()


@pytest.fixture(scope="module")
def serverless(rig: FlowRig) -> Iterator[Target]:
    """A serverless endpoint's chat route (fine-tuning as a service), at the URI Azure reports: no /score."""
    standin = ServerlessStandIn(KEY).start()
    uri = standin.url.removesuffix("/score")
    settings = config.load(env={}, dotenv_path=rig.tmp / "no.env", STATE_DIR=str(rig.tmp / "serverless-state"))
    env = {**rig.env, **pf_env.promptflow_env(settings),
           "AZURE_ML_ENDPOINT": uri, "AZURE_ML_ENDPOINT_KIND": "azure-serverless"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", env["HOME"])
            pf_connection.upsert_connection(settings, endpoint=uri, key=KEY, kind="azure-serverless")
        yield Target("azure-serverless", uri, env, standin)
    finally:
        subprocess.run([PF, "service", "stop"], env=env, capture_output=True, timeout=60)
        standin.stop()


@pytest.fixture(params=["local", "azure-catalog", "azure-serverless"])
def target(request: pytest.FixtureRequest, flow: FlowRig) -> Target:
    if request.param == "local":
        return Target("local", flow.proxy.url, flow.env, flow.proxy)
    return request.getfixturevalue("catalog" if request.param == "azure-catalog" else "serverless")


@pytest.fixture(scope="module")
def snapshots(rig: FlowRig) -> dict[str, Path]:
    """A copy of each flow's snapshot, alone in a temporary folder."""
    return {name: copy_snapshot(folder, rig.tmp / "snapshots" / name) for name, folder in FLOWS.items()}


def snapshot_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PF_TEST_SNAPSHOT_ONLY": "1"}  # the guard hides this project's installed packages


def test_each_flow_snapshot_holds_its_code_and_imports_nothing_from_outside() -> None:
    standard = {p.as_posix() for p in flow_snapshot_files(REPO)}
    chat = {p.as_posix() for p in [*flow_snapshot_files(REPO / "chat_flow"), *included_files(REPO / "chat_flow")]}
    assert {"flow.dag.yml", "integrate_with_promptflow.py", "chat_flow/endpoint_client.py",
            "chat_flow/requirements.txt"} <= standard
    assert {"flow.dag.yaml", "chat_with_endpoint.py", "endpoint_client.py", "requirements.txt"} <= chat
    # The Phi-3 chat format the client loads: its one home, not a copy kept in chat_flow/.
    assert "finetuning_dir/chat_format.py" in standard and "chat_format.py" in chat
    assert included_files(REPO / "chat_flow") == {Path("chat_format.py"): REPO / "finetuning_dir" / "chat_format.py"}
    assert not (REPO / "chat_flow" / "chat_format.py").exists()
    assert [f for f in standard if f.startswith("finetuning_dir/") and f.endswith(".py")] == ["finetuning_dir/chat_format.py"]
    for files in (standard, chat):
        names = {part for p in files for part in Path(p).parts}
        assert not names & {"finetune_phi", "config.py", ".env", ".venv", "tests", ".promptflow", "fine_tune.py"}, names
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in FLOWS.items():
            copy = copy_snapshot(folder, Path(tmp) / name)
            dag = yaml.safe_load(flow_dag(copy).read_text())
            requirements = copy / dag["environment"]["python_requirements_txt"]
            assert imports_from_outside(copy, requirements) == [], name
            # endpoint_client.py loads the chat format by path, not by an import statement: from the copy.
            client = next(copy.rglob("endpoint_client.py"))
            assert loaded_chat_format(client.parent) == (client.parent / ("chat_format.py" if name == "chat" else
                                                                         "../finetuning_dir/chat_format.py")).resolve()
    # The controls: the check does catch what the old tool imported, and what a TYPE_CHECKING block
    # leaves out is only that block.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tool.py").write_text("import config\nfrom finetune_phi.common import redact\nimport requests\n"
                                           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                                           "else:\n    import numpy\n")
        (Path(tmp) / "requirements.txt").write_text("requests==2.34.2\n")
        assert imports_from_outside(Path(tmp), Path(tmp) / "requirements.txt") == [
            "tool.py: import config", "tool.py: import finetune_phi.common", "tool.py: import numpy"]


def loaded_chat_format(folder: Path) -> Path:
    """The chat_format.py that `import endpoint_client` loads from `folder`, with this project's installed
    packages hidden (as on an Azure runtime) and no chat_format on sys.path."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '')"
            ".startswith('__editable__')]; sys.path.insert(0, '.'); import endpoint_client; "
            "print(endpoint_client.chat_format.__file__)")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=folder, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.strip()).resolve()


@pytest.mark.slow
def test_azure_uploads_the_files_pf_puts_in_a_snapshot() -> None:
    """Azure's code upload reads the same .amlignore with gitignore rules (azure-ai-ml 1.35.2's
    get_upload_files_from_folder): it must pick the same files as Prompt flow's name patterns."""
    from azure.ai.ml._utils._asset_utils import get_ignore_file, get_upload_files_from_folder

    for folder in FLOWS.values():
        uploaded = get_upload_files_from_folder(folder, ignore_file=get_ignore_file(folder))
        assert {Path(local).relative_to(folder) for local, _ in uploaded} == set(flow_snapshot_files(folder))


@pytest.mark.slow
def test_the_snapshot_guard_hides_the_installed_project(rig: FlowRig, tmp_path: Path) -> None:
    """The control for the snapshot runs below: with the guard on, the project cannot be imported."""
    code = "import importlib.util as u; print([u.find_spec(m) is None for m in ('finetune_phi', 'config', 'chat_flow')])"
    on = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=snapshot_env(rig.env),
                        capture_output=True, text=True, timeout=30)
    off = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=rig.env, capture_output=True, text=True, timeout=30)
    assert on.stdout.strip() == "[True, True, True]", on.stderr[-2000:]
    assert off.stdout.strip() == "[False, False, False]", off.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLOWS))
def test_pf_flow_validate_is_clean(flow: FlowRig, snapshots: dict[str, Path], name: str) -> None:
    proc = pf(flow, "flow", "validate", "--source", str(snapshots[name]), env=snapshot_env(flow.env))
    assert flow_outputs(proc.stdout) == {"result": "Succeeded"}, proc.stdout[-2000:]


@pytest.mark.slow
def test_standard_flow_snapshot_answers_through_each_kind(target: Target, snapshots: dict[str, Path],
                                                          tmp_path: Path) -> None:
    import deploy_model

    copy = snapshots["standard"]
    n = len(target.recorder.exchanges)
    # From the environment (as on an Azure runtime's environment variables) ...
    from_env = flow_outputs(pf_in(copy, target.env, "flow", "test", "--flow", str(copy),
                                  "--inputs", "input_data=What is Phi-3?").stdout)
    # ... and from the .env deploy_model.py writes, named by ENV_FILE.
    settings = config.load(env={}, dotenv_path=tmp_path / "none", ENV_FILE=str(tmp_path / "deploy.env"))
    deploy_model.publish(settings, target.url, KEY, target.kind, connection=False)
    env = {k: v for k, v in target.env.items() if not k.startswith("AZURE_ML_")}
    from_file = flow_outputs(pf_in(copy, {**env, "ENV_FILE": str(settings.env_file)}, "flow", "test",
                                   "--flow", str(copy), "--inputs", "input_data=Who makes Phi-3?").stdout)
    first, second = target.recorder.since(n)
    if target.kind == "azure-catalog":
        assert first.request["input_data"]["input_string"] == [{"role": "user", "content": "What is Phi-3?"}]
        assert second.request["input_data"]["input_string"] == [{"role": "user", "content": "Who makes Phi-3?"}]
    elif target.kind == "azure-serverless":  # OpenAI chat completions under the endpoint's URI
        assert first.request["messages"] == [{"role": "user", "content": "What is Phi-3?"}]
        assert second.request["messages"] == [{"role": "user", "content": "Who makes Phi-3?"}]
    else:
        assert first.request["input_data"] == ["What is Phi-3?"]
        assert second.request["input_data"] == ["Who makes Phi-3?"]
    assert first.authorization == second.authorization == f"Bearer {KEY}"
    assert first.status == second.status == 200
    assert from_env == {"answer": target.reply(first)}
    assert from_file == {"answer": target.reply(second)}


@pytest.mark.slow
def test_chat_flow_snapshot_keeps_the_history_through_each_kind(target: Target, snapshots: dict[str, Path]) -> None:
    copy = snapshots["chat"]
    n = len(target.recorder.exchanges)
    # The connection (configs.endpoint, configs.kind, secrets.key) is the only source the chat flow reads.
    env = {k: v for k, v in target.env.items() if not k.startswith("AZURE_ML_")}
    proc = pf_in(copy, env, "flow", "test", "--flow", str(copy), "--interactive",
                 stdin="Who founded Microsoft?\nAnd when?\n")
    first, second = target.recorder.since(n)
    assert first.authorization == f"Bearer {KEY}"
    history = [
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": target.reply(first)},
        {"role": "user", "content": "And when?"},
    ]
    if target.kind == "azure-catalog":
        assert first.request["input_data"]["input_string"] == history[:1]
        assert second.request["input_data"]["input_string"] == history
    elif target.kind in ("local", "azure-serverless"):  # streamed from /v1/chat/completions
        assert first.request["messages"] == history[:1] and first.request["stream"] is True
        assert second.request["messages"] == history
    else:
        assert first.request["input_data"] == ["Who founded Microsoft?"]
        assert second.request["input_data"] == [encode_prompt(history)]
    assert proc.stdout.count("Bot:") == 2
    for exchange in (first, second):  # pf reflows whitespace when it prints the reply
        reply_words = words(target.reply(exchange))[:8]
        assert reply_words and all(w in proc.stdout for w in reply_words), (reply_words, proc.stdout[-1500:])


def pf_in(folder: Path, env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """pf run from inside a snapshot copy, with the project hidden: the copy is all the flow has."""
    proc = subprocess.run([PF, *args], input=stdin, capture_output=True, text=True, cwd=folder,
                          env=snapshot_env(env), timeout=180)
    assert proc.returncode == 0, f"pf {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_a_connection_made_the_studio_tutorials_way_chats_with_the_local_endpoint(
    flow: FlowRig, snapshots: dict[str, Path], tmp_path: Path
) -> None:
    """A Custom connection with only `endpoint` and secret `key`, created with pf as the Studio tutorial
    makes it: the chat flow tells the local endpoint from its URL and streams from its OpenAI route."""
    settings = config.load(env={}, dotenv_path=tmp_path / "no.env", STATE_DIR=str(tmp_path / "studio-state"))
    env = {k: v for k, v in {**flow.env, **pf_env.promptflow_env(settings)}.items() if not k.startswith("AZURE_ML_")}
    spec = tmp_path / "connection.yaml"
    spec.write_text(yaml.safe_dump({
        "$schema": "https://azuremlschemas.azureedge.net/promptflow/latest/CustomConnection.schema.json",
        "name": settings.PROMPTFLOW_CONNECTION_NAME, "type": "custom",
        "configs": {"endpoint": flow.proxy.url}, "secrets": {"key": KEY},
    }))  # fmt: skip
    try:
        pf(flow, "connection", "create", "--file", str(spec), env=env)
        copy = snapshots["chat"]
        n = len(flow.proxy.exchanges)
        proc = pf_in(copy, env, "flow", "test", "--flow", str(copy), "--interactive", stdin="Who founded Microsoft?\n")
    finally:
        subprocess.run([PF, "service", "stop"], env=env, capture_output=True, timeout=60)
    (sent,) = flow.proxy.since(n)
    assert sent.status == 200 and sent.request["stream"] is True
    assert sent.request["messages"] == [{"role": "user", "content": "Who founded Microsoft?"}]
    assert proc.stdout.count("Bot:") == 1
