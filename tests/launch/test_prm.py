"""What `tts-server up` starts for the PRM: settings in, command lines out (no server runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.servers import cli
from tts_server.launch.prm import STEP_TAG, plan_prm
from tts_server.launch.stack import Child, wait_healthy
from tts_server.launch.vllm import LaunchError
from tts_server.prm_worker.backends.formats import QWEN_MATH_PRM
from tts_server.settings import Settings


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _folder(tmp_path: Path, tokenizer: dict[str, object] | None) -> Path:
    folder = tmp_path / "my-prm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if tokenizer is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def _settings(**values: object) -> Settings:
    return Settings(prm_backend="vllm", vllm_python=Path(sys.executable), **values)


def test_the_default_backend_starts_no_prm_server() -> None:
    plan = plan_prm(Settings())
    assert (plan.backend, plan.worker_args, plan.server) == ("arith", [], None)
    assert plan_prm(Settings(prm_backend="hf", prm_model="/m")).worker_args == ["--model", "/m"]


def test_a_local_prm_folder_is_served_with_the_step_tag_of_its_tokenizer(
    tmp_path: Path,
) -> None:
    added = [{"id": 0, "content": "<pad>"}, {"id": 49152, "content": STEP_TAG}]
    tokenizer = {"added_tokens": added}
    folder = _folder(tmp_path, tokenizer)
    plan = plan_prm(
        _settings(
            prm_model=str(folder), prm_vllm_port=8311, prm_max_model_len=1024, prm_kv_cache_gib=3
        )
    )
    assert plan.server is not None
    argv = plan.server.argv
    assert _flag(argv, "--model") == str(folder)
    assert _flag(argv, "--served-model-name") == "my-prm"
    assert _flag(argv, "--port") == "8311"
    assert _flag(argv, "--runner") == "pooling"
    assert json.loads(_flag(argv, "--pooler-config")) == {"step_tag_id": 49152}
    assert _flag(argv, "--max-model-len") == "1024"
    assert plan.server.env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert plan.server.env["HF_HUB_OFFLINE"] == "1"  # a local folder needs no hub
    assert plan.worker_args == ["--vllm-url", "http://127.0.0.1:8311", "--model", "my-prm"]
    assert plan.describe() == "vllm (my-prm at http://127.0.0.1:8311)"
    # The tag as the `vllm` backend renders it.
    assert QWEN_MATH_PRM.step_tag == STEP_TAG


def test_the_step_tag_also_comes_from_tokenizer_config_or_the_setting(tmp_path: Path) -> None:
    folder = _folder(tmp_path, None)
    decoder = {"added_tokens_decoder": {"7": {"content": STEP_TAG}}}
    (folder / "tokenizer_config.json").write_text(json.dumps(decoder))
    plan = plan_prm(_settings(prm_model=str(folder)))
    assert plan.server is not None
    assert json.loads(_flag(plan.server.argv, "--pooler-config")) == {"step_tag_id": 7}
    plan = plan_prm(_settings(prm_model=str(folder), prm_step_tag_id=9, prm_served_name="p"))
    assert plan.server is not None
    assert json.loads(_flag(plan.server.argv, "--pooler-config")) == {"step_tag_id": 9}
    assert _flag(plan.server.argv, "--served-model-name") == "p"


def test_a_hub_id_is_passed_to_vllm_which_may_fetch_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    plan = plan_prm(_settings(prm_model="Qwen/Qwen2.5-Math-PRM-7B", prm_dtype="bfloat16"))
    assert plan.server is not None
    argv = plan.server.argv
    assert _flag(argv, "--model") == "Qwen/Qwen2.5-Math-PRM-7B"
    assert _flag(argv, "--served-model-name") == "Qwen2.5-Math-PRM-7B"
    assert _flag(argv, "--dtype") == "bfloat16"
    assert "--pooler-config" not in argv  # vLLM's Qwen default, 151651, is that model's tag
    assert plan.server.env["HF_HUB_OFFLINE"] == "0"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the caller's choice wins
    plan = plan_prm(_settings(prm_model="Qwen/Qwen2.5-Math-PRM-7B"))
    assert plan.server is not None and plan.server.env["HF_HUB_OFFLINE"] == "1"


def test_an_external_prm_server_starts_none(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_prm(_settings(prm_vllm_url="http://gpu:8300", prm_model="Qwen/Qwen2.5-Math-PRM-7B"))
    assert plan.server is None
    assert plan.worker_args == ["--vllm-url", "http://gpu:8300", "--model", "Qwen2.5-Math-PRM-7B"]
    plan = plan_prm(_settings(prm_vllm_url="http://gpu:8300", prm_served_name="prm"))
    assert plan.worker_args[-1] == "prm"
    with pytest.raises(LaunchError, match="TTS_PRM_SERVED_NAME"):
        plan_prm(_settings(prm_vllm_url="http://gpu:8300"))
    # The worker's older setting names the model too.
    monkeypatch.setenv("TTS_PRM_MODEL_PATH", "older-name")
    assert plan_prm(_settings(prm_vllm_url="http://gpu:8300")).worker_args[-1] == "older-name"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (None, "needs TTS_PRM_MODEL"),
        ("./no/such/folder", "neither a model folder on this machine nor a hub id"),
        ("not a hub id", "neither a model folder"),
        ("owner/../name", "neither a model folder"),
        ("{tmp}", "no config.json in the folder"),
        ("{tmp}/config.json", "is a file, not a model folder"),
    ],
)
def test_a_prm_model_that_cannot_be_served_is_refused(
    tmp_path: Path, model: str | None, message: str
) -> None:
    (tmp_path / "config.json").write_text("{}")
    if model is not None:
        (tmp_path / "sub").mkdir()
        model = model.format(tmp=tmp_path / "sub" if model == "{tmp}" else tmp_path)
    with pytest.raises(LaunchError, match=message):
        plan_prm(_settings(prm_model=model))


def test_a_tokenizer_without_the_step_tag_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"added_tokens": [], "model": {"vocab": {"a": 0}}})
    with pytest.raises(LaunchError, match=r"no <extra_0> step tag.*TTS_PRM_STEP_TAG_ID"):
        plan_prm(_settings(prm_model=str(folder)))


def test_up_with_a_bad_prm_model_exits_2_before_starting_anything(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TTS_CACHE_DIR": str(tmp_path),
        "TTS_PRM_BACKEND": "vllm",
        "TTS_PRM_MODEL": str(tmp_path / "missing-prm"),
    }
    result = subprocess.run(cli("up"), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: TTS_PRM_MODEL=")
    assert "started" not in result.stdout
    assert not (tmp_path / "logs").exists()  # no child was started (each logs there)


class _FakeVLLM(BaseHTTPRequestHandler):
    """/health answers at once; /v1/models lists the model only from the third call on."""

    calls = 0

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            type(self).calls += 1
            cards = [{"id": "prm"}] if type(self).calls >= 3 else []
            body = json.dumps({"data": cards}).encode()
        else:
            body = b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_vllm() -> Iterator[str]:
    _FakeVLLM.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_vllm_child_is_healthy_only_once_it_serves_its_model(
    fake_vllm: str, tmp_path: Path
) -> None:
    def child(model: str) -> Child:
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        return Child(
            "PRM (vLLM)",
            argv,
            f"{fake_vllm}/health",
            tmp_path / "log",
            models_url=f"{fake_vllm}/v1/models",
            served_model=model,
        )

    other = child("another-model")
    other.start(dict(os.environ))
    try:
        assert not wait_healthy(other, timeout_s=2.5)
    finally:
        other.stop()
    _FakeVLLM.calls = 0
    prm = child("prm")
    prm.start(dict(os.environ))
    try:
        assert wait_healthy(prm, timeout_s=10)
        assert _FakeVLLM.calls == 3  # /health alone was not enough
    finally:
        prm.stop()
