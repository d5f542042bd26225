"""A request's options resolved into a Job: headers over the body's `tts` object over the profile
over settings, and every bad choice a 400 naming its header or field."""

from __future__ import annotations

from typing import Any

import pytest

from tts_server.api.errors import APIError
from tts_server.api.options import resolve_job
from tts_server.api.protocol import ChatCompletionRequest, CompletionRequest
from tts_server.settings import Settings
from tts_server.types import ChatPrompt, Job, TextPrompt

SETTINGS = Settings(
    policy_model="m", default_budget=8, max_budget=64, default_beam_width=4, default_temperature=0.8
)
MESSAGES = [{"role": "user", "content": "How many?"}]


def job(headers: dict[str, str] | None = None, **body: Any) -> Job:
    profile = body.pop("_profile", None)  # not a body field: the request model refuses unknowns
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **body})
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    return resolve_job(request, lowered, SETTINGS, profile_temperature=profile)


def error(headers: dict[str, str] | None = None, **body: Any) -> APIError:
    with pytest.raises(APIError) as info:
        job(headers, **body)
    return info.value


def test_defaults_are_the_servers() -> None:
    resolved = job()
    assert (resolved.requested, resolved.strategy, resolved.budget) == ("auto", "auto", 8)
    assert resolved.beam_width == 1  # auto takes no beam width of its own
    assert (resolved.aggregation, resolved.selection) == ("last", "weighted")
    assert (resolved.temperature, resolved.top_p, resolved.max_tokens) == (0.8, 1.0, 512)
    assert resolved.deadline_s == SETTINGS.request_timeout_s and resolved.max_flops is None
    assert resolved.prompt == ChatPrompt(({"role": "user", "content": "How many?"},))


def test_a_bad_default_strategy_setting_fails_when_settings_load() -> None:
    with pytest.raises(ValueError, match="default_strategy"):
        Settings(default_strategy="astar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="default_selection"):
        Settings(default_selection="best")  # type: ignore[arg-type]


def test_header_wins_over_body() -> None:
    resolved = job(
        {"X-TTS-Strategy": "DVTS", "X-TTS-Budget": "16"},
        tts={"strategy": "majority", "budget": 4, "beam_width": 2},
    )
    assert (resolved.strategy, resolved.requested, resolved.budget, resolved.beam_width) == (
        "dvts",
        "dvts",
        16,
        2,
    )


def test_body_options_apply() -> None:
    resolved = job(
        tts={
            "strategy": "beam-search",
            "budget": 12,
            "beam_width": 3,
            "selection": "naive",
            "max_flops": 5e9,
            "deadline_s": 3,
        }
    )
    assert (resolved.strategy, resolved.budget, resolved.beam_width, resolved.selection) == (
        "beam_search",
        12,
        3,
        "naive",
    )
    assert (resolved.max_flops, resolved.deadline_s) == (5_000_000_000, 3)


def test_greedy_has_budget_one() -> None:
    assert job({"X-TTS-Strategy": "greedy", "X-TTS-Budget": "0"}).budget == 1


def test_temperature_is_the_clients_else_the_profiles_else_the_servers() -> None:
    assert job(temperature=1.2, _profile=0.3).temperature == 1.2
    assert job(_profile=0.3).temperature == 0.3
    assert job().temperature == 0.8
    # A completions prompt is raw text: the chat profile does not apply.
    text = CompletionRequest.model_validate({"model": "m", "prompt": "2+2="})
    resolved = resolve_job(text, {}, SETTINGS, profile_temperature=0.3)
    assert resolved.temperature == 0.8 and resolved.prompt == TextPrompt("2+2=")


def test_sampling_fields_and_limits_travel_in_the_job() -> None:
    resolved = job(top_p=0.9, seed=3, stop=["Q:"], max_completion_tokens=40)
    assert (resolved.top_p, resolved.seed, resolved.stops, resolved.max_tokens) == (
        0.9,
        3,
        ("Q:",),
        40,
    )
    assert job({"X-TTS-Deadline-S": "1e9"}).deadline_s == SETTINGS.request_timeout_s


@pytest.mark.parametrize(
    ("headers", "body", "param"),
    [
        ({"X-TTS-Strategy": "astar"}, {}, "X-TTS-Strategy"),
        ({}, {"tts": {"strategy": "astar"}}, "tts.strategy"),
        ({}, {"tts": {"strategy": "pilot"}}, "tts.strategy"),  # a route of auto only
        ({"X-TTS-Budget": "0"}, {}, "X-TTS-Budget"),
        ({"X-TTS-Budget": "65"}, {}, "X-TTS-Budget"),
        ({"X-TTS-Budget": "eight"}, {}, "X-TTS-Budget"),
        ({}, {"tts": {"budget": 1000}}, "tts.budget"),
        ({"X-TTS-Strategy": "beam_search", "X-TTS-Budget": "10"}, {}, "X-TTS-Budget"),
        ({"X-TTS-Strategy": "dvts"}, {"tts": {"budget": 8, "beam_width": 3}}, "tts.budget"),
        ({"X-TTS-Strategy": "dvts", "X-TTS-Beam-Width": "16"}, {}, "X-TTS-Beam-Width"),
        ({"X-TTS-Beam-Width": "wide"}, {}, "X-TTS-Beam-Width"),
        ({"X-TTS-Max-FLOPs": "0"}, {}, "X-TTS-Max-FLOPs"),
        ({"X-TTS-Max-FLOPs": "1e999"}, {}, "X-TTS-Max-FLOPs"),  # int(float()) overflows
        ({"X-TTS-Deadline-S": "soon"}, {}, "X-TTS-Deadline-S"),
        ({}, {"n": 9}, "n"),  # over the default budget, 8
        # The votes have no PRM scores to weigh or rank: asked for them, they refuse.
        ({}, {"tts": {"strategy": "majority", "selection": "weighted"}}, "tts.selection"),
        ({}, {"tts": {"strategy": "deepconf", "selection": "naive"}}, "tts.selection"),
        ({}, {"stop": ["x" * 129]}, "stop"),
        ({}, {"max_tokens": 4096}, "max_tokens"),
        ({}, {"max_completion_tokens": 4096}, "max_completion_tokens"),
        ({}, {"messages": [{"role": "user", "content": " "}]}, "messages"),
        ({}, {"model": "other"}, "model"),
    ],
)
def test_invalid_choices_name_the_field(
    headers: dict[str, str], body: dict[str, Any], param: str
) -> None:
    found = error(headers, **body)
    assert found.status == (404 if param == "model" else 400)
    assert found.param == param


def test_the_selection_is_the_rule_really_applied() -> None:
    """A voting strategy reports the vote it runs (the server's default rule, weighted, reads PRM
    scores it does not have); `adaptive` asked for a PRM rule keeps it (its samples are scored)."""
    assert SETTINGS.default_selection == "weighted"
    for strategy in ("majority", "adaptive"):
        assert job(tts={"strategy": strategy}).selection == "majority"
    assert job(tts={"strategy": "deepconf"}).selection == "confidence"  # DeepConf's own vote
    for strategy in ("majority", "adaptive", "deepconf"):
        assert job(tts={"strategy": strategy, "selection": "filtered"}).selection == "filtered"
    assert job(tts={"strategy": "adaptive", "selection": "weighted"}).selection == "weighted"
    assert job(tts={"strategy": "best_of_n"}).selection == "weighted"
