"""What every test that runs the real `pf` CLI against an isolated Prompt flow home needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from conftest import free_port
from finetune_phi import supervise


def start_own_pf_service(pf: str, env: dict[str, str]) -> int:
    """Start the Prompt flow service of the home in `env` on a port of its own, and return the port.

    pf remembers one service port per home and, when that port answers as a healthy service of
    the same version, reuses whatever service is there. Test homes are fresh, so each picks the
    first free port from 23333 up: two of them starting at once (pytest-xdist workers) can settle
    on the same service, and one test's `pf service stop` then stops the other's chat page mid-turn.
    A port taken here and written to this home's port file by `pf service start --port` keeps
    each home on its own service."""
    port = free_port()
    # The service it starts in the background inherits stdout/stderr: a captured pipe would stay open
    # and hold run() until its timeout, so the output goes to a file in the home instead.
    log = Path(env["PF_HOME_DIRECTORY"]) / "pf-service-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run([pf, "service", "start", "--port", str(port)], env=env, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert done.returncode == 0, f"pf service start --port {port} failed:\n{log.read_text()}"
    return port


# --- the local pipeline as a user runs it, script by script ------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def pipeline_env(base: Mapping[str, str], folder: Path, **extra: str) -> dict[str, str]:
    """`base` plus a local pipeline of its own in `folder`: state, .env, data files and a free endpoint port."""
    return {
        **base,
        "BACKEND": "local", "STATE_DIR": str(folder / "state"), "ENV_FILE": str(folder / ".env"),
        "TRAIN_DATA_PATH": str(folder / "data" / "train.jsonl"), "TEST_DATA_PATH": str(folder / "data" / "test.jsonl"),
        "LOCAL_ENDPOINT_PORT": str(free_port()), "NUM_TRAIN_EPOCHS": "1",
        **extra,
    }  # fmt: skip


def run(argv: list[str], env: Mapping[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """A step of the pipeline (a script, or pf) as a user runs it: from the repository, its output captured."""
    return subprocess.run(argv, cwd=REPO, env=dict(env), capture_output=True, text=True, timeout=timeout)


def flow_answers(pf: str, env: Mapping[str, str], tests: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """`pf flow test` for each named (flow folder, input) pair, on a pf service of the home in `env`'s own;
    each must exit 0. Returns each flow's answer."""
    from finetune_phi.demo import parse_flow_answer

    env = dict(env)
    start_own_pf_service(pf, env)
    try:
        done = {name: run([pf, "flow", "test", "--flow", flow, "--inputs", given], env) for name, (flow, given) in tests.items()}
    finally:
        subprocess.run([pf, "service", "stop"], env=env, capture_output=True, timeout=60)
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return {name: parse_flow_answer(proc.stdout) for name, proc in done.items()}


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen) -> None:
    """Until GET `url` answers 200; a test failure if `proc` exits first or the deadline passes."""
    try:
        supervise.poll_until(proc, lambda: supervise.http_ok(url), deadline_s, 0.2)
    except supervise.ExitedEarly as exc:
        raise AssertionError(f"{proc.args!r} exited with {exc.code} before {url} answered") from None
    except TimeoutError:
        raise AssertionError(f"{url} did not answer 200 within {deadline_s} s") from None


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, children included (pf forks its serve app)."""
    supervise.stop_group(proc, timeout=15)


@contextmanager
def local_endpoint(model: Any, workdir: Path, key: str) -> Iterator[int]:
    """The real local endpoint (python -m finetune_phi.endpoint) serving `model` (helpers_model's registered
    tiny model) with `key` on a free port of 127.0.0.1, ready; its port. Its log is workdir/endpoint.log."""
    port = free_port()
    with (workdir / "endpoint.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_phi.endpoint", "--model-uri", model.registry_uri,
             "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "MLFLOW_TRACKING_URI": model.tracking_uri, "FINETUNE_PHI_ENDPOINT_KEY": key},
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{port}/health/ready", 120, proc)
            yield port
        finally:
            stop_group(proc)


def built_venv(repo: Path, target: str, venv: Path) -> Path:
    """The python of a venv of its own that `make <target>` builds (make test does so before pytest)."""
    import pytest

    if shutil.which("make") is None and not (venv / ".installed").is_file():
        pytest.skip(f"needs `make {target}` (no make here): see the Makefile's recipe")
    if shutil.which("make") is not None:
        proc = subprocess.run(["make", "-s", target], cwd=repo, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return venv / "bin" / "python"
