"""Fuzzing: schemathesis generates requests from the gateway's own OpenAPI schema (valid and
invalid ones, a bounded number of examples per operation) and sends them over real HTTP to a
gateway served by uvicorn over fake upstreams. No request may get a 5xx, a 422 or a traceback.

Driven through hypothesis directly: schemathesis' pytest plugin does not load under pytest 9.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.support.rig import rig

EXAMPLES = 30  # per operation and mode: bounded for CI
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Small caps so that generated bodies reach the limits, not the fake model's patience.
    with rig(tmp_path_factory.mktemp("fuzz"), max_tokens_cap=64, max_budget=8) as r:
        yield r.url


def fuzzer(operation: Any, mode: Any, url: str, seen: dict[str, int]) -> Callable[[], None]:
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        response = case.call(base_url=url, timeout=60)
        seen[label] = seen.get(label, 0) + 1
        assert response.status_code < 500, (label, case.body, response.text)
        assert response.status_code != 422, (label, case.body, response.text)
        assert "Traceback" not in response.text

    return fuzz  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", MODES)
def test_no_generated_request_gets_a_5xx_or_a_422(gateway_url: str, mode: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"} <= labels
    assert "GET /metrics" not in labels
    seen: dict[str, int] = {}
    for operation in operations:
        try:
            fuzzer(operation, mode, gateway_url, seen)()
        except Unsatisfiable:
            # No invalid input exists for an operation without parameters or a body.
            assert mode is schemathesis.GenerationMode.NEGATIVE and operation.method == "get"
    assert seen.get("POST /v1/chat/completions", 0) >= 5
    assert seen.get("POST /v1/completions", 0) >= 5
