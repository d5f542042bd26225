"""The Grafana dashboards, defined once in Python.

`deploy/grafana/dashboards/*.json` are generated from here (`tts-server dashboards`; a test fails
when the committed files drift), and `tts-server report` draws its PNG from the same panels and
the same PromQL. `$__rate_interval` is Grafana's; the report and the tests substitute a window.
"""

from __future__ import annotations

import json
from pathlib import Path

from tts_server.tools.panels import (
    FLOPS_UNIT,
    RATE,
    Dashboard,
    Panel,
    Query,
    substitute,
    to_grafana,
)

__all__ = ["DASHBOARDS", "Panel", "every_query", "substitute", "to_grafana", "write_all"]


def _mean(metric: str, by: str) -> str:
    """Mean of a histogram's observations per `by` over the window."""
    return (
        f"sum by ({by}) (rate({metric}_sum[{RATE}])) / sum by ({by}) (rate({metric}_count[{RATE}]))"
    )


def _quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{RATE}])))"


# vllm-router's own metrics (its --prometheus-port; job `vllm-router`) and the gateway's pins.
# vllm-router 0.1.17 exports no session count per worker, and the gateway cannot see which
# replica the router chose: sessions are shown as the pins the gateway holds, in total.
ROUTER_PANELS = (
    Panel(
        "Router: requests per replica",
        "Requests vllm-router sent to each replica per second (its own count, by worker URL).",
        "reqps",
        (
            Query(
                f"sum by (worker) (rate(vllm_router_processed_requests_total[{RATE}]))",
                "{{worker}}",
            ),
        ),
    ),
    Panel(
        "Router: circuit breaker and health per replica",
        "Circuit-breaker state per replica (0 closed: serving; 1 open: skipped) and the "
        "router's health check (1 healthy).",
        "short",
        (
            Query("max by (worker) (vllm_router_cb_state)", "breaker {{worker}}"),
            Query("min by (worker) (vllm_router_worker_health)", "healthy {{worker}}"),
        ),
    ),
    Panel(
        "Affinity sessions held",
        "Pins held by the gateway's requests in flight (each a router session until released) "
        "and the replicas the router counts as active.",
        "short",
        (
            Query("sum(tts_affinity_pins)", "pins held"),
            Query("max(vllm_router_active_workers)", "active replicas"),
        ),
    ),
)


