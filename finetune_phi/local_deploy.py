"""The local backend of deploy_model.py: register the fine-tuned model, run it as a detached endpoint.

    python deploy_model.py              # deploy (or replace in place with the newest version)
    python deploy_model.py --teardown   # stop it

Each deploy registers the run's model as a new version of AZURE_MODEL_NAME in the local MLflow
registry, checks the gate, and starts `python -m finetune_phi.endpoint` in its own session, so it
outlives this command (the process side: supervise.py, with the files in STATE_DIR/endpoint).

Re-deploying while an endpoint runs is a hand-over on the same port: the new server binds with
SO_REUSEPORT, loads the model before it accepts connections, and only once it answers its readiness
probe is the old one sent SIGTERM (it finishes in-flight requests). If the new one fails, only it is
killed and the old one keeps serving.

Recovery: an endpoint that died (kill -9, OOM, reboot) leaves a pid file naming a dead process; the
next deploy says so and starts a fresh one. A deploy that was itself killed part-way can leave a
half-started or a replaced server running; the next deploy or teardown finds it through `spawned`
and stops it. Deploys and teardowns of one STATE_DIR take `deploy.lock` (flock: the kernel drops it
when its holder dies, so a killed deploy never leaves a stale lock); a second one fails at once,
naming the holder, rather than queueing behind a deploy that can take minutes.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import config
from finetune_phi import common, gate
from finetune_phi.mlflow_store import use_local_mlflow
from finetune_phi.supervise import (
    LOG_FILE,
    PID_FILE,
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    DeployError,
    deploy_lock,
    endpoint_dir,
    get_or_create_key,
    is_endpoint,
    port_answers,
    read_pid,
    running_pid,
    save_key,
    scoring_uri,
    start_server,
    stop_pid,
    stop_strays,
    write_spawned,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LocalDeployment:
    scoring_uri: str
    key: str = field(repr=False)
    pid: int
    log_path: Path
    model_uri: str  # models:/NAME/VERSION
    model_name: str
    model_version: str
    source_uri: str  # the training run's model, e.g. runs:/<id>/model
    port: int
    replaced_pid: int | None = None

    @property
    def base_url(self) -> str:
        return self.scoring_uri.rsplit("/score", 1)[0]


# --- the registry -----------------------------------------------------------------------------------


def trained_model_uri(settings: config.Settings) -> str:
    training = common.read_state(settings).get("training") or {}
    uri = training.get("model_uri")
    if not uri:
        raise DeployError(
            f"no fine-tuned model is recorded in {common.state_path(settings)}: run python setup_ml.py first"
        )
    return str(uri)


def register_model(settings: config.Settings, source_uri: str) -> str:
    """Register `source_uri` as a new version of AZURE_MODEL_NAME; returns the version."""
    use_local_mlflow(settings)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow.register_model(source_uri, settings.AZURE_MODEL_NAME)
    except MlflowException as exc:
        raise DeployError(
            f"could not register {source_uri} as {settings.AZURE_MODEL_NAME!r} in {settings.tracking_uri}: "
            f"{exc.message}. Run python setup_ml.py again to train and record a model."
        ) from exc
    return str(version.version)


# --- the gate (finetune_phi/gate.py) -------------------------------------------------------------------


def _run_id(model_uri: str | None) -> str | None:
    """runs:/<run_id>/model -> <run_id>."""
    if not model_uri or not model_uri.startswith("runs:/"):
        return None
    return model_uri.removeprefix("runs:/").split("/", 1)[0] or None


def run_metrics(settings: config.Settings, run_id: str) -> dict[str, float] | None:
    """The metrics a training run logged, or None when the local store does not have the run."""
    use_local_mlflow(settings)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return dict(mlflow.MlflowClient().get_run(run_id).data.metrics)
    except MlflowException:
        return None


def check_gate(settings: config.Settings, source_uri: str, force: bool = False) -> gate.Decision:
    """Compare the run about to be served with its base model and the running endpoint's run; raise
    DeployError when it scores worse (unless `force`). A refusal is recorded in the state file and on the run."""
    import mlflow

    candidate = _run_id(source_uri) or source_uri
    deployment = common.read_state(settings).get("deployment") or {}
    serving = deployment.get("backend") == "local" and deployment.get("status") == "running"
    deployed = _run_id(deployment.get("source_uri")) if serving else None
    decision = gate.decide(
        settings, f"run {candidate}", run_metrics(settings, candidate) or {},
        deployed=f"run {deployed}" if deployed else None,
        deployed_metrics=run_metrics(settings, deployed) if deployed else None, force=force,
    )  # fmt: skip
    common.update_state(settings, "gate", decision.record())
    if decision.verdict != "unchecked":
        mlflow.MlflowClient().set_tag(candidate, gate.TAG, decision.verdict)
    try:
        return gate.enforce(decision)
    except gate.GateRefused as exc:
        raise DeployError(str(exc)) from exc


def tag_version(settings: config.Settings, version: str, decision: gate.Decision) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in decision.tags().items():
        client.set_model_version_tag(settings.AZURE_MODEL_NAME, version, key, value)


# --- deploy and teardown -------------------------------------------------------------------------------


def deploy(
    settings: config.Settings, ready_timeout: float = READY_TIMEOUT_S, rotate_key: bool = False, force: bool = False
) -> LocalDeployment:
    """Register the newest fine-tuned model and serve it, replacing a running endpoint in place.

    First the gate (check_gate): a model that scores worse than its base model or the one being
    served is refused with DeployError, unless `force`.

    With `rotate_key`, the new endpoint gets a fresh key, which replaces the stored one only once the
    new endpoint is ready: a failed rotation leaves the old endpoint and its key working.
    Raises DeployError at once if another deploy or teardown of this STATE_DIR is running.
    """
    with deploy_lock(settings):
        return _deploy_locked(settings, ready_timeout, rotate_key, force)


def _deploy_locked(
    settings: config.Settings, ready_timeout: float, rotate_key: bool = False, force: bool = False
) -> LocalDeployment:
    source_uri = trained_model_uri(settings)
    decision = check_gate(settings, source_uri, force)
    host, port = settings.LOCAL_ENDPOINT_HOST, settings.LOCAL_ENDPOINT_PORT
    recorded_pid = read_pid(settings)
    old_pid = running_pid(settings)
    stop_strays(settings, keep=old_pid)
    if recorded_pid is not None and old_pid is None:
        log.warning(
            "the previous endpoint (pid %d) had died (killed or crashed; its log is %s); starting a fresh one",
            recorded_pid, endpoint_dir(settings) / LOG_FILE,
        )
    old_port = (common.read_state(settings).get("deployment") or {}).get("port") if old_pid else None
    if old_port != port and port_answers(host, port):
        raise DeployError(
            f"port {port} on {host} is in use by another program (not an endpoint this project started): "
            "stop it or set LOCAL_ENDPOINT_PORT to a free port"
        )
    version = register_model(settings, source_uri)
    tag_version(settings, version, decision)
    model_uri = f"models:/{settings.AZURE_MODEL_NAME}/{version}"
    log.info("registered %s as %s", source_uri, model_uri)
    key = secrets.token_urlsafe(32) if rotate_key else get_or_create_key(settings)
    try:
        proc = start_server(settings, model_uri, key, ready_timeout)
    except DeployError as exc:
        if old_pid is not None:
            raise DeployError(f"{exc}\nThe previous endpoint (pid {old_pid}) is still serving.") from exc
        raise
    folder = endpoint_dir(settings)
    if rotate_key:
        save_key(settings, key)
        log.info("rotated the endpoint key: now %s; the old key stops working with the old endpoint", common.redact(key))
    common.atomic_write_text(folder / PID_FILE, f"{proc.pid}\n")
    if old_pid is not None:
        outcome = stop_pid(old_pid)
        log.info("previous endpoint (pid %d) %s; pid %d now serves %s", old_pid, outcome, proc.pid, model_uri)
    write_spawned(settings, [proc.pid])
    info = LocalDeployment(
        scoring_uri=scoring_uri(settings),
        key=key,
        pid=proc.pid,
        log_path=folder / LOG_FILE,
        model_uri=model_uri,
        model_name=settings.AZURE_MODEL_NAME,
        model_version=version,
        source_uri=source_uri,
        port=port,
        replaced_pid=old_pid,
    )
    common.update_state(
        settings,
        "deployment",
        {
            "backend": "local",
            "status": "running",
            "model_name": info.model_name,
            "model_version": info.model_version,
            "model_uri": info.model_uri,
            "source_uri": info.source_uri,
            "scoring_uri": info.scoring_uri,
            "openai_base_url": f"{info.base_url}/v1",
            "host": host,
            "port": port,
            "pid": info.pid,
            "log_path": str(info.log_path),
            "gate": decision.verdict,
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return info


def teardown(settings: config.Settings, timeout: float = STOP_TIMEOUT_S) -> str:
    """Stop the local endpoint; a sentence saying what happened.

    Raises DeployError at once if a deploy or another teardown of this STATE_DIR is running.
    """
    with deploy_lock(settings):
        return _teardown_locked(settings, timeout)


def _teardown_locked(settings: config.Settings, timeout: float) -> str:
    pid_path = endpoint_dir(settings) / PID_FILE
    pid = read_pid(settings)
    strays = stop_strays(settings, keep=pid)
    also = f"; stopped {len(strays)} endpoint(s) an interrupted deploy left running (pids {strays})" if strays else ""
    if pid is None:
        return f"no local endpoint is running (no pid file at {pid_path}){also}"
    if not is_endpoint(pid):
        pid_path.unlink(missing_ok=True)
        return f"the local endpoint (pid {pid}) was not running; removed the stale pid file {pid_path}{also}"
    outcome = stop_pid(pid, timeout)
    pid_path.unlink(missing_ok=True)
    write_spawned(settings, [])
    deployment = common.read_state(settings).get("deployment") or {}
    if deployment:
        common.update_state(
            settings, "deployment", {**deployment, "status": "stopped", "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        )
    where = deployment.get("scoring_uri", f"port {settings.LOCAL_ENDPOINT_PORT}")
    return f"local endpoint {outcome} (pid {pid}, {deployment.get('model_uri', 'model')} at {where}){also}"


def chat_format_of(settings: config.Settings, model_uri: str) -> str:
    """The deployed model's family (config.CHAT_FORMATS), from the prompt template it was packaged with."""
    use_local_mlflow(settings)
    import mlflow
    from mlflow.models import Model

    from finetune_phi.training import job_module

    chat_format = job_module("chat_format")
    mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/MLmodel")
    template = (Model.load(mlmodel).metadata or {}).get("prompt_template")
    return chat_format.turn_format_of(template) if template else chat_format.DEFAULT_TURN_FORMAT
