"""What `n` > 1 answers with: the n best distinct candidates of a finished search, best first.

"Best" is the request's selection rule, read from the search's votes: the chosen candidate
first, then one candidate per other answer, the answers in order of their votes (count for
majority, summed score for weighted, best score for naive; ties by summed score, then by first
appearance), each answer represented by its highest-scored candidate. Candidates with no
extractable answer come last, by score, distinct by their text. Fewer distinct candidates than
n: fewer choices.
"""

from __future__ import annotations

from collections.abc import Sequence

from tts_server.answers import canonical_answer, group_answers
from tts_server.types import Candidate, StrategyResult


def rank(result: StrategyResult, n: int) -> list[int]:
    """Indices into `result.candidates` of at most `n` distinct candidates, best first."""
    candidates, chosen = result.candidates, result.chosen
    if n <= 1:
        return [chosen]
    # Those that competed in the selection (the finished ones, if any), and the chosen one.
    pool = [i for i, c in enumerate(candidates) if c.finished] or list(range(len(candidates)))
    if chosen not in pool:
        pool.append(chosen)
    class_ids = group_answers([candidates[i].answer for i in pool])
    # What makes two candidates one choice: their answer's class, or, without one, their text.
    key: dict[int, int | str] = {
        i: cid if cid is not None else candidates[i].text.strip()
        for i, cid in zip(pool, class_ids, strict=True)
    }
    members: dict[int | str, list[int]] = {}
    for i in pool:
        members.setdefault(key[i], []).append(i)

    def order(choice: int | str) -> tuple[int, float, float]:
        group = members[choice]
        answer = candidates[group[0]].answer
        votes = result.votes.get(canonical_answer(answer), 0.0) if answer is not None else 0.0
        # Answers before texts without one; then votes, then summed scores.
        return (answer is not None, votes, sum(_score(candidates[i]) for i in group))

    # sorted() is stable and members keep the order of first appearance: ties keep it too.
    rest = sorted((k for k in members if k != key[chosen]), key=order, reverse=True)
    return [chosen, *(_best(candidates, members[k]) for k in rest)][:n]


def _best(candidates: Sequence[Candidate], indices: Sequence[int]) -> int:
    """The highest-scored of `indices`, the first one on ties."""
    return max(indices, key=lambda i: (_score(candidates[i]), -i))


def _score(candidate: Candidate) -> float:
    return candidate.score if candidate.score is not None else 0.0
