"""Greedy decoding: one solution at temperature 0 (the CoT baseline)."""

from __future__ import annotations

from tts_server.strategies.common import finish, full_sampling, score, solution_candidate
from tts_server.types import (
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    SearchConfig,
    StrategyResult,
)


async def greedy(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    policy_usage, prm_usage = PolicyUsage(), PRMUsage()
    sampling = full_sampling(config, temperature=0.0)
    [[generation]] = await policy.generate([problem.prompt_ids], sampling, policy_usage, n=1)
    candidates = [solution_candidate(generation, config)]
    if prm is not None:
        await score(prm, problem, candidates, config, prm_usage)
    return await finish(
        candidates,
        "naive",
        config,
        iterations=1,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )
