"""What the gateway answers, as OpenAI's wire format: whole responses, stream chunks and the
model list; their `usage` and `tts` report are `api.protocol_report`'s. Shapes only:
`api.responses` fills them from an `Outcome`. Fields are declared in the order they go out on
the wire.

Each endpoint has its own classes (`ChatCompletion` and `ChatCompletionChunk`, `TextCompletion`
and `TextCompletionChunk`). They differ only in `object` and in what a choice carries, so the
common fields live on `Completion` and `CompletionChunk`, and each subclass says in `choice` how
a text goes into its choice: picking the class is the one thing that depends on the endpoint.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel

from tts_server.api.protocol_report import Sparse, TTSProgress, TTSReport, Usage, Wire
from tts_server.confidence import TokenLogprob
from tts_server.types import FinishReason

# --- logprobs: the selected candidate's tokens, as vLLM and OpenAI return them ---


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


class TopLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Wire):
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


class TextLogprobs(Wire):
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


class FunctionCall(Wire):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Sparse):
    """`tool_calls` is left out unless the answer is a call (then `content` is null)."""

    sparse = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Wire):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class TextChoice(Wire):
    index: int = 0
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: FinishReason


class Completion(Wire):
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


class ToolCallDelta(Wire):
    index: int = 0
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Delta(Sparse):
    sparse = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Wire):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class TextChunkChoice(Wire):
    index: int = 0
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: FinishReason | None


class CompletionChunk(Sparse):
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


class ModelCard(Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]
