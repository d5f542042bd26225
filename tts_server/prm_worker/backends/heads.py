"""How the `hf` backend loads a PRM and reads a step's score at a position, per score kind.

- `class_head`: a token-classification model (or remote code such as Qwen's
  `Qwen2ForProcessRewardModel`) giving [batch, seq, 2] logits; P(positive class) by softmax.
- `token_pair`: a causal LM; the LM head is applied at the scored positions only (the full
  [batch, seq, vocab] logits would be GBs for a 32k-128k vocabulary) and the two tokens' logits
  compared by softmax: P(good).
- `value_head`: the base transformer (`AutoModel`, weights `model.*`) plus a Linear(hidden, 1)
  whose weight and bias are read from the checkpoint's safetensors under the family's `head`
  prefix (Skywork: `v_head.summary`); sigmoid of its output.

torch and transformers are imported only when a head is loaded.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from tts_server.prm_worker.backends.base import BackendError
from tts_server.prm_worker.backends.formats import ScoreReading

_LOAD_ERRORS = (OSError, ValueError, AttributeError, KeyError)


class Head(ABC):
    """A loaded PRM: scores at given positions of a right-padded batch."""

    network: Any

    @abstractmethod
    def scores(self, input_ids: Any, mask: Any, positions: list[list[int]]) -> list[list[float]]:
        """positions[i]: the scored token indices of row i; the result has one score each."""

    def parameters(self) -> int:
        """Weights doing multiply-adds per token (the FLOPs count's N)."""
        return flops_parameters(self.network)

    def to(self, device: str) -> None:
        self.network = self.network.to(device).eval()


def load_head(score: ScoreReading, model: str, tokenizer: Any, options: dict[str, Any]) -> Head:
    """Load `model` for `score`; `options` go to `from_pretrained` (e.g. dtype)."""
    if score.kind == "class_head":
        return ClassHead(model, score.positive_class, options)
    if score.kind == "token_pair":
        return TokenPairHead(model, tokenizer, score, options)
    return ValueHead(model, score.head, options)


class ClassHead(Head):
    def __init__(self, model: str, positive_class: int, options: dict[str, Any]) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification

        try:
            config: Any = AutoConfig.from_pretrained(model, trust_remote_code=True)
            architectures: list[str] = list(getattr(config, "architectures", None) or [])
            if any(a.endswith("ForTokenClassification") for a in architectures):
                network: Any = AutoModelForTokenClassification.from_pretrained(model, **options)
            else:  # Qwen2ForProcessRewardModel ships as remote code
                network = AutoModel.from_pretrained(model, trust_remote_code=True, **options)
        except _LOAD_ERRORS as exc:
            raise BackendError(f"cannot load the PRM from {model!r}: {exc}") from exc
        self.network = network
        self.positive_class = positive_class

    def scores(self, input_ids: Any, mask: Any, positions: list[list[int]]) -> list[list[float]]:
        import torch

        logits = step_logits(self.network(input_ids=input_ids, attention_mask=mask))
        positive = torch.softmax(logits.float(), dim=-1)[..., self.positive_class]
        return [positive[row, at].tolist() for row, at in enumerate(positions)]


class TokenPairHead(Head):
    def __init__(
        self, model: str, tokenizer: Any, score: ScoreReading, options: dict[str, Any]
    ) -> None:
        from transformers import AutoModelForCausalLM

        try:
            self.network = AutoModelForCausalLM.from_pretrained(model, **options)
        except _LOAD_ERRORS as exc:
            raise BackendError(f"cannot load the PRM from {model!r}: {exc}") from exc
        # The last id of each token's encoding, as the references take them (Math-Shepherd's
        # encode("+ -")[1:] and RLHFlow's encode("+")[-1] are the same ids).
        self.pair = [tokenizer.encode(score.good_token)[-1], tokenizer.encode(score.bad_token)[-1]]
        if self.pair[0] == self.pair[1]:
            raise BackendError(f"{score.good_token!r} and {score.bad_token!r} are one token")

    def scores(self, input_ids: Any, mask: Any, positions: list[list[int]]) -> list[list[float]]:
        import torch

        body = self.network.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        lm_head = self.network.get_output_embeddings()
        rows: list[list[float]] = []
        for row, at in enumerate(positions):
            logits = lm_head(hidden[row, at])[:, self.pair]
            rows.append(torch.softmax(logits.float(), dim=-1)[:, 0].tolist())
        return rows


class ValueHead(Head):
    def __init__(self, model: str, prefix: str, options: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModel

        try:
            self.network = AutoModel.from_pretrained(model, **options)
            tensors = read_tensors(model_folder(model), prefix)
        except _LOAD_ERRORS as exc:
            raise BackendError(f"cannot load the PRM from {model!r}: {exc}") from exc
        weight, bias = tensors.get("weight"), tensors.get("bias")
        hidden = int(self.network.config.hidden_size)
        if weight is None or tuple(weight.shape) != (1, hidden):
            raise BackendError(
                f"{model!r} has no value head {prefix}.weight of shape (1, {hidden}) "
                f"(found: {sorted(tensors) or 'nothing'} under {prefix}.)"
            )
        self.head = torch.nn.Linear(hidden, 1, bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(weight.float())
            if bias is not None:
                self.head.bias.copy_(bias.float().reshape(1))
        self.head.eval()

    def to(self, device: str) -> None:
        super().to(device)
        self.head.to(device)

    def parameters(self) -> int:
        return flops_parameters(self.network) + sum(int(p.numel()) for p in self.head.parameters())

    def scores(self, input_ids: Any, mask: Any, positions: list[list[int]]) -> list[list[float]]:
        import torch

        hidden = self.network(input_ids=input_ids, attention_mask=mask).last_hidden_state
        rows: list[list[float]] = []
        for row, at in enumerate(positions):
            value = self.head(hidden[row, at].float()).squeeze(-1)
            rows.append(torch.sigmoid(value).tolist())
        return rows


def step_logits(outputs: Any) -> Any:
    """The [batch, seq, classes] logits of a model output (`.logits`, else its first element)."""
    logits = getattr(outputs, "logits", None)
    if logits is None:
        logits = outputs[0]
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise RuntimeError(f"expected logits [batch, seq, 2], got {tuple(logits.shape)}")
    return logits


def model_folder(model: str) -> Path:
    """A local folder as is; a hub id's snapshot (from the cache `from_pretrained` filled)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))


def read_tensors(folder: Path, prefix: str) -> dict[str, Any]:
    """The tensors named `prefix.<name>` in the folder's safetensors, by <name>."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for k, f in weight_map.items() if k.startswith(prefix + ".")})
    else:
        files = sorted(folder.glob("*.safetensors"))
    found: dict[str, Any] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if key.startswith(prefix + "."):
                    found[key[len(prefix) + 1 :]] = weights.get_tensor(key)
    return found


def flops_parameters(model: Any) -> int:
    """All weights but the input embedding table (a lookup, no multiply-adds) unless it is tied
    to an output head, where it computes."""
    total = sum(int(p.numel()) for p in model.parameters())
    embeddings = model.get_input_embeddings()
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = outputs is not None and outputs.weight is embeddings.weight
    return total if tied else total - int(embeddings.weight.numel())
