"""What the benchmark runs against: the servers it was given by URL, and whatever is missing
started here (a vLLM policy server, an `arith` PRM worker, a gateway), stopped when it ends."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tts_server.launch.stack import Child, wait_healthy


class StackError(RuntimeError):
    pass


@dataclass
class Endpoints:
    policy_url: str
    prm_url: str | None
    gateway_url: str
    model: str
    # The gateway's PID when started here (its CPU and memory are read from /proc).
    gateway_pid: int | None = None
    started: list[str] = field(default_factory=list)


def free_port() -> int:
    """A free loopback port: any, or one of `TTS_BENCH_PORTS` ("9200-9299": on a shared machine,
    the ones this run may use), tried from a random start."""
    spec = os.environ.get("TTS_BENCH_PORTS", "").strip()
    if not spec:
        candidates = [0]
    else:
        low, _, high = spec.partition("-")
        ports = list(range(int(low), int(high or low) + 1))
        start = random.randrange(len(ports))
        candidates = ports[start:] + ports[:start]
    for candidate in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = sock.getsockname()[1]
            return port
    raise StackError(f"no free port in TTS_BENCH_PORTS={spec}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tts_server.cli", *args]


# The gateway started here admits every request the scenarios send at once (the default, 16,
# would queue part of a concurrency-32 cell and time the queue, not the gateway).
GATEWAY_ENV = {"TTS_MAX_IN_FLIGHT": "64", "TTS_MAX_QUEUE": "64", "TTS_LOG_LEVEL": "warning"}


@contextlib.contextmanager
def bench_stack(
    logs: Path,
    model: str,
    *,
    policy_url: str | None = None,
    prm_url: str | None = None,
    gateway_url: str | None = None,
    ready_timeout_s: float = 900.0,
) -> Iterator[Endpoints]:
    """Endpoints for every server; the ones not given are started (vLLM takes 30-60 s)."""
    if gateway_url is not None and policy_url is None:
        raise StackError(
            "--gateway-url needs --policy-url: the vLLM behind it, whose /metrics the "
            "benchmark reads and which the direct requests go to"
        )
    children: list[Child] = []
    if policy_url is None:
        port = free_port()
        policy_url = f"http://127.0.0.1:{port}"
        children.append(
            Child(
                "policy (vLLM)",
                _cli("policy", "--port", str(port)),
                f"{policy_url}/health",
                logs / "policy.log",
                models_url=f"{policy_url}/v1/models",
                served_model=model,
            )
        )
    if prm_url is None and gateway_url is None:
        port = free_port()
        prm_url = f"http://127.0.0.1:{port}"
        children.append(
            Child(
                "PRM worker (arith)",
                _cli("prm-worker", "--port", str(port), "--backend", "arith"),
                f"{prm_url}/health",
                logs / "prm-worker.log",
            )
        )
    gateway: Child | None = None
    if gateway_url is None:
        assert prm_url is not None
        port = free_port()
        gateway_url = f"http://127.0.0.1:{port}"
        gateway = Child(
            "gateway",
            _cli("gateway", "--port", str(port), "--policy-url", policy_url, "--prm-url", prm_url),
            f"{gateway_url}/health/ready",
            logs / "gateway.log",
            env_overrides={**GATEWAY_ENV, "TTS_POLICY_MODEL": model},
        )
        children.append(gateway)
    env = dict(os.environ)
    try:
        for child in children:
            child.start(env)
        for child in children:
            if not wait_healthy(child, ready_timeout_s):
                raise StackError(f"{child.name} did not become healthy:\n{child.tail()}")
        pid = gateway.process.pid if gateway is not None and gateway.process else None
        yield Endpoints(
            policy_url=policy_url.rstrip("/"),
            prm_url=prm_url.rstrip("/") if prm_url else None,
            gateway_url=gateway_url.rstrip("/"),
            model=model,
            gateway_pid=pid,
            started=[c.name for c in children],
        )
    finally:
        for child in reversed(children):
            child.stop()
