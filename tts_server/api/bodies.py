"""The parts of a gateway response that whole answers and streamed ones share."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from tts_server.engine import Outcome
from tts_server.plan import HEADER_BUDGET, HEADER_DIFFICULTY, HEADER_ROUTED, HEADER_STRATEGY, Plan

# The endpoint a response answers: chat (a message) or completions (a text).
Kind = Literal["chat", "text"]


def answer_text(outcome: Outcome, kind: Kind) -> str:
    """The selected solution as the client gets it: a chat message without the whitespace around
    it, a completion exactly as generated."""
    text = outcome.result.best.text
    return text.strip() if kind == "chat" else text


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def usage_object(outcome: Outcome) -> dict[str, Any]:
    """OpenAI usage: every token the request cost, all candidates included."""
    usage = outcome.result.policy_usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def tts_object(outcome: Outcome) -> dict[str, Any]:
    """What the search did and what it cost: the `tts` object of a response."""
    result, plan = outcome.result, outcome.plan
    usage = result.policy_usage
    return {
        "strategy": plan.strategy,
        "requested_strategy": plan.requested,
        "budget": plan.budget,
        "beam_width": plan.beam_width,
        "aggregation": plan.aggregation,
        "selection": plan.selection,
        "temperature": outcome.temperature,
        "answer": result.answer,
        "votes": result.votes,
        "num_candidates": len(result.candidates),
        "candidates_answers": [c.answer for c in result.candidates],
        "candidate_scores": [c.score for c in result.candidates],
        "iterations": result.iterations,
        "policy_tokens": {
            "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens,
            "cached": usage.cached_tokens,
            "calls": usage.calls,
            "requests": usage.requests,
        },
        "prm": {
            "calls": result.prm_usage.calls,
            "steps_scored": result.prm_usage.steps_scored,
            "steps_cached": result.prm_usage.steps_cached,
            "tokens": result.prm_usage.tokens,
        },
        "flops": outcome.flops.as_dict() if outcome.flops else None,
        "max_flops": outcome.max_flops,
        "flops_limited": outcome.flops_limited,
        "difficulty": outcome.difficulty.as_dict() if outcome.difficulty else None,
        "route": dataclasses.asdict(outcome.route) if outcome.route else None,
        "partial": outcome.partial,
        "degraded": outcome.degraded,
        "wall_time_s": round(outcome.wall_time_s, 4),
        "stage_seconds": {k: round(v, 4) for k, v in outcome.stages.items()},
    }


def response_headers(plan: Plan, outcome: Outcome | None = None) -> dict[str, str]:
    """Strategy and budget; difficulty and route once the router has decided (not yet known
    when a stream starts: its last chunk's `tts` has them)."""
    headers = {HEADER_STRATEGY: plan.strategy, HEADER_BUDGET: str(plan.budget)}
    if outcome is not None and outcome.difficulty is not None:
        headers[HEADER_DIFFICULTY] = outcome.difficulty.bin
    if outcome is not None and outcome.route is not None:
        headers[HEADER_ROUTED] = outcome.route.strategy
    return headers
