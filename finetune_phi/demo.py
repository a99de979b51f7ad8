"""`make demo`: the whole local pipeline, end to end and offline, with each step's wall time.

    python -m finetune_phi.demo

Runs the same commands a user types (download_dataset.py --source demo, setup_ml.py, deploy_model.py,
pf flow test), each as its own process, and ends with the flow's answer to the demo question. That
answer is greedy, so the same model gives the same sentence on every run (CI greps it): the flow's
client sends the model's own defaults (chat_format.GENERATION_DEFAULTS), which do not sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import config
from finetune_phi import common

log = logging.getLogger("demo")

# The demo trains the tiny model long enough to memorise the demo set. The one definition: bench/serve_bench.py
# and tests/test_azure_serving.py train their demo model with it too.
DEMO_OVERRIDES = {
    "BACKEND": "local",
    "LOCAL_BASE_MODEL": "tiny",
    # 15 epochs at 3e-3 memorise the demo set on every seed tried (10 was the least that did);
    # the tiny model takes a much higher rate than LoRA on real Phi-3 (config default 5e-5).
    "NUM_TRAIN_EPOCHS": "15",
    "LEARNING_RATE": "3e-3",
    # Every demo answer is one short sentence (under 30 tokens); the base model never stops, so its
    # answers run to this limit. All 24 held-out rows are evaluated.
    "EVAL_MAX_ROWS": "24",
    "EVAL_MAX_NEW_TOKENS": "48",
    "EVAL_BATCH_SIZE": "24",  # one batch: the tiny model's steps cost the same for 1 row or 24
}


@dataclass
class StepResult:
    name: str
    seconds: float
    output: str


def demo_env(settings: config.Settings) -> dict[str, str]:
    from finetune_phi.pf_env import subprocess_env
    from finetune_phi.mlflow_store import mlflow_env

    return subprocess_env(settings, {**os.environ, **DEMO_OVERRIDES, **mlflow_env(settings)})


def run_step(name: str, argv: list[str], env: dict[str, str], capture: bool = False) -> StepResult:
    log.info("step %s: %s", name, " ".join(argv))
    start = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=config.ROOT, env=env, text=True, stdout=subprocess.PIPE if capture else None
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        if capture and proc.stdout:
            sys.stdout.write(proc.stdout)
        raise RuntimeError(f"step {name!r} failed with exit status {proc.returncode}: {' '.join(argv)}")
    return StepResult(name, seconds, proc.stdout or "")


def parse_flow_answer(output: str) -> str:
    """`pf flow test` prints the flow's outputs as a JSON object after its log lines."""
    start = output.rfind("{")
    while start != -1:
        try:
            return json.loads(output[start:])["answer"]
        except (json.JSONDecodeError, KeyError):
            start = output.rfind("{", 0, start)
    raise RuntimeError(f"could not find the flow's answer in pf output:\n{output[-2000:]}")


def evaluation_report(settings: config.Settings, rows: int = 3, width: int = 60) -> list[str]:
    """The training run's before/after summary line and the answers to `rows` questions, as printed lines."""
    from finetune_phi.common import read_state
    from finetune_phi.mlflow_store import use_local_mlflow

    run_id = (read_state(settings).get("training") or {}).get("run_id")
    if not run_id:
        return []
    use_local_mlflow(settings)
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    summary = run.data.tags.get("eval_summary")
    if not summary:
        return [f"(MLflow run {run_id} has no before/after evaluation: EVAL_MAX_ROWS=0?)"]
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/eval/answers.json")
    columns = table["columns"]
    records = [dict(zip(columns, row)) for row in table["data"]][:rows]

    def cut(text: str) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = [f"Evaluation on {int(run.data.metrics.get('eval_rows', 0))} held-out questions (MLflow run {run_id}):",
             f"  {summary}"]  # fmt: skip
    for record in records:
        lines += [
            f"  Q: {cut(record['question'])}",
            f"     reference: {cut(record['reference'])}",
            f"     before:    {cut(record['before']) or '(empty)'}",
            f"     after:     {cut(record['after']) or '(empty)'}",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default="Who founded Microsoft?")
    args = parser.parse_args(argv)
    common.setup_logging()
    settings = config.load(**{k: v for k, v in DEMO_OVERRIDES.items() if k == "BACKEND"})
    env = demo_env(settings)
    py = sys.executable
    pf = str(Path(py).parent / "pf")
    steps: list[StepResult] = []
    try:
        steps.append(run_step("data", [py, "download_dataset.py", "--source", "demo"], env))
        steps.append(run_step("fine-tune", [py, "setup_ml.py"], env))
        steps.append(run_step("deploy", [py, "deploy_model.py"], env))
        flow = [pf, "flow", "test", "--flow", ".", "--inputs", f"input_data={args.question}"]
        steps.append(run_step("prompt flow", flow, env, capture=True))
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    answer = parse_flow_answer(steps[-1].output)
    total = sum(s.seconds for s in steps)
    print("\n== finetune-phi demo ==")
    for s in steps:
        print(f"  {s.name:<12} {s.seconds:6.1f} s")
    print(f"  {'total':<12} {total:6.1f} s")
    report = evaluation_report(settings)
    if report:
        print()
        print("\n".join(report))
        print("  (all answers and metrics: mlflow ui --backend-store-uri "
              f"{settings.tracking_uri.replace(str(config.ROOT) + '/', '')}, the run's Artifacts → eval/answers.json)")
    print(f"\nQ: {args.question}\nA (fine-tuned model, through Prompt flow): {answer}")
    print("The endpoint keeps running; stop it with: python deploy_model.py --teardown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
