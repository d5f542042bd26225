"""`tools` and `tool_choice` (README "OpenAI parameters"): the tools reach vLLM's chat template
through /tokenize with every strategy; a call (`required` or a named function) is answered by
greedy only, its one generation constrained to the call's JSON shape, and comes back as
`tool_calls`, whole and streamed; everything else is a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import EOS, FakeVLLM
from tests.support.fakes import decode
from tests.support.gateway import MODEL, PATHS, chat, events, script, steady_gateway
from tts_server.api.errors import from_engine
from tts_server.prompting import PromptProfile, ToolsNotRendered, render_chat

PATH = PATHS["chat"]
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TIMES = {"type": "function", "function": {"name": "times", "parameters": {"type": "object"}}}
CALL = {"type": "function", "function": {"name": "add"}}


def tool_script(prompt: str, sample: int) -> str:
    """Writes a call when the prompt shows tools (the fake's /tokenize renders them first)."""
    if prompt.startswith("<tools>"):
        return '{"name": "add", "arguments": {"a": 3, "b": 5}}' + EOS
    return script(prompt, sample)


@pytest.fixture
def fake_vllm() -> FakeVLLM:
    return FakeVLLM(script=tool_script, model=MODEL)


@pytest.fixture
async def gateway(fake_vllm: FakeVLLM, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with steady_gateway(fake_vllm, tmp_path) as client:
        yield client


def prompts(fake_vllm: FakeVLLM) -> list[str]:
    return [decode(call["prompt"][0]) for call in fake_vllm.calls]


async def test_a_named_call_is_answered_as_tool_calls(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    response = await gateway.post(PATH, json=chat("greedy", tools=[ADD], tool_choice=CALL))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "add"
    assert json.loads(call["function"]["arguments"]) == {"a": 3, "b": 5}
    # The tools went through the template, and the one generation was kept to the call's shape.
    [prompt] = prompts(fake_vllm)
    assert prompt.startswith("<tools>") and json.dumps([ADD]) in prompt
    [sent] = fake_vllm.calls
    schema = sent["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["name"] == {"type": "string", "enum": ["add"]}
    assert schema["properties"]["arguments"] == ADD["function"]["parameters"]  # type: ignore[index]
    assert schema["required"] == ["name", "arguments"]


async def test_required_lets_the_model_call_any_tool(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    sent = chat("greedy", tools=[ADD, TIMES], tool_choice="required", parallel_tool_calls=False)
    response = await gateway.post(PATH, json=sent)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "add"
    options = fake_vllm.calls[0]["response_format"]["json_schema"]["schema"]["anyOf"]
    assert [o["properties"]["name"]["enum"] for o in options] == [["add"], ["times"]]


async def test_a_streamed_call_comes_as_a_tool_calls_delta(gateway: httpx.AsyncClient) -> None:
    sent = chat("greedy", tools=[ADD], tool_choice=CALL, stream=True)
    response = await gateway.post(PATH, json=sent)
    assert response.status_code == 200, response.text
    chunks = [e for e in events(response.text) if isinstance(e, dict)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1
    assert calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "add"
    assert json.loads(calls[0][0]["function"]["arguments"]) == {"a": 3, "b": 5}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("strategy", ["greedy", "majority", "best_of_n", "beam_search"])
async def test_tool_choice_none_renders_the_tools_and_answers_in_text(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, strategy: str
) -> None:
    response = await gateway.post(PATH, json=chat(strategy, tools=[ADD], tool_choice="none"))
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"]
    assert fake_vllm.calls and all(p.startswith("<tools>") for p in prompts(fake_vllm))
    assert not any("response_format" in call for call in fake_vllm.calls)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [ADD]}, "tool_choice"),  # OpenAI's default with tools is "auto"
        ({"tools": [ADD], "tool_choice": "auto"}, "tool_choice"),
        (
            {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": CALL}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "none"},
            "tools.0",
        ),
        ({"tools": [ADD, {"type": "retrieval"}], "tool_choice": "none"}, "tools.1"),
        (
            {"tools": [ADD], "tool_choice": CALL, "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
async def test_a_call_that_cannot_be_answered_is_a_400_naming_the_field(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, extra: dict[str, Any], param: str
) -> None:
    response = await gateway.post(PATH, json=chat("greedy", **extra))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert fake_vllm.paths == []


@pytest.mark.parametrize("strategy", ["majority", "best_of_n", "beam_search", "dvts", "auto"])
async def test_a_call_is_answered_by_greedy_only(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, strategy: str
) -> None:
    response = await gateway.post(PATH, json=chat(strategy, tools=[ADD], tool_choice="required"))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("tool_choice", "unsupported_parameter")
    assert "greedy" in error["message"]
    assert fake_vllm.paths == []


async def test_a_plain_text_profile_cannot_render_tools() -> None:
    class Tokenizer:
        async def tokenize_chat(self, *args: Any, **kwargs: Any) -> list[int]:
            raise AssertionError("not called")

        async def tokenize_text(self, text: str, *, affinity: str | None = None) -> list[int]:
            raise AssertionError("not called")

    profile = PromptProfile(name="few-shot-text", style="plain")
    messages = [{"role": "user", "content": "3 + 5?"}]
    with pytest.raises(ToolsNotRendered) as caught:
        await render_chat(profile, messages, Tokenizer(), tools=[ADD])
    error = from_engine(caught.value)
    assert (error.status, error.param) == (400, "tools")
