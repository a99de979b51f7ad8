"""Micro-batching (finetune_phi/endpoint/batcher.py): shared generate calls, exact greedy results,
cancellation, the queue bound, and the HTTP statuses the server maps them to.

The tiny random Phi-3 (real Phi-3 tokenizer) is the model; a spy around its `generate` records each
call's batch size and, where a test needs requests to pile up, holds the first call at a gate.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from finetune_phi.endpoint.batcher import Batcher, QueueFull
from finetune_phi.endpoint.caps import BatchCaps
from finetune_phi.endpoint.continuous import Stepper
from finetune_phi.endpoint.engine import Engine, SamplingParams
from helpers_model import biased, tiny_phi3

GREEDY = SamplingParams(max_new_tokens=12)


class Spy:
    """Wraps the batcher's decoding step: records (rows, tokens) per packed forward; `gate` holds steps until set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.original = Stepper.step
        self.calls: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        spy = self

        def step(stepper: Stepper, rows: Any, max_tokens: int) -> Any:
            spy.entered.set()
            assert spy.gate.wait(timeout=30), "the test never opened the gate"
            out = spy.original(stepper, rows, max_tokens)
            spy.calls.append((len(rows), stepper.last_tokens))
            return out

        monkeypatch.setattr(Stepper, "step", step)

    def hold(self) -> None:
        """Make the next step wait at the gate; `entered` tells when it got there."""
        self.entered.clear()
        self.gate.clear()

    def most_rows(self) -> int:
        return max(rows for rows, _ in self.calls)


@pytest.fixture(scope="module")
def engine() -> Engine:
    model, tokenizer = tiny_phi3()
    return Engine(model, tokenizer)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


@pytest.fixture
def batcher(engine: Engine) -> Iterator[Batcher]:
    b = Batcher(engine, max_batch_rows=16, max_queue=8)
    yield b
    b.close()


def prompts(ultrachat_20: Path) -> list[list[dict[str, str]]]:
    """Mixed lengths: a few words up to a few hundred tokens of a real ultrachat prompt."""
    rows = [json.loads(line)["messages"] for line in ultrachat_20.read_text().splitlines()[:3]]
    texts = ["Hi", "Who founded Microsoft?", *(r[0]["content"][:n] for r, n in zip(rows, (120, 900, 400)))]
    return [[{"role": "user", "content": t}] for t in texts]



async def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def test_greedy_batched_equals_one_at_a_time(engine: Engine, batcher: Batcher, spy: Spy, ultrachat_20: Path) -> None:
    conversations = prompts(ultrachat_20)
    lengths = {len(ids) for ids in engine.prepare(conversations)}
    assert len(lengths) == len(conversations) and max(lengths) > 5 * min(lengths), lengths
    alone = [engine.generate([c], GREEDY)[0] for c in conversations]  # model.generate, one row each
    assert not spy.calls

    async def together() -> list[Any]:
        spy.hold()  # the first request starts alone; the rest queue behind its first step
        first = asyncio.create_task(batcher.submit([conversations[0]], GREEDY))
        assert await asyncio.to_thread(spy.entered.wait, 10)
        rest = [asyncio.create_task(batcher.submit([c], GREEDY)) for c in conversations[1:]]
        # `waiting`, not `queued`: a request still being tokenized would join a step later.
        await _wait_for(lambda: batcher.waiting == len(rest))
        spy.gate.set()
        return [(await first)[0], *[(await t)[0] for t in rest]]

    batched = asyncio.run(together())
    # They joined the running request at its next step: every row decoded in the same forwards.
    assert spy.calls[0][0] == 1 and spy.most_rows() == len(conversations), spy.calls
    assert [c.text for c in batched] == [c.text for c in alone]
    assert batched == alone  # token counts and finish reasons too
    # One request with several inputs gives the same replies as well.
    several = asyncio.run(batcher.submit(conversations, GREEDY))
    assert several == alone


