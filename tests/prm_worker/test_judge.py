"""The `judge` backend against the fake vLLM's one-token chat completions with logprobs
(tests/support/fake_vllm.py), served by a real uvicorn on loopback: scores from the logprobs, the
calls per mode, errors through the worker app, tokens, health. Against a real vLLM:
tests/prm_worker/test_judge_real.py."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_vllm import FakeVLLM, render_chat
from tests.support.faults import Faulty, ThreadServer
from tests.support.prm_app import serve
from tts_server.prm_worker import create_app, load_backend, metrics
from tts_server.prm_worker.__main__ import main as worker_main
from tts_server.prm_worker.backends import BackendError, BackendUnavailable, vllm_http
from tts_server.prm_worker.backends.judge import JudgeBackend, yes_probability

MODEL = "judge-model"
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.", "He buys 4 more: 3 + 4 = 9.", "The answer is \\boxed{9}."]


def p_yes(prompt: str) -> float:
    """The fake judge's belief about the last step shown: a 9 in it is probably wrong."""
    last = re.findall(r"Step \d+: ([^\n<]*)", prompt)[-1]
    return 0.2 if "9" in last else 0.8


def verdict(prompt: str) -> list[tuple[str, float]]:
    """Candidates in which yes and no each come in two spellings, plus unrelated tokens."""
    p = p_yes(prompt)
    candidates = [
        (" Yes", math.log(0.6 * p)),
        ("yes", math.log(0.3 * p)),
        ("No", math.log(0.6 * (1 - p))),
        (" NO.", math.log(0.3 * (1 - p))),
        ("Step", math.log(0.05)),
        ("Yesterday", math.log(0.04)),
    ]
    return sorted(candidates, key=lambda c: -c[1])


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_http, "BACKOFF_S", 0.001)


@contextmanager
def endpoint(fake: FakeVLLM, path: str = "/v1/chat/completions") -> Iterator[tuple[str, Faulty]]:
    """`fake` served on 127.0.0.1, `path` behind a fault injector."""
    faulty = Faulty(fake.app(), path)
    with ThreadServer(faulty) as server:
        yield server.url, faulty


@contextmanager
def judge_on(fake: FakeVLLM, **options: Any) -> Iterator[tuple[JudgeBackend, Faulty]]:
    with endpoint(fake) as (url, faulty):
        backend = JudgeBackend(url, fake.model, **options)
        try:
            yield backend, faulty
        finally:
            backend.close()


def fake_judge(**options: Any) -> FakeVLLM:
    return FakeVLLM(script=lambda prompt, sample: "", model=MODEL, judge=verdict, **options)


def prompts(fake: FakeVLLM) -> list[str]:
    return [call["messages"][0]["content"] for call in fake.chat_calls]


def worker(backend: JudgeBackend) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return serve(create_app(backend, batch_wait_s=0.05))


# --- reading the logprobs ---


def test_yes_and_no_variants_are_summed_and_other_tokens_ignored() -> None:
    candidates = [
        (" Yes", math.log(0.3)),
        ("yes", math.log(0.1)),
        ("YES!", math.log(0.05)),
        ("No", math.log(0.1)),
        ("\u0120no", math.log(0.05)),  # a BPE space marker
        ("Yesterday", math.log(0.2)),
        ("Not", math.log(0.1)),
        ("Y", math.log(0.1)),
    ]
    assert yes_probability(candidates) == pytest.approx(0.45 / 0.6)
    assert yes_probability([("No", -0.1), ("no", -9999.0)]) == pytest.approx(0.0, abs=1e-9)
    assert yes_probability([("Step", -0.1), ("The", -1.0)]) is None
    assert yes_probability([]) is None
    assert yes_probability([("yes", float("nan")), ("no", -1.0)]) == 0.0


# --- the calls per mode ---


def test_step_mode_asks_once_per_step_showing_the_steps_so_far() -> None:
    fake = fake_judge()
    with judge_on(fake, top_logprobs=6, memo_size=0) as (backend, _):
        items = [(QUESTION, STEPS), ("What is 2 + 2?", ["2 + 2 = 4."])]
        scores = backend.score_batch(items)
    assert len(fake.chat_calls) == 4
    assert all(
        (c["max_tokens"], c["temperature"], c["logprobs"], c["top_logprobs"]) == (1, 0, True, 6)
        for c in fake.chat_calls
    )
    asked = sorted(prompts(fake))
    shown = [(q, steps[:k]) for q, steps in items for k in range(1, len(steps) + 1)]
    assert asked == sorted(backend.prompt(q, steps) for q, steps in shown)
    step_two = backend.prompt(QUESTION, STEPS[:2])
    assert "Step 1: Tom starts" in step_two and "Step 3" not in step_two
    assert step_two.endswith("Is step 2 correct? Answer yes or no.")
    # The score is the fake's P(yes), recovered from both spellings of each word.
    assert scores == [pytest.approx([0.8, 0.2, 0.2]), pytest.approx([0.8])]