GATEWAY = Dashboard(
    uid="tts-gateway",
    title="TTS gateway",
    description="What each answer cost (FLOPs) by strategy and difficulty, what the router "
    "chose, where the time went, throughput and errors.",
    tags=("tts-server", "gateway"),
    links=(
        {
            "title": "vLLM dashboards",
            "type": "dashboards",
            "tags": ["vllm"],
            "asDropdown": True,
            "includeVars": True,
            "keepTime": True,
        },
        {
            "title": "PRM worker",
            "type": "link",
            "url": "/d/tts-prm-worker",
            "keepTime": True,
            "includeVars": True,
        },
    ),
    panels=(
        Panel(
            "Mean FLOPs per answer by strategy",
            "Policy + PRM FLOPs per answer (2 x parameters x tokens computed), averaged over "
            "the window, per requested strategy.",
            FLOPS_UNIT,
            (Query(_mean("tts_answer_flops", "strategy"), "{{strategy}}"),),
            in_report=True,
        ),
        Panel(
            "Mean FLOPs per answer by difficulty",
            "FLOPs per answer of `auto` requests by the router's difficulty bin; `none` = "
            "fixed strategies (no pilot).",
            FLOPS_UNIT,
            (Query(_mean("tts_answer_flops", "difficulty"), "{{difficulty}}"),),
            in_report=True,
        ),
        Panel(
            "FLOPs per answer (heatmap)",
            "How many answers fell in each FLOPs bucket per interval, all strategies.",
            FLOPS_UNIT,
            (Query(f"sum by (le) (increase(tts_answer_flops_bucket[{RATE}]))", "{{le}}"),),
            kind="heatmap",
        ),
        Panel(
            "p95 FLOPs per answer by strategy",
            "95th percentile of FLOPs per answer (bucket-interpolated).",
            FLOPS_UNIT,
            (Query(_quantile(0.95, "tts_answer_flops", "strategy"), "{{strategy}}"),),
        ),
        Panel(
            "Policy and PRM FLOPs per second",
            "Compute spent per second on the policy and on the PRM, and what vLLM's prefix "
            "cache saved.",
            "si:FLOP/s",
            (
                Query(f"sum(rate(tts_answer_policy_flops_sum[{RATE}]))", "policy"),
                Query(f"sum(rate(tts_answer_prm_flops_sum[{RATE}]))", "PRM"),
                Query(f"sum(rate(tts_prefix_cache_saved_flops_total[{RATE}]))", "saved by cache"),
            ),
        ),
        Panel(
            "Strategy mix chosen by the router",
            "Routed strategy of `auto` requests by difficulty bin, per second ('pilot' = "
            "answered by the pilot alone).",
            "reqps",
            (
                Query(
                    f"sum by (routed_strategy, difficulty) "
                    f"(rate(tts_router_decisions_total[{RATE}]))",
                    "{{difficulty}} -> {{routed_strategy}}",
                ),
            ),
            in_report=True,
        ),
        Panel(
            "Selection confidence (accuracy proxy)",
            "Mean share of the vote won by the chosen answer. Without labels the server cannot "
            "see accuracy; agreement among candidates tracks it.",
            "percentunit",
            (Query(_mean("tts_answer_selection_confidence", "strategy"), "{{strategy}}"),),
            in_report=True,
        ),
        Panel(
            "Latency per stage (mean)",
            "Mean seconds per request in each stage: pilot (auto), generation (policy calls), "
            "prm_scoring (PRM calls), selection (the rest).",
            "s",
            (Query(_mean("tts_stage_duration_seconds", "stage"), "{{stage}}"),),
            in_report=True,
        ),
        Panel(
            "End-to-end latency p50 / p95",
            "Request latency quantiles by strategy.",
            "s",
            (
                Query(
                    _quantile(0.5, "tts_request_duration_seconds", "strategy"), "p50 {{strategy}}"
                ),
                Query(
                    _quantile(0.95, "tts_request_duration_seconds", "strategy"), "p95 {{strategy}}"
                ),
            ),
            in_report=True,
        ),
        Panel(
            "Throughput by strategy",
            "Requests answered per second, by requested strategy.",
            "reqps",
            (Query(f"sum by (strategy) (rate(tts_requests_total[{RATE}]))", "{{strategy}}"),),
            in_report=True,
        ),
        Panel(
            "Error ratio",
            "Share of requests answered 4xx (client errors) and 5xx (server errors).",
            "percentunit",
            (
                Query(
                    f'(sum(rate(tts_requests_total{{status="4xx"}}[{RATE}])) or vector(0))'
                    f" / sum(rate(tts_requests_total[{RATE}]))",
                    "4xx",
                ),
                Query(
                    f'(sum(rate(tts_requests_total{{status="5xx"}}[{RATE}])) or vector(0))'
                    f" / sum(rate(tts_requests_total[{RATE}]))",
                    "5xx",
                ),
            ),
            in_report=True,
        ),
        Panel(
            "Requests in flight",
            "Requests being served by the gateway right now.",
            "short",
            (Query("sum(tts_requests_in_flight)", "in flight"),),
        ),
        Panel(
            "Candidates and search iterations per answer",
            "Mean candidates considered and search iterations per answer, by strategy.",
            "short",
            (
                Query(_mean("tts_answer_candidates", "strategy"), "candidates {{strategy}}"),
                Query(_mean("tts_answer_search_iterations", "strategy"), "iterations {{strategy}}"),
            ),
        ),
        Panel(
            "Policy tokens per second (vLLM)",
            "vLLM's own counters: prompt tokens computed, served from its prefix cache, and "
            "generated.",
            "short",
            (
                Query(f"sum(rate(vllm:prompt_tokens_total[{RATE}]))", "prompt"),
                Query(f"sum(rate(vllm:prompt_tokens_cached_total[{RATE}]))", "prompt (cached)"),
                Query(f"sum(rate(vllm:generation_tokens_total[{RATE}]))", "generated"),
            ),
        ),
        # Per replica (`tts-server up --replicas K`: each vLLM is its own scrape target).
        Panel(
            "vLLM requests per replica",
            "Requests each policy replica finished per second (one per sample in per_prompt "
            "mode): with affinity on, a client request's calls all land on one replica.",
            "reqps",
            (
                Query(
                    f"sum by (instance) (rate(vllm:request_success_total[{RATE}]))",
                    "{{instance}}",
                ),
            ),
        ),
        Panel(
            "Prefix-cache hit rate per replica",
            "Share of each replica's prompt tokens served from its prefix cache (vLLM's own "
            "counters): what pinning a request to one replica is for.",
            "percentunit",
            (
                Query(
                    f"sum by (instance) (rate(vllm:prefix_cache_hits_total[{RATE}]))"
                    f" / sum by (instance) (rate(vllm:prefix_cache_queries_total[{RATE}]))",
                    "{{instance}}",
                ),
            ),
        ),
        Panel(
            "Requests running per replica",
            "Requests each replica is running now: how evenly the router spreads the load.",
            "short",
            (Query("sum by (instance) (vllm:num_requests_running)", "{{instance}}"),),
        ),
        *ROUTER_PANELS,
        # Slow and greedy clients (README "Reliability and security").
        Panel(
            "Rejections by reason",
            "Requests and connections refused before they ran: over a key's quota "
            "(quota_requests, quota_tokens, quota_flops_minute, quota_flops_day; 429), the quota "
            "store down and failing closed (quota_store; 503), a head or body not received in "
            "time (head_deadline, body_deadline; 408 and closed), past the per-worker connection "
            "cap (connection_cap; 503).",
            "reqps",
            (Query(f"sum by (reason) (rate(tts_rejections_total[{RATE}]))", "{{reason}}"),),
        ),
        Panel(
            "Quota remaining per key",
            "What each API key has left in its current window, by kind (requests, tokens per "
            "minute, flops_minute, flops_day); keys are named by a prefix of their SHA-256. "
            "Without Redis each worker counts apart: the lowest is shown.",
            "short",
            (Query("min by (key, kind) (tts_quota_remaining)", "{{key}} {{kind}}"),),
        ),
    ),
)

