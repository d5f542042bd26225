"""The gateway over the real vLLM client, talking to a fake vLLM app (no servers needed)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import (
    MODEL,
    EquationPRM,
    FailingPRM,
    SlowPRM,
    chat,
    events,
    gateway_with,
    script,
)
from tts_server.api.app import create_app
from tts_server.clients import VLLMPolicyClient
from tts_server.prompting import ProfileError, load_profile
from tts_server.settings import Settings


@pytest.fixture
def fake_vllm() -> FakeVLLM:
    return FakeVLLM(script=script, model=MODEL)


@pytest.fixture
def prm() -> EquationPRM:
    return EquationPRM()


@pytest.fixture
async def gateway(
    fake_vllm: FakeVLLM, prm: EquationPRM, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    call_mode = getattr(request, "param", "per_prompt")
    async with gateway_with(fake_vllm, prm, tmp_path, call_mode) as client:
        yield client


@pytest.mark.parametrize("strategy", ["greedy", "majority", "best_of_n", "beam_search", "dvts"])
async def test_every_strategy_answers_in_openai_shape(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, strategy: str
) -> None:
    response = await gateway.post("/v1/chat/completions", json=chat(strategy))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert response.headers["x-tts-strategy"] == strategy
    tts = body["tts"]
    assert tts["strategy"] == strategy
    # Usage is every token the fake upstream served, across all calls of the request.
    assert body["usage"]["prompt_tokens"] == fake_vllm.counters["prompt"]
    assert body["usage"]["completion_tokens"] == fake_vllm.counters["generation"]
    assert tts["policy_tokens"]["requests"] == len(fake_vllm.calls)
    if strategy != "majority":
        # The PRM steers to the right sum; greedy's one sample is the script's sample 0, which
        # writes it (the fake ignores temperature: test_strategies checks greedy's is 0).
        assert tts["answer"] == "8"
        assert "The answer is 8." in body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("gateway", ["batched"], indirect=True)
async def test_beam_search_batched_mode_makes_one_call_per_iteration(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, prm: EquationPRM
) -> None:
    response = await gateway.post("/v1/chat/completions", json=chat("beam_search", 4))
    tts = response.json()["tts"]
    assert len(fake_vllm.calls) == tts["iterations"] == prm.calls
    assert tts["policy_tokens"]["calls"] == tts["policy_tokens"]["requests"] == tts["iterations"]
    assert all(len(call["prompt"]) == 4 for call in fake_vllm.calls)


async def test_beam_search_per_prompt_mode_sends_each_beam_as_its_own_request(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, prm: EquationPRM
) -> None:
    response = await gateway.post("/v1/chat/completions", json=chat("beam_search", 4))
    tts = response.json()["tts"]
    assert tts["policy_tokens"]["calls"] == tts["iterations"] == prm.calls
    assert len(fake_vllm.calls) == tts["policy_tokens"]["requests"]
    assert all(len(call["prompt"]) == 1 for call in fake_vllm.calls)
    # The first iteration starts all 4 beams; later ones carry every live beam (<= 4).
    assert 4 <= len(fake_vllm.calls) <= 4 * tts["iterations"]


async def test_completions_endpoint(gateway: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "<assistant>", "tts": {"strategy": "best_of_n", "budget": 2}}
    response = await gateway.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"].startswith("We add the apples.")
    assert data["tts"]["num_candidates"] == 2


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({**chat("greedy"), "model": "other"}, 404, "model"),
        ({**chat("greedy"), "stream_options": {"include_usage": True}}, 400, "stream_options"),
        (
            {**chat("greedy"), "stream": True, "stream_options": {"include_usage": "x"}},
            400,
            "stream_options.include_usage",
        ),
        ({**chat("greedy"), "n": 2}, 400, "n"),
        ({**chat("greedy"), "temperature": "hot"}, 400, "temperature"),
        ({**chat("greedy"), "max_tokens": 10**6}, 400, "max_tokens"),
        ({**chat("greedy"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": MODEL}, 400, "messages"),
        (
            {**chat("greedy"), "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        ({**chat("greedy"), "tts": {"strategy": "best_of_n", "budget": 0}}, 400, "tts.budget"),
        ({**chat("greedy"), "tts": {"bogus": 1}}, 400, "tts.bogus"),
    ],
)
async def test_bad_input_is_an_openai_error_and_costs_nothing(
    gateway: httpx.AsyncClient,
    fake_vllm: FakeVLLM,
    body: dict[str, object],
    status: int,
    param: str,
) -> None:
    response = await gateway.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"] and "Traceback" not in response.text
    assert fake_vllm.calls == []


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"'])
async def test_malformed_bodies_get_400_not_422(gateway: httpx.AsyncClient, raw: bytes) -> None:
    response = await gateway.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_several_prompts_are_refused(gateway: httpx.AsyncClient) -> None:
    response = await gateway.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


async def test_unreachable_policy_is_a_502(tmp_path: Path, prm: EquationPRM) -> None:
    settings = Settings(policy_model=MODEL, policy_url="http://127.0.0.1:9")
    app = create_app(settings, prm=prm)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post("/v1/chat/completions", json=chat("greedy"))
    assert response.status_code == 502
    error = response.json()["error"]
    assert "unreachable" in error["message"]
    assert "127.0.0.1" not in error["message"]


async def test_models_lists_the_policy(gateway: httpx.AsyncClient) -> None:
    data = (await gateway.get("/v1/models")).json()
    assert [m["id"] for m in data["data"]] == [MODEL]


@pytest.mark.parametrize(
    ("headers", "body_tts", "param"),
    [
        ({"X-TTS-Max-FLOPs": "lots"}, {}, "X-TTS-Max-FLOPs"),
        ({"X-TTS-Max-FLOPs": "-5"}, {}, "X-TTS-Max-FLOPs"),
        ({}, {"max_flops": 0}, "tts.max_flops"),
        # The fake's parameter count is unknown: a ceiling cannot be kept, so it is refused.
        ({"X-TTS-Max-FLOPs": "1e12"}, {}, "X-TTS-Max-FLOPs"),
    ],
)
async def test_bad_or_unkeepable_flops_ceiling_is_a_400(
    gateway: httpx.AsyncClient, headers: dict[str, str], body_tts: dict[str, object], param: str
) -> None:
    body = chat("best_of_n")
    body["tts"] = {**body["tts"], **body_tts}  # type: ignore[dict-item]
    response = await gateway.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_flops_are_null_when_parameter_counts_are_unknown(
    gateway: httpx.AsyncClient,
) -> None:
    response = await gateway.post("/v1/chat/completions", json=chat("best_of_n"))
    assert response.status_code == 200
    assert response.json()["tts"]["flops"] is None


async def test_sampling_temperature_is_the_clients_else_the_profiles_else_the_servers(
    fake_vllm: FakeVLLM, prm: EquationPRM, tmp_path: Path
) -> None:
    profile = tmp_path / "tuned.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "temperature": 0.3}))
    settings = Settings(
        policy_model=MODEL, prompt_profiles={MODEL: str(profile)}, default_temperature=0.9
    )
    upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake_vllm.app()))
    policy = VLLMPolicyClient("http://fake-vllm", MODEL, client=upstream)
    app = create_app(settings, policy=policy, prm=prm)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        seen = []
        for body, path in [
            (chat("best_of_n"), "/v1/chat/completions"),
            ({**chat("best_of_n"), "temperature": 1.2}, "/v1/chat/completions"),
            # A completions prompt is raw text: no profile, so the server's default.
            (
                {"model": MODEL, "prompt": "<assistant>", "tts": {"strategy": "best_of_n"}},
                "/v1/completions",
            ),
        ]:
            fake_vllm.calls.clear()
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            assert {call["temperature"] for call in fake_vllm.calls} == {
                response.json()["tts"]["temperature"]
            }
            seen.append(response.json()["tts"]["temperature"])
    await upstream.aclose()
    assert seen == [0.3, 1.2, 0.9]


def test_a_profile_temperature_out_of_range_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "b", "temperature": 5}))
    with pytest.raises(ProfileError, match="temperature"):
        load_profile(str(bad))


# --- stream: true ---


@pytest.mark.parametrize("strategy", ["greedy", "best_of_n", "beam_search", "dvts", "auto"])
async def test_a_stream_carries_the_same_answer_and_tts_as_a_whole_response(
    gateway: httpx.AsyncClient, strategy: str
) -> None:
    whole = (await gateway.post("/v1/chat/completions", json=chat(strategy))).json()
    response = await gateway.post("/v1/chat/completions", json=chat(strategy, stream=True))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-tts-strategy"] == strategy
    got = events(response.text)
    assert got[-1] == "[DONE]"
    chunks = [c for c in got if isinstance(c, dict)]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == whole["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    tts = last["tts"]
    for key in ("strategy", "answer", "votes", "num_candidates", "policy_tokens", "flops"):
        assert tts[key] == whole["tts"][key], key
    assert "usage" not in last  # only asked for with stream_options.include_usage


async def test_a_completions_stream_and_its_usage_chunk(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    body = {
        "model": MODEL,
        "prompt": "<assistant>",
        "tts": {"strategy": "best_of_n", "budget": 2},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await gateway.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    chunks = [c for c in events(response.text) if isinstance(c, dict)]
    assert {c["object"] for c in chunks} == {"text_completion"}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.startswith("We add the apples.")
    # The usage chunk comes last, with no choices; every other chunk says usage: null.
    *rest, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    assert all(c["usage"] is None for c in rest)
    assert usage_chunk["usage"]["prompt_tokens"] == fake_vllm.counters["prompt"]
    assert usage_chunk["usage"]["completion_tokens"] == fake_vllm.counters["generation"]


async def test_the_openai_client_reads_the_stream(gateway: httpx.AsyncClient) -> None:
    client = openai.AsyncOpenAI(api_key="unused", base_url="http://gateway/v1", http_client=gateway)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tom has 3 apples and buys 5. How many?"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"tts": {"strategy": "best_of_n", "budget": 4}},
    )
    content, usage, tts = "", None, None
    async for chunk in stream:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            tts = (chunk.model_extra or {}).get("tts") or tts
        usage = chunk.usage or usage
    assert content.endswith("The answer is 8.")
    assert tts is not None and tts["answer"] == "8"
    assert usage is not None and usage.completion_tokens > 0


async def test_a_running_search_streams_its_progress(fake_vllm: FakeVLLM, tmp_path: Path) -> None:
    settings = {"stream_progress_interval_s": 0.01}
    async with gateway_with(fake_vllm, SlowPRM(), tmp_path, **settings) as gateway:
        response = await gateway.post("/v1/chat/completions", json=chat("beam_search", stream=True))
    chunks = [c for c in events(response.text) if isinstance(c, dict)]
    progress = [c["tts"]["progress"] for c in chunks if "progress" in c.get("tts", {})]
    assert progress, "no progress chunk while the search ran"
    for c in chunks:
        if "progress" in c.get("tts", {}):  # an empty delta: nothing to show yet
            assert c["choices"][0]["delta"] == {} and c["choices"][0]["finish_reason"] is None
    # Counters only grow, and stay within what the finished request reports.
    tts = chunks[-1]["tts"]
    for key in ("policy_calls", "completion_tokens", "prm_steps_scored"):
        seen = [p[key] for p in progress]
        assert seen == sorted(seen), key
    assert progress[-1]["policy_calls"] <= tts["policy_tokens"]["calls"]
    assert progress[-1]["prm_steps_scored"] <= tts["prm"]["steps_scored"]
    assert max(p["prm_steps_scored"] for p in progress) > 0
    assert all(any(p.values()) for p in progress)  # "nothing yet" is a keep-alive, not progress
    assert ": keep-alive\n\n" in response.text  # while the PRM takes its time, nothing changed


async def test_a_failure_after_the_headers_is_an_error_event(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    async with gateway_with(fake_vllm, FailingPRM(), tmp_path) as gateway:
        response = await gateway.post("/v1/chat/completions", json=chat("best_of_n", stream=True))
    assert response.status_code == 200  # the stream had started
    got = events(response.text)
    assert got[-1] == "[DONE]"
    error = got[-2]
    assert isinstance(error, dict)
    assert error["error"]["type"] == "upstream_error"
    assert "PRM worker" in error["error"]["message"]
    assert "Traceback" not in response.text
