"""The gateway's app factory: wires settings, clients and routes; the routes stay thin."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tts_server import metrics
from tts_server.api.bodies import (
    Kind,
    answer_text,
    finish_reason,
    response_headers,
    tts_object,
    usage_object,
)
from tts_server.api.errors import APIError, ClientGone, install_error_handlers
from tts_server.api.guard import Guard
from tts_server.api.schemas import ChatCompletionRequest, CompletionRequest, _Common
from tts_server.api.streaming import Chunks, stream_response
from tts_server.engine import (
    DeadlineExceeded,
    FlopsUnknown,
    Outcome,
    TokenizingPolicy,
    TTSEngine,
    Watch,
)
from tts_server.plan import (
    HEADER_MAX_FLOPS,
    Plan,
    resolve_deadline,
    resolve_max_flops,
    resolve_plan,
)
from tts_server.policy import PolicyError, VLLMPolicyClient
from tts_server.prm import HTTPPRMClient, PRMError
from tts_server.prompting import ProfileError, RenderedPrompt
from tts_server.reliability import Admission, KeyChecker, Readiness
from tts_server.settings import Settings
from tts_server.types import PRMClient

logger = logging.getLogger("tts_server.gateway")

# How often a running request checks that its client is still there.
DISCONNECT_POLL_S = 0.2


def create_app(
    settings: Settings | None = None,
    *,
    policy: TokenizingPolicy | None = None,
    prm: PRMClient | None = None,
) -> FastAPI:
    settings = settings or Settings()
    owned: list[Any] = []
    if policy is None:
        policy = VLLMPolicyClient(
            settings.policy_url,
            settings.policy_model,
            timeout=settings.policy_timeout_s,
            call_mode=settings.policy_call_mode,
        )
        owned.append(policy)
    if prm is None:
        prm = HTTPPRMClient(settings.prm_url, timeout=settings.prm_timeout_s)
        owned.append(prm)
    engine = TTSEngine(settings, policy, prm)
    readiness = Readiness(_health_of(policy), _health_of(prm), interval_s=settings.probe_interval_s)
    admission = Admission(settings.max_in_flight, settings.max_queue, settings.queue_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await readiness.probe_once()
        readiness.start()
        yield
        await readiness.stop()
        for client in owned:
            await client.aclose()

    app = FastAPI(title="tts-server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.readiness = readiness
    app.state.admission = admission
    install_error_handlers(app)
    app.add_middleware(
        Guard,
        keys=KeyChecker(settings.key_hashes),
        admission=admission,
        readiness=readiness,
        max_body_bytes=settings.max_body_bytes,
        metrics_require_key=settings.metrics_require_key,
    )

    @app.get("/health")
    @app.get("/health/live")
    async def health() -> dict[str, str]:
        """Liveness: the process answers. Upstream trouble never fails it (no restart loops)."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """Readiness: both upstreams answered the last probe and the server is not draining."""
        body = {
            "status": "ready" if readiness.ready else "not ready",
            "policy": "up" if readiness.policy_ok else "down",
            "prm": "up" if readiness.prm_ok else "down",
            "draining": readiness.draining,
        }
        return JSONResponse(body, status_code=200 if readiness.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.policy_model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "tts-server",
                }
            ],
        }

    async def render_chat(messages: list[dict[str, Any]]) -> RenderedPrompt:
        try:
            return await _guard(engine.render_chat(messages))
        except ProfileError as exc:
            raise APIError(500, f"prompt profile: {exc}", type_="server_error") from exc

    async def answer(
        request: Request,
        body: _Common,
        plan: Plan,
        max_tokens: int,
        kind: Kind,
        render: Callable[[], Awaitable[RenderedPrompt]],
    ) -> Response:
        """Run a validated request and answer it whole, or as a stream when it asks for one.
        The header checks come first and the prompt is rendered last: bad input costs no call."""
        max_flops = resolve_max_flops(request.headers, body.tts)
        deadline = resolve_deadline(request.headers, body.tts, settings.request_timeout_s)
        degraded = _check_upstreams(plan, readiness, settings)
        rendered = await render()
        _check_prompt_length(rendered, settings, "messages" if kind == "chat" else "prompt")

        def run(watch: Watch | None = None) -> Awaitable[Outcome]:
            return _run(
                engine,
                rendered,
                plan,
                body,
                max_tokens,
                settings,
                max_flops,
                deadline,
                degraded,
                watch,
            )

        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            if degraded is not None:  # the headers say what will run
                plan = dataclasses.replace(plan, strategy="majority")
            chunks = Chunks(kind, settings.policy_model, include_usage)
            return stream_response(
                request,
                plan,
                run,
                chunks,
                interval_s=settings.stream_progress_interval_s,
                poll_s=DISCONNECT_POLL_S,
                path=path,
            )
        outcome = await _until_disconnect(request, run())
        text = answer_text(outcome, kind)
        choice: dict[str, Any] = {"index": 0}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason(outcome.result.best.finish_reason)
        metrics.observe_answer(outcome, path, settings.policy_model)
        if kind == "chat":
            return _respond("chatcmpl", "chat.completion", choice, outcome, settings)
        return _respond("cmpl", "text_completion", choice, outcome, settings)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        plan, max_tokens = _validate(body, request, settings)
        prompt = body.prompt_text()
        if prompt is None:
            raise APIError(400, "exactly one prompt per request is supported", param="prompt")
        if not prompt.strip():
            raise APIError(400, "the prompt is empty", param="prompt")

        def render() -> Awaitable[RenderedPrompt]:
            return _guard(engine.render_completion(prompt))

        return await answer(request, body, plan, max_tokens, "text", render)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        plan, max_tokens = _validate(body, request, settings, token_limit=body.token_limit())
        messages = body.plain_messages()
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise APIError(400, "messages must contain a non-empty user message", param="messages")
        return await answer(request, body, plan, max_tokens, "chat", lambda: render_chat(messages))

    return app


def _validate(
    body: _Common, request: Request, settings: Settings, *, token_limit: int | None = None
) -> tuple[Plan, int]:
    if body.model != settings.policy_model:
        raise APIError(
            404,
            f"the model {body.model!r} does not exist; "
            f"this server serves {settings.policy_model!r}",
            param="model",
            code="model_not_found",
        )
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400, "stream_options is only allowed when stream is true", param="stream_options"
        )
    if body.n != 1:
        raise APIError(400, "n must be 1: use the tts budget to sample more candidates", param="n")
    stops = body.stop_list()
    if len(stops) > settings.max_stop_strings:
        raise APIError(400, f"at most {settings.max_stop_strings} stop strings", param="stop")
    if any(len(stop) > settings.max_stop_length for stop in stops):
        raise APIError(
            400, f"stop strings must be at most {settings.max_stop_length} characters", param="stop"
        )
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages", param="messages")
    plan = resolve_plan(request.headers, body.tts, settings)
    limit = token_limit if token_limit is not None else body.max_tokens
    max_tokens = limit or settings.default_max_tokens
    if max_tokens > settings.max_tokens_cap:
        param = "max_completion_tokens" if token_limit and not body.max_tokens else "max_tokens"
        raise APIError(400, f"{param} must be at most {settings.max_tokens_cap}", param=param)
    return plan, max_tokens


async def _guard(coro: Any) -> RenderedPrompt:
    try:
        rendered: RenderedPrompt = await coro
    except PolicyError as exc:
        raise APIError(
            exc.status, exc.message, param="messages" if exc.status == 400 else None
        ) from exc
    return rendered


async def _run(
    engine: TTSEngine,
    rendered: RenderedPrompt,
    plan: Plan,
    body: _Common,
    max_tokens: int,
    settings: Settings,
    max_flops: int | None,
    deadline_s: float,
    degraded: str | None,
    watch: Watch | None = None,
) -> Outcome:
    # The client's temperature, else the prompt profile's (tuned for its model), else the server's.
    temperature = next(
        t
        for t in (body.temperature, rendered.temperature, settings.default_temperature)
        if t is not None
    )
    try:
        return await engine.run(
            rendered,
            plan,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else 1.0,
            stops=body.stop_list(),
            seed=body.seed,
            max_flops=max_flops,
            deadline_s=deadline_s,
            degraded=degraded,
            watch=watch,
        )
    except FlopsUnknown as exc:
        raise APIError(400, str(exc), param=HEADER_MAX_FLOPS) from exc
    except DeadlineExceeded as exc:
        raise APIError(504, f"{exc} ({deadline_s:g} s)", code="deadline_exceeded") from exc
    except PolicyError as exc:
        raise APIError(exc.status, exc.message) from exc
    except PRMError as exc:
        status = 504 if exc.status == 504 else 502
        raise APIError(status, f"PRM worker: {exc}") from exc


def _health_of(client: object) -> Callable[[], Awaitable[bool]]:
    """The client's health probe; clients without one (test doubles) count as healthy."""
    probe = getattr(client, "health", None)
    if probe is not None:
        return cast(Callable[[], Awaitable[bool]], probe)

    async def healthy() -> bool:
        return True

    return healthy


