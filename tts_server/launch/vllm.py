"""Start a real vLLM OpenAI server on the CPU from the vLLM venv (`tts-server policy`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tts_server.settings import Settings

PREPARE_SCRIPT = Path(__file__).with_name("prepare_model.py")


class LaunchError(RuntimeError):
    pass


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def ensure_model(settings: Settings) -> Path:
    """The policy model folder; prepares the embedded SmolLM2 once when none is configured."""
    if settings.policy_model_path is not None:
        if not (settings.policy_model_path / "config.json").exists():
            raise LaunchError(
                f"no config.json in the policy model folder {settings.policy_model_path}"
            )
        return settings.policy_model_path
    target = settings.embedded_model_dir
    if not (target / "config.json").exists():
        check_vllm_python(settings)
        subprocess.run(
            [str(settings.vllm_python), str(PREPARE_SCRIPT), "--out", str(target)],
            env=vllm_env(),
            check=True,
        )
    return target


def check_vllm_python(settings: Settings) -> None:
    if not settings.vllm_python.exists():
        raise LaunchError(
            f"the vLLM venv is missing ({settings.vllm_python}); run `make install` first"
        )


def cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """bfloat16 where the CPU has native bf16 math, else float32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "float32"
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def vllm_argv(settings: Settings, model_dir: Path, port: int) -> list[str]:
    dtype = cpu_dtype() if settings.policy_dtype == "auto" else settings.policy_dtype
    return [
        str(settings.vllm_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        settings.policy_model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(settings.max_model_len),
        "--enforce-eager",
        "--block-size",
        str(settings.policy_block_size),
        # Cached-token counts per request, so the cost we report is measured, not guessed.
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",
    ]


def exec_policy_server(settings: Settings, port: int) -> None:
    """Replace this process with the vLLM server, so its PID is the server's own."""
    check_vllm_python(settings)
    model_dir = ensure_model(settings)
    env = vllm_env()
    env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
    argv = vllm_argv(settings, model_dir, port)
    os.execve(argv[0], argv, env)
