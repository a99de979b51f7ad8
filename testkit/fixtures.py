"""Third-party data for tests and benchmarks: found beside the checkout, named by a variable, or fetched once.

    python -m testkit.fixtures status     # where each fixture resolves from, or why it does not
    python -m testkit.fixtures missing    # the names of those that resolve nowhere (CI's skip policy)
    python -m testkit.fixtures fetch      # download the missing ones into the cache, each hash-checked

Each fixture resolves, first hit wins, from:
1. its own environment variable naming the path: FINETUNE_PHI_PHI3_TOKENIZER and
   FINETUNE_PHI_PHI4_MINI_TOKENIZER (folders), FINETUNE_PHI_ULTRACHAT20 (a .jsonl file),
   AZUREML_SCORE_SCRIPT (a .py file);
2. $FINETUNE_PHI_SHARED_FIXTURES, a folder laid out like ../shared/fixtures (the default: the
   `shared/fixtures` folder beside the checkout); an empty or missing folder is a clone with nothing beside it;
3. the cache, $FINETUNE_PHI_FIXTURE_CACHE (default ~/.cache/finetune-phi/fixtures), one folder per
   fixture and pinned revision. Only `fetch` writes there: nothing is ever downloaded on the side.

`fetch` downloads from the public source at a pinned revision, checks every file's sha256 and size (or
its git blob id) before anything lands in the cache, and moves a fixture into place with one rename, so
the cache holds a whole, checked fixture or none. The hosts are overridable for mirrors (and for the
tests, which serve the files from 127.0.0.1): FINETUNE_PHI_GITHUB_RAW replaces
https://raw.githubusercontent.com, HF_ENDPOINT (as in huggingface_hub) replaces https://huggingface.co.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = "FINETUNE_PHI_SHARED_FIXTURES"
CACHE_ENV = "FINETUNE_PHI_FIXTURE_CACHE"
GITHUB_RAW_ENV = "FINETUNE_PHI_GITHUB_RAW"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_GITHUB_RAW = "https://raw.githubusercontent.com"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
# Per socket operation (connect, each read), not per download: a stalled server fails within this.
HTTP_TIMEOUT_S = 30.0
HOW_TO_FETCH = "`make fixtures` (or `python -m testkit.fixtures fetch`)"


class FixtureUnavailable(RuntimeError):
    """A fixture is in none of the places it may be; the message says each place and how to get it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class FetchError(RuntimeError):
    """A download failed or did not match its pinned hash; nothing was written to the cache."""


# The most a file pinned by its git blob alone may be: its size is in the blob id, not known before.
MAX_GIT_BLOB_BYTES = 64 << 20


@dataclass(frozen=True)
class FileSpec:
    """One file of a fixture, pinned by its sha256 and size, or by its git blob id (SHA-1 over
    "blob <size>\\0" + the bytes: git's own content address) where the file was not at hand to hash."""

    name: str
    sha256: str = ""
    size: int = 0
    git_blob: str = ""

    def __post_init__(self) -> None:
        if not (self.sha256 and self.size) and not self.git_blob:
            raise ValueError(f"{self.name}: pin it by sha256 and size, or by its git blob id")

    @property
    def max_bytes(self) -> int:
        return self.size if self.sha256 else MAX_GIT_BLOB_BYTES


@dataclass(frozen=True)
class Fixture:
    key: str  # its folder under ../shared/fixtures, and (with @revision) in the cache
    what: str
    env_var: str  # names the returned path itself: the folder, or the one file
    files: tuple[FileSpec, ...]
    returns: str | None  # the file whose path is returned; None: the folder
    source: str  # where `fetch` downloads it from, for messages
    revision: str
    download: Callable[["Fixture", Path], None]  # writes every file of `files` into a staging folder

    @property
    def cache_name(self) -> str:
        return f"{self.key}@{self.revision}"


# --- where things are -------------------------------------------------------------------------------------


def shared_root() -> Path:
    named = os.environ.get(SHARED_ENV)
    return Path(named).expanduser() if named is not None else REPO.parent / "shared" / "fixtures"


def cache_root() -> Path:
    named = os.environ.get(CACHE_ENV)
    return Path(named).expanduser() if named else Path.home() / ".cache" / "finetune-phi" / "fixtures"


