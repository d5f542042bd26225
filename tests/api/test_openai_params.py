"""Every OpenAI parameter of both endpoints is honoured or refused with a 400 naming it, never
silently dropped (`api.parameters.PARAMETERS`): refused values cost nothing upstream, default
values and metadata are accepted and change nothing, unknown fields are refused, the honoured ones
reach vLLM as the README says, and `seed` makes a request reproducible."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai.types.chat.completion_create_params as chat_params
import openai.types.completion_create_params as text_params
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import (
    MODEL,
    PATHS,
    EquationPRM,
    body,
    chat,
    events,
    gateway_with,
    normalise,
    script,
    steady_gateway,
)
from tts_server.api.parameters import PARAMETERS
from tts_server.api.protocol import ChatCompletionRequest, CompletionRequest, StreamOptions
from tts_server.types import STRATEGY_NAMES

README = Path(__file__).parents[2] / "README.md"


@pytest.fixture
def fake_vllm() -> FakeVLLM:
    return FakeVLLM(script=script, model=MODEL)


@pytest.fixture
async def gateway(fake_vllm: FakeVLLM, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with steady_gateway(fake_vllm, tmp_path) as client:
        yield client


async def answer(gateway: httpx.AsyncClient, endpoint: str, sent: dict[str, object]) -> Any:
    """The normalised body, or a stream's normalised events."""
    response = await gateway.post(PATHS[endpoint], json=sent)
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        return normalise(events(response.text))
    return normalise(response.json())


