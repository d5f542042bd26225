"""Diverse verifier tree search: N/M independent subtrees, each greedily follows its best of M.

The subtrees advance on their own: each samples its M next steps, has them scored and takes the
best as soon as its own calls return, never waiting for another subtree's step (a step waits
for its slowest sample, and in lockstep every subtree would wait for the slowest of all). A
seeded request keeps lockstep instead: the client numbers a request's samples in call order, and
only lockstep makes that order, and so the samples, the same on every run.

Each subtree's prompts carry its own affinity label: with the "subtree" affinity scope a subtree
stays on one replica (its prefixes cached there) while the subtrees spread over the replicas.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tts_server.strategies.common import expand, finish, require_prm, score
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


@dataclass
class _Subtree:
    label: str
    head: Candidate = field(default_factory=Candidate)
    finished: list[Candidate] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.head.finished


async def dvts(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    verifier = require_prm(prm, "dvts")
    n, width = config.budget, config.beam_width
    assert width >= 1 and n % width == 0, "the budget must be a multiple of the beam width"
    policy_usage, prm_usage = PolicyUsage(), PRMUsage()

    subtrees = [_Subtree(str(k)) for k in range(n // width)]
    if config.seed is None:
        iterations = await _apart(
            problem, config, policy, verifier, subtrees, policy_usage, prm_usage
        )
    else:
        iterations = await _lockstep(
            problem, config, policy, verifier, subtrees, policy_usage, prm_usage
        )

    candidates = [c for t in subtrees for c in t.finished]
    if not candidates:
        candidates = [t.head for t in subtrees]  # nothing finished: best prefixes, unfinished
    if config.tree is not None:  # heads still unfinished when the iterations ran out
        config.tree.mark((t.head for t in subtrees if t.live), "open")
    return await finish(
        candidates,
        config.selection,
        config,
        iterations=iterations,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )


async def _step(
    problem: Problem,
    config: SearchConfig,
    policy: PolicyClient,
    verifier: PRMClient,
    live: list[_Subtree],
    policy_usage: PolicyUsage,
    prm_usage: PRMUsage,
    *,
    iteration: int,
) -> None:
    """One step (0-based `iteration`) of the `live` subtrees: M next steps each, scored, the
    best of each kept; recorded in the search tree when one is kept."""
    width = config.beam_width
    last = iteration == config.max_iterations - 1
    heads = [t.head for t in live]
    labels = [t.label for t in live]
    expanded = await expand(
        problem, heads, config, policy, policy_usage, n=width, last=last, affinity=labels
    )
    tree = config.tree
    if tree is not None:
        tree.grow(heads, expanded, iteration + 1, [int(label) for label in labels])
    await score(verifier, problem, [c for kids in expanded for c in kids], config, prm_usage)
    for subtree, children in zip(live, expanded, strict=True):
        subtree.finished.extend(c for c in children if c.finished)
        # The first of the best on ties; a subtree never looks at another's children.
        subtree.head = max(children, key=lambda c: c.score or 0.0)
        if tree is not None:
            tree.settle(children, kept=[subtree.head])


async def _apart(
    problem: Problem,
    config: SearchConfig,
    policy: PolicyClient,
    verifier: PRMClient,
    subtrees: list[_Subtree],
    policy_usage: PolicyUsage,
    prm_usage: PRMUsage,
) -> int:
    """Every subtree on its own; the iterations are the deepest subtree's."""
    tasks = [
        asyncio.ensure_future(
            _lockstep(problem, config, policy, verifier, [t], policy_usage, prm_usage)
        )
        for t in subtrees
    ]
    try:
        steps = await asyncio.gather(*tasks)
    except BaseException:  # the first failure (as itself, not a group) ends the other subtrees
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return max(steps, default=0)


async def _lockstep(
    problem: Problem,
    config: SearchConfig,
    policy: PolicyClient,
    verifier: PRMClient,
    subtrees: list[_Subtree],
    policy_usage: PolicyUsage,
    prm_usage: PRMUsage,
) -> int:
    """Every live subtree's step in one policy call and one PRM call, until none is live."""
    iterations = 0
    for iteration in range(config.max_iterations):
        live = [t for t in subtrees if t.live]
        if not live:
            break
        iterations += 1
        await _step(
            problem, config, policy, verifier, live, policy_usage, prm_usage, iteration=iteration
        )
    return iterations
