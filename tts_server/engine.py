"""Runs one request: render the prompt, route it (auto), run the strategy under the request's
FLOPs ceiling, count what it cost. No HTTP here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tts_server.flops import Flops, FlopsConfigError, FlopsCounter, ModelShape, shape_from_path
from tts_server.metering import FlopsMeter, MeteredPolicy, MeteredPRM
from tts_server.plan import PRM_STRATEGIES, Plan
from tts_server.prompting import RenderedPrompt, load_profile, render_chat
from tts_server.router import (
    Difficulty,
    RouterTable,
    default_table,
    estimate,
    load_table,
    plan_budget,
    stops_sampling,
)
from tts_server.router import Route as RouterRoute
from tts_server.settings import DEFAULT_MODEL, Settings
from tts_server.strategies import STRATEGIES
from tts_server.strategies.common import finish, score, whole_solutions
from tts_server.types import (
    Candidate,
    Generation,
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    Progress,
    SamplingConfig,
    SearchConfig,
    StrategyResult,
)

logger = logging.getLogger("tts_server.engine")


class FlopsUnknown(Exception):
    """A FLOPs ceiling was asked for but the models' parameter counts are not known."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before any candidate finished."""


@dataclass
class Route:
    """What the router decided for an `auto` request."""

    strategy: str
    budget: int
    beam_width: int
    early_exit: bool


@dataclass
class Outcome:
    plan: Plan
    result: StrategyResult
    wall_time_s: float
    flops: Flops | None = None
    difficulty: Difficulty | None = None
    route: Route | None = None
    # The FLOPs ceiling shrank or skipped a call.
    flops_limited: bool = False
    max_flops: int | None = None
    # Seconds per stage: pilot (auto only), generation, prm_scoring, and selection = the rest of
    # the wall time (selection, aggregation and bookkeeping between calls).
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    # The deadline passed: the answer is the best of the candidates finished by then.
    partial: bool = False
    # Why the answer was not computed as asked (e.g. the PRM is down: majority vote instead).
    degraded: str | None = None
    temperature: float | None = None


class StageClock:
    """Wall time and usage of one request's policy and PRM calls, whatever strategy made them."""

    def __init__(self) -> None:
        self.generation = 0.0
        self.prm_scoring = 0.0
        self.policy_usage = PolicyUsage()
        self.prm_usage = PRMUsage()


@dataclass
class Watch:
    """A running request's live counters, read by a streaming response for its progress chunks
    (the engine fills it in at the start of `run`)."""

    progress: Progress | None = None
    clock: StageClock | None = None
    decision: list[tuple[Difficulty | None, Route]] | None = None

    def snapshot(self) -> dict[str, Any]:
        """What the request has done so far: calls count once they return."""
        seen: dict[str, Any] = {}
        if self.progress is not None:
            seen["candidates_finished"] = len({id(c) for c in self.progress.finished})
        if self.clock is not None:
            seen["policy_calls"] = self.clock.policy_usage.calls
            seen["completion_tokens"] = self.clock.policy_usage.completion_tokens
            seen["prm_steps_scored"] = self.clock.prm_usage.steps_scored
        if self.decision:
            difficulty, route = self.decision[0]
            seen["difficulty"] = difficulty.bin if difficulty else None
            seen["route"] = route.strategy
        return seen


class TimedPolicy:
    def __init__(self, inner: PolicyClient, clock: StageClock) -> None:
        self.inner = inner
        self.clock = clock

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
    ) -> list[list[Generation]]:
        started = time.perf_counter()
        call = PolicyUsage()
        try:
            return await self.inner.generate(prompts, sampling, call, n=n)
        finally:
            usage.add(call)
            self.clock.policy_usage.add(call)
            self.clock.generation += time.perf_counter() - started


