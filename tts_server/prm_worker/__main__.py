"""`python -m tts_server.prm_worker --backend arith --host 127.0.0.1 --port 8200`."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

import uvicorn

from tts_server.prm_worker.app import create_app
from tts_server.prm_worker.backends import BACKENDS, BackendError, load_backend, registry
from tts_server.prm_worker.backends.formats import MODEL_BACKENDS
from tts_server.prm_worker.backends.veto import VETOES, ArithVeto

logger = logging.getLogger("tts_server.prm_worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tts_server.prm_worker", description="Serve a process reward model."
    )
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="arith")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument(
        "--model", default=None, help="hf: the model folder; vllm, judge: the served model name"
    )
    parser.add_argument("--device", default=None, help="torch device (hf backend), e.g. cpu")
    prm = parser.add_argument_group("which PRM (hf, vllm): registry.toml, see --list")
    prm.add_argument(
        "--prm",
        default=None,
        help="a registry entry's name or model id (its model unless --model gives a local copy); "
        "default: the entry whose model id is --model, else the Qwen2.5-Math-PRM format",
    )
    prm.add_argument("--family", default=None, help="the family of a --model not in the registry")
    prm.add_argument("--list", action="store_true", help="print the registry's PRMs and exit")
    vllm = parser.add_argument_group("vllm backend (a PRM served by vLLM as a pooling model)")
    vllm.add_argument("--vllm-url", default=None, help="the PRM's vLLM server, e.g. http://...")
    vllm.add_argument(
        "--tokenizer", default=None, help="local tokenizer folder (default: vLLM's /tokenize)"
    )
    vllm.add_argument(
        "--max-batch-tokens", type=int, default=None, help="tokens per /pooling request (8192)"
    )
    vllm.add_argument("--timeout", type=float, default=None, help="seconds per call (30)")
    vllm.add_argument(
        "--retries", type=int, default=None, help="retries after a timeout or 5xx (2)"
    )
    parser.add_argument(
        "--veto",
        choices=VETOES,
        default=None,
        help="arith: a step with a wrong equation scores 0 whatever the PRM says",
    )
    judge = parser.add_argument_group("judge backend (a chat model asked if each step is right)")
    judge.add_argument("--judge-url", default=None, help="an OpenAI-compatible endpoint")
    judge.add_argument(
        "--judge-mode",
        choices=["step", "solution"],
        default=None,
        help="step (default): a call per step; solution: one per solution, for all its steps",
    )
    judge.add_argument("--top-logprobs", type=int, default=None, help="candidates read (20)")
    judge.add_argument("--judge-template", default=None, help="a prompt template file")
    parser.add_argument("--max-batch-size", type=int, default=64, help="solutions per call")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill"
    )
    parser.add_argument(
        "--cache-size", type=int, default=65536, help="step scores kept in the cache (0: off)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser.parse_args(argv)


class _Server(uvicorn.Server):
    """uvicorn's server that logs one line once it listens."""

    def __init__(self, config: uvicorn.Config, ready_message: str) -> None:
        super().__init__(config)
        self.ready_message = ready_message

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            logger.info("%s", self.ready_message)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(registry.shipped().listing())
        return 0
    if args.backend not in MODEL_BACKENDS and (args.prm or args.family):
        print(
            f"error: --prm and --family are for the {' and '.join(MODEL_BACKENDS)} backends",
            file=sys.stderr,
        )
        return 2
    if args.backend == "vllm" and not (args.vllm_url and (args.model or args.prm)):
        print("error: the vllm backend needs --vllm-url and --model (or --prm)", file=sys.stderr)
        return 2
    if args.backend == "judge" and not (args.judge_url and args.model):
        print("error: the judge backend needs --judge-url and --model", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        model, family = args.model, None
        if args.backend in MODEL_BACKENDS:
            chosen = registry.select(
                registry.shipped(), prm=args.prm, family=args.family, model=args.model
            )
            model, family = chosen.model, chosen.family
        backend = load_backend(
            args.backend,
            model=model,
            family=family,
            device=args.device,
            url=args.vllm_url,
            tokenizer=args.tokenizer,
            max_batch_tokens=args.max_batch_tokens,
            timeout_s=args.timeout,
            retries=args.retries,
            judge_url=args.judge_url,
            judge_mode=args.judge_mode,
            top_logprobs=args.top_logprobs,
            judge_template=args.judge_template,
        )
        if args.veto == "arith":
            backend = ArithVeto(backend)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(
        backend,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        cache_size=args.cache_size,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False
    )
    ready = (
        f"PRM worker ready: backend={backend.name}{' (arith veto)' if args.veto else ''} "
        f"model={backend.model_name} "
        f"{f'family={family.name} ' if family else ''}on http://{args.host}:{args.port}"
    )
    _Server(config, ready).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
