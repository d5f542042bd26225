"""The load tests are scripts run by hand (not in CI): at least they must import, so a move of
the test helpers they share cannot break them unnoticed."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "name",
    [
        "loadtests.soak",
        "loadtests.smoke_load",
        "loadtests.abuse_soak",
        "loadtests.logprobs_cost",
        "loadtests.gateway_ab",
        "loadtests.pool_cost",
    ],
)
def test_the_load_test_scripts_import(name: str) -> None:
    module = importlib.import_module(name)
    assert callable(module.main)


def test_gateway_ab_alternates_sides_abba() -> None:
    from loadtests.gateway_ab import abba

    assert abba(["new", "base"], 3) == ["new", "base", "base", "new", "new", "base"]
    assert abba(["new"], 2) == ["new", "new"]


def test_gateway_ab_sums_py_spy_stacks_by_function_and_package(tmp_path) -> None:
    from loadtests.gateway_ab import top_of

    site = "/v/lib/python3.11/site-packages"
    stacks = tmp_path / "s.txt"
    stacks.write_text(
        f"run (/w/tts_server/api/app.py:1);post ({site}/httpx/_client.py:9) 3\n"
        f"run (/w/tts_server/api/app.py:1);dumps (/py/lib/python3.11/json/encoder.py:2) 1\n"
    )
    top = top_of(stacks)
    assert "samples: 4" in top
    assert "75.0%  httpx" in top  # self, by package
    assert "100.0%  tts_server/api" in top  # inclusive: every sample passed through it
    assert "25.0%  encoder" in top
