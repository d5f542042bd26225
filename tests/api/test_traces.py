"""Search traces through the gateway (real vLLM client over the fake vLLM): who writes one, what
a record holds, what it never holds (a key, or a prompt the operator did not turn on), that a
sink that cannot write never fails a request, and `tts-server export` on what was written."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import MODEL, EquationPRM, chat, events, plain_profiles, script, serve
from tests.support.trl_rows import check_preference, check_sft, check_stepwise
from tts_server.api import metrics
from tts_server.api.reliability import hash_key
from tts_server.settings import Settings
from tts_server.tools.export import run_export
from tts_server.traces import read_traces

KEY = "sk-trace-test-key-0123456789"
QUESTION = "Tom has 3 apples and buys 5. How many?"
# The fake's chat template ends with "<assistant>"; a completions prompt must too.
TEXT_PROMPT = f"{QUESTION}\n<assistant>"
AUTH = {"Authorization": f"Bearer {KEY}"}


@asynccontextmanager
async def traced(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The gateway over the fake vLLM with an API key, and its trace sink (None: no traces)."""
    config = Settings(
        policy_model=MODEL,
        prompt_profiles=plain_profiles(tmp_path),
        api_key_hashes=hash_key(KEY),
        **settings,
    )
    # Samples by seed: sample k of a request with `seed` draws seed + k (odd draws write 9).
    fake = FakeVLLM(script=script, model=MODEL, sample_by_seed=True)
    async with serve(config, fake, EquationPRM(), base_url="http://gw") as (app, client):
        sink = app.state.gateway.traces
        try:
            client.headers.update(AUTH)
            yield client, sink
        finally:
            if sink is not None:
                sink.close()


def _asking(body: dict[str, Any]) -> dict[str, Any]:
    options = body["tts"]
    assert isinstance(options, dict)
    return {**body, "tts": {**options, "trace_export": True}}


def _trace_count(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value("tts_trace_records_total", {"outcome": outcome})
    return value or 0.0


def _records(folder: Path) -> list[dict[str, Any]]:
    return list(read_traces([folder])) if folder.exists() else []


def _all_text(folder: Path) -> str:
    return "".join(p.read_text() for p in folder.glob("*.jsonl")) if folder.exists() else ""


@pytest.mark.parametrize(
    ("settings", "ask", "param"),
    [
        ({}, {"tts": {"strategy": "best_of_n", "trace_export": True}}, "tts.trace_export"),
        ({}, {"headers": {"X-TTS-Trace-Export": "true"}}, "X-TTS-Trace-Export"),
        ({"trace_mode": "off"}, {"tts": {"strategy": "best_of_n", "trace_export": True}}, None),
    ],
)
async def test_asking_for_a_trace_the_server_does_not_write_is_a_400_naming_it(
    tmp_path: Path, settings: dict[str, Any], ask: dict[str, Any], param: str | None
) -> None:
    if "trace_mode" in settings:
        settings["trace_dir"] = tmp_path / "traces"
    async with traced(tmp_path, **settings) as (client, sink):
        body = chat("best_of_n", seed=0)
        if "tts" in ask:
            body["tts"] = ask["tts"]
        response = await client.post(
            "/v1/chat/completions", json=body, headers=ask.get("headers", {})
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == (param or "tts.trace_export")
    assert sink is None
    assert not (tmp_path / "traces").exists()


async def test_opt_in_writes_only_the_requests_that_ask_and_never_the_prompt_or_key(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "traces"
    async with traced(tmp_path, trace_dir=folder) as (client, sink):
        plain = await client.post("/v1/chat/completions", json=chat("best_of_n", seed=0))
        asked = await client.post(
            "/v1/chat/completions",
            json=_asking(chat("best_of_n", seed=0)),
        )
        by_header = await client.post(
            "/v1/chat/completions",
            json=chat("beam_search", seed=0),
            headers={"X-TTS-Trace-Export": "TRUE"},
        )
        bad = await client.post(
            "/v1/chat/completions", json=chat("greedy"), headers={"X-TTS-Trace-Export": "maybe"}
        )
        sink.flush()
    assert [plain.status_code, asked.status_code, by_header.status_code] == [200, 200, 200]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-TTS-Trace-Export"
    records = _records(folder)
    assert [r["id"] for r in records] == [asked.json()["id"], by_header.json()["id"]]
    first = records[0]
    tts = asked.json()["tts"]
    assert first["strategy"] == "best_of_n" and first["budget"] == 4
    assert first["answer"] == tts["answer"] == "8"
    assert first["votes"] == tts["votes"]
    assert first["agreement"] == pytest.approx(tts["votes"]["8"] / sum(tts["votes"].values()))
    assert len(first["candidates"]) == 4
    chosen = first["candidates"][first["selected"]]
    assert chosen["text"].strip() == asked.json()["choices"][0]["message"]["content"]
    assert chosen["steps"] == ["We add the apples.\n\n", "3 + 5 = 8\n\n", "The answer is 8."]
    assert chosen["step_scores"] == [0.9, 0.9, 0.9] and chosen["confidence"] is None
    wrong = [c for c in first["candidates"] if c["answer"] == "9"]
    assert wrong and all(c["step_scores"] == [0.9, 0.1, 0.1] for c in wrong)
    assert first["usage"]["completion_tokens"] == asked.json()["usage"]["completion_tokens"]
    assert records[1]["strategy"] == "beam_search" and records[1]["iterations"] >= 1
    # The operator did not turn prompts on: no prompt text, and never the key.
    assert first["prompt_included"] is False
    assert not {"messages", "prompt", "question", "prompt_token_ids"} & set(first)
    text = _all_text(folder)
    assert QUESTION not in text and "apples and buys" not in text
    assert KEY not in text and hash_key(KEY) not in text


async def test_all_with_prompts_traces_every_answer_whole_or_streamed_and_it_exports(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "traces"
    async with traced(tmp_path, trace_dir=folder, trace_mode="all", trace_prompts=True) as (
        client,
        sink,
    ):
        whole = await client.post("/v1/chat/completions", json=chat("best_of_n", seed=0))
        stream = await client.post("/v1/chat/completions", json=chat("dvts", seed=0, stream=True))
        text = await client.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": TEXT_PROMPT,
                "seed": 0,
                "tts": {"strategy": "best_of_n", "budget": 4},
            },
        )
        sink.flush()
    assert whole.status_code == stream.status_code == text.status_code == 200
    stream_id = next(e["id"] for e in events(stream.text) if isinstance(e, dict))
    records = _records(folder)
    assert [r["id"] for r in records] == [whole.json()["id"], stream_id, text.json()["id"]]
    assert records[0]["messages"] == [{"role": "user", "content": QUESTION}]
    assert records[0]["question"] == QUESTION and records[0]["prompt_token_ids"]
    assert records[2]["prompt"] == TEXT_PROMPT and "messages" not in records[2]
    assert KEY not in _all_text(folder)

    rows = _export(folder, tmp_path / "all")
    assert rows["summary"]["kept"] == 3
    assert len(rows["sft.jsonl"]) == 3
    for row in rows["sft.jsonl"]:
        check_sft(row)
    assert rows["sft.jsonl"][0]["messages"][-1]["content"].endswith("The answer is 8.")
    assert rows["sft.jsonl"][2]["prompt"] == TEXT_PROMPT
    assert rows["sft.jsonl"][2]["completion"].endswith("The answer is 8.")
    # DVTS pruned the wrong steps: no wrong answer among its candidates, so no pair.
    assert not any(c["answer"] == "9" for c in records[1]["candidates"])
    assert len(rows["preference.jsonl"]) == 2
    for row in rows["preference.jsonl"]:
        check_preference(row)
    conversational, plain = rows["preference.jsonl"]
    assert conversational["prompt"] == [{"role": "user", "content": QUESTION}]
    assert conversational["chosen"][0]["content"].endswith("is 8.")
    assert conversational["rejected"][0]["content"].endswith("is 9.")
    assert plain["chosen"].endswith("is 8.") and plain["rejected"].endswith("is 9.")
    assert rows["step_rewards.jsonl"]
    for row in rows["step_rewards.jsonl"]:
        check_stepwise(row)
        right = row["completions"][-1].endswith("is 8.")
        assert row["labels"] == ([True, True, True] if right else [True, False, False])

    # With reference answers, joined by the question: the completions prompt is no question of
    # the dataset, and a wrong candidate's last step is labelled by its final answer.
    dataset = tmp_path / "refs.jsonl"
    dataset.write_text(json.dumps({"question": QUESTION, "answer": "8"}) + "\n")
    rows = _export(folder, tmp_path / "refs", dataset=str(dataset))
    assert rows["summary"]["kept"] == 2
    assert rows["summary"]["skipped"] == {"unknown_question": 1}
    assert all(row["prompt"] == QUESTION for row in rows["step_rewards.jsonl"])
    for row in rows["step_rewards.jsonl"]:
        check_stepwise(row)
        assert row["labels"][-1] is row["completions"][-1].endswith("is 8.")


def _export(folder: Path, out: Path, **options: Any) -> dict[str, Any]:
    settings = {"formats": "sft,preference,steps", "min_agreement": 0.0, "dataset": None}
    args = argparse.Namespace(
        traces=[folder], out=out, step_threshold=0.5, **{**settings, **options}
    )
    rows: dict[str, Any] = {"summary": run_export(args)}
    for name in ("sft.jsonl", "preference.jsonl", "step_rewards.jsonl"):
        rows[name] = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return rows


async def test_an_unwritable_trace_folder_never_fails_a_request_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = blocker / "traces"  # mkdir fails: Not a directory (root ignores permissions)
    caplog.set_level(logging.WARNING, logger="tts_server.traces")
    failed_before = _trace_count("failed")
    async with traced(tmp_path, trace_dir=folder, trace_mode="all", trace_prompts=True) as (
        client,
        sink,
    ):
        answers = [
            await client.post("/v1/chat/completions", json=chat("best_of_n", seed=0))
            for _ in range(3)
        ]
        sink.flush()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert _trace_count("failed") - failed_before == 3
    warnings = [r for r in caplog.records if r.name == "tts_server.traces"]
    assert len(warnings) == 1
    assert "cannot write" in warnings[0].getMessage()
    assert QUESTION not in caplog.text and KEY not in caplog.text
