"""The real scale-out: `tts-server up --replicas 2` (two vLLM CPU replicas, one core each, behind
vllm-router with sticky_least_loaded), compared with the same replicas behind a second router
with round_robin and no affinity header, with a gateway that keys pins by prompt, and with one
replica alone. Every figure comes from the replicas' own /metrics (deltas per phase; prefix
caches reset between phases, then primed with the shared few-shot prompt).

Heavy: two vLLM servers (about 3.5 GB each) and several minutes; `make test-heavy` runs it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import ServerProcess, cli, free_port
from tts_server.launch.replicas import plan_replicas
from tts_server.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.timeout(2400)]

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A box holds 6 pens. How many pens are in 4 boxes?",
    "Sara had 20 stickers and gave 7 away. How many are left?",
    "A bus has 12 people. 5 get off and 9 get on. How many are on the bus?",
]
MAX_TOKENS = 48


@dataclass
class Stack:
    gateway: str  # `up`'s gateway: sticky router, affinity on
    router: str  # `up`'s router (sticky_least_loaded)
    replicas: list[str]
    pids: list[int]  # the replicas' (each leads its own process group)
    router_metrics: str
    prm: str


def scrape(url: str) -> dict[str, float]:
    """Sums of each metric family in a /metrics page, labels dropped."""
    totals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


COUNTERS = ("vllm:request_success_total", "vllm:prefix_cache_queries_total")
HITS = "vllm:prefix_cache_hits_total"


def counters(replicas: list[str]) -> list[dict[str, float]]:
    wanted = (*COUNTERS, HITS, "vllm:prompt_tokens_total")
    return [{k: v for k, v in scrape(url).items() if k in wanted} for url in replicas]


def delta(before: list[dict[str, float]], after: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: a[k] - b.get(k, 0.0) for k in a} for b, a in zip(before, after, strict=True)]


def hit_share(d: list[dict[str, float]]) -> float:
    queries = sum(r["vllm:prefix_cache_queries_total"] for r in d)
    return sum(r[HITS] for r in d) / queries if queries else 0.0


def reset_caches(replicas: list[str]) -> None:
    for url in replicas:  # VLLM_SERVER_DEV_MODE=1 serves this
        assert httpx.post(url + "/reset_prefix_cache", timeout=30).status_code == 200


def ask(gateway: str, strategy: str, question: str, budget: int = 4, **extra: Any) -> Any:
    body = {
        "model": Settings().policy_model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": extra.pop("max_tokens", MAX_TOKENS),
        "tts": {"strategy": strategy, "budget": budget, "beam_width": 2},
        "seed": 11,
    }
    response = httpx.post(gateway + "/v1/chat/completions", json=body, timeout=900)
    assert response.status_code == 200, response.text
    return response.json()["tts"]


LOAD = [(s, q) for q in QUESTIONS for s in ("beam_search", "dvts")]


def run_load(
    gateway: str, replicas: list[str], primers: list[str]
) -> tuple[float, list[dict[str, float]]]:
    """The same 8 searches, 4 at a time: (wall seconds, per-replica deltas). The caches start
    empty but for the few-shot prompt that every request shares, put there by one greedy token
    through each of `primers` (a gateway in front of one replica each): a replica that has
    served traffic holds it, and the comparison is about what pinning can change."""
    reset_caches(replicas)
    for primer in primers:
        ask(primer, "greedy", "Prime the cache: what is 1 + 1?", budget=1, max_tokens=1)
    before = counters(replicas)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: ask(gateway, *job), LOAD))
    return time.monotonic() - started, delta(before, counters(replicas))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings()
    for needed in (settings.embedded_model_dir / "config.json", settings.router_bin):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: run `make install`")
    tmp = tmp_path_factory.mktemp("scale-out")
    port, prm_port, policy_port, metrics_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTS_")}
    env.update(
        {
            "TTS_CACHE_DIR": str(tmp),  # the logs; the models stay where they are
            "TTS_POLICY_MODEL_PATH": str(settings.embedded_model_dir),
            "TTS_VLLM_PYTHON": str(settings.vllm_python),
            "TTS_ROUTER_BIN": str(settings.router_bin),
            "TTS_PORT": str(port),
            "TTS_PRM_PORT": str(prm_port),
            "TTS_POLICY_PORT": str(policy_port),
            "TTS_ROUTER_PROMETHEUS_PORT": str(metrics_port),
            "VLLM_SERVER_DEV_MODE": "1",  # /reset_prefix_cache, between phases
        }
    )
    started = time.monotonic()
    up = subprocess.Popen(
        cli("up", "--replicas", "2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    lines: list[str] = []
    try:
        assert up.stdout is not None
        for raw in up.stdout:
            lines.append(raw.decode(errors="replace"))
            if "Press Ctrl-C to stop" in lines[-1] or "did not become healthy" in lines[-1]:
                break
        output = "".join(lines)
        assert "is ready at" in output, output
        replicas = re.findall(r"replicas (http://\S+), (http://\S+) behind", output)[0]
        pids = [int(p) for p in re.findall(r"policy replica \d \(vLLM\) pid=(\d+)", output)]
        print(f"\nup --replicas 2: ready in {time.monotonic() - started:.0f} s")
        print("".join(line for line in lines if "healthy after" in line), end="")
        yield Stack(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{policy_port}",
            list(replicas),
            pids,
            f"http://127.0.0.1:{metrics_port}",
            f"http://127.0.0.1:{prm_port}",
        )
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def start_round_robin(stack: Stack, log_dir: Path) -> tuple[ServerProcess, ServerProcess]:
    """A second router, round_robin, and a gateway without affinity in front of it."""
    port = free_port()
    plan = plan_replicas(
        Settings(
            policy_port=port,
            policy_replicas=2,
            router_policy="round_robin",
            router_prometheus_port=free_port(),
        )
    )
    argv = list(plan.router_argv)
    at = argv.index("--worker-urls") + 1
    argv[at : at + 2] = stack.replicas
    router = ServerProcess("router-rr", argv, port, log_dir).start().wait_healthy(60)
    gateway = gateway_process(stack, router.url, log_dir, "gateway-rr")
    return router, gateway


def gateway_process(
    stack: Stack, policy_url: str, log_dir: Path, name: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """Another gateway over the stack's PRM worker, without affinity unless `env` says."""
    port = free_port()
    argv = cli("gateway", "--port", str(port), "--policy-url", policy_url, "--prm-url", stack.prm)
    server = ServerProcess(name, argv, port, log_dir)
    environment = env if env is not None else {"TTS_AFFINITY_HEADER": ""}
    return server.start(environment).wait_healthy(120, "/health/ready")


