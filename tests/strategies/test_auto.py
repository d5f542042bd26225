"""`auto` as a strategy over fakes: the pilot, the difficulty bin, the routes (a strategy, the
pilot alone, adaptive sampling) and a table's fixed strategy."""

from __future__ import annotations

import pytest

from tests.support.fakes import FakePolicy, FakePRM, encode, per_step
from tts_server.router import BINS, Route, RouterTable, default_table
from tts_server.strategies import REGISTRY
from tts_server.types import Decision, Problem, Progress, SearchConfig, StrategyResult

PROMPT = "Q: How many?\nA:"
PROBLEM = Problem(question="How many?", prompt_ids=tuple(encode(PROMPT)))


def agreeing(prompt: list[int], sample: int) -> str:
    return "2 + 3 = 5\n\nThe answer is 5."


def disagreeing(prompt: list[int], sample: int) -> str:
    done = "".join(chr(t) for t in prompt)[len(PROMPT) :]
    if done:  # a continuation: finish the step the search started
        return "The answer is 7."
    return f"{sample} + 1 = {sample + 1}\n\nThe answer is {sample + 1}."


async def run_auto(
    policy: FakePolicy, prm: FakePRM, budget: int = 8, table: RouterTable | None = None
) -> tuple[StrategyResult, Decision]:
    progress = Progress()
    config = SearchConfig(
        budget=budget,
        beam_width=4,  # what a fixed strategy of a table naming no width gets
        max_tokens=64,
        max_step_tokens=64,
        router=table or default_table(1000),
        progress=progress,
    )
    result = await REGISTRY["auto"].run(PROBLEM, config, policy, prm)
    assert progress.decision is not None, "auto always says what it decided"
    return result, progress.decision


async def test_auto_exits_early_when_the_pilot_agrees() -> None:
    policy = FakePolicy(agreeing)
    result, decision = await run_auto(policy, FakePRM(per_step(lambda s: 0.95)))
    assert decision.early_exit and decision.strategy == "pilot"
    assert decision.difficulty is not None and decision.difficulty.bin == "easy"
    assert len(policy.calls) == 1  # only the pilot ran
    assert result.answer == "5"
    assert result.policy_usage.completion_tokens > 0


