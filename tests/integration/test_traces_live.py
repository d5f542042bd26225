"""Search traces on the real stack: a gateway process of its own (traces on, an API key) over the
session's vLLM + SmolLM2 and PRM worker writes one record per traced answer, whole or streamed,
that loads back and matches the response; `tts-server export` turns them into rows in TRL's
formats; with prompts off, neither the question nor the key is in any file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ServerProcess, cli, free_port
from tests.support.trl_rows import check_preference, check_sft, check_stepwise
from tts_server.api.reliability import hash_key
from tts_server.traces import read_traces

pytestmark = pytest.mark.integration

KEY = "sk-live-trace-key-9876543210"
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
MODEL = "SmolLM2-135M-Instruct"


@contextmanager
def gateway(
    policy_url: str, prm_url: str, log_dir: Path, name: str, env: dict[str, str]
) -> Iterator[httpx.Client]:
    port = free_port()
    argv = cli("gateway", "--port", str(port), "--policy-url", policy_url, "--prm-url", prm_url)
    server = ServerProcess(name, argv, port, log_dir).start(
        {"TTS_API_KEY_HASHES": hash_key(KEY), **env}
    )
    try:
        server.wait_healthy(60)
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=300) as client:
            yield client
    finally:
        server.stop()  # SIGTERM: the sink writes what is queued before the process ends


def body(strategy: str, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 96,
        "seed": 1,
        "tts": {"strategy": strategy, "budget": 4, "beam_width": 2},
        **extra,
    }


def test_traced_answers_load_back_and_export_to_trl_rows(
    policy_url: str, prm_url: str, log_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "traces"
    env = {"TTS_TRACE_DIR": str(folder), "TTS_TRACE_PROMPTS": "true"}
    with gateway(policy_url, prm_url, log_dir, "gateway-traces", env) as client:
        opted = client.post(
            "/v1/chat/completions", json=body("best_of_n"), headers={"X-TTS-Trace-Export": "true"}
        )
        not_opted = client.post("/v1/chat/completions", json=body("majority"))
        streamed = client.post(
            "/v1/chat/completions",
            json=body(
                "beam_search",
                stream=True,
                tts={"strategy": "beam_search", "budget": 4, "beam_width": 2, "trace_export": True},
            ),
        )
    assert opted.status_code == not_opted.status_code == streamed.status_code == 200
    stream_ids = {
        json.loads(line[6:])["id"]
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    }
    records = list(read_traces([folder]))
    assert [r["id"] for r in records] == [opted.json()["id"], *stream_ids]
    first, tts = records[0], opted.json()["tts"]
    assert first["strategy"] == "best_of_n" and first["budget"] == 4
    assert len(first["candidates"]) == tts["num_candidates"]
    assert [c["answer"] for c in first["candidates"]] == tts["candidates_answers"]
    assert first["votes"] == tts["votes"] and first["answer"] == tts["answer"]
    chosen = first["candidates"][first["selected"]]
    assert chosen["text"].strip() == opted.json()["choices"][0]["message"]["content"]
    assert all(len(c["step_scores"]) == len(c["steps"]) >= 1 for c in first["candidates"])
    assert first["messages"] == [{"role": "user", "content": QUESTION}]
    assert first["question"] == QUESTION and len(first["prompt_token_ids"]) > 10
    assert first["usage"]["completion_tokens"] == opted.json()["usage"]["completion_tokens"]
    assert records[1]["strategy"] == "beam_search" and records[1]["iterations"] >= 1
    assert KEY not in "".join(p.read_text() for p in folder.glob("*.jsonl"))

    out = tmp_path / "export"
    done = subprocess.run(
        [*cli("export", str(folder), "--out", str(out))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["records"] == 2 and summary["kept"] == 2
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 2
    for row in sft:
        check_sft(row)
    for row in (json.loads(x) for x in (out / "preference.jsonl").read_text().splitlines()):
        check_preference(row)
    steps = [json.loads(x) for x in (out / "step_rewards.jsonl").read_text().splitlines()]
    assert len(steps) >= 4  # every best-of-N candidate's steps are scored
    for row in steps:
        check_stepwise(row)


def test_without_prompts_no_question_or_key_is_written_and_export_says_why(
    policy_url: str, prm_url: str, log_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "traces"
    env = {"TTS_TRACE_DIR": str(folder), "TTS_TRACE_MODE": "all"}
    with gateway(policy_url, prm_url, log_dir, "gateway-traces-noprompt", env) as client:
        answer = client.post("/v1/chat/completions", json=body("majority"))
    assert answer.status_code == 200
    text = "".join(p.read_text() for p in folder.glob("*.jsonl"))
    (record,) = list(read_traces([folder]))
    assert record["id"] == answer.json()["id"] and record["prompt_included"] is False
    assert QUESTION not in text and "apples" not in text.split('"candidates"')[0]
    assert KEY not in text and hash_key(KEY) not in text
    done = subprocess.run(
        [sys.executable, "-m", "tts_server.cli", "export", str(folder), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "written without prompts" in done.stderr
