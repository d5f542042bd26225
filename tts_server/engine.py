"""Runs one `Job`: checks the upstreams, renders the prompt, runs the job's strategy through one
`Account` (tokens, stage times, the FLOPs ceiling) under its deadline, and says what it cost.
Orchestration only: the strategies (`auto` included) decide what to sample. No HTTP here."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tts_server.accounting import Account
from tts_server.affinity import Affinity, Pins
from tts_server.choices import rank
from tts_server.errors import DeadlineExceeded, FlopsUnknown, PromptTooLong, UpstreamDown
from tts_server.flops import Flops, FlopsCounter, find_policy_shape, find_prm_shape
from tts_server.prefixes import PrefixScores
from tts_server.prompting import PromptProfile, RenderedPrompt, render_chat
from tts_server.router import RouterTable
from tts_server.search_tree import SearchTree
from tts_server.settings import Settings
from tts_server.strategies import REGISTRY
from tts_server.strategies.common import finish
from tts_server.tables import choose_table
from tts_server.types import (
    CONFIDENCE_RULES,
    VOTES,
    Candidate,
    ChatPrompt,
    Decision,
    DeepConfConfig,
    Job,
    PolicyService,
    PRMService,
    Problem,
    Progress,
    SearchConfig,
    StopRule,
    StrategyResult,
    TextPrompt,
)

logger = logging.getLogger("tts_server.engine")

DEGRADED = "the PRM worker is unavailable: answered by majority vote"


class UpstreamHealth(Protocol):
    """The upstreams' health as last probed (the gateway's readiness loop keeps it)."""

    @property
    def policy_ok(self) -> bool: ...

    @property
    def prm_ok(self) -> bool: ...


@dataclass
class Outcome:
    job: Job
    result: StrategyResult
    wall_time_s: float
    flops: Flops | None = None
    decision: Decision | None = None
    # The FLOPs ceiling shrank or skipped a call.
    flops_limited: bool = False
    # Seconds per stage: pilot (auto only), generation, prm_scoring, and selection = the rest of
    # the wall time (selection, aggregation and bookkeeping between calls).
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    # The deadline passed: the answer is the best of the candidates finished by then.
    partial: bool = False
    # The candidates answered as choices, best first (`choices.rank`; empty: the chosen one).
    choices: list[int] = dataclasses.field(default_factory=list)
    # The step search's tree, when the request's trace was wanted (`TTSEngine.wants_tree`).
    tree: SearchTree | None = None

    @property
    def selected(self) -> list[Candidate]:
        """The candidates to answer with, one per choice, best first."""
        result = self.result
        return [result.candidates[i] for i in self.choices or [result.chosen]]


@dataclass
class Watch:
    """A running job's live counters, read by a streaming response for its progress chunks
    (`run` fills it in as it starts)."""

    progress: Progress | None = None
    account: Account | None = None
    # The live tree, for a request that asked for its trace (its progress chunks carry nodes).
    tree: SearchTree | None = None

    def nodes(self) -> list[dict[str, Any]]:
        """The tree's nodes added or changed since the last call (none without a tree)."""
        return self.tree.drain() if self.tree is not None else []

    def snapshot(self) -> dict[str, Any]:
        """What the job has done so far: calls count once they return."""
        seen: dict[str, Any] = {}
        if self.progress is not None:
            seen["candidates_finished"] = len({id(c) for c in self.progress.finished})
        if self.account is not None:
            seen["policy_calls"] = self.account.policy_usage.calls
            seen["completion_tokens"] = self.account.policy_usage.completion_tokens
            seen["prm_steps_scored"] = self.account.prm_usage.steps_scored
        decision = self.progress.decision if self.progress is not None else None
        if decision is not None:
            seen["difficulty"] = decision.difficulty.bin if decision.difficulty else None
            seen["route"] = decision.strategy
        return seen


def _canonical_prompt(prompt: ChatPrompt | TextPrompt) -> str:
    """One text per distinct prompt (what a prompt-derived pin is a digest of)."""
    if isinstance(prompt, ChatPrompt):
        return json.dumps(prompt.messages, sort_keys=True, ensure_ascii=False)
    return prompt.text


