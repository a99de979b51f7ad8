"""The Azure ML steps `setup_ml.py` and `deploy_model.py` run: dry-run, preflight, train, deploy, teardown.

    python setup_ml.py --backend azure --dry-run dryrun/       # compute/environment/job YAML, no network
    python setup_ml.py --backend azure                         # get-or-create cluster, submit, stream
    python setup_ml.py --backend azure --mode serverless       # fine-tuning as a service of a catalog model
    python deploy_model.py --backend azure                     # register, endpoint, deployment, 100% traffic
                                                               # (serverless: a serverless endpoint)
    python deploy_model.py --backend azure --teardown          # delete the endpoint, scale the cluster to 0

Every entity comes from `entities.py`. Operations are get-or-create / update-in-place: nothing here
deletes an endpoint except `teardown`. Long operations wait and check their final state; expected
failures raise RuntimeError (or config.ConfigError / FileNotFoundError) with the fix in the message.
Each public function takes `ml_client=` / `credential=` so tests can inject fakes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import config
from finetune_phi import common, gate
from finetune_phi.azure import client, entities, lifecycle, preflight

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential

log = logging.getLogger(__name__)

# command: our fine_tune.py on our cluster; catalog: Azure's fine-tuning of a catalog model on our
# cluster (managed compute); serverless: Azure's fine-tuning of a catalog model as a service.
MODES = ("command", "catalog", "serverless")
CATALOG_MODES = ("catalog", "serverless")
SUCCEEDED = "Succeeded"
JOB_COMPLETED = "Completed"
JOB_RUNNING = ("NotStarted", "Queued", "Preparing", "Provisioning", "Starting", "Running", "Finalizing",
               "CancelRequested")  # fmt: skip
JOB_POLL_S = 30.0  # between status checks of a catalog job (it has no log stream to follow)

# What a deployment serves, and so the request shape it answers (config.ENDPOINT_KINDS):
# a command job's MLflow model, served by Azure's no-code MLflow scoring ({"input_data": [...], "params"}),
# or a model-catalog fine-tuned model ({"input_data": {"input_string": [messages], "parameters": {...}}}).
# A serverless fine-tune is served by a serverless endpoint: OpenAI chat completions.
KIND_BY_MODE = {"command": "azure-mlflow", "catalog": "azure-catalog", "serverless": "azure-serverless"}


@dataclass(frozen=True)
class AzureDeployInfo:
    endpoint_name: str
    deployment_name: str
    scoring_uri: str
    model_id: str
    job_name: str
    key: str = field(repr=False)  # never in a log line or a traceback
    kind: str = "azure-mlflow"  # KIND_BY_MODE of the job's mode


# --- preflight -------------------------------------------------------------------------------------


def check(
    settings: config.Settings,
    *,
    ml_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
    arm_get: preflight.ArmGet | None = None,
    mode: str = "command",
    registry_client: "MLClient | None" = None,
    uses: tuple[str, ...] = ("fine-tuning", "inference"),
) -> list[str]:
    """Read-only: every configuration, credential, workspace, identity, quota and lifecycle problem at once."""
    return preflight.check(settings, ml_client=ml_client, credential=credential, arm_get=arm_get, mode=mode,
                           registry_client=registry_client, uses=uses)  # fmt: skip


# --- training --------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise config.ConfigError([f"--mode {mode!r}: use one of {', '.join(MODES)}"])


def _warn_placeholders(settings: config.Settings, names: tuple[str, ...]) -> None:
    for problem in config.missing(settings, names):
        log.warning("dry-run YAML keeps a placeholder: %s", problem)


def report_check(settings: config.Settings, mode: str | None = None, *, deploying: bool = False) -> int:
    """`--check` of both scripts: log every preflight problem, then a summary; the exit status.

    `mode`: the training mode to check for (setup_ml.py's --mode; deploy_model.py: the recorded job's).
    `deploying`: check what a deploy needs: the catalog model the recorded job fine-tuned, for inference."""
    mode = mode or recorded_mode(settings)
    _check_mode(mode)
    uses: tuple[str, ...] = ("fine-tuning", "inference")
    if deploying:
        settings, uses = recorded_catalog_settings(settings), ("inference",)
    problems = check(settings, mode=mode, uses=uses)
    for problem in problems:
        log.error("%s", problem)
    log.info("preflight: %s", "OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def dry_run_training(settings: config.Settings, out_dir: Path, mode: str = "command") -> list[Path]:
    """Write the training entities as YAML into `out_dir` (loadable by azure.ai.ml.load_*); no network."""
    _check_mode(mode)
    out_dir = Path(out_dir)
    if mode == "serverless":  # no compute: Azure runs it as a service
        paths = [entities.write_yaml(entities.data_asset(settings, use), out_dir / f"data_{use}.yml")
                 for use in entities.DATA_USES]  # fmt: skip
        refs = [f"azureml:{entities.data_asset(settings, use).name}:{entities.data_asset(settings, use).version}"
                for use in entities.DATA_USES]  # fmt: skip
        job = entities.catalog_job(settings, serverless=True, training_data=refs[0], validation_data=refs[1])
        paths.append(entities.write_yaml(job, out_dir / "finetuning_job.yml"))
        log.info("to submit by hand: az ml data create -f %s; az ml data create -f %s; az ml job create -f %s "
                 "(add -g <rg> -w <workspace>)", *paths)  # fmt: skip
        return paths
    paths = [entities.write_yaml(entities.compute(settings), out_dir / "compute.yml")]
    if mode == "command":
        paths.append(entities.write_yaml(entities.environment(settings), out_dir / "environment.yml"))
        paths.append(entities.write_yaml(entities.training_job(settings), out_dir / "job.yml"))
    else:  # the catalog job brings its own environment
        paths.append(entities.write_yaml(entities.catalog_job(settings), out_dir / "finetuning_job.yml"))
    log.info(
        "to submit by hand: az ml compute create -f %s; %saz ml job create -f %s (add -g <rg> -w <workspace>)",
        paths[0], f"az ml environment create -f {paths[1]}; " if mode == "command" else "", paths[-1],
    )  # fmt: skip
    return paths


def _compute_quota_hint(settings: config.Settings) -> str:
    return (
        f"Request quota for the VM family of {settings.AZURE_COMPUTE_SIZE} in the workspace's region "
        "(ml.azure.com → Quota), or set AZURE_COMPUTE_SIZE to a size you have quota for; "
        "`python setup_ml.py --backend azure --check` shows the family and the numbers"
    )


def ensure_compute(ml_client: "MLClient", settings: config.Settings) -> Any:
    """Get the cluster, or create it when (and only when) Azure says it does not exist."""
    from azure.core.exceptions import ResourceNotFoundError

    name = settings.AZURE_COMPUTE_NAME
    with client.azure_errors(f"compute cluster {name}", _compute_quota_hint(settings)):
        try:
            existing = ml_client.compute.get(name)
        except ResourceNotFoundError:
            log.info("creating compute cluster %s (%s, %d-%d nodes)", name, settings.AZURE_COMPUTE_SIZE,
                     settings.AZURE_COMPUTE_MIN_INSTANCES, settings.AZURE_COMPUTE_MAX_INSTANCES)  # fmt: skip
            return ml_client.compute.begin_create_or_update(entities.compute(settings)).result()
    size = str(getattr(existing, "size", "") or "")
    if size and size.lower() != settings.AZURE_COMPUTE_SIZE.lower():
        log.warning(
            "compute cluster %s exists with size %s, not AZURE_COMPUTE_SIZE=%s: using it as it is "
            "(set AZURE_COMPUTE_NAME to a new name to get a %s cluster)",
            name, size, settings.AZURE_COMPUTE_SIZE, settings.AZURE_COMPUTE_SIZE,
        )  # fmt: skip
    else:
        log.info("reusing compute cluster %s (%s)", name, size or settings.AZURE_COMPUTE_SIZE)
    return existing


def _require_data(settings: config.Settings) -> None:
    for path, name in ((settings.train_data_path, "TRAIN_DATA_PATH"), (settings.test_data_path, "TEST_DATA_PATH")):
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} does not exist; run `python download_dataset.py` first")


def workspace_region(ml_client: "MLClient", settings: config.Settings) -> tuple[str, str]:
    """(region, workspace id): where the workspace lives, and the id serverless model ids name it by."""
    with client.azure_errors(f"reading workspace {settings.AZURE_ML_WORKSPACE_NAME}"):
        workspace = ml_client.workspaces.get(settings.AZURE_ML_WORKSPACE_NAME)
    return str(workspace.location or "").lower(), str(getattr(workspace, "_workspace_id", "") or "")


def usable_catalog_model(
    settings: config.Settings, uses: tuple[str, ...], *, region: str | None = None,
    registry_client: "MLClient | None" = None, credential: "TokenCredential | None" = None,
) -> lifecycle.CatalogModel:
    """AZURE_CATALOG_MODEL's latest version, refused (ConfigError) when retired for `uses` or, given the
    workspace's `region`, when its fine-tuned copies cannot be deployed there."""
    registry_client = client.connect_registry(settings, registry_client=registry_client, credential=credential)
    model = lifecycle.fetch_catalog_model(settings, registry_client)
    lifecycle.require_usable(model, uses, region=region)
    return model


