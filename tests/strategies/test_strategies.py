from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fakes import FakePolicy, FakePRM, decode, encode, gen, per_step
from tts_server.strategies import REGISTRY
from tts_server.strategies.common import expand, solution_candidate, split_steps
from tts_server.types import Candidate, Generation, PolicyUsage, Problem, SearchConfig

PROBLEM = Problem(question="How many?", prompt_ids=tuple(encode("Q: How many?\nA: ")))
STOP = "\nQuestion:"


def so_far(prompt: list[int]) -> str:
    """The solution text a prompt continues (the prompt minus the problem)."""
    assert prompt[: len(PROBLEM.prompt_ids)] == list(PROBLEM.prompt_ids)
    return decode(prompt[len(PROBLEM.prompt_ids) :])


def prefixes(policy: FakePolicy, call: int) -> list[str]:
    return [so_far(p) for p in policy.calls[call].prompts]


def table_scores(table: dict[str, float], default: float = 0.5) -> Callable[[str], float]:
    return lambda step: table.get(step.strip(), default)


def config(**kwargs: object) -> SearchConfig:
    base: dict[str, object] = {"solution_stops": (STOP,), "max_tokens": 200, "max_step_tokens": 50}
    base.update(kwargs)
    return SearchConfig(**base)  # type: ignore[arg-type]


def test_the_registry_says_what_each_strategy_needs() -> None:
    needs = {name: (s.needs_prm, s.uses_beam_width, s.requestable) for name, s in REGISTRY.items()}
    assert needs == {
        "auto": (True, False, True),
        "greedy": (False, False, True),
        "majority": (False, False, True),
        "best_of_n": (True, False, True),
        "beam_search": (True, True, True),
        "dvts": (True, True, True),
        # Early stopping, by vote and by confidence: no PRM needed (auto's adaptive route
        # scores its samples with the PRM it has).
        "adaptive": (False, False, True),
        "deepconf": (False, False, True),
    }


# --- splitting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("a\n\nb\n\nc", ["a\n\n", "b\n\n", "c"]),
        ("a\n\nb\n\n", ["a\n\n", "b\n\n"]),
        ("a\n\n\n\nb", ["a\n\n\n\n", "b"]),
        ("\n\na\n\nb", ["\n\na\n\n", "b"]),
        ("", []),
    ],
)
def test_split_steps(text: str, steps: list[str]) -> None:
    assert split_steps(text, "\n\n") == steps


@given(st.text(alphabet="ab \n", max_size=40))
def test_split_steps_keeps_the_text(text: str) -> None:
    steps = split_steps(text, "\n\n")
    assert "".join(steps) == text
    assert all(s.strip() for s in steps) or len(steps) <= 1


# --- whole-solution strategies ---------------------------------------------------------


async def test_greedy_one_call_at_temperature_zero() -> None:
    policy = FakePolicy(lambda p, k: "x = 2\n\nThe answer is 2.\nQuestion: next?")
    result = await REGISTRY["greedy"].run(PROBLEM, config(temperature=0.8), policy, None)
    [call] = policy.calls
    assert (call.n, len(call.prompts), call.prompts[0]) == (1, 1, list(PROBLEM.prompt_ids))
    assert call.sampling.temperature == 0.0
    assert call.sampling.stop == (STOP,)
    assert call.sampling.max_tokens == 200
    assert result.best.text == "x = 2\n\nThe answer is 2."  # solution stop stripped
    assert result.best.steps == ["x = 2\n\n", "The answer is 2."]
    assert (result.answer, result.best.finish_reason, result.policy_usage.calls) == ("2", "stop", 1)


async def test_greedy_scores_with_a_prm_when_given() -> None:
    policy = FakePolicy(lambda p, k: "x = 2\n\nThe answer is 2.")
    prm = FakePRM(per_step(lambda s: 0.25))
    result = await REGISTRY["greedy"].run(PROBLEM, config(), policy, prm)
    assert [c.solutions for c in prm.calls] == [[["x = 2\n\n", "The answer is 2."]]]
    assert result.best.score == 0.25 and result.prm_usage.calls == 1


async def test_majority_one_call_with_n_and_no_prm() -> None:
    answers = ["3", "5", "3", "7", "3.0"]
    policy = FakePolicy(lambda p, k: f"Thinking.\n\nThe answer is {answers[k]}.")
    prm = FakePRM(per_step(lambda s: 1.0))
    result = await REGISTRY["majority"].run(PROBLEM, config(budget=5), policy, prm)
    [call] = policy.calls
    assert (call.n, len(call.prompts)) == (5, 1)
    assert prm.calls == []
    assert result.answer == "3" and result.votes == {"3": 3.0, "5": 1.0, "7": 1.0}
    assert len(result.candidates) == 5 and all(c.finished for c in result.candidates)


BEST_OF_N_TEXTS = [
    ("Add.\n\nThe answer is 3.", 0.3),
    ("Halve.\n\nThe answer is 0.5.", 0.6),
    ("Guess.\n\nThe answer is 7.", 0.95),
    ("Add.\n\nThe answer is 3.", 0.3),
    ("Halve.\n\nThe answer is $\\frac{1}{2}$.", 0.62),
    ("Add.\n\nThe answer is 3.", 0.3),
]


@pytest.mark.parametrize(
    ("rule", "answer"), [("naive", "7"), ("weighted", "0.5"), ("majority", "3")]
)
async def test_best_of_n_selection_rules_pick_different_answers(rule: str, answer: str) -> None:
    finals = {text.split("\n\n")[1]: score for text, score in BEST_OF_N_TEXTS}
    policy = FakePolicy(lambda p, k: BEST_OF_N_TEXTS[k][0])
    prm = FakePRM(lambda steps: [0.5, finals[steps[1]]])
    result = await REGISTRY["best_of_n"].run(PROBLEM, config(budget=6, selection=rule), policy, prm)
    assert result.answer == answer
    [call] = policy.calls
    assert (call.n, len(call.prompts)) == (6, 1)
    [scored] = prm.calls
    assert scored.question == PROBLEM.question
    assert scored.solutions == [split_steps(text, "\n\n") for text, _ in BEST_OF_N_TEXTS]
    assert result.iterations == 1


async def test_best_of_n_needs_a_prm() -> None:
    with pytest.raises(ValueError, match="PRM"):
        await REGISTRY["best_of_n"].run(PROBLEM, config(), FakePolicy(lambda p, k: "1"), None)


# --- beam search ------------------------------------------------------------------------


async def test_beam_search_keeps_top_n_over_m_and_refills_to_n() -> None:
    first = [0.1, 0.9, 0.3, 0.8, 0.2, 0.5]  # keep step0.1 and step0.3
    second = [0.6, 0.2, 0.95, 0.4, 0.7, 0.1]  # beams 2 and 4 (both copies of step0.1)

    def script(prompt: list[int], k: int) -> str:
        depth = so_far(prompt).count("\n\n")
        return f"The answer is {k % 2}." if depth == 2 else f"step{depth}.{k}\n\n"

    scores = {f"step0.{k}": s for k, s in enumerate(first)}
    scores |= {f"step1.{k}": s for k, s in enumerate(second)}
    policy, prm = FakePolicy(script), FakePRM(per_step(table_scores(scores)))
    result = await REGISTRY["beam_search"].run(PROBLEM, config(budget=6, beam_width=3), policy, prm)

    assert len(policy.calls) == len(prm.calls) == result.iterations == 3
    assert all(call.n == 1 and len(call.prompts) == 6 for call in policy.calls)
    assert prefixes(policy, 0) == [""] * 6
    # Top N/M = 2 kept, M = 3 copies each.
    assert Counter(prefixes(policy, 1)) == {"step0.1\n\n": 3, "step0.3\n\n": 3}
    assert Counter(prefixes(policy, 2)) == {
        "step0.1\n\nstep1.2\n\n": 3,
        "step0.1\n\nstep1.4\n\n": 3,
    }
    # The PRM sees every active beam's full step list.
    assert [len(s) for s in prm.calls[1].solutions] == [2] * 6
    assert sorted(prm.calls[1].solutions)[0] == ["step0.1\n\n", "step1.0\n\n"]
    assert len(result.candidates) == 6
    assert all(c.finished and len(c.steps) == 3 for c in result.candidates)
    assert result.policy_usage.calls == 3 and result.prm_usage.calls == 3


