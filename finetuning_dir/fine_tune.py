"""Supervised fine-tuning of a Phi chat model (Phi-3-mini, Phi-3.5-mini or Phi-4-mini) with TRL, logged to
MLflow as a servable chat model.

The same command runs in the Azure ML job (from this folder, uploaded as the job's code) and locally
(`python setup_ml.py` runs it with the local backend). It joins the MLflow run named by
MLFLOW_RUN_ID when set, and talks to MLFLOW_TRACKING_URI.

    # Azure ML job (GPU, LoRA on the real model):
    python fine_tune.py --train-file train.jsonl --eval-file test.jsonl --model_output_dir outputs/model \\
        --model microsoft/Phi-3-mini-4k-instruct --peft lora --epochs 1

    # local, offline, CPU (a 1M-parameter Phi-3 built on the spot):
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python fine_tune.py --train-file ../data/train_data.jsonl \\
        --eval-file ../data/test_data.jsonl --model_output_dir /tmp/model --model tiny --epochs 15 --learning-rate 3e-3

    # crash-safe: a checkpoint every 50 steps; the same command after a crash resumes from the last one
    ... --save-steps 50 --checkpoint-dir ../.finetune_phi/checkpoints

The job reads parse (make_parser, validate_args) → prepare (the model, data and trainer) → train
(with the before/after evaluation) → save. Its siblings hold the rest: recipe.py how it trains
(model loading, device, dtype, attention, packing, memory estimates, LoRA, the SFT config),
mlflow_model.py what the run records (params, metrics) and how the model is packaged;
chat_format.py, evaluation.py and checkpoints.py as named.
The model is serialized once, as an MLflow model folder in --model_output_dir (Azure registers that job
output as an mlflow_model), in the base model's dtype, and is the run's "model" artifact: uploaded from
that folder to a remote artifact store, or written straight into a local one when --model_output_dir
points there (the local backend does: one copy on disk per fine-tune).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import chat_format
import checkpoints
import evaluation
# DEFAULT_MAX_NEW_TOKENS and PROMPT_TEMPLATE define the model this script saves, so they are also
# readable here (fine_tune.PROMPT_TEMPLATE); their one home is chat_format.py.
from chat_format import DEFAULT_MAX_NEW_TOKENS, PROMPT_TEMPLATE, read_chat_rows  # noqa: F401
from evaluation import Evaluation
from mlflow_model import MODEL_ARTIFACT_PATH, in_dtype, make_metrics_callback, run_params, save_and_log
from recipe import (
    TINY,
    Device,
    ModelUnavailable,
    Recipe,
    base_model_dtype,
    choose_attention,
    choose_recipe,
    detect_device,
    is_local_model,
    load_model_and_tokenizer,
    lora_config,
    planned_steps,
    resolve_peft,
    set_cpu_threads,
    sft_config,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

log = logging.getLogger("fine_tune")

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_CHECKPOINT_DIR = Path("outputs") / "checkpoints"
# Two greedy passes (base, fine-tuned) over this many held-out questions; the base model rarely stops,
# so its pass runs to the limit: Phi-3-mini on one A100 does 50 x 256 tokens in about a minute. Both
# backends pass config.py's EVAL_* as flags (this file is the job's code and imports nothing of ours).
DEFAULT_EVAL_MAX_ROWS = 50
DEFAULT_EVAL_MAX_NEW_TOKENS = 256
# 16 prompts of up to --max-seq-length (1024) + 256 new tokens: ~8 GiB of KV cache for Phi-3-mini in bf16.
DEFAULT_EVAL_BATCH_SIZE = 16


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and outputs")
    data.add_argument("--train-file", type=Path, required=True, help="JSON lines, one {\"messages\": [...]} per row")
    data.add_argument("--eval-file", type=Path, required=True, help="JSON lines, same format, for eval loss")
    data.add_argument(
        "--model_output_dir", "--model-output-dir", dest="model_output_dir", type=Path, required=True,
        help="where the MLflow model folder is written (must not exist, or be empty)",
    )  # fmt: skip
    data.add_argument(
        "--checkpoint-dir", type=Path, default=None,
        help="with --save-steps > 0: Trainer checkpoints go to CHECKPOINT_DIR/run-<digest of data and settings>, "
        "and a run started again with the same arguments resumes from the newest complete one "
        "(default: outputs/checkpoints, which Azure ML uploads with the job)",
    )  # fmt: skip
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=DEFAULT_MODEL,
        help=f"hub id or local folder of a Phi causal LM (Phi3ForCausalLM), or '{TINY}' for a 1M-parameter stand-in (default: %(default)s)",
    )  # fmt: skip
    model.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
        help="dtype the model is loaded and trained in; auto = bfloat16 for LoRA where the device computes bf16 "
        "natively (CUDA with bf16, CPUs with avx512_bf16 or amx_bf16: half the memory of float32), else float32. "
        "The fine-tuned model is saved in the base model's own dtype either way",
    )  # fmt: skip
    model.add_argument(
        "--peft", choices=("auto", "lora", "full"), default="auto",
        help="lora adapters (merged before saving) or full fine-tuning; auto = full for tiny, lora otherwise",
    )  # fmt: skip
    model.add_argument("--lora-r", type=int, default=16)
    model.add_argument("--lora-alpha", type=int, default=32)
    model.add_argument("--lora-dropout", type=float, default=0.05)
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    train.add_argument("--learning-rate", type=float, default=5e-5)
    train.add_argument("--batch-size", type=int, default=4, help="per device")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--max-seq-length", type=int, default=1024, help="longer conversations are truncated")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--warmup-ratio", type=float, default=0.03,
                       help="warm the learning rate up over this fraction of the steps, then decay it (cosine)")
    train.add_argument(
        "--save-steps", type=int, default=0,
        help="checkpoint every N optimizer steps (resumable after a crash); 0 = no checkpoints",
    )  # fmt: skip
    train.add_argument(
        "--assistant-only-loss", action=argparse.BooleanOptionalAction, default=True,
        help="learn only from assistant turns (and their <|end|>), not from user or system text",
    )  # fmt: skip
    speed = parser.add_argument_group("speed (auto picks what measured fastest; see bench/RESULTS.md)")
    speed.add_argument(
        "--attn-implementation", choices=("auto", "sdpa", "eager", "flash_attention_2"), default="auto",
        help="auto = flash_attention_2 on CUDA when flash-attn is installed, else sdpa",
    )  # fmt: skip
    speed.add_argument(
        "--packing", choices=("auto", "on", "off"), default="auto",
        help="padding-free packing (position_ids, no attention across packed rows); auto = on with flash "
        "attention only: with sdpa the packed batch is one long masked sequence, slower than padding",
    )  # fmt: skip
    speed.add_argument(
        "--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
        help="auto = on a GPU, on only when the activations would not fit without it; on a CPU, on for LoRA",
    )  # fmt: skip
    scoring = parser.add_argument_group("before/after evaluation (evaluation.py)")
    scoring.add_argument(
        "--eval-max-rows", type=int, default=DEFAULT_EVAL_MAX_ROWS,
        help="answer the first N questions of --eval-file with the model before and after training and "
        "log F1, ROUGE-L, exact/contains match, stop rate and answer length; 0 = skip (default: %(default)s)",
    )  # fmt: skip
    scoring.add_argument(
        "--eval-max-new-tokens", type=int, default=DEFAULT_EVAL_MAX_NEW_TOKENS,
        help="token limit per evaluation answer; an answer that reaches it did not stop (default: %(default)s)",
    )  # fmt: skip
    scoring.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH_SIZE,
                         help="questions answered together (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Every bad flag at once, each with its fix."""
    problems = []
    positive = {
        "--learning-rate": args.learning_rate, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
        "--max-seq-length": args.max_seq_length, "--lora-r": args.lora_r, "--lora-alpha": args.lora_alpha,
    }  # fmt: skip
    problems += [f"{flag} must be > 0 (got {value})" for flag, value in positive.items() if not value > 0]
    if args.max_steps <= 0 and not args.epochs > 0:
        problems.append(f"--epochs must be > 0 when --max-steps is not set (got {args.epochs})")
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})")
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1), a fraction of the steps (got {args.warmup_ratio})")
    if args.save_steps < 0:
        problems.append(f"--save-steps must be >= 0 (got {args.save_steps})")
    if args.eval_max_rows < 0:
        problems.append(f"--eval-max-rows must be >= 0, 0 to skip the evaluation (got {args.eval_max_rows})")
    if args.eval_max_new_tokens <= 0:
        problems.append(f"--eval-max-new-tokens must be > 0 (got {args.eval_max_new_tokens})")
    if args.eval_batch_size <= 0:
        problems.append(f"--eval-batch-size must be > 0 (got {args.eval_batch_size})")
    out = args.model_output_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--model_output_dir {out} already holds files; pass a new or empty folder")
    if args.model != TINY and "/" not in args.model and not Path(args.model).exists():
        problems.append(f"--model {args.model!r} is neither '{TINY}', a local folder, nor a hub id like {DEFAULT_MODEL}")
    if problems:
        raise SystemExit("fine_tune.py: bad arguments:\n" + "\n".join(f"  - {p}" for p in problems))


