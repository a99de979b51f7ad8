"""Recovery from kill -9, with real processes run the way a user runs them.

* the endpoint is SIGKILLed: the next `deploy_model.py` says it had died and serves again;
* `deploy_model.py` is SIGKILLed while its new server loads: a second deploy meanwhile is refused,
  and the next deploy stops the server the killed one left behind;
* `download_dataset.py` is SIGKILLed mid-write: the final file names hold a previous or a complete
  file, never part of one, and running it again gives the same bytes as an uninterrupted run.

Each test has its own STATE_DIR, .env (ENV_FILE), data paths and free port; a finalizer kills every
endpoint process the test's state dir ever recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import free_port
import requests

import config
from finetune_phi import common
from finetune_phi import supervise
from helpers_model import RegisteredModel, registered_tiny_model

REPO = Path(__file__).resolve().parents[1]
DEPLOY_TIMEOUT_S = 240


def wait_for(what: str, check: Callable[[], object], timeout: float = 90.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- deploy_model.py as a user runs it ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> RegisteredModel:
    return registered_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")


@dataclass
class Rig:
    settings: config.Settings
    env: dict[str, str]
    seen: set[int] = field(default_factory=set)  # every endpoint pid the test saw, killed at the end

    def deploy(self, *args: str) -> subprocess.CompletedProcess[str]:
        # --no-connection: the Prompt flow connection is test_secrets.py's business and costs 10 s here.
        return subprocess.run(
            [sys.executable, "deploy_model.py", "--no-connection", *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=DEPLOY_TIMEOUT_S,
        )

    def start_deploy(self, log_path: Path) -> subprocess.Popen[str]:
        with log_path.open("w") as log_file:
            return subprocess.Popen(
                [sys.executable, "deploy_model.py", "--no-connection"],
                cwd=REPO, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
            )

    def ready_pid(self) -> int | None:
        try:
            return requests.get(f"{self.base_url}/health/ready", timeout=2).json().get("pid")
        except (requests.RequestException, ValueError):
            return None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.LOCAL_ENDPOINT_PORT}"

    def score(self) -> requests.Response:
        """Score with what deploy handed to the flows: the endpoint and key in ENV_FILE."""
        published = config.read_dotenv(self.settings.env_file)
        return requests.post(
            published["AZURE_ML_ENDPOINT"],
            json={"input_data": ["Who founded Microsoft?"], "params": {"max_new_tokens": 2}},
            headers={"Authorization": f"Bearer {published['AZURE_ML_API_KEY']}"},
            timeout=30,
        )


@pytest.fixture
def rig(tmp_path: Path, tiny_model: RegisteredModel) -> Iterator[Rig]:
    values = {
        "BACKEND": "local",
        "STATE_DIR": str(tmp_path / "state"),
        "ENV_FILE": str(tmp_path / "flows.env"),  # never the checkout's .env
        "MLFLOW_TRACKING_URI": tiny_model.tracking_uri,
        "AZURE_MODEL_NAME": f"recovery-{uuid.uuid4().hex[:8]}",
        "LOCAL_ENDPOINT_PORT": str(free_port()),
    }
    settings = config.load(env=values)
    common.update_state(settings, "training", {"backend": "local", "model_uri": tiny_model.run_model_uri})
    rig = Rig(settings, {**os.environ, **values})
    try:
        yield rig
    finally:
        pids = rig.seen | set(supervise.read_spawned(settings))
        recorded = supervise.read_pid(settings)
        pids |= {recorded} if recorded else set()
        for pid in pids:
            if supervise.is_endpoint(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_endpoint_is_reported_dead_and_the_next_deploy_serves_again_then_rotates_its_key(rig: Rig) -> None:
    first = rig.deploy()
    assert first.returncode == 0, first.stderr[-3000:]
    pid = supervise.read_pid(rig.settings)
    assert pid is not None
    rig.seen.add(pid)
    assert rig.score().status_code == 200

    os.kill(pid, signal.SIGKILL)
    wait_for(f"pid {pid} to die", lambda: not supervise._alive(pid), timeout=10)
    with pytest.raises(requests.ConnectionError):
        rig.score()

    again = rig.deploy()
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"the previous endpoint (pid {pid}) had died" in again.stderr
    assert "starting a fresh one" in again.stderr
    new_pid = supervise.read_pid(rig.settings)
    assert new_pid is not None and new_pid != pid
    rig.seen.add(new_pid)
    assert rig.ready_pid() == new_pid
    reply = rig.score()  # the key in ENV_FILE is the one the fresh endpoint checks
    assert reply.status_code == 200 and isinstance(reply.json()[0], str)
    deployment = common.read_state(rig.settings)["deployment"]
    assert (deployment["pid"], deployment["status"]) == (new_pid, "running")
    assert supervise.read_spawned(rig.settings) == [new_pid]

    # Rotating the key: the new endpoint checks a fresh key, published to ENV_FILE; the old one is refused.
    old_key = config.read_dotenv(rig.settings.env_file)["AZURE_ML_API_KEY"]
    rotated = rig.deploy("--rotate-key")
    assert rotated.returncode == 0, rotated.stderr[-3000:]
    new_key = config.read_dotenv(rig.settings.env_file)["AZURE_ML_API_KEY"]
    assert new_key != old_key and supervise.get_or_create_key(rig.settings) == new_key
    assert new_key not in rotated.stderr + rotated.stdout and old_key not in rotated.stderr + rotated.stdout
    assert rig.score().status_code == 200
    refused = requests.post(
        f"{rig.base_url}/score", json={"input_data": ["hi"]}, headers={"Authorization": f"Bearer {old_key}"}, timeout=30
    )
    assert refused.status_code == 401
    new_pid = supervise.read_pid(rig.settings)
    rig.seen.add(new_pid)

    down = rig.deploy("--teardown")
    assert down.returncode == 0 and f"pid {new_pid}" in down.stderr
    assert not supervise._alive(new_pid)


@pytest.mark.slow
def test_a_deploy_killed_mid_start_is_cleaned_up_and_a_concurrent_one_refused(rig: Rig, tmp_path: Path) -> None:
    killed = rig.start_deploy(tmp_path / "killed-deploy.log")
    try:
        spawned = wait_for("the deploy to start its server", lambda: supervise.read_spawned(rig.settings))
        assert isinstance(spawned, list)
        (stray,) = spawned
        rig.seen.add(stray)
        # Frozen, the new server can never report ready: the deploy is certainly still waiting below.
        os.kill(stray, signal.SIGSTOP)

        concurrent = rig.deploy()
        assert concurrent.returncode == 1
        assert f"another deploy or teardown (pid {killed.pid}) is running" in concurrent.stderr
        assert "wait for it to finish" in concurrent.stderr
    finally:
        killed.kill()
        killed.wait()
    # The killed deploy's server lives on in its own session, and now serves on the port unrecorded.
    os.kill(stray, signal.SIGCONT)
    assert supervise.is_endpoint(stray) and supervise.read_pid(rig.settings) is None
    wait_for("the stray server to serve", lambda: rig.ready_pid() == stray)

    after = rig.deploy()
    assert after.returncode == 0, after.stderr[-3000:]
    assert f"an interrupted deploy left endpoint pid {stray} running" in after.stderr
    assert not supervise._alive(stray)
    serving = supervise.read_pid(rig.settings)
    assert serving is not None and serving != stray
    rig.seen.add(serving)
    # Only the new server is on the port now: every fresh connection lands on it.
    assert {rig.ready_pid() for _ in range(8)} == {serving}
    assert rig.score().status_code == 200
    assert supervise.read_spawned(rig.settings) == [serving]


# --- download_dataset.py killed mid-write ----------------------------------------------------------------

# Loaded by the interpreter at start-up (PYTHONPATH): makes the rename onto one final name block,
# after the temp file is fully written, so the test can SIGKILL the process at exactly that point.
BLOCK_RENAME = '''
import os, time

_name = os.environ.get("TEST_BLOCK_RENAME_TO")
if _name:
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == _name:
            with open(os.environ["TEST_BLOCKED_MARK"], "w") as fh:
                fh.write(os.fspath(src))
            time.sleep(600)
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace
'''


def download(out: Path, extra_env: dict[str, str] | None = None, wait: bool = True) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "TRAIN_DATA_PATH": str(out / "train_data.jsonl"),
        "TEST_DATA_PATH": str(out / "test_data.jsonl"),
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "download_dataset.py", "--source", "demo"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    if wait:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("blocked", ["train_data.jsonl", "test_data.jsonl"])
def test_download_killed_mid_write_leaves_whole_files_and_a_rerun_matches_a_clean_run(blocked: str, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    download(clean)
    reference = {name: (clean / name).read_bytes() for name in ("train_data.jsonl", "test_data.jsonl")}
    assert all(reference.values())

    out = tmp_path / "out"
    out.mkdir()
    previous = b'{"previous": "run"}\n'
    for name in reference:
        (out / name).write_bytes(previous)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCK_RENAME)
    mark = tmp_path / "blocked"
    proc = download(
        out,
        {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
         "TEST_BLOCK_RENAME_TO": blocked, "TEST_BLOCKED_MARK": str(mark)},
        wait=False,
    )
    try:
        wait_for(f"the rename onto {blocked}", lambda: mark.is_file() and mark.read_text(), timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    # Files are written train first: killed before the test file's rename, the train file is new.
    expected = {
        "train_data.jsonl": previous if blocked == "train_data.jsonl" else reference["train_data.jsonl"],
        "test_data.jsonl": previous,
    }
    assert {name: (out / name).read_bytes() for name in reference} == expected
    # The data was complete in its temp file; kill -9 left that (a dot file no reader picks up).
    temp = Path(mark.read_text())
    assert temp.parent == out and temp.name.startswith(f".{blocked}.") and temp.read_bytes() == reference[blocked]

    for _ in range(2):  # a re-run repairs the pair and removes the leftover; another changes nothing
        download(out)
        assert {name: (out / name).read_bytes() for name in reference} == reference
        assert sorted(p.name for p in out.iterdir()) == sorted(reference)
