"""Test-wide guards: nothing leaves 127.0.0.1, and every library runs offline and quiet."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

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

from testkit import fixtures  # noqa: E402 (after the offline variables: nothing heavy is imported)


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


def require(resolver: Callable[[], Path]) -> Path:
    """The third-party fixture's path, or skip the test with the resolver's how-to-get-it message.

    Only tests that need the real data request these: a clone without ../shared runs everything else.
    """
    try:
        return resolver()
    except fixtures.FixtureUnavailable as exc:
        pytest.skip(f"{FIXTURE_TAG.format(exc.key)} {exc}")


@pytest.fixture
def phi3_tokenizer_dir() -> Path:
    """The real Phi-3-mini-4k-instruct tokenizer's folder (testkit.fixtures)."""
    return require(fixtures.phi3_tokenizer_dir)


@pytest.fixture
def ultrachat_20() -> Path:
    """The first 20 rows of ultrachat_200k train_sft as .jsonl (testkit.fixtures)."""
    return require(fixtures.ultrachat_first20)


# --- the skip policy CI runs under ----------------------------------------------------------------------
# FINETUNE_PHI_ALLOWED_SKIPS=none      every test must run;
# FINETUNE_PHI_ALLOWED_SKIPS=fixtures  only the documented skips for missing third-party data, whose
#                                      reason carries the `make fixtures` how-to (CI as a lone clone);
# FINETUNE_PHI_ALLOWED_SKIPS=fixtures:A,B  only those skips, and only for the fixtures named (CI with the
#                                      fixtures this machine has: `python -m testkit.fixtures missing`
#                                      names the others); "fixtures:" with no name is "none".
# Unset: any skip is allowed, as for a developer on a machine without make or /proc.
SKIP_POLICY_ENV = "FINETUNE_PHI_ALLOWED_SKIPS"
FIXTURE_SKIP_MARK = "`make fixtures`"  # every FixtureUnavailable message says how to get the data
FIXTURE_TAG = "[fixture {}]"  # how require() names the fixture a skip is for
_skips: list[tuple[str, str]] = []


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _skip_reason(report)))


def skip_allowed(policy: str, why: str) -> bool:
    if policy == "none" or FIXTURE_SKIP_MARK not in why:
        return False
    if policy == "fixtures":
        return True
    named = [key for key in policy.removeprefix("fixtures:").split(",") if key]
    return any(FIXTURE_TAG.format(key) in why for key in named)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    policy = os.environ.get(SKIP_POLICY_ENV, "")
    if not policy or hasattr(session.config, "workerinput"):  # xdist: the controller sees every report
        return
    if policy not in ("none", "fixtures") and not policy.startswith("fixtures:"):
        raise pytest.UsageError(f"{SKIP_POLICY_ENV}={policy!r}: use 'none', 'fixtures', 'fixtures:<names>', or leave it unset")
    bad = [(node, why) for node, why in _skips if not skip_allowed(policy, why)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if bad:
        lines = [f"{SKIP_POLICY_ENV}={policy}: {len(bad)} skip(s) not allowed:"] + [f"  {n}: {w}" for n, w in bad]
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        lines = [f"{SKIP_POLICY_ENV}={policy}: {len(_skips)} skip(s), all allowed"]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line("\n".join(lines), red=bool(bad))
