"""testkit.fixtures: third-party fixtures found (variable, ../shared, cache), fetched and checked, or skipped.

Downloads run against a real HTTP server on 127.0.0.1 that serves the files at the same paths as
raw.githubusercontent.com and huggingface.co (the base URLs are overridable for exactly this), with
Range requests and the hub's redirect to its CDN. Nothing leaves this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

from conftest import REPO, require
from testkit import fixtures

FIXTURE_VARS = [f.env_var for f in fixtures.FIXTURES.values()]


# --- a file server on 127.0.0.1 ----------------------------------------------------------------------------


@dataclass
class Site:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    ranges: bool = True  # answer Range requests with 206, as GitHub, the hub and its CDN do
    requests: list[str] = field(default_factory=list)
    served: Counter = field(default_factory=Counter)  # body bytes sent per path


@contextlib.contextmanager
def serving(site: Site) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            site.requests.append(self.path)
            if self.path in site.redirects:
                self.send_response(302)
                self.send_header("Location", site.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = site.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            wanted = self.headers.get("Range")
            if wanted and site.ranges:
                first, last = (int(n) for n in wanted.removeprefix("bytes=").split("-"))
                last = min(last, len(body) - 1)
                chunk = body[first : last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
            else:
                chunk = body
                self.send_response(200)
            self.send_header("Content-Length", str(len(chunk)))
            self.end_headers()
            self.wfile.write(chunk)
            site.served[self.path] += len(chunk)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base: str = "http://127.0.0.1:9") -> Path:
    """A clone with nothing beside it and an empty cache; downloads go to `base`. Returns the cache."""
    for name in FIXTURE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(fixtures.SHARED_ENV, str(tmp_path / "no-shared"))
    monkeypatch.setenv(fixtures.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(fixtures.GITHUB_RAW_ENV, f"{base}/gh")
    monkeypatch.setenv(fixtures.HF_ENDPOINT_ENV, f"{base}/hf")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # a proxy from the environment must not get these
    return tmp_path / "cache"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def synthetic(files: dict[str, bytes], returns: str | None = None) -> fixtures.Fixture:
    """A fixture pinned to `files`, downloaded from <github raw>/owner/repo/r1/dir/<name>."""
    return fixtures.Fixture(
        key="synthetic",
        what="the synthetic test fixture",
        env_var="FINETUNE_PHI_TEST_SYNTHETIC",
        files=tuple(fixtures.FileSpec(name, sha256(data), len(data)) for name, data in files.items()),
        returns=returns,
        source="the test server",
        revision="r1",
        download=fixtures.raw_files(fixtures.GITHUB_RAW_ENV, "http://127.0.0.1:9", "owner/repo/r1/dir"),
    )


FILES = {"a.json": b'{"a": 1}\n', "b.txt": "pinned bytes \u2603\n".encode()}


def site_for(files: dict[str, bytes]) -> Site:
    return Site(files={f"/gh/owner/repo/r1/dir/{name}": data for name, data in files.items()})


# --- fetch ---------------------------------------------------------------------------------------------------


def test_fetch_downloads_checks_caches_and_then_resolves_without_downloading_again(monkeypatch, tmp_path):
    fixture = synthetic(FILES)
    site = site_for(FILES)
    with serving(site) as base:
        cache = isolate(monkeypatch, tmp_path, base)
        with pytest.raises(fixtures.FixtureUnavailable):
            fixtures.resolve(fixture)
        folder = fixtures.fetch(fixture)
        assert folder == cache / "synthetic@r1" == fixtures.resolve(fixture)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == FILES
        assert sorted(p.name for p in cache.iterdir()) == ["synthetic@r1"]  # no staging folder left behind
        assert sorted(site.requests) == sorted(site.files)
        site.requests.clear()
        assert fixtures.fetch(fixture) == folder
        assert fixtures.resolve(fixture) == folder
    assert site.requests == []  # cached: the second fetch downloaded nothing


@pytest.mark.parametrize(
    "served,refusal",
    [
        ({"b.txt": FILES["b.txt"].replace(b"pinned", b"PINNED")}, "refused, the download is not the pinned"),
        ({"b.txt": FILES["b.txt"] + b"more"}, "more than the pinned"),
        ({"b.txt": None}, "HTTP 404"),
    ],
    ids=["tampered", "too-long", "missing"],
)
def test_a_download_that_is_not_the_pinned_bytes_is_refused_and_leaves_nothing(monkeypatch, tmp_path, served, refusal):
    fixture = synthetic(FILES)
    site = site_for(FILES)
    for name, data in served.items():
        path = f"/gh/owner/repo/r1/dir/{name}"
        if data is None:
            del site.files[path]
        else:
            site.files[path] = data
    with serving(site) as base:
        cache = isolate(monkeypatch, tmp_path, base)
        with pytest.raises(fixtures.FetchError, match=refusal):
            fixtures.fetch(fixture)
    assert list(cache.iterdir()) == []  # not the good file a.json either: a fixture is whole or absent
    with pytest.raises(fixtures.FixtureUnavailable, match="not fetched"):
        fixtures.resolve(fixture)


def test_a_corrupt_cache_entry_is_refused_and_fetch_replaces_it(monkeypatch, tmp_path):
    fixture = synthetic(FILES)
    with serving(site_for(FILES)) as base:
        isolate(monkeypatch, tmp_path, base)
        folder = fixtures.fetch(fixture)
        (folder / "b.txt").write_bytes(b"edited by hand\n")
        with pytest.raises(fixtures.FixtureUnavailable, match=r"corrupt \(b\.txt: 15 bytes sha256 .*: fetch again"):
            fixtures.resolve(fixture)
        assert fixtures.fetch(fixture) == folder
    assert (folder / "b.txt").read_bytes() == FILES["b.txt"]


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_git_blob_ids_are_what_git_hash_object_prints(tmp_path):
    import subprocess

    for name, data in {"empty": b"", "hello": b"hello\n", **FILES}.items():
        path = tmp_path / name
        path.write_bytes(data)
        printed = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
        assert fixtures.git_blob_id(path) == git_blob(data) == printed


def test_a_file_pinned_by_its_git_blob_is_fetched_checked_and_refused_when_it_differs(monkeypatch, tmp_path):
    fixture = dataclasses.replace(synthetic(FILES), files=(
        fixtures.FileSpec("a.json", git_blob=git_blob(FILES["a.json"])),
        fixtures.FileSpec("b.txt", sha256(FILES["b.txt"]), len(FILES["b.txt"])),
    ))  # fmt: skip
    site = site_for(FILES)
    with serving(site) as base:
        cache = isolate(monkeypatch, tmp_path, base)
        folder = fixtures.fetch(fixture)
        assert (folder / "a.json").read_bytes() == FILES["a.json"]
        assert fixtures.git_blob_id(folder / "a.json") == git_blob(FILES["a.json"])
        (folder / "a.json").write_bytes(b'{"a": 2}\n')  # same size, other bytes
        with pytest.raises(fixtures.FixtureUnavailable, match=r"a\.json: 9 bytes git blob [0-9a-f]{40}, expected git blob"):
            fixtures.resolve(fixture)
        site.files["/gh/owner/repo/r1/dir/a.json"] = b'{"a": 3}\n'
        shutil.rmtree(folder)
        with pytest.raises(fixtures.FetchError, match="refused, the download is not the pinned"):
            fixtures.fetch(fixture)
    assert list(cache.iterdir()) == []
    with pytest.raises(ValueError, match="pin it by sha256 and size, or by its git blob id"):
        fixtures.FileSpec("unpinned")


def test_first_rows_of_a_parquet_need_range_requests(monkeypatch, tmp_path):
    site = Site(files={"/big.parquet": b"PAR1" + b"\0" * 100 + b"PAR1"}, ranges=False)
    with serving(site) as base:
        isolate(monkeypatch, tmp_path, base)
        with pytest.raises(fixtures.FetchError, match=r"ignored the Range request \(HTTP 200\)"):
            fixtures.first_rows_as_jsonl(f"{base}/big.parquet", rows=20)


# --- resolving -----------------------------------------------------------------------------------------------


def test_the_variable_comes_first_then_shared_then_the_cache(monkeypatch, tmp_path):
    fixture = synthetic(FILES, returns="b.txt")
    with serving(site_for(FILES)) as base:
        isolate(monkeypatch, tmp_path, base)
        cached = fixtures.fetch(fixture)
    assert cached == tmp_path / "cache" / "synthetic@r1" / "b.txt"
    shared = tmp_path / "shared"
    (shared / "synthetic").mkdir(parents=True)
    for name, data in FILES.items():
        (shared / "synthetic" / name).write_bytes(data)
    monkeypatch.setenv(fixtures.SHARED_ENV, str(shared))
    assert fixtures.resolve(fixture) == shared / "synthetic" / "b.txt"
    named = tmp_path / "mine" / "b.txt"
    named.parent.mkdir()
    named.write_bytes(b"the user's own copy: not hash-checked, they chose it\n")
    (named.parent / "a.json").write_bytes(b"{}")
    monkeypatch.setenv(fixture.env_var, str(named))
    assert fixtures.resolve(fixture) == named


def test_a_named_path_that_does_not_hold_the_fixture_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    shared = tmp_path / "shared" / fixtures.PHI3_TOKENIZER.key
    shared.mkdir(parents=True)
    for spec in fixtures.PHI3_TOKENIZER.files:
        (shared / spec.name).write_text("{}")
    monkeypatch.setenv(fixtures.SHARED_ENV, str(tmp_path / "shared"))
    assert fixtures.phi3_tokenizer_dir() == shared
    monkeypatch.setenv("FINETUNE_PHI_PHI3_TOKENIZER", str(tmp_path / "typo"))
    with pytest.raises(fixtures.FixtureUnavailable) as refused:
        fixtures.phi3_tokenizer_dir()
    message = str(refused.value)
    assert f"FINETUNE_PHI_PHI3_TOKENIZER={tmp_path / 'typo'} does not hold" in message
    assert "missing: tokenizer.json, tokenizer_config.json" in message


@pytest.mark.parametrize(
    "resolver,fixture",
    [
        (fixtures.phi3_tokenizer_dir, fixtures.PHI3_TOKENIZER),
        (fixtures.phi4_mini_tokenizer_dir, fixtures.PHI4_MINI_TOKENIZER),
        (fixtures.ultrachat_first20, fixtures.ULTRACHAT_FIRST20),
        (fixtures.azureml_score_script, fixtures.AZUREML_SCORE_SCRIPT),
    ],
    ids=list(fixtures.FIXTURES),
)
def test_unavailable_says_every_place_it_looked_and_how_to_get_it(monkeypatch, tmp_path, resolver, fixture):
    cache = isolate(monkeypatch, tmp_path)
    with pytest.raises(fixtures.FixtureUnavailable) as missing:
        resolver()
    message = str(missing.value)
    for part in (f"{fixture.env_var} is unset", str(tmp_path / "no-shared" / fixture.key), str(cache / fixture.cache_name),
                 "`make fixtures`", "python -m testkit.fixtures fetch", fixture.revision[:12], "../shared/fixtures"):  # fmt: skip
        assert part in message, part


def test_cis_skip_policy_allows_only_the_named_fixtures_skips(monkeypatch, tmp_path):
    from conftest import skip_allowed

    isolate(monkeypatch, tmp_path)
    reasons = {}
    for key, resolver in (("phi-4-mini-tokenizer", fixtures.phi4_mini_tokenizer_dir), ("ultrachat_200k", fixtures.ultrachat_first20)):
        with pytest.raises(pytest.skip.Exception) as skipped:
            require(resolver)
        reasons[key] = str(skipped.value)
    other = "needs a GPU"
    assert [skip_allowed("fixtures:phi-4-mini-tokenizer", why) for why in (*reasons.values(), other)] == [True, False, False]
    assert [skip_allowed("fixtures", why) for why in (*reasons.values(), other)] == [True, True, False]
    assert not any(skip_allowed(policy, why) for policy in ("none", "fixtures:") for why in reasons.values())


def test_missing_names_the_fixtures_that_resolve_nowhere(monkeypatch, tmp_path, capsys):
    isolate(monkeypatch, tmp_path)
    assert fixtures.main(["missing"]) == 1  # none resolves: nothing to run the with-fixtures suite on
    assert capsys.readouterr().out.strip() == ",".join(fixtures.FIXTURES)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n")
    monkeypatch.setenv("FINETUNE_PHI_ULTRACHAT20", str(rows))
    assert fixtures.main(["missing"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(k for k in fixtures.FIXTURES if k != "ultrachat_200k")


def test_the_conftest_fixtures_skip_with_the_how_to_or_give_the_path(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    with pytest.raises(pytest.skip.Exception, match="`make fixtures`"):
        require(fixtures.ultrachat_first20)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("{}\n")
    monkeypatch.setenv("FINETUNE_PHI_ULTRACHAT20", str(rows))
    assert require(fixtures.ultrachat_first20) == rows


# --- the real sources: their paths, pins and hashes give the shared fixtures byte for byte ---------------------


def ultrachat_parquet(rows: list[dict], filler: int) -> bytes:
    """The hub's layout of ultrachat_200k (prompt, prompt_id, messages: list<struct<content, role>>),
    the real rows first, then `filler` large rows, in small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()),
                        ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())])))])  # fmt: skip
    more = [{"prompt": os.urandom(4096).hex(), "prompt_id": f"{i:064x}",
             "messages": [{"content": os.urandom(4096).hex(), "role": "user"}]} for i in range(filler)]  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows + more, schema=schema), buffer, row_group_size=8)
    return buffer.getvalue()


def test_fetch_from_the_pinned_sources_rebuilds_the_shared_fixtures_byte_for_byte(
    monkeypatch, tmp_path, phi3_tokenizer_dir, ultrachat_20
):
    script = require(fixtures.azureml_score_script)
    rows = [json.loads(line) for line in ultrachat_20.read_text(encoding="utf-8").splitlines()]
    shard = ultrachat_parquet(rows, filler=200)
    hub_path = (f"/hf/datasets/HuggingFaceH4/ultrachat_200k/resolve/{fixtures.ULTRACHAT_REVISION}/"
                "data/train_sft-00000-of-00003-a3ecf92756993583.parquet")  # fmt: skip
    ortx = f"/gh/microsoft/onnxruntime-extensions/{fixtures.ORTX_COMMIT}/test/data/phi-3-mini"
    assets = f"/gh/Azure/azureml-assets/{fixtures.AZUREML_ASSETS_COMMIT}/assets/inference/environments/mlflow-py312-inference/context"
    site = Site(
        files={
            f"{ortx}/tokenizer.json": (phi3_tokenizer_dir / "tokenizer.json").read_bytes(),
            f"{ortx}/tokenizer_config.json": (phi3_tokenizer_dir / "tokenizer_config.json").read_bytes(),
            f"{assets}/mlflow_score_script.py": script.read_bytes(),
            "/cdn/shard0.parquet": shard,
        },
        redirects={hub_path: "/cdn/shard0.parquet"},  # the hub answers with a redirect to its CDN
    )
    shared = [fixtures.PHI3_TOKENIZER.key, fixtures.ULTRACHAT_FIRST20.key, fixtures.AZUREML_SCORE_SCRIPT.key]
    with serving(site) as base:
        cache = isolate(monkeypatch, tmp_path, base)
        assert fixtures.main(["fetch", *shared]) == 0
        fetched = {
            "tokenizer": fixtures.phi3_tokenizer_dir(),
            "rows": fixtures.ultrachat_first20(),
            "script": fixtures.azureml_score_script(),
        }
        assert all(cache in path.parents for path in fetched.values()), fetched
        assert (fetched["tokenizer"] / "tokenizer.json").read_bytes() == (phi3_tokenizer_dir / "tokenizer.json").read_bytes()
        assert (fetched["tokenizer"] / "tokenizer_config.json").read_bytes() == (phi3_tokenizer_dir / "tokenizer_config.json").read_bytes()
        assert fetched["rows"].read_bytes() == ultrachat_20.read_bytes()
        assert fetched["script"].read_bytes() == script.read_bytes()
        # The first 20 rows cost their row groups and the footer, not the shard; the redirect is followed once.
        assert site.requests.count(hub_path) == 1
        assert 0 < site.served["/cdn/shard0.parquet"] < len(shard) / 4
        site.requests.clear()
        assert fixtures.main(["fetch", *shared]) == 0
        assert site.requests == []