def _base(env: str, default: str) -> str:
    return (os.environ.get(env) or default).rstrip("/")


def _result(fixture: Fixture, folder: Path) -> Path:
    return folder / fixture.returns if fixture.returns else folder


def _missing(fixture: Fixture, folder: Path) -> list[str]:
    return [f.name for f in fixture.files if not (folder / f.name).is_file()]


def _hexdigest(path: Path, digest: Any) -> str:
    """`digest` fed with the file's bytes, read in blocks."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return _hexdigest(path, hashlib.sha256())


def git_blob_id(path: Path) -> str:
    # git's content address: SHA-1 over "blob <size>\0" and the bytes.
    return _hexdigest(path, hashlib.sha1(f"blob {path.stat().st_size}\0".encode()))  # noqa: S324


def _mismatches(fixture: Fixture, folder: Path) -> list[str]:
    """Files that are missing or differ from the pinned bytes, each with what was found."""
    problems = []
    for spec in fixture.files:
        path = folder / spec.name
        if not path.is_file():
            problems.append(f"{spec.name} missing")
            continue
        size = path.stat().st_size
        if spec.sha256 and (size, digest := _sha256(path)) != (spec.size, spec.sha256):
            problems.append(f"{spec.name}: {size} bytes sha256 {digest}, expected {spec.size} bytes sha256 {spec.sha256}")
        if spec.git_blob and (blob := git_blob_id(path)) != spec.git_blob:
            problems.append(f"{spec.name}: {size} bytes git blob {blob}, expected git blob {spec.git_blob}")
    return problems


# --- resolving --------------------------------------------------------------------------------------------


def resolve(fixture: Fixture) -> Path:
    """The fixture's path from the first place that has it; FixtureUnavailable naming every place and the fix."""
    named = os.environ.get(fixture.env_var)
    if named:
        path = Path(named).expanduser()
        # A named file may have any name; a named folder must hold every file under its own name.
        missing = ([] if path.is_file() else [path.name]) if fixture.returns else _missing(fixture, path)
        if not missing:
            return path
        # A path the user named is not silently replaced by another copy: they meant this one.
        raise FixtureUnavailable(
            fixture.key,
            f"{fixture.env_var}={named} does not hold {fixture.what} (missing: {', '.join(missing)}); "
            f"point it at {_expected(fixture)}, or unset it to use ../shared/fixtures or the cache that "
            f"{HOW_TO_FETCH} fills"
        )
    shared = shared_root() / fixture.key
    if not _missing(fixture, shared):
        return _result(fixture, shared)
    cached = cache_root() / fixture.cache_name
    problems = _mismatches(fixture, cached) if cached.is_dir() else []
    if cached.is_dir() and not problems:
        return _result(fixture, cached)
    cache_state = f"corrupt ({'; '.join(problems)}): fetch again" if problems else "not fetched"
    raise FixtureUnavailable(
        fixture.key,
        f"{fixture.what} not found: {fixture.env_var} is unset; not in {shared} "
        f"(${SHARED_ENV}, default ../shared/fixtures beside the checkout); cache {cached}: {cache_state}. "
        f"Get it with {HOW_TO_FETCH}, which downloads {fixture.source} and checks its hashes, "
        f"or set {fixture.env_var} to {_expected(fixture)}"
    )


def _expected(fixture: Fixture) -> str:
    if fixture.returns:
        return f"the {fixture.returns} file"
    return f"a folder with {', '.join(f.name for f in fixture.files)}"


def phi3_tokenizer_dir() -> Path:
    """A folder with the Phi-3-mini-4k-instruct tokenizer (tokenizer.json, tokenizer_config.json)."""
    return resolve(PHI3_TOKENIZER)


def phi4_mini_tokenizer_dir() -> Path:
    """A folder with the Phi-4-mini-instruct tokenizer (tokenizer.json, tokenizer_config.json)."""
    return resolve(PHI4_MINI_TOKENIZER)


def ultrachat_first20() -> Path:
    """A .jsonl of the first 20 rows of HuggingFaceH4/ultrachat_200k train_sft (prompt, prompt_id, messages)."""
    return resolve(ULTRACHAT_FIRST20)


def azureml_score_script() -> Path:
    """Azure ML's no-code MLflow scoring script, mlflow_score_script.py."""
    return resolve(AZUREML_SCORE_SCRIPT)


