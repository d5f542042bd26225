"""Tiny random-weight PRMs of the registry's other families, built locally (no model hub).

Each uses SmolLM2's tokenizer (the embedded model folder) with the family's special tokens added,
and the family's architecture with 2 small layers: Llama (RLHFlow), Mistral (Math-Shepherd),
Qwen2 plus a `v_head.summary` value head in the checkpoint (Skywork). The Qwen2.5-Math-PRM family's
is `tiny_prm.build_tiny_qwen2_prm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tts_server.settings import Settings

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3.1's turn layout, without its default system block (the tests render through the
# tokenizer's template, whatever it is).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) }}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SHEPHERD_TAG = "ки"  # one token in Mistral's vocabulary ("▁ки", 12902); added here
VALUE_HEAD = "v_head.summary"
_SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def _tokenizer(path: Path, *, specials: Sequence[str] = (), words: Sequence[str] = ()) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Settings().embedded_model_dir)
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    if words:
        tokenizer.add_tokens(list(words))
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_llama_prm(path: Path, *, seed: int = 0) -> Path:
    """RLHFlow's kind: a Llama causal LM reading Llama-3-style chat turns."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(path, specials=LLAMA3_SPECIALS)
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tokenizer), **_SMALL)  # type: ignore[no-untyped-call]
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)  # type: ignore[no-untyped-call]
    return path


def build_tiny_mistral_prm(path: Path, *, seed: int = 0) -> Path:
    """Math-Shepherd's kind: a Mistral causal LM reading plain text with the " ки" tags."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = _tokenizer(path, words=[SHEPHERD_TAG])
    config = MistralConfig(vocab_size=len(tokenizer), **_SMALL)  # type: ignore[no-untyped-call]
    torch.manual_seed(seed)
    MistralForCausalLM(config).save_pretrained(path)  # type: ignore[no-untyped-call]
    return path


def build_tiny_skywork_prm(path: Path, *, seed: int = 0) -> Path:
    """Skywork's kind: a Qwen2 causal LM checkpoint plus `v_head.summary` (Linear(hidden, 1)),
    saved as Skywork's are (architecture `Qwen2ForPrmModel`, the head beside `model.*`)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tokenizer(path)
    config = Qwen2Config(  # type: ignore[no-untyped-call]
        vocab_size=len(tokenizer), architectures=["Qwen2ForPrmModel"], **_SMALL
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(path)
    config.architectures = ["Qwen2ForPrmModel"]
    config.save_pretrained(path)
    weights = load_file(str(path / "model.safetensors"))
    hidden = config.hidden_size
    weights[f"{VALUE_HEAD}.weight"] = torch.randn(1, hidden) * hidden**-0.5
    weights[f"{VALUE_HEAD}.bias"] = torch.tensor([0.1])
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
