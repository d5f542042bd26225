"""The OpenAI wire format the gateway speaks: request bodies, the `tts` object that carries the
search options in the body, and the one error shape of the gateway, its guard and the PRM worker.
What the gateway answers is in `protocol_responses` (and `protocol_report`).

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
# "true": write this request's search trace (when the server allows it: TTS_TRACE_MODE).
HEADER_TRACE = "X-TTS-Trace-Export"
# "true": the search trace in the response's `tts.trace` (docs/trace.md).
HEADER_RETURN_TRACE = "X-TTS-Return-Trace"
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
    # Write this request's search trace (tts_server/traces.py), where the server allows it.
    trace_export: bool | None = None
    # The search trace in the response (`tts.trace`; a stream: its finishing chunk).
    return_trace: bool | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A last chunk with empty choices and the whole request's usage, as OpenAI sends it.
    include_usage: bool = False
    include_obfuscation: bool | None = None


class _Common(BaseModel):
    """Every OpenAI parameter of the endpoint is a field, and nothing else is accepted (a typo or
    another server's extension is a 400 naming it, as OpenAI answers). What each one does, or
    why it is refused, is `api.parameters.PARAMETERS`; the refused ones are typed loosely, by JSON
    kind only, so that any value but the default gets that table's message."""

    model_config = ConfigDict(extra="forbid")

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
    # Accepted, never used.
    user: str | None = None
    # Sent to vLLM on every sample, by the strategies that can honour them.
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: str | list[str]
    # Top logprobs per token of the answer (0: the tokens' own logprobs only).
    logprobs: int | None = None
    # Refused unless they have OpenAI's default value.
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

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
    # Accepted, never used.
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # The answer's tokens with their logprobs, and the top alternatives per token.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Refused unless they have OpenAI's default value.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # Honoured by the whole-solution strategies (api.parameters).
    response_format: dict[str, Any] | None = None
    # Refused unless they have OpenAI's default value.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None

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
