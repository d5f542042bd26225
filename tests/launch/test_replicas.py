"""`tts-server up --replicas K`: what it plans to start (ports, KV-cache shares, CPUs, the router's
command line), decided before anything starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.servers import free_port
from tts_server.cli import main
from tts_server.launch.replicas import consecutive_free_ports, cpu_groups, plan_replicas
from tts_server.launch.vllm import LaunchError
from tts_server.settings import Settings


def router_bin(tmp_path: Path) -> Path:
    path = tmp_path / "vllm-router"
    path.write_text("#!/bin/sh\n")
    return path


def test_replicas_take_consecutive_ports_after_the_router_and_share_the_kv_cache(
    tmp_path: Path,
) -> None:
    port = free_port()
    settings = Settings(
        policy_port=port,
        policy_replicas=2,
        kv_cache_gib=4,
        router_bin=router_bin(tmp_path),
        router_prometheus_port=9123,
    )
    plan = plan_replicas(settings)
    ports = [r.port for r in plan.replicas]
    assert len(ports) == 2 and ports[1] == ports[0] + 1 and ports[0] > port
    assert all(r.env["TTS_KV_CACHE_GIB"] == "2" for r in plan.replicas)
    argv = plan.router_argv
    assert argv[0] == str(settings.router_bin)
    workers = argv[argv.index("--worker-urls") + 1 : argv.index("--worker-urls") + 3]
    assert workers == [r.url for r in plan.replicas]
    assert argv[argv.index("--policy") + 1] == "sticky_least_loaded"
    assert argv[argv.index("--port") + 1] == str(port)  # where the one vLLM would be
    assert argv[argv.index("--prometheus-port") + 1] == "9123"
    assert argv[argv.index("--log-level") + 1] == "warning"  # info can log prompt text
    assert argv[argv.index("--cb-failure-threshold") + 1] == "2"
    assert plan.release_url == f"http://127.0.0.1:{port}/finish_session"


def test_a_taken_port_is_skipped_with_its_neighbours() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        ports = consecutive_free_ports(busy - 1, 2)
    assert busy not in ports and ports[1] == ports[0] + 1


def test_the_kv_cache_share_is_at_least_one_gib(tmp_path: Path) -> None:
    settings = Settings(policy_replicas=3, kv_cache_gib=2, router_bin=router_bin(tmp_path))
    assert [r.env["TTS_KV_CACHE_GIB"] for r in plan_replicas(settings).replicas] == ["1"] * 3


def test_each_replica_gets_its_own_cpus_when_there_are_enough() -> None:
    assert cpu_groups(2, [0, 1]) == ["0", "1"]
    assert cpu_groups(2, [0, 1, 2, 3]) == ["0,1", "2,3"]
    assert cpu_groups(3, [0, 1]) is None  # fewer CPUs than replicas: vLLM binds as it likes


def test_without_the_router_binary_up_refuses_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTS_ROUTER_BIN", str(tmp_path / "missing"))
    monkeypatch.setenv("TTS_CACHE_DIR", str(tmp_path))
    assert main(["up", "--replicas", "2"]) == 2
    assert "vllm-router is missing" in capsys.readouterr().err
    with pytest.raises(LaunchError):
        plan_replicas(Settings(policy_replicas=2, router_bin=tmp_path / "missing"))


def test_replicas_and_an_existing_policy_url_do_not_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTS_ROUTER_BIN", str(router_bin(tmp_path)))
    assert main(["up", "--replicas", "2", "--policy-url", "http://127.0.0.1:1"]) == 2
    assert "drop --policy-url" in capsys.readouterr().err


def test_the_default_is_one_replica_and_zero_is_refused() -> None:
    assert Settings().policy_replicas == 1
    with pytest.raises(ValueError, match="policy_replicas"):
        Settings(policy_replicas=0)
