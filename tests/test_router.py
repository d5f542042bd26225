"""The router: tables, difficulty bins, budgets and stopping rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tts_server.router import (
    BINS,
    Route,
    RouterTable,
    RouterTableError,
    default_table,
    estimate,
    load_table,
    parse_table,
    stops_sampling,
    true_bin,
)
from tts_server.strategies.auto import plan_budget
from tts_server.types import Candidate


def test_default_table_follows_policy_size() -> None:
    small = default_table(135_000_000)
    assert [small.routes[b].strategy for b in ("easy", "medium", "hard")] == [
        "best_of_n",
        "beam_search",
        "beam_search",
    ]
    mid = default_table(14_000_000_000)
    assert [mid.routes[b].strategy for b in ("easy", "medium", "hard")] == [
        "dvts",
        "dvts",
        "beam_search",
    ]
    assert {r.strategy for r in default_table(72_000_000_000).routes.values()} == {"best_of_n"}
    assert {r.strategy for r in default_table(1, weak_prm=True).routes.values()} == {"best_of_n"}


@pytest.mark.parametrize(
    ("route", "budget", "pilot", "expected"),
    [
        (Route("best_of_n"), 8, 4, (4, 1)),
        (Route("beam_search", 4), 8, 2, (4, 4)),
        (Route("beam_search", 4), 16, 4, (12, 4)),
        (Route("dvts", 4), 8, 4, (4, 4)),
        (Route("dvts", 4), 6, 4, (2, 2)),
        (Route("pilot"), 8, 4, (0, 1)),
        (Route("best_of_n"), 4, 4, (0, 1)),
        (Route("best_of_n", budget_share=0.5), 16, 4, (4, 1)),
    ],
)
def test_plan_budget_stays_inside_the_clients_budget(
    route: Route, budget: int, pilot: int, expected: tuple[int, int]
) -> None:
    n, width = plan_budget(route, budget, pilot)
    assert (n, width) == expected
    assert pilot + n <= max(budget, pilot)
    if n:
        assert n % width == 0


def candidate(answer: str | None, score: float) -> Candidate:
    return Candidate(steps=["x"], finished=True, answer=answer, score=score)


def test_difficulty_bins_from_score_and_agreement() -> None:
    table = RouterTable(easy_min=0.75, medium_min=0.45, routes=default_table(None).routes)
    agree = estimate(table, [candidate("5", 0.9)] * 4)
    assert (agree.bin, agree.agreement, round(agree.mean_score, 2)) == ("easy", 1.0, 0.9)
    split = estimate(table, [candidate("1", 0.7), candidate("2", 0.7), candidate(None, 0.7)])
    assert split.bin == "medium" and split.agreement == pytest.approx(1 / 3)
    lost = estimate(table, [candidate(None, 0.1), candidate("2", 0.2)])
    assert lost.bin == "hard"


def test_true_bins_are_liu_et_al() -> None:
    assert [true_bin(p) for p in (1.0, 0.5, 0.49, 0.1, 0.09, 0.0)] == [
        "easy",
        "easy",
        "medium",
        "medium",
        "hard",
        "hard",
    ]


def test_table_round_trips_and_rejects_nonsense(tmp_path: Path) -> None:
    table = default_table(135_000_000)
    path = tmp_path / "router.json"
    path.write_text(json.dumps(table.to_json()))
    assert load_table(path) == table
    bad = table.to_json()
    bad["routes"]["easy"]["strategy"] = "telepathy"
    with pytest.raises(RouterTableError, match="strategy"):
        parse_table(bad)
    with pytest.raises(RouterTableError, match="fixed_strategy"):
        parse_table({**table.to_json(), "fixed_strategy": "pilot"})
    with pytest.raises(RouterTableError, match="bins"):
        parse_table({**table.to_json(), "routes": {}})
    assert table.summary() == (
        "a pilot of 4 samples, then easy: best_of_n, medium: beam_search, hard: beam_search"
    )
    fixed = RouterTable(fixed_strategy="dvts", fixed_budget_share=0.5, fixed_beam_width=4)
    assert fixed.summary() == "dvts on 50% of the client's budget, beam width 4, no pilot"
    for share in (0, 1.5):
        with pytest.raises(RouterTableError, match="fixed_budget_share"):
            parse_table({**table.to_json(), "fixed_budget_share": share})
    with pytest.raises(RouterTableError, match="fixed_beam_width"):
        parse_table({**table.to_json(), "fixed_beam_width": 0})
    path.write_text("{not json")
    with pytest.raises(RouterTableError):
        load_table(path)


def test_adaptive_sampling_stops_when_the_answer_is_settled_or_unsettleable() -> None:
    rule = Route("adaptive", stop_margin=2, give_up_after=4)
    assert not stops_sampling(["5", "6"], rule)
    assert stops_sampling(["5", "5"], rule)  # two ahead of nothing
    assert not stops_sampling(["5", "5", "6"], rule)  # one ahead
    assert stops_sampling(["5", "5", "6", "5"], rule)
    # Equivalent answers are one answer; unanswered samples vote for nothing.
    assert stops_sampling(["5", None, "5.0"], rule)
    assert not stops_sampling([None, None, "5"], rule)
    # Four samples, no two equal: give up.
    assert not stops_sampling(["1", "2", "3"], rule)
    assert stops_sampling(["1", "2", "3", "4"], rule)
    assert stops_sampling([None, None, None, None], rule)
    # Each rule can be switched off.
    assert not stops_sampling(["1", "2", "3", "4"], Route("adaptive", give_up_after=None))
    assert not stops_sampling(["5", "5", "5"], Route("adaptive", stop_margin=None))


def test_adaptive_routes_round_trip_and_bad_rules_are_named(tmp_path: Path) -> None:
    adaptive = Route("adaptive", round_size=1, stop_margin=None, give_up_after=5)
    table = RouterTable(routes={"easy": Route("pilot"), "medium": adaptive, "hard": adaptive})
    path = tmp_path / "router.json"
    path.write_text(json.dumps(table.to_json()))
    assert load_table(path) == table
    for field, value in (("round_size", 0), ("stop_margin", 0), ("give_up_after", "four")):
        bad = table.to_json()
        bad["routes"]["hard"][field] = value
        with pytest.raises(RouterTableError, match="hard"):
            parse_table(bad)
    with pytest.raises(RouterTableError, match="fixed_strategy"):
        parse_table({**table.to_json(), "fixed_strategy": "pilot"})


def test_the_beta_rule_stops_once_the_leader_is_surely_ahead() -> None:
    beta = Route("adaptive", stop_margin=None, give_up_after=None, beta_threshold=0.95)
    assert not stops_sampling(["5", "5", "5"], beta)  # P = 15/16 = 0.9375
    assert stops_sampling(["5", "5", "5", "5"], beta)  # 31/32 = 0.969
    assert not stops_sampling(["5", "5", "5", "5", "7"], beta)  # 4 to 1: 57/64 = 0.89
    assert not stops_sampling([None, None, None, None], beta)  # no answer leads
    table = RouterTable(routes=dict.fromkeys(BINS, beta))
    assert parse_table(table.to_json()) == table
    with pytest.raises(RouterTableError, match="beta_threshold"):
        bad = table.to_json()
        bad["routes"]["easy"]["beta_threshold"] = 1.5
        parse_table(bad)
