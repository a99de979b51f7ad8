"""A tiny random Phi-3 logged and registered in a throw-away MLflow store, for endpoint tests.

The vocabulary is the real Phi-3-mini tokenizer's (with its chat template and special tokens), so
prompt formatting, stop tokens and decoding run exactly as they would for the real model; only the
weights are random (hidden size 32, one layer: builds in about a second).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from conftest import OFFLINE_ENV, PHI3_TOKENIZER_DIR

# Logging a transformers model without explicit requirements makes MLflow probe for torchvision
# (known-traps.md); the server loads the model in this same environment, so names are enough.
PIP_REQUIREMENTS = ["torch", "transformers", "mlflow"]


@dataclass(frozen=True)
class RegisteredModel:
    tracking_uri: str
    name: str
    version: str
    run_id: str

    @property
    def run_model_uri(self) -> str:
        return f"runs:/{self.run_id}/model"

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def tiny_phi3(tokenizer_dir: Path = PHI3_TOKENIZER_DIR, seed: int = 0, end_is_eos: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer): a random 1-layer Phi3ForCausalLM over the real Phi-3 vocabulary.

    `end_is_eos=False` leaves <|end|> out of the model's own eos_token_id (only <|endoftext|>),
    as some saved configs do: the server must still stop at the end of the assistant's turn.
    """
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"missing fixture {tokenizer_dir}: tests expect ../shared beside the checkout")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = "<unk>"
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_id] if end_is_eos else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).eval()
    return model, tokenizer


def log_and_register(model: Any, tokenizer: Any, folder: Path, name: str) -> RegisteredModel:
    """Log `model` as run artifact `model` (like fine_tune.py does) into a sqlite store in `folder`
    and register it as `name`. Artifacts go to `folder` too: the default root is ./mlruns in the cwd."""
    os.environ.update(OFFLINE_ENV)
    import mlflow

    tracking_uri = sqlite_uri(folder)
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("endpoint-tests")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("endpoint-tests", artifact_location=(folder / "artifacts").as_uri())
    )
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=PIP_REQUIREMENTS,
        )
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    return RegisteredModel(tracking_uri, name, str(version.version), run.info.run_id)


def sqlite_uri(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


_REGISTERED: dict[Path, RegisteredModel] = {}


def registered_tiny_model(folder: Path, name: str = "tiny-phi3") -> RegisteredModel:
    """Build, log and register the tiny model once per folder (test modules share it)."""
    if folder not in _REGISTERED:
        model, tokenizer = tiny_phi3()
        _REGISTERED[folder] = log_and_register(model, tokenizer, folder, name)
    return _REGISTERED[folder]


def biased(model: Any, token_id: int) -> Callable[[], None]:
    """Make `token_id` the model's top choice at every step (generation never stops early); returns the undo."""

    def hook(_module: Any, _inputs: Any, logits: Any) -> Any:
        logits = logits.clone()
        logits[..., token_id] += 1000.0
        return logits

    return model.lm_head.register_forward_hook(hook).remove
