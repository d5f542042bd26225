"""What the gateway answers, as OpenAI's wire format plus the `tts` report: whole responses,
stream chunks, usage and the model list. Shapes only: `api.responses` fills them from an
`Outcome`. Fields are declared in the order they go out on the wire.

Each endpoint has its own classes (`ChatCompletion` and `ChatCompletionChunk`, `TextCompletion`
and `TextCompletionChunk`). They differ only in `object` and in what a choice carries, so the
common fields live on `Completion` and `CompletionChunk`, and each subclass says in `choice` how
a text goes into its choice: picking the class is the one thing that depends on the endpoint.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from tts_server.confidence import TokenLogprob
from tts_server.types import Aggregation, FinishReason, SelectionRule, StrategyName


class _Wire(BaseModel):
    # The shapes are the spec: a stray key is a bug on our side, not something to pass along.
    model_config = ConfigDict(extra="forbid")


class _Sparse(_Wire):
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


class PromptTokensDetails(_Wire):
    cached_tokens: int


class Usage(_Wire):
    """Every token the request cost the policy, all candidates included."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# --- the `tts` report: what the search did and what it cost ---


class PolicyTokens(_Wire):
    prompt: int
    completion: int
    cached: int
    calls: int
    requests: int


class PRMReport(_Wire):
    calls: int
    steps_scored: int
    steps_cached: int
    tokens: int


class FlopsReport(_Wire):
    policy: int
    prm: int
    total: int
    saved_by_prefix_cache: int
    attention_included: bool


class DifficultyReport(_Wire):
    bin: str
    confidence: float
    mean_score: float
    agreement: float
    pilot_samples: int


class RouteReport(_Wire):
    strategy: str  # a strategy name, or "pilot": the pilot alone answered
    budget: int
    beam_width: int
    early_exit: bool


class ConfidenceReport(_Wire):
    """A candidate's DeepConf confidences (tts_server/confidence.py); `cancelled`: closed while
    it generated (deepconf), so it did not vote."""

    mean: float
    lowest_group: float
    tail: float
    bottom_10: float
    tokens: int
    cancelled: bool


class TTSReport(_Sparse):
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


class TTSProgress(_Sparse):
    """The `tts` object of a progress chunk: the running search's counters, as the engine's
    `Watch.snapshot` reports them (a counter not known yet is left out), and for a request that
    asked for its trace, the tree's nodes added or changed since the last chunk."""

    sparse = frozenset({"nodes"})

    progress: dict[str, int | str | None]
    nodes: list[dict[str, Any]] | None = None


# --- logprobs: the selected candidate's tokens, as vLLM and OpenAI return them ---


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Wire):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob], top: int) -> ChatLogprobs:
        """The tokens with their `top` most likely alternatives each."""
        return cls(
            content=[
                ChatTokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=_utf8(t.token),
                    top_logprobs=[
                        TopLogprob(token=alt, logprob=lp, bytes=_utf8(alt))
                        for alt, lp in t.top[:top]
                    ],
                )
                for t in tokens
            ]
        )


class TextLogprobs(_Wire):
    """The legacy completions shape: parallel lists; `top_logprobs` maps each position's most
    likely tokens to their logprobs (the token itself included, as vLLM does)."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float]] | None

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob], top: int, offset: int = 0) -> TextLogprobs:
        offsets: list[int] = []
        at = offset
        for t in tokens:
            offsets.append(at)
            at += len(t.token)
        return cls(
            text_offset=offsets,
            token_logprobs=[t.logprob for t in tokens],
            tokens=[t.token for t in tokens],
            top_logprobs=[{**dict(t.top[:top]), t.token: t.logprob} for t in tokens],
        )


# --- whole responses ---


class FunctionCall(_Wire):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Sparse):
    """`tool_calls` is left out unless the answer is a call (then `content` is null)."""

    sparse = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Wire):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class TextChoice(_Wire):
    index: int = 0
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: FinishReason


class Completion(_Wire):
    """The fields every whole response has; a subclass fixes `object` and the choice."""

    id: str
    object: str = ""  # each subclass fixes it (this class is abstract: never sent)
    created: int
    model: str
    choices: list[Any]
    usage: Usage
    tts: TTSReport

    @classmethod
    @abstractmethod
    def choice(
        cls,
        text: str,
        finish_reason: FinishReason,
        index: int = 0,
        logprobs: Logprobs | None = None,
    ) -> BaseModel:
        """`logprobs`: the answer's tokens and how many alternatives each (None: not asked)."""


