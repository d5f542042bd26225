"""Majority voting (self-consistency): N whole solutions, the most frequent answer wins (or the
most confident one, with the `confidence` and `filtered` votes)."""

from __future__ import annotations

from tts_server.strategies.common import finish, vote_rule, whole_solutions
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
    candidates = await whole_solutions(policy, problem, config, policy_usage, n=config.budget)
    return await finish(
        candidates,
        vote_rule(config),
        config,
        iterations=1,
        policy_usage=policy_usage,
        prm_usage=PRMUsage(),
    )
