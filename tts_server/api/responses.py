"""A response from an `Outcome`: the parts whole answers and streamed ones share."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from tts_server.api.protocol import HEADER_BUDGET, HEADER_DIFFICULTY, HEADER_ROUTED, HEADER_STRATEGY
from tts_server.api.protocol_report import (
    ConfidenceReport,
    DifficultyReport,
    FlopsReport,
    PolicyTokens,
    PRMReport,
    PromptTokensDetails,
    RouteReport,
    TTSReport,
    Usage,
)
from tts_server.api.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    FunctionCall,
    Logprobs,
    TextCompletion,
    TextCompletionChunk,
    ToolCall,
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

    def answer_text(self, candidate: Candidate) -> str:
        """A selected solution as the client gets it."""
        text = candidate.text
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


def tool_call(outcome: Outcome, candidate: Candidate) -> ToolCall | None:
    """The call a candidate makes, when the request asked for one (`tool_choice`): vLLM kept
    its text to the call's JSON shape; a text cut short by the token limit is no call (it is
    answered as text, with finish_reason "length")."""
    tools = outcome.job.tools
    if tools is None or tools.call is None:
        return None
    try:
        data = json.loads(candidate.text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments")
    if not isinstance(arguments, dict):
        return None
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=data["name"], arguments=json.dumps(arguments)),
    )


def usage_of(outcome: Outcome) -> Usage:
    """OpenAI usage: every token the request cost, all candidates included."""
    usage = outcome.result.policy_usage
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def answer_logprobs(outcome: Outcome, candidate: Candidate) -> Logprobs | None:
    """A chosen candidate's tokens and the alternatives per token the client asked for, or None
    when it asked for none. A search's candidate has its steps' tokens in order: each step
    continued the exact token ids before it, so each token's logprob is the one a single pass
    would give there."""
    wanted = outcome.job.logprobs
    if wanted is None:
        return None
    return candidate.logprobs or [], wanted


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


def tts_report(outcome: Outcome, trace: dict[str, Any] | None = None) -> TTSReport:
    """What the search did and what it cost: the `tts` object of a response, with the search
    trace when the request asked for it (`trace`, built once by the route)."""
    result, job, decision = outcome.result, outcome.job, outcome.decision
    usage, prm = result.policy_usage, result.prm_usage
    difficulty = decision.difficulty if decision else None
    extra = {"trace": trace} if trace is not None else {}
    return TTSReport(
        **extra,
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


def completion(
    outcome: Outcome,
    kind: Kind,
    model: str,
    trace: dict[str, Any] | None = None,
    *,
    request_id: str | None = None,
) -> Completion:
    """A whole response: `chat.completion` or `text_completion`, the selected solution its
    first choice (and with `n`, the next best distinct ones the next)."""
    endpoint = ENDPOINTS[kind]
    choices: list[BaseModel] = []
    for index, candidate in enumerate(outcome.selected):
        call = tool_call(outcome, candidate) if kind == "chat" else None
        if call is not None:
            message = AssistantMessage(content=None, tool_calls=[call])
            choices.append(ChatChoice(index=index, message=message, finish_reason="tool_calls"))
            continue
        text, reason = endpoint.answer_text(candidate), finish_reason(candidate.finish_reason)
        logprobs = answer_logprobs(outcome, candidate)
        choices.append(endpoint.whole.choice(text, reason, index, logprobs))
    return endpoint.whole(
        id=request_id or endpoint.new_id(),
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=usage_of(outcome),
        tts=tts_report(outcome, trace),
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
