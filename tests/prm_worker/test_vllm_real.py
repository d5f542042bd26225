"""The `vllm` backend against a REAL vLLM CPU server serving a tiny random-weight PRM as a pooling
model (the session fixture `vllm_prm`, tests/conftest.py), and the PRM worker process on it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PoolingPRM
from tests.support.servers import ServerProcess, cli, free_port
from tts_server.prm_worker.backends import ItemsRejected
from tts_server.prm_worker.backends.formats import QWEN_MATH_PRM
from tts_server.prm_worker.backends.vllm import VLLMBackend

pytestmark = pytest.mark.integration

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.", "He buys 4 more: 3 + 4 = 7.", "The answer is \\boxed{7}."]
TAG = QWEN_MATH_PRM.step_tag


@pytest.fixture(scope="module")
def backend(vllm_prm: PoolingPRM) -> Iterator[VLLMBackend]:
    prm = vllm_prm
    print(f"\nvLLM PRM fixture: built in {prm.build_s:.1f} s, healthy {prm.start_s:.1f} s later")
    made = VLLMBackend(vllm_prm.url, vllm_prm.model)
    yield made
    made.close()


@pytest.fixture(scope="module")
def tokenizer(vllm_prm: PoolingPRM) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vllm_prm.folder)


def raw_pooling(prm: PoolingPRM, text: str) -> httpx.Response:
    body: dict[str, Any] = {"model": prm.model, "input": text, "task": "token_classify"}
    body["add_special_tokens"] = False  # the chat template has put them in
    return httpx.post(prm.url + "/pooling", json=body, timeout=60)


def raw_scores(prm: PoolingPRM, tokenizer: Any, item: tuple[str, list[str]]) -> list[float]:
    """P(good) of vLLM's own rows for the conversation rendered locally, sent as text."""
    response = raw_pooling(prm, QWEN_MATH_PRM.render(tokenizer, item))
    response.raise_for_status()
    [result] = response.json()["data"]
    return [row[1] for row in result["data"]]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


def prompt_tokens_counter(prm: PoolingPRM) -> float:
    text = httpx.get(prm.url + "/metrics", timeout=10).text
    name = re.escape(f'model_name="{prm.model}"')
    pattern = rf"^vllm:prompt_tokens_total\{{[^}}]*{name}[^}}]*\}} (\S+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
    assert values, "vLLM's /metrics has no vllm:prompt_tokens_total for the PRM"
    return sum(values)


def test_k_tags_in_k_scores_out_equal_to_vllms_own_rows(
    backend: VLLMBackend, vllm_prm: PoolingPRM, tokenizer: Any
) -> None:
    items = [(QUESTION, STEPS[:k]) for k in (1, 2, 3)]
    items.append((QUESTION, [*STEPS, "Check: 7 - 4 = 3.", "So 7.", "Done."]))
    scores = backend.score_batch(items)
    assert [len(row) for row in scores] == [1, 2, 3, 6]
    assert all(0.0 <= s <= 1.0 for row in scores for s in row)
    assert len({s for row in scores for s in row}) > 3  # random weights, but not constant
    for item, row in zip(items, scores, strict=True):
        assert close(row, raw_scores(vllm_prm, tokenizer, item)), item
    # A prefix scores the same steps the same: the PRM is causal.
    assert close(scores[3][:3], scores[2])
    # The local tokenizer renders and counts the same as vLLM's /tokenize.
    local = VLLMBackend(vllm_prm.url, vllm_prm.model, tokenizer=str(vllm_prm.folder))
    assert all(close(a, b) for a, b in zip(local.score_batch(items), scores, strict=True))


def test_a_tag_inside_a_step_is_not_a_separator(backend: VLLMBackend) -> None:
    tagged = [f"Tom starts {TAG}with 3 apples.", "He buys 4 more: <extra_<extra_0>0>3 + 4 = 7."]
    plain = ["Tom starts with 3 apples.", "He buys 4 more: 3 + 4 = 7."]
    scores, expected = backend.score_batch([(QUESTION, tagged), (QUESTION, plain)])
    assert len(scores) == 2 and close(scores, expected)


