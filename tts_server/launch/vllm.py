"""Start a real vLLM OpenAI server on the CPU from the vLLM venv: the policy (`tts-server policy`)
or a PRM as a pooling model (`prm_argv`, for the `vllm` PRM backend)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tts_server.settings import Settings

PREPARE_SCRIPT = Path(__file__).with_name("prepare_model.py")


class LaunchError(RuntimeError):
    pass


def vllm_env(kv_cache_gib: int | None = None) -> dict[str, str]:
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
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
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


def server_argv(python: Path, model: Path | str, served_name: str, port: int) -> list[str]:
    """The start of every vLLM server's command line (the `vllm` console script is broken in the
    CPU package: the module is run instead)."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def prm_argv(
    settings: Settings,
    model: Path | str,
    served_name: str,
    port: int,
    *,
    step_tag_id: int | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
) -> list[str]:
    """A PRM served as a pooling model (`POST /pooling`, one row per step tag). `step_tag_id`:
    the tag's id in the PRM's vocabulary when it is not Qwen's `<extra_0>` (151651, vLLM's
    default for Qwen2ForProcessRewardModel)."""
    argv = server_argv(settings.vllm_python, model, served_name, port)
    argv += ["--runner", "pooling", "--dtype", cpu_dtype() if dtype == "auto" else dtype]
    argv += ["--enforce-eager", "--disable-uvicorn-access-log"]
    if step_tag_id is not None:
        argv += ["--pooler-config", json.dumps({"step_tag_id": step_tag_id})]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    return argv


def vllm_argv(settings: Settings, model_dir: Path, port: int) -> list[str]:
    dtype = cpu_dtype() if settings.policy_dtype == "auto" else settings.policy_dtype
    return [
        *server_argv(settings.vllm_python, model_dir, settings.policy_model, port),
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
    env = vllm_env(settings.kv_cache_gib)
    argv = vllm_argv(settings, model_dir, port)
    os.execve(argv[0], argv, env)
