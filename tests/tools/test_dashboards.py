"""The Grafana dashboards as committed are the ones `tts-server dashboards` writes from the panel
definitions (every query is run against a real Prometheus in tests/integration/)."""

from __future__ import annotations

import json
from pathlib import Path

from tts_server.tools.dashboards import DASHBOARDS, to_grafana

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_committed_dashboards_are_generated_from_the_panel_definitions() -> None:
    for dashboard in DASHBOARDS:
        path = DEPLOY / "grafana/dashboards" / f"{dashboard.uid}.json"
        committed = json.loads(path.read_text())
        assert committed == to_grafana(dashboard), f"{path}: run `tts-server dashboards`"
        for panel in committed["panels"]:
            assert panel["description"], panel["title"]
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
