"""Majority voting (self-consistency): N whole solutions, the most frequent answer wins."""

from __future__ import annotations

from tts_server.strategies.common import finish, full_sampling, solution_candidate
from tts_server.types import (
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    SearchConfig,
    StrategyResult,
)


async def majority(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    policy_usage = PolicyUsage()
    [generations] = await policy.generate(
        [problem.prompt_ids], full_sampling(config), policy_usage, n=config.budget
    )
    candidates = [solution_candidate(g, config) for g in generations]
    return await finish(
        candidates,
        "majority",
        config,
        iterations=1,
        policy_usage=policy_usage,
        prm_usage=PRMUsage(),
    )
