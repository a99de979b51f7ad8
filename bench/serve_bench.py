"""Serving speed, like for like: our endpoint against `transformers serve` and `mlflow models serve`.

    .venv/bin/python bench/serve_bench.py                    # the full run: ~10 min on 2 cores
    .venv/bin/python bench/serve_bench.py --models-dir /tmp/sb  # keep (and reuse) the two models there
    .venv/bin/python bench/serve_bench.py --quick            # smoke run: random tiny model, 1 and 4 clients, 2 s

Three servers over the SAME model, each as its users start it, all on 127.0.0.1, all with the
same torch thread setting (--threads, passed as OMP_NUM_THREADS/MKL_NUM_THREADS to every server,
stated in the output):
- ours: `python -m finetune_phi.endpoint --model-uri models:/NAME/VERSION` (batching in
  finetune_phi/endpoint/batcher.py);
- `transformers serve DIR --continuous-batching --device cpu --dtype float32` (paged attention,
  requests join the running batch at each step) on the same weights and tokenizer; it loads the
  model on the first request, so one request warms it up before anything is timed;
- `mlflow models serve -m models:/NAME/VERSION --env-manager local` (one uvicorn worker): what
  Azure ML's no-code deployment of the model runs.

Routes: ours and transformers serve both on OpenAI's `/v1/chat/completions` (greedy:
`temperature: 0`, `max_tokens` N); ours on Azure's `/score` against MLflow's `/invocations` (greedy
`do_sample: false`, `max_new_tokens` N). Two models: the tiny demo model trained by the real
pipeline (~1M parameters), and a ~106M-parameter Phi-3 (8 layers x 768, 12 heads, Phi-3-mini's
tokenizer and 32k vocabulary, random weights: speed only) saved the way fine_tune.py saves a model.

Load is closed-loop: N clients each send a request, wait for the reply, send the next, for
--seconds (or --max-requests) after one warm-up request per client; peer first, then ours, at each
level. Cases: "short" (32 new tokens) and "long" (128 new tokens; random weights never stop early,
so the 100M model always generates all of them). Streaming: time to the first content chunk
(`stream: true`) at --ttft-clients. Every reply's completion_tokens is recorded (chat routes) so the
comparison shows both servers generated the same amount. Prints ONE JSON line: `results` (per model,
peer, case and clients: req/s, p50/p99 and their ratios ours/peer), `ttft`, `goals` (the serving
targets, each with its value and whether it is met) and `setup`. Servers are stopped at the end,
whatever happens.

The long prompts (4 ultrachat_200k rows) and the 100m model's Phi-3 tokenizer come from
testkit.fixtures (`make fixtures`); a missing one stops the bench with exit 1 and how to get it,
before anything is built: it never measures another workload in their place.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "finetuning_dir"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

log = logging.getLogger("serve_bench")

SHORT_TOKENS = 32
LONG_TOKENS = 128
WARMUP_TOKENS = 8  # warm-up requests: open the connections without a long generation before timing
# The demo model's tokenizer is trained on the demo set only, so real text costs ~1 token per 2-3
# characters: 1,200 characters keep a long prompt at a few hundred tokens, well inside the context.
LONG_PROMPT_CHARS = 1200
LONG_PROMPTS = 4
DEMO_PROMPTS = 24
from finetune_phi import supervise  # noqa: E402  (start, wait for and stop the servers, as deploys do)
from finetune_phi.demo import DEMO_OVERRIDES  # noqa: E402  (the demo model: trained as `make demo` trains it)
# ~106M parameters: 2 x 32064 x 768 embeddings/head + 8 x (4 x 768^2 + 3 x 768 x 2048).
P100M = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12}
READY_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 300.0
PEERS = ("transformers", "mlflow")


class BenchError(RuntimeError):
    """The benchmark cannot produce a fair comparison (a server failed, or a request did)."""


@dataclass(frozen=True)
class Model:
    size: str  # "tiny" or "100m"
    tracking_uri: str
    uri: str  # models:/NAME/VERSION
    name: str  # NAME: what our /v1/chat/completions reports
    parameters: int = 0


@dataclass
class Level:
    clients: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    tokens_per_reply: float | None = None
    ttft_p50_ms: float | None = None


# --- the models ---------------------------------------------------------------------------------------


def bench_settings(state_dir: Path, name: str) -> Any:
    import config

    return config.load(
        env={}, STATE_DIR=str(state_dir.resolve()), AZURE_MODEL_NAME=name, ENV_FILE=str(state_dir / "no.env")
    )


def newest_version(state_dir: Path, name: str) -> str | None:
    from finetune_phi.mlflow_store import use_local_mlflow

    settings = bench_settings(state_dir, name)
    use_local_mlflow(settings)
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    return max((v.version for v in versions), key=int) if versions else None


def registered(state_dir: Path, name: str, size: str) -> Model | None:
    if not (state_dir / "mlflow.db").exists() and not any(state_dir.glob("*.db")):
        return None
    version = newest_version(state_dir, name)
    if version is None:
        return None
    settings = bench_settings(state_dir, name)
    return Model(size, settings.tracking_uri, f"models:/{name}/{version}", name)


def train_demo_model(work: Path) -> Model:
    """Train and register the tiny demo model with the real pipeline, in `work` (nothing else touched)."""
    import config

    state = work / "state"
    env = {
        **DEMO_OVERRIDES,
        "STATE_DIR": str(state),
        "TRAIN_DATA_PATH": str(work / "data" / "train_data.jsonl"),
        "TEST_DATA_PATH": str(work / "data" / "test_data.jsonl"),
        "ENV_FILE": str(work / "no.env"),  # never read the user's .env
        "EVAL_MAX_ROWS": "0",  # speed only: no before/after evaluation
    }
    os.environ.update(env)
    from finetune_phi.local_deploy import register_model
    from finetune_phi.training import run_local_fine_tune

    started = time.perf_counter()
    with stdout_to_stderr():  # stdout carries only the result line
        subprocess.run([sys.executable, "download_dataset.py", "--source", "demo"], cwd=ROOT, env=os.environ, check=True)
        settings = config.load()
        result = run_local_fine_tune(settings)
        version = register_model(settings, result.model_uri)
    log.info("trained and registered %s version %s in %.0f s", settings.AZURE_MODEL_NAME, version, time.perf_counter() - started)
    return Model("tiny", settings.tracking_uri, f"models:/{settings.AZURE_MODEL_NAME}/{version}", settings.AZURE_MODEL_NAME)


def save_and_register(model: Any, tokenizer: Any, state: Path, name: str, size: str) -> Model:
    """Save `model` the way fine_tune.py does (MLflow text-generation model, prompt template, params
    schema) as a run's artifacts in a local store at `state`, and register it as `name`."""
    import fine_tune
    import mlflow

    from finetune_phi.local_deploy import register_model
    from finetune_phi.mlflow_store import use_local_mlflow

    settings = bench_settings(state, name)
    use_local_mlflow(settings)
    experiment = mlflow.set_experiment("serve-bench")
    with stdout_to_stderr(), mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        uri = fine_tune.save_and_log(model, tokenizer, state / f"{size}-model", run.info.run_id)
    version = register_model(settings, uri)
    return Model(size, settings.tracking_uri, f"models:/{name}/{version}", name)


