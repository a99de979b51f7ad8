"""bench/realsize_bench.py's chain and its JSON line, run on a narrow stand-in of the same config.

The real run builds a 3.8B model and takes ~20 minutes; here the same code runs with Phi-3-mini's
config narrowed to 2 layers of width 64 (vocabulary, tokenizer, dtype and every other field as
published), so that each step the bench times (data, fine-tune, deploy, answer, decode against
`transformers serve`, teardown) is known to work and to report what the line promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def realsize_bench(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCH))
    import realsize_bench

    monkeypatch.setattr(realsize_bench, "DECODE_TOKENS", 8)
    return realsize_bench


@pytest.mark.slow
def test_the_chain_runs_with_the_defaults_and_reports_every_step(realsize_bench, tmp_path: Path,
                                                                 phi3_tokenizer_dir: Path, ultrachat_20: Path) -> None:  # fmt: skip
    narrow = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4}  # fmt: skip
    args = realsize_bench.build_parser().parse_args(
        ["--threads", "2", "--keep-base", str(tmp_path / "base"), "--work-dir", str(tmp_path), "--shape", json.dumps(narrow)]
    )
    line = realsize_bench.run(args)
    assert line["shape"] == narrow
    assert line["base"]["dtype"] == "bfloat16"  # as published
    assert line["fine_tune"]["saved_dtype"] == "bfloat16"  # the base's dtype, not float32
    for step in ("build_base", "data", "fine_tune", "deploy", "answer", "teardown"):
        assert line["steps"][step]["seconds"] > 0, step
    assert 0 < line["steps"]["fine_tune"]["peak_rss_gib"] < 24
    assert line["steps"]["deploy"]["endpoint_peak_rss_gib"] > 0
    assert "bfloat16" in line["endpoint_load_plan"] or "float32" in line["endpoint_load_plan"]
    decode = line["decode"]
    assert decode["ours"]["tokens"] == decode["peer_transformers_serve"]["tokens"] == 8
    assert decode["ours"]["tokens_per_s"] > 0 and decode["peer_transformers_serve"]["tokens_per_s"] > 0
    assert decode["memory_bound_tokens_per_s"] > 0 and decode["matvec_tokens_per_s"] > 0
    for goal in line["goals"]:  # a missed decode goal says what limits it, with the figures measured
        if goal["goal"].startswith("decode") and not goal["met"]:
            assert str(decode["matvec_tokens_per_s"]) in goal["limited_by"], goal
    assert [g["goal"] for g in line["goals"]] == [
        "fine-tune peak RSS <= 12 GiB", "disk per fine-tune <= 1.25x the base", "decode >= 0.8x the memory bound",
        "decode >= 1.3x transformers serve",
    ]  # fmt: skip
    assert all(isinstance(g["met"], bool) and g["value"] is not None for g in line["goals"])
    assert not list(tmp_path.glob("realsize-*"))  # the run's state is removed unless --keep-work
    assert (tmp_path / "base" / "config.json").is_file()  # --keep-base keeps the base for the next run
