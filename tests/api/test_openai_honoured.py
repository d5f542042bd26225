"""The OpenAI parameters the strategies honour beyond sampling basics (README "OpenAI parameters"):
`n` (the n best distinct candidates, whole and streamed), the ones sent on to vLLM with every
sample (`logit_bias`, the penalties, `response_format`: checked in the wire body, since the fake
vLLM ignores them), the limit's two names, and `user`, which goes nowhere."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import EOS, FakeVLLM
from tests.support.gateway import (
    MODEL,
    PATHS,
    EquationPRM,
    body,
    chat,
    events,
    gateway_with,
    script,
    steady_gateway,
)

SOLUTION = "We add the apples.\n\n3 + 5 = {0}\n\nThe answer is {0}."


@pytest.fixture
def fake_vllm() -> FakeVLLM:
    # Samples by seed: with `seed`, sample k of a request draws seed + k (odd draws write 9).
    return FakeVLLM(script=script, model=MODEL, sample_by_seed=True)


@pytest.fixture
async def gateway(fake_vllm: FakeVLLM, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with steady_gateway(fake_vllm, tmp_path) as client:
        yield client


def text_of(endpoint: str, choice: dict[str, Any]) -> str:
    return str(choice["message"]["content"] if endpoint == "chat" else choice["text"])


async def post(gateway: httpx.AsyncClient, endpoint: str, sent: dict[str, object]) -> Any:
    response = await gateway.post(PATHS[endpoint], json=sent)
    assert response.status_code == 200, response.text
    return response.json()


# --- n ---


@pytest.mark.parametrize("endpoint", ["chat", "text"])
@pytest.mark.parametrize("strategy", ["majority", "best_of_n", "beam_search", "dvts"])
async def test_n_answers_the_best_distinct_candidates_and_usage_counts_them_once(
    gateway: httpx.AsyncClient, endpoint: str, strategy: str
) -> None:
    # Seeds 0-3: the odd ones write 9, the even ones 8; the PRM scores 9 low: 8 wins everywhere.
    # The step searches prune the 9s at the step that writes them: one distinct answer is left.
    one = await post(gateway, endpoint, body(endpoint, strategy, seed=0))
    two = await post(gateway, endpoint, body(endpoint, strategy, seed=0, n=2))
    texts = [text_of(endpoint, c).strip() for c in two["choices"]]
    expected = [8, 9] if strategy in ("majority", "best_of_n") else [8]
    assert texts == [SOLUTION.format(k) for k in expected]
    assert sorted(set(two["tts"]["candidates_answers"])) == [str(k) for k in expected]
    assert [c["index"] for c in two["choices"]] == list(range(len(expected)))
    assert all(c["finish_reason"] == "stop" for c in two["choices"])
    # The first choice is the n=1 answer; the search and its cost are the same.
    assert two["choices"][0] == one["choices"][0]
    assert two["usage"] == one["usage"]
    assert two["tts"]["answer"] == one["tts"]["answer"] == "8"
    assert two["tts"]["num_candidates"] == one["tts"]["num_candidates"]


@pytest.mark.parametrize("endpoint", ["chat", "text"])
async def test_n_with_auto_ranks_the_pilot_and_route_candidates(
    gateway: httpx.AsyncClient, endpoint: str
) -> None:
    one = await post(gateway, endpoint, body(endpoint, "auto", 8, seed=0))
    two = await post(gateway, endpoint, body(endpoint, "auto", 8, seed=0, n=2))
    answers = {a for a in two["tts"]["candidates_answers"] if a is not None}
    # The pilot's odd draws wrote 9; the route (beam search, pruning 9s) wrote 8s.
    assert sorted(answers) == ["8", "9"] and len(two["choices"]) == 2
    assert two["choices"][0] == one["choices"][0]
    assert two["usage"] == one["usage"]
    texts = [text_of(endpoint, c).strip() for c in two["choices"]]
    assert len(set(texts)) == len(texts)


async def test_n_past_the_distinct_answers_gives_fewer_choices(gateway: httpx.AsyncClient) -> None:
    data = await post(gateway, "chat", chat("majority", 4, seed=0, n=3))
    assert [c["message"]["content"] for c in data["choices"]] == [
        SOLUTION.format(8),
        SOLUTION.format(9),
    ]


@pytest.mark.parametrize("endpoint", ["chat", "text"])
async def test_n_streamed_sends_every_choice_under_its_index(
    gateway: httpx.AsyncClient, endpoint: str
) -> None:
    sent = body(
        endpoint, "best_of_n", seed=0, n=2, stream=True, stream_options={"include_usage": True}
    )
    response = await gateway.post(PATHS[endpoint], json=sent)
    assert response.status_code == 200, response.text
    chunks = [e for e in events(response.text) if isinstance(e, dict)]
    content: dict[int, str] = {}
    finish: dict[int, str] = {}
    roles: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            i = choice["index"]
            piece = choice["delta"].get("content") if endpoint == "chat" else choice["text"]
            content[i] = content.get(i, "") + (piece or "")
            if endpoint == "chat" and "role" in choice["delta"]:
                roles[i] = choice["delta"]["role"]
            if choice["finish_reason"] is not None:
                finish[i] = choice["finish_reason"]
    assert {i: text.strip() for i, text in content.items()} == {
        0: SOLUTION.format(8),
        1: SOLUTION.format(9),
    }
    assert finish == {0: "stop", 1: "stop"}
    if endpoint == "chat":
        assert roles == {0: "assistant", 1: "assistant"}
    whole = await post(gateway, endpoint, body(endpoint, "best_of_n", seed=0, n=2))
    assert chunks[-1]["usage"] == whole["usage"]


async def test_n_with_greedy_is_a_400_naming_n(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    response = await gateway.post(PATHS["chat"], json=chat("greedy", n=2))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("n", "unsupported_parameter")
    assert "greedy" in error["message"]
    assert fake_vllm.paths == []


@pytest.mark.parametrize("endpoint", ["chat", "text"])
async def test_n_over_the_budget_is_a_400_naming_n(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str
) -> None:
    response = await gateway.post(PATHS[endpoint], json=body(endpoint, "best_of_n", 4, n=5))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"
    assert "budget" in response.json()["error"]["message"]
    assert fake_vllm.paths == []


# --- sent on to vLLM with every sample ---

BIAS = {"50256": -100.0, "13": 2.5}


@pytest.mark.parametrize("endpoint", ["chat", "text"])
@pytest.mark.parametrize(
    "strategy", ["greedy", "majority", "best_of_n", "beam_search", "dvts", "auto"]
)
async def test_logit_bias_reaches_every_sample_of_every_strategy(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str, strategy: str
) -> None:
    await post(gateway, endpoint, body(endpoint, strategy, logit_bias=BIAS))
    assert fake_vllm.calls
    assert all(call["logit_bias"] == BIAS for call in fake_vllm.calls)


@pytest.mark.parametrize("endpoint", ["chat", "text"])
@pytest.mark.parametrize("strategy", ["greedy", "majority", "best_of_n", "adaptive", "deepconf"])
async def test_penalties_reach_every_sample_of_a_whole_solution_strategy(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, endpoint: str, strategy: str
) -> None:
    sent = body(endpoint, strategy, presence_penalty=0.5, frequency_penalty=-1.25)
    await post(gateway, endpoint, sent)
    # adaptive may stop early; deepconf's warm-up alone is 4 (its later traces are streamed).
    expected = {"greedy": 1, "majority": 4, "best_of_n": 4}.get(strategy)
    assert len(fake_vllm.calls) == expected if expected else len(fake_vllm.calls) >= 2
    for call in fake_vllm.calls:
        assert (call["presence_penalty"], call["frequency_penalty"]) == (0.5, -1.25)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"answer": {"type": "integer"}}},
            },
        },
    ],
)
@pytest.mark.parametrize("strategy", ["greedy", "majority", "best_of_n", "adaptive", "deepconf"])
async def test_response_format_reaches_every_sample_of_a_whole_solution_strategy(
    gateway: httpx.AsyncClient,
    fake_vllm: FakeVLLM,
    strategy: str,
    response_format: dict[str, object],
) -> None:
    await post(gateway, "chat", chat(strategy, response_format=response_format))
    assert fake_vllm.calls
    assert all(call["response_format"] == response_format for call in fake_vllm.calls)


async def test_a_formatted_answer_is_never_cut_at_its_stated_answer(tmp_path: Path) -> None:
    # Free text is cut after the step that states the answer; JSON cut there would not parse.
    answer = '{"reasoning": "3 + 5 = 8. The answer is 8.",\n\n"answer": 8}'
    fake = FakeVLLM(script=lambda prompt, sample: answer + EOS, model=MODEL)
    async with gateway_with(fake, EquationPRM(), tmp_path) as client:
        data = await post(client, "chat", chat("greedy", response_format={"type": "json_object"}))
        assert json.loads(data["choices"][0]["message"]["content"]) == json.loads(answer)
        plain = await post(client, "chat", chat("greedy"))
    assert plain["choices"][0]["message"]["content"] == answer.split("\n\n")[0]


async def test_defaults_send_nothing_more(gateway: httpx.AsyncClient, fake_vllm: FakeVLLM) -> None:
    sent = chat(
        "best_of_n",
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0,
        response_format={"type": "text"},
    )
    await post(gateway, "chat", sent)
    added = {"logit_bias", "presence_penalty", "frequency_penalty", "response_format"}
    assert fake_vllm.calls and not any(added & set(call) for call in fake_vllm.calls)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("logit_bias", {"the": 1}),
        ("logit_bias", {"13": 101}),
        ("logit_bias", {"-13": 1}),
        ("logit_bias", {"²": 1}),  # a digit to str.isdigit, not to int()
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("response_format", {"type": "yaml"}),
        ("response_format", {"type": "json_schema"}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {}}}),
    ],
)
async def test_a_bad_value_is_a_400_naming_the_parameter(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, name: str, value: object
) -> None:
    response = await gateway.post(PATHS["chat"], json=chat("greedy", **{name: value}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == name
    assert fake_vllm.paths == []


async def test_a_value_vllm_refuses_is_a_400_naming_the_parameter(
    gateway: httpx.AsyncClient,
) -> None:
    response = await gateway.post(PATHS["chat"], json=chat("greedy", logit_bias={"1114112": -5}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logit_bias"
    assert "out-of-vocab" in error["message"]


# --- max_completion_tokens, user ---


async def test_max_tokens_and_max_completion_tokens_must_agree(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    response = await gateway.post(
        PATHS["chat"], json=chat("greedy", max_tokens=20, max_completion_tokens=30)
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_completion_tokens"
    assert fake_vllm.paths == []
    await post(gateway, "chat", chat("greedy", max_tokens=30, max_completion_tokens=30))
    assert [call["max_tokens"] for call in fake_vllm.calls] == [30]


async def test_user_reaches_no_upstream_log_or_metric(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, caplog: pytest.LogCaptureFixture
) -> None:
    user = "user-7f3e9a1c"
    with caplog.at_level(logging.DEBUG):
        await post(gateway, "chat", chat("best_of_n", user=user))
        metrics = (await gateway.get("/metrics")).text
    assert fake_vllm.calls and not any("user" in call for call in fake_vllm.calls)
    assert user not in metrics
    assert all(user not in record.getMessage() for record in caplog.records)
