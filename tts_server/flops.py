"""FLOPs per answer, from the tokens each model actually computed.

A dense decoder's forward pass costs about 2 FLOPs per parameter per token (one multiply-add per
weight). So:

- policy FLOPs = 2 x N_policy x (prompt tokens not served from vLLM's prefix cache + generated
  tokens), and the prefix cache saved 2 x N_policy x cached tokens;
- PRM FLOPs = 2 x N_prm x tokens the PRM computed (the `arith` checker has no parameters: 0).

N counts the parameters that do multiply-adds for every token: all of them but the input
embedding table, which is a lookup (with tied embeddings that matrix still counts once, as the
output head). Left out by default: attention's context term (4 x layers x d_attn x context length
per token, for the query-key scores and the weighted sum of values), which grows with the position
and matters for long contexts. `include_attention` adds it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tts_server.settings import DEFAULT_MODEL, Settings
from tts_server.types import PolicyService, PolicyUsage, PRMService, PRMUsage

logger = logging.getLogger("tts_server.flops")


class FlopsConfigError(ValueError):
    """A model config from which the parameter count cannot be read."""


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs count needs to know about one model."""

    parameters: int
    layers: int = 0
    # Width of the attention's queries (heads x head_dim): the context term's factor.
    attention_width: int = 0

    @property
    def has_attention_shape(self) -> bool:
        return self.layers > 0 and self.attention_width > 0


def _get(config: dict[str, Any], *names: str) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise FlopsConfigError(f"model config has none of {', '.join(names)}")


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """Parameter count of a Llama/Qwen2/Mistral-style decoder from its `config.json`.

    Counts attention (q, k, v, o and their biases where the family has them), the gated MLP, the
    norms and the output head (a PRM's classification head for those architectures).
    """
    if "text_config" in config and isinstance(config["text_config"], dict):
        config = config["text_config"]
    d = _get(config, "hidden_size", "n_embd", "d_model")
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(config, "num_attention_heads", "n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    ff = _get(config, "intermediate_size", "n_inner", "ffn_dim")
    vocab = _get(config, "vocab_size")
    q, kv = heads * head_dim, int(kv_heads) * int(head_dim)
    attention = d * q + 2 * d * kv + q * d
    if config.get("attention_bias") or config.get("model_type") == "qwen2":
        attention += q + 2 * kv  # Qwen2 has biases on q, k and v
    mlp = 3 * d * ff  # gate, up and down projections
    per_layer = attention + mlp + 2 * d  # two RMSNorm weight vectors
    head = _head_parameters(config, d, vocab)
    return ModelShape(
        parameters=layers * per_layer + d + head, layers=layers, attention_width=int(q)
    )


def _head_parameters(config: dict[str, Any], d: int, vocab: int) -> int:
    """The output head: a PRM's classifier, else the vocabulary projection (the input table is a
    lookup, no FLOPs: a tied one counts once, here)."""
    architectures = [str(a) for a in config.get("architectures") or []]
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    if any(a.endswith("ForProcessRewardModel") for a in architectures):
        return d * d + d + d * labels + labels  # Qwen2.5-Math-PRM: Linear(d, d), ReLU, Linear(d, 2)
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return d * labels + labels
    return vocab * d


def shape_from_path(path: Path) -> ModelShape:
    """The shape of a local model: a folder holding `config.json`, or that file itself."""
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise FlopsConfigError(f"cannot read a model config at {file.name}: {exc}") from exc
    if not isinstance(config, dict):
        raise FlopsConfigError("a model config must be a JSON object")
    return shape_from_config(config)


def context_sum(start: int, end: int) -> int:
    """Sum of the positions start..end-1: the attention context the tokens there attend over."""
    if end <= start:
        return 0
    return (start + end - 1) * (end - start) // 2


@dataclass(frozen=True)
class Flops:
    policy: int
    prm: int
    saved_by_cache: int
    attention_included: bool = False

    @property
    def total(self) -> int:
        return self.policy + self.prm

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "prm": self.prm,
            "total": self.total,
            "saved_by_prefix_cache": self.saved_by_cache,
            "attention_included": self.attention_included,
        }


@dataclass(frozen=True)
class FlopsCounter:
    """Turns a request's token usage into FLOPs. A shape of None means "unknown": FLOPs of 0
    would be a lie, so `count` returns None then."""

    policy: ModelShape | None
    prm: ModelShape | None
    include_attention: bool = False

    def policy_flops(self, usage: PolicyUsage) -> tuple[int, int]:
        """(FLOPs computed, FLOPs the prefix cache saved) for the policy."""
        assert self.policy is not None
        n = self.policy.parameters
        computed = usage.prompt_tokens - usage.cached_tokens + usage.completion_tokens
        flops = 2 * n * computed
        saved = 2 * n * usage.cached_tokens
        if self.include_attention and self.policy.has_attention_shape:
            per_position = 4 * self.policy.layers * self.policy.attention_width
            flops += per_position * usage.context_computed
            saved += per_position * usage.context_cached
        return flops, saved

    def prm_flops(self, usage: PRMUsage) -> int:
        assert self.prm is not None
        return 2 * self.prm.parameters * usage.tokens

    def count(self, policy: PolicyUsage, prm: PRMUsage) -> Flops | None:
        if self.policy is None or self.prm is None:
            return None
        computed, saved = self.policy_flops(policy)
        return Flops(computed, self.prm_flops(prm), saved, self.include_attention)

    def worst_case_generate(
        self, prompt_lengths: list[int], max_tokens: int, *, samples: int = 1
    ) -> int:
        """An upper bound of one generate call's FLOPs: nothing cached, every sample runs to
        `max_tokens`. Used to keep a request under its FLOPs ceiling before spending."""
        assert self.policy is not None
        n = self.policy.parameters
        tokens = sum(p + max_tokens for p in prompt_lengths) * samples
        flops = 2 * n * tokens
        if self.include_attention and self.policy.has_attention_shape:
            per_position = 4 * self.policy.layers * self.policy.attention_width
            flops += (
                per_position * samples * sum(context_sum(0, p + max_tokens) for p in prompt_lengths)
            )
        return flops


# --- the models' sizes, found from settings and what the servers report ---


async def find_policy_shape(settings: Settings, policy: PolicyService) -> ModelShape | None:
    """The policy's shape from its config.json (`policy_config_path`, else the folder vLLM
    reports, else the embedded model's), its parameter count overridden by `policy_params`."""
    s = settings
    candidates: list[Path] = []
    if s.policy_config_path is not None:
        candidates.append(s.policy_config_path)
    root = await policy.model_root()
    if root:
        candidates.append(Path(root))
    if s.policy_model == DEFAULT_MODEL:
        candidates.append(s.embedded_model_dir)
    for path in candidates:
        if path.exists():
            try:
                shape = shape_from_path(path)
            except FlopsConfigError as exc:
                logger.warning("policy FLOPs: %s", exc)
                continue
            if s.policy_params is not None:
                shape = dataclasses.replace(shape, parameters=s.policy_params)
            return shape
    if s.policy_params is not None:
        return ModelShape(parameters=s.policy_params)
    logger.warning("policy parameter count unknown: set TTS_POLICY_PARAMS for FLOPs")
    return None


async def find_prm_shape(settings: Settings, prm: PRMService) -> ModelShape | None:
    if settings.prm_params is not None:
        return ModelShape(parameters=settings.prm_params)
    value = await prm.parameters()
    return ModelShape(parameters=value) if value is not None else None
