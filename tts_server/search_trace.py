"""The search trace of one answered request, as data: the one builder behind the response's
`tts.trace`, the trace export's records (tts_server/traces.py) and the inspector's store.

Its shape is docs/trace.schema.json (explained in docs/trace.md): what ran and was chosen, every
candidate, the tree for the step searches (`kind: "tree"`: beam search, DVTS, and `auto` when it
routed to one) or none for the strategies that sample whole solutions (`kind: "samples"`), the
vote's answer groups, and what each stage cost. Bounded by `TraceLimits`: past them it is cut,
and `truncated` says what was left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tts_server.answers import answers_equal, canonical_answer
from tts_server.engine import Outcome
from tts_server.search_tree import ROOT, SearchTree, TreeNode
from tts_server.types import Candidate


@dataclass(frozen=True)
class TraceLimits:
    max_nodes: int
    # None: texts whole (the export needs them to train on).
    max_text_chars: int | None


def agreement(votes: dict[str, float], answer: str | None) -> float | None:
    """The selected answer's share of the vote (None: no answer or no votes)."""
    total = sum(votes.values())
    if answer is None or total <= 0:
        return None
    return votes.get(answer, 0.0) / total


class _Cutter:
    """Cuts texts to the limit and counts the ones it cut."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.cut = 0

    def __call__(self, text: str) -> str:
        if self.limit is None or len(text) <= self.limit:
            return text
        self.cut += 1
        return text[: self.limit]


def _confidence(candidate: Candidate | None) -> dict[str, Any] | None:
    if candidate is None or candidate.confidence is None:
        return None
    return candidate.confidence.as_dict()


def _candidate(index: int, c: Candidate, cut: _Cutter) -> dict[str, Any]:
    return {
        "index": index,
        "node": c.node,
        "text": cut(c.text),
        "steps": [cut(step) for step in c.steps],
        "step_scores": list(c.step_scores),
        "answer": c.answer,
        "score": c.score,
        "finished": c.finished,
        "finish_reason": c.finish_reason,
        "completion_tokens": len(c.token_ids),
        # DeepConf's measures where the candidate was sampled with logprobs; null otherwise.
        "confidence": _confidence(c),
    }


def _node(node: TreeNode, candidate_index: dict[int, int], cut: _Cutter) -> dict[str, Any]:
    c = node.candidate
    status = node.status
    if c is not None and c.finished and node.id in candidate_index:
        # A deadline can cut the search between a step and its selection: a finished
        # candidate is finished, whatever the search had marked by then.
        status = "finished"
    return {
        "id": node.id,
        "parent": node.parent,
        "depth": node.depth,
        "iteration": node.iteration,
        "subtree": node.subtree,
        "text": cut(node.text),
        "tokens": node.tokens,
        "score": node.score,
        "path_score": c.score if c is not None else None,
        "confidence": _confidence(c),
        "status": status,
        "finish_reason": c.finish_reason if c is not None and c.finished else None,
        "answer": c.answer if c is not None and c.finished else None,
        "candidate": candidate_index.get(node.id),
    }


def _kept_nodes(tree: SearchTree, paths: list[list[int]], limit: int) -> list[TreeNode]:
    """At most `limit` nodes, parents always with their children: the selected path and the
    candidates' paths first (root first), then the others in the order they were made."""
    chosen: dict[int, None] = {}
    for path in paths:
        for node_id in path:
            if len(chosen) >= limit:
                break
            chosen.setdefault(node_id, None)
    for node in tree.nodes:
        if len(chosen) >= limit:
            break
        chosen.setdefault(node.id, None)
    return [tree.nodes[i] for i in sorted(chosen)]


def _levels(nodes: list[TreeNode]) -> list[dict[str, Any]]:
    """Per iteration: how many steps were sampled, kept, pruned, finished or left open, and
    the tokens they generated."""
    rows: dict[int, dict[str, Any]] = {}
    for node in nodes:
        if node.id == ROOT:
            continue
        row = rows.setdefault(
            node.iteration,
            {
                "iteration": node.iteration,
                "nodes": 0,
                "kept": 0,
                "pruned": 0,
                "finished": 0,
                "open": 0,
                "tokens": 0,
            },
        )
        row["nodes"] += 1
        row[node.status] += 1
        row["tokens"] += node.tokens
    return [rows[k] for k in sorted(rows)]


