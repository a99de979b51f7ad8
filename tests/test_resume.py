"""Checkpoints: a run killed with SIGKILL resumes from its last complete checkpoint, and torn ones are ignored."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FINETUNING_DIR = REPO / "finetuning_dir"
sys.path.insert(0, str(FINETUNING_DIR))  # the job's code folder imports its siblings by bare name

import checkpoints  # noqa: E402
import fine_tune  # noqa: E402


def fake_checkpoint(root: Path, step: int, *, state: str | None = "complete", files: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder as the Trainer leaves it; `state` None = killed before trainer_state.json."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files or ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"x")
    if state == "complete":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    elif state == "torn":
        (path / "trainer_state.json").write_text('{"global_step": ' + str(step) + ', "log_hist')
    return path


def test_the_newest_complete_checkpoint_is_chosen_and_torn_ones_are_removed(tmp_path):
    older = fake_checkpoint(tmp_path, 5)
    chosen = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 15, state=None)  # killed before its last write
    fake_checkpoint(tmp_path, 20, state="torn")  # killed while writing trainer_state.json
    fake_checkpoint(tmp_path, 25, files=("model.safetensors",))  # state present but no optimizer: no exact resume
    (tmp_path / "checkpoint-30").write_text("a file, not a checkpoint folder")
    (tmp_path / "checkpoint-latest").mkdir()

    assert checkpoints.latest_complete_checkpoint(tmp_path, remove_torn=False) == chosen
    assert (tmp_path / "checkpoint-20").exists()  # only looked at
    assert checkpoints.latest_complete_checkpoint(tmp_path) == chosen
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-10", "checkpoint-30", "checkpoint-5", "checkpoint-latest"]
    assert older.is_dir()
    # A state file that names another step (a folder renamed by hand) is not trusted either.
    renamed = fake_checkpoint(tmp_path, 40)
    (renamed / "trainer_state.json").write_text(json.dumps({"global_step": 39}))
    assert checkpoints.latest_complete_checkpoint(tmp_path) == chosen
    assert checkpoints.latest_complete_checkpoint(tmp_path / "missing") is None


def test_a_peft_checkpoint_with_only_its_adapter_is_complete(tmp_path):
    adapter = fake_checkpoint(tmp_path, 3, files=("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"))
    assert checkpoints.is_complete(adapter)


def _args(train: Path, evaluation: Path, out: Path, *extra: str):
    return fine_tune.make_parser().parse_args(
        ["--train-file", str(train), "--eval-file", str(evaluation), "--model_output_dir", str(out), *extra]
    )


def test_the_checkpoint_folder_is_stable_per_data_and_settings(tmp_path):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    train.write_text(json.dumps(row) + "\n")
    evaluation.write_text(json.dumps(row) + "\n")
    root = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--save-steps", "5"]

    first = fine_tune.checkpoint_dir_for(_args(train, evaluation, tmp_path / "run1" / "model", *root))
    # Another output folder (the local backend makes one per MLflow run) and another save interval: same folder.
    again = fine_tune.checkpoint_dir_for(_args(train, evaluation, tmp_path / "run2" / "model", *root[:3], "7"))
    assert again == first and first.parent == tmp_path / "ckpt" and first.name.startswith("run-")
    recorded = json.loads((first / checkpoints.FINGERPRINT_FILE).read_text())
    assert recorded["settings"]["learning_rate"] == 5e-5 and set(recorded["files"]) == {"train", "eval"}
    # Other settings, or the same file name with other rows: never resume the other run's checkpoints.
    other_lr = fine_tune.checkpoint_dir_for(_args(train, evaluation, tmp_path / "m", *root, "--learning-rate", "1e-3"))
    train.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    other_data = fine_tune.checkpoint_dir_for(_args(train, evaluation, tmp_path / "m", *root))
    assert len({first, other_lr, other_data}) == 3


# --- for real: SIGKILL in the middle of a run ----------------------------------------------------

TOTAL_STEPS = 12
SAVE_STEPS = 2


def _start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = log_path.open("w")
    return subprocess.Popen(
        [sys.executable, "fine_tune.py", *argv], cwd=FINETUNING_DIR, env=env, stdout=log, stderr=subprocess.STDOUT
    )


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_at_the_same_step(tmp_path, ultrachat_20):
    import mlflow

    lines = ultrachat_20.read_text(encoding="utf-8").splitlines(keepends=True)
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(lines[:16]), encoding="utf-8")
    evaluation.write_text("".join(lines[16:18]), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("resume", artifact_location=(tmp_path / "artifacts").as_uri())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment_id}
    env.pop("MLFLOW_RUN_ID", None)
    root = tmp_path / "checkpoints"
    # Long rows at batch 4 make a step slow enough (~0.5 s) to be killed between two checkpoints.
    argv = ["--train-file", str(train), "--eval-file", str(evaluation), "--model-output-dir", str(tmp_path / "model"),
            "--model", "tiny", "--max-steps", str(TOTAL_STEPS), "--batch-size", "4", "--max-seq-length", "1024",
            "--learning-rate", "1e-3", "--save-steps", str(SAVE_STEPS), "--checkpoint-dir", str(root),
            "--eval-max-rows", "4", "--eval-max-new-tokens", "8"]  # fmt: skip

    first = _start(argv, env, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        killed_after: int | None = None
        while killed_after is None:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared within 120 s"
            complete = [p for p in root.glob("run-*/checkpoint-*") if checkpoints.is_complete(p)]
            steps = [checkpoints.checkpoint_step(p) for p in complete]
            if any(step >= SAVE_STEPS * 2 for step in steps):
                first.send_signal(signal.SIGKILL)
                killed_after = max(steps)
            time.sleep(0.02)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert killed_after < TOTAL_STEPS, "the run finished before it could be killed; make its steps slower"
    (run_dir,) = root.glob("run-*")
    # A checkpoint the kill cut short, newer than every complete one: it must be ignored.
    torn = run_dir / f"checkpoint-{TOTAL_STEPS - 1}"
    torn.mkdir(exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"half a file")

    second = subprocess.run(
        [sys.executable, "fine_tune.py", *argv], cwd=FINETUNING_DIR, env=env, capture_output=True, text=True, timeout=180
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    match = re.search(r"resuming from \S+checkpoint-(\d+) \(step (\d+) of (\d+)\)", output)
    assert match, output[-3000:]
    resumed = int(match.group(1))
    assert killed_after <= resumed < TOTAL_STEPS and int(match.group(3)) == TOTAL_STEPS
    assert f"{TOTAL_STEPS} steps (resumed from step {resumed})" in second.stdout
    assert "removing incomplete checkpoint" in output and not torn.exists()

    # Finished: its checkpoints are gone, so the same command later trains afresh instead of "resuming"
    # a finished run for 0 steps. The step count is checked from the summary line above and MLflow below.
    assert not run_dir.exists()
    # The second MLflow run trained only the steps after the checkpoint, and says where it started.
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2
    latest = runs[0]
    assert latest.info.status == "FINISHED" and latest.data.params["resumed_from_step"] == str(resumed)
    logged_steps = [m.step for m in client.get_metric_history(latest.info.run_id, "train_loss")]
    assert logged_steps and min(logged_steps) > resumed and max(logged_steps) == TOTAL_STEPS
    assert (tmp_path / "model" / "MLmodel").is_file()
