"""A request's options, resolved once into a `Job`: the X-TTS-* headers first, then the body
(its `tts` object and the OpenAI fields), then the prompt profile (temperature), then settings.
Every invalid choice is a 400 naming the header or field, and so is every OpenAI parameter the
server cannot honour (`PARAMETERS`): never silently dropped."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tts_server.api.errors import APIError
from tts_server.api.passthrough import call_format, choices, passthrough, tools
from tts_server.api.protocol import (
    HEADER_BEAM_WIDTH,
    HEADER_BUDGET,
    HEADER_DEADLINE,
    HEADER_MAX_FLOPS,
    HEADER_STRATEGY,
    ChatCompletionRequest,
    CompletionRequest,
    TTSOptions,
)
from tts_server.api.tracing import return_trace_wanted, trace_wanted
from tts_server.settings import Settings
from tts_server.strategies import REGISTRY
from tts_server.types import STRATEGY_NAMES, ChatPrompt, Job, StrategyName, TextPrompt

if TYPE_CHECKING:  # the endpoints' names only: options need nothing else of the responses
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

# Top logprobs per token a client may ask for: vLLM's own limit (its --max-logprobs default).
MAX_TOP_LOGPROBS = 20

# One rule for every field of each endpoint's request model (and of `stream_options`).
PARAMETERS: dict[Kind, dict[str, Rule]] = {"chat": CHAT, "text": TEXT}


def resolve_job(
    body: CompletionRequest | ChatCompletionRequest,
    headers: Mapping[str, str],
    settings: Settings,
    *,
    profile_temperature: float | None = None,
) -> Job:
    """The job a request asks for. `headers` have lower-case names; `profile_temperature` is
    the chat prompt profile's (completions prompts get no profile)."""
    if body.model != settings.policy_model:
        raise APIError(
            404,
            f"the model {body.model!r} does not exist; "
            f"this server serves {settings.policy_model!r}",
            param="model",
            code="model_not_found",
        )
    if body.stream_options is not None and not body.stream:
        raise APIError(
            400, "stream_options is only allowed when stream is true", param="stream_options"
        )
    _refuse_unsupported(body)
    stops = body.stop_list()
    if len(stops) > settings.max_stop_strings:
        raise APIError(400, f"at most {settings.max_stop_strings} stop strings", param="stop")
    if any(len(stop) > settings.max_stop_length for stop in stops):
        raise APIError(
            400, f"stop strings must be at most {settings.max_stop_length} characters", param="stop"
        )
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages", param="messages")

    opts = body.tts or TTSOptions()
    requested, strategy = _strategy(headers, opts, settings)
    _refuse_unsupported(body, strategy)
    budget = _budget(headers, opts, settings, strategy)
    beam_width = _beam_width(headers, opts, settings, strategy, budget)
    n = choices(body.n, strategy, budget)
    sent_on = passthrough(body)
    calling = tools(body, strategy)
    if calling is not None and calling.call is not None:
        # The answer must be that call: its JSON shape constrains every token.
        sent_on = dataclasses.replace(sent_on, response_format=call_format(calling))
    max_tokens = _max_tokens(body, settings)
    # Only now the prompt: bad options are found first, whatever the prompt.
    prompt = _prompt(body)
    profile_default = profile_temperature if isinstance(body, ChatCompletionRequest) else None
    # The client's temperature, else the prompt profile's (tuned for its model), else the server's.
    temperature = next(
        t
        for t in (body.temperature, profile_default, settings.default_temperature)
        if t is not None
    )
    return Job(
        prompt=prompt,
        strategy=strategy,
        requested=requested,
        budget=budget,
        beam_width=beam_width,
        aggregation=opts.aggregation or settings.default_aggregation,
        selection=opts.selection or settings.default_selection,
        temperature=temperature,
        top_p=body.top_p if body.top_p is not None else 1.0,
        max_tokens=max_tokens,
        stops=tuple(stops),
        seed=body.seed,
        passthrough=sent_on,
        tools=calling,
        n=n,
        max_flops=_max_flops(headers, opts),
        deadline_s=_deadline(headers, opts, settings.request_timeout_s),
        trace=trace_wanted(headers, opts, settings),
        return_trace=return_trace_wanted(headers, opts),
        logprobs=_logprobs(body),
    )


