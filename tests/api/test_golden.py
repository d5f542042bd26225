"""Golden responses: every strategy on both endpoints, whole and streamed, plus the common errors,
against a seeded fake vLLM and a fake PRM. The bodies must not change (ids and timings aside)
when the code behind them is reorganised; `TTS_UPDATE_GOLDEN=1` rewrites the file on purpose.
They are the same with replica affinity off and on, per request or per subtree: the affinity key
travels in a header to the upstreams, never in a body.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import EOS, FakeVLLM
from tests.support.fakes import tails
from tests.support.gateway import normalise, plain_profiles, serve
from tts_server.settings import Settings
from tts_server.types import PRMUsage

MODEL = "fake-model"
GOLDEN = Path(__file__).parent / "golden" / "responses.json"
QUESTION = "Tom has 3 apples and buys 5. How many?"


def solution_rest(done: str, seed: int) -> str:
    """The rest of a solution of 2-4 addition steps, some wrong, then a stated answer; drawn from
    a generator seeded by what is written so far and the request's seed."""
    rng = random.Random(zlib.crc32(done.encode()) * 1_000_003 + seed)
    written = done.count("\n\n")
    total = rng.randint(2, 4)
    out, value = "", 3
    for k in range(written, total):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        value = a + b + (rng.random() < 0.3)  # wrong now and then
        out += f"Step {k + 1}: {a} + {b} = {value}\n\n"
    return out + f"The answer is {value}." + EOS


class SeededVLLM(FakeVLLM):
    """The fake vLLM, sampling by the request's seed (the client sends seed + i per copy)."""

    def complete(self, prompt: list[int], sample: int, body: dict[str, Any]) -> dict[str, Any]:
        return super().complete(prompt, int(body.get("seed") or 0) + sample, body)


def script(prompt: str, seed: int) -> str:
    return solution_rest(prompt.split("<assistant>")[-1], seed)


class CheckingPRM:
    """Right sums score high, wrong ones low, a stated answer in between; reports a token count."""

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        rows = tails([[_step_score(step) for step in steps] for steps in solutions], context)
        usage.calls += 1
        usage.steps_scored += sum(len(row) for row in rows)
        # The context is read too: a PRM computes every token it is sent.
        usage.tokens += sum(len(question) + sum(len(step) for step in s) for s in solutions)
        return rows

    async def model_name(self) -> str | None:
        return None

    async def parameters(self) -> int:
        return 1_000_000

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


def _step_score(step: str) -> float:
    if "=" not in step:
        return 0.6 + (len(step) % 5) / 100
    left, _, right = step.partition("=")
    a, _, b = left.split(":")[-1].partition("+")
    try:
        right_sum = int(a) + int(b) == int(right.strip())
    except ValueError:
        return 0.5
    return (0.9 if right_sum else 0.15) + (len(step) % 7) / 100


ADAPTIVE_TABLE = {
    "pilot_samples": 2,
    "easy_min": 0.99,
    "medium_min": 0.98,
    "routes": {
        "easy": {"strategy": "pilot"},
        "medium": {"strategy": "best_of_n"},
        "hard": {"strategy": "adaptive", "round_size": 2, "stop_margin": 2, "give_up_after": 6},
    },
}
FIXED_TABLE = {**ADAPTIVE_TABLE, "fixed_strategy": "dvts", "fixed_budget_share": 0.5}
TABLES = {"adaptive": ADAPTIVE_TABLE, "fixed": FIXED_TABLE}


@asynccontextmanager
async def gateway(
    tmp_path: Path, table: str | None, affinity: str = "request"
) -> AsyncIterator[httpx.AsyncClient]:
    extra: dict[str, Any] = {}
    if table is not None:
        path = tmp_path / f"{table}.json"
        path.write_text(json.dumps(TABLES[table]))
        extra["router_table"] = path
    if affinity == "off":
        extra["affinity_header"] = ""
    else:
        extra["affinity_scope"] = affinity
    settings = Settings(
        policy_model=MODEL,
        prompt_profiles=plain_profiles(tmp_path, MODEL),
        policy_params=134_515_008,
        stream_progress_interval_s=3600,
        **extra,
    )
    fake = SeededVLLM(script=script, model=MODEL)
    header = settings.affinity_header
    async with serve(settings, fake, CheckingPRM(), affinity_header=header) as (_, client):
        yield client


