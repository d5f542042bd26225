"""`auto`: the compute-optimal router as a strategy. A pilot of whole samples estimates the
question's difficulty; the rest of the budget goes as the router table routes that bin, and the
pilot's samples stay candidates. A table with a fixed strategy runs that, with no pilot."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from tts_server.router import Route, estimate
from tts_server.strategies.adaptive import draw_until_settled
from tts_server.strategies.best_of_n import best_of_n
from tts_server.strategies.common import finish, require_prm

if TYPE_CHECKING:
    from tts_server.strategies import Strategy
from tts_server.types import (
    Decision,
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    Progress,
    SearchConfig,
    StrategyResult,
)


async def auto(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    """Routes by `config.router`; the decision is on `config.progress` as soon as it is made
    (a stream shows it, a deadline keeps it). `config.beam_width` is the width a fixed strategy
    gets when its table names none."""
    table = config.router
    if table is None:
        raise ValueError("auto needs a router table")
    verifier = require_prm(prm, "auto")
    progress = config.progress if config.progress is not None else Progress()

    if table.fixed_strategy is not None:
        # Calibration found no routing that beats this strategy on this model pair. It runs
        # as a request naming it would (no pilot), on the share of the budget calibrated.
        name = table.fixed_strategy
        width = table.fixed_beam_width or config.beam_width
        budget, width = plan_budget(Route(name, width, table.fixed_budget_share), config.budget, 0)
        progress.decision = Decision(None, name, budget, width, False)
        strategy = _registered(name)
        assert strategy is not None, "the table's fixed strategy is checked when it loads"
        fixed = dataclasses.replace(config, budget=budget, beam_width=width)
        return await strategy.run(problem, fixed, policy, verifier if strategy.needs_prm else None)

    k = min(table.pilot_samples, config.budget)
    started = time.perf_counter()
    pilot = await best_of_n(problem, dataclasses.replace(config, budget=k), policy, verifier)
    progress.stages["pilot"] = time.perf_counter() - started
    difficulty = estimate(table, pilot.candidates)
    chosen = table.routes[difficulty.bin]
    early = table.exits_early(difficulty.mean_score, difficulty.agreement)
    n, width = plan_budget(chosen, config.budget, k)
    if early or n == 0:
        progress.decision = Decision(difficulty, "pilot", k, 1, early)
        return pilot
    decision = Decision(difficulty, chosen.strategy, k + n, width, False)
    progress.decision = decision

    routed = dataclasses.replace(config, budget=n, beam_width=width, stopping=chosen.stopping)
    if chosen.strategy == "adaptive":
        answers = [c.answer for c in pilot.candidates]
        main = await draw_until_settled(problem, routed, policy, verifier, answers)
        decision.budget = k + len(main.candidates)
        if not main.candidates:
            return pilot
    else:
        strategy = _registered(chosen.strategy)
        assert strategy is not None, "a table's routes are checked when it loads"
        main = await strategy.run(problem, routed, policy, verifier if strategy.needs_prm else None)
        if chosen.strategy == "deepconf":  # it may stop before its budget: say what it drew
            decision.budget = k + len(main.candidates)
    policy_usage, prm_usage = PolicyUsage(), PRMUsage()
    for part in (pilot, main):
        policy_usage.add(part.policy_usage)
        prm_usage.add(part.prm_usage)
    # The pilot's samples stay candidates: nothing it computed is thrown away. A route that
    # scores nothing (majority, deepconf) is merged with the pilot by a vote.
    rule = "majority" if chosen.strategy in ("majority", "deepconf") else config.selection
    return await finish(
        [*pilot.candidates, *main.candidates],
        rule,
        config,
        iterations=pilot.iterations + main.iterations,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )


def _registered(name: str) -> Strategy | None:
    """The registry's entry ("pilot" is a route, not a strategy: None)."""
    # Imported here: the registry imports this module.
    from tts_server.strategies import REGISTRY

    return REGISTRY.get(name)


def plan_budget(route: Route, client_budget: int, pilot: int) -> tuple[int, int]:
    """(N, beam width) of the routed strategy after the pilot, inside the client's budget.

    N = 0 means the pilot answers. A search gets the largest multiple of its beam width that
    fits (at least one beam width); beam widths above what is left shrink to it. With no pilot
    (a fixed strategy), at least one sample is planned, however small the share.
    """
    total = max(pilot, 1, round(client_budget * route.budget_share))
    left = total - pilot
    if route.strategy == "pilot" or left < 1:
        return 0, 1
    strategy = _registered(route.strategy)
    if strategy is not None and strategy.uses_beam_width:
        width = min(route.beam_width, left)
        return left - left % width, width
    if route.strategy == "greedy":
        return 1, 1
    return left, 1
