"""What the gateway's unit tests share: a scripted three-step solution for the fake vLLM, PRMs
that score it (and one slow, one failing), a gateway over the real vLLM client talking to the fake
vLLM in-process, the endpoints' paths, request bodies, an SSE parser and the golden test's
normalisation of bodies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from tests.support.fake_vllm import EOS, FakeVLLM
from tests.support.fakes import tails
from tts_server.api.app import create_app
from tts_server.clients import PRMError, VLLMPolicyClient
from tts_server.clients.policy import CallMode
from tts_server.settings import Settings
from tts_server.types import PRMService, PRMUsage

MODEL = "fake-model"

# The two answering endpoints, by the names `api.responses.Kind` gives them.
PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions"}


def script(prompt: str, sample: int) -> str:
    """The rest of a three-step solution; odd samples get the arithmetic wrong."""
    done = prompt.split("<assistant>")[-1]
    if "= 8" in done or "= 9" in done:
        total = "8" if "= 8" in done else "9"
    else:
        total = "8" if sample % 2 == 0 else "9"
    full = f"We add the apples.\n\n3 + 5 = {total}\n\nThe answer is {total}."
    assert full.startswith(done), "continuations extend the model's own text"
    return full[len(done) :] + EOS


class EquationPRM:
    """Scores a step 0.9 unless it contains the wrong sum."""

    def __init__(self) -> None:
        self.calls = 0

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        self.calls += 1
        rows = [[0.1 if "= 9" in step or "is 9" in step else 0.9 for step in s] for s in solutions]
        rows = tails(rows, context)
        usage.calls += 1
        usage.steps_scored += sum(len(row) for row in rows)
        return rows

    async def model_name(self) -> str | None:
        return None

    async def parameters(self) -> int | None:
        return None  # unknown: FLOPs need TTS_PRM_PARAMS

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


def plain_profiles(tmp_path: Path, model: str = MODEL) -> dict[str, str]:
    """`prompt_profiles` for `model`: a chat profile without examples, written in `tmp_path`."""
    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    return {model: str(profile)}


@asynccontextmanager
async def serve(
    config: Settings,
    fake_vllm: FakeVLLM,
    prm: PRMService,
    *,
    call_mode: CallMode = "per_prompt",
    affinity_header: str | None = None,
    base_url: str = "http://gateway",
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The gateway app for `config` over the real vLLM client talking to `fake_vllm` (sending
    `affinity_header` if given), served in-process; and a client of it."""
    upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake_vllm.app()))
    policy = VLLMPolicyClient(
        "http://fake-vllm",
        config.policy_model,
        client=upstream,
        call_mode=call_mode,
        affinity_header=affinity_header,
    )
    app = create_app(config, policy=policy, prm=prm)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield app, client
    finally:
        await upstream.aclose()


@asynccontextmanager
async def gateway_with(
    fake_vllm: FakeVLLM,
    prm: EquationPRM,
    tmp_path: Path,
    call_mode: CallMode = "per_prompt",
    **settings: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway app over the real vLLM client talking to `fake_vllm`, served in-process."""
    config = Settings(policy_model=MODEL, prompt_profiles=plain_profiles(tmp_path), **settings)
    async with serve(config, fake_vllm, prm, call_mode=call_mode) as (_, client):
        yield client


@asynccontextmanager
async def steady_gateway(
    fake_vllm: FakeVLLM, tmp_path: Path, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """`gateway_with` the `EquationPRM` and no progress chunks: a stream's events are then the
    same from run to run."""
    settings.setdefault("stream_progress_interval_s", 3600)
    async with gateway_with(fake_vllm, EquationPRM(), tmp_path, **settings) as client:
        yield client


def chat(strategy: str, budget: int = 4, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tom has 3 apples and buys 5. How many?"}],
        "tts": {"strategy": strategy, "budget": budget, "beam_width": 2},
        **extra,
    }


def body(
    endpoint: str, strategy: str = "best_of_n", budget: int = 4, **extra: object
) -> dict[str, object]:
    """A request for `endpoint` ("chat" or "text") with the same question either way."""
    if endpoint == "chat":
        return chat(strategy, budget, **extra)
    tts = {"strategy": strategy, "budget": budget, "beam_width": 2}
    return {"model": MODEL, "prompt": "<assistant>", "tts": tts, **extra}


def normalise(body: Any) -> Any:
    """A response body with what varies between runs blanked (ids, creation times, seconds), as
    the golden test compares them: two bodies equal after it are the same answer."""
    if isinstance(body, dict):
        out: dict[str, Any] = {}
        for key, value in body.items():
            if key in ("id", "created", "wall_time_s"):
                out[key] = "*"
            elif key == "stage_seconds":
                out[key] = sorted(value)
            else:
                out[key] = normalise(value)
        return out
    if isinstance(body, list):
        return [normalise(v) for v in body]
    return body


def events(text: str) -> list[dict[str, Any] | str]:
    """The `data:` payloads of an SSE body, JSON-decoded; "[DONE]" stays a string."""
    out: list[dict[str, Any] | str] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class SlowPRM(EquationPRM):
    """Takes its time, so that a search runs long enough to report progress."""

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        await asyncio.sleep(0.05)
        return await super().score(question, solutions, usage, context=context)


class FailingPRM(EquationPRM):
    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        raise PRMError("the worker said 500", status=500)