async def test_auto_routes_a_hard_question_and_keeps_the_pilot() -> None:
    policy = FakePolicy(disagreeing)
    result, decision = await run_auto(policy, FakePRM(per_step(lambda s: 0.2)))
    assert decision.difficulty is not None and decision.difficulty.bin == "hard"
    assert not decision.early_exit
    assert decision.strategy == "beam_search"  # the default table for a small policy
    assert decision.budget == 8  # pilot 4 + one beam of width 4
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
    share: float, width: int | None, served: tuple[int, int]
) -> None:
    fixed = RouterTable(
        routes=dict.fromkeys(BINS, Route("pilot")),
        fixed_strategy="dvts",
        fixed_budget_share=share,
        fixed_beam_width=width,
    )
    policy = FakePolicy(disagreeing)
    prm = FakePRM(per_step(lambda s: 0.2))
    _, decision = await run_auto(policy, prm, table=fixed)
    assert decision.difficulty is None
    assert (decision.strategy, decision.budget, decision.beam_width) == ("dvts", *served)
    # No pilot: the first calls start the search's subtrees (one each, M samples of the bare
    # prompt), not 4 whole samples.
    budget, width_served = served
    bare = min(len(c.prompts[0]) for c in policy.calls)
    first = [c for c in policy.calls if len(c.prompts[0]) == bare]
    assert [(len(c.prompts), c.n) for c in first] == [(1, width_served)] * (budget // width_served)
    assert sorted(c.affinity[0] for c in first if c.affinity) == [
        str(k) for k in range(budget // width_served)
    ]
    # A budget too small for the share still runs one sample.
    _, decision = await run_auto(policy, prm, budget=1, table=fixed)
    assert decision.budget == 1


def scripted(answers: list[int]) -> tuple[FakePolicy, list[int]]:
    """A policy whose k-th sample, over all calls, answers answers[k]."""
    drawn: list[int] = []

    def script(prompt: list[int], sample: int) -> str:
        value = answers[len(drawn)]
        drawn.append(value)
        return f"{value} + 0 = {value}\n\nThe answer is {value}."

    return FakePolicy(script), drawn


def adaptive_table(rule: Route) -> RouterTable:
    return RouterTable(routes=dict.fromkeys(BINS, rule))


async def test_adaptive_route_samples_in_rounds_until_one_answer_leads() -> None:
    # Pilot 5 5 6 7 (one ahead), then rounds of 2: 5 8 (two ahead: stop).
    policy, drawn = scripted([5, 5, 6, 7, 5, 8, 9, 9, 9, 9])
    table = adaptive_table(Route("adaptive", round_size=2, give_up_after=None))
    result, decision = await run_auto(policy, FakePRM(per_step(lambda s: 0.5)), table=table)
    assert (decision.strategy, decision.budget) == ("adaptive", 6)
    assert len(drawn) == 6 and [c.n * len(c.prompts) for c in policy.calls] == [4, 2]
    assert len(result.candidates) == 6  # the pilot's samples are candidates too
    assert result.answer == "5"
    assert result.policy_usage.calls == 2


async def test_adaptive_route_gives_up_or_spends_the_budget() -> None:
    prm = FakePRM(per_step(lambda s: 0.5))
    # No two pilot samples agree: give up after the pilot, one call.
    policy, drawn = scripted([1, 2, 3, 4, 5, 6, 7, 8])
    table = adaptive_table(Route("adaptive", round_size=2, give_up_after=4))
    result, decision = await run_auto(policy, prm, table=table)
    assert (decision.strategy, decision.budget) == ("adaptive", 4)
    assert len(drawn) == 4 and len(result.candidates) == 4
    # Never settled, never given up: every sample of the budget, in rounds of 3 (3 + 1).
    policy, drawn = scripted([1, 1, 2, 2, 3, 3, 4, 4])
    table = adaptive_table(Route("adaptive", round_size=3, stop_margin=2, give_up_after=None))
    _, decision = await run_auto(policy, prm, table=table)
    assert decision.budget == 8
    assert [c.n * len(c.prompts) for c in policy.calls] == [4, 3, 1]


async def test_adaptive_is_a_strategy_of_its_own_and_selects_once() -> None:
    # From nothing: rounds of 2 until one answer is 2 ahead (5 5), then weighted selection.
    policy, drawn = scripted([5, 5, 6, 7])
    prm = FakePRM(per_step(lambda s: 0.5))
    config = SearchConfig(budget=8, max_tokens=64, max_step_tokens=64)
    result = await REGISTRY["adaptive"].run(PROBLEM, config, policy, prm)
    assert drawn == [5, 5] and result.iterations == 1
    assert result.answer == "5" and result.votes == {"5": 1.0}


async def test_auto_without_a_table_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="router table"):
        await REGISTRY["auto"].run(PROBLEM, SearchConfig(), FakePolicy(agreeing), None)


async def test_a_deepconf_route_runs_after_the_pilot_and_is_merged_by_vote() -> None:
    """The hard bin routes to deepconf: after the pilot of 4 (5, 6, 7, 8, scored low), its
    warm-up of 4 all say 5 (consensus: no stream), and the vote over all 8 candidates says 5."""
    table = RouterTable(routes=dict.fromkeys(BINS, Route("deepconf")))

    def script(prompt: list[int], sample: int) -> str:
        first_call = len(policy.calls) == 1
        return f"The answer is {5 + sample if first_call else 5}."

    policy = FakePolicy(script)
    prm = FakePRM(per_step(lambda step: 0.1))
    result, decision = await run_auto(policy, prm, table=table)
    assert (decision.strategy, decision.budget) == ("deepconf", 8)
    assert [call.n for call in policy.calls] == [4, 4]
    assert policy.calls[1].sampling.logprobs == 5  # deepconf samples with logprobs itself
    assert (len(result.candidates), result.answer, result.votes["5"]) == (8, "5", 5.0)
