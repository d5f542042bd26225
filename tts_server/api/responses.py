"""A response from an `Outcome`: the parts whole answers and streamed ones share."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from tts_server.api.protocol import HEADER_BUDGET, HEADER_DIFFICULTY, HEADER_ROUTED, HEADER_STRATEGY
from tts_server.engine import Outcome
from tts_server.types import Job

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
    result, job, decision = outcome.result, outcome.job, outcome.decision
    usage = result.policy_usage
    difficulty = decision.difficulty if decision else None
    return {
        "strategy": job.strategy,
        "requested_strategy": job.requested,
        "budget": job.budget,
        "beam_width": job.beam_width,
        "aggregation": job.aggregation,
        "selection": job.selection,
        "temperature": job.temperature,
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
        "max_flops": job.max_flops,
        "flops_limited": outcome.flops_limited,
        "difficulty": difficulty.as_dict() if difficulty else None,
        "route": decision.route() if decision else None,
        "partial": outcome.partial,
        "degraded": job.degraded,
        "wall_time_s": round(outcome.wall_time_s, 4),
        "stage_seconds": {k: round(v, 4) for k, v in outcome.stages.items()},
    }


def completion_body(outcome: Outcome, kind: Kind, model: str) -> dict[str, Any]:
    """A whole response: `chat.completion` or `text_completion`, the selected solution its one
    choice."""
    text = answer_text(outcome, kind)
    choice: dict[str, Any] = {"index": 0}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason(outcome.result.best.finish_reason)
    prefix, obj = ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_object(outcome),
        "tts": tts_object(outcome),
    }


def response_headers(job: Job, outcome: Outcome | None = None) -> dict[str, str]:
    """Strategy and budget; difficulty and route once the router has decided (not yet known
    when a stream starts: its last chunk's `tts` has them)."""
    headers = {HEADER_STRATEGY: job.strategy, HEADER_BUDGET: str(job.budget)}
    decision = outcome.decision if outcome is not None else None
    if decision is not None and decision.difficulty is not None:
        headers[HEADER_DIFFICULTY] = decision.difficulty.bin
    if decision is not None:
        headers[HEADER_ROUTED] = decision.strategy
    return headers
