"""The suite's own set-up: TTS_TEST_POLICY_URL must point at a vLLM serving the test model."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, check_is_vllm

URL = "http://policy.test"


def answering(routes: dict[str, Any]) -> httpx.Client:
    """A client whose server answers `routes` (path -> JSON) and 404 elsewhere."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path in routes:
            return httpx.Response(200, json=routes[request.url.path])
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_a_vllm_serving_the_model_is_accepted() -> None:
    client = answering({"/version": {"version": "0.32.0"}, "/v1/models": {"data": [{"id": MODEL}]}})
    assert check_is_vllm(URL, client) == URL


@pytest.mark.parametrize(
    ("routes", "reason"),
    [
        ({}, "GET /version has no version"),  # some other OpenAI-style server
        ({"/version": {"version": "0.32.0"}, "/v1/models": {"data": []}}, f"serve {MODEL}"),
        ({"/version": ["not", "an", "object"]}, "is not a vLLM server: AttributeError"),
    ],
)
def test_anything_else_fails_the_session_clearly(routes: dict[str, Any], reason: str) -> None:
    with pytest.raises(pytest.fail.Exception, match=reason):
        check_is_vllm(URL, answering(routes))


def test_nothing_listening_fails_clearly() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.Client(transport=httpx.MockTransport(refuse))
    with pytest.raises(pytest.fail.Exception, match="is not a vLLM server: ConnectError"):
        check_is_vllm(URL, client)