def _groups(candidates: list[Candidate], votes: dict[str, float], answer: str | None) -> list[Any]:
    """The vote's answer groups: each canonical answer with its weight and its candidates."""
    members: dict[str, list[int]] = {name: [] for name in votes}
    for index, c in enumerate(candidates):
        if c.answer is None:
            continue
        name = canonical_answer(c.answer)
        if name not in members:  # math-verify put it in a group under another spelling
            name = next((key for key in votes if answers_equal(c.answer, key)), name)
        if name in members:
            members[name].append(index)
    return [
        {
            "answer": name,
            "weight": votes[name],
            "candidates": members[name],
            "selected": name == answer,
        }
        for name in votes
    ]


def _stages(outcome: Outcome) -> dict[str, dict[str, Any]]:
    """Seconds, tokens and FLOPs per stage: the policy's generation, the PRM's scoring, and
    selection (the rest of the wall time); `auto`'s pilot seconds when it ran one."""
    policy, prm = outcome.result.policy_usage, outcome.result.prm_usage
    seconds = {k: round(v, 4) for k, v in outcome.stages.items()}
    flops = outcome.flops
    stages: dict[str, dict[str, Any]] = {
        "generation": {
            "seconds": seconds.get("generation"),
            "calls": policy.calls,
            "prompt_tokens": policy.prompt_tokens,
            "completion_tokens": policy.completion_tokens,
            "cached_tokens": policy.cached_tokens,
            "flops": flops.policy if flops else None,
        },
        "prm_scoring": {
            "seconds": seconds.get("prm_scoring"),
            "calls": prm.calls,
            "steps_scored": prm.steps_scored,
            "tokens": prm.tokens,
            "flops": flops.prm if flops else None,
        },
        "selection": {"seconds": seconds.get("selection")},
    }
    if "pilot" in seconds:
        stages["pilot"] = {"seconds": seconds["pilot"]}
    return stages


def search_trace(outcome: Outcome, limits: TraceLimits) -> dict[str, Any]:
    """The trace of an answered request (docs/trace.schema.json)."""
    job, result, decision = outcome.job, outcome.result, outcome.decision
    policy, prm = result.policy_usage, result.prm_usage
    cut = _Cutter(limits.max_text_chars)
    tree = outcome.tree
    has_tree = tree is not None and len(tree.nodes) > 1
    candidates = [_candidate(i, c, cut) for i, c in enumerate(result.candidates)]
    nodes: list[dict[str, Any]] = []
    levels: list[dict[str, Any]] = []
    selected_path: list[int] = []
    omitted = 0
    if tree is not None and has_tree:
        selected_path = tree.path(result.best.node)
        paths = [selected_path, *(tree.path(c.node) for c in result.candidates)]
        kept = _kept_nodes(tree, paths, limits.max_nodes)
        omitted = len(tree.nodes) - len(kept)
        index = {c.node: i for i, c in enumerate(result.candidates) if c.node is not None}
        nodes = [_node(node, index, cut) for node in kept]
        levels = _levels(tree.nodes)
    return {
        "kind": "tree" if has_tree else "samples",
        "strategy": job.strategy,
        "requested_strategy": job.requested,
        "route": decision.route() if decision else None,
        "difficulty": decision.difficulty.as_dict() if decision and decision.difficulty else None,
        "budget": job.budget,
        "beam_width": job.beam_width,
        "aggregation": job.aggregation,
        "selection": job.selection,
        "temperature": job.temperature,
        "candidates": candidates,
        "nodes": nodes,
        "levels": levels,
        "selected": result.chosen,
        "selected_path": selected_path,
        "choices": list(outcome.choices or [result.chosen]),
        "answer": result.answer,
        "votes": dict(result.votes),
        "agreement": agreement(result.votes, result.answer),
        "groups": _groups(result.candidates, result.votes, result.answer),
        "iterations": result.iterations,
        "partial": outcome.partial,
        "degraded": job.degraded,
        "flops": outcome.flops.as_dict() if outcome.flops else None,
        "max_flops": job.max_flops,
        "flops_limited": outcome.flops_limited,
        "usage": {
            "prompt_tokens": policy.prompt_tokens,
            "completion_tokens": policy.completion_tokens,
            "cached_tokens": policy.cached_tokens,
            "policy_calls": policy.calls,
            "prm_calls": prm.calls,
            "prm_steps_scored": prm.steps_scored,
            "prm_tokens": prm.tokens,
        },
        "stages": _stages(outcome),
        "wall_time_s": round(outcome.wall_time_s, 4),
        "truncated": {
            "any": omitted > 0 or cut.cut > 0,
            "nodes_omitted": omitted,
            "texts_cut": cut.cut,
            "max_nodes": limits.max_nodes,
            "max_text_chars": limits.max_text_chars,
        },
    }