# --- the stand-in tokenizer of tiny_phi3 -------------------------------------------------------------------------


def test_tiny_phi3_without_the_phi3_tokenizer_uses_the_stand_in_with_phi3s_chat_format(monkeypatch, tmp_path):
    from helpers_model import PHI3_PLACEHOLDERS, tiny_phi3

    sys.path.insert(0, str(REPO / "finetuning_dir"))
    import chat_format

    isolate(monkeypatch, tmp_path)
    model, tokenizer = tiny_phi3()
    assert len(tokenizer) < 32011  # the stand-in, not the real vocabulary
    assert tokenizer.chat_template == chat_format.PHI3_CHAT_TEMPLATE
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who founded Microsoft?"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWho founded Microsoft?<|end|>\n<|assistant|>\n"
    )
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert chat_format.stop_token_ids(tokenizer) == [end, tokenizer.eos_token_id]
    assert model.config.eos_token_id == [tokenizer.eos_token_id, end]
    for token in [*chat_format.CHAT_SPECIAL_TOKENS, *PHI3_PLACEHOLDERS]:
        ids = tokenizer.encode(f"hello{token}world", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(token) in ids, token  # one token, not pieces
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "helloworld"
    assert tokenizer.convert_tokens_to_ids("<|placeholder1|>") not in chat_format.stop_token_ids(tokenizer)


def test_tiny_phi3_uses_the_real_phi3_tokenizer_when_it_resolves(monkeypatch, tmp_path, phi3_tokenizer_dir):
    from helpers_model import tiny_phi3

    isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("FINETUNE_PHI_PHI3_TOKENIZER", str(phi3_tokenizer_dir))
    _, tokenizer = tiny_phi3()
    assert len(tokenizer) == 32011 and tokenizer.convert_tokens_to_ids("<|placeholder1|>") == 32002


# --- the benchmarks stop rather than measure another workload ----------------------------------------------------


def bench_module(name: str) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_serve_bench_stops_with_the_how_to_before_building_anything(monkeypatch, tmp_path, caplog):
    serve_bench = bench_module("serve_bench")
    isolate(monkeypatch, tmp_path)
    built = []
    monkeypatch.setattr(serve_bench, "get_models", lambda *a: built.append(a) or [])
    assert serve_bench.main(["--quick"]) == 1
    assert built == []
    assert "nothing was measured" in caplog.text and "FINETUNE_PHI_ULTRACHAT20" in caplog.text
    assert "`make fixtures`" in caplog.text
    # With the rows but without the tokenizer, the 100m model stops it too.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "a long real prompt"}]}) + "\n")
    monkeypatch.setenv("FINETUNE_PHI_ULTRACHAT20", str(rows))
    assert serve_bench.bench_prompts()[-1] == "a long real prompt"
    caplog.clear()
    assert serve_bench.main(["--quick", "--sizes", "100m"]) == 1
    assert built == [] and "FINETUNE_PHI_PHI3_TOKENIZER is unset" in caplog.text


def test_batching_bench_stops_with_the_how_to_before_building_anything(monkeypatch, tmp_path):
    batching_bench = bench_module("batching_bench")
    isolate(monkeypatch, tmp_path)
    ran = []
    monkeypatch.setattr(batching_bench, "run_size", lambda *a: ran.append(a))
    with pytest.raises(SystemExit) as stopped:
        batching_bench.main(["--sizes", "tiny"])
    # A string exit code: Python prints it and exits 1.
    assert isinstance(stopped.value.code, str) and "nothing was measured" in stopped.value.code
    assert "`make fixtures`" in stopped.value.code and ran == []
