"""Adaptive sampling (adaptive consistency, Aggarwal et al. 2023): whole solutions in small
rounds, stopping as soon as more samples are unlikely to change the answer (`StopRule`). The
samples not drawn are the saving.

Named by a client (`adaptive`), it needs no PRM: it stops by the Beta rule (the server's
`TTS_ADAPTIVE_THRESHOLD`) and selects by a vote. As a route of `auto` it continues the pilot,
scores its samples with the PRM and stops by the route's rule."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tts_server.router import stops_sampling
from tts_server.strategies.common import finish, score, vote_rule, whole_solutions
from tts_server.types import (
    Candidate,
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    SearchConfig,
    StrategyResult,
)


async def draw_until_settled(
    problem: Problem,
    config: SearchConfig,
    policy: PolicyClient,
    prm: PRMClient | None,
    answers: Sequence[str | None] = (),
) -> StrategyResult:
    """Rounds of whole solutions (scored when there is a PRM), up to `config.budget`, until the
    stopping rule holds over `answers` (those drawn before, e.g. `auto`'s pilot) and the new
    ones. Returns only the new samples, not yet selected among (`chosen` 0, no answer): the
    caller selects once, over all."""
    rule = config.stopping
    seen = list(answers)
    candidates: list[Candidate] = []
    policy_usage, prm_usage = PolicyUsage(), PRMUsage()
    rounds = 0
    # Answer equivalence (math-verify) is CPU work: off the event loop, as selection is.
    while len(candidates) < config.budget and not await asyncio.to_thread(
        stops_sampling, seen, rule
    ):
        size = min(rule.round_size, config.budget - len(candidates))
        drawn = await whole_solutions(policy, problem, config, policy_usage, n=size)
        if prm is not None:
            await score(prm, problem, drawn, config, prm_usage)
        candidates.extend(drawn)
        seen.extend(c.answer for c in drawn)
        rounds += 1
    return StrategyResult(
        candidates=candidates,
        chosen=0,
        answer=None,
        votes={},
        iterations=rounds,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )


async def adaptive(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    """With a PRM, its samples are scored and selected by the request's rule; without one
    (a client naming it), by a vote."""
    drawn = await draw_until_settled(problem, config, policy, prm)
    return await finish(
        drawn.candidates,
        config.selection if prm is not None else vote_rule(config),
        config,
        iterations=drawn.iterations,
        policy_usage=drawn.policy_usage,
        prm_usage=drawn.prm_usage,
    )
