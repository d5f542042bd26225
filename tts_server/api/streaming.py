"""`stream: true`: Server-Sent Events in OpenAI's chunk format, honest about what a search knows.

A search has no answer before it has chosen one. While the strategy runs, the stream carries, every
`stream_progress_interval_s`, a chunk with an empty delta whose `tts.progress` says what the search
has done so far (finished candidates, completion tokens, PRM steps scored, the router's decision),
or a keep-alive comment when nothing changed. The chosen answer then comes as one content chunk
(never typed out piece by piece after the fact), then the finishing chunk with `finish_reason` and
the whole `tts` object, the usage chunk when `stream_options.include_usage` asks for it, and
`data: [DONE]`. A failure after the headers went out is an `error` event, as vLLM sends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from tts_server.api import metrics
from tts_server.api.errors import ENGINE_ERRORS, APIError, error_body, from_engine
from tts_server.api.responses import (
    Kind,
    answer_text,
    finish_reason,
    response_headers,
    tts_object,
    usage_object,
)
from tts_server.engine import Outcome, Watch
from tts_server.types import Job

logger = logging.getLogger("tts_server.gateway")

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class Chunks:
    """The chunks of one streamed response: chat (`chat.completion.chunk`, a delta) or text
    (`text_completion`, a text piece), all with the same id and creation time."""

    def __init__(self, kind: Kind, model: str, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _body(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return body

    def chunk(
        self,
        *,
        content: str | None = None,
        role: bool = False,
        finish: str | None = None,
        tts: dict[str, Any] | None = None,
    ) -> bytes:
        choice: dict[str, Any]
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
        body = self._body([choice])
        if tts is not None:
            body["tts"] = tts
        return _event(body)

    def usage(self, outcome: Outcome) -> bytes:
        body = self._body([])
        body["usage"] = usage_object(outcome)
        return _event(body)


async def _events(
    request: Request,
    run: Callable[[Watch], Awaitable[Outcome]],
    chunks: Chunks,
    interval_s: float,
    poll_s: float,
    path: str,
) -> AsyncIterator[bytes]:
    watch = Watch()
    task = asyncio.ensure_future(run(watch))
    try:
        if chunks.kind == "chat":
            yield chunks.chunk(role=True, content="")  # OpenAI opens with the role
        due, last = time.monotonic() + interval_s, watch.snapshot()
        while not task.done():
            await asyncio.wait({task}, timeout=min(poll_s, interval_s))
            if task.done():
                break
            if await request.is_disconnected():
                return  # the `finally` cancels the search and its upstream calls
            if time.monotonic() >= due:
                seen = watch.snapshot()
                moved = seen != last and any(seen.values())  # all zero: nothing to tell yet
                yield chunks.chunk(tts={"progress": seen}) if moved else KEEP_ALIVE
                due, last = time.monotonic() + interval_s, seen
        try:
            outcome = task.result()
        except ENGINE_ERRORS as exc:
            yield _event(error_body(from_engine(exc)).model_dump())
            yield DONE
            return
        except Exception as exc:  # headers are out: the client can only learn of it here
            # The type only: the message could carry prompt text.
            logger.error("unhandled %s in a streamed request", type(exc).__name__)
            yield _event(
                error_body(
                    APIError(500, "internal server error", type_="server_error")
                ).model_dump()
            )
            yield DONE
            return
        yield chunks.chunk(content=answer_text(outcome, chunks.kind))
        best = outcome.result.best
        yield chunks.chunk(finish=finish_reason(best.finish_reason), tts=tts_object(outcome))
        if chunks.include_usage:
            yield chunks.usage(outcome)
        yield DONE
        metrics.observe_answer(outcome, path, chunks.model)
    finally:
        if not task.done():  # the client left, or this response was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


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
    path: str,
) -> StreamingResponse:
    """The response for a prepared `job`: its headers say what will run (known before it runs)."""
    chunks = Chunks(kind, model, include_usage)
    headers = {**response_headers(job), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        _events(request, run, chunks, interval_s, poll_s, path),
        media_type="text/event-stream",
        headers=headers,
    )
