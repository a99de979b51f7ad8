"""LoRA on a bf16 base against a float32 base: speed, memory and loss, same model, data, steps and threads.

    .venv/bin/python bench/lora_dtype_bench.py              # ~6 min on 2 cores
    .venv/bin/python bench/lora_dtype_bench.py --layers 2 --steps 4   # a quicker look

fine_tune.py's `--dtype auto` keeps the frozen base in bf16 for LoRA where the device computes bf16
natively. This is the measurement behind that choice: Phi-3-mini's exact width (hidden 3072, MLP
8192, 32 heads, its 32,064-token vocabulary and real tokenizer) with fewer layers (--layers, default
4: 0.65B parameters) and random weights, the 16 training rows of the real ultrachat_200k sample, LoRA
with the project's defaults, `fine_tune.py --dtype float32` then `--dtype bfloat16`, each its own
process. Loss on random weights measures numerics, not quality: the two runs should track each other.
Prints one JSON line: per dtype the train seconds per step, peak RSS, eval loss before and after, and
the ratios bf16/float32.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import realsize_bench  # noqa: E402  (bench/ is on sys.path: this file's folder)
import serve_bench  # noqa: E402
from serve_bench import ROOT, machine, thread_env

log = logging.getLogger("lora_dtype_bench")


def build(folder: Path, layers: int, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    values = {k: v for k, v in realsize_bench.PHI3_MINI_CONFIG.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(0)
    model = Phi3ForCausalLM._from_config(Phi3Config(**{**values, "num_hidden_layers": layers}), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


def fine_tune(dtype: str, model: Path, data: tuple[Path, Path], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import mlflow

    tracking = f"sqlite:///{work / f'{dtype}.db'}"
    argv = [sys.executable, "fine_tune.py", "--train-file", str(data[0]), "--eval-file", str(data[1]),
            "--model_output_dir", str(work / f"out-{dtype}"), "--model", str(model), "--dtype", dtype,
            "--max-steps", str(args.steps), "--max-seq-length", str(args.seq_len), "--eval-max-rows", "0"]  # fmt: skip
    env = {**os.environ, **thread_env(args.threads), "MLFLOW_TRACKING_URI": tracking, "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    step = realsize_bench.run_step(f"fine-tune-{dtype}", argv, env, work, cwd=ROOT / "finetuning_dir")
    mlflow.set_tracking_uri(tracking)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    metrics = run.data.metrics
    return {
        "seconds_per_step": round(metrics["train_runtime"] / args.steps, 2),
        "peak_rss_gib": step["peak_rss_gib"],
        "eval_loss_before": round(metrics["eval_loss_before"], 4),
        "eval_loss_after": round(metrics["eval_loss_after"], 4),
        "dtype_trained": run.data.params.get("dtype"),
        "saved_dtype": realsize_bench.read_weights_dtype(work / f"out-{dtype}"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from testkit import fixtures
    from finetune_phi.data import prepare_dataset

    tokenizer_dir, rows = fixtures.phi3_tokenizer_dir(), fixtures.ultrachat_first20()
    work = Path(tempfile.mkdtemp(prefix="lora-dtype-"))
    data = (work / "train.jsonl", work / "test.jsonl")
    prepare_dataset(str(rows), train_path=data[0], test_path=data[1], dataset_name="", split="", percent=None,
                    test_size=0.2, seed=42)  # fmt: skip
    model = work / "base"
    started = time.perf_counter()
    build(model, args.layers, tokenizer_dir)
    log.info("built the %d-layer base in %.0f s", args.layers, time.perf_counter() - started)
    try:
        results = {dtype: fine_tune(dtype, model, data, work, args) for dtype in ("float32", "bfloat16")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fp32, bf16 = results["float32"], results["bfloat16"]
    return {
        "bench": "lora_dtype", "layers": args.layers, "steps": args.steps, "seq_len": args.seq_len,
        "threads": args.threads, "results": results,
        "ratio_seconds_per_step": round(bf16["seconds_per_step"] / fp32["seconds_per_step"], 3),
        "ratio_peak_rss": round(bf16["peak_rss_gib"] / fp32["peak_rss_gib"], 3),
        "eval_loss_after_diff": round(bf16["eval_loss_after"] - fp32["eval_loss_after"], 4),
        "setup": machine(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    from finetune_phi.common import setup_logging

    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return serve_bench.print_result(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
