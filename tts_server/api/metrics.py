"""Every Prometheus metric the gateway exports, in one place.

Labels are bounded: endpoint, strategy (incl. `auto`), routed strategy, difficulty bin
(`none` for fixed strategies), policy model (one per gateway), status class. Never a prompt, a
user or a request id. With several uvicorn workers, set PROMETHEUS_MULTIPROC_DIR (an empty folder)
and `/metrics` aggregates the workers' files.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from tts_server.engine import Outcome

# 1e9 .. 1e17 FLOPs, a bucket per half decade: a 135M model's short answer to a 70B search.
FLOPS_BUCKETS = tuple(10 ** (9 + k / 2) for k in range(17))
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "tts_requests",
    "Requests answered, by endpoint, requested strategy and status class.",
    ["endpoint", "strategy", "status"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "tts_requests_in_flight",
    "Requests being served.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
LATENCY = Histogram(
    "tts_request_duration_seconds",
    "End-to-end latency of answered requests.",
    ["endpoint", "strategy"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STAGE_LATENCY = Histogram(
    "tts_stage_duration_seconds",
    "Seconds per request spent in a stage: pilot (auto), generation (policy calls), prm_scoring "
    "(PRM calls), selection (the rest: selection, aggregation, bookkeeping).",
    ["stage", "strategy"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
_ANSWER_LABELS = ["strategy", "model", "difficulty"]
FLOPS_POLICY = Histogram(
    "tts_answer_policy_flops",
    "Policy FLOPs per answer (2 x parameters x tokens computed).",
    _ANSWER_LABELS,
    buckets=FLOPS_BUCKETS,
    registry=REGISTRY,
)
FLOPS_PRM = Histogram(
    "tts_answer_prm_flops",
    "PRM FLOPs per answer.",
    _ANSWER_LABELS,
    buckets=FLOPS_BUCKETS,
    registry=REGISTRY,
)
FLOPS_TOTAL = Histogram(
    "tts_answer_flops",
    "Total FLOPs per answer (policy + PRM).",
    _ANSWER_LABELS,
    buckets=FLOPS_BUCKETS,
    registry=REGISTRY,
)
FLOPS_SAVED = Counter(
    "tts_prefix_cache_saved_flops",
    "Policy FLOPs the prefix cache saved.",
    ["strategy", "model"],
    registry=REGISTRY,
)
CANDIDATES = Histogram(
    "tts_answer_candidates",
    "Candidates considered per answer.",
    ["strategy"],
    buckets=COUNT_BUCKETS,
    registry=REGISTRY,
)
ITERATIONS = Histogram(
    "tts_answer_search_iterations",
    "Search iterations per answer.",
    ["strategy"],
    buckets=COUNT_BUCKETS,
    registry=REGISTRY,
)
CONFIDENCE = Histogram(
    "tts_answer_selection_confidence",
    "Share of the vote won by the chosen answer.",
    ["strategy"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    registry=REGISTRY,
)
AFFINITY_RELEASES = Counter(
    "tts_affinity_releases",
    "Affinity sessions released at the router when a request ended, by outcome (ok, failed).",
    ["outcome"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "tts_rejections",
    "Requests and connections refused before they ran, by reason: a quota "
    "(quota_requests, quota_tokens, quota_flops_minute, quota_flops_day), the quota store "
    "down with fail-closed (quota_store), a slow client (head_deadline, body_deadline: 408 and "
    "closed), the per-worker connection cap (connection_cap: 503).",
    ["reason"],
    registry=REGISTRY,
)
# Every reason exists from the start at 0, so that rate() sees the first rejection.
REJECTION_REASONS = (
    "quota_requests",
    "quota_tokens",
    "quota_flops_minute",
    "quota_flops_day",
    "quota_store",
    "head_deadline",
    "body_deadline",
    "connection_cap",
)
for _reason in REJECTION_REASONS:
    REJECTIONS.labels(_reason)
QUOTA_REMAINING = Gauge(
    "tts_quota_remaining",
    "What an API key has left in its current window, by key (a prefix of the key's SHA-256, "
    "never the key) and kind (requests, tokens per minute, flops_minute, flops_day). With "
    "several workers and no Redis each worker counts apart: the lowest is shown.",
    ["key", "kind"],
    registry=REGISTRY,
    multiprocess_mode="min",
)
AFFINITY_PINS = Gauge(
    "tts_affinity_pins",
    "Affinity pins held by requests in flight: each a session at the router until released.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
TRACE_RECORDS = Counter(
    "tts_trace_records",
    "Search-trace records by fate: written, dropped (the writer was behind) or failed (the "
    "trace folder could not be written).",
    ["outcome"],
    registry=REGISTRY,
)
ROUTED = Counter(
    "tts_router_decisions",
    "What the router chose for `auto` requests, by difficulty bin.",
    ["routed_strategy", "difficulty"],
    registry=REGISTRY,
)


def observe_answer(outcome: Outcome, endpoint: str, model: str) -> None:
    strategy = outcome.job.strategy
    decision = outcome.decision
    difficulty = decision.difficulty.bin if decision and decision.difficulty else "none"
    LATENCY.labels(endpoint, strategy).observe(outcome.wall_time_s)
    for stage, seconds in outcome.stages.items():
        STAGE_LATENCY.labels(stage, strategy).observe(seconds)
    labels = (strategy, model, difficulty)
    if outcome.flops is not None:
        FLOPS_POLICY.labels(*labels).observe(outcome.flops.policy)
        FLOPS_PRM.labels(*labels).observe(outcome.flops.prm)
        FLOPS_TOTAL.labels(*labels).observe(outcome.flops.total)
        FLOPS_SAVED.labels(strategy, model).inc(outcome.flops.saved_by_cache)
    result = outcome.result
    CANDIDATES.labels(strategy).observe(len(result.candidates))
    ITERATIONS.labels(strategy).observe(result.iterations)
    votes = sum(result.votes.values())
    if result.answer is not None and votes > 0:
        CONFIDENCE.labels(strategy).observe(result.votes.get(result.answer, 0.0) / votes)
    if decision is not None:
        ROUTED.labels(decision.strategy, difficulty).inc()


def observe_pins(held: int) -> None:
    AFFINITY_PINS.set(held)


def observe_release(ok: bool) -> None:
    AFFINITY_RELEASES.labels("ok" if ok else "failed").inc()


def observe_trace(outcome: str) -> None:
    TRACE_RECORDS.labels(outcome).inc()


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
