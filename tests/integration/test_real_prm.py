"""The whole stack on a REAL vLLM-served PRM: vLLM CPU + SmolLM2 as the policy, the tiny
random-weight PRM served by a second vLLM as a pooling model (fixture `vllm_prm`), the PRM worker
on the `vllm` backend with the arith veto, and the gateway, each its own process.

Every strategy answers through the gateway, and the PRM tokens and FLOPs the responses report
add up to what the PRM's own vLLM counted (`vllm:prompt_tokens_total`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PoolingPRM
from tests.prm_worker.test_vllm_real import prompt_tokens_counter
from tests.support.servers import ServerProcess, cli, free_port

pytestmark = pytest.mark.integration

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
PLANS = [("greedy", 1, 1), ("majority", 4, 1), ("best_of_n", 4, 1), ("beam_search", 4, 2)]
PLANS += [("dvts", 4, 2), ("auto", 4, 1)]


@pytest.fixture(scope="module")
def gateway(policy_url: str, vllm_prm: PoolingPRM, log_dir: Path) -> Iterator[tuple[str, str]]:
    """(gateway URL, PRM worker URL)."""
    worker_port, gateway_port = free_port(), free_port()
    worker_argv = cli(
        "prm-worker", "--backend", "vllm", "--vllm-url", vllm_prm.url, "--model", vllm_prm.model,
        "--veto", "arith", "--port", str(worker_port),
    )  # fmt: skip
    worker = ServerProcess("prm-worker-real-prm", worker_argv, worker_port, log_dir).start()
    try:
        worker.wait_healthy(60)
        gateway_argv = cli(
            "gateway", "--port", str(gateway_port), "--policy-url", policy_url,
            "--prm-url", worker.url,
        )  # fmt: skip
        server = ServerProcess("gateway-real-prm", gateway_argv, gateway_port, log_dir).start()
        try:
            server.wait_healthy(60)
            yield server.url, worker.url
        finally:
            server.stop()
    finally:
        worker.stop()


def test_every_strategy_on_the_real_prm_and_its_tokens_add_up(
    gateway: tuple[str, str], vllm_prm: PoolingPRM
) -> None:
    gateway_url, worker_url = gateway
    health = httpx.get(worker_url + "/health", timeout=10).json()
    assert health["backend"] == "vllm" and health["veto"] == "arith"
    [card] = httpx.get(worker_url + "/v1/models", timeout=10).json()["data"]
    params = card["parameters"]
    assert isinstance(params, int) and params > 0
    model = httpx.get(gateway_url + "/v1/models", timeout=10).json()["data"][0]["id"]

    before = prompt_tokens_counter(vllm_prm)
    reports = {}
    for strategy, budget, width in PLANS:
        response = httpx.post(
            gateway_url + "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 96,
            },
            headers={
                "X-TTS-Strategy": strategy,
                "X-TTS-Budget": str(budget),
                "X-TTS-Beam-Width": str(width),
            },
            timeout=600,
        )
        assert response.status_code == 200, (strategy, response.text)
        reports[strategy] = response.json()["tts"]
    after = prompt_tokens_counter(vllm_prm)

    for strategy in ("best_of_n", "beam_search", "dvts", "auto"):
        prm = reports[strategy]["prm"]
        assert prm["calls"] >= 1 and prm["steps_scored"] >= 1, strategy
        assert reports[strategy]["flops"]["prm"] == 2 * params * prm["tokens"], strategy
    for strategy in ("greedy", "majority"):
        assert reports[strategy]["prm"]["calls"] == 0
    # What the responses say the PRM computed is what the PRM's server counted.
    assert sum(r["prm"]["tokens"] for r in reports.values()) == after - before
    assert after - before > 0
    print(
        "\nreal PRM:",
        {s: (r["prm"]["steps_scored"], r["prm"]["steps_cached"], r["prm"]["tokens"])
         for s, r in reports.items()},
    )  # fmt: skip
