"""The step cache: a search of depth d asks the PRM backend for O(d) step scores per beam.

Beam search and DVTS run against the real PRM worker app (in process, over HTTP) on a backend
that records which steps it was asked to score; the request's account keeps step scores by
prefix, so every iteration sends each beam's new step with the earlier ones as context.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from tests.support.fakes import FakePolicy, encode
from tests.support.prm_app import serve
from tts_server.accounting import Account
from tts_server.clients.prm import HTTPPRMClient
from tts_server.flops import FlopsCounter, ModelShape
from tts_server.prefixes import PrefixScores, prefix_keys
from tts_server.prm_worker.app import create_app
from tts_server.prm_worker.backends.base import PRMBackend, ScoreItem
from tts_server.strategies import REGISTRY
from tts_server.types import PRMUsage, Problem, SearchConfig

PROBLEM = Problem(question="How far?", prompt_ids=tuple(encode("Q: How far?\nA: ")))


class RecordingBackend(PRMBackend):
    """Scores a step by its text; records, per call, how many steps it was asked to score."""

    name = "recording"
    model_name = "recording-prm"

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.read: list[int] = []  # steps it was sent, context included

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        return [[(len(step) % 7) / 10 + 0.1 for step in steps] for _, steps in items]

    def score_tails(self, items: Sequence[ScoreItem], first: Sequence[int]) -> list[list[float]]:
        self.asked.append(sum(len(steps) - f for (_, steps), f in zip(items, first, strict=True)))
        self.read.append(sum(len(steps) for _, steps in items))
        return super().score_tails(items, first)


def endless(prompt: list[int], sample: int) -> str:
    """A step that never ends the solution, different for every beam and iteration."""
    return f"Step {len(prompt)}-{sample} goes on.\n\nand on"


@asynccontextmanager
async def worker(backend: PRMBackend, cache_size: int) -> AsyncIterator[HTTPPRMClient]:
    async with serve(create_app(backend, cache_size=cache_size)) as client:
        yield HTTPPRMClient("http://worker", client=client)


async def search(
    strategy: str, depth: int, *, step_cache: bool, worker_cache: int
) -> tuple[RecordingBackend, PRMUsage]:
    backend = RecordingBackend()
    account = Account(
        FlopsCounter(ModelShape(1000), ModelShape(10)),
        step_scores=PrefixScores() if step_cache else None,
    )
    config = SearchConfig(
        budget=8, beam_width=2, max_tokens=10_000, max_step_tokens=60, max_iterations=depth
    )
    async with worker(backend, worker_cache) as prm:
        policy, accounted = account.wrap(FakePolicy(endless), prm)
        await REGISTRY[strategy].run(PROBLEM, config, policy, accounted)
    return backend, account.prm_usage


@pytest.mark.parametrize("strategy", ["beam_search", "dvts"])
@pytest.mark.parametrize("depth", [4, 8, 16])
async def test_a_search_of_depth_d_asks_for_d_step_scores_per_beam(
    strategy: str, depth: int
) -> None:
    beams = 8
    cached, usage = await search(strategy, depth, step_cache=True, worker_cache=0)
    assert len(cached.asked) == depth  # one backend call per iteration: all beams together
    assert cached.asked == [beams] * depth  # each beam's new step only
    # Without either cache every iteration re-scores every step of every beam: d(d+1)/2 each.
    plain, plain_usage = await search(strategy, depth, step_cache=False, worker_cache=0)
    assert sum(plain.asked) == beams * depth * (depth + 1) // 2
    # The PRM still reads each beam's whole prefix (a causal model needs it): that is the same.
    assert cached.read == plain.read
    # The request's report: every score used counted, those reused counted as cached.
    assert usage.steps_scored == plain_usage.steps_scored == sum(plain.asked)
    assert usage.steps_cached == sum(plain.asked) - sum(cached.asked)
    assert plain_usage.steps_cached == 0


async def test_the_worker_cache_alone_also_scores_each_prefix_once() -> None:
    """A client without the step cache (an older gateway, another tool) still gets each step
    computed once: the worker keeps step scores by prefix across requests."""
    depth, beams = 6, 8
    worker_only, _ = await search("beam_search", depth, step_cache=False, worker_cache=10_000)
    assert worker_only.asked == [beams] * depth


async def test_copies_of_a_beam_are_sent_once() -> None:
    backend = RecordingBackend()
    account = Account(FlopsCounter(ModelShape(1000), ModelShape(10)), step_scores=PrefixScores())
    async with worker(backend, 0) as prm:
        _, accounted = account.wrap(FakePolicy(endless), prm)
        usage = PRMUsage()
        same = ["a = 1\n\n", "b = 2"]
        scores = await accounted.score("q", [same, list(same), ["c"]], usage)
    assert backend.asked == [3]  # the two copies count once
    assert scores[0] == scores[1] and len(scores[2]) == 1
    assert usage.steps_scored == 5 and usage.steps_cached == 2


async def test_cached_scores_equal_fresh_ones() -> None:
    """What a step's score was when first computed is what a later call would compute: the
    cache changes how often the backend is asked, never a score."""
    question, steps = "q", ["x = 1\n\n", "y = 22\n\n", "z = 333"]
    fresh_backend, cached_backend = RecordingBackend(), RecordingBackend()
    async with worker(fresh_backend, 0) as prm:
        fresh = await prm.score(question, [steps], PRMUsage())
    account = Account(FlopsCounter(ModelShape(1000), ModelShape(10)), step_scores=PrefixScores())
    async with worker(cached_backend, 0) as prm:
        _, accounted = account.wrap(FakePolicy(endless), prm)
        for k in range(1, len(steps) + 1):
            last = await accounted.score(question, [steps[:k]], PRMUsage())
    assert last == fresh
    assert cached_backend.asked == [1, 1, 1]


def test_prefix_keys_name_exactly_the_prefix() -> None:
    keys = prefix_keys("q", ["ab", "c", "d"])
    assert prefix_keys("q", ["ab", "c"]) == keys[:2]
    assert prefix_keys("q", ["a", "bc"])[1] != keys[1]  # same text, other steps
    assert prefix_keys("other", ["ab"])[0] != keys[0]
    assert prefix_keys("q", ["ab", "c", "e"])[2] != keys[2]
    assert len(set(keys)) == 3


def test_prefix_scores_read_a_run_and_evict_the_least_recent() -> None:
    scores = PrefixScores(capacity=3)
    keys = prefix_keys("q", ["a", "b", "c", "d"])
    scores.put(keys[:2], [0.1, 0.2])
    assert scores.known(keys) == [0.1, 0.2]  # up to the first step not kept
    assert scores.known(keys, 1) == [0.2]
    scores.put(keys[2:3], [0.3])
    scores.known(keys[:1])  # "a" is now the most recently used
    scores.put(keys[3:], [0.4])  # evicts "b"
    assert scores.known(keys) == [0.1] and len(scores) == 3
    off = PrefixScores(capacity=0)
    off.put(keys[:1], [0.5])
    assert off.known(keys) == []
