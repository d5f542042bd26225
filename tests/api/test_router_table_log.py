"""The gateway says at start which router table `auto` serves and why, without waiting for an
`auto` request: the measured one for the embedded pair, the generic one for any other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import EquationPRM, plain_profiles, script, serve
from tts_server.settings import Settings

SMOL = "SmolLM2-135M-Instruct"


class NamedPRM(EquationPRM):
    def __init__(self, model: str | None) -> None:
        super().__init__()
        self.model = model

    async def model_name(self) -> str | None:
        return self.model


async def started_and_logged(
    tmp_path: Path, prm_model: str | None, caplog: pytest.LogCaptureFixture
) -> list[str]:
    caplog.set_level("INFO", logger="tts_server.engine")
    config = Settings(
        policy_model=SMOL,
        policy_params=134_515_008,
        prm_params=0,
        prompt_profiles=plain_profiles(tmp_path, SMOL),
        probe_interval_s=0.05,
    )
    fake = FakeVLLM(script=script, model=SMOL)
    async with (
        serve(config, fake, NamedPRM(prm_model)) as (app, _),
        app.router.lifespan_context(app),
    ):
        for _ in range(40):  # the announcement runs beside the server: wait for it
            lines = [r.getMessage() for r in caplog.records if "router table" in r.getMessage()]
            if lines:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # and it says it once
        return [r.getMessage() for r in caplog.records if "router table" in r.getMessage()]


async def test_the_embedded_pair_announces_its_measured_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (line,) = await started_and_logged(tmp_path, "arith-checker", caplog)
    assert line.startswith("router table measured (smollm2-135m-instruct+arith.json), because")
    assert line.endswith("auto serves beam_search on 100% of the client's budget, no pilot")


async def test_another_pair_announces_the_generic_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (line,) = await started_and_logged(tmp_path, "Qwen2.5-Math-PRM-7B", caplog)
    assert line.startswith("router table generic: under 7B, because Liu et al.'s findings")


async def test_nothing_is_announced_while_the_prm_is_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert await started_and_logged(tmp_path, None, caplog) == []
