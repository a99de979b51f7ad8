"""finetune_phi.common: atomic writes, the state file, .env handling, redaction."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import config
from finetune_phi import common


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")

    def boom(src, dst):  # the rename never happens
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind


def test_atomic_write_with_mode_creates_private_file(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    common.atomic_write_text(target, "k", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_secret_write_without_os_fchmod_as_on_windows_before_python_3_13(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy_model.py --backend azure writes .env through here after the deployment exists."""
    monkeypatch.delattr(os, "fchmod")
    target = tmp_path / ".env"
    target.write_text("OLD=1\n")
    os.chmod(target, 0o644)
    common.write_dotenv(target, {"AZURE_ML_API_KEY": "k-ey", "AZURE_ML_ENDPOINT_KIND": "azure-mlflow"})
    assert target.read_text() == 'OLD=1\nAZURE_ML_API_KEY="k-ey"\nAZURE_ML_ENDPOINT_KIND="azure-mlflow"\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temp file left behind


def test_state_sections_update_independently(tmp_path: Path) -> None:
    s = config.load(env={}, dotenv_path=tmp_path / "none", STATE_DIR=str(tmp_path / "state"))
    assert common.read_state(s) == {}
    common.update_state(s, "training", {"run_id": "r1"})
    common.update_state(s, "deployment", {"port": 1})
    common.update_state(s, "training", {"run_id": "r2"})
    assert common.read_state(s) == {"training": {"run_id": "r2"}, "deployment": {"port": 1}}


def test_corrupt_state_file_says_what_to_do(tmp_path: Path) -> None:
    s = config.load(env={}, dotenv_path=tmp_path / "none", STATE_DIR=str(tmp_path))
    common.state_path(s).write_text("{not json")
    with pytest.raises(RuntimeError, match="delete it and re-run"):
        common.read_state(s)


def test_write_dotenv_keeps_other_lines_is_0600_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("# mine\nSEED=3\nAZURE_ML_API_KEY=old\n")
    common.write_dotenv(path, {"AZURE_ML_ENDPOINT": "http://127.0.0.1:5001/score", "AZURE_ML_API_KEY": 'k"$ey'})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "# mine" in text and "SEED=3" in text and "old" not in text
    s = config.load(env={}, dotenv_path=path)
    assert s.AZURE_ML_API_KEY == 'k"$ey'
    assert s.AZURE_ML_ENDPOINT == "http://127.0.0.1:5001/score"
    assert s.SEED == 3


def test_redact_never_reveals_a_usable_secret() -> None:
    key = "abcdefghijklmnopqrstuvwxyz0123456789"
    shown = common.redact(key)
    assert key not in shown and len(shown) < len(key) and "36" in shown
    assert common.redact("short-secret") == "<redacted>"
