"""Azure ML entities: built once from config, the shared command line, and YAML the SDK loads back."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import config
from fake_mlclient import FILLED_IN, IDENTITY_CLIENT_ID, IDENTITY_RESOURCE_ID, azure_settings
from finetune_phi import common, training
from finetune_phi.azure import entities, workflow

REPO = Path(__file__).resolve().parents[1]


def test_compute_size_picks_gpu_or_cpu_image_and_environment_version(tmp_path: Path) -> None:
    gpu = azure_settings(tmp_path)  # the default Standard_NC24ads_A100_v4
    cpu = azure_settings(tmp_path, AZURE_COMPUTE_SIZE="Standard_E16s_v3")
    assert entities.environment(gpu).image == entities.GPU_BASE_IMAGE
    assert entities.environment(cpu).image == entities.CPU_BASE_IMAGE
    assert "cuda" in entities.GPU_BASE_IMAGE and "cuda" not in entities.CPU_BASE_IMAGE
    # The version follows the content, so a re-run registers nothing new and a change does.
    assert entities.environment_version(gpu) == entities.environment_version(azure_settings(tmp_path))
    assert entities.environment_version(gpu) != entities.environment_version(cpu)
    compute = entities.compute(azure_settings(tmp_path, AZURE_COMPUTE_MAX_INSTANCES=3, AZURE_COMPUTE_IDLE_SECONDS=600))
    assert (compute.size, compute.min_instances, compute.max_instances) == ("Standard_NC24ads_A100_v4", 0, 3)
    assert compute.idle_time_before_scale_down == 600


def _fine_tune_parser(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(training.FINETUNING_DIR))
    return importlib.import_module("fine_tune").make_parser()  # its own parser, not a copy of its flags


def test_training_job_runs_fine_tune_py_with_every_setting_and_a_real_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every knob off its default, so a flag that is dropped, misspelt or fed the wrong setting shows.
    s = azure_settings(
        tmp_path, NUM_TRAIN_EPOCHS=3.0, MAX_STEPS=7, LEARNING_RATE=2e-4, PER_DEVICE_TRAIN_BATCH_SIZE=3,
        GRADIENT_ACCUMULATION_STEPS=5, MAX_SEQ_LENGTH=640, LORA_R=8, LORA_ALPHA=24, LORA_DROPOUT=0.1, SEED=9,
        SAVE_STEPS=11, EVAL_MAX_ROWS=13, EVAL_MAX_NEW_TOKENS=17, EVAL_BATCH_SIZE=6,
    )  # fmt: skip
    job = entities.training_job(s)
    # What the job's shell runs, read by fine_tune.py's own parser (Azure substitutes the ${{...}}
    # before the shell sees them, so here they are plain words).
    argv = shlex.split(job.command)
    assert argv[:2] == ["python", "fine_tune.py"]
    args = _fine_tune_parser(monkeypatch).parse_args(argv[2:])
    assert (args.train_file, args.eval_file, args.model_output_dir) == (
        Path("${{inputs.train_file}}"), Path("${{inputs.eval_file}}"), Path("${{outputs.model_output}}"),
    )  # fmt: skip
    assert args.model == "microsoft/Phi-3-mini-4k-instruct" == s.BASE_MODEL
    assert args.peft == "lora"  # PEFT=auto: real Phi-3 sizes train LoRA adapters
    assert (args.epochs, args.max_steps, args.learning_rate) == (3.0, 7, 2e-4)
    assert (args.batch_size, args.grad_accum, args.max_seq_length, args.seed) == (3, 5, 640, 9)
    assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (8, 24, 0.1)
    assert (args.save_steps, args.eval_max_rows, args.eval_max_new_tokens, args.eval_batch_size) == (11, 13, 17, 6)
    # Each placeholder names an input or output the job declares: an unknown one would stay literal.
    used = set(re.findall(r"\$\{\{(inputs|outputs)\.(\w+)\}\}", job.command))
    assert used == {("inputs", "train_file"), ("inputs", "eval_file"), ("outputs", "model_output")}
    assert {name for kind, name in used if kind == "inputs"} == set(job.inputs)
    assert {name for kind, name in used if kind == "outputs"} == set(job.outputs)
    assert set(job.inputs) == {"train_file", "eval_file"}  # the model folder is no longer an input
    assert job.inputs["train_file"].path == str(s.train_data_path)
    assert job.inputs["train_file"].type == "uri_file"
    assert job.outputs["model_output"].type == "mlflow_model"
    assert job.experiment_name == s.AZURE_EXPERIMENT_NAME and job.display_name == s.AZURE_JOB_DISPLAY_NAME
    assert job.compute == s.AZURE_COMPUTE_NAME and Path(job.code) == training.FINETUNING_DIR
    assert job.distribution is None and job.resources.instance_count == 1
    assert job.environment_variables["PYTHONUNBUFFERED"] == "1"


def test_multi_gpu_and_multi_node_use_pytorch_distribution(tmp_path: Path) -> None:
    job = entities.training_job(
        azure_settings(
            tmp_path, AZURE_JOB_PROCESSES_PER_NODE=4, AZURE_JOB_INSTANCE_COUNT=2, AZURE_COMPUTE_MAX_INSTANCES=2
        )
    )
    assert job.distribution.type == "pytorch" and job.distribution.process_count_per_instance == 4
    assert job.resources.instance_count == 2
    nodes_only = entities.training_job(azure_settings(tmp_path, AZURE_JOB_INSTANCE_COUNT=2))
    assert nodes_only.distribution.process_count_per_instance == 1


def test_job_command_is_a_valid_fine_tune_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = azure_settings(tmp_path, NUM_TRAIN_EPOCHS=2.0, LEARNING_RATE=1e-4)
    command = entities.training_job(s).command
    local = {
        "${{inputs.train_file}}": str(tmp_path / "train dir" / "t.jsonl"),
        "${{inputs.eval_file}}": str(tmp_path / "e.jsonl"),
        "${{outputs.model_output}}": str(tmp_path / "out"),
    }
    for placeholder, path in local.items():
        assert placeholder in command
        command = command.replace(placeholder, shlex.quote(path))
    argv = shlex.split(command)
    assert argv[:2] == ["python", training.ENTRY_SCRIPT]
    args = _fine_tune_parser(monkeypatch).parse_args(argv[2:])
    importlib.import_module("fine_tune").validate_args(args)
    assert args.train_file == Path(local["${{inputs.train_file}}"])
    assert args.model_output_dir == Path(local["${{outputs.model_output}}"])
    assert args.model == s.BASE_MODEL and args.epochs == 2.0 and args.learning_rate == 1e-4


def test_catalog_job_fine_tunes_the_catalog_model_with_config_hyperparameters(tmp_path: Path) -> None:
    s = azure_settings(tmp_path, NUM_TRAIN_EPOCHS=3.0, LEARNING_RATE=2e-5, PER_DEVICE_TRAIN_BATCH_SIZE=2)
    job = entities.catalog_job(s)
    # Phi-3-mini is retired from the catalog: the default is its replacement.
    assert job.model.path == "azureml://registries/azureml/models/Phi-4-mini-instruct/labels/latest"
    assert job.task.lower() == "chatcompletion"
    assert job.hyperparameters["num_train_epochs"] == "3"  # an integer string, as Azure's samples send it
    assert entities.catalog_hyperparameters(azure_settings(tmp_path, NUM_TRAIN_EPOCHS=1.5))["num_train_epochs"] == "1.5"
    assert float(job.hyperparameters["learning_rate"]) == 2e-5
    assert job.hyperparameters["per_device_train_batch_size"] == "2"
    assert job.training_data.path == str(s.train_data_path) and job.validation_data.path == str(s.test_data_path)
    assert job.outputs["registered_model"].name == s.AZURE_MODEL_NAME


def test_endpoint_and_deployment_carry_identity_probes_and_settings(tmp_path: Path) -> None:
    s = azure_settings(tmp_path, AZURE_DEPLOYMENT_INSTANCE_TYPE="Standard_NC6s_v3", AZURE_DEPLOYMENT_INSTANCE_COUNT=2)
    endpoint = entities.endpoint(s)
    assert endpoint.auth_mode == "key" and endpoint.identity.type == "user_assigned"
    (uai,) = endpoint.identity.user_assigned_identities
    assert (uai.resource_id, uai.client_id) == (IDENTITY_RESOURCE_ID, IDENTITY_CLIENT_ID)
    dep = entities.deployment(s, "azureml:m:3")
    assert (dep.instance_type, dep.instance_count, dep.model) == ("Standard_NC6s_v3", 2, "azureml:m:3")
    assert dep.liveness_probe.initial_delay >= 600 and dep.readiness_probe.initial_delay >= 600
    assert dep.request_settings.request_timeout_ms == entities.REQUEST_TIMEOUT_MS
    assert dep.environment_variables["AZURE_CLIENT_ID"] == IDENTITY_CLIENT_ID
    assert dep.environment_variables["WORKER_COUNT"] == "1"
    model = entities.model(s, "job-7")
    assert (model.path, model.type) == ("azureml://jobs/job-7/outputs/model_output", "mlflow_model")


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _load_all(out: Path) -> dict[str, object]:
    from azure.ai.ml import load_compute, load_data, load_environment, load_job, load_model, load_online_deployment
    from azure.ai.ml import load_online_endpoint, load_serverless_endpoint

    loaders = {
        "compute.yml": load_compute, "environment.yml": load_environment, "job.yml": load_job,
        "finetuning_job.yml": load_job, "model.yml": load_model, "endpoint.yml": load_online_endpoint,
        "deployment.yml": load_online_deployment, "data_train.yml": load_data, "data_validation.yml": load_data,
        "serverless_endpoint.yml": load_serverless_endpoint,
    }  # fmt: skip
    return {p.name: loaders[p.name](p) for p in sorted(out.iterdir()) if p.suffix == ".yml"}


def test_dry_run_yaml_round_trips_through_the_sdk_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = azure_settings(tmp_path, AZURE_JOB_PROCESSES_PER_NODE=2, AZURE_DEPLOYMENT_INSTANCE_TYPE="Standard_NC6s_v3")
    common.update_state(s, "training", {"backend": "azure", "job_name": "job-42", "mode": "command"})
    out = tmp_path / "dry run"
    written = workflow.dry_run_training(s, out, mode="command") + workflow.dry_run_deployment(s, out, job_name=None)
    assert sorted(p.name for p in written) == sorted(
        ["compute.yml", "environment.yml", "job.yml", "model.yml", "endpoint.yml", "deployment.yml"]
    )
    for path in written:
        for value in _leaves(yaml.safe_load(path.read_text())):
            assert value is not None, f"{path.name}: a null fails to load"
            assert not re.match(r"^azureml:(?!//)[./]", str(value)), f"{path.name}: {value} is a local path"
    monkeypatch.chdir(tmp_path)  # the YAML must not depend on the directory it is used from
    loaded = _load_all(out)

    assert loaded["compute.yml"].size == s.AZURE_COMPUTE_SIZE
    env = loaded["environment.yml"]
    assert env.image == entities.GPU_BASE_IMAGE and env.version == entities.environment_version(s)
    assert env.conda_file == yaml.safe_load((REPO / "conda.yml").read_text())
    job = loaded["job.yml"]
    assert job.command == entities.training_job(s).command
    assert Path(job.code) == training.FINETUNING_DIR
    assert Path(job.inputs["train_file"].path) == s.train_data_path
    assert job.outputs["model_output"].type == "mlflow_model"
    assert job.distribution.process_count_per_instance == 2
    assert job.environment == entities.environment_ref(s).removeprefix("azureml:")
    assert loaded["model.yml"].path == "azureml://jobs/job-42/outputs/model_output"
    endpoint = loaded["endpoint.yml"]
    assert endpoint.auth_mode == "key" and endpoint.name == s.AZURE_ENDPOINT_NAME
    assert endpoint.identity.user_assigned_identities[0].resource_id == IDENTITY_RESOURCE_ID
    assert endpoint.identity.user_assigned_identities[0].client_id == IDENTITY_CLIENT_ID
    dep = loaded["deployment.yml"]
    assert dep.instance_type == "Standard_NC6s_v3" and dep.endpoint_name == s.AZURE_ENDPOINT_NAME
    assert dep.readiness_probe.initial_delay == entities.PROBE_INITIAL_DELAY_S
    assert dep.request_settings.max_concurrent_requests_per_instance == s.AZURE_DEPLOYMENT_MAX_CONCURRENT_REQUESTS == 1
    assert dep.environment_variables == entities.deployment_env_vars(s)


def test_catalog_dry_run_loads_as_a_finetuning_job(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    written = workflow.dry_run_training(s, tmp_path / "out", mode="catalog")
    assert [p.name for p in written] == ["compute.yml", "finetuning_job.yml"]
    job = _load_all(tmp_path / "out")["finetuning_job.yml"]
    assert job.hyperparameters == entities.catalog_hyperparameters(s)
    assert Path(job.training_data.path) == s.train_data_path
    assert job.model.path == "azureml://registries/azureml/models/Phi-4-mini-instruct/labels/latest"
    assert job.compute == s.AZURE_COMPUTE_NAME


def test_serverless_dry_run_loads_as_data_assets_and_a_job_without_compute(tmp_path: Path) -> None:
    s = azure_settings(tmp_path, AZURE_CATALOG_MODEL="Phi-4-mini-instruct")
    written = workflow.dry_run_training(s, tmp_path / "out", mode="serverless")
    assert [p.name for p in written] == ["data_train.yml", "data_validation.yml", "finetuning_job.yml"]
    loaded = _load_all(tmp_path / "out")
    train, validation, job = loaded["data_train.yml"], loaded["data_validation.yml"], loaded["finetuning_job.yml"]
    assert Path(train.path) == s.train_data_path and train.type == "uri_file"
    assert job.compute is None  # fine-tuning as a service: Azure's compute, billed per token
    assert job.training_data.path.removeprefix("azureml:") == f"{train.name}:{train.version}"
    assert job.validation_data.path.removeprefix("azureml:") == f"{validation.name}:{validation.version}"
    assert job.hyperparameters == entities.catalog_hyperparameters(s)
    assert job.outputs["registered_model"].name == s.AZURE_MODEL_NAME
    # The version follows the content: the same file, the same version (nothing new registered).
    assert entities.data_asset(s, "train").version == train.version
    s.train_data_path.write_text(s.train_data_path.read_text() + "\n")
    assert entities.data_asset(s, "train").version != train.version


def test_serverless_deployment_dry_run_is_a_serverless_endpoint(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    common.update_state(s, "training", {"backend": "azure", "job_name": "job-7", "mode": "serverless",
                                        "output": entities.CATALOG_OUTPUT})  # fmt: skip
    (path,) = workflow.dry_run_deployment(s, tmp_path / "out")
    endpoint = _load_all(tmp_path / "out")["serverless_endpoint.yml"]
    assert endpoint.name == s.AZURE_ENDPOINT_NAME
    assert endpoint.model_id.startswith(f"azureml://locations/{entities.PLACEHOLDER_REGION}/workspaces/")


def test_writing_an_endpoint_leaves_it_usable(tmp_path: Path) -> None:
    endpoint = entities.endpoint(azure_settings(tmp_path))
    first = entities.write_yaml(endpoint, tmp_path / "a.yml").read_text()
    second = entities.write_yaml(endpoint, tmp_path / "b.yml").read_text()  # the SDK's dump would crash here
    assert first == second and IDENTITY_RESOURCE_ID in first


def test_deploy_dry_run_without_a_recorded_job_uses_a_clear_placeholder(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    (model_yml, *_rest) = workflow.dry_run_deployment(s, tmp_path / "out")
    assert f"azureml://jobs/{entities.PLACEHOLDER_JOB_NAME}/outputs/model_output" in model_yml.read_text()
    assert _load_all(tmp_path / "out")["model.yml"].tags["job_name"] == entities.PLACEHOLDER_JOB_NAME


def test_scripts_dry_run_write_loadable_yaml_with_placeholders(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in FILLED_IN and k != "BACKEND"}
    env["STATE_DIR"] = str(tmp_path / "state")  # no recorded job: the placeholder path
    runs = {
        name: subprocess.Popen(
            [sys.executable, script, "--backend", "azure", "--dry-run", str(tmp_path / name)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, script in (("train", "setup_ml.py"), ("deploy", "deploy_model.py"))
    }  # fmt: skip
    for name, proc in runs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        assert "Traceback" not in output
    assert set(_load_all(tmp_path / "train")) == {"compute.yml", "environment.yml", "job.yml"}
    deploy = _load_all(tmp_path / "deploy")
    assert set(deploy) == {"model.yml", "endpoint.yml", "deployment.yml"}
    assert deploy["endpoint.yml"].identity.user_assigned_identities[0].client_id.startswith(config.PLACEHOLDER_PREFIX)