# name -> (table, endpoint, body without model/prompt, headers)
Case = tuple[str | None, str, dict[str, Any], dict[str, str]]


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    runs: list[tuple[str, str | None, dict[str, Any], dict[str, str]]] = [
        ("greedy", None, {"tts": {"strategy": "greedy"}}, {}),
        ("majority", None, {"tts": {"strategy": "majority", "budget": 4}}, {}),
        ("best_of_n", None, {"tts": {"strategy": "best_of_n", "budget": 4}}, {}),
        (
            "beam_search",
            None,
            {},
            {"X-TTS-Strategy": "beam_search", "X-TTS-Budget": "4", "X-TTS-Beam-Width": "2"},
        ),
        ("dvts", None, {"tts": {"strategy": "dvts", "budget": 4, "beam_width": 2}}, {}),
        ("auto", None, {"tts": {"budget": 8}}, {}),
        ("auto_adaptive", "adaptive", {"tts": {"budget": 8}}, {}),
        ("auto_fixed", "fixed", {"tts": {"budget": 8, "beam_width": 2}}, {}),
        (
            "best_of_n_naive_min",
            None,
            {
                "tts": {
                    "strategy": "best_of_n",
                    "budget": 4,
                    "selection": "naive",
                    "aggregation": "min",
                },
                "temperature": 0.3,
                "top_p": 0.9,
                "max_tokens": 40,
            },
            {},
        ),
        (
            "best_of_n_ceiling",
            None,
            {"tts": {"strategy": "best_of_n", "budget": 4, "max_flops": 3e11}},
            {},
        ),
        (
            "beam_search_stop",
            None,
            {"tts": {"strategy": "beam_search", "budget": 4, "beam_width": 2}, "stop": ["Step 3"]},
            {},
        ),
    ]
    for name, table, body, headers in runs:
        for endpoint in ("chat", "text"):
            for stream in (False, True):
                extra = (
                    {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
                )
                key = f"{name}/{endpoint}/{'stream' if stream else 'whole'}"
                cases[key] = (table, endpoint, {**body, "seed": 7, **extra}, headers)
    errors: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("unknown_strategy", {"tts": {"strategy": "nope"}}, {}),
        ("budget_zero", {}, {"X-TTS-Budget": "0"}),
        ("budget_not_integer", {}, {"X-TTS-Budget": "many"}),
        ("width_not_dividing", {"tts": {"strategy": "dvts", "budget": 6, "beam_width": 4}}, {}),
        ("bad_aggregation", {"tts": {"aggregation": "median"}}, {}),
        ("wrong_model", {"model": "other"}, {}),
        ("n_over_budget", {"n": 9}, {}),
        ("stream_options_alone", {"stream_options": {"include_usage": True}}, {}),
        ("max_tokens_over_cap", {"max_tokens": 100_000}, {}),
        ("bad_ceiling", {}, {"X-TTS-Max-FLOPs": "lots"}),
        ("bad_deadline", {"tts": {"deadline_s": -1}}, {}),
        ("too_many_stops", {"stop": ["a", "b", "c", "d", "e"]}, {}),
    ]
    for name, body, headers in errors:
        cases[f"error/{name}"] = (None, "chat", body, headers)
    cases["error/empty_prompt"] = (None, "text", {"prompt": "  "}, {})
    cases["error/no_user_message"] = (
        None,
        "chat",
        {"messages": [{"role": "system", "content": "x"}]},
        {},
    )
    return cases


CASES = _cases()


async def _answer(client: httpx.AsyncClient, case: Case) -> dict[str, Any]:
    _, endpoint, body, headers = case
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    prompt: dict[str, Any] = (
        {"messages": [{"role": "user", "content": QUESTION}]}
        if endpoint == "chat"
        else {"prompt": f"Q: {QUESTION}<assistant>"}
    )
    response = await client.post(path, json={"model": MODEL, **prompt, **body}, headers=headers)
    kept = (
        "content-type",
        "x-tts-strategy",
        "x-tts-budget",
        "x-tts-difficulty",
        "x-tts-routed-strategy",
    )
    seen: dict[str, Any] = {
        "status": response.status_code,
        "headers": {k: v for k, v in response.headers.items() if k in kept},
    }
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        seen["events"] = [e if e == "[DONE]" else normalise(json.loads(e)) for e in events]
    else:
        seen["body"] = normalise(response.json())
    return seen


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    if os.environ.get("TTS_UPDATE_GOLDEN") or not GOLDEN.exists():
        return {}
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


RECORDED: dict[str, Any] = {}


@pytest.mark.parametrize("affinity", ["request", "subtree", "off"])
@pytest.mark.parametrize("name", sorted(CASES))
async def test_the_response_is_the_recorded_one(
    name: str, affinity: str, golden: dict[str, Any], tmp_path: Path
) -> None:
    case = CASES[name]
    async with gateway(tmp_path, case[0], affinity) as client:
        seen = await _answer(client, case)
    if not golden:
        if affinity != "request":
            pytest.skip("recorded with the default affinity")
        RECORDED[name] = seen
        if len(RECORDED) == len(CASES):
            GOLDEN.parent.mkdir(exist_ok=True)
            GOLDEN.write_text(json.dumps(RECORDED, indent=1, sort_keys=True) + "\n")
        pytest.skip("recorded (TTS_UPDATE_GOLDEN or no golden file): run again to compare")
    assert seen == golden[name]


def test_every_case_was_recorded(golden: dict[str, Any]) -> None:
    if not golden:
        pytest.skip("recording")
    assert sorted(golden) == sorted(CASES)