def _retired_sizes(settings: config.Settings, names: tuple[str, ...]) -> None:
    problems = lifecycle.retired_size_problems(settings, names)
    if problems:
        raise config.ConfigError(problems)


def upload_data(ml_client: "MLClient", settings: config.Settings) -> list[str]:
    """The train and validation files as data assets (get-or-create by content); their ids, in order."""
    from azure.core.exceptions import ResourceNotFoundError

    ids = []
    for use in entities.DATA_USES:
        asset = entities.data_asset(settings, use)
        with client.azure_errors(f"data asset {asset.name}"):
            try:
                found = ml_client.data.get(asset.name, version=asset.version)
                log.info("reusing data asset %s:%s (same content)", asset.name, asset.version)
            except ResourceNotFoundError:
                log.info("uploading %s as data asset %s:%s", entities.data_path(settings, use), asset.name,
                         asset.version)  # fmt: skip
                found = ml_client.data.create_or_update(asset)
        ids.append(str(found.id))
    return ids


def submit_training(
    settings: config.Settings,
    mode: str = "command",
    stream: bool = True,
    *,
    ml_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
    registry_client: "MLClient | None" = None,
) -> str:
    """Submit the fine-tune in `mode`, record it, follow it to its end.

    command: get-or-create the cluster, register the environment, our fine_tune.py as a command job,
    its logs streamed. catalog / serverless: the catalog model's lifecycle (and, serverless, the
    workspace's region) checked first, then Azure's fine-tuning job, its status polled."""
    _check_mode(mode)
    _require_data(settings)
    if mode != "serverless":  # offline, before the first request
        _retired_sizes(settings, ("AZURE_COMPUTE_SIZE",))
    ml_client = client.connect(settings, ml_client=ml_client, credential=credential)
    catalog_model = None
    if mode in CATALOG_MODES:
        # Before anything is created: a retired model or a region it cannot be deployed in stops here.
        region = workspace_region(ml_client, settings)[0] if mode == "serverless" else None
        catalog_model = usable_catalog_model(settings, ("fine-tuning", "inference"), region=region,
                                             registry_client=registry_client, credential=credential)  # fmt: skip
    if mode != "serverless":
        ensure_compute(ml_client, settings)
    if mode == "command":
        env = entities.environment(settings)
        with client.azure_errors(f"environment {env.name}"):
            # Same name and version as last time = the same registration; the image builds once.
            ml_client.environments.create_or_update(env)
        job = entities.training_job(settings)
        output = entities.COMMAND_OUTPUT
    else:
        assert catalog_model is not None
        if mode == "serverless":
            train_id, validation_id = upload_data(ml_client, settings)
            job = entities.catalog_job(settings, catalog_model.id, serverless=True, training_data=train_id,
                                       validation_data=validation_id)  # fmt: skip
        else:
            job = entities.catalog_job(settings, catalog_model.id)
        output = entities.CATALOG_OUTPUT
    with client.azure_errors("submitting the training job", _compute_quota_hint(settings)):
        submitted = ml_client.jobs.create_or_update(job)
    job_name = submitted.name
    studio_url = getattr(submitted, "studio_url", None) or ""
    log.info("submitted %s job %s: %s", mode, job_name, studio_url or "(no studio URL returned)")
    # Recorded before streaming, so that an interrupted stream still leaves deploy a job to find.
    common.update_state(
        settings,
        "training",
        {
            "backend": "azure",
            "job_name": job_name,
            "mode": mode,
            "output": output,
            "catalog_model": catalog_model.id if catalog_model else None,
            "studio_url": studio_url,
            "experiment_name": settings.AZURE_EXPERIMENT_NAME,
            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    if stream and mode in CATALOG_MODES:
        # jobs.stream reads the job's services, which a fine-tuning job does not have: it would
        # crash with AttributeError ('NoneType' object has no attribute 'get').
        _poll_until_done(ml_client, job_name, studio_url)
    elif stream:
        _stream_until_done(ml_client, job_name, studio_url)
    return job_name


def _poll_until_done(ml_client: "MLClient", job_name: str, studio_url: str) -> None:
    last = None
    with client.azure_errors(f"following job {job_name}"):
        while True:
            status = _value(ml_client.jobs.get(job_name).status)
            if status != last:
                log.info("job %s: %s", job_name, status)
                last = status
            if status not in JOB_RUNNING:
                break
            time.sleep(JOB_POLL_S)
    if status != JOB_COMPLETED:
        raise RuntimeError(f"job {job_name} ended with status {status}, not {JOB_COMPLETED} (logs: {studio_url})")
    log.info("job %s completed", job_name)


def _stream_until_done(ml_client: "MLClient", job_name: str, studio_url: str) -> None:
    from azure.ai.ml.exceptions import JobException

    with client.azure_errors(f"following job {job_name}"):
        try:
            ml_client.jobs.stream(job_name)
        except JobException as exc:
            raise RuntimeError(f"job {job_name} failed: {str(exc).strip()[:500]} (logs: {studio_url})") from exc
        status = _value(ml_client.jobs.get(job_name).status)
    if status != JOB_COMPLETED:
        raise RuntimeError(f"job {job_name} ended with status {status}, not {JOB_COMPLETED} (logs: {studio_url})")
    log.info("job %s completed", job_name)


# --- deployment ------------------------------------------------------------------------------------


def recorded_job(settings: config.Settings, job_name: str | None, *, dry_run: bool = False) -> tuple[str, str]:
    """(job name, its model output): the argument, else the job setup_ml.py recorded."""
    training = common.read_state(settings).get("training", {})
    recorded = training.get("job_name") if training.get("backend") == "azure" else None
    if job_name:
        output = training.get("output", entities.COMMAND_OUTPUT) if job_name == recorded else entities.COMMAND_OUTPUT
        return job_name, output
    if recorded:
        return recorded, training.get("output", entities.COMMAND_OUTPUT)
    if dry_run:
        log.warning(
            "no Azure training job recorded in %s: model.yml uses the placeholder %r (pass --job-name NAME)",
            common.state_path(settings), entities.PLACEHOLDER_JOB_NAME,
        )  # fmt: skip
        return entities.PLACEHOLDER_JOB_NAME, entities.COMMAND_OUTPUT
    raise RuntimeError(
        f"no Azure training job recorded in {common.state_path(settings)}: run "
        "`python setup_ml.py --backend azure` first, or pass --job-name NAME"
    )


def recorded_mode(settings: config.Settings, job_name: str | None = None) -> str:
    """The mode setup_ml.py recorded for its job (for `job_name`, when that is the recorded job)."""
    training = common.read_state(settings).get("training", {})
    if training.get("backend") != "azure" or (job_name and job_name != training.get("job_name")):
        return "command"
    mode = str(training.get("mode") or "command")
    return mode if mode in MODES else "command"


def dry_run_deployment(settings: config.Settings, out_dir: Path, job_name: str | None = None) -> list[Path]:
    """Write model/endpoint/deployment YAML into `out_dir` (loadable by azure.ai.ml.load_*); no network."""
    out_dir = Path(out_dir)
    job_name, output = recorded_job(settings, job_name, dry_run=True)
    if recorded_mode(settings, job_name) == "serverless":
        # The model's name and the workspace's region and id are known once the job ran and a client
        # reads them: placeholders here.
        model_id = entities.workspace_model_id(entities.PLACEHOLDER_REGION, entities.PLACEHOLDER_WORKSPACE_ID,
                                               f"<model registered by job {job_name}>", "1")  # fmt: skip
        path = entities.write_yaml(entities.serverless_endpoint(settings, model_id),
                                   out_dir / "serverless_endpoint.yml")  # fmt: skip
        log.info("to deploy by hand: fill in model_id, then az ml serverless-endpoint create -f %s "
                 "(add -g <rg> -w <workspace>)", path)  # fmt: skip
        return [path]
    _warn_placeholders(settings, config.AZURE_IDENTITY_FIELDS)
    paths = [
        entities.write_yaml(entities.model(settings, job_name, output), out_dir / "model.yml"),
        entities.write_yaml(entities.endpoint(settings), out_dir / "endpoint.yml"),
        # A real deploy pins the exact version it just registered; by hand, the latest is that one.
        entities.write_yaml(
            entities.deployment(settings, f"azureml:{settings.AZURE_MODEL_NAME}@latest"), out_dir / "deployment.yml"
        ),
    ]
    log.info(
        "to deploy by hand: az ml model create -f %s; az ml online-endpoint create -f %s; "
        "az ml online-deployment create -f %s --all-traffic (add -g <rg> -w <workspace>)",
        *paths,
    )
    return paths


def _value(state: Any) -> str:
    # The SDK hands back str-enums (provisioning states, job statuses): str() of one is
    # "EndpointProvisioningState.SUCCEEDED" on Python 3.11, its value is "Succeeded".
    return str(getattr(state, "value", state) or "")


def _state_of(entity: Any) -> str:
    return _value(getattr(entity, "provisioning_state", None))


def _deployment_quota_hint(settings: config.Settings) -> str:
    return (
        f"Request quota for the VM family of {settings.AZURE_DEPLOYMENT_INSTANCE_TYPE} (managed online endpoints "
        "reserve 20% extra for upgrades), or set AZURE_DEPLOYMENT_INSTANCE_TYPE to a size you have quota for; "
        "`python deploy_model.py --backend azure --check` shows the family and the numbers"
    )


def ensure_endpoint(ml_client: "MLClient", settings: config.Settings) -> Any:
    """Create the endpoint, or update it in place; never delete it (that would drop its URI and keys)."""
    from azure.core.exceptions import ResourceNotFoundError

    name = settings.AZURE_ENDPOINT_NAME
    desired = entities.endpoint(settings)
    show = f"see it in ml.azure.com → Endpoints, or `az ml online-endpoint show -n {name}`"
    with client.azure_errors(f"endpoint {name}", failed_hint=show):
        try:
            existing = ml_client.online_endpoints.get(name)
        except ResourceNotFoundError:
            log.info("creating endpoint %s (key auth, identity %s)", name, settings.AZURE_MANAGED_IDENTITY_NAME)
        else:
            # Keep today's routing until the new deployment has succeeded.
            desired.traffic = dict(getattr(existing, "traffic", None) or {})
            log.info("updating endpoint %s in place (traffic stays %s for now)", name, desired.traffic)
        ml_client.online_endpoints.begin_create_or_update(desired).result()
        current = ml_client.online_endpoints.get(name)
    if _state_of(current) != SUCCEEDED:
        raise RuntimeError(f"endpoint {name} is in state {_state_of(current) or 'unknown'}, not {SUCCEEDED}: {show}")
    return current


def job_metrics(ml_client: "MLClient", job_name: str) -> dict[str, float] | None:
    """The before/after scores a command job's fine_tune.py recorded, or None when it recorded none.

    Read from the job's tags (finetuning_dir/evaluation.py sets the run tag `eval_scores`, and a job's
    MLflow run tags are the job's tags), through the same ARM API as every other call here: the
    workspace's MLflow endpoint would need azureml-mlflow's own cloud lookup and credential.
    """
    from azure.core.exceptions import ResourceNotFoundError

    with client.azure_errors(f"reading job {job_name}"):
        try:
            job = ml_client.jobs.get(job_name)
        except ResourceNotFoundError:
            log.warning("job %s not found in the workspace: no evaluation to compare", job_name)
            return None
    raw = (getattr(job, "tags", None) or {}).get(gate.SCORES_TAG)
    if not raw:
        return None
    try:
        return {str(k): float(v) for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError, TypeError):
        log.warning("job %s has an unreadable %s tag: %r", job_name, gate.SCORES_TAG, raw[:200])
        return None


def check_gate(
    ml_client: "MLClient", settings: config.Settings, job_name: str, kind: str, force: bool = False,
    metrics: "Any" = None,
) -> gate.Decision:
    """The gate (finetune_phi/gate.py) for a job about to be deployed: its base model's scores and the
    deployed job's. A catalog job runs Azure's own pipeline and logs no such scores: unchecked.
    `metrics(job_name)` reads a job's metrics (default: job_metrics)."""
    fetch = metrics or (lambda name: job_metrics(ml_client, name))
    deployment = common.read_state(settings).get("deployment") or {}
    deployed = deployment.get("job_name") if deployment.get("backend") == "azure" else None
    candidate = fetch(job_name) if kind == "azure-mlflow" else None
    decision = gate.decide(
        settings, f"job {job_name}", candidate or {}, deployed=f"job {deployed}" if deployed else None,
        deployed_metrics=fetch(deployed) if deployed and deployed != job_name else None, force=force,
    )  # fmt: skip
    common.update_state(settings, "gate", decision.record())
    return gate.enforce(decision)


def deploy(
    settings: config.Settings,
    job_name: str | None = None,
    *,
    force: bool = False,
    ml_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
    metrics: "Any" = None,
    registry_client: "MLClient | None" = None,
) -> AzureDeployInfo:
    """Register the job's MLflow model, create/update endpoint and deployment, route 100% traffic to it;
    a serverless fine-tune goes to a serverless endpoint instead (deploy_serverless).

    First the gate: a model scoring worse than its base model or the deployed job's raises
    gate.GateRefused (a RuntimeError) unless `force`; the verdict is tagged on the registered model."""
    job_name, output = recorded_job(settings, job_name)
    mode = recorded_mode(settings, job_name)
    if mode == "serverless":
        return deploy_serverless(settings, job_name, force=force, ml_client=ml_client, credential=credential,
                                 registry_client=registry_client, metrics=metrics)  # fmt: skip
    config.validate(settings, config.AZURE_WORKSPACE_FIELDS + config.AZURE_IDENTITY_FIELDS)
    kind = KIND_BY_MODE[mode]
    # Offline, before anything is created or billed: a retired size is refused by Azure, and a VM too
    # small for the model fails only after 10-30 min of provisioning, with the container killed for memory.
    too_small = lifecycle.retired_size_problems(settings, ("AZURE_DEPLOYMENT_INSTANCE_TYPE",))
    too_small += preflight.fit_problems(settings)
    if too_small:
        raise config.ConfigError(too_small)
    ml_client = client.connect(settings, ml_client=ml_client, credential=credential)
    if mode == "catalog":  # a catalog model retired for inference cannot be served
        usable_catalog_model(recorded_catalog_settings(settings), ("inference",),
                             registry_client=registry_client, credential=credential)  # fmt: skip
    endpoint_name, deployment_name = settings.AZURE_ENDPOINT_NAME, settings.AZURE_DEPLOYMENT_NAME

    decision = check_gate(ml_client, settings, job_name, kind, force, metrics)
    model_entity = entities.model(settings, job_name, output)
    model_entity.tags = {**(model_entity.tags or {}), **decision.tags()}
    with client.azure_errors(f"registering model {settings.AZURE_MODEL_NAME} from job {job_name}"):
        registered = ml_client.models.create_or_update(model_entity)
    model_ref = f"azureml:{registered.name}:{registered.version}"
    log.info("registered %s from %s", model_ref, entities.model_path(job_name, output))

    ensure_endpoint(ml_client, settings)

    logs_cmd = (
        f"az ml online-deployment get-logs --endpoint-name {endpoint_name} --name {deployment_name} "
        f"-g {settings.AZURE_RESOURCE_GROUP_NAME} -w {settings.AZURE_ML_WORKSPACE_NAME}"
    )
    log.info("deploying %s to %s/%s on %s x%d (this takes 10-30 min)", model_ref, endpoint_name, deployment_name,
             settings.AZURE_DEPLOYMENT_INSTANCE_TYPE, settings.AZURE_DEPLOYMENT_INSTANCE_COUNT)  # fmt: skip
    # A deployment that ends Failed makes the poller raise HttpResponseError (it returns no failed
    # entity): the hint must ride on the error as well as on a final state other than Succeeded.
    failed_hint = f"traffic was left as it was. Container logs: {logs_cmd}"
    with client.azure_errors(f"deployment {deployment_name}", _deployment_quota_hint(settings), failed_hint):
        ml_client.online_deployments.begin_create_or_update(entities.deployment(settings, model_ref)).result()
        done = ml_client.online_deployments.get(name=deployment_name, endpoint_name=endpoint_name)
    if _state_of(done) != SUCCEEDED:
        raise RuntimeError(
            f"deployment {deployment_name} ended in state {_state_of(done) or 'unknown'}, not {SUCCEEDED}; "
            f"traffic was left as it was. Container logs: {logs_cmd}"
        )

    with client.azure_errors(f"routing traffic to {deployment_name}"):
        current = ml_client.online_endpoints.get(endpoint_name)
        current.traffic = {deployment_name: 100}
        ml_client.online_endpoints.begin_create_or_update(current).result()
        routed = ml_client.online_endpoints.get(endpoint_name)
        keys = ml_client.online_endpoints.get_keys(endpoint_name)
    if _state_of(routed) != SUCCEEDED:
        raise RuntimeError(f"endpoint {endpoint_name} is in state {_state_of(routed)} after routing traffic")
    scoring_uri, key = routed.scoring_uri, keys.primary_key
    if not scoring_uri or not key:
        raise RuntimeError(f"endpoint {endpoint_name} returned no scoring URI or key; is its auth_mode 'key'?")

    info = AzureDeployInfo(
        endpoint_name=endpoint_name,
        deployment_name=deployment_name,
        scoring_uri=scoring_uri,
        model_id=model_ref,
        job_name=job_name,
        key=key,
        kind=kind,
    )
    common.update_state(
        settings,
        "deployment",
        {
            "backend": "azure",
            "kind": kind,
            "endpoint_name": endpoint_name,
            "deployment_name": deployment_name,
            "scoring_uri": scoring_uri,
            "model": model_ref,
            "job_name": job_name,
            "gate": decision.verdict,
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    log.info("endpoint %s serves %s (%s) at %s (key %s)", endpoint_name, model_ref, kind, scoring_uri,
             common.redact(key))  # fmt: skip
    return info


def recorded_catalog_settings(settings: config.Settings) -> config.Settings:
    """The settings with AZURE_CATALOG_MODEL / _REGISTRY of the catalog model the recorded job fine-tuned."""
    recorded = str(common.read_state(settings).get("training", {}).get("catalog_model") or "")
    parts = recorded.split("/")  # azureml://registries/<registry>/models/<name>/versions/<version>
    if recorded.startswith("azureml://registries/") and len(parts) >= 7:
        return settings.with_overrides(AZURE_CATALOG_REGISTRY=parts[3], AZURE_CATALOG_MODEL=parts[5])
    return settings


def fine_tuned_model(ml_client: "MLClient", settings: config.Settings, job_name: str) -> tuple[str, str]:
    """(name, version) of the model a completed catalog fine-tuning job registered in the workspace."""
    with client.azure_errors(f"reading job {job_name}"):
        job = ml_client.jobs.get(job_name)
    status = _value(job.status)
    if status != JOB_COMPLETED:
        raise RuntimeError(
            f"job {job_name} is {status or 'in an unknown state'}, not {JOB_COMPLETED}: nothing to deploy yet "
            f"(follow it at {getattr(job, 'studio_url', '') or 'ml.azure.com → Jobs'})"
        )
    output = (getattr(job, "outputs", None) or {}).get(entities.CATALOG_OUTPUT)
    name = str(getattr(output, "name", None) or settings.AZURE_MODEL_NAME)
    version = getattr(output, "version", None)
    if version:
        return name, str(version)
    # Azure names the output's model, not its version: the version this job registered. Other runs
    # (a command job's deploy registers under AZURE_MODEL_NAME too) may have added later ones.
    with client.azure_errors(f"reading the versions of model {name} (registered by job {job_name})"):
        versions = list(ml_client.models.list(name=name))
    def number(m: Any) -> int:
        return int(m.version) if str(m.version).isdigit() else 0

    mine = [m for m in versions if str(getattr(m, "job_name", "") or "") == job_name]
    if mine:
        return name, str(max(mine, key=number).version)
    if not versions:
        raise RuntimeError(f"job {job_name} completed but model {name} has no version in the workspace: "
                           "see the job's outputs in ml.azure.com → Jobs")  # fmt: skip
    latest = max(versions, key=number)
    log.warning("no version of model %s names job %s: deploying its latest, version %s", name, job_name,
                latest.version)  # fmt: skip
    return name, str(latest.version)


def ensure_serverless_endpoint(ml_client: "MLClient", settings: config.Settings, model_id: str, region: str) -> Any:
    """Create the serverless endpoint, or reuse it when it serves `model_id`; never delete it.

    Azure does not change a serverless endpoint's model in place: one serving another model is a
    stop, naming the two ways on."""
    from azure.core.exceptions import ResourceNotFoundError

    name = settings.AZURE_ENDPOINT_NAME
    show = f"see it in ml.azure.com → Endpoints → Serverless, or `az ml serverless-endpoint show -n {name}`"
    with client.azure_errors(f"serverless endpoint {name}", failed_hint=show):
        try:
            existing = ml_client.serverless_endpoints.get(name)
        except ResourceNotFoundError:
            existing = None
        if existing is None:
            log.info("creating serverless endpoint %s for %s (billed per token, no VM)", name, model_id)
            ml_client.serverless_endpoints.begin_create_or_update(
                entities.serverless_endpoint(settings, model_id, location=region)
            ).result()
        elif str(existing.model_id or "").lower() != model_id.lower():
            raise RuntimeError(
                f"serverless endpoint {name} serves {existing.model_id}, not {model_id}, and Azure does not change "
                "a serverless endpoint's model: set AZURE_ENDPOINT_NAME to a new name, or remove it first with "
                "`python deploy_model.py --backend azure --teardown`"
            )
        else:
            log.info("reusing serverless endpoint %s: it already serves %s", name, model_id)
        current = ml_client.serverless_endpoints.get(name)
    state = _value(getattr(current, "provisioning_state", None))
    if state.lower() != SUCCEEDED.lower():
        raise RuntimeError(f"serverless endpoint {name} is in state {state or 'unknown'}, not {SUCCEEDED}: {show}")
    return current


def deploy_serverless(
    settings: config.Settings,
    job_name: str,
    *,
    force: bool = False,
    ml_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
    registry_client: "MLClient | None" = None,
    metrics: "Any" = None,
) -> AzureDeployInfo:
    """The model a serverless fine-tune registered, behind a serverless endpoint (pay per token), its key.

    Before anything is created: the catalog model must still be offered for inference, and its
    fine-tuned copies deployable in the workspace's region."""
    config.validate(settings, config.AZURE_WORKSPACE_FIELDS)
    ml_client = client.connect(settings, ml_client=ml_client, credential=credential)
    region, workspace_id = workspace_region(ml_client, settings)  # read once: the check and the model id
    usable_catalog_model(recorded_catalog_settings(settings), ("inference",), region=region,
                         registry_client=registry_client, credential=credential)  # fmt: skip
    kind = KIND_BY_MODE["serverless"]
    name, version = fine_tuned_model(ml_client, settings, job_name)  # first: the job must have completed
    decision = check_gate(ml_client, settings, job_name, kind, force, metrics)
    model_id = entities.workspace_model_id(region, workspace_id, name, version)
    endpoint_name = settings.AZURE_ENDPOINT_NAME
    current = ensure_serverless_endpoint(ml_client, settings, model_id, region)
    with client.azure_errors(f"reading the keys of serverless endpoint {endpoint_name}"):
        key = ml_client.serverless_endpoints.get_keys(endpoint_name).primary_key
    scoring_uri = str(getattr(current, "scoring_uri", "") or "")
    if not scoring_uri or not key:
        raise RuntimeError(f"serverless endpoint {endpoint_name} returned no URI or key; is its auth mode Key?")
    common.update_state(settings, "deployment", {
        "backend": "azure", "kind": kind, "endpoint_name": endpoint_name, "deployment_name": None,
        "scoring_uri": scoring_uri, "model": model_id, "job_name": job_name, "gate": decision.verdict,
        "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })  # fmt: skip
    log.info("serverless endpoint %s serves %s at %s (key %s); requests: %s/v1/chat/completions",
             endpoint_name, model_id, scoring_uri, common.redact(key), scoring_uri.rstrip("/"))  # fmt: skip
    return AzureDeployInfo(endpoint_name=endpoint_name, deployment_name="", scoring_uri=scoring_uri,
                           model_id=model_id, job_name=job_name, key=key, kind=kind)  # fmt: skip


def teardown(
    settings: config.Settings,
    *,
    ml_client: "MLClient | None" = None,
    credential: "TokenCredential | None" = None,
) -> list[str]:
    """Delete the online endpoint (its deployments go with it) and the serverless endpoint of that name, and
    let the cluster scale to 0; one line per action."""
    from azure.core.exceptions import ResourceNotFoundError

    ml_client = client.connect(settings, ml_client=ml_client, credential=credential)
    endpoint_name, compute_name = settings.AZURE_ENDPOINT_NAME, settings.AZURE_COMPUTE_NAME

    def delete_online() -> str:
        try:
            ml_client.online_endpoints.get(endpoint_name)
        except ResourceNotFoundError:
            return f"endpoint {endpoint_name}: not found, nothing to delete"
        ml_client.online_endpoints.begin_delete(name=endpoint_name).result()
        return f"endpoint {endpoint_name}: deleted, with its deployments (billing for them stops)"

    def delete_serverless() -> str:
        try:
            ml_client.serverless_endpoints.get(endpoint_name)
        except ResourceNotFoundError:
            return f"serverless endpoint {endpoint_name}: not found, nothing to delete"
        ml_client.serverless_endpoints.begin_delete(endpoint_name).result()
        return (f"serverless endpoint {endpoint_name}: deleted (its per-token billing ends; the fine-tuned model "
                "stays registered in the workspace)")

    def scale_down() -> str:
        try:
            cluster = ml_client.compute.get(compute_name)
        except ResourceNotFoundError:
            return f"compute cluster {compute_name}: not found, nothing to scale"
        if (getattr(cluster, "min_instances", 0) or 0) == 0:
            return f"compute cluster {compute_name}: already scales to 0 when idle"
        cluster.min_instances = 0
        ml_client.compute.begin_create_or_update(cluster).result()
        return f"compute cluster {compute_name}: min instances set to 0 (idle nodes are released)"

    # Every step is tried, whatever the others did: a failure to delete one endpoint must not leave
    # the other, or the cluster, billing.
    lines, failures = [], []
    for action, step in ((f"deleting endpoint {endpoint_name}", delete_online),
                         (f"deleting serverless endpoint {endpoint_name}", delete_serverless),
                         (f"scaling compute cluster {compute_name}", scale_down)):  # fmt: skip
        try:
            with client.azure_errors(action):
                lines.append(step())
        except RuntimeError as exc:
            failures.append(str(exc))
    state = common.read_state(settings).get("deployment", {})
    if not failures and state.get("backend") == "azure" and state.get("endpoint_name") == endpoint_name:
        common.update_state(settings, "deployment", {})
    if failures:
        raise RuntimeError("teardown incomplete (" + "; ".join(lines + failures) + ")")
    return lines
