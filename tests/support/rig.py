"""A gateway over a faulty fake vLLM and a faulty PRM worker, all on real sockets (the fault
and fuzz tests share it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.fake_vllm import FakeVLLM
from tests.support.faults import Faulty, ThreadServer
from tests.support.gateway import MODEL, script
from tts_server.api.app import create_app
from tts_server.prm_worker import create_app as create_prm_app
from tts_server.prm_worker.backends.arith import ArithBackend
from tts_server.settings import Settings


@dataclass
class Rig:
    gateway: ThreadServer
    vllm: Faulty
    vllm_server: ThreadServer
    prm: Faulty
    prm_server: ThreadServer
    settings: Settings

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def app_state(self) -> Any:
        return self.gateway.app.state  # type: ignore[attr-defined]

    def completions_calls(self) -> int:
        return self.vllm.calls


@contextmanager
def rig(tmp_path: Path, **overrides: Any) -> Iterator[Rig]:
    """A gateway over a faulty fake vLLM and a faulty PRM worker (arith), all on real sockets."""
    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    vllm = Faulty(FakeVLLM(script=script, model=MODEL).app(), "/v1/completions")
    prm = Faulty(create_prm_app(ArithBackend(), cache_size=0), "/v1/score")
    with ThreadServer(vllm) as vllm_server, ThreadServer(prm) as prm_server:
        values: dict[str, Any] = {
            "policy_model": MODEL,
            "prompt_profiles": {MODEL: str(profile)},
            "policy_url": vllm_server.url,
            "prm_url": prm_server.url,
            "policy_params": 1_000_000,
            "prm_params": 0,
            "probe_interval_s": 0.25,
            "retry_backoff_s": 0.01,
            "retry_backoff_cap_s": 0.05,
            "policy_timeout_s": 30.0,
        }
        values.update(overrides)
        settings = Settings(**values)
        with ThreadServer(create_app(settings)) as gateway:
            yield Rig(gateway, vllm, vllm_server, prm, prm_server, settings)
