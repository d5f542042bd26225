from __future__ import annotations

import pytest

from tts_server.selection import aggregate, select
from tts_server.types import Aggregation, Candidate


def cand(text: str, *scores: float, finished: bool = True) -> Candidate:
    return Candidate(steps=[text], step_scores=list(scores), finished=finished)


# Scores whose last, min, product and mean all differ, so no two rules can be swapped.
@pytest.mark.parametrize(
    ("how", "expected"), [("last", 0.8), ("min", 0.2), ("prod", 0.08), ("mean", 0.5)]
)
def test_aggregate(how: Aggregation, expected: float) -> None:
    assert aggregate([0.5, 0.2, 0.8], how) == pytest.approx(expected)


@pytest.mark.parametrize("how", ["last", "min", "prod", "mean"])
def test_aggregate_of_no_steps_is_zero(how: Aggregation) -> None:
    assert aggregate([], how) == 0.0


def crafted() -> list[Candidate]:
    # naive -> 7 (best single score); weighted -> 1/2 (largest sum); majority -> 3 (most votes)
    return [
        cand("The answer is 3.", 0.3),
        cand("The answer is 0.5.", 0.6),
        cand("The answer is 7.", 0.95),
        cand("The answer is 3.", 0.3),
        cand(r"The answer is $\frac{1}{2}$.", 0.62),
        cand("The answer is 3.", 0.3),
    ]


def test_naive_picks_the_highest_score() -> None:
    selection = select(crafted(), "naive", "last")
    assert (selection.chosen, selection.answer) == (2, "7")


def test_weighted_sums_scores_per_equivalent_answer() -> None:
    candidates = crafted()
    selection = select(candidates, "weighted", "last")
    # 0.5 and \frac{1}{2} are one class, named by its first member; its best member is chosen.
    assert (selection.chosen, selection.answer) == (4, "0.5")
    assert selection.votes == pytest.approx({"3": 0.9, "0.5": 1.22, "7": 0.95})
    assert [c.score for c in candidates] == [0.3, 0.6, 0.95, 0.3, 0.62, 0.3]


def test_majority_counts_votes() -> None:
    selection = select(crafted(), "majority", "last")
    assert selection.answer == "3"
    assert selection.chosen in (0, 3, 5)
    assert selection.votes == {"3": 3.0, "0.5": 2.0, "7": 1.0}


def test_majority_tie_broken_by_summed_score_then_first_occurrence() -> None:
    by_score = [cand("= 1", 0.2), cand("= 1", 0.3), cand("= 2", 0.4), cand("= 2", 0.4)]
    assert select(by_score, "majority", "last").answer == "2"
    full_tie = [cand("= 1", 0.4), cand("= 2", 0.4)]
    assert select(full_tie, "majority", "last").answer == "1"
    full_tie.reverse()
    assert select(full_tie, "majority", "last").answer == "2"


def test_select_uses_the_aggregation() -> None:
    candidates = [
        Candidate(steps=["a = 1\n\n", "so 5"], step_scores=[0.1, 0.9], finished=True),
        Candidate(steps=["b = 2\n\n", "so 6"], step_scores=[0.6, 0.7], finished=True),
    ]
    assert select(candidates, "naive", "last").answer == "5"
    assert select(candidates, "naive", "min").answer == "6"


def test_unfinished_candidates_are_excluded_when_any_finished() -> None:
    candidates = [cand("The answer is 9.", 0.99, finished=False), cand("The answer is 4.", 0.1)]
    for rule in ("naive", "weighted", "majority"):
        selection = select(candidates, rule, "last")
        assert (selection.chosen, selection.answer) == (1, "4")
        assert "9" not in selection.votes


def test_all_unfinished_still_selects() -> None:
    candidates = [cand("= 9", 0.2, finished=False), cand("= 4", 0.7, finished=False)]
    assert select(candidates, "weighted", "last").answer == "4"


def test_candidates_without_answer_never_win() -> None:
    candidates = [cand("I do not know.", 0.99), cand("The answer is 4.", 0.1)]
    for rule in ("naive", "weighted", "majority"):
        selection = select(candidates, rule, "last")
        assert (selection.chosen, selection.answer) == (1, "4")
        assert list(selection.votes) == ["4"]


def test_no_answers_at_all_falls_back_to_the_best_score() -> None:
    candidates = [cand("no idea", 0.2), cand("still no idea", 0.8)]
    selection = select(candidates, "majority", "last")
    assert (selection.chosen, selection.answer, selection.votes) == (1, None, {})


def test_votes_are_keyed_by_canonical_answers_and_answers_are_filled() -> None:
    candidates = [cand(r"\boxed{14.0}", 0.5), cand("The answer is $14$.", 0.25)]
    selection = select(candidates, "weighted", "last")
    assert selection.votes == {"14": 0.75}
    assert selection.answer == "14"
    assert [c.answer for c in candidates] == ["14.0", "14"]


def test_a_given_answer_is_kept() -> None:
    candidates = [Candidate(steps=["= 3"], step_scores=[1.0], finished=True, answer="8")]
    assert select(candidates, "naive", "last").answer == "8"
