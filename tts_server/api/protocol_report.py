"""The parts of a response both endpoints share, whole or streamed: `usage`, and the `tts`
report of what the search did and what it cost (or, in a progress chunk, how far it is). Here
too the wire models' bases: `Wire` (no stray keys) and `Sparse` (keys left out until set).
`api.protocol_responses` builds the OpenAI responses and chunks from them."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from tts_server.types import Aggregation, SelectionRule, StrategyName


class Wire(BaseModel):
    # The shapes are the spec: a stray key is a bug on our side, not something to pass along.
    model_config = ConfigDict(extra="forbid")


class Sparse(Wire):
    """A model whose `sparse` keys are left out of the JSON until set (set to None: null), as
    OpenAI leaves them out of a stream chunk rather than sending null."""

    sparse: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in self.sparse - self.model_fields_set:
            data.pop(name, None)
        return data


# --- usage ---


class PromptTokensDetails(Wire):
    cached_tokens: int


class Usage(Wire):
    """Every token the request cost the policy, all candidates included."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# --- the `tts` report: what the search did and what it cost ---


class PolicyTokens(Wire):
    prompt: int
    completion: int
    cached: int
    calls: int
    requests: int


class PRMReport(Wire):
    calls: int
    steps_scored: int
    steps_cached: int
    tokens: int


class FlopsReport(Wire):
    policy: int
    prm: int
    total: int
    saved_by_prefix_cache: int
    attention_included: bool


class DifficultyReport(Wire):
    bin: str
    confidence: float
    mean_score: float
    agreement: float
    pilot_samples: int


class RouteReport(Wire):
    strategy: str  # a strategy name, or "pilot": the pilot alone answered
    budget: int
    beam_width: int
    early_exit: bool


class ConfidenceReport(Wire):
    """A candidate's DeepConf confidences (tts_server/confidence.py); `cancelled`: closed while
    it generated (deepconf), so it did not vote."""

    mean: float
    lowest_group: float
    tail: float
    bottom_10: float
    tokens: int
    cancelled: bool


class TTSReport(Sparse):
    """The `tts` object of a whole response and of a stream's finishing chunk; `trace` only
    when the request asked for it (docs/trace.schema.json: a plain dict here, the schema file
    is its spec and the tests validate it)."""

    sparse = frozenset({"trace"})

    strategy: StrategyName
    requested_strategy: str
    budget: int
    beam_width: int
    aggregation: Aggregation
    selection: SelectionRule
    temperature: float
    answer: str | None
    votes: dict[str, float]
    num_candidates: int
    candidates_answers: list[str | None]
    candidate_scores: list[float | None]
    # Per candidate; None when the request sampled no logprobs (or for a candidate without).
    candidate_confidences: list[ConfidenceReport | None] | None
    iterations: int
    policy_tokens: PolicyTokens
    prm: PRMReport
    flops: FlopsReport | None  # None: a model's parameter count is unknown
    max_flops: int | None
    flops_limited: bool
    difficulty: DifficultyReport | None  # `auto` only
    route: RouteReport | None  # `auto` only
    partial: bool
    degraded: str | None
    wall_time_s: float
    stage_seconds: dict[str, float]
    trace: dict[str, Any] | None = None


class TTSProgress(Sparse):
    """The `tts` object of a progress chunk: the running search's counters, as the engine's
    `Watch.snapshot` reports them (a counter not known yet is left out), and for a request that
    asked for its trace, the tree's nodes added or changed since the last chunk."""

    sparse = frozenset({"nodes"})

    progress: dict[str, int | str | None]
    nodes: list[dict[str, Any]] | None = None