class Figures(list[str]):
    def append(self, line: str) -> None:  # printed at once: a later failure keeps them
        print(line, flush=True)
        super().append(line)


def test_scale_out_behind_vllm_router(stack: Stack, tmp_path: Path) -> None:
    figures = Figures()
    # Warm-up: a first request on each replica is slow (5-16 s).
    for url in stack.replicas:
        body = {"model": Settings().policy_model, "prompt": "Hi", "max_tokens": 4}
        assert httpx.post(url + "/v1/completions", json=body, timeout=300).status_code == 200

    # 1. Stickiness: one search at a time, and only one replica's counters move for it.
    for strategy, question in LOAD[:2]:
        before = counters(stack.replicas)
        tts = ask(stack.gateway, strategy, question)
        moved = [r["vllm:request_success_total"] for r in delta(before, counters(stack.replicas))]
        assert sorted(moved) == [0, tts["policy_tokens"]["requests"]], (strategy, moved)
        figures.append(f"stickiness {strategy}: vLLM requests per replica {moved}")

    # 2. The same load: sticky with affinity (random keys, then prompt keys: a question's
    # searches share a replica), one replica alone, round_robin without affinity.
    primers = [
        gateway_process(stack, url, tmp_path, f"primer-{i}") for i, url in enumerate(stack.replicas)
    ]
    both = [p.url for p in primers]
    sticky_s, sticky = run_load(stack.gateway, stack.replicas, both)
    by_prompt_env = {
        "TTS_AFFINITY_KEY": "prompt",
        "TTS_AFFINITY_RELEASE_URL": f"{stack.router}/finish_session",
    }
    by_prompt_gw = gateway_process(stack, stack.router, tmp_path, "gateway-prompt", by_prompt_env)
    alone_gw = primers[0]
    rr_router, rr_gw = start_round_robin(stack, tmp_path)
    try:
        prompt_s, by_prompt = run_load(by_prompt_gw.url, stack.replicas, both)
        alone_s, alone = run_load(alone_gw.url, stack.replicas, both[:1])
        rr_s, rr = run_load(rr_gw.url, stack.replicas, both)
    finally:
        for server in (rr_gw, rr_router, by_prompt_gw, *primers):
            server.stop()
    for name, seconds, d in (
        ("sticky x2", sticky_s, sticky),
        ("sticky x2, prompt keys", prompt_s, by_prompt),
        ("one replica", alone_s, alone),
        ("round_robin x2", rr_s, rr),
    ):
        per = [int(r["vllm:request_success_total"]) for r in d]
        figures.append(
            f"{name}: {seconds:.1f} s, prefix-cache hit share {hit_share(d):.3f}, "
            f"vLLM requests per replica {per}"
        )
    figures.append(
        f"round_robin / sticky: wall {rr_s / sticky_s:.2f}x, "
        f"hit share {hit_share(rr) / max(hit_share(sticky), 1e-9):.2f}x"
    )
    assert hit_share(sticky) >= hit_share(alone) - 0.02  # nearly as high as on one replica
    # With prompt keys a question's prefix is computed on one replica only, as when alone.
    assert hit_share(by_prompt) >= hit_share(alone) - 0.005
    assert hit_share(sticky) >= hit_share(rr)

    # 3. Spread: 16 concurrent best-of-8 requests.
    before = counters(stack.replicas)
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: ask(stack.gateway, "best_of_n", QUESTIONS[i % 4], 8, max_tokens=24),
                range(16),
            )
        )
    spread = [r["vllm:request_success_total"] / 8 for r in delta(before, counters(stack.replicas))]
    figures.append(
        f"spread: 16 best-of-8 in {time.monotonic() - started:.1f} s, "
        f"client requests per replica {spread}"
    )
    assert sum(spread) == 16 and min(spread) >= 16 * 0.4

    # 4. A replica killed by PID under load: no client request fails.
    before = counters(stack.replicas)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        pending = [
            pool.submit(ask, stack.gateway, "beam_search", QUESTIONS[i % 4]) for i in range(8)
        ]
        time.sleep(4)
        last = scrape(stack.replicas[1])
        in_flight = last.get("vllm:num_requests_running", 0) + last.get(
            "vllm:num_requests_waiting", 0
        )
        served_1 = last["vllm:request_success_total"] - before[1]["vllm:request_success_total"]
        os.killpg(stack.pids[1], signal.SIGKILL)
        killed_at = time.monotonic() - started
        answers = [p.result() for p in pending]  # each asserts a 200
    total = sum(a["policy_tokens"]["requests"] for a in answers)
    served_0 = (
        scrape(stack.replicas[0])["vllm:request_success_total"]
        - before[0]["vllm:request_success_total"]
    )
    figures.append(
        f"kill: replica 1 killed at {killed_at:.1f} s with {in_flight:.0f} sub-requests in "
        f"flight; 8/8 answered 200 in {time.monotonic() - started:.1f} s; sub-requests: "
        f"{total} in all, {served_1:.0f} served by replica 1 before it died, {served_0:.0f} by "
        f"replica 0 (the in-flight ones computed again there; {served_0 - (total - served_1):+.0f}"
        f" computed twice)"
    )
    router = scrape(stack.router_metrics)
    figures.append(
        f"router: retries {router.get('vllm_router_retries_total', 0):.0f}, circuit-breaker "
        f"state sum {router.get('vllm_router_cb_state', 0):.0f} (1 = open)"
    )
    print("\nfigures:\n" + "\n".join(figures))
    assert len(answers) == 8
