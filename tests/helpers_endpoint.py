"""Real endpoint servers for tests: uvicorn in a thread of this process, or the CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

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
