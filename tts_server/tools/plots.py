"""`tts-server plot`: accuracy against FLOPs per answer (log scale) from `eval` reports.

One curve per fixed strategy across its budgets, `auto` as points: the compute-optimal picture.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from tts_server.tools.stats import binomial_se, flops_summary, paired_difference


def with_flops(paths: list[Path], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reports that can be plotted (older ones have no FLOPs)."""
    kept = []
    for path, data in zip(paths, reports, strict=True):
        if data.get("mean_flops") is None:
            print(f"skipping {path.name}: no FLOPs in the report", file=sys.stderr)
            continue
        kept.append(data)
    return kept


def _span(report: dict[str, Any]) -> str:
    offset = report.get("offset", 0)
    return f"{offset}-{offset + report['n'] - 1}"


def _label(report: dict[str, Any]) -> str:
    strategy = report["strategy"]
    label = strategy if strategy == "greedy" else f"{strategy}@{report['budget']}"
    # Reports of `eval --temperature` say so; others used the server's default.
    temperature = report.get("temperature")
    label = label if temperature is None else f"{label} T={temperature:g}"
    # A rule other than the server's default (eval --selection, or revote) is part of the name.
    selection = report.get("selection")
    return label if selection is None else f"{label} [{selection}]"


def _curve(report: dict[str, Any]) -> str:
    """The curve a report is a point of: its strategy, and its selection rule when it names one."""
    selection = report.get("selection")
    return report["strategy"] if selection is None else f"{report['strategy']} [{selection}]"


def _in_order(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(reports, key=lambda r: (r["dataset"], r.get("offset", 0), r["strategy"]))


def flops_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Readable tick positions on a log axis from low to high: 1-2-5 steps per decade, finer
    steps when the axis spans too little of a decade for three of those, never more than `most`
    (matplotlib's own log ticks label every minor tick of a narrow axis, and they overlap)."""
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)):
        ticks = [
            step * 10.0**decade
            for decade in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for step in steps
            if low <= step * 10.0**decade <= high
        ]
        if len(ticks) >= 3:
            break
    stride = math.ceil(len(ticks) / most)
    return ticks[::stride]


