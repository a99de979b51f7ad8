"""Serving speed under concurrency: this project's endpoint against `mlflow models serve`.

    .venv/bin/python bench/serve_bench.py                            # trains the demo model first: ~3.5 min on 2 cores
    .venv/bin/python bench/serve_bench.py --state-dir .finetune_phi  # reuse the model registered there (after make demo)
    .venv/bin/python bench/serve_bench.py --clients 1 8 --seconds 5  # quicker, fewer levels

The peer is MLflow's own scoring server (`mlflow models serve -m models:/NAME/VERSION
--env-manager local`, one uvicorn worker) over the SAME registered model: the same mlflow.pyfunc
predict that Azure ML's no-code deployment runs under azmlinfsrv (tests/test_azure_serving.py
checks that one's replies against ours). Ours is `python -m finetune_phi.endpoint` (micro-batching, see
finetune_phi/endpoint/batcher.py). Both run greedy decoding with 32 new tokens, on 127.0.0.1 only.

The model is the tiny demo model trained by the real pipeline in a temp STATE_DIR
(`download_dataset.py --source demo`, then `run_local_fine_tune` with 15 epochs at 3e-3, ~30 s),
or the newest version registered in --state-dir. Prompts mix the demo questions with a few long
real ultrachat_200k prompts (if ../shared/fixtures is there). Before timing anything, every prompt
goes through both servers once and the replies must be the same text (the run fails otherwise).

Load is closed-loop: N clients each send a request, wait for the reply, send the next; each level
runs for --seconds or --max-requests, whichever ends first, after a short warm-up. Prints ONE
JSON line:
    {"bench": "serve", "results": [{"clients": N, "ours_rps", "peer_rps", "ratio_rps",
     "ours_p50_ms", "peer_p50_ms", "ratio_p50", "ours_p99_ms", "peer_p99_ms"}, ...], "setup": {...}}
Both servers are stopped at the end, whatever happens.
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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("serve_bench")

MAX_NEW_TOKENS = 32
ULTRACHAT_FIXTURE = ROOT.parent / "shared" / "fixtures" / "ultrachat_200k" / "train_sft_first20.jsonl"
# The demo model's tokenizer is trained on the demo set only, so real text costs ~1 token per 2-3
# characters: 1,200 characters keep a long prompt at a few hundred tokens, well inside the context.
LONG_PROMPT_CHARS = 1200
LONG_PROMPTS = 4
DEMO_PROMPTS = 24
DEMO_OVERRIDES = {
    "BACKEND": "local",
    "LOCAL_BASE_MODEL": "tiny",
    "NUM_TRAIN_EPOCHS": "15",
    "LEARNING_RATE": "3e-3",
}
READY_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """The benchmark cannot produce a fair comparison (a server failed, or the replies differ)."""


@dataclass(frozen=True)
class Model:
    tracking_uri: str
    uri: str  # models:/NAME/VERSION


@dataclass(frozen=True)
class Level:
    clients: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int


# --- the model ------------------------------------------------------------------------------------------


def registered_model(state_dir: Path) -> Model:
    """The newest version of AZURE_MODEL_NAME in the registry of `state_dir`."""
    import config
    from finetune_phi.training import use_local_mlflow

    settings = config.load(STATE_DIR=str(state_dir.resolve()))
    use_local_mlflow(settings)
    import mlflow

    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{settings.AZURE_MODEL_NAME}'")
    if not versions:
        raise BenchError(
            f"--state-dir {state_dir}: no version of {settings.AZURE_MODEL_NAME!r} is registered in "
            f"{settings.tracking_uri}; run make demo first, or leave --state-dir out to train one"
        )
    newest = max(versions, key=lambda v: int(v.version))
    return Model(settings.tracking_uri, f"models:/{newest.name}/{newest.version}")


def train_demo_model(work: Path) -> Model:
    """Train and register the tiny demo model with the real pipeline, in `work` (nothing else touched)."""
    env = {
        **DEMO_OVERRIDES,
        "STATE_DIR": str(work / "state"),
        "TRAIN_DATA_PATH": str(work / "data" / "train_data.jsonl"),
        "TEST_DATA_PATH": str(work / "data" / "test_data.jsonl"),
        "ENV_FILE": str(work / "no.env"),  # never read the user's .env
    }
    os.environ.update(env)
    import config
    from finetune_phi.local_deploy import register_model
    from finetune_phi.training import run_local_fine_tune

    started = time.perf_counter()
    # stdout carries only the result line: the pipeline's progress goes to stderr.
    with stdout_to_stderr():
        subprocess.run([sys.executable, "download_dataset.py", "--source", "demo"], cwd=ROOT, env=os.environ, check=True)
        settings = config.load()
        result = run_local_fine_tune(settings)
        version = register_model(settings, result.model_uri)
    log.info("trained and registered %s version %s in %.0f s", settings.AZURE_MODEL_NAME, version, time.perf_counter() - started)
    return Model(settings.tracking_uri, f"models:/{settings.AZURE_MODEL_NAME}/{version}")


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


def bench_prompts(fixture: Path = ULTRACHAT_FIXTURE) -> list[str]:
    """Demo questions (short, the model answers them) and a few long real prompts (mixed lengths)."""
    from finetune_phi.demo_data import demo_rows

    questions: list[str] = []
    for row in demo_rows():
        question = row["messages"][0]["content"]
        if question not in questions:
            questions.append(question)
    # Spread over the set (founders and capitals, both phrasings) rather than the first few.
    step = max(1, len(questions) // DEMO_PROMPTS)
    prompts = questions[::step][:DEMO_PROMPTS]
    if fixture.is_file():
        rows = [json.loads(line) for line in fixture.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts += [r["messages"][0]["content"][:LONG_PROMPT_CHARS] for r in rows[:LONG_PROMPTS]]
    else:
        log.warning("%s is missing: benchmarking with the demo questions only", fixture)
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

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start(name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, log_dir: Path) -> Server:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as out:
        # Own session: `mlflow models serve` runs uvicorn as a child, and the whole group must go.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, f"http://127.0.0.1:{port}", ready_path, proc, log_path)


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> float:
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with status {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base + server.ready_path, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise BenchError(f"{server.name} was not ready after {timeout:.0f} s:\n{server.log_tail()}")


def stop(server: Server) -> None:
    if server.proc.poll() is not None:
        return
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def server_env(model: Model, extra: dict[str, str]) -> dict[str, str]:
    # os.environ already holds training.mlflow_env's offline, quiet settings (set while finding the model).
    env = {**os.environ, "MLFLOW_TRACKING_URI": model.tracking_uri, **extra}
    # `mlflow models serve` runs `uvicorn` from PATH (known-traps.md): the venv's bin must be on it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env



@contextlib.contextmanager
def servers(
    model: Model, work: Path, ours_env: dict[str, str], peer_env: dict[str, str], ours_launcher: list[str]
) -> Iterator[tuple[Server, Server, str]]:
    """Both servers on free loopback ports, ready; stopped on the way out whatever happened."""
    from finetune_phi.endpoint import KEY_ENV

    key = secrets.token_urlsafe(32)
    ours_port, peer_port = free_port(), free_port()
    ours_argv = [
        *ours_launcher, "--model-uri", model.uri, "--host", "127.0.0.1",
        "--port", str(ours_port),
        # Admit every client: the bench measures batching, not the 429 admission limit.
        "--max-concurrent-requests", "64",
    ]  # fmt: skip
    peer_argv = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model.uri, "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(peer_port),
    ]  # fmt: skip
    started: list[Server] = []
    try:
        started.append(start("ours", ours_argv, server_env(model, {**ours_env, KEY_ENV: key}), ours_port, "/health/ready", work))
        started.append(start("peer", peer_argv, server_env(model, peer_env), peer_port, "/ping", work))
        for server in started:
            log.info("%s ready in %.1f s at %s", server.name, wait_ready(server), server.base)
        yield started[0], started[1], key
    finally:
        for server in started:
            stop(server)


# --- requests -------------------------------------------------------------------------------------------


def ours_request(prompt: str, key: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    body = {"input_data": [prompt], "params": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}}
    return "/score", body, {"Authorization": f"Bearer {key}"}


def peer_request(prompt: str, key: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    # The model is an MLflow text-generation model (a string input and a params schema): MLflow's
    # scoring server takes {"inputs": [...], "params": {...}} and wraps each input in its prompt template.
    body = {"inputs": [prompt], "params": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}}
    return "/invocations", body, {}


def ours_text(payload: Any) -> str:
    [text] = payload
    return str(text).strip()


def peer_text(payload: Any) -> str:
    # {"predictions": ["reply"]}: one string per input.
    [text] = payload["predictions"]
    return str(text).strip()


Build = Callable[[str, str], tuple[str, dict[str, Any], dict[str, str]]]


def reply(base: str, build: Build, parse: Callable[[Any], str], prompt: str, key: str) -> str:
    import httpx

    path, body, headers = build(prompt, key)
    response = httpx.post(base + path, json=body, headers=headers, timeout=HTTP_TIMEOUT_S)
    if response.status_code != 200:
        raise BenchError(f"{base}{path} answered {response.status_code}: {response.text[:500]}")
    return parse(response.json())


def verify_same_replies(ours: Server, peer: Server, key: str, prompts: list[str]) -> int:
    """Every prompt once through both servers: greedy replies must be the same text."""
    differ = []
    for prompt in prompts:
        a = reply(ours.base, ours_request, ours_text, prompt, key)
        b = reply(peer.base, peer_request, peer_text, prompt, key)
        if a != b:
            differ.append(f"  prompt {prompt[:60]!r}:\n    ours {a!r}\n    peer {b!r}")
    if differ:
        raise BenchError(f"{len(differ)} of {len(prompts)} greedy replies differ:\n" + "\n".join(differ))
    return len(prompts)


async def closed_loop(
    base: str, build: Build, key: str, prompts: list[str], clients: int, seconds: float, max_requests: int
) -> Level:
    """N clients, each sending its next request as soon as its previous reply is in."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=HTTP_TIMEOUT_S, limits=limits) as client:

        async def one(prompt: str) -> float:
            path, body, headers = build(prompt, key)
            started = time.perf_counter()
            response = await client.post(path, json=body, headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                failures.append(f"{response.status_code}: {response.text[:200]}")
            return elapsed

        # Warm-up: every client's connection open and one request each through the server.
        await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(clients)))
        issued = 0
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def client_loop(index: int) -> None:
            nonlocal issued
            n = index * 7  # clients start at different prompts, so lengths mix within a batch
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                latencies.append(await one(prompts[n % len(prompts)]))
                n += 1

        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    if failures:
        raise BenchError(f"{base}: {len(failures)} requests failed at {clients} clients, e.g. {failures[0]}")
    ordered = sorted(latencies)
    return Level(
        clients=clients,
        rps=len(latencies) / elapsed,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        requests=len(latencies),
    )


