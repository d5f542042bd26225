"""vLLM's own Prometheus counters: what the engine did between two scrapes."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Our short name -> the sample vLLM exports (summed over its label sets: one per model/engine).
COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "cache_queries": "vllm:prefix_cache_queries_total",
    "cache_hits": "vllm:prefix_cache_hits_total",
    "requests": "vllm:request_success_total",
}


def parse_counters(text: str) -> dict[str, float]:
    """The counters of COUNTERS found in a /metrics body (a missing one is left out)."""
    wanted = {sample: short for short, sample in COUNTERS.items()}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            short = wanted.get(sample.name)
            if short is not None:
                found[short] = found.get(short, 0.0) + float(sample.value)
    return found


async def scrape(client: httpx.AsyncClient, policy_url: str) -> dict[str, float]:
    response = await client.get(policy_url.rstrip("/") + "/metrics", timeout=30)
    response.raise_for_status()
    return parse_counters(response.text)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What happened in between, for the counters both scrapes have."""
    return {k: after[k] - before[k] for k in after if k in before}