def build_100m_model(state: Path, seed: int = 0) -> Model:
    """A ~106M-parameter Phi-3 with random weights, Phi-3-mini's tokenizer and stop tokens."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Phi3Config, Phi3ForCausalLM

    from chat_format import stop_token_ids  # the one stop-token policy (finetuning_dir/ is on sys.path)

    from testkit import fixtures

    tokenizer = AutoTokenizer.from_pretrained(fixtures.phi3_tokenizer_dir())
    stops = stop_token_ids(tokenizer)
    config = Phi3Config(
        vocab_size=32064,  # Phi-3-mini's (the tokenizer has 32011 entries)
        num_key_value_heads=P100M["num_attention_heads"],
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **P100M,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )  # fmt: skip
    log.info("built a %.1fM-parameter Phi-3 (random weights)", model.num_parameters() / 1e6)
    return save_and_register(model, tokenizer, state, "bench-phi3-100m", "100m")


def build_random_tiny(state: Path) -> Model:
    """The tiny demo architecture, untrained (for --quick: no training run)."""
    from finetune_phi.demo_data import demo_rows
    from tiny_model import build_model, build_tokenizer, corpus_from_rows

    tokenizer = build_tokenizer(corpus_from_rows([r["messages"] for r in demo_rows()]))
    return save_and_register(build_model(tokenizer, seed=0), tokenizer, state, "bench-tiny-random", "tiny")


def get_models(args: argparse.Namespace, work: Path) -> list[Model]:
    """The models to serve: reused from --models-dir when already built there."""
    base = args.models_dir or work
    base.mkdir(parents=True, exist_ok=True)
    models = []
    for size in args.sizes:
        if size == "tiny" and args.state_dir:
            version = newest_version(args.state_dir, args.tiny_name)
            if version is None:
                raise BenchError(f"--state-dir {args.state_dir}: no version of {args.tiny_name!r} is registered there")
            settings = bench_settings(args.state_dir, args.tiny_name)
            models.append(Model("tiny", settings.tracking_uri, f"models:/{args.tiny_name}/{version}", args.tiny_name))
            continue
        if size == "tiny" and args.quick:
            state = base / "tiny-random"
            models.append(registered(state, "bench-tiny-random", "tiny") or build_random_tiny(state))
        elif size == "tiny":
            state = base / "tiny-demo"
            found = registered(state / "state", "finetune-phi3-model", "tiny")
            models.append(found or train_demo_model(state))
        else:
            state = base / "phi3-100m"
            models.append(registered(state, "bench-phi3-100m", "100m") or build_100m_model(state))
    return models


def hf_folder(model: Model, work: Path) -> tuple[Path, int]:
    """A folder `transformers serve` loads (weights + tokenizer side by side), linked from the MLflow
    model's own files; and the model's parameter count."""
    import mlflow.artifacts

    from finetune_phi.endpoint.loading import model_folder, read_weights

    import mlflow

    mlflow.set_tracking_uri(model.tracking_uri)
    mlflow.set_registry_uri(model.tracking_uri)  # each model has its own store
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.uri))
    return link_hf_folder(local, work / f"hf-{model.size}"), read_weights(model_folder(local)).parameters


def link_hf_folder(mlflow_model: Path, out: Path) -> Path:
    """`out` holding an MLflow transformers model's weights and tokenizer side by side, as links (no copy)."""
    from finetune_phi.endpoint.loading import model_folder

    out.mkdir(parents=True, exist_ok=True)
    for source in [*model_folder(mlflow_model).iterdir(), *(mlflow_model / "components" / "tokenizer").iterdir()]:
        target = out / source.name
        if not target.exists():
            target.symlink_to(source)
    return out


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr (child processes inherit it), restored on the way out."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def bench_prompts(fixture: Path | None = None) -> list[str]:
    """Demo questions (short, the model answers them) and a few long real prompts (mixed lengths).

    The long prompts are the first ultrachat_200k rows (testkit.fixtures): without them this
    raises FixtureUnavailable rather than measure a different workload under the same name.
    """
    from testkit import fixtures
    from finetune_phi.demo_data import demo_rows

    fixture = fixture or fixtures.ultrachat_first20()

    questions: list[str] = []
    for row in demo_rows():
        question = row["messages"][0]["content"]
        if question not in questions:
            questions.append(question)
    # Spread over the set (founders and capitals, both phrasings) rather than the first few.
    step = max(1, len(questions) // DEMO_PROMPTS)
    prompts = questions[::step][:DEMO_PROMPTS]
    rows = [json.loads(line) for line in fixture.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts += [r["messages"][0]["content"][:LONG_PROMPT_CHARS] for r in rows[:LONG_PROMPTS]]
    return prompts


# --- the servers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    base: str
    ready_path: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)
    model_id: str = ""

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start(name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, log_dir: Path) -> Server:
    log_path = log_dir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    return Server(name, f"http://127.0.0.1:{port}", ready_path, supervise.spawn(argv, env, log_path, cwd=ROOT), log_path)


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> float:
    try:
        return supervise.poll_until(server.proc, lambda: supervise.http_ok(server.base + server.ready_path), timeout, 0.2)
    except supervise.ExitedEarly as exc:
        raise BenchError(f"{server.name} exited with status {exc.code}:\n{server.log_tail()}") from None
    except TimeoutError:
        raise BenchError(f"{server.name} was not ready after {timeout:.0f} s:\n{server.log_tail()}") from None


def stop(server: Server) -> None:
    supervise.stop_group(server.proc, timeout=20)


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def server_env(model: Model, extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": model.tracking_uri, **extra}
    # `mlflow models serve` runs `uvicorn` from PATH, not from its own venv: the venv's bin must be on it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    return env


@contextlib.contextmanager
def servers(model: Model, hf_dir: Path, work: Path, args: argparse.Namespace) -> Iterator[dict[str, Server]]:
    """Our server and the peers, on free loopback ports, ready (and warmed); stopped on the way out."""
    from finetune_phi.endpoint import KEY_ENV

    key = secrets.token_urlsafe(32)
    threads = thread_env(args.threads)
    bin_dir = Path(sys.executable).parent
    ports = {name: free_port() for name in ("ours", *args.peers)}
    specs: dict[str, tuple[list[str], dict[str, str], str]] = {
        "ours": (
            [sys.executable, "-m", "finetune_phi.endpoint", "--model-uri", model.uri, "--host", "127.0.0.1",
             "--port", str(ports["ours"]),
             # Admit every client: the bench measures batching, not the 429 admission limit.
             "--max-concurrent-requests", "64", *args.ours_args],
            {**threads, KEY_ENV: key}, "/health/ready",
        ),
        "transformers": (
            [str(bin_dir / "transformers"), "serve", str(hf_dir), "--continuous-batching", "--device", "cpu",
             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(ports.get("transformers", 0)),
             "--log-level", "warning"],
            threads, "/health",
        ),
        "mlflow": (
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model.uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(ports.get("mlflow", 0))],
            threads, "/ping",
        ),
    }  # fmt: skip
    started: dict[str, Server] = {}
    try:
        for name in ("ours", *args.peers):
            argv, extra, ready = specs[name]
            started[name] = start(f"{name}-{model.size}", argv, server_env(model, extra), ports[name], ready, work)
        for server in started.values():
            log.info("%s ready in %.1f s at %s", server.name, wait_ready(server), server.base)
        started["ours"].headers = {"Authorization": f"Bearer {key}"}
        started["ours"].model_id = model.name
        if "transformers" in started:
            started["transformers"].model_id = str(hf_dir)
            warm = time.perf_counter()
            chat_reply(started["transformers"], "Hello", 4)  # it loads the model on its first request
            log.info("transformers serve warmed up (model loaded) in %.1f s", time.perf_counter() - warm)
        yield started
    finally:
        for server in started.values():
            stop(server)


# --- requests -------------------------------------------------------------------------------------------

Request = tuple[str, dict[str, Any]]


def chat_request(server: Server, prompt: str, tokens: int, stream: bool = False) -> Request:
    body: dict[str, Any] = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    return "/v1/chat/completions", body


def score_request(server: Server, prompt: str, tokens: int) -> Request:
    params = {"max_new_tokens": tokens, "do_sample": False}
    if server.name.startswith("mlflow"):
        # An MLflow text-generation model (string input + params schema): {"inputs": [...], "params": {...}}.
        return "/invocations", {"inputs": [prompt], "params": params}
    return "/score", {"input_data": [prompt], "params": params}


def chat_parse(payload: Any) -> tuple[str, int | None]:
    usage = payload.get("usage") or {}
    return str(payload["choices"][0]["message"]["content"] or "").strip(), usage.get("completion_tokens")


def score_parse(payload: Any) -> tuple[str, int | None]:
    [text] = payload["predictions"] if isinstance(payload, dict) else payload
    return str(text).strip(), None


def post(server: Server, request: Request) -> Any:
    import httpx

    path, body = request
    response = httpx.post(server.base + path, json=body, headers=server.headers, timeout=HTTP_TIMEOUT_S)
    if response.status_code != 200:
        raise BenchError(f"{server.name} {path} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def chat_reply(server: Server, prompt: str, tokens: int) -> tuple[str, int | None]:
    return chat_parse(post(server, chat_request(server, prompt, tokens)))


def same_replies(ours: Server, peer: Server, prompts: list[str], tokens: int) -> int:
    """How many prompts get the same greedy text from both (each reply once, one at a time)."""
    same = 0
    for prompt in prompts:
        if peer.name.startswith("mlflow"):
            a = score_parse(post(ours, score_request(ours, prompt, tokens)))[0]
            b = score_parse(post(peer, score_request(peer, prompt, tokens)))[0]
        else:
            a, b = chat_reply(ours, prompt, tokens)[0], chat_reply(peer, prompt, tokens)[0]
        if a == b:
            same += 1
        else:
            log.info("%s and %s differ on %r:\n  ours %r\n  peer %r", ours.name, peer.name, prompt[:50], a[:120], b[:120])
    return same


async def read_stream(response: Any, started: float) -> tuple[float | None, int]:
    """(seconds to the first chunk carrying content, content chunks) of an OpenAI SSE stream."""
    first: float | None = None
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - started
    return first, chunks


async def closed_loop(
    server: Server,
    build: Callable[[str], Request],
    prompts: list[str],
    clients: int,
    seconds: float,
    max_requests: int,
    parse: Callable[[Any], tuple[str, int | None]] | None = None,
    stream: bool = False,
    warmup: Callable[[str], Request] | None = None,
) -> Level:
    """N clients, each sending its next request as soon as its previous reply is in.

    Before timing, each client sends one `warmup` request (default: `build`; the bench uses
    WARMUP_TOKENS-token ones) so every connection is open and the server has served N at once."""
    import httpx

    latencies: list[float] = []
    ttfts: list[float] = []
    tokens: list[int] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.base, timeout=HTTP_TIMEOUT_S, limits=limits, headers=server.headers) as client:

        async def one(prompt: str, record: bool) -> None:
            path, body = build(prompt) if record or warmup is None else warmup(prompt)
            started = time.perf_counter()
            if stream:
                async with client.stream("POST", path, json=body) as response:
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                        return
                    first, _chunks = await read_stream(response, started)
                if record and first is not None:
                    ttfts.append(first)
            else:
                response = await client.post(path, json=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    return
                if record and parse is not None:
                    count = parse(response.json())[1]
                    if count is not None:
                        tokens.append(count)
            if record:
                latencies.append(time.perf_counter() - started)

        # Warm-up: every client's connection open and one (short) request each through the server.
        await asyncio.gather(*(one(prompts[i % len(prompts)], False) for i in range(clients)))
        issued = 0
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def client_loop(index: int) -> None:
            nonlocal issued
            n = index * 7  # clients start at different prompts, so lengths mix within a batch
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                await one(prompts[n % len(prompts)], True)
                n += 1

        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    if failures:
        raise BenchError(f"{server.name}: {len(failures)} requests failed at {clients} clients, e.g. {failures[0]}")
    if not latencies:
        raise BenchError(f"{server.name}: no request finished at {clients} clients")
    ordered = sorted(latencies)
    return Level(
        clients=clients,
        rps=len(latencies) / elapsed,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        requests=len(latencies),
        tokens_per_reply=round(statistics.mean(tokens), 1) if tokens else None,
        ttft_p50_ms=1000 * statistics.median(ttfts) if ttfts else None,
    )


def stream_supported(server: Server) -> bool:
    """Whether `server` answers `stream: true` with an event stream of chat chunks."""
    import httpx

    path, body = chat_request(server, "Hello", 4, stream=True)
    try:
        with httpx.stream("POST", server.base + path, json=body, headers=server.headers, timeout=60) as response:
            if response.status_code != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
                log.warning("%s: stream: true answered %s %s", server.name, response.status_code, response.headers.get("content-type"))
                return False
            return any(line.startswith("data:") for line in response.iter_lines())
    except httpx.HTTPError as exc:
        log.warning("%s: stream: true failed: %s", server.name, exc)
        return False


def compare(model: Model, peer: str, case: str, tokens: int, ours: Level, other: Level) -> dict[str, Any]:
    return {
        "model": model.size,
        "peer": peer,
        "case": case,
        "max_new_tokens": tokens,
        "clients": ours.clients,
        "ours_rps": round(ours.rps, 2),
        "peer_rps": round(other.rps, 2),
        "ratio_rps": round(ours.rps / other.rps, 2),
        "ours_p50_ms": round(ours.p50_ms, 1),
        "peer_p50_ms": round(other.p50_ms, 1),
        "ratio_p50": round(ours.p50_ms / other.p50_ms, 2),
        "ours_p99_ms": round(ours.p99_ms, 1),
        "peer_p99_ms": round(other.p99_ms, 1),
        "ours_requests": ours.requests,
        "peer_requests": other.requests,
        "ours_tokens_per_reply": ours.tokens_per_reply,
        "peer_tokens_per_reply": other.tokens_per_reply,
    }


def compare_ttft(model: Model, tokens: int, ours: Level | None, other: Level) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": model.size,
        "peer": "transformers",
        "max_new_tokens": tokens,
        "clients": other.clients,
        "ours_ttft_p50_ms": None,
        "peer_ttft_p50_ms": round(other.ttft_p50_ms, 1) if other.ttft_p50_ms is not None else None,
        "ratio_ttft": None,
        "peer_requests": other.requests,
    }
    if ours is not None and ours.ttft_p50_ms is not None:
        row["ours_ttft_p50_ms"] = round(ours.ttft_p50_ms, 1)
        row["ours_requests"] = ours.requests
        if other.ttft_p50_ms:
            row["ratio_ttft"] = round(ours.ttft_p50_ms / other.ttft_p50_ms, 2)
    return row


def goals(results: list[dict[str, Any]], ttft: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #10's targets, each checked against this run's rows."""
    out = []

    def add(goal: str, value: float | None, met: bool | None) -> None:
        out.append({"goal": goal, "value": value, "met": met})

    for row in results:
        where = f"{row['model']} {row['case']} {row['clients']} clients"
        if row["peer"] == "transformers" and row["clients"] in (8, 16):
            add(f"ratio_rps >= 1.3 vs transformers serve, {where}", row["ratio_rps"], row["ratio_rps"] >= 1.3)
        if row["peer"] == "transformers" and row["clients"] == 1:
            add(f"ratio_p50 <= 1.0 vs transformers serve, {where}", row["ratio_p50"], row["ratio_p50"] <= 1.0)
        if row["peer"] == "mlflow" and row["clients"] == 8:
            add(f"ratio_rps >= 4 vs mlflow models serve, {where}", row["ratio_rps"], row["ratio_rps"] >= 4.0)
    for row in ttft:
        where = f"{row['model']} {row['clients']} clients"
        value = row["ratio_ttft"]
        add(f"ratio_ttft <= 1.0 vs transformers serve, {where}", value, None if value is None else value <= 1.0)
    return out


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        # What "ours" was: the commit, and any endpoint file changed beside it in the working tree.
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_endpoint_files": git("status", "--porcelain", "--", "finetune_phi/endpoint").splitlines(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def bench_model(model: Model, work: Path, args: argparse.Namespace, prompts: list[str], out: dict[str, Any]) -> None:
    hf_dir, parameters = hf_folder(model, work)
    out["models"][model.size] = {"uri": model.uri, "parameters": parameters}
    log.info("model %s: %s, %.1fM parameters", model.size, model.uri, parameters / 1e6)
    cases = [c for c in (("short", SHORT_TOKENS), ("long", LONG_TOKENS)) if c[0] in args.cases]
    with servers(model, hf_dir, work, args) as running:
        ours = running["ours"]
        check = prompts[:: max(1, len(prompts) // args.verify_prompts)][: args.verify_prompts]
        for peer in args.peers:
            same = same_replies(ours, running[peer], check, SHORT_TOKENS)
            out["models"][model.size][f"same_greedy_replies_{peer}"] = f"{same}/{len(check)}"
            log.info("%s: %d of %d greedy replies the same as ours", peer, same, len(check))

        def run(
            server: Server, build: Callable[[str], Request], clients: int, parse: Any = None, stream: bool = False,
            seconds: float = args.seconds, warmup: Callable[[str], Request] | None = None,
        ) -> Level:
            level = asyncio.run(
                closed_loop(server, build, prompts, clients, seconds, args.max_requests, parse, stream, warmup)
            )
            log.info(
                "%s, %d clients%s: %.1f req/s, p50 %.0f ms%s", server.name, clients, " (stream)" if stream else "",
                level.rps, level.p50_ms, f", ttft p50 {level.ttft_p50_ms:.0f} ms" if level.ttft_p50_ms else "",
            )  # fmt: skip
            return level

        def over_budget(what: str) -> bool:
            if args.budget_s and time.monotonic() - args.started > args.budget_s:
                log.warning("--budget-s %g spent: skipping %s", args.budget_s, what)
                out["skipped"].append(f"{model.size} {what}")
                return True
            return False

        def transformers_levels(peer: Server, which: list[tuple[str, int]]) -> None:
            for case, tokens in which:
                seconds = args.long_seconds if case == "long" else args.seconds
                for clients in args.clients:
                    if over_budget(f"transformers {case} {clients} clients"):
                        continue
                    both = [
                        run(server, lambda p, s=server, t=tokens: chat_request(s, p, t), clients, chat_parse, seconds=seconds,
                            warmup=lambda p, s=server: chat_request(s, p, WARMUP_TOKENS))
                        for server in (peer, ours)
                    ]  # fmt: skip
                    out["results"].append(compare(model, "transformers", case, tokens, both[1], both[0]))

        # The goals' measurements first (short answers, mlflow, streaming), the long case last: if
        # --budget-s runs out, what is skipped is the long case at the highest levels.
        if "transformers" in running:
            transformers_levels(running["transformers"], [c for c in cases if c[0] == "short"])
        if "mlflow" in running:
            peer = running["mlflow"]
            for clients in args.mlflow_clients:
                if over_budget(f"mlflow {clients} clients"):
                    continue
                both = [
                    run(server, lambda p, s=server: score_request(s, p, SHORT_TOKENS), clients,
                        warmup=lambda p, s=server: score_request(s, p, WARMUP_TOKENS))
                    for server in (peer, ours)
                ]  # fmt: skip
                out["results"].append(compare(model, "mlflow", "short", SHORT_TOKENS, both[1], both[0]))
        if "transformers" in running:
            peer = running["transformers"]
            ours_streams = stream_supported(ours)
            out["models"][model.size]["ours_streams"] = ours_streams
            for clients in args.ttft_clients:
                if over_budget(f"ttft {clients} clients"):
                    continue
                other = run(peer, lambda p: chat_request(peer, p, SHORT_TOKENS, stream=True), clients, stream=True,
                            warmup=lambda p: chat_request(peer, p, WARMUP_TOKENS))  # fmt: skip
                mine = (
                    run(ours, lambda p: chat_request(ours, p, SHORT_TOKENS, stream=True), clients, stream=True,
                        warmup=lambda p: chat_request(ours, p, WARMUP_TOKENS))
                    if ours_streams else None
                )  # fmt: skip
                out["ttft"].append(compare_ttft(model, SHORT_TOKENS, mine, other))
            transformers_levels(peer, [c for c in cases if c[0] == "long"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "serve", "threads": args.threads, "results": [], "ttft": [], "models": {}, "skipped": []}
    args.started = time.monotonic()
    setup = {
        "threads": f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} for all three servers",
        "routes": {"transformers": "/v1/chat/completions both, temperature 0",
                   "mlflow": "ours /score vs /invocations, do_sample false"},
        "seconds_per_level": args.seconds,
        "seconds_per_level_long": args.long_seconds,
        "clients": args.clients,
        "mlflow_clients": args.mlflow_clients,
        "ttft_clients": args.ttft_clients,
        "cases": {"short": SHORT_TOKENS, "long": LONG_TOKENS},
        **machine(),
    }  # fmt: skip
    started = time.perf_counter()
    # The workload's fixtures first: a missing one stops the bench before minutes of model building.
    prompts = bench_prompts()
    if "100m" in args.sizes:
        from testkit import fixtures

        fixtures.phi3_tokenizer_dir()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        models = get_models(args, work)
        setup["prompts"] = len(prompts)
        for model in models:
            bench_model(model, work, args, prompts, out)
    out["goals"] = goals(out["results"], out["ttft"])
    setup["wall_s"] = round(time.perf_counter() - started, 1)
    setup["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    out["setup"] = setup
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: untrained tiny model, 1 and 4 clients, 2 s per level")
    parser.add_argument("--sizes", nargs="+", choices=("tiny", "100m"), default=None, help="models (default: tiny 100m; --quick: tiny)")
    parser.add_argument("--models-dir", type=Path, help="build the models here once and reuse them (default: a temp dir)")
    parser.add_argument("--state-dir", type=Path, help="serve the newest registered --tiny-name there as the tiny model")
    parser.add_argument("--tiny-name", default="finetune-phi3-model", help="model name in --state-dir (default: %(default)s)")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="(default: both)")
    parser.add_argument("--cases", nargs="+", choices=("short", "long"), default=None, help="(default: short long; --quick: short)")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="levels against transformers serve (default: 1 8 16 32)")
    parser.add_argument("--mlflow-clients", type=int, nargs="+", default=None, help="levels against mlflow (default: 1 8)")
    parser.add_argument("--ttft-clients", type=int, nargs="+", default=None, help="streaming levels (default: 1 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every server (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=None, help="measured time per server and level (default: 8; --quick 2)")
    parser.add_argument("--max-requests", type=int, default=2000, help="request cap per server and level (default: %(default)s)")
    parser.add_argument("--verify-prompts", type=int, default=6, help="prompts whose greedy replies are compared (default: %(default)s)")
    parser.add_argument("--build-only", action="store_true", help="build (or find) the models in --models-dir, print their URIs, exit")
    parser.add_argument("--long-seconds", type=float, default=None, help="measured time per level in the long case (default: --seconds)")
    parser.add_argument("--budget-s", type=float, default=0, help="skip the levels left once this many seconds have passed (0: none)")
    parser.add_argument("--ours-args", nargs="*", default=[], metavar="ARG", help="extra arguments for our server")
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    args.sizes = args.sizes or (["tiny"] if quick else ["tiny", "100m"])
    args.clients = args.clients or ([1, 4] if quick else [1, 8, 16, 32])
    args.mlflow_clients = args.mlflow_clients or ([1, 4] if quick else [1, 8])
    args.ttft_clients = args.ttft_clients or ([1] if quick else [1, 8])
    args.seconds = args.seconds or (2.0 if quick else 8.0)
    args.long_seconds = args.long_seconds or args.seconds
    args.cases = args.cases or (["short"] if quick else ["short", "long"])
    if quick:
        args.verify_prompts = min(args.verify_prompts, 3)
    return args


def print_result(run: Callable[[], dict[str, Any]]) -> int:
    """A benchmark's main: its one JSON line on stdout and exit 0, or exit 1 with why nothing was measured."""
    from testkit.fixtures import FixtureUnavailable

    try:
        result = run()
    except (BenchError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        return 1
    except FixtureUnavailable as exc:
        log.error("the benchmark's workload is unavailable, nothing was measured: %s", exc)
        return 1
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = resolve_defaults(build_parser().parse_args(argv))
    from finetune_phi.common import setup_logging

    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    levels = [*args.clients, *args.mlflow_clients, *args.ttft_clients]
    if any(n < 1 for n in levels) or args.seconds <= 0 or args.max_requests < 1 or args.threads < 1:
        log.error("--clients, --seconds, --max-requests and --threads must be positive")
        return 2
    if args.build_only:
        if not args.models_dir:
            log.error("--build-only needs --models-dir")
            return 2
        return print_result(lambda: {m.size: {"uri": m.uri, "tracking_uri": m.tracking_uri}
                                     for m in get_models(args, args.models_dir)})  # fmt: skip
    return print_result(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
