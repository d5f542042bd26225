"""The scale-out part of `tts-server up --replicas K`: K vLLM replicas of the policy behind
vllm-router, which listens where the one vLLM would (policy_port), so the gateway's policy URL
does not change; the gateway releases its affinity sessions at the router's /finish_session.

Each replica gets its share of the KV cache (kv_cache_gib / K, at least 1 GiB) and, when there
are CPUs enough, its own CPUs: two vLLMs each binding OpenMP threads to every core would fight
over all of them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from tts_server.launch.vllm import LaunchError
from tts_server.settings import Settings

# The circuit breaker and health checks are tight so a dead
# replica's sessions move within seconds (facts measured on vllm-router 0.1.17).
ROUTER_FLAGS = (
    "--cb-failure-threshold", "2",
    "--health-check-interval-secs", "5",
    "--health-failure-threshold", "2",
    # At info, some policies log prompt text.
    "--log-level", "warning",
)  # fmt: skip


@dataclass(frozen=True)
class Replica:
    port: int
    env: dict[str, str]  # on top of the stack's environment

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class ReplicaPlan:
    replicas: list[Replica]
    router_argv: list[str]
    router_url: str

    @property
    def release_url(self) -> str:
        return f"{self.router_url}/finish_session"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def consecutive_free_ports(start: int, count: int, limit: int = 1000) -> list[int]:
    """The first `count` consecutive free ports from `start` on (LaunchError past `limit`)."""
    first = start
    while first < start + limit:
        block = list(range(first, first + count))
        taken = next((p for p in block if not _free(p)), None)
        if taken is None:
            return block
        first = taken + 1
    raise LaunchError(f"no {count} consecutive free ports in {start}-{start + limit}")


def cpu_groups(count: int, cpus: list[int] | None = None) -> list[str] | None:
    """`count` disjoint CPU lists as vLLM's VLLM_CPU_OMP_THREADS_BIND reads them ("0-1"), or
    None when there are fewer CPUs than replicas (vLLM then binds as it likes)."""
    available = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if count > len(available):
        return None
    size = len(available) // count
    groups = [available[i * size : (i + 1) * size] for i in range(count)]
    return [",".join(str(c) for c in group) for group in groups]


def plan_replicas(settings: Settings) -> ReplicaPlan:
    """Ports, environments and the router's command line for settings.policy_replicas."""
    if not settings.router_bin.exists():
        raise LaunchError(
            f"vllm-router is missing ({settings.router_bin}); run `make install` "
            "(or set TTS_ROUTER_BIN)"
        )
    count = settings.policy_replicas
    ports = consecutive_free_ports(settings.policy_port + 1, count)
    share = max(1, settings.kv_cache_gib // count)
    binds = cpu_groups(count)
    replicas = []
    for i, port in enumerate(ports):
        env = {"TTS_KV_CACHE_GIB": str(share)}
        if binds is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = binds[i]
        replicas.append(Replica(port, env))
    router_url = f"http://127.0.0.1:{settings.policy_port}"
    argv = [
        str(settings.router_bin),
        "--worker-urls",
        *(r.url for r in replicas),
        "--policy",
        settings.router_policy,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.policy_port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(settings.router_prometheus_port),
        # The replicas start with it and take a while (vLLM: 30 s or more each).
        "--worker-startup-timeout-secs",
        "900",
        *ROUTER_FLAGS,
    ]
    return ReplicaPlan(replicas, argv, router_url)
