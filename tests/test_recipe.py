"""`setup_ml.py --recipe tutorial`: the SDK tutorial's own training recipe, one command away.

The tutorial's fine_tune.py (Microsoft Phi-3 Cookbook, "Fine-tune and Integrate custom Phi-3 models
with Prompt flow") trains with TrainingArguments(learning_rate=5.0e-06, num_train_epochs=3,
per_device_train_batch_size=4, gradient_accumulation_steps=1, lr_scheduler_type="cosine",
warmup_ratio=0.2, seed=0) and SFTTrainer(max_seq_length=2048, dataset_text_field="text") on the whole
model (no PEFT): every token of the text is learned from. Here it runs on the tiny model, as the
suite can, and the Azure job's command line is checked for the same values on Phi-3.5-mini.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

import config
from conftest import OFFLINE_ENV
from helpers_pf import pipeline_env, run

TUTORIAL = {"learning_rate": "5e-06", "epochs": "3.0", "batch_size": "4", "grad_accum": "1", "max_seq_length": "2048",
            "warmup_ratio": "0.2", "assistant_only_loss": "False", "seed": "0", "peft": "full"}  # fmt: skip


@pytest.mark.slow
def test_the_tutorial_recipe_trains_the_tiny_model_with_the_tutorials_values(tmp_path: Path) -> None:
    import mlflow

    env = pipeline_env(OFFLINE_ENV, tmp_path, EVAL_MAX_ROWS="0", LEARNING_RATE="1e-3")  # the recipe wins over these
    assert run([sys.executable, "download_dataset.py", "--source", "demo"], env).returncode == 0
    done = run([sys.executable, "setup_ml.py", "--recipe", "tutorial"], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "recipe tutorial: BASE_MODEL=microsoft/Phi-3.5-mini-instruct, PEFT=full" in done.stderr + done.stdout
    settings = config.load(env=env)
    client = mlflow.MlflowClient(settings.tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (trained,) = client.search_runs([experiment.experiment_id])
    params = trained.data.params
    assert {k: params[k] for k in TUTORIAL} == TUTORIAL
    assert params["base_model"] == "tiny"  # the local backend trains LOCAL_BASE_MODEL unless --model says otherwise
    assert trained.info.status == "FINISHED"


def test_the_tutorial_recipe_on_azure_is_the_tutorials_job(tmp_path: Path) -> None:
    from fake_mlclient import azure_settings
    from finetune_phi.azure import entities

    settings = config.with_recipe(azure_settings(tmp_path, LEARNING_RATE=1e-3), "tutorial")
    argv = shlex.split(entities.training_job(settings).command)
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--model"] == "microsoft/Phi-3.5-mini-instruct" and flags["--peft"] == "full"
    assert flags["--learning-rate"] == "5e-06" and flags["--epochs"] == "3.0" and flags["--max-seq-length"] == "2048"
    assert flags["--warmup-ratio"] == "0.2" and flags["--seed"] == "0" and "--no-assistant-only-loss" in argv
    with pytest.raises(config.ConfigError, match="recipe 'paper': use one of tutorial"):
        config.with_recipe(settings, "paper")


def test_the_recipe_is_refused_with_azures_own_fine_tuning(caplog: pytest.LogCaptureFixture) -> None:
    import setup_ml

    assert setup_ml.main(["--backend", "azure", "--mode", "serverless", "--recipe", "tutorial"]) == 1
    assert "--recipe tutorial trains with our fine_tune.py" in caplog.text and "--mode serverless" in caplog.text
