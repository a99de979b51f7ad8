"""Secrets audit: a full local pipeline run, then every place the endpoint key could have leaked to.

The pipeline is the one `python -m finetune_phi.demo` runs (download_dataset.py --source demo,
setup_ml.py, deploy_model.py, pf flow test), as separate processes, in a temporary STATE_DIR with
temporary data paths, a temporary ENV_FILE (the checkout's .env is never touched), a temporary HOME
and a free port; one training epoch.

The key exists before the pipeline starts, in STATE_DIR/endpoint/key and in ENV_FILE, as on any run
after a user's first deploy: so the fine-tune (which reads the same settings) had it within reach
of its MLflow params, tags and artifacts too.

A "leak" is any 12 characters of the key in a row: `common.redact` shows 4.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from conftest import free_port
from helpers_endpoint import ThreadServer
import requests

import config
from finetune_phi import common
from finetune_phi import supervise
from finetune_phi.endpoint import runtime, server
from chat_flow.endpoint_client import EndpointError, ask
from finetune_phi.pf_env import promptflow_home, subprocess_env
from finetune_phi.mlflow_store import mlflow_env

REPO = Path(__file__).resolve().parents[1]
PF = str(Path(sys.executable).parent / "pf")
WINDOW = 12  # common.redact shows 4 characters of a key; anything of this length is a leak
QUESTION = "Who founded Microsoft?"


def leaks(key: str, data: bytes | str) -> bool:
    blob = data.encode() if isinstance(data, str) else data
    raw = key.encode()
    return any(raw[i : i + WINDOW] in blob for i in range(len(raw) - WINDOW + 1))


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a TCP socket in LISTEN state on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        path = Path(table)
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A = TCP_LISTEN
                continue
            # The kernel prints each 32-bit word of the address in host byte order.
            words = bytes.fromhex(address)
            packed = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4))
            found.append(socket.inet_ntop(family, packed))
    return found


@dataclass
class Pipeline:
    settings: config.Settings
    key: str
    outputs: dict[str, str]  # step -> its stdout and stderr
    started: float
    home: Path
    dotenv_before: tuple[bytes, int] | None


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc for the listening socket and the endpoint's command line")
    tmp = tmp_path_factory.mktemp("secrets")
    home = tmp / "home"
    home.mkdir()
    values = {
        "BACKEND": "local",
        "LOCAL_BASE_MODEL": "tiny",
        "NUM_TRAIN_EPOCHS": "1",
        "STATE_DIR": str(tmp / "state"),
        "TRAIN_DATA_PATH": str(tmp / "data" / "train_data.jsonl"),
        "TEST_DATA_PATH": str(tmp / "data" / "test_data.jsonl"),
        "ENV_FILE": str(tmp / "flows.env"),
        "LOCAL_ENDPOINT_PORT": str(free_port()),
        "HOME": str(home),  # whatever a tool writes under ~ is scanned too
    }
    settings = config.load(env=values)
    repo_dotenv = config.ROOT / ".env"
    dotenv_before = (repo_dotenv.read_bytes(), repo_dotenv.stat().st_mtime_ns) if repo_dotenv.is_file() else None

    # As after a first deploy: the key is in the state dir and in ENV_FILE before training starts.
    key = supervise.get_or_create_key(settings)
    common.write_dotenv(settings.env_file, {"AZURE_ML_ENDPOINT": supervise.scoring_uri(settings), "AZURE_ML_API_KEY": key})

    base = {k: v for k, v in os.environ.items() if k not in ("AZURE_ML_API_KEY", "AZURE_ML_ENDPOINT")}
    env = subprocess_env(settings, {**base, **values, **mlflow_env(settings)})
    py = sys.executable
    steps = {
        "data": [py, "download_dataset.py", "--source", "demo"],
        "fine-tune": [py, "setup_ml.py"],
        "deploy": [py, "deploy_model.py"],
        "prompt flow": [PF, "flow", "test", "--flow", ".", "--inputs", f"input_data={QUESTION}"],
    }
    outputs: dict[str, str] = {}
    started = time.time()
    try:
        for name, argv in steps.items():
            proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            outputs[name] = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"step {name} failed ({proc.returncode}):\n{outputs[name][-4000:]}"
        yield Pipeline(settings, key, outputs, started, home, dotenv_before)
    finally:
        for pid in {supervise.read_pid(settings), *supervise.read_spawned(settings)} - {None}:
            if supervise.is_endpoint(pid):
                os.kill(pid, 9)


@pytest.mark.slow
def test_the_key_appears_only_in_env_file_and_key_file(pipeline: Pipeline) -> None:
    key, settings = pipeline.key, pipeline.settings
    key_file = supervise.endpoint_dir(settings) / supervise.KEY_FILE
    # The flow answered with the key from ENV_FILE: nothing else in its environment held it.
    assert '"answer"' in pipeline.outputs["prompt flow"]
    assert config.read_dotenv(settings.env_file)["AZURE_ML_API_KEY"] == key == key_file.read_text().strip()

    places: dict[str, bytes] = {f"output of {name}": text.encode() for name, text in pipeline.outputs.items()}
    scanned_roots = [settings.state_dir, pipeline.home, settings.train_data_path.parent]
    for root in scanned_roots:
        for path in root.rglob("*"):
            if path.is_file() and path != key_file:
                places[str(path)] = path.read_bytes()
    # `pf flow test --flow .` keeps its run log and details in the flow folder's .promptflow/.
    flow_runs = [p for p in (REPO / ".promptflow").rglob("*") if p.is_file() and p.stat().st_mtime >= pipeline.started]
    places |= {str(p): p.read_bytes() for p in flow_runs}
    for pid in {supervise.read_pid(settings)} - {None}:
        places[f"command line of the endpoint (pid {pid}), visible to ps"] = Path(f"/proc/{pid}/cmdline").read_bytes()

    # Each kind of place was really there to look at.
    names = "\n".join(places)
    for expected in ("server.log", "state.json", "mlflow.db", "MLmodel", "pf.sqlite", "flow.log", "command line"):
        assert expected in names, f"nothing named {expected} was scanned:\n{names}"
    assert "train_data.jsonl" in names and len(places) > 20

    leaked = sorted(name for name, data in places.items() if leaks(key, data))
    assert leaked == [], f"the endpoint key (or {WINDOW}+ characters of it) is in: {leaked}"


@pytest.mark.slow
def test_mlflow_params_tags_and_registry_never_hold_the_key(pipeline: Pipeline) -> None:
    import mlflow

    client = mlflow.MlflowClient(pipeline.settings.tracking_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs, "the fine-tune logged no MLflow run"
    texts = []
    for run in runs:
        assert run.data.params, f"run {run.info.run_id} has no params: nothing was checked"
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    for model in client.search_registered_models():
        texts += [model.description or "", *map(str, model.tags.items())]
        for version in client.search_model_versions(f"name='{model.name}'"):
            texts += [version.source or "", version.description or "", *map(str, version.tags.items())]
    assert len(texts) > 10
    assert [t for t in texts if leaks(pipeline.key, t)] == []


@pytest.mark.slow
def test_secret_files_are_private_and_the_checkouts_env_untouched(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    key_file = supervise.endpoint_dir(settings) / supervise.KEY_FILE
    assert settings.env_file.stat().st_mode & 0o777 == 0o600
    assert key_file.stat().st_mode & 0o777 == 0o600
    # The connection store holds the key encrypted; the key to decrypt it sits in Prompt flow's home.
    pf_home = promptflow_home(settings)
    assert pf_home.stat().st_mode & 0o777 == 0o700
    assert (pf_home / "keyring_pass.cfg").stat().st_mode & 0o777 == 0o600

    repo_dotenv = config.ROOT / ".env"
    after = (repo_dotenv.read_bytes(), repo_dotenv.stat().st_mtime_ns) if repo_dotenv.is_file() else None
    assert after == pipeline.dotenv_before, "the pipeline wrote the checkout's .env despite ENV_FILE"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must stay git-ignored"

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / name for name in tracked.decode().split("\0") if name]
    assert len(files) > 20
    assert [str(f) for f in files if f.is_file() and leaks(pipeline.key, f.read_bytes())] == []


def near_misses(key: str) -> list[str]:
    """Wrong keys a guesser gets closest with: one character off at either end, the key cut short or
    run on (right prefix, other length), a same-length stranger, and nothing at all."""
    other = lambda c: "A" if c != "A" else "B"  # noqa: E731
    return [key[:-1] + other(key[-1]), other(key[0]) + key[1:], key[:-1], key + "x", "x" * len(key), "x", ""]


@pytest.mark.slow
def test_the_deployed_endpoint_listens_on_loopback_only_and_takes_only_its_key(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    assert settings.LOCAL_ENDPOINT_HOST == "127.0.0.1"  # the default, not an override of this test
    assert listening_addresses(settings.LOCAL_ENDPOINT_PORT) == ["127.0.0.1"]

    # The endpoint deploy_model.py started (a process of its own, so no spy reaches it; the
    # constant-time comparison is checked in-process by the test below).
    uri, key = supervise.scoring_uri(settings), pipeline.key
    body = {"input_data": ["hi"], "params": {"max_new_tokens": 1}}
    for presented in (None, *near_misses(key)):
        headers = {"Authorization": f"Bearer {presented}"} if presented is not None else {}
        reply = requests.post(uri, json=body, headers=headers, timeout=30)
        assert reply.status_code == 401, (presented is None, reply.text)
        assert not leaks(key, reply.text)
    assert requests.post(uri, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200


@pytest.mark.slow
def test_client_errors_never_carry_the_key(pipeline: Pipeline) -> None:
    uri, key = supervise.scoring_uri(pipeline.settings), pipeline.key
    closed = f"http://127.0.0.1:{free_port()}/score"
    for endpoint, presented in ((uri, key + "-wrong"), (closed, key)):
        with pytest.raises(EndpointError) as caught:
            ask(endpoint, presented, QUESTION)
        message = f"{caught.value}\n{caught.value.__cause__!r}"
        assert not leaks(key, message), message


def test_every_presented_key_goes_through_compare_digest_and_only_the_right_one_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A plain == stops at the first differing byte, so its timing tells a guesser how much of a guess
    # was right; hmac.compare_digest does not. The real app with its key check spied on: the answers
    # show the verdict, the spy that compare_digest gave it, for wrong keys of every length too.
    compared: list[tuple[bytes, bytes, bool]] = []

    def spy(presented: bytes, expected: bytes) -> bool:
        verdict = hmac.compare_digest(presented, expected)
        compared.append((presented, expected, verdict))
        return verdict

    monkeypatch.setattr(runtime, "hmac", SimpleNamespace(compare_digest=spy))  # the key check's hmac only
    key = secrets.token_urlsafe(32)  # the kind of key supervise.get_or_create_key makes
    release = threading.Event()

    def never_loads() -> Any:
        # The key is checked before any model is needed: no model is built for this test.
        release.wait(60)
        raise RuntimeError("the test ended before the model loaded")

    body = {"input_data": ["hi"], "params": {"max_new_tokens": 1}}
    try:
        with ThreadServer(server.create_app(key, loader=never_loads, model_name="m")) as running:
            # requests, not httpx: httpx refuses to send the bare "Bearer " a client with an empty key sends.
            score, models = f"{running.base}/score", f"{running.base}/v1/models"
            for presented in near_misses(key):
                compared.clear()
                reply = requests.post(score, json=body, headers={"Authorization": f"Bearer {presented}"}, timeout=30)
                assert reply.status_code == 401, (presented, reply.text)
                assert not leaks(key, reply.text)
                # "Bearer " with nothing after it is no credential at all: refused before comparing.
                assert compared == ([(presented.encode(), key.encode(), False)] if presented else []), presented
            compared.clear()
            assert requests.post(score, json=body, timeout=30).status_code == 401 and compared == []
            right = {"Authorization": f"Bearer {key}"}
            assert requests.get(models, headers=right, timeout=30).status_code == 200
            assert compared == [(key.encode(), key.encode(), True)]
            # Past the key check, /score says the model is still loading rather than 401.
            assert requests.post(score, json=body, headers=right, timeout=30).status_code == 503
    finally:
        release.set()


def test_listening_addresses_tells_loopback_from_every_interface() -> None:
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc/net/tcp on this system")
    with socket.socket() as loopback, socket.socket() as everywhere, socket.socket() as bound_only:
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        bound_only.bind(("127.0.0.1", 0))  # bound, not listening: not a server
        assert listening_addresses(loopback.getsockname()[1]) == ["127.0.0.1"]
        assert listening_addresses(everywhere.getsockname()[1]) == ["0.0.0.0"]
        assert listening_addresses(bound_only.getsockname()[1]) == []
