"""Chat data for fine-tuning: load (hub, local files, or the demo set), validate, split, write JSONL.

Every row leaves here in the ultrachat_200k schema, ``{"prompt", "prompt_id", "messages"}``, one JSON
object per line, UTF-8 with unicode unescaped. ``download_dataset.py`` is the command-line front end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from finetune_phi import common
from finetune_phi.demo_data import DEMO_QUESTION, demo_rows

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
DEMO_SOURCE = "demo"
HUB_SOURCE = "hub"
# More than this many bad rows and the error lists the first ones and a count: enough to see the pattern.
MAX_LISTED_PROBLEMS = 20
SOURCE_HINT = "use --source path/to/file.jsonl (or .json, .parquet, or a directory of them) or --source demo"


class DataError(ValueError):
    """Bad input data or settings; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class SourceRow:
    """One row as read, before validation. `error` is set when the row could not even be parsed."""

    where: str  # e.g. "rows.jsonl row 3 (line 4)", "row 12"
    value: Any
    error: str | None = None


@dataclass(frozen=True)
class PrepareResult:
    source: str
    rows_read: int
    rows_skipped: int
    train_rows: int
    test_rows: int
    train_path: Path
    test_path: Path

    def summary(self) -> str:
        return (
            f"wrote {self.train_rows} train rows to {self.train_path} and {self.test_rows} test rows to "
            f"{self.test_path} (source: {self.source}; {self.rows_read} rows read, {self.rows_skipped} skipped)"
        )


# --- validation ------------------------------------------------------------------------------------