def test_an_empty_step_is_still_a_step(backend: VLLMBackend) -> None:
    [scores] = backend.score_batch([(QUESTION, ["Tom starts with 3 apples.", "", "   ", "7."])])
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)


def test_an_over_long_solution_is_rejected_not_cut(
    backend: VLLMBackend, vllm_prm: PoolingPRM, tokenizer: Any
) -> None:
    long_item = (QUESTION, ["Tom counts his apples once more. " * 100])
    with pytest.raises(ItemsRejected) as caught:
        backend.score_batch([(QUESTION, STEPS), long_item])
    assert list(caught.value.reasons) == [1]
    assert f"over the PRM's context of {vllm_prm.max_model_len} tokens" in caught.value.reasons[1]
    assert len(caught.value.scores[0]) == 3
    # vLLM itself refuses it too (it does not truncate unless asked).
    assert raw_pooling(vllm_prm, QWEN_MATH_PRM.render(tokenizer, long_item)).status_code == 400


def test_parameters_from_the_models_config(backend: VLLMBackend, vllm_prm: PoolingPRM) -> None:
    from safetensors import safe_open

    with safe_open(str(vllm_prm.folder / "model.safetensors"), "pt") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}  # noqa: SIM118
    count = sum(_numel(shape) for shape in shapes.values())
    assert backend.parameters == count - _numel(shapes["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def worker(vllm_prm: PoolingPRM, log_dir: Path) -> Iterator[str]:
    """`tts-server prm-worker --backend vllm` as its own process, in front of the PRM's vLLM."""
    port = free_port()
    options = ["--vllm-url", vllm_prm.url, "--model", vllm_prm.model, "--port", str(port)]
    argv = cli("prm-worker", "--backend", "vllm", *options)
    server = ServerProcess("prm-worker-vllm", argv, port, log_dir).start()
    try:
        server.wait_healthy(60)
        yield server.url
    finally:
        server.stop()


def test_the_worker_scores_end_to_end_and_counts_what_vllm_computed(
    worker: str, vllm_prm: PoolingPRM, backend: VLLMBackend
) -> None:
    health = httpx.get(worker + "/health", timeout=10).json()
    assert health == {"status": "ok", "backend": "vllm", "veto": None, "model": vllm_prm.model}
    [card] = httpx.get(worker + "/v1/models", timeout=10).json()["data"]
    assert card["parameters"] == backend.parameters
    solutions = [STEPS, STEPS[:2], ["Tom has 3.", "", "3 + 4 = 7, so \\boxed{7}."]]
    before = prompt_tokens_counter(vllm_prm)
    response = httpx.post(
        worker + "/v1/score", json={"question": QUESTION, "solutions": solutions}, timeout=60
    )
    after = prompt_tokens_counter(vllm_prm)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [len(row) for row in body["scores"]] == [3, 2, 3]
    assert body["steps_scored"] == 8 and body["steps_cached"] == 0
    assert body["tokens"] == after - before > 0
    assert body["scores"] == backend.score_batch([(QUESTION, s) for s in solutions])
    # The same solutions again: the worker's cache answers, vLLM computes nothing.
    again = httpx.post(
        worker + "/v1/score", json={"question": QUESTION, "solutions": solutions}, timeout=60
    ).json()
    assert again["tokens"] == 0 and again["steps_cached"] == 8
    # An over-long solution: 400 naming the context; the worker stays healthy.
    long_request = {"question": QUESTION, "solutions": [STEPS, ["apples " * 600]]}
    refused = httpx.post(worker + "/v1/score", json=long_request, timeout=60)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "solutions.1" and "context of 512 tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"
    assert httpx.get(worker + "/health", timeout=10).status_code == 200


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