async def test_beam_search_moves_finished_beams_to_the_pool() -> None:
    first = {0: "The answer is 7.\n\nmore", 1: "Done", 2: "x = 1\n\n", 3: "y = 2\n\n"}

    def script(prompt: list[int], k: int) -> str:
        text = so_far(prompt)
        return first[k] if not text else f"The answer is {len(text)}."

    prm = FakePRM(per_step(table_scores({"x = 1": 0.9, "y = 2": 0.8, "Done": 0.1})))
    policy = FakePolicy(script)
    result = await REGISTRY["beam_search"].run(PROBLEM, config(budget=4, beam_width=2), policy, prm)
    # Iteration 1 finished two beams (a final answer, EOS); the other two are refilled to 4.
    assert len(policy.calls) == 2
    assert Counter(prefixes(policy, 1)) == {"x = 1\n\n": 2, "y = 2\n\n": 2}
    # 2 + 4 completed, the best 4 returned, best first.
    assert len(result.candidates) == 4
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert all(c.finished for c in result.candidates)
    assert "Done" not in [c.text for c in result.candidates]  # the worst of 6 is dropped
    final = next(c for c in result.candidates if c.text.startswith("The answer is 7"))
    assert final.steps == ["The answer is 7.\n\n"] and final.finish_reason == "stop"


async def test_beam_search_last_iteration_drops_the_delimiter() -> None:
    policy = FakePolicy(lambda p, k: "a = 1\n\nb = 2\n\nThe answer is 2.\nQuestion: next")
    prm = FakePRM(per_step(lambda s: 0.5))
    result = await REGISTRY["beam_search"].run(
        PROBLEM, config(budget=2, beam_width=2, max_iterations=2), policy, prm
    )
    assert [c.sampling.stop for c in policy.calls] == [("\n\n", STOP), (STOP,)]
    # The last call may use everything that is left, not just a step's worth.
    assert [c.sampling.max_tokens for c in policy.calls] == [50, 200 - len("a = 1\n\n")]
    assert result.best.steps == ["a = 1\n\n", "a = 1\n\nb = 2\n\nThe answer is 2."]
    assert result.best.finish_reason == "stop" and result.answer == "2"


async def test_beam_search_length_finished_beam_is_not_continued() -> None:
    long_step = "z" * 80 + "\n\n"

    def script(prompt: list[int], k: int) -> str:
        text = so_far(prompt)
        if not text:
            return long_step if k == 0 else "x = 1\n\n"
        return "The answer is 1."

    policy = FakePolicy(script)
    prm = FakePRM(per_step(lambda s: 0.9 if s.startswith("z") else 0.4))
    result = await REGISTRY["beam_search"].run(
        PROBLEM, config(budget=2, beam_width=2, max_step_tokens=50), policy, prm
    )
    truncated = next(c for c in result.candidates if c.text.startswith("z"))
    assert (truncated.finished, truncated.finish_reason, truncated.text) == (
        True,
        "length",
        "z" * 50,
    )
    # Despite its high score, it was never sent again.
    assert all(not p.startswith("z") for p in prefixes(policy, 1))
    assert prefixes(policy, 1) == ["x = 1\n\n", "x = 1\n\n"]


async def test_beam_search_respects_the_token_budget() -> None:
    policy = FakePolicy(lambda p, k: "abcdefghij\n\n")  # 12 tokens a step, forever
    prm = FakePRM(per_step(lambda s: 0.5))
    result = await REGISTRY["beam_search"].run(
        PROBLEM, config(budget=2, beam_width=2, max_tokens=30, max_step_tokens=20), policy, prm
    )
    assert [c.sampling.max_tokens for c in policy.calls] == [20, 18, 6]
    for candidate in result.candidates:
        assert len(candidate.token_ids) == 30
        assert candidate.finish_reason == "length" and candidate.finished


