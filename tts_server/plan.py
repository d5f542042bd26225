"""Which strategy and budget a request runs with: headers first, then the body's `tts` object,
then settings. Invalid choices raise APIError naming the field."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tts_server.api.errors import APIError
from tts_server.api.schemas import TTSOptions
from tts_server.settings import Settings
from tts_server.types import Aggregation, SelectionRule

STRATEGY_NAMES = ("greedy", "majority", "best_of_n", "beam_search", "dvts")
SEARCHES = ("beam_search", "dvts")
# The strategies that score candidates with the PRM (`auto` does through its routes).
PRM_STRATEGIES = ("best_of_n", *SEARCHES)
AGGREGATIONS: tuple[Aggregation, ...] = ("last", "min", "prod", "mean")
SELECTIONS: tuple[SelectionRule, ...] = ("naive", "weighted", "majority")

HEADER_STRATEGY = "X-TTS-Strategy"
HEADER_BUDGET = "X-TTS-Budget"
HEADER_BEAM_WIDTH = "X-TTS-Beam-Width"
HEADER_MAX_FLOPS = "X-TTS-Max-FLOPs"
HEADER_DIFFICULTY = "X-TTS-Difficulty"
HEADER_ROUTED = "X-TTS-Routed-Strategy"
HEADER_DEADLINE = "X-TTS-Deadline-S"


@dataclass(frozen=True)
class Plan:
    strategy: str
    requested: str
    budget: int
    beam_width: int
    aggregation: Aggregation
    selection: SelectionRule

    @property
    def needs_prm(self) -> bool:
        return self.strategy == "auto" or self.strategy in PRM_STRATEGIES


def _int(value: str, param: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise APIError(400, f"'{param}' must be an integer, got {value!r}", param=param) from None


def resolve_plan(
    headers: Mapping[str, str], options: TTSOptions | None, settings: Settings
) -> Plan:
    opts = options or TTSOptions()

    strategy_param = HEADER_STRATEGY if HEADER_STRATEGY.lower() in headers else "tts.strategy"
    requested = (
        headers.get(HEADER_STRATEGY.lower()) or opts.strategy or settings.default_strategy
    ).strip()
    requested = requested.lower().replace("-", "_")
    if requested == "auto" or requested in STRATEGY_NAMES:
        strategy = requested
    else:
        allowed = ", ".join(("auto", *STRATEGY_NAMES))
        raise APIError(
            400, f"unknown strategy {requested!r}; use one of: {allowed}", param=strategy_param
        )

    if HEADER_BUDGET.lower() in headers:
        budget_param = HEADER_BUDGET
        budget = _int(headers[HEADER_BUDGET.lower()], budget_param)
    else:
        budget_param = "tts.budget"
        budget = opts.budget if opts.budget is not None else settings.default_budget
    if strategy == "greedy":
        budget = 1
    elif not 1 <= budget <= settings.max_budget:
        raise APIError(
            400,
            f"budget must be between 1 and {settings.max_budget}, got {budget}",
            param=budget_param,
        )

    if HEADER_BEAM_WIDTH.lower() in headers:
        width_param = HEADER_BEAM_WIDTH
        beam_width = _int(headers[HEADER_BEAM_WIDTH.lower()], width_param)
    else:
        width_param = "tts.beam_width"
        beam_width = opts.beam_width if opts.beam_width is not None else settings.default_beam_width
    if strategy in SEARCHES:
        if beam_width < 1 or beam_width > budget:
            raise APIError(
                400,
                f"beam width must be between 1 and the budget ({budget}), got {beam_width}",
                param=width_param,
            )
        if budget % beam_width:
            raise APIError(
                400,
                f"budget {budget} is not a multiple of the beam width {beam_width}",
                param=budget_param,
            )

    aggregation = opts.aggregation or settings.default_aggregation
    selection = opts.selection or settings.default_selection
    if aggregation not in AGGREGATIONS:
        raise APIError(400, f"unknown aggregation {aggregation!r}", param="tts.aggregation")
    if selection not in SELECTIONS:
        raise APIError(400, f"unknown selection {selection!r}", param="tts.selection")
    return Plan(
        strategy=strategy,
        requested=requested,
        budget=budget,
        beam_width=beam_width if strategy in SEARCHES else 1,
        aggregation=aggregation,
        selection=selection,
    )


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
        except ValueError:
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


def resolve_max_flops(headers: Mapping[str, str], options: TTSOptions | None) -> int | None:
    """The request's FLOPs ceiling: the header, else `tts.max_flops`; None means none."""
    option = options.max_flops if options is not None else None
    value = _positive(headers, HEADER_MAX_FLOPS, option, "max_flops", _flops_number)
    if value is None:
        return None
    if value < 1:
        raise APIError(400, f"'{HEADER_MAX_FLOPS}' must be at least 1", param=HEADER_MAX_FLOPS)
    return int(value)


def resolve_deadline(headers: Mapping[str, str], options: TTSOptions | None, cap_s: float) -> float:
    """Seconds the request may run: the header, else `tts.deadline_s`, at most the server's cap."""
    option = options.deadline_s if options is not None else None
    value = _positive(headers, HEADER_DEADLINE, option, "deadline_s", float)
    return cap_s if value is None else min(value, cap_s)
