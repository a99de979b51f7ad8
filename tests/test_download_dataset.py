"""download_dataset.py: the command line over finetune_phi.data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import download_dataset
from finetune_phi.demo_data import DEMO_ANSWER, DEMO_QUESTION

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "download_dataset.py", *argv],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
        timeout=60,
    )


def _count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _outputs(tmp_path: Path) -> list[str]:
    return ["--train-file", str(tmp_path / "train.jsonl"), "--test-file", str(tmp_path / "test.jsonl")]


def test_help_runs_as_a_script() -> None:
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    flags = ("--source", "--percent", "--test-size", "--seed", "--split", "--train-file", "--skip-invalid", "--backend")
    for flag in flags:
        assert flag in proc.stdout
    assert "python download_dataset.py --source demo" in proc.stdout


def test_bad_input_exits_1_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    proc = _run("--source", str(tmp_path / "missing.jsonl"), *_outputs(tmp_path))
    assert proc.returncode == 1
    assert "no such file or directory" in proc.stderr and "--source demo" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_source_writes_both_files_and_ends_with_a_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"):
        assert download_dataset.main(["--source", "demo", *_outputs(tmp_path)]) == 0
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in train]
    assert (DEMO_QUESTION, DEMO_ANSWER) in pairs
    last = caplog.records[-1].getMessage()
    assert f"wrote {len(train)} train rows to {tmp_path / 'train.jsonl'}" in last
    assert f"{_count(tmp_path / 'test.jsonl')} test rows to {tmp_path / 'test.jsonl'}" in last


def test_local_source_uses_every_row_unless_percent_is_given(
    ultrachat_20: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DATASET_PERCENT is the hub's default only; a local file is taken whole unless --percent says otherwise.
    monkeypatch.setenv("DATASET_PERCENT", "50")
    assert download_dataset.main(["--source", str(ultrachat_20), *_outputs(tmp_path)]) == 0
    assert (_count(tmp_path / "train.jsonl"), _count(tmp_path / "test.jsonl")) == (16, 4)
    assert download_dataset.main(["--source", str(ultrachat_20), "--percent", "50", *_outputs(tmp_path)]) == 0
    assert (_count(tmp_path / "train.jsonl"), _count(tmp_path / "test.jsonl")) == (8, 2)


def test_test_size_and_seed_come_from_config_unless_flagged(
    ultrachat_20: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SIZE", "0.5")
    monkeypatch.setenv("SEED", "3")
    assert download_dataset.main(["--source", str(ultrachat_20), *_outputs(tmp_path / "env")]) == 0
    assert _count(tmp_path / "env" / "test.jsonl") == 10
    flagged = ["--source", str(ultrachat_20), "--test-size", "0.5", "--seed", "3", *_outputs(tmp_path / "flag")]
    monkeypatch.delenv("TEST_SIZE")
    monkeypatch.delenv("SEED")
    assert download_dataset.main(flagged) == 0
    assert (tmp_path / "env" / "test.jsonl").read_bytes() == (tmp_path / "flag" / "test.jsonl").read_bytes()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--percent", "0"], "--percent"),
        (["--percent", "150"], "--percent"),
        (["--test-size", "1"], "--test-size"),
        (["--test-size", "abc"], "--test-size"),
        (["--seed", "-1"], "--seed"),
        (["--backend", "cloud"], "--backend"),
    ],
)
def test_bad_flag_values_name_the_flag(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        download_dataset.main(argv)
    assert info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_invalid_rows_fail_with_their_numbers_then_skip_invalid_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    lines = [json.dumps(good)] * 6 + ['{"messages": []}', "not json"] + [json.dumps(good)] * 4
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert download_dataset.main(["--source", str(src), *_outputs(out)]) == 1
    assert "rows.jsonl row 7: messages: empty list" in caplog.text
    assert "rows.jsonl row 8: row: not valid JSON" in caplog.text and "--skip-invalid" in caplog.text
    assert not out.exists()
    caplog.clear()
    assert download_dataset.main(["--source", str(src), "--skip-invalid", *_outputs(out)]) == 0
    assert "skipped 2 invalid rows of 12" in caplog.text
    assert _count(out / "train.jsonl") + _count(out / "test.jsonl") == 10


def test_default_hub_source_offline_exits_1_naming_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real datasets.load_dataset call; conftest sets HF_HUB_OFFLINE=1, so the hub is unreachable."""
    assert download_dataset.main(_outputs(tmp_path)) == 1
    assert "could not reach the Hugging Face hub" in caplog.text
    assert "--source path/to/file.jsonl" in caplog.text and "--source demo" in caplog.text
    assert not (tmp_path / "train.jsonl").exists()