def test_concurrent_requests_share_decoding_steps(engine: Engine, batcher: Batcher, spy: Spy) -> None:
    greedy = [SamplingParams(max_new_tokens=n) for n in (4, 9, 6, 9, 2)]
    sampled = SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.8)
    seeded = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=7)
    seeded_prompt = [{"role": "user", "content": "seeded"}]
    [seeded_alone] = engine.generate([seeded_prompt], seeded)

    async def scenario() -> list[list[Any]]:
        spy.hold()
        blocker = asyncio.create_task(batcher.submit([[{"role": "user", "content": "first"}]], GREEDY))
        assert await asyncio.to_thread(spy.entered.wait, 10)
        tasks = [
            asyncio.create_task(batcher.submit([[{"role": "user", "content": f"question {i}"}]], p))
            for i, p in enumerate(greedy)
        ]
        # Two inputs in one request; sampled and seeded requests run beside greedy ones, each with its own parameters.
        tasks.append(asyncio.create_task(batcher.submit([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], GREEDY)))
        tasks.append(asyncio.create_task(batcher.submit([[{"role": "user", "content": "warm"}]], sampled)))
        tasks.append(asyncio.create_task(batcher.submit([seeded_prompt], seeded)))
        await _wait_for(lambda: batcher.waiting == len(tasks))
        spy.gate.set()
        await blocker
        return [await t for t in tasks]

    results = asyncio.run(scenario())
    # The blocker alone for one step, then all 10 rows (blocker + 5 + 2 + sampled + seeded) in the same forwards.
    assert spy.calls[0][0] == 1 and spy.most_rows() == 10, spy.calls
    assert batcher.batched_requests == 9
    # Each request still gets its own max_new_tokens.
    for params, [completion] in zip(greedy, results[:5]):
        assert completion.completion_tokens <= params.max_new_tokens
        if completion.finish_reason == "length":
            assert completion.completion_tokens == params.max_new_tokens
    assert len(results[5]) == 2 and len(results[6]) == 1
    # A seeded row draws from its own generator: batched, it gets what it gets alone.
    assert results[7] == [seeded_alone]


def test_a_request_joins_a_running_batch_at_the_next_step(engine: Engine, batcher: Batcher, spy: Spy) -> None:
    undo = biased(engine.model, engine.tokenizer.convert_tokens_to_ids("<|placeholder1|>"))  # never a stop token
    long, short = SamplingParams(max_new_tokens=300), SamplingParams(max_new_tokens=3)

    async def scenario() -> tuple[bool, int]:
        running = asyncio.create_task(batcher.submit([[{"role": "user", "content": "long"}]], long))
        await _wait_for(lambda: len(spy.calls) >= 5)
        [done] = await batcher.submit([[{"role": "user", "content": "short"}]], short)
        steps_then = len(spy.calls)
        await running
        return done.completion_tokens == 3, steps_then

    try:
        ok, steps_then = asyncio.run(scenario())
    finally:
        undo()
    # The short one was answered while the long one kept decoding (it did not wait for its end).
    assert ok and steps_then < 300 and spy.most_rows() == 2, spy.calls