async def test_beam_search_continues_from_the_returned_token_ids() -> None:
    def script(prompt: list[int], k: int) -> Generation:
        if len(prompt) == len(PROBLEM.prompt_ids):
            # Token ids that are not the characters: a re-tokenising strategy would differ.
            return Generation("x = 1\n\n", [1001, 1002], "stop", "\n\n")
        return gen("The answer is 1.")

    policy = FakePolicy(script)
    prm = FakePRM(per_step(lambda s: 0.5))
    await REGISTRY["beam_search"].run(PROBLEM, config(budget=1, beam_width=1), policy, prm)
    assert policy.calls[1].prompts == [[*PROBLEM.prompt_ids, 1001, 1002]]


async def test_beam_search_solution_stop_ends_and_is_stripped() -> None:
    def script(prompt: list[int], k: int) -> str:
        return "So 2 + 2 = 4.\nQuestion: what next?\n\n" if so_far(prompt) else "Start.\n\n"

    prm = FakePRM(per_step(lambda s: 0.5))
    result = await REGISTRY["beam_search"].run(
        PROBLEM, config(budget=2, beam_width=1), FakePolicy(script), prm
    )
    assert result.best.steps == ["Start.\n\n", "So 2 + 2 = 4."]
    assert (result.best.finish_reason, result.answer) == ("stop", "4")


# --- DVTS -------------------------------------------------------------------------------


async def test_a_seeded_dvts_steps_in_lockstep_and_never_exchanges_beams() -> None:
    # 2 subtrees of width 2. Globally a0 and a1 are best; subtree 1 must keep its own a3.
    plan = {
        "": ["a0\n\n", "a1\n\n", "a2\n\n", "a3\n\n"],
        "a0\n\n": ["The answer is 5.", "b1\n\n"],
        "a3\n\n": ["The answer is 6.", "b3\n\n"],
        "a3\n\nb3\n\n": ["The answer is 6.", "c\n\n"],
    }

    def script(prompt: list[int], k: int) -> str:
        options = plan[so_far(prompt)]
        return options[k % len(options)] if so_far(prompt) else options[k]

    scores = {"a0": 0.9, "a1": 0.8, "a2": 0.2, "a3": 0.3, "b1": 0.4, "b3": 0.7, "c": 0.2}

    def scorer(steps: Sequence[str]) -> list[float]:
        last = steps[-1].strip()
        final = {"The answer is 5.": 0.95, "The answer is 6.": 0.5 if len(steps) == 2 else 0.9}
        return [*(scores[s.strip()] for s in steps[:-1]), final.get(last, scores.get(last, 0))]

    policy, prm = FakePolicy(script), FakePRM(scorer)
    result = await REGISTRY["dvts"].run(
        PROBLEM, config(budget=4, beam_width=2, selection="weighted", seed=7), policy, prm
    )

    # Seeded: every live subtree's step in one call (a reproducible order of the samples).
    assert [(len(c.prompts), c.n) for c in policy.calls] == [(2, 2), (2, 2), (1, 2)]
    assert len(prm.calls) == result.iterations == 3
    assert [len(c.solutions) for c in prm.calls] == [4, 4, 2]
    # Subtree 1 follows its own best (a3), not the globally better a1.
    assert prefixes(policy, 1) == ["a0\n\n", "a3\n\n"]
    # Subtree 0 stopped (its best was final); subtree 1 extends its own earlier prefix.
    assert prefixes(policy, 2) == ["a3\n\nb3\n\n"]
    assert prefixes(policy, 2)[0].startswith(prefixes(policy, 1)[1])

    texts = sorted(c.text for c in result.candidates)
    assert texts == [
        "a0\n\nThe answer is 5.",
        "a3\n\nThe answer is 6.",
        "a3\n\nb3\n\nThe answer is 6.",
    ]
    assert all(c.finished for c in result.candidates)
    assert result.answer == "6"  # weighted: 0.5 + 0.9 beats 0.95
    assert result.votes == pytest.approx({"5": 0.95, "6": 1.4})


