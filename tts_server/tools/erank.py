"""`tts-server diagnose erank`: the effective rank of a policy's hidden representations, per layer.

Compressing a model (distillation into a narrower one, low-rank projections) can collapse its
reasoning, and the effective rank (eRank) of its hidden representations falls with it (RED).
This measures it before such a model is served: for each layer, the tokens of K prompts from a
dataset give a matrix (tokens x hidden size) whose eRank is exp of the entropy of its normalised
singular values (Roy & Vetterli 2007): n for n equal singular values, 1 for a rank-1 matrix.

Two series per layer: `hidden`, the residual stream after the layer (what the next layer reads),
and `mlp`, the output of the layer's MLP alone (where a low-rank projection shows directly: the
residual stream still carries everything earlier layers wrote). With `--reference`, the layers
where the model falls below the reference by more than `--tolerance` are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SERIES = ("hidden", "mlp")


def effective_rank(matrix: Any) -> float:
    """exp(entropy of the singular values normalised to sum 1); 0 for a zero matrix.

    `matrix`: anything torch.as_tensor takes (rows: samples, columns: features).
    """
    import torch

    values = torch.linalg.svdvals(torch.as_tensor(matrix, dtype=torch.float64))
    total = float(values.sum())
    if total <= 0.0:
        return 0.0
    p = values / total
    p = p[p > 0]  # 0 log 0 = 0
    return math.exp(float(-(p * p.log()).sum()))


@dataclass
class Profile:
    """eRank per layer of one model over one set of prompts."""

    model: str
    dataset: str
    prompts: int
    tokens: int  # rows of each layer's matrix (every prompt's tokens but its first)
    hidden: list[float]  # [embeddings, after layer 0, after layer 1, ...]
    mlp: list[float] = field(default_factory=list)  # [layer 0's MLP output, ...]; [] if unknown


@dataclass(frozen=True)
class Drop:
    series: str
    layer: int  # the decoder layer (hidden: -1 is the embeddings)
    erank: float
    reference: float

    @property
    def ratio(self) -> float:
        return self.erank / self.reference if self.reference else 0.0


def _decoder_layers(model: Any) -> list[Any]:
    """The decoder blocks of a causal LM (Llama, Qwen, Mistral, ... keep them at .model.layers)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def profile_model(
    model_dir: Path, texts: list[str], dataset: str = "", progress: bool = True, threads: int = 1
) -> Profile:
    """Run `texts` through the model in `model_dir` (CPU, float32) and measure every layer.

    The first token of each prompt is left out: language models park huge activations on it
    (an attention sink), and those few directions would dominate every layer's spectrum."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread by default: on a shared machine, more spin and wait (8 prompts of SmolLM2-135M
    # took 76 s with the default threads under load, 2.5 s with one).
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train(False)  # no dropout
    layers = _decoder_layers(model)
    mlps = [m for m in (getattr(layer, "mlp", None) for layer in layers) if m is not None]
    mlp_rows: list[list[torch.Tensor]] = []
    hooks = []
    if mlps and len(mlps) == len(layers):
        mlp_rows = [[] for _ in mlps]
        for mlp, rows in zip(mlps, mlp_rows, strict=True):

            def keep(_m: Any, _i: Any, output: Any, rows: list[torch.Tensor] = rows) -> None:
                rows.append(output[0, 1:].detach())

            hooks.append(mlp.register_forward_hook(keep))
    hidden_rows: list[list[torch.Tensor]] = []
    tokens = 0
    bar = _progress(texts, f"eRank {model_dir.name}", progress)
    try:
        with torch.no_grad():
            for text in bar:
                inputs = tokenizer(text, return_tensors="pt")
                out = model(**inputs, output_hidden_states=True)
                if not hidden_rows:
                    hidden_rows = [[] for _ in out.hidden_states]
                for rows, states in zip(hidden_rows, out.hidden_states, strict=True):
                    rows.append(states[0, 1:])
                tokens += int(inputs["input_ids"].shape[1]) - 1
    finally:
        for hook in hooks:
            hook.remove()
    return Profile(
        model=str(model_dir),
        dataset=dataset,
        prompts=len(texts),
        tokens=tokens,
        hidden=[effective_rank(torch.cat(rows)) for rows in hidden_rows],
        mlp=[effective_rank(torch.cat(rows)) for rows in mlp_rows],
    )


def _progress(items: list[str], desc: str, show: bool) -> Any:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="prompt", file=sys.stderr)


def drops(model: Profile, reference: Profile, tolerance: float) -> list[Drop]:
    """Layers where `model`'s eRank is below (1 - tolerance) x the reference's."""
    found = []
    for series in SERIES:
        ours, theirs = getattr(model, series), getattr(reference, series)
        offset = -1 if series == "hidden" else 0  # hidden[0] is the embeddings
        for index, (a, b) in enumerate(zip(ours, theirs, strict=False)):
            if a < (1.0 - tolerance) * b:
                found.append(Drop(series, index + offset, a, b))
    return found


def plot(model: Profile, reference: Profile | None, found: list[Drop], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    titles = {"hidden": "residual stream after each layer", "mlp": "each layer's MLP output"}
    for ax, series in zip(axes, SERIES, strict=True):
        offset = -1 if series == "hidden" else 0
        for profile, style, name in ((model, "-o", "model"), (reference, "--s", "reference")):
            if profile is None or not getattr(profile, series):
                continue
            values = getattr(profile, series)
            label = f"{name}: {Path(profile.model).name}"
            ax.plot(range(offset, offset + len(values)), values, style, ms=3, label=label)
        for drop in (d for d in found if d.series == series):
            ax.axvline(drop.layer, color="red", alpha=0.3)
        ax.set_title(f"eRank, {titles[series]}")
        ax.set_xlabel("layer (-1: embeddings)" if series == "hidden" else "layer")
        ax.set_ylabel("effective rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model.prompts} prompts, {model.tokens} tokens of {model.dataset}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main_erank(args: argparse.Namespace) -> int:
    from tts_server.tools.datasets import DatasetError, load_dataset

    try:
        examples = load_dataset(args.dataset)[args.offset : args.offset + args.limit]
    except (DatasetError, OSError) as exc:
        print(f"error: --dataset: {exc}", file=sys.stderr)
        return 2
    if not examples:
        print("error: --limit/--offset select no prompt", file=sys.stderr)
        return 2
    for flag, folder in (("--model", args.model), ("--reference", args.reference)):
        if folder is not None and not (folder / "config.json").is_file():
            print(f"error: {flag}: no config.json in {folder}", file=sys.stderr)
            return 2
    texts = [e.question for e in examples]
    show = not args.quiet
    model = profile_model(args.model, texts, args.dataset, show, args.threads)
    reference = (
        profile_model(args.reference, texts, args.dataset, show, args.threads)
        if args.reference
        else None
    )
    found = drops(model, reference, args.tolerance) if reference is not None else []
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": asdict(model),
        "reference": asdict(reference) if reference is not None else None,
        "tolerance": args.tolerance,
        "below_reference": [{**asdict(d), "ratio": d.ratio} for d in found],
    }
    (args.out / "erank.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(model, reference, found, args.out / "erank.png")
    print(f"wrote {args.out / 'erank.json'} and {args.out / 'erank.png'}")
    if reference is not None:
        if found:
            for d in found:
                print(
                    f"below the reference: {d.series} layer {d.layer}: eRank {d.erank:.1f} "
                    f"against {d.reference:.1f} ({d.ratio:.2f}x)"
                )
        else:
            print(f"no layer below the reference by more than {args.tolerance:.0%}")
    return 0
