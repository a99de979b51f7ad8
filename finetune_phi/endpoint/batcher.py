"""Dynamic micro-batching: concurrent requests share one `model.generate` call.

    batcher = Batcher(engine)                      # starts the one generation thread
    completions = await batcher.submit(conversations, params)

Requests wait in a bounded FIFO queue. The generation thread takes the oldest request and every
other queued request that can share its pass (same sampling settings, no seed, room in the batch
and the context), runs one left-padded `generate` for all their rows, and hands each caller its
rows. Tokenizing (chat template, encode) and decoding run on a small pool off both the event loop
and the generation thread, so the next batch starts as soon as the previous one ends.

Cancellation: a caller whose await is cancelled (e.g. `asyncio.wait_for` timing out) marks its
work cancelled. Queued work is then dropped before generation; rows already generating are marked
finished at the next step, and a batch whose callers have all gone stops early.

Streaming hook: `submit(..., on_tokens=f)` calls `f(row, ids)` on the generation thread as each
row of the request gets new token ids; joined in order they are the row's result ids (so they
may run past a stop token, as the result does). `f` must be quick and thread-safe (the server's
hands the ids to its event loop with call_soon_threadsafe).

Continuous batching (transformers' ContinuousBatchingManager) was measured against this on the
2-core CPU with the tiny model: see bench/RESULTS.md ("Serving").
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
from itertools import count
from typing import Callable, Hashable, Sequence

from finetune_phi.endpoint.engine import Completion, Engine, Message, SamplingParams

log = logging.getLogger(__name__)

# Rows (conversations) per generate call. On 2 CPU cores a batch of 8 short prompts costs about
# twice a batch of 1 (per-step Python overhead dominates the tiny model); past 16 the step itself
# grows linearly, so a bigger batch adds latency without adding throughput.
DEFAULT_MAX_BATCH_ROWS = 16
# Requests admitted but not yet generating; past this, submit() raises QueueFull (HTTP 429).
DEFAULT_MAX_QUEUE = 64
# How long the generation thread may hold a batch open for requests it knows are on their way.
DEFAULT_MAX_WAIT_S = 0.004


# Padding budget of one batch: padded prompt tokens <= PAD_FACTOR x real tokens + PAD_SLACK_TOKENS.
PAD_FACTOR = 2
PAD_SLACK_TOKENS = 256

# Below this many parameters a model's matrices are too small to split across threads: on the
# 2-core bench machine the tiny demo model served 5 req/s with 2 torch threads and 35 with 1
# (bench/RESULTS.md). Real Phi-3-mini (3.8 B) is far above it and gets every core.
SMALL_MODEL_PARAMETERS = 50_000_000


def default_torch_threads(engine: Engine) -> int:
    """Threads for one generate: OMP_NUM_THREADS if set, 1 for a small model, else every core; 0 = leave as is."""
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
    key: Hashable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[int]]]
    cancelled: bool = False
    on_tokens: Callable[[int, list[int]], None] | None = None  # the streaming hook (module docstring)
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def width(self) -> int:
        return max(len(r) for r in self.rows)


_solo = count()


def batch_key(params: SamplingParams) -> Hashable:
    """Requests with equal keys may share a generate call.

    Greedy decoding ignores temperature/top-p/top-k, so all greedy requests share one key. A seeded
    request runs alone: its random draws would otherwise depend on who it was batched with.
    """
    if params.seed is not None:
        return ("seeded", next(_solo))
    if not params.do_sample:
        return ("greedy", params.repetition_penalty)
    return ("sample", params.temperature, params.top_p, params.top_k, params.repetition_penalty)


class Batcher:
    """The queue and the one thread that runs `model.generate` for an engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        tokenizer_threads: int = 2,
        torch_threads: int | None = None,
    ) -> None:
        if max_batch_rows < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_rows and max_queue must be >= 1 and max_wait_s >= 0")
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._queue: deque[_Work] = deque()
        self._cond = threading.Condition()
        self._preparing = 0  # admitted requests still being tokenized: the batch may wait for them
        self._last_batch_requests = 0
        self._closed = False
        # Counters for tests and logs: generate calls run, and requests/rows they served.
        self.batches = 0
        self.batched_requests = 0
        self.dropped = 0
        self._pool = ThreadPoolExecutor(max_workers=tokenizer_threads, thread_name_prefix="tokenize")
        self.torch_threads = torch_threads if torch_threads is not None else default_torch_threads(engine)
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self._thread.start()

    # --- the caller's side (event loop) -------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests admitted and not yet generating (tokenizing or waiting in the queue)."""
        with self._cond:
            return len(self._queue) + self._preparing

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
        finally:
            with self._cond:
                self._preparing -= 1
        work = _Work(
            rows=rows,
            limits=[engine.row_limit(len(r), params) for r in rows],
            params=params,
            key=batch_key(params),
            loop=loop,
            future=loop.create_future(),
            on_tokens=on_tokens,
        )
        with self._cond:
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
                pass  # already taken into a batch: the stopping criterion sees the flag

    def close(self) -> None:
        """Stop taking work; queued callers get an error. The running batch finishes."""
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
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._generate(batch)

    def _next_batch(self) -> list[_Work] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # Linger only for requests known to be coming: ones being tokenized now, or the
            # previous batch's callers, whose next requests (closed-loop clients) arrive within a
            # few ms. With one client neither holds, so a lone request never waits.
            deadline = time.monotonic() + self.max_wait_s
            while not self._closed and self._rows_queued() < self.max_batch_rows:
                expected = self._preparing > 0 or len(self._queue) < self._last_batch_requests
                remaining = deadline - time.monotonic()
                if not expected or remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed or not self._queue:
                return None if self._closed else []
            batch = self._take()
            self._last_batch_requests = len(batch)
            return batch

    def _rows_queued(self) -> int:
        return sum(len(w.rows) for w in self._queue)

    def _take(self) -> list[_Work]:
        """The oldest request plus every queued request that fits beside it (FIFO order)."""
        first = self._queue.popleft()
        batch, rows = [first], len(first.rows)
        width, longest = first.width, max(first.limits)
        real = sum(len(r) for r in first.rows)
        context = self.engine.max_context
        for work in list(self._queue):
            if work.key != first.key or rows + len(work.rows) > self.max_batch_rows:
                continue
            new_width = max(width, work.width)
            # Alone, a request's rows get their full limit; beside a longer prompt the padded
            # batch must still leave room for every row's limit, or the request waits its turn.
            if new_width + max(longest, *work.limits) > context:
                continue
            # Every row is padded to the longest prompt, and prefill and attention pay for the
            # padding: a 500-token prompt would make seven 14-token ones cost 500 each. Cap the
            # padded tokens at PAD_FACTOR times the real ones (plus slack for short prompts).
            new_real = real + sum(len(r) for r in work.rows)
            if (rows + len(work.rows)) * new_width > PAD_FACTOR * new_real + PAD_SLACK_TOKENS:
                continue
            self._queue.remove(work)
            batch.append(work)
            rows += len(work.rows)
            width, longest, real = new_width, max(longest, *work.limits), new_real
        return batch

    def _generate(self, batch: list[_Work]) -> None:
        if not batch:
            return
        rows = [r for w in batch for r in w.rows]
        limits = [n for w in batch for n in w.limits]
        owners = [w for w in batch for _ in w.rows]

        def cancelled() -> list[bool]:
            return [w.cancelled for w in owners]

        started = time.perf_counter()
        try:
            new_ids = self.engine.generate_ids(rows, limits, batch[0].params, cancelled, _stream_to(batch))
        except BaseException as exc:  # handed to every caller of this batch, who re-raises it
            log.error("generate failed for a batch of %d requests: %s", len(batch), exc, exc_info=exc)
            for work in batch:
                _deliver(work, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.batched_requests += len(batch)
        log.debug("batch of %d requests, %d rows in %.0f ms", len(batch), len(rows), 1000 * (time.perf_counter() - started))
        start = 0
        for work in batch:
            _deliver(work, result=new_ids[start : start + len(work.rows)])
            start += len(work.rows)


def _stream_to(batch: list[_Work]) -> Callable[[list[int]], None] | None:
    """The engine's per-step callback, dispatching each row's new id to its request's on_tokens."""
    if not any(w.on_tokens for w in batch):
        return None
    targets = [(w, j, limit) for w in batch for j, limit in enumerate(w.limits)]
    sent = [0] * len(targets)

    def on_step(ids: list[int]) -> None:
        for i, ((work, row, limit), token) in enumerate(zip(targets, ids)):
            if work.on_tokens is not None and not work.cancelled and sent[i] < limit:
                sent[i] += 1
                work.on_tokens(row, [token])

    return on_step


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
