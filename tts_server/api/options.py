"""A request's options, resolved once into a `Job`: the X-TTS-* headers first, then the body
(its `tts` object and the OpenAI fields), then the prompt profile (temperature), then settings.
Every invalid choice is a 400 naming the header or field, and so is every OpenAI parameter the
server cannot honour (`api.parameters.PARAMETERS`): never silently dropped."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from tts_server.api.errors import APIError
from tts_server.api.parameters import refuse_unsupported
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
from tts_server.types import (
    STRATEGY_NAMES,
    VOTES,
    ChatPrompt,
    Job,
    SelectionRule,
    StrategyName,
    TextPrompt,
)

# Top logprobs per token a client may ask for: vLLM's own limit (its --max-logprobs default).
MAX_TOP_LOGPROBS = 20


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
    refuse_unsupported(body)
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
    refuse_unsupported(body, strategy)
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
        selection=_selection(opts, settings, strategy),
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


def _selection(opts: TTSOptions, settings: Settings, strategy: StrategyName) -> SelectionRule:
    """The rule the answer is chosen by, as it will really be applied. The voting strategies
    have no PRM scores: asked for a rule that reads them, `majority` and `deepconf` refuse, and
    `adaptive` scores its samples with the PRM; by default they vote (the server's default when
    it is a vote, else `majority`, and `deepconf` by confidence)."""
    if strategy in ("majority", "deepconf") and opts.selection not in (None, *VOTES):
        raise APIError(
            400,
            f"{strategy} votes without a PRM: tts.selection must be one of {', '.join(VOTES)} "
            f"({opts.selection} needs PRM scores: ask for best_of_n or adaptive)",
            param="tts.selection",
        )
    if opts.selection is not None:
        return opts.selection
    if strategy in ("majority", "adaptive", "deepconf") and settings.default_selection not in VOTES:
        return "confidence" if strategy == "deepconf" else "majority"  # DeepConf's own vote
    return settings.default_selection


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
