"""`--veto arith`: a learned PRM's scores, except that a step with a wrong equation scores 0."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import httpx
import pytest

from tts_server.prm_worker.app import create_app
from tts_server.prm_worker.backends.arith import ArithBackend
from tts_server.prm_worker.backends.base import BackendError, ItemsRejected, PRMBackend, ScoreItem
from tts_server.prm_worker.backends.veto import ArithVeto


class Confident(PRMBackend):
    """A PRM that likes every step (0.8), refuses a question named "refuse", has 1234 weights."""

    name = "confident"
    model_name = "confident-prm"
    parameters = 1234

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        rows = [[0.8] * len(steps) for _, steps in items]
        bad = {i: "refused" for i, (q, _) in enumerate(items) if q == "refuse"}
        if bad:
            raise ItemsRejected(bad, [[] if i in bad else r for i, r in enumerate(rows)])
        return rows


STEPS = ["Tom has 3 + 4 = 8 apples.", "He eats one, 8 - 1 = 7.", "So 2 * 3 = 6.", "Done."]


def test_a_wrong_equation_scores_zero_and_the_rest_keep_the_prms_scores() -> None:
    veto = ArithVeto(Confident())
    assert veto.score_batch([("q", STEPS)]) == [[0.0, 0.8, 0.8, 0.8]]
    assert veto.score_tails([("q", STEPS)], [1]) == [[0.8, 0.8, 0.8]]
    assert veto.score_tails([("q", ["1 + 1 = 2", "5 * 5 = 24"])], [1]) == [[0.0]]
    assert veto.parameters == 1234 and veto.model_name == "confident-prm"


def test_rejections_pass_through_with_the_others_vetoed() -> None:
    with pytest.raises(ItemsRejected) as caught:
        ArithVeto(Confident()).score_batch([("refuse", ["1 = 1"]), ("q", ["2 + 2 = 5"])])
    assert caught.value.reasons == {0: "refused"}
    assert caught.value.scores == [[], [0.0]]


def test_arith_needs_no_veto() -> None:
    with pytest.raises(BackendError, match="no veto needed"):
        ArithVeto(ArithBackend())


async def test_the_worker_serves_vetoed_scores_and_says_so() -> None:
    app = create_app(ArithVeto(Confident()), cache_size=0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        health = (await client.get("/health")).json()
        scored = await client.post("/v1/score", json={"question": "q", "solutions": [STEPS]})
    assert health["veto"] == "arith" and health["backend"] == "confident"
    assert scored.json()["scores"] == [[0.0, 0.8, 0.8, 0.8]]


def test_the_cli_refuses_a_veto_over_arith() -> None:
    argv = [sys.executable, "-m", "tts_server.prm_worker", "--backend", "arith", "--veto", "arith"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no veto needed" in done.stderr and "Traceback" not in done.stderr
