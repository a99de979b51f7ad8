"""Supervised fine-tuning of Phi-3 on chat data with TRL, logged to MLflow as a servable chat model.

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

The model is serialized once, as an MLflow model folder in --model_output_dir (Azure registers that job
output as an mlflow_model), in the base model's dtype, and is the run's "model" artifact
(`mlflow.pyfunc.load_model("runs:/<run_id>/model")`, `mlflow.register_model(...)`): uploaded from that
folder to a remote artifact store, or written straight into a local one when --model_output_dir points
there (the local backend does: one copy on disk per fine-tune).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import chat_format
import checkpoints
import evaluation
# DEFAULT_MAX_NEW_TOKENS and PROMPT_TEMPLATE define the model this script saves, so they are also
# readable here (fine_tune.PROMPT_TEMPLATE); their one home is chat_format.py.
from chat_format import DEFAULT_MAX_NEW_TOKENS, GENERATION_DEFAULTS, PROMPT_TEMPLATE, read_chat_rows  # noqa: F401
from evaluation import Evaluation

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTConfig

log = logging.getLogger("fine_tune")

TINY = "tiny"
DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
# Phi-3's linear layers (fused qkv and gate/up): LoRA on all of them, as the alignment-handbook recipes do.
LORA_TARGET_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
MODEL_ARTIFACT_PATH = "model"
DEFAULT_CHECKPOINT_DIR = Path("outputs") / "checkpoints"
EXAMPLE_QUESTION = "Who founded Microsoft?"
# The MLflow param type of each generation setting's Python type (bool first: a bool is an int too).
MLFLOW_PARAM_TYPES: tuple[tuple[type, str], ...] = ((bool, "boolean"), (int, "long"), (float, "double"))
# Two greedy passes (base and fine-tuned) over this many held-out questions, batched. The base model
# rarely stops, so its pass runs to the token limit: on the tiny CPU model 24 rows x 48 tokens take
# about a second; Phi-3-mini on one A100 does 50 rows x 256 tokens in about a minute. (The same
# defaults as config.py's EVAL_* fields, which both backends pass as flags: this file is uploaded as
# the job's code and imports nothing of the project's.)
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
        help=f"hub id or local folder of a Phi-3 causal LM, or '{TINY}' for a 1M-parameter stand-in (default: %(default)s)",
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


def resolve_peft(peft: str, model: str) -> str:
    """`auto`: LoRA for real Phi-3 sizes; the tiny stand-in is small enough to train in full.

    The one rule: finetune_phi/training.py calls it to put the resolved value on the job's command line."""
    if peft != "auto":
        return peft
    return "full" if model == TINY else "lora"


def is_local_model(model: str) -> bool:
    return model == TINY or Path(model).exists()


# --- model and data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    cuda: bool
    bf16: bool

    @property
    def name(self) -> str:
        return "cuda" if self.cuda else "cpu"


def detect_device() -> Device:
    import torch
    from native_dtypes import cpu_bf16_flags, cuda_bf16

    cuda = torch.cuda.is_available()
    return Device(cuda=cuda, bf16=cuda_bf16() if cuda else bool(cpu_bf16_flags()))


def choose_dtype(requested: str, device: Device, peft: str) -> str:
    """The dtype the model is loaded (and, for LoRA, its frozen base kept) in.

    LoRA trains only the adapters, which PEFT keeps in float32 whatever the base's dtype, so a bf16
    base halves the weights' memory without touching what is learned: Phi-3-mini on this project's
    2-core CPU box peaked at 19.7 GiB with a float32 base (bench/RESULTS.md has the bf16 figures).
    Full fine-tuning keeps float32 master weights (bf16 autocast does the compute on a GPU).
    """
    if requested != "auto":
        return requested
    return "bfloat16" if device.bf16 and peft == "lora" else "float32"


