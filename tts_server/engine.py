"""Runs one request: render the prompt, run the planned strategy, time it. No HTTP here."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from tts_server.plan import Plan
from tts_server.prompting import RenderedPrompt, load_profile, render_chat
from tts_server.settings import Settings
from tts_server.strategies import STRATEGIES
from tts_server.types import PolicyClient, PRMClient, Problem, SearchConfig, StrategyResult


@dataclass
class Outcome:
    plan: Plan
    result: StrategyResult
    wall_time_s: float


class TokenizingPolicy(PolicyClient, Protocol):
    """A policy client that can also render prompts (the vLLM client is one)."""

    async def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    async def tokenize_text(self, text: str) -> list[int]: ...


class TTSEngine:
    def __init__(self, settings: Settings, policy: TokenizingPolicy, prm: PRMClient) -> None:
        self.settings = settings
        self.policy = policy
        self.prm = prm

    async def render_chat(self, messages: list[dict[str, Any]]) -> RenderedPrompt:
        profile = load_profile(self.settings.profile_for(self.settings.policy_model))
        return await render_chat(profile, messages, self.policy)

    async def render_completion(self, prompt: str) -> RenderedPrompt:
        # A completions prompt is the client's raw text: no profile, no template.
        return RenderedPrompt(prompt, await self.policy.tokenize_text(prompt), [])

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
    ) -> Outcome:
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
        )
        problem = Problem(question=rendered.question, prompt_ids=tuple(rendered.prompt_ids))
        strategy = STRATEGIES[plan.strategy]
        started = time.perf_counter()
        result = await strategy(problem, config, self.policy, self.prm if plan.needs_prm else None)
        return Outcome(plan, result, time.perf_counter() - started)
