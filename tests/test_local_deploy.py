"""local_deploy: register, start a detached endpoint, re-deploy in place, tear down; and the refusals.

The slow tests start REAL detached endpoint processes on a free 127.0.0.1 port, with a state dir
and an MLflow store under tmp; a finalizer kills whatever they started.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from conftest import free_port

import config
from finetune_phi import common, local_deploy
from finetune_phi import supervise
from finetune_phi.local_deploy import DeployError
from helpers_model import RegisteredModel, registered_tiny_model

READY_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> RegisteredModel:
    return registered_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")


def make_settings(tmp_path: Path, tracking_uri: str, port: int | None = None) -> config.Settings:
    return config.load(
        env={},
        dotenv_path=tmp_path / "none",
        STATE_DIR=str(tmp_path / "state"),
        MLFLOW_TRACKING_URI=tracking_uri,
        LOCAL_ENDPOINT_PORT=port or free_port(),
        # A fresh name per test: its versions count from 1 in the shared store.
        AZURE_MODEL_NAME=f"deploy-test-{uuid.uuid4().hex[:8]}",
    )


def record_training(settings: config.Settings, model_uri: str) -> None:
    common.update_state(settings, "training", {"backend": "local", "model_uri": model_uri})


@pytest.fixture
def settings(tmp_path: Path, tiny_model: RegisteredModel) -> Iterator[config.Settings]:
    s = make_settings(tmp_path, tiny_model.tracking_uri)
    record_training(s, tiny_model.run_model_uri)
    started: list[int] = []
    yield s
    # Whatever a test left running: the recorded endpoint, and any endpoint process in its log.
    pid = supervise.read_pid(s)
    if pid is not None:
        started.append(pid)
    started += supervise.read_spawned(s)
    log_path = supervise.endpoint_dir(s) / supervise.LOG_FILE
    if log_path.is_file():
        started += [int(p) for p in _pids_in_log(log_path.read_text(errors="replace"))]
    for pid in set(started):
        if supervise.is_endpoint(pid):
            os.kill(pid, signal.SIGKILL)


def _pids_in_log(text: str) -> list[str]:
    return [line.split("Started server process [", 1)[1].split("]", 1)[0] for line in text.splitlines() if "Started server process [" in line]


def started_pid(caplog: pytest.LogCaptureFixture) -> int:
    """The pid of the server the last deploy started, from its own log line."""
    pids = re.findall(r"started the endpoint \(pid (\d+)\)", caplog.text)
    assert pids, caplog.text
    return int(pids[-1])


def get(url: str, key: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def broken_model_uri(tiny_model: RegisteredModel, tmp_path: Path) -> str:
    """A run whose `model` artifact is not a loadable model: registers fine, fails to load."""
    import mlflow

    client = mlflow.MlflowClient(tiny_model.tracking_uri)
    experiment = client.get_experiment_by_name("endpoint-tests")
    run = client.create_run(experiment.experiment_id)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "MLmodel").write_text("flavors: {}\n")
    client.log_artifacts(run.info.run_id, str(tmp_path / "broken"), "model")
    client.set_terminated(run.info.run_id)
    return f"runs:/{run.info.run_id}/model"


# --- refusals (fast) -------------------------------------------------------------------------------


def test_deploy_without_a_trained_model_says_run_setup_ml(tmp_path: Path) -> None:
    s = make_settings(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DeployError, match="run python setup_ml.py first"):
        local_deploy.deploy(s)


def test_key_is_generated_once_private_and_reused(settings: config.Settings) -> None:
    key = supervise.get_or_create_key(settings)
    path = supervise.endpoint_dir(settings) / supervise.KEY_FILE
    assert len(key) >= 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert supervise.get_or_create_key(settings) == key


def test_port_busy_with_a_foreign_program_is_refused_before_anything_starts(tmp_path: Path, tiny_model: RegisteredModel) -> None:
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        s = make_settings(tmp_path, tiny_model.tracking_uri, port=foreign.getsockname()[1])
        record_training(s, tiny_model.run_model_uri)
        with pytest.raises(DeployError, match=rf"port {s.LOCAL_ENDPOINT_PORT} .* in use by another program.*LOCAL_ENDPOINT_PORT"):
            local_deploy.deploy(s)
    assert not (supervise.endpoint_dir(s) / supervise.PID_FILE).exists()
    assert "deployment" not in common.read_state(s)


def test_teardown_with_nothing_running(settings: config.Settings) -> None:
    assert "no local endpoint is running" in local_deploy.teardown(settings)


def test_stale_pid_file_is_reported_and_removed(settings: config.Settings) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_path = supervise.endpoint_dir(settings) / supervise.PID_FILE
    common.atomic_write_text(pid_path, f"{gone.pid}\n")
    message = local_deploy.teardown(settings)
    assert f"(pid {gone.pid}) was not running" in message and "stale pid file" in message
    assert not pid_path.exists()


def test_a_recycled_pid_is_never_signalled(settings: config.Settings) -> None:
    # A live process that is not our endpoint holds the recorded pid: it must survive teardown.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_path = supervise.endpoint_dir(settings) / supervise.PID_FILE
        common.atomic_write_text(pid_path, f"{bystander.pid}\n")
        assert supervise.running_pid(settings) is None
        assert not pid_path.exists()
        common.atomic_write_text(pid_path, f"{bystander.pid}\n")
        assert "was not running" in local_deploy.teardown(settings)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# --- one deploy at a time, and what an interrupted one leaves (fast: no model is served) ------------


LOCK_HOLDER = """
import sys, time
from pathlib import Path
import config
from finetune_phi import supervise
s = config.load(env={}, dotenv_path=Path(sys.argv[2]), STATE_DIR=sys.argv[1])
with supervise.deploy_lock(s):
    print("locked", flush=True)
    time.sleep(120)
