"""`n` > 1: the n best distinct candidates by the selection rule, best first (tts_server.choices),
on hand-made candidates whose orders differ per rule."""

from __future__ import annotations

import pytest

from tts_server.choices import rank
from tts_server.selection import select
from tts_server.types import Candidate, SelectionRule, StrategyResult


def cand(text: str, score: float, *, finished: bool = True) -> Candidate:
    return Candidate(steps=[text], step_scores=[score], finished=finished)


def crafted() -> list[Candidate]:
    # Votes per answer: 3 (x3, sum 0.9, best 0.3), 1/2 (x2, sum 1.22, best 0.62), 7 (x1, 0.95).
    return [
        cand("The answer is 3.", 0.3),
        cand("The answer is 0.5.", 0.6),
        cand("The answer is 7.", 0.95),
        cand("The answer is 3.", 0.3),
        cand(r"The answer is $\frac{1}{2}$.", 0.62),
        cand("The answer is 3.", 0.3),
    ]


def ranked(candidates: list[Candidate], rule: SelectionRule, n: int) -> list[int]:
    selection = select(candidates, rule, "last")
    result = StrategyResult(candidates, selection.chosen, selection.answer, selection.votes)
    return rank(result, n)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # Majority: by count (3: 3 votes, 1/2: 2, 7: 1); 1/2's best-scored member is #4.
        ("majority", [0, 4, 2]),
        # Weighted: by summed score (1/2: 1.22, 7: 0.95, 3: 0.9).
        ("weighted", [4, 2, 0]),
        # Naive: by best score (7: 0.95, 1/2: 0.62, 3: 0.3).
        ("naive", [2, 4, 0]),
    ],
)
def test_choices_follow_the_selection_rule_one_per_answer(
    rule: SelectionRule, expected: list[int]
) -> None:
    assert ranked(crafted(), rule, 3) == expected
    # The first choice is always the one the rule selected; n cuts the list.
    assert ranked(crafted(), rule, 2) == expected[:2]
    assert ranked(crafted(), rule, 1) == expected[:1]


def test_fewer_distinct_answers_than_n_give_fewer_choices() -> None:
    assert ranked(crafted(), "majority", 6) == [0, 4, 2]


def test_candidates_without_an_answer_come_last_distinct_by_text() -> None:
    candidates = [
        cand("I do not know", 0.99),
        cand("The answer is 5.", 0.2),
        cand("  I do not know", 0.5),
        cand("no idea at all", 0.4),
    ]
    assert ranked(candidates, "weighted", 4) == [1, 0, 3]


def test_unfinished_candidates_are_no_choices_when_finished_ones_exist() -> None:
    candidates = [
        cand("The answer is 4.", 0.9),
        cand("The answer is 6.", 0.99, finished=False),
        cand("The answer is 5.", 0.1),
    ]
    assert ranked(candidates, "naive", 3) == [0, 2]


def test_ties_keep_the_order_of_first_appearance() -> None:
    candidates = [cand(f"The answer is {k}.", 0.5) for k in (4, 9, 6, 2)]
    assert ranked(candidates, "majority", 4) == [0, 1, 2, 3]
