"""`stream: true`: Server-Sent Events in OpenAI's chunk format, honest about what a search knows.

A search has no answer before it has chosen one. While the strategy runs, the stream carries, every
`stream_progress_interval_s`, a chunk with an empty delta whose `tts.progress` says what the search
has done so far (finished candidates, completion tokens, PRM steps scored, the router's decision),
or a keep-alive comment when nothing changed. The chosen answer then comes as one content chunk
(never typed out piece by piece after the fact; with `n`, every choice's text in that one chunk,
each under its `index`), then the finishing chunk with every choice's `finish_reason` and the
whole `tts` object, the usage chunk when `stream_options.include_usage` asks for it, and
`data: [DONE]`. A failure after the headers went out is an `error` event, as vLLM sends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from tts_server.api import metrics
from tts_server.api.errors import ENGINE_ERRORS, APIError, error_body, from_engine
from tts_server.api.protocol_report import TTSProgress
from tts_server.api.protocol_responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    Delta,
    ToolCall,
    ToolCallDelta,
)
from tts_server.api.responses import (
    ENDPOINTS,
    Kind,
    answer_logprobs,
    finish_reason,
    response_headers,
    tool_call,
    tts_report,
    usage_of,
)
from tts_server.engine import Outcome, Watch
from tts_server.types import Job

logger = logging.getLogger("tts_server.gateway")

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def _event(body: BaseModel) -> bytes:
    # json.dumps, not model_dump_json: the same bytes as before the models (ASCII escapes,
    # Python's float repr), so a client sees no difference.
    return b"data: " + json.dumps(body.model_dump(), separators=(",", ":")).encode() + b"\n\n"


class Chunks:
    """The chunks of one streamed response (`chat.completion.chunk` with a delta, or
    `text_completion` with a text piece), all with the same id and creation time."""

    def __init__(self, kind: Kind, model: str, include_usage: bool) -> None:
        self.endpoint = ENDPOINTS[kind]
        self.model = model
        self.include_usage = include_usage
        self.id = self.endpoint.new_id()
        self.created = int(time.time())

    def _chunk(self, choices: list[BaseModel], **sparse: Any) -> bytes:
        """One chunk; `sparse` sets the keys left out unless set (`usage`, `tts`)."""
        if self.include_usage:
            sparse.setdefault("usage", None)  # OpenAI: null on every chunk but the last
        chunk = self.endpoint.chunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **sparse
        )
        return _event(chunk)

    def opening(self) -> bytes | None:
        choice = self.endpoint.chunk.opening()
        return None if choice is None else self._chunk([choice])

    def progress(self, seen: dict[str, Any], nodes: list[dict[str, Any]]) -> bytes:
        tts = TTSProgress(progress=seen, nodes=nodes) if nodes else TTSProgress(progress=seen)
        return self._chunk([self.endpoint.chunk.choice(None)], tts=tts)

    def _calls(self, outcome: Outcome) -> list[ToolCall | None]:
        chat = self.endpoint.chunk is ChatCompletionChunk
        return [tool_call(outcome, c) if chat else None for c in outcome.selected]

    def answer(self, outcome: Outcome) -> bytes:
        """Every choice's whole text (or its tool call), in one chunk."""
        chunk = self.endpoint.chunk
        choices: list[BaseModel] = []
        for i, (candidate, call) in enumerate(
            zip(outcome.selected, self._calls(outcome), strict=True)
        ):
            if call is None:
                text = self.endpoint.answer_text(candidate)
                choices.append(chunk.first_of(text, i, answer_logprobs(outcome, candidate)))
                continue
            # Only greedy answers a call: one choice, whose role the opening chunk gave.
            delta = Delta(tool_calls=[ToolCallDelta(id=call.id, function=call.function)])
            choices.append(ChatChunkChoice(index=i, delta=delta, finish_reason=None))
        return self._chunk(choices)

    def finish(self, outcome: Outcome, trace: dict[str, Any] | None = None) -> bytes:
        """Every choice's finish reason, in one chunk with the `tts` report (and the search
        trace, when asked)."""
        choices = [
            self.endpoint.chunk.choice(
                None, "tool_calls" if call is not None else finish_reason(c.finish_reason), i
            )
            for i, (c, call) in enumerate(zip(outcome.selected, self._calls(outcome), strict=True))
        ]
        return self._chunk(choices, tts=tts_report(outcome, trace))

    def usage(self, outcome: Outcome) -> bytes:
        return self._chunk([], usage=usage_of(outcome))


async def _events(
    request: Request,
    run: Callable[[Watch], Awaitable[Outcome]],
    chunks: Chunks,
    interval_s: float,
    poll_s: float,
    on_end: Callable[[], None] | None = None,
    on_answer: Callable[[Outcome, str], dict[str, Any] | None] | None = None,
) -> AsyncIterator[bytes]:
    watch = Watch()
    task = asyncio.ensure_future(run(watch))
    try:
        opening = chunks.opening()
        if opening is not None:
            yield opening
        due, last = time.monotonic() + interval_s, watch.snapshot()
        while not task.done():
            await asyncio.wait({task}, timeout=min(poll_s, interval_s))
            if task.done():
                break
            if await request.is_disconnected():
                return  # the `finally` cancels the search and its upstream calls
            if time.monotonic() >= due:
                seen, nodes = watch.snapshot(), watch.nodes()
                moved = seen != last and any(seen.values())  # all zero: nothing to tell yet
                yield chunks.progress(seen, nodes) if moved or nodes else KEEP_ALIVE
                due, last = time.monotonic() + interval_s, seen
        try:
            outcome = task.result()
        except ENGINE_ERRORS as exc:
            yield _event(error_body(from_engine(exc)))
            yield DONE
            return
        except Exception as exc:  # headers are out: the client can only learn of it here
            # The type only: the message could carry prompt text.
            logger.error("unhandled %s in a streamed request", type(exc).__name__)
            yield _event(error_body(APIError(500, "internal server error", type_="server_error")))
            yield DONE
            return
        # Answered: whatever happens to the stream from here. The trace, when asked, comes back.
        trace = on_answer(outcome, chunks.id) if on_answer is not None else None
        yield chunks.answer(outcome)
        yield chunks.finish(outcome, trace)
        if chunks.include_usage:
            yield chunks.usage(outcome)
        yield DONE
        metrics.observe_answer(outcome, chunks.endpoint.path, chunks.model)
    finally:
        if not task.done():  # the client left, or this response was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if on_end is not None:  # the search is over, its upstream calls closed
            on_end()


def stream_response(
    request: Request,
    job: Job,
    run: Callable[[Watch], Awaitable[Outcome]],
    *,
    kind: Kind,
    model: str,
    include_usage: bool,
    interval_s: float,
    poll_s: float,
    on_end: Callable[[], None] | None = None,
    on_answer: Callable[[Outcome, str], dict[str, Any] | None] | None = None,
) -> StreamingResponse:
    """The response for a prepared `job`: its headers say what will run (known before it runs).
    `on_end` is called once the stream is over, however it ended; `on_answer` with the outcome
    and the response id once the search has answered (it returns the search trace for the
    finishing chunk when the request asked for one)."""
    chunks = Chunks(kind, model, include_usage)
    headers = {**response_headers(job), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        _events(request, run, chunks, interval_s, poll_s, on_end, on_answer),
        media_type="text/event-stream",
        headers=headers,
    )
