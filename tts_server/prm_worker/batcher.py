"""Dynamic batching: concurrent score requests merged into one backend call.

Requests queue up; one worker task takes the oldest request, waits at most `batch_wait_s` (counted
from that request's arrival) for more until `max_batch_size` solutions are queued, and runs the
backend once, in a thread, on all of them. Each request gets its own slice back; a backend error
fails only the requests of that batch (500; 503 when the backend is unavailable), and a solution
the backend rejects fails only the request holding it (400). Requests arriving while a batch runs
form the next one.

Solutions already scored (same question, same steps) are answered from an LRU cache: search
strategies and retried requests send the same solutions again, and a PRM is deterministic.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tts_server.prm_worker import metrics
from tts_server.prm_worker.backends.base import (
    BackendUnavailable,
    ItemsRejected,
    PRMBackend,
    ScoreItem,
)

logger = logging.getLogger("tts_server.prm_worker")


class BatcherError(Exception):
    """A score request could not be served; `status` is the HTTP status to answer with, `param`
    the request field at fault."""

    status = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BackendFailure(BatcherError):
    status = 500


class Overloaded(BatcherError):
    status = 429


class Closed(BatcherError):
    status = 503


class Unavailable(BatcherError):
    status = 503


class Rejected(BatcherError):
    status = 400


@dataclass
class Scored:
    scores: list[list[float]]
    tokens: int
    steps_cached: int = 0


class ScoreCache:
    """Scores of whole solutions by a digest of (question, steps); oldest use evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._entries: OrderedDict[bytes, list[float]] = OrderedDict()

    @staticmethod
    def key(item: ScoreItem) -> bytes:
        question, steps = item
        text = json.dumps([question, list(steps)], ensure_ascii=False)
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def get(self, key: bytes) -> list[float] | None:
        scores = self._entries.get(key)
        if scores is not None:
            self._entries.move_to_end(key)
        return scores

    def put(self, key: bytes, scores: list[float]) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = scores
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        metrics.CACHE_ENTRIES.set(len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(eq=False)
class _Job:
    items: list[ScoreItem]
    future: asyncio.Future[Scored]
    indices: list[int]  # of the items in the request's solutions
    enqueued: float = field(default=0.0)


class ScoreBatcher:
    def __init__(
        self,
        backend: PRMBackend,
        *,
        max_batch_size: int = 64,
        batch_wait_s: float = 0.005,
        max_queued: int = 8192,
        cache_size: int = 4096,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_s)
        self.max_queued = max_queued
        self.backend_calls = 0
        self.cache = ScoreCache(cache_size)
        metrics.QUEUE_CAPACITY.set(max_queued)
        self._pending: deque[_Job] = deque()
        self._queued = 0  # solutions in `_pending`
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def score(self, items: Sequence[ScoreItem]) -> Scored:
        """Scores for every item; solutions without steps get [] and never reach the backend."""
        scores: list[list[float]] = [[] for _ in items]
        keys = {i: self.cache.key(item) for i, item in enumerate(items) if item[1]}
        work: list[int] = []
        steps_cached = 0
        for i, key in keys.items():
            cached = self.cache.get(key)
            if cached is None:
                work.append(i)
            else:
                scores[i] = list(cached)
                steps_cached += len(cached)
        metrics.STEPS_CACHED.inc(steps_cached)
        if not work:
            return Scored(scores, 0, steps_cached)
        if self._closed:
            raise Closed("the PRM worker is shutting down")
        if self._queued and self._queued + len(work) > self.max_queued:
            raise Overloaded(f"the PRM worker has over {self.max_queued} solutions queued")
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        job = _Job([(items[i][0], list(items[i][1])) for i in work], loop.create_future(), work)
        job.enqueued = loop.time()
        self._pending.append(job)
        self._queued += len(job.items)
        metrics.QUEUED.set(self._queued)
        self._wakeup.set()
        result = await job.future
        for i, row in zip(work, result.scores, strict=True):
            scores[i] = row
            self.cache.put(keys[i], list(row))
        return Scored(scores, result.tokens, steps_cached)

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail(list(self._pending), Closed("the PRM worker is shutting down"))
        self._pending.clear()
        self._queued = 0
        metrics.QUEUED.set(0)

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="prm-batcher")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].enqueued + self.batch_wait_s
            while self._queued < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._execute(batch)

    def _take(self) -> list[_Job]:
        """The oldest live requests, up to `max_batch_size` solutions (at least one request)."""
        batch: list[_Job] = []
        size = 0
        now = asyncio.get_running_loop().time()
        while self._pending:
            job = self._pending[0]
            if batch and not job.future.done() and size + len(job.items) > self.max_batch_size:
                break
            self._pending.popleft()
            self._queued -= len(job.items)
            if not job.future.done():  # done = its client went away
                batch.append(job)
                size += len(job.items)
                metrics.QUEUE_WAIT.observe(max(0.0, now - job.enqueued))
        metrics.QUEUED.set(self._queued)
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        items = [item for job in batch for item in job.items]
        self.backend_calls += 1
        metrics.BATCH_SIZE.observe(len(items))
        started = time.perf_counter()
        try:
            scores, tokens, rejected = await asyncio.to_thread(self._call_backend, items)
        except asyncio.CancelledError:
            self._fail(batch, Closed("the PRM worker is shutting down"))
            raise
        except BackendUnavailable as exc:
            logger.error("PRM backend unavailable for %d solutions: %s", len(items), exc)
            self._fail(batch, Unavailable(f"the PRM backend is unavailable: {exc}"))
            return
        except Exception as exc:
            # The type only: a message could carry prompt text.
            logger.error("PRM backend failed on %d solutions: %s", len(items), type(exc).__name__)
            logger.debug("PRM backend failure", exc_info=True)
            self._fail(batch, BackendFailure("the PRM backend failed to score this batch"))
            return
        finally:
            metrics.SCORING.observe(time.perf_counter() - started)
        metrics.STEPS_SCORED.inc(sum(len(row) for row in scores))
        metrics.TOKENS.inc(sum(tokens))
        offset = 0
        for job in batch:
            end = offset + len(job.items)
            bad = [k for k in range(len(job.items)) if offset + k in rejected]
            if job.future.done():
                pass
            elif bad:
                k, reason = job.indices[bad[0]], rejected[offset + bad[0]]
                error = Rejected(f"solution {k}: {reason}", param=f"solutions.{k}")
                job.future.set_exception(error)
            else:
                job.future.set_result(Scored(scores[offset:end], sum(tokens[offset:end])))
            offset = end

    def _call_backend(
        self, items: list[ScoreItem]
    ) -> tuple[list[list[float]], list[int], dict[int, str]]:
        """Runs in a worker thread: score, check the shape and range, count tokens. Also returns
        the rejected items' reasons by index (their rows are empty, their tokens 0)."""
        rejected: dict[int, str] = {}
        try:
            raw: Sequence[Sequence[float]] = self.backend.score_batch(items)
        except ItemsRejected as exc:
            raw, rejected = exc.scores, exc.reasons
        if len(raw) != len(items):
            raise ValueError(f"backend returned {len(raw)} score lists for {len(items)} items")
        scores: list[list[float]] = []
        for i, ((_, steps), row) in enumerate(zip(items, raw, strict=True)):
            values = [float(v) for v in row]
            if i in rejected:
                scores.append([])
                continue
            if len(values) != len(steps):
                raise ValueError(f"backend returned {len(values)} scores for {len(steps)} steps")
            if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
                raise ValueError("backend returned a score outside [0, 1]")
            scores.append(values)
        tokens = [0 if i in rejected else self.backend.count_tokens(x) for i, x in enumerate(items)]
        return scores, tokens, rejected

    @staticmethod
    def _fail(jobs: list[_Job], error: BatcherError) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
