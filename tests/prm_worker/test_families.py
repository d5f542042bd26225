"""The `hf` backend on a tiny random-weight model of every registry family: one score per step
(stray tags and empty steps included), and the scored positions and scores equal a computation
written here from the family's reference code and the model's raw outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.tiny_families import (
    SHEPHERD_TAG,
    VALUE_HEAD,
    build_tiny_llama_prm,
    build_tiny_mistral_prm,
    build_tiny_skywork_prm,
)
from tests.support.tiny_prm import build_tiny_qwen2_prm
from tts_server.prm_worker.backends import BackendError, registry
from tts_server.prm_worker.backends.formats import QWEN_MATH_PRM
from tts_server.prm_worker.backends.hf import HFBackend
from tts_server.prm_worker.backends.vllm import VLLMBackend

torch = pytest.importorskip("torch")

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.", "", "He buys 4 more: 3 + 4 = 7.", "The answer is 7."]
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "qwen2.5-math-prm": build_tiny_qwen2_prm,
    "rlhflow-llama3.1-prm": build_tiny_llama_prm,
    "math-shepherd": build_tiny_mistral_prm,
    "skywork-o1-prm": build_tiny_skywork_prm,
}
# Per family, steps whose text holds the family's tag or turn markers, each still one step.
TAG_LIKE = {
    "qwen2.5-math-prm": ["a <extra_0> b", "<extra_<extra_0>0>", ""],
    "rlhflow-llama3.1-prm": ["3 + 4 - 1 = 6 +", "<|eot_id|><|start_header_id|>assistant", ""],
    "math-shepherd": ["3 ки 4", "кино ки\n ки", "", "ки"],
    "skywork-o1-prm": ["one\ntwo\n\nthree", "\n", ""],
}


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, HFBackend]:
    name: str = request.param
    folder = BUILDERS[name](tmp_path_factory.mktemp(name))
    backend = HFBackend(str(folder), family=registry.shipped().family(name))
    return name, folder, backend


def test_one_score_per_step_even_with_tag_like_text_and_empty_steps(
    family_backend: tuple[str, Path, HFBackend],
) -> None:
    name, _, backend = family_backend
    items = [(QUESTION, STEPS), (QUESTION, TAG_LIKE[name]), ("q", [""])]
    scores = backend.score_batch(items)
    assert [len(row) for row in scores] == [len(steps) for _, steps in items]
    assert all(0.0 < s < 1.0 for row in scores for s in row)
    assert len(set(scores[0])) > 1  # positions differ, so do random-weight scores


def test_positions_and_scores_match_the_reference_computation(
    family_backend: tuple[str, Path, HFBackend],
) -> None:
    name, folder, backend = family_backend
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = REFERENCES[name]
    for item in [(QUESTION, STEPS), ("Why?", ["Because."])]:
        ids, positions, scores = reference(folder, tokenizer, item)
        encoded = backend.encode(item)
        assert encoded.ids == ids
        assert encoded.positions == positions and len(positions) == len(item[1])
        [got] = backend.score_batch([item])
        assert _close(got, scores), (got, scores)


def test_a_batch_scores_as_one_by_one(family_backend: tuple[str, Path, HFBackend]) -> None:
    _, _, backend = family_backend
    items = [(QUESTION, STEPS), ("Short?", ["Yes."]), (QUESTION * 2, STEPS[:2])]
    batched = backend.score_batch(items)
    for item, row in zip(items, batched, strict=True):
        assert _close(row, backend.score_batch([item])[0])
    assert backend.count_tokens(items[1]) == len(backend.encode(items[1]).ids)


# --- the references, written from each family's model card / inference code ---


def _qwen(folder: Path, tokenizer: Any, item: tuple[str, list[str]]) -> tuple[Any, ...]:
    from transformers import AutoModelForTokenClassification

    question, steps = item
    messages = [
        {"role": "system", "content": QWEN_MATH_PRM.system_prompt},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tag = tokenizer.convert_tokens_to_ids("<extra_0>")
    positions = [i for i, t in enumerate(ids) if t == tag]
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return ids, positions, torch.softmax(logits[positions], dim=-1)[:, 1].tolist()


def _rlhflow(folder: Path, tokenizer: Any, item: tuple[str, list[str]]) -> tuple[Any, ...]:
    """prm_evaluate.py: the conversation grows a turn pair per step, scored at [-3] of each."""
    from transformers import AutoModelForCausalLM

    question, steps = item
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    plus, minus = tokenizer.encode("+")[-1], tokenizer.encode("-")[-1]
    conversation: list[dict[str, str]] = []
    positions, scores = [], []
    ids: list[int] = []
    for k, step in enumerate(steps):
        text = question + " " + step if k == 0 else step
        conversation += [{"role": "user", "content": text}, {"role": "assistant", "content": "+"}]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -3, [plus, minus]]
        positions.append(len(ids) - 3)
        scores.append(torch.softmax(logits, dim=-1)[0].item())
    return ids, positions, scores


def _shepherd(folder: Path, tokenizer: Any, item: tuple[str, list[str]]) -> tuple[Any, ...]:
    """The model card: question + " " + steps ending " ки" joined by "\\n", scored at the tag."""
    from transformers import AutoModelForCausalLM

    question, steps = item
    text = f"{question} " + "\n".join(f"{step} {SHEPHERD_TAG}" for step in steps)
    ids = tokenizer.encode(text)
    tag = tokenizer.encode(SHEPHERD_TAG)[-1]
    # The card's encode("+ -")[1:] (after Mistral's BOS): "▁+" and "▁-", the last ids of "+"
    # and "-" under Mistral's prefix space; this tokenizer has none, so take those directly.
    candidates = [tokenizer.encode("+")[-1], tokenizer.encode("-")[-1]]
    positions = [i for i, t in enumerate(ids) if t == tag]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0][:, candidates]
    return ids, positions, torch.softmax(logits, dim=-1)[positions, 0].tolist()


def _skywork(folder: Path, tokenizer: Any, item: tuple[str, list[str]]) -> tuple[Any, ...]:
    """io_utils.prepare_input + the value head on the causal LM's last hidden state."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    question, steps = item
    ids = tokenizer.encode(tokenizer.bos_token + question + "\n")
    newline = tokenizer.encode("\n")[-1]
    positions = []
    for step in steps:
        ids += (tokenizer.encode(step) if step else []) + [newline]
        positions.append(len(ids) - 1)
    weights = load_file(str(folder / "model.safetensors"))
    weight, bias = weights[f"{VALUE_HEAD}.weight"], weights[f"{VALUE_HEAD}.bias"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    values = hidden[positions] @ weight.T + bias
    return ids, positions, torch.sigmoid(values).squeeze(-1).tolist()


REFERENCES = {
    "qwen2.5-math-prm": _qwen,
    "rlhflow-llama3.1-prm": _rlhflow,
    "math-shepherd": _shepherd,
    "skywork-o1-prm": _skywork,
}


# --- which backend serves which family ---


def test_vllm_refuses_a_family_it_cannot_serve_naming_the_backends_that_can() -> None:
    skywork = registry.shipped().family("skywork-o1-prm")
    with pytest.raises(BackendError, match=r"vllm backend cannot serve the skywork-o1-prm.*hf"):
        VLLMBackend("http://127.0.0.1:9", "m", family=skywork)


def test_hf_refuses_a_family_not_marked_for_it(tmp_path: Path) -> None:
    text = registry.shipped_text().replace('backends = ["hf", "vllm"]', 'backends = ["vllm"]')
    qwen_vllm_only = registry.parse(text, "test").family("qwen2.5-math-prm")
    with pytest.raises(BackendError, match=r"hf backend cannot serve .*--backend vllm"):
        HFBackend(str(tmp_path), family=qwen_vllm_only)


def test_a_tokenizer_without_what_the_layout_needs_is_refused(tmp_path: Path) -> None:
    """The Qwen2.5-Math-PRM tiny folder loaded as other families: its byte-level tokenizer has
    no BOS token (Skywork's layout starts with it)."""
    folder = build_tiny_qwen2_prm(tmp_path / "qwen")
    with pytest.raises(BackendError, match="has no BOS token"):
        HFBackend(str(folder), family=registry.shipped().family("skywork-o1-prm"))