"""


class NoWaiting:
    """local_deploy's fcntl and time, refusing any lock request that would block and any sleep."""

    def __init__(self) -> None:
        self.lock_requests: list[int] = []

    def flock(self, fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX and not operation & fcntl.LOCK_NB:
            raise AssertionError("a blocking lock request: this deploy would queue behind the running one")
        self.lock_requests.append(operation)
        fcntl.flock(fd, operation)

    def sleep(self, seconds: float) -> None:
        raise AssertionError(f"slept {seconds} s: a refused deploy must not wait and try again")


def test_a_second_deploy_or_teardown_fails_at_once_naming_the_one_running(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(settings.state_dir), str(tmp_path / "none")],
        cwd=config.ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        # "At once, not queued": the lock is only ever tried, never waited for (a blocking flock would
        # sit out the holder's 120 s), and nothing sleeps to try again.
        no_waiting = NoWaiting()
        with monkeypatch.context() as patch:
            patch.setattr(supervise, "fcntl", SimpleNamespace(**{**vars(fcntl), "flock": no_waiting.flock}))
            patch.setattr(supervise, "time", SimpleNamespace(**{**vars(time), "sleep": no_waiting.sleep}))
            refusal = rf"another deploy or teardown \(pid {holder.pid}\) is running(?s:.*)wait for it"
            for attempt in (local_deploy.deploy, local_deploy.teardown):
                with pytest.raises(DeployError, match=refusal):
                    attempt(settings)
        assert len(no_waiting.lock_requests) == 2  # each attempt tried the lock once, without blocking
        assert holder.poll() is None  # refused while the holder still ran: it was not waited for
        # Refused before anything happened: nothing registered, started or recorded.
        assert not (supervise.endpoint_dir(settings) / supervise.PID_FILE).exists()
        assert supervise.read_spawned(settings) == []
        assert "deployment" not in common.read_state(settings)
    finally:
        holder.kill()  # SIGKILL: the holder gets no chance to release anything itself
        holder.wait()
    # The kernel dropped the lock with its holder: no stale lock to clean up by hand.
    with supervise.deploy_lock(settings):
        assert (supervise.endpoint_dir(settings) / supervise.LOCK_FILE).read_text().strip() == str(os.getpid())
    assert "no local endpoint is running" in local_deploy.teardown(settings)


def fake_endpoint() -> subprocess.Popen[bytes]:
    """A live process whose command line names the endpoint module, as a half-started server's does."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", supervise.ENDPOINT_MODULE], start_new_session=True
    )


def test_teardown_stops_what_an_interrupted_deploy_left_and_spares_other_processes(settings: config.Settings) -> None:
    stray, bystander = fake_endpoint(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        # As a deploy killed while its new server was loading leaves it: spawned, never in the pid file.
        supervise.write_spawned(settings, [gone.pid, stray.pid, bystander.pid])
        message = local_deploy.teardown(settings)
        assert "no local endpoint is running" in message
        assert f"stopped 1 endpoint(s) an interrupted deploy left running (pids [{stray.pid}])" in message
        stray.wait(timeout=10)  # stopped (the deployer reaped it, so its status is not ours to read)
        assert bystander.poll() is None  # a recycled pid that is not our endpoint is never signalled
        assert supervise.read_spawned(settings) == []
    finally:
        for proc in (stray, bystander):
            proc.kill()
            proc.wait()


def test_the_serving_endpoint_is_not_a_stray(settings: config.Settings) -> None:
    serving = fake_endpoint()
    try:
        common.atomic_write_text(supervise.endpoint_dir(settings) / supervise.PID_FILE, f"{serving.pid}\n")
        supervise.write_spawned(settings, [serving.pid])
        assert supervise.stop_strays(settings, keep=supervise.running_pid(settings)) == []
        assert serving.poll() is None and supervise.read_spawned(settings) == [serving.pid]
    finally:
        serving.kill()
        serving.wait()


# --- the real thing (slow) -------------------------------------------------------------------------------


@pytest.mark.slow
def test_deploy_redeploy_in_place_and_teardown(
    settings: config.Settings, tiny_model: RegisteredModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finetune_phi")  # local_deploy and supervise
    first = local_deploy.deploy(settings, ready_timeout=READY_TIMEOUT)
    port = settings.LOCAL_ENDPOINT_PORT
    assert first.scoring_uri == f"http://127.0.0.1:{port}/score"
    assert first.model_uri == f"models:/{settings.AZURE_MODEL_NAME}/1"
    assert supervise.is_endpoint(first.pid)
    assert supervise.read_spawned(settings) == [first.pid]
    key_path = supervise.endpoint_dir(settings) / supervise.KEY_FILE
    assert key_path.read_text().strip() == first.key and key_path.stat().st_mode & 0o777 == 0o600
    status, replies = get(first.scoring_uri, first.key, {"input_data": ["Who founded Microsoft?"], "params": {"max_new_tokens": 4}})
    assert status == 200 and len(replies) == 1 and isinstance(replies[0], str)
    assert get(first.scoring_uri, "wrong", {"input_data": ["hi"]})[0] == 401
    state_text = common.state_path(settings).read_text()
    assert first.key not in state_text
    deployment = json.loads(state_text)["deployment"]
    assert (deployment["pid"], deployment["port"], deployment["model_uri"]) == (first.pid, port, first.model_uri)
    assert first.key not in first.log_path.read_text()

    # A client keeps scoring through both re-deploys below: every request must be answered.
    answers: list[object] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answers.append(get(first.scoring_uri, first.key, {"input_data": ["hi"], "params": {"max_new_tokens": 1}})[0])
            except OSError as exc:
                answers.append(repr(exc))
            time.sleep(0.05)

    def still_first(failed_pid: int) -> None:
        """After a failed deploy: the failed server is gone and every record still names the first one."""
        assert failed_pid != first.pid and not supervise._alive(failed_pid)
        assert supervise.running_pid(settings) == first.pid
        assert supervise.read_spawned(settings) == [first.pid]
        assert get(f"{first.base_url}/health/ready")[1]["pid"] == first.pid
        recorded = common.read_state(settings)["deployment"]
        assert (recorded["pid"], recorded["model_uri"], recorded["status"]) == (first.pid, first.model_uri, "running")
        assert supervise.get_or_create_key(settings) == first.key

    scorer = threading.Thread(target=client, daemon=True)
    scorer.start()
    try:
        # A deployment that fails (the model cannot load) kills only itself: the old one keeps serving.
        record_training(settings, broken_model_uri(tiny_model, tmp_path))
        with pytest.raises(DeployError, match="exited with status 1(?s:.*)could not load(?s:.*)still serving"):
            local_deploy.deploy(settings, ready_timeout=READY_TIMEOUT)
        still_first(started_pid(caplog))

        # A new server that is alive but not ready in time (still loading a good model) is killed by
        # the deployer itself, not left to share the port: the old one keeps serving.
        record_training(settings, tiny_model.run_model_uri)
        caplog.clear()
        with pytest.raises(DeployError, match="not ready after 0 s(?s:.*)still serving"):
            local_deploy.deploy(settings, ready_timeout=0.2)
        still_first(started_pid(caplog))

        # Re-deploy: version 4 (2 was the broken one, 3 timed out), same port, same key, a new process; the old one is gone.
        second = local_deploy.deploy(settings, ready_timeout=READY_TIMEOUT)
        time.sleep(0.3)
    finally:
        stop.set()
        scorer.join(timeout=30)
    assert len(answers) > 10 and set(answers) == {200}, answers
    assert second.model_uri == f"models:/{settings.AZURE_MODEL_NAME}/4"
    assert (second.port, second.key, second.replaced_pid) == (port, first.key, first.pid)
    assert second.pid != first.pid and not supervise._alive(first.pid)
    ready = get(f"{second.base_url}/health/ready")[1]
    assert ready["pid"] == second.pid and ready["status"] == "ready"
    assert get(second.scoring_uri, second.key, {"input_data": ["hi"], "params": {"max_new_tokens": 2}})[0] == 200

    message = local_deploy.teardown(settings)
    assert f"pid {second.pid}" in message and "stopped" in message
    assert not supervise._alive(second.pid)
    assert not (supervise.endpoint_dir(settings) / supervise.PID_FILE).exists()
    assert not supervise.port_answers("127.0.0.1", port)
    assert common.read_state(settings)["deployment"]["status"] == "stopped"


def test_a_failed_start_reports_its_own_log_lines_not_the_old_servers(tmp_path: Path) -> None:
    """During a hand-over the old endpoint's access log shares the file; the error must still show the new one's."""
    log_path = tmp_path / "endpoint.log"
    old_lines = [f'12:00:{i % 60:02d} INFO [100] uvicorn.access: 127.0.0.1 - "POST /score HTTP/1.1" 200' for i in range(200)]
    new_lines = [
        "12:00:01 ERROR [200] finetune_phi.endpoint: could not load models:/m/2: broken",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
    ]
    log_path.write_text("\n".join(old_lines[:100] + new_lines + old_lines[100:]) + "\n")
    tail = supervise._log_tail(log_path, 0, pid=200)
    assert "could not load" in tail and "Traceback" in tail and "[100]" not in tail
    assert "could not load" not in supervise._log_tail(log_path, 0)  # unfiltered, the old lines push it out
