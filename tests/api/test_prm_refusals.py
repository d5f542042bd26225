"""A PRM worker's refusal as the gateway's client sees it: a solution over the PRM's context
is the client's to fix (400 naming max_tokens), any other refusal is the servers' (502)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import MODEL, chat, gateway_with, script
from tts_server.clients.prm import HTTPPRMClient
from tts_server.prm_worker.app import create_app
from tts_server.prm_worker.backends.base import ItemsRejected, PRMBackend, ScoreItem


class RefusingBackend(PRMBackend):
    """Refuses every solution: as over the PRM's context, or for another reason."""

    name = "refusing"
    model_name = "refusing-prm"

    def __init__(self, *, too_long: bool) -> None:
        self.too_long = too_long

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        reasons = {i: "it is 900 tokens, over the PRM's context of 512" for i in range(len(items))}
        marked = frozenset(reasons) if self.too_long else frozenset()
        raise ItemsRejected(reasons, [[] for _ in items], marked)


def worker_client(backend: PRMBackend) -> HTTPPRMClient:
    transport = httpx.ASGITransport(app=create_app(backend, cache_size=0))
    client = httpx.AsyncClient(transport=transport, base_url="http://worker")
    return HTTPPRMClient("http://worker", client=client)


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search"])
async def test_a_solution_over_the_prms_context_is_a_400_naming_max_tokens(
    strategy: str, tmp_path: Path
) -> None:
    prm = worker_client(RefusingBackend(too_long=True))
    async with gateway_with(FakeVLLM(script=script, model=MODEL), prm, tmp_path) as client:  # type: ignore[arg-type]
        response = await client.post("/v1/chat/completions", json=chat(strategy, budget=4))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert "over the PRM's context of 512" in error["message"]
    assert "lower max_tokens" in error["message"]


async def test_another_refusal_of_the_prm_is_a_502(tmp_path: Path) -> None:
    prm = worker_client(RefusingBackend(too_long=False))
    async with gateway_with(FakeVLLM(script=script, model=MODEL), prm, tmp_path) as client:  # type: ignore[arg-type]
        response = await client.post("/v1/chat/completions", json=chat("best_of_n", budget=4))
    assert response.status_code == 502, response.text
    assert response.json()["error"]["param"] is None
    assert "PRM worker" in response.json()["error"]["message"]