def _logprobs(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Top logprobs per token the client wants with the answer (0: the tokens' own only), None
    for none. Chat: `logprobs: true` and `top_logprobs`; completions: `logprobs: k`."""
    if isinstance(body, ChatCompletionRequest):
        top, param = body.top_logprobs, "top_logprobs"
        if top is not None and top > 0 and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param=param)
        wanted = (top or 0) if body.logprobs else None
    else:
        wanted, param = body.logprobs, "logprobs"
    if wanted is not None and not 0 <= wanted <= MAX_TOP_LOGPROBS:
        raise APIError(
            400, f"{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {wanted}", param=param
        )
    return wanted


def _refuse_unsupported(
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


def _strategy(
    headers: Mapping[str, str], opts: TTSOptions, settings: Settings
) -> tuple[str, StrategyName]:
    param = HEADER_STRATEGY if HEADER_STRATEGY.lower() in headers else "tts.strategy"
    requested = (
        headers.get(HEADER_STRATEGY.lower()) or opts.strategy or settings.default_strategy
    ).strip()
    requested = requested.lower().replace("-", "_")
    for name in STRATEGY_NAMES:
        if requested == name:
            return requested, name
    allowed = ", ".join(STRATEGY_NAMES)
    raise APIError(400, f"unknown strategy {requested!r}; use one of: {allowed}", param=param)


def _whole_number(
    headers: Mapping[str, str], header: str, option: int | None, name: str, default: int
) -> tuple[int, str]:
    """The header's integer, else the body's `tts.<name>`, else the default; and the param an
    error about it names."""
    raw = headers.get(header.lower())
    if raw is None:
        return (option if option is not None else default), f"tts.{name}"
    try:
        return int(raw.strip()), header
    except ValueError:
        raise APIError(400, f"'{header}' must be an integer, got {raw!r}", param=header) from None


def _budget(
    headers: Mapping[str, str], opts: TTSOptions, settings: Settings, strategy: StrategyName
) -> int:
    budget, param = _whole_number(
        headers, HEADER_BUDGET, opts.budget, "budget", settings.default_budget
    )
    if strategy == "greedy":
        return 1
    if not 1 <= budget <= settings.max_budget:
        raise APIError(
            400, f"budget must be between 1 and {settings.max_budget}, got {budget}", param=param
        )
    return budget


def _beam_width(
    headers: Mapping[str, str],
    opts: TTSOptions,
    settings: Settings,
    strategy: StrategyName,
    budget: int,
) -> int:
    width, param = _whole_number(
        headers, HEADER_BEAM_WIDTH, opts.beam_width, "beam_width", settings.default_beam_width
    )
    if not REGISTRY[strategy].uses_beam_width:
        return 1
    if width < 1 or width > budget:
        raise APIError(
            400, f"beam width must be between 1 and the budget ({budget}), got {width}", param=param
        )
    if budget % width:
        budget_param = HEADER_BUDGET if HEADER_BUDGET.lower() in headers else "tts.budget"
        raise APIError(
            400, f"budget {budget} is not a multiple of the beam width {width}", param=budget_param
        )
    return width


def _max_tokens(body: CompletionRequest | ChatCompletionRequest, settings: Settings) -> int:
    token_limit = body.token_limit() if isinstance(body, ChatCompletionRequest) else None
    both = isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None
    if both and body.max_tokens is not None and body.max_tokens != token_limit:
        raise APIError(
            400,
            "max_tokens and max_completion_tokens are two names for one limit and disagree "
            f"({body.max_tokens} and {token_limit}): send one",
            param="max_completion_tokens",
        )
    limit = token_limit if token_limit is not None else body.max_tokens
    max_tokens = limit or settings.default_max_tokens
    if max_tokens > settings.max_tokens_cap:
        param = "max_completion_tokens" if token_limit and not body.max_tokens else "max_tokens"
        raise APIError(400, f"{param} must be at most {settings.max_tokens_cap}", param=param)
    return max_tokens


def _prompt(body: CompletionRequest | ChatCompletionRequest) -> ChatPrompt | TextPrompt:
    if isinstance(body, ChatCompletionRequest):
        # A picture, a sound or a file read by no one would be dropped silently.
        for i, message in enumerate(body.messages):
            parts = message.content if isinstance(message.content, list) else []
            for j, part in enumerate(parts):
                if part.type != "text":
                    raise APIError(
                        400,
                        f"only text content parts are supported, got {part.type!r}",
                        param=f"messages.{i}.content.{j}.type",
                        code="unsupported_parameter",
                    )
        messages = body.plain_messages()
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise APIError(400, "messages must contain a non-empty user message", param="messages")
        return ChatPrompt(tuple(messages))
    text = body.prompt_text()
    if text is None:
        raise APIError(400, "exactly one prompt per request is supported", param="prompt")
    if not text.strip():
        raise APIError(400, "the prompt is empty", param="prompt")
    return TextPrompt(text)


def _positive(
    headers: Mapping[str, str],
    header: str,
    option: float | None,
    option_name: str,
    parse: Callable[[str], float],
) -> float | None:
    """A positive number from the header, else from the body's `tts` option; None if neither."""
    if header.lower() in headers:
        raw, param = headers[header.lower()].strip(), header
        try:
            value = parse(raw)
        except (ValueError, OverflowError):  # OverflowError: int(float("1e999"))
            raise APIError(400, f"'{param}' must be a number, got {raw!r}", param=param) from None
    elif option is not None:
        value, param = option, f"tts.{option_name}"
    else:
        return None
    if not value > 0:
        raise APIError(400, f"'{param}' must be positive", param=param)
    return value


def _flops_number(raw: str) -> float:
    return int(float(raw)) if any(c in raw for c in ".eE") else int(raw)


def _max_flops(headers: Mapping[str, str], opts: TTSOptions) -> int | None:
    """The request's FLOPs ceiling: the header, else `tts.max_flops`; None means none."""
    value = _positive(headers, HEADER_MAX_FLOPS, opts.max_flops, "max_flops", _flops_number)
    if value is None:
        return None
    if value < 1:
        raise APIError(400, f"'{HEADER_MAX_FLOPS}' must be at least 1", param=HEADER_MAX_FLOPS)
    return int(value)


def _deadline(headers: Mapping[str, str], opts: TTSOptions, cap_s: float) -> float:
    """Seconds the request may run: the header, else `tts.deadline_s`, at most the server's cap."""
    value = _positive(headers, HEADER_DEADLINE, opts.deadline_s, "deadline_s", float)
    return cap_s if value is None else min(value, cap_s)
