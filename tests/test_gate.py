"""The gate before serving (finetune_phi/gate.py): its decisions, and deploy_model.py refusing a worse model
on both backends, then deploying it with --force and recording that it was forced."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from conftest import free_port

import config
import deploy_model
from finetune_phi import common, gate

# What `make demo` records on its run (24 held-out demo questions, 48 tokens): F1 0.03 -> 0.70,
# stop rate 0% -> 100%.
DEMO = {"f1_before": 0.03, "f1_after": 0.70, "rougeL_before": 0.03, "rougeL_after": 0.70,
        "stop_rate_before": 0.0, "stop_rate_after": 1.0}  # fmt: skip
UNDER_TRAINED = {"f1_before": 0.03, "f1_after": 0.04, "rougeL_before": 0.03, "rougeL_after": 0.04,
                 "stop_rate_before": 0.0, "stop_rate_after": 0.0}  # fmt: skip


def _settings(tmp_path: Path, **values: object) -> config.Settings:
    return config.load(env={}, dotenv_path=tmp_path / "none", STATE_DIR=str(tmp_path / "state"), **values)


# --- decisions ---------------------------------------------------------------------------------------------


def test_a_fine_tune_better_than_its_base_and_the_deployed_model_passes(tmp_path: Path) -> None:
    d = gate.decide(_settings(tmp_path), "run new", DEMO, deployed="run old", deployed_metrics=UNDER_TRAINED)
    assert d.verdict == "passed" and d.problems == []
    assert d.compared_with == ["the base model (same run)", "the deployed model (run old)"]
    assert d.tags()[gate.TAG] == "passed"


def test_a_worse_model_is_refused_naming_the_metric_both_values_and_force(tmp_path: Path) -> None:
    d = gate.decide(_settings(tmp_path), "run new", UNDER_TRAINED, deployed="run old", deployed_metrics=DEMO)
    assert d.verdict == "refused"
    assert d.problems == ["f1 0.04 is below the deployed model (run old)'s 0.70 by more than EVAL_GATE_MARGIN=0.02",
                          "stop_rate 0.00 is below the deployed model (run old)'s 1.00"]  # fmt: skip
    assert "--force" in d.message and d.message.startswith("refusing to deploy run new")
    with pytest.raises(gate.GateRefused, match="f1 0.04 .* 0.70"):
        gate.enforce(d)
    forced = gate.decide(_settings(tmp_path), "run new", UNDER_TRAINED, deployed="run old", deployed_metrics=DEMO,
                         force=True)  # fmt: skip
    assert forced.verdict == "forced" and gate.enforce(forced) is forced
    assert forced.message.startswith("deploying run new although it scores worse (--force)")


def test_margin_primary_metric_and_stop_rate_each_decide(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    slightly = {**DEMO, "f1_after": 0.69}
    assert gate.decide(s, "run new", slightly, deployed="run old", deployed_metrics=DEMO).verdict == "passed"
    assert gate.decide(_settings(tmp_path, EVAL_GATE_MARGIN=0.0), "run new", slightly, deployed="run old",
                       deployed_metrics=DEMO).verdict == "refused"  # fmt: skip
    # One answer in 24 more that never stops: refused, whatever the margin.
    stops_less = {**DEMO, "stop_rate_after": 23 / 24}
    assert gate.decide(s, "run new", stops_less, deployed="run old", deployed_metrics=DEMO).problems == [
        "stop_rate 0.96 is below the deployed model (run old)'s 1.00"]
    # Worse than its own base model: refused with no deployment at all.
    worse_than_base = {**DEMO, "f1_before": 0.80}
    assert gate.decide(s, "run new", worse_than_base).problems == [
        "f1 0.70 is below the base model (same run)'s 0.80 by more than EVAL_GATE_MARGIN=0.02"]
    # The primary metric is configurable: ROUGE-L instead of F1.
    rouge_worse = {**DEMO, "rougeL_after": 0.5}
    assert gate.decide(s, "run new", rouge_worse, deployed="run old", deployed_metrics=DEMO).verdict == "passed"
    assert gate.decide(_settings(tmp_path, EVAL_PRIMARY_METRIC="rougeL"), "run new", rouge_worse, deployed="run old",
                       deployed_metrics=DEMO).verdict == "refused"  # fmt: skip


def test_a_run_without_evaluation_is_deployed_unchecked_and_the_same_run_is_not_compared_with_itself(
    tmp_path: Path,
) -> None:
    s = _settings(tmp_path)
    assert gate.decide(s, "run new", {"eval_loss_after": 1.0}, deployed="run old", deployed_metrics=DEMO).verdict == "unchecked"
    same = gate.decide(s, "run a", DEMO, deployed="run a", deployed_metrics=DEMO)
    assert same.verdict == "passed" and same.compared_with == ["the base model (same run)"]
    no_eval_deployed = gate.decide(s, "run new", DEMO, deployed="run old", deployed_metrics={})
    assert no_eval_deployed.compared_with == ["the base model (same run)"]


def test_config_rejects_a_gate_metric_it_cannot_compare(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="EVAL_PRIMARY_METRIC='stop_rate'.*f1, rougeL"):
        _settings(tmp_path, EVAL_PRIMARY_METRIC="stop_rate")


# --- Azure: the job's scores, a refused deploy sends nothing, --force tags the registered model -----------------


def test_azure_deploy_refuses_a_worse_job_then_force_registers_it_tagged_forced(tmp_path: Path) -> None:
    from fake_mlclient import FakeMLClient, azure_settings
    from finetune_phi.azure import workflow

    s = azure_settings(tmp_path)
    common.update_state(s, "training", {"backend": "azure", "job_name": "job-new", "mode": "command",
                                        "output": "model_output"})  # fmt: skip
    common.update_state(s, "deployment", {"backend": "azure", "kind": "azure-mlflow", "job_name": "job-old"})
    scores = {"job-new": UNDER_TRAINED, "job-old": DEMO}
    fake = FakeMLClient()
    with pytest.raises(gate.GateRefused, match=r"refusing to deploy job job-new: f1 0.04 .*job job-old.*0.70.*--force"):
        workflow.deploy(s, ml_client=fake, metrics=scores.get)
    assert fake.calls == []  # nothing registered, created or routed
    assert common.read_state(s)["gate"]["verdict"] == "refused"

    info = workflow.deploy(s, ml_client=fake, metrics=scores.get, force=True)
    (register,) = fake.find("models.create_or_update")
    assert register.args[0].tags[gate.TAG] == "forced"
    assert "although it scores worse (--force)" in register.args[0].tags[gate.DETAIL_TAG]
    state = common.read_state(s)
    assert state["gate"]["verdict"] == state["deployment"]["gate"] == "forced"
    assert info.job_name == "job-new"


def test_azure_job_scores_come_from_the_jobs_eval_scores_tag() -> None:
    from types import SimpleNamespace

    from finetune_phi.azure import workflow

    class Jobs:
        def get(self, name: str) -> SimpleNamespace:
            return SimpleNamespace(name=name, tags={gate.SCORES_TAG: '{"f1_after": 0.7, "stop_rate_after": 1}'})

    assert workflow.job_metrics(SimpleNamespace(jobs=Jobs()), "job-1") == {"f1_after": 0.7, "stop_rate_after": 1.0}


# --- local, end to end: a real under-trained run against the deployed demo model's scores ------------------------


@pytest.mark.slow
def test_deploy_refuses_an_under_trained_run_and_deploys_it_with_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    import download_dataset
    import setup_ml
    from finetune_phi import local_deploy

    values = {
        "BACKEND": "local", "STATE_DIR": str(tmp_path / "state"), "ENV_FILE": str(tmp_path / "flows.env"),
        "TRAIN_DATA_PATH": str(tmp_path / "data" / "train_data.jsonl"),
        "TEST_DATA_PATH": str(tmp_path / "data" / "test_data.jsonl"),
        "LOCAL_ENDPOINT_PORT": str(free_port()), "AZURE_MODEL_NAME": f"gate-{uuid.uuid4().hex[:8]}",
        # One optimizer step: the deliberately under-trained run, evaluated on all 24 demo questions.
        "MAX_STEPS": "1", "LEARNING_RATE": "3e-3", "EVAL_MAX_ROWS": "24", "EVAL_MAX_NEW_TOKENS": "16",
    }  # fmt: skip
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = config.load()
    assert download_dataset.main(["--source", "demo"]) == 0
    assert setup_ml.main([]) == 0
    candidate = common.read_state(settings)["training"]["run_id"]
    client = mlflow.MlflowClient(settings.tracking_uri)
    metrics = client.get_run(candidate).data.metrics
    assert metrics["eval_rows"] == 24 and metrics["stop_rate_after"] < 1.0
    assert metrics["f1_after"] < DEMO["f1_after"] - settings.EVAL_GATE_MARGIN

    # The deployed demo model: a run in the same store with the scores `make demo` records, being served.
    experiment = client.get_experiment_by_name(settings.AZURE_EXPERIMENT_NAME).experiment_id
    deployed = client.create_run(experiment, run_name="demo").info.run_id
    for name, value in DEMO.items():
        client.log_metric(deployed, name, value)
    common.update_state(settings, "deployment", {"backend": "local", "status": "running",
                                                 "source_uri": f"runs:/{deployed}/model"})  # fmt: skip

    caplog.set_level(logging.INFO)
    assert deploy_model.main(["--no-connection"]) == 1
    error = next(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert error.startswith(f"refusing to deploy run {candidate}: f1 {metrics['f1_after']:.2f} is below the deployed "
                            f"model (run {deployed})'s 0.70")  # fmt: skip
    assert "python deploy_model.py --force" in error
    assert common.read_state(settings)["gate"]["verdict"] == "refused"
    assert client.get_run(candidate).data.tags[gate.TAG] == "refused"
    assert client.search_model_versions(f"name='{settings.AZURE_MODEL_NAME}'") == []  # nothing registered

    try:
        assert deploy_model.main(["--no-connection", "--force"]) == 0
        state = common.read_state(settings)
        assert state["gate"]["verdict"] == state["deployment"]["gate"] == "forced"
        (version,) = client.search_model_versions(f"name='{settings.AZURE_MODEL_NAME}'")
        assert version.tags[gate.TAG] == "forced" and version.run_id == candidate
        assert client.get_run(candidate).data.tags[gate.TAG] == "forced"
        assert any("although it scores worse (--force)" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records)  # fmt: skip
    finally:
        local_deploy.teardown(settings)
