"""`tts-server bench`'s flags, apart from the run: the gateway builds the `tts-server` parser at
every start, and this module imports nothing of the tools or their extra."""

from __future__ import annotations

import argparse
from pathlib import Path

SCENARIOS = ("cost", "overhead", "saturation", "prm", "peer")
# short: what `make bench` runs by default (about 20-30 minutes on 2 CPUs); full: the issue's
# 32 problems and a longer gateway-cost load.
PROFILES: dict[str, dict[str, int]] = {
    "short": {"problems": 16, "cost_requests": 200, "prm_requests": 64},
    "full": {"problems": 32, "cost_requests": 600, "prm_requests": 192},
}
NOTE = (
    "Measured on a shared machine (other engineers' tests ran at the same time; see the load "
    "average): read the ratios, not the absolute times."
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--problems", type=int, default=None, help="override the profile's")
    parser.add_argument("--dataset", default="mawps_singleop", help="packaged name or .jsonl")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated of {SCENARIOS}"
    )
    parser.add_argument("--policy-url", default=None, help="a running vLLM (else one is started)")
    parser.add_argument("--prm-url", default=None, help="a running PRM worker (else arith)")
    parser.add_argument(
        "--gateway-url", default=None, help="a running gateway (needs --policy-url)"
    )
    parser.add_argument("--model", default=None, help="served model name (TTS_POLICY_MODEL)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=None, help="default: the profile's")
    parser.add_argument(
        "--concurrencies", default="1,8,32", help="the overhead scenario's (comma-separated)"
    )
    parser.add_argument(
        "--saturation-concurrency", type=int, default=16, help="the saturation scenario's"
    )
    parser.add_argument(
        "--saturation-rounds",
        type=int,
        default=3,
        help="each problem sent this many times in a saturation cell (a steady part before the "
        "tail)",
    )
    parser.add_argument("--peer-concurrency", type=int, default=4, help="the optillm cells'")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--cell-time-limit", type=float, default=600.0, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    parser.add_argument("--doc", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--no-doc", action="store_true", help="leave docs/performance.md alone")
    parser.add_argument("--fresh", action="store_true", help="measure every cell again")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: write the summary, plots and doc from the cells saved so far",
    )
    parser.add_argument("--optillm-venv", type=Path, default=None)
    parser.add_argument("--note", default=NOTE, help="printed next to the figures")
