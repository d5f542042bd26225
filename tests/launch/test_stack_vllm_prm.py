"""`tts-server up` with TTS_PRM_BACKEND=vllm, all real: the policy vLLM, a second vLLM serving a
tiny random-weight PRM as a pooling model, the PRM worker on its `vllm` backend, the gateway.

Heavy: two vLLM CPU servers at once (about 7 GB, 2-3 minutes to the banner on two cores); it
starts its own policy (four children to account for), so it takes no session fixture.
"""

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
from tests.support.tiny_prm import build_tiny_vllm_prm
from tts_server.settings import Settings

# Two more vLLM servers beside the session's: run by `make test-heavy`, not `make test`.
pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.timeout(1500)]

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_beam_search_with_a_vllm_served_prm(tmp_path: Path) -> None:
    settings = Settings()
    if not (settings.embedded_model_dir / "tokenizer.json").exists():
        pytest.fail(f"no embedded model at {settings.embedded_model_dir}: run `make install`")
    started = time.monotonic()
    folder, _ = build_tiny_vllm_prm(tmp_path / "tiny-prm", settings.embedded_model_dir)
    built = time.monotonic()
    port, prm_port, policy_port, prm_vllm_port = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTS_PRM_")}
    env.update(
        {
            "TTS_CACHE_DIR": str(tmp_path / "cache"),  # the logs; the models stay where they are
            "TTS_POLICY_MODEL_PATH": str(settings.embedded_model_dir),
            "TTS_PORT": str(port),
            "TTS_POLICY_PORT": str(policy_port),
            "TTS_PRM_PORT": str(prm_port),
            "TTS_PRM_BACKEND": "vllm",
            "TTS_PRM_VETO": "arith",  # reaches the worker through up's environment
            "TTS_PRM_MODEL": str(folder),  # the step tag id is read from its tokenizer
            "TTS_PRM_VLLM_PORT": str(prm_vllm_port),
            "TTS_PRM_DTYPE": "float32",
            "TTS_PRM_MAX_MODEL_LEN": "2048",
        }
    )
    process = subprocess.Popen(
        cli("up"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    lines: list[str] = []
    pids: list[int] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            pids += [int(p) for p in re.findall(r"pid=(\d+)", line)]
            if "Press Ctrl-C to stop" in line:
                break
        ready = time.monotonic()
        output = "".join(lines)
        assert "is ready at" in output, output
        assert f"PRM: vllm (tiny-prm at http://127.0.0.1:{prm_vllm_port})" in output
        assert len(pids) == 4, output  # policy, PRM vLLM, PRM worker, gateway

        health = httpx.get(f"http://127.0.0.1:{prm_port}/health", timeout=10).json()
        assert health == {"status": "ok", "backend": "vllm", "veto": "arith", "model": "tiny-prm"}
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": settings.policy_model,
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 64,
            },
            headers={"X-TTS-Strategy": "beam_search", "X-TTS-Budget": "4", "X-TTS-Beam-Width": "2"},
            timeout=600,
        )
        answered = time.monotonic()
        assert response.status_code == 200, response.text
        tts = response.json()["tts"]
        assert tts["strategy"] == "beam_search"
        assert tts["prm"]["calls"] >= 1 and tts["prm"]["steps_scored"] > 0, tts
        print(
            f"\nbuild {built - started:.0f} s, up to banner {ready - built:.0f} s, "
            f"beam_search@4 {answered - ready:.1f} s; prm {tts['prm']}, flops {tts['flops']}"
        )
        print("".join(line for line in lines if "healthy after" in line))

        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0
        print(f"stopped in {time.monotonic() - answered:.1f} s")
        for pid in pids:
            assert not _pid_alive(pid), f"child {pid} outlived the supervisor"
    finally:
        if process.poll() is None:  # failed with the supervisor still running
            process.kill()
            process.wait()
        for pid in pids:  # killed, it could not stop its children: they are ours to end
            if _pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)  # each child leads its own session
