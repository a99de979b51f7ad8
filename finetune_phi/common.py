"""Small helpers every stage shares: logging, atomic writes, the local state file, CLI flags."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import config

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def setup_logging(verbose: bool = False) -> None:
    """Configure logging once, from a script's main(); library modules never call this."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # azure-core logs every HTTP request and response, headers included, at INFO: ~50 entries for one
    # Azure job submission. They stay available with --verbose.
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(
        logging.DEBUG if verbose else logging.WARNING
    )


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of one.

    The temp file lives in the target's folder so that the final rename stays on one filesystem.
    With `mode`, the file is created with those permissions before any byte is written (for secrets).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600 (readable by its owner only) before anything is written to it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            _set_mode(fd, tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _set_mode(fd: int, tmp: str, mode: int) -> None:
    """chmod the temp file, by descriptor where the platform can.

    os.fchmod exists on Windows only from Python 3.13 (this project supports 3.11 and 3.12): there
    os.chmod on the path is used instead, before any byte is written. On Windows permissions are
    best effort: chmod sets only the read-only flag, and who may read the file is decided by the ACL
    it inherits from its folder (the user's own profile folder for a checkout there).
    """
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(tmp, mode)


def atomic_write_lines(path: Path, lines: Iterator[str] | list[str]) -> int:
    """Atomically write one line per item; returns how many lines were written."""
    lines = list(lines)
    atomic_write_text(path, "".join(line.rstrip("\n") + "\n" for line in lines))
    return len(lines)


# --- local state: how stages find each other's outputs without copy-paste ----------------------


def state_path(settings: config.Settings) -> Path:
    return settings.state_dir / STATE_FILE


def read_state(settings: config.Settings) -> dict[str, Any]:
    path = state_path(settings)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{path} is not valid JSON ({exc}); delete it and re-run the previous step") from exc


def update_state(settings: config.Settings, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Replace one section (e.g. "training", "deployment") of the state file, atomically."""
    state = read_state(settings)
    state[section] = values
    atomic_write_text(state_path(settings), json.dumps(state, indent=2, sort_keys=True) + "\n")
    return state


# --- .env: where deploy writes the endpoint and key for the flows --------------------------------


def write_dotenv(path: Path, values: dict[str, str]) -> None:
    """Set `values` in a .env file (mode 0600), keeping its other lines."""
    path = Path(path)
    kept: list[str] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            name = line.split("=", 1)[0].strip().removeprefix("export ").strip()
            if name not in values:
                kept.append(line)
    kept += [f"{k}={json.dumps(v)}" for k, v in values.items()]
    atomic_write_text(path, "\n".join(kept) + "\n", mode=0o600)


redact = config.redact  # one home: config.py, which shows settings without their secrets


# --- command-line flags every script shares --------------------------------------------------------


def base_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backend",
        choices=config.BACKENDS,
        default=None,
        help="override BACKEND from config.py (default: %(default)s = use config)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def settings_from_args(args: argparse.Namespace, **overrides: object) -> config.Settings:
    return config.load(BACKEND=getattr(args, "backend", None), **overrides)
