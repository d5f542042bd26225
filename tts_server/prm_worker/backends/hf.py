"""`hf`: a transformers PRM in process, of any family in the registry.

The family (`formats.Family`, from `registry.toml`; default: Qwen2.5-Math-PRM's) gives the layout
(`formats.StepFormat.encode`: token ids and the position scoring each step) and the score
reading (`heads`: a 2-class head, a good/bad token pair of a causal LM, or a value head).
torch and transformers are imported only when an `HFBackend` is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tts_server.prm_worker.backends import registry
from tts_server.prm_worker.backends.base import BackendError, PRMBackend, ScoreItem
from tts_server.prm_worker.backends.formats import QWEN_MATH_PRM, Encoded, Family
from tts_server.prm_worker.backends.heads import load_head, step_logits

STEP_TAG = QWEN_MATH_PRM.step_tag
SYSTEM_PROMPT = QWEN_MATH_PRM.system_prompt

__all__ = ["STEP_TAG", "SYSTEM_PROMPT", "HFBackend", "step_logits"]


class HFBackend(PRMBackend):
    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        family: Family | None = None,
        device: str = "cpu",
        batch_size: int = 8,
        dtype: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoTokenizer

        self.family = family or registry.shipped().default.family
        self.family.require(self.name)
        self.format = self.family.format
        self._torch: Any = torch
        self.model_name = Path(model).name or model
        self.device = device
        self.batch_size = max(1, batch_size)
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError, AttributeError) as exc:
            raise BackendError(f"cannot load the PRM from {model!r}: {exc}") from exc
        problem = self.format.check_tokenizer(tokenizer)
        if problem:
            raise BackendError(f"the tokenizer of {model!r} {problem}")
        options: dict[str, Any] = {"dtype": getattr(torch, dtype)} if dtype else {}
        self._head = load_head(self.family.score, model, tokenizer, options)
        tokenizer.padding_side = "right"  # positions then match the unpadded sequence
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self._tokenizer = tokenizer
        self._head.to(device)
        self.parameters = self._head.parameters()
        try:  # fail at start, not on the first request, if the model does not score steps
            self.score_batch([("What is 1 + 1?", ["1 + 1 = 2.", "The answer is 2."])])
        except RuntimeError as exc:
            raise BackendError(f"{model!r} does not score steps: {exc}") from exc

    def render(self, item: ScoreItem) -> str:
        return self.format.render(self._tokenizer, item)

    def encode(self, item: ScoreItem) -> Encoded:
        """The token ids the PRM reads for `item` and the position scoring each step."""
        encoded = self.format.encode(self._tokenizer, item)
        if len(encoded.positions) != len(item[1]):
            raise RuntimeError(f"{len(encoded.positions)} step tags for {len(item[1])} steps")
        return encoded

    def count_tokens(self, item: ScoreItem) -> int:
        return len(self.encode(item).ids)

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        encoded = [self.encode(item) for item in items]
        # Similar lengths share a forward pass: less padding.
        order = sorted(range(len(items)), key=lambda i: len(encoded[i].ids))
        scores: list[list[float]] = [[] for _ in items]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, row in zip(chunk, self._forward([encoded[i] for i in chunk]), strict=True):
                scores[i] = row
        return scores

    def _forward(self, batch: list[Encoded]) -> list[list[float]]:
        torch = self._torch
        width = max(len(e.ids) for e in batch)
        pad = int(self._tokenizer.pad_token_id)
        input_ids = torch.tensor([e.ids + [pad] * (width - len(e.ids)) for e in batch])
        mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in batch])
        with torch.no_grad():
            return self._head.scores(
                input_ids.to(self.device), mask.to(self.device), [e.positions for e in batch]
            )
