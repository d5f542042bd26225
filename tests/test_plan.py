from __future__ import annotations

import pytest

from tts_server.api.errors import APIError
from tts_server.api.schemas import TTSOptions
from tts_server.plan import resolve_plan
from tts_server.settings import Settings

SETTINGS = Settings(default_budget=8, max_budget=64, default_beam_width=4)


def plan_error(headers: dict[str, str], options: TTSOptions | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        resolve_plan({k.lower(): v for k, v in headers.items()}, options, SETTINGS)
    return info.value


def test_defaults_are_the_documented_ones() -> None:
    """README: strategy `auto` (the router picks the route later), budget 8, aggregation `last`,
    selection `weighted`; `auto` needs the PRM and no beam width of its own."""
    declared = {  # as declared, whatever TTS_* the shell sets
        name: Settings.model_fields[f"default_{name}"].default
        for name in ("strategy", "budget", "beam_width", "aggregation", "selection")
    }
    assert declared == {
        "strategy": "auto",
        "budget": 8,
        "beam_width": 4,
        "aggregation": "last",
        "selection": "weighted",
    }
    plan = resolve_plan({}, None, SETTINGS)
    assert (plan.requested, plan.strategy, plan.budget, plan.beam_width) == ("auto", "auto", 8, 1)
    assert (plan.aggregation, plan.selection, plan.needs_prm) == ("last", "weighted", True)


def test_header_wins_over_body() -> None:
    plan = resolve_plan(
        {"x-tts-strategy": "dvts", "x-tts-budget": "16"},
        TTSOptions(strategy="majority", budget=4, beam_width=2),
        SETTINGS,
    )
    assert (plan.strategy, plan.budget, plan.beam_width) == ("dvts", 16, 2)


def test_body_options_apply() -> None:
    plan = resolve_plan(
        {}, TTSOptions(strategy="beam_search", budget=12, beam_width=3, selection="naive"), SETTINGS
    )
    assert (plan.strategy, plan.budget, plan.beam_width, plan.selection) == (
        "beam_search",
        12,
        3,
        "naive",
    )


def test_greedy_has_budget_one() -> None:
    assert resolve_plan({"x-tts-strategy": "greedy"}, None, SETTINGS).budget == 1


@pytest.mark.parametrize(
    ("headers", "options", "param"),
    [
        ({"X-TTS-Strategy": "astar"}, None, "X-TTS-Strategy"),
        ({}, TTSOptions(strategy="astar"), "tts.strategy"),
        ({"X-TTS-Budget": "0"}, None, "X-TTS-Budget"),
        ({"X-TTS-Budget": "65"}, None, "X-TTS-Budget"),
        ({"X-TTS-Budget": "eight"}, None, "X-TTS-Budget"),
        ({}, TTSOptions(budget=1000), "tts.budget"),
        ({"X-TTS-Strategy": "beam_search", "X-TTS-Budget": "10"}, None, "X-TTS-Budget"),
        ({"X-TTS-Strategy": "dvts"}, TTSOptions(budget=8, beam_width=3), "tts.budget"),
        ({"X-TTS-Strategy": "dvts", "X-TTS-Beam-Width": "16"}, None, "X-TTS-Beam-Width"),
    ],
)
def test_invalid_choices_name_the_field(
    headers: dict[str, str], options: TTSOptions | None, param: str
) -> None:
    error = plan_error(headers, options)
    assert error.status == 400
    assert error.param == param