class TimedPRM:
    def __init__(self, inner: PRMClient, clock: StageClock) -> None:
        self.inner = inner
        self.clock = clock

    async def score(
        self, question: str, solutions: Sequence[Sequence[str]], usage: PRMUsage
    ) -> list[list[float]]:
        started = time.perf_counter()
        call = PRMUsage()
        try:
            return await self.inner.score(question, solutions, call)
        finally:
            usage.add(call)
            self.clock.prm_usage.add(call)
            self.clock.prm_scoring += time.perf_counter() - started


class TokenizingPolicy(PolicyClient, Protocol):
    """A policy client that can also render prompts (the vLLM client is one)."""

    async def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    async def tokenize_text(self, text: str) -> list[int]: ...


class TTSEngine:
    def __init__(self, settings: Settings, policy: TokenizingPolicy, prm: PRMClient) -> None:
        self.settings = settings
        self.policy = policy
        self.prm = prm
        self._policy_shape: ModelShape | None = None
        self._prm_shape: ModelShape | None = None
        self._table: RouterTable | None = None
        if settings.router_table is not None:
            # Fail at start on a bad table, not on the first request.
            table = load_table(settings.router_table)
            logger.info("router table %s: auto serves %s", table.source, table.summary())
            self._table = table

    async def render_chat(self, messages: list[dict[str, Any]]) -> RenderedPrompt:
        profile = load_profile(self.settings.profile_for(self.settings.policy_model))
        return await render_chat(profile, messages, self.policy)

    async def render_completion(self, prompt: str) -> RenderedPrompt:
        # A completions prompt is the client's raw text: no profile, no template.
        return RenderedPrompt(prompt, await self.policy.tokenize_text(prompt), [])

    # --- what the FLOPs count needs, found once ---

    async def flops_counter(self) -> FlopsCounter:
        if self._policy_shape is None:
            self._policy_shape = await self._find_policy_shape()
        if self._prm_shape is None:
            self._prm_shape = await self._find_prm_shape()
        return FlopsCounter(
            self._policy_shape, self._prm_shape, self.settings.flops_include_attention
        )

    async def _find_policy_shape(self) -> ModelShape | None:
        s = self.settings
        candidates: list[Path] = []
        if s.policy_config_path is not None:
            candidates.append(s.policy_config_path)
        root_of = getattr(self.policy, "model_root", None)
        root = await root_of() if root_of is not None else None
        if root:
            candidates.append(Path(root))
        if s.policy_model == DEFAULT_MODEL:
            candidates.append(s.embedded_model_dir)
        for path in candidates:
            if path.exists():
                try:
                    shape = shape_from_path(path)
                except FlopsConfigError as exc:
                    logger.warning("policy FLOPs: %s", exc)
                    continue
                if s.policy_params is not None:
                    shape = dataclasses.replace(shape, parameters=s.policy_params)
                return shape
        if s.policy_params is not None:
            return ModelShape(parameters=s.policy_params)
        logger.warning("policy parameter count unknown: set TTS_POLICY_PARAMS for FLOPs")
        return None

    async def _find_prm_shape(self) -> ModelShape | None:
        if self.settings.prm_params is not None:
            return ModelShape(parameters=self.settings.prm_params)
        reported = getattr(self.prm, "parameters", None)
        value = await reported() if reported is not None else None
        return ModelShape(parameters=value) if value is not None else None

    async def router_table(self) -> RouterTable:
        if self._table is None:
            shape = self._policy_shape or (await self.flops_counter()).policy
            table = default_table(
                shape.parameters if shape else None, weak_prm=self.settings.router_weak_prm
            )
            if shape is None:
                return table  # the size may become known later: do not cache the guess
            self._table = table
            logger.info("router table %s: auto serves %s", table.source, table.summary())
        return self._table

    # --- one request ---

    async def run(
        self,
        rendered: RenderedPrompt,
        plan: Plan,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stops: list[str],
        seed: int | None = None,
        max_flops: int | None = None,
        deadline_s: float | None = None,
        degraded: str | None = None,
        watch: Watch | None = None,
    ) -> Outcome:
        """Run `plan`; past `deadline_s`, answer with the best finished candidate (partial) or
        raise DeadlineExceeded. `degraded` (the PRM is down) runs majority vote instead.
        `watch`, when given, is filled with the live counters of this run."""
        if degraded is not None:
            plan = dataclasses.replace(plan, strategy="majority")
        progress = Progress()
        config = SearchConfig(
            budget=plan.budget,
            beam_width=plan.beam_width,
            aggregation=plan.aggregation,
            selection=plan.selection,
            temperature=temperature,
            top_p=top_p,
            max_step_tokens=min(self.settings.max_step_tokens, max_tokens),
            max_tokens=max_tokens,
            max_iterations=self.settings.max_iterations,
            solution_stops=tuple(dict.fromkeys([*rendered.solution_stops, *stops])),
            seed=seed,
            progress=progress,
        )
        problem = Problem(question=rendered.question, prompt_ids=tuple(rendered.prompt_ids))
        counter = await self.flops_counter()
        policy: PolicyClient = self.policy
        prm: PRMClient = self.prm
        meter: FlopsMeter | None = None
        if max_flops is not None:
            if counter.policy is None or counter.prm is None:
                raise FlopsUnknown(
                    "a FLOPs ceiling needs the models' parameter counts "
                    "(set TTS_POLICY_PARAMS / TTS_PRM_PARAMS on the server)"
                )
            meter = FlopsMeter(counter, max_flops)
            policy, prm = MeteredPolicy(policy, meter), MeteredPRM(prm, meter)
        clock = StageClock()
        policy, prm = TimedPolicy(policy, clock), TimedPRM(prm, clock)

        started = time.perf_counter()
        difficulty: Difficulty | None = None
        route: Route | None = None
        stages: dict[str, float] = {}
        partial = False
        decision: list[tuple[Difficulty | None, Route]] = []
        if watch is not None:
            watch.progress, watch.clock, watch.decision = progress, clock, decision
        work: Awaitable[StrategyResult]
        if plan.strategy == "auto":
            work = self._route(problem, config, policy, prm, stages, decision)
        else:
            strategy = STRATEGIES[plan.strategy]
            work = strategy(problem, config, policy, prm if plan.needs_prm else None)
        try:
            result = await asyncio.wait_for(work, deadline_s)
        except TimeoutError:
            # wait_for cancelled the strategy: its upstream calls are closed by now.
            result = await self._best_so_far(progress, config, clock)
            partial = True
        if decision:
            difficulty, route = decision[0]
        wall = time.perf_counter() - started
        stages["generation"] = clock.generation
        stages["prm_scoring"] = clock.prm_scoring
        stages["selection"] = max(0.0, wall - clock.generation - clock.prm_scoring)
        return Outcome(
            plan,
            result,
            wall,
            stages=stages,
            flops=counter.count(result.policy_usage, result.prm_usage),
            difficulty=difficulty,
            route=route,
            flops_limited=meter.limited if meter else False,
            max_flops=max_flops,
            partial=partial,
            degraded=degraded,
            temperature=temperature,
        )

    @staticmethod
    async def _best_so_far(
        progress: Progress, config: SearchConfig, clock: StageClock
    ) -> StrategyResult:
        unique = {id(c): c for c in progress.finished}.values()  # a candidate may be added twice
        done = [c for c in unique if c.text.strip()]
        if not done:
            raise DeadlineExceeded("the request's deadline passed before any answer was finished")
        scored = all(c.score is not None for c in done)
        return await finish(
            done,
            config.selection if scored else "majority",
            config,
            iterations=0,
            policy_usage=clock.policy_usage,
            prm_usage=clock.prm_usage,
        )

    async def _route(
        self,
        problem: Problem,
        config: SearchConfig,
        policy: PolicyClient,
        prm: PRMClient,
        stages: dict[str, float],
        decision: list[tuple[Difficulty | None, Route]],
    ) -> StrategyResult:
        """Pilot, estimate the difficulty, then spend what is left of the budget as routed."""
        table = await self.router_table()
        if table.fixed_strategy is not None:
            # Calibration found no routing that beats this strategy on this model pair. It runs
            # as a request naming it would (no pilot), on the share of the budget calibrated.
            name = table.fixed_strategy
            width = table.fixed_beam_width or self.settings.default_beam_width
            fixed_route = RouterRoute(name, width, table.fixed_budget_share)
            budget, width = plan_budget(fixed_route, config.budget, 0)
            decision.append((None, Route(name, budget, width, False)))
            fixed = dataclasses.replace(config, budget=budget, beam_width=width)
            return await STRATEGIES[name](
                problem, fixed, policy, prm if name in PRM_STRATEGIES else None
            )
        k = min(table.pilot_samples, config.budget)
        started = time.perf_counter()
        pilot = await STRATEGIES["best_of_n"](
            problem, dataclasses.replace(config, budget=k), policy, prm
        )
        stages["pilot"] = time.perf_counter() - started
        difficulty = estimate(table, pilot.candidates)
        chosen = table.routes[difficulty.bin]
        early = table.exits_early(difficulty.mean_score, difficulty.agreement)
        n, width = plan_budget(chosen, config.budget, k)
        if early or n == 0:
            decision.append((difficulty, Route("pilot", k, 1, early)))
            return pilot
        served = Route(chosen.strategy, k + n, width, False)
        decision.append((difficulty, served))

        routed = dataclasses.replace(config, budget=n, beam_width=width)
        if chosen.strategy == "adaptive":
            main = await self._adaptive(problem, routed, policy, prm, pilot, chosen)
            served.budget = k + len(main.candidates)
            if not main.candidates:
                return pilot
        else:
            needs_prm = chosen.strategy in PRM_STRATEGIES
            main = await STRATEGIES[chosen.strategy](
                problem, routed, policy, prm if needs_prm else None
            )
        policy_usage, prm_usage = PolicyUsage(), PRMUsage()
        for part in (pilot, main):
            policy_usage.add(part.policy_usage)
            prm_usage.add(part.prm_usage)
        # The pilot's samples stay candidates: nothing it computed is thrown away.
        rule = "majority" if chosen.strategy == "majority" else config.selection
        merged = await finish(
            [*pilot.candidates, *main.candidates],
            rule,
            config,
            iterations=pilot.iterations + main.iterations,
            policy_usage=policy_usage,
            prm_usage=prm_usage,
        )
        return merged

    @staticmethod
    async def _adaptive(
        problem: Problem,
        config: SearchConfig,
        policy: PolicyClient,
        prm: PRMClient,
        pilot: StrategyResult,
        route: RouterRoute,
    ) -> StrategyResult:
        """Best-of-N in rounds after the pilot, up to `config.budget` samples, until the route's
        stopping rule holds. Returns only the new samples, scored (none when the pilot settles
        it); the caller selects once, over the pilot's and these together."""
        answers = [c.answer for c in pilot.candidates]
        candidates: list[Candidate] = []
        policy_usage, prm_usage = PolicyUsage(), PRMUsage()
        rounds = 0
        # Answer equivalence (math-verify) is CPU work: off the event loop, as selection is.
        while len(candidates) < config.budget and not await asyncio.to_thread(
            stops_sampling, answers, route
        ):
            size = min(route.round_size, config.budget - len(candidates))
            drawn = await whole_solutions(policy, problem, config, policy_usage, n=size)
            await score(prm, problem, drawn, config, prm_usage)
            candidates.extend(drawn)
            answers.extend(c.answer for c in drawn)
            rounds += 1
        return StrategyResult(
            candidates=candidates,
            chosen=0,
            answer=None,
            votes={},
            iterations=rounds,
            policy_usage=policy_usage,
            prm_usage=prm_usage,
        )