async def test_dvts_without_any_finished_returns_each_subtrees_best_unfinished() -> None:
    policy = FakePolicy(lambda p, k: "step\n\n")
    prm = FakePRM(per_step(lambda s: 0.5))
    result = await REGISTRY["dvts"].run(
        PROBLEM, config(budget=4, beam_width=2, max_iterations=0), policy, prm
    )
    assert len(result.candidates) == 2
    assert not any(c.finished for c in result.candidates)


@pytest.mark.parametrize("seed", [None, 7])
async def test_dvts_last_iteration_finishes_every_subtree(seed: int | None) -> None:
    policy = FakePolicy(lambda p, k: f"s{k}\n\nmore {k}")
    prm = FakePRM(per_step(lambda s: 0.5))
    result = await REGISTRY["dvts"].run(
        PROBLEM, config(budget=4, beam_width=2, max_iterations=2, seed=seed), policy, prm
    )
    stops = [c.sampling.stop for c in policy.calls]
    if seed is None:  # each subtree on its own: its two steps, the last without the delimiter
        assert sorted(stops) == sorted([("\n\n", STOP), (STOP,)] * 2)
    else:
        assert stops == [("\n\n", STOP), (STOP,)]
    assert len(result.candidates) == 4
    assert all(c.finished and c.finish_reason == "stop" for c in result.candidates)


class SlowSubtree:
    """A FakePolicy whose calls for subtree `slow` take `delay_s`; `fail` raises for another."""

    def __init__(self, inner: FakePolicy, slow: str, delay_s: float, fail: str | None = None):
        self.inner, self.slow, self.delay_s, self.fail = inner, slow, delay_s, fail
        self.events: list[tuple[str, str]] = []

    async def generate(self, prompts, sampling, usage, *, n=1, affinity=None):  # type: ignore[no-untyped-def]
        label = (affinity or ["?"])[0]
        self.events.append((label, "start"))
        try:
            if label == self.fail:
                raise RuntimeError(f"subtree {label} failed")
            if label == self.slow:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.events.append((label, "cancelled"))
            raise
        result = await self.inner.generate(prompts, sampling, usage, n=n, affinity=affinity)
        self.events.append((label, "end"))
        return result


async def test_unseeded_dvts_subtrees_advance_without_waiting_for_each_other() -> None:
    def script(prompt: list[int], k: int) -> str:
        return "The answer is 4." if so_far(prompt).count("\n\n") >= 2 else f"step {k}\n\n"

    policy = SlowSubtree(FakePolicy(script), slow="0", delay_s=0.2)
    prm = FakePRM(per_step(lambda s: 0.5))
    result = await REGISTRY["dvts"].run(
        PROBLEM,
        config(budget=4, beam_width=2),
        policy,
        prm,  # type: ignore[arg-type]
    )
    # Subtree 1 took all 3 of its steps while subtree 0's first was still running.
    first_end_of_0 = policy.events.index(("0", "end"))
    assert policy.events[1:first_end_of_0] == [("1", "start"), ("1", "end")] * 3
    # One call per subtree and step: its own head, M samples; the PRM scores its M children.
    assert [(len(c.prompts), c.n) for c in policy.inner.calls] == [(1, 2)] * 6
    assert [len(c.solutions) for c in prm.calls] == [2] * 6
    assert result.iterations == 3
    assert len(result.candidates) == 4 and all(c.finished for c in result.candidates)


async def test_a_failing_subtree_ends_the_others_and_raises_as_itself() -> None:
    policy = SlowSubtree(FakePolicy(lambda p, k: "s\n\n"), slow="0", delay_s=5, fail="1")
    prm = FakePRM(per_step(lambda s: 0.5))
    with pytest.raises(RuntimeError, match="subtree 1 failed"):
        await REGISTRY["dvts"].run(PROBLEM, config(budget=4, beam_width=2), policy, prm)  # type: ignore[arg-type]
    assert ("0", "cancelled") in policy.events


