"""The one fine-tune command line shared by the local run and the Azure job."""

from __future__ import annotations

import shlex
from pathlib import Path

import config
from finetune_phi import training


def _settings(tmp_path: Path, **kw) -> config.Settings:
    return config.load(env={}, dotenv_path=tmp_path / "none", **kw)


def test_azure_placeholders_stay_unquoted_and_paths_with_spaces_are_quoted(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    azure = training.fine_tune_command(
        s,
        train_file="${{inputs.train_file}}",
        eval_file="${{inputs.eval_file}}",
        model_output_dir="${{outputs.model_output}}",
        model=s.BASE_MODEL,
    )
    assert azure.startswith("python fine_tune.py --train-file ${{inputs.train_file}} ")
    assert "--model_output_dir ${{outputs.model_output}}" in azure
    local = training.fine_tune_command(
        s, train_file="/d ir/t.jsonl", eval_file="/e.jsonl", model_output_dir="/o", model="tiny"
    )
    assert "'/d ir/t.jsonl'" in local
    assert shlex.split(local)[3] == "/d ir/t.jsonl"


def test_local_and_azure_differ_only_in_substituted_values(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    paths = {"train_file": "/a/train.jsonl", "eval_file": "/a/test.jsonl", "model_output_dir": "/a/out"}
    placeholders = {
        "train_file": "${{inputs.train_file}}",
        "eval_file": "${{inputs.eval_file}}",
        "model_output_dir": "${{outputs.model_output}}",
    }
    azure = training.fine_tune_command(s, model="m", **placeholders)
    for key, placeholder in placeholders.items():
        azure = azure.replace(placeholder, paths[key])
    assert azure == training.fine_tune_command(s, model="m", **paths)


def test_config_knobs_reach_the_command_line(tmp_path: Path) -> None:
    s = _settings(tmp_path, NUM_TRAIN_EPOCHS=3.0, LEARNING_RATE=2e-4, MAX_SEQ_LENGTH=512, PEFT="auto")
    argv = training.fine_tune_args(s, train_file="t", eval_file="e", model_output_dir="o", model="tiny")
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert pairs["--epochs"] == "3.0" and pairs["--learning-rate"] == "0.0002"
    assert pairs["--max-seq-length"] == "512"
    assert pairs["--peft"] == "full"  # auto: the tiny model trains in full
    argv = training.fine_tune_args(s, train_file="t", eval_file="e", model_output_dir="o", model=s.BASE_MODEL)
    assert dict(zip(argv[::2], argv[1::2]))["--peft"] == "lora"  # auto: real Phi-3 sizes use LoRA
    # The rule is the job's own (fine_tune.resolve_peft): an explicit choice passes through as given.
    argv = training.fine_tune_args(_settings(tmp_path, PEFT="lora"), train_file="t", eval_file="e", model_output_dir="o",
                                   model="tiny")
    assert dict(zip(argv[::2], argv[1::2]))["--peft"] == "lora"


def test_missing_data_names_the_step_to_run(tmp_path: Path) -> None:
    s = _settings(tmp_path, TRAIN_DATA_PATH=str(tmp_path / "nope.jsonl"), STATE_DIR=str(tmp_path / "st"))
    try:
        training.run_local_fine_tune(s)
    except FileNotFoundError as exc:
        assert "TRAIN_DATA_PATH" in str(exc) and "download_dataset.py" in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")
