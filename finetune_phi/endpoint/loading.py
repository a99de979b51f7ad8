"""Load policy of the local endpoint: which device and dtype, and whether the model fits at all.

Engine.from_mlflow asks `plan_load` before it reads a single weight:

- **device**: `auto` is CUDA when torch sees a GPU, else the CPU (ENDPOINT_DEVICE / --device).
- **dtype** (ENDPOINT_DTYPE / --dtype; `auto` unless forced to float32, bfloat16 or float16):
  bfloat16 on CUDA (float16 on a GPU without bf16); on a CPU, float32 unless the CPU has native
  bf16 units (cpuinfo flags avx512_bf16 or amx_bf16) AND the weights were saved in 16 bits. Merged
  LoRA weights are saved in bf16, which CPUs without bf16 units run through slow conversion paths;
  weights saved in fp32 stay fp32, so greedy replies stay those of MLflow's own serving.
- **memory**: weights at that dtype (parameters counted from the safetensors headers, nothing
  loaded) + the KV cache that ENDPOINT_MAX_CONCURRENT_REQUESTS requests of a full context need
  (2 x layers x kv_heads x head_dim x dtype bytes per token) + a margin, against what is free
  (MemAvailable on the CPU, cudaMemGetInfo on a GPU) or ENDPOINT_MEMORY_BUDGET_MB when set. Too
  much: NotEnoughMemory, whose message names the settings that lower it.

After the load, `engine.check_decode_speed` times one short greedy generate and warns when a request's
default max_new_tokens at that speed would run past ENDPOINT_REQUEST_TIMEOUT_S (a 3.8B model on a
CPU decodes a few tokens per second: the 90 s default is then too short for long answers).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from finetune_phi.endpoint.caps import DEFAULT_MAX_BATCH_TOKENS


log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1, "uint8": 1}
# safetensors header names -> torch names
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I8": "int8", "U8": "uint8"}
DEFAULT_MAX_CONCURRENT_REQUESTS = 16  # limits.DEFAULT_MAX_CONCURRENT_REQUESTS (not imported: no starlette here)
# What a running endpoint needs beyond weights and KV cache: activations of a step, the logits of a
# batch, allocator slack. A fraction of the weights plus a fixed amount for the runtime itself.
OVERHEAD_FRACTION = 0.10
OVERHEAD_BYTES = 256 * 1024**2
GIB = 1024**3

DTYPE_SETTING = "ENDPOINT_DTYPE"
DEVICE_SETTING = "ENDPOINT_DEVICE"
CONCURRENCY_SETTING = "ENDPOINT_MAX_CONCURRENT_REQUESTS"
CONTEXT_SETTING = "ENDPOINT_MAX_CONTEXT_TOKENS"
BUDGET_SETTING = "ENDPOINT_MEMORY_BUDGET_MB"
BATCH_TOKENS_SETTING = "ENDPOINT_MAX_BATCH_TOKENS"
TIMEOUT_SETTING = "ENDPOINT_REQUEST_TIMEOUT_S"


class NotEnoughMemory(RuntimeError):
    """The model's weights plus the KV cache its limits allow do not fit in the memory that is free."""


