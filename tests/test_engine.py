"""The engine over fakes: what `prepare` refuses or degrades, and what `run` does with a
deadline, a FLOPs ceiling and a watch."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest

from tests.support.fakes import FakePolicy, FakePRM, encode, per_step
from tts_server.engine import DEGRADED, TTSEngine, Watch
from tts_server.errors import DeadlineExceeded, FlopsUnknown, PromptTooLong, UpstreamDown
from tts_server.prompting import PromptProfile
from tts_server.settings import Settings
from tts_server.types import (
    ChatPrompt,
    Generation,
    Job,
    PolicyUsage,
    SamplingConfig,
    TextPrompt,
)

QUESTION = "How many?"


def solution(prompt: list[int], sample: int) -> str:
    return f"2 + 3 = 5\n\nThe answer is {5 + sample % 2}."


class Policy(FakePolicy):
    """The fake policy with what the engine also needs: tokenizing, the model's folder, health."""

    def __init__(self, script=solution, delay_s: float = 0.0) -> None:  # type: ignore[no-untyped-def]
        super().__init__(script)
        self.delay_s = delay_s
        self.tokenized: list[str | None] = []  # the affinity key of each tokenize call

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
        affinity: Sequence[str] | None = None,
    ) -> list[list[Generation]]:
        await asyncio.sleep(self.delay_s)
        return await super().generate(prompts, sampling, usage, n=n, affinity=affinity)

    async def tokenize_chat(
        self, messages: Sequence[dict[str, str]], *, affinity: str | None = None
    ) -> list[int]:
        self.tokenized.append(affinity)
        return encode("".join(m["content"] for m in messages) + "\nA:")

    async def tokenize_text(self, text: str, *, affinity: str | None = None) -> list[int]:
        self.tokenized.append(affinity)
        return encode(text)

    async def model_root(self) -> str | None:
        return None

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


class PRM(FakePRM):
    def __init__(self, parameters: int | None = 0, model: str | None = None) -> None:
        super().__init__(per_step(lambda step: 0.9 if "= 5" in step else 0.5))
        self._parameters = parameters
        self.model = model

    async def model_name(self) -> str | None:
        return self.model

    async def parameters(self) -> int | None:
        return self._parameters

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


@dataclass
class Health:
    policy_ok: bool = True
    prm_ok: bool = True


def engine(
    policy: Policy | None = None,
    prm: PRM | None = None,
    health: Health | None = None,
    **settings: object,
) -> TTSEngine:
    settings = {"policy_model": "fake", "policy_params": 1000, **settings}
    config = Settings(**settings)  # type: ignore[arg-type]
    profile = PromptProfile(name="plain", style="chat")
    return TTSEngine(config, policy or Policy(), prm or PRM(), health or Health(), profile)


