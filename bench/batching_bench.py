"""In-process A/B: this endpoint's continuous batcher against transformers' ContinuousBatchingManager.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batching_bench.py                 # both sizes, 1/8/16 clients
    OMP_NUM_THREADS=1 .venv/bin/python bench/batching_bench.py --sizes tiny --rounds 2 --seconds 3

No HTTP: both schedulers run in this process over the same weights (the peer over a deep copy, since
its manager switches the model's attention implementation to paged sdpa), the same prompt token
ids, greedy, 32 new tokens, one torch thread. Peer = what `transformers serve --continuous-batching`
runs: `model.init_continuous_batching(generation_config)` + `add_request` + a result handler.

Models: "tiny" = the demo model's architecture (finetuning_dir/tiny_model.py TinySpec, random
weights, byte-level BPE trained on the demo rows); "100m" = Phi3Config hidden 768, 12 layers,
12 heads, intermediate 2048 over the same tokenizer (~89M parameters), random weights.
Prompts: the demo questions plus 4 long ultrachat_200k prompts cut to 1,200 characters (from
testkit.fixtures, `make fixtures`; without them the bench stops with exit 1 and how to get them,
rather than measure another workload).

Load: closed loop, N clients, `--seconds` per run; ours and the peer alternate for `--rounds`
rounds at each level (the machine is shared: interleaving spreads its noise over both), and the
medians are printed as one JSON line per size and level. Before timing, every prompt's greedy
reply must be the same token ids from both (and from `model.generate` alone).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "finetuning_dir"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

NEW_TOKENS = 32
LONG_PROMPTS = 4


def build(size: str) -> tuple[Any, Any]:
    from tiny_model import TinySpec, build_model, build_tokenizer, corpus_from_rows

    from finetune_phi.demo_data import demo_rows

    tokenizer = build_tokenizer(corpus_from_rows([r["messages"] for r in demo_rows()]))
    spec = TinySpec()
    if size == "100m":
        spec = TinySpec(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12)
    return build_model(tokenizer, seed=0, spec=spec).eval(), tokenizer


def conversations(ultrachat: Path) -> list[list[dict[str, str]]]:
    from finetune_phi.demo_data import demo_rows

    questions: list[str] = []
    for row in demo_rows():
        q = row["messages"][0]["content"]
        if q not in questions:
            questions.append(q)
    texts = questions[:24]
    rows = [json.loads(line)["messages"] for line in ultrachat.read_text(encoding="utf-8").splitlines()[:LONG_PROMPTS]]
    texts += [r[0]["content"][:1200] for r in rows]
    return [[{"role": "user", "content": t}] for t in texts]


class Peer:
    """transformers' ContinuousBatchingManager, driven the way `transformers serve` drives it."""

    def __init__(self, model: Any, stop_ids: list[int], num_blocks: int = 64) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop_ids, pad_token_id=model.config.pad_token_id)
        # On CPU its default sizes the paged cache from a share of the machine's RAM (it was killed
        # for memory on this shared box): 64 pages of 256 tokens hold 16 clients x 547 tokens with room.
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(num_blocks=num_blocks)
        )
        self.manager.start()
        self.stop_ids = stop_ids
        self.counter = 0

    async def generate(self, ids: list[int]) -> list[int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.counter += 1
        request_id = f"r{self.counter}"

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))

        self.manager.register_result_handler(request_id, done)
        self.manager.add_request(ids, request_id=request_id, max_new_tokens=NEW_TOKENS, eos_token_id=self.stop_ids)
        result = await future
        if result.error is not None:
            raise RuntimeError(result.error)
        return list(result.generated_tokens)

    def close(self) -> None:
        self.manager.stop(block=True)


async def closed_loop(call: Callable[[int], Awaitable[Any]], n_prompts: int, clients: int, seconds: float) -> dict[str, float]:
    """N clients, each sending its next prompt when the last reply came; requests ended inside the window count."""
    await asyncio.gather(*(call(k % n_prompts) for k in range(clients)))  # warm-up, not timed
    latencies: list[float] = []
    started = time.perf_counter()
    cpu_started = time.process_time()
    stop_at = started + seconds

    async def client(index: int) -> None:
        i = index
        while time.perf_counter() < stop_at:
            begun = time.perf_counter()
            await call(i % n_prompts)
            if time.perf_counter() <= stop_at:
                latencies.append(time.perf_counter() - begun)
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    cpu = time.process_time() - cpu_started  # this process's CPU seconds: what other users of the machine do not inflate
    return {
        "rps": len(latencies) / seconds,
        "per_cpu_s": len(latencies) / max(cpu, 1e-9),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "requests": len(latencies),
    }


