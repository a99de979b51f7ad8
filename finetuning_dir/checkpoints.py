"""Crash-safe Trainer checkpoints: one folder per (data, settings), resumed from its newest complete checkpoint.

A run killed at any moment (kill -9, a pre-empted VM) and started again with the same arguments
carries on from its last complete checkpoint and stops at the same optimizer step as an
uninterrupted run. The folder name is a digest of everything that changes the result, so a run
with other data or settings never resumes from a foreign checkpoint.

Imports nothing from the repository: this folder is uploaded as the Azure ML job's code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# A full model is one of these; a PEFT model saves only its adapter.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
# Written before trainer_state.json when save_only_model=False; without them a resume restarts the
# optimizer and the learning-rate schedule, which is not the run that was interrupted.
_RESUME_STATE = ("optimizer.pt", "scheduler.pt")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(settings: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """What identifies a run: its result-changing settings and the digests of its data files."""
    return {"settings": settings, "files": {name: file_digest(path) for name, path in sorted(files.items())}}


def fingerprint_id(record: dict[str, Any]) -> str:
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_dir(root: Path, record: dict[str, Any]) -> Path:
    """`root/run-<digest>`, created, with the fingerprint beside the checkpoints for a human to read."""
    directory = Path(root) / f"run-{fingerprint_id(record)}"
    directory.mkdir(parents=True, exist_ok=True)
    stored = directory / FINGERPRINT_FILE
    if stored.is_file():
        try:
            existing = json.loads(stored.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            existing = None  # torn by a crash during the first write: rewrite it below
        if existing is not None and existing != record:
            raise ValueError(
                f"{stored} describes another run than this one; delete {directory} or pass another --checkpoint-dir"
            )
        if existing == record:
            return directory
    _write_json_atomically(stored, record)
    return directory


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete(checkpoint: Path) -> bool:
    """trainer_state.json is the Trainer's last write into a checkpoint (transformers 5.x `_save_checkpoint`):
    when it parses and names this step, and the weights and optimizer state are there, nothing was cut short."""
    step = checkpoint_step(checkpoint)
    if step is None:
        return False
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    has_weights = any((checkpoint / name).is_file() for name in _WEIGHTS)
    return has_weights and all((checkpoint / name).is_file() for name in _RESUME_STATE)


def latest_complete_checkpoint(directory: Path, *, remove_torn: bool = True) -> Path | None:
    """The newest complete `checkpoint-N` in `directory`, or None.

    Torn checkpoints (a crash while the Trainer was writing one; it writes in place, not atomically)
    are deleted when `remove_torn`: left behind, the Trainer's own rotation could count them as
    the newest and delete the complete one that a later crash would need.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted(
        ((step, path) for path in directory.iterdir() if (step := checkpoint_step(path)) is not None), reverse=True
    )
    latest: Path | None = None
    for _, path in found:
        if is_complete(path):
            latest = latest or path
        elif remove_torn:
            log.warning("removing incomplete checkpoint %s (the run was stopped while writing it)", path)
            shutil.rmtree(path)
    return latest