def plot(reports: list[dict[str, Any]], out: Path, title: str | None = None) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        by_strategy.setdefault(_curve(report), []).append(report)
    for strategy, group in sorted(by_strategy.items()):
        group.sort(key=lambda r: r["mean_flops"])
        xs = [r["mean_flops"] for r in group]
        ys = [100 * r["accuracy"] for r in group]
        # One standard error: differences inside it are noise, not a ranking.
        errors = [100 * binomial_se(r["accuracy"], r["n"]) for r in group]
        if strategy == "auto":
            axes.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="black", capsize=3, zorder=4)
            axes.scatter(xs, ys, marker="*", s=180, color="black", zorder=5, label="auto")
        else:
            line = axes.plot(xs, ys, marker="o", label=strategy)[0]
            axes.errorbar(xs, ys, yerr=errors, fmt="none", ecolor=line.get_color(), capsize=3)
        for r, x, y in zip(group, xs, ys, strict=True):
            if strategy == "auto":  # the router may spend less than the client's budget
                note = f"budget {r['budget']}"
            else:
                note = f"N={1 if strategy == 'greedy' else r['budget']}"  # greedy ignores it
            axes.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xscale("log")
    low, high = axes.get_xlim()
    axes.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(flops_ticks(low, high)))
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.2g}"))
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes.set_xlabel("mean FLOPs per answer (log scale)")
    axes.set_ylabel("accuracy (%), bars: one standard error")
    axes.set_title(title or ", ".join(sorted({f"{r['dataset']} {_span(r)}" for r in reports})))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """One row per report: what docs/eval.md and the closing notes show."""
    lines = [
        "| dataset | problems | strategy | accuracy ± SE | pass@N | mean FLOPs / answer "
        "| FLOPs / correct | latency p50 / p95 (s) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _in_order(reports):
        flops = r.get("mean_flops")
        per_correct = r.get("flops_per_correct")
        lines.append(
            f"| {r['dataset']} | {_span(r)} | {_label(r)} "
            f"| {100 * r['accuracy']:.1f}% ± {100 * binomial_se(r['accuracy'], r['n']):.1f} "
            f"| {100 * (r.get('pass_at_n') or 0):.1f}% "
            f"| {f'{flops:.3g}' if flops else 'n/a'} "
            f"| {f'{per_correct:.3g}' if per_correct else 'n/a'} "
            f"| {r['latency_p50_s']:.1f} / {r['latency_p95_s']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


def versus_table(reports: list[dict[str, Any]], against: str | None = None) -> str:
    """Every `auto` report against every fixed one on the same problems of the same dataset, or,
    with `against` (a label such as `best_of_n@8`), every report against the one so labelled:
    accuracy difference with its paired standard error (per-problem differences, so the noise
    both share cancels) and the FLOPs ratio. What the router (or a cheaper rule) must win: a
    difference >= 0 at a ratio well under 1."""
    lines = [
        f"| dataset | problems | {'report' if against else 'auto'} | against "
        f"| accuracy difference ± paired SE | FLOPs ratio ({'report' if against else 'auto'} "
        "/ other) |",
        "|---|---|---|---|---|---|",
    ]
    ordered = _in_order(reports)
    if against is None:
        pairs = [
            (left, right)
            for left in ordered
            if left["strategy"] == "auto"
            for right in ordered
            if right["strategy"] != "auto"
        ]
        missing = "no `auto` report among these reports"
    else:
        pairs = [
            (left, right)
            for right in ordered
            if _label(right) == against
            for left in ordered
            if _label(left) != against
        ]
        missing = f"no report labelled {against!r} among these reports"
    for left, right in pairs:
        if left["dataset"] != right["dataset"]:
            continue
        mine = {rec["id"]: rec for rec in left.get("records", []) if "error" not in rec}
        theirs = {rec["id"]: rec for rec in right.get("records", []) if "error" not in rec}
        common = [i for i in mine if i in theirs]
        if not common:
            continue
        difference, se = paired_difference(
            [bool(mine[i].get("correct")) for i in common],
            [bool(theirs[i].get("correct")) for i in common],
        )
        flops_left = [mine[i].get("flops") for i in common]
        flops_right = [theirs[i].get("flops") for i in common]
        ratio = "n/a"
        if None not in flops_left and None not in flops_right and sum(flops_right):
            ratio = f"{sum(flops_left) / sum(flops_right):.2f}"
        lines.append(
            f"| {left['dataset']} | {len(common)} | {_label(left)} | {_label(right)} "
            f"| {100 * difference:+.1f} ± {100 * se:.1f} points | {ratio} |"
        )
    return "\n".join(lines) if len(lines) > 2 else missing


def bin_table(reports: list[dict[str, Any]]) -> str:
    """Accuracy and mean FLOPs per difficulty bin for every strategy, where a problem's bin is the
    one the `auto` run on the same problems estimated (fixed strategies run no pilot); with several
    `auto` reports, the first one given."""
    bins: dict[tuple[str, str], str] = {}
    for r in reports:
        if r["strategy"] == "auto":
            for record in r.get("records", []):
                if record.get("difficulty"):  # the first `auto` report given wins
                    bins.setdefault((r["dataset"], record["id"]), record["difficulty"])
    if not bins:
        return "no `auto` report with difficulty bins among these reports"
    names = ("easy", "medium", "hard")
    lines = [
        "| dataset | strategy | " + " | ".join(f"{b}: accuracy / FLOPs" for b in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in _in_order(reports):
        groups: dict[str, list[dict[str, Any]]] = {b: [] for b in names}
        for record in r.get("records", []):
            name = bins.get((r["dataset"], record["id"]))
            if name in groups:
                groups[name].append(record)
        if not any(groups.values()):
            continue
        cells = []
        for name in names:
            summary = flops_summary(groups[name])
            mean = summary["mean_flops"]
            cells.append(
                f"{100 * (summary['accuracy_answered'] or 0.0):.0f}% / "
                f"{f'{mean:.3g}' if mean is not None else 'n/a'} (n={len(groups[name])})"
            )
        lines.append(f"| {r['dataset']} | {_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_plot(args: argparse.Namespace) -> int:
    everything = [json.loads(p.read_text()) for p in args.reports]
    if args.table:
        print(markdown_table(everything))
    if args.versus or args.against:
        print(versus_table(everything, args.against))
    if args.by_difficulty:
        print(bin_table(everything))
    reports = with_flops(args.reports, everything)
    if not reports:
        print("error: no report with FLOPs to plot", file=sys.stderr)
        return 2
    print(plot(reports, args.out, args.title))
    return 0