# (endpoint, parameter, a value that asks for what the server does not do)
REFUSED: list[tuple[str, str, object]] = [
    *(
        (endpoint, name, value)
        for endpoint in ("chat", "text")
        for name, value in [
            ("stream_options.include_obfuscation", True),
        ]
    ),
    ("chat", "functions", [{"name": "add"}]),
    ("chat", "function_call", {"name": "add"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "prediction", {"type": "content", "content": "8"}),
    ("chat", "reasoning_effort", "low"),
    ("chat", "verbosity", "high"),
    ("chat", "web_search_options", {}),
    ("chat", "moderation", {"model": "omni-moderation-latest"}),
    ("chat", "service_tier", "flex"),
    ("chat", "store", True),
    ("chat", "prompt_cache_retention", "24h"),
    ("chat", "prompt_cache_options", {"mode": "explicit"}),
    ("text", "echo", True),
    ("text", "suffix", " and that is all."),
    ("text", "best_of", 4),
]


def with_value(sent: dict[str, object], dotted: str, value: object) -> dict[str, object]:
    """`sent` with `value` at a dotted field path (a nested object is made)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return {**sent, head: value}
    inner = sent.get(head)
    return {**sent, head: with_value(inner if isinstance(inner, dict) else {}, rest, value)}


def streamed(sent: dict[str, object], name: str) -> dict[str, object]:
    # stream_options is only allowed on a stream.
    return {**sent, "stream": True} if name.startswith("stream_options") else sent


@pytest.mark.parametrize(("endpoint", "name", "value"), REFUSED)
async def test_a_refused_parameter_is_a_400_naming_it_and_costs_nothing(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str, name: str, value: object
) -> None:
    sent = streamed(with_value(body(endpoint), name, value), name)
    response = await gateway.post(PATHS[endpoint], json=sent)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and error["type"] == "invalid_request_error"
    assert name in error["message"]
    assert fake_vllm.paths == []  # not even the prompt was tokenized


# (endpoint, parameter, a value that asks for something, a strategy that cannot honour it)
REFUSED_BY_STRATEGY: list[tuple[str, str, object, str]] = [
    *(
        (endpoint, name, value, strategy)
        for endpoint in ("chat", "text")
        for name, value in [("frequency_penalty", 0.5), ("presence_penalty", -1)]
        for strategy in ("beam_search", "dvts", "auto")
    ),
    *(
        ("chat", "response_format", {"type": "json_object"}, strategy)
        for strategy in ("beam_search", "dvts", "auto")
    ),
]


@pytest.mark.parametrize(("endpoint", "name", "value", "strategy"), REFUSED_BY_STRATEGY)
async def test_a_parameter_the_strategy_cannot_honour_is_a_400_naming_it(
    gateway: httpx.AsyncClient,
    fake_vllm: FakeVLLM,
    endpoint: str,
    name: str,
    value: object,
    strategy: str,
) -> None:
    sent = with_value(body(endpoint, strategy), name, value)
    response = await gateway.post(PATHS[endpoint], json=sent)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (name, "unsupported_parameter")
    assert name in error["message"]
    assert "greedy, majority, best_of_n, adaptive and deepconf" in error["message"]
    assert fake_vllm.paths == []


def test_every_strategy_limit_has_a_case() -> None:
    cases = {(endpoint, name, strategy) for endpoint, name, _, strategy in REFUSED_BY_STRATEGY}
    limits = {
        (endpoint, name, strategy)
        for endpoint, table in PARAMETERS.items()
        for name, rule in table.items()
        if rule.strategies is not None
        for strategy in STRATEGY_NAMES
        if strategy not in rule.strategies
    }
    assert cases == limits


def ruled(use: str) -> set[tuple[str, str]]:
    """(endpoint, parameter) of every rule of the table with this `use`."""
    return {
        (endpoint, name)
        for endpoint, table in PARAMETERS.items()
        for name, rule in table.items()
        if rule.use == use
    }


def test_every_refusal_rule_has_a_case() -> None:
    assert {(endpoint, name) for endpoint, name, _ in REFUSED} == ruled("refused")


# (endpoint, parameter, OpenAI's default or a value that asks for nothing)
DEFAULTS: list[tuple[str, str, object]] = [
    *(
        (endpoint, name, value)
        for endpoint in ("chat", "text")
        for name, value in [
            ("n", 1),
            ("stream_options.include_obfuscation", False),
            ("frequency_penalty", 0),
            ("presence_penalty", 0.0),
            ("logit_bias", {}),
            ("logit_bias", None),
        ]
    ),
    ("chat", "logprobs", False),
    ("chat", "top_logprobs", 0),
    ("chat", "tools", []),
    ("chat", "tool_choice", "none"),
    ("chat", "tool_choice", "auto"),
    ("chat", "parallel_tool_calls", True),
    ("chat", "functions", []),
    ("chat", "function_call", "none"),
    ("chat", "response_format", {"type": "text"}),
    ("chat", "modalities", ["text"]),
    ("chat", "audio", None),
    ("chat", "prediction", None),
    ("chat", "reasoning_effort", None),
    ("chat", "verbosity", "medium"),
    ("chat", "web_search_options", None),
    ("chat", "moderation", None),
    ("chat", "service_tier", "auto"),
    ("chat", "service_tier", "default"),
    ("chat", "store", False),
    ("chat", "prompt_cache_retention", "in_memory"),
    ("chat", "prompt_cache_options", {"mode": "implicit"}),
    ("text", "logprobs", None),
    ("text", "echo", False),
    ("text", "suffix", ""),
    ("text", "best_of", 1),
]

# (endpoint, parameter, a value): accepted, never used.
METADATA: list[tuple[str, str, object]] = [
    ("chat", "user", "user-1234"),
    ("text", "user", "user-1234"),
    ("chat", "metadata", {"team": "math", "run": "7"}),
    ("chat", "safety_identifier", "3f2a9c"),
    ("chat", "prompt_cache_key", "apples"),
]


async def assert_changes_nothing(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str, name: str, value: object
) -> None:
    plain = body(endpoint)
    without = await answer(gateway, endpoint, streamed(plain, name))
    sent_without = list(fake_vllm.calls)
    fake_vllm.calls.clear()
    assert await answer(gateway, endpoint, streamed(with_value(plain, name, value), name)) == (
        without
    )
    assert sorted(map(str, fake_vllm.calls)) == sorted(map(str, sent_without))


@pytest.mark.parametrize(("endpoint", "name", "value"), DEFAULTS)
async def test_a_default_value_is_accepted_and_changes_nothing(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str, name: str, value: object
) -> None:
    await assert_changes_nothing(gateway, fake_vllm, endpoint, name, value)


@pytest.mark.parametrize(("endpoint", "name", "value"), METADATA)
async def test_metadata_is_accepted_and_changes_nothing(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str, name: str, value: object
) -> None:
    await assert_changes_nothing(gateway, fake_vllm, endpoint, name, value)


def test_every_metadata_rule_has_a_case() -> None:
    assert {(endpoint, name) for endpoint, name, _ in METADATA} == ruled("metadata")


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [
        ("chat", "top_k"),  # vLLM's extension
        ("chat", "temprature"),  # a typo must not pass for the default
        ("chat", "prompt"),  # the other endpoint's parameter
        ("text", "messages"),
        ("text", "max_completion_tokens"),
        ("text", "tools"),
        ("chat", "stream_options.include_usages"),
    ],
)
async def test_an_unknown_field_is_a_400_naming_it(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str, name: str
) -> None:
    sent = streamed(with_value(body(endpoint), name, 1), name)
    response = await gateway.post(PATHS[endpoint], json=sent)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (name, "unknown_parameter")
    assert fake_vllm.paths == []


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/apples.png"}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
    ],
)
async def test_a_content_part_the_model_cannot_read_is_refused(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, part: dict[str, object]
) -> None:
    content = [{"type": "text", "text": "How many apples?"}, part]
    sent = {**chat("greedy"), "messages": [{"role": "user", "content": content}]}
    response = await gateway.post(PATHS["chat"], json=sent)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages.0.content.1.type"
    assert fake_vllm.paths == []


def test_every_field_of_the_request_models_has_one_rule() -> None:
    stream_options = {f"stream_options.{name}" for name in StreamOptions.model_fields}

    def fields(model: type[ChatCompletionRequest] | type[CompletionRequest]) -> set[str]:
        return set(model.model_fields) | stream_options

    assert fields(ChatCompletionRequest) == set(PARAMETERS["chat"])
    assert fields(CompletionRequest) == set(PARAMETERS["text"])


def test_every_parameter_of_the_openai_client_has_a_rule() -> None:
    # The installed `openai` package is the current API reference: a new parameter fails here
    # until it is given a rule (and a README row).
    for endpoint, params in (("chat", chat_params), ("text", text_params)):
        sdk = set(params.CompletionCreateParamsBase.__annotations__) | {"stream"}
        assert sdk <= set(PARAMETERS[endpoint]), sorted(sdk - set(PARAMETERS[endpoint]))


def test_the_readme_table_names_every_parameter() -> None:
    lines = README.read_text().splitlines()
    first_cells = [line.split("|")[1] for line in lines if line.startswith("| `")]
    rows = {name for cell in first_cells for name in re.findall(r"`([a-z_.]+)`", cell)}
    names = {name for table in PARAMETERS.values() for name in table} - {"tts"}
    assert names <= rows, sorted(names - rows)


# --- what the honoured parameters do upstream ---


async def test_sampling_parameters_reach_every_sample(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    sent = chat("best_of_n", temperature=0.3, top_p=0.9, max_tokens=40, stop=["Q:"], seed=11)
    await answer(gateway, "chat", sent)
    assert len(fake_vllm.calls) == 4
    for call in fake_vllm.calls:
        assert (call["temperature"], call["top_p"], call["max_tokens"]) == (0.3, 0.9, 40)
        assert "Q:" in call["stop"]
    assert sorted(call["seed"] for call in fake_vllm.calls) == [11, 12, 13, 14]


async def test_greedy_samples_at_temperature_zero_whatever_is_asked(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    await answer(gateway, "chat", chat("greedy", temperature=1.2))
    assert [call["temperature"] for call in fake_vllm.calls] == [0.0]


async def test_max_completion_tokens_caps_each_step_of_a_search(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    data = await answer(gateway, "chat", chat("beam_search", max_completion_tokens=30))
    assert fake_vllm.calls and all(call["max_tokens"] <= 30 for call in fake_vllm.calls)
    # The script's solution is 47 characters (tokens) long: cut.
    assert len(data["choices"][0]["message"]["content"]) <= 30
    assert data["choices"][0]["finish_reason"] == "length"


# --- seed ---


@pytest.fixture
def sampling_vllm() -> FakeVLLM:
    """A fake vLLM whose draws depend on the seed (random without one)."""
    return FakeVLLM(script=script, model=MODEL, sample_by_seed=True)


@pytest.mark.parametrize("endpoint", ["chat", "text"])
@pytest.mark.parametrize("strategy", ["majority", "beam_search"])
async def test_the_same_seed_gives_the_same_answer(
    sampling_vllm: FakeVLLM, tmp_path: Path, endpoint: str, strategy: str
) -> None:
    async with gateway_with(sampling_vllm, EquationPRM(), tmp_path) as client:
        sent = body(endpoint, strategy, 3 if strategy == "majority" else 4)
        first = await answer(client, endpoint, {**sent, "seed": 0})
        seeds_first = sorted(call["seed"] for call in sampling_vllm.calls)
        sampling_vllm.calls.clear()
        again = await answer(client, endpoint, {**sent, "seed": 0})
        assert again == first
        assert sorted(call["seed"] for call in sampling_vllm.calls) == seeds_first


async def test_a_different_seed_can_give_a_different_answer(
    sampling_vllm: FakeVLLM, tmp_path: Path
) -> None:
    # The fake gets odd samples wrong: seeds 0, 1, 2 vote 8, 9, 8; seeds 1, 2, 3 vote 9, 8, 9.
    async with gateway_with(sampling_vllm, EquationPRM(), tmp_path) as client:
        answers = [
            (await answer(client, "chat", chat("majority", 3, seed=seed)))["tts"]["answer"]
            for seed in (0, 1)
        ]
    assert answers == ["8", "9"]


@pytest.mark.parametrize("call_mode", ["per_prompt", "batched"])
async def test_each_sample_gets_its_own_seed(
    sampling_vllm: FakeVLLM, tmp_path: Path, call_mode: str
) -> None:
    async with gateway_with(sampling_vllm, EquationPRM(), tmp_path, call_mode) as client:
        await answer(client, "chat", chat("majority", 5, seed=100))
    assert sorted(call["seed"] for call in sampling_vllm.calls) == [100, 101, 102, 103, 104]
    assert all(len(call["prompt"]) == 1 for call in sampling_vllm.calls)
