"""The PRM worker's HTTP app: `POST /v1/score`, `GET /health`, `GET /v1/models`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tts_server.prm_worker import metrics
from tts_server.prm_worker.backends.base import PRMBackend, ScoreItem
from tts_server.prm_worker.backends.veto import ArithVeto
from tts_server.prm_worker.batcher import BatcherError, ScoreBatcher
from tts_server.prm_worker.schemas import (
    ScoreLimits,
    ScoreRequest,
    ScoreResponse,
    WorkerError,
    validation_error,
)

logger = logging.getLogger("tts_server.prm_worker")


def create_app(
    backend: PRMBackend,
    *,
    max_batch_size: int = 64,
    batch_wait_s: float = 0.005,
    limits: ScoreLimits | None = None,
    max_queued: int = 8192,
    cache_size: int = 65536,
) -> FastAPI:
    score_limits = limits or ScoreLimits()
    batcher = ScoreBatcher(
        backend,
        max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_s,
        max_queued=max_queued,
        cache_size=cache_size,
    )
    metrics.INFO.labels(backend.name, backend.model_name).set(1)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.aclose()
        backend.close()

    app = FastAPI(
        title="tts-server PRM worker",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.backend = backend
    app.state.batcher = batcher
    _install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if request.url.path == "/v1/score":
            metrics.REQUESTS.labels(f"{response.status_code // 100}xx").inc()
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health() -> JSONResponse:
        # A backend in front of a model server is healthy only while that server is.
        ok = await asyncio.to_thread(backend.healthy)
        body: dict[str, str | None] = {"status": "ok" if ok else "unavailable"}
        body["backend"] = backend.name
        body["veto"] = "arith" if isinstance(backend, ArithVeto) else None
        return JSONResponse({**body, "model": backend.model_name}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": backend.model_name,
            "object": "model",
            "created": created,
            "parameters": backend.parameters,
        }
        return {"object": "list", "data": [{**card, "owned_by": f"prm-worker/{backend.name}"}]}

    @app.post("/v1/score")
    async def score(request: ScoreRequest) -> ScoreResponse:
        score_limits.check(request)
        items: list[ScoreItem] = [(request.question, steps) for steps in request.solutions]
        context = request.context_steps
        try:
            scored = await batcher.score(items, context)
        except BatcherError as exc:
            raise WorkerError(exc.status, str(exc), param=exc.param, code=exc.code) from exc
        return ScoreResponse(
            scores=scored.scores,
            model=backend.model_name,
            steps_scored=sum(len(row) for row in scored.scores),
            steps_cached=scored.steps_cached,
            tokens=scored.tokens,
        )

    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def on_worker_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, WorkerError)
        return exc.response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(list(exc.errors())).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return WorkerError(exc.status_code, str(exc.detail)).response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled %s in a request", type(exc).__name__)
        return WorkerError(500, "internal server error").response()

    app.add_exception_handler(WorkerError, on_worker_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
