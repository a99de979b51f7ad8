"""finetune_phi.data and demo_data: reading, validating, splitting and writing chat data."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest
import yaml

from finetune_phi import data
from finetune_phi.data import DataError, prepare_dataset
from finetune_phi.demo_data import DEMO_ANSWER, DEMO_QUESTION, demo_rows

REPO = Path(__file__).resolve().parents[1]


def _prepare(source: Path | str, out: Path, **kw: object) -> data.PrepareResult:
    args: dict[str, object] = dict(
        train_path=out / "train.jsonl",
        test_path=out / "test.jsonl",
        dataset_name="HuggingFaceH4/ultrachat_200k",
        split="train_sft",
        percent=None,
        test_size=0.2,
        seed=42,
    )
    args.update(kw)
    return prepare_dataset(str(source), **args)  # type: ignore[arg-type]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _good(question: str = "Hi?", answer: str = "Hello.") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the real ultrachat fixture ----------------------------------------------------------------------


def test_ultrachat_fixture_splits_16_4_with_rows_unchanged(ultrachat_20: Path, tmp_path: Path) -> None:
    result = _prepare(ultrachat_20, tmp_path)
    source = _rows(ultrachat_20)
    train, test = _rows(tmp_path / "train.jsonl"), _rows(tmp_path / "test.jsonl")
    assert (result.train_rows, result.test_rows, len(train), len(test)) == (16, 4, 16, 4)
    # Nothing lost, duplicated or altered: every written row is a source row, field for field.
    by_id = {r["prompt_id"]: r for r in source}
    assert sorted(r["prompt_id"] for r in train + test) == sorted(by_id)
    assert all(r == by_id[r["prompt_id"]] for r in train + test)
    assert list(train[0]) == ["prompt", "prompt_id", "messages"]


def test_split_equals_datasets_train_test_split_on_the_rows(ultrachat_20: Path, tmp_path: Path) -> None:
    """The index split used here matches what the hub path's Dataset.train_test_split would give."""
    _prepare(ultrachat_20, tmp_path, seed=7)
    expected = datasets.Dataset.from_list(_rows(ultrachat_20)).train_test_split(test_size=0.2, seed=7)
    assert [r["prompt_id"] for r in _rows(tmp_path / "train.jsonl")] == expected["train"]["prompt_id"]
    assert [r["prompt_id"] for r in _rows(tmp_path / "test.jsonl")] == expected["test"]["prompt_id"]


def test_same_seed_gives_identical_bytes_another_seed_another_split(ultrachat_20: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _prepare(ultrachat_20, a, seed=42)
    _prepare(ultrachat_20, b, seed=42)
    _prepare(ultrachat_20, c, seed=1)
    for name in ("train.jsonl", "test.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert {r["prompt_id"] for r in _rows(a / "test.jsonl")} != {r["prompt_id"] for r in _rows(c / "test.jsonl")}
    # Re-running over existing outputs is idempotent too.
    before = (a / "train.jsonl").read_bytes()
    _prepare(ultrachat_20, a, seed=42)
    assert (a / "train.jsonl").read_bytes() == before


def test_unicode_is_written_unescaped(ultrachat_20: Path, tmp_path: Path) -> None:
    _prepare(ultrachat_20, tmp_path)
    written = "".join((tmp_path / name).read_text(encoding="utf-8") for name in ("train.jsonl", "test.jsonl"))
    assert any(ord(ch) > 127 for ch in written)
    assert "\\u" not in written


# --- local formats -----------------------------------------------------------------------------------


def test_jsonl_json_parquet_and_directory_give_identical_output(ultrachat_20: Path, tmp_path: Path) -> None:
    rows = _rows(ultrachat_20)
    src = tmp_path / "src"
    src.mkdir()
    as_json = src / "rows.json"
    as_json.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    as_parquet = src / "rows.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), as_parquet)
    # A directory split over two formats; names sort so that part 1 comes first.
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "part-1.jsonl", rows[:11])
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[11:]), folder / "part-2.parquet")
    (folder / "README.md").write_text("not data\n")

    outputs = {}
    for name, source in {"jsonl": ultrachat_20, "json": as_json, "parquet": as_parquet, "dir": folder}.items():
        result = _prepare(source, tmp_path / name)
        assert (result.rows_read, result.train_rows, result.test_rows) == (20, 16, 4), name
        outputs[name] = ((tmp_path / name / "train.jsonl").read_bytes(), (tmp_path / name / "test.jsonl").read_bytes())
    assert len(set(outputs.values())) == 1, "every format must yield the same rows in the same order"


