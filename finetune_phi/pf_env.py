"""Prompt flow's environment for this project: its home, keyring and offline switches, in one place.

    eval "$(python -m finetune_phi.pf_env)"               # export them (and ENV_FILE) into your shell, then use pf
    python -m finetune_phi.pf_env pf flow test --flow chat_flow --interactive   # or run one command with them

Prompt flow keeps connections, runs and its config under a home directory (default ~/.promptflow)
that it reads once, when `promptflow` is first imported. This project keeps it inside STATE_DIR
(`.finetune_phi/promptflow`) so that a test's temporary STATE_DIR is a fresh, isolated Prompt flow
and a user's ~/.promptflow is never touched. Every process that runs Prompt flow (deploy, tests,
the Makefile, the demo) therefore gets `promptflow_env(settings)` in its environment.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import yaml

import config
from finetune_phi import common

HOME_ENV = "PF_HOME_DIRECTORY"
KEYRING_FILE = "keyring_pass.cfg"

# Connection secrets are encrypted with a key Prompt flow keeps in the OS keyring; a headless box
# has none (StoreConnectionEncryptionKeyError). keyrings.alt's file backend keeps that key in a
# file inside Prompt flow's home, mode 0600, as private as .env, which holds the same secret.
KEYRING_BACKEND = "keyrings.alt.file.PlaintextKeyring"

# What `pf config set` would write; a project may still opt in by editing <home>/pf.yaml.
OFFLINE_CONFIG = {"telemetry": {"enabled": False}, "trace": {"destination": "none"}}

# pf checks PyPI for a newer version on every `pf flow test` / `pf run create` unless its cache
# says it checked less than 7 days ago, and no setting turns that off: a check time in the far
# future keeps it from ever asking (promptflow/_sdk/_version_hint_utils.py, 1.18.5).
VERSION_CHECK_FILE = "pf_version_check.json"
NEVER_CHECK = {"last_check_time": "2999-12-31 00:00:00.000000"}


def promptflow_home(settings: config.Settings) -> Path:
    return settings.state_dir / "promptflow"


def prepare_home(settings: config.Settings) -> Path:
    """Create Prompt flow's home with telemetry, tracing and the update check off (idempotent)."""
    home = promptflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)

    pf_yaml = home / "pf.yaml"
    current = yaml.safe_load(pf_yaml.read_text(encoding="utf-8")) if pf_yaml.is_file() else None
    current = current if isinstance(current, dict) else {}
    merged = {**current}
    for section, values in OFFLINE_CONFIG.items():
        existing = merged.get(section) if isinstance(merged.get(section), dict) else {}
        merged[section] = {**values, **existing}  # an explicit choice already in the file wins
    if merged != current:
        common.atomic_write_text(pf_yaml, yaml.safe_dump(merged, sort_keys=True), mode=0o600)

    version_check = home / VERSION_CHECK_FILE
    cached: dict[str, str] = {}
    if version_check.is_file():
        try:
            loaded = json.loads(version_check.read_text(encoding="utf-8") or "{}")
            cached = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            cached = {}  # pf itself treats a corrupt cache as empty
    if cached.get("last_check_time") != NEVER_CHECK["last_check_time"]:
        common.atomic_write_text(version_check, json.dumps({**cached, **NEVER_CHECK}), mode=0o600)

    keyring_file = home / KEYRING_FILE
    if not keyring_file.exists():
        common.atomic_write_text(keyring_file, "", mode=0o600)
    return home


def promptflow_env(settings: config.Settings) -> dict[str, str]:
    """The variables every Prompt flow process of this project needs (prepares the home too)."""
    home = prepare_home(settings)
    return {
        HOME_ENV: str(home),
        "PYTHON_KEYRING_BACKEND": KEYRING_BACKEND,
        # keyring sets backend properties from KEYRING_PROPERTY_<NAME> (keyring/backend.py).
        "KEYRING_PROPERTY_FILE_PATH": str(home / KEYRING_FILE),
        "PF_DISABLE_TRACING": "true",
        # pf builds its Azure Monitor log exporter even with telemetry off, and the exporter
        # (azure-monitor-opentelemetry-exporter 1.0.0b4x) then polls settings.sdk.monitor.azure.com.
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    }


def subprocess_env(settings: config.Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """A full environment for a `pf` (or deploy) subprocess: `base` (default os.environ) plus ours.

    The interpreter's bin directory goes first on PATH, so `pf` and the flows' Python are this venv's.
    """
    env = {**(os.environ if base is None else base), **promptflow_env(settings)}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = config.load()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    # For a person's shell, also the .env deploy_model.py writes, by absolute path: a batch run of the
    # standard flow works in a snapshot that .amlignore keeps the .env out of.
    shell = {**promptflow_env(settings), "ENV_FILE": str(settings.env_file)}
    if not argv:
        for name, value in shell.items():
            print(f"export {name}={shlex.quote(value)}")
        return 0
    env = {**subprocess_env(settings), **shell}
    os.execvpe(argv[0], argv, env)
    return 127  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
