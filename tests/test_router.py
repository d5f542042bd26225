"""The router: tables, difficulty bins, budgets, and `auto` end to end over fakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakes import FakePolicy, FakePRM, encode, per_step
from tts_server.engine import TTSEngine
from tts_server.plan import Plan
from tts_server.prompting import RenderedPrompt
from tts_server.router import (
    BINS,
    Route,
    RouterTable,
    RouterTableError,
    default_table,
    estimate,
    load_table,
    parse_table,
    plan_budget,
    stops_sampling,
    true_bin,
)
from tts_server.settings import Settings
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
        parse_table({**table.to_json(), "fixed_strategy": "adaptive"})


# --- auto through the engine, with fakes ---

PROMPT = "Q: How many?\nA:"


def agreeing(prompt: list[int], sample: int) -> str:
    return "2 + 3 = 5\n\nThe answer is 5."


def disagreeing(prompt: list[int], sample: int) -> str:
    done = "".join(chr(t) for t in prompt)[len(PROMPT) :]
    if done:  # a continuation: finish the step the search started
        return "The answer is 7."
    return f"{sample} + 1 = {sample + 1}\n\nThe answer is {sample + 1}."


class TokenizingFake(FakePolicy):
    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode(PROMPT)

    async def tokenize_text(self, text: str) -> list[int]:
        return encode(text)


def plan(budget: int) -> Plan:
    return Plan("auto", "auto", budget, 1, "last", "weighted")


async def run_auto(policy: TokenizingFake, prm: FakePRM, budget: int = 8) -> object:
    settings = Settings(policy_params=1000, prm_params=0, policy_model="fake")
    engine = TTSEngine(settings, policy, prm)
    rendered = RenderedPrompt("How many?", encode(PROMPT), [])
    return await engine.run(
        rendered, plan(budget), max_tokens=64, temperature=0.8, top_p=1.0, stops=[]
    )


async def test_auto_exits_early_when_the_pilot_agrees() -> None:
    policy = TokenizingFake(agreeing)
    outcome = await run_auto(policy, FakePRM(per_step(lambda s: 0.95)))
    assert outcome.route is not None and outcome.difficulty is not None  # type: ignore[attr-defined]
    assert outcome.route.early_exit and outcome.route.strategy == "pilot"  # type: ignore[attr-defined]
    assert outcome.difficulty.bin == "easy"  # type: ignore[attr-defined]
    assert len(policy.calls) == 1  # only the pilot ran
    assert outcome.result.answer == "5"  # type: ignore[attr-defined]
    assert outcome.flops.policy > 0  # type: ignore[attr-defined]


async def test_auto_routes_a_hard_question_and_keeps_the_pilot() -> None:
    policy = TokenizingFake(disagreeing)
    outcome = await run_auto(policy, FakePRM(per_step(lambda s: 0.2)))
    route, difficulty = outcome.route, outcome.difficulty  # type: ignore[attr-defined]
    assert difficulty.bin == "hard" and not route.early_exit
    assert route.strategy == "beam_search"  # the default table for a small policy
    assert route.budget == 8  # pilot 4 + one beam of width 4
    result = outcome.result  # type: ignore[attr-defined]
    # The pilot's 4 whole solutions are still candidates, beside the search's.
    pilot_answers = {c.answer for c in result.candidates[:4]}
    assert pilot_answers == {"1", "2", "3", "4"}
    assert len(result.candidates) > 4
    assert result.policy_usage.calls == len(policy.calls)


@pytest.mark.parametrize(
    ("share", "width", "served"),
    [
        (1.0, None, (8, 4)),  # the whole budget, the server's beam width
        (0.5, 2, (4, 2)),  # the share and width calibration measured it with
    ],
)
async def test_a_table_with_a_fixed_strategy_runs_it_without_a_pilot(
    tmp_path: Path, share: float, width: int | None, served: tuple[int, int]
) -> None:
    table = tmp_path / "table.json"
    fixed = RouterTable(
        routes=dict.fromkeys(BINS, Route("pilot")),
        fixed_strategy="dvts",
        fixed_budget_share=share,
        fixed_beam_width=width,
    )
    table.write_text(json.dumps(fixed.to_json()))
    policy = TokenizingFake(disagreeing)
    settings = Settings(policy_params=1000, prm_params=0, policy_model="fake", router_table=table)
    engine = TTSEngine(settings, policy, FakePRM(per_step(lambda s: 0.2)))
    rendered = RenderedPrompt("How many?", encode(PROMPT), [])
    outcome = await engine.run(
        rendered, plan(8), max_tokens=64, temperature=0.8, top_p=1.0, stops=[]
    )
    assert outcome.difficulty is None
    assert outcome.route is not None
    route = outcome.route
    assert (route.strategy, route.budget, route.beam_width) == ("dvts", *served)
    # No pilot: the first call starts the search's beams, not 4 whole samples.
    first = policy.calls[0]
    assert len(first.prompts) * first.n == served[0]
    # A budget too small for the share still runs one sample.
    outcome = await engine.run(
        rendered, plan(1), max_tokens=64, temperature=0.8, top_p=1.0, stops=[]
    )
    assert outcome.route is not None and outcome.route.budget == 1


def scripted(answers: list[int]) -> tuple[TokenizingFake, list[int]]:
    """A policy whose k-th sample, over all calls, answers answers[k]."""
    drawn: list[int] = []

    def script(prompt: list[int], sample: int) -> str:
        value = answers[len(drawn)]
        drawn.append(value)
        return f"{value} + 0 = {value}\n\nThe answer is {value}."

    return TokenizingFake(script), drawn


def adaptive_engine(tmp_path: Path, policy: TokenizingFake, rule: Route) -> TTSEngine:
    table = tmp_path / "table.json"
    table.write_text(json.dumps(RouterTable(routes=dict.fromkeys(BINS, rule)).to_json()))
    settings = Settings(policy_params=1000, prm_params=0, policy_model="fake", router_table=table)
    return TTSEngine(settings, policy, FakePRM(per_step(lambda s: 0.5)))


async def test_adaptive_route_samples_in_rounds_until_one_answer_leads(tmp_path: Path) -> None:
    # Pilot 5 5 6 7 (one ahead), then rounds of 2: 5 8 (two ahead: stop).
    policy, drawn = scripted([5, 5, 6, 7, 5, 8, 9, 9, 9, 9])
    engine = adaptive_engine(tmp_path, policy, Route("adaptive", round_size=2, give_up_after=None))
    rendered = RenderedPrompt("How many?", encode(PROMPT), [])
    outcome = await engine.run(
        rendered, plan(8), max_tokens=64, temperature=0.8, top_p=1.0, stops=[]
    )
    assert outcome.route is not None
    assert (outcome.route.strategy, outcome.route.budget) == ("adaptive", 6)
    assert len(drawn) == 6 and [c.n * len(c.prompts) for c in policy.calls] == [4, 2]
    result = outcome.result
    assert len(result.candidates) == 6  # the pilot's samples are candidates too
    assert result.answer == "5"
    assert result.policy_usage.calls == 2
    assert outcome.flops is not None and outcome.flops.policy > 0


async def test_adaptive_route_gives_up_or_spends_the_budget(tmp_path: Path) -> None:
    # No two pilot samples agree: give up after the pilot, one call.
    policy, drawn = scripted([1, 2, 3, 4, 5, 6, 7, 8])
    engine = adaptive_engine(tmp_path, policy, Route("adaptive", round_size=2, give_up_after=4))
    rendered = RenderedPrompt("How many?", encode(PROMPT), [])
    outcome = await engine.run(
        rendered, plan(8), max_tokens=64, temperature=0.8, top_p=1.0, stops=[]
    )
    assert outcome.route is not None
    assert (outcome.route.strategy, outcome.route.budget) == ("adaptive", 4)
    assert len(drawn) == 4 and len(outcome.result.candidates) == 4
    # Never settled, never given up: every sample of the budget, in rounds of 3 (3 + 1).
    policy, drawn = scripted([1, 1, 2, 2, 3, 3, 4, 4])
    engine = adaptive_engine(
        tmp_path, policy, Route("adaptive", round_size=3, stop_margin=2, give_up_after=None)
    )
    outcome = await engine.run(
        rendered, plan(8), max_tokens=64, temperature=0.8, top_p=1.0, stops=[]
    )
    assert outcome.route is not None and outcome.route.budget == 8
    assert [c.n * len(c.prompts) for c in policy.calls] == [4, 3, 1]
