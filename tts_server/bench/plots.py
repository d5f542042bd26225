"""PNG plots of a run's summary (matplotlib, the tools extra, imported only to draw)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure(width: float = 7.0, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _bars(ax: Any, labels: list[str], values: list[float | None], color: str = "C0") -> None:
    xs = range(len(labels))
    ax.bar(list(xs), [v or 0.0 for v in values], color=color)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_overhead(rows: list[dict[str, Any]], path: Path) -> Path | None:
    if not rows:
        return None
    fig, ax = _figure()
    labels = [f"{r['pair'].split(' /')[0]} c{r['concurrency']}" for r in rows]
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], [r["p50_ratio"] or 0 for r in rows], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r["p99_ratio"] or 0 for r in rows], 0.4, label="p99")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.05, color="C0", ls="--", lw=0.8)
    ax.axhline(1.10, color="C1", ls="--", lw=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("latency, gateway / direct vLLM")
    ax.set_title("Overhead (targets: p50 1.05, p99 1.10)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_saturation(rows: list[dict[str, Any]], path: Path) -> Path | None:
    if not rows:
        return None
    fig, ax = _figure()
    _bars(ax, [r["cell"] for r in rows], [r["ratio_to_direct"] for r in rows])
    ax.axhline(0.9, color="C1", ls="--", lw=0.8)
    ax.axhline(0.95, color="C2", ls="--", lw=0.8)
    ax.set_ylabel("engine generation tokens/s\n/ direct n=N calls")
    ax.set_title("Engine saturation at concurrency 16")
    return _save(fig, path)


def plot_cost(rows: list[dict[str, Any]], path: Path) -> Path | None:
    if not rows:
        return None
    fig, ax = _figure()
    ms = [(r["cpu_s_per_answer"] or 0) * 1000 for r in rows]
    _bars(ax, [r["strategy"] for r in rows], ms, color="C3")
    ax.set_ylabel("gateway CPU ms per answer")
    ax.set_title("Gateway cost against zero-latency fakes (one worker, one CPU)")
    return _save(fig, path)


def plot_peer(rows: list[dict[str, Any]], path: Path) -> Path | None:
    if not rows:
        return None
    fig, ax = _figure()
    labels, values, colors = [], [], []
    for row in rows:
        short = row["pair"].split(" /")[0]
        labels += [f"ours {short}", f"optillm ({short})"]
        values += [row["ours"]["answers_per_s"], row["optillm"]["answers_per_s"]]
        colors += ["C0", "C1"]
    ax.bar(range(len(values)), [v or 0 for v in values], color=colors)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("answers/s")
    ax.set_title("Against optillm on the same vLLM")
    return _save(fig, path)


def draw_all(summary: dict[str, Any], out: Path) -> list[Path]:
    drawn = [
        plot_overhead(summary["overhead"], out / "overhead.png"),
        plot_saturation(summary["saturation"], out / "saturation.png"),
        plot_cost(summary["gateway_cost"], out / "gateway-cost.png"),
        plot_peer(summary["peer"], out / "peer.png"),
    ]
    return [p for p in drawn if p is not None]
