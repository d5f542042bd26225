"""Session-scoped real servers for integration tests: one vLLM CPU server, one PRM worker and
one gateway per test session (vLLM takes about 30 s to start on two cores); and, for the `vllm`
PRM backend, a second vLLM serving a tiny random-weight PRM as a pooling model."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from tests.support.servers import ServerProcess, cli, free_port
from tests.support.tiny_prm import build_tiny_vllm_prm
from tts_server.launch.vllm import prm_argv, vllm_env
from tts_server.settings import Settings

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
    gateway_log: Path | None = None  # the session gateway's log file


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


@dataclass
class PoolingPRM:
    """A vLLM server serving the tiny PRM built in `folder` (with its tokenizer)."""

    url: str
    model: str
    folder: Path
    tag_id: int
    max_model_len: int
    build_s: float  # building the model folder
    start_s: float  # starting vLLM until healthy


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
    # Quotas too generous to refuse anything: every request runs through the quota path (and
    # the dashboards' remaining-budget panel has data).
    quotas = {
        "TTS_QUOTA_REQUESTS_PER_MINUTE": "1000000",
        "TTS_QUOTA_TOKENS_PER_MINUTE": "1000000000",
    }
    server = ServerProcess("gateway", argv, port, log_dir).start(quotas)
    try:
        server.wait_healthy(60)
        yield Stack(policy_url, prm_url, server.url, gateway_log=server.log_path)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_prm(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolingPRM]:
    """A random-weight Qwen2ForProcessRewardModel (seeded) on the embedded SmolLM2 tokenizer
    with `<extra_0>` added, served by vLLM CPU: about 1 GB, healthy in about 40 s."""
    started = time.monotonic()
    settings = Settings()
    if not (settings.embedded_model_dir / "tokenizer.json").exists():
        pytest.fail(f"no embedded model at {settings.embedded_model_dir}: run `make install`")
    folder, tag_id = build_tiny_vllm_prm(
        tmp_path_factory.mktemp("tiny-vllm-prm"), settings.embedded_model_dir
    )
    built = time.monotonic()
    port, name, max_len = free_port(), "tiny-vllm-prm", 512
    argv = prm_argv(
        settings, folder, name, port, step_tag_id=tag_id, max_model_len=max_len, dtype="float32"
    )
    server = ServerProcess("vllm-prm", argv, port, log_dir).start(env=vllm_env(kv_cache_gib=1))
    try:
        server.wait_healthy(600)
        now = time.monotonic()
        yield PoolingPRM(server.url, name, folder, tag_id, max_len, built - started, now - built)
    finally:
        server.stop()
