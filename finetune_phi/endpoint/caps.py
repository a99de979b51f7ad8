"""The batcher's caps and their defaults, in one place below every module that uses them.

endpoint/__main__.py builds a BatchCaps once, from its flags (which local_deploy fills from
config.py's ENDPOINT_* settings), and hands it down: create_app → the batcher → the stepper; the
load policy (loading.py) sizes the KV cache with the same max_batch_tokens. Nothing below __main__
reads the environment for them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tokens of one packed forward (rows x tokens): a longer prefill is fed in chunks of this size.
DEFAULT_MAX_STEP_TOKENS = 1024
# Prompt + new tokens of every running row (the KV cache held at once): 16 rows of 1,024. For
# Phi-3-mini that is 6 GiB of cache in bf16 (12 in fp32): KV bytes per token =
# 2 x layers x kv_heads x head_dim x dtype bytes (loading.kv_bytes_per_token).
DEFAULT_MAX_BATCH_TOKENS = 16 * 1024


@dataclass(frozen=True)
class BatchCaps:
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    # Prepacked oneDNN weights for the decoder's linears (continuous.py): None lets the stepper
    # decide from the model (fp32 on CPU, mid-sized layers); True/False forces it.
    packed_weights: bool | None = None

    def __post_init__(self) -> None:
        if self.max_step_tokens < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_step_tokens and max_batch_tokens must be >= 1")
