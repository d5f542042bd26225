"""Serve the gateway with uvicorn, draining on SIGTERM.

On the first SIGTERM/SIGINT the gateway turns not-ready and answers new requests with 503 while
the ones in flight finish (up to `drain_timeout_s`); then uvicorn shuts down and the process
exits 0. A second signal exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from tts_server.api.connections import ConnectionLimits, protocol_factory, raise_fd_limit
from tts_server.api.reliability import Admission, Readiness
from tts_server.settings import Settings

logger = logging.getLogger("tts_server.gateway")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.readiness: Readiness = app.state.gateway.readiness
        self.admission: Admission = app.state.gateway.admission
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.readiness.draining = True
            logger.info(
                "draining: %d requests running, %d queued (at most %g s)",
                self.admission.running,
                self.admission.queued,
                self.drain_timeout_s,
            )
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None:
            idle = self.admission.running == 0 and self.admission.queued == 0
            if idle or time.monotonic() - self.drain_started > self.drain_timeout_s:
                logger.info("drained; shutting down")
                return True
        return await super().on_tick(counter)


def connection_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options for slow clients: the guarded h11 protocol (head and body deadlines,
    the connection cap) and the idle keep-alive timeout."""
    limits = ConnectionLimits(
        head_timeout_s=settings.head_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    return {
        "http": protocol_factory(limits),
        # Typed int in uvicorn, but used as a float delay (call_later).
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }


def uvicorn_config(app: FastAPI, settings: Settings, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Access logs carry no prompt text, but keep them off by default like vLLM's flag.
        access_log=False,
        **{**connection_options(settings), **options},
    )


def serve(app: FastAPI, settings: Settings) -> None:
    if settings.max_connections:
        raise_fd_limit(settings.max_connections)
    config = uvicorn_config(app, settings, timeout_graceful_shutdown=5)
    DrainingServer(config, app, settings.drain_timeout_s).run()


def serve_workers(settings: Settings) -> None:
    """Several uvicorn worker processes on one port. Each builds its app from the environment,
    so the resolved settings go there; metrics go through PROMETHEUS_MULTIPROC_DIR."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="tts-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    for name, value in settings.model_dump(mode="json", exclude_unset=True).items():
        os.environ[f"TTS_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    logger.info("gateway: %d workers, metrics in %s", settings.workers, folder)
    if settings.max_connections:
        raise_fd_limit(settings.max_connections)  # inherited by the workers
    uvicorn.run(
        "tts_server.api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        **connection_options(settings),
    )
