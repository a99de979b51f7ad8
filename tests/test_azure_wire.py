"""The Azure backend end to end through the real azure-ai-ml MLClient, over HTTPS, against a local stand-in.

`setup_ml.main` and `deploy_model.main` run as a user runs them; only the credential (a local fake)
and AZURE_CLOUD (a cloud whose Resource Manager is tests/azure_standin.py on 127.0.0.1) differ. The
assertions are on what the SDK actually sent. See azure_standin.py for what the stand-in serves.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import config
import deploy_model
import setup_ml
from azure_standin import BLOB_HOST, CONTAINER_CRASH, FORBIDDEN_ERROR, OUT_OF_QUOTA, PRIMARY_KEY, QUOTA_ERROR
from azure_standin import SERVERLESS_KEY
from azure_standin import AzureStandin, FakeCredential, azure_error
from fake_mlclient import FILLED_IN, IDENTITY_CLIENT_ID, IDENTITY_RESOURCE_ID, RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE
from fake_mlclient import azure_settings
from finetune_phi import common, training
from finetune_phi.azure import client, entities, preflight, workflow

JOB_NAME = "olden_forest_fb9r634swf"
TRAINING_FILES = sorted(p.name for p in training.FINETUNING_DIR.glob("*.py"))  # the code the job needs


@pytest.fixture
def azure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A started stand-in, the process environment pointing the scripts at it, and helpers."""
    from azure.ai.ml.operations._run_history_constants import RunHistoryConstants

    standin = AzureStandin(tmp_path, SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE).start()
    for name, value in standin.env().items():
        monkeypatch.setenv(name, value)
    # MLClient writes the current cloud into os.environ; setting it first makes monkeypatch restore it.
    monkeypatch.setenv("AZUREML_CURRENT_CLOUD", "AzureCloud")
    cloud = standin.register_cloud()
    settings = azure_settings(tmp_path, AZURE_CLOUD=cloud)  # also writes the data files
    env = {
        **FILLED_IN,
        "AZURE_CLOUD": cloud,
        "STATE_DIR": settings.STATE_DIR,
        "TRAIN_DATA_PATH": settings.TRAIN_DATA_PATH,
        "TEST_DATA_PATH": settings.TEST_DATA_PATH,
        "ENV_FILE": str(tmp_path / "flows.env"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    credential = FakeCredential()
    monkeypatch.setattr(client, "make_credential", lambda s: credential)
    # jobs.stream sleeps at least this long between run-history polls (2 s by default); a catalog job's
    # status is polled every JOB_POLL_S
    monkeypatch.setattr(RunHistoryConstants, "_WAIT_COMPLETION_POLLING_INTERVAL_MIN", 0)
    monkeypatch.setattr(workflow, "JOB_POLL_S", 0.01)
    caplog.set_level(logging.INFO)
    # What the scripts' main() will load from this environment (the test suite's own overrides included).
    settings = config.load(BACKEND="azure")
    yield SimpleNamespace(standin=standin, settings=settings, credential=credential, env_file=tmp_path / "flows.env")
    standin.stop()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the scripts logged as errors (the SDK's telemetry logs an ERROR for every expected 404)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and not r.name.startswith("azure")]


def _record_job(settings: config.Settings, mode: str = "command") -> None:
    output = entities.COMMAND_OUTPUT if mode == "command" else entities.CATALOG_OUTPUT
    common.update_state(settings, "training", {"backend": "azure", "job_name": JOB_NAME, "mode": mode, "output": output})


def _seed_cluster(standin: AzureStandin, s: config.Settings) -> str:
    """A cluster that keeps one node (min 1) in the workspace, as a user may have made it; its ARM id."""
    compute_id = f"{standin.ws_id}/computes/{s.AZURE_COMPUTE_NAME}"
    cluster = {"id": compute_id, "name": s.AZURE_COMPUTE_NAME, "location": "eastus2", "properties": {
        "computeType": "AmlCompute", "properties": {"vmSize": s.AZURE_COMPUTE_SIZE.upper(), "scaleSettings": {
            "maxNodeCount": 1, "minNodeCount": 1, "nodeIdleTimeBeforeScaleDown": "PT2M"}}}}  # fmt: skip
    standin._fill_computes(cluster, None, compute_id)
    cluster["properties"]["provisioningState"] = "Succeeded"
    standin.put_resource(compute_id, cluster)
    return compute_id


def _code_copy(tmp_path: Path) -> Path:
    """finetuning_dir's code and .amlignore, plus what local runs leave beside them."""
    code = tmp_path / "finetuning_dir"
    code.mkdir()
    for name in TRAINING_FILES + [".amlignore"]:
        shutil.copy2(training.FINETUNING_DIR / name, code / name)
    (code / "mlruns" / "0" / "run" / "artifacts").mkdir(parents=True)
    (code / "mlruns" / "0" / "run" / "artifacts" / "model.safetensors").write_bytes(b"\0" * 1024)
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "fine_tune.cpython-311.pyc").write_bytes(b"\0")
    (code / "outputs").mkdir()
    (code / "outputs" / "adapter.bin").write_bytes(b"\0")
    return code


# --- training -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_job_sends_the_cluster_environment_code_data_and_job_then_streams_it(
    azure, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s, standin = azure.settings, azure.standin
    monkeypatch.setattr(entities, "FINETUNING_DIR", _code_copy(tmp_path))
    assert setup_ml.main(["--backend", "azure"]) == 0

    (compute_put,) = standin.sent("PUT", "/computes/")
    cluster = compute_put.json["properties"]["properties"]
    assert cluster["vmSize"] == s.AZURE_COMPUTE_SIZE and cluster["vmPriority"] == "Dedicated"
    assert cluster["scaleSettings"] == {"maxNodeCount": 1, "minNodeCount": 0, "nodeIdleTimeBeforeScaleDown": "PT2M"}

    (env_put,) = standin.sent("PUT", "/environments/")
    assert env_put.path.endswith(f"/environments/{s.AZURE_ENVIRONMENT_NAME}/versions/{entities.environment_version(s)}")
    assert env_put.json["properties"]["image"] == entities.GPU_BASE_IMAGE
    assert yaml.safe_load(env_put.json["properties"]["condaFile"]) == yaml.safe_load(entities.CONDA_FILE.read_text())

    # The code snapshot: the training code only, not what local runs leave in the folder (.amlignore).
    (upload,) = standin.sent("POST", "/startPendingUpload$")
    uploaded = {Path(k).name for k in standin.uploaded_files() if "/finetuning_dir/" in k}
    assert uploaded == set(TRAINING_FILES)
    assert not [k for k in standin.uploaded_files() if "mlruns" in k or "__pycache__" in k or "outputs" in k]

    # The data files go to the workspace's blob store, a host name reached through the proxy.
    assert f"{BLOB_HOST}:443" in standin.proxied_hosts
    data = {Path(k).name: v for k, v in standin.blobs.items() if k.endswith(".jsonl")}
    assert data == {"train.jsonl": s.train_data_path.read_bytes(), "test.jsonl": s.test_data_path.read_bytes()}

    (job_put,) = standin.sent("PUT", "/jobs/")
    job = job_put.json["properties"]
    assert job["jobType"] == "Command"
    assert job["command"] == training.fine_tune_command(
        s, train_file="${{inputs.train_file}}", eval_file="${{inputs.eval_file}}",
        model_output_dir="${{outputs.model_output}}", model=s.BASE_MODEL,
    )  # fmt: skip
    assert {k: v["jobInputType"] for k, v in job["inputs"].items()} == {"train_file": "uri_file", "eval_file": "uri_file"}
    assert job["inputs"]["train_file"]["uri"].endswith("/train.jsonl")
    assert job["inputs"]["train_file"]["uri"].startswith("azureml://datastores/workspaceblobstore/paths/LocalUpload/")
    assert job["outputs"]["model_output"]["jobOutputType"] == "mlflow_model"
    assert job["environmentId"].endswith(f"/environments/{s.AZURE_ENVIRONMENT_NAME}/versions/"
                                         f"{entities.environment_version(s)}")  # fmt: skip
    assert job["computeId"].endswith(f"/computes/{s.AZURE_COMPUTE_NAME}")
    assert job["codeId"].startswith(standin.ws_id + "/codes/")
    assert job["experimentName"] == s.AZURE_EXPERIMENT_NAME and job["displayName"] == s.AZURE_JOB_DISPLAY_NAME
    assert job["environmentVariables"] == entities.training_env_vars()
    assert standin.requests.index(upload) < standin.requests.index(job_put)

    # azure-core's per-request INFO logging (headers and all) is off unless --verbose.
    assert not [r for r in caplog.records if r.name == "azure.core.pipeline.policies.http_logging_policy"]

    # Streamed until the run ended, and recorded for deploy_model.py.
    assert len(standin.sent("GET", f"/runs/{job_put.path.rsplit('/', 1)[-1]}/details$")) == 2
    recorded = common.read_state(s)["training"]
    assert recorded["job_name"] == job_put.path.rsplit("/", 1)[-1] and recorded["mode"] == "command"
    assert recorded["studio_url"].startswith("https://ml.azure.com/runs/")


@pytest.mark.slow
def test_a_second_submission_reuses_cluster_environment_and_code(azure) -> None:
    standin = azure.standin
    assert setup_ml.main(["--backend", "azure", "--no-stream"]) == 0
    first = len(standin.requests)
    assert setup_ml.main(["--backend", "azure", "--no-stream"]) == 0
    again = standin.requests[first:]
    assert not [r for r in again if r.method == "PUT" and "/computes/" in r.path]
    assert not [r for r in again if r.method == "POST" and r.path.endswith("/startPendingUpload")]
    assert len([r for r in again if r.method == "PUT" and "/jobs/" in r.path]) == 1
    # The real finetuning_dir's snapshot: whatever local runs left there stays out (.amlignore).
    uploaded = {Path(k).name for k in standin.uploaded_files() if "/finetuning_dir/" in k}
    assert uploaded == set(TRAINING_FILES)


@pytest.mark.slow
def test_catalog_job_is_a_finetuning_job_followed_to_its_end_and_deploys_as_azure_catalog(
    azure, caplog: pytest.LogCaptureFixture
) -> None:
    s, standin = azure.settings, azure.standin
    # Followed by polling its status: jobs.stream crashes on a fine-tuning job ("services": null).
    assert setup_ml.main(["--backend", "azure", "--mode", "catalog"]) == 0, _errors(caplog)
    assert any(r.getMessage().endswith(": Running") for r in caplog.records)
    assert any(r.getMessage().endswith(" completed") for r in caplog.records)
    assert not standin.sent("GET", "/runs/")
    assert not standin.sent("PUT", "/environments/") and not standin.sent("POST", "/startPendingUpload$")
    (job_put,) = standin.sent("PUT", "/jobs/")
    job = job_put.json["properties"]
    assert job["jobType"] == "FineTuning"
    details = job["fineTuningDetails"]
    # The version the lifecycle check read, of the model Azure still fine-tunes.
    assert details["model"]["uri"] == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1"
    assert details["taskType"] == "chatCompletion"
    assert details["hyperParameters"] == entities.catalog_hyperparameters(s)
    assert details["trainingData"]["uri"].endswith("/train.jsonl")
    assert job["computeId"] == s.AZURE_COMPUTE_NAME  # the short name, as Azure's own recording sends it
    job_name = job_put.path.rsplit("/", 1)[-1]
    assert f"/runs/{job_name}?wsid=/subscriptions/{SUBSCRIPTION}/" in common.read_state(s)["training"]["studio_url"]

    # With the Prompt flow connection this time (its store lives under the test's STATE_DIR).
    assert deploy_model.main(["--backend", "azure"]) == 0, _errors(caplog)
    (model_put,) = standin.sent("PUT", "/models/")
    assert model_put.json["properties"]["modelUri"] == f"azureml://jobs/{job_name}/outputs/registered_model"
    assert common.read_state(s)["deployment"]["kind"] == "azure-catalog"
    assert config.read_dotenv(azure.env_file)["AZURE_ML_ENDPOINT_KIND"] == "azure-catalog"
    from finetune_phi import pf_connection

    stored = pf_connection.read_connection(s, with_secret=True)
    assert stored["configs"]["kind"] == "azure-catalog" and stored["secrets"]["key"] == PRIMARY_KEY
    assert stored["configs"]["endpoint"] == config.read_dotenv(azure.env_file)["AZURE_ML_ENDPOINT"]


def test_quota_refusal_of_the_cluster_exits_1_naming_size_and_fix(azure, caplog: pytest.LogCaptureFixture) -> None:
    azure.standin.fail("PUT", "/computes/", 400, QUOTA_ERROR)
    assert setup_ml.main(["--backend", "azure", "--no-stream"]) == 1
    (error,) = _errors(caplog)
    assert "not enough quota" in error and "Standard_NC24ads_A100_v4" in error and "AZURE_COMPUTE_SIZE" in error
    assert "--check" in error
    assert not azure.standin.sent("PUT", "/jobs/")


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["Failed", "Canceled"])
def test_a_job_that_does_not_complete_exits_1_with_why_and_the_studio_link(
    azure, caplog: pytest.LogCaptureFixture, outcome: str
) -> None:
    azure.standin.job_outcome = outcome
    assert setup_ml.main(["--backend", "azure"]) == 1
    (error,) = _errors(caplog)
    assert "https://ml.azure.com/runs/" in error
    if outcome == "Failed":  # jobs.stream raises with the run's error
        assert "failed" in error and "CUDA out of memory" in error
    else:  # jobs.stream returns; the final status is checked
        assert "ended with status Canceled, not Completed" in error
    assert common.read_state(azure.settings)["training"]["job_name"]  # recorded all the same


# --- deployment ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deploy_sends_identity_probes_and_request_settings_and_routes_traffic_only_after_success(azure) -> None:
    s, standin = azure.settings, azure.standin
    _record_job(s)
    standin.in_progress_polls = 1  # every operation is seen InProgress once before it ends
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 0

    (model_put,) = standin.sent("PUT", "/models/")
    assert model_put.path.endswith(f"/models/{s.AZURE_MODEL_NAME}/versions/1")
    assert model_put.json["properties"]["modelType"] == "mlflow_model"
    assert model_put.json["properties"]["modelUri"] == f"azureml://jobs/{JOB_NAME}/outputs/model_output"

    create, route = standin.sent("PUT", "/onlineEndpoints/[^/]+$")
    assert create.json["properties"]["authMode"] == "Key" and create.json["properties"]["traffic"] == {}
    identity = create.json["identity"]
    assert identity["type"] == "UserAssigned" and list(identity["userAssignedIdentities"]) == [IDENTITY_RESOURCE_ID]

    (dep_put,) = standin.sent("PUT", "/deployments/")
    dep = dep_put.json["properties"]
    assert dep["model"] == model_put.path and dep["instanceType"] == "Standard_E8s_v3"
    assert dep_put.json["sku"]["capacity"] == 1
    for probe in (dep["livenessProbe"], dep["readinessProbe"]):
        assert probe["initialDelay"] == "PT10M" and probe["failureThreshold"] == 30
    # No maxQueueWait: deprecated for managed online endpoints.
    assert dep["requestSettings"] == {"requestTimeout": "PT3M", "maxConcurrentRequestsPerInstance": 1}
    assert dep["environmentVariables"]["AZURE_CLIENT_ID"] == IDENTITY_CLIENT_ID

    # Traffic moves only once the deployment's operation reported Succeeded; keys come after.
    dep_op = next(op for op in standin.operations.values() if op["arm_id"].endswith(f"/deployments/{s.AZURE_DEPLOYMENT_NAME}"))
    assert dep_op["polls"] >= 2 and dep_op["finished_at"] is not None
    assert standin.requests.index(dep_put) < dep_op["finished_at"] < standin.requests.index(route)
    assert route.json["properties"]["traffic"] == {s.AZURE_DEPLOYMENT_NAME: 100}
    (keys,) = standin.sent("POST", "/listKeys$")
    assert standin.requests.index(keys) > standin.requests.index(route)
    assert not standin.sent("DELETE")

    dotenv = config.read_dotenv(azure.env_file)
    assert dotenv["AZURE_ML_ENDPOINT"] == f"https://{s.AZURE_ENDPOINT_NAME}.eastus2.inference.ml.azure.com/score"
    assert dotenv["AZURE_ML_API_KEY"] == PRIMARY_KEY and dotenv["AZURE_ML_ENDPOINT_KIND"] == "azure-mlflow"
    state_text = common.state_path(s).read_text()
    assert PRIMARY_KEY not in state_text
    assert json.loads(state_text)["deployment"]["kind"] == "azure-mlflow"


@pytest.mark.slow
def test_redeploy_updates_the_endpoint_in_place_keeping_traffic_until_the_new_deployment_succeeded(azure) -> None:
    s, standin = azure.settings, azure.standin
    _record_job(s)
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 0
    first = len(standin.requests)
    assert deploy_model.main(["--backend", "azure", "--no-connection", "--job-name", "second_job"]) == 0
    again = standin.requests[first:]
    update, route = [r for r in again if r.method == "PUT" and r.path.endswith(f"/onlineEndpoints/{s.AZURE_ENDPOINT_NAME}")]
    assert update.json["properties"]["traffic"] == {s.AZURE_DEPLOYMENT_NAME: 100}  # today's routing, untouched
    assert [r.json["properties"]["modelUri"] for r in again if r.method == "PUT" and "/models/" in r.path] == [
        "azureml://jobs/second_job/outputs/model_output"
    ]
    assert not standin.sent("DELETE")


@pytest.mark.slow
@pytest.mark.parametrize("why", ["crash", "quota"])
def test_a_deployment_that_ends_failed_exits_1_with_the_fix_and_leaves_traffic(
    azure, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, why: str
) -> None:
    s, standin = azure.settings, azure.standin
    _record_job(s)
    standin.deployment_outcome = "Failed"  # the operation ends Failed: the SDK's poller raises
    standin.operation_error = {"crash": CONTAINER_CRASH, "quota": OUT_OF_QUOTA}[why]
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 1
    (error,) = _errors(caplog)
    assert not [r for r in caplog.records if r.exc_info and not r.name.startswith("azure")]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert f"deployment {s.AZURE_DEPLOYMENT_NAME}" in error
    if why == "crash":
        assert "Liveness probe failed" in error and "traffic was left as it was" in error
        assert f"az ml online-deployment get-logs --endpoint-name {s.AZURE_ENDPOINT_NAME}" in error
    else:
        assert "not enough quota" in error and "AZURE_DEPLOYMENT_INSTANCE_TYPE" in error
    assert len(standin.sent("PUT", "/onlineEndpoints/[^/]+$")) == 1  # created, never routed
    assert not standin.sent("POST", "/listKeys$") and not standin.sent("DELETE")
    assert not azure.env_file.exists() and "deployment" not in common.read_state(s)


def test_an_endpoint_that_ends_failed_exits_1_before_any_deployment(azure, caplog: pytest.LogCaptureFixture) -> None:
    s, standin = azure.settings, azure.standin
    _record_job(s)
    standin.endpoint_outcome = "Failed"
    standin.operation_error = {"code": "BadArgument", "message": "User-assigned identity is not in this tenant."}
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 1
    (error,) = _errors(caplog)
    assert error.startswith(f"endpoint {s.AZURE_ENDPOINT_NAME} failed: (BadArgument) User-assigned identity")
    assert f"az ml online-endpoint show -n {s.AZURE_ENDPOINT_NAME}" in error
    assert not standin.sent("PUT", "/deployments/") and not standin.sent("DELETE")


def test_permission_denied_on_the_endpoint_exits_1_naming_the_role(azure, caplog: pytest.LogCaptureFixture) -> None:
    _record_job(azure.settings)
    azure.standin.fail("PUT", "/onlineEndpoints/[^/]+$", 403, FORBIDDEN_ERROR)
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 1
    (error,) = _errors(caplog)
    assert "permission denied" in error and "AuthorizationFailed" not in error.split("(")[0]
    assert "Contributor" in error and "--check" in error
    assert not azure.standin.sent("PUT", "/deployments/")


def test_a_workspace_that_does_not_exist_exits_1_naming_the_values_to_check(
    azure, caplog: pytest.LogCaptureFixture
) -> None:
    _record_job(azure.settings)
    azure.standin.fail("*", f"^{azure.standin.ws_id}(/|$)", 404, azure_error(
        "ResourceNotFound", f"The Resource 'Microsoft.MachineLearningServices/workspaces/{WORKSPACE}' under resource "
        f"group '{RESOURCE_GROUP}' was not found."), times=99)  # fmt: skip
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 1
    (error,) = _errors(caplog)
    assert error.startswith(f"registering model {azure.settings.AZURE_MODEL_NAME} from job {JOB_NAME}: Azure says")
    assert "does not exist" in error and f"workspaces/{WORKSPACE}' under resource group" in error
    assert "AZURE_ML_WORKSPACE_NAME" in error and "--check" in error
    assert len(azure.standin.sent("PUT")) == 1  # the model registration, refused; nothing after it


def test_deployment_quota_refusal_names_the_instance_type(azure, caplog: pytest.LogCaptureFixture) -> None:
    _record_job(azure.settings)
    azure.standin.fail("PUT", "/deployments/", 400, QUOTA_ERROR)
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 1
    (error,) = _errors(caplog)
    assert "not enough quota" in error and "AZURE_DEPLOYMENT_INSTANCE_TYPE" in error and "Standard_E8s_v3" in error


def test_a_vm_too_small_for_the_model_is_refused_before_anything_is_sent(
    azure, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _record_job(azure.settings)
    monkeypatch.setenv("AZURE_DEPLOYMENT_INSTANCE_TYPE", "Standard_E4s_v3")  # the tutorial's size, 32 GiB
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 1
    (error,) = _errors(caplog)
    assert "AZURE_DEPLOYMENT_INSTANCE_TYPE=Standard_E4s_v3 has 32 GiB" in error
    assert "set AZURE_DEPLOYMENT_INSTANCE_TYPE=Standard_E8s_v3" in error
    assert azure.standin.requests == []


# --- preflight and teardown ---------------------------------------------------------------------------


def _grant_roles(standin: AzureStandin) -> None:
    group = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    workspace = standin.get_resource(standin.ws_id)["properties"]
    for role, scope in ((preflight.CONTRIBUTOR, group), (preflight.STORAGE_BLOB_DATA_READER, workspace["storageAccount"]),
                        (preflight.ACR_PULL, workspace["containerRegistry"])):  # fmt: skip
        # the REST RoleAssignment of Microsoft.Authorization 2022-04-01 (not checked against a recording)
        standin.role_assignments.append({"properties": {
            "roleDefinitionId": f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Authorization/roleDefinitions/{role}",
            "principalId": "pppppppp-0000-0000-0000-000000000000", "principalType": "ServicePrincipal", "scope": scope,
        }})  # fmt: skip
    standin.identity["properties"]["clientId"] = IDENTITY_CLIENT_ID


def test_check_reads_workspace_identity_roles_and_quota_from_the_cloud_and_writes_nothing(
    azure, caplog: pytest.LogCaptureFixture
) -> None:
    standin = azure.standin
    _grant_roles(standin)
    assert deploy_model.main(["--backend", "azure", "--check"]) == 0, _errors(caplog)
    assert any("preflight: OK" in r.getMessage() for r in caplog.records)
    assert {r.method for r in standin.requests} == {"GET"}
    assert standin.sent("GET", f"^{IDENTITY_RESOURCE_ID}$") and standin.sent("GET", "/roleAssignments$")
    assert standin.sent("GET", "/vmSizes$") and standin.sent("GET", "/usages$")
    assert all(scope == (standin.base_url + "/.default",) for scope in azure.credential.scopes)

    standin.role_assignments.clear()
    standin.usages["standardESv3Family"] = (90, 100)
    assert deploy_model.main(["--backend", "azure", "--check"]) == 1
    errors = _errors(caplog)
    assert any("lacks AcrPull" in e for e in errors) and any("standardESv3Family needs 16 vCPUs" in e for e in errors)


def test_check_names_the_fix_for_a_missing_workspace_and_a_vm_too_small(
    azure, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    azure.standin.fail("GET", f"^{azure.standin.ws_id}$", 404,
                       azure_error("ResourceNotFound", f"Workspace {WORKSPACE} not found"))  # fmt: skip
    monkeypatch.setenv("AZURE_DEPLOYMENT_INSTANCE_TYPE", "Standard_DS3_v2")
    assert setup_ml.main(["--backend", "azure", "--check"]) == 1
    errors = "\n".join(_errors(caplog))
    assert f"{WORKSPACE!r} not found" in errors and "AZURE_RESOURCE_GROUP_NAME" in errors
    assert "AZURE_DEPLOYMENT_INSTANCE_TYPE=Standard_DS3_v2 has 14 GiB" in errors


@pytest.mark.slow
def test_teardown_deletes_the_endpoint_and_scales_the_cluster_to_zero(azure, caplog: pytest.LogCaptureFixture) -> None:
    s, standin = azure.settings, azure.standin
    _record_job(s)
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 0
    compute_id = _seed_cluster(standin, s)
    first = len(standin.requests)

    assert deploy_model.main(["--backend", "azure", "--teardown"]) == 0
    (delete,) = standin.sent("DELETE")
    assert delete.path == f"{standin.ws_id}/onlineEndpoints/{s.AZURE_ENDPOINT_NAME}"
    (scale,) = [r for r in standin.requests[first:] if r.method == "PUT"]
    assert scale.path == compute_id
    assert scale.json["properties"]["properties"]["scaleSettings"]["minNodeCount"] == 0
    assert standin.get_resource(f"{standin.ws_id}/onlineEndpoints/{s.AZURE_ENDPOINT_NAME}") is None
    assert common.read_state(s)["deployment"] == {}

    caplog.clear()
    assert deploy_model.main(["--backend", "azure", "--teardown"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("not found, nothing to delete" in m for m in lines) and any("already scales to 0" in m for m in lines)
    assert len(standin.sent("DELETE")) == 1


def test_an_sdk_exception_becomes_a_message_not_a_traceback() -> None:
    from azure.ai.ml.exceptions import DeploymentException, ModelException

    for exc in (DeploymentException(message="\x1b[31mModel path is invalid\x1b[39m", no_personal_data_message="x"),
                ModelException(message="Model type unsupported", no_personal_data_message="x")):  # fmt: skip
        with pytest.raises(RuntimeError, match=r"^registering failed: (Model path is invalid|Model type unsupported)$"):
            with client.azure_errors("registering"):
                raise exc


# --- the Studio path as Azure offers it today: fine-tuning as a service, a serverless endpoint ---------------


@pytest.fixture
def chat_route(azure):
    """The serverless endpoint's chat route (tests/catalog_standin.py), where Azure says the endpoint answers."""
    from catalog_standin import ServerlessStandIn

    route = ServerlessStandIn(SERVERLESS_KEY).start()
    azure.standin.serverless_uri = route.url.removesuffix("/score")
    yield route
    route.stop()


def _billable(standin: AzureStandin, since: int = 0) -> list:
    """Requests that create, change or delete something (anything but reads and key/secret listings)."""
    return [r for r in standin.requests[since:] if r.method in ("PUT", "DELETE", "PATCH")
            or (r.method == "POST" and not r.path.endswith(("/listKeys", "/listSecrets")))]  # fmt: skip


@pytest.mark.slow
def test_serverless_fine_tunes_phi4_mini_as_a_service_and_deploys_a_serverless_endpoint_the_flows_answer(
    azure, chat_route, caplog: pytest.LogCaptureFixture
) -> None:
    from chat_flow import endpoint_client as ec

    s, standin = azure.settings, azure.standin
    assert setup_ml.main(["--backend", "azure", "--mode", "serverless", "--check"]) == 0, _errors(caplog)
    assert standin.sent("GET", "/models/Phi-4-mini-instruct/versions") and _billable(standin) == []
    standin.requests.clear()
    assert setup_ml.main(["--backend", "azure", "--mode", "serverless"]) == 0, _errors(caplog)
    # The catalog entry was read first: its lifecycle and regions before anything was created.
    discovery = standin.sent("GET", "/registrymanagement/v1.0/registries/azureml/discovery")
    assert discovery and standin.requests.index(discovery[0]) < standin.requests.index(_billable(standin)[0])
    assert not standin.sent(None, "/computes")  # no cluster: Azure's compute, billed per token
    data_puts = standin.sent("PUT", "/data/")
    assert sorted(r.path.split("/data/")[1].split("/")[0] for r in data_puts) == [
        f"{s.AZURE_EXPERIMENT_NAME}-train", f"{s.AZURE_EXPERIMENT_NAME}-validation"]
    assert {Path(k).name for k in standin.uploaded_files()} >= {s.train_data_path.name, s.test_data_path.name}
    for put in data_puts:  # a uri_file asset of the uploaded file, versioned by its content
        assert put.json["properties"]["dataType"] == "uri_file"
        assert put.json["properties"]["dataUri"].startswith("azureml://datastores/workspaceblobstore/paths/")
    (job_put,) = standin.sent("PUT", "/jobs/")
    job = job_put.json["properties"]
    assert job["jobType"] == "FineTuning" and "computeId" not in job
    details = job["fineTuningDetails"]
    assert details["model"]["uri"] == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1"
    assert details["trainingData"]["uri"] == data_puts[0].path and details["validationData"]["uri"] == data_puts[1].path
    assert details["hyperParameters"] == entities.catalog_hyperparameters(s)
    assert all(isinstance(v, str) for v in details["hyperParameters"].values())
    assert job["outputs"]["registered_model"]["assetName"] == s.AZURE_MODEL_NAME
    training = common.read_state(s)["training"]
    assert training["mode"] == "serverless" and training["catalog_model"] == details["model"]["uri"]

    before = len(standin.requests)
    assert deploy_model.main(["--backend", "azure"]) == 0, _errors(caplog)
    (endpoint_put,) = standin.sent("PUT", "/serverlessEndpoints/")
    assert endpoint_put.path == f"{standin.ws_id}/serverlessEndpoints/{s.AZURE_ENDPOINT_NAME}"
    workspace_id = standin.get_resource(standin.ws_id)["properties"]["workspaceId"]
    assert endpoint_put.json["properties"]["modelSettings"]["modelId"] == (
        f"azureml://locations/eastus2/workspaces/{workspace_id}/models/{s.AZURE_MODEL_NAME}/versions/1")
    assert endpoint_put.json["sku"] == {"name": "Consumption"}
    assert standin.sent("POST", f"/serverlessEndpoints/{s.AZURE_ENDPOINT_NAME}/listKeys$")
    # Azure registered the model; nothing of ours is registered, no managed endpoint, no VM.
    assert not standin.sent("PUT", "/models/") and not standin.sent(None, "/onlineEndpoints")
    assert [r for r in _billable(standin, before)] == [endpoint_put]
    # Azure's recipe logs none of our evaluation: the gate records that it could not check.
    assert common.read_state(s)["gate"]["verdict"] == "unchecked"
    assert common.read_state(s)["deployment"]["kind"] == "azure-serverless"

    dotenv = config.read_dotenv(azure.env_file)
    assert dotenv["AZURE_ML_ENDPOINT_KIND"] == "azure-serverless" and dotenv["AZURE_ML_API_KEY"] == SERVERLESS_KEY
    assert dotenv["AZURE_ML_ENDPOINT"] == standin.serverless_uri and dotenv["AZURE_ML_CHAT_FORMAT"] == "phi4-mini"
    from finetune_phi import pf_connection

    stored = pf_connection.read_connection(s, with_secret=True)
    assert stored["configs"]["kind"] == "azure-serverless" and stored["secrets"]["key"] == SERVERLESS_KEY
    # What the flows do with that .env: OpenAI chat completions at {URI}/v1/chat/completions, streamed too.
    endpoint = ec.endpoint_from_environment({"ENV_FILE": str(azure.env_file)}, folders=[])
    assert ec.ask(endpoint.url, endpoint.key, "Hi", **endpoint.options()) == "Serverless reply 1 to: Hi"
    pieces = list(ec.chat_stream(endpoint.url, endpoint.key, [{"role": "user", "content": "Hi"}], **endpoint.options()))
    assert len(pieces) > 1 and "".join(pieces) == "Serverless reply 1 to: Hi"
    assert [e.request.get("stream", False) for e in chat_route.exchanges] == [False, True]

    # Deploying again reuses the endpoint: no second create, and never a DELETE.
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 0, _errors(caplog)
    assert len(standin.sent("PUT", "/serverlessEndpoints/")) == 1 and not standin.sent("DELETE")

    # --teardown removes it.
    assert deploy_model.main(["--backend", "azure", "--teardown"]) == 0
    (delete,) = standin.sent("DELETE", "/serverlessEndpoints/")
    assert delete.path == endpoint_put.path
    assert standin.get_resource(endpoint_put.path) is None


@pytest.mark.parametrize("mode", ["catalog", "serverless"])
def test_a_retired_catalog_model_stops_before_anything_is_created_naming_date_and_replacement(
    azure, mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AZURE_CATALOG_MODEL", "Phi-3-mini-4k-instruct")
    assert setup_ml.main(["--backend", "azure", "--mode", mode]) == 1
    (error,) = _errors(caplog)
    assert "AZURE_CATALOG_MODEL=Phi-3-mini-4k-instruct: Azure retired it for fine-tuning on 2025-08-30" in error
    assert "set AZURE_CATALOG_MODEL=Phi-4-mini-instruct" in error
    assert azure.standin.sent("GET", "/models/Phi-3-mini-4k-instruct/versions")  # read from the registry
    assert _billable(azure.standin) == []
    # The stand-in refuses such a job as Azure would: the check above is what kept it from being sent.
    job = {"properties": {"jobType": "FineTuning", "fineTuningDetails": {"model": {
        "uri": "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"}}}}  # fmt: skip
    assert azure.standin._retired_base_model(job["properties"]).status == 400


def test_a_retirement_within_90_days_is_a_warning_and_the_run_goes_on(
    azure, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import datetime as dt

    soon = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    (phi4,) = azure.standin.registry_models[("azureml", "Phi-4-mini-instruct")]
    phi4["properties"]["tags"]["InferenceRetirementDate"] = soon
    assert setup_ml.main(["--backend", "azure", "--mode", "serverless", "--no-stream"]) == 0, _errors(caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("finetune")]
    assert any(f"retires it for inference on {soon} (in 30 days)" in w for w in warnings), warnings


def test_a_workspace_outside_the_models_deploy_regions_stops_serverless_before_anything_is_created(
    azure, caplog: pytest.LogCaptureFixture
) -> None:
    workspace = azure.standin.get_resource(azure.standin.ws_id)
    workspace["location"] = "westeurope"
    assert setup_ml.main(["--backend", "azure", "--mode", "serverless"]) == 1
    (error,) = _errors(caplog)
    assert "can be deployed only in eastus2, eastus, northcentralus, westus3, westus, southcentralus" in error
    assert "'westeurope'" in error and _billable(azure.standin) == []
    caplog.clear()
    assert setup_ml.main(["--backend", "azure", "--mode", "serverless", "--check"]) == 1
    assert any("westeurope" in e for e in _errors(caplog))


@pytest.mark.parametrize(("name", "size", "script"), [
    ("AZURE_COMPUTE_SIZE", "Standard_NC6s_v3", "setup_ml"),
    ("AZURE_DEPLOYMENT_INSTANCE_TYPE", "Standard_NC6s_v3", "deploy_model"),
])  # fmt: skip
def test_a_retired_vm_size_stops_before_any_request_naming_the_size_to_use(
    azure, name: str, size: str, script: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(name, size)
    _record_job(azure.settings)
    main = setup_ml.main if script == "setup_ml" else deploy_model.main
    assert main(["--backend", "azure"]) == 1
    (error,) = _errors(caplog)
    assert f"{name}={size}: Azure retired the NCv3 sizes on 2025-09-30; use Standard_NC" in error
    assert azure.standin.requests == []  # offline: not even a read
    caplog.clear()
    assert main(["--backend", "azure", "--check"]) == 1
    assert any(f"{name}={size}: Azure retired" in e for e in _errors(caplog))


def test_a_serverless_endpoint_serving_another_model_is_never_replaced(
    azure, chat_route, caplog: pytest.LogCaptureFixture
) -> None:
    s, standin = azure.settings, azure.standin
    assert setup_ml.main(["--backend", "azure", "--mode", "serverless"]) == 0, _errors(caplog)
    other = f"{standin.ws_id}/serverlessEndpoints/{s.AZURE_ENDPOINT_NAME}"
    standin.put_resource(other, {"id": other, "name": s.AZURE_ENDPOINT_NAME, "location": "eastus2",
                                 "properties": {"modelSettings": {"modelId": "azureml://locations/eastus2/workspaces/"
                                                                  "x/models/someone-elses/versions/3"},
                                                "provisioningState": "Succeeded", "authMode": "Key",
                                                "inferenceEndpoint": {"uri": "https://x.models.ai.azure.com"}}})  # fmt: skip
    assert deploy_model.main(["--backend", "azure"]) == 1
    (error,) = _errors(caplog)
    assert "serves azureml://locations/eastus2/workspaces/x/models/someone-elses/versions/3" in error
    assert "AZURE_ENDPOINT_NAME" in error and "--teardown" in error
    assert not standin.sent("PUT", "/serverlessEndpoints/") and not standin.sent("DELETE")


def test_a_failed_teardown_step_still_runs_the_others_and_exits_1_naming_it(
    azure, chat_route, caplog: pytest.LogCaptureFixture
) -> None:
    s, standin = azure.settings, azure.standin
    _record_job(s)
    assert deploy_model.main(["--backend", "azure", "--no-connection"]) == 0, _errors(caplog)
    compute_id = _seed_cluster(standin, s)
    # Serverless endpoints are not offered here, say: the other two steps still happen.
    standin.fail("GET", "/serverlessEndpoints/", 400, azure_error("BadRequest", "Serverless endpoints are not offered"))
    assert deploy_model.main(["--backend", "azure", "--teardown"]) == 1
    (error,) = _errors(caplog)
    assert "teardown incomplete" in error and "Serverless endpoints are not offered" in error
    assert f"endpoint {s.AZURE_ENDPOINT_NAME}: deleted" in error and "min instances set to 0" in error
    assert standin.get_resource(f"{standin.ws_id}/onlineEndpoints/{s.AZURE_ENDPOINT_NAME}") is None
    assert standin.get_resource(compute_id)["properties"]["properties"]["scaleSettings"]["minNodeCount"] == 0
    assert common.read_state(s)["deployment"]["backend"] == "azure"  # kept: something may still bill


def test_deploy_check_after_a_serverless_job_checks_the_models_inference_only(
    azure, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Retired for fine-tuning, still served: a deploy of an existing fine-tune passes the check.
    (phi4,) = azure.standin.registry_models[("azureml", "Phi-4-mini-instruct")]
    phi4["properties"]["tags"]["FinetuneRetirementDate"] = "2026-01-01"
    common.update_state(azure.settings, "training", {
        "backend": "azure", "job_name": JOB_NAME, "mode": "serverless", "output": entities.CATALOG_OUTPUT,
        "catalog_model": "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1"})  # fmt: skip
    monkeypatch.setenv("AZURE_CATALOG_MODEL", "Some-Other-Model")  # the recorded job's model is checked
    assert deploy_model.main(["--backend", "azure", "--check"]) == 0, _errors(caplog)
    assert setup_ml.main(["--backend", "azure", "--mode", "serverless", "--check"]) == 1  # a new fine-tune is not