def compare(ours: Level, peer: Level) -> dict[str, Any]:
    return {
        "clients": ours.clients,
        "ours_rps": round(ours.rps, 2),
        "peer_rps": round(peer.rps, 2),
        "ratio_rps": round(ours.rps / peer.rps, 2),
        "ours_p50_ms": round(ours.p50_ms, 1),
        "peer_p50_ms": round(peer.p50_ms, 1),
        "ratio_p50": round(ours.p50_ms / peer.p50_ms, 2),
        "ours_p99_ms": round(ours.p99_ms, 1),
        "peer_p99_ms": round(peer.p99_ms, 1),
        "ours_requests": ours.requests,
        "peer_requests": peer.requests,
    }


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
    return {"cpus": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"{pair!r}: use NAME=VALUE")
        env[name] = value
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        model = registered_model(args.state_dir) if args.state_dir else train_demo_model(work)
        prompts = bench_prompts()
        log.info("model %s, %d prompts, %d new tokens, greedy", model.uri, len(prompts), MAX_NEW_TOKENS)
        launcher = [sys.executable, *(args.ours_launcher or ["-m", "finetune_phi.endpoint"])]
        with servers(model, work, parse_env(args.ours_env), parse_env(args.peer_env), launcher) as (ours, peer, key):
            checked = verify_same_replies(ours, peer, key, prompts)
            log.info("the %d prompts get the same greedy reply from both servers", checked)
            results = []
            for clients in args.clients:
                # Peer first, then ours, at each level: drift in the machine's load hits both alike.
                levels = {}
                for name, server, build in (("peer", peer, peer_request), ("ours", ours, ours_request)):
                    levels[name] = asyncio.run(
                        closed_loop(server.base, build, key, prompts, clients, args.seconds, args.max_requests)
                    )
                    log.info("%s at %d clients: %.1f req/s, p50 %.0f ms", name, clients, levels[name].rps, levels[name].p50_ms)
                results.append(compare(levels["ours"], levels["peer"]))
    return {
        "bench": "serve",
        "results": results,
        "setup": {
            "model": model.uri,
            "max_new_tokens": MAX_NEW_TOKENS,
            "prompts": len(prompts),
            "seconds_per_level": args.seconds,
            "ours_env": args.ours_env,
            "peer_env": args.peer_env,
            "ours_launcher": args.ours_launcher or "-m finetune_phi.endpoint",
            **machine(),
        },
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, help="reuse the newest registered model there (default: train one in a temp dir)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16], help="concurrency levels (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per server and level (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=2000, help="request cap per server and level (default: %(default)s)")
    parser.add_argument("--ours-env", nargs="*", default=[], metavar="NAME=VALUE", help="extra environment for our server")
    parser.add_argument("--peer-env", nargs="*", default=[], metavar="NAME=VALUE", help="extra environment for MLflow's server")
    parser.add_argument(
        "--ours-launcher",
        nargs="+",
        metavar="ARG",
        help="run our server as `python ARG... --model-uri ...` instead of `python -m finetune_phi.endpoint` "
        "(to measure a patched entry point)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from finetune_phi.common import setup_logging

    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if any(n < 1 for n in args.clients) or args.seconds <= 0 or args.max_requests < 1:
        log.error("--clients, --seconds and --max-requests must be positive")
        return 2
    try:
        result = run(args)
    except (BenchError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