# The tokens of an answer and the alternatives per token the client asked for.
Logprobs = tuple[Sequence[TokenLogprob], int]


class ChatCompletion(Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]

    @classmethod
    def choice(
        cls,
        text: str,
        finish_reason: FinishReason,
        index: int = 0,
        logprobs: Logprobs | None = None,
    ) -> ChatChoice:
        return ChatChoice(
            index=index,
            message=AssistantMessage(content=text),
            logprobs=None if logprobs is None else ChatLogprobs.of(*logprobs),
            finish_reason=finish_reason,
        )


class TextCompletion(Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]

    @classmethod
    def choice(
        cls,
        text: str,
        finish_reason: FinishReason,
        index: int = 0,
        logprobs: Logprobs | None = None,
    ) -> TextChoice:
        return TextChoice(
            index=index,
            text=text,
            logprobs=None if logprobs is None else TextLogprobs.of(*logprobs),
            finish_reason=finish_reason,
        )


# --- stream chunks ---


class ToolCallDelta(_Wire):
    index: int = 0
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Delta(_Sparse):
    sparse = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Wire):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class TextChunkChoice(_Wire):
    index: int = 0
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionChunk(_Sparse):
    """The fields every stream chunk has; a subclass fixes `object` and the choice. The
    usage-only chunk that ends a stream is one with empty `choices` and `usage` set.

    `usage` is left out unless the client asked for it (`stream_options.include_usage`), and is
    then null on every chunk but that last one; `tts` rides on progress and finishing chunks."""

    sparse = frozenset({"usage", "tts"})

    id: str
    object: str = ""  # each subclass fixes it (this class is abstract: never sent)
    created: int
    model: str
    choices: list[Any]
    usage: Usage | None = None
    tts: TTSReport | TTSProgress | None = None

    @classmethod
    @abstractmethod
    def choice(
        cls,
        text: str | None,
        finish_reason: FinishReason | None = None,
        index: int = 0,
        logprobs: Logprobs | None = None,
    ) -> BaseModel:
        """A choice with `text` (None: nothing new, as in a progress or finishing chunk), and
        with its tokens' logprobs when asked."""

    @classmethod
    def first_of(cls, text: str, index: int, logprobs: Logprobs | None = None) -> BaseModel:
        """Choice `index`'s whole text, as its first chunk: for a choice past the first, opened
        with the text (no opening chunk went out for it)."""
        return cls.choice(text, None, index, logprobs)

    @classmethod
    def opening(cls) -> BaseModel | None:
        """The choice a stream opens with before anything is known, if the endpoint has one."""
        return None


class ChatCompletionChunk(CompletionChunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]

    @classmethod
    def choice(
        cls,
        text: str | None,
        finish_reason: FinishReason | None = None,
        index: int = 0,
        logprobs: Logprobs | None = None,
    ) -> ChatChunkChoice:
        delta = Delta() if text is None else Delta(content=text)
        return ChatChunkChoice(
            index=index,
            delta=delta,
            logprobs=None if logprobs is None else ChatLogprobs.of(*logprobs),
            finish_reason=finish_reason,
        )

    @classmethod
    def first_of(cls, text: str, index: int, logprobs: Logprobs | None = None) -> ChatChunkChoice:
        if index == 0:  # the opening chunk gave it its role
            return cls.choice(text, logprobs=logprobs)
        return ChatChunkChoice(
            index=index,
            delta=Delta(role="assistant", content=text),
            logprobs=None if logprobs is None else ChatLogprobs.of(*logprobs),
            finish_reason=None,
        )

    @classmethod
    def opening(cls) -> ChatChunkChoice:
        # OpenAI opens a chat stream with the role.
        return ChatChunkChoice(delta=Delta(role="assistant", content=""), finish_reason=None)


class TextCompletionChunk(CompletionChunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChunkChoice]

    @classmethod
    def choice(
        cls,
        text: str | None,
        finish_reason: FinishReason | None = None,
        index: int = 0,
        logprobs: Logprobs | None = None,
    ) -> TextChunkChoice:
        return TextChunkChoice(
            index=index,
            text=text or "",
            logprobs=None if logprobs is None else TextLogprobs.of(*logprobs),
            finish_reason=finish_reason,
        )


# --- /v1/models ---


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]
