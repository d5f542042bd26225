"""Logprobs and DeepConf on the real vLLM: the answer's logprobs are vLLM's own, and a DeepConf
run whose traces are closed midway counts what vLLM counted (up to the tokens vLLM generated
after the gateway stopped reading: measured here)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.integration.test_stack import CACHED, COUNTERS, QUESTION, vllm_counters
from tests.support.gateway import EquationPRM
from tts_server.api.app import create_app
from tts_server.clients import VLLMPolicyClient
from tts_server.settings import Settings

pytestmark = pytest.mark.integration

PROMPT = (
    "Question: Sam has 2 pens and gets 4 more. How many pens does he have?\n"
    "Answer: He gets more, so we add.\n\n2 + 4 = 6\n\nThe answer is 6.\n\n\n"
    f"Question: {QUESTION}\nAnswer:"
)
MODEL = "SmolLM2-135M-Instruct"


def test_completions_logprobs_are_what_vllm_returns_for_the_same_tokens(stack: Stack) -> None:
    """Greedy through the gateway with logprobs 2, and the same prompt greedy on vLLM itself:
    the same tokens with the same logprobs and top alternatives (to vLLM's batch noise)."""
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    ours = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        logprobs=2,
        extra_body={"tts": {"strategy": "greedy"}},
    )
    direct = httpx.post(
        stack.policy_url + "/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "logprobs": 2},
        timeout=120,
    ).json()["choices"][0]["logprobs"]
    got = ours.choices[0].logprobs
    assert got is not None and got.tokens and got.token_logprobs and got.top_logprobs
    n = len(got.tokens)  # the gateway may cut the text at its stated answer
    assert "".join(got.tokens) == ours.choices[0].text
    assert got.tokens == direct["tokens"][:n]
    assert got.token_logprobs == pytest.approx(direct["token_logprobs"][:n], abs=0.05)
    for mine, theirs in zip(got.top_logprobs, direct["top_logprobs"][:n], strict=True):
        assert set(mine) == set(theirs)
        assert [mine[t] for t in theirs] == pytest.approx(list(theirs.values()), abs=0.05)
    tts = (ours.model_extra or {})["tts"]
    [confidence] = tts["candidate_confidences"]
    assert confidence["tokens"] == n and confidence["mean"] > 0


@pytest.mark.parametrize(
    ("strategy", "budget", "width"),
    [("majority", 2, 1), ("beam_search", 2, 2), ("adaptive", 4, 1), ("deepconf", 4, 1)],
)
def test_chat_logprobs_with_the_openai_client(
    stack: Stack, strategy: str, budget: int, width: int
) -> None:
    """The selected answer's tokens spell its content, for a search too (its steps' tokens in
    order), with 3 alternatives each, most likely first."""
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=64,
        logprobs=True,
        top_logprobs=3,
        extra_headers={
            "X-TTS-Strategy": strategy,
            "X-TTS-Budget": str(budget),
            "X-TTS-Beam-Width": str(width),
        },
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens).strip() == choice.message.content
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        alternatives = [t.logprob for t in token.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
    tts = (completion.model_extra or {})["tts"]
    assert tts["strategy"] == strategy
    assert all(c is not None for c in tts["candidate_confidences"])


async def test_deepconf_closes_traces_on_vllm_and_counts_what_they_generated(
    policy_url: str,
) -> None:
    """keep 0.1 (DeepConf-low): the threshold is the 90th percentile of the warm-up's lowest
    group confidences, so most streamed traces are closed midway. Prompt tokens equal vLLM's
    counter growth exactly; generated tokens are ours plus what vLLM generated after the
    gateway stopped reading a closed stream (printed: the docs quote it)."""
    settings = Settings(
        policy_model=MODEL,
        policy_url=policy_url,
        policy_params=134_515_008,
        prm_params=0,
        deepconf_keep=0.1,
        deepconf_warmup=2,
        deepconf_round_size=2,
        deepconf_consensus=1.0,  # no early consensus: every trace of the budget is drawn
    )
    # Whether a sampled trace dips below the threshold is chance: up to 3 seeded requests until
    # one closes a trace; the accounting must be exact for every one of them.
    closed_in_all = 0
    for seed in (1, 2, 3):
        closed = await _deepconf_once(settings, policy_url, seed)
        closed_in_all += closed
        if closed:
            break
    assert closed_in_all >= 1


async def _deepconf_once(settings: Settings, policy_url: str, seed: int) -> int:
    """One deepconf request; asserts its usage against vLLM's counters; the traces it closed."""
    policy = VLLMPolicyClient(policy_url, MODEL)
    app = create_app(settings, policy=policy, prm=EquationPRM())
    before = vllm_counters(policy_url)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=600
        ) as client:
            response = await client.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 96,
                    "seed": seed,
                    "tts": {"strategy": "deepconf", "budget": 8},
                },
            )
    finally:
        await policy.aclose()
    assert response.status_code == 200, response.text
    body = response.json()
    usage, tts = body["usage"], body["tts"]
    closed = sum(c["cancelled"] for c in tts["candidate_confidences"])
    deadline = time.monotonic() + 5
    while True:
        grown = {k: v - before[k] for k, v in vllm_counters(policy_url).items()}
        if grown[COUNTERS[1]] >= usage["completion_tokens"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # let the aborted requests' last tokens reach the counter
    grown = {k: v - before[k] for k, v in vllm_counters(policy_url).items()}
    gap = grown[COUNTERS[1]] - usage["completion_tokens"]
    print(
        f"deepconf seed {seed}: {tts['num_candidates']} traces, {closed} closed; completion "
        f"tokens ours {usage['completion_tokens']}, vLLM {grown[COUNTERS[1]]:g} (gap {gap:g}); "
        f"cached ours {usage['prompt_tokens_details']['cached_tokens']}, vLLM {grown[CACHED]:g}"
    )
    assert grown[COUNTERS[0]] == usage["prompt_tokens"]
    # Observed on the 2-core CPU: no gap (a step takes longer than the abort). Where steps are
    # fast, vLLM may count a few tokens more per closed stream than the gateway read.
    assert 0 <= gap <= 8 * closed
    # A closed stream's prefix-cache hits are not reported (only a stream's last chunk has
    # them): ours can only be fewer.
    assert usage["prompt_tokens_details"]["cached_tokens"] <= grown[CACHED]
    return closed
