"""Every Prometheus metric the PRM worker exports, in one place.

No label carries a question or a solution; backend and model are one value per worker.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

BATCH_SIZE = Histogram(
    "prm_batch_size",
    "Solutions per backend call (after merging concurrent requests).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "prm_queue_wait_seconds",
    "Seconds a score request waited in the queue before its batch started.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
SCORING = Histogram(
    "prm_scoring_duration_seconds",
    "Seconds per backend call.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
STEPS_SCORED = Counter(
    "prm_steps_scored",
    "Steps scored by the backend.",
    registry=REGISTRY,
)
STEPS_CACHED = Counter(
    "prm_steps_cached",
    "Steps served from the score cache (no backend compute).",
    registry=REGISTRY,
)
TOKENS = Counter(
    "prm_tokens",
    "Tokens the backend computed.",
    registry=REGISTRY,
)
JUDGE_FALLBACKS = Counter(
    "prm_judge_fallbacks",
    "Judge answers with neither yes nor no among the top logprobs (scored the fallback).",
    registry=REGISTRY,
)
REQUESTS = Counter(
    "prm_requests",
    "Score requests answered, by status class.",
    ["status"],
    registry=REGISTRY,
)
QUEUED = Gauge(
    "prm_queued_solutions",
    "Solutions waiting for a batch.",
    registry=REGISTRY,
)
QUEUE_CAPACITY = Gauge(
    "prm_queue_capacity_solutions",
    "Solutions the queue holds before it answers 429.",
    registry=REGISTRY,
)
CACHE_ENTRIES = Gauge(
    "prm_cache_entries",
    "Solutions held in the score cache.",
    registry=REGISTRY,
)
INFO = Gauge(
    "prm_worker_info",
    "Constant 1; labels name the backend and model.",
    ["backend", "model"],
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
