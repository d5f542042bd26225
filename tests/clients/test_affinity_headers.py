"""What the clients put in the affinity header: the key of each request, per prompt or per
call, and nothing when no header is configured; the prompt and the key never go there."""

from __future__ import annotations

import json

import httpx
import pytest

from tts_server.clients import HTTPPRMClient, VLLMPolicyClient
from tts_server.clients.policy import CallMode
from tts_server.types import PolicyUsage, PRMUsage, SamplingConfig

HEADER = "x-session-id"


def recorder(seen: list[tuple[str, str | None, dict[str, object]]]) -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, request.headers.get(HEADER), body))
        if request.url.path == "/v1/score":
            return httpx.Response(200, json={"scores": [[0.5] for _ in body["solutions"]]})
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2]})
        choices = [
            {"index": i, "text": "x", "token_ids": [9], "finish_reason": "stop"}
            for i in range(len(body["prompt"]))
        ]
        return httpx.Response(200, json={"choices": choices, "usage": {}})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("per_prompt", ["k-0", "k-0", "k-1", "k-1"]),  # each sample's request, its prompt's key
        ("batched", ["k-0"]),  # one request, one header: the first prompt's
    ],
)
async def test_the_policy_client_sends_each_prompts_key(
    mode: CallMode, expected: list[str]
) -> None:
    seen: list[tuple[str, str | None, dict[str, object]]] = []
    client = VLLMPolicyClient(
        "http://vllm", "m", client=recorder(seen), call_mode=mode, affinity_header=HEADER
    )
    sampling = SamplingConfig(max_tokens=4)
    await client.generate([[1], [2]], sampling, PolicyUsage(), n=2, affinity=["k-0", "k-1"])
    await client.tokenize_text("hello", affinity="k")
    keys = [key for path, key, _ in seen if path == "/v1/completions"]
    assert sorted(keys) == expected
    assert seen[-1][:2] == ("/tokenize", "k")
    assert all("k-" not in json.dumps(body) for _, _, body in seen)  # a header, not a field


async def test_without_a_header_name_no_key_is_sent() -> None:
    seen: list[tuple[str, str | None, dict[str, object]]] = []
    client = VLLMPolicyClient("http://vllm", "m", client=recorder(seen), affinity_header="")
    await client.generate([[1]], SamplingConfig(max_tokens=4), PolicyUsage(), affinity=["k"])
    assert [key for _, key, _ in seen] == [None]


async def test_the_prm_client_sends_the_calls_key() -> None:
    seen: list[tuple[str, str | None, dict[str, object]]] = []
    client = HTTPPRMClient("http://prm", client=recorder(seen), affinity_header=HEADER)
    await client.score("q", [["a"], ["b"]], PRMUsage(), affinity="k")
    await client.score("q", [["a"]], PRMUsage())
    assert [key for _, key, _ in seen] == ["k", None]
