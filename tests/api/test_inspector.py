"""The inspector's store and endpoints (real vLLM client over the fake vLLM): off by default,
a request's trace read back by its id, keys isolated (a key sees only its own; without keys
everyone sees all), count and age limits, OpenAI-style errors, and the page's files."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import (
    MODEL,
    EquationPRM,
    chat,
    events,
    gateway_with,
    plain_profiles,
    script,
    serve,
)
from tts_server.api.reliability import hash_key
from tts_server.api.trace_store import TraceStore
from tts_server.settings import Settings

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "trace.schema.json").read_text())
ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def keyed(tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway with the inspector on and two API keys."""
    config = Settings(
        policy_model=MODEL,
        prompt_profiles=plain_profiles(tmp_path),
        api_key_hashes=f"{hash_key(ALICE)},{hash_key(BOB)}",
        inspector=True,
        **settings,
    )
    fake = FakeVLLM(script=script, model=MODEL)
    async with serve(config, fake, EquationPRM(), base_url="http://gw") as (_, client):
        yield client


async def test_a_finished_request_is_opened_by_its_id_with_the_responses_trace(
    tmp_path: Path,
) -> None:
    async with gateway_with(
        FakeVLLM(script=script, model=MODEL), EquationPRM(), tmp_path, inspector=True
    ) as gw:
        # Not asked in the response: stored all the same, for the inspector.
        plain = (await gw.post("/v1/chat/completions", json=chat("beam_search"))).json()
        stream = await gw.post("/v1/chat/completions", json=chat("dvts", stream=True))
        streamed_id = next(c["id"] for c in events(stream.text) if isinstance(c, dict))
        one = await gw.get(f"/inspector/api/traces/{plain['id']}")
        two = await gw.get(f"/inspector/api/traces/{streamed_id}")
        listing = await gw.get("/inspector/api/traces")
    assert "trace" not in plain["tts"]
    assert one.status_code == two.status_code == 200
    body = one.json()
    assert body["id"] == plain["id"] and body["endpoint"] == "/v1/chat/completions"
    jsonschema.validate(body["trace"], SCHEMA, cls=jsonschema.Draft202012Validator)
    assert body["trace"]["strategy"] == "beam_search"
    assert body["trace"]["answer"] == plain["tts"]["answer"]
    assert two.json()["trace"]["strategy"] == "dvts"
    assert [t["id"] for t in listing.json()["data"]] == [streamed_id, plain["id"]]  # newest first


async def test_the_inspector_is_off_by_default(tmp_path: Path) -> None:
    async with gateway_with(FakeVLLM(script=script, model=MODEL), EquationPRM(), tmp_path) as gw:
        answered = (await gw.post("/v1/chat/completions", json=chat("greedy"))).json()
        page = await gw.get("/inspector/")
        trace = await gw.get(f"/inspector/api/traces/{answered['id']}")
    assert page.status_code == trace.status_code == 404
    assert trace.json()["error"]["type"] == "not_found_error"  # the API's shape


async def test_a_key_sees_only_its_own_traces(tmp_path: Path) -> None:
    async with keyed(tmp_path) as gw:
        mine = (
            await gw.post("/v1/chat/completions", json=chat("best_of_n"), headers=auth(ALICE))
        ).json()
        own = await gw.get(f"/inspector/api/traces/{mine['id']}", headers=auth(ALICE))
        other = await gw.get(f"/inspector/api/traces/{mine['id']}", headers=auth(BOB))
        nobody = await gw.get(f"/inspector/api/traces/{mine['id']}")
        wrong = await gw.get("/inspector/api/traces", headers=auth("sk-not-a-key"))
        alice_list = await gw.get("/inspector/api/traces", headers=auth(ALICE))
        bob_list = await gw.get("/inspector/api/traces", headers=auth(BOB))
        # The page's files hold no data: a browser loads them without a key.
        page = await gw.get("/inspector/")
    assert own.status_code == 200 and own.json()["id"] == mine["id"]
    # Another key's trace looks exactly like an unknown one.
    assert other.status_code == 404 and other.json()["error"]["code"] == "trace_not_found"
    assert nobody.status_code == wrong.status_code == 401
    assert nobody.json()["error"]["code"] == "invalid_api_key"
    assert [t["id"] for t in alice_list.json()["data"]] == [mine["id"]]
    assert bob_list.json()["data"] == []
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