def base_model_dtype(model: str) -> str:
    """The dtype the base model's weights are published in (its config's dtype); the tiny model: float32."""
    if model == TINY:
        return "float32"
    from transformers import AutoConfig

    with hub_errors(model):
        config = AutoConfig.from_pretrained(model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def hub_is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def hub_errors(model: str) -> Iterator[None]:
    """Turn a failed Hugging Face download into one line that says why (offline mode, no network, no access).

    transformers reports an offline cache miss as "couldn't connect to ... and couldn't find them in the
    cached files", with the cause (offline mode) only in the chained exception.
    """
    try:
        yield
    except OSError as exc:
        if is_local_model(model):
            raise
        from huggingface_hub import constants

        if hub_is_offline():
            reason = (
                f"{model} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set, "
                "which forbids downloading it: unset HF_HUB_OFFLINE (or set it to 0), or pass a local folder as --model"
            )
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = (
                f"could not download {model} from {constants.ENDPOINT}: {first} "
                "(check the network or proxy, HF_TOKEN for a gated model, or pass a local folder as --model)"
            )
        raise ModelUnavailable(reason) from exc


class ModelUnavailable(RuntimeError):
    """The base model could not be loaded from the Hub; the message is one line that names the fix."""


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def choose_attention(requested: str, device: Device) -> str:
    if requested != "auto":
        return requested
    # flash-attn 2 runs padding-free batches as variable-length sequences: no padding, no masking.
    return "flash_attention_2" if device.cuda and has_module("flash_attn") else "sdpa"


def choose_packing(requested: str, attention: str) -> bool:
    """Padding-free packing only where a kernel skips the attention between packed rows.

    trl flattens a padding-free batch into one sequence and marks row starts in position_ids.
    flash-attn turns that into per-row attention. sdpa and eager get a block-diagonal mask over
    the whole flattened sequence and still compute every masked block: on the 2-core CPU with
    ultrachat rows at 2048 tokens, 1.8x slower than plain padding (bench/RESULTS.md).
    """
    if requested != "auto":
        return requested == "on"
    return attention.startswith("flash_attention")


def activation_bytes(config: Any, batch: int, seq_len: int) -> float:
    """Activations kept for the backward pass, 16-bit, no checkpointing, flash/sdpa attention.

    34·s·b·h bytes per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation", without
    the s² attention-score term that fused attention never stores), plus fp32 logits and their gradient.
    """
    tokens = batch * seq_len
    return 34.0 * tokens * config.hidden_size * config.num_hidden_layers + 8.0 * tokens * config.vocab_size


def state_bytes(total_params: int, trainable_params: int, base_bytes_per_param: int) -> float:
    """Weights, plus for trainable ones an fp32 gradient and two AdamW moments (12 bytes), and an
    fp32 master copy when the stored weights are 16-bit (LoRA adapters on a bf16 base)."""
    per_trainable = 12.0 + (4.0 if base_bytes_per_param < 4 else 0.0)
    return total_params * base_bytes_per_param + trainable_params * per_trainable


def choose_gradient_checkpointing(
    requested: str,
    *,
    total_params: int,
    trainable_params: int,
    base_bytes_per_param: int,
    model_config: Any,
    batch: int,
    seq_len: int,
    device: Device,
    gpu_bytes: float | None,
) -> bool:
    """Recompute activations where keeping them costs more than the recomputation.

    On a GPU: only when they would not fit (checkpointing costs ~1/3 more compute). On a CPU: for LoRA,
    always. There the RAM is shared with the OS, the weights' page cache and the local endpoint, and
    keeping LoRA's activations (its float32 copies of every adapted layer's input included) took
    Phi-3-mini's fine-tune to a 19.8 GiB peak on a 24 GiB machine; recomputing them cost 13% more time
    for 22% less peak on a 4-layer slice of it (bench/RESULTS.md). Full fine-tuning on a CPU is the
    tiny model's, whose activations are megabytes: kept.
    """
    if requested != "auto":
        return requested == "on"
    if not device.cuda:
        return trainable_params < total_params  # LoRA
    if gpu_bytes is None:
        return False
    need = state_bytes(total_params, trainable_params, base_bytes_per_param)
    need += activation_bytes(model_config, batch, seq_len)
    # 15% headroom: allocator fragmentation, CUDA context, temporary buffers.
    fits = need < 0.85 * gpu_bytes
    log.info(
        "memory estimate without gradient checkpointing: %.1f GiB of %.1f GiB -> checkpointing %s",
        need / 2**30, gpu_bytes / 2**30, "off" if fits else "on",
    )  # fmt: skip
    return not fits


@dataclass(frozen=True)
class Recipe:
    """How the step is computed; none of it changes what is learned, only how fast and in how much memory."""

    attention: str = "sdpa"
    packing: bool = False
    gradient_checkpointing: bool = False
    liger: bool = False


def load_model_and_tokenizer(
    args: argparse.Namespace, device: Device, peft: str, attention: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (in choose_dtype's dtype) and its tokenizer, from the Hub (downloaded into the user's
    Hugging Face cache with the user's HF_TOKEN / HF_ENDPOINT / proxies), a local folder, or built (tiny)."""
    from chat_format import ensure_pad_token, generation_stop_ids, training_template

    if args.model == TINY:
        from tiny_model import build_tiny

        model, tokenizer = build_tiny(args.train_file, args.seed)
        model.set_attn_implementation(attention)
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = getattr(torch, choose_dtype(args.dtype, device, peft))
        log.info("loading %s (%s)", args.model, dtype)
        with hub_errors(args.model):
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attention)
        model.config.use_cache = False  # incompatible with gradient checkpointing; re-enabled before saving
    ensure_pad_token(tokenizer)
    if args.assistant_only_loss:
        # Trained with our `{% generation %}`-marked twin of the template where trl has none (the same
        # text); train() puts the published one back (chat_format.published_template) before saving.
        tokenizer.chat_template = training_template(tokenizer) or tokenizer.chat_template
        require_maskable_template(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Generation must stop at <|end|>, the token every assistant turn is trained to end with
    # (the hub's Phi-3 config already lists it, with <|endoftext|> and <|assistant|>; keep those).
    model.generation_config.eos_token_id = generation_stop_ids(tokenizer, model.generation_config.eos_token_id)
    return model, tokenizer


def require_maskable_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail before training, not after, when assistant-only loss cannot be computed.

    trl masks with a `{% generation %}`-marked twin of the template; it ships one for Phi-3's
    template (matched byte for byte) and refuses templates it does not know.
    """
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError as exc:
        raise ValueError(
            f"assistant-only loss needs a chat template trl can mark up ({exc}); use a Phi-3 tokenizer, "
            "or pass --no-assistant-only-loss to learn from every token"
        ) from exc


def load_datasets(train_file: Path, eval_file: Path) -> tuple[Dataset, Dataset]:
    from datasets import Dataset

    train = Dataset.from_list([{"messages": m} for m in read_chat_rows(train_file)])
    evaluation = Dataset.from_list([{"messages": m} for m in read_chat_rows(eval_file)])
    return train, evaluation


def planned_steps(n_rows: int, args: argparse.Namespace) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_rows / args.batch_size) / args.grad_accum))
    return max(1, math.ceil(per_epoch * args.epochs))


def sft_config(
    args: argparse.Namespace, device: Device, checkpoint_dir: Path, total_steps: int, recipe: Recipe = Recipe()
) -> SFTConfig:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float < 1 is a fraction of the training steps
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_seq_length,
        # "bfd" packing is trl's padding-free mode: rows keep their own positions and attention.
        packing=recipe.packing,
        packing_strategy="bfd",
        assistant_only_loss=args.assistant_only_loss,
        # ~50 loss points and ~4 evaluations whatever the run length.
        logging_strategy="steps",
        logging_steps=max(1, total_steps // 50),
        eval_strategy="steps",
        eval_steps=max(1, total_steps // 4),
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        # Optimizer, scheduler and RNG state too: without them a resumed run is not the interrupted run.
        save_only_model=False,
        # Two, not one: if a crash tears the newest, the one before it is still whole.
        save_total_limit=2,
        report_to="none",  # metrics go to MLflow through MlflowMetrics, inside our one run
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not device.cuda,
        # Autocast on CUDA only: on the CPU it made full fine-tuning 25% slower in twice the memory,
        # and a LoRA base loaded in bf16 already computes in bf16 without it.
        bf16=device.cuda and device.bf16,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=recipe.liger,
        dataloader_num_workers=0,
    )


def lora_config(args: argparse.Namespace) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )


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


# --- the MLflow model ----------------------------------------------------------------------------


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


def lora_parameter_count(model: PreTrainedModel, r: int) -> int:
    """Parameters LoRA adds: r·(in + out) per targeted linear layer."""
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LORA_TARGET_MODULES and hasattr(module, "in_features")
    )


def choose_recipe(args: argparse.Namespace, model: PreTrainedModel, device: Device, peft: str, attention: str) -> Recipe:
    gpu_bytes = None
    if device.cuda:
        import torch

        gpu_bytes = float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    packing = choose_packing(args.packing, attention)
    gradient_checkpointing = False
    if args.gradient_checkpointing != "auto" or device.cuda or peft == "lora":
        trainable = lora_parameter_count(model, args.lora_r) if peft == "lora" else model.num_parameters()
        gradient_checkpointing = choose_gradient_checkpointing(
            args.gradient_checkpointing, total_params=model.num_parameters(), trainable_params=trainable,
            base_bytes_per_param=model.dtype.itemsize, model_config=model.config, batch=args.batch_size,
            seq_len=args.max_seq_length, device=device, gpu_bytes=gpu_bytes,
        )  # fmt: skip
    # Liger's fused linear+cross-entropy never materialises the logits: the largest single tensor
    # at Phi-3's 32k vocabulary. CUDA only (Triton kernels).
    liger = device.cuda and has_module("liger_kernel")
    return Recipe(attention=attention, packing=packing, gradient_checkpointing=gradient_checkpointing, liger=liger)


def set_cpu_threads(args: argparse.Namespace, device: Device) -> None:
    if args.model == TINY and not device.cuda:
        import torch

        # Its matrices are too small to split: one thread trained 42 steps in 2.3 s, two threads
        # took 6.1 s on a 2-core machine shared with other jobs (thread hand-offs dominate).
        torch.set_num_threads(1)


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


def in_dtype(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """The model in `dtype` (the base's own): a bf16 base trained in float32 must not come back twice its size."""
    import torch

    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or model.dtype == target:
        return model
    log.info("casting the fine-tuned model from %s to %s, the base model's dtype, before saving", model.dtype, target)
    return model.to(dtype=target)


def checkpoint_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that change what a run learns (not where it writes, nor how often it saves)."""
    keys = ("model", "dtype", "epochs", "max_steps", "learning_rate", "batch_size", "grad_accum", "max_seq_length", "seed",
            "warmup_ratio", "lora_r", "lora_alpha", "lora_dropout", "assistant_only_loss", "packing")  # fmt: skip
    return {"peft": resolve_peft(args.peft, args.model), **{key: getattr(args, key) for key in keys}}


def checkpoint_dir_for(args: argparse.Namespace) -> Path:
    """`--checkpoint-dir`/run-<digest of the data files and checkpoint_settings>: stable across reruns."""
    record = checkpoints.fingerprint(checkpoint_settings(args), {"train": args.train_file, "eval": args.eval_file})
    return checkpoints.run_dir(args.checkpoint_dir or DEFAULT_CHECKPOINT_DIR, record)


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
