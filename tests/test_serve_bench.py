"""bench/serve_bench.py's measuring parts against a stand-in OpenAI server (no model, no subprocess).

The full bench starts three model servers and takes minutes; here the closed loop, the streaming
time-to-first-token reader, the ratios and the goal checks run against a small Starlette app in a
thread, so a change to the bench's arithmetic or its SSE parsing is caught in about a second.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from typing import Any, AsyncIterator


from conftest import REPO
from helpers_endpoint import ThreadServer

_spec = importlib.util.spec_from_file_location("serve_bench", REPO / "bench" / "serve_bench.py")
assert _spec and _spec.loader
serve_bench = importlib.util.module_from_spec(_spec)
sys.modules["serve_bench"] = serve_bench
_spec.loader.exec_module(serve_bench)

DELAY_S = 0.01  # per "token" of the stand-in


def stand_in() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> Any:
        body = await request.json()
        n = int(body["max_tokens"])
        if body.get("stream"):

            async def events() -> AsyncIterator[bytes]:
                role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                yield f"data: {json.dumps(role)}\n\n".encode()
                for i in range(n):
                    await asyncio.sleep(DELAY_S)
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': f't{i} '}}]})}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        await asyncio.sleep(DELAY_S * n)
        return JSONResponse(
            {"choices": [{"message": {"role": "assistant", "content": "x " * n}}], "usage": {"completion_tokens": n}}
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_closed_loop_streaming_ratios_and_goals() -> None:
    with ThreadServer(stand_in()) as running:
        server = serve_bench.Server("stand-in", running.base, "/", None, REPO / "none.log", model_id="m")  # type: ignore[arg-type]
        assert serve_bench.stream_supported(server)
        prompts = ["a", "b", "c"]
        build = lambda p: serve_bench.chat_request(server, p, 4)  # noqa: E731
        level = asyncio.run(serve_bench.closed_loop(server, build, prompts, 2, 0.3, 1000, serve_bench.chat_parse))
        assert level.requests >= 4 and level.tokens_per_reply == 4
        assert level.p50_ms >= 35 and level.rps > 0  # four 10 ms token delays at least; no upper bound (machine load)
        streamed = asyncio.run(
            serve_bench.closed_loop(
                server, lambda p: serve_bench.chat_request(server, p, 4, stream=True), prompts, 1, 0.2, 1000, stream=True
            )
        )
        # The first content chunk comes after one token's delay, the reply after four.
        assert streamed.ttft_p50_ms is not None and 8 <= streamed.ttft_p50_ms < streamed.p50_ms

    model = serve_bench.Model("tiny", "sqlite://", "models:/m/1", "m")
    fast = serve_bench.Level(clients=8, rps=30.0, p50_ms=10.0, p99_ms=20.0, requests=300, tokens_per_reply=32)
    slow = serve_bench.Level(clients=8, rps=20.0, p50_ms=20.0, p99_ms=40.0, requests=200, tokens_per_reply=32)
    row = serve_bench.compare(model, "transformers", "short", 32, fast, slow)
    assert (row["ratio_rps"], row["ratio_p50"]) == (1.5, 0.5)
    ttft = serve_bench.compare_ttft(model, 32, None, serve_bench.Level(1, 1.0, 5.0, 5.0, 3, ttft_p50_ms=5.0))
    assert ttft["ratio_ttft"] is None  # ours not measured: said, not guessed
    mlflow_row = serve_bench.compare(model, "mlflow", "short", 32, fast, slow)
    checked = {g["goal"]: g["met"] for g in serve_bench.goals([row, mlflow_row], [ttft])}
    assert checked == {
        "ratio_rps >= 1.3 vs transformers serve, tiny short 8 clients": True,
        "ratio_rps >= 4 vs mlflow models serve, tiny short 8 clients": False,
        "ratio_ttft <= 1.0 vs transformers serve, tiny 1 clients": None,
    }


def test_quick_defaults_and_one_thread_setting_for_all() -> None:
    args = serve_bench.resolve_defaults(serve_bench.build_parser().parse_args(["--quick"]))
    assert (args.sizes, args.clients, args.cases, args.seconds) == (["tiny"], [1, 4], ["short"], 2.0)
    full = serve_bench.resolve_defaults(serve_bench.build_parser().parse_args([]))
    assert full.sizes == ["tiny", "100m"] and full.clients == [1, 8, 16, 32] and full.cases == ["short", "long"]
    assert serve_bench.thread_env(full.threads) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
