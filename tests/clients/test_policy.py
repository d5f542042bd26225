"""What the real policy client puts on the wire to vLLM, and what it reads back from it.

The fake vLLM ignores most sampling fields and always returns the stop string and token ids, so
only these tests would notice the client dropping one of them (audit section C).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import EOS, FakeVLLM
from tests.support.gateway import MODEL, EquationPRM, chat, gateway_with, script
from tts_server.clients import VLLMPolicyClient
from tts_server.clients.policy import CallMode
from tts_server.types import PolicyUsage, SamplingConfig

PARAMETERS = 1_000_000
# vLLM returns the stop string (the gateway cuts it where it must), token ids to continue from,
# and text without special tokens.
ALWAYS = {"include_stop_str_in_output": True, "return_token_ids": True, "skip_special_tokens": True}


async def sent_bodies(
    call_mode: CallMode, sampling: SamplingConfig, prompts: list[list[int]], n: int
) -> list[dict[str, Any]]:
    fake = FakeVLLM(script=lambda prompt, sample: "ok" + EOS, model=MODEL)
    upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app()))
    client = VLLMPolicyClient("http://fake-vllm", MODEL, client=upstream, call_mode=call_mode)
    try:
        generations = await client.generate(prompts, sampling, PolicyUsage(), n=n)
    finally:
        await upstream.aclose()
    assert [[g.text for g in row] for row in generations] == [["ok"] * n] * len(prompts)
    return fake.calls


async def test_each_prompt_is_sent_with_every_sampling_field() -> None:
    sampling = SamplingConfig(
        temperature=0.7, top_p=0.9, max_tokens=12, stop=("\n\n", "Q:"), seed=5
    )
    bodies = await sent_bodies("per_prompt", sampling, [[1, 2, 3], [4, 5]], n=2)
    common = {
        "model": MODEL,
        "n": 1,
        "max_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n", "Q:"],
        **ALWAYS,
    }
    # One request per sample, each with its own seed: copies of a prompt must not coincide.
    assert sorted(bodies, key=lambda b: b["seed"]) == [
        {**common, "prompt": [[1, 2, 3]], "seed": 5},
        {**common, "prompt": [[1, 2, 3]], "seed": 6},
        {**common, "prompt": [[4, 5]], "seed": 7},
        {**common, "prompt": [[4, 5]], "seed": 8},
    ]


async def test_a_batched_call_sends_no_seed_and_no_empty_stop() -> None:
    sampling = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=7)
    [body] = await sent_bodies("batched", sampling, [[1, 2], [3]], n=2)
    assert body == {
        "model": MODEL,
        "prompt": [[1, 2], [1, 2], [3], [3]],
        "n": 1,
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 1.0,
        **ALWAYS,
    }


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search"])
async def test_cached_tokens_reported_by_vllm_reach_usage_and_flops(
    tmp_path: Path, strategy: str
) -> None:
    """Every request's prompt has 5 tokens in vLLM's prefix cache: the response counts them,
    and the FLOPs they saved are not in the policy's FLOPs."""
    fake = FakeVLLM(script=script, model=MODEL, cached_tokens=5)
    settings: dict[str, Any] = {"policy_params": PARAMETERS, "prm_params": 0}
    async with gateway_with(fake, EquationPRM(), tmp_path, **settings) as client:
        response = await client.post("/v1/chat/completions", json=chat(strategy))
    assert response.status_code == 200, response.text
    body = response.json()
    tokens, usage, flops = body["tts"]["policy_tokens"], body["usage"], body["tts"]["flops"]
    cached = 5 * tokens["requests"]
    assert tokens["requests"] == len(fake.calls) >= 4
    assert tokens["cached"] == usage["prompt_tokens_details"]["cached_tokens"] == cached
    assert flops["saved_by_prefix_cache"] == 2 * PARAMETERS * cached
    computed = usage["prompt_tokens"] - cached + usage["completion_tokens"]
    assert flops["policy"] == 2 * PARAMETERS * computed


async def test_a_seeded_call_goes_per_prompt_even_in_batched_mode() -> None:
    # One request may carry one seed: shared by a prompt's copies, they would sample alike.
    sampling = SamplingConfig(temperature=0.7, top_p=1.0, max_tokens=7, seed=3)
    bodies = await sent_bodies("batched", sampling, [[1, 2], [3]], n=2)
    assert sorted((b["seed"], b["prompt"]) for b in bodies) == [
        (3, [[1, 2]]),
        (4, [[1, 2]]),
        (5, [[3]]),
        (6, [[3]]),
    ]