# --- model and data ------------------------------------------------------------------------------


def load_datasets(train_file: Path, eval_file: Path) -> tuple[Dataset, Dataset]:
    from datasets import Dataset

    train = Dataset.from_list([{"messages": m} for m in read_chat_rows(train_file)])
    evaluation = Dataset.from_list([{"messages": m} for m in read_chat_rows(eval_file)])
    return train, evaluation


# --- the job -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    model: PreTrainedModel  # a plain transformers model: LoRA adapters already merged
    tokenizer: PreTrainedTokenizerBase
    eval_loss_before: float
    eval_loss_after: float
    steps: int  # optimizer steps in total, those before a resume included
    resumed_from_step: int = 0
    evaluation: Evaluation | None = None  # None with --eval-max-rows 0, and on processes other than rank 0


@dataclass(frozen=True)
class FineTuneResult:
    run_id: str
    eval_loss_before: float
    eval_loss_after: float
    model_output_dir: Path
    model_uri: str
    seconds: float
    steps: int
    resumed_from_step: int
    evaluation: Evaluation | None = None


def set_quiet_offline_env(model: str) -> None:
    """Set before transformers/mlflow are imported: both read these at import time."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if is_local_model(model):
        # Nothing to download; without this MLflow retries the hub for ~47 s looking for a model card.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Prepared:
    trainer: Any  # trl.SFTTrainer
    tokenizer: PreTrainedTokenizerBase
    device: Device
    peft: str
    recipe: Recipe
    n_train: int
    n_eval: int
    total_steps: int
    base_dtype: str = "float32"  # what the fine-tuned model is saved in: the base model's published dtype


def make_trainer(
    args: argparse.Namespace,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_ds: Dataset,
    eval_ds: Dataset,
    *,
    device: Device,
    peft: str,
    recipe: Recipe,
    checkpoint_dir: Path,
    total_steps: int,
    callbacks: list[TrainerCallback] | None = None,
) -> Any:
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=sft_config(args, device, checkpoint_dir, total_steps, recipe),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(args) if peft == "lora" else None,
        callbacks=callbacks or [],
    )


def prepare(args: argparse.Namespace, checkpoint_dir: Path, callbacks: list[TrainerCallback] | None = None) -> Prepared:
    """Model, data and trainer exactly as a run uses them (bench/train_bench.py times this same trainer)."""
    from transformers import set_seed

    peft = resolve_peft(args.peft, args.model)
    set_seed(args.seed)
    device = detect_device()
    set_cpu_threads(args, device)
    attention = choose_attention(args.attn_implementation, device)
    model, tokenizer = load_model_and_tokenizer(args, device, peft, attention)
    base_dtype = base_model_dtype(args.model)  # its config, now in the cache
    recipe = choose_recipe(args, model, device, peft, attention)
    train_ds, eval_ds = load_datasets(args.train_file, args.eval_file)
    total_steps = planned_steps(len(train_ds), args)
    log.info(
        "device %s (bf16=%s), %s, %s, %d train / %d eval rows, %d steps",
        device.name, device.bf16, peft, recipe, len(train_ds), len(eval_ds), total_steps,
    )  # fmt: skip
    trainer = make_trainer(
        args, model, tokenizer, train_ds, eval_ds, device=device, peft=peft, recipe=recipe,
        checkpoint_dir=checkpoint_dir, total_steps=total_steps, callbacks=callbacks,
    )  # fmt: skip
    return Prepared(trainer, tokenizer, device, peft, recipe, len(train_ds), len(eval_ds), total_steps, base_dtype)


def train(args: argparse.Namespace, checkpoint_dir: Path) -> Trained:
    """Fine-tune inside the active MLflow run (params and metrics go to it); evaluate before and after.

    With --save-steps, a complete checkpoint already in `checkpoint_dir` (left by a run that was
    killed) is resumed from: same optimizer, schedule, RNG and data position.
    """
    import mlflow

    prepared = prepare(args, checkpoint_dir, callbacks=[make_metrics_callback()])
    trainer, peft = prepared.trainer, prepared.peft
    resume = checkpoints.latest_complete_checkpoint(checkpoint_dir) if args.save_steps > 0 else None
    resumed_from = checkpoints.checkpoint_step(resume) if resume else 0
    main_process = trainer.is_world_process_zero()  # several GPUs: one process logs
    if main_process:
        params = run_params(args, peft, prepared.device, trainer.model, prepared.n_train, prepared.n_eval)
        params |= {"attention": prepared.recipe.attention, "packing": prepared.recipe.packing,
                   "gradient_checkpointing": prepared.recipe.gradient_checkpointing,
                   "resumed_from_step": resumed_from}  # fmt: skip
        mlflow.log_params(params)
    before = trainer.evaluate()["eval_loss"]
    if main_process:
        mlflow.log_metric("eval_loss_before", before, step=0)
    log.info("eval loss before training: %.4f", before)
    examples = evaluation.held_out_examples(read_chat_rows(args.eval_file), args.eval_max_rows) if main_process else []
    examples = evaluation.fitting(examples, prepared.tokenizer, args.max_seq_length)
    answers_before, seconds = [], 0.0
    if examples and not resume:
        # The base model's answers: before the first step, so that no second copy of the model is needed.
        answers_before, seconds = evaluation.timed(
            evaluation.generate_answers, trainer.model, prepared.tokenizer, examples,
            max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size,
        )  # fmt: skip
    if resume:
        log.info("resuming from %s (step %d of %d)", resume, resumed_from, prepared.total_steps)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    after = trainer.evaluate()["eval_loss"]
    if main_process:
        mlflow.log_metric("eval_loss_after", after, step=trainer.state.global_step)
    log.info("eval loss after training: %.4f (%d optimizer steps)", after, trainer.state.global_step)

    trained = trainer.model
    if peft == "lora":
        # Serve one plain model: a PEFT-wrapped model would need the base from the hub at load
        # time, and MLflow saves it broken (the base reloads with random weights).
        trained = trained.merge_and_unload()
    # The saved model carries its family's published template, byte for byte, not the training twin.
    prepared.tokenizer.chat_template = chat_format.published_template(prepared.tokenizer.chat_template)
    trained = in_dtype(trained, prepared.base_dtype)
    trained.config.use_cache = True
    trained.eval()
    result = None
    if answers_before:
        answers_after, more = evaluation.timed(
            evaluation.generate_answers, trained, prepared.tokenizer, examples,
            max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size,
        )  # fmt: skip
        result = evaluation.log_evaluation(examples, answers_before, answers_after, seconds + more,
                                           trainer.state.global_step)  # fmt: skip
        log.info("evaluation on %d held-out questions (%.1f s): %s", result.rows, result.seconds, result.line)
    elif examples:
        # A resumed run no longer has the base model: its answers would be the checkpoint's.
        log.warning("resumed from a checkpoint: no before/after evaluation (the base model's answers are gone)")
    return Trained(trained, prepared.tokenizer, before, after, trainer.state.global_step, resumed_from, result)


def checkpoint_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that change what a run learns (not where it writes, nor how often it saves)."""
    keys = ("model", "dtype", "epochs", "max_steps", "learning_rate", "batch_size", "grad_accum", "max_seq_length", "seed",
            "warmup_ratio", "lora_r", "lora_alpha", "lora_dropout", "assistant_only_loss", "packing")  # fmt: skip
    return {"peft": resolve_peft(args.peft, args.model), **{key: getattr(args, key) for key in keys}}


