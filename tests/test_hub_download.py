"""A base model named by its Hub id downloads with the user's own Hugging Face settings, end to end.

The Hub here is tests/hub_standin.py on 127.0.0.1 (HF_ENDPOINT): the real huggingface_hub client and
transformers download from it as from huggingface.co. The repository it serves is a tiny Phi-3 that
is gated, so the download only works if the user's HF_TOKEN reaches the Hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from hub_standin import HubStandIn

import config
from finetune_phi.training import job_module
from helpers_pf import flow_answers, pipeline_env, run

REPO = Path(__file__).resolve().parents[1]
PF = str(Path(sys.executable).parent / "pf")
HUB_ID = "contoso/phi-3-tiny-instruct"
TOKEN = "hf_standin_token_0123456789"
# The switches conftest sets for every test; a user who downloads from the Hub has none of them.
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Phi-3 saved as a Hub repository holds it: config, safetensors, tokenizer, chat template."""
    from finetune_phi.data import prepare_dataset

    tmp = tmp_path_factory.mktemp("hub-repo")
    train = tmp / "train.jsonl"
    prepare_dataset("demo", train_path=train, test_path=tmp / "test.jsonl", dataset_name="", split="",
                    percent=None, test_size=0.2, seed=42)  # fmt: skip
    model, tokenizer = job_module("tiny_model").build_tiny(train, 7)
    folder = tmp / "repo"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def hub(hub_repo: Path) -> Iterator[HubStandIn]:
    with HubStandIn() as standin:
        standin.add(HUB_ID, hub_repo, token=TOKEN)
        yield standin


def user_env(tmp_path: Path, hub: HubStandIn, **extra: str) -> dict[str, str]:
    """A user's shell: an empty Hugging Face cache, the Hub at HF_ENDPOINT, a token, no offline switch."""
    shell = {k: v for k, v in os.environ.items() if k not in OFFLINE_SWITCHES}
    return pipeline_env(shell, tmp_path, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN, **extra)


def failed_fine_tune_line(tmp_path: Path, env: dict[str, str]) -> str:
    """Run fine_tune.py on HUB_ID as the job runs it; it must fail (exit 1): its last line of stderr."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 4
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [sys.executable, "fine_tune.py", "--train-file", str(data), "--eval-file", str(data),
            "--model_output_dir", str(tmp_path / "out"), "--model", HUB_ID, "--eval-max-rows", "0"]  # fmt: skip
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run(argv, cwd=REPO / "finetuning_dir", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_setup_ml_downloads_a_hub_model_then_deploy_and_the_flow_answer(tmp_path: Path, hub: HubStandIn) -> None:
    env = user_env(tmp_path, hub)
    assert run([sys.executable, "download_dataset.py", "--source", "demo"], env).returncode == 0

    trained = run([sys.executable, "setup_ml.py", "--model", HUB_ID], env)
    assert trained.returncode == 0, trained.stderr[-4000:]
    fetched = hub.downloads(HUB_ID)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert name in fetched, f"{name} was not downloaded from the Hub stand-in: {fetched}"
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}  # the user's HF_TOKEN, on every call
    assert any((tmp_path / "hf-home" / "hub").rglob("model.safetensors")), "not cached in the user's HF_HOME"

    settings = config.load(env=env)
    from finetune_phi.common import read_state

    training = read_state(settings)["training"]
    model_dir = Path(training["model_output_dir"])
    # One copy on disk: the model folder is the run's artifact itself, nothing under the state's outputs/.
    assert model_dir.parts[-3:] == (training["run_id"], "artifacts", "model"), model_dir
    assert not (settings.state_dir / "outputs").exists()
    weights = list(model_dir.rglob("*.safetensors"))
    assert len(weights) == 1
    from finetune_phi.endpoint.loading import read_weights

    # LoRA may run on a bf16 base on this CPU; the model is saved in the published base's dtype (float32).
    assert read_weights(weights[0].parent).saved_dtype == "float32"

    try:
        deployed = run([sys.executable, "deploy_model.py", "--force"], env)
        assert deployed.returncode == 0, deployed.stderr[-4000:]
        from finetune_phi.pf_env import subprocess_env

        answers = flow_answers(PF, subprocess_env(settings, env), {"standard": (".", "input_data=Who founded Microsoft?")})
        assert isinstance(answers["standard"], str)
    finally:
        run([sys.executable, "deploy_model.py", "--teardown"], env)


def test_offline_mode_with_an_empty_cache_fails_in_one_line_naming_hf_hub_offline(tmp_path: Path, hub: HubStandIn) -> None:
    last = failed_fine_tune_line(tmp_path, user_env(tmp_path, hub, HF_HUB_OFFLINE="1"))
    assert last.startswith(f"fine_tune.py: {HUB_ID} is not in the Hugging Face cache"), last
    assert "HF_HUB_OFFLINE" in last and "unset" in last
    assert hub.requests == []  # offline means offline


def test_a_gated_model_without_the_token_fails_in_one_line_naming_hf_token(tmp_path: Path, hub: HubStandIn) -> None:
    env = user_env(tmp_path, hub)
    del env["HF_TOKEN"]
    last = failed_fine_tune_line(tmp_path, env)
    assert last.startswith(f"fine_tune.py: could not download {HUB_ID} from {hub.url}"), last
    assert "gated" in last and "HF_TOKEN" in last
    assert hub.requests and all(r.authorization is None for r in hub.requests)


def test_only_a_hub_fine_tune_leaves_the_users_offline_setting_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_phi.mlflow_store import mlflow_env

    settings = config.load(env={}, dotenv_path=tmp_path / "none", STATE_DIR=str(tmp_path / "state"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert mlflow_env(settings)["HF_HUB_OFFLINE"] == "1"  # local files only: nothing to ask the Hub
    assert "HF_HUB_OFFLINE" not in mlflow_env(settings, offline=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert mlflow_env(settings)["HF_HUB_OFFLINE"] == "0"  # the user's explicit choice is kept
