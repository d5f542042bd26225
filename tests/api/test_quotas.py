"""Per-key quotas with the in-process store: requests, tokens and FLOPs per window, 429 with
Retry-After and the x-ratelimit headers, the FLOPs quota as the request's ceiling, per-key limits
from the keys file. (The same against a real Redis shared by two gateways:
tests/integration/test_quotas_redis.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import EquationPRM, chat, gateway_with, script
from tts_server.api import metrics, quotas
from tts_server.api.keys_file import KeysFileError, load_keys_file
from tts_server.api.quotas import reset_text
from tts_server.api.reliability import hash_key

KEY, OTHER = "sk-quota-a-1f3e", "sk-quota-b-77c2"
NOW = 1_800_000_030.0  # 30 s into a minute


@pytest.fixture(autouse=True)
def frozen(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The quota clock, frozen mid-minute (a test must not straddle a window); move it by
    setting [0]."""
    now = [NOW]
    monkeypatch.setattr(quotas, "clock", lambda: now[0])
    return now


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(client: httpx.AsyncClient, key: str = KEY, **extra: Any) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions", json=chat("greedy", 1, **extra), headers=auth(key)
    )


def remaining(response: httpx.Response, suffix: str) -> int:
    return int(response.headers[f"x-ratelimit-remaining-{suffix}"])


async def test_requests_per_minute_count_down_then_429_with_retry_after(
    tmp_path: Path, frozen: list[float]
) -> None:
    fake = FakeVLLM(script=script, model="fake-model")
    settings = {"api_key_hashes": hash_key(KEY), "quota_requests_per_minute": 3}
    async with gateway_with(fake, EquationPRM(), tmp_path, **settings) as client:
        answers = [await post(client) for _ in range(3)]
        calls = len(fake.paths)
        refused = [await post(client) for _ in range(2)]
        assert len(fake.paths) == calls  # a refused request never reaches vLLM
        frozen[0] += 30  # the next minute
        again = await post(client)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert [remaining(r, "requests") for r in answers] == [2, 1, 0]
    for r in answers + refused:
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-reset-requests"] == "30s"
    for r in refused:
        assert r.status_code == 429
        assert r.headers["retry-after"] == "30"
        assert remaining(r, "requests") == 0
        error = r.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "requests per minute" in error["message"]
    assert again.status_code == 200 and remaining(again, "requests") == 2
    assert again.headers["x-ratelimit-reset-requests"] == "1m0s"


async def test_tokens_are_charged_as_computed_and_refuse_once_spent(tmp_path: Path) -> None:
    fake = FakeVLLM(script=script, model="fake-model")
    settings = {"api_key_hashes": hash_key(KEY), "quota_tokens_per_minute": 1000}
    async with gateway_with(fake, EquationPRM(), tmp_path, **settings) as client:
        first = await client.post("/v1/chat/completions", json=chat("best_of_n", 2), headers=auth())
        spent = first.json()["usage"]["total_tokens"]
        assert 0 < spent < 1000
        assert remaining(first, "tokens") == 1000 - spent
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        assert "x-ratelimit-limit-requests" not in first.headers  # no request quota set
        while (r := await post(client)).status_code == 200:
            spent += r.json()["usage"]["total_tokens"]
            assert remaining(r, "tokens") == max(0, 1000 - spent)
    assert spent >= 1000  # refused only once the budget was spent, not before
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
    assert remaining(r, "tokens") == 0


async def test_a_flops_quota_caps_max_flops_at_what_the_key_has_left(tmp_path: Path) -> None:
    fake = FakeVLLM(script=script, model="fake-model")
    budget = 1_000_000_000  # 500 tokens of a 1M-parameter policy (a greedy answer: ~220)
    settings = {
        "api_key_hashes": hash_key(KEY),
        "quota_flops_per_minute": budget,
        "quota_flops_per_day": 10 * budget,
        "policy_params": 1_000_000,
        "prm_params": 0,
    }
    async with gateway_with(fake, EquationPRM(), tmp_path, **settings) as client:
        first = await post(client)
        tts = first.json()["tts"]
        assert tts["max_flops"] == budget  # no ceiling asked: the key's budget is the ceiling
        used = tts["flops"]["total"]
        assert 0 < used <= budget
        assert remaining(first, "flops") == budget - used
        assert remaining(first, "flops-day") == 10 * budget - used
        assert first.headers["x-ratelimit-reset-flops-day"].endswith("s")
        # A larger ceiling is capped at what is left; a smaller one is kept.
        second = await client.post(
            "/v1/chat/completions",
            json=chat("greedy", 1),
            headers={**auth(), "X-TTS-Max-FLOPs": "1e15"},
        )
        assert second.json()["tts"]["max_flops"] == budget - used
        third = await client.post(
            "/v1/chat/completions",
            json=chat("greedy", 1),
            headers={**auth(), "X-TTS-Max-FLOPs": "1000"},
        )
        assert third.status_code == 200, (third.text, second.json()["tts"]["flops"], used)
        assert third.json()["tts"]["max_flops"] == 1000
        assert third.json()["tts"]["flops_limited"] is True
        # Spend the rest with a wide search: the ceiling holds it under the budget.
        while (
            r := await client.post(
                "/v1/chat/completions", json=chat("best_of_n", 8), headers=auth()
            )
        ).status_code == 200:
            assert r.json()["tts"]["flops"]["total"] <= r.json()["tts"]["max_flops"]
    # Refused once its first call (8 samples of the prompt and a token) no longer fits.
    assert r.status_code == 429 and "FLOPs per minute" in r.json()["error"]["message"]
    prompt = first.json()["usage"]["prompt_tokens"]
    assert 0 <= remaining(r, "flops") < 8 * 2 * 1_000_000 * (prompt + 1)
    assert r.headers["retry-after"] == "30"


