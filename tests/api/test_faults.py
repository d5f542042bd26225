"""Reliability and security of the gateway against fault-injecting upstreams, all over real HTTP:
the gateway, the fake vLLM and the real PRM worker app each served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.faults import Faulty, ThreadServer
from tests.support.gateway import MODEL, script
from tests.support.rig import rig
from tests.support.servers import ServerProcess, cli, free_port
from tts_server.api.reliability import hash_key
from tts_server.prm_worker import create_app as create_prm_app
from tts_server.prm_worker.backends.arith import ArithBackend

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
KEY = "sk-test-key-0c7d"


def body(strategy: str = "best_of_n", budget: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "tts": {"strategy": strategy, "budget": budget, "beam_width": 2},
        **extra,
    }


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    data = response.json()
    assert set(data) == {"error"}
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["message"]
    if param is not None:
        assert data["error"]["param"] == param, data
    for leak in ("Traceback", 'File "', ".py", "/work/", "/tmp/", "127.0.0.1"):
        assert leak not in response.text, response.text


# --- 1. limits, 2. malformed bodies ---


def test_limits_are_400_naming_the_field_and_never_reach_vllm(tmp_path: Path) -> None:
    with rig(tmp_path, max_prompt_tokens=300, max_messages=3, max_budget=16) as r:
        long_prompt = "How many? " * 100  # 1000 tokens in the fake's one-char tokens
        cases: list[tuple[dict[str, Any], dict[str, str], str]] = [
            (body(n=5), {}, "n"),
            (body(budget=17), {}, "tts.budget"),
            (body(), {"X-TTS-Budget": "100"}, "X-TTS-Budget"),
            (body(max_tokens=100_000), {}, "max_tokens"),
            (body(max_completion_tokens=100_000), {}, "max_completion_tokens"),
            (body(stop=["a", "b", "c", "d", "e"]), {}, "stop"),
            (body(stop=["x" * 500]), {}, "stop"),
            ({**body(), "messages": [{"role": "user", "content": long_prompt}]}, {}, "messages"),
            ({**body(), "messages": [{"role": "user", "content": "q"}] * 4}, {}, "messages"),
        ]
        with httpx.Client(base_url=r.url, timeout=30) as client:
            for payload, headers, param in cases:
                response = client.post("/v1/chat/completions", json=payload, headers=headers)
                assert_openai_error(response, 400, param)
            long_completion = {"model": MODEL, "prompt": long_prompt}
            response = client.post("/v1/completions", json=long_completion)
            assert_openai_error(response, 400, "prompt")
        assert r.completions_calls() == 0


def test_malformed_bodies_are_400_or_413_without_internals(tmp_path: Path) -> None:
    with rig(tmp_path, max_body_bytes=10_000) as r, httpx.Client(base_url=r.url) as client:
        json_headers = {"Content-Type": "application/json"}
        for raw in (b"{not json", b"[1, 2, 3]", b'"a string"', b"null", b""):
            response = client.post("/v1/chat/completions", content=raw, headers=json_headers)
            assert_openai_error(response, 400)
        wrong_types = [
            ({**body(), "max_tokens": "many"}, "max_tokens"),
            ({**body(), "messages": "hello"}, "messages"),
            ({**body(), "temperature": [1]}, "temperature"),
            ({"messages": [{"role": "user", "content": "q"}]}, "model"),
            ({**body(), "tts": {"strategy": "best_of_n", "budget": "lots"}}, "tts.budget"),
        ]
        for payload, param in wrong_types:
            response = client.post("/v1/chat/completions", json=payload)
            assert_openai_error(response, 400, param)
        huge = {**body(), "messages": [{"role": "user", "content": "x" * 20_000}]}
        assert_openai_error(client.post("/v1/chat/completions", json=huge), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
            for _ in range(30):
                yield b"x" * 1000

        response = client.post("/v1/completions", content=chunks(), headers=json_headers)
        assert_openai_error(response, 413)
        assert client.get("/health").status_code == 200
        assert r.completions_calls() == 0


# --- 3. auth ---


def test_api_keys_guard_every_v1_route_but_not_the_probes(tmp_path: Path) -> None:
    hashes = f"{hash_key('other-key')},{hash_key(KEY)}"
    with rig(tmp_path, api_key_hashes=hashes) as r, httpx.Client(base_url=r.url) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            assert_openai_error(client.get("/v1/models", headers=headers), 401)
            response = client.post("/v1/chat/completions", json=body(), headers=headers)
            assert_openai_error(response, 401)
            assert_openai_error(client.post("/v1/completions", json={}, headers=headers), 401)
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=good).status_code == 200
        response = client.post("/v1/chat/completions", json=body(), headers=good)
        assert response.status_code == 200, response.text
        for probe in ("/health", "/health/live", "/health/ready", "/metrics"):
            assert client.get(probe).status_code == 200, probe
        assert KEY not in client.get("/metrics").text
    assert r.completions_calls() > 0
    with rig(tmp_path, api_key_hashes=hash_key(KEY), metrics_require_key=True) as r:
        assert_openai_error(httpx.get(r.url + "/metrics"), 401)
        assert httpx.get(r.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).is_success


# --- 4. backpressure ---


async def test_past_the_queue_exactly_the_excess_gets_429(tmp_path: Path) -> None:
    running, queued, excess = 2, 3, 4
    with rig(tmp_path, max_in_flight=running, max_queue=queued, queue_timeout_s=60) as r:
        r.vllm.mode = "gate"  # every generation waits until the gate opens
        admission = r.app_state.gateway.admission
        async with httpx.AsyncClient(base_url=r.url, timeout=60) as client:

            async def one() -> httpx.Response:
                return await client.post("/v1/chat/completions", json=body("greedy", 1))

            first = [asyncio.ensure_future(one()) for _ in range(running + queued)]
            # Up to 30 s for all of them to arrive: a loaded machine is slow to start them.
            for _ in range(600):
                if admission.running == running and admission.queued == queued:
                    break
                await asyncio.sleep(0.05)
            assert (admission.running, admission.queued) == (running, queued)
            rejected = await asyncio.gather(*(one() for _ in range(excess)))
            r.vllm.gate.set()
            admitted = await asyncio.gather(*first)
        for response in rejected:
            assert_openai_error(response, 429)
            assert int(response.headers["Retry-After"]) >= 1
        assert [a.status_code for a in admitted] == [200] * (running + queued)
        # The gateway (another thread) frees a slot just after its last byte is sent.
        for _ in range(100):
            if (admission.running, admission.queued) == (0, 0):
                break
            await asyncio.sleep(0.02)
        assert (admission.running, admission.queued) == (0, 0)


async def test_no_request_waits_in_the_queue_past_its_timeout(tmp_path: Path) -> None:
    with rig(tmp_path, max_in_flight=1, max_queue=1, queue_timeout_s=0.5) as r:
        r.vllm.mode = "hang"
        async with httpx.AsyncClient(base_url=r.url, timeout=30) as client:
            holder = asyncio.ensure_future(
                client.post("/v1/chat/completions", json=body("greedy", 1))
            )
            for _ in range(500):  # the holder must have the one slot before the next comes
                if r.app_state.gateway.admission.running == 1:
                    break
                await asyncio.sleep(0.02)
            assert r.app_state.gateway.admission.running == 1
            started = time.monotonic()
            waited = await client.post("/v1/chat/completions", json=body("greedy", 1))
            elapsed = time.monotonic() - started
            holder.cancel()
        assert_openai_error(waited, 429)
        # Waited its 0.5 s, then gave up: far from the holder's endless hang.
        assert 0.4 < elapsed < 5.0


# --- 5. client disconnect ---


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("strategy", "budget", "hang"),
    [("best_of_n", 16, "vllm"), ("beam_search", 4, "prm")],
)
async def test_a_client_that_goes_away_cancels_every_upstream_call(
    tmp_path: Path, strategy: str, budget: int, hang: str, stream: bool
) -> None:
    with rig(tmp_path) as r:
        faulty = r.vllm if hang == "vllm" else r.prm
        faulty.mode = "hang"
        async with httpx.AsyncClient(base_url=r.url, timeout=60) as client:
            request = asyncio.ensure_future(
                client.post("/v1/chat/completions", json=body(strategy, budget, stream=stream))
            )
            for _ in range(200):
                if faulty.open > 0 and (hang == "prm" or faulty.open == budget):
                    break
                await asyncio.sleep(0.05)
            opened = faulty.open
            assert opened == (budget if hang == "vllm" else 1)
            request.cancel()  # the client hangs up
            await asyncio.gather(request, return_exceptions=True)
        cancelled_at = time.monotonic()
        for _ in range(250):  # poll: the fakes run in another thread's event loop
            if faulty.open == 0 and r.app_state.gateway.admission.running == 0:
                break
            await asyncio.sleep(0.02)
        took = time.monotonic() - cancelled_at
        # A hanging fake answers nobody: only the gateway closing the calls empties it.
        assert faulty.open == 0 and faulty.client_closed >= opened, f"still open after {took:.1f} s"
        assert r.app_state.gateway.admission.running == 0
        async with httpx.AsyncClient() as client:
            text = (await client.get(r.url + "/metrics")).text
        in_flight = [
            line for line in text.splitlines() if line.startswith("tts_requests_in_flight ")
        ]
        assert in_flight == ["tts_requests_in_flight 0.0"]


# --- 6. deadlines ---


def test_a_hung_upstream_is_a_504_within_its_timeout(tmp_path: Path) -> None:
    with rig(tmp_path, policy_timeout_s=1.0) as r:
        r.vllm.mode = "hang"
        started = time.monotonic()
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        elapsed = time.monotonic() - started
        assert_openai_error(response, 504)
        # The upstream timeout (1 s) and slack for a loaded machine, far from the client's 30 s.
        assert elapsed < 1.0 + 4.0
        assert r.vllm.calls == 1  # a timed-out call is not retried
        # The fake learns of the hang-up on its own event loop, a moment after the 504.
        closed_by = time.monotonic() + 5.0
        while r.vllm.open and time.monotonic() < closed_by:
            time.sleep(0.01)
        assert r.vllm.open == 0


def test_a_deadline_returns_the_best_finished_answer_marked_partial(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.vllm.mode, r.vllm.times = "hang_after", 2  # 2 samples answer, the others hang
        started = time.monotonic()
        response = httpx.post(
            r.url + "/v1/chat/completions",
            json=body("best_of_n", 4),
            headers={"X-TTS-Deadline-S": "1"},
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        tts = response.json()["tts"]
        assert tts["partial"] is True
        assert tts["num_candidates"] == 2 and tts["answer"] == "8"
        assert tts["flops"]["policy"] > 0  # what the finished samples cost is still counted
        assert 1.0 <= elapsed < 5.0  # the deadline, not the hung samples (they never end)
        # Nothing finished by the deadline: 504.
        r.vllm.mode = "hang"
        response = httpx.post(
            r.url + "/v1/chat/completions",
            json=body("best_of_n", 4),
            headers={"X-TTS-Deadline-S": "0.5"},
            timeout=30,
        )
        assert_openai_error(response, 504)
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert_openai_error(
            httpx.post(
                r.url + "/v1/chat/completions", json=body(), headers={"X-TTS-Deadline-S": "soon"}
            ),
            400,
            "X-TTS-Deadline-S",
        )


# --- 7. retries, 8. upstream dies ---


def test_502_and_503_are_retried_a_bounded_number_of_times(tmp_path: Path) -> None:
    with rig(tmp_path, upstream_retries=2) as r:
        r.vllm.mode, r.vllm.status, r.vllm.times = "status", 503, 2
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        assert response.status_code == 200, response.text
        assert r.vllm.calls == 3
        r.vllm.calls, r.vllm.times, r.vllm.status = 0, 0, 502  # always failing
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        assert_openai_error(response, 502)
        assert r.vllm.calls == 3
        r.vllm.calls, r.vllm.status = 0, 400  # the upstream says the request is wrong
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        assert_openai_error(response, 400)
        assert r.vllm.calls == 1


@pytest.mark.parametrize("retries", [0, 1])
def test_the_retry_setting_reaches_both_clients(tmp_path: Path, retries: int) -> None:
    # The default (2) would also pass a test of the retries only: check the setting's own count.
    with rig(tmp_path, upstream_retries=retries) as r:
        r.vllm.mode, r.vllm.status = "status", 503
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        assert_openai_error(response, 502)
        assert r.vllm.calls == retries + 1
        r.vllm.mode = "ok"
        r.prm.mode, r.prm.status = "status", 503
        response = httpx.post(r.url + "/v1/chat/completions", json=body(), timeout=30)
        assert_openai_error(response, 502)
        assert r.prm.calls == retries + 1


def test_an_upstream_that_dies_mid_request_is_a_502_then_recovers(tmp_path: Path) -> None:
    with rig(tmp_path, upstream_retries=0) as r:
        r.vllm.mode = "close"
        started = time.monotonic()
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        assert_openai_error(response, 502)
        assert time.monotonic() - started < 5
        r.vllm.mode = "ok"
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        assert response.status_code == 200, response.text
        # The whole server gone, then back on the same port.
        r.vllm_server.stop()
        response = httpx.post(r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30)
        assert response.status_code in (502, 503)
        assert_openai_error(response, response.status_code)
        r.vllm_server.start()
        deadline = time.monotonic() + 10
        while True:
            response = httpx.post(
                r.url + "/v1/chat/completions", json=body("greedy", 1), timeout=30
            )
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 200, response.text


# --- 9. PRM outage ---


def wait_for_status(url: str, status: int, limit_s: float) -> float:
    started = time.monotonic()
    while httpx.get(url, timeout=5).status_code != status:
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"{url} not {status} after {limit_s} s")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("degrade", [False, True])
def test_prm_outage_readiness_fail_fast_or_majority_and_recovery(
    tmp_path: Path, degrade: bool
) -> None:
    with rig(tmp_path, degrade_to_majority=degrade) as r:
        ready, live = r.url + "/health/ready", r.url + "/health/live"
        assert httpx.get(ready).status_code == 200
        r.prm_server.stop()
        # Two probe intervals and slack for a loaded machine; never-flipping fails at 5 s.
        assert wait_for_status(ready, 503, 5) <= 2 * r.settings.probe_interval_s + 2.0
        assert httpx.get(live).status_code == 200
        assert httpx.get(ready).json()["prm"] == "down"
        generations = r.vllm.calls
        response = httpx.post(r.url + "/v1/chat/completions", json=body("best_of_n"), timeout=30)
        if degrade:
            assert response.status_code == 200, response.text
            tts = response.json()["tts"]
            assert tts["strategy"] == "majority" and "PRM" in tts["degraded"]
        else:
            assert_openai_error(response, 503)
            assert "PRM" in response.json()["error"]["message"]
            assert r.vllm.calls == generations  # fail fast: nothing generated for a lost cause
        # Strategies without a PRM still work.
        response = httpx.post(r.url + "/v1/chat/completions", json=body("majority"), timeout=30)
        assert response.status_code == 200
        r.prm.app = create_prm_app(ArithBackend(), cache_size=0)  # a new worker process's app
        r.prm_server.start()
        wait_for_status(ready, 200, 5)  # raises if not ready again within 5 s
        response = httpx.post(r.url + "/v1/chat/completions", json=body("best_of_n"), timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["tts"]["degraded"] is None


# --- 11. secrets ---


def test_no_prompt_or_key_in_error_bodies_or_metrics(tmp_path: Path) -> None:
    canary = "canary-7d2f-secret-question"
    with rig(tmp_path, api_key_hashes=hash_key(KEY)) as r, httpx.Client(base_url=r.url) as c:
        headers = {"Authorization": f"Bearer {KEY}"}
        payloads = [
            {**body(), "messages": [{"role": "user", "content": canary}], "max_tokens": "x"},
            {**body(), "messages": [{"role": "robot", "content": canary}]},
            {**body(), "messages": [{"role": "user", "content": canary}], "n": 5},
        ]
        texts = [c.post("/v1/chat/completions", json=p, headers=headers).text for p in payloads]
        texts.append(
            c.post(
                "/v1/chat/completions", json=body(), headers={"Authorization": f"Bearer {canary}"}
            ).text
        )
        texts.append(c.get("/metrics").text)
    for text in texts:
        assert canary not in text and KEY not in text
        assert not re.search(r"sk-test", text)


# --- 10. graceful shutdown, 11. nothing secret in the logs ---


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path: Path) -> None:
    canary_prompt, canary_key = "canary-9b1e How many apples?", "sk-canary-4a0f"
    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    # The request is held at the fake until the test has seen the drain, then released.
    vllm = Faulty(FakeVLLM(script=script, model=MODEL).app(), "/v1/completions", mode="gate")
    prm = Faulty(create_prm_app(ArithBackend()), "/v1/score")
    with ThreadServer(vllm) as vllm_server, ThreadServer(prm) as prm_server:
        port = free_port()
        env = {
            "TTS_POLICY_MODEL": MODEL,
            "TTS_PROMPT_PROFILES": json.dumps({MODEL: str(profile)}),
            "TTS_POLICY_PARAMS": "1000000",
            "TTS_PRM_PARAMS": "0",
            "TTS_LOG_LEVEL": "debug",  # even at debug, no prompt and no key
            "TTS_DRAIN_TIMEOUT_S": "20",
        }
        argv = cli(
            "gateway",
            "--port",
            str(port),
            "--policy-url",
            vllm_server.url,
            "--prm-url",
            prm_server.url,
        )
        gateway = ServerProcess("gateway", argv, port, tmp_path).start(env)
        try:
            gateway.wait_healthy(60, path="/health/ready")
            url = gateway.url
            payload = {
                **body("greedy", 1),
                "messages": [{"role": "user", "content": canary_prompt}],
            }
            headers = {"Authorization": f"Bearer {canary_key}"}
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(
                    httpx.post,
                    url + "/v1/chat/completions",
                    json=payload,
                    headers=headers,
                    timeout=60,
                )
                for _ in range(500):
                    if vllm.open:
                        break
                    time.sleep(0.02)
                assert vllm.open == 1
                assert gateway.process is not None
                gateway.process.send_signal(signal.SIGTERM)
                # At once, give or take the signal's delivery on a loaded machine.
                wait_for_status(url + "/health/ready", 503, 3.0)
                refused = httpx.post(url + "/v1/chat/completions", json=payload, timeout=10)
                assert_openai_error(refused, 503)
                assert refused.headers.get("Retry-After") == "1"
                assert not in_flight.done()  # still draining the held request
                vllm.gate.set()
                finished = in_flight.result()
            assert finished.status_code == 200, finished.text
            assert finished.json()["tts"]["answer"] == "8"
            assert gateway.process.wait(30) == 0
        finally:
            gateway.stop()
        log = gateway.log_path.read_text()
        assert "draining" in log and "drained" in log
        assert canary_prompt not in log and "canary-9b1e" not in log and canary_key not in log
