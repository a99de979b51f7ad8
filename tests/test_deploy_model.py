"""deploy_model.publish: what the deploy step hands the flows (.env and the kind of deployment)."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

import config
import deploy_model
from chat_flow import endpoint_client


def _settings(tmp_path: Path) -> config.Settings:
    return config.load(env={}, dotenv_path=tmp_path / "none", ENV_FILE=str(tmp_path / "deploy.env"),
                       STATE_DIR=str(tmp_path / "state"))


@pytest.mark.parametrize("kind", config.ENDPOINT_KINDS)
def test_publish_records_the_kind_where_config_and_the_flows_read_it(tmp_path: Path, kind: str) -> None:
    settings = _settings(tmp_path)
    deploy_model.publish(settings, "https://e.westus.inference.ml.azure.com/score", "k" * 32, kind, connection=False)
    assert stat.S_IMODE(settings.env_file.stat().st_mode) == 0o600
    assert config.load(env={"ENV_FILE": str(settings.env_file)}).AZURE_ML_ENDPOINT_KIND == kind
    found = endpoint_client.endpoint_from_environment({"ENV_FILE": str(settings.env_file)}, folders=[])
    assert (found.url, found.kind) == ("https://e.westus.inference.ml.azure.com/score", kind)


def test_publish_refuses_an_unknown_kind_before_writing(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with pytest.raises(config.ConfigError, match="local, azure-mlflow, azure-catalog"):
        deploy_model.publish(settings, "http://127.0.0.1:1/score", "k", "mlflow", connection=False)
    assert not settings.env_file.exists()


def test_azure_deploy_publishes_the_kind_of_deployment_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_phi.azure import workflow

    published = []
    monkeypatch.setattr(deploy_model, "publish",
                        lambda s, uri, key, kind, chat_format, connection: published.append((kind, chat_format)))  # fmt: skip
    args = SimpleNamespace(dry_run=None, check=False, teardown=False, job_name=None, no_connection=True, force=False)
    settings = _settings(tmp_path)
    for kind in ("azure-mlflow", "azure-catalog"):
        info = workflow.AzureDeployInfo("e", "d", "https://e/score", "azureml:m:1", "job", key="k", kind=kind)
        monkeypatch.setattr(workflow, "deploy", lambda s, job_name=None, force=False: info)
        assert deploy_model.run_azure(settings, args) == 0
    # The family follows the base model's id: the registered model itself is in the workspace.
    assert deploy_model.run_azure(settings.with_overrides(BASE_MODEL="microsoft/Phi-4-mini-instruct"), args) == 0
    assert published == [("azure-mlflow", "phi3"), ("azure-catalog", "phi3"), ("azure-catalog", "phi4-mini")]
