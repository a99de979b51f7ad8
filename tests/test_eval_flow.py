"""eval_flow/, through the real `pf` CLI: an evaluation run over a batch run of the standard flow, its
aggregated metrics from `pf run show-metrics`, and the judge-based scores against a stand-in judge.

Reuses tests/test_promptflow.py's rig: the real local endpoint serving a tiny Phi-3 behind a recording
proxy, an isolated Prompt flow home, and a network guard in every pf process. The evaluation flow runs
from a copy of its snapshot with this project's packages hidden, as on an Azure Prompt flow runtime.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from finetune_phi import pf_env
from test_promptflow import (  # noqa: F401 (rig and flow are fixtures)
    REPO, FlowRig, copy_snapshot, flow, flow_outputs, pf, pf_in, rig, snapshot_env,
)

sys.path.insert(0, str(REPO / "finetuning_dir"))
import evaluation  # noqa: E402

ROWS = [
    ("Who founded Microsoft?", "Microsoft was founded by Bill Gates and Paul Allen."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who founded Apple?", "Apple was founded by Steve Jobs, Steve Wozniak and Ronald Wayne."),
]


@pytest.fixture(scope="module")
def eval_snapshot(rig: FlowRig) -> Path:
    return copy_snapshot(REPO / "eval_flow", rig.tmp / "snapshots" / "eval")


def test_eval_flow_snapshot_is_its_own_folder() -> None:
    from test_promptflow import flow_snapshot_files

    files = {p.as_posix() for p in flow_snapshot_files(REPO / "eval_flow")}
    assert {"flow.dag.yaml", "score.py", "aggregate.py", "scores.py", "judge.py", "requirements.txt", "data.jsonl",
            "README.md"} <= files  # fmt: skip
    assert not any(p.startswith("eval_flow") for p in (f.as_posix() for f in flow_snapshot_files(REPO)))


@pytest.mark.slow
def test_evaluation_run_over_a_batch_run_logs_the_mean_scores(flow: FlowRig, eval_snapshot: Path) -> None:
    data = flow.tmp / "eval_data.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "messages": [{"role": "user", "content": q},
                                                                  {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in ROWS), encoding="utf-8")  # fmt: skip
    batch, scored = f"answers_{uuid.uuid4().hex[:8]}", f"evaluation_{uuid.uuid4().hex[:8]}"
    pf(flow, "run", "create", "--flow", ".", "--data", str(data), "--name", batch,
       "--column-mapping", "input_data=${data.prompt}")
    runs = pf_env.promptflow_home(flow.settings) / ".runs"
    answers = {o["line_number"]: o["answer"] for o in map(json.loads, (runs / batch / "flow_outputs" / "output.jsonl")
                                                          .read_text().splitlines())}  # fmt: skip
    # The tiny model's weights are random: so that the means are not all 0, line 0's reference is its own
    # answer (a ground_truth column); the other lines against the assistant turn of their messages.
    references = [answers[0], *(a for _, a in ROWS[1:])]
    eval_data = flow.tmp / "eval_refs.jsonl"
    eval_data.write_text("".join(json.dumps({**row, "ground_truth": answers[0] if i == 0 else ""}) + "\n"
                                 for i, row in enumerate(map(json.loads, data.read_text().splitlines()))))  # fmt: skip
    pf_in(eval_snapshot, flow.env, "run", "create", "--flow", str(eval_snapshot), "--run", batch,
          "--data", str(eval_data), "--name", scored, "--column-mapping", "answer=${run.outputs.answer}",
          "question=${data.prompt}", "ground_truth=${data.ground_truth}", "messages=${data.messages}")  # fmt: skip
    metrics = json.loads(pf(flow, "run", "show-metrics", "--name", scored).stdout)

    per_line = [evaluation.score_text(answers[i], reference) for i, reference in enumerate(references)]
    expected = {name: round(sum(s[name] for s in per_line) / len(ROWS), 4) for name in evaluation.TEXT_METRICS}
    assert expected["exact_match"] == round(1 / 3, 4)  # line 0; the control that the means are not all 0
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["lines"] == len(ROWS) and metrics["answer_words"] > 0
    assert not {"relevance", "coherence", "fluency", "similarity"} & set(metrics)  # no judge configured
    aggregated = json.loads((runs / scored / "node_artifacts" / "aggregate" / "000000000.jsonl").read_text())
    assert aggregated["run_info"]["output"]["skipped"].startswith(
        "skipped the judge scores (relevance, coherence, fluency, similarity): no judge configured; set EVAL_JUDGE_ENDPOINT")
    assert "skipped the judge scores" in aggregated["run_info"]["logs"]["stdout"]


# --- with a judge: an OpenAI-compatible stand-in on 127.0.0.1 --------------------------------------------


class StandInJudge:
    """Answers every chat completion with one fixed verdict, in the JSON shape azure-ai-evaluation's
    prompty evaluators parse; records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.headers.get("Authorization", ""), body))
                verdict = '{"reason": "stand-in judge", "score": 4, "status": "completed"}'
                reply = json.dumps({
                    "id": "cmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> "StandInJudge":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge() -> Iterator[StandInJudge]:
    with StandInJudge() as stand_in:
        yield stand_in


@pytest.mark.slow
def test_with_a_judge_configured_the_flow_adds_the_judge_scores(flow: FlowRig, eval_snapshot: Path,
                                                                judge: StandInJudge) -> None:
    env = {**flow.env, "EVAL_JUDGE_ENDPOINT": judge.url, "EVAL_JUDGE_API_KEY": "judge-key-123",
           "EVAL_JUDGE_MODEL": "judge-model"}  # fmt: skip
    proc = pf_in(eval_snapshot, env, "flow", "test", "--flow", str(eval_snapshot), "--inputs",
                 "answer=Bill Gates and Paul Allen founded it", f"ground_truth={ROWS[0][1]}", f"question={ROWS[0][0]}")
    scores = flow_outputs(proc.stdout)["scores"]
    assert scores == pytest.approx({"f1": 0.75, "rougeL": 0.625, "exact_match": 0.0, "contains": 0.0, "answer_words": 7.0,
                                    "relevance": 4.0, "coherence": 4.0, "fluency": 4.0, "similarity": 4.0})  # fmt: skip
    assert len(judge.requests) == 4
    assert {auth for auth, _ in judge.requests} == {"Bearer judge-key-123"}
    assert {body["model"] for _, body in judge.requests} == {"judge-model"}
    assert "skipped the judge scores" not in proc.stdout + proc.stderr
