"""Early stopping a client names: `adaptive` (Beta rule over the vote) and `deepconf` (DeepConf
online: streamed traces closed when their confidence drops), over fakes."""

from __future__ import annotations

import dataclasses

from tests.support.fakes import FakePolicy, FakePRM, StreamRecord, encode, per_step
from tts_server.accounting import Account
from tts_server.flops import FlopsCounter, ModelShape
from tts_server.strategies import REGISTRY
from tts_server.types import (
    ConfidenceConfig,
    DeepConfConfig,
    Problem,
    SearchConfig,
    StopRule,
)

PROMPT = "Q: How many?\nA:"
PROBLEM = Problem(question="How many?", prompt_ids=tuple(encode(PROMPT)))
BETA = StopRule(round_size=2, stop_margin=None, give_up_after=None, beta_threshold=0.95)


def config(**kwargs: object) -> SearchConfig:
    base: dict[str, object] = {"budget": 8, "max_tokens": 64, "stopping": BETA}
    return SearchConfig(**{**base, **kwargs})  # type: ignore[arg-type]


async def test_adaptive_stops_once_the_beta_posterior_is_sure_and_needs_no_prm() -> None:
    policy = FakePolicy(lambda prompt, sample: "2 + 3 = 5\n\nThe answer is 5.")
    result = await REGISTRY["adaptive"].run(PROBLEM, config(), policy, None)
    # 2-0: P = 7/8 < 0.95, go on; 4-0: P = 31/32 >= 0.95, stop: half the budget drawn.
    assert [call.n for call in policy.calls] == [2, 2]
    assert (len(result.candidates), result.answer, result.iterations) == (4, "5", 2)
    assert result.votes == {"5": 4.0}  # a plain vote: no PRM scores


async def test_adaptive_spends_the_budget_while_the_answers_split() -> None:
    policy = FakePolicy(lambda prompt, sample: f"The answer is {5 + sample % 2}.")
    result = await REGISTRY["adaptive"].run(PROBLEM, config(), policy, None)
    assert [call.n for call in policy.calls] == [2, 2, 2, 2]
    assert len(result.candidates) == 8 and result.votes == {"5": 4.0, "6": 4.0}


def deepconf_config(warmup: int = 4) -> SearchConfig:
    return config(
        confidence=ConfidenceConfig(sample=2, k=2, window=4, tail=4),
        deepconf=DeepConfConfig(warmup=warmup, keep=0.9, round_size=2, consensus=0.95),
    )


def shaky_after_five(sample: int, position: int) -> list[float]:
    """Sure tokens (confidence (0.1 + 3) / 2 = 1.55), but sample 4 hesitates from token 5 on
    (confidence 1.0): its window of 4 holds 3 x 1.55 + 1.0 -> 1.4125 < 1.55 at token 6."""
    return [-1.0, -1.0] if sample == 4 and position >= 5 else [-0.1, -3.0]


async def test_deepconf_closes_a_trace_whose_confidence_drops_and_never_counts_its_vote() -> None:
    # The warm-up splits 5/7: no consensus, so traces stream in rounds of 2 to the budget.
    policy = FakePolicy(
        lambda prompt, sample: f"The answer is {5 if sample % 2 == 0 else 7}.",
        top_logprobs=shaky_after_five,
    )
    result = await REGISTRY["deepconf"].run(PROBLEM, deepconf_config(), policy, None)
    [warmup, *streamed] = policy.calls
    assert (warmup.n, warmup.sampling.logprobs) == (4, 2)
    assert [call.n for call in streamed] == [1, 1, 1, 1]  # two rounds of two streams
    assert policy.streams == [
        StreamRecord(4, 6, True),  # closed at its sixth token, "The an"
        StreamRecord(5, 16, False),
        StreamRecord(6, 16, False),
        StreamRecord(7, 16, False),
    ]
    closed = result.candidates[4]
    assert (closed.finished, closed.finish_reason, closed.text) == (False, "cancelled", "The an")
    assert closed.confidence is not None and closed.confidence.tokens == 6
    # Its six tokens are paid for; its vote is not cast: 4 x "5" minus the closed one.
    assert result.policy_usage.completion_tokens == 7 * 16 + 6
    assert result.answer == "7"
    assert result.votes == {"5": 3 * 1.55, "7": 4 * 1.55}


async def test_deepconf_stops_after_the_warmup_when_it_agrees() -> None:
    policy = FakePolicy(lambda prompt, sample: "The answer is 5.")
    result = await REGISTRY["deepconf"].run(PROBLEM, deepconf_config(), policy, None)
    assert [call.n for call in policy.calls] == [4] and policy.streams == []
    assert (len(result.candidates), result.answer) == (4, "5")


async def test_deepconf_stops_streaming_once_consensus_is_reached() -> None:
    # Warm-up 2 splits; then every trace says 5: after one round, 3 of 4 votes (0.75) are not
    # enough; after two, 5 of 6 (0.83); the budget of 8 ends it with 7 of 8 (no stop at 0.95).
    # With consensus 0.8 it stops after the second round: 6 traces, not 8.
    policy = FakePolicy(lambda prompt, sample: f"The answer is {7 if sample == 1 else 5}.")
    loose = config(
        confidence=ConfidenceConfig(sample=2, k=2, window=4, tail=4),
        deepconf=DeepConfConfig(warmup=2, keep=0.9, round_size=2, consensus=0.8),
    )
    result = await REGISTRY["deepconf"].run(PROBLEM, loose, policy, None)
    assert [call.n for call in policy.calls] == [2, 1, 1, 1, 1]
    assert len(result.candidates) == 6 and result.answer == "5"


async def test_a_request_account_counts_streams_seeds_them_apart_and_keeps_its_ceiling() -> None:
    """Through the request's account (as the engine runs it): a seeded deepconf gives each
    streamed trace its own seed after the warm-up's, the usage includes the closed trace's
    tokens, and under a FLOPs ceiling a stream with no room left is not sent."""
    policy = FakePolicy(
        lambda prompt, sample: f"The answer is {5 if sample % 2 == 0 else 7}.",
        top_logprobs=shaky_after_five,
    )
    account = Account(FlopsCounter(ModelShape(1000), ModelShape(0)))
    accounted, _ = account.wrap(policy, FakePRM(per_step(lambda step: 0.5)))
    seeded = dataclasses.replace(deepconf_config(), seed=40)
    result = await REGISTRY["deepconf"].run(PROBLEM, seeded, accounted, None)
    assert [call.sampling.seed for call in policy.calls] == [40, 44, 45, 46, 47]
    assert account.policy_usage.completion_tokens == result.policy_usage.completion_tokens
    assert account.policy_usage.completion_tokens == 7 * 16 + 6

    # Room for the warm-up (4 x (15 prompt + 16) tokens x 2 x 1000) and nothing more.
    tight = Account(FlopsCounter(ModelShape(1000), ModelShape(0)), ceiling=4 * 2000 * (15 + 16))
    policy = FakePolicy(lambda prompt, sample: f"The answer is {5 if sample % 2 == 0 else 7}.")
    accounted, _ = tight.wrap(policy, FakePRM(per_step(lambda step: 0.5)))
    result = await REGISTRY["deepconf"].run(PROBLEM, deepconf_config(), accounted, None)
    assert policy.streams == [] and tight.limited
    assert tight.spent <= 4 * 2000 * (15 + 16)
