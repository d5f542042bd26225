"""The `vllm` backend against a fake pooling server (tests/support/fake_pooling.py): rendering,
batching by token budget, vLLM's answers mapped to 400 / 503, tokens and parameters. The same
backend against a real vLLM serving a tiny PRM: tests/prm_worker/test_vllm_real.py."""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_pooling import TAG, FakePoolingVLLM, Fault, encode, p_good, render
from tests.support.prm_app import serve
from tests.support.tiny_prm import build_tiny_qwen2_prm
from tts_server.clients.http import RetryPolicy
from tts_server.clients.prm import HTTPPRMClient, PRMError
from tts_server.prm_worker import create_app, load_backend
from tts_server.prm_worker.__main__ import main as worker_main
from tts_server.prm_worker.backends import (
    BackendError,
    BackendUnavailable,
    ItemsRejected,
    vllm_http,
)
from tts_server.prm_worker.backends.formats import QWEN_MATH_PRM
from tts_server.prm_worker.backends.vllm import VLLMBackend
from tts_server.settings import Settings
from tts_server.types import PRMUsage

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.", "He buys 4 more: 3 + 4 = 7.", "The answer is \\boxed{7}."]


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_http, "BACKOFF_S", 0.001)


def backend_on(fake: FakePoolingVLLM, **options: Any) -> VLLMBackend:
    return VLLMBackend("http://vllm", fake.model, transport=fake.transport(), **options)


def expected(item: tuple[str, list[str]]) -> list[float]:
    """What the fake answers for `item` rendered as the family's conversation."""
    ids = encode(render(QWEN_MATH_PRM.messages(item)))
    return [p_good(ids, k) for k, t in enumerate(ids) if t == encode(TAG)[0]]


def worker(backend: VLLMBackend) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return serve(create_app(backend, batch_wait_s=0.05))


# --- rendering ---


def test_the_family_format() -> None:
    messages = QWEN_MATH_PRM.messages((f"Q{TAG}?", ["  a  ", "", f"b{TAG}c"]))
    assert messages == [
        {"role": "system", "content": QWEN_MATH_PRM.system_prompt},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": f"a{TAG}{TAG}bc{TAG}"},
    ]


def test_a_tag_in_a_step_is_stripped_even_when_stripping_would_reassemble_one() -> None:
    sneaky = "<extra_<extra_0>0>"
    assert sneaky.replace(TAG, "") == TAG  # one pass is not enough
    assert QWEN_MATH_PRM.strip_tags(sneaky) == ""
    content = QWEN_MATH_PRM.messages(("q", [f"x {sneaky} y", TAG]))[2]["content"]
    assert content.count(TAG) == 2


def test_k_steps_get_k_scores_from_the_rendered_conversation() -> None:
    fake = FakePoolingVLLM()
    backend = backend_on(fake)
    items = [(QUESTION, STEPS), ("Short?", ["Yes."]), (QUESTION, [*STEPS, "Check: 7 - 4 = 3."])]
    scores = backend.score_batch(items)
    assert scores == [expected(item) for item in items]
    assert [len(row) for row in scores] == [3, 1, 4]
    # One /pooling request with the token ids vLLM's /tokenize gave for each conversation.
    [inputs] = fake.pooled()
    assert inputs == [encode(render(QWEN_MATH_PRM.messages(item))) for item in items]
    tokenized = [body for path, body in fake.calls if path == "/tokenize" and "messages" in body]
    assert all(b["add_generation_prompt"] is False for b in tokenized) and len(tokenized) == 3


def test_tag_inside_a_step_empty_steps_and_a_step_that_is_only_a_tag() -> None:
    fake = FakePoolingVLLM()
    backend = backend_on(fake)
    steps = [f"a {TAG} b", "", TAG, "   ", "<extra_<extra_0>0>done"]
    [scores] = backend.score_batch([(f"q {TAG}", steps)])
    assert len(scores) == len(steps)
    assert scores == expected(("q ", ["a  b", "", "", "", "done"]))


def test_a_local_tokenizer_renders_without_tokenize_calls(tmp_path: Path) -> None:
    folder = build_tiny_qwen2_prm(tmp_path / "tiny")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    fake = FakePoolingVLLM(tag_id=tokenizer.convert_tokens_to_ids(TAG))
    backend = backend_on(fake, tokenizer=str(folder))
    [scores] = backend.score_batch([(QUESTION, STEPS)])
    assert len(scores) == 3
    assert not [c for c in fake.calls if c[0] == "/tokenize"]
    text = QWEN_MATH_PRM.render(tokenizer, (QUESTION, STEPS))  # the hf backend's rendering
    assert fake.pooled() == [[tokenizer(text, add_special_tokens=False)["input_ids"]]]
    # Its config.json is local: the parameter count comes from it.
    assert backend.parameters is not None and backend.parameters > 0