def test_solution_mode_asks_once_and_gives_every_step_that_score() -> None:
    fake = fake_judge()
    with judge_on(fake, judge_mode="solution") as (backend, _):
        scores = backend.score_batch([(QUESTION, STEPS), (QUESTION, STEPS[:1])])
    assert len(fake.chat_calls) == 2
    assert scores == [pytest.approx([0.2] * 3), pytest.approx([0.8])]
    whole = backend.prompt(QUESTION, STEPS)
    assert whole in prompts(fake) and whole.endswith("Is the solution correct? Answer yes or no.")


def test_a_prompt_is_asked_once_per_batch_and_remembered_across_batches() -> None:
    fake = fake_judge()
    with judge_on(fake) as (backend, _):
        first = backend.score_batch([(QUESTION, STEPS[:2]), (QUESTION, STEPS[:2])])
        assert len(fake.chat_calls) == 2 and first[0] == first[1]
        # The solution grown by a step: only the new step is asked about.
        grown = backend.score_batch([(QUESTION, STEPS)])
        assert len(fake.chat_calls) == 3 and grown[0][:2] == first[0]
        assert prompts(fake)[-1] == backend.prompt(QUESTION, STEPS)


def test_memo_off_asks_again() -> None:
    fake = fake_judge()
    with judge_on(fake, memo_size=0) as (backend, _):
        backend.score_batch([(QUESTION, STEPS[:2])])
        backend.score_batch([(QUESTION, STEPS)])
    assert len(fake.chat_calls) == 5


# --- the fallback ---


def test_neither_word_in_the_top_k_scores_the_fallback_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ranked = [("Step", -0.5), ("The", -1.0), ("Yes", -2.0), ("No", -3.0)]
    fake = FakeVLLM(script=lambda p, s: "", model=MODEL, judge=lambda prompt: ranked)
    before = metrics.REGISTRY.get_sample_value("prm_judge_fallbacks_total") or 0.0
    with (
        caplog.at_level(logging.WARNING, "tts_server.prm_worker"),
        judge_on(fake, top_logprobs=2, fallback=0.4) as (backend, _),
    ):
        assert backend.score_batch([(QUESTION, STEPS)]) == [[0.4, 0.4, 0.4]]
    after = metrics.REGISTRY.get_sample_value("prm_judge_fallbacks_total") or 0.0
    assert after - before == 3
    warnings = [r for r in caplog.records if "neither yes nor no" in r.getMessage()]
    assert len(warnings) == 1
    # With the top 4, the same answers are read.
    with judge_on(fake, top_logprobs=4) as (backend, _):
        [row] = backend.score_batch([(QUESTION, STEPS)])
    assert row == [pytest.approx(math.exp(-2) / (math.exp(-2) + math.exp(-3)))] * 3


# --- errors, through the real worker app ---


async def test_a_4xx_is_a_400_naming_the_solution_and_the_step() -> None:
    fake = fake_judge(max_model_len=320)
    with judge_on(fake) as (backend, _):
        async with worker(backend) as client:
            long_request = {"question": QUESTION, "solutions": [STEPS, [STEPS[0], "x " * 150]]}
            fine_request = {"question": QUESTION, "solutions": [STEPS[:1]]}
            bad, good = await asyncio.gather(
                client.post("/v1/score", json=long_request),
                client.post("/v1/score", json=fine_request),
            )
            health = await client.get("/health")
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["param"] == "solutions.1"
    assert error["message"] == (
        "solution 1: the judge endpoint refused step 2 "
        "(HTTP 400: This model's maximum context length is 320 tokens.)"
    )
    assert good.status_code == 200 and len(good.json()["scores"][0]) == 1
    assert health.status_code == 200


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retried_then_a_503(status: int) -> None:
    fake = fake_judge()
    with judge_on(fake, retries=1) as (backend, faulty):
        faulty.mode, faulty.status = "status", status
        async with worker(backend) as client:
            body = {"question": QUESTION, "solutions": [STEPS[:1]]}
            response = await client.post("/v1/score", json=body)
            assert response.status_code == 503, response.text
            message = response.json()["error"]["message"]
            assert message.startswith("the PRM backend is unavailable: the judge endpoint failed")
            assert f"HTTP {status} (2 attempts)" in message
            assert faulty.calls == 2  # the call and its retry
            faulty.times, faulty.calls = 1, 0  # one 5xx, then answers: the retry scores it
            again = await client.post("/v1/score", json=body)
            assert again.status_code == 200 and again.json()["scores"] == [[pytest.approx(0.8)]]
            assert faulty.calls == 2