PRM_WORKER = Dashboard(
    uid="tts-prm-worker",
    title="TTS PRM worker",
    description="The process reward model service: batching, queueing, scoring latency, cache.",
    tags=("tts-server", "prm"),
    links=(
        {
            "title": "TTS gateway",
            "type": "link",
            "url": "/d/tts-gateway",
            "keepTime": True,
            "includeVars": True,
        },
    ),
    panels=(
        Panel(
            "Score requests by status",
            "Score requests answered per second, by status class.",
            "reqps",
            (Query(f"sum by (status) (rate(prm_requests_total[{RATE}]))", "{{status}}"),),
        ),
        Panel(
            "Batch size",
            "Solutions per backend call after merging concurrent requests: mean and p95.",
            "short",
            (
                Query(
                    f"sum(rate(prm_batch_size_sum[{RATE}]))"
                    f" / sum(rate(prm_batch_size_count[{RATE}]))",
                    "mean",
                ),
                Query(
                    f"histogram_quantile(0.95, sum by (le) (rate(prm_batch_size_bucket[{RATE}])))",
                    "p95",
                ),
            ),
            in_report=True,
        ),
        Panel(
            "Queue wait p95",
            "95th percentile of the seconds a request waited before its batch started.",
            "s",
            (
                Query(
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(prm_queue_wait_seconds_bucket[{RATE}])))",
                    "p95",
                ),
            ),
        ),
        Panel(
            "Scoring latency p50 / p95",
            "Seconds per backend call.",
            "s",
            (
                Query(
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(prm_scoring_duration_seconds_bucket[{RATE}])))",
                    "p50",
                ),
                Query(
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(prm_scoring_duration_seconds_bucket[{RATE}])))",
                    "p95",
                ),
            ),
            in_report=True,
        ),
        Panel(
            "Steps scored and served from cache",
            "Steps per second computed by the backend and answered from the score cache.",
            "short",
            (
                Query(f"sum(rate(prm_steps_scored_total[{RATE}]))", "scored"),
                Query(f"sum(rate(prm_steps_cached_total[{RATE}]))", "from cache"),
            ),
        ),
        Panel(
            "Queue saturation",
            "Queued solutions as a share of the queue's capacity (429 at 100%).",
            "percentunit",
            (
                Query(
                    "max(prm_queued_solutions / prm_queue_capacity_solutions)", "queued / capacity"
                ),
            ),
        ),
    ),
)

DASHBOARDS = (GATEWAY, PRM_WORKER)


def every_query() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) for every target of every panel."""
    return [(d.uid, p.title, q.expr) for d in DASHBOARDS for p in d.panels for q in p.queries]


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in DASHBOARDS:
        path = folder / f"{dashboard.uid}.json"
        path.write_text(json.dumps(to_grafana(dashboard), indent=2) + "\n")
        written.append(path)
    return written
