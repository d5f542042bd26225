"""Scoring candidates from their step scores and choosing one: naive, weighted or majority by
PRM scores and counts, or `confidence` and `filtered` by DeepConf's trace confidence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tts_server.answers import canonical_answer, extract_answer, group_answers
from tts_server.confidence import trace_confidence
from tts_server.types import Aggregation, Candidate, ConfidenceConfig, SelectionRule


def aggregate(step_scores: Sequence[float], how: Aggregation) -> float:
    """One score for a solution from its step scores; 0.0 for no steps."""
    if not step_scores:
        return 0.0
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    if how == "mean":
        return float(sum(step_scores) / len(step_scores))
    raise ValueError(f"unknown aggregation {how!r}")


@dataclass
class Selection:
    """The chosen candidate (an index into the candidates given), its answer and the votes.

    `answer` is the canonical form of the winning answer class, i.e. a key of `votes`. Votes are
    counts for majority, summed scores for weighted, the best score per answer for naive, and
    summed confidences for confidence and filtered (over the candidates kept).
    """

    chosen: int
    answer: str | None
    votes: dict[str, float] = field(default_factory=dict)


def measure(candidates: Sequence[Candidate], config: ConfidenceConfig) -> None:
    """Set `.confidence` of every candidate sampled with logprobs that has none yet."""
    for candidate in candidates:
        if candidate.confidence is None and candidate.logprobs:
            candidate.confidence = trace_confidence(
                candidate.logprobs, k=config.k, window=config.window, tail=config.tail
            )


def select(
    candidates: Sequence[Candidate],
    rule: SelectionRule,
    aggregation: Aggregation,
    confidence: ConfidenceConfig | None = None,
) -> Selection:
    """Score every candidate (sets `.score`, fills a missing `.answer`, and `.confidence` where
    it has logprobs) and choose one.

    Only finished candidates compete when any exist; a candidate without an answer wins only if
    no competitor has an answer, and then by score alone. `confidence` and `filtered` need
    `confidence` (what to measure); with no candidate measured they count votes as majority.
    """
    if not candidates:
        raise ValueError("no candidates to select from")
    for candidate in candidates:
        candidate.score = aggregate(candidate.step_scores, aggregation)
        if candidate.answer is None:
            candidate.answer = extract_answer(candidate.text)
    if confidence is not None:
        measure(candidates, confidence)

    pool = [i for i, c in enumerate(candidates) if c.finished] or list(range(len(candidates)))
    answered = [i for i in pool if candidates[i].answer is not None]
    if not answered:
        return Selection(chosen=_best_scored(candidates, pool), answer=None)

    class_ids = group_answers([candidates[i].answer for i in answered])
    members: dict[int, list[int]] = {}
    for index, class_id in zip(answered, class_ids, strict=True):
        assert class_id is not None
        members.setdefault(class_id, []).append(index)
    # Class ids number classes in order of first appearance, so iterating `members` in id
    # order and keeping the first maximum breaks ties by first occurrence.
    names = {cid: canonical_answer(_answer(candidates[idx[0]])) for cid, idx in members.items()}
    sums = {cid: sum(_score(candidates[i]) for i in idx) for cid, idx in members.items()}

    if rule in ("confidence", "filtered") and confidence is not None:
        weight = {i: _confidence(candidates[i], confidence) for i in answered}
        if any(w is not None for w in weight.values()):
            return _confidence_vote(candidates, rule, confidence, members, names, weight)
        rule = "majority"  # nothing was sampled with logprobs: a plain vote
    if rule == "naive":
        chosen = _best_scored(candidates, answered)
        best = {cid: max(_score(candidates[i]) for i in idx) for cid, idx in members.items()}
        winner = next(cid for cid, idx in members.items() if chosen in idx)
        return Selection(chosen, names[winner], {names[c]: best[c] for c in members})
    if rule == "weighted":
        winner = max(members, key=lambda cid: sums[cid])
        votes = {names[c]: sums[c] for c in members}
    elif rule == "majority":
        winner = max(members, key=lambda cid: (len(members[cid]), sums[cid]))
        votes = {names[c]: float(len(members[c])) for c in members}
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return Selection(_best_scored(candidates, members[winner]), names[winner], votes)


def _confidence_vote(
    candidates: Sequence[Candidate],
    rule: SelectionRule,
    config: ConfidenceConfig,
    members: dict[int, list[int]],
    names: dict[int, str],
    weight: dict[int, float | None],
) -> Selection:
    """DeepConf's votes: every answered candidate votes with its confidence (`confidence`), or
    only the most confident `keep` share of them does (`filtered`, at least one). The most
    confident member of the winning class is chosen (then the best scored, then the first)."""
    ranked = sorted(weight, key=lambda i: (-(weight[i] or 0.0), i))
    kept = set(ranked)
    if rule == "filtered":
        kept = set(ranked[: max(1, math.ceil(config.keep * len(ranked)))])
    sums: dict[int, float] = {}
    for cid, idx in members.items():
        voters = [i for i in idx if i in kept]
        if voters:
            sums[cid] = sum(weight[i] or 0.0 for i in voters)
    winner = max(sums, key=lambda cid: sums[cid])  # dicts keep first appearance: ties go first
    voters = [i for i in members[winner] if i in kept]
    chosen = max(voters, key=lambda i: (weight[i] or 0.0, _score(candidates[i]), -i))
    return Selection(chosen, names[winner], {names[c]: sums[c] for c in sums})


def _confidence(candidate: Candidate, config: ConfidenceConfig) -> float | None:
    if candidate.confidence is None:
        return None
    return candidate.confidence.metric(config.metric)


def _best_scored(candidates: Sequence[Candidate], indices: Sequence[int]) -> int:
    """The highest-scored of `indices`, the first one on ties."""
    return max(indices, key=lambda i: (_score(candidates[i]), -i))


def _score(candidate: Candidate) -> float:
    return candidate.score if candidate.score is not None else 0.0


def _answer(candidate: Candidate) -> str:
    assert candidate.answer is not None
    return candidate.answer
