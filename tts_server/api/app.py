"""The gateway's app factory: wires settings, clients, readiness, admission and the engine to
the routes. No request logic here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tts_server.api import metrics
from tts_server.api.errors import install_error_handlers
from tts_server.api.guard import Guard
from tts_server.api.inspector import router as inspector_router
from tts_server.api.keys_file import load_keys_file
from tts_server.api.quota_store import QuotaStore, RedisStore
from tts_server.api.quotas import Quotas
from tts_server.api.reliability import Admission, KeyChecker, Readiness
from tts_server.api.routes import Gateway, router
from tts_server.api.trace_store import TraceStore
from tts_server.clients import HTTPPRMClient, RetryPolicy, SessionRelease, VLLMPolicyClient
from tts_server.engine import TTSEngine
from tts_server.prompting import load_profile
from tts_server.router import load_table
from tts_server.settings import Settings
from tts_server.traces import TraceSink
from tts_server.types import PolicyService, PRMService

logger = logging.getLogger("tts_server.gateway")


def create_app(
    settings: Settings | None = None,
    *,
    policy: PolicyService | None = None,
    prm: PRMService | None = None,
    sessions: SessionRelease | None = None,
) -> FastAPI:
    """The gateway over `policy` and `prm`, releasing affinity sessions through `sessions` (each
    built from settings when not given; the app then closes them on shutdown). A bad prompt
    profile or router table fails here, at start."""
    settings = settings or Settings()
    # What can be wrong in the configuration fails first, before any client is opened.
    profile = load_profile(settings.profile_for(settings.policy_model))
    table = load_table(settings.router_table) if settings.router_table is not None else None
    owned: list[PolicyService | PRMService] = []
    retry = RetryPolicy(
        settings.upstream_retries, settings.retry_backoff_s, settings.retry_backoff_cap_s
    )
    if policy is None:
        policy = VLLMPolicyClient(
            settings.policy_url,
            settings.policy_model,
            timeout=settings.policy_timeout_s,
            call_mode=settings.policy_call_mode,
            retry=retry,
            affinity_header=settings.affinity_header,
        )
        owned.append(policy)
    if prm is None:
        prm = HTTPPRMClient(
            settings.prm_url,
            timeout=settings.prm_timeout_s,
            retry=retry,
            affinity_header=settings.affinity_header,
        )
        owned.append(prm)
    release = None
    if sessions is None and settings.affinity_header and settings.affinity_release_url:
        release = sessions = SessionRelease(
            settings.affinity_release_url,
            timeout_s=settings.affinity_release_timeout_s,
            on_outcome=metrics.observe_release,
        )
    per_key = load_keys_file(settings.api_keys_file) if settings.api_keys_file else {}
    quotas_keys = list(per_key)
    store: QuotaStore | None = None
    if settings.redis_url:
        store = RedisStore(settings.redis_url, settings.redis_timeout_s)
    quotas = Quotas(settings.quota_defaults, per_key, store, fail_open=settings.quota_fail_open)
    readiness = Readiness(policy.health, prm.health, interval_s=settings.probe_interval_s)
    admission = Admission(settings.max_in_flight, settings.max_queue, settings.queue_timeout_s)
    engine = TTSEngine(settings, policy, prm, readiness, profile, table)
    traces = None
    if settings.trace_dir is not None and settings.trace_mode != "off":
        traces = TraceSink(
            settings.trace_dir,
            max_file_bytes=settings.trace_max_file_bytes,
            queue_size=settings.trace_queue_size,
            on_outcome=metrics.observe_trace,
        )

    async def announce_table() -> None:
        # Say at start which router table `auto` serves and why (engine.router_table logs it
        # once it is chosen), as soon as the upstreams can tell the policy's size and the PRM.
        while not engine.table_chosen:
            if readiness.ready:
                try:
                    await engine.router_table()
                except Exception as exc:  # the first `auto` request will try again
                    logger.warning("router table not chosen yet: %s", type(exc).__name__)
            if not engine.table_chosen:
                await asyncio.sleep(settings.probe_interval_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        announcing: asyncio.Task[None] | None = None
        try:
            await readiness.probe_once()
            readiness.start()
            announcing = asyncio.get_running_loop().create_task(announce_table())
            yield
        finally:
            if announcing is not None:
                announcing.cancel()
                await asyncio.gather(announcing, return_exceptions=True)
            await readiness.stop()
            for client in owned:
                await client.aclose()
            if release is not None:
                await release.aclose()
            await quotas.aclose()
            if traces is not None:  # what is queued is written (bounded), off the event loop
                await asyncio.to_thread(traces.close)

    app = FastAPI(title="tts-server", version="0.1.0", lifespan=lifespan)
    recent = (
        TraceStore(
            settings.inspector_max_traces,
            settings.inspector_max_age_s,
            settings.inspector_max_bytes,
        )
        if settings.inspector
        else None
    )
    app.state.gateway = Gateway(settings, engine, readiness, admission, sessions, traces, recent)
    app.state.quotas = quotas
    install_error_handlers(app)
    app.add_middleware(
        Guard,
        keys=KeyChecker([*settings.key_hashes, *quotas_keys]),
        admission=admission,
        readiness=readiness,
        max_body_bytes=settings.max_body_bytes,
        metrics_require_key=settings.metrics_require_key,
        quotas=quotas,
    )
    app.include_router(router)
    if settings.inspector:
        app.include_router(inspector_router)
    return app
