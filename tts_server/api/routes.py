"""The gateway's routes, thin: options -> Job (`options`), prepare and run it (`engine`), answer
whole or streamed (`responses`, `streaming`). Errors raised on the way are answered by the
handlers in `errors`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from tts_server.affinity import Affinity
from tts_server.api import metrics
from tts_server.api.errors import ENGINE_ERRORS, APIError, ClientGone, from_engine
from tts_server.api.guard import IDENTITY, SPENDING
from tts_server.api.options import resolve_job
from tts_server.api.protocol import ChatCompletionRequest, CompletionRequest
from tts_server.api.protocol_responses import ModelCard, ModelList
from tts_server.api.quotas import Spending
from tts_server.api.reliability import Admission, Readiness
from tts_server.api.responses import ENDPOINTS, Kind, completion, response_headers
from tts_server.api.streaming import stream_response
from tts_server.api.trace_store import TraceStore
from tts_server.clients import SessionRelease
from tts_server.engine import Outcome, TTSEngine
from tts_server.prompting import RenderedPrompt
from tts_server.search_trace import TraceLimits, search_trace
from tts_server.settings import Settings
from tts_server.traces import TraceSink, trace_record

logger = logging.getLogger("tts_server.gateway")

# How often a running request checks that its client is still there.
DISCONNECT_POLL_S = 0.2

router = APIRouter()


@dataclass(frozen=True)
class Gateway:
    """What the routes need, built once by the app factory (`app.state.gateway`)."""

    settings: Settings
    engine: TTSEngine
    readiness: Readiness
    admission: Admission  # the guard's; the draining server (api/serve.py) reads it
    # Releases a finished request's affinity keys at the router (None: not configured).
    sessions: SessionRelease | None = None
    # Writes search traces (None: TTS_TRACE_DIR unset).
    traces: TraceSink | None = None
    # The inspector's recent traces (None: TTS_INSPECTOR off).
    store: TraceStore | None = None

    def answered(
        self,
        outcome: Outcome,
        rendered: RenderedPrompt,
        kind: Kind,
        request_id: str,
        owner: str,
    ) -> dict[str, Any] | None:
        """Once a request is answered: its trace exported (when asked) and kept for the
        inspector (when on), each built once; returns the trace for the response when the
        request asked for it (`tts.return_trace`)."""
        self.trace(outcome, rendered, kind, request_id)
        if not outcome.job.return_trace and self.store is None:
            return None
        settings = self.settings
        limits = TraceLimits(settings.trace_max_nodes, settings.trace_max_text_chars)
        trace = search_trace(outcome, limits)
        if self.store is not None:
            self.store.put(request_id, owner, ENDPOINTS[kind].path, trace)
        return trace if outcome.job.return_trace else None

    def trace(
        self, outcome: Outcome, rendered: RenderedPrompt, kind: Kind, request_id: str
    ) -> None:
        """Queue an answered request's trace when it asked for one (or the server traces all);
        never raising: a trace is never worth a failed answer."""
        if self.traces is None or not outcome.job.trace:
            return
        try:
            record = trace_record(
                outcome,
                rendered,
                request_id=request_id,
                endpoint=ENDPOINTS[kind].path,
                model=self.settings.policy_model,
                include_prompt=self.settings.trace_prompts,
                max_nodes=self.settings.trace_max_nodes,
            )
        except Exception as exc:  # the type only: a message could hold prompt text
            logger.error("trace export: cannot build a record (%s)", type(exc).__name__)
            return
        self.traces.submit(record)

    def release(self, affinity: Affinity | None) -> None:
        """Once a request is over, however it ended: in the background, never raising."""
        if affinity is None:
            return
        keys = self.engine.end_affinity(affinity)
        metrics.observe_pins(self.engine.pins.held)
        if self.sessions is not None:
            self.sessions.release(keys)


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


@router.get("/health")
@router.get("/health/live")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Upstream trouble never fails it (no restart loops)."""
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: both upstreams answered the last probe and the server is not draining."""
    readiness = _gateway(request).readiness
    body = {
        "status": "ready" if readiness.ready else "not ready",
        "policy": "up" if readiness.policy_ok else "down",
        "prm": "up" if readiness.prm_ok else "down",
        "draining": readiness.draining,
    }
    return JSONResponse(body, status_code=200 if readiness.ready else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    model = _gateway(request).settings.policy_model
    return ModelList(data=[ModelCard(id=model, created=0, owned_by="tts-server")])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _answer(request, body, "text")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _answer(request, body, "chat")


async def _answer(
    request: Request, body: CompletionRequest | ChatCompletionRequest, kind: Kind
) -> Response:
    """Resolve, prepare and run the job, and answer it whole or as a stream. Everything that can
    refuse it (options, upstream health, the prompt) is checked before a generation is paid for
    and before a stream's headers go out."""
    gateway = _gateway(request)
    engine, model = gateway.engine, gateway.settings.policy_model
    job = resolve_job(
        body, request.headers, gateway.settings, profile_temperature=engine.profile.temperature
    )
    owner: str = request.scope.get(IDENTITY, "")
    spending: Spending | None = request.scope.get(SPENDING)
    on_spend = spending.spend if spending is not None else None
    left = spending.flops_left if spending is not None else None
    if left is not None and (job.max_flops is None or job.max_flops > left):
        job = dataclasses.replace(job, max_flops=left)  # the key's FLOPs budget is the ceiling
    affinity = engine.new_affinity(job)
    metrics.observe_pins(engine.pins.held)
    streaming = False  # a stream releases the pin itself, when it ends
    try:
        try:
            job, rendered = await engine.prepare(job, affinity)
        except ENGINE_ERRORS as exc:
            raise from_engine(exc, prompt_param=ENDPOINTS[kind].prompt_param) from exc
        if spending is not None and left is not None:
            counter = await engine.flops_counter()  # known: prepare checked the ceiling
            # Its first call at the least: the prompt and one token for each of its samples.
            least = counter.worst_case_generate([len(rendered.prompt_ids)], 1, samples=job.budget)
            refused = spending.refuse_flops(least)
            if refused is not None:
                raise APIError(
                    429,
                    refused.message,
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(refused.retry_after_s)},
                )
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            response = stream_response(
                request,
                job,
                lambda watch: engine.run(job, rendered, watch, affinity, on_spend),
                kind=kind,
                model=model,
                include_usage=include_usage,
                interval_s=gateway.settings.stream_progress_interval_s,
                poll_s=DISCONNECT_POLL_S,
                on_end=lambda: gateway.release(affinity),
                on_answer=lambda outcome, rid: gateway.answered(
                    outcome, rendered, kind, rid, owner
                ),
            )
            streaming = True
            return response
        outcome = await _until_disconnect(
            request, engine.run(job, rendered, None, affinity, on_spend)
        )
    finally:
        if not streaming:
            gateway.release(affinity)
    metrics.observe_answer(outcome, ENDPOINTS[kind].path, model)
    request_id = ENDPOINTS[kind].new_id()
    trace = gateway.answered(outcome, rendered, kind, request_id, owner)
    answer = completion(outcome, kind, model, trace, request_id=request_id).model_dump()
    return JSONResponse(answer, headers=response_headers(job, outcome))


async def _until_disconnect(request: Request, work: Awaitable[Outcome]) -> Outcome:
    """Run `work`, cancelling it (and so every upstream call) when the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientGone
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
