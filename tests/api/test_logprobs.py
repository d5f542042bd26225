"""`logprobs` / `top_logprobs` (chat) and `logprobs` (completions): the selected candidate's
tokens with their logprobs, in OpenAI's shapes; bad values are a 400 naming them. And DeepConf
online through the gateway over real sockets: the fake vLLM sees the streams it closed end."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support.fake_vllm import FakeVLLM, StreamEnd
from tests.support.faults import ThreadServer
from tests.support.gateway import MODEL, EquationPRM, chat, events, gateway_with, script
from tts_server.api.app import create_app
from tts_server.clients.policy import VLLMPolicyClient
from tts_server.confidence import TokenLogprob
from tts_server.settings import Settings
from tts_server.types import PolicyUsage, SamplingConfig

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


@pytest.fixture
def fake_vllm() -> FakeVLLM:
    return FakeVLLM(script=script, model=MODEL)


@pytest.fixture
async def gateway(fake_vllm: FakeVLLM, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_with(
        fake_vllm, EquationPRM(), tmp_path, policy_params=1_000_000, prm_params=0
    ) as client:
        yield client


@pytest.mark.parametrize("strategy", ["greedy", "best_of_n", "beam_search", "deepconf"])
async def test_chat_logprobs_are_the_selected_answers_tokens(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, strategy: str
) -> None:
    response = await gateway.post(CHAT, json=chat(strategy, logprobs=True, top_logprobs=2))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    content = choice["logprobs"]["content"]
    # One character is one token in the fake: the tokens spell the answer (a search's from
    # all its steps, in order), each with the fake's logprob and its top 2 alternatives.
    assert "".join(t["token"] for t in content).strip() == choice["message"]["content"]
    assert content[0] == {
        "token": content[0]["token"],
        "logprob": -0.1,
        "bytes": list(content[0]["token"].encode()),
        "top_logprobs": [
            {"token": content[0]["token"], "logprob": -0.1, "bytes": content[0]["bytes"]},
            {"token": "alt1", "logprob": -3.0, "bytes": list(b"alt1")},
        ],
    }
    # vLLM was asked for the confidence's k (5) or more on every generation call.
    assert all(call.get("logprobs") == 5 for call in fake_vllm.calls)
    tts = response.json()["tts"]
    confidences = tts["candidate_confidences"]
    assert len(confidences) == tts["num_candidates"]
    # Every token's top 5: -0.1, -3, -4, -5, -6 -> confidence 18.1 / 5.
    assert confidences[0]["mean"] == pytest.approx(3.62)


async def test_completions_logprobs_take_the_legacy_shape(gateway: httpx.AsyncClient) -> None:
    sent = {"model": MODEL, "prompt": "<assistant>", "logprobs": 0, "tts": {"strategy": "greedy"}}
    response = await gateway.post(TEXT, json=sent)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == list(range(len(choice["text"])))
    assert set(logprobs["token_logprobs"]) == {-0.1}
    # logprobs 0: each position's dict holds only the token itself, as vLLM's.
    assert logprobs["top_logprobs"][0] == {logprobs["tokens"][0]: -0.1}


async def test_no_logprobs_asked_none_sent_none_answered(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM
) -> None:
    response = await gateway.post(CHAT, json=chat("best_of_n", logprobs=False))
    body = response.json()
    assert body["choices"][0]["logprobs"] is None
    assert body["tts"]["candidate_confidences"] is None
    assert all("logprobs" not in call for call in fake_vllm.calls)


async def test_a_stream_carries_the_answers_logprobs_on_its_content_chunk(
    gateway: httpx.AsyncClient,
) -> None:
    response = await gateway.post(CHAT, json=chat("majority", stream=True, logprobs=True))
    chunks = [e for e in events(response.text) if isinstance(e, dict)]
    [answer] = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    content = answer["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content).strip() == answer["choices"][0]["delta"]["content"]
    assert all(t["top_logprobs"] == [] for t in content)  # top_logprobs left out: none


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (TEXT, {"logprobs": 21}, "logprobs"),
        (TEXT, {"logprobs": -1}, "logprobs"),
    ],
)
async def test_bad_logprobs_values_are_a_400_naming_them(
    gateway: httpx.AsyncClient, fake_vllm: FakeVLLM, path: str, extra: dict[str, object], param: str
) -> None:
    sent = chat("greedy", **extra) if path == CHAT else {"model": MODEL, "prompt": "x", **extra}
    response = await gateway.post(path, json=sent)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert fake_vllm.calls == []


# --- DeepConf online over real sockets: closing a stream ends the upstream request ---


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def long_answer(prompt: str, sample: int) -> str:
    return "3 + 5 = 8\n\n" + "Then we count again slowly. " * 3 + "The answer is 8.<eos>"


async def test_the_policy_client_closes_a_stream_and_the_server_sees_it_end() -> None:
    fake = FakeVLLM(script=long_answer, model=MODEL, token_delay_s=0.01)
    with ThreadServer(fake.app()) as server:
        client = VLLMPolicyClient(server.url, MODEL)
        sampling = SamplingConfig(max_tokens=200, logprobs=2)
        usage = PolicyUsage()
        seen: list[str] = []

        def watch(token: TokenLogprob) -> bool:
            seen.append(token.token)
            return len(seen) == 5

        closed = await client.stream([1, 2, 3], sampling, usage, watch)
        whole = await client.stream([1, 2, 3], sampling, usage, lambda token: False)
        await client.aclose()
        wait_for(lambda: len(fake.streams) == 2)
    assert (closed.cancelled, closed.text, len(closed.token_ids)) == (True, "3 + 5", 5)
    assert closed.logprobs is not None and [t.token for t in closed.logprobs] == list("3 + 5")
    assert (whole.cancelled, whole.finish_reason) == (False, "stop")
    assert whole.text.endswith("The answer is 8.")
    # The fake saw the first stream closed by its client after a few tokens (the ones already
    # in flight when the client went), the second run to its end.
    first, second = fake.streams
    assert first.closed and 5 <= first.sent < len(whole.text)
    assert second == StreamEnd(1, len(whole.text), False)
    # Usage counts what the client saw of each: 5 tokens, then the whole answer.
    assert (usage.completion_tokens, usage.prompt_tokens) == (5 + len(whole.text), 6)


async def test_deepconf_through_the_gateway_closes_hesitant_streams_and_counts_them(
    tmp_path: Path,
) -> None:
    requests = {"n": 0}

    def split(prompt: str, sample: int) -> str:  # the requests say 8 and 9 by turns
        requests["n"] += 1
        return script(prompt, requests["n"])

    fake = FakeVLLM(script=split, model=MODEL, token_delay_s=0.005)
    profile = tmp_path / "plain.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    with ThreadServer(fake.app()) as server:
        streamed_low = {"on": False}

        def top(sample: int, position: int) -> list[float]:
            # The warm-up is sure throughout; a streamed trace hesitates from its 20th token.
            return [-0.7, -0.7] if streamed_low["on"] and position >= 20 else [-0.1, -3.0]

        fake.top_logprobs = top
        settings = Settings(
            policy_model=MODEL,
            prompt_profiles={MODEL: str(profile)},
            policy_url=server.url,
            policy_params=1_000_000,
            prm_params=0,
            confidence_window=4,
            deepconf_warmup=4,
        )
        policy = VLLMPolicyClient(server.url, MODEL)
        app = create_app(settings, policy=policy, prm=EquationPRM())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            original = fake.complete

            def complete(prompt: list[int], sample: int, body: dict[str, object]) -> object:
                streamed_low["on"] = bool(body.get("stream"))
                return original(prompt, sample, body)

            fake.complete = complete  # type: ignore[method-assign]
            response = await client.post(CHAT, json=chat("deepconf", budget=8))
        await policy.aclose()
        wait_for(lambda: len(fake.streams) == 4)
    assert response.status_code == 200, response.text
    tts = response.json()["tts"]
    # Warm-up 4 (8, 9, 8, 9: no consensus), then 2 rounds of 2 streams, each closed once its
    # window of 4 holds a hesitant token: the fake saw all four closed by their client.
    assert [end.closed for end in fake.streams] == [True] * 4
    assert tts["num_candidates"] == 8
    cancelled = [c["cancelled"] for c in tts["candidate_confidences"]]
    assert cancelled == [False] * 4 + [True] * 4
    # Closed traces do not vote; what they generated is in usage.
    assert sum(tts["votes"].values()) == pytest.approx(4 * 1.55)
    seen = sum(c["tokens"] for c in tts["candidate_confidences"][4:])
    assert tts["policy_tokens"]["completion"] >= seen > 0
