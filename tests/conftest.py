"""Test-wide guards: nothing leaves 127.0.0.1, and every library runs offline and quiet."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from pathlib import Path

import pytest

# Set before any test imports transformers / mlflow / promptflow: several read these at import.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PROMPTFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
}
os.environ.update(OFFLINE_ENV)
# Every fine-tune ends with a before/after evaluation (finetuning_dir/evaluation.py); tests that do not
# check it keep it to a few short answers. Tests that check it pass their own limits.
os.environ.setdefault("EVAL_MAX_ROWS", "4")
os.environ.setdefault("EVAL_MAX_NEW_TOKENS", "8")
# Prompt flow fixes its home when first imported: keep an in-process import away from ~/.promptflow.
os.environ.setdefault("PF_HOME_DIRECTORY", tempfile.mkdtemp(prefix="finetune-phi-pf-home-"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
PHI3_TOKENIZER_DIR = FIXTURES / "phi-3-mini-tokenizer"
ULTRACHAT_20 = FIXTURES / "ultrachat_200k" / "train_sft_first20.jsonl"


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name that is not localhost: would need DNS, which is off-limits too


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse, in this process, any connection to an address outside the loopback range."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guard(sock: socket.socket, address: object):
        if not _is_local(address):
            raise NetworkBlocked(f"test tried to reach {address!r}: tests talk to 127.0.0.1 only")
        return real_connect(sock, address)

    def guard_ex(sock: socket.socket, address: object):
        if not _is_local(address):
            raise NetworkBlocked(f"test tried to reach {address!r}: tests talk to 127.0.0.1 only")
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard_ex)


@pytest.fixture
def phi3_tokenizer_dir() -> Path:
    if not PHI3_TOKENIZER_DIR.is_dir():
        pytest.fail(f"missing fixture {PHI3_TOKENIZER_DIR}: tests expect ../shared beside the checkout")
    return PHI3_TOKENIZER_DIR


@pytest.fixture
def ultrachat_20() -> Path:
    if not ULTRACHAT_20.is_file():
        pytest.fail(f"missing fixture {ULTRACHAT_20}: tests expect ../shared beside the checkout")
    return ULTRACHAT_20
