"""Session-scoped real servers for integration tests: one vLLM CPU server, one PRM worker and
one gateway per test session (vLLM takes about 30 s to start on two cores)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from tests.support.servers import ServerProcess, cli, free_port

# Hypothesis's 200 ms per-example deadline is a clock assertion; this machine's clock is noisy.
settings.register_profile("tts", deadline=None)
settings.load_profile("tts")

MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Stack:
    policy_url: str
    prm_url: str
    gateway_url: str
    model: str = MODEL


def check_is_vllm(url: str, client: httpx.Client | None = None) -> str:
    """`url` if a vLLM server serving MODEL answers there; else the session fails, naming why
    (the "real vLLM" tests would otherwise test whatever server the variable points at)."""
    where = f"TTS_TEST_POLICY_URL={url}"
    http = client or httpx.Client(timeout=10)
    try:
        version = http.get(url + "/version").json().get("version")
        models = http.get(url + "/v1/models").json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        pytest.fail(f"{where} is not a vLLM server: {type(exc).__name__}: {exc}")
    finally:
        if client is None:
            http.close()
    if not isinstance(version, str) or not version:
        pytest.fail(f"{where} is not a vLLM server: GET /version has no version")
    served = [m.get("id") for m in models if isinstance(m, dict)]
    if MODEL not in served:
        pytest.fail(f"{where} (vLLM {version}) does not serve {MODEL}: it serves {served}")
    return url


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def policy_url(log_dir: Path) -> Iterator[str]:
    # A developer may point the tests at a vLLM server that is already running.
    existing = os.environ.get("TTS_TEST_POLICY_URL")
    if existing:
        yield check_is_vllm(existing.rstrip("/"))
        return
    server = ServerProcess("vllm", cli("policy", "--port", str(free_port())), 0, log_dir)
    port = int(server.argv[-1])
    server = ServerProcess("vllm", server.argv, port, log_dir).start()
    try:
        server.wait_healthy(900)
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prm_url(log_dir: Path) -> Iterator[str]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "tts_server.prm_worker",
        "--backend",
        "arith",
        "--port",
        str(port),
    ]
    server = ServerProcess("prm-worker", argv, port, log_dir).start()
    try:
        server.wait_healthy(60)
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack(policy_url: str, prm_url: str, log_dir: Path) -> Iterator[Stack]:
    port = free_port()
    argv = cli("gateway", "--port", str(port), "--policy-url", policy_url, "--prm-url", prm_url)
    server = ServerProcess("gateway", argv, port, log_dir).start()
    try:
        server.wait_healthy(60)
        yield Stack(policy_url=policy_url, prm_url=prm_url, gateway_url=server.url)
    finally:
        server.stop()