def row_problems(row: Any) -> list[str]:
    """Every problem with one row, each as "field: what is wrong"; empty when the row is usable."""
    if not isinstance(row, dict):
        return [f"row: expected a JSON object with a 'messages' list, got {type(row).__name__}"]
    problems = []
    for name in ("prompt", "prompt_id"):
        if row.get(name) is not None and not isinstance(row[name], str):
            problems.append(f"{name}: expected a string, got {type(row[name]).__name__}")
    if "messages" not in row or row["messages"] is None:
        return problems + ["messages: missing (expected a list of {role, content} objects)"]
    messages = row["messages"]
    if not isinstance(messages, list):
        return problems + [f"messages: expected a list of {{role, content}} objects, got {type(messages).__name__}"]
    if not messages:
        return problems + ["messages: empty list (a row needs at least a user and an assistant turn)"]
    roles: list[str | None] = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{field}: expected an object with role and content, got {type(message).__name__}")
            roles.append(None)
            continue
        role = message.get("role")
        roles.append(role if role in ROLES else None)
        if role is None:
            problems.append(f"{field}.role: missing (use one of {', '.join(ROLES)})")
        elif role not in ROLES:
            problems.append(f"{field}.role: {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            problems.append(f"{field}.content: missing")
        elif not isinstance(content, str):
            problems.append(f"{field}.content: expected a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{field}.content: empty")
    if None not in roles:
        turns = [r for r in roles if r != "system"]
        if turns and turns[0] != "user":
            problems.append(f"messages: the first non-system turn is {turns[0]!r}; it must be 'user'")
        if roles[-1] != "assistant":
            problems.append(f"messages: the last turn is {roles[-1]!r}; it must be 'assistant' (the answer to learn)")
    return problems


def normalise_row(row: dict) -> dict:
    """A valid row in ultrachat's exact shape; prompt and prompt_id derived as ultrachat does when absent."""
    messages = [{"content": m["content"], "role": m["role"]} for m in row["messages"]]
    prompt = row.get("prompt")
    if prompt is None:
        prompt = next(m["content"] for m in messages if m["role"] == "user")
    prompt_id = row.get("prompt_id")
    if prompt_id is None:
        prompt_id = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    return {"prompt": prompt, "prompt_id": prompt_id, "messages": messages}


def validate_rows(rows: Sequence[SourceRow], *, source: str, skip_invalid: bool = False) -> list[dict]:
    """The valid rows, normalised. Bad rows raise one DataError listing them all, or are dropped with a warning."""
    good: list[dict] = []
    bad: list[str] = []
    for row in rows:
        problems = [row.error] if row.error is not None else row_problems(row.value)
        if problems:
            bad.append(f"{row.where}: {'; '.join(problems)}")
        else:
            good.append(normalise_row(row.value))
    if bad and not skip_invalid:
        listed = bad[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(bad) - len(listed)} more" if len(bad) > len(listed) else ""
        raise DataError(
            f"{len(bad)} of {len(rows)} rows in {source} are invalid:\n"
            + "\n".join(f"  - {line}" for line in listed)
            + more
            + "\nFix those rows, or pass --skip-invalid to drop them."
        )
    if bad:
        log.warning(
            "skipped %d invalid rows of %d in %s (--skip-invalid); first: %s", len(bad), len(rows), source, bad[0]
        )
    return good


# --- reading -----------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[SourceRow]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # a trailing newline or blank separator is not a row
            where = f"{path.name} row {len(rows) + 1}" + (f" (line {line_no})" if line_no != len(rows) + 1 else "")
            try:
                rows.append(SourceRow(where, json.loads(line)))
            except json.JSONDecodeError as exc:
                rows.append(SourceRow(where, None, f"row: not valid JSON ({exc.msg} at column {exc.colno})"))
    return rows


def _read_json(path: Path) -> list[SourceRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        hint = " (one JSON object per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON: {exc}{hint}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got a JSON {type(data).__name__}")
    return [SourceRow(f"{path.name} row {i}", value) for i, value in enumerate(data, start=1)]


def _read_parquet(path: Path) -> list[SourceRow]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    return [SourceRow(f"{path.name} row {i}", value) for i, value in enumerate(table.to_pylist(), start=1)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def local_files(path: Path) -> list[Path]:
    """The data files `path` names: itself, or a directory's .jsonl/.json/.parquet files sorted by name."""
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DataError(f"--source {path}: unsupported file type {path.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        # Dot files are skipped: an interrupted atomic write leaves `.name.xxx.tmp` behind.
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"--source {path}: the directory holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    raise DataError(f"--source {path}: no such file or directory; {SOURCE_HINT}")


def read_local(path: Path) -> list[SourceRow]:
    """Every row of a local file or directory, in order (files sorted by name)."""
    rows: list[SourceRow] = []
    for file in local_files(path):
        rows += _READERS[file.suffix.lower()](file)
    return rows


def load_hub_rows(name: str, split: str, percent: float, cache_dir: Path | None = None) -> list[SourceRow]:
    """The first `percent` % of a hub dataset split (e.g. `train_sft[:1%]`) through datasets.load_dataset."""
    import datasets

    spec = split if percent >= 100 else datasets.ReadInstruction(split, to=percent, unit="%", rounding="closest")
    log.info("loading %s split %s[:%g%%] from the Hugging Face hub", name, split, percent)
    try:
        dataset = datasets.load_dataset(name, split=spec, cache_dir=str(cache_dir) if cache_dir else None)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(
            f"dataset {name!r} was not found on the hub ({exc}); check DATASET_NAME, or {SOURCE_HINT}"
        ) from exc
    except (ConnectionError, TimeoutError) as exc:
        # datasets turns offline mode, DNS failures and timeouts alike into a ConnectionError.
        raise DataError(
            f"could not reach the Hugging Face hub to load {name!r} ({exc}). To work offline, {SOURCE_HINT}."
        ) from exc
    except ValueError as exc:  # an unknown split name, mostly
        raise DataError(f"could not load split {split!r} of {name!r}: {exc}; check --split / DATASET_SPLIT") from exc
    return [SourceRow(f"row {i}", value) for i, value in enumerate(dataset.to_list(), start=1)]


def first_percent(rows: Sequence[SourceRow], percent: float) -> list[SourceRow]:
    """The first round(N × percent / 100) rows: the rounding datasets uses for a `split[:P%]` slice."""
    count = int(round(len(rows) * percent / 100.0))
    return list(rows[:count])


# --- splitting and writing ------------------------------------------------------------------------


def split_rows(
    rows: Sequence[dict], *, test_size: float, seed: int, pinned_to_train: Iterable[int] = ()
) -> tuple[list[dict], list[dict]]:
    """Seeded train/test split with datasets' own `train_test_split`, so hub and local data split alike.

    It splits row indices rather than the rows: the permutation depends only on the row count and
    seed, so the result equals `Dataset.train_test_split` on the rows themselves, while the rows
    skip an Arrow round trip that would add null-filled keys to heterogeneous rows.
    Rows in `pinned_to_train` (indices) always go to train and take no part in the split.
    """
    import datasets

    pinned = sorted(set(pinned_to_train))
    pinned_set = set(pinned)
    free = [i for i in range(len(rows)) if i not in pinned_set]
    try:
        parts = datasets.Dataset.from_dict({"i": free}).train_test_split(test_size=test_size, seed=seed)
    except ValueError as exc:  # datasets refuses a split that leaves train or test empty
        raise DataError(
            f"{len(free)} rows cannot be split with --test-size {test_size} ({exc}); "
            "use more data (a larger --percent) or another --test-size"
        ) from exc
    train_idx, test_idx = parts["train"]["i"], parts["test"]["i"]
    return [rows[i] for i in pinned + list(train_idx)], [rows[i] for i in test_idx]


def to_jsonl(rows: Iterable[dict]) -> list[str]:
    return [json.dumps(row, ensure_ascii=False) for row in rows]


def write_split(train: Sequence[dict], test: Sequence[dict], train_path: Path, test_path: Path) -> None:
    """Both files, each atomically; serialised before either is touched so a bad row changes neither."""
    train_lines, test_lines = to_jsonl(train), to_jsonl(test)
    for path in (train_path, test_path):
        _remove_stale_temp_files(path)
    common.atomic_write_lines(train_path, train_lines)
    common.atomic_write_lines(test_path, test_lines)


def _remove_stale_temp_files(path: Path) -> None:
    """A run killed between writing and renaming leaves `.NAME.*.tmp` beside NAME: drop those leftovers."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            log.info("removing %s, left by an interrupted run", stale)
            stale.unlink(missing_ok=True)


# --- the whole step ---------------------------------------------------------------------------------


def read_source(
    source: str, *, dataset_name: str, split: str, percent: float | None, cache_dir: Path | None = None
) -> tuple[str, list[SourceRow]]:
    """(a description of the source, its rows). `percent` None means every row of a local source."""
    if source == DEMO_SOURCE:
        rows = [SourceRow(f"demo row {i}", r) for i, r in enumerate(demo_rows(), start=1)]
        label = "built-in demo data"
    elif source == HUB_SOURCE or source.startswith(HUB_SOURCE + ":"):
        name = source.split(":", 1)[1] if ":" in source else dataset_name
        return f"{name} {split} (hub)", load_hub_rows(name, split, 100.0 if percent is None else percent, cache_dir)
    else:
        path = Path(source).expanduser()
        rows = read_local(path)
        label = str(path)
    if percent is not None and percent < 100:
        rows = first_percent(rows, percent)
        label += f" (first {percent:g}%)"
    return label, rows


def prepare_dataset(
    source: str,
    *,
    train_path: Path,
    test_path: Path,
    dataset_name: str,
    split: str,
    percent: float | None,
    test_size: float,
    seed: int,
    skip_invalid: bool = False,
    cache_dir: Path | None = None,
) -> PrepareResult:
    """Read `source`, validate its rows, split them with `seed`, and write the two JSONL files."""
    label, source_rows = read_source(
        source, dataset_name=dataset_name, split=split, percent=percent, cache_dir=cache_dir
    )
    if not source_rows:
        raise DataError(f"{label} holds no rows" + (" at this --percent" if percent is not None else ""))
    rows = validate_rows(source_rows, source=label, skip_invalid=skip_invalid)
    # The demo's default question must be in train whatever the seed, or the demo's answer is luck.
    pinned = [i for i, r in enumerate(rows) if r["prompt"] == DEMO_QUESTION] if source == DEMO_SOURCE else []
    train, test = split_rows(rows, test_size=test_size, seed=seed, pinned_to_train=pinned)
    write_split(train, test, Path(train_path), Path(test_path))
    return PrepareResult(
        source=label,
        rows_read=len(source_rows),
        rows_skipped=len(source_rows) - len(rows),
        train_rows=len(train),
        test_rows=len(test),
        train_path=Path(train_path),
        test_path=Path(test_path),
    )