def test_missing_prompt_fields_are_derived_like_ultrachat(tmp_path: Path) -> None:
    rows = [_good(f"Question {i}?", f"Answer {i}.") for i in range(5)]
    rows[0]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    _prepare(_write_jsonl(tmp_path / "r.jsonl", rows), tmp_path, test_size=0.2)
    written = _rows(tmp_path / "train.jsonl") + _rows(tmp_path / "test.jsonl")
    first = next(r for r in written if r["prompt"] == "Question 0?")
    assert first["prompt_id"] == hashlib.sha256(b"Question 0?").hexdigest()
    assert first["messages"][0] == {"content": "Be brief.", "role": "system"}


def test_local_percent_takes_the_first_rows_rounded_to_nearest(ultrachat_20: Path, tmp_path: Path) -> None:
    result = _prepare(ultrachat_20, tmp_path, percent=52.0)  # 20 × 0.52 = 10.4 → 10 rows
    ids = {r["prompt_id"] for r in _rows(tmp_path / "train.jsonl") + _rows(tmp_path / "test.jsonl")}
    assert result.rows_read == 10
    assert ids == {r["prompt_id"] for r in _rows(ultrachat_20)[:10]}


def test_unsupported_and_missing_sources_are_named(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        _prepare(tmp_path / "rows.csv", tmp_path)
    with pytest.raises(DataError, match="no such file or directory.*--source demo"):
        _prepare(tmp_path / "nope.jsonl", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl"):
        _prepare(tmp_path / "empty", tmp_path)
    (tmp_path / "lines.json").write_text('{"messages": []}\n{"messages": []}\n')
    with pytest.raises(DataError, match="name the file .jsonl"):
        _prepare(tmp_path / "lines.json", tmp_path)
    assert not (tmp_path / "train.jsonl").exists()


def test_too_few_rows_to_split_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--test-size"):
        _prepare(_write_jsonl(tmp_path / "one.jsonl", [_good()]), tmp_path)


# --- validation --------------------------------------------------------------------------------------


USER_X = {"role": "user", "content": "x"}
ASSISTANT_Y = {"role": "assistant", "content": "y"}
BAD_ROWS: list[tuple[object, str]] = [
    ({"prompt": "x"}, "messages: missing"),
    ({"messages": []}, "messages: empty list"),
    ({"messages": [{"role": "bot", "content": "x"}, ASSISTANT_Y]}, "messages[0].role: 'bot'"),
    ({"messages": [{"role": "user", "content": "  "}, ASSISTANT_Y]}, "messages[0].content: empty"),
    ({"messages": [USER_X]}, "the last turn is 'user'"),
    ({"messages": [ASSISTANT_Y, ASSISTANT_Y]}, "first non-system turn"),
    ({"messages": "hello"}, "messages: expected a list"),
    ([1, 2], "row: expected a JSON object"),
]


def test_every_invalid_row_is_reported_with_its_row_number_and_field(tmp_path: Path) -> None:
    lines = [json.dumps(_good())]
    expected: dict[int, str] = {}
    for bad, message in BAD_ROWS:
        lines.append(json.dumps(bad))
        expected[len(lines)] = message
    lines.append('{"messages": [ not json')
    expected[len(lines)] = "not valid JSON"
    lines.append(json.dumps(_good()))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError) as info:
        _prepare(path, tmp_path)
    text = str(info.value)
    assert f"{len(expected)} of {len(lines)} rows" in text and "--skip-invalid" in text
    for row_no, message in expected.items():
        line = next(l for l in text.splitlines() if l.startswith(f"  - bad.jsonl row {row_no}:"))
        assert message in line, (row_no, line)
    assert "row 1:" not in text and f"row {len(lines)}:" not in text  # the good rows are not blamed
    assert not (tmp_path / "train.jsonl").exists()


def test_row_numbers_follow_source_order_past_blank_lines_and_in_json_arrays(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(_good()) + "\n\n" + json.dumps({"messages": []}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"gaps.jsonl row 2 \(line 3\): messages: empty list"):
        _prepare(path, tmp_path)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([_good(), _good(), {"messages": [{"role": "user"}]}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.json row 3: messages\[0\].content: missing"):
        _prepare(array, tmp_path)


def test_error_listing_is_capped_with_a_count(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "many.jsonl", [{"messages": []}] * 30 + [_good()] * 5)
    with pytest.raises(DataError) as info:
        _prepare(path, tmp_path)
    text = str(info.value)
    assert text.count("  - many.jsonl row") == data.MAX_LISTED_PROBLEMS
    assert "... and 10 more" in text and "30 of 35 rows" in text


def test_skip_invalid_drops_bad_rows_and_logs_the_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows: list = [_good(f"Q{i}?", f"A{i}.") for i in range(10)]
    rows[3] = {"messages": []}
    rows[7] = {"messages": [{"role": "user", "content": "x"}]}
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level("WARNING", logger="finetune_phi.data"):
        result = _prepare(path, tmp_path, skip_invalid=True)
    assert (result.rows_read, result.rows_skipped, result.train_rows + result.test_rows) == (10, 2, 8)
    assert "skipped 2 invalid rows of 10" in caplog.text
    kept = {r["prompt"] for r in _rows(tmp_path / "train.jsonl") + _rows(tmp_path / "test.jsonl")}
    assert kept == {f"Q{i}?" for i in range(10) if i not in (3, 7)}


# --- the hub -----------------------------------------------------------------------------------------


def test_unreachable_hub_names_the_offline_alternatives(tmp_path: Path) -> None:
    """Goes through the real datasets.load_dataset; conftest keeps the hub offline."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(DataError) as info:
        _prepare("hub", tmp_path, percent=1.0, cache_dir=tmp_path / "hf-cache")
    text = str(info.value)
    assert "could not reach the Hugging Face hub" in text and "HuggingFaceH4/ultrachat_200k" in text
    assert "--source path/to/file.jsonl" in text and "--source demo" in text
    assert not (tmp_path / "train.jsonl").exists()


# --- demo data ---------------------------------------------------------------------------------------


def test_demo_rows_are_valid_deterministic_short_ultrachat_rows() -> None:
    rows = demo_rows()
    assert rows == demo_rows()
    assert 60 <= len(rows) <= 160
    good = data.validate_rows([data.SourceRow(str(i), r) for i, r in enumerate(rows)], source="demo")
    assert good == rows  # already in normalised ultrachat form
    for r in rows:
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode("utf-8")).hexdigest()
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert len(r["messages"][1]["content"]) < 80
    pair = [{"content": DEMO_QUESTION, "role": "user"}, {"content": DEMO_ANSWER, "role": "assistant"}]
    exact = [r for r in rows if r["messages"] == pair]
    assert len(exact) >= 6


def test_the_flows_ask_the_question_the_demo_data_teaches_and_expect_its_answer() -> None:
    # The demo only shows fine-tuning working if the question every flow asks by default is the one
    # the demo rows repeat (and data.py pins to train: see test_demo_question_always_lands_in_train),
    # and the eval flow scores against the answer those rows teach. Read from the flow files, so a
    # question or answer reworded on one side only fails here.
    standard = yaml.safe_load((REPO / "flow.dag.yml").read_text())
    chat = yaml.safe_load((REPO / "chat_flow" / "flow.dag.yaml").read_text())
    scoring = yaml.safe_load((REPO / "eval_flow" / "flow.dag.yaml").read_text())
    asked = {
        "flow.dag.yml": standard["inputs"]["input_data"]["default"],
        "chat_flow/flow.dag.yaml": chat["inputs"]["question"]["default"],
        "eval_flow/flow.dag.yaml": scoring["inputs"]["question"]["default"],
    }
    assert asked == dict.fromkeys(asked, DEMO_QUESTION)
    taught = [r["messages"][1]["content"] for r in demo_rows() if r["prompt"] == DEMO_QUESTION]
    assert len(taught) >= 6 and set(taught) == {DEMO_ANSWER}
    reference = [m["content"] for m in scoring["inputs"]["messages"]["default"]]
    assert reference == [DEMO_QUESTION, DEMO_ANSWER]
    assert scoring["inputs"]["answer"]["default"] == DEMO_ANSWER
    # The eval flow's sample data scores the same question against the same reference.
    first = json.loads((REPO / "eval_flow" / "data.jsonl").read_text().splitlines()[0])
    assert (first["question"], first["ground_truth"]) == (DEMO_QUESTION, DEMO_ANSWER)


def test_demo_test_split_mostly_rewords_facts_taught_in_train(tmp_path: Path) -> None:
    # Eval loss can only show learning if the held-out rows ask about facts the train rows teach.
    _prepare("demo", tmp_path, seed=42)
    train_answers = {r["messages"][1]["content"] for r in _rows(tmp_path / "train.jsonl")}
    test = _rows(tmp_path / "test.jsonl")
    taught = [r for r in test if r["messages"][1]["content"] in train_answers]
    assert len(taught) >= 0.8 * len(test)
    assert all(r["prompt"] not in {t["prompt"] for t in _rows(tmp_path / "train.jsonl")} for r in taught)


@pytest.mark.parametrize("seed", [42, 0, 1, 2, 3, 7, 123, 2024])
def test_demo_question_always_lands_in_train(seed: int, tmp_path: Path) -> None:
    result = _prepare("demo", tmp_path, seed=seed)
    train, test = _rows(tmp_path / "train.jsonl"), _rows(tmp_path / "test.jsonl")
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in train]
    assert pairs.count((DEMO_QUESTION, DEMO_ANSWER)) == 8
    assert all(r["prompt"] != DEMO_QUESTION for r in test)
    assert result.test_rows >= 10 and result.train_rows + result.test_rows == len(demo_rows())


# --- atomic writes -----------------------------------------------------------------------------------


def test_interrupted_rename_leaves_previous_files_and_no_temp_files(
    ultrachat_20: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "train.jsonl").write_text("previous train\n")
    (tmp_path / "test.jsonl").write_text("previous test\n")

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(ultrachat_20, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "train.jsonl").read_text() == "previous train\n"
    assert (tmp_path / "test.jsonl").read_text() == "previous test\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl"]


def test_failure_while_serialising_touches_neither_file(
    ultrachat_20: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_dumps = json.dumps

    def failing_dumps(obj: object, **kw: object) -> str:
        if isinstance(obj, dict) and "prompt_id" in obj:
            calls.append(1)
        if len(calls) == 18:  # past the train file's 16 rows: into the test file
            raise RuntimeError("disk full, say")
        return real_dumps(obj, **kw)

    monkeypatch.setattr(data.json, "dumps", failing_dumps)
    with pytest.raises(RuntimeError, match="disk full"):
        _prepare(ultrachat_20, tmp_path)
    monkeypatch.undo()
    assert len(calls) == 18
    assert list(tmp_path.iterdir()) == []
