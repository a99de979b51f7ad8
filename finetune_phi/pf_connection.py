"""The Prompt flow CustomConnection that holds the endpoint's URI and key (the Studio variant's "Custom keys").

    python -m finetune_phi.pf_connection show       # the connection's endpoint (never its key)

`deploy_model.py` calls `upsert_connection(settings, endpoint=..., key=..., kind=..., chat_format=...)`;
the chat flow names the connection (PROMPTFLOW_CONNECTION_NAME, default phi3_endpoint) and Prompt flow
hands the tool its `configs["endpoint"]`, `configs["kind"]` (config.ENDPOINT_KINDS),
`configs["chat_format"]` (config.CHAT_FORMATS) and decrypted `secrets["key"]`.

Prompt flow fixes its home directory when it is first imported, so the connection store is written
by a child process started with `pf_env.promptflow_env(settings)`: the caller may have imported
promptflow already (with another home), and nothing lands in the user's ~/.promptflow. The key
travels to the child on stdin, never on its command line.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from typing import Any
from urllib.parse import urlparse

import config
from finetune_phi import common, pf_env

log = logging.getLogger(__name__)

CHILD_TIMEOUT_S = 120
# Prompt flow's own rule for connection names (letters, digits, _ and -).
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class PromptflowConnectionError(RuntimeError):
    """Creating or reading the Prompt flow connection failed."""


def _check(name: str, endpoint: str | None = None, key: str | None = None, kind: str | None = None,
           chat_format: str | None = None) -> None:
    problems = []
    if not NAME_RE.match(name or ""):
        problems.append(
            f"PROMPTFLOW_CONNECTION_NAME={name!r}: use letters, digits, '_' or '-' (e.g. phi3_endpoint)"
        )
    if endpoint is not None:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            problems.append(f"endpoint={endpoint!r} is not an http(s) URL: pass the scoring URI deploy printed")
    if key is not None and not key.strip():
        problems.append("key is empty: pass the endpoint's key (AZURE_ML_API_KEY)")
    if kind is not None and kind not in config.ENDPOINT_KINDS:
        problems.append(f"kind={kind!r}: use one of {', '.join(config.ENDPOINT_KINDS)}")
    if chat_format is not None and chat_format not in config.CHAT_FORMATS:
        problems.append(f"chat_format={chat_format!r}: use one of {', '.join(config.CHAT_FORMATS)}")
    if problems:
        raise config.ConfigError(problems)


def _run_child(settings: config.Settings, action: str, payload: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "finetune_phi.pf_connection", "_child", action]
    proc = subprocess.run(
        cmd,
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=pf_env.subprocess_env(settings),
        cwd=config.ROOT,
        timeout=CHILD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise PromptflowConnectionError(
            f"Prompt flow connection {payload['name']!r} ({action}) failed "
            f"(home {pf_env.promptflow_home(settings)}):\n{tail}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def upsert_connection(
    settings: config.Settings, *, endpoint: str, key: str, kind: str,
    chat_format: str = config.Settings.AZURE_ML_CHAT_FORMAT,
) -> dict[str, Any]:
    """Create or update the CustomConnection `settings.PROMPTFLOW_CONNECTION_NAME`.

    Returns the stored connection's name and configs (the key is not returned).
    """
    name = settings.PROMPTFLOW_CONNECTION_NAME
    _check(name, endpoint, key, kind, chat_format)
    payload = {"name": name, "endpoint": endpoint, "key": key, "kind": kind, "chat_format": chat_format}
    stored = _run_child(settings, "upsert", payload)
    log.info(
        "Prompt flow connection %r -> %s (key %s, home %s)",
        name, stored["configs"].get("endpoint"), common.redact(key), pf_env.promptflow_home(settings),
    )
    return stored


def read_connection(settings: config.Settings, *, with_secret: bool = False) -> dict[str, Any]:
    """The stored connection as {"name", "configs", "secrets"} (secrets only when asked)."""
    name = settings.PROMPTFLOW_CONNECTION_NAME
    _check(name)
    return _run_child(settings, "show_secret" if with_secret else "show", {"name": name})


# --- the child: the only code here that imports promptflow -------------------------------------------


def _child(action: str) -> int:
    from promptflow.client import PFClient
    from promptflow.entities import CustomConnection

    payload = json.loads(sys.stdin.read())
    client = PFClient()
    if action == "upsert":
        connection = CustomConnection(
            name=payload["name"],
            configs={"endpoint": payload["endpoint"], "kind": payload["kind"], "chat_format": payload["chat_format"]},
            secrets={"key": payload["key"]},
        )
        stored = client.connections.create_or_update(connection)
        result: dict[str, Any] = {"name": stored.name, "configs": dict(stored.configs)}
    elif action in ("show", "show_secret"):
        stored = client.connections.get(payload["name"], with_secrets=action == "show_secret")
        result = {"name": stored.name, "configs": dict(stored.configs)}
        if action == "show_secret":
            result["secrets"] = dict(stored.secrets)
    else:
        raise SystemExit(f"unknown action {action!r}")
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "_child":
        return _child(argv[1])
    if argv in (["show"], []):
        common.setup_logging()
        settings = config.load()
        try:
            stored = read_connection(settings)
        except PromptflowConnectionError as exc:
            log.error("%s\nrun python deploy_model.py first", exc)
            return 1
        print(json.dumps(stored, indent=2))
        return 0
    print(__doc__)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
