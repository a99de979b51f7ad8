"""What the job records in MLflow: the run's params and the Trainer's metrics, and the fine-tuned model
as an MLflow model (its signature and params schema, its requirements and prompt template), written
once into the output folder in the base model's dtype and logged as the run's "model" artifact
(uploaded, or written in place into a local artifact store).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import chat_format
from chat_format import GENERATION_DEFAULTS

from recipe import LORA_TARGET_MODULES, Device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

log = logging.getLogger("fine_tune")


MODEL_ARTIFACT_PATH = "model"

EXAMPLE_QUESTION = "Who founded Microsoft?"

# The MLflow param type of each generation setting's Python type (bool first: a bool is an int too).
MLFLOW_PARAM_TYPES: tuple[tuple[type, str], ...] = ((bool, "boolean"), (int, "long"), (float, "double"))

# --- the run's record ------------------------------------------------------------------------------


def make_metrics_callback() -> TrainerCallback:
    """Trainer logs to MLflow, in the run that is already active (report_to="mlflow" would open its own)."""
    import mlflow
    from transformers import TrainerCallback

    renames = {"loss": "train_loss", "train_loss": "train_loss_avg"}

    class MlflowMetrics(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            metrics = {
                renames.get(k, k): float(v)
                for k, v in logs.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            }
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step)

    return MlflowMetrics()


def run_params(args: argparse.Namespace, peft: str, device: Device, model: PreTrainedModel, n_train: int, n_eval: int) -> dict[str, Any]:
    """What a reader of the run needs to reproduce it; Azure ML refuses runs with > 200 params."""
    import torch
    import transformers
    import trl

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # after PEFT wrapping
    params = {
        "base_model": args.model,
        "peft": peft,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_seq_length": args.max_seq_length,
        "seed": args.seed,
        "warmup_ratio": args.warmup_ratio,
        "assistant_only_loss": args.assistant_only_loss,
        "train_rows": n_train,
        "eval_rows": n_eval,
        "parameters": model.num_parameters(),
        "trainable_parameters": trainable,
        "device": device.name,
        "bf16": device.bf16,
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    if peft == "lora":
        params |= {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                   "lora_target_modules": ",".join(LORA_TARGET_MODULES)}  # fmt: skip
    return params


# --- the model --------------------------------------------------------------------------------------


def pip_requirements() -> list[str]:
    """Explicit: inference of requirements imports every module and fails looking for torchvision."""
    import accelerate
    import mlflow
    import tokenizers
    import torch
    import transformers

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"  # drop "+cpu": the serving host picks its own build

    return [
        pin("mlflow", mlflow.__version__),
        pin("torch", torch.__version__),
        pin("transformers", transformers.__version__),
        pin("tokenizers", tokenizers.__version__),
        pin("accelerate", accelerate.__version__),
    ]

def generation_params_schema() -> Any:
    """Request `params` the model honours; without a params schema MLflow drops them with a warning.

    MLflow fills in these defaults for every param a request leaves out (Azure's scoring script
    too), so they ARE the model's defaults: chat_format.GENERATION_DEFAULTS, one param each.
    The local endpoint reads them back from the saved signature, so both answer alike.
    """
    import dataclasses

    from mlflow.types.schema import ParamSchema, ParamSpec

    def mlflow_type(value: object) -> str:
        return next(name for python_type, name in MLFLOW_PARAM_TYPES if isinstance(value, python_type))

    defaults = dataclasses.asdict(GENERATION_DEFAULTS)
    return ParamSchema([ParamSpec(name, mlflow_type(value), value) for name, value in defaults.items()])

def model_signature() -> Any:
    """A string in, a string out, plus the params schema: what Azure's no-code scoring script serves.

    (Not the llm/v1/chat signature: Azure's scoring script crashes at import on it.)
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=generation_params_schema()
    )

