"""Continuous batching: every running request advances by one token per step of ONE packed forward.

    batcher = Batcher(engine)                      # starts the one generation thread
    completions = await batcher.submit(conversations, params)

Requests wait in a bounded FIFO queue (QueueFull past `max_queue`: HTTP 429). The generation
thread runs steps (finetune_phi/endpoint/continuous.py): before each step it admits queued rows
(one row per conversation) while fewer than `max_batch_rows` run and their KV cache fits
`max_batch_tokens`; a step feeds every running row's next token, plus prompt chunks of rows still
in prefill, as one packed sequence of at most `max_step_tokens` tokens. So a request joins the
running batch at the next step instead of waiting for it to end, nothing is padded to a
neighbour's length, and each row keeps its own sampling parameters (temperature, top-p, top-k,
repetition penalty, seed: a seeded row has its own generator), its own limit and its own cache.
A request is answered as soon as its last row ends. Tokenizing and decoding run on a small pool
off both the event loop and the generation thread.

Caps: `max_step_tokens` (rows x tokens of one forward) and
`max_batch_tokens` (prompt + new tokens of all running rows: their KV cache) split a big request
(e.g. 32 long conversations in one /score call) over steps: its rows start as room frees up and
long prompts are fed in chunks. It is refused only when the queue is full, never for its size.
Their defaults live in caps.py; the server passes what __main__ was told (caps.BatchCaps).

Cancellation: a caller whose await is cancelled (e.g. `asyncio.wait_for` timing out) marks its
work cancelled. Queued work is then dropped before generation; its running rows leave the batch
(and free their cache) before the next step.

Streaming hook: `submit(..., on_tokens=f)` calls `f(row, ids)` on the generation thread as each
row of the request gets new token ids; joined in order they are the row's result ids (they end
with the stop token when the row stopped on one). `f` must be quick and thread-safe (the server
hands the ids to its event loop with call_soon_threadsafe).

Models not laid out like Phi-3 (continuous.supports) fall back to one `model.generate` per request.
Measurements against `transformers serve --continuous-batching`:
bench/RESULTS.md ("Serving").
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from finetune_phi.endpoint.caps import BatchCaps
from finetune_phi.endpoint.engine import Completion, Engine, Message, SamplingParams

log = logging.getLogger(__name__)

# Rows (conversations) decoding together. On 2 CPU cores the tiny model's step costs little more
# for 16 rows than for 1 (per-step Python overhead dominates); past 16 the step grows linearly.
DEFAULT_MAX_BATCH_ROWS = 16
# Requests admitted but not yet generating; past this, submit() raises QueueFull (HTTP 429).
DEFAULT_MAX_QUEUE = 64

# Below this many parameters a model's matrices are too small to split across threads: on the
# 2-core bench machine the tiny demo model served 5 req/s with 2 torch threads and 35 with 1
# (bench/RESULTS.md). Real Phi-3-mini (3.8 B) is far above it and gets every core.
SMALL_MODEL_PARAMETERS = 50_000_000


def default_torch_threads(engine: Engine) -> int:
    """Threads for generation: OMP_NUM_THREADS if set, 1 for a small model, else every core; 0 = leave as is."""
    if os.environ.get("OMP_NUM_THREADS"):
        return 0  # torch already took it at import
    parameters = sum(p.numel() for p in engine.model.parameters())
    return 1 if parameters < SMALL_MODEL_PARAMETERS else (os.cpu_count() or 1)


class QueueFull(RuntimeError):
    """The queue holds `max_queue` requests already: answer 429 and let the client retry."""


@dataclass(eq=False)
class _Work:
    rows: list[list[int]]
    limits: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[int]]]
    cancelled: bool = False
    on_tokens: Callable[[int, list[int]], None] | None = None  # the streaming hook (module docstring)
    enqueued_at: float = field(default_factory=time.monotonic)
    started: int = 0  # rows admitted into the running batch
    running: list[Any] = field(default_factory=list)  # continuous.Row per admitted row
    finished: int = 0

    @property
    def width(self) -> int:
        return max(len(r) for r in self.rows)


class Batcher:
    """The queue and the one thread that runs the decoding steps for an engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        caps: BatchCaps = BatchCaps(),
        tokenizer_threads: int = 2,
        torch_threads: int | None = None,
    ) -> None:
        if max_batch_rows < 1 or max_queue < 1:
            raise ValueError("max_batch_rows and max_queue must be >= 1")
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.max_step_tokens = caps.max_step_tokens
        self.max_batch_tokens = caps.max_batch_tokens
        self._queue: deque[_Work] = deque()
        self._cond = threading.Condition()
        self._preparing = 0  # admitted requests still being tokenized
        self._closed = False
        # Counters for tests and logs.
        self.steps = 0  # packed forwards run
        self.batched_requests = 0  # requests answered
        self.dropped = 0  # queued requests dropped because their caller left
        self.peak_rows = 0  # most rows running at once
        self.peak_step_tokens = 0  # most tokens in one forward
        self._pool = ThreadPoolExecutor(max_workers=tokenizer_threads, thread_name_prefix="tokenize")
        self.torch_threads = torch_threads if torch_threads is not None else default_torch_threads(engine)
        from finetune_phi.endpoint import continuous

        self.stepper = continuous.Stepper(engine, caps.packed_weights) if continuous.supports(engine.model) else None
        if self.stepper is None:
            log.warning("%s is not laid out like Phi-3: one generate() per request, no continuous batching", type(engine.model).__name__)
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self._thread.start()

    # --- the caller's side (event loop) -------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests admitted and not yet generating (tokenizing or waiting in the queue)."""
        with self._cond:
            return len(self._queue) + self._preparing

    @property
    def waiting(self) -> int:
        """Requests tokenized and waiting for the next step to admit them (a subset of `queued`)."""
        with self._cond:
            return len(self._queue)

    def queue_full(self) -> bool:
        return self.queued >= self.max_queue

    async def submit(
        self,
        conversations: Sequence[Sequence[Message] | str],
        params: SamplingParams,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Completion]:
        """One completion per conversation. Raises QueueFull, InputTooLong, or the generation's error.

        `on_tokens(row, ids)` receives each row's new ids as they are generated (module docstring)."""
        if not conversations:
            return []
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed: the server is shutting down")
            if len(self._queue) + self._preparing >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting: retry shortly")
            self._preparing += 1
        loop = asyncio.get_running_loop()
        engine = self.engine
        try:
            rows = await loop.run_in_executor(self._pool, engine.prepare, conversations)
            work = _Work(
                rows=rows,
                limits=[engine.row_limit(len(r), params) for r in rows],
                params=params,
                loop=loop,
                future=loop.create_future(),
                on_tokens=on_tokens,
            )
        except BaseException:
            with self._cond:
                self._preparing -= 1
            raise
        with self._cond:
            # Leaving "preparing" and joining the queue in one step: `queued` never dips in between,
            # so the bound cannot be overshot by a request slipping through that gap.
            self._preparing -= 1
            if self._closed:
                raise RuntimeError("the batcher is closed: the server is shutting down")
            self._queue.append(work)
            self._cond.notify()
        try:
            new_ids = await work.future
        except asyncio.CancelledError:
            self._cancel(work)
            raise
        return await loop.run_in_executor(self._pool, self._decode, work, new_ids)

    def _decode(self, work: _Work, new_ids: list[list[int]]) -> list[Completion]:
        return [self.engine.completion(ids, len(r), n) for ids, r, n in zip(new_ids, work.rows, work.limits)]

    def _cancel(self, work: _Work) -> None:
        with self._cond:
            work.cancelled = True
            try:
                self._queue.remove(work)
                self.dropped += 1
            except ValueError:
                pass  # already running: its rows leave the batch before the next step

    def close(self) -> None:
        """Stop taking work; queued callers get an error. Running rows stop after the current step."""
        with self._cond:
            self._closed = True
            abandoned = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for work in abandoned:
            _deliver(work, error=RuntimeError("the server is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the generation thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads > 0:
            import torch

            torch.set_num_threads(self.torch_threads)
        if self.stepper is None:
            self._run_fallback()
        else:
            self._run_continuous()

    def _run_continuous(self) -> None:
        running: list[Any] = []  # continuous.Row, oldest first
        held = 0  # KV tokens the running rows hold (prompt + limit each)
        while True:
            with self._cond:
                while not self._queue and not running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    abandoned = {row.owner for row in running if not row.owner.cancelled}
                    for row in running:
                        row.release()
                    break
                # Rows of cancelled requests leave before the step (their cache is freed).
                if any(row.owner.cancelled for row in running):
                    for row in running:
                        if row.owner.cancelled:
                            held -= row.capacity
                            row.release()
                    running = [row for row in running if not row.owner.cancelled]
                admitted = self._admit(running, held)
            for row in admitted:
                held += row.capacity
            running.extend(admitted)
            live = [row for row in running if not row.done]
            if live:
                self.peak_rows = max(self.peak_rows, len(live))
                try:
                    with self.engine._lock:
                        emitted = self.stepper.step(live, self.max_step_tokens)  # type: ignore[union-attr]
                except BaseException as exc:  # handed to every caller with a running row
                    log.error("decoding step failed for %d rows: %s", len(live), exc, exc_info=exc)
                    for work in {row.owner for row in running}:
                        work.cancelled = True  # its rows not started yet are dropped from the queue
                        _deliver(work, error=exc)
                    for row in running:
                        row.release()
                    running, held = [], 0
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.steps += 1
                self.peak_step_tokens = max(self.peak_step_tokens, self.stepper.last_tokens)  # type: ignore[union-attr]
                for row in emitted:
                    work = row.owner
                    if work.on_tokens is not None and not work.cancelled:
                        try:
                            work.on_tokens(row.index, [row.generated[-1]])
                        except Exception:  # a broken hook must not stop everyone else's generation
                            log.exception("on_tokens hook failed; the request keeps generating")
            # Answer every request whose rows have all ended.
            if any(row.done for row in running):
                still = []
                for row in running:
                    if not row.done:
                        still.append(row)
                        continue
                    held -= row.capacity
                    work = row.owner
                    work.finished += 1
                    if work.finished == len(work.rows) and not work.cancelled:
                        self.batched_requests += 1
                        _deliver(work, result=[r.generated for r in work.running])
                running = still
        for work in abandoned:
            _deliver(work, error=RuntimeError("the server is shutting down"))

    def _admit(self, running: list[Any], held: int) -> list[Any]:
        """Rows to start now, FIFO: while rows and KV budget allow (called under the lock)."""
        admitted: list[Any] = []
        count_running = sum(1 for row in running if not row.done)
        while self._queue:
            work = self._queue[0]
            if work.cancelled:
                self._queue.popleft()
                continue
            index = work.started
            capacity = len(work.rows[index]) + work.limits[index]
            busy = count_running + len(admitted)
            # A row that alone exceeds the KV budget still runs, alone: a big request is split, never refused.
            if busy >= self.max_batch_rows or (busy and held + capacity > self.max_batch_tokens):
                break
            row = self.stepper.start(work.rows[index], work.limits[index], work.params, owner=work, index=index)  # type: ignore[union-attr]
            work.running.append(row)
            work.started += 1
            held += capacity
            admitted.append(row)
            if work.started == len(work.rows):
                self._queue.popleft()
        return admitted

    def _run_fallback(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                work = self._queue.popleft()

            def cancelled(work: _Work = work) -> list[bool]:
                return [work.cancelled] * len(work.rows)

            def on_step(ids: list[int], work: _Work = work, sent: list[int] = [0] * len(work.rows)) -> None:
                for i, token in enumerate(ids):
                    if work.on_tokens is not None and not work.cancelled and sent[i] < work.limits[i]:
                        sent[i] += 1
                        work.on_tokens(i, [token])

            try:
                new_ids = self.engine.generate_ids(work.rows, work.limits, work.params, cancelled, on_step if work.on_tokens else None)
            except BaseException as exc:
                log.error("generate failed: %s", exc, exc_info=exc)
                _deliver(work, error=exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            self.batched_requests += 1
            _deliver(work, result=new_ids)


def _deliver(work: _Work, result: list[list[int]] | None = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if work.future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result or [])

    try:
        work.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the caller's event loop is closed: nobody is waiting for this result
