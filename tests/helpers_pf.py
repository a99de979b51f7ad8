"""What every test that runs the real `pf` CLI against an isolated Prompt flow home needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import free_port


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