def test_a_local_tokenizer_without_the_tag_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot load a tokenizer"):
        backend_on(FakePoolingVLLM(), tokenizer=str(tmp_path))
    smollm2 = Settings().embedded_model_dir  # a chat tokenizer, but no <extra_0>
    with pytest.raises(BackendError, match="has no <extra_0> token"):
        backend_on(FakePoolingVLLM(), tokenizer=str(smollm2))


# --- batching ---


def test_requests_are_bounded_by_the_token_budget() -> None:
    fake = FakePoolingVLLM(max_model_len=2000)
    items = [(f"Question {i}?", ["x" * (20 * (i % 3) + 1)]) for i in range(8)]
    lengths = [len(encode(render(QWEN_MATH_PRM.messages(item)))) for item in items]
    budget = max(lengths) * 3
    scores = backend_on(fake, max_batch_tokens=budget).score_batch(items)
    assert scores == [expected(item) for item in items]
    sent = fake.pooled()
    assert len(sent) > 1 and all(sum(map(len, request)) <= budget for request in sent)
    assert [ids for request in sent for ids in request] == [
        encode(render(QWEN_MATH_PRM.messages(item))) for item in items
    ]


def test_a_solution_over_the_budget_but_within_the_context_goes_alone() -> None:
    fake = FakePoolingVLLM(max_model_len=1000)
    items = [("q", ["short"]), ("q", ["long " * 50]), ("q", ["short too"])]
    backend_on(fake, max_batch_tokens=120).score_batch(items)
    assert [len(request) for request in fake.pooled()] == [1, 1, 1]


# --- vLLM's answers ---


def test_an_over_long_solution_is_rejected_before_sending_never_cut() -> None:
    fake = FakePoolingVLLM(max_model_len=300)
    items = [(QUESTION, STEPS), (QUESTION, ["word " * 100]), ("Short?", ["Yes."])]
    with pytest.raises(ItemsRejected) as caught:
        backend_on(fake).score_batch(items)
    [(index, reason)] = caught.value.reasons.items()
    assert index == 1 and "over the PRM's context of 300 tokens" in reason
    assert "not truncated" in reason
    assert caught.value.scores == [expected(items[0]), [], expected(items[2])]
    assert len(fake.pooled()) == 1 and len(fake.pooled()[0]) == 2  # the long one never sent


async def test_the_worker_answers_400_for_the_request_with_the_long_solution_only() -> None:
    fake = FakePoolingVLLM(max_model_len=300)
    async with worker(backend_on(fake)) as client:
        long_request = {"question": "q", "solutions": [["ok"], ["word " * 100]]}
        fine_request = {"question": QUESTION, "solutions": [STEPS]}
        bad, good = await asyncio.gather(
            client.post("/v1/score", json=long_request), client.post("/v1/score", json=fine_request)
        )
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["param"] == "solutions.1" and "over the PRM's context" in error["message"]
    assert error["code"] == "context_length_exceeded"  # the gateway tells its client
    assert good.status_code == 200 and good.json()["scores"] == [expected((QUESTION, STEPS))]
    assert len(fake.pooled()) == 1  # both requests went in one batch; the long one not sent


def test_a_4xx_rejects_only_the_solutions_vllm_refuses() -> None:
    poison = encode("poison")
    fake = FakePoolingVLLM(
        refuse=lambda ids: "Token id 99999 is out of vocabulary" if _contains(ids, poison) else None
    )
    items = [(QUESTION, STEPS), ("q", ["poison"]), ("Short?", ["Yes."])]
    with pytest.raises(ItemsRejected) as caught:
        backend_on(fake).score_batch(items)
    assert caught.value.reasons == {
        1: "the PRM's vLLM server refused it (HTTP 400: Token id 99999 is out of vocabulary)"
    }
    assert caught.value.scores == [expected(items[0]), [], expected(items[2])]


