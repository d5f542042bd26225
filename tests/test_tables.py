"""The router tables the project ships for measured model pairs, and how one is chosen."""

from __future__ import annotations

import pytest

from tts_server.router import FIXED_STRATEGIES, ROUTE_STRATEGIES
from tts_server.tables import choose_table, measured_tables

SMOL = 134_515_008


def test_every_shipped_table_parses_names_its_pair_and_why() -> None:
    tables = measured_tables()
    assert tables, "the embedded default's table ships with the package"
    for entry in tables:
        assert entry.policy_model and entry.prm_model
        assert len(entry.reason) > 40 and "docs/" in entry.reason  # points at the measurement
        table = entry.table
        assert table.source == f"measured ({entry.name})"
        assert table.fixed_strategy is None or table.fixed_strategy in FIXED_STRATEGIES
        assert all(route.strategy in ROUTE_STRATEGIES for route in table.routes.values())


@pytest.mark.parametrize(
    "policy_model",
    ["SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct/"],
)
def test_the_embedded_pair_gets_its_measured_table(policy_model: str) -> None:
    chosen = choose_table(policy_model, "arith-checker", SMOL)
    assert chosen.table.source == "measured (smollm2-135m-instruct+arith.json)"
    assert chosen.table.fixed_strategy == "beam_search"
    assert chosen.reason.startswith("beam_search at the whole budget")


@pytest.mark.parametrize(
    ("policy_model", "prm_model", "size", "why"),
    [
        ("SmolLM2-135M-Instruct", "tiny-prm", SMOL, "with tiny-prm"),
        ("SmolLM2-360M-Instruct", "arith-checker", 361_821_120, "(0.36B)"),
        ("SmolLM2-135M-Instruct", None, SMOL, "an unknown PRM"),
        ("x", "arith-checker", None, "unknown size"),
    ],
)
def test_other_pairs_get_the_generic_table_by_size(
    policy_model: str, prm_model: str | None, size: int | None, why: str
) -> None:
    chosen = choose_table(policy_model, prm_model, size)
    assert chosen.table.source == "generic: under 7B"
    assert (
        chosen.table.fixed_strategy is None and chosen.table.routes["easy"].strategy == "best_of_n"
    )
    assert "Liu et al." in chosen.reason and why in chosen.reason


def test_settings_override_the_measured_table() -> None:
    weak = choose_table("SmolLM2-135M-Instruct", "arith-checker", SMOL, weak_prm=True)
    assert weak.table.source.startswith("generic: best-of-N") and "WEAK_PRM" in weak.reason
    off = choose_table("SmolLM2-135M-Instruct", "arith-checker", SMOL, use_measured=False)
    assert off.table.source == "generic: under 7B" and "TTS_ROUTER_MEASURED" in off.reason
