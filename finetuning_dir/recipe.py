"""How a fine-tune trains: the model and tokenizer it loads (from the Hub or a local folder), and the
step recipe: device, dtype, attention, packing, gradient checkpointing (from memory estimates), LoRA
and trl's SFT config. fine_tune.py runs it; like every file here, it is uploaded as the job's code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTConfig

log = logging.getLogger("fine_tune")


TINY = "tiny"

# Phi-3's linear layers (fused qkv and gate/up): LoRA on all of them, as the alignment-handbook recipes do.
LORA_TARGET_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

def resolve_peft(peft: str, model: str) -> str:
    """`auto`: LoRA for real Phi-3 sizes; the tiny stand-in is small enough to train in full.

    The one rule: finetune_phi/training.py calls it to put the resolved value on the job's command line."""
    if peft != "auto":
        return peft
    return "full" if model == TINY else "lora"

def is_local_model(model: str) -> bool:
    return model == TINY or Path(model).exists()

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
