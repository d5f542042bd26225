from __future__ import annotations

from pathlib import Path

from tts_server.policy_server.launch import cpu_dtype, vllm_argv
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
