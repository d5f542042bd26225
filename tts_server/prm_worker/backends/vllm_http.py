"""The vLLM server behind the `vllm` PRM backend: one synchronous client (the worker calls the
backend from a thread), retries, and vLLM's answers sorted into refusals and unavailability."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import httpx

from tts_server.clients.http import error_message
from tts_server.flops import FlopsConfigError, shape_from_path
from tts_server.prm_worker.backends.base import BackendUnavailable

logger = logging.getLogger("tts_server.prm_worker")

# Health probes and metadata: short and never retried, so readiness answers quickly.
PROBE_TIMEOUT_S = 5.0
BACKOFF_S = 0.5
BACKOFF_CAP_S = 4.0


class Refused(Exception):
    """vLLM answered 4xx: the request itself is wrong (retrying cannot help)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class VLLMServer:
    """`base_url`'s JSON API. Timeouts, connection errors and 5xx are tried `retries` more times
    (full-jitter exponential backoff) and then raised as `BackendUnavailable`; a 4xx is raised
    as `Refused` at once; a 200 that is not a JSON object as `ValueError` (a 500)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        retries: int,
        transport: httpx.BaseTransport | None = None,
        name: str = "the PRM's vLLM server",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.name = name  # in messages: what failed
        # httpx's sync pool is locked: the health probe may share it with the scoring thread.
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def get(self, path: str, *, probe: bool = False) -> dict[str, Any]:
        return self._call("GET", path, None, probe=probe)

    def post(self, path: str, body: dict[str, Any], *, probe: bool = False) -> dict[str, Any]:
        return self._call("POST", path, body, probe=probe)

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, probe: bool
    ) -> dict[str, Any]:
        attempts = 1 if probe else self.retries + 1
        timeout = PROBE_TIMEOUT_S if probe else self.timeout_s
        failure = ""
        for attempt in range(attempts):
            if attempt:
                ceiling = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1))
                time.sleep(random.uniform(0, ceiling))
            try:
                response = self._client.request(method, path, json=body, timeout=timeout)
            except httpx.TimeoutException:
                failure = f"no answer within {timeout:g} s"
                continue
            except httpx.TransportError as exc:
                failure = f"unreachable ({type(exc).__name__})"
                continue
            status = response.status_code
            if status >= 500:
                failure = f"HTTP {status}"
                continue
            if status >= 400:
                raise Refused(status, error_message(response) or response.reason_phrase)
            try:
                data = response.json()
            except ValueError as exc:
                raise ValueError(f"vLLM's {path} answered with invalid JSON") from exc
            if not isinstance(data, dict):
                raise ValueError(f"vLLM's {path} answered with a JSON {type(data).__name__}")
            return data
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        raise BackendUnavailable(f"{self.name} failed on {path}: {failure} ({tries})")


def local_folder(root: Any) -> Path | None:
    """The model folder a server reports (`/v1/models` root), when it is on this machine."""
    return Path(root) if isinstance(root, str) and Path(root).is_dir() else None


def folder_parameters(folder: Path | None) -> int | None:
    """The FLOPs count's parameters from a model folder's config.json; None when unknown."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return shape_from_path(folder).parameters
    except FlopsConfigError as exc:
        logger.warning("PRM parameter count unknown: %s", exc)
        return None
