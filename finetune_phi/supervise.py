"""Running the local endpoint as a detached process: start it, wait until it is ready, stop it.

Everything here is about one STATE_DIR's endpoint process, not about models: its files in
STATE_DIR/endpoint (`pid`, `key` (0600), `server.log`, `spawned`: every endpoint pid a deploy started
and has not yet seen stopped, and `deploy.lock`), the lock that lets one deploy or teardown run at a
time (flock: the kernel drops it when its holder dies), the endpoint's key, and the process itself
(started in its own session so it outlives the command, signalled only when its command line says it
is our endpoint, stopped with SIGTERM and then SIGKILL). local_deploy.py decides what to run and when.

The process primitives under it (spawn, poll_until, http_ok, stop_group) know nothing of endpoints:
the serving benchmark starts its peers (`transformers serve`, `mlflow models serve`) with them, and the
tests their `pf` servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import config
from finetune_phi import common
from finetune_phi.endpoint import KEY_ENV
from finetune_phi.mlflow_store import mlflow_env

log = logging.getLogger(__name__)

PID_FILE = "pid"
KEY_FILE = "key"
LOG_FILE = "server.log"
SPAWNED_FILE = "spawned"
LOCK_FILE = "deploy.lock"
ENDPOINT_MODULE = "finetune_phi.endpoint"
EXIT_PORT_BUSY = 3  # finetune_phi.endpoint.__main__ exits with this when it cannot bind

# Loading the tiny model takes seconds; Phi-3-mini on a laptop CPU can take a couple of minutes.
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 40.0  # the server allows 30 s for in-flight requests after SIGTERM
LOG_TAIL_CHARS = 3000


class DeployError(RuntimeError):
    """A deployment step failed; the message says what to do (deploy_model.py prints it)."""


# --- processes: start one in its own session, wait until it is ready, stop it and its children ----------


class ExitedEarly(RuntimeError):
    """The process ended before it was ready; `code` is its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exited with status {code}")
        self.code = code


def spawn(argv: list[str], env: dict[str, str], log_path: Path, *, cwd: Path = config.ROOT) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session with its output appended to `log_path`.

    Its own session: Ctrl-C here, or this shell closing, leaves it running, and stop_group can end the
    whole group (`mlflow models serve` and `pf flow serve` run their server as a child)."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def poll_until(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, interval: float = 0.25) -> float:
    """Seconds until `ready()` is true; ExitedEarly if `proc` ends first, TimeoutError after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        code = proc.poll()
        if code is not None:
            raise ExitedEarly(code)
        if ready():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    """Whether GET `url` answers 200 now (a new connection each time)."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the session `spawn` started, SIGKILL after `timeout`; then any child that outlived
    its parent."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0f s of SIGTERM; sending SIGKILL", proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def endpoint_dir(settings: config.Settings) -> Path:
    return settings.state_dir / "endpoint"


def scoring_uri(settings: config.Settings) -> str:
    host = settings.LOCAL_ENDPOINT_HOST
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.LOCAL_ENDPOINT_PORT}/score"


# --- one deploy at a time ----------------------------------------------------------------------


@contextlib.contextmanager
def deploy_lock(settings: config.Settings) -> Iterator[None]:
    """Hold STATE_DIR/endpoint/deploy.lock, or raise DeployError naming the process that holds it.

    Two deploys at once would both see the same old endpoint, both start a new one on the port and
    each stop the old one: one new server would be left running with no pid file naming it.
    """
    folder = endpoint_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    # Not atomic_write_text: the lock lives on this inode, so it must be opened in place. The fd is
    # not inheritable (PEP 446), so the endpoint this deploy starts does not keep the lock alive.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise DeployError(
                f"another deploy or teardown (pid {holder}) is running for {settings.state_dir}: wait for it "
                f"to finish, then run this again ({path} is locked until that process exits)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_spawned(settings: config.Settings) -> list[int]:
    path = endpoint_dir(settings) / SPAWNED_FILE
    if not path.is_file():
        return []
    return [int(word) for word in path.read_text(encoding="utf-8").split() if word.isdigit()]