# --- downloading ------------------------------------------------------------------------------------------


def _open(url: str, headers: dict[str, str] | None = None):  # -> http.client.HTTPResponse
    request = urllib.request.Request(url, headers={"User-Agent": "finetune-phi-fixtures", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"GET {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"GET {url}: {getattr(exc, 'reason', exc)}") from exc


def _download_file(url: str, target: Path, max_bytes: int) -> None:
    """Stream `url` into `target`, refusing a body longer than `max_bytes` (the pinned size)."""
    written = 0
    with _open(url) as response, target.open("wb") as out:
        while block := response.read(1 << 16):
            written += len(block)
            if written > max_bytes:
                raise FetchError(f"GET {url}: more than the pinned {max_bytes} bytes: not the pinned file")
            out.write(block)


def raw_files(base_env: str, default_base: str, prefix: str) -> Callable[[Fixture, Path], None]:
    """A downloader for files served as-is at `<base>/<prefix>/<name>`."""

    def download(fixture: Fixture, staging: Path) -> None:
        base = _base(base_env, default_base)
        for spec in fixture.files:
            url = f"{base}/{prefix}/{spec.name}"
            log.info("downloading %s", url)
            _download_file(url, staging / spec.name, spec.max_bytes)

    return download


class RemoteFile(io.RawIOBase):
    """A read-only, seekable remote file: each read is one HTTP Range request.

    pyarrow reads a parquet file's footer and then only the column chunks of the row groups asked
    for, so the first rows of a 240 MB shard cost a few MB, not the shard.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.position = 0
        self.downloaded = 0
        with _open(url, {"Range": "bytes=0-3"}) as response:
            if response.status != 206:
                raise FetchError(f"GET {url}: the server ignored the Range request (HTTP {response.status})")
            # Content-Range: bytes 0-3/TOTAL
            self.size = int(response.headers.get("Content-Range", "").rpartition("/")[2] or -1)
            # Later ranges go straight to where the redirects led (a CDN), not through them again.
            self.url = response.geturl()
        if self.size < 0:
            raise FetchError(f"GET {url}: no total size in the Content-Range header")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, start + offset)
        return self.position

    def readinto(self, buffer: bytearray | memoryview) -> int:
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        with _open(self.url, {"Range": f"bytes={self.position}-{end - 1}"}) as response:
            data = response.read()
        if response.status != 206 or len(data) != end - self.position:
            raise FetchError(f"GET {self.url} bytes {self.position}-{end - 1}: got HTTP {response.status}, {len(data)} bytes")
        buffer[: len(data)] = data
        self.position = end
        self.downloaded += len(data)
        return len(data)


def first_rows_as_jsonl(url: str, rows: int) -> bytes:
    """The first `rows` rows of the parquet file at `url` as JSON lines: {prompt, prompt_id, messages}
    per line, messages as {content, role}, json.dumps(ensure_ascii=False): the exact bytes of
    ../shared/fixtures/ultrachat_200k/train_sft_first20.jsonl (its sha256 is checked on this text)."""
    import pyarrow.parquet as pq

    remote = RemoteFile(url)
    parquet = pq.ParquetFile(remote)
    columns = ["prompt", "prompt_id", "messages"]
    found: list[dict] = []
    for group in range(parquet.num_row_groups):
        found += parquet.read_row_group(group, columns=columns).to_pylist()
        if len(found) >= rows:
            break
    if len(found) < rows:
        raise FetchError(f"{url} has {len(found)} rows, fewer than {rows}")
    log.info("read %d rows from %s (%.1f MB of its %.1f MB)", rows, url, remote.downloaded / 1e6, remote.size / 1e6)
    lines = []
    for row in found[:rows]:
        messages = [{"content": m["content"], "role": m["role"]} for m in row["messages"]]
        record = {"prompt": row["prompt"], "prompt_id": row["prompt_id"], "messages": messages}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


def hf_parquet_rows(dataset: str, path: str, rows: int) -> Callable[[Fixture, Path], None]:
    """A downloader for the first `rows` rows of a parquet file in a Hugging Face dataset repository."""

    def download(fixture: Fixture, staging: Path) -> None:
        url = f"{_base(HF_ENDPOINT_ENV, DEFAULT_HF_ENDPOINT)}/datasets/{dataset}/resolve/{fixture.revision}/{path}"
        (staging / fixture.files[0].name).write_bytes(first_rows_as_jsonl(url, rows))

    return download


# --- the fixtures -----------------------------------------------------------------------------------------

# microsoft/onnxruntime-extensions main, the commit that last changed test/data/phi-3-mini/ (#965): the
# Phi-3-mini-4k-instruct tokenizer with the July-2024 chat template (git blobs e213d84, 4b2dd55).
ORTX_COMMIT = "59ea3722daec8d248ea311ccd038e9a78a378185"
PHI3_TOKENIZER = Fixture(
    key="phi-3-mini-tokenizer",
    what="the Phi-3-mini-4k-instruct tokenizer (tokenizer.json, tokenizer_config.json)",
    env_var="FINETUNE_PHI_PHI3_TOKENIZER",
    files=(
        FileSpec("tokenizer.json", "9e2ae3d66819f163cdcfedba5078f3a3af8118c2712491ed60912f77886bda6f", 1844408),
        FileSpec("tokenizer_config.json", "e7571cb644e0bbba12e73a1a0e11b9897fbf62ed0fe183d5c75d47eb86fa24e9", 3311),
    ),
    returns=None,
    source=f"microsoft/onnxruntime-extensions test/data/phi-3-mini/ at commit {ORTX_COMMIT[:12]}",
    revision=ORTX_COMMIT,
    download=raw_files(GITHUB_RAW_ENV, DEFAULT_GITHUB_RAW, f"microsoft/onnxruntime-extensions/{ORTX_COMMIT}/test/data/phi-3-mini"),
)

# microsoft/onnxruntime-extensions, the commit that last changed test/data/phi-4-mini/ ("Update Tool
# Normalization", 2025-10-24): Phi-4-mini-instruct's tokenizer_config.json (its chat template byte for
# byte, its special tokens: <|endoftext|> is EOS, BOS, pad and unk at once) and tokenizer.json (the
# 200k vocabulary), pinned by its git blob id: the file is 15 MB and was not at hand to hash.
ORTX_PHI4_MINI_COMMIT = "68ee0397c002ef197ef5e9075c1c0f92b0db539a"
PHI4_MINI_TOKENIZER = Fixture(
    key="phi-4-mini-tokenizer",
    what="the Phi-4-mini-instruct tokenizer (tokenizer.json, tokenizer_config.json)",
    env_var="FINETUNE_PHI_PHI4_MINI_TOKENIZER",
    files=(
        FileSpec("tokenizer.json", git_blob="ec30adce5ac8cd9ec33983009f0ffff64cf0c0ac"),
        FileSpec("tokenizer_config.json", "9c9b6bc0c94d95f69f826c41069a3e8b387ac3ced89601d201886e99240ac9db", 2932,
                 git_blob="f5958080514e266176052f86c80aa53f91ce4ba0"),
    ),
    returns=None,
    source=f"microsoft/onnxruntime-extensions test/data/phi-4-mini/ at commit {ORTX_PHI4_MINI_COMMIT[:12]}",
    revision=ORTX_PHI4_MINI_COMMIT,
    download=raw_files(GITHUB_RAW_ENV, DEFAULT_GITHUB_RAW,
                       f"microsoft/onnxruntime-extensions/{ORTX_PHI4_MINI_COMMIT}/test/data/phi-4-mini"),
)

# The dataset repository's revision of 2024 ("Update README.md", 8049631); the first shard of train_sft
# holds the split's first rows. The download is parquet, so the hash pins the JSON lines made from its
# first 20 rows (see first_rows_as_jsonl), which are byte for byte the shared fixture.
ULTRACHAT_REVISION = "8049631c405ae6576f93f445c6b8166f76f5505a"
ULTRACHAT_FIRST20 = Fixture(
    key="ultrachat_200k",
    what="the first 20 rows of HuggingFaceH4/ultrachat_200k train_sft (train_sft_first20.jsonl)",
    env_var="FINETUNE_PHI_ULTRACHAT20",
    files=(FileSpec("train_sft_first20.jsonl", "3a8fb0e89032452854fae8c6f4167157de27e638febf726d95a425e70a28dab7", 145720),),
    returns="train_sft_first20.jsonl",
    source=f"HuggingFaceH4/ultrachat_200k data/train_sft-00000-of-00003 at revision {ULTRACHAT_REVISION[:12]} (its first 20 rows)",
    revision=ULTRACHAT_REVISION,
    download=hf_parquet_rows(
        "HuggingFaceH4/ultrachat_200k", "data/train_sft-00000-of-00003-a3ecf92756993583.parquet", rows=20
    ),
)

AZUREML_ASSETS_COMMIT = "4b41f8ccbc01cf492767adc586ce1661c54c340a"
AZUREML_SCORE_SCRIPT = Fixture(
    key="azureml-inference",
    what="Azure ML's MLflow scoring script (mlflow_score_script.py)",
    env_var="AZUREML_SCORE_SCRIPT",
    files=(FileSpec("mlflow_score_script.py", "545b7be6f0d7526eb275560bc961198e4fbbd50a37e675f8aa33ed21dce55f1d", 28411),),
    returns="mlflow_score_script.py",
    source=f"Azure/azureml-assets assets/inference/environments/mlflow-py312-inference/context/ at commit {AZUREML_ASSETS_COMMIT[:12]}",
    revision=AZUREML_ASSETS_COMMIT,
    download=raw_files(
        GITHUB_RAW_ENV,
        DEFAULT_GITHUB_RAW,
        f"Azure/azureml-assets/{AZUREML_ASSETS_COMMIT}/assets/inference/environments/mlflow-py312-inference/context",
    ),
)

FIXTURES = {f.key: f for f in (PHI3_TOKENIZER, PHI4_MINI_TOKENIZER, ULTRACHAT_FIRST20, AZUREML_SCORE_SCRIPT)}


# --- fetching ---------------------------------------------------------------------------------------------


def fetch(fixture: Fixture) -> Path:
    """Make `fixture` resolvable: nothing to do when it already is; otherwise download it into the cache.

    The files go to a staging folder beside the cache entry, are checked against the pinned sizes and
    sha256, and the folder becomes the entry with one rename; on any failure the staging folder goes.
    """
    try:
        found = resolve(fixture)
    except FixtureUnavailable:
        pass
    else:
        log.info("%s: present at %s, nothing to fetch", fixture.key, found)
        return found
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / fixture.cache_name
    staging = Path(tempfile.mkdtemp(prefix=f".{fixture.cache_name}.", suffix=".partial", dir=root))
    try:
        fixture.download(fixture, staging)
        problems = _mismatches(fixture, staging)
        if problems:
            raise FetchError(
                f"{fixture.key}: refused, the download is not the pinned {fixture.source}: {'; '.join(problems)}"
            )
        if target.exists():  # a corrupt entry (resolve refused it): replaced by the checked one
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: fetched into %s (sha256 checked)", fixture.key, target)
    return _result(fixture, target)


def _status_line(fixture: Fixture) -> tuple[bool, str]:
    try:
        return True, f"{fixture.key}: {resolve(fixture)}"
    except FixtureUnavailable as exc:
        return False, f"{fixture.key}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.fixtures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("fetch", "download the fixtures that resolve nowhere into the cache"),
                            ("status", "print where each fixture resolves from"),
                            ("missing", "print the names of those that resolve nowhere, comma-separated; "
                                        "exit 1 when none resolves")):  # fmt: skip
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("names", nargs="*", metavar="NAME", help=f"fixtures (default: all of {', '.join(FIXTURES)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FIXTURES]
    if unknown:
        parser.error(f"unknown fixture(s) {', '.join(unknown)}: choose from {', '.join(FIXTURES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    chosen = [FIXTURES[n] for n in args.names] or list(FIXTURES.values())
    if args.command == "missing":
        absent = [f.key for f in chosen if not _status_line(f)[0]]
        print(",".join(absent))
        return 1 if len(absent) == len(chosen) else 0
    failed = []
    for fixture in chosen:
        if args.command == "status":
            ok, line = _status_line(fixture)
            print(line)
        else:
            try:
                fetch(fixture)
            except FetchError as exc:
                log.error("%s", exc)
                ok = False
            else:
                ok = True
        if not ok:
            failed.append(fixture.key)
    if args.command == "fetch":
        ready = len(chosen) - len(failed)
        print(f"fixtures: {ready} of {len(chosen)} available" + (f"; failed: {', '.join(failed)}" if failed else "")
              + f" (cache: {cache_root()})")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
