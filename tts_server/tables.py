"""Which router table `auto` serves when the operator names none (`TTS_ROUTER_TABLE` unset).

A model pair that has been measured gets its measured table: the files in
`tts_server/router_tables/` each name the pair they were measured on (the policy's served name and
the PRM worker's model id), the table, and why (the measurement it rests on). Any other pair gets
Liu et al.'s generic table for the policy's size (`router.default_table`), which was never measured
on that pair. Every choice comes with a one-line reason the gateway logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from tts_server.router import RouterTable, RouterTableError, default_table, parse_table


@dataclass(frozen=True)
class Chosen:
    table: RouterTable
    # Why this table: the measurement it rests on, or why the generic one applies.
    reason: str


@dataclass(frozen=True)
class Measured:
    policy_model: str
    prm_model: str
    name: str  # the file's name
    reason: str
    table: RouterTable


def _model_key(name: str) -> str:
    # A served name may be a hub id or a folder ("HuggingFaceTB/SmolLM2-135M-Instruct"): the last
    # part names the model.
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _parse(name: str, data: Any) -> Measured:
    try:
        pair, reason = data["pair"], data["reason"]
        policy_model, prm_model = str(pair["policy_model"]), str(pair["prm_model"])
    except (KeyError, TypeError) as exc:
        raise RouterTableError(f"{name}: a measured table names its pair and reason") from exc
    table = parse_table({**data, "source": f"measured ({name})"})
    return Measured(policy_model, prm_model, name, str(reason), table)


@cache
def measured_tables() -> tuple[Measured, ...]:
    """The tables the project ships, one per measured pair."""
    folder = resources.files("tts_server") / "router_tables"
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            found.append(_parse(entry.name, json.loads(entry.read_text())))
    return tuple(found)


def choose_table(
    policy_model: str,
    prm_model: str | None,
    policy_parameters: int | None,
    *,
    weak_prm: bool = False,
    use_measured: bool = True,
) -> Chosen:
    """The measured table of this pair if there is one, else the generic table for the size."""
    generic = default_table(policy_parameters, weak_prm=weak_prm)
    if weak_prm:
        return Chosen(generic, "TTS_ROUTER_WEAK_PRM is set")
    if not use_measured:
        return Chosen(generic, "TTS_ROUTER_MEASURED is off")
    if prm_model is not None:
        for entry in measured_tables():
            if _model_key(entry.policy_model) == _model_key(policy_model) and (
                entry.prm_model.lower() == prm_model.lower()
            ):
                return Chosen(entry.table, entry.reason)
    size = "unknown size" if policy_parameters is None else f"{policy_parameters / 1e9:.2g}B"
    prm = prm_model or "an unknown PRM"
    return Chosen(
        generic,
        f"Liu et al.'s findings by policy size ({size}); no table was measured for "
        f"{policy_model} with {prm}",
    )
