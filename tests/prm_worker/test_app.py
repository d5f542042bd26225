"""The PRM worker app: API shapes, validation, limits, batching and failure isolation.

In-process over `httpx.ASGITransport` (with the app's lifespan run), plus the real worker process
started by the session fixture `prm_url` (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.prm_app import serve
from tests.support.servers import ServerProcess, free_port
from tts_server.prm_worker import ScoreLimits, create_app
from tts_server.prm_worker.__main__ import main as worker_main
from tts_server.prm_worker.backends import BackendError, PRMBackend, ScoreItem, load_backend
from tts_server.prm_worker.backends.arith import ArithBackend, ArithScores
from tts_server.prm_worker.batcher import Overloaded, ScoreBatcher

S = ArithScores()


def fake_score(question: str, k: int, step: str) -> float:
    """A score that differs between requests (by question) and steps."""
    return ((len(question) * 31 + k * 7 + len(step)) % 97) / 100


class CountingBackend(PRMBackend):
    """Records every backend call; can be slow, gated, failing or malformed."""

    name = "counting"

    def __init__(self, *, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.model_name = "counting-prm"
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.short = False

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        self.calls.append(len(items))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        if any(question == self.fail_on for question, _ in items):
            raise RuntimeError("secret prompt text")
        scores = [[fake_score(q, k, s) for k, s in enumerate(steps)] for q, steps in items]
        return [row[:-1] for row in scores] if self.short else scores


@pytest.fixture
async def arith_client() -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(ArithBackend())) as client:
        yield client


def expected(question: str, solutions: list[list[str]]) -> list[list[float]]:
    return [[fake_score(question, k, s) for k, s in enumerate(steps)] for steps in solutions]


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]
    assert "Traceback" not in response.text and "detail" not in body
    if status == 400:
        assert error["type"] == "invalid_request_error"


async def test_health_and_models(arith_client: httpx.AsyncClient) -> None:
    health = await arith_client.get("/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "backend": "arith",
        "veto": None,
        "model": "arith-checker",
    }
    models = (await arith_client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["arith-checker"]


async def test_score_arith(arith_client: httpx.AsyncClient) -> None:
    body = {
        "question": "Tom has 3 apples and buys 4. How many?",
        "solutions": [["3 + 4 = 7", "The answer is 7."], ["3 + 4 = 8"], [], ["Think."]],
    }
    response = await arith_client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["scores"] == [[S.right, S.final_supported], [S.wrong], [], [S.neutral]]
    assert data["model"] == "arith-checker"
    assert data["steps_scored"] == 4
    assert data["tokens"] > 0


async def test_empty_solutions_never_reach_the_backend() -> None:
    backend = CountingBackend()
    async with serve(create_app(backend)) as client:
        body: dict[str, Any] = {"question": "q", "solutions": [[], []]}
        response = await client.post("/v1/score", json=body)
        assert response.json()["scores"] == [[], []]
        response = await client.post("/v1/score", json={"question": "q", "solutions": []})
        assert response.json() == {
            "scores": [],
            "model": "counting-prm",
            "steps_scored": 0,
            "steps_cached": 0,
            "tokens": 0,
        }
        assert backend.calls == []
        mixed = {"question": "q", "solutions": [[], ["a", "bb"], []]}
        response = await client.post("/v1/score", json=mixed)
        assert response.json()["scores"] == [[], expected("q", [["a", "bb"]])[0], []]
        assert backend.calls == [1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "question"),
        ({"solutions": [["a"]]}, "question"),
        ({"question": "q"}, "solutions"),
        ({"question": 1, "solutions": [["a"]]}, "question"),
        ({"question": None, "solutions": [["a"]]}, "question"),
        ({"question": "q", "solutions": "a"}, "solutions"),
        ({"question": "q", "solutions": ["a"]}, "solutions.0"),
        ({"question": "q", "solutions": [["a", 3]]}, "solutions.0.1"),
        ({"question": "q", "solutions": [["a"], [None]]}, "solutions.1.0"),
        ([], None),
        ("just a string", None),
    ],
)
async def test_invalid_bodies_are_400(
    arith_client: httpx.AsyncClient, body: Any, param: str | None
) -> None:
    response = await arith_client.post("/v1/score", json=body)
    assert_openai_error(response, 400, param)


async def test_invalid_json_is_400(arith_client: httpx.AsyncClient) -> None:
    response = await arith_client.post(
        "/v1/score", content=b'{"question": ', headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, None)
    assert response.json()["error"]["code"] == "invalid_json"


async def test_unknown_route_and_method_are_openai_errors(
    arith_client: httpx.AsyncClient,
) -> None:
    assert_openai_error(await arith_client.get("/v1/nothing"), 404, None)
    assert_openai_error(await arith_client.get("/v1/score"), 405, None)


async def test_limits_are_400_naming_the_field() -> None:
    limits = ScoreLimits(max_solutions=2, max_steps=3, max_question_chars=10, max_solution_chars=20)
    async with serve(create_app(ArithBackend(), limits=limits)) as client:

        async def post(question: str, solutions: list[list[str]]) -> httpx.Response:
            return await client.post(
                "/v1/score", json={"question": question, "solutions": solutions}
            )

        assert (await post("q" * 10, [["a"] * 3, ["b" * 20]])).status_code == 200
        assert_openai_error(await post("q" * 11, [["a"]]), 400, "question")
        assert_openai_error(await post("q", [["a"]] * 3), 400, "solutions")
        assert_openai_error(await post("q", [["a"], ["a"] * 4]), 400, "solutions.1")
        assert_openai_error(await post("q", [["a" * 10, "b" * 11]]), 400, "solutions.0")


async def test_concurrent_requests_are_merged_into_fewer_backend_calls() -> None:
    backend = CountingBackend(delay_s=0.01)
    # A window wide enough for 12 in-process requests to arrive on a loaded machine.
    app = create_app(backend, max_batch_size=64, batch_wait_s=0.2)
    requests = [
        (f"question {i}" + "?" * i, [[f"step {i}", "x" * i], [f"other {i}"]]) for i in range(12)
    ]
    async with serve(app) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/score", json={"question": q, "solutions": sols})
                for q, sols in requests
            )
        )
    # Merged: one call, or two when the window closed while requests were still arriving (those
    # then wait for the running batch and form the next one), never one call per request.
    assert len(backend.calls) <= 2
    assert sum(backend.calls) == 2 * len(requests)
    for (question, solutions), response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        data = response.json()
        assert data["scores"] == expected(question, solutions)
        assert data["steps_scored"] == 3


async def test_batches_respect_max_batch_size() -> None:
    backend = CountingBackend(delay_s=0.02)
    app = create_app(backend, max_batch_size=4, batch_wait_s=0.05)
    requests = [(f"q{i}", [["a"], ["b" * i]]) for i in range(6)]
    big = ("big", [[str(k)] for k in range(10)])  # over the batch size: served alone
    async with serve(app) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/score", json={"question": q, "solutions": sols})
                for q, sols in [*requests, big]
            )
        )
    assert all(r.status_code == 200 for r in responses)
    assert 10 in backend.calls
    assert all(n <= 4 for n in backend.calls if n != 10)
    assert sum(backend.calls) == 22
    for (question, solutions), response in zip([*requests, big], responses, strict=True):
        assert response.json()["scores"] == expected(question, solutions)


async def test_backend_error_fails_only_its_batch() -> None:
    backend = CountingBackend(fail_on="boom")
    # Two solutions per request and per batch: each request is its own batch.
    app = create_app(backend, max_batch_size=2, batch_wait_s=0.02)
    async with serve(app) as client:
        bad, good = await asyncio.gather(
            client.post("/v1/score", json={"question": "boom", "solutions": [["a"], ["b"]]}),
            client.post("/v1/score", json={"question": "fine", "solutions": [["a"], ["b"]]}),
        )
        assert_openai_error(bad, 500, None)
        assert bad.json()["error"]["type"] == "server_error"
        assert "secret" not in bad.text
        assert good.json()["scores"] == expected("fine", [["a"], ["b"]])
        # The worker survives the failure.
        after = await client.post("/v1/score", json={"question": "later", "solutions": [["c"]]})
        assert after.json()["scores"] == expected("later", [["c"]])


async def test_malformed_backend_output_is_a_500() -> None:
    backend = CountingBackend()
    backend.short = True
    async with serve(create_app(backend)) as client:
        response = await client.post("/v1/score", json={"question": "q", "solutions": [["a"]]})
        assert_openai_error(response, 500, None)


async def test_event_loop_stays_responsive_while_the_backend_runs() -> None:
    backend = CountingBackend(delay_s=5.0)
    async with serve(create_app(backend, batch_wait_s=0.0)) as client:
        scoring = asyncio.create_task(
            client.post("/v1/score", json={"question": "q", "solutions": [["a"]]})
        )
        assert await asyncio.to_thread(backend.entered.wait, 5)
        started = time.monotonic()
        health = await client.get("/health")
        assert health.status_code == 200
        # Far under the backend's 5 s: a blocked loop would answer only after the scoring.
        assert time.monotonic() - started < 3.0
        assert not scoring.done()
        assert (await scoring).status_code == 200


async def test_full_queue_answers_429() -> None:
    backend = CountingBackend()
    backend.gate = threading.Event()
    batcher = ScoreBatcher(backend, max_batch_size=2, batch_wait_s=0.0, max_queued=2)
    try:
        first = asyncio.create_task(batcher.score([("a", ["x"]), ("a", ["y"])]))
        assert await asyncio.to_thread(backend.entered.wait, 5)  # the first batch is running
        second = asyncio.create_task(batcher.score([("b", ["x"]), ("b", ["y"])]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.score([("c", ["x"])])
        backend.gate.set()
        assert (await first).scores == expected("a", [["x"], ["y"]])
        assert (await second).scores == expected("b", [["x"], ["y"]])
    finally:
        backend.gate.set()
        await batcher.aclose()


async def test_a_cancelled_request_does_not_disturb_the_others() -> None:
    backend = CountingBackend()
    backend.gate = threading.Event()
    batcher = ScoreBatcher(backend, max_batch_size=8, batch_wait_s=0.05)
    try:
        # A running batch holds the worker, so the next batch cannot be taken before the cancel,
        # however slow the machine: no race with the batch window.
        running = asyncio.create_task(batcher.score([("running", ["z"])]))
        assert await asyncio.to_thread(backend.entered.wait, 5)
        gone = asyncio.create_task(batcher.score([("gone", ["x"])]))
        kept = asyncio.create_task(batcher.score([("kept", ["y"])]))
        await asyncio.sleep(0)  # both queued: score() queues before its first await
        gone.cancel()
        backend.gate.set()
        assert (await running).scores == expected("running", [["z"]])
        assert (await kept).scores == expected("kept", [["y"]])
        assert gone.cancelled()
        assert backend.calls == [1, 1]  # the next batch is "kept" alone
    finally:
        backend.gate.set()
        await batcher.aclose()


def test_load_backend_errors() -> None:
    with pytest.raises(BackendError, match="unknown PRM backend"):
        load_backend("nope")
    with pytest.raises(BackendError, match="bad options"):
        load_backend("arith", device="cpu")
    assert load_backend("arith", model=None, device=None).name == "arith"


def test_cli_rejects_bad_options_without_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--backend", "arith", "--model", "/some/folder"]) == 2
    assert "bad options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        worker_main(["--backend", "nope"])


def test_arith_worker_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from tts_server.prm_worker import create_app, load_backend\n"
        "create_app(load_backend('arith'))\n"
        "import tts_server.prm_worker.__main__\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_worker_process_logs_ready_and_no_prompt_text(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "tts_server.prm_worker", "--backend", "arith"]
    server = ServerProcess("prm-own", [*argv, "--port", str(port)], port, tmp_path).start()
    try:
        server.wait_healthy(60)
        secret = "SECRET-QUESTION-TEXT"
        body = {"question": secret, "solutions": [[f"{secret} 1 + 1 = 2"]]}
        assert httpx.post(f"{server.url}/v1/score", json=body, timeout=10).status_code == 200
        bad = httpx.post(f"{server.url}/v1/score", json={"question": secret}, timeout=10)
        assert bad.status_code == 400
    finally:
        server.stop()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
    assert server.process is not None and server.process.returncode in (0, -signal.SIGTERM)
    log = server.log_path.read_text()
    assert "Application shutdown complete" in log
    ready = [line for line in log.splitlines() if "PRM worker ready" in line]
    assert len(ready) == 1 and "backend=arith" in ready[0] and f":{port}" in ready[0]
    assert secret not in log


def test_real_worker_process(prm_url: str) -> None:
    """The worker as `python -m tts_server.prm_worker --backend arith --port P`."""
    with httpx.Client(base_url=prm_url, timeout=10) as client:
        assert client.get("/health").json()["backend"] == "arith"
        body = {"question": "2 and 3?", "solutions": [["2 * 3 = 6", "\\boxed{6}"], ["2 * 3 = 5"]]}
        data = client.post("/v1/score", json=body).json()
        assert data["scores"] == [[S.right, S.final_supported], [S.wrong]]
        bad = client.post("/v1/score", json={"question": "q", "solutions": [[1]]})
        assert_openai_error(bad, 400, "solutions.0.0")


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus exposition text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_repeated_solutions_are_served_from_the_cache_and_counted() -> None:
    backend = CountingBackend()
    app = create_app(backend, cache_size=8)
    question = "cache canary question 7f3a"
    first = [["a = 1", "so 2"], ["b"]]
    async with serve(app) as client:
        before = (await client.get("/metrics")).text
        one = await client.post("/v1/score", json={"question": question, "solutions": first})
        # One solution seen before, one new: only the new one reaches the backend.
        second = [["b"], ["c", "d", "e"]]
        two = await client.post("/v1/score", json={"question": question, "solutions": second})
        after = (await client.get("/metrics")).text
    assert backend.calls == [2, 1]
    assert one.json()["steps_cached"] == 0
    assert two.json()["scores"] == expected(question, second)
    assert two.json()["steps_cached"] == 1 and two.json()["steps_scored"] == 4
    assert (
        metric_value(after, "prm_steps_cached_total")
        - metric_value(before, "prm_steps_cached_total")
        == 1
    )
    assert (
        metric_value(after, "prm_steps_scored_total")
        - metric_value(before, "prm_steps_scored_total")
        == 6
    )
    assert (
        metric_value(after, "prm_batch_size_count") - metric_value(before, "prm_batch_size_count")
        == 2
    )
    assert metric_value(after, "prm_queue_wait_seconds_count") > metric_value(
        before, "prm_queue_wait_seconds_count"
    )
    assert 'prm_requests_total{status="2xx"}' in after
    assert question not in after and "so 2" not in after


async def test_cache_is_bounded_and_can_be_off() -> None:
    backend = CountingBackend()
    cached = []
    async with serve(create_app(backend, cache_size=2)) as client:
        # Room for two: the second "a" is a hit (and so the most recently used), "c" evicts
        # the least recently used "b", the third "a" is a hit again, "b" is scored anew.
        for name in ("a", "b", "a", "c", "a", "b"):
            response = await client.post("/v1/score", json={"question": "q", "solutions": [[name]]})
            cached.append(response.json()["steps_cached"])
    assert cached == [0, 0, 1, 0, 1, 0]
    assert backend.calls == [1, 1, 1, 1]  # a, b, c, b
    off = CountingBackend()
    async with serve(create_app(off, cache_size=0)) as client:
        for _ in range(2):
            await client.post("/v1/score", json={"question": "q", "solutions": [["a"]]})
    assert off.calls == [1, 1]


def test_real_worker_process_exports_metrics(prm_url: str) -> None:
    with httpx.Client(base_url=prm_url, timeout=10) as client:
        body = {"question": "metrics canary 91b2", "solutions": [["2 * 3 = 6"]]}
        assert client.post("/v1/score", json=body).status_code == 200
        text = client.get("/metrics").text
    for name in (
        "prm_batch_size_bucket",
        "prm_queue_wait_seconds_bucket",
        "prm_scoring_duration_seconds_bucket",
        "prm_steps_scored_total",
        "prm_steps_cached_total",
        "prm_queued_solutions",
        "prm_queue_capacity_solutions",
        'prm_worker_info{backend="arith",model="arith-checker"} 1.0',
    ):
        assert name in text, name
    assert "metrics canary" not in text


async def test_context_steps_are_read_not_scored() -> None:
    backend = CountingBackend()
    question = "context canary 5d1e"
    solutions = [["a = 1", "b = 2", "c = 3"], ["d"]]
    async with serve(create_app(backend, cache_size=0)) as client:
        body = {"question": question, "solutions": solutions, "context_steps": [2, 0]}
        response = await client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    full = expected(question, solutions)
    assert response.json()["scores"] == [full[0][2:], full[1]]
    assert response.json()["steps_scored"] == 2


async def test_a_solution_extending_a_cached_one_computes_only_its_new_steps() -> None:
    """The cache keeps step scores by prefix: the next iteration of a search, which sends the
    same prefix plus one step, is one step of work."""
    backend = RecordingTails()
    question = "prefix canary 0c4b"
    async with serve(create_app(backend, cache_size=100)) as client:
        one = await client.post("/v1/score", json={"question": question, "solutions": [["a"]]})
        two = await client.post(
            "/v1/score", json={"question": question, "solutions": [["a", "b"], ["z", "b"]]}
        )
    assert one.status_code == two.status_code == 200
    assert backend.firsts == [[0], [1, 0]]  # "a" came from the cache, "z" is new
    assert two.json()["scores"] == expected(question, [["a", "b"], ["z", "b"]])
    assert two.json()["steps_cached"] == 1 and two.json()["steps_scored"] == 4


@pytest.mark.parametrize(
    ("context", "param"),
    [([1], "context_steps"), ([0, 3], "context_steps.1"), ([-1, 0], "context_steps.0")],
)
async def test_bad_context_steps_are_a_400_naming_the_field(context: list[int], param: str) -> None:
    async with serve(create_app(CountingBackend())) as client:
        body = {"question": "q", "solutions": [["a"], ["b", "c"]], "context_steps": context}
        assert_openai_error(await client.post("/v1/score", json=body), 400, param)


class RecordingTails(CountingBackend):
    def __init__(self) -> None:
        super().__init__()
        self.firsts: list[list[int]] = []

    def score_tails(self, items: Sequence[ScoreItem], first: Sequence[int]) -> list[list[float]]:
        self.firsts.append(list(first))
        return super().score_tails(items, first)
