"""What a dashboard is: panels of PromQL queries, and how one becomes Grafana's JSON.

The dashboards themselves are defined in tts_server/tools/dashboards.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RATE = "$__rate_interval"
FLOPS_UNIT = "si:FLOPs"  # Grafana custom unit: SI prefixes, "FLOPs" suffix


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "heatmap"
    in_report: bool = False  # drawn by `tts-server report`
    width: int = 12


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = ("tts-server",)
    links: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def substitute(expr: str, window: str) -> str:
    """A panel's PromQL with Grafana's variables replaced, for Prometheus itself."""
    return expr.replace(RATE, window)


def to_grafana(dashboard: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = 0
    for number, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        targets = [
            {
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": q.expr,
                "legendFormat": q.legend,
                "refId": chr(ord("A") + i),
                **({"format": "heatmap"} if panel.kind == "heatmap" else {}),
            }
            for i, q in enumerate(panel.queries)
        ]
        panels.append(
            {
                "id": number,
                "type": panel.kind,
                "title": panel.title,
                "description": panel.description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {},
                "targets": targets,
            }
        )
        x += panel.width
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "links": list(dashboard.links),
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "panels": panels,
    }
