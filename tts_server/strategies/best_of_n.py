"""Best-of-N: N whole solutions, every step scored by the PRM, then select."""

from __future__ import annotations

from tts_server.strategies.common import (
    finish,
    require_prm,
    score,
    whole_solutions,
)
from tts_server.types import (
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    SearchConfig,
    StrategyResult,
)


async def best_of_n(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    verifier = require_prm(prm, "best_of_n")
    policy_usage, prm_usage = PolicyUsage(), PRMUsage()
    candidates = await whole_solutions(policy, problem, config, policy_usage, n=config.budget)
    await score(verifier, problem, candidates, config, prm_usage)
    return await finish(
        candidates,
        config.selection,
        config,
        iterations=1,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )
