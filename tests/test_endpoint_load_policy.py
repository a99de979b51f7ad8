"""The endpoint's load policy (finetune_phi/endpoint/loading.py): dtype/device, memory estimate, timeout check.

On a tiny random Phi-3 saved as an MLflow transformers model in a temp folder (no registry: the
policy sits between the download and the weights, so a local folder exercises the same path).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from finetune_phi.endpoint import KEY_ENV
from finetune_phi.endpoint.__main__ import EXIT_LOAD_FAILED, build_parser, load_policy
from finetune_phi.endpoint.__main__ import main as endpoint_main
from finetune_phi.endpoint.engine import Engine, SamplingParams, check_decode_speed
from finetune_phi.endpoint.loading import (
    LoadPolicy,
    NotEnoughMemory,
    cpu_bf16_flags,
    kv_bytes_per_token,
    plan_load,
    read_weights,
    resolve_dtype,
)
from helpers_model import PIP_REQUIREMENTS, tiny_phi3


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow.transformers

    model, tokenizer = tiny_phi3()
    path = tmp_path_factory.mktemp("load-policy") / "model"
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(path),
        task="text-generation",
        pip_requirements=PIP_REQUIREMENTS,
    )
    return path


@pytest.fixture(scope="module")
def engine(saved_model: Path) -> Engine:
    return Engine.from_mlflow(str(saved_model))


def test_auto_dtype_rules() -> None:
    # CPU without bf16 units: fp32, whatever the weights were saved in (merged LoRA weights are bf16).
    assert resolve_dtype("auto", "cpu", "bfloat16", cpu_flags=[])[0] == "float32"
    assert resolve_dtype("auto", "cpu", "float32", cpu_flags=[])[0] == "float32"
    # With native bf16: 16-bit weights run in bf16; fp32 weights are not rounded down.
    assert resolve_dtype("auto", "cpu", "bfloat16", cpu_flags=["amx_bf16"])[0] == "bfloat16"
    assert resolve_dtype("auto", "cpu", "float32", cpu_flags=["avx512_bf16"])[0] == "float32"
    dtype, why = resolve_dtype("float16", "cpu", "float32", cpu_flags=[])
    assert dtype == "float16" and "ENDPOINT_DTYPE" in why
    assert cpu_bf16_flags("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n") == [
        "avx512_bf16",
        "amx_bf16",
    ]
    assert cpu_bf16_flags("flags\t\t: fpu avx2\n") == []
    with pytest.raises(ValueError, match="ENDPOINT_DTYPE"):
        LoadPolicy(dtype="int4")


def test_kv_bytes_per_token_of_phi3_mini() -> None:
    # Phi-3-mini: 32 layers x 32 kv heads x 96 head dim; bf16 -> 384 KiB per token, 48 GiB for 32 x 4096.
    config = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 3072}
    assert kv_bytes_per_token(config, 2) == 2 * 32 * 32 * 96 * 2 == 393_216
    assert kv_bytes_per_token(config, 2) * 32 * 4096 == 48 * 1024**3


def test_auto_loads_in_fp32_here_and_a_forced_dtype_and_context_are_what_the_model_gets(saved_model: Path, engine: Engine) -> None:
    import torch

    weights = read_weights(saved_model / "model")
    assert weights.saved_dtype == "float32" and weights.parameters == engine.model.num_parameters()
    if not cpu_bf16_flags():  # this machine: no bf16 units -> fp32
        assert engine.model.dtype == torch.float32
    forced = Engine.from_mlflow(str(saved_model), policy=LoadPolicy(dtype="bfloat16", max_context_tokens=64))
    assert {p.dtype for p in forced.model.parameters()} == {torch.bfloat16}
    assert forced.device.type == "cpu"
    [reply] = forced.generate(["Hello there"], SamplingParams(max_new_tokens=5))
    assert reply.completion_tokens >= 1 and reply.finish_reason in ("stop", "length")
    # ENDPOINT_MAX_CONTEXT_TOKENS bounds prompt + new tokens (the model's own context is 512).
    assert forced.max_context == 64
    assert forced.row_limit(60, SamplingParams(max_new_tokens=32)) == 4


def test_refuses_to_start_when_the_kv_budget_does_not_fit(saved_model: Path) -> None:
    # The weights fit in 300 MB, but 10,000 requests x 512 tokens of KV cache (256 bytes a token) do not,
    # when the batcher may hold all of them (ENDPOINT_MAX_BATCH_TOKENS as large).
    greedy = LoadPolicy(max_concurrent_requests=10_000, memory_budget_mb=300, max_batch_tokens=10_000 * 512)
    with pytest.raises(NotEnoughMemory) as refused:
        plan_load(saved_model, greedy)
    message = str(refused.value)
    assert "ENDPOINT_MAX_CONCURRENT_REQUESTS=10000" in message
    assert "lower ENDPOINT_MAX_CONCURRENT_REQUESTS (now 10000) to at most" in message
    assert "ENDPOINT_MAX_CONTEXT_TOKENS" in message and "lower ENDPOINT_MAX_BATCH_TOKENS (now 5120000)" in message
    assert "ENDPOINT_MEMORY_BUDGET_MB" in message
    # With the batcher's own cap (16,384 tokens held at once), the same 10,000 requests fit.
    capped = plan_load(saved_model, LoadPolicy(max_concurrent_requests=10_000, memory_budget_mb=300))
    assert capped.memory.kv_tokens == 16_384
    # With what is really free here, the tiny model fits.
    plan = plan_load(saved_model, LoadPolicy())
    assert plan.memory.needed_bytes < (plan.memory.available_bytes or 0)


def test_the_cli_refuses_with_the_message_before_loading_weights(
    saved_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, "k" * 40)
    argv = ["--model-uri", str(saved_model), "--port", "0", "--load-before-listen", "--memory-budget-mb", "1"]
    with caplog.at_level(logging.INFO):
        assert endpoint_main(argv) == EXIT_LOAD_FAILED
    [refusal] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert refusal.startswith("not starting: the model needs") and "ENDPOINT_DTYPE=bfloat16" in refusal
    assert "Traceback" not in caplog.text


def test_cli_flags_make_the_policy() -> None:
    args = build_parser().parse_args(
        ["--model-uri", "m", "--dtype", "bfloat16", "--device", "cpu", "--max-context-tokens", "2048",
         "--memory-budget-mb", "8000", "--max-concurrent-requests", "4"]
    )  # fmt: skip
    assert load_policy(args) == LoadPolicy("bfloat16", "cpu", 4, 2048, 8000, True)
    capped = build_parser().parse_args(["--model-uri", "m", "--max-batch-tokens", "4096", "--max-step-tokens", "256"])
    assert load_policy(capped).max_batch_tokens == 4096


def test_a_timeout_shorter_than_decoding_max_new_tokens_is_warned_about(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="finetune_phi.endpoint.engine"):
        per_token = check_decode_speed(engine, request_timeout_s=1e-6)
    assert per_token > 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "ENDPOINT_REQUEST_TIMEOUT_S=1e-06" in warning and "128 new tokens" in warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune_phi.endpoint.engine"):
        check_decode_speed(engine, request_timeout_s=3600)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_settings_are_checked_by_name() -> None:
    import config

    settings = config.load(env={"ENDPOINT_DTYPE": "bfloat16", "ENDPOINT_MAX_CONTEXT_TOKENS": "2048"})
    assert (settings.ENDPOINT_DTYPE, settings.ENDPOINT_DEVICE, settings.ENDPOINT_MAX_CONTEXT_TOKENS) == ("bfloat16", "auto", 2048)
    with pytest.raises(config.ConfigError) as bad:
        config.load(env={"ENDPOINT_DTYPE": "int4", "ENDPOINT_DEVICE": "tpu", "ENDPOINT_MEMORY_BUDGET_MB": "-1"})
    message = str(bad.value)
    assert "ENDPOINT_DTYPE='int4'" in message and "ENDPOINT_DEVICE='tpu'" in message and "ENDPOINT_MEMORY_BUDGET_MB=-1" in message
