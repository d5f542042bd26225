"""A cell run through the real gateway app (in process) over the fake vLLM: answers, latency,
the engine's counters read around it, saved, and read back instead of run again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import MODEL, EquationPRM, script
from tts_server.api.app import create_app
from tts_server.bench.cells import CellStore
from tts_server.bench.load import Call, read_gateway
from tts_server.bench.scenarios import CellSpec, Runner
from tts_server.clients import VLLMPolicyClient
from tts_server.settings import Settings


def _client(fake: FakeVLLM, tmp_path: Path) -> httpx.AsyncClient:
    """One client that reaches the gateway at http://gateway and the fake at http://vllm."""
    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    vllm_app = httpx.ASGITransport(app=fake.app())
    config = Settings(policy_model=MODEL, prompt_profiles={MODEL: str(profile)})
    upstream = httpx.AsyncClient(transport=vllm_app)
    policy = VLLMPolicyClient("http://vllm", MODEL, client=upstream)
    gateway = create_app(config, policy=policy, prm=EquationPRM())
    mounts = {"http://gateway": httpx.ASGITransport(app=gateway), "http://vllm": vllm_app}
    return httpx.AsyncClient(mounts=mounts)


def _spec(problems: int, strategy: str = "best_of_n") -> CellSpec:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tom has 3 apples and buys 5. How many?"}],
        "tts": {"strategy": strategy, "budget": 4},
    }
    calls = tuple(Call(f"p{i}", "8", "/v1/chat/completions", body) for i in range(problems))
    return CellSpec("saturation/gateway-test", "gateway", 2, calls, read_gateway, "test")


async def test_a_cell_measures_the_engine_and_is_read_back_on_resume(tmp_path: Path) -> None:
    fake = FakeVLLM(script=script, model=MODEL)
    progress: list[int] = []
    async with _client(fake, tmp_path) as client:
        store = CellStore(tmp_path / "out", {"k": 1})
        runner = Runner(
            store,
            client,
            "http://vllm",
            {"gateway": "http://gateway"},
            time_limit_s=60,
            advance=lambda done, label: progress.append(done),
        )
        result = await runner.run(_spec(5))
        calls = len(fake.calls)
        again = await Runner(
            CellStore(tmp_path / "out", {"k": 1}),
            client,
            "http://vllm",
            {"gateway": "http://gateway"},
            time_limit_s=60,
        ).run(_spec(5))
    assert result["answers"] == 5 and result["errors"] == 0
    assert result["accuracy"] == 1.0  # EquationPRM picks the right sum, 8
    assert all(r["latency_s"] > 0 for r in result["records"])
    # Best-of-4 sends each of the 4 samples as its own request with n=1: the fake counted them.
    assert calls == 5 * 4
    assert result["engine"]["prompt_tokens"] == fake.counters["prompt"] > 0
    assert result["engine"]["generation_tokens"] == fake.counters["generation"] > 0
    assert result["engine_generation_tokens_per_s"] > 0
    assert sum(progress) == 5
    assert again == store.get("saturation/gateway-test")  # read back, not run again
    assert len(fake.calls) == calls


async def test_no_call_starts_past_the_time_limit(tmp_path: Path) -> None:
    fake = FakeVLLM(script=script, model=MODEL, delay_s=0.3)
    async with _client(fake, tmp_path) as client:
        runner = Runner(
            CellStore(tmp_path, {}),
            client,
            "http://vllm",
            {"gateway": "http://gateway"},
            time_limit_s=0.2,
        )
        result = await runner.run(_spec(50, strategy="greedy"))
    # The two loops each start one call (before the limit), none after it.
    assert result["requests"] == 2 and result["answers"] == 2


async def test_interleaved_cells_take_turns_and_count_only_their_own_rounds(
    tmp_path: Path,
) -> None:
    posts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=f"vllm:generation_tokens_total {10 * len(posts)}\n")
        posts.append(request.url.host)
        body = {"choices": [{"message": {"content": "The answer is 8."}}], "tts": {"answer": "8"}}
        return httpx.Response(200, json=body)

    def spec(cell: str, target: str) -> CellSpec:
        calls = tuple(Call(f"p{i}", "8", "/v1/chat/completions", {}) for i in range(5))
        return CellSpec(cell, target, 2, calls, read_gateway, cell)  # type: ignore[arg-type]

    direct, gateway = spec("overhead/c2/direct", "direct"), spec("overhead/c2/gw", "gateway")
    urls = {"direct": "http://direct", "gateway": "http://gw"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        store = CellStore(tmp_path, {})
        runner = Runner(store, client, "http://vllm", urls, time_limit_s=60)  # type: ignore[arg-type]
        results = await runner.run_interleaved([direct, gateway])
        # Rounds of 2 (the concurrency), the order reversed every turn: AB, BA, AB.
        assert posts == ["direct"] * 2 + ["gw"] * 4 + ["direct"] * 3 + ["gw"]
        again = await Runner(
            CellStore(tmp_path, {}),
            client,
            "http://vllm",
            urls,
            time_limit_s=60,  # type: ignore[arg-type]
        ).run_interleaved([direct, gateway])
    assert len(posts) == 10  # read back, not run again
    assert again == [CellStore(tmp_path, {}).get(c.id) for c in (direct, gateway)]
    for result, other in zip(results, ("overhead/c2/gw", "overhead/c2/direct"), strict=True):
        assert result["answers"] == 5 and result["errors"] == 0
        assert result["engine"]["generation_tokens"] == 50  # its own 5 calls, not the other's
        assert result["interleaved_with"] == [other]
        assert result["wall_s"] > 0


async def test_an_interleaved_cell_stops_at_its_time_limit(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text="vllm:generation_tokens_total 0\n")
        return httpx.Response(200, json={"choices": [], "tts": {"answer": "8"}})

    calls = tuple(Call(f"p{i}", "8", "/v1/chat/completions", {}) for i in range(6))
    cell = CellSpec("overhead/c1/gw", "gateway", 1, calls, read_gateway, "gw")
    progress: list[int] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        runner = Runner(
            CellStore(tmp_path, {}),
            client,
            "http://vllm",
            {"gateway": "http://gw"},
            time_limit_s=0.0,
            advance=lambda done, label: progress.append(done),
        )
        [result] = await runner.run_interleaved([cell])
    assert result["requests"] == 0
    assert sum(progress) == 6  # the bar still reaches the end


async def test_a_steady_cell_reads_the_engine_while_it_runs(tmp_path: Path) -> None:
    posts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=f"vllm:generation_tokens_total {10 * len(posts)}\n")
        await asyncio.sleep(0.02)
        posts.append(request.url.host)
        return httpx.Response(200, json={"choices": [], "tts": {"answer": "8"}})

    calls = tuple(Call(f"p{i}", "8", "/v1/chat/completions", {}) for i in range(12))
    cell = CellSpec("saturation/gw", "gateway", 2, calls, read_gateway, "gw", steady=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        runner = Runner(
            CellStore(tmp_path, {}),
            client,
            "http://vllm",
            {"gateway": "http://gw"},
            time_limit_s=60,
            sample_s=0.01,
        )
        result = await runner.run(cell)
    steady = result["steady"]
    assert steady is not None and steady["samples"] >= 5
    # From the first start to the last: every call but the last loop's final one had ended.
    assert 0 < steady["window_s"] < result["wall_s"]
    assert 0 < steady["generation_tokens"] <= 10 * 12
    assert all("started_at" in r for r in result["records"])
