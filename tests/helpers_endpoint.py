"""Real endpoint servers for tests: uvicorn in a thread of this process, or the CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable

import httpx

from conftest import OFFLINE_ENV, REPO, free_port
from finetune_phi.endpoint import KEY_ENV
from finetune_phi.endpoint.__main__ import bind_socket
from helpers_model import RegisteredModel

KEY = "test-key-0123456789abcdefghijklmnop"
AUTH = {"Authorization": f"Bearer {KEY}"}


class ThreadServer:
    """uvicorn on a free loopback port in a daemon thread, bound the way the CLI binds."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


class ProcessServer:
    """`python -m finetune_phi.endpoint` serving `model` from its registry, as an operator starts it."""

    def __init__(self, model: RegisteredModel, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [
            sys.executable, "-m", "finetune_phi.endpoint", "--model-uri", model.registry_uri,
            "--host", "127.0.0.1", "--port", str(self.port), "--load-before-listen", *flags,
        ]  # fmt: skip
        self.env = {**os.environ, **OFFLINE_ENV, "MLFLOW_TRACKING_URI": model.tracking_uri, KEY_ENV: KEY}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> "ProcessServer":
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the endpoint exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the endpoint was not ready in 90 s:\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()


# --- watching generation from a test ----------------------------------------------------------------


def count_forward_passes(engine: Any) -> tuple[list[int], Callable[[], None]]:
    """A counter of decoding steps (lm_head runs once per step, batched or not) and its remover."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    return calls, engine.model.lm_head.register_forward_hook(hook).remove


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def assert_generation_stopped(base_url: str, calls: list[int], max_before: int) -> None:
    """After a client left: the server releases the request and runs (almost) no further steps."""
    with httpx.Client(base_url=base_url, timeout=10) as c:
        wait_until(lambda: c.get("/health/live").json()["in_flight"] == 0, 5, "the request is released")
    time.sleep(0.3)
    before = calls[0]
    time.sleep(0.5)
    assert calls[0] - before <= 2, f"{calls[0] - before} forward passes after the client left"
    assert before < max_before


def tiny_engine() -> Any:
    """An Engine over a random 1-layer Phi-3 (helpers_model.tiny_phi3), served as "tiny"."""
    from finetune_phi.endpoint.engine import Engine
    from helpers_model import tiny_phi3

    return Engine(*tiny_phi3(), name="tiny")


def serving(engine: Any) -> ThreadServer:
    """The endpoint's app over `engine`, with KEY, on a thread of this process (use it as a context manager)."""
    from finetune_phi.endpoint.server import create_app

    return ThreadServer(create_app(KEY, engine=engine))