def write_spawned(settings: config.Settings, pids: list[int]) -> None:
    common.atomic_write_text(endpoint_dir(settings) / SPAWNED_FILE, "".join(f"{pid}\n" for pid in dict.fromkeys(pids)))


def stop_strays(settings: config.Settings, keep: int | None) -> list[int]:
    """Stop endpoints an interrupted deploy left behind (every live spawned pid but `keep`).

    Call with the lock held: then no other deploy is starting one, and only the pid file names the
    server that should run.
    """
    stopped = []
    for pid in read_spawned(settings):
        if pid != keep and is_endpoint(pid):
            log.warning(
                "an interrupted deploy left endpoint pid %d running (a half-started or replaced server); stopping it",
                pid,
            )
            stop_pid(pid)
            stopped.append(pid)
    write_spawned(settings, [keep] if keep is not None and is_endpoint(keep) else [])
    return stopped


# --- the key ----------------------------------------------------------------------------------


def get_or_create_key(settings: config.Settings) -> str:
    """The endpoint key: generated at the first deploy, reused afterwards so clients keep working."""
    path = endpoint_dir(settings) / KEY_FILE
    if path.is_file():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return key
    key = secrets.token_urlsafe(32)
    save_key(settings, key)
    log.info("generated a new endpoint key %s in %s", common.redact(key), path)
    return key


def save_key(settings: config.Settings, key: str) -> None:
    """The key file, readable by its owner only (0600), replaced in one rename."""
    common.atomic_write_text(endpoint_dir(settings) / KEY_FILE, key + "\n", mode=0o600)


# --- processes ----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our own exited child
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) already said it exists


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        proc = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
        return proc.stdout


def is_endpoint(pid: int) -> bool:
    """Guards against a recycled pid: never signal a process that is not our endpoint."""
    return _alive(pid) and ENDPOINT_MODULE in _command_line(pid)


def read_pid(settings: config.Settings) -> int | None:
    path = endpoint_dir(settings) / PID_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8").strip()
    try:
        return int(text)
    except ValueError:
        log.warning("ignoring %s: %r is not a process id", path, text[:40])
        return None


def running_pid(settings: config.Settings) -> int | None:
    """The pid of the endpoint this state dir started, if it still runs; clears a stale pid file."""
    pid = read_pid(settings)
    if pid is None:
        return None
    if is_endpoint(pid):
        return pid
    path = endpoint_dir(settings) / PID_FILE
    # Callers say what it means for them (deploy: "had died; starting a fresh one").
    log.debug("the endpoint recorded in %s (pid %d) is no longer running; removing the stale pid file", path, pid)
    path.unlink(missing_ok=True)
    return None


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT_S) -> str:
    """SIGTERM (uvicorn then finishes in-flight requests), SIGKILL if it is still there after `timeout`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "already gone"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return "stopped"
        time.sleep(0.1)
    log.warning("pid %d did not stop within %.0f s of SIGTERM; sending SIGKILL", pid, timeout)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "stopped"
    while _alive(pid):
        time.sleep(0.05)
    return "killed"


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# A line the endpoint's logging starts ("12:00:01 INFO [4242] name: ..."); tracebacks continue without it.
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \w+ \[(\d+)\] ")


def _log_tail(path: Path, offset: int, pid: int | None = None) -> str:
    """What the server wrote since `offset` (this attempt only), at most LOG_TAIL_CHARS.

    With `pid`, only that process's lines (and the traceback lines under them): during a hand-over
    the old endpoint appends its access log to the same file, and would push the new one's error out.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    if pid is not None:
        kept, mine = [], True
        for line in text.splitlines():
            started = _LOG_LINE.match(line)
            if started:
                mine = int(started.group(1)) == pid
            if mine:
                kept.append(line)
        text = "\n".join(kept)
    return text[-LOG_TAIL_CHARS:].rstrip() or "(the log is empty)"


