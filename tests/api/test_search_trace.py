"""The search trace through the gateway (real vLLM client over the fake vLLM): off unless asked,
`tts.trace` by body or header, the same shape in a stream's finishing chunk (and the tree's
nodes live in its progress chunks), the trace export writing the same shape, and the schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import MODEL, EquationPRM, SlowPRM, chat, events, gateway_with, script
from tts_server.traces import read_traces

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "trace.schema.json").read_text())
STRATEGIES = ["greedy", "majority", "best_of_n", "beam_search", "dvts", "adaptive", "deepconf"]


def validate(trace: dict[str, Any]) -> None:
    jsonschema.validate(trace, SCHEMA, cls=jsonschema.Draft202012Validator)


def asking(strategy: str, **extra: Any) -> dict[str, Any]:
    body = chat(strategy, **extra)
    tts = body["tts"]
    assert isinstance(tts, dict)
    return {**body, "tts": {**tts, "return_trace": True}}


def untimed(trace: dict[str, Any]) -> dict[str, Any]:
    """A trace without what varies run to run (seconds)."""
    out = {k: v for k, v in trace.items() if k not in ("wall_time_s", "stages")}
    out["stages"] = {k: {**v, "seconds": None} for k, v in trace["stages"].items()}
    return out


@pytest.fixture
def fake_vllm() -> FakeVLLM:
    return FakeVLLM(script=script, model=MODEL)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_the_trace_is_in_the_response_only_when_asked(
    fake_vllm: FakeVLLM, tmp_path: Path, strategy: str
) -> None:
    async with gateway_with(fake_vllm, EquationPRM(), tmp_path) as gateway:
        plain = await gateway.post("/v1/chat/completions", json=chat(strategy))
        asked = await gateway.post("/v1/chat/completions", json=asking(strategy))
    assert plain.status_code == asked.status_code == 200, asked.text
    assert "trace" not in plain.json()["tts"]
    body = asked.json()
    trace, tts = body["tts"]["trace"], body["tts"]
    validate(trace)
    assert trace["kind"] == ("tree" if strategy in ("beam_search", "dvts") else "samples")
    assert trace["strategy"] == strategy and trace["answer"] == tts["answer"]
    assert [c["answer"] for c in trace["candidates"]] == tts["candidates_answers"]
    assert [c["score"] for c in trace["candidates"]] == tts["candidate_scores"]
    chosen = trace["candidates"][trace["selected"]]
    assert chosen["text"].strip() == body["choices"][0]["message"]["content"]
    if trace["kind"] == "tree":
        nodes = {n["id"]: n for n in trace["nodes"]}
        path = trace["selected_path"]
        assert path[-1] == chosen["node"] and nodes[path[-1]]["answer"] == tts["answer"]
        assert "".join(nodes[i]["text"] for i in path) == chosen["text"]
        leaves = {n["id"] for n in trace["nodes"] if n["candidate"] is not None}
        assert leaves == {c["node"] for c in trace["candidates"]}


async def test_the_header_asks_too_and_a_bad_value_is_a_400_naming_it(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    async with gateway_with(fake_vllm, EquationPRM(), tmp_path) as gateway:
        on = await gateway.post(
            "/v1/chat/completions",
            json=chat("beam_search"),
            headers={"X-TTS-Return-Trace": "true"},
        )
        off = await gateway.post(
            "/v1/chat/completions",
            json=asking("beam_search"),
            headers={"X-TTS-Return-Trace": "false"},
        )
        bad = await gateway.post(
            "/v1/chat/completions", json=chat("greedy"), headers={"X-TTS-Return-Trace": "yes-ish"}
        )
        typed = await gateway.post(
            "/v1/chat/completions", json={**chat("greedy"), "tts": {"return_trace": "sometimes"}}
        )
    assert on.json()["tts"]["trace"]["kind"] == "tree"
    assert "trace" not in off.json()["tts"]  # the header wins over the body
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-TTS-Return-Trace"
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "tts.return_trace"


async def test_the_size_bound_holds_through_the_gateway(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    bounds = {"trace_max_nodes": 3, "trace_max_text_chars": 16}
    async with gateway_with(fake_vllm, EquationPRM(), tmp_path, **bounds) as gateway:
        body = (await gateway.post("/v1/chat/completions", json=asking("beam_search"))).json()
    trace = body["tts"]["trace"]
    validate(trace)
    assert len(trace["nodes"]) == 3 and trace["truncated"]["any"]
    assert trace["truncated"]["nodes_omitted"] == sum(lv["nodes"] for lv in trace["levels"]) - 2
    assert all(len(n["text"]) <= 16 for n in trace["nodes"])
    assert trace["selected_path"][:3] == [n["id"] for n in trace["nodes"]]


@pytest.mark.parametrize("strategy", ["beam_search", "best_of_n"])
async def test_a_streams_finishing_chunk_carries_the_same_trace(
    fake_vllm: FakeVLLM, tmp_path: Path, strategy: str
) -> None:
    async with gateway_with(fake_vllm, EquationPRM(), tmp_path) as gateway:
        whole = (await gateway.post("/v1/chat/completions", json=asking(strategy))).json()
        streamed = await gateway.post("/v1/chat/completions", json=asking(strategy, stream=True))
    chunks = [c for c in events(streamed.text) if isinstance(c, dict)]
    last = chunks[-1]["tts"]
    validate(last["trace"])
    assert untimed(last["trace"]) == untimed(whole["tts"]["trace"])
    assert all("trace" not in c.get("tts", {}) for c in chunks[:-1])


async def test_progress_chunks_carry_the_growing_tree_when_the_trace_is_asked(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    settings = {"stream_progress_interval_s": 0.01}
    async with gateway_with(fake_vllm, SlowPRM(), tmp_path, **settings) as gateway:
        plain = await gateway.post("/v1/chat/completions", json=chat("beam_search", stream=True))
        asked = await gateway.post("/v1/chat/completions", json=asking("beam_search", stream=True))
    plain_chunks = [c for c in events(plain.text) if isinstance(c, dict)]
    assert all("nodes" not in c.get("tts", {}) for c in plain_chunks)
    chunks = [c for c in events(asked.text) if isinstance(c, dict)]
    live: dict[int, dict[str, Any]] = {}
    for chunk in chunks[:-1]:
        for node in chunk.get("tts", {}).get("nodes", []):
            live[node["id"]] = node  # a later chunk updates a node (its score, its status)
    assert live, "no node arrived while the search ran"
    final = {n["id"]: n for n in chunks[-1]["tts"]["trace"]["nodes"]}
    for node_id, node in live.items():
        assert node["parent"] == final[node_id]["parent"]
        assert node["iteration"] == final[node_id]["iteration"]


async def test_the_export_writes_the_responses_trace_shape(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    folder = tmp_path / "traces"
    async with gateway_with(
        fake_vllm, EquationPRM(), tmp_path, trace_dir=folder, trace_mode="all"
    ) as gateway:
        body = (await gateway.post("/v1/chat/completions", json=asking("dvts"))).json()
        gateway_app: Any = gateway._transport.app  # type: ignore[attr-defined]
        gateway_app.state.gateway.traces.flush()
    [record] = list(read_traces([folder]))
    envelope = {"version", "id", "created", "endpoint", "model", "prompt_included"}
    trace = {k: v for k, v in record.items() if k not in envelope}
    validate(trace)
    assert record["id"] == body["id"]
    assert untimed(trace) == untimed(body["tts"]["trace"]) | {
        "truncated": {**body["tts"]["trace"]["truncated"], "max_text_chars": None}
    }
