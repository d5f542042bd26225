"""The `judge` backend on a REAL vLLM CPU server: the embedded SmolLM2-135M-Instruct (the session
fixture `policy_url`, tests/conftest.py) judging steps, through a real PRM worker process."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL
from tests.support.servers import ServerProcess, free_port
from tts_server.flops import shape_from_path
from tts_server.prm_worker.backends.judge import JudgeBackend, JudgeMode
from tts_server.settings import Settings

pytestmark = pytest.mark.integration

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.", "He buys 4 more: 3 + 4 = 7.", "The answer is \\boxed{7}."]
FALLBACK = 0.5


def vllm_tokens(url: str) -> float:
    """vLLM's own count of the tokens it computed, from its /metrics: prompt tokens less those
    its prefix cache served, plus generated ones."""
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    signs = {
        "vllm:prompt_tokens_total": 1,
        "vllm:prompt_tokens_cached_total": -1,
        "vllm:generation_tokens_total": 1,
    }
    for name, sign in signs.items():
        pattern = rf"^{re.escape(name)}\{{[^}}]*model_name=\"{MODEL}\"[^}}]*\}} (\S+)$"
        values = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
        assert values, f"vLLM's /metrics has no {name}"
        total += sign * sum(values)
    return total


def settled_tokens(url: str, expected: float, wait_s: float = 5.0) -> float:
    """vLLM's count once it reaches `expected` (its counters may trail the answer a little)."""
    deadline = time.monotonic() + wait_s
    seen = vllm_tokens(url)
    while seen < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = vllm_tokens(url)
    return seen


@pytest.fixture(scope="module")
def judge_worker(policy_url: str, log_dir: Path) -> Iterator[str]:
    """`python -m tts_server.prm_worker --backend judge` in front of the policy's vLLM."""
    port = free_port()
    argv = [sys.executable, "-m", "tts_server.prm_worker", "--backend", "judge"]
    argv += ["--judge-url", policy_url, "--model", MODEL, "--port", str(port)]
    server = ServerProcess("prm-worker-judge", argv, port, log_dir).start()
    try:
        server.wait_healthy(60)
        yield server.url
    finally:
        server.stop()


def test_the_worker_judges_each_step_and_counts_what_vllm_computed(
    judge_worker: str, policy_url: str
) -> None:
    health = httpx.get(judge_worker + "/health", timeout=10).json()
    assert health == {"status": "ok", "backend": "judge", "veto": None, "model": MODEL}
    [card] = httpx.get(judge_worker + "/v1/models", timeout=10).json()["data"]
    # vLLM reports the model's local folder: the FLOPs count gets its parameters.
    assert card["parameters"] == shape_from_path(Settings().embedded_model_dir).parameters
    before = vllm_tokens(policy_url)
    started = time.perf_counter()
    response = httpx.post(
        judge_worker + "/v1/score",
        json={"question": QUESTION, "solutions": [STEPS]},
        timeout=120,
    )
    took = time.perf_counter() - started
    assert response.status_code == 200, response.text
    body = response.json()
    [scores] = body["scores"]
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert any(s != FALLBACK for s in scores), "the judge never said yes or no"
    grown = settled_tokens(policy_url, before + body["tokens"]) - before
    assert body["tokens"] == grown > 0
    print(f"\njudge, step mode, 3 steps: {took:.2f} s ({took / 3:.2f} s a step), scores {scores}")


def test_latency_of_judging_per_step_against_per_solution(policy_url: str) -> None:
    """Not an assertion about time: measures what a judge costs per step on this machine."""
    wrong = ["Tom starts with 3 apples.", "He buys 4 more: 3 + 4 = 9.", "The answer is 9."]
    items = [(QUESTION, STEPS), (QUESTION, wrong)]
    timings: dict[str, float] = {}
    modes: tuple[JudgeMode, ...] = ("step", "solution")
    for mode in modes:
        backend = JudgeBackend(policy_url, MODEL, judge_mode=mode, memo_size=0)
        try:
            backend.score_batch([("Warm up?", ["Yes."])])
            started = time.perf_counter()
            scores = backend.score_batch(items)
            timings[mode] = time.perf_counter() - started
        finally:
            backend.close()
        assert [len(row) for row in scores] == [3, 3]
        print(f"\n{mode} mode, 2 solutions x 3 steps: {timings[mode]:.2f} s, scores {scores}")
    steps = sum(len(s) for _, s in items)
    print(
        f"per step: {timings['step'] / steps:.3f} s (step mode) vs "
        f"{timings['solution'] / steps:.3f} s (solution mode)"
    )
