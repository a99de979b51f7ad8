"""bench/train_bench.py: its refusals, its loss definition, and its JSON contract on a tiny run.

The timing itself is the bench's job, not a test's: nothing here asserts a speed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "finetuning_dir"))

import tiny_model  # noqa: E402

_spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench" / "train_bench.py")
train_bench = importlib.util.module_from_spec(_spec)
sys.modules["train_bench"] = train_bench  # dataclasses look their module up while the class is built
_spec.loader.exec_module(train_bench)

PER_RECIPE = ("total_tok_s", "supervised_tok_s", "peak_mib", "eval_loss_before", "eval_loss", "steps", "epochs",
              "train_examples", "train_sha256", "seconds")  # fmt: skip


def test_phi3_mini_shape_refuses_without_cuda_and_bad_flags_are_named(tmp_path):
    import torch

    args = train_bench.make_parser().parse_args(
        ["--model", "phi3-mini-shape", "--steps", "1", "--seq-len", "8", "--data", str(tmp_path / "no.jsonl")]
    )
    with pytest.raises(SystemExit) as excinfo:
        train_bench.validate(args)
    message = str(excinfo.value)
    assert "--steps must be >= 2" in message and "--seq-len must be >= 64" in message and "--data" in message
    assert ("--model phi3-mini-shape needs CUDA" in message) == (not torch.cuda.is_available())


def test_eval_loss_is_the_mean_nll_of_assistant_tokens(ultrachat_20, tmp_path):
    import torch
    from trl.chat_template_utils import get_training_chat_template

    train = tmp_path / "train.jsonl"
    train.write_text("".join(ultrachat_20.read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8")
    model, tokenizer = tiny_model.build_tiny(train, seed=3)
    messages = [{"role": "user", "content": "Who founded Microsoft?"},
                {"role": "assistant", "content": "Bill Gates and Paul Allen."},
                {"role": "user", "content": "When?"}, {"role": "assistant", "content": "In 1975."}]  # fmt: skip

    encoded = tokenizer.apply_chat_template(
        messages, chat_template=get_training_chat_template(tokenizer), return_dict=True, return_assistant_tokens_mask=True
    )
    ids = torch.tensor([encoded["input_ids"]])
    labels = torch.where(torch.tensor([encoded["assistant_masks"]]) == 1, ids, -100)
    assert 0 < int((labels != -100).sum()) < ids.shape[1] // 2  # both answers, nothing the user wrote
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()  # transformers' own shifted, masked mean
    assert train_bench.assistant_nll(model, tokenizer, [messages]) == pytest.approx(expected, rel=1e-5)
    # Two rows are weighted by their token counts, not averaged per row.
    short = messages[:2]
    both = train_bench.assistant_nll(model, tokenizer, [messages, short])
    assert both != pytest.approx((expected + train_bench.assistant_nll(model, tokenizer, [short])) / 2, rel=1e-6)
    # Only each row's first max_length tokens count: cut inside the conversation, the loss is
    # transformers' own over the cut prefix, which differs from the whole row's.
    cut = ids.shape[1] - 4
    assert 0 < int((labels[:, 1:cut] != -100).sum()) < int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        expected_cut = model(input_ids=ids[:, :cut], labels=labels[:, :cut]).loss.item()
    assert expected_cut != pytest.approx(expected, rel=1e-6)
    assert train_bench.assistant_nll(model, tokenizer, [messages], max_length=cut) == pytest.approx(expected_cut, rel=1e-5)


def test_a_missing_fixture_stops_the_bench_with_its_message(monkeypatch, tmp_path):
    """No silent change of workload: the bench exits non-zero with testkit.fixtures' how-to."""
    missing = tmp_path / "no-such-ultrachat.jsonl"
    # The fixture module honours a path named by its variable, and refuses a named path that is missing.
    env = {**os.environ, "FINETUNE_PHI_ULTRACHAT20": str(missing)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_bench.py"), "--steps", "3"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert "nothing was measured" in proc.stderr and f"FINETUNE_PHI_ULTRACHAT20={missing}" in proc.stderr
    assert "running the" not in proc.stderr  # no recipe started

    monkeypatch.setenv("FINETUNE_PHI_PHI3_TOKENIZER", str(tmp_path / "no-tokenizer"))
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    args = train_bench.make_parser().parse_args(["--model", "phi3-mini-shape", "--data", str(data)])
    with pytest.raises(SystemExit, match=r"FINETUNE_PHI_PHI3_TOKENIZER=.*no-tokenizer does not hold"):
        train_bench.resolve_fixtures(args)
    assert args.tokenizer is None


def _canned(recipe: str, steps: int, sha: str, total: float) -> dict:
    return {"recipe": recipe, "device": "cpu", "model": "tiny", "parameters": 1, "steps": steps, "timed_steps": steps - 1,
            "epochs": 1.0, "train_examples": 4, "train_sha256": sha, "seconds": 1.0, "supervised_tokens": 1,
            "total_tokens": 1, "supervised_tok_s": total / 2, "total_tok_s": total, "peak_mib": 100.0,
            "eval_loss_before": 7.0, "eval_loss": 6.9, "settings": {}, "mfu": None}  # fmt: skip


def test_no_line_is_printed_for_unequal_steps_or_other_data(monkeypatch, ultrachat_20, capsys):
    train_sha = {}

    def fake_run(args, recipe, train_file, eval_file, workdir):
        train_sha.setdefault("sha", train_bench.sha256_of(train_file))
        return outcomes[recipe]

    monkeypatch.setattr(train_bench, "run_recipe", fake_run)
    argv = ["--steps", "5", "--data", str(ultrachat_20)]

    outcomes = {"ours": _canned("ours", 5, "", 300.0), "peer": _canned("peer", 4, "", 100.0)}
    outcomes["ours"]["train_sha256"] = outcomes["peer"]["train_sha256"] = "later"
    with pytest.raises(SystemExit, match=r"other step counts than --steps 5: \{'peer': 4\}"):
        train_bench.main(argv)
    assert capsys.readouterr().out == ""

    sha = train_sha["sha"]
    outcomes = {"ours": _canned("ours", 5, sha, 300.0), "peer": _canned("peer", 5, "f" * 64, 100.0)}
    with pytest.raises(SystemExit, match=r"\['peer'\] trained on another file"):
        train_bench.main(argv)
    assert capsys.readouterr().out == ""

    outcomes = {"ours": _canned("ours", 5, sha, 300.0), "peer": _canned("peer", 5, sha, 100.0)}
    assert train_bench.main(argv) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["ratio_total_tok_s"] == 3.0 and line["headline"] == "ratio_total_tok_s"


@pytest.mark.slow
def test_tiny_run_prints_one_line_with_every_recipe_on_the_same_steps_and_data(ultrachat_20, tmp_path):
    """Two optimizer steps at 256 tokens, all three recipes: the contract, not the speed."""
    steps, seq_len = 3, 256
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_bench.py"), "--steps", str(steps), "--seq-len", str(seq_len),
         "--data", str(ultrachat_20), "--peer-bfd"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=480,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON line, logs on stderr
    line = json.loads(lines[0])

    # What ran is stated in the line.
    assert line["bench"] == "train" and line["headline"] == "ratio_total_tok_s"
    assert (line["model"], line["threads"], line["steps"], line["seq_len"], line["batch_size"]) == ("tiny", 1, steps, seq_len, 4)
    assert line["data"]["file"] == str(ultrachat_20) and line["data"]["train_rows"] == 16 and line["data"]["eval_rows"] == 4
    assert line["data"]["sha256"] == hashlib.sha256(ultrachat_20.read_bytes()).hexdigest()
    expected_train = train_bench.split_rows(ultrachat_20, tmp_path)[0]
    assert line["data"]["train_sha256"] == train_bench.sha256_of(expected_train)

    for recipe in ("ours", "peer", "peer_bfd"):
        assert all(f"{recipe}_{key}" in line for key in PER_RECIPE), recipe
        # The same optimizer steps on the same training rows, whatever each recipe made of them.
        assert line[f"{recipe}_steps"] == steps
        assert line[f"{recipe}_train_sha256"] == line["data"]["train_sha256"]
        assert line[f"{recipe}_total_tok_s"] >= line[f"{recipe}_supervised_tok_s"] > 0
        assert line[f"{recipe}_peak_mib"] > 0 and line[f"{recipe}_eval_loss_before"] > 0 and line[f"{recipe}_eval_loss"] > 0
    assert line["timed_steps"] == steps - 1

    # The peer packs the tutorial's way (TRL 0.8's concatenate-and-cut); bfd is the labelled extra.
    assert line["peer"]["packing_strategy"] == "wrapped" and line["peer"]["padding_free"] is False
    assert line["peer_bfd"]["packing_strategy"] == "bfd" and line["peer_bfd"]["padding_free"] is True
    for recipe in ("peer", "peer_bfd"):
        assert line[recipe]["attention"] == "eager" and line[recipe]["gradient_checkpointing"] is True
        assert line[recipe]["lr"] == 5e-6 and line[recipe]["loss_on"] == "every token"
        assert line[f"{recipe}_supervised_tok_s"] == pytest.approx(line[f"{recipe}_total_tok_s"], rel=0.02)
    # Ours learns from assistant turns only, so it has strictly fewer supervised than total tokens.
    assert line["ours_supervised_tok_s"] < line["ours_total_tok_s"]
    assert line["ours"]["loss_on"] == "assistant turns" and line["ours"]["packing"] is False

    assert line["ratio_total_tok_s"] == pytest.approx(line["ours_total_tok_s"] / line["peer_total_tok_s"], abs=1e-3)
    assert line["ratio_supervised_tok_s"] == pytest.approx(
        line["ours_supervised_tok_s"] / line["peer_supervised_tok_s"], abs=1e-3
    )
    assert line["ratio_total_tok_s_vs_peer_bfd"] == pytest.approx(
        line["ours_total_tok_s"] / line["peer_bfd_total_tok_s"], abs=1e-3
    )
