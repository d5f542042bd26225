"""Every OpenAI parameter of each endpoint and what the server does with it (`PARAMETERS`):
honoured, accepted as metadata, or refused with a 400 naming it, never silently dropped.
`api.options` applies the table while it resolves a request into a `Job`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tts_server.api.errors import APIError
from tts_server.api.protocol import ChatCompletionRequest, CompletionRequest
from tts_server.types import StrategyName

if TYPE_CHECKING:  # the endpoints' names only: the table needs nothing else of the responses
    from tts_server.api.responses import Kind

Use = Literal["honoured", "metadata", "refused"]

# The strategies that sample whole solutions, one vLLM call per sample: a parameter that shapes
# a whole generation means there what it means to OpenAI.
WHOLE_SOLUTIONS: tuple[StrategyName, ...] = (
    "greedy",
    "majority",
    "best_of_n",
    "adaptive",
    "deepconf",
)


@dataclass(frozen=True)
class Rule:
    """What the server does with one parameter. `honoured`: what OpenAI does with it (the README
    says how each strategy uses it), by every strategy or only by `strategies` (for the others,
    a 400 naming it with `message`); `metadata`: accepted and never used, because it changes
    neither what is generated nor what is answered; `refused`: a 400 naming it. A refusal is
    never made for null or one of `accepted`, the values that ask for nothing (OpenAI's
    defaults)."""

    use: Use
    accepted: tuple[object, ...] = ()
    message: str = ""
    code: str | None = "unsupported_parameter"
    strategies: tuple[StrategyName, ...] | None = None


HONOURED = Rule("honoured")
METADATA = Rule("metadata")


def _refused(message: str, *accepted: object, code: str | None = "unsupported_parameter") -> Rule:
    return Rule("refused", accepted, message, code)


def _not_yet(name: str, *accepted: object) -> Rule:
    return _refused(f"'{name}' is not supported yet", *accepted)


def _whole_solutions_only(message: str, *accepted: object) -> Rule:
    return Rule("honoured", accepted, message, strategies=WHOLE_SOLUTIONS)


# vLLM's penalties count the tokens generated in one call: a step search makes one call per step.
_PENALTY = (
    "'{}' is honoured by greedy, majority, best_of_n, adaptive and deepconf only: the step "
    "searches (and auto, which "
    "may route to one) continue a solution over several vLLM calls, where vLLM's penalty would "
    "see only the current step; ask for one of those strategies, or leave it out or set 0"
)
_TOOLS = "'{}' (deprecated by OpenAI) is not supported: use '{}'"
_RESPONSE_FORMAT = (
    "'response_format' is honoured by greedy, majority, best_of_n, adaptive and deepconf only: "
    "a step search (and "
    "auto, which may route to one) grows a solution a step at a time, and a format constrains "
    "one whole generation; ask for one of those strategies, or leave it out or use "
    '{"type": "text"}'
)

_BOTH: dict[str, Rule] = {
    "model": HONOURED,
    "max_tokens": HONOURED,
    "temperature": HONOURED,
    "top_p": HONOURED,
    "stop": HONOURED,
    "seed": HONOURED,
    # The n best distinct candidates (`api.passthrough.choices` says when it cannot be).
    "n": HONOURED,
    "stream": HONOURED,
    "stream_options": HONOURED,
    "stream_options.include_usage": HONOURED,
    "tts": HONOURED,  # this server's own: the search options
    "stream_options.include_obfuscation": _refused(
        "'stream_options.include_obfuscation' is not supported: chunks are never padded; "
        "leave it out or set false",
        False,
    ),
    # An end-user id for OpenAI's abuse monitoring; vLLM ignores it, so it is not sent on, and
    # this server records no user (no metric label, no log line holds one).
    "user": METADATA,
    "frequency_penalty": _whole_solutions_only(_PENALTY.format("frequency_penalty"), 0),
    "presence_penalty": _whole_solutions_only(_PENALTY.format("presence_penalty"), 0),
    # A bias per token, the same at every position: every sample of every strategy.
    "logit_bias": HONOURED,
}

CHAT: dict[str, Rule] = {
    **_BOTH,
    "messages": HONOURED,
    "max_completion_tokens": HONOURED,
    # Tags for OpenAI's stored completions, another id, and a routing hint for OpenAI's prompt
    # cache: none changes the answer (vLLM's prefix cache serves every request by itself).
    "metadata": METADATA,
    "safety_identifier": METADATA,
    "prompt_cache_key": METADATA,
    # The chosen candidates' tokens with their logprobs (`_logprobs`).
    "logprobs": HONOURED,
    "top_logprobs": HONOURED,
    # Rendered into the prompt by the chat template; a call answered by greedy only, and "auto"
    # (a call or text, as the model likes) refused: `api.passthrough.tools` checks them.
    "tools": HONOURED,
    "tool_choice": HONOURED,
    # An answer is at most one call, which both values allow.
    "parallel_tool_calls": HONOURED,
    "functions": _refused(_TOOLS.format("functions", "tools"), []),
    "function_call": _refused(_TOOLS.format("function_call", "tool_choice"), "none", "auto"),
    "response_format": _whole_solutions_only(_RESPONSE_FORMAT, {"type": "text"}),
    "modalities": _refused("'modalities': only [\"text\"] is supported", ["text"]),
    "audio": _refused("'audio' is not supported: the policy writes text"),
    "prediction": _refused("'prediction' (predicted outputs) is not supported"),
    "reasoning_effort": _refused(
        "'reasoning_effort' is not supported: how much the server thinks is the tts strategy "
        "and budget (X-TTS-Strategy, X-TTS-Budget)"
    ),
    "verbosity": _refused("'verbosity' is not supported: only 'medium'", "medium"),
    "web_search_options": _refused("'web_search_options' is not supported: no web search"),
    "moderation": _refused("'moderation' is not supported: this server runs no moderation model"),
    "service_tier": _refused(
        "'service_tier': this server has one tier, 'auto' or 'default'", "auto", "default"
    ),
    "store": _refused("'store' is not supported: this server keeps no completions", False),
    "prompt_cache_retention": _refused(
        "'prompt_cache_retention': only 'in_memory' (vLLM's prefix cache lives in memory and "
        "evicts by its own rule)",
        "in_memory",
    ),
    "prompt_cache_options": _refused(
        "'prompt_cache_options' is not supported: vLLM's prefix cache is automatic, with no "
        "breakpoints or lifetimes to choose",
        {},
        {"mode": "implicit"},
    ),
}

TEXT: dict[str, Rule] = {
    **_BOTH,
    "prompt": HONOURED,
    # In completions, logprobs: 0 asks for the chosen tokens' logprobs: only null asks for none.
    "logprobs": HONOURED,
    "echo": _not_yet("echo", False),
    "suffix": _refused("'suffix' is not supported: the model only continues the prompt", ""),
    "best_of": _refused(
        "'best_of' is not supported: ask for the strategy best_of_n and a tts budget "
        "(X-TTS-Strategy, X-TTS-Budget)",
        1,
    ),
}

# One rule for every field of each endpoint's request model (and of `stream_options`).
PARAMETERS: dict[Kind, dict[str, Rule]] = {"chat": CHAT, "text": TEXT}


def refuse_unsupported(
    body: CompletionRequest | ChatCompletionRequest, strategy: StrategyName | None = None
) -> None:
    """A 400 naming the first parameter (in the table's order) the server cannot honour: those
    refused by every strategy, or with `strategy`, those that strategy cannot honour."""
    table = PARAMETERS["chat" if isinstance(body, ChatCompletionRequest) else "text"]
    for name, rule in table.items():
        if strategy is None:
            if rule.use != "refused":
                continue
        elif rule.strategies is None or strategy in rule.strategies:
            continue
        value = _field(body, name)
        if value is not None and not any(value == ok for ok in rule.accepted):
            raise APIError(400, rule.message, param=name, code=rule.code)


def _field(body: object, dotted: str) -> object:
    """The value at a dotted field path; None when a parent is absent."""
    value: object = body
    for part in dotted.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value
