"""The Azure workflow against a recording fake of the control plane: order, idempotency, failures."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from azure.ai.ml.exceptions import JobException
from azure.core.exceptions import HttpResponseError

import config
import deploy_model
import setup_ml
from fake_mlclient import FILLED_IN, FakeMLClient, RefusingCredential, azure_settings
from finetune_phi import common
from finetune_phi.azure import client, entities, workflow

JOB = "fake-job-1"


def _existing_compute(settings, min_instances: int = 0):
    compute = entities.compute(settings)
    compute.min_instances = min_instances
    return {compute.name: compute}


# --- training ----------------------------------------------------------------------------------------


def test_submit_creates_the_cluster_only_when_it_is_missing(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    fresh = FakeMLClient()
    assert workflow.submit_training(s, "command", stream=False, ml_client=fresh) == JOB
    assert fresh.names()[:3] == ["compute.get", "compute.begin_create_or_update", "poller.result"]
    assert fresh.find("compute.begin_create_or_update")[0].entity.size == s.AZURE_COMPUTE_SIZE

    existing = FakeMLClient(computes=_existing_compute(s))
    workflow.submit_training(s, "command", stream=False, ml_client=existing)
    assert "compute.begin_create_or_update" not in existing.names()
    assert existing.names() == ["compute.get", "environments.create_or_update", "jobs.create_or_update"]
    (env_call,) = existing.find("environments.create_or_update")
    assert env_call.entity.version == entities.environment_version(s)
    (job_call,) = existing.find("jobs.create_or_update")
    assert job_call.entity.command == entities.training_job(s).command
    assert job_call.entity.environment == entities.environment_ref(s)


def test_submit_records_the_job_before_streaming_and_checks_its_end(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    fake = FakeMLClient(computes=_existing_compute(s))
    fake.errors["jobs.stream"] = JobException(
        message="Exception : job failed: CUDA out of memory", no_personal_data_message="job failed"
    )
    with pytest.raises(RuntimeError, match=f"job {JOB} failed.*CUDA out of memory"):
        workflow.submit_training(s, "command", stream=True, ml_client=fake)
    recorded = common.read_state(s)["training"]
    assert recorded["job_name"] == JOB and recorded["backend"] == "azure" and recorded["mode"] == "command"
    assert recorded["studio_url"] == f"https://ml.azure.com/runs/{JOB}"

    ok = FakeMLClient(computes=_existing_compute(s))
    workflow.submit_training(s, "command", stream=True, ml_client=ok)
    assert ok.names()[-2:] == ["jobs.stream", "jobs.get"]
    canceled = FakeMLClient(computes=_existing_compute(s), job_status="Canceled")
    with pytest.raises(RuntimeError, match="status Canceled"):
        workflow.submit_training(s, "command", stream=True, ml_client=canceled)


def test_catalog_mode_submits_a_finetuning_job_and_deploys_its_output(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    fake = FakeMLClient(computes=_existing_compute(s))
    workflow.submit_training(s, "catalog", stream=False, ml_client=fake)
    assert "environments.create_or_update" not in fake.names()
    (job_call,) = fake.find("jobs.create_or_update")
    assert job_call.entity.type == "finetuning"
    assert job_call.entity.hyperparameters == entities.catalog_hyperparameters(s)
    assert common.read_state(s)["training"]["mode"] == "catalog"
    workflow.deploy(s, ml_client=fake)
    (model_call,) = fake.find("models.create_or_update")
    assert model_call.entity.path == f"azureml://jobs/{JOB}/outputs/registered_model"


def test_submit_without_data_names_the_step_to_run(tmp_path: Path) -> None:
    s = azure_settings(tmp_path, data=False)
    fake = FakeMLClient()
    with pytest.raises(FileNotFoundError, match="download_dataset.py"):
        workflow.submit_training(s, "command", stream=False, ml_client=fake)
    assert fake.calls == []


def test_compute_quota_error_becomes_a_message_naming_size_and_fix(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    fake = FakeMLClient()
    fake.errors["compute.begin_create_or_update"] = HttpResponseError(
        message="(QuotaExceeded) Operation could not be completed as it results in exceeding approved "
        "standardNCADSA100v4Family Cores quota."
    )
    with pytest.raises(RuntimeError) as caught:
        workflow.submit_training(s, "command", stream=False, ml_client=fake)
    message = str(caught.value)
    assert "not enough quota" in message and "Standard_NC24ads_A100_v4" in message and "--check" in message
    assert "jobs.create_or_update" not in fake.names()


# --- deployment --------------------------------------------------------------------------------------


def _trained(tmp_path: Path, **overrides):
    s = azure_settings(tmp_path, **overrides)
    common.update_state(s, "training", {"backend": "azure", "job_name": "job-77", "mode": "command",
                                        "output": "model_output"})  # fmt: skip
    return s


def test_deploy_registers_creates_routes_traffic_after_success_and_records_state(tmp_path: Path) -> None:
    s = _trained(tmp_path)
    fake = FakeMLClient()
    info = workflow.deploy(s, ml_client=fake)

    names = fake.names()
    assert not [n for n in names if "delete" in n]
    (model_call,) = fake.find("models.create_or_update")
    assert model_call.entity.path == "azureml://jobs/job-77/outputs/model_output"
    assert model_call.entity.type == "mlflow_model" and model_call.entity.name == s.AZURE_MODEL_NAME
    created, routed = fake.find("online_endpoints.begin_create_or_update")
    assert created.entity.auth_mode == "key" and created.entity.identity.type == "user_assigned"
    assert not created.entity.traffic
    assert routed.entity.traffic == {s.AZURE_DEPLOYMENT_NAME: 100}
    (dep_call,) = fake.find("online_deployments.begin_create_or_update")
    assert dep_call.entity.model == f"azureml:{s.AZURE_MODEL_NAME}:1"
    # Traffic moves only after the deployment finished and reported Succeeded.
    dep_done = names.index("online_deployments.get")
    assert names.index("online_deployments.begin_create_or_update") < dep_done
    assert fake.calls.index(routed) > dep_done
    assert names.index("online_endpoints.get_keys") > fake.calls.index(routed)

    assert info.scoring_uri == f"https://{s.AZURE_ENDPOINT_NAME}.eastus2.inference.ml.azure.com/score"
    assert info.key == fake.primary_key and fake.primary_key not in repr(info)
    state_text = common.state_path(s).read_text()
    assert fake.primary_key not in state_text
    recorded = json.loads(state_text)["deployment"]
    assert recorded["scoring_uri"] == info.scoring_uri and recorded["job_name"] == "job-77"


def test_deploy_updates_an_existing_endpoint_in_place_and_never_deletes(tmp_path: Path) -> None:
    s = _trained(tmp_path)
    old = entities.endpoint(s)
    old.traffic = {"blue": 100}
    old._provisioning_state = "Succeeded"
    fake = FakeMLClient(endpoints={s.AZURE_ENDPOINT_NAME: old})
    workflow.deploy(s, job_name="job-88", ml_client=fake)
    assert not [n for n in fake.names() if "delete" in n]
    update, routed = fake.find("online_endpoints.begin_create_or_update")
    assert update.entity.traffic == {"blue": 100}  # still serving the old deployment meanwhile
    assert routed.entity.traffic == {s.AZURE_DEPLOYMENT_NAME: 100}
    assert fake.find("models.create_or_update")[0].entity.path == "azureml://jobs/job-88/outputs/model_output"


def test_failed_provisioning_raises_and_leaves_traffic_alone(tmp_path: Path) -> None:
    s = _trained(tmp_path)
    fake = FakeMLClient(deployment_state="Failed")
    with pytest.raises(RuntimeError, match="ended in state Failed.*az ml online-deployment get-logs"):
        workflow.deploy(s, ml_client=fake)
    assert len(fake.find("online_endpoints.begin_create_or_update")) == 1  # created, never routed
    assert "online_endpoints.get_keys" not in fake.names()
    assert "deployment" not in common.read_state(s)


def test_deployment_quota_error_says_what_to_request(tmp_path: Path) -> None:
    s = _trained(tmp_path, AZURE_DEPLOYMENT_INSTANCE_TYPE="Standard_NC6s_v3")
    fake = FakeMLClient()
    fake.errors["online_deployments.begin_create_or_update"] = HttpResponseError(
        message="Not enough quota available for Standard_NC6s_v3 in SubscriptionId ... Current usage/limit: 0/0."
    )
    with pytest.raises(RuntimeError) as caught:
        workflow.deploy(s, ml_client=fake)
    assert "not enough quota" in str(caught.value)
    assert "Standard_NC6s_v3" in str(caught.value) and "AZURE_DEPLOYMENT_INSTANCE_TYPE" in str(caught.value)


def test_deploy_without_a_recorded_job_says_what_to_run(tmp_path: Path) -> None:
    s = azure_settings(tmp_path)
    fake = FakeMLClient()
    with pytest.raises(RuntimeError, match=r"setup_ml.py --backend azure.*--job-name"):
        workflow.deploy(s, ml_client=fake)
    assert fake.calls == []


def _azure_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name, value in FILLED_IN.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    settings = azure_settings(tmp_path)  # same values, to seed the state file main() will read
    monkeypatch.setenv("TRAIN_DATA_PATH", str(settings.train_data_path))
    monkeypatch.setenv("TEST_DATA_PATH", str(settings.test_data_path))
    common.update_state(settings, "training", {"backend": "azure", "job_name": "job-77", "mode": "command"})
    return settings


def test_deploy_model_main_exits_nonzero_on_failed_provisioning_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    _azure_env(monkeypatch, tmp_path)
    dotenv = config.ROOT / ".env"
    dotenv_before = dotenv.read_bytes() if dotenv.exists() else None
    fake = FakeMLClient(deployment_state="Failed")
    monkeypatch.setattr(client, "connect", lambda settings, **kw: fake)
    caplog.set_level(logging.INFO)
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "ended in state Failed" in errors[0].getMessage()
    assert errors[0].exc_info is None
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert (dotenv.read_bytes() if dotenv.exists() else None) == dotenv_before  # nothing published


def test_refused_credential_fails_fast_and_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = azure_settings(tmp_path)
    refusing = RefusingCredential()
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="az login"):
        workflow.submit_training(s, "command", stream=False, credential=refusing)
    assert refusing.calls == 1 and time.perf_counter() - start < 2

    _azure_env(monkeypatch, tmp_path)
    monkeypatch.setattr(client, "make_credential", lambda settings: RefusingCredential())
    caplog.set_level(logging.INFO)
    start = time.perf_counter()
    assert setup_ml.main(["--backend", "azure", "--no-stream"]) == 1
    assert deploy_model.main(["--backend", "azure", "--teardown"]) == 1
    assert time.perf_counter() - start < 5
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("refused the credential" in e and "az login" in e for e in errors)


def test_teardown_deletes_the_endpoint_and_scales_the_cluster_to_zero(tmp_path: Path) -> None:
    s = _trained(tmp_path)
    fake = FakeMLClient(computes=_existing_compute(s, min_instances=1))
    workflow.deploy(s, ml_client=fake)
    lines = workflow.teardown(s, ml_client=fake)
    assert fake.find("online_endpoints.begin_delete")[0].args == (s.AZURE_ENDPOINT_NAME,)
    assert fake.computes[s.AZURE_COMPUTE_NAME].min_instances == 0
    assert any("deleted" in line and s.AZURE_ENDPOINT_NAME in line for line in lines)
    assert any("min instances set to 0" in line for line in lines)
    assert common.read_state(s)["deployment"] == {}

    again = workflow.teardown(s, ml_client=fake)
    assert any("not found, nothing to delete" in line for line in again)
    assert any("already scales to 0" in line for line in again)
    assert len(fake.find("online_endpoints.begin_delete")) == 1