# --- continuing candidates ---------------------------------------------------------------


async def test_a_step_cut_by_the_shared_limit_stays_open() -> None:
    def script(prompt: list[int], k: int) -> str:
        text = so_far(prompt)
        return "abcdefgh\n\n"[len(text) % 10 :] if text.startswith("a") else "abcdefgh\n\n"

    policy = FakePolicy(script)
    cfg = config(max_tokens=30, max_step_tokens=20)
    roomy, tight = Candidate(), Candidate(steps=["y" * 25], token_ids=encode("y" * 25))
    [[open_child], [full_child]] = await expand(
        PROBLEM, [roomy, tight], cfg, policy, PolicyUsage(), n=1, last=False
    )
    assert policy.calls[0].sampling.max_tokens == 5  # the smaller of the two caps
    assert (full_child.finished, full_child.finish_reason) == (True, "length")
    assert not open_child.finished and open_child.steps == ["abcde"]

    [[child]] = await expand(PROBLEM, [open_child], cfg, policy, PolicyUsage(), n=1, last=False)
    assert child.steps == ["abcdefgh\n\n"] and not child.finished  # the same step, completed


@pytest.mark.parametrize(
    ("generation", "finished", "reason"),
    [
        (gen("x = 1\n\n", "stop", "\n\n"), False, None),
        (gen("The answer is 3.\n\n", "stop", "\n\n"), True, "stop"),
        (gen("\n\n", "stop", "\n\n"), True, "stop"),
        (gen("x = 1", "stop", None), True, "stop"),
        (gen("x = 1 and", "length"), True, "length"),
        (gen("x = 1" + STOP, "stop", STOP), True, "stop"),
    ],
)
async def test_finishing_rules(generation: Generation, finished: bool, reason: str | None) -> None:
    parent = Candidate(steps=["Start.\n\n"], token_ids=encode("Start.\n\n"))
    policy = FakePolicy(lambda p, k: generation)
    cfg = config(max_step_tokens=9)
    [[child]] = await expand(PROBLEM, [parent], cfg, policy, PolicyUsage(), n=1, last=False)
    assert (child.finished, child.finish_reason) == (finished, reason)
    assert STOP not in child.text
    assert child.text.startswith("Start.\n\n")
    assert parent.steps == ["Start.\n\n"]  # the parent is not modified


def test_whole_solution_ends_at_its_first_stated_answer() -> None:
    text = "We add.\n\n2 + 3 = 5\n\nThe answer is 5.\n\nNow another story about 7 cats."
    candidate = solution_candidate(gen(text), SearchConfig())
    assert candidate.text == "We add.\n\n2 + 3 = 5\n\nThe answer is 5.\n\n"
    assert candidate.answer == "5"
    assert len(candidate.token_ids) == len(text)  # the cost still counts every token


async def test_beam_search_a_stop_spanning_two_steps_ends_the_solution_there() -> None:
    """ "\nQuestion:" starts in one step ("...= 4.\n\n" ends with the delimiter) and ends in the
    next: no single call saw it, so the joined text is cut at it and the answer comes from what
    is left, not from the rambling after it."""

    def script(prompt: list[int], k: int) -> str:
        done = so_far(prompt)
        if not done:
            return "So 2 + 2 = 4.\n\n"
        return "Question: what is 9?\n\nThe answer is 9." if done.endswith("4.\n\n") else "x"

    prm = FakePRM(per_step(lambda s: 0.5))
    stops = config(budget=2, beam_width=1, solution_stops=("\n\nQuestion:",))
    result = await REGISTRY["beam_search"].run(PROBLEM, stops, FakePolicy(script), prm)
    assert result.best.text == "So 2 + 2 = 4."
    assert (result.best.finished, result.best.finish_reason) == (True, "stop")
    assert result.answer == "4"
