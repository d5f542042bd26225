from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.support.servers import cli
from tts_server.launch.vllm import cpu_dtype, prm_argv, vllm_argv, vllm_env
from tts_server.settings import Settings


def test_dtype_follows_native_bf16_support(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("flags\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t: fpu avx2 fma f16c\n")
    assert cpu_dtype(amx) == "bfloat16"
    assert cpu_dtype(avx2) == "float32"
    assert cpu_dtype(tmp_path / "missing") == "float32"


def test_vllm_command_line(tmp_path: Path) -> None:
    settings = Settings(policy_dtype="bfloat16", policy_model="m", max_model_len=1024)
    argv = vllm_argv(settings, tmp_path, 8123)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--served-model-name") + 1] == "m"
    # Cached-token counts are needed for the cost we report.
    assert "--enable-prompt-tokens-details" in argv
    # Small KV blocks, so a search step's re-sent prefix is served from the prefix cache.
    assert argv[argv.index("--block-size") + 1] == "32"


def test_prm_command_line_serves_a_pooling_model(tmp_path: Path) -> None:
    argv = prm_argv(Settings(), tmp_path, "prm", 8124, step_tag_id=49152, max_model_len=512)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--served-model-name") + 1] == "prm"
    assert argv[argv.index("--runner") + 1] == "pooling"
    assert json.loads(argv[argv.index("--pooler-config") + 1]) == {"step_tag_id": 49152}
    assert argv[argv.index("--max-model-len") + 1] == "512"
    # Qwen's own tokenizer needs neither: vLLM's defaults fit it.
    default = prm_argv(Settings(), "Qwen/Qwen2.5-Math-PRM-7B", "prm", 8124)
    assert "--pooler-config" not in default and "--max-model-len" not in default
    assert vllm_env(1)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert vllm_env()["VLLM_TARGET_DEVICE"] == "cpu"


def test_a_bad_setting_is_one_clear_line_not_a_traceback() -> None:
    """16-token blocks crash vLLM CPU at start ("No common block size"): refused up front, named
    as its environment variable, without echoing values (a setting may be a secret)."""
    env = {**os.environ, "TTS_POLICY_BLOCK_SIZE": "16", "TTS_PRM_PORT": "secret-looking-value"}
    result = subprocess.run(cli("up"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert "error: invalid setting TTS_POLICY_BLOCK_SIZE: Input should be a multiple of 32" in lines
    assert any(line.startswith("error: invalid setting TTS_PRM_PORT:") for line in lines)
    assert "secret-looking-value" not in result.stderr
    with pytest.raises(ValidationError):
        Settings(policy_block_size=48)
    assert Settings(policy_block_size=64).policy_block_size == 64


def test_a_bad_choice_setting_fails_at_start_naming_it(tmp_path: Path) -> None:
    """Strategy, aggregation, selection and PRM backend are checked when settings load, not on
    the first request; a broken prompt profile fails the gateway's start with one line too."""
    env = {**os.environ, "TTS_DEFAULT_SELECTION": "best", "TTS_PRM_BACKEND": "oracle"}
    result = subprocess.run(cli("gateway"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("error: invalid setting TTS_DEFAULT_SELECTION:") for line in lines)
    assert any(line.startswith("error: invalid setting TTS_PRM_BACKEND:") for line in lines)
    profile = tmp_path / "bad.json"
    profile.write_text(json.dumps({"name": "b", "temperature": 9}))
    env = {**os.environ, "TTS_PROMPT_PROFILES": json.dumps({"SmolLM2-135M-Instruct": str(profile)})}
    result = subprocess.run(cli("gateway"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: bad.json: temperature must be a number from 0 to 2"