def save_mlflow_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, run_id: str | None) -> None:
    """Write an MLflow text-generation model folder (MLmodel at its root) at `path`.

    Task text-generation with a string input: Azure ML's no-code deployment of an MLflow model
    (mlflow_score_script.py under azureml-inference-server-http) serves it as
    `{"input_data": ["prompt", ...], "params": {...}}` -> `["reply", ...]`. Each input is wrapped in the
    model's own user turn (chat_format.prompt_template: derived from the tokenizer's chat template, so
    Phi-3's for Phi-3, Phi-4-mini's for Phi-4-mini), and only the generated text comes back
    (return_full_text False). For Phi-3 a conversation travels as ONE string, the conversation contract
    of chat_format.encode_prompt, which the template turns into exactly Phi-3's chat template rendering
    of the conversation. Generation stops at <|end|> (in the generation config's eos_token_id). The
    tokenizer keeps its published chat template, which the local endpoint's /v1/chat/completions uses.
    """
    import mlflow
    import torch

    from mlflow.models import Model

    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(path),
        task="text-generation",
        signature=model_signature(),
        prompt_template=chat_format.prompt_template(tokenizer),
        pip_requirements=pip_requirements(),
        input_example=([EXAMPLE_QUESTION], {"max_new_tokens": 32}),
        model_config={"return_full_text": False},
        mlflow_model=Model(run_id=run_id, artifact_path=MODEL_ARTIFACT_PATH),
        # The dtype MLflow, and so Azure's no-code scoring, loads the model in; MLflow would record the
        # weights' own (bf16). Azure's CPU deployment sizes (E-series) have no native bf16 units, where
        # bf16 runs through slow conversions, so they keep serving float32 as they always did. The
        # local endpoint picks its dtype from the weights and the machine (finetune_phi/endpoint/loading.py).
        torch_dtype=torch.float32,
    )
    make_readable(path)

def make_readable(root: Path) -> None:
    """transformers 5 writes weights with mode 0600; the serving process may run as another user."""
    for path in [root, *root.rglob("*")]:
        extra = stat.S_IRGRP | stat.S_IROTH | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0)
        path.chmod(path.stat().st_mode | extra)

def write_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, run_id: str | None) -> None:
    """Save into a sibling temp folder and rename, so a crash never leaves half a model behind.

    An existing empty folder (Azure ML mounts the job output before the job starts) cannot be
    replaced by a rename, so it is written in place.
    """
    if out.is_dir():  # validate_args checked it is empty
        save_mlflow_model(model, tokenizer, out, run_id)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_mlflow_model(model, tokenizer, tmp, run_id)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

def in_dtype(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """The model in `dtype` (the base's own): a bf16 base trained in float32 must not come back twice its size."""
    import torch

    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or model.dtype == target:
        return model
    log.info("casting the fine-tuned model from %s to %s, the base model's dtype, before saving", model.dtype, target)
    return model.to(dtype=target)

def save_and_log(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, run_id: str) -> str:
    """Serialize once into `out`, then make it the run's "model" artifact; returns its runs:/ URI.

    When `out` already is that artifact (the local backend points --model_output_dir into its own file
    artifact store), nothing is copied: a fine-tuned Phi-3-mini is 7 GiB, and a second copy per run
    would double the disk every fine-tune leaves behind.
    """
    import mlflow

    write_model_folder(model, tokenizer, out, run_id)
    artifact_dir = local_artifact_dir(mlflow.get_run(run_id).info.artifact_uri)
    if artifact_dir is not None and out.resolve() == (artifact_dir / MODEL_ARTIFACT_PATH).resolve():
        log.info("model written straight into the run's artifact store (%s): no second copy", out)
    else:
        # Plain run artifacts rather than an MLflow 3 LoggedModel: runs:/<run_id>/model loads and
        # registers from them in every store, Azure ML's included.
        mlflow.log_artifacts(str(out), artifact_path=MODEL_ARTIFACT_PATH)
    return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"

def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder behind a file: artifact URI (a local MLflow store); None for a remote store."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a bare path (C:\... on Windows)
        return Path(artifact_uri)
    return None