def _check_upstreams(plan: Plan, readiness: Readiness, settings: Settings) -> str | None:
    """Fail fast while an upstream is down; with the PRM down, maybe degrade to majority vote."""
    if not readiness.policy_ok:
        raise APIError(503, "the policy server is unavailable; retry later", code="upstream_down")
    if plan.needs_prm and not readiness.prm_ok:
        if settings.degrade_to_majority:
            return "the PRM worker is unavailable: answered by majority vote"
        raise APIError(
            503,
            f"the PRM worker is unavailable, and strategy {plan.strategy!r} needs it; "
            "retry later or ask for 'majority'",
            code="upstream_down",
        )
    return None


def _check_prompt_length(rendered: RenderedPrompt, settings: Settings, param: str) -> None:
    if len(rendered.prompt_ids) > settings.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt is {len(rendered.prompt_ids)} tokens after templating; "
            f"at most {settings.max_prompt_tokens} are allowed",
            param=param,
            code="prompt_too_long",
        )


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


def _respond(
    prefix: str, obj: str, choice: dict[str, Any], outcome: Outcome, settings: Settings
) -> JSONResponse:
    body = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": settings.policy_model,
        "choices": [choice],
        "usage": usage_object(outcome),
        "tts": tts_object(outcome),
    }
    return JSONResponse(body, headers=response_headers(outcome.plan, outcome))
