"""Dynamic batching: concurrent score requests merged into one backend call.

Requests queue up; one worker task takes the oldest request, waits at most `batch_wait_s` (counted
from that request's arrival) for more until `max_batch_size` solutions are queued, and runs the
backend once, in a thread, on all of them. Each request gets its own slice back; a backend error
fails only the requests of that batch (500; 503 when the backend is unavailable), and a solution
the backend rejects fails only the request holding it (400). Requests arriving while a batch runs
form the next one.

Steps already scored (same question, same steps up to and including them) are answered from an
LRU cache of step scores by prefix: a search extends the same prefixes step after step, retried
requests send the same solutions again, and a PRM is deterministic. A request may also name, per
solution, leading steps it has scores for (`context`): those are read as context, not scored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tts_server.prefixes import PrefixScores, prefix_keys
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
    code: str | None = None

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


class TooLong(Rejected):
    """A solution over the PRM's context: OpenAI's code for it, so the gateway can tell its
    client what to lower."""

    code = "context_length_exceeded"


@dataclass
class Scored:
    scores: list[list[float]]
    tokens: int
    steps_cached: int = 0


class ScoreCache(PrefixScores):
    """Step scores by prefix (`prefix_keys`), `capacity` of them; its size is exported."""

    def put(self, keys: Sequence[bytes], scores: Sequence[float]) -> None:
        super().put(keys, scores)
        metrics.CACHE_ENTRIES.set(len(self))


@dataclass(eq=False)
class _Job:
    items: list[ScoreItem]
    first: list[int]  # per item, its first step to score (those before are context)
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
        cache_size: int = 65536,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_s)
        self.max_queued = max_queued
        self.backend_calls = 0
        self.cache = ScoreCache(max(0, cache_size))
        metrics.QUEUE_CAPACITY.set(max_queued)
        self._pending: deque[_Job] = deque()
        self._queued = 0  # solutions in `_pending`
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def score(
        self, items: Sequence[ScoreItem], context: Sequence[int] | None = None
    ) -> Scored:
        """Scores of every item's steps after its `context` (that many leading steps whose
        scores the caller has: they are read, not scored); items with no such step get []
        and never reach the backend, nor do steps the cache holds."""
        first = list(context) if context is not None else [0] * len(items)
        scores: list[list[float]] = [[] for _ in items]
        work: list[tuple[int, int, list[bytes]]] = []  # (item, first step to compute, its keys)
        steps_cached = 0
        for i, (question, steps) in enumerate(items):
            if first[i] >= len(steps):
                continue
            keys = prefix_keys(question, steps)
            known = self.cache.known(keys, first[i])
            steps_cached += len(known)
            scores[i] = known
            start = first[i] + len(known)
            if start < len(steps):
                work.append((i, start, keys))
        metrics.STEPS_CACHED.inc(steps_cached)
        if not work:
            return Scored(scores, 0, steps_cached)
        if self._closed:
            raise Closed("the PRM worker is shutting down")
        if self._queued and self._queued + len(work) > self.max_queued:
            raise Overloaded(f"the PRM worker has over {self.max_queued} solutions queued")
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        job = _Job(
            [(items[i][0], list(items[i][1])) for i, _, _ in work],
            [start for _, start, _ in work],
            loop.create_future(),
            [i for i, _, _ in work],
        )
        job.enqueued = loop.time()
        self._pending.append(job)
        self._queued += len(job.items)
        metrics.QUEUED.set(self._queued)
        self._wakeup.set()
        result = await job.future
        for (i, start, keys), row in zip(work, result.scores, strict=True):
            scores[i] = scores[i] + row
            self.cache.put(keys[start:], row)
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
        first = [start for job in batch for start in job.first]
        self.backend_calls += 1
        metrics.BATCH_SIZE.observe(len(items))
        started = time.perf_counter()
        try:
            scores, tokens, rejected, too_long = await asyncio.to_thread(
                self._call_backend, items, first
            )
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
                kind = TooLong if offset + bad[0] in too_long else Rejected
                error = kind(f"solution {k}: {reason}", param=f"solutions.{k}")
                job.future.set_exception(error)
            else:
                job.future.set_result(Scored(scores[offset:end], sum(tokens[offset:end])))
            offset = end

    def _call_backend(
        self, items: list[ScoreItem], first: list[int]
    ) -> tuple[list[list[float]], list[int], dict[int, str], frozenset[int]]:
        """Runs in a worker thread: score the steps from `first` on, check the shape and range,
        count tokens. Also returns the rejected items' reasons by index (their rows are empty,
        their tokens 0)."""
        rejected: dict[int, str] = {}
        too_long: frozenset[int] = frozenset()
        try:
            raw: Sequence[Sequence[float]] = self.backend.score_tails(items, first)
        except ItemsRejected as exc:
            raw, rejected, too_long = exc.scores, exc.reasons, exc.too_long
        if len(raw) != len(items):
            raise ValueError(f"backend returned {len(raw)} score lists for {len(items)} items")
        scores: list[list[float]] = []
        for i, ((_, steps), row) in enumerate(zip(items, raw, strict=True)):
            values = [float(v) for v in row]
            if i in rejected:
                scores.append([])
                continue
            if len(values) != len(steps) - first[i]:
                wanted = len(steps) - first[i]
                raise ValueError(f"backend returned {len(values)} scores for {wanted} steps")
            if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
                raise ValueError("backend returned a score outside [0, 1]")
            scores.append(values)
        tokens = [0 if i in rejected else self.backend.count_tokens(x) for i, x in enumerate(items)]
        return scores, tokens, rejected, too_long

    @staticmethod
    def _fail(jobs: list[_Job], error: BatcherError) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