def test_cancelled_queued_work_is_dropped_before_generation(batcher: Batcher, spy: Spy) -> None:
    async def scenario() -> str:
        spy.hold()
        running = asyncio.create_task(batcher.submit([[{"role": "user", "content": "running"}]], GREEDY))
        assert await asyncio.to_thread(spy.entered.wait, 10)
        abandoned = asyncio.create_task(batcher.submit([[{"role": "user", "content": "abandoned"}]], GREEDY))
        await _wait_for(lambda: batcher.queued == 1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(abandoned, timeout=0.05)  # what the server's 408 timeout does
        assert batcher.queued == 0
        spy.gate.set()
        [done] = await running
        # A later request runs alone: nothing of the abandoned one is left.
        await batcher.submit([[{"role": "user", "content": "next"}]], GREEDY)
        return done.text

    asyncio.run(scenario())
    assert spy.most_rows() == 1, spy.calls
    assert batcher.dropped == 1 and batcher.batched_requests == 2


def test_cancelling_every_caller_stops_a_running_batch_early(engine: Engine, batcher: Batcher, spy: Spy) -> None:
    undo = biased(engine.model, engine.tokenizer.convert_tokens_to_ids("<|placeholder1|>"))  # never a stop token
    long = SamplingParams(max_new_tokens=400)

    async def scenario() -> int:
        tasks = [asyncio.create_task(batcher.submit([[{"role": "user", "content": f"q{i}"}]], long)) for i in range(2)]
        await _wait_for(lambda: spy.calls and spy.calls[-1][0] == 2)
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        steps = len(spy.calls)
        await asyncio.sleep(0.2)
        assert len(spy.calls) <= steps + 1  # at most the step that was running
        return steps

    try:
        steps = asyncio.run(scenario())
    finally:
        undo()
    assert spy.most_rows() == 2 and 1 <= steps < 400, spy.calls
    assert batcher.batched_requests == 0


def _poll(condition: Callable[[], bool], timeout: float = 20) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition never held")


def test_queue_bound_is_enforced(engine: Engine, spy: Spy) -> None:
    small = Batcher(engine, max_batch_rows=16, max_queue=2)

    async def scenario() -> None:
        spy.hold()
        running = asyncio.create_task(small.submit([[{"role": "user", "content": "running"}]], GREEDY))
        assert await asyncio.to_thread(spy.entered.wait, 10)
        waiting = [asyncio.create_task(small.submit([[{"role": "user", "content": f"w{i}"}]], GREEDY)) for i in range(2)]
        await _wait_for(lambda: small.queued == 2)
        assert small.queue_full()
        with pytest.raises(QueueFull, match="retry"):
            await small.submit([[{"role": "user", "content": "one too many"}]], GREEDY)
        spy.gate.set()
        await asyncio.gather(running, *waiting)
        assert not small.queue_full()
        await small.submit([[{"role": "user", "content": "room again"}]], GREEDY)

    try:
        asyncio.run(scenario())
    finally:
        small.close()
    assert small.batched_requests == 4


def test_runtime_maps_queue_full_to_429_and_long_input_to_400(engine: Engine, spy: Spy) -> None:
    from finetune_phi.endpoint.runtime import ApiError, Runtime

    runtime = Runtime("tiny", engine)
    runtime.batcher = Batcher(engine, max_queue=1)

    async def scenario() -> None:
        spy.hold()
        running = asyncio.create_task(runtime.generate([[{"role": "user", "content": "running"}]], GREEDY))
        assert await asyncio.to_thread(spy.entered.wait, 10)
        queued = asyncio.create_task(runtime.generate([[{"role": "user", "content": "queued"}]], GREEDY))
        await _wait_for(lambda: runtime.batcher is not None and runtime.batcher.queued == 1)
        with pytest.raises(ApiError) as full:
            await runtime.generate([[{"role": "user", "content": "refused"}]], GREEDY)
        assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
        spy.gate.set()
        await asyncio.gather(running, queued)
        with pytest.raises(ApiError) as too_long:
            await runtime.generate([[{"role": "user", "content": "word " * 600}]], GREEDY, param="messages")
        assert (too_long.value.status, too_long.value.param) == (400, "messages")
        assert "context" in too_long.value.message

    try:
        asyncio.run(scenario())
    finally:
        runtime.close()


def test_a_big_request_is_split_over_steps_by_the_caps_not_refused(engine: Engine, spy: Spy, ultrachat_20: Path) -> None:
    """32 conversations in one request, under forced small caps: rows x tokens per forward and KV
    tokens held stay under the caps, and the answers equal the uncapped ones."""
    conversations = (prompts(ultrachat_20) * 7)[:32]
    rows = engine.prepare(conversations)
    uncapped = Batcher(engine, max_queue=2)
    capped = Batcher(engine, max_queue=2, caps=BatchCaps(max_step_tokens=48, max_batch_tokens=400))
    try:
        expected = asyncio.run(uncapped.submit(conversations, GREEDY))
        assert uncapped.peak_rows == 16  # max_batch_rows
        spy.calls.clear()
        got = asyncio.run(capped.submit(conversations, GREEDY))
    finally:
        uncapped.close()
        capped.close()
    assert got == expected
    assert max(tokens for _, tokens in spy.calls) <= 48 == capped.peak_step_tokens
    longest = max(len(r) for r in rows) + GREEDY.max_new_tokens
    assert longest > 48  # the long prompts were fed in chunks over several steps
    assert 1 < capped.peak_rows < 16  # rows started as cache budget freed up
    assert capped.batched_requests == 1
