"""`tts-server report`: what it does with Prometheus' answers, without a Prometheus (the live
test is in test_prometheus.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.servers import free_port
from tts_server.tools.report import parse_duration, with_gaps


def test_report_lines_break_where_prometheus_had_no_data() -> None:
    times, values = with_gaps([0, 10, 20, 100, 110], [1.0, 2.0, 3.0, 4.0, 5.0], step=10)
    assert times == [0, 10, 20, 60, 100, 110]
    assert values[:3] == [1.0, 2.0, 3.0] and values[3] != values[3] and values[4:] == [4.0, 5.0]
    assert parse_duration("90m") == 5400 and parse_duration("1h") == 3600


def test_report_explains_a_bad_prometheus_url(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tts_server.cli", "report"]
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [*argv, "--prometheus", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "r.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot reach Prometheus" in done.stderr and "Traceback" not in done.stderr
