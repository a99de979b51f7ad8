"""The fine-tune command line, shared by the local run and the Azure ML command job.

Both backends run `finetuning_dir/fine_tune.py` with the string `fine_tune_command()` builds:
Azure with `${{inputs.*}}` / `${{outputs.*}}` placeholders that it substitutes, the local
backend with real paths. One builder means the two cannot drift apart.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import config
from finetune_phi.common import update_state
from finetune_phi.mlflow_store import create_local_run, mlflow_env

log = logging.getLogger(__name__)

FINETUNING_DIR = config.ROOT / "finetuning_dir"
ENTRY_SCRIPT = "fine_tune.py"
# Azure ML substitutes these before the shell sees the command, so they must stay unquoted.
_AZURE_PLACEHOLDER = re.compile(r"^\$\{\{(inputs|outputs)\.[A-Za-z0-9_]+\}\}$")


def _quote(arg: str) -> str:
    return arg if _AZURE_PLACEHOLDER.match(arg) else shlex.quote(arg)


def job_module(name: str) -> ModuleType:
    """A module of the job's code folder (finetuning_dir/), imported as the job imports it: by its bare name.

    The folder is uploaded to Azure ML as is, so its files import each other by bare name
    (`from chat_format import ...`) and nothing here; the project reaches them by putting the folder
    on sys.path (last, so that it shadows nothing installed)."""
    if str(FINETUNING_DIR) not in sys.path:
        sys.path.append(str(FINETUNING_DIR))
    return importlib.import_module(name)


def fine_tune_args(
    settings: config.Settings,
    *,
    train_file: str,
    eval_file: str,
    model_output_dir: str,
    model: str,
) -> list[str]:
    """The argument vector after `python fine_tune.py`."""
    args = [
        "--train-file", train_file,
        "--eval-file", eval_file,
        "--model_output_dir", model_output_dir,
        "--model", model,
        "--peft", job_module("recipe").resolve_peft(settings.PEFT, model),
        "--epochs", repr(settings.NUM_TRAIN_EPOCHS),
        "--max-steps", str(settings.MAX_STEPS),
        "--learning-rate", repr(settings.LEARNING_RATE),
        "--batch-size", str(settings.PER_DEVICE_TRAIN_BATCH_SIZE),
        "--grad-accum", str(settings.GRADIENT_ACCUMULATION_STEPS),
        "--max-seq-length", str(settings.MAX_SEQ_LENGTH),
        "--lora-r", str(settings.LORA_R),
        "--lora-alpha", str(settings.LORA_ALPHA),
        "--lora-dropout", repr(settings.LORA_DROPOUT),
        "--seed", str(settings.SEED),
        "--warmup-ratio", repr(settings.WARMUP_RATIO),
        "--assistant-only-loss" if settings.ASSISTANT_ONLY_LOSS else "--no-assistant-only-loss",
        "--save-steps", str(settings.SAVE_STEPS),
        "--eval-max-rows", str(settings.EVAL_MAX_ROWS),
        "--eval-max-new-tokens", str(settings.EVAL_MAX_NEW_TOKENS),
        "--eval-batch-size", str(settings.EVAL_BATCH_SIZE),
    ]  # fmt: skip
    return args


def fine_tune_command(settings: config.Settings, **kwargs: str) -> str:
    """`python fine_tune.py ...` as one shell string (what the Azure command job runs)."""
    argv = ["python", ENTRY_SCRIPT, *fine_tune_args(settings, **kwargs)]
    return " ".join(_quote(a) for a in argv)


# --- the local backend -------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalTrainingResult:
    run_id: str
    experiment_id: str
    model_uri: str
    model_output_dir: str
    seconds: float


def model_output_dir(settings: config.Settings, run_id: str, artifact_uri: str) -> Path:
    """Where fine_tune.py writes the model: straight into the run's artifact folder when the store is a
    local folder (the default), so that the model exists once on disk; else a folder of the state dir,
    uploaded from there to the remote artifact store."""
    folder = job_module("mlflow_model").local_artifact_dir(artifact_uri)
    if folder is not None:
        return folder / job_module("mlflow_model").MODEL_ARTIFACT_PATH
    return settings.state_dir / "outputs" / run_id / "model"


def run_local_fine_tune(
    settings: config.Settings,
    *,
    model: str | None = None,
    extra_args: list[str] | None = None,
) -> LocalTrainingResult:
    """Run fine_tune.py as a subprocess with the Azure job's exact command line, then record the run."""
    model = model or settings.LOCAL_BASE_MODEL
    if Path(model).exists():  # a local folder: absolute, since fine_tune.py runs in finetuning_dir/
        model = str(Path(model).resolve())
    for path, name in ((settings.train_data_path, "TRAIN_DATA_PATH"), (settings.test_data_path, "TEST_DATA_PATH")):
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} does not exist; run `python download_dataset.py` first")
    run_id, experiment_id, artifact_uri = create_local_run(settings)
    output_dir = model_output_dir(settings, run_id, artifact_uri)
    command = fine_tune_command(
        settings,
        train_file=str(settings.train_data_path),
        eval_file=str(settings.test_data_path),
        model_output_dir=str(output_dir),
        model=model,
    )
    argv = shlex.split(command)
    argv[0] = sys.executable  # the job's `python` is this interpreter locally
    # Azure keeps the job's default (outputs/checkpoints, uploaded with the job); locally, checkpoints
    # live in the state folder so that re-running setup_ml.py after a crash resumes (SAVE_STEPS > 0).
    argv += ["--checkpoint-dir", str(settings.state_dir / "checkpoints"), *(extra_args or [])]
    local = job_module("recipe").is_local_model(model)  # nothing to download: offline and quick
    env = {**os.environ, **mlflow_env(settings, offline=local), "MLFLOW_RUN_ID": run_id}
    log.info("running: %s", command)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=FINETUNING_DIR, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        import mlflow

        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"fine_tune.py exited with status {proc.returncode} (MLflow run {run_id} marked FAILED)")
    result = LocalTrainingResult(
        run_id=run_id,
        experiment_id=experiment_id,
        model_uri=f"runs:/{run_id}/model",
        model_output_dir=str(output_dir),
        seconds=seconds,
    )
    update_state(
        settings,
        "training",
        {
            "backend": "local",
            "run_id": run_id,
            "experiment_id": experiment_id,
            "model_uri": result.model_uri,
            "model_output_dir": result.model_output_dir,
            "tracking_uri": settings.tracking_uri,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return result
