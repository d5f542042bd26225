"""`hf`: a transformers PRM in the Qwen2.5-Math-PRM format.

The conversation is the family's (`formats.QWEN_MATH_PRM`: system prompt, user question, assistant =
every step followed by `<extra_0>`), rendered with the tokenizer's chat template. The model's
2-class head gives logits at every token; a step's score is P(class 1) (softmax) at its tag.
torch and transformers are imported only when an `HFBackend` is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tts_server.prm_worker.backends.base import BackendError, PRMBackend, ScoreItem
from tts_server.prm_worker.backends.formats import QWEN_MATH_PRM

STEP_TAG = QWEN_MATH_PRM.step_tag
SYSTEM_PROMPT = QWEN_MATH_PRM.system_prompt


class HFBackend(PRMBackend):
    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        batch_size: int = 8,
        dtype: str | None = None,
    ) -> None:
        import torch
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForTokenClassification,
            AutoTokenizer,
        )

        self._torch: Any = torch
        self.model_name = Path(model).name or model
        self.device = device
        self.batch_size = max(1, batch_size)
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(model)
            config: Any = AutoConfig.from_pretrained(model, trust_remote_code=True)
            kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)} if dtype else {}
            architectures: list[str] = list(getattr(config, "architectures", None) or [])
            if any(a.endswith("ForTokenClassification") for a in architectures):
                network: Any = AutoModelForTokenClassification.from_pretrained(model, **kwargs)
            else:
                network = AutoModel.from_pretrained(model, trust_remote_code=True, **kwargs)
        except (OSError, ValueError, AttributeError) as exc:
            raise BackendError(f"cannot load the PRM from {model!r}: {exc}") from exc
        tokenizer.padding_side = "right"  # positions then match the unpadded sequence
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tag_id = tokenizer.convert_tokens_to_ids(STEP_TAG)
        if not isinstance(tag_id, int) or tag_id == tokenizer.unk_token_id:
            raise BackendError(f"the tokenizer of {model!r} has no {STEP_TAG} token")
        self._tokenizer = tokenizer
        self._tag_id: int = tag_id
        self._model: Any = network.to(device).eval()
        self.parameters = _flops_parameters(self._model)
        try:  # fail at start, not on the first request, if the model has no 2-class head
            self.score_batch([("What is 1 + 1?", ["1 + 1 = 2.", "The answer is 2."])])
        except RuntimeError as exc:
            raise BackendError(f"{model!r} does not score steps: {exc}") from exc

    def render(self, item: ScoreItem) -> str:
        return QWEN_MATH_PRM.render(self._tokenizer, item)

    def count_tokens(self, item: ScoreItem) -> int:
        ids = self._tokenizer(self.render(item), add_special_tokens=False)["input_ids"]
        return len(ids)

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        texts = [self.render(item) for item in items]
        # Similar lengths share a forward pass: less padding.
        order = sorted(range(len(items)), key=lambda i: len(texts[i]))
        scores: list[list[float]] = [[] for _ in items]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            chunk_scores = self._forward([texts[i] for i in chunk])
            for i, row in zip(chunk, chunk_scores, strict=True):
                if len(row) != len(items[i][1]):
                    raise RuntimeError(f"{len(row)} step tags for {len(items[i][1])} steps")
                scores[i] = row
        return scores

    def _forward(self, texts: list[str]) -> list[list[float]]:
        torch = self._torch
        encoded = self._tokenizer(
            texts, padding=True, return_tensors="pt", add_special_tokens=False
        )
        input_ids = encoded["input_ids"].to(self.device)
        mask = encoded["attention_mask"].to(self.device)
        with torch.no_grad():
            outputs = self._model(input_ids=input_ids, attention_mask=mask)
        logits = step_logits(outputs)
        positive = torch.softmax(logits.float(), dim=-1)[..., 1]
        tags = (input_ids == self._tag_id) & mask.bool()
        return [positive[row][tags[row]].tolist() for row in range(len(texts))]


def step_logits(outputs: Any) -> Any:
    """The [batch, seq, classes] logits of a model output (`.logits`, else its first element)."""
    logits = getattr(outputs, "logits", None)
    if logits is None:
        logits = outputs[0]
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise RuntimeError(f"expected logits [batch, seq, 2], got {tuple(logits.shape)}")
    return logits


def _flops_parameters(model: Any) -> int:
    """All weights but the input embedding table (a lookup, no multiply-adds) unless it is tied
    to an output head, where it computes."""
    total = sum(int(p.numel()) for p in model.parameters())
    embeddings = model.get_input_embeddings()
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = outputs is not None and outputs.weight is embeddings.weight
    return total if tied else total - int(embeddings.weight.numel())
