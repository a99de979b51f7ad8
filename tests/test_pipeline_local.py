"""The local pipeline as a user runs it, and the Azure job's own command line run here to completion."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import config
import download_dataset
import setup_ml

REPO = Path(__file__).resolve().parents[1]


def _local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **values: str) -> config.Settings:
    values = {
        "BACKEND": "local",
        "STATE_DIR": str(tmp_path / "state"),
        "TRAIN_DATA_PATH": str(tmp_path / "data" / "train_data.jsonl"),
        "TEST_DATA_PATH": str(tmp_path / "data" / "test_data.jsonl"),
        "NUM_TRAIN_EPOCHS": "1",
        **values,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return config.load()


@pytest.mark.slow
def test_real_ultrachat_rows_download_then_setup_ml_logs_a_model_pyfunc_answers_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ultrachat_20: Path
) -> None:
    settings = _local_env(tmp_path, monkeypatch)
    assert download_dataset.main(["--source", str(ultrachat_20)]) == 0
    assert len(settings.train_data_path.read_text().splitlines()) == 16
    assert setup_ml.main([]) == 0

    import mlflow

    from finetune_phi.common import read_state

    training = read_state(settings)["training"]
    mlflow.set_tracking_uri(settings.tracking_uri)
    run = mlflow.get_run(training["run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.metrics["eval_loss_after"]) > 0
    model = mlflow.pyfunc.load_model(training["model_uri"])
    [text] = model.predict(["Hello"], params={"max_new_tokens": 8})
    assert isinstance(text, str)
    assert "<|" not in text  # only the assistant's text, no chat markup


def test_setup_ml_without_data_fails_cleanly_naming_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _local_env(tmp_path, monkeypatch)
    assert setup_ml.main([]) == 1
    assert "download_dataset.py" in caplog.text


@pytest.mark.slow
def test_the_azure_jobs_command_line_runs_fine_tune_to_completion_here(tmp_path: Path, ultrachat_20: Path) -> None:
    """The job entity's command, with Azure's ${{...}} replaced by local paths, is what Azure would run."""
    from finetune_phi.azure import entities
    from finetune_phi.data import prepare_dataset

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    prepare_dataset(str(ultrachat_20), train_path=train, test_path=test, dataset_name="", split="",
                    percent=None, test_size=0.2, seed=42)  # fmt: skip
    settings = config.load(
        env={}, dotenv_path=tmp_path / "none", BACKEND="azure", BASE_MODEL="tiny", NUM_TRAIN_EPOCHS=1.0,
        TRAIN_DATA_PATH=str(train), TEST_DATA_PATH=str(test),
    )  # fmt: skip
    job = entities.training_job(settings)
    out = tmp_path / "model output"
    values = {
        "inputs.train_file": job.inputs["train_file"].path,
        "inputs.eval_file": job.inputs["eval_file"].path,
        "outputs.model_output": str(out),
    }
    command = re.sub(r"\$\{\{([a-z_.]+)\}\}", lambda m: shlex.quote(values[m.group(1)]), job.command)
    assert "${{" not in command
    argv = shlex.split(command)
    assert argv[:2] == ["python", "fine_tune.py"]
    argv[0] = sys.executable
    env = {
        **os.environ,
        **job.environment_variables,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(argv, cwd=job.code, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "MLmodel").is_file()  # the job output Azure registers as an mlflow_model

    import mlflow

    model = mlflow.pyfunc.load_model(str(out))
    [reply] = model.predict(["Hi"], params={"max_new_tokens": 4})
    assert isinstance(reply, str)


@pytest.mark.parametrize(
    "script", ["download_dataset.py", "setup_ml.py", "deploy_model.py", "finetuning_dir/fine_tune.py"]
)
def test_every_script_has_help(script: str) -> None:
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert "python " in proc.stdout  # the docstring shows the command to run