def job(strategy: str = "best_of_n", **changes: object) -> Job:
    base = Job(
        prompt=ChatPrompt(({"role": "user", "content": QUESTION},)),
        strategy=strategy,  # type: ignore[arg-type]
        requested=strategy,
        budget=4,
        beam_width=2 if strategy in ("beam_search", "dvts") else 1,
        aggregation="last",
        selection="weighted",
        temperature=0.8,
        top_p=1.0,
        max_tokens=64,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_prepare_renders_the_prompt_and_keeps_the_job() -> None:
    prepared, rendered = await engine().prepare(job())
    assert prepared == job()
    assert rendered.question == QUESTION and rendered.prompt_ids == encode(QUESTION + "\nA:")
    _, raw = await engine().prepare(job(prompt=TextPrompt("Q: 1+1?")))
    assert raw.question == "Q: 1+1?" and raw.prompt_ids == encode("Q: 1+1?")


async def test_a_policy_down_refuses_every_job() -> None:
    with pytest.raises(UpstreamDown, match="policy"):
        await engine(health=Health(policy_ok=False)).prepare(job("majority"))


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search", "dvts", "auto"])
async def test_with_the_prm_down_a_prm_strategy_fails_fast_or_degrades(strategy: str) -> None:
    down = Health(prm_ok=False)
    with pytest.raises(UpstreamDown, match="PRM"):
        await engine(health=down).prepare(job(strategy))
    prepared, rendered = await engine(health=down, degrade_to_majority=True).prepare(job(strategy))
    assert (prepared.strategy, prepared.requested, prepared.degraded) == (
        "majority",
        strategy,
        DEGRADED,
    )
    prm = PRM()
    outcome = await engine(prm=prm, health=down, degrade_to_majority=True).run(prepared, rendered)
    assert outcome.job.degraded == DEGRADED and not prm.calls  # majority asks no PRM
    assert outcome.job.selection == "majority"  # the vote it ran, not the PRM rule it was asked
    # A strategy without the PRM is not touched.
    kept, _ = await engine(health=down).prepare(job("majority"))
    assert kept.degraded is None
    # adaptive asked for a PRM rule needs the PRM, and degrades like the others.
    with pytest.raises(UpstreamDown, match="PRM"):
        await engine(health=down).prepare(job("adaptive", selection="weighted"))


async def test_a_prompt_over_the_limit_is_refused_before_any_generation() -> None:
    policy = Policy()
    with pytest.raises(PromptTooLong) as info:
        await engine(policy, max_prompt_tokens=5).prepare(job())
    assert info.value.tokens == len(QUESTION + "\nA:") and info.value.limit == 5
    assert not policy.calls


async def test_a_ceiling_without_parameter_counts_is_refused_at_prepare() -> None:
    with pytest.raises(FlopsUnknown):
        await engine(prm=PRM(parameters=None)).prepare(job(max_flops=10**12))


async def test_a_ceiling_is_kept_and_said() -> None:
    e = engine()
    prepared, rendered = await e.prepare(job(max_flops=10**12))
    free = await e.run(*await e.prepare(job()))
    assert free.flops is not None and not free.flops_limited
    ceiling = free.flops.total // 2
    capped = await e.run(replace(prepared, max_flops=ceiling), rendered)
    assert capped.flops is not None and capped.flops.total <= ceiling
    assert capped.flops_limited


async def test_past_the_deadline_the_best_finished_answer_is_partial() -> None:
    # Whole samples arrive at once; the search's next call never returns in time.
    class Stalling(Policy):
        async def generate(self, prompts, sampling, usage, *, n=1, affinity=None):  # type: ignore[no-untyped-def]
            if self.calls:
                await asyncio.sleep(30)
            return await super().generate(prompts, sampling, usage, n=n, affinity=affinity)

    e = engine(Stalling(lambda p, k: "2 + 3 = 5\n\nmore"))
    prepared, rendered = await e.prepare(job("auto", budget=8, deadline_s=0.3))
    outcome = await e.run(prepared, rendered)
    assert outcome.partial
    assert len(outcome.result.candidates) == 4  # the pilot's samples, finished by then
    assert outcome.decision is not None  # auto had decided before the deadline
    assert outcome.decision.strategy != "pilot"


async def test_a_deadline_before_anything_finished_raises() -> None:
    e = engine(Policy(delay_s=30))
    with pytest.raises(DeadlineExceeded, match=r"\(0.2 s\)"):
        await e.run(*await e.prepare(job(deadline_s=0.2)))


async def test_the_stages_add_up_to_the_wall_time_and_count_what_ran() -> None:
    e = engine(Policy(delay_s=0.05))
    outcome = await e.run(*await e.prepare(job("beam_search")))
    stages = outcome.stages
    assert set(stages) == {"generation", "prm_scoring", "selection"}
    calls = outcome.result.policy_usage.calls
    assert calls >= 2 and stages["generation"] >= 0.05 * calls  # every call slept 50 ms
    assert stages["selection"] < outcome.wall_time_s
    # Selection is the rest of the wall time, never below 0: the stages add up to the wall time
    # only if generation and PRM scoring were not counted twice (they run one after the other).
    assert sum(stages.values()) == pytest.approx(outcome.wall_time_s, abs=1e-6)
    auto = await e.run(*await e.prepare(job("auto", budget=8)))
    assert "pilot" in auto.stages and auto.stages["pilot"] >= 0.05


async def test_a_watch_sees_the_running_job() -> None:
    e = engine(Policy(delay_s=0.2))
    watch = Watch()
    prepared, rendered = await e.prepare(job("auto", budget=8))
    task = asyncio.ensure_future(e.run(prepared, rendered, watch))
    await asyncio.sleep(0.05)
    assert watch.snapshot() == {
        "candidates_finished": 0,
        "policy_calls": 0,
        "completion_tokens": 0,
        "prm_steps_scored": 0,
    }
    outcome = await task
    seen = watch.snapshot()
    assert seen["policy_calls"] == outcome.result.policy_usage.calls
    assert outcome.decision is not None and seen["route"] == outcome.decision.strategy
    assert seen["difficulty"] in ("easy", "medium", "hard")


@pytest.mark.parametrize("strategy", ["auto", "beam_search", "dvts"])
async def test_a_seeded_job_never_reuses_a_seed_across_its_calls(strategy: str) -> None:
    # The client seeds sample i of a call with seed + i: each call must start past the samples
    # already drawn, or auto's route redraws the pilot's samples (and they vote as agreement).
    policy = Policy(lambda p, k: "2 + 3 = 5\n\nmore")
    e = engine(policy)
    outcome = await e.run(*await e.prepare(job(strategy, budget=8, seed=7)))
    assert len(policy.calls) >= 2
    seeds = [
        call.sampling.seed + i  # type: ignore[operator]
        for call in policy.calls
        for i in range(len(call.prompts) * call.n)
    ]
    assert len(seeds) == len(set(seeds)) and min(seeds) == 7
    assert outcome.result.policy_usage.calls == len(policy.calls)


async def test_auto_serves_the_table_measured_for_the_pair_and_logs_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The embedded default pair (SmolLM2-135M with the arith checker) gets its measured table,
    any other pair the generic one; the gateway says which and why, once."""
    caplog.set_level("INFO", logger="tts_server.engine")
    smol = "HuggingFaceTB/SmolLM2-135M-Instruct"
    measured = engine(prm=PRM(model="arith-checker"), policy_model=smol)
    outcome = await measured.run(*await measured.prepare(job("auto", budget=8)))
    assert outcome.decision is not None and outcome.decision.difficulty is None  # no pilot
    assert outcome.decision.strategy == "beam_search" and outcome.decision.budget == 8
    logged = [r.getMessage() for r in caplog.records if "router table" in r.getMessage()]
    assert len(logged) == 1
    assert "measured (smollm2-135m-instruct+arith.json), because beam_search" in logged[0]
    caplog.clear()

    other = engine(prm=PRM(model="Qwen2.5-Math-PRM-7B"), policy_model=smol)
    outcome = await other.run(*await other.prepare(job("auto", budget=8)))
    assert outcome.decision is not None and outcome.decision.difficulty is not None  # a pilot
    (line,) = [r.getMessage() for r in caplog.records if "router table" in r.getMessage()]
    assert "generic: under 7B, because Liu et al." in line and "Qwen2.5-Math-PRM-7B" in line

    off = engine(prm=PRM(model="arith-checker"), policy_model=smol, router_measured=False)
    assert (await off.router_table()).source == "generic: under 7B"


async def test_an_unknown_prm_model_is_not_cached_as_the_pair() -> None:
    """While the worker's model is unknown (down at start), auto serves the generic table but
    does not keep it: the measured one applies once the worker answers."""
    prm = PRM(model=None)
    e = engine(prm=prm, policy_model="SmolLM2-135M-Instruct")
    assert (await e.router_table()).source == "generic: under 7B"
    prm.model = "arith-checker"
    assert (await e.router_table()).source.startswith("measured")


async def test_adaptive_named_by_a_client_follows_the_settings_stop_rules() -> None:
    """TTS_ADAPTIVE_GIVE_UP_AFTER: four samples with four answers end the draw at 4 of 8;
    without it the Beta rule alone draws the whole budget on split answers."""
    drawn = itertools.count()  # a new answer every sample (the fake numbers samples per call)
    spread = Policy(lambda prompt, sample: f"The answer is {next(drawn)}.")
    given_up = engine(spread, adaptive_give_up_after=4)
    outcome = await given_up.run(*await given_up.prepare(job("adaptive", budget=8)))
    assert len(outcome.result.candidates) == 4
    beta_only = engine(Policy(lambda prompt, sample: f"The answer is {next(drawn)}."))
    outcome = await beta_only.run(*await beta_only.prepare(job("adaptive", budget=8)))
    assert len(outcome.result.candidates) == 8
    # A margin of 2 stops at the first round whose leader is two ahead: 2-0 after one round.
    agreeing = engine(Policy(lambda prompt, sample: "The answer is 5."), adaptive_stop_margin=2)
    outcome = await agreeing.run(*await agreeing.prepare(job("adaptive", budget=8)))
    assert len(outcome.result.candidates) == 2


async def test_adaptive_asked_for_a_prm_rule_scores_its_samples() -> None:
    """`adaptive` with selection weighted gets the PRM (every sample scored, the PRM-weighted
    answer); with a vote it runs without one."""
    scored = engine()
    outcome = await scored.run(*await scored.prepare(job("adaptive", selection="weighted")))
    assert outcome.result.prm_usage.steps_scored >= len(outcome.result.candidates) > 0
    assert all(c.step_scores for c in outcome.result.candidates)
    voted = engine()
    outcome = await voted.run(*await voted.prepare(job("adaptive", selection="majority")))
    assert outcome.result.prm_usage.calls == 0
