"""Zero-latency upstreams as their own process, for `tts-server bench`'s gateway-cost scenario:
the fake vLLM (scripted three-step solutions, no delay) or the `arith` PRM worker app (a checker,
under 1 ms a step), served by uvicorn on 127.0.0.1 until SIGTERM.

    python -m tests.support.upstreams --kind vllm --port 9100 [--cpu 0] [--delay S] [--jitter S]
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import MODEL, script
from tts_server.prm_worker import create_app as create_prm_app
from tts_server.prm_worker.backends.arith import ArithBackend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("vllm", "prm"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None, help="run on this CPU only")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per vLLM completion")
    parser.add_argument("--jitter", type=float, default=0.0, help="plus up to this, uniformly")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.kind == "vllm":
        # It keeps every call in memory: fine for a bounded run (a few thousand calls).
        fake = FakeVLLM(script=script, model=MODEL, delay_s=args.delay, delay_jitter_s=args.jitter)
        app = fake.app()
    else:
        app = create_prm_app(ArithBackend())
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
