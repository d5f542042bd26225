"""The `hf` backend on a tiny random-weight Qwen2 token-classification PRM (built locally)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.tiny_prm import build_tiny_qwen2_prm
from tts_server.prm_worker import create_app, load_backend
from tts_server.prm_worker.backends import BackendError
from tts_server.prm_worker.backends.hf import STEP_TAG, SYSTEM_PROMPT, HFBackend, step_logits

try:
    import torch
except ImportError:  # failed below, not skipped: a skip went unseen in `make test-unit`
    torch = None


@pytest.fixture(scope="session", autouse=True)
def _needs_torch() -> None:
    if torch is None:
        pytest.fail("torch is not installed: the hf backend tests need it (make install-gateway)")


QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.", "He buys 4 more: 3 + 4 = 7.", "The answer is \\boxed{7}."]


@pytest.fixture(scope="session")
def tiny_prm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_prm(tmp_path_factory.mktemp("tiny-qwen2-prm"))


@pytest.fixture(scope="session")
def backend(tiny_prm_dir: Path) -> Iterator[HFBackend]:
    loaded = load_backend("hf", model=str(tiny_prm_dir), device="cpu")
    assert isinstance(loaded, HFBackend)
    yield loaded


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


def test_one_score_per_step_in_the_open_unit_interval(backend: HFBackend) -> None:
    assert backend.name == "hf"
    assert backend.model_name.startswith("tiny-qwen2-prm")
    [scores] = backend.score_batch([(QUESTION, STEPS)])
    assert len(scores) == len(STEPS)
    assert all(0.0 < s < 1.0 for s in scores)
    # Random weights still give different scores at different positions.
    assert len(set(scores)) > 1


def test_deterministic(backend: HFBackend) -> None:
    first = backend.score_batch([(QUESTION, STEPS)])
    assert backend.score_batch([(QUESTION, STEPS)]) == first


def test_batch_with_padding_equals_one_by_one(backend: HFBackend) -> None:
    items = [
        (QUESTION, STEPS),
        ("Short?", ["Yes."]),
        (QUESTION, [*STEPS, "Double-check: 7 - 4 = 3, right." * 5]),
        ("Another question entirely, quite a bit longer than the others " * 3, STEPS[:2]),
    ]
    batched = backend.score_batch(items)
    for item, scores in zip(items, batched, strict=True):
        [alone] = backend.score_batch([item])
        assert close(scores, alone), (scores, alone)


def test_small_internal_batches_give_the_same_scores(tiny_prm_dir: Path) -> None:
    items = [(QUESTION, STEPS[: k + 1]) for k in range(3)] + [("Why?", ["Because."])]
    one = HFBackend(str(tiny_prm_dir), batch_size=1).score_batch(items)
    many = HFBackend(str(tiny_prm_dir), batch_size=8).score_batch(items)
    assert all(close(a, b) for a, b in zip(one, many, strict=True))


def test_changing_a_step_leaves_earlier_scores_alone(backend: HFBackend) -> None:
    [base] = backend.score_batch([(QUESTION, STEPS)])
    changed_steps = [STEPS[0], "Something else entirely happens here.", STEPS[2]]
    [changed] = backend.score_batch([(QUESTION, changed_steps)])
    assert close(changed[:1], base[:1])
    assert not close(changed[1:], base[1:])
    # A prefix scores its steps as the whole solution does (a causal model).
    [prefix] = backend.score_batch([(QUESTION, STEPS[:2])])
    assert close(prefix, base[:2])


def test_step_tag_literals_in_the_text_are_removed(backend: HFBackend) -> None:
    steps = [f"a {STEP_TAG} b", f"{STEP_TAG}c"]
    [scores] = backend.score_batch([(f"q {STEP_TAG}", steps)])
    assert len(scores) == 2
    [clean] = backend.score_batch([("q ", ["a  b", "c"])])
    assert close(scores, clean)


def test_render_follows_the_qwen_prm_format(backend: HFBackend) -> None:
    text = backend.render((QUESTION, ["One. \n\n", "Two."]))
    assert SYSTEM_PROMPT in text and QUESTION in text
    assert f"One.{STEP_TAG}Two.{STEP_TAG}" in text
    assert text.count(STEP_TAG) == 2


def test_count_tokens_is_the_input_length(backend: HFBackend) -> None:
    tokens = backend.count_tokens((QUESTION, STEPS))
    # The byte-level tokenizer: one token per byte outside the special tokens.
    rendered = backend.render((QUESTION, STEPS))
    specials = ["<|im_start|>", "<|im_end|>", STEP_TAG]
    plain = rendered
    for special in specials:
        plain = plain.replace(special, "")
    expected = len(plain.encode()) + sum(rendered.count(s) for s in specials)
    assert tokens == expected


def test_step_logits_accepts_tuples_and_checks_the_shape() -> None:
    logits = torch.zeros(1, 4, 2)
    assert step_logits((logits,)) is logits
    with pytest.raises(RuntimeError, match="expected logits"):
        step_logits((torch.zeros(1, 4),))


def test_a_model_without_a_two_class_head_is_refused_at_load(
    tiny_prm_dir: Path, tmp_path: Path
) -> None:
    """Architectures other than *ForTokenClassification load through `AutoModel`; a bare
    Qwen2Model gives hidden states, not [batch, seq, 2] logits, and is refused at start."""
    headless = tmp_path / "headless"
    shutil.copytree(tiny_prm_dir, headless)
    config = json.loads((headless / "config.json").read_text())
    config["architectures"] = ["Qwen2Model"]
    (headless / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match=r"does not score steps.*expected logits"):
        HFBackend(str(headless))


def test_missing_model_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot load"):
        load_backend("hf", model=str(tmp_path / "nothing-here"))


async def test_worker_serves_the_hf_backend(backend: HFBackend) -> None:
    app = create_app(backend)
    solutions = [STEPS, STEPS[:1], []]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            response = await client.post(
                "/v1/score", json={"question": QUESTION, "solutions": solutions}
            )
    assert response.status_code == 200, response.text
    data = response.json()
    expected = backend.score_batch([(QUESTION, STEPS), (QUESTION, STEPS[:1])])
    assert close(data["scores"][0], expected[0]) and close(data["scores"][1], expected[1])
    assert data["scores"][2] == []
    assert data["tokens"] == sum(backend.count_tokens((QUESTION, s)) for s in solutions[:2])
    assert data["steps_scored"] == 4
