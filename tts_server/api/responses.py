"""A response from an `Outcome`: the parts whole answers and streamed ones share."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

from tts_server.api.protocol import HEADER_BUDGET, HEADER_DIFFICULTY, HEADER_ROUTED, HEADER_STRATEGY
from tts_server.api.protocol_responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ConfidenceReport,
    DifficultyReport,
    FlopsReport,
    Logprobs,
    PolicyTokens,
    PRMReport,
    PromptTokensDetails,
    RouteReport,
    TextCompletion,
    TextCompletionChunk,
    TTSReport,
    Usage,
)
from tts_server.engine import Outcome
from tts_server.types import Candidate, FinishReason, Job

# The endpoint a response answers: chat (a message) or completions (a text).
Kind = Literal["chat", "text"]


@dataclass(frozen=True)
class Endpoint:
    """Everything that differs between the two endpoints' responses."""

    path: str
    whole: type[Completion]
    chunk: type[CompletionChunk]
    id_prefix: str
    # A chat message goes out without the whitespace around it, a completion as generated.
    strip: bool
    # The request field an error about the prompt names.
    prompt_param: str

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def answer_text(self, outcome: Outcome) -> str:
        """The selected solution as the client gets it."""
        text = outcome.result.best.text
        return text.strip() if self.strip else text


ENDPOINTS: dict[Kind, Endpoint] = {
    "chat": Endpoint(
        "/v1/chat/completions",
        ChatCompletion,
        ChatCompletionChunk,
        "chatcmpl",
        strip=True,
        prompt_param="messages",
    ),
    "text": Endpoint(
        "/v1/completions",
        TextCompletion,
        TextCompletionChunk,
        "cmpl",
        strip=False,
        prompt_param="prompt",
    ),
}


def finish_reason(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def usage_of(outcome: Outcome) -> Usage:
    """OpenAI usage: every token the request cost, all candidates included."""
    usage = outcome.result.policy_usage
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def answer_logprobs(outcome: Outcome) -> Logprobs | None:
    """The selected candidate's tokens and the alternatives per token the client asked for, or
    None when it asked for none. A search's candidate has its steps' tokens in order: each step
    continued the exact token ids before it, so each token's logprob is the one a single pass
    would give there."""
    wanted = outcome.job.logprobs
    if wanted is None:
        return None
    return outcome.result.best.logprobs or [], wanted


def confidences(candidates: list[Candidate]) -> list[ConfidenceReport | None] | None:
    """Each candidate's confidences; None when no candidate was sampled with logprobs."""
    if all(c.confidence is None for c in candidates):
        return None
    return [
        None
        if c.confidence is None
        else ConfidenceReport.model_validate(
            {**c.confidence.as_dict(), "cancelled": c.finish_reason == "cancelled"}
        )
        for c in candidates
    ]


def tts_report(outcome: Outcome) -> TTSReport:
    """What the search did and what it cost: the `tts` object of a response."""
    result, job, decision = outcome.result, outcome.job, outcome.decision
    usage, prm = result.policy_usage, result.prm_usage
    difficulty = decision.difficulty if decision else None
    return TTSReport(
        strategy=job.strategy,
        requested_strategy=job.requested,
        budget=job.budget,
        beam_width=job.beam_width,
        aggregation=job.aggregation,
        selection=job.selection,
        temperature=job.temperature,
        answer=result.answer,
        votes=result.votes,
        num_candidates=len(result.candidates),
        candidates_answers=[c.answer for c in result.candidates],
        candidate_scores=[c.score for c in result.candidates],
        candidate_confidences=confidences(result.candidates),
        iterations=result.iterations,
        policy_tokens=PolicyTokens(
            prompt=usage.prompt_tokens,
            completion=usage.completion_tokens,
            cached=usage.cached_tokens,
            calls=usage.calls,
            requests=usage.requests,
        ),
        prm=PRMReport(
            calls=prm.calls,
            steps_scored=prm.steps_scored,
            steps_cached=prm.steps_cached,
            tokens=prm.tokens,
        ),
        # The engine's own views (rounding included); the models check their keys.
        flops=FlopsReport.model_validate(outcome.flops.as_dict()) if outcome.flops else None,
        max_flops=job.max_flops,
        flops_limited=outcome.flops_limited,
        difficulty=DifficultyReport.model_validate(difficulty.as_dict()) if difficulty else None,
        route=RouteReport.model_validate(decision.route()) if decision else None,
        partial=outcome.partial,
        degraded=job.degraded,
        wall_time_s=round(outcome.wall_time_s, 4),
        stage_seconds={k: round(v, 4) for k, v in outcome.stages.items()},
    )


def completion(outcome: Outcome, kind: Kind, model: str) -> Completion:
    """A whole response: `chat.completion` or `text_completion`, the selected solution its one
    choice."""
    endpoint = ENDPOINTS[kind]
    choice = endpoint.whole.choice(
        endpoint.answer_text(outcome),
        finish_reason(outcome.result.best.finish_reason),
        answer_logprobs(outcome),
    )
    return endpoint.whole(
        id=endpoint.new_id(),
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=usage_of(outcome),
        tts=tts_report(outcome),
    )


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
