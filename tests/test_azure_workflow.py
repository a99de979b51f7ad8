"""The Azure workflow where the wire-level tests (test_azure_wire.py) cannot reach or need not go.

Everything the real SDK sends and receives is tested there, through MLClient and a local HTTPS
stand-in. Here, with the hand-written fake: steps that must send nothing at all (no data, no recorded
job, a refused credential) and a final state other than Succeeded after an operation that itself
succeeded (Azure does not produce it on demand; the check guards against it all the same).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import deploy_model
import setup_ml
from fake_mlclient import FILLED_IN, FakeMLClient, RefusingCredential, azure_settings
from finetune_phi import common
from finetune_phi.azure import client, workflow


# --- training ----------------------------------------------------------------------------------------


def test_submit_without_data_names_the_step_to_run(tmp_path: Path) -> None:
    s = azure_settings(tmp_path, data=False)
    fake = FakeMLClient()
    with pytest.raises(FileNotFoundError, match="download_dataset.py"):
        workflow.submit_training(s, "command", stream=False, ml_client=fake)
    assert fake.calls == []


# --- deployment --------------------------------------------------------------------------------------


def _trained(tmp_path: Path, **overrides):
    s = azure_settings(tmp_path, **overrides)
    common.update_state(s, "training", {"backend": "azure", "job_name": "job-77", "mode": "command",
                                        "output": "model_output"})  # fmt: skip
    return s


def test_a_final_state_other_than_succeeded_raises_and_leaves_traffic_alone(tmp_path: Path) -> None:
    s = _trained(tmp_path)
    fake = FakeMLClient(deployment_state="Failed")
    with pytest.raises(RuntimeError, match="ended in state Failed.*az ml online-deployment get-logs"):
        workflow.deploy(s, ml_client=fake)
    assert len(fake.find("online_endpoints.begin_create_or_update")) == 1  # created, never routed
    assert "online_endpoints.get_keys" not in fake.names()
    assert "deployment" not in common.read_state(s)


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


def _no_mlclient(*args: object, **kwargs: object) -> None:
    raise AssertionError("an MLClient was built after the credential was refused")


def test_refused_credential_fails_at_once_and_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # "At once": the first refused token request ends the step. The credential is asked once (a
    # refusal is final: asking again would only add the chain's delays), and no MLClient is built,
    # so nothing reaches Azure.
    import azure.ai.ml

    monkeypatch.setattr(azure.ai.ml, "MLClient", _no_mlclient)
    s = azure_settings(tmp_path)
    refusing = RefusingCredential()
    with pytest.raises(RuntimeError, match="az login"):
        workflow.submit_training(s, "command", stream=False, credential=refusing)
    assert refusing.calls == 1

    _azure_env(monkeypatch, tmp_path)
    made: list[RefusingCredential] = []
    monkeypatch.setattr(client, "make_credential", lambda settings: made.append(RefusingCredential()) or made[-1])
    caplog.set_level(logging.INFO)
    assert setup_ml.main(["--backend", "azure", "--no-stream"]) == 1
    assert deploy_model.main(["--backend", "azure", "--teardown"]) == 1
    assert [c.calls for c in made] == [1, 1]  # one credential per command, asked once each
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("refused the credential" in e and "az login" in e for e in errors)