def checkpoint_dir_for(args: argparse.Namespace) -> Path:
    """`--checkpoint-dir`/run-<digest of the data files and checkpoint_settings>: stable across reruns."""
    record = checkpoints.fingerprint(checkpoint_settings(args), {"train": args.train_file, "eval": args.eval_file})
    return checkpoints.run_dir(args.checkpoint_dir or DEFAULT_CHECKPOINT_DIR, record)


def fine_tune(args: argparse.Namespace) -> FineTuneResult:
    start = time.perf_counter()
    set_quiet_offline_env(args.model)
    # Read both files before the slow imports, so a bad file fails in a second.
    read_chat_rows(args.train_file), read_chat_rows(args.eval_file)

    import mlflow

    with tempfile.TemporaryDirectory(prefix="fine_tune_ckpt_") as scratch:
        # One run around everything: joins MLFLOW_RUN_ID when set (the local backend and Azure ML set it).
        with mlflow.start_run() as run:
            checkpoint_dir = checkpoint_dir_for(args) if args.save_steps > 0 else Path(scratch)
            trained = train(args, checkpoint_dir)
            model_uri = f"runs:/{run.info.run_id}/{MODEL_ARTIFACT_PATH}"
            if int(os.environ.get("RANK", "0")) == 0:  # torchrun / Azure ML set RANK per GPU process
                model_uri = save_and_log(trained.model, trained.tokenizer, args.model_output_dir, run.info.run_id)
                if args.save_steps > 0:
                    # Checkpoints exist to survive a crash; once the model is saved they would only make
                    # the same command "resume" a finished run and train 0 steps.
                    shutil.rmtree(checkpoint_dir, ignore_errors=True)
                    log.info("training finished: removed its checkpoints in %s", checkpoint_dir)
    return FineTuneResult(
        run_id=run.info.run_id,
        eval_loss_before=trained.eval_loss_before,
        eval_loss_after=trained.eval_loss_after,
        model_output_dir=args.model_output_dir,
        model_uri=model_uri,
        seconds=time.perf_counter() - start,
        steps=trained.steps,
        resumed_from_step=trained.resumed_from_step,
        evaluation=trained.evaluation,
    )


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    validate_args(args)
    try:
        result = fine_tune(args)
    except ModelUnavailable as exc:
        raise SystemExit(f"fine_tune.py: {exc}") from None
    resumed = f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step else ""
    if result.evaluation:  # before the summary line, which stays last
        print(f"evaluation on {result.evaluation.rows} held-out questions: {result.evaluation.line}", flush=True)
    print(
        f"fine-tune done in {result.seconds:.0f}s, {result.steps} steps{resumed}: MLflow run {result.run_id}, eval loss "
        f"{result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}, model at {result.model_uri} "
        f"and {result.model_output_dir}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