@dataclass(frozen=True)
class LoadPolicy:
    """What the endpoint's settings ask of a load (config.py's ENDPOINT_* values; CLI flags of __main__)."""

    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_context_tokens: int = 0  # 0: the model's own context (max_position_embeddings)
    memory_budget_mb: int = 0  # 0: what the device has free
    check_memory: bool = True
    # The batcher's cap on prompt + new tokens held by all running rows (their KV cache); 0: its
    # default (caps.DEFAULT_MAX_BATCH_TOKENS).
    max_batch_tokens: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"{DTYPE_SETTING}={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not valid_device(self.device):
            raise ValueError(f"{DEVICE_SETTING}={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.max_concurrent_requests < 1 or min(self.max_context_tokens, self.memory_budget_mb, self.max_batch_tokens) < 0:
            raise ValueError(
                "max_concurrent_requests must be >= 1, max_context_tokens, memory_budget_mb and max_batch_tokens >= 0"
            )


@dataclass(frozen=True)
class Weights:
    parameters: int
    saved_dtype: str  # the dtype most parameters were saved in ("unknown" without safetensors headers)
    saved_bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int  # min(max concurrent requests x context, the batcher's max_batch_tokens (at least one context))
    overhead_bytes: int
    available_bytes: int | None  # None: unknown (not checked)
    available_source: str

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_tokens

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes


@dataclass(frozen=True)
class LoadPlan:
    device: str
    dtype: str
    dtype_reason: str
    context: int
    weights: Weights
    memory: MemoryEstimate

    def describe(self) -> str:
        m = self.memory
        free = "unknown" if m.available_bytes is None else f"{m.available_bytes / GIB:.2f} GiB ({m.available_source})"
        return (
            f"{self.device}, {self.dtype} ({self.dtype_reason}); {self.weights.parameters / 1e6:.1f}M parameters = "
            f"{m.weights_bytes / GIB:.2f} GiB of weights + KV cache {m.kv_bytes / GIB:.2f} GiB "
            f"({m.kv_tokens} tokens x {m.kv_bytes_per_token} bytes) + {m.overhead_bytes / GIB:.2f} GiB margin "
            f"= {m.needed_bytes / GIB:.2f} GiB; free {free}"
        )


# --- device and dtype -------------------------------------------------------------------------------


def valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_SETTING}={requested}: torch sees no CUDA device here (use auto or cpu)")
    return requested


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags this CPU reports; the fine-tune asks the same question (finetuning_dir/native_dtypes.py)."""
    return list(_native_dtypes().cpu_bf16_flags(cpuinfo))


def _native_dtypes() -> ModuleType:
    from finetune_phi.training import job_module

    return job_module("native_dtypes")


def resolve_dtype(requested: str, device: str, saved_dtype: str, cpu_flags: Iterable[str] | None = None) -> tuple[str, str]:
    """(dtype, why) for `requested` on `device`, for weights saved in `saved_dtype`."""
    if requested != "auto":
        return requested, f"forced by {DTYPE_SETTING}"
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: CUDA"
        return "float16", "auto: CUDA without bf16 support"
    flags = list(cpu_bf16_flags() if cpu_flags is None else cpu_flags)
    if not flags:
        note = f", weights saved in {saved_dtype}" if saved_dtype not in ("float32", "unknown") else ""
        return "float32", f"auto: CPU without native bf16 (no {'/'.join(_native_dtypes().CPU_BF16_FLAGS)}){note}"
    if saved_dtype in ("bfloat16", "float16"):
        return "bfloat16", f"auto: CPU with native bf16 ({', '.join(flags)}), weights saved in {saved_dtype}"
    return "float32", f"auto: CPU with native bf16 ({', '.join(flags)}), but weights saved in {saved_dtype}: kept"


# --- what the model needs ---------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return dict(json.loads(f.read(length)))


def read_weights(model_dir: Path) -> Weights:
    """Parameters and saved dtype from the safetensors headers in `model_dir` (no weight is read)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = [p for p in model_dir.glob("*.bin") if p.is_file()]
        size = sum(p.stat().st_size for p in others)
        return Weights(parameters=size // 4, saved_dtype="unknown", saved_bytes=size)  # assume fp32
    by_dtype: dict[str, int] = {}
    for path in files:
        for name, entry in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            count = math.prod(entry["shape"]) if entry["shape"] else 1
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
            by_dtype[dtype] = by_dtype.get(dtype, 0) + count
    parameters = sum(by_dtype.values())
    saved = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else "unknown"
    return Weights(parameters, saved, sum(p.stat().st_size for p in files))


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def free_memory(device: str) -> tuple[int | None, str]:
    """(bytes free on `device`, where that figure comes from); (None, why) when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"free on {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available), "psutil available"
    except ImportError:
        return None, "unknown (no /proc/meminfo, no psutil)"


def model_folder(local: Path) -> Path:
    """The folder holding config.json and the weights inside a downloaded MLflow transformers model."""
    try:
        import yaml

        flavor = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {}).get("transformers", {})
        binary = flavor.get("model_binary") or "model"
    except (OSError, ValueError, AttributeError):
        binary = "model"
    return local / binary


def batch_tokens(policy: LoadPolicy) -> int:
    """The batcher's max_batch_tokens as it will be: the policy's, else the default (caps.py)."""
    return policy.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS


def plan_load(local: Path, policy: LoadPolicy, cpu_flags: Iterable[str] | None = None) -> LoadPlan:
    """Device, dtype, context and memory estimate for the MLflow model downloaded at `local`.

    Raises NotEnoughMemory (policy.check_memory) when the estimate exceeds the memory available.
    """
    folder = model_folder(local)
    config = json.loads((folder / "config.json").read_text())
    weights = read_weights(folder)
    device = resolve_device(policy.device)
    dtype, reason = resolve_dtype(policy.dtype, device, weights.saved_dtype, cpu_flags)
    model_context = int(config.get("max_position_embeddings") or 4096)
    context = min(model_context, policy.max_context_tokens) if policy.max_context_tokens else model_context
    itemsize = DTYPE_BYTES[dtype]
    weights_bytes = weights.parameters * itemsize
    if policy.memory_budget_mb:
        available, source = policy.memory_budget_mb * 1024**2, f"{BUDGET_SETTING}={policy.memory_budget_mb}"
    elif policy.check_memory:
        available, source = free_memory(device)
    else:
        available, source = None, "not checked"
    # What the batcher can hold at once: every admitted request's full context, but never more rows
    # than fit in max_batch_tokens (a lone row bigger than that still runs: one context at least).
    kv_tokens = min(policy.max_concurrent_requests * context, max(batch_tokens(policy), context))
    memory = MemoryEstimate(
        weights_bytes=weights_bytes,
        kv_bytes_per_token=kv_bytes_per_token(config, itemsize),
        kv_tokens=kv_tokens,
        overhead_bytes=int(OVERHEAD_FRACTION * weights_bytes) + OVERHEAD_BYTES,
        available_bytes=available,
        available_source=source,
    )
    plan = LoadPlan(device, dtype, reason, context, weights, memory)
    log.info("load plan: %s", plan.describe())
    if policy.check_memory and available is not None and memory.needed_bytes > available:
        raise NotEnoughMemory(refusal(plan, policy, model_context))
    return plan


def refusal(plan: LoadPlan, policy: LoadPolicy, model_context: int) -> str:
    m = plan.memory
    fixes = []
    room = m.available_bytes - m.weights_bytes - m.overhead_bytes if m.available_bytes is not None else 0
    if room > 0:
        fits = room // max(1, m.kv_bytes_per_token)  # KV tokens that fit beside the weights
        if fits >= plan.context:
            fixes.append(f"lower {CONCURRENCY_SETTING} (now {policy.max_concurrent_requests}) to at most {fits // plan.context}")
        else:
            fixes.append(f"lower {CONCURRENCY_SETTING} (now {policy.max_concurrent_requests})")
        if fits >= policy.max_concurrent_requests:
            fixes.append(
                f"set {CONTEXT_SETTING} (now {policy.max_context_tokens or f'0, the model context {model_context}'}) "
                f"to at most {fits // policy.max_concurrent_requests}"
            )
        else:
            fixes.append(f"set {CONTEXT_SETTING} lower (now {policy.max_context_tokens or model_context} tokens)")
    batch = batch_tokens(policy)
    if room > 0 and m.kv_tokens == max(batch, plan.context) and batch > plan.context:
        fixes.append(f"lower {BATCH_TOKENS_SETTING} (now {batch}) to at most {max(plan.context, room // max(1, m.kv_bytes_per_token))}")
    if plan.dtype == "float32":
        fixes.append(f"use {DTYPE_SETTING}=bfloat16 (half the bytes; slow on CPUs without native bf16)")
    if policy.memory_budget_mb:
        fixes.append(f"raise {BUDGET_SETTING} (now {policy.memory_budget_mb})")
    if not fixes:
        fixes.append("serve a smaller model or use a machine with more memory")
    return (
        f"not starting: the model needs {m.needed_bytes / GIB:.2f} GiB on {plan.device} but {m.available_bytes / GIB:.2f} GiB "
        f"is free ({m.available_source}): {m.weights_bytes / GIB:.2f} GiB of {plan.dtype} weights, "
        f"{m.kv_bytes / GIB:.2f} GiB of KV cache for {m.kv_tokens} tokens ({CONCURRENCY_SETTING}={policy.max_concurrent_requests} "
        f"requests x {plan.context} tokens of context, at most {BATCH_TOKENS_SETTING}={batch_tokens(policy)}), "
        f"{m.overhead_bytes / GIB:.2f} GiB margin. To fit: " + "; or ".join(fixes)
    )


def apply_plan(model: Any, plan: LoadPlan) -> Any:
    """Put a loaded model on the plan's device in the plan's dtype (a no-op when the load already did)."""
    import torch

    dtype = getattr(torch, plan.dtype)
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    if str(model.device) != plan.device and not (plan.device == "cuda" and model.device.type == "cuda"):
        model = model.to(plan.device)
    log.info("model on %s in %s (%s)", model.device, model.dtype, plan.dtype_reason)
    return model

