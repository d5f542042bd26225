"""The load tests are scripts run by hand (not in CI): at least they must import, so a move of
the test helpers they share cannot break them unnoticed."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "name",
    ["loadtests.soak", "loadtests.smoke_load", "loadtests.abuse_soak", "loadtests.logprobs_cost"],
)
def test_the_load_test_scripts_import(name: str) -> None:
    module = importlib.import_module(name)
    assert callable(module.main)