def run_size(size: str, levels: list[int], rounds: int, seconds: float, check: int, ultrachat: Path) -> list[dict[str, Any]]:
    import torch

    from finetune_phi.endpoint.batcher import Batcher
    from finetune_phi.endpoint.caps import BatchCaps
    from finetune_phi.endpoint.engine import Engine, SamplingParams

    model, tokenizer = build(size)
    engine = Engine(model, tokenizer)
    convs = conversations(ultrachat)
    prompt_ids = engine.prepare(convs)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, do_sample=False)
    peer = Peer(copy.deepcopy(model), engine.stop_token_ids)
    parameters = sum(p.numel() for p in model.parameters())

    async def main() -> list[dict[str, Any]]:
        batcher = Batcher(engine)
        unpacked = Batcher(engine, caps=BatchCaps(packed_weights=False)) if batcher.stepper is not None and batcher.stepper.packed else None

        async def ours_unpacked(i: int) -> int:
            [c] = await unpacked.submit([convs[i]], params)  # type: ignore[union-attr]
            return c.completion_tokens

        async def ours(i: int) -> list[int]:
            [c] = await batcher.submit([convs[i]], params)
            return c.completion_tokens

        async def ours_ids(i: int) -> list[int]:
            # The ids behind the completion: what the peer returns.
            out: list[int] = []
            await batcher.submit([convs[i]], params, on_tokens=lambda row, ids: out.extend(ids))
            return out

        async def theirs(i: int) -> list[int]:
            return await peer.generate(prompt_ids[i])

        # Same replies first: ours, the peer's, and model.generate alone.
        checked = range(0, len(convs), max(1, len(convs) // check)) if check else range(0)
        alone = [engine.generate_ids([prompt_ids[i]], [engine.row_limit(len(prompt_ids[i]), params)], params)[0] for i in checked]
        mine = [await ours_ids(i) for i in checked]
        peers = [await theirs(i) for i in checked]

        def cut(ids: list[int]) -> list[int]:
            for k, t in enumerate(ids):
                if t in engine.stop_token_ids:
                    return ids[: k + 1]
            return ids

        same_ours = sum(cut(a) == cut(b) for a, b in zip(alone, mine))
        same_peer = sum(cut(a) == cut(b) for a, b in zip(alone, peers))
        results = []
        for clients in levels:
            runs: dict[str, list[dict[str, float]]] = {"ours": [], "peer": []}
            if unpacked is not None:
                runs["ours_unpacked"] = []
            for _ in range(rounds):
                runs["ours"].append(await closed_loop(ours, len(convs), clients, seconds))
                runs["peer"].append(await closed_loop(theirs, len(convs), clients, seconds))
                if unpacked is not None:
                    runs["ours_unpacked"].append(await closed_loop(ours_unpacked, len(convs), clients, seconds))
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms", "per_cpu_s")} for k, v in runs.items()}
            extra = {}
            if unpacked is not None:
                extra = {
                    "ours_unpacked_rps": round(med["ours_unpacked"]["rps"], 2),
                    "ours_unpacked_p50_ms": round(med["ours_unpacked"]["p50_ms"], 1),
                    "ours_unpacked_per_cpu_s": round(med["ours_unpacked"]["per_cpu_s"], 2),
                    "ours_unpacked_rps_runs": [round(r["rps"], 2) for r in runs["ours_unpacked"]],
                }
            results.append(
                {
                    "bench": "batching_inprocess",
                    "size": size,
                    "parameters": parameters,
                    "clients": clients,
                    "ours_rps": round(med["ours"]["rps"], 2),
                    "peer_rps": round(med["peer"]["rps"], 2),
                    "ours_per_cpu_s": round(med["ours"]["per_cpu_s"], 2),
                    "peer_per_cpu_s": round(med["peer"]["per_cpu_s"], 2),
                    "ratio_per_cpu_s": round(med["ours"]["per_cpu_s"] / med["peer"]["per_cpu_s"], 2),
                    "ratio_rps": round(med["ours"]["rps"] / med["peer"]["rps"], 2),
                    "ours_p50_ms": round(med["ours"]["p50_ms"], 1),
                    "peer_p50_ms": round(med["peer"]["p50_ms"], 1),
                    "ratio_p50": round(med["ours"]["p50_ms"] / med["peer"]["p50_ms"], 2),
                    "ours_rps_runs": [round(r["rps"], 2) for r in runs["ours"]],
                    "peer_rps_runs": [round(r["rps"], 2) for r in runs["peer"]],
                    **extra,
                    "same_as_generate": {"ours": same_ours, "peer": same_peer, "of": len(checked)},
                    "rounds": rounds,
                    "seconds": seconds,
                    "torch_threads": torch.get_num_threads(),
                    "packed_weights": bool(batcher.stepper is not None and batcher.stepper.packed),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }
            )
            print(json.dumps(results[-1]), flush=True)
        batcher.close()
        if unpacked is not None:
            unpacked.close()
        return results

    try:
        return asyncio.run(main())
    finally:
        peer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "100m"], choices=["tiny", "100m"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--seconds-100m", type=float, default=30.0, help="per run on the 100m model (a 16-client round takes seconds there)")
    parser.add_argument("--check", type=int, default=8, help="prompts checked against model.generate on the 100m model (all on tiny)")
    args = parser.parse_args(argv)
    import logging

    from testkit import fixtures

    logging.basicConfig(level=logging.WARNING)
    try:
        ultrachat = fixtures.ultrachat_first20()
    except fixtures.FixtureUnavailable as exc:
        # A string exit code: Python prints it to stderr and exits 1.
        raise SystemExit(f"batching_bench.py: the benchmark's workload is unavailable, nothing was measured:\n{exc}") from exc
    for size in args.sizes:
        seconds = args.seconds_100m if size == "100m" else args.seconds
        run_size(size, args.clients, args.rounds, seconds, args.check if size == "100m" else 10**6, ultrachat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
