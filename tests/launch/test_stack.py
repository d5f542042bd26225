"""`tts-server up` supervises its children: healthy, then stopped cleanly on SIGTERM, no orphan."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.servers import cli, free_port

pytestmark = pytest.mark.integration


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGTERM],
        # `make run` and Ctrl-C: the supervisor may get a second signal while it stops.
        [signal.SIGINT, signal.SIGTERM, signal.SIGINT],
    ],
)
def test_up_serves_then_stops_children_on_sigterm(
    policy_url: str, tmp_path: Path, signals: list[signal.Signals]
) -> None:
    port, prm_port = free_port(), free_port()
    argv = cli("up", "--policy-url", policy_url, "--port", str(port), "--prm-port", str(prm_port))
    env = {**os.environ, "TTS_CACHE_DIR": str(tmp_path)}
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    lines: list[str] = []
    pids: list[int] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C to stop" in line:
                break
        output = "".join(lines)
        assert "is ready at" in output, output
        assert f"curl -s http://127.0.0.1:{port}/v1/chat/completions" in output
        pids = [int(p) for p in re.findall(r"pid=(\d+)", output)]
        assert len(pids) == 2  # PRM worker and gateway; the policy is the existing server
        # The banner comes once the gateway is ready, not merely alive: a request now is served.
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200
        for number in signals:  # back to back, as a process group gets them
            process.send_signal(number)
        assert process.wait(60) == 0
        for pid in pids:
            assert not _pid_alive(pid), f"child {pid} outlived the supervisor"
    finally:
        if process.poll() is None:  # the test failed with the supervisor still running
            process.kill()
            process.wait()
            for pid in pids:  # killed, it could not stop its children: they are ours to end
                if _pid_alive(pid):
                    os.kill(pid, signal.SIGTERM)