def _probe_ready(host: str, port: int) -> dict[str, object] | None:
    """The readiness body if a server on host:port says it is ready; a new connection each time."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health/ready", timeout=2.0) as resp:
            return json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_ready(proc: subprocess.Popen[bytes], host: str, port: int, log_path: Path, offset: int, timeout: float) -> None:
    """Wait until the server `proc` itself (not an old one sharing the port) reports ready.

    During a hand-over both servers accept connections on the port and the kernel spreads new
    connections between them, so the probe checks the pid in the answer.
    """
    def ready() -> bool:
        body = _probe_ready(host, port)
        return body is not None and body.get("pid") == proc.pid and body.get("status") == "ready"

    try:
        poll_until(proc, ready, timeout)
    except ExitedEarly as exc:
        if exc.code == EXIT_PORT_BUSY:
            raise DeployError(
                f"port {port} on {host} is in use by another program: stop it or set LOCAL_ENDPOINT_PORT "
                f"to a free port\n--- {log_path} ---\n{_log_tail(log_path, offset, proc.pid)}"
            ) from None
        raise DeployError(
            f"the endpoint exited with status {exc.code} before it was ready; its log ({log_path}) ends with:\n"
            f"{_log_tail(log_path, offset, proc.pid)}"
        ) from None
    except TimeoutError:
        raise DeployError(
            f"the endpoint was not ready after {timeout:.0f} s; its log ({log_path}) ends with:\n"
            f"{_log_tail(log_path, offset, proc.pid)}"
        ) from None


def start_server(
    settings: config.Settings, model_uri: str, key: str, ready_timeout: float = READY_TIMEOUT_S
) -> subprocess.Popen[bytes]:
    """Start the endpoint detached and return once it is ready; on any failure it is killed."""
    folder = endpoint_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / LOG_FILE
    host, port = settings.LOCAL_ENDPOINT_HOST, settings.LOCAL_ENDPOINT_PORT
    argv = [sys.executable, "-m", ENDPOINT_MODULE, "--model-uri", model_uri, "--host", host, "--port", str(port)]
    argv += [
        "--load-before-listen",
        "--max-concurrent-requests", str(settings.ENDPOINT_MAX_CONCURRENT_REQUESTS),
        "--request-timeout-s", repr(settings.ENDPOINT_REQUEST_TIMEOUT_S),
        "--max-body-bytes", str(settings.ENDPOINT_MAX_BODY_BYTES),
        "--graceful-shutdown-s", repr(settings.ENDPOINT_GRACEFUL_SHUTDOWN_S),
        "--dtype", settings.ENDPOINT_DTYPE,
        "--device", settings.ENDPOINT_DEVICE,
        "--max-context-tokens", str(settings.ENDPOINT_MAX_CONTEXT_TOKENS),
        "--memory-budget-mb", str(settings.ENDPOINT_MEMORY_BUDGET_MB),
        "--max-batch-tokens", str(settings.ENDPOINT_MAX_BATCH_TOKENS),
        "--max-step-tokens", str(settings.ENDPOINT_MAX_STEP_TOKENS),
    ]  # fmt: skip
    env = {**os.environ, **mlflow_env(settings), KEY_ENV: key}
    offset = log_path.stat().st_size if log_path.is_file() else 0
    proc = spawn(argv, env, log_path)
    # Recorded before waiting: if this deploy is killed now, the next one finds the server here.
    write_spawned(settings, [*read_spawned(settings), proc.pid])
    log.info("started the endpoint (pid %d) for %s on %s:%d; waiting until ready", proc.pid, model_uri, host, port)
    try:
        wait_ready(proc, host, port, log_path, offset, ready_timeout)
    except BaseException:
        stop_group(proc, timeout=5.0)
        write_spawned(settings, [pid for pid in read_spawned(settings) if pid != proc.pid])
        raise
    return proc