async def test_a_4xx_is_a_400_naming_vllms_reason_through_the_worker() -> None:
    fake = FakePoolingVLLM(refuse=lambda ids: "Unsupported task: 'token_classify'")
    async with worker(backend_on(fake)) as client:
        response = await client.post("/v1/score", json={"question": "q", "solutions": [["a"]]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] is None  # not the client's max_tokens: ours
    assert response.json()["error"]["message"] == (
        "solution 0: the PRM's vLLM server refused it "
        "(HTTP 400: Unsupported task: 'token_classify')"
    )


@pytest.mark.parametrize(
    "fault", [503, 500, httpx.ReadTimeout("slow"), httpx.ConnectError("refused")]
)
def test_timeouts_5xx_and_connection_errors_are_retried(fault: Fault) -> None:
    fake = FakePoolingVLLM(faults={"/pooling": [fault, fault]})
    assert backend_on(fake, retries=2).score_batch([(QUESTION, STEPS)]) == [
        expected((QUESTION, STEPS))
    ]
    assert fake.faults["/pooling"] == []


def test_then_the_backend_is_unavailable() -> None:
    fake = FakePoolingVLLM(faults={"/pooling": [httpx.ReadTimeout("slow")] * 3})
    with pytest.raises(BackendUnavailable, match=r"/pooling: no answer within 7 s \(3 attempts\)"):
        backend_on(fake, retries=2, timeout_s=7).score_batch([(QUESTION, STEPS)])


async def test_an_unavailable_vllm_is_a_503_and_a_down_health_for_the_gateway() -> None:
    fake = FakePoolingVLLM()
    backend = backend_on(fake, retries=1)
    async with worker(backend) as client:
        assert (await client.get("/health")).status_code == 200
        fake.down = True
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        response = await client.post("/v1/score", json={"question": "q", "solutions": [["a"]]})
        assert response.status_code == 503
        assert "unavailable" in response.json()["error"]["message"]
        # The gateway's client: retries the 503, then fails as a PRM error; its probe says down.
        prm = HTTPPRMClient("http://worker", client=client, retry=RetryPolicy(1, 0.001, 0.001))
        with pytest.raises(PRMError) as caught:
            await prm.score("q", [["a"]], PRMUsage())
        assert caught.value.upstream_status == 503
        assert not await prm.health()
        fake.down = False
        assert await prm.health()
        assert await prm.score("q", [["a"]], PRMUsage()) == [expected(("q", ["a"]))]


def test_a_worker_started_before_vllm_scores_once_it_is_up() -> None:
    fake = FakePoolingVLLM(down=True)
    backend = backend_on(fake, retries=0)
    assert not backend.healthy() and backend.parameters is None
    with pytest.raises(BackendUnavailable, match="unreachable"):
        backend.score_batch([(QUESTION, STEPS)])
    fake.down = False
    assert backend.healthy()
    assert backend.score_batch([(QUESTION, STEPS)]) == [expected((QUESTION, STEPS))]


def test_a_model_vllm_does_not_serve_is_unavailable_naming_what_it_serves() -> None:
    fake = FakePoolingVLLM()
    backend = VLLMBackend("http://vllm", "other-prm", transport=fake.transport())
    assert not backend.healthy()
    with pytest.raises(BackendUnavailable, match=r"vLLM serves \['fake-prm'\], not 'other-prm'"):
        backend.score_batch([(QUESTION, STEPS)])


def test_a_pooler_without_the_step_tag_is_an_error_not_wrong_scores() -> None:
    """vLLM without `step_tag_id` answers a row per token: the count check names the fix."""
    fake = FakePoolingVLLM(every_token=True)
    with pytest.raises(RuntimeError, match="step_tag_id 3"):
        backend_on(fake).score_batch([(QUESTION, STEPS)])


# --- tokens and parameters ---


def test_tokens_are_those_vllm_reports_shared_by_length() -> None:
    fake = FakePoolingVLLM()
    backend = backend_on(fake)
    items = [(QUESTION, STEPS), ("Short?", ["Yes."])]
    backend.score_batch(items)
    lengths = [len(ids) for ids in fake.pooled()[0]]
    assert [backend.count_tokens(item) for item in items] == lengths
    fake.usage_offset = 10  # a server counting more than was sent: its count wins
    backend.score_batch(items)
    counted = [backend.count_tokens(item) for item in items]
    assert sum(counted) == sum(lengths) + 10 and counted[0] > counted[1]


async def test_the_worker_reports_vllms_tokens() -> None:
    fake = FakePoolingVLLM()
    async with worker(backend_on(fake)) as client:
        body = {"question": QUESTION, "solutions": [STEPS, STEPS[:1]]}
        response = (await client.post("/v1/score", json=body)).json()
    assert response["tokens"] == sum(len(ids) for ids in fake.pooled()[0])


def test_parameters_from_the_config_of_a_local_model_folder(tmp_path: Path) -> None:
    config = {
        "architectures": ["Qwen2ForProcessRewardModel"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    local = backend_on(FakePoolingVLLM(root=str(tmp_path)))
    # Per layer: q 64x64+64, k and v 64x32+32 each, o 64x64, MLP 3x64x128, 2 norms of 64;
    # then the final norm and the head Linear(64, 64) + ReLU + Linear(64, 2) (no vocabulary).
    per_layer = 64 * 64 + 64 + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert local.parameters == 2 * per_layer + 64 + (64 * 64 + 64 + 64 * 2 + 2)
    assert backend_on(FakePoolingVLLM(root="Qwen/Qwen2.5-Math-PRM-7B")).parameters is None


# --- building it ---


def test_options_are_checked() -> None:
    assert isinstance(load_backend("vllm", url="http://127.0.0.1:9", model="m"), VLLMBackend)
    with pytest.raises(BackendError, match="http"):
        load_backend("vllm", url="127.0.0.1:9", model="m")
    with pytest.raises(BackendError, match="max_batch_tokens"):
        load_backend("vllm", url="http://127.0.0.1:9", model="m", max_batch_tokens=0)
    with pytest.raises(BackendError, match="bad options"):
        load_backend("vllm", url="http://127.0.0.1:9", model="m", device="cpu")


def test_the_worker_cli_needs_the_url_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--backend", "vllm", "--model", "m"]) == 2
    assert "needs --vllm-url and --model" in capsys.readouterr().err


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))
