"""config.py: defaults, overrides (env > .env > defaults), types, and all-at-once validation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback
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


# --- tutorial-style access -----------------------------------------------------------------------------
# The names the tutorial's scripts import from its config.py: Microsoft Phi-3 Cookbook, "Fine-tune and
# Integrate custom Phi-3 models with Prompt flow" (md/06.E2ESamples/E2E_Phi-3-FineTuning_PromptFlow_
# Integration.md): download_dataset.py, setup_ml.py, deploy_model.py and integrate_with_promptflow.py.
TUTORIAL_NAMES = (
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP_NAME",
    "AZURE_ML_WORKSPACE_NAME",
    "AZURE_MANAGED_IDENTITY_CLIENT_ID",
    "AZURE_MANAGED_IDENTITY_NAME",
    "AZURE_MANAGED_IDENTITY_RESOURCE_ID",
    "TRAIN_DATA_PATH",
    "TEST_DATA_PATH",
    "AZURE_MODEL_NAME",
    "AZURE_ENDPOINT_NAME",
    "AZURE_DEPLOYMENT_NAME",
    "AZURE_ML_API_KEY",
    "AZURE_ML_ENDPOINT",
)
FIELD_NAMES = [f.name for f in dataclasses.fields(config.Settings)]


def _clean_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """The environment minus every setting (a developer's own AZURE_* must not leak in), .env in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in FIELD_NAMES}
    env["ENV_FILE"] = str(tmp_path / ".env")
    env.update(values)
    return env


def test_the_tutorials_imports_give_the_effective_values_in_a_fresh_interpreter(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\n"
        'AZURE_ML_API_KEY="key-from-dotenv"\n'
        "AZURE_SUBSCRIPTION_ID=sub-from-dotenv\n"
        "AZURE_MODEL_NAME=model-from-dotenv\n"
    )
    env = _clean_env(tmp_path, AZURE_SUBSCRIPTION_ID="sub-from-env", AZURE_RESOURCE_GROUP_NAME="rg-from-env")
    env["PYTHONPATH"] = str(config.ROOT)
    # The tutorial's own import statements, run as its scripts run them: a new process, from another cwd.
    script = (
        f"from config import ({', '.join(TUTORIAL_NAMES)})\n"
        "import config, dataclasses, json\n"
        f"imported = {{n: globals()[n] for n in {TUTORIAL_NAMES!r}}}\n"
        "print(json.dumps({'imported': imported, 'load': dataclasses.asdict(config.load())}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    imported, loaded = out["imported"], out["load"]
    assert imported["AZURE_SUBSCRIPTION_ID"] == "sub-from-env"  # environment beats .env
    assert imported["AZURE_RESOURCE_GROUP_NAME"] == "rg-from-env"
    assert imported["AZURE_ML_ENDPOINT"] == "http://127.0.0.1:5001/score"  # from .env
    assert imported["AZURE_ML_API_KEY"] == "key-from-dotenv"  # quotes stripped as load() strips them
    assert imported["AZURE_MODEL_NAME"] == "model-from-dotenv"
    assert imported["TRAIN_DATA_PATH"] == "data/train_data.jsonl"  # the default
    assert imported == {n: loaded[n] for n in TUTORIAL_NAMES}


def test_every_setting_is_a_module_attribute_with_loads_value(tmp_path: Path, monkeypatch) -> None:
    for name in FIELD_NAMES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("SEED=11\nEVAL_GATE_MARGIN=0.05\n")
    monkeypatch.setenv("ENV_FILE", str(tmp_path / ".env"))
    monkeypatch.setenv("LOCAL_ENDPOINT_PORT", "5099")
    loaded = dataclasses.asdict(config.load())
    assert {name: getattr(config, name) for name in FIELD_NAMES} == loaded
    # typed as load() types them, read at access time (not frozen at import)
    assert (config.SEED, config.EVAL_GATE_MARGIN, config.LOCAL_ENDPOINT_PORT) == (11, 0.05, 5099)
    monkeypatch.setenv("SEED", "12")
    assert config.SEED == 12
    assert set(FIELD_NAMES) <= set(dir(config))


def test_a_setting_load_rejects_is_refused_on_single_name_access_too(tmp_path: Path, monkeypatch) -> None:
    # One script must not run on a value the others refuse: the same ConfigError, every problem in it.
    monkeypatch.setenv("ENV_FILE", str(tmp_path / ".env"))
    monkeypatch.setenv("SEED", "abc")
    with pytest.raises(config.ConfigError) as exc:
        config.AZURE_ML_ENDPOINT
    assert "SEED='abc' is not a valid int" in str(exc.value)


def test_an_unknown_name_is_an_attribute_error_naming_close_matches() -> None:
    with pytest.raises(AttributeError) as exc:
        config.AZURE_ENDPOINT
    text = "".join(traceback.format_exception_only(exc.value))
    assert "'AZURE_ENDPOINT'" in text and "AZURE_ML_ENDPOINT" in text
    assert not hasattr(config, "AZURE_ENDPOINT")
    assert getattr(config, "__path__", None) is None  # import machinery's probes still see a plain module
    with pytest.raises(ImportError):
        exec("from config import AZURE_ENDPOINT", {})


def test_a_setting_assigned_at_module_level_is_refused_naming_the_fix(tmp_path: Path, monkeypatch) -> None:
    # The tutorial's config.py style pasted into ours: `from config import X` would see the pasted value
    # while load() (every script) still used the default; load() says so instead.
    monkeypatch.setattr(config, "AZURE_SUBSCRIPTION_ID", "pasted", raising=False)
    with pytest.raises(config.ConfigError) as exc:
        _load(tmp_path)
    assert "AZURE_SUBSCRIPTION_ID is assigned at module level in config.py" in str(exc.value)
    assert "Settings dataclass" in str(exc.value)


# --- the tutorial's config, filled in the tutorial's way -------------------------------------------------


def test_the_identity_resource_id_is_built_from_its_parts_unless_set(tmp_path: Path) -> None:
    env = _clean_env(tmp_path, AZURE_SUBSCRIPTION_ID="sub-1", AZURE_RESOURCE_GROUP_NAME="rg-1",
                     AZURE_MANAGED_IDENTITY_NAME="uai-1", AZURE_MANAGED_IDENTITY_CLIENT_ID="cid",
                     AZURE_ML_WORKSPACE_NAME="ws")  # fmt: skip
    s = config.load(env=env)
    built = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai-1"
    assert s.AZURE_MANAGED_IDENTITY_RESOURCE_ID == built
    config.validate(s, config.AZURE_WORKSPACE_FIELDS + config.AZURE_IDENTITY_FIELDS)  # nothing left to fill in
    assert s.with_overrides(AZURE_MANAGED_IDENTITY_NAME="uai-2").AZURE_MANAGED_IDENTITY_RESOURCE_ID.endswith("/uai-2")
    # Set explicitly (an identity in another group), it is kept as given, through overrides too.
    elsewhere = built.replace("rg-1", "rg-shared")
    explicit = config.load(env={**env, "AZURE_MANAGED_IDENTITY_RESOURCE_ID": elsewhere})
    assert explicit.AZURE_MANAGED_IDENTITY_RESOURCE_ID == elsewhere
    assert explicit.with_overrides(SEED=1).AZURE_MANAGED_IDENTITY_RESOURCE_ID == elsewhere
    # Nothing filled in: it names the parts to set, not itself.
    problems = config.missing(config.load(env=_clean_env(tmp_path)), ["AZURE_MANAGED_IDENTITY_RESOURCE_ID"])
    assert problems == ["AZURE_MANAGED_IDENTITY_RESOURCE_ID is built from AZURE_SUBSCRIPTION_ID, "
                        "AZURE_RESOURCE_GROUP_NAME, AZURE_MANAGED_IDENTITY_NAME: set those (or set "
                        "AZURE_MANAGED_IDENTITY_RESOURCE_ID whole, for an identity in another group)"]


def test_settings_with_keys_set_never_show_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = {"AZURE_ML_API_KEY": "sk-endpoint-0123456789abcdefXYZ", "EVAL_JUDGE_API_KEY": "judge-0123456789abcdefQRS"}
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in keys.items()))
    s = config.load(env=_clean_env(tmp_path))
    assert s.AZURE_ML_API_KEY == keys["AZURE_ML_API_KEY"]  # the value itself is there to use
    # The README's own command, in a fresh interpreter, and repr/str/format/logging in this one.
    proc = subprocess.run([sys.executable, "-c", "import config; print(config.load())"], cwd=config.ROOT,
                          env=_clean_env(tmp_path), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = [proc.stdout, repr(s), str(s), f"{s}", "%s" % (s,)]
    for name, key in keys.items():  # enough to tell two keys apart, not to use one
        assert f"{name}={config.redact(key)!r}" in proc.stdout and config.redact(key).startswith(key[:4])
    with pytest.raises(config.ConfigError) as err:
        config.load(env={**_clean_env(tmp_path), "SEED": "not-a-number"})
    shown.append(str(err.value))
    for text in shown:
        for key in keys.values():
            assert key not in text
