"""Why the policy client sends k copies of a prompt as k requests with n=1, not one with n=k
(issue 17 asked whether n=k would let vLLM prefill once): vLLM 0.32 on the CPU prefills each of
the n children on its own, exactly as k requests (full blocks from the prefix cache, the tail
again for each), while its response's `usage` counts the prompt once and one child's cached
tokens, so n=k saves no engine work and loses the exact cached-token (FLOPs) count."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import MODEL
from tts_server.bench.engine_metrics import delta, parse_counters

pytestmark = pytest.mark.integration


def _counters(client: httpx.Client, url: str) -> dict[str, float]:
    return parse_counters(client.get(url + "/metrics").text)


def test_n_children_are_prefilled_one_by_one(policy_url: str) -> None:
    k = 4
    with httpx.Client(timeout=300) as client:
        # A prompt no earlier test sent: cold in the prefix cache.
        text = f"{uuid.uuid4()} " + " ".join(["apples and pears"] * 50)
        tokenized = client.post(policy_url + "/tokenize", json={"model": MODEL, "prompt": text})
        prompt = tokenized.json()["tokens"]
        before = _counters(client, policy_url)
        body = {"model": MODEL, "prompt": [prompt], "n": k, "max_tokens": 4, "temperature": 1.0}
        response = client.post(policy_url + "/v1/completions", json=body)
        engine = delta(before, _counters(client, policy_url))
    usage = response.json()["usage"]
    # The engine prefilled (and looked up in its cache) the prompt once per child...
    assert engine["prompt_tokens"] == k * len(prompt)
    assert engine["cache_queries"] == k * len(prompt)
    assert engine["generation_tokens"] == usage["completion_tokens"]
    # ...and later children found the first one's full blocks, which `usage` does not tell:
    # it counts the prompt once and the cached tokens of one child.
    assert usage["prompt_tokens"] == len(prompt)
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert engine["cache_hits"] > cached
