"""The offline tools' subcommands of `tts-server`: eval, calibrate, plot, report, bench,
dashboards, export, diagnose.

The gateway builds the same parser at every start, so registering these imports none of the tools:
a command imports its module when it runs, and that module imports matplotlib or tqdm (the tools
extra) only where it draws or shows progress. Without the extra, a command that needs it says so
in one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tts_server.types import SELECTIONS

Run = Callable[[argparse.Namespace], int]


def _eval(args: argparse.Namespace) -> int:
    from tts_server.tools.evaluate import main_eval

    return main_eval(args)


def _calibrate(args: argparse.Namespace) -> int:
    from tts_server.tools.calibrate import main_calibrate

    return main_calibrate(args)


def _plot(args: argparse.Namespace) -> int:
    from tts_server.tools.plots import main_plot

    return main_plot(args)


def _revote(args: argparse.Namespace) -> int:
    from tts_server.tools.revote import main_revote

    return main_revote(args)


def _report(args: argparse.Namespace) -> int:
    from tts_server.tools.report import main_report

    return main_report(args)


def _dashboards(args: argparse.Namespace) -> int:
    from tts_server.tools.dashboards import write_all

    for path in write_all(args.out):
        print(path)
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from tts_server.tools.erank import main_erank

    return main_erank(args)


def _export(args: argparse.Namespace) -> int:
    from tts_server.tools.export import main_export

    return main_export(args)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "traces", nargs="+", type=Path, help="trace files or folders (TTS_TRACE_DIR)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/export"), help="output folder")
    parser.add_argument(
        "--formats", default="sft,preference,steps", help="comma-separated: sft, preference, steps"
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.0,
        help="keep answers whose share of the vote is at least this (0..1)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="packaged name or .jsonl path: keep only its questions, answered right",
    )
    parser.add_argument(
        "--step-threshold", type=float, default=0.5, help="a step's PRM score at or above: good"
    )


def _bench(args: argparse.Namespace) -> int:
    from tts_server.bench.cli import main_bench

    return main_bench(args)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from tts_server.bench.options import add_bench_arguments

    add_bench_arguments(parser)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--dataset", required=True, help="packaged name or .jsonl path")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (server default)"
    )
    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default=None,
        help="selection rule, tts.selection (server default); e.g. confidence, filtered",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--dataset", required=True, help="packaged name or .jsonl path")
    parser.add_argument(
        "--strategies",
        default="adaptive,best_of_n,beam_search,dvts,majority",
        help="comma-separated; adaptive is replayed from best-of-N samples (which it runs)",
    )
    parser.add_argument(
        "--budgets", default="8", help="client budgets B (comma-separated); routes run B - pilot"
    )
    parser.add_argument("--pilot", type=int, default=4, help="pilot samples k")
    parser.add_argument(
        "--compare",
        default=None,
        help="fixed strategies to run at the largest budget, no pilot, as the reference `auto` "
        "must beat (comma-separated; default: --strategies; 'none' to skip)",
    )
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--records", type=Path, default=Path("reports/calibration-records.jsonl"))
    parser.add_argument(
        "--rule",
        choices=("one_se", "max"),
        default="one_se",
        help="per bin: the cheapest option within one standard error of the most accurate "
        "(one_se), or the most accurate (max)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="fit from the records file only, sending no request",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/router-table.json"))


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", type=Path, help="JSON reports of `tts-server eval`")
    parser.add_argument("--out", type=Path, default=Path("reports/accuracy-vs-flops.png"))
    parser.add_argument("--title", default=None)
    parser.add_argument(
        "--table", action="store_true", help="also print the reports as a markdown table"
    )
    parser.add_argument(
        "--versus",
        action="store_true",
        help="also print each `auto` report against each fixed one on the same problems "
        "(paired accuracy difference, FLOPs ratio)",
    )
    parser.add_argument(
        "--against",
        default=None,
        metavar="LABEL",
        help="like --versus, but every report against the one labelled so (as the table "
        "names it, e.g. best_of_n@8)",
    )
    parser.add_argument(
        "--by-difficulty",
        action="store_true",
        help="also print accuracy and FLOPs per difficulty bin (bins from the first `auto` report)",
    )


def add_revote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", type=Path, help="an `eval` report of a sampling strategy")
    parser.add_argument(
        "--rules",
        default="naive,weighted,majority,confidence,filtered",
        help="comma-separated rules",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/revote"))
    parser.add_argument(
        "--served", default="weighted", help="the rule the server used when the report names none"
    )
    parser.add_argument("--metric", default=None, help="the confidence the votes weigh")
    parser.add_argument("--keep", type=float, default=None, help="the share `filtered` keeps")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL")
    parser.add_argument("--since", default="1h", help="how far back (e.g. 15m, 1h, 1d)")
    parser.add_argument(
        "--window", default=None, help="rate window for $__rate_interval (default: 4 steps, >= 60s)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/tts-report.png"))


def add_dashboards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("deploy/grafana/dashboards"))


def add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="diagnostic", required=True)
    erank = sub.add_parser("erank", help="effective rank of the hidden representations per layer")
    erank.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder")
    erank.add_argument("--reference", type=Path, default=None, help="the model it was made from")
    erank.add_argument("--dataset", default="mawps_singleop", help="packaged name or .jsonl path")
    erank.add_argument("--limit", type=int, default=32, help="prompts (their tokens are the rows)")
    erank.add_argument("--offset", type=int, default=0)
    erank.add_argument(
        "--tolerance", type=float, default=0.1, help="flag layers this far below the reference"
    )
    erank.add_argument("--out", type=Path, default=Path("reports/erank"))
    erank.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    erank.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class Tool:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Run
    needs: tuple[str, ...] = ()  # modules of the tools extra it imports


TOOLS = {
    "eval": Tool("run a dataset through a running gateway", add_eval_arguments, _eval, ("tqdm",)),
    "calibrate": Tool(
        "fit the router's bins and routes on a dataset through a running gateway",
        add_calibrate_arguments,
        _calibrate,
        ("tqdm",),
    ),
    "plot": Tool(
        "accuracy against FLOPs per answer from eval reports",
        add_plot_arguments,
        _plot,
        ("matplotlib",),
    ),
    "revote": Tool(
        "replay the selection rules on an eval report's recorded samples (same samples, "
        "same FLOPs)",
        add_revote_arguments,
        _revote,
    ),
    "report": Tool(
        "draw the main dashboard panels to a PNG from Prometheus",
        add_report_arguments,
        _report,
        ("matplotlib",),
    ),
    "bench": Tool(
        "performance under load: direct vLLM, the gateway and optillm side by side "
        "(docs/performance.md)",
        _add_bench_arguments,
        _bench,
        ("tqdm", "matplotlib"),
    ),
    "dashboards": Tool(
        "write the Grafana dashboards as JSON", add_dashboards_arguments, _dashboards
    ),
    "export": Tool(
        "search traces (TTS_TRACE_DIR) into SFT, preference and step-reward sets for TRL",
        add_export_arguments,
        _export,
    ),
    "diagnose": Tool(
        "check a policy model before serving it: `diagnose erank`, eRank per layer",
        add_diagnose_arguments,
        _diagnose,
        ("torch", "transformers", "matplotlib", "tqdm"),
    ),
}


def missing_extra(command: str, needs: tuple[str, ...]) -> str | None:
    """The error line for a command whose modules of the tools extra are not installed."""
    # find_spec, not import: "missing" is "not installed"; a broken install keeps its traceback.
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"error: 'tts-server {command}' needs the tools extra ({' and '.join(missing)} not "
        "installed): pip install 'tts-server[tools]'"
    )


def _checked(command: str, tool: Tool) -> Run:
    def run(args: argparse.Namespace) -> int:
        problem = missing_extra(command, tool.needs)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
        return tool.run(args)

    return run


def add_tool_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register every tool's subcommand and flags on `tts-server`'s subparsers."""
    for command, tool in TOOLS.items():
        parser = sub.add_parser(command, help=tool.help)
        tool.add_arguments(parser)
        parser.set_defaults(func=_checked(command, tool))
