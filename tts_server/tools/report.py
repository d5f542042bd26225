"""`tts-server report`: the main dashboard panels as one PNG, for people who don't run Grafana.

Same panels, same PromQL as the Grafana dashboards (tts_server/tools/dashboards.py), evaluated
through Prometheus' HTTP API (`/api/v1/query_range`).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tts_server.tools.dashboards import DASHBOARDS, Panel, substitute

_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ReportError(Exception):
    pass


def parse_duration(text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match:
        raise ReportError(f"bad duration {text!r}: use a number and s, m, h or d (e.g. 1h)")
    return int(match.group(1)) * _SECONDS[match.group(2)]


@dataclass
class Series:
    label: str
    times: list[float]
    values: list[float]


def _legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text or ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


def query_panel(
    client: httpx.Client, url: str, panel: Panel, start: float, end: float, step: int, window: str
) -> list[Series]:
    found: list[Series] = []
    for query in panel.queries:
        params: dict[str, Any] = {
            "query": substitute(query.expr, window),
            "start": start,
            "end": end,
            "step": step,
        }
        response = client.get(f"{url}/api/v1/query_range", params=params)
        body = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        if response.status_code != 200 or body.get("status") != "success":
            error = body.get("error") or f"HTTP {response.status_code}"
            raise ReportError(f"panel {panel.title!r}: Prometheus rejected the query: {error}")
        for result in body["data"]["result"]:
            points = [(float(t), float(v)) for t, v in result["values"] if math.isfinite(float(v))]
            if points:
                found.append(
                    Series(
                        _legend(query.legend, result["metric"]),
                        [t for t, _ in points],
                        [v for _, v in points],
                    )
                )
    return found


def render(
    prometheus: str, since_s: int, out: Path, *, window: str | None = None, end: float | None = None
) -> dict[str, int]:
    """Draw every report panel to `out`; returns series counts per panel title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    end = end or time.time()
    start = end - since_s
    step = max(1, since_s // 240)
    window = window or f"{max(4 * step, 60)}s"
    panels = [(d, p) for d in DASHBOARDS for p in d.panels if p.in_report]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(15, 3.4 * rows), squeeze=False)
    counts: dict[str, int] = {}
    url = prometheus.rstrip("/")
    with httpx.Client(timeout=30.0) as client:
        for ax, (dashboard, panel) in zip(axes.flat, panels, strict=False):
            series = query_panel(client, url, panel, start, end, step, window)
            counts[panel.title] = len(series)
            for s in series[:12]:  # a readable legend
                times, values = with_gaps(s.times, s.values, step)
                ax.plot([_utc(t) for t in times], values, label=s.label, linewidth=1.4)
            ax.set_xlim(_utc(start), _utc(end))
            ax.set_title(f"{dashboard.title}: {panel.title}", fontsize=10)
            ax.set_ylabel(_unit_label(panel.unit), fontsize=8)
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))  # type: ignore[no-untyped-call]
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=7, loc="best")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))
    figure.suptitle(f"tts-server report: last {since_s // 60} min to {stamp}", fontsize=12)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return counts


def with_gaps(
    times: list[float], values: list[float], step: float
) -> tuple[list[float], list[float]]:
    """NaN between points more than 1.5 steps apart: a line must not bridge missing data."""
    out_t: list[float] = []
    out_v: list[float] = []
    for i, (t, v) in enumerate(zip(times, values, strict=True)):
        if i and t - times[i - 1] > 1.5 * step:
            out_t.append((t + times[i - 1]) / 2)
            out_v.append(math.nan)
        out_t.append(t)
        out_v.append(v)
    return out_t, out_v


def _utc(timestamp: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)


def _unit_label(unit: str) -> str:
    return {
        "si:FLOPs": "FLOPs",
        "si:FLOP/s": "FLOP/s",
        "percentunit": "share (0-1)",
        "reqps": "requests/s",
        "s": "seconds",
        "short": "",
    }.get(unit, unit)


def main_report(args: argparse.Namespace) -> int:
    try:
        since = parse_duration(args.since)
        if args.window is not None:
            parse_duration(args.window)
        counts = render(args.prometheus, since, args.out, window=args.window)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: cannot reach Prometheus at {args.prometheus}: {exc}", file=sys.stderr)
        return 2
    empty = [title for title, n in counts.items() if n == 0]
    print(f"report: {args.out} ({len(counts)} panels, {len(empty)} without data)")
    for title in empty:
        print(f"  no data: {title}")
    return 0
