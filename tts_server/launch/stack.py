"""`tts-server up`: the policy server, the PRM worker and the gateway as child processes, and for
the `vllm` PRM backend a fourth, the PRM's own vLLM server (launch/prm.py decides). With
`--replicas K` (K > 1) the policy is K vLLM replicas behind vllm-router (launch/replicas.py).

Children run in their own sessions so that Ctrl-C reaches only this supervisor, which then stops
them in order (gateway first) by PID, and kills what does not exit in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from tts_server.launch.prm import PRMPlan, plan_prm
from tts_server.launch.replicas import ReplicaPlan, plan_replicas
from tts_server.settings import Settings

STOP_TIMEOUT_S = 15.0


@dataclass
class Child:
    name: str
    argv: list[str]
    health_url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    stop_timeout_s: float = STOP_TIMEOUT_S
    # A vLLM server answers /health before it serves its model: wait for the model's card too.
    models_url: str | None = None
    served_model: str | None = None
    # Its own environment instead of the stack's (a vLLM started directly).
    env: dict[str, str] | None = None
    # Set on top of the stack's environment (a replica's KV cache share).
    env_overrides: dict[str, str] | None = None
    # One of several policy replicas: the stack outlives it while another one serves.
    replica: bool = False

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**(self.env or env), **(self.env_overrides or {})},
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            # Its own session: killing the group also ends vLLM's engine-core children.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_healthy(child: Child, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            return False
        try:
            if httpx.get(child.health_url, timeout=2.0).status_code == 200 and _serves(child):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    return False


def _serves(child: Child) -> bool:
    if child.models_url is None:
        return True
    body = httpx.get(child.models_url, timeout=2.0).json()
    cards = body.get("data") if isinstance(body, dict) else None
    return any(isinstance(c, dict) and c.get("id") == child.served_model for c in cards or [])


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    # Once: a second signal (Ctrl-C again, or `make` passing one on) must not cut short the
    # cleanup that stops the children, or they outlive us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop


def run_stack(
    settings: Settings,
    prm: PRMPlan | None = None,
    *,
    start_policy: bool = True,
    ready_timeout_s: float = 900.0,
    replicas: ReplicaPlan | None = None,
) -> int:
    logs = settings.cache_dir / "logs"
    cli = [sys.executable, "-m", "tts_server.cli"]
    prm = prm or plan_prm(settings)  # LaunchError: nothing started yet
    if replicas is None and start_policy and settings.policy_replicas > 1:
        replicas = plan_replicas(settings)
    children: list[Child] = []
    if replicas is not None:
        children += _replica_children(settings, replicas, cli, logs)
    elif start_policy:
        policy = f"http://127.0.0.1:{settings.policy_port}"
        children.append(
            Child(
                "policy (vLLM)",
                [*cli, "policy", "--port", str(settings.policy_port)],
                f"{policy}/health",
                logs / "policy.log",
                models_url=f"{policy}/v1/models",
                served_model=settings.policy_model,
            )
        )
    if prm.server is not None:
        children.append(
            Child(
                "PRM (vLLM)",
                prm.server.argv,
                f"{prm.server.url}/health",
                logs / "prm-vllm.log",
                models_url=f"{prm.server.url}/v1/models",
                served_model=prm.server.served_name,
                env=prm.server.env,
            )
        )
    children.append(
        Child(
            "PRM worker",
            [
                *cli,
                "prm-worker",
                "--port",
                str(settings.prm_port),
                "--backend",
                prm.backend,
                *prm.worker_args,
            ],
            f"http://127.0.0.1:{settings.prm_port}/health",
            logs / "prm-worker.log",
        )
    )
    children.append(
        Child(
            "gateway",
            [*cli, "gateway", "--host", settings.host, "--port", str(settings.port)],
            # Ready, not just alive: its own probe must have seen both upstreams up, or the
            # first request after the banner is a 503.
            f"http://{settings.host}:{settings.port}/health/ready",
            logs / "gateway.log",
            # It drains its requests first (upstreams still up: it is stopped first).
            stop_timeout_s=settings.drain_timeout_s + STOP_TIMEOUT_S,
        )
    )
    env = dict(os.environ)
    env["TTS_POLICY_URL"] = settings.policy_url
    env["TTS_PRM_URL"] = f"http://127.0.0.1:{settings.prm_port}"
    env["TTS_POLICY_MODEL"] = settings.policy_model
    if replicas is not None and settings.affinity_release_url is None:
        env["TTS_AFFINITY_RELEASE_URL"] = replicas.release_url

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        for child in children:
            child.start(env)
            assert child.process is not None
            print(
                f"started {child.name} pid={child.process.pid} (log: {child.log_path})", flush=True
            )
        for child in children:
            started = time.monotonic()
            if not wait_healthy(child, ready_timeout_s):
                print(f"\n{child.name} did not become healthy; last log lines:\n{child.tail()}")
                return 1
            print(f"{child.name} healthy after {time.monotonic() - started:.0f} s", flush=True)
        url = f"http://{settings.host}:{settings.port}"
        serving = None
        if replicas is not None:
            urls = ", ".join(r.url for r in replicas.replicas)
            serving = f"replicas {urls} behind vllm-router at {replicas.router_url}"
        print(_banner(url, settings.policy_model, prm.describe(), serving), flush=True)
        lost: set[str] = set()
        while True:
            for child in children:
                if child.alive() or child.name in lost:
                    continue
                print(f"\n{child.name} exited unexpectedly; last log lines:\n{child.tail()}")
                spare = [c for c in children if c.replica and c.alive()]
                if not (child.replica and spare):
                    return 1
                # The router moves its sessions to the others: keep serving.
                print(f"{len(spare)} replicas left; the router routes around it", flush=True)
                lost.add(child.name)
            time.sleep(1.0)
    except _Stop:
        print("\nstopping...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
        print("stopped", flush=True)


def _replica_children(
    settings: Settings, plan: ReplicaPlan, cli: list[str], logs: Path
) -> list[Child]:
    """The replicas, then the router (stopped before them: children stop in reverse)."""
    children = [
        Child(
            f"policy replica {i} (vLLM)",
            [*cli, "policy", "--port", str(replica.port)],
            f"{replica.url}/health",
            logs / f"policy-{i}.log",
            models_url=f"{replica.url}/v1/models",
            served_model=settings.policy_model,
            env_overrides=replica.env,
            replica=True,
        )
        for i, replica in enumerate(plan.replicas)
    ]
    children.append(
        Child(
            "vllm-router",
            plan.router_argv,
            f"{plan.router_url}/health",
            logs / "router.log",
            # Through the router: a replica serves the model.
            models_url=f"{plan.router_url}/v1/models",
            served_model=settings.policy_model,
        )
    )
    return children


SAMPLE_QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"


def _banner(url: str, model: str, prm: str, policy: str | None = None) -> str:
    messages = f'[{{"role": "user", "content": "{SAMPLE_QUESTION}"}}]'
    where = f"PRM: {prm}" if policy is None else f"policy: {policy}; PRM: {prm}"
    return f"""
tts-server is ready at {url} ({where})

Try it (strategies: auto, greedy, majority, best_of_n, beam_search, dvts):

curl -s {url}/v1/chat/completions \\
  -H 'Content-Type: application/json' \\
  -H 'X-TTS-Strategy: beam_search' -H 'X-TTS-Budget: 8' \\
  -d '{{"model": "{model}", "messages": {messages}}}'

Press Ctrl-C to stop.
"""
