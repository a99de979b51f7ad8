"""A tiny random Phi-3 logged and registered in a throw-away MLflow store, for endpoint tests.

The tokenizer is the real Phi-3-mini one where testkit.fixtures finds it, so prompt formatting,
stop tokens and decoding run exactly as they would for the real model. Without it (a clone with
nothing beside it), the project's own stand-in: finetuning_dir/tiny_model.py's byte-level BPE, which
carries the same special tokens and chat template, plus Phi-3's unused <|placeholder1..6|> tokens
(tests bias the model towards one as "a special token that never stops generation"). Tests that
depend on the real vocabulary itself request the `phi3_tokenizer_dir` fixture instead. Only the
weights are random (hidden size 32, one layer: builds in about a second).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from conftest import OFFLINE_ENV

from testkit import fixtures

log = logging.getLogger(__name__)

# Special tokens of the real Phi-3-mini vocabulary that its chat format never emits.
PHI3_PLACEHOLDERS = tuple(f"<|placeholder{i}|>" for i in range(1, 7))

# Logging a transformers model without explicit requirements makes MLflow infer them, probing for
# torchvision (slow, and absent here); the server loads the model in this same environment, so names are enough.
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


@functools.cache
def stand_in_tokenizer_dir() -> Path:
    """The project's locally trained tokenizer (trained on the demo rows), saved once per test session."""
    from finetune_phi.demo_data import demo_rows
    from finetune_phi.training import job_module

    tiny_model = job_module("tiny_model")

    tokenizer = tiny_model.build_tokenizer(tiny_model.corpus_from_rows([r["messages"] for r in demo_rows()]))
    tokenizer.add_tokens(list(PHI3_PLACEHOLDERS), special_tokens=True)
    folder = Path(tempfile.mkdtemp(prefix="finetune-phi-stand-in-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer.save_pretrained(folder)
    return folder


# Phi-4-mini-instruct's published special tokens, as its tokenizer_config.json lists them: (content, rstrip,
# special) per added token. <|endoftext|> is its BOS, EOS, pad and unk at once, and BOS is not added.
# test_families checks this against the real file wherever testkit.fixtures finds it.
PHI4_MINI_ADDED_TOKENS = (
    ("<|endoftext|>", False, True), ("<|endofprompt|>", False, True), ("<|assistant|>", True, True),
    ("<|end|>", True, True), ("<|user|>", True, True), ("<|system|>", True, True), ("<|tool|>", True, False),
    ("<|/tool|>", True, False), ("<|tool_call|>", True, False), ("<|/tool_call|>", True, False),
    ("<|tool_response|>", True, False), ("<|tag|>", True, True),
)  # fmt: skip
PHI4_MINI_ROLES = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False}  # fmt: skip


@functools.cache
def stand_in_phi4_mini_tokenizer_dir() -> Path:
    """The project's stand-in vocabulary dressed as Phi-4-mini's tokenizer: its added tokens with their
    flags, its roles (one token for BOS, EOS, pad and unk) and its chat template. Only the vocabulary
    (Phi-4-mini's is 200k tokens) and so the token ids differ from the real one."""
    import json

    from finetune_phi.training import job_module

    chat_format = job_module("chat_format")
    folder = Path(tempfile.mkdtemp(prefix="finetune-phi-stand-in-phi4-mini-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    source = stand_in_tokenizer_dir()
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())
    added = {t["content"]: t for t in tokenizer_json["added_tokens"]}
    next_id = max([*tokenizer_json["model"]["vocab"].values(), *(t["id"] for t in added.values())]) + 1
    for content, rstrip, special in PHI4_MINI_ADDED_TOKENS:
        if content not in added:
            added[content] = {"id": next_id, "content": content, "single_word": False, "lstrip": False,
                              "normalized": False}  # fmt: skip
            next_id += 1
        added[content].update(rstrip=rstrip, special=special)
    tokenizer_json["added_tokens"] = sorted(added.values(), key=lambda t: t["id"])
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 131072, "chat_template": chat_format.PHI4_MINI_CHAT_TEMPLATE, **PHI4_MINI_ROLES}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder


def _real_or_stand_in(resolver: Callable[[], Path], stand_in: Callable[[], Path], what: str) -> Path:
    try:
        return resolver()
    except fixtures.FixtureUnavailable as exc:
        log.info("%s is the project's stand-in: %s", what, exc)
        return stand_in()


def phi4_mini_tokenizer_dir() -> Path:
    """The real Phi-4-mini-instruct tokenizer where the fixtures resolver finds one, else the stand-in above."""
    return _real_or_stand_in(fixtures.phi4_mini_tokenizer_dir, stand_in_phi4_mini_tokenizer_dir, "the Phi-4-mini tokenizer")


def default_tokenizer_dir() -> Path:
    """The real Phi-3 tokenizer where the fixtures resolver finds one, else the project's stand-in."""
    return _real_or_stand_in(fixtures.phi3_tokenizer_dir, stand_in_tokenizer_dir, "tiny_phi3's tokenizer")


def tiny_phi3(tokenizer_dir: Path | None = None, seed: int = 0, end_is_eos: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer): a random 1-layer Phi3ForCausalLM over `tokenizer_dir` (default: see the module doc).

    `end_is_eos=False` leaves <|end|> out of the model's own eos_token_id (only <|endoftext|>),
    as some saved configs do: the server must still stop at the end of the assistant's turn.
    """
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or default_tokenizer_dir())
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


@contextlib.contextmanager
def slowed(model: Any, seconds: float) -> Iterator[None]:
    """Every decoding step of `model` takes at least `seconds` longer inside the block.

    For tests of the request timeout: the generation they cut must outlast it by construction,
    whichever tokenizer (and so vocabulary size and speed) tiny_phi3 was built with. The hook is on
    lm_head, which runs once per step both in model.forward and in the batcher's packed step.
    """

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        time.sleep(seconds)
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
