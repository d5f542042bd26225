"""The PRM part of `tts-server up`: how to start the PRM worker and, for the `vllm` backend, the
second vLLM server that serves the PRM as a pooling model (unless TTS_PRM_VLLM_URL names one).

Everything here is decided before any process starts, so a bad TTS_PRM_MODEL is one error line
and exit 2, not a vLLM that dies a minute later.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tts_server.launch.vllm import LaunchError, check_vllm_python, prm_argv, vllm_env
from tts_server.settings import Settings

# The Qwen2.5-Math-PRM format's step tag (prm_worker/backends/formats.py), the only format the
# `vllm` backend scores in: its id is what vLLM's pooler must pick rows at.
STEP_TAG = "<extra_0>"
# owner/name as the model hub spells repositories: letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


@dataclass(frozen=True)
class PRMServer:
    """A vLLM server `up` starts for the PRM."""

    argv: list[str]
    env: dict[str, str]
    url: str
    served_name: str


@dataclass(frozen=True)
class PRMPlan:
    backend: str
    # After `prm-worker --port P --backend B`.
    worker_args: list[str] = field(default_factory=list)
    server: PRMServer | None = None

    def describe(self) -> str:
        if self.backend != "vllm":
            return self.backend
        url = self.worker_args[self.worker_args.index("--vllm-url") + 1]
        name = self.worker_args[self.worker_args.index("--model") + 1]
        return f"vllm ({name} at {url})"


def plan_prm(settings: Settings) -> PRMPlan:
    """What `up` starts for `settings.prm_backend` (LaunchError: a setting that cannot work)."""
    spec = settings.prm_model or settings.prm_model_path
    if settings.prm_backend == "hf":
        return PRMPlan("hf", ["--model", spec] if spec else [])
    if settings.prm_backend != "vllm":
        return PRMPlan(settings.prm_backend)
    if settings.prm_vllm_url:
        name = settings.prm_served_name or (served_name_for(spec) if spec else None)
        if not name:
            raise LaunchError(
                "TTS_PRM_VLLM_URL needs TTS_PRM_SERVED_NAME (or TTS_PRM_MODEL): the name that "
                "server serves the PRM under"
            )
        return PRMPlan("vllm", ["--vllm-url", settings.prm_vllm_url, "--model", name])
    if not spec:
        raise LaunchError(
            "TTS_PRM_BACKEND=vllm needs TTS_PRM_MODEL (a model folder or a hub id to serve) "
            "or TTS_PRM_VLLM_URL (a vLLM server that already serves the PRM)"
        )
    model = resolve_model(spec)
    check_vllm_python(settings)
    name = settings.prm_served_name or served_name_for(spec)
    tag_id = settings.prm_step_tag_id
    if tag_id is None and isinstance(model, Path):
        tag_id = step_tag_id(model)
    port = settings.prm_vllm_port
    argv = prm_argv(
        settings,
        model,
        name,
        port,
        step_tag_id=tag_id,
        max_model_len=settings.prm_max_model_len,
        dtype=settings.prm_dtype,
    )
    env = vllm_env(settings.prm_kv_cache_gib)
    if isinstance(model, str):  # a hub id is fetched, unless the caller says offline
        env["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "0")
    url = f"http://127.0.0.1:{port}"
    return PRMPlan("vllm", ["--vllm-url", url, "--model", name], PRMServer(argv, env, url, name))


def resolve_model(spec: str) -> Path | str:
    """A model folder on this machine (with its config.json), else a plausible hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LaunchError(f"TTS_PRM_MODEL: no config.json in the folder {path}")
        return path.resolve()
    if path.exists():
        raise LaunchError(f"TTS_PRM_MODEL: {path} is a file, not a model folder")
    if _HUB_ID.fullmatch(spec) and ".." not in spec and "--" not in spec:
        return spec
    raise LaunchError(
        f"TTS_PRM_MODEL={spec!r} is neither a model folder on this machine nor a hub id "
        "(owner/name, e.g. Qwen/Qwen2.5-Math-PRM-7B)"
    )


def served_name_for(spec: str) -> str:
    """The last part of a folder or hub id: `Qwen/Qwen2.5-Math-PRM-7B` -> `Qwen2.5-Math-PRM-7B`."""
    return Path(spec.rstrip("/")).name or spec


def step_tag_id(folder: Path) -> int | None:
    """`<extra_0>`'s id in the folder's tokenizer files; None when it has none of them (vLLM's
    default then applies). Read from JSON: no transformers needed to start the stack."""
    found = False
    tokenizer = _json(folder / "tokenizer.json")
    if tokenizer is not None:
        found = True
        for token in tokenizer.get("added_tokens") or []:
            if isinstance(token, dict) and token.get("content") == STEP_TAG:
                return int(token["id"])
        vocab = (tokenizer.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and isinstance(vocab.get(STEP_TAG), int):
            return int(vocab[STEP_TAG])
    config = _json(folder / "tokenizer_config.json")
    if config is not None:
        found = True
        for key, token in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(token, dict) and token.get("content") == STEP_TAG:
                return int(key)
    if found:
        raise LaunchError(
            f"the tokenizer in {folder} has no {STEP_TAG} step tag, which the vllm PRM backend "
            "scores at (Qwen2.5-Math-PRM format); set TTS_PRM_STEP_TAG_ID if it has another one"
        )
    return None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else None
