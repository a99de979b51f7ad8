"""The local MLflow store: the environment a process needs to use it, and runs created in it.

Tracking and the model registry share one sqlite database (settings.tracking_uri) and one artifact
folder (settings.artifact_root) in STATE_DIR; the fine-tune, the deploy, the endpoint and the demo all
reach them through here.
"""

from __future__ import annotations

import os

import config


def mlflow_env(settings: config.Settings, *, offline: bool = True) -> dict[str, str]:
    """Environment for any process that talks to the local MLflow store: quiet, and offline unless told not to.

    Offline (HF_HUB_OFFLINE=1 unless the user set it) suits every process that loads only local files:
    MLflow otherwise looks a model's name up on the Hub, and waits ~47 s for it without a network.
    A fine-tune of a Hub model passes offline=False: it downloads its base with the user's own
    HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT, HF_HOME and proxies.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if offline:
        env["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "1")
    return env


def use_local_mlflow(settings: config.Settings) -> None:
    """Point this process's MLflow (tracking and registry) at the local store, quietly.

    This process's HF_HUB_OFFLINE is left as the user set it: the fine-tunes it starts inherit it."""
    os.environ.update(mlflow_env(settings, offline=False))
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)


def create_local_run(settings: config.Settings) -> tuple[str, str, str]:
    """Create the MLflow run up front so the caller knows its id; fine_tune.py joins it via MLFLOW_RUN_ID.

    Returns (run id, experiment id, the run's artifact URI)."""
    use_local_mlflow(settings)
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(settings.AZURE_EXPERIMENT_NAME)
    if experiment is None:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        experiment_id = client.create_experiment(
            settings.AZURE_EXPERIMENT_NAME, artifact_location=settings.artifact_root.as_uri()
        )
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=settings.AZURE_JOB_DISPLAY_NAME, tags={"backend": "local"})
    return run.info.run_id, experiment_id, run.info.artifact_uri
