from __future__ import annotations

import pytest

from tts_server.confidence import Confidence, TokenLogprob
from tts_server.selection import aggregate, select
from tts_server.types import Aggregation, Candidate, ConfidenceConfig


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


# --- votes by trace confidence (DeepConf) ---


def confident(answer: str, bottom_10: float) -> Candidate:
    return Candidate(
        steps=[f"The answer is {answer}."],
        finished=True,
        answer=answer,
        confidence=Confidence(mean=9.0, lowest_group=9.0, tail=9.0, bottom_10=bottom_10, tokens=5),
    )


def test_the_confidence_votes_weigh_answers_by_confidence_and_filter_the_least_sure() -> None:
    # One sure "5" against two hesitant "7"s: majority and the confidence vote say 7 (1.2 > 1.0),
    # the filtered vote keeping ceil(0.34 * 3) = 2 candidates (1.0 and the first 0.6) says 5.
    pool = [confident("5", 1.0), confident("7", 0.6), confident("7", 0.6)]
    measure = ConfidenceConfig(metric="bottom_10", keep=0.34)
    majority = select(pool, "majority", "last", measure)
    weighted = select(pool, "confidence", "last", measure)
    filtered = select(pool, "filtered", "last", measure)
    assert (majority.answer, majority.votes) == ("7", {"5": 1.0, "7": 2.0})
    assert (weighted.answer, weighted.chosen) == ("7", 1)
    assert weighted.votes == pytest.approx({"5": 1.0, "7": 1.2})
    assert (filtered.answer, filtered.chosen, filtered.votes) == ("5", 0, {"5": 1.0, "7": 0.6})
    # Keeping everything, the filtered vote is the confidence vote.
    everyone = select(pool, "filtered", "last", ConfidenceConfig(keep=1.0))
    assert (everyone.answer, everyone.votes) == ("7", pytest.approx({"5": 1.0, "7": 1.2}))


def test_the_confidence_vote_uses_the_metric_asked_for_and_measures_from_logprobs() -> None:

    def sampled(answer: str, top: float) -> Candidate:
        token = TokenLogprob("x", top, (("x", top), ("y", -3.0)))
        return Candidate(steps=[f"The answer is {answer}."], finished=True, logprobs=[token] * 4)

    # Token confidence (k = 2): (0.1 + 3) / 2 = 1.55 for the "5", (1.0 + 3) / 2 = 2.0 for the
    # "7": minus the mean of the top k, as DeepConf defines it (the tail of 2 tokens here).
    pool = [sampled("5", -0.1), sampled("7", -1.0)]
    chosen = select(
        pool, "confidence", "last", ConfidenceConfig(k=2, window=2, tail=2, metric="tail")
    )
    assert [c.confidence.tail if c.confidence else None for c in pool] == pytest.approx([1.55, 2.0])
    assert chosen.answer == "7" and chosen.votes == pytest.approx({"5": 1.55, "7": 2.0})


def test_without_confidences_the_confidence_votes_count_like_majority() -> None:
    pool = [Candidate(steps=[f"The answer is {a}."], finished=True) for a in ("5", "7", "7")]
    chosen = select(pool, "filtered", "last", ConfidenceConfig())
    assert (chosen.answer, chosen.votes) == ("7", {"5": 1.0, "7": 2.0})