class TTSEngine:
    def __init__(
        self,
        settings: Settings,
        policy: PolicyService,
        prm: PRMService,
        health: UpstreamHealth,
        profile: PromptProfile,
        table: RouterTable | None = None,
    ) -> None:
        """`table`: the router table `auto` serves (`load_table` at start, so a bad one fails
        there); None: the default for the policy's size, chosen once that size is known."""
        self.settings = settings
        self.policy = policy
        self.prm = prm
        self.health = health
        self.profile = profile
        self._counter: FlopsCounter | None = None
        self._table = table
        self.pins = Pins(settings.affinity_scope, settings.affinity_key, settings.affinity_secret)
        if table is not None:
            logger.info(
                "router table %s, because TTS_ROUTER_TABLE names it: auto serves %s",
                table.source,
                table.summary(),
            )

    def new_affinity(self, job: Job) -> Affinity | None:
        """A new request's pin, None when no affinity header is configured. Its caller hands it
        back to `end_affinity` once the request is over, however it ended (api/routes.py)."""
        if not self.settings.affinity_header:
            return None
        # Only a prompt-derived pin reads the prompt: no serialising it per request otherwise.
        return self.pins.acquire(_canonical_prompt(job.prompt) if self.pins.by_prompt else "")

    def end_affinity(self, affinity: Affinity) -> list[str]:
        """The keys to release at the router now that `affinity`'s request is over."""
        return self.pins.release(affinity)

    async def prepare(
        self, job: Job, affinity: Affinity | None = None
    ) -> tuple[Job, RenderedPrompt]:
        """Everything that can refuse a job before it costs a generation: the upstreams' health
        (with the PRM down, majority vote instead where allowed: the one place that decides),
        a FLOPs ceiling that cannot be counted, the prompt rendered, and its length."""
        if not self.health.policy_ok:
            raise UpstreamDown("the policy server is unavailable; retry later")
        if uses_prm(job) and not self.health.prm_ok:
            if not self.settings.degrade_to_majority:
                raise UpstreamDown(
                    f"the PRM worker is unavailable, and strategy {job.strategy!r} needs it; "
                    "retry later or ask for 'majority'"
                )
            selection = job.selection if job.selection in VOTES else "majority"
            job = dataclasses.replace(
                job, strategy="majority", selection=selection, degraded=DEGRADED
            )
        if job.max_flops is not None:
            counter = await self.flops_counter()
            if counter.policy is None or counter.prm is None:
                raise FlopsUnknown(
                    "a FLOPs ceiling needs the models' parameter counts "
                    "(set TTS_POLICY_PARAMS / TTS_PRM_PARAMS on the server)"
                )
        key = affinity.key() if affinity is not None else None
        if isinstance(job.prompt, ChatPrompt):
            messages = list(job.prompt.messages)
            tools = job.tools.definitions if job.tools is not None else None
            rendered = await render_chat(
                self.profile, messages, self.policy, affinity=key, tools=tools
            )
        else:  # a completions prompt is the client's raw text: no profile, no template
            ids = await self.policy.tokenize_text(job.prompt.text, affinity=key)
            rendered = RenderedPrompt(job.prompt.text, ids, [])
        if len(rendered.prompt_ids) > self.settings.max_prompt_tokens:
            raise PromptTooLong(len(rendered.prompt_ids), self.settings.max_prompt_tokens)
        return job, rendered

    async def run(
        self,
        job: Job,
        rendered: RenderedPrompt,
        watch: Watch | None = None,
        affinity: Affinity | None = None,
        on_spend: Callable[[int, int], None] | None = None,
    ) -> Outcome:
        """Run a prepared job; past its deadline, answer with the best finished candidate
        (partial) or raise DeadlineExceeded. `watch`, when given, sees the live counters;
        `affinity`, the request's pin, goes on every upstream call; `on_spend` is told each
        call's tokens and FLOPs as it returns."""
        counter = await self.flops_counter()
        strategy = REGISTRY[job.strategy]
        progress = Progress()
        config = self._search_config(job, rendered, progress)
        tree = SearchTree() if self.wants_tree(job) else None
        if tree is not None:
            config = dataclasses.replace(config, tree=tree)
        if job.strategy == "auto":
            config = dataclasses.replace(config, router=await self.router_table())
        steps = PrefixScores() if self.settings.prm_step_cache else None
        account = Account(
            counter, job.max_flops, step_scores=steps, affinity=affinity, on_spend=on_spend
        )
        policy, prm = account.wrap(self.policy, self.prm)
        if watch is not None:
            watch.progress, watch.account = progress, account
            watch.tree = tree if job.return_trace else None
        problem = Problem(question=rendered.question, prompt_ids=tuple(rendered.prompt_ids))

        started = time.perf_counter()
        partial = False
        work = strategy.run(problem, config, policy, prm if uses_prm(job) else None)
        try:
            result = await asyncio.wait_for(work, job.deadline_s)
        except TimeoutError:
            # wait_for cancelled the strategy: its upstream calls are closed by now.
            result = await _best_so_far(progress, config, account, job.deadline_s)
            partial = True
        # Ranking compares answers with math-verify (CPU work): off the event loop, and only when
        # more than one choice is asked for.
        choices = await asyncio.to_thread(rank, result, job.n) if job.n > 1 else []
        wall = time.perf_counter() - started
        stages = {
            **progress.stages,
            "generation": account.generation_s,
            "prm_scoring": account.prm_scoring_s,
            "selection": max(0.0, wall - account.generation_s - account.prm_scoring_s),
        }
        return Outcome(
            job,
            result,
            wall,
            flops=counter.count(result.policy_usage, result.prm_usage),
            decision=progress.decision,
            flops_limited=account.limited,
            stages=stages,
            partial=partial,
            choices=choices,
            tree=tree,
        )

    def wants_tree(self, job: Job) -> bool:
        """Whether the search records its tree: its trace goes in the response, to the trace
        export or to the inspector's store."""
        return job.return_trace or job.trace or self.settings.inspector

    def _search_config(
        self, job: Job, rendered: RenderedPrompt, progress: Progress
    ) -> SearchConfig:
        s = self.settings
        return SearchConfig(
            budget=job.budget,
            # `auto` hands the server's width to a table's fixed search that names none.
            beam_width=s.default_beam_width if job.strategy == "auto" else job.beam_width,
            aggregation=job.aggregation,
            selection=job.selection,
            temperature=job.temperature,
            top_p=job.top_p,
            max_step_tokens=min(s.max_step_tokens, job.max_tokens),
            max_tokens=job.max_tokens,
            max_iterations=s.max_iterations,
            solution_stops=tuple(dict.fromkeys([*rendered.solution_stops, *job.stops])),
            seed=job.seed,
            passthrough=job.passthrough,
            progress=progress,
            # `adaptive` named by a client (or a table's fixed adaptive); auto's routes set theirs.
            stopping=StopRule(
                s.adaptive_round_size,
                s.adaptive_stop_margin,
                s.adaptive_give_up_after,
                beta_threshold=s.adaptive_threshold,
            ),
            confidence=s.confidence(self._logprobs_to_sample(job)),
            deepconf=DeepConfConfig(
                warmup=s.deepconf_warmup,
                keep=s.deepconf_keep,
                round_size=s.deepconf_round_size,
                consensus=s.deepconf_consensus,
            ),
        )

    def _logprobs_to_sample(self, job: Job) -> int | None:
        """Top logprobs per token to sample with: the confidence's k when the job needs
        confidences (a confidence vote, deepconf, or the server samples them always), at least
        what the client wants back; None: no logprobs."""
        s = self.settings
        wants = (
            s.confidence_always
            or job.selection in CONFIDENCE_RULES
            or job.strategy == "deepconf"
            or job.logprobs is not None
        )
        if not wants:
            return None
        return max(s.confidence_top_k, job.logprobs or 0)

    # --- what the FLOPs count and `auto` need, found once ---

    async def flops_counter(self) -> FlopsCounter:
        if self._counter is None or None in (self._counter.policy, self._counter.prm):
            policy = self._counter.policy if self._counter else None
            prm = self._counter.prm if self._counter else None
            self._counter = FlopsCounter(
                policy or await find_policy_shape(self.settings, self.policy),
                prm or await find_prm_shape(self.settings, self.prm),
                self.settings.flops_include_attention,
            )
        return self._counter

    @property
    def table_chosen(self) -> bool:
        """Whether `auto`'s table is known for good (named by settings, or chosen and logged)."""
        return self._table is not None

    async def router_table(self) -> RouterTable:
        if self._table is None:
            shape = (await self.flops_counter()).policy
            prm_model = await self.prm.model_name()
            chosen = choose_table(
                self.settings.policy_model,
                prm_model,
                shape.parameters if shape else None,
                weak_prm=self.settings.router_weak_prm,
                use_measured=self.settings.router_measured,
            )
            if shape is None or prm_model is None:
                return chosen.table  # the pair may become known later: do not cache the guess
            self._table = chosen.table
            logger.info(
                "router table %s, because %s: auto serves %s",
                chosen.table.source,
                chosen.reason,
                chosen.table.summary(),
            )
        return self._table


def uses_prm(job: Job) -> bool:
    """Whether the job's strategy gets the PRM: the strategies that need one, and `adaptive`
    asked for a rule that reads PRM scores (its samples are then scored as they are drawn)."""
    return REGISTRY[job.strategy].needs_prm or (
        job.strategy == "adaptive" and job.selection not in VOTES
    )


async def _best_so_far(
    progress: Progress, config: SearchConfig, account: Account, deadline_s: float | None
) -> StrategyResult:
    unique = {id(c): c for c in progress.finished}.values()  # a candidate may be added twice
    done = [c for c in unique if c.text.strip()]
    if not done:
        raise DeadlineExceeded(
            f"the request's deadline passed before any answer was finished ({deadline_s:g} s)"
        )
    scored = all(c.score is not None for c in done)
    return await finish(
        done,
        config.selection if scored else "majority",
        config,
        iterations=0,
        policy_usage=account.policy_usage,
        prm_usage=account.prm_usage,
    )
