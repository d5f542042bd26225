"""The wire models (`api.protocol`, `api.protocol_report`, `api.protocol_responses`) against what
actually goes out: every error of the gateway, its guard and the PRM worker is the one
`ErrorResponse`; whole answers and stream chunks are exactly the bytes their models dump (keys,
order, nulls, left-out keys); the key order clients see is pinned (the golden file compares sorted
keys); the OpenAI client parses whole answers; and the protocol modules stay import-light."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import (
    MODEL,
    EquationPRM,
    FailingPRM,
    SlowPRM,
    chat,
    events,
    plain_profiles,
    script,
    serve,
)
from tts_server.api.protocol import ErrorResponse
from tts_server.api.protocol_report import TTSProgress, TTSReport
from tts_server.api.protocol_responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Delta,
    ModelList,
    TextCompletion,
    TextCompletionChunk,
)
from tts_server.api.reliability import hash_key
from tts_server.prm_worker import create_app as create_prm_app
from tts_server.prm_worker.backends.arith import ArithBackend
from tts_server.settings import Settings

KEY = "sk-protocol-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


@asynccontextmanager
async def gateway(
    tmp_path: Path, prm: EquationPRM | None = None, **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings.setdefault("stream_progress_interval_s", 3600)  # no progress chunks unless asked
    config = Settings(policy_model=MODEL, prompt_profiles=plain_profiles(tmp_path), **settings)
    fake = FakeVLLM(script=script, model=MODEL)
    async with serve(config, fake, prm or EquationPRM()) as (app, client):
        yield app, client


def body(path: str, strategy: str, budget: int = 4, **extra: Any) -> dict[str, Any]:
    """A request for `path`: the chat one of test_gateway, or a completions prompt."""
    request: dict[str, Any] = {**chat(strategy, budget), **extra}
    if path == "/v1/completions":
        del request["messages"]
        request["prompt"] = "<assistant>"
    return request


def compact(model: BaseModel, *, ascii_only: bool = False) -> bytes:
    """A model dumped as the gateway encodes it (JSONResponse; SSE events escape non-ASCII)."""
    return json.dumps(model.model_dump(), separators=(",", ":"), ensure_ascii=ascii_only).encode()


def sse_payloads(raw: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.startswith(b"data: ")]


# --- one error shape ---


def assert_error(response: httpx.Response, status: int) -> ErrorResponse:
    """`response` is an ErrorResponse and nothing else: the model dumps back to its exact bytes
    (compact from the apps, json.dumps' default spacing from the guard)."""
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate_json(response.content)
    assert response.content in (compact(error), json.dumps(error.model_dump()).encode())
    return error


async def test_the_gateway_the_guard_and_the_prm_worker_send_the_same_error_model(
    tmp_path: Path,
) -> None:
    settings: dict[str, Any] = {"api_key_hashes": hash_key(KEY), "max_body_bytes": 2000}
    async with gateway(tmp_path, max_in_flight=1, max_queue=0, **settings) as (app, client):

        async def post(request: dict[str, Any]) -> httpx.Response:
            return await client.post(CHAT, json=request, headers=AUTH)

        gateway_400 = assert_error(await post(chat("nope")), 400)
        assert gateway_400.error.param is not None
        assert_error(await client.get("/v1/nothing", headers=AUTH), 404)
        guard_401 = assert_error(await client.get("/v1/models"), 401)
        assert guard_401.error.code == "invalid_api_key"
        too_large = assert_error(await post(chat("greedy", padding="x" * 3000)), 413)
        assert too_large.error.code == "body_too_large"
        async with app.state.gateway.admission.admit():  # the one slot taken, no queue
            assert assert_error(await post(chat("greedy")), 429).error.code == "server_busy"
        app.state.gateway.readiness.draining = True
        assert assert_error(await post(chat("greedy")), 503).error.type == "service_unavailable"

    worker = create_prm_app(ArithBackend())
    async with worker.router.lifespan_context(worker):
        transport = httpx.ASGITransport(app=worker)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            missing = await client.post("/v1/score", json={"question": "q"})
            worker_400 = assert_error(missing, 400)
            assert_error(await client.get("/v1/nothing"), 404)
    assert worker_400.error.type == gateway_400.error.type == "invalid_request_error"


async def test_a_failure_after_the_headers_is_an_error_model_event(tmp_path: Path) -> None:
    async with gateway(tmp_path, FailingPRM()) as (_, client):
        response = await client.post(CHAT, json=chat("best_of_n", stream=True))
    *_, error, done = sse_payloads(response.content)
    assert done == b"[DONE]"
    assert compact(ErrorResponse.model_validate_json(error), ascii_only=True) == error


# --- whole answers and streams are exactly their models ---


@pytest.mark.parametrize(("path", "model"), [(CHAT, ChatCompletion), (TEXT, TextCompletion)])
async def test_a_whole_answer_is_exactly_its_model(
    tmp_path: Path, path: str, model: type[Completion]
) -> None:
    async with gateway(tmp_path) as (_, client):
        response = await client.post(path, json=body(path, "auto"))
    assert response.status_code == 200, response.text
    answer = model.model_validate_json(response.content)
    assert compact(answer) == response.content
    assert answer.id.startswith("chatcmpl-" if path == CHAT else "cmpl-")
    assert answer.tts.route is not None and answer.tts.difficulty is not None  # auto decided


def stream_chunks(response: httpx.Response, model: type[CompletionChunk]) -> list[CompletionChunk]:
    """The chunks of a stream, each checked to be exactly the bytes its model dumps."""
    *payloads, done = sse_payloads(response.content)
    assert done == b"[DONE]"
    chunks = [model.model_validate_json(p) for p in payloads]
    assert [compact(c, ascii_only=True) for c in chunks] == payloads
    assert len({c.id for c in chunks}) == 1
    return chunks


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize(
    ("path", "model"), [(CHAT, ChatCompletionChunk), (TEXT, TextCompletionChunk)]
)
async def test_every_chunk_is_exactly_its_model(
    tmp_path: Path, path: str, model: type[CompletionChunk], include_usage: bool
) -> None:
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with gateway(tmp_path) as (_, client):
        response = await client.post(path, json=body(path, "best_of_n", 2, stream=True, **options))
    chunks = stream_chunks(response, model)
    assert chunks[0].id.startswith("chatcmpl-" if path == CHAT else "cmpl-")
    # `usage` is left out unless asked for, then null on all but the last (choice-less) chunk.
    assert all(("usage" in c.model_fields_set) is include_usage for c in chunks)
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert all(c.usage is None for c in chunks[:-1])
    # `tts` rides on the finishing chunk only (progress chunks are off: a long interval).
    finishing = [c for c in chunks if c.choices][-1]
    assert isinstance(finishing.tts, TTSReport)
    assert [c for c in chunks if "tts" in c.model_fields_set] == [finishing]


async def test_progress_chunks_are_exactly_their_model(tmp_path: Path) -> None:
    async with gateway(tmp_path, SlowPRM(), stream_progress_interval_s=0.01) as (_, client):
        response = await client.post(CHAT, json=body(CHAT, "beam_search", stream=True))
    chunks = stream_chunks(response, ChatCompletionChunk)
    progress = [c for c in chunks if isinstance(c.tts, TTSProgress)]
    assert progress, "no progress chunk while the search ran"
    assert all(c.choices[0].delta.model_fields_set == set() for c in progress)


def test_sparse_keys_are_left_out_until_set_and_null_when_set_to_none() -> None:
    assert Delta().model_dump() == {}
    assert Delta(content="x").model_dump_json() == '{"content":"x"}'
    assert Delta(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}
    common: dict[str, Any] = {"id": "chatcmpl-1", "created": 0, "model": "m", "choices": []}
    assert "usage" not in ChatCompletionChunk(**common).model_dump()
    assert ChatCompletionChunk(**common, usage=None).model_dump_json().endswith('"usage":null}')


# --- the key order clients see (the golden file compares sorted keys) ---

TOP = ["id", "object", "created", "model", "choices", "usage", "tts"]
USAGE = ["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"]
TTS = [
    "strategy",
    "requested_strategy",
    "budget",
    "beam_width",
    "aggregation",
    "selection",
    "temperature",
    "answer",
    "votes",
    "num_candidates",
    "candidates_answers",
    "candidate_scores",
    "candidate_confidences",
    "iterations",
    "policy_tokens",
    "prm",
    "flops",
    "max_flops",
    "flops_limited",
    "difficulty",
    "route",
    "partial",
    "degraded",
    "wall_time_s",
    "stage_seconds",
]


async def test_the_keys_go_out_in_openais_order_and_the_tts_report_in_its_own(
    tmp_path: Path,
) -> None:
    options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    async with gateway(tmp_path, policy_params=1_000_000, prm_params=1_000) as (_, client):
        whole = (await client.post(CHAT, json=body(CHAT, "auto"))).json()
        streamed = events((await client.post(TEXT, json=body(TEXT, "greedy", **options))).text)
    assert list(whole) == TOP
    assert list(whole["choices"][0]) == ["index", "message", "logprobs", "finish_reason"]
    assert list(whole["choices"][0]["message"]) == ["role", "content"]
    assert list(whole["usage"]) == USAGE
    tts = whole["tts"]
    assert list(tts) == TTS
    assert list(tts["policy_tokens"]) == ["prompt", "completion", "cached", "calls", "requests"]
    assert list(tts["prm"]) == ["calls", "steps_scored", "steps_cached", "tokens"]
    assert list(tts["flops"]) == [
        "policy",
        "prm",
        "total",
        "saved_by_prefix_cache",
        "attention_included",
    ]
    assert list(tts["difficulty"]) == [
        "bin",
        "confidence",
        "mean_score",
        "agreement",
        "pilot_samples",
    ]
    assert list(tts["route"]) == ["strategy", "budget", "beam_width", "early_exit"]
    chunks = [c for c in streamed if isinstance(c, dict)]
    assert [list(c) for c in chunks] == [TOP[:6], [*TOP[:6], "tts"], TOP[:6]]
    assert list(chunks[0]["choices"][0]) == ["index", "text", "logprobs", "finish_reason"]


# --- clients ---


async def test_the_openai_client_parses_whole_answers(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (_, http):
        client = openai.AsyncOpenAI(
            api_key="unused", base_url="http://gateway/v1", http_client=http
        )
        answer = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tom has 3 apples and buys 5. How many?"}],
            extra_body={"tts": {"strategy": "best_of_n", "budget": 4}},
        )
        text = await client.completions.create(
            model=MODEL, prompt="<assistant>", extra_body={"tts": {"strategy": "greedy"}}
        )
        models = await client.models.list()
    assert answer.object == "chat.completion" and answer.choices[0].finish_reason == "stop"
    assert (answer.choices[0].message.content or "").endswith("The answer is 8.")
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    assert (answer.model_extra or {})["tts"]["answer"] == "8"
    assert text.object == "text_completion" and text.choices[0].text.startswith("We add")
    assert [m.id for m in models.data] == [MODEL]


async def test_the_model_list_is_its_model(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (_, client):
        response = await client.get("/v1/models")
    assert compact(ModelList.model_validate_json(response.content)) == response.content


def test_the_protocol_modules_import_pydantic_and_the_core_types_only() -> None:
    code = (
        "import sys\n"
        "import tts_server.api.protocol, tts_server.api.protocol_responses\n"
        "ours = sorted(m for m in sys.modules if m.startswith('tts_server'))\n"
        # tts_server.confidence: the token logprob and confidence values (stdlib only).
        "assert ours == ['tts_server', 'tts_server.api', 'tts_server.api.protocol',"
        " 'tts_server.api.protocol_report', 'tts_server.api.protocol_responses',"
        " 'tts_server.confidence', 'tts_server.types'], ours\n"
        "heavy = [m for m in ('fastapi', 'starlette', 'httpx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        # The PRM worker takes the error shape from the gateway's package, and nothing else.
        "import tts_server.prm_worker\n"
        "api = sorted(m for m in sys.modules if m.startswith('tts_server.api.'))\n"
        "assert api == ['tts_server.api.protocol', 'tts_server.api.protocol_report',"
        " 'tts_server.api.protocol_responses'], api\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
