"""config.py: defaults, overrides (env > .env > defaults), types, and all-at-once validation."""

from __future__ import annotations

from pathlib import Path

import pytest

import config


def _load(tmp_path: Path, env: dict[str, str] | None = None, dotenv: str | None = None, **kw):
    path = tmp_path / ".env"
    if dotenv is not None:
        path.write_text(dotenv)
    return config.load(env=env or {}, dotenv_path=path, **kw)


def test_defaults_are_local_and_offline(tmp_path: Path) -> None:
    s = _load(tmp_path)
    assert s.BACKEND == "local"
    assert s.tracking_uri.startswith("sqlite:///") and s.tracking_uri.endswith("mlflow.db")
    assert s.LOCAL_ENDPOINT_HOST == "127.0.0.1"
    assert s.AZURE_ML_API_KEY == ""  # no secret is committed


def test_every_field_can_be_overridden_from_env_with_its_type(tmp_path: Path) -> None:
    s = _load(tmp_path, env={"SEED": "7", "TEST_SIZE": "0.25", "BACKEND": "azure", "AZURE_MODEL_NAME": "m"})
    assert (s.SEED, s.TEST_SIZE, s.BACKEND, s.AZURE_MODEL_NAME) == (7, 0.25, "azure", "m")
    assert isinstance(s.SEED, int) and isinstance(s.TEST_SIZE, float)


def test_precedence_env_over_dotenv_over_default(tmp_path: Path) -> None:
    dotenv = 'SEED=11\nAZURE_ML_API_KEY="from-dotenv"\n# a comment\nexport AZURE_MODEL_NAME=dot\n'
    s = _load(tmp_path, env={"SEED": "12"}, dotenv=dotenv)
    assert s.SEED == 12
    assert s.AZURE_ML_API_KEY == "from-dotenv"
    assert s.AZURE_MODEL_NAME == "dot"


def test_keyword_overrides_win(tmp_path: Path) -> None:
    s = _load(tmp_path, env={"BACKEND": "azure"}, BACKEND="local")
    assert s.BACKEND == "local"


def test_all_type_and_range_problems_reported_at_once(tmp_path: Path) -> None:
    env = {"SEED": "abc", "TEST_SIZE": "1.5", "BACKEND": "cloud", "LOCAL_ENDPOINT_PORT": "70000", "PEFT": "qlora",
           "AZURE_ML_ENDPOINT_KIND": "azure"}
    with pytest.raises(config.ConfigError) as exc:
        _load(tmp_path, env=env)
    message = str(exc.value)
    for name in env:
        assert name in message, name
    assert len(exc.value.problems) == len(env)
    assert "local, azure-mlflow, azure-catalog" in message  # the kinds AZURE_ML_ENDPOINT_KIND takes


def test_validate_lists_every_placeholder_with_the_variable_to_set(tmp_path: Path) -> None:
    s = _load(tmp_path)
    names = config.AZURE_WORKSPACE_FIELDS + config.AZURE_IDENTITY_FIELDS
    with pytest.raises(config.ConfigError) as exc:
        config.validate(s, names)
    assert len(exc.value.problems) == len(names)
    for name in names:
        assert f"set {name}" in str(exc.value)


def test_validate_passes_when_filled_and_local_needs_no_azure_value(tmp_path: Path) -> None:
    env = {
        "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
        "AZURE_RESOURCE_GROUP_NAME": "rg",
        "AZURE_ML_WORKSPACE_NAME": "ws",
    }
    config.validate(_load(tmp_path, env=env), config.AZURE_WORKSPACE_FIELDS)
    assert config.missing(_load(tmp_path), []) == []


def test_relative_paths_resolve_against_the_repo(tmp_path: Path) -> None:
    s = _load(tmp_path, env={"STATE_DIR": str(tmp_path / "st")})
    assert s.train_data_path == config.ROOT / "data" / "train_data.jsonl"
    assert s.state_dir == tmp_path / "st"
    assert str(tmp_path / "st" / "mlflow.db") in s.tracking_uri


def test_env_file_moves_the_dotenv_that_is_read(tmp_path: Path) -> None:
    other = tmp_path / "other.env"
    other.write_text("SEED=99\nENV_FILE=ignored.env\n")
    s = config.load(env={"ENV_FILE": str(other)})
    assert s.SEED == 99
    assert s.env_file == other  # a .env cannot move itself