async def test_the_keys_file_sets_each_keys_own_limits(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nhash = "{hash_key(KEY)}"\nrequests_per_minute = 1\n\n'
        f'[[keys]]\nhash = "{hash_key(OTHER)}"\n'
    )
    fake = FakeVLLM(script=script, model="fake-model")
    # The file's keys are accepted without TTS_API_KEY_HASHES; OTHER takes the settings' limit.
    settings = {"api_keys_file": keys, "quota_requests_per_minute": 2}
    async with gateway_with(fake, EquationPRM(), tmp_path, **settings) as client:
        a = [(await post(client, KEY)).status_code for _ in range(2)]
        b = [(await post(client, OTHER)).status_code for _ in range(3)]
        stranger = await post(client, "sk-not-a-key")
        text = (await client.get("/metrics")).text
    assert a == [200, 429] and b == [200, 200, 429]
    assert stranger.status_code == 401
    label = hash_key(KEY)[:16]
    assert f'tts_quota_remaining{{key="{label}",kind="requests"}} 0.0' in text
    assert KEY not in text and OTHER not in text and hash_key(KEY) not in text
    assert re.search(r'tts_rejections_total\{reason="quota_requests"\} [1-9]', text)


async def test_without_quotas_responses_carry_no_ratelimit_headers(tmp_path: Path) -> None:
    fake = FakeVLLM(script=script, model="fake-model")
    async with gateway_with(fake, EquationPRM(), tmp_path) as client:
        response = await client.post("/v1/chat/completions", json=chat("greedy", 1))
    assert response.status_code == 200
    assert not [h for h in response.headers if h.startswith("x-ratelimit")]


async def test_without_api_keys_the_quota_holds_for_all_clients_together(tmp_path: Path) -> None:
    fake = FakeVLLM(script=script, model="fake-model")
    async with gateway_with(fake, EquationPRM(), tmp_path, quota_requests_per_minute=1) as client:
        codes = [
            (await client.post("/v1/chat/completions", json=chat("greedy", 1))).status_code
            for _ in range(2)
        ]
    assert codes == [200, 429]
    assert metrics.QUOTA_REMAINING.labels("anonymous", "requests")._value.get() == 0


def test_reset_text_writes_durations_as_openai_does() -> None:
    assert [reset_text(s) for s in (0.25, 1, 17.2, 360, 86_399.5)] == [
        "250ms",
        "1s",
        "18s",
        "6m0s",
        "24h0m0s",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[keys]]\nhash = "abc"\n', "SHA-256"),
        (f'[[keys]]\nhash = "{hash_key(KEY)}"\nrequests_per_hour = 3\n', "unknown fields"),
        (f'[[keys]]\nhash = "{hash_key(KEY)}"\nrequests_per_minute = -1\n', ">= 0"),
        ("[[keys]\n", "keys file"),
    ],
)
def test_a_bad_keys_file_fails_at_start_naming_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeysFileError, match=problem):
        load_keys_file(path)


def test_keys_file_limits_read_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nhash = "{hash_key(KEY)}"\nflops_per_day = 1e17\n')
    assert load_keys_file(path) == {hash_key(KEY): {"flops_day": 10**17}}


async def test_a_streams_headers_carry_the_budget_left_when_it_starts(tmp_path: Path) -> None:
    fake = FakeVLLM(script=script, model="fake-model")
    settings = {"api_key_hashes": hash_key(KEY), "quota_requests_per_minute": 2}
    async with gateway_with(fake, EquationPRM(), tmp_path, **settings) as client:
        streamed = await client.post(
            "/v1/chat/completions", json=chat("greedy", 1, stream=True), headers=auth()
        )
        whole = await post(client)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert remaining(streamed, "requests") == 1 and remaining(whole, "requests") == 0