def test_a_timeout_is_unavailable_after_the_retries() -> None:
    fake = fake_judge()
    with judge_on(fake, retries=1, timeout_s=0.2) as (backend, faulty):
        faulty.mode = "hang"
        with pytest.raises(BackendUnavailable, match=r"no answer within 0.2 s \(2 attempts\)"):
            backend.score_batch([(QUESTION, STEPS)])


def test_health_follows_the_endpoint_listing_the_model() -> None:
    fake = fake_judge()
    with endpoint(fake) as (url, _):
        backend = JudgeBackend(url, MODEL)
        other = JudgeBackend(url, "another-model", retries=0)
        assert backend.healthy() and not other.healthy()
        with pytest.raises(BackendUnavailable, match=r"serves \['judge-model'\], not 'another"):
            other.score_batch([(QUESTION, STEPS)])
        assert backend.parameters is None  # its root is not a folder here
    assert not backend.healthy()  # the endpoint is gone
    for made in (backend, other):
        made.close()


def test_parameters_from_a_local_model_folder(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with judge_on(fake_judge(root=str(tmp_path))) as (backend, _):
        assert backend.parameters is not None and backend.parameters > 2 * 64 * 128 * 3


# --- tokens ---


def test_tokens_are_what_the_endpoint_reports_each_prompt_counted_once() -> None:
    fake = fake_judge()
    with judge_on(fake) as (backend, _):
        items = [(QUESTION, STEPS), (QUESTION, STEPS[:2]), ("Other?", ["x"])]
        backend.score_batch(items)
        counted = [backend.count_tokens(item) for item in items]
    used = fake.counters["prompt"] + fake.counters["generation"]
    assert sum(counted) == used and len(fake.chat_calls) == 4

    def tokens(question: str, steps: list[str]) -> int:  # the fake: a character is a token
        return len(render_chat([{"role": "user", "content": backend.prompt(question, steps)}])) + 1

    assert counted == [
        sum(tokens(QUESTION, STEPS[:k]) for k in (1, 2, 3)),
        0,
        tokens("Other?", ["x"]),
    ]


async def test_the_worker_reports_the_endpoints_tokens() -> None:
    fake = fake_judge()
    with judge_on(fake) as (backend, _):
        async with worker(backend) as client:
            body = {"question": QUESTION, "solutions": [STEPS, ["Other."]]}
            response = (await client.post("/v1/score", json=body)).json()
            again = (await client.post("/v1/score", json=body)).json()
    assert response["tokens"] == fake.counters["prompt"] + fake.counters["generation"] > 0
    assert again["tokens"] == 0 and again["steps_cached"] == 4


# --- building it ---


def test_options_and_template_are_checked(tmp_path: Path) -> None:
    made = load_backend("judge", judge_url="http://127.0.0.1:9", model="m", retries=0)
    assert isinstance(made, JudgeBackend) and made.mode == "step"
    with pytest.raises(BackendError, match="http"):
        load_backend("judge", judge_url="127.0.0.1:9", model="m")
    with pytest.raises(BackendError, match="step or solution"):
        load_backend("judge", judge_url="http://127.0.0.1:9", model="m", judge_mode="steps")
    with pytest.raises(BackendError, match="bad options"):
        load_backend("judge", judge_url="http://127.0.0.1:9", model="m", url="http://x")
    bad = tmp_path / "bad.txt"
    bad.write_text("{question} {answer}")
    with pytest.raises(BackendError, match="must use"):
        load_backend("judge", judge_url="http://127.0.0.1:9", model="m", judge_template=str(bad))
    with pytest.raises(BackendError, match="cannot read"):
        load_backend("judge", judge_url="http://127.0.0.1:9", model="m", judge_template="/nope")


def test_a_template_file_words_the_prompt(tmp_path: Path) -> None:
    template = tmp_path / "judge.txt"
    template.write_text("Q: {question}\n{steps}\nIs {{step}} {last} right? yes/no")
    fake = fake_judge()
    with judge_on(fake, judge_template=str(template)) as (backend, _):
        backend.score_batch([("2 + 2?", ["2 + 2 = 4.", "So 4."])])
    assert sorted(prompts(fake)) == [
        "Q: 2 + 2?\nStep 1: 2 + 2 = 4.\nIs {step} 1 right? yes/no",
        "Q: 2 + 2?\nStep 1: 2 + 2 = 4.\nStep 2: So 4.\nIs {step} 2 right? yes/no",
    ]


def test_an_answer_without_logprobs_is_an_error_not_a_score(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An endpoint that ignores `logprobs` (the fake answers none when not asked)."""
    with judge_on(fake_judge()) as (backend, _):
        original = backend._server.post

        def without_logprobs(path: str, body: dict[str, Any], *, probe: bool = False) -> Any:
            return original(path, {**body, "logprobs": False}, probe=probe)

        monkeypatch.setattr(backend._server, "post", without_logprobs)
        with pytest.raises(ValueError, match="without the token's logprobs"):
            backend.score_batch([(QUESTION, STEPS[:1])])


def test_the_worker_cli_needs_the_url_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--backend", "judge", "--model", "m"]) == 2
    assert "needs --judge-url and --model" in capsys.readouterr().err


def test_tts_server_prm_worker_judges_with_the_policy_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`TTS_PRM_BACKEND=judge tts-server up` needs nothing more: the policy judges its steps."""
    from tts_server import cli

    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append(argv))
    for name in ("PRM_PORT", "POLICY_MODEL", "PRM_MODEL_PATH", "PRM_JUDGE_TOP_LOGPROBS"):
        monkeypatch.delenv(f"TTS_{name}", raising=False)
    monkeypatch.setenv("TTS_POLICY_URL", "http://127.0.0.1:8100")
    monkeypatch.setenv("TTS_PRM_BACKEND", "judge")
    cli.main(["prm-worker"])
    monkeypatch.setenv("TTS_PRM_JUDGE_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("TTS_PRM_JUDGE_MODE", "solution")
    cli.main(["prm-worker", "--model", "other", "--top-logprobs", "5"])
    default, told = (argv[argv.index("--backend") :] for argv in execs)
    assert default == [
        *("--backend", "judge", "--host", "127.0.0.1", "--port", "8200"),
        *("--model", "SmolLM2-135M-Instruct", "--judge-url", "http://127.0.0.1:8100"),
    ]
    assert told[told.index("--model") :] == [
        *("--model", "other", "--judge-url", "http://127.0.0.1:9000"),
        *("--judge-mode", "solution", "--top-logprobs", "5"),
    ]


def test_the_memo_forgets_the_least_recently_used_prompt() -> None:
    fake = fake_judge()
    with judge_on(fake, judge_mode="solution", memo_size=2) as (backend, _):
        a, b, c = ((f"Q{n}?", ["x"]) for n in range(3))
        for item in (a, b, a, c):  # a used again, so b is the one c pushes out
            backend.score_batch([item])
        asked = len(fake.chat_calls)
        backend.score_batch([a])
        assert len(fake.chat_calls) == asked == 3
        backend.score_batch([b])
        assert len(fake.chat_calls) == 4


def test_steps_given_as_context_are_not_asked_about() -> None:
    """The worker passes the steps a search has scores for as context: a judge, which pays per
    step, asks only about the others (step mode); solution mode still judges the whole."""
    fake = fake_judge()
    other = ("What is 2 + 2?", ["2 + 2 = 4."])
    with judge_on(fake, memo_size=0) as (backend, _):
        tails = backend.score_tails([(QUESTION, STEPS), other], [2, 0])
        wanted = sorted([backend.prompt(QUESTION, STEPS), backend.prompt(*other)])
    assert sorted(prompts(fake)) == wanted  # step 3 of the first, the step of the other
    assert tails == [pytest.approx([0.2]), pytest.approx([0.8])]
    whole = fake_judge()
    with judge_on(whole, judge_mode="solution") as (backend, _):
        assert backend.score_tails([(QUESTION, STEPS)], [1]) == [pytest.approx([0.2, 0.2])]
    assert len(whole.chat_calls) == 1


def test_tokens_leave_out_what_the_endpoints_prefix_cache_served() -> None:
    fake = fake_judge()
    fake.cached_tokens = 10
    with judge_on(fake) as (backend, _):
        item = (QUESTION, STEPS)
        backend.score_batch([item])
        counted = backend.count_tokens(item)
    assert fake.counters["cached"] == 30  # 10 for each of the 3 prompts
    assert counted == fake.counters["prompt"] - 30 + fake.counters["generation"]
