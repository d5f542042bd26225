"""The gateway's app factory: wires settings, clients and routes; the routes stay thin."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tts_server import metrics
from tts_server.api.errors import APIError, install_error_handlers
from tts_server.api.schemas import ChatCompletionRequest, CompletionRequest, _Common
from tts_server.engine import FlopsUnknown, Outcome, TokenizingPolicy, TTSEngine
from tts_server.plan import (
    HEADER_BUDGET,
    HEADER_DIFFICULTY,
    HEADER_MAX_FLOPS,
    HEADER_ROUTED,
    HEADER_STRATEGY,
    STRATEGY_NAMES,
    Plan,
    resolve_max_flops,
    resolve_plan,
)
from tts_server.policy import PolicyError, VLLMPolicyClient
from tts_server.prm import HTTPPRMClient, PRMError
from tts_server.prompting import ProfileError, RenderedPrompt
from tts_server.settings import Settings
from tts_server.types import PRMClient

logger = logging.getLogger("tts_server.gateway")

MAX_STOP_STRINGS = 4
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
STRATEGY_LABELS = frozenset(("auto", *STRATEGY_NAMES))


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

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for client in owned:
            await client.aclose()

    app = FastAPI(title="tts-server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Any:
        endpoint = request.url.path
        if endpoint not in ENDPOINTS:
            return await call_next(request)
        metrics.IN_FLIGHT.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.IN_FLIGHT.dec()
        # The echoed strategy on success; otherwise the asked one if valid (bounded labels).
        strategy = response.headers.get(HEADER_STRATEGY) or request.headers.get(HEADER_STRATEGY)
        strategy = strategy if strategy in STRATEGY_LABELS else "unknown"
        metrics.REQUESTS.labels(
            endpoint, strategy, metrics.status_class(response.status_code)
        ).inc()
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse:
        plan, max_tokens = _validate(body, request, settings)
        prompt = body.prompt_text()
        if prompt is None:
            raise APIError(400, "exactly one prompt per request is supported", param="prompt")
        if not prompt.strip():
            raise APIError(400, "the prompt is empty", param="prompt")
        max_flops = resolve_max_flops(request.headers, body.tts)
        rendered = await _guard(engine.render_completion(prompt))
        outcome = await _run(engine, rendered, plan, body, max_tokens, settings, max_flops)
        best = outcome.result.best
        choice = {
            "index": 0,
            "text": best.text,
            "logprobs": None,
            "finish_reason": _finish(best.finish_reason),
        }
        metrics.observe_answer(outcome, "/v1/completions", settings.policy_model)
        return _respond("cmpl", "text_completion", choice, outcome, settings)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse:
        plan, max_tokens = _validate(body, request, settings, token_limit=body.token_limit())
        messages = body.plain_messages()
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise APIError(400, "messages must contain a non-empty user message", param="messages")
        max_flops = resolve_max_flops(request.headers, body.tts)
        try:
            rendered = await _guard(engine.render_chat(messages))
        except ProfileError as exc:
            raise APIError(500, f"prompt profile: {exc}", type_="server_error") from exc
        outcome = await _run(engine, rendered, plan, body, max_tokens, settings, max_flops)
        best = outcome.result.best
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": best.text.strip()},
            "logprobs": None,
            "finish_reason": _finish(best.finish_reason),
        }
        metrics.observe_answer(outcome, "/v1/chat/completions", settings.policy_model)
        return _respond("chatcmpl", "chat.completion", choice, outcome, settings)

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
    if body.stream:
        raise APIError(400, "streaming is not supported yet; send stream=false", param="stream")
    if body.n != 1:
        raise APIError(400, "n must be 1: use the tts budget to sample more candidates", param="n")
    if len(body.stop_list()) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
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
) -> Outcome:
    temperature = body.temperature if body.temperature is not None else settings.default_temperature
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
        )
    except FlopsUnknown as exc:
        raise APIError(400, str(exc), param=HEADER_MAX_FLOPS) from exc
    except PolicyError as exc:
        raise APIError(exc.status, exc.message) from exc
    except PRMError as exc:
        raise APIError(502, f"PRM worker: {exc}") from exc


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _respond(
    prefix: str, obj: str, choice: dict[str, Any], outcome: Outcome, settings: Settings
) -> JSONResponse:
    result, plan = outcome.result, outcome.plan
    usage = result.policy_usage
    body = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": settings.policy_model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        },
        "tts": {
            "strategy": plan.strategy,
            "requested_strategy": plan.requested,
            "budget": plan.budget,
            "beam_width": plan.beam_width,
            "aggregation": plan.aggregation,
            "selection": plan.selection,
            "answer": result.answer,
            "votes": result.votes,
            "num_candidates": len(result.candidates),
            "candidates_answers": [c.answer for c in result.candidates],
            "candidate_scores": [c.score for c in result.candidates],
            "iterations": result.iterations,
            "policy_tokens": {
                "prompt": usage.prompt_tokens,
                "completion": usage.completion_tokens,
                "cached": usage.cached_tokens,
                "calls": usage.calls,
                "requests": usage.requests,
            },
            "prm": {
                "calls": result.prm_usage.calls,
                "steps_scored": result.prm_usage.steps_scored,
                "steps_cached": result.prm_usage.steps_cached,
                "tokens": result.prm_usage.tokens,
            },
            "flops": outcome.flops.as_dict() if outcome.flops else None,
            "max_flops": outcome.max_flops,
            "flops_limited": outcome.flops_limited,
            "difficulty": outcome.difficulty.as_dict() if outcome.difficulty else None,
            "route": dataclasses.asdict(outcome.route) if outcome.route else None,
            "wall_time_s": round(outcome.wall_time_s, 4),
            "stage_seconds": {k: round(v, 4) for k, v in outcome.stages.items()},
        },
    }
    headers = {HEADER_STRATEGY: plan.strategy, HEADER_BUDGET: str(plan.budget)}
    if outcome.difficulty is not None:
        headers[HEADER_DIFFICULTY] = outcome.difficulty.bin
    if outcome.route is not None:
        headers[HEADER_ROUTED] = outcome.route.strategy
    return JSONResponse(body, headers=headers)
