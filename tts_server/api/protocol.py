"""The OpenAI wire format the gateway speaks: request bodies, the `tts` object that carries the
search options in the body, and the one error shape of the gateway, its guard and the PRM worker.
What the gateway answers is in `protocol_responses`.

Imports pydantic and `tts_server.types` only: the PRM worker uses the error shape too."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tts_server.types import Aggregation, SelectionRule

# Request headers: the search options (they win over the body's `tts` object).
HEADER_STRATEGY = "X-TTS-Strategy"
HEADER_BUDGET = "X-TTS-Budget"
HEADER_BEAM_WIDTH = "X-TTS-Beam-Width"
HEADER_MAX_FLOPS = "X-TTS-Max-FLOPs"
HEADER_DEADLINE = "X-TTS-Deadline-S"
# Response headers: what the router decided.
HEADER_DIFFICULTY = "X-TTS-Difficulty"
HEADER_ROUTED = "X-TTS-Routed-Strategy"


class TTSOptions(BaseModel):
    """Search options for clients that cannot set the X-TTS-* headers (headers win)."""

    model_config = ConfigDict(extra="forbid")

    strategy: str | None = None
    budget: int | None = None
    beam_width: int | None = None
    aggregation: Aggregation | None = None
    selection: SelectionRule | None = None
    max_flops: int | None = Field(default=None, ge=1)
    deadline_s: float | None = Field(default=None, gt=0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    # A last chunk with empty choices and the whole request's usage, as OpenAI sends it.
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    tts: TTSOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: str | list[str]

    def prompt_text(self) -> str | None:
        """The single prompt, or None when several were given."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if len(self.prompt) == 1 else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape: {"error": {message, type, param, code}}."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