async def test_bad_ids_and_unknown_ones_get_openai_errors(tmp_path: Path) -> None:
    async with keyed(tmp_path) as gw:
        bad = await gw.get("/inspector/api/traces/chatcmpl.x%20y", headers=auth(ALICE))
        long = await gw.get("/inspector/api/traces/" + "a" * 200, headers=auth(ALICE))
        unknown = await gw.get("/inspector/api/traces/chatcmpl-nothing", headers=auth(ALICE))
        no_file = await gw.get("/inspector/static/secrets.py")
    for response in (bad, long):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "id"
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "id"
    assert no_file.status_code == 404 and "error" in no_file.json()


async def test_the_store_keeps_the_last_n_traces(tmp_path: Path) -> None:
    async with keyed(tmp_path, inspector_max_traces=2) as gw:
        ids = [
            (
                await gw.post("/v1/chat/completions", json=chat("greedy"), headers=auth(ALICE))
            ).json()["id"]
            for _ in range(3)
        ]
        got = [
            (await gw.get(f"/inspector/api/traces/{i}", headers=auth(ALICE))).status_code
            for i in ids
        ]
    assert got == [404, 200, 200]


def test_the_store_forgets_traces_past_their_age_and_its_count() -> None:
    now = [100.0]
    store = TraceStore(max_traces=3, max_age_s=10.0, max_bytes=1 << 20, clock=lambda: now[0])
    trace: dict[str, Any] = {"strategy": "greedy", "budget": 1, "kind": "samples", "answer": "8"}
    store.put("a", "k1", "/v1/completions", trace)
    now[0] = 105.0
    store.put("b", "k1", "/v1/completions", trace)
    store.put("c", "", "/v1/completions", trace)
    assert [s.id for s in store.recent("k1")] == ["b", "a"]
    now[0] = 110.5  # "a" is 10.5 s old
    assert store.get("a", "k1") is None and store.get("b", "k1") is not None
    assert store.get("b", "k2") is None  # another owner
    store.put("d", "k1", "/v1/completions", trace)
    store.put("e", "k1", "/v1/completions", trace)  # past 3: the oldest ("b") goes
    assert [s.id for s in store.recent("k1")] == ["e", "d"]
    assert len(store) == 3
    now[0] = 200.0
    assert len(store) == 0


def test_the_store_holds_at_most_its_bytes() -> None:
    store = TraceStore(max_traces=100, max_age_s=60.0, max_bytes=2000)
    trace: dict[str, Any] = {"strategy": "greedy", "text": "x" * 500}
    size = len(json.dumps(trace, separators=(",", ":")))
    for i in range(10):
        assert store.put(f"r{i}", "", "/v1/completions", trace)
    kept = 2000 // size
    assert [s.id for s in store.recent("")] == [f"r{i}" for i in range(9, 9 - kept, -1)]
    assert store.bytes == kept * size <= 2000
    # One larger than the whole store is not kept, and pushes nothing out.
    assert not store.put("huge", "", "/v1/completions", {"text": "y" * 3000})
    assert store.get("huge", "") is None and len(store) == kept
    # Storing an id again replaces it (counted once).
    assert store.put("r9", "", "/v1/completions", trace)
    assert store.bytes == kept * size


@pytest.mark.parametrize("name", ["index.html", "main.js", "tree.js", "api.js", "report.js"])
async def test_the_pages_files_are_served_from_the_package(tmp_path: Path, name: str) -> None:
    async with keyed(tmp_path) as gw:
        path = "/inspector/" if name == "index.html" else f"/inspector/static/{name}"
        response = await gw.get(path)
    assert response.status_code == 200
    assert response.text.strip()
    # Offline: nothing is loaded from another host (no CDN), only from this server's paths.
    external = re.compile(r"""(src=|href=|from |import\(|url\(|fetch\()\s*["']?(https?:)?//""")
    assert not external.search(response.text)
