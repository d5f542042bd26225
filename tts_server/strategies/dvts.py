"""Diverse verifier tree search: N/M independent subtrees, each greedily follows its best of M.

Each subtree's prompts carry its own affinity label: with the "subtree" affinity scope a subtree
stays on one replica (its prefixes cached there) while the subtrees spread over the replicas.
"""

from __future__ import annotations

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
    tree = config.tree
    iterations = 0
    for iteration in range(config.max_iterations):
        live = [t for t in subtrees if t.live]
        if not live:
            break
        last = iteration == config.max_iterations - 1
        iterations += 1
        heads = [t.head for t in live]
        labels = [t.label for t in live]
        expanded = await expand(
            problem, heads, config, policy, policy_usage, n=width, last=last, affinity=labels
        )
        if tree is not None:
            tree.grow(heads, expanded, iteration + 1, [int(label) for label in labels])
        await score(verifier, problem, [c for kids in expanded for c in kids], config, prm_usage)
        for subtree, children in zip(live, expanded, strict=True):
            subtree.finished.extend(c for c in children if c.finished)
            # The first of the best on ties; a subtree never looks at another's children.
            subtree.head = max(children, key=lambda c: c.score or 0.0)
            if tree is not None:
                tree.settle(children, kept=[subtree.head])

    candidates = [c for t in subtrees for c in t.finished]
    if not candidates:
        candidates = [t.head for t in subtrees]  # nothing finished: best prefixes, unfinished
    if tree is not None:  # heads still unfinished when the iterations ran out
        tree.mark((t.head for t in subtrees if t.live), "open")
    return await finish(
        candidates,
        config.selection,
        config,
        iterations=iterations,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )
