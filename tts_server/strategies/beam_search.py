"""Beam search over steps: N beams, the PRM keeps the best N/M, each copied M times.

Its beams are one tree (a survivor's copies replace any beam), so its calls carry no affinity
labels: under either affinity scope the whole search stays on one replica, near its prefixes.
"""

from __future__ import annotations

from tts_server.strategies.common import clone, expand, finish, require_prm, score
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


async def beam_search(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    verifier = require_prm(prm, "beam_search")
    n, width = config.budget, config.beam_width
    assert width >= 1 and n % width == 0, "the budget must be a multiple of the beam width"
    keep = n // width
    policy_usage, prm_usage = PolicyUsage(), PRMUsage()
    tree = config.tree

    active = [Candidate() for _ in range(n)]
    completed: list[Candidate] = []
    iterations = 0
    for iteration in range(config.max_iterations):
        last = iteration == config.max_iterations - 1
        iterations += 1
        expanded = await expand(problem, active, config, policy, policy_usage, n=1, last=last)
        beams = [children[0] for children in expanded]
        if tree is not None:
            tree.grow(active, expanded, iteration + 1)
        await score(verifier, problem, beams, config, prm_usage)
        completed.extend(b for b in beams if b.finished)
        unfinished = [b for b in beams if not b.finished]
        if len(completed) >= n or not unfinished or last:
            active = unfinished
            if tree is not None:  # the search stops here: the unfinished stay open
                tree.settle(beams, kept=())
                tree.mark(unfinished, "open")
            break
        survivors = _ranked(unfinished)[:keep]
        if tree is not None:
            tree.settle(beams, kept=survivors)
        active = [clone(survivors[i % len(survivors)]) for i in range(n)]

    pool = completed or active
    candidates = _ranked(pool)[:n]
    if tree is not None:  # finished beams past the best n are dropped by the final ranking
        chosen = {id(c) for c in candidates}
        tree.mark((c for c in pool if id(c) not in chosen), "pruned")
    return await finish(
        candidates,
        config.selection,
        config,
        iterations=iterations,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )


def _ranked(beams: list[Candidate]) -> list[Candidate]:
    """Highest score first; earlier beams first on ties."""
    return sorted(beams, key=lambda b: -(b.score or 0.0))
