"""`tts-server calibrate` against the real stack, and a gateway that serves the table it wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tests.support.servers import ServerProcess, cli, free_port
from tts_server.router import BINS, Route, RouterTable, load_table

pytestmark = pytest.mark.integration


def test_calibrate_resumes_and_its_table_drives_auto(stack: Stack, tmp_path: Path) -> None:
    records, table_path = tmp_path / "records.jsonl", tmp_path / "table.json"
    argv = cli("calibrate", "--url", stack.gateway_url, "--dataset", "mawps_singleop")
    argv += ["--limit", "2", "--pilot", "2", "--budgets", "4", "--strategies", "best_of_n,dvts"]
    argv += ["--compare", "best_of_n"]
    argv += ["--records", str(records), "--out", str(table_path)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr
    lines = records.read_text().splitlines()
    # 2 problems x (pilot, best_of_n@2, dvts@2, and the reference: best_of_n at the budget)
    assert sorted(json.loads(line)["option"] for line in lines) == sorted(
        ["pilot", "best_of_n@2", "dvts@2", "fixed:best_of_n@4"] * 2
    )
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert records.read_text().splitlines() == lines  # nothing redone

    table = load_table(table_path)
    assert table.pilot_samples == 2 and table.source == "calibrated on mawps_singleop[0:2]"
    assert {route.strategy for route in table.routes.values()} <= {"pilot", "best_of_n", "dvts"}
    report = json.loads(table_path.read_text())["calibration"]
    assert report["auto_vs_best_fixed"]["best_fixed"] == "best_of_n@4"
    assert report["fixed"]["best_of_n@4"]["mean_flops"] > 0

    def ask_auto(path: Path) -> httpx.Response:
        """One `auto` request to a gateway that serves the table at `path`."""
        port = free_port()
        gateway_argv = cli("gateway", "--port", str(port), "--policy-url", stack.policy_url)
        gateway_argv += ["--prm-url", stack.prm_url]
        gateway = ServerProcess(f"gateway-{path.stem}", gateway_argv, port, tmp_path)
        gateway.start({"TTS_ROUTER_TABLE": str(path)})
        try:
            gateway.wait_healthy(60)
            body = {
                "model": "SmolLM2-135M-Instruct",
                "messages": [
                    {"role": "user", "content": "Tom has 3 apples and buys 5 more. How many?"}
                ],
            }
            response = httpx.post(
                gateway.url + "/v1/chat/completions",
                json=body,
                headers={"X-TTS-Strategy": "auto", "X-TTS-Budget": "4"},
                timeout=300,
            )
        finally:
            gateway.stop()
        assert response.status_code == 200, response.text
        return response

    response = ask_auto(table_path)
    if table.fixed_strategy is not None:
        # Routing did not pay on these 2 problems: the table serves the reference, or a
        # strategy measured with 2 samples, on its share of the budget; no pilot.
        tts = response.json()["tts"]
        assert report["fixed_strategy"] == table.fixed_strategy
        assert report["served"]["choice"] in ("best_of_n@4", "best_of_n@2", "dvts@2")
        assert tts["difficulty"] is None and "X-TTS-Difficulty" not in response.headers
        served = report["served"]["choice"].partition("@")
        assert (tts["route"]["strategy"], tts["route"]["budget"]) == (served[0], int(served[2]))
        # The routes it measured must drive `auto` all the same: serve them without the fallback,
        # so that the routed checks below run whichever table calibration wrote.
        routed = {**json.loads(table_path.read_text()), "fixed_strategy": None}
        table_path = tmp_path / "routed.json"
        table_path.write_text(json.dumps(routed))
        table = load_table(table_path)
        response = ask_auto(table_path)
    tts = response.json()["tts"]
    difficulty, route = tts["difficulty"], tts["route"]
    assert difficulty["pilot_samples"] == 2  # the table's pilot, not the default 4
    assert difficulty["bin"] == table.bin_of(difficulty["confidence"])
    expected = table.routes[difficulty["bin"]].strategy
    assert route["strategy"] == ("pilot" if route["early_exit"] else expected)
    assert response.headers["X-TTS-Difficulty"] == difficulty["bin"]


def test_adaptive_route_on_the_real_stack(stack: Stack, tmp_path: Path) -> None:
    """`auto` with adaptive routes: a rule that never stops draws the whole budget after the
    pilot, one that always stops serves the pilot's samples alone."""
    never = Route("adaptive", round_size=1, stop_margin=None, give_up_after=None)
    always = Route("adaptive", round_size=1, stop_margin=1, give_up_after=1)
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many?"}],
    }
    seen = {}
    for name, rule in (("never", never), ("always", always)):
        # Every question in one bin, and no early exit: only the rule decides.
        table = RouterTable(
            pilot_samples=2,
            easy_min=0.0,
            medium_min=0.0,
            early_exit_agreement=2.0,
            routes=dict.fromkeys(BINS, rule),
        )
        table_path = tmp_path / f"{name}.json"
        table_path.write_text(json.dumps(table.to_json()))
        port = free_port()
        argv = cli("gateway", "--port", str(port), "--policy-url", stack.policy_url)
        argv += ["--prm-url", stack.prm_url]
        gateway = ServerProcess(f"gateway-{name}", argv, port, tmp_path)
        gateway.start({"TTS_ROUTER_TABLE": str(table_path)})
        try:
            gateway.wait_healthy(60)
            response = httpx.post(
                gateway.url + "/v1/chat/completions",
                json=body,
                headers={"X-TTS-Strategy": "auto", "X-TTS-Budget": "5"},
                timeout=300,
            )
        finally:
            gateway.stop()
        assert response.status_code == 200, response.text
        seen[name] = tts = response.json()["tts"]
        tts["usage"] = response.json()["usage"]
        assert tts["route"]["strategy"] == "adaptive"
        assert response.headers["X-TTS-Routed-Strategy"] == "adaptive"
    assert seen["never"]["route"]["budget"] == 5
    assert len(seen["never"]["candidates_answers"]) == 5
    assert seen["always"]["route"]["budget"] == 2
    assert len(seen["always"]["candidates_answers"]) == 2
    # Every sample sends the same prompt, so prompt tokens count the samples drawn exactly
    # (their lengths, and so FLOPs, vary from sample to sample).
    prompt = seen["always"]["usage"]["prompt_tokens"] / 2
    assert prompt > 0 and seen["never"]["usage"]["prompt_tokens"] == 5 * prompt
